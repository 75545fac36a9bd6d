"""Model assembly, the diffusers velocity model and codec, memory modes (tiny models, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from fluxsr_core import latents as L
from fluxsr_core import models
from fluxsr_core import weights as W
from fluxsr_core.interfaces import Conditioning, LatentCodec, VelocityModel

# Measured on CPU, fp32, tiny test transformer (seed 0), latent 1x16x8x8, sigma 0.4:
# relative L2 error of the velocity vs fp32 weights: fp8 e4m3fn file 0.037, scaled fp8 0.036,
# fp8_storage memory mode 0.024 (diffusers keeps norms/embeddings in the compute dtype).
FP8_FILE_REL_TOL = 0.08
FP8_STORAGE_REL_TOL = 0.05
# Tiled vs untiled VAE, tiny random VAE, 128x128 smoothed noise, 64 px tiles with 32 px overlap:
# measured relative L2 difference 0.51 (latent) and 0.27 (decoded image). That is large because a
# random VAE's output is dominated by GroupNorm statistics, which diffusers' tiling takes per tile;
# the trained FLUX VAE is far less sensitive (not testable here: no real weights on this machine).
TILED_LATENT_REL_TOL = 0.65
TILED_IMAGE_REL_TOL = 0.45


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_transformer():
    return models.load_transformer("tiny", dtype="fp32", device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny_vae():
    return models.load_vae("tiny", dtype="fp32", device="cpu", seed=0)


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(1)
    return Conditioning(t5=torch.randn(1, 8, 32, generator=g), clip_pooled=torch.randn(1, 16, generator=g),
                        guidance=3.5)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4])


def _sd(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def transformer_files(tmp_path_factory, tiny_transformer):
    """The same tiny transformer in every layout a user may have."""
    d = tmp_path_factory.mktemp("transformer")
    sd = _sd(tiny_transformer)
    bfl = W.transformer_state_dict_to_bfl(sd)
    tiny_transformer.save_pretrained(d / "folder")
    tiny_transformer.save_pretrained(d / "sharded", max_shard_size="40KB")  # as FLUX.1-dev's, in shards
    tiny_transformer.save_pretrained(d / "pipeline" / "transformer")
    (d / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    save_file(sd, d / "diffusers.safetensors")
    save_file(bfl, d / "flux1-bfl.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, d / "comfy.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, d / "fp8.safetensors")
    save_file({k: v.to(torch.float8_e5m2) for k, v in bfl.items()}, d / "e5m2.safetensors")
    scaled = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = v.abs().max() / 448.0
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
        else:
            scaled[k] = v
    save_file(scaled, d / "scaled-fp8.safetensors")
    return d


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory, tiny_vae):
    d = tmp_path_factory.mktemp("vae")
    sd = _sd(tiny_vae)
    tiny_vae.save_pretrained(d / "folder")
    tiny_vae.save_pretrained(d / "pipeline" / "vae")
    save_file(sd, d / "vae-diffusers.safetensors")
    save_file(W.vae_state_dict_to_bfl(sd), d / "ae.safetensors")
    return d


# ------------------------------------------------------------------------- device / dtype

def test_resolve_device_and_dtype():
    assert models.resolve_device("cpu") == torch.device("cpu")
    auto = models.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            models.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device"):
        models.resolve_device("tpu")
    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_dtype("fp16") is torch.float16
    assert models.resolve_dtype("fp32") is torch.float32
    assert models.resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("int8")


def test_auto_dtype_follows_the_chosen_gpus_bf16_hardware(monkeypatch):
    """bf16 from compute capability 8 (Ampere) up, fp16 below (T4 7.5, V100 7.0), where
    torch.cuda.is_bf16_supported() also says yes (by emulation) but torch's fused attention has
    no bf16 kernel; the capability of the device asked for, not of the current GPU."""
    asked = []
    monkeypatch.setattr(models, "resolve_device", lambda device="auto": torch.device(device))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: asked.append(device) or c)
        assert models.resolve_dtype("auto", "cuda:1") is expected, capability
    assert asked and all(torch.device(d) == torch.device("cuda", 1) for d in asked)


def test_auto_dtype_on_a_mac_is_bf16_from_macos_14(monkeypatch):
    """Metal has bf16 from macOS 14; fp16 overflows in FLUX's activations (and its attention gives
    black images from macOS 14.5), so fp16 is only for older macOS."""
    import platform

    monkeypatch.setattr(models, "resolve_device", lambda device="auto": torch.device("mps"))
    for version, expected in (("13.6.1", torch.float16), ("14.0", torch.bfloat16), ("15.1", torch.bfloat16),
                              ("", torch.float16)):
        monkeypatch.setattr(platform, "mac_ver", lambda v=version: (v, ("", "", ""), "arm64"))
        assert models.resolve_dtype("auto", "mps") is expected, version


def test_attention_backends_need_the_models_on_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, the models elsewhere
    assert models.parse_speedups("flash_attention", device="cuda:0") == ["flash_attention"]
    for device in ("cpu", "mps"):
        with pytest.raises(ValueError, match=f"cudnn_attention needs the models on a CUDA GPU.*device is {device}"):
            models.parse_speedups("cudnn_attention", device=device)


def test_fp8_weights_bound_for_mps_are_widened_exactly_on_the_cpu():
    """Apple's MPS has no float8 in most torch releases (moving one there raises TypeError):
    an fp8 file's weights are widened first; every e4m3fn / e5m2 value is a bf16 value."""
    values = torch.linspace(-448, 448, 1001)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        stored = values.to(fp8)
        widened = models._storable_on(torch.device("mps"), stored, torch.bfloat16)
        assert widened.dtype == torch.bfloat16 and widened.device.type == "cpu"
        assert torch.equal(widened.float(), stored.float())
        assert models._storable_on(torch.device("cuda", 0), stored, torch.bfloat16) is stored  # CUDA stores fp8
    plain = torch.ones(3)
    assert models._storable_on(torch.device("mps"), plain, torch.bfloat16) is plain


def test_streamed_group_offload_pins_as_it_goes_where_cpu_memory_is_short(monkeypatch, caplog):
    """diffusers keeps a pinned copy of all the weights for its stream, made beside the CPU copy:
    twice the transformer at once. Where CPU memory lacks that, each block is pinned as it moves."""
    from fluxsr_core import memory

    gib = 2 ** 30
    for available, expected in ((40 * gib, False), (26 * gib, True), (None, False)):
        monkeypatch.setattr(memory, "available_cpu_bytes", lambda a=available: a)
        with caplog.at_level(logging.INFO, logger="fluxsr_core.models"):
            assert models._pin_as_it_goes(22 * gib) is expected, available
    assert "pinned as it moves" in caplog.text
    # torch's pinned allocator rounds each tensor up to a power of two: FLUX.1-dev's 22.2 GiB of
    # bf16 weights take 34.6 GiB pinned, so 30 GB free is too little for the copy (it fit 22 GiB)
    flux = models.empty_transformer(W.shipped_config("flux1-dev-transformer")).to(torch.bfloat16)
    assert models.param_bytes(flux) / gib == pytest.approx(22.17, abs=0.01)
    assert models.pinned_copy_bytes(flux) / gib == pytest.approx(34.6, abs=0.1)
    linear = torch.nn.Linear(3, 5)  # 60 + 20 bytes: 64 + 32 pinned
    assert models.pinned_copy_bytes(linear) == 96


# ----------------------------------------------------------------------- loading layouts

@pytest.mark.parametrize("name", ["folder", "sharded", "pipeline", "diffusers.safetensors", "flux1-bfl.safetensors",
                                  "comfy.safetensors"])
def test_transformer_layouts_give_identical_velocity(transformer_files, tiny_transformer, cond, inputs, name):
    z, s = inputs
    ref = models.DiffusersVelocity(tiny_transformer)(z, s, cond)
    loaded = models.load_transformer(transformer_files / name, dtype="fp32", device="cpu")
    assert loaded.config.guidance_embeds and loaded.config.num_layers == 1
    out = models.DiffusersVelocity(loaded)(z, s, cond)
    assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.parametrize("name", ["fp8.safetensors", "scaled-fp8.safetensors"])
def test_fp8_transformer_files_are_close(transformer_files, tiny_transformer, cond, inputs, name):
    z, s = inputs
    ref = models.DiffusersVelocity(tiny_transformer)(z, s, cond)
    loaded = models.load_transformer(transformer_files / name, dtype="fp32", device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    out = models.DiffusersVelocity(loaded)(z, s, cond)
    err = _rel(out, ref)
    assert 0 < err < FP8_FILE_REL_TOL


@pytest.mark.parametrize("name", ["folder", "pipeline", "vae-diffusers.safetensors", "ae.safetensors"])
def test_vae_layouts_give_identical_codec(vae_files, tiny_vae, name):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = models.DiffusersCodec(tiny_vae)
    loaded = models.DiffusersCodec(models.load_vae(vae_files / name, dtype="fp32", device="cpu"))
    z = ref.encode(img)
    assert torch.equal(loaded.encode(img), z)
    assert torch.equal(loaded.decode(z), ref.decode(z))


def test_a_sharded_folder_is_read_shard_by_shard(transformer_files, tiny_transformer):
    assert len(W.diffusers_folder_files(transformer_files / "sharded")) > 3
    loaded = models.load_transformer(transformer_files / "sharded", dtype="bf16", device="cpu")
    ref = tiny_transformer.state_dict()
    assert all(torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items())


def test_broken_folders_are_named(tmp_path, transformer_files):
    import shutil

    def copy(name):
        target = tmp_path / name
        shutil.copytree(transformer_files / "sharded", target)
        return target

    shards = W.diffusers_folder_files(transformer_files / "sharded")
    incomplete = copy("incomplete")
    (incomplete / shards[1].name).unlink()
    with pytest.raises(W.WeightsNotFoundError, match="1 of the .* shards .* missing.*download is incomplete"):
        models.load_transformer(incomplete)
    bad_index = copy("bad_index")
    (bad_index / "diffusion_pytorch_model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(W.CorruptWeightsError, match="not a valid shard index"):
        models.load_transformer(bad_index)
    short_index = copy("short_shard")
    index = json.loads((short_index / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["transformer_blocks.0.extra.weight"] = shards[0].name
    (short_index / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(W.CorruptWeightsError, match="1 tensors its index names are in no shard"):
        models.load_transformer(short_index)
    wrong_config = copy("wrong_config")
    cfg = json.loads((wrong_config / "config.json").read_text())
    cfg["joint_attention_dim"] += 8
    (wrong_config / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(W.CorruptWeightsError, match="do not fit a FluxTransformer2DModel with its config"):
        models.load_transformer(wrong_config)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(transformer_files / "folder" / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(W.UnsafeWeightsError, match="as pickles .*never unpickles"):
        models.load_transformer(pickled)
    renamed = copy("renamed")
    for f in renamed.glob("diffusion_pytorch_model*"):
        f.unlink()
    shutil.copy(transformer_files / "diffusers.safetensors", renamed / "flux-dev.safetensors")
    with pytest.raises(W.WeightsNotFoundError, match="it holds flux-dev.safetensors: pass that file itself"):
        models.load_transformer(renamed)


def test_load_dtype_bf16(transformer_files):
    m = models.load_transformer(transformer_files / "flux1-bfl.safetensors", dtype="bf16", device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


# -------------------------------------------------------------------------------- errors

def test_vae_file_as_transformer_says_so(vae_files):
    with pytest.raises(W.WrongModelError, match=r"looks like a VAE \(ae.safetensors\); pass it as --vae"):
        models.load_transformer(vae_files / "ae.safetensors", dtype="fp32")
    with pytest.raises(W.WrongModelError, match="VAE folder; pass it as --vae"):
        models.load_transformer(vae_files / "folder", dtype="fp32")


def test_transformer_file_as_vae_says_so(transformer_files):
    with pytest.raises(W.WrongModelError, match="FLUX transformer.*--transformer"):
        models.load_vae(transformer_files / "flux1-bfl.safetensors", dtype="fp32")


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pass a FLUX.1 transformer"):
        models.load_transformer(tmp_path / "flux1-dev.safetensors")
    with pytest.raises(FileNotFoundError, match="Pass the FLUX VAE"):
        models.load_vae(tmp_path / "ae.safetensors")
    # a near miss of a test-config name is not silently a random model
    with pytest.raises(FileNotFoundError):
        models.load_transformer("tinyy")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.load_transformer(tmp_path / "empty_folder")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(W.CorruptWeightsError, match="truncated or not a safetensors file; re-download it"):
        models.load_transformer(tmp_path / "trunc.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.ckpt")
    with pytest.raises(W.UnsafeWeightsError, match="safetensors"):
        models.load_transformer(tmp_path / "model.ckpt")


# ---------------------------------------------------------------------- velocity model

def _direct_pipeline_call(transformer, z, sigma, cond, offset=(0, 0)):
    """What FluxPipeline does around its transformer call, with diffusers' own helpers."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    packed = FluxPipeline._pack_latents(z, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
    img_ids[:, 1] += offset[0]
    img_ids[:, 2] += offset[1]
    txt_ids = torch.zeros(cond.t5.shape[1], 3, dtype=z.dtype)
    guidance = torch.full([1], cond.guidance, dtype=torch.float32).expand(b)
    out = transformer(hidden_states=packed, timestep=sigma, guidance=guidance,
                      pooled_projections=cond.clip_pooled.expand(b, -1),
                      encoder_hidden_states=cond.t5.expand(b, -1, -1), txt_ids=txt_ids, img_ids=img_ids,
                      return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_velocity_equals_diffusers_pipeline_internals(tiny_transformer, cond):
    v = models.DiffusersVelocity(tiny_transformer)
    assert isinstance(v, VelocityModel)
    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(4))
    s = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        assert torch.equal(v(z, s, cond), _direct_pipeline_call(tiny_transformer, z, s, cond))
        assert torch.equal(v(z, s, cond, position_offset=(3, 5)),
                           _direct_pipeline_call(tiny_transformer, z, s, cond, offset=(3, 5)))


def test_position_ids_stay_exact_integers_in_bf16(cond):
    """Global position ids past 256 (outputs over 4096 px) reach the transformer exactly: in bf16,
    the compute dtype, 257 would become 256 and neighbouring tokens would share a position."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(img_ids=kwargs["img_ids"], txt_ids=kwargs["txt_ids"])

    bf16 = models.load_transformer("tiny", dtype="bf16", device="cpu", seed=0)
    v = models.DiffusersVelocity(bf16)
    handle = bf16.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            v(torch.randn(1, 16, 4, 6), torch.tensor([0.5]), cond, position_offset=(257, 511))
    finally:
        handle.remove()
    assert seen["img_ids"].dtype == seen["txt_ids"].dtype == torch.float32
    assert seen["img_ids"][:, 1].unique().tolist() == [257.0, 258.0]  # bf16: 256, 258
    assert seen["img_ids"][:, 2].unique().tolist() == [511.0, 512.0, 513.0]


def test_velocity_batch_offsets_and_guidance(tiny_transformer, cond):
    v = models.DiffusersVelocity(tiny_transformer)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    s = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        both = v(z, s, cond)
        singles = torch.cat([v(z[i:i + 1], s[i:i + 1], cond) for i in range(2)])
        assert both.shape == z.shape and both.dtype == z.dtype
        torch.testing.assert_close(both, singles, rtol=0, atol=1e-5)
        assert torch.equal(v(z, s, cond, position_offset=(0, 0)), both)
        assert (v(z, s, cond, position_offset=(4, 0)) - both).abs().max() > 1e-4
        other_g = Conditioning(cond.t5, cond.clip_pooled, guidance=1.0)
        assert (v(z, s, other_g) - both).abs().max() > 1e-4
        # a scalar sigma broadcasts; a bf16 latent comes back bf16
        assert torch.equal(v(z, torch.tensor(0.3), cond)[0], both[0])
        assert v(z.bfloat16(), s, cond).dtype == torch.bfloat16


def test_velocity_rejects_mismatched_conditioning(tiny_transformer, cond):
    v = models.DiffusersVelocity(tiny_transformer)
    z = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match="batch 3"):
        v(z, torch.ones(2), Conditioning(cond.t5.expand(3, -1, -1), cond.clip_pooled))
    with pytest.raises(ValueError, match="another model"):
        v(z, torch.ones(2), Conditioning(torch.zeros(1, 8, 4096), torch.zeros(1, 768)))
    with pytest.raises(ValueError, match="even"):
        v(torch.randn(1, 16, 5, 4), torch.ones(1), cond)


def test_schnell_like_model_ignores_guidance(tmp_path, tiny_transformer, cond):
    bfl = {k: v for k, v in W.transformer_state_dict_to_bfl(_sd(tiny_transformer)).items()
           if not k.startswith("guidance_in.")}
    save_file(bfl, tmp_path / "schnell.safetensors")
    m = models.load_transformer(tmp_path / "schnell.safetensors", dtype="fp32")
    assert m.config.guidance_embeds is False
    v = models.DiffusersVelocity(m)
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        a = v(z, torch.tensor([0.5]), cond)
        b = v(z, torch.tensor([0.5]), Conditioning(cond.t5, cond.clip_pooled, guidance=9.0))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------- codec

def test_codec_encode_decode(tiny_vae):
    codec = models.DiffusersCodec(tiny_vae)
    assert isinstance(codec, LatentCodec) and codec.downscale == 8 and codec.latent_channels == 16
    img = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z = codec.encode(img)
        assert z.shape == (2, 16, 6, 8)
        assert torch.equal(codec.encode(img), z)  # the mode: no sampling
        raw = tiny_vae.encode(img * 2 - 1).latent_dist.mean
        torch.testing.assert_close(z, L.normalize(raw), rtol=0, atol=0)
        x = codec.decode(z)
    assert x.shape == img.shape and x.min() >= 0 and x.max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.rand(1, 3, 30, 32))


def test_codec_tiled_vae(tiny_vae):
    """diffusers' own tiling (tile_norm "tile"); the default is tests/test_vae_tiling.py's."""
    img = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    img = torch.nn.functional.avg_pool2d(img, 5, 1, 2)  # some image-like smoothness
    tile, overlap = 64, 32
    keep = tile - overlap  # pixels of the first tile kept unblended
    with torch.no_grad():
        plain = models.DiffusersCodec(tiny_vae, tile=0)
        z0 = plain.encode(img)
        x0 = plain.decode(z0)
        tiled = models.DiffusersCodec(tiny_vae, tile=tile, tile_overlap=overlap, tile_norm="tile")
        assert tiny_vae.tile_latent_min_size == tile // 8 and tiny_vae.tile_sample_min_size == tile
        z1 = tiled.encode(img)
        x1 = tiled.decode(z0)
        assert z1.shape == z0.shape and x1.shape == x0.shape
        # our pixel sizes reach diffusers as meant: the first tile is the encoder/decoder run on
        # exactly the top-left tile, up to where the next tile's blend starts
        first = L.normalize(tiny_vae.encode(img[..., :tile, :tile] * 2 - 1).latent_dist.mode())
        torch.testing.assert_close(z1[..., :keep // 8, :keep // 8], first[..., :keep // 8, :keep // 8],
                                   rtol=0, atol=1e-6)
        first_px = (tiny_vae.decode(L.denormalize(z0[..., :tile // 8, :tile // 8])).sample + 1) / 2
        torch.testing.assert_close(x1[..., :keep, :keep], first_px.clamp(0, 1)[..., :keep, :keep],
                                   rtol=0, atol=1e-6)
        rel_z, rel_x = _rel(z1, z0), _rel(x1, x0)
        assert 0 < rel_z < TILED_LATENT_REL_TOL and 0 < rel_x < TILED_IMAGE_REL_TOL
        # more overlap, closer to untiled
        narrow = models.DiffusersCodec(tiny_vae, tile=32, tile_overlap=8, tile_norm="tile")
        assert _rel(narrow.encode(img), z0) > rel_z
        # an image no larger than one tile is not tiled
        small = img[..., :64, :64]
        assert torch.equal(tiled.encode(small), plain.encode(small))
    models.DiffusersCodec(tiny_vae, tile=0)  # leave the shared VAE untiled
    with pytest.raises(ValueError, match="multiple of 8"):
        models.DiffusersCodec(tiny_vae, tile=30)
    with pytest.raises(ValueError, match="smaller"):
        models.DiffusersCodec(tiny_vae, tile=32, tile_overlap=32)


@pytest.mark.parametrize("tile,overlap", [(136, 40), (272, 80)])
def test_codec_tiles_land_on_their_pixels(tiny_vae, tile, overlap):
    # pairs where no float overlap factor gives diffusers' four truncated products: the encode
    # step came out tile - overlap - 1 px, and each tile's latent drifted a pixel off its place
    step = tile - overlap
    img = torch.rand(1, 3, 96, 3 * step + 8, generator=torch.Generator().manual_seed(8))
    img = torch.nn.functional.avg_pool2d(img, 5, 1, 2)
    lat_tile, lat_overlap, lat_step = tile // 8, overlap // 8, step // 8
    try:
        with torch.no_grad():
            tiled = models.DiffusersCodec(tiny_vae, tile=tile, tile_overlap=overlap, tile_norm="tile")
            z = tiled.encode(img)
            # the second tile is the encoder on exactly the pixels from `step` on; past the
            # blend with the first, its latent columns are kept as they are
            second = L.normalize(tiny_vae.encode(img[..., step:step + tile] * 2 - 1).latent_dist.mode())
            torch.testing.assert_close(z[..., lat_step + lat_overlap:2 * lat_step],
                                       second[..., lat_overlap:lat_step], rtol=0, atol=1e-6)
            x = tiled.decode(z)
            second_px = (tiny_vae.decode(L.denormalize(z[..., lat_step:lat_step + lat_tile])).sample + 1) / 2
            torch.testing.assert_close(x[..., step + overlap:2 * step],
                                       second_px.clamp(0, 1)[..., overlap:step], rtol=0, atol=1e-6)
    finally:
        models.DiffusersCodec(tiny_vae, tile=0)  # leave the shared VAE untiled


def test_codec_checks_vae_config(caplog):
    vae = models.load_vae("tiny", dtype="fp32")
    vae.register_to_config(shift_factor=None, scaling_factor=0.18215)
    with caplog.at_level(logging.WARNING, logger="fluxsr_core.models"):
        models.DiffusersCodec(vae)
    assert "FLUX's are 0.1159 and 0.3611" in caplog.text
    # SD3's VAE has FLUX's shapes (it loaded, and gave wrong colours): its config values tell
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    with pytest.raises(W.WrongModelError, match=r"this is the SD3/SD3.5 VAE .*Pass FLUX.1-dev's ae.safetensors"):
        models.DiffusersCodec(vae)
    with pytest.raises(ValueError, match="load the VAE with dtype"):
        models.DiffusersCodec(models.load_vae("tiny", dtype="fp32"), compute_dtype="bf16")


# -------------------------------------------------------------------------- memory modes

@pytest.mark.parametrize("mode", models.MEMORY_MODES)
def test_memory_modes_run_on_cpu(mode, cond, inputs):
    velocity, codec = models.build_models("tiny", "tiny", dtype="fp32", device="cpu", memory_mode=mode)
    ref_t = models.load_transformer("tiny", dtype="fp32")
    ref_v = models.DiffusersVelocity(ref_t)
    ref_c = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32"))
    z, s = inputs
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out, ref = velocity(z, s, cond), ref_v(z, s, cond)
        lat = codec.encode(img)
        pic = codec.decode(lat)
        # the transformer ran again after the codec: offload hooks must hand the device back and forth
        again = velocity(z, s, cond)
    assert torch.equal(out, again)
    torch.testing.assert_close(lat, ref_c.encode(img), rtol=0, atol=1e-6)
    assert pic.shape == img.shape
    if mode in models.FP8_MODES:
        assert any(p.dtype == torch.float8_e4m3fn for p in velocity.transformer.parameters())
        err = _rel(out, ref)
        assert 0 < err < FP8_STORAGE_REL_TOL
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_unknown_memory_mode():
    with pytest.raises(ValueError, match="unknown memory mode"):
        models.build_models("tiny", "tiny", dtype="fp32", device="cpu", memory_mode="turbo")


# ------------------------------------------------------------------------------ speed-ups

def test_fuse_qkv_and_channels_last_keep_the_results(cond, inputs):
    transformer, vae = models.load_transformer("tiny", dtype="fp32"), models.load_vae("tiny", dtype="fp32")
    ref_v, ref_c = models.DiffusersVelocity(models.load_transformer("tiny", dtype="fp32")), \
        models.DiffusersCodec(models.load_vae("tiny", dtype="fp32"))
    assert models.apply_speedups(transformer, vae, "fuse_qkv, channels_last_vae") == ["fuse_qkv", "channels_last_vae"]
    attn, single = transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[0].attn
    inner = ref_v.transformer.transformer_blocks[0].attn.to_q.weight.shape[0]
    assert attn.fused_projections and attn.to_qkv.weight.shape[0] == attn.to_added_qkv.weight.shape[0] == 3 * inner
    assert single.fused_projections and single.to_qkv.weight.shape[0] == 3 * inner
    # one copy of the weights: diffusers keeps the separate q/k/v layers beside the fused ones
    assert not any(hasattr(m, name) for m in (attn, single)
                   for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    assert models.param_bytes(transformer) == models.param_bytes(ref_v.transformer)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z, s = inputs
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(models.DiffusersVelocity(transformer)(z, s, cond), ref_v(z, s, cond),
                                   rtol=0, atol=1e-5)
        codec = models.DiffusersCodec(vae)
        torch.testing.assert_close(codec.encode(img), ref_c.encode(img), rtol=0, atol=1e-5)
        torch.testing.assert_close(codec.decode(z), ref_c.decode(z), rtol=0, atol=1e-5)


def test_fuse_qkv_of_flux1_dev_adds_no_parameters():
    """On FLUX.1-dev's layout (meta device): diffusers' own fusion would hold 2.15 billion
    parameters twice (4.0 GiB of bf16); fuse_qkv_projections keeps the count at 11.9 billion."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(W.shipped_config("flux1-dev-transformer"))
    before = sum(p.numel() for p in model.parameters())
    model.fuse_qkv_projections()
    assert sum(p.numel() for p in model.parameters()) - before == 2_152_378_368
    models.fuse_qkv_projections(model)
    assert sum(p.numel() for p in model.parameters()) == before == 11_901_408_320
    models.fuse_qkv_projections(model)  # a second call changes nothing
    assert sum(p.numel() for p in model.parameters()) == before


def test_compile_wraps_every_block(cond, inputs):
    """The eager backend checks the wiring (which blocks, same outputs) without inductor's minutes."""
    transformer, vae = models.load_transformer("tiny", dtype="fp32"), models.load_vae("tiny", dtype="fp32")
    ref = models.DiffusersVelocity(models.load_transformer("tiny", dtype="fp32"))
    models.apply_speedups(transformer, vae, ["compile"], compile_backend="eager")
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    z, s = inputs
    with torch.no_grad():
        torch.testing.assert_close(models.DiffusersVelocity(transformer)(z, s, cond), ref(z, s, cond),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", models.FP8_MODES)
def test_fp8_storage_is_diffusers_layerwise_casting_of_the_weights_without_its_hooks(mode, tiny_model_files, cond,
                                                                                      inputs):
    """store_in_fp8 stores the very layers diffusers' layerwise casting would (FLUX's "norm"
    pattern left out for fp8_storage_all), with an unmerged LoRA too, but their weights only:
    the biases stay as they were. Its output is bit for bit the model whose weights are rounded
    to e4m3fn and back; it only casts once per call instead of re-creating the parameters twice."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from peft.tuners.lora.layer import LoraLayer

    from fluxsr_core.lora import load_lora

    ours, theirs, rounded = (models.load_transformer("tiny", dtype="fp32") for _ in range(3))
    for t in (ours, theirs, rounded):
        load_lora(t, tiny_model_files.lora, merge=False)
    models.store_in_fp8(ours, torch.float32, every_linear=mode == "fp8_storage_all")
    if mode == "fp8_storage":
        theirs.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:
        patterns = tuple(p for p in DEFAULT_SKIP_MODULES_PATTERN + ("pos_embed",) if p != "norm")
        apply_layerwise_casting(theirs, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                skip_modules_pattern=patterns + tuple(LoraLayer.adapter_layer_names))
    hooked = {n for n, m in theirs.named_modules() if hasattr(m, "_diffusers_hook")
              and m._diffusers_hook.get_hook("layerwise_casting") is not None}
    assert hooked and {n for n, _ in models.fp8_layers(ours, mode == "fp8_storage_all")} == hooked
    assert {n for n, p in ours.named_parameters() if p.dtype == torch.float8_e4m3fn} == {f"{n}.weight" for n in hooked}
    biases = dict(rounded.named_parameters())
    assert all(torch.equal(ours.get_submodule(n).bias, biases[f"{n}.bias"]) for n in hooked
               if ours.get_submodule(n).bias is not None)
    with torch.no_grad():
        for n in hooked:
            weight = rounded.get_submodule(n).weight
            weight.copy_(weight.to(torch.float8_e4m3fn).to(torch.float32))
    z, s = inputs
    with torch.no_grad():
        got = models.DiffusersVelocity(ours)(z, s, cond)
        assert torch.equal(got, models.DiffusersVelocity(rounded)(z, s, cond))
        # diffusers' hooks round the biases too: not the same numbers
        assert not torch.equal(got, models.DiffusersVelocity(theirs)(z, s, cond))


def test_attention_backend_is_set_for_one_transformer_only(cond, inputs):
    """diffusers' set_attention_backend also changes the process-wide default, which every other
    model uses; ours leaves that alone ("_native_math" runs on the CPU too)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    chosen, other = models.load_transformer("tiny", dtype="fp32"), models.load_transformer("tiny", dtype="fp32")
    models.set_attention_backend(chosen, "_native_math")
    assert _AttentionBackendRegistry._active_backend == before
    backends = lambda t: {getattr(m.processor, "_attention_backend", None) for m in t.modules() if hasattr(m, "processor")}
    assert {str(b) for b in backends(chosen)} == {"AttentionBackendName._NATIVE_MATH"} and backends(other) == {None}
    z, s = inputs
    with torch.no_grad():
        torch.testing.assert_close(models.DiffusersVelocity(chosen)(z, s, cond), models.DiffusersVelocity(other)(z, s, cond),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", models.MEMORY_MODES)
def test_compile_runs_under_every_memory_mode(mode, cond, inputs):
    """dynamo traces the blocks under each mode: whole (fullgraph) with the fp8 modes' casts too,
    broken at group offloading's hooks (fullgraph=True fails there on the first call); the
    outputs stay those of the uncompiled model in the same mode."""
    loaded = models.load_models("tiny", "tiny", mode, "fp32", "cpu")
    velocity = models.DiffusersVelocity(loaded.transformer)
    z, s = inputs
    with torch.no_grad():
        ref = velocity(z, s, cond)
        models.apply_speedups(loaded.transformer, loaded.vae, ["compile"], compile_backend="eager", memory_mode=mode)
        torch.testing.assert_close(velocity(z, s, cond), ref, rtol=0, atol=1e-5)


def test_speedups_refuse_what_they_would_get_wrong(tiny_model_files):
    from fluxsr_core.lora import load_lora

    vae = models.load_vae("tiny", dtype="fp32")
    with pytest.raises(ValueError, match="unknown speed-up 'turbo'"):
        models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "fuse_qkv,turbo")
    with pytest.raises(ValueError, match="one of compile and compile_cudagraphs"):
        models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "compile,compile_cudagraphs")
    with pytest.raises(ValueError, match="one of cudnn_attention and flash_attention"):
        models.parse_speedups("flash_attention,cudnn_attention")
    for mode in ("model_offload", "group_offload"):
        with pytest.raises(ValueError, match=f"compile_cudagraphs needs the weights resident.*{mode} moves"):
            models.parse_speedups("compile_cudagraphs", memory_mode=mode)
    for mode in (None, "auto", "none", "fp8_storage", "fp8_storage_all"):  # auto: load_models checks again
        assert models.parse_speedups("compile_cudagraphs", memory_mode=mode) == ["compile_cudagraphs"]
    with pytest.raises(ValueError, match="compile_cudagraphs needs the weights resident"):
        models.load_models("tiny", "tiny", "group_offload", "fp32", "cpu", speedups="compile_cudagraphs")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "cudnn_attention")
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "flash_attention")
    separate = models.load_transformer("tiny", dtype="fp32")
    load_lora(separate, tiny_model_files.lora, merge=False)
    with pytest.raises(ValueError, match="LoRA merged"):
        models.apply_speedups(separate, vae, "fuse_qkv")
    merged = models.load_transformer("tiny", dtype="fp32")
    load_lora(merged, tiny_model_files.lora, merge=True)
    assert models.apply_speedups(merged, vae, "fuse_qkv") == ["fuse_qkv"]
    placed = models.load_transformer("tiny", dtype="fp32")
    models.apply_memory_mode(placed, vae, "fp8_storage", "cpu")
    with pytest.raises(ValueError, match="before the memory mode"):
        models.apply_speedups(placed, vae, "fuse_qkv")


def test_compile_cudagraphs_lets_a_blocks_output_feed_the_next_replay(monkeypatch, caplog):
    """Blocks compiled one by one with CUDA graphs hand each output, in the graphs' pool, to the
    next replay of the same graph (pytorch/pytorch#152887): torch's option to clone such outputs
    is set; on a torch without it a warning says what may happen. Compiling is lazy: nothing
    compiles here."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.triton, "cudagraph_trees_generation_cloning", None)
    vae = models.load_vae("tiny", dtype="fp32")
    assert models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "compile_cudagraphs") == \
        ["compile_cudagraphs"]
    assert inductor_config.triton.cudagraph_trees_generation_cloning == "user_visible"
    monkeypatch.setattr(inductor_config.triton, "cudagraph_trees_generation_cloning", None)
    models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "compile")
    assert inductor_config.triton.cudagraph_trees_generation_cloning is None  # plain compile leaves it
    monkeypatch.setattr(models, "_CUDAGRAPH_CLONING_OPTION", "an_option_older_torch_lacks")
    with caplog.at_level(logging.WARNING, logger="fluxsr_core.models"):
        models.apply_speedups(models.load_transformer("tiny", dtype="fp32"), vae, "compile_cudagraphs")
    assert "pytorch/pytorch#152887" in caplog.text and "use compile if it does" in caplog.text


def test_load_device_follows_the_memory_mode():
    """Weights that will all live on the device are loaded straight there (no copy in RAM);
    the offload modes and fp8_storage (which casts after the LoRA merge) load to the CPU."""
    assert models.load_device("none", "cpu") == torch.device("cpu")
    for mode in ("model_offload", "group_offload", "fp8_storage"):
        assert models.load_device(mode, "cpu") == torch.device("cpu")
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        assert models.load_device("none", "cuda").type == "cuda"
        assert models.load_device("fp8_storage", "cuda").type == "cpu"


def test_group_offload_offloads_the_transformer_and_keeps_the_vae_whole_on_the_device(tiny_model_files):
    """diffusers' group offloading moves weights in hooks on the forward of the VAE's encoder,
    decoder and blocks, which the whole-image VAE tiling never calls (it runs their layers one by
    one): an offloaded VAE's weights would stay in CPU memory beside CUDA inputs. Only the
    transformer is offloaded; the VAE's bytes count in the mode's weights."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    transformer, vae = models.load_transformer("tiny", dtype="fp32"), models.load_vae("tiny", dtype="fp32")
    models.apply_memory_mode(transformer, vae, "group_offload", "cpu")
    assert _is_group_offload_enabled(transformer)
    assert not any(getattr(m, "_diffusers_hook", None) is not None for m in vae.modules())
    vae_bytes = sum(p.numel() * 4 for p in vae.parameters())
    with_vae = models.weight_bytes_per_mode(dict(transformer.config), vae_bytes, "fp32")["group_offload"]
    assert with_vae - models.weight_bytes_per_mode(dict(transformer.config), 0, "fp32")["group_offload"] == vae_bytes


def test_file_loaded_onto_a_device_places_every_tensor(transformer_files, tiny_transformer, cond, inputs):
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = models.load_transformer(transformer_files / "flux1-bfl.safetensors", dtype="fp32", device=dev)
    assert {p.device.type for p in model.parameters()} == {dev.type}
    z, s = inputs
    with torch.no_grad():
        torch.testing.assert_close(models.DiffusersVelocity(model)(z, s, cond).cpu(),
                                   models.DiffusersVelocity(tiny_transformer)(z, s, cond), rtol=0, atol=1e-5)


def test_fp8_storage_all_also_stores_the_modulation_in_fp8(tiny_model_files, cond, inputs):
    """fp8_storage keeps FLUX's AdaLN modulation linears in the compute dtype (diffusers' "norm"
    pattern); fp8_storage_all stores them in fp8 as ComfyUI's fp8 does. Both keep the output
    projection and unmerged LoRA layers in the compute dtype."""
    from fluxsr_core.lora import load_lora

    with_lora = models.load_transformer("tiny", dtype="fp32")
    load_lora(with_lora, tiny_model_files.lora, merge=False)
    z, s = inputs
    with torch.no_grad():
        expected = models.DiffusersVelocity(with_lora)(z, s, cond)
    stored = {}
    for mode in models.FP8_MODES:
        t = models.load_transformer("tiny", dtype="fp32")
        load_lora(t, tiny_model_files.lora, merge=False)
        models.apply_memory_mode(t, models.load_vae("tiny", dtype="fp32"), mode, "cpu")
        stored[mode] = {n: p.dtype for n, p in t.named_parameters()}
        with torch.no_grad():
            assert 0 < _rel(models.DiffusersVelocity(t)(z, s, cond), expected) < FP8_STORAGE_REL_TOL
    fp8 = torch.float8_e4m3fn

    def weight(mode: str, layer: str) -> torch.dtype:  # a LoRA-wrapped layer keeps its weight in base_layer
        dtypes = stored[mode]
        return dtypes.get(f"{layer}.weight", dtypes.get(f"{layer}.base_layer.weight"))

    modulation = "transformer_blocks.0.norm1.linear"
    assert weight("fp8_storage", modulation) == torch.float32 and weight("fp8_storage_all", modulation) == fp8
    for mode, dtypes in stored.items():
        assert weight(mode, "proj_out") == torch.float32, mode
        assert weight(mode, "transformer_blocks.0.ff.net.2") == weight(mode, "x_embedder") == fp8, mode
        lora = [d for n, d in dtypes.items() if ".lora_" in n]
        assert lora and all(d == torch.float32 for d in lora), mode


# -------------------------------------------------------------------- fp8 straight from the file

@pytest.mark.parametrize("mode", models.FP8_MODES)
def test_fp8_load_with_merged_lora_matches_merge_then_cast(transformer_files, tiny_model_files, cond, inputs, mode):
    """load_transformer_fp8 (each weight merged with its LoRA delta and cast as it loads) gives
    the model that loading in full precision, merging through peft and then casting gives."""
    from fluxsr_core.lora import load_lora

    path = transformer_files / "flux1-bfl.safetensors"
    ref = models.load_transformer(path, dtype="fp32")
    ref_info = load_lora(ref, tiny_model_files.lora, merge=True)
    models.apply_memory_mode(ref, models.load_vae("tiny", dtype="fp32"), mode, "cpu")
    got, info = models.load_transformer_fp8(path, mode, dtype="fp32", device="cpu", lora=tiny_model_files.lora)
    assert info.merged and info.rank == ref_info.rank and info.target_modules == ref_info.target_modules
    assert info.settings.t_l == ref_info.settings.t_l
    ref_p, got_p = dict(ref.named_parameters()), dict(got.named_parameters())
    assert ref_p.keys() == got_p.keys()
    fp8_elements = same = 0
    for name, p in ref_p.items():
        assert got_p[name].dtype == p.dtype, name
        if p.dtype == torch.float8_e4m3fn:
            fp8_elements += p.numel()
            same += int((got_p[name].view(torch.uint8) == p.view(torch.uint8)).sum())
        else:
            torch.testing.assert_close(got_p[name], p, rtol=0, atol=1e-5)
    # one rounding (fp32 merge, then fp8) against peft's: a last-bit difference can flip an fp8 step
    assert fp8_elements > 0 and same / fp8_elements > 0.999
    z, s = inputs
    with torch.no_grad():
        a, b = models.DiffusersVelocity(got)(z, s, cond), models.DiffusersVelocity(ref)(z, s, cond)
    assert _rel(a, b) < 1e-3
    # apply_memory_mode with the same mode leaves it as it is; another fp8 mode is refused
    models.apply_memory_mode(got, models.load_vae("tiny", dtype="fp32"), mode, "cpu")
    other = [m for m in models.FP8_MODES if m != mode][0]
    with pytest.raises(ValueError, match="already stored"):
        models.apply_memory_mode(got, models.load_vae("tiny", dtype="fp32"), other, "cpu")


def test_fp8_file_weights_are_kept_as_they_are(transformer_files):
    """An fp8 release loaded into an fp8 mode keeps the file's fp8 bytes (no round trip)."""
    from safetensors import safe_open

    path = transformer_files / "fp8.safetensors"
    got, info = models.load_transformer_fp8(path, "fp8_storage_all", dtype="fp32", device="cpu")
    assert info is None
    with safe_open(str(path), "pt") as f:
        fused = f.get_tensor("double_blocks.0.img_mlp.0.weight")
    w = got.transformer_blocks[0].ff.net[0].proj.weight
    assert w.dtype == torch.float8_e4m3fn and torch.equal(w.view(torch.uint8), fused.view(torch.uint8))


def _row_scales(model) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m._fluxsr_fp8_row_scale for name, m in model.named_modules()
            if getattr(m, "_fluxsr_fp8_row_scale", None) is not None}


@pytest.mark.parametrize("mode", models.FP8_MODES)
@pytest.mark.parametrize("name", ["e5m2.safetensors", "scaled-fp8.safetensors"])
def test_fp8_modes_keep_an_e5m2_or_a_scaled_file_as_it_is(transformer_files, mode, name):
    """An e5m2 file's and a scaled fp8 file's weights stay the file's fp8 values (they were
    rounded to e4m3fn a second time): every fp8 layer computes with the very weight memory mode
    none loads from the same file (value times row scale in fp32, rounded once to bf16)."""
    from safetensors import safe_open

    path = transformer_files / name
    full = dict(models.load_transformer(path, dtype="bf16").named_modules())
    got, _ = models.load_transformer_fp8(path, mode, dtype="bf16", device="cpu")
    scales = _row_scales(got)
    assert bool(scales) == (name == "scaled-fp8.safetensors")
    stored = torch.float8_e5m2 if name == "e5m2.safetensors" else torch.float8_e4m3fn
    layers = models.fp8_layers(got, mode == "fp8_storage_all")
    assert layers
    x = torch.randn(3, layers[0][1].in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for layer_name, layer in layers:
        assert layer.weight.dtype == stored, layer_name
        scale = scales.get(f"{layer_name}.weight")
        assert (scale is None) == (name == "e5m2.safetensors"), layer_name
        true = layer.weight.to(torch.float32) * (1 if scale is None else scale[:, None])
        assert torch.equal(true.to(torch.bfloat16), full[layer_name].weight), layer_name
        if layer.in_features == x.shape[1]:
            with torch.no_grad():
                want = torch.nn.functional.linear(x, full[layer_name].weight, layer.bias.to(torch.bfloat16))
                assert torch.equal(layer(x), want), layer_name
    with safe_open(str(path), "pt") as f:
        file_weight = f.get_tensor("double_blocks.0.img_mlp.0.weight")
    kept = got.transformer_blocks[0].ff.net[0].proj.weight
    assert torch.equal(kept.view(torch.uint8), file_weight.view(torch.uint8))


def test_a_lora_merged_into_a_scaled_fp8_file_is_stored_with_the_files_scale(transformer_files, tiny_model_files):
    """A LoRA-merged weight of a scaled file is stored again over the file's row scale, grown
    where the merge passes the fp8 range (the file's largest weight sits at its top): within
    half an e4m3fn step of the full-precision merge (3 mantissa bits; subnormals: 2^-9 x scale),
    nothing clipped."""
    from fluxsr_core.lora import load_lora

    path = transformer_files / "scaled-fp8.safetensors"
    ref = models.load_transformer(path, dtype="fp32")
    load_lora(ref, tiny_model_files.lora, merge=True)
    got, info = models.load_transformer_fp8(path, "fp8_storage_all", dtype="fp32", device="cpu",
                                            lora=tiny_model_files.lora)
    assert info.merged
    scales, ref_modules = _row_scales(got), dict(ref.named_modules())
    merged = [n for n, _ in models.fp8_layers(got, True) if "to_q" in n]
    assert merged
    file_scale = models.load_transformer_fp8(path, "fp8_storage_all", dtype="fp32", device="cpu")[0]
    grown = [n for n in merged if not torch.equal(scales[f"{n}.weight"], _row_scales(file_scale)[f"{n}.weight"])]
    assert grown  # the test LoRA takes some rows past the file's range
    for layer_name in merged:
        layer, scale = got.get_submodule(layer_name), scales[f"{layer_name}.weight"]
        assert layer.weight.dtype == torch.float8_e4m3fn
        true, want = layer.weight.to(torch.float32) * scale[:, None], ref_modules[layer_name].weight
        bound = want.abs() * 2 ** -4 + scale[:, None] * 2 ** -10 + 1e-7
        assert bool(((true - want).abs() <= bound).all()), layer_name


def test_fp8_load_of_a_folder_is_that_of_the_file(transformer_files, tiny_model_files):
    """A (sharded) diffusers folder streams into an fp8 mode as a single file does: the same
    bytes, LoRA merged on the way (in bf16 the one-rounding merge differs from peft's)."""
    kw = dict(dtype="bf16", device="cpu", lora=tiny_model_files.lora, lora_scale=0.5)
    got, info = models.load_transformer_fp8(transformer_files / "sharded", "fp8_storage", **kw)
    ref, _ = models.load_transformer_fp8(transformer_files / "diffusers.safetensors", "fp8_storage", **kw)
    assert info.merged and info.scale == 0.5
    got_sd, ref_sd = got.state_dict(), ref.state_dict()
    assert got_sd.keys() == ref_sd.keys() and any(v.dtype == torch.float8_e4m3fn for v in got_sd.values())
    for k, v in ref_sd.items():
        assert got_sd[k].dtype == v.dtype and torch.equal(got_sd[k].view(torch.uint8), v.view(torch.uint8)), k
    with pytest.raises(ValueError, match="load_transformer_fp8 is for"):
        models.load_transformer_fp8(transformer_files / "folder", "none")


@pytest.mark.parametrize("mode", models.FP8_MODES)
def test_unmerged_lora_beside_streamed_fp8_weights(mode, tiny_model_files, cond, inputs):
    """--no-merge-lora with an fp8 mode streams the weights into fp8 like a merged load and adds
    the LoRA as a peft adapter in the compute dtype (peft would make it fp8, rounding it to 3
    mantissa bits and failing at the matmul). In fp32 the model equals the old path's: load in
    full precision, add the adapter, then store in fp8."""
    from safetensors.torch import load_file

    from fluxsr_core.lora import load_lora

    z, s = inputs
    for dtype in ("fp32", "bf16"):
        got = models.load_models(tiny_model_files.transformer, "tiny", mode, dtype, "cpu",
                                 lora=tiny_model_files.lora, merge_lora=False)
        assert got.lora is not None and not got.lora.merged
        compute = models.resolve_dtype(dtype)
        adapters = {n: p for n, p in got.transformer.named_parameters() if "lora_" in n}
        assert adapters and {p.dtype for p in adapters.values()} == {compute}
        file_a = load_file(str(tiny_model_files.lora))["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
        assert torch.equal(adapters[f"transformer_blocks.0.attn.to_q.lora_A.{got.lora.adapter_name}.weight"], file_a.to(compute))
        assert any(p.dtype == torch.float8_e4m3fn for p in got.transformer.parameters())
        if dtype == "fp32":
            ref = models.load_transformer(tiny_model_files.transformer, dtype=dtype)
            load_lora(ref, tiny_model_files.lora, merge=False)
            models.apply_memory_mode(ref, models.load_vae("tiny", dtype=dtype), mode, "cpu")
            with torch.no_grad():
                torch.testing.assert_close(models.DiffusersVelocity(got.transformer)(z, s, cond),
                                           models.DiffusersVelocity(ref)(z, s, cond), rtol=0, atol=0)


@pytest.mark.parametrize("mode", models.FP8_MODES)
@pytest.mark.parametrize("name", ["diffusers.safetensors", "scaled-fp8.safetensors"])
def test_fp8_load_fuses_qkv_as_the_file_loads(mode, name, transformer_files, tiny_model_files, cond, inputs):
    """fuse_qkv with an fp8 mode streams too: each attention's q, k and v are merged with their
    LoRA, cast and concatenated as they arrive. The fused weights are the unfused load's bytes
    end to end (a scaled file's row scales joined too), and the model computes what the unfused
    one does."""
    kw = dict(dtype="fp32", device="cpu", lora=tiny_model_files.lora)
    path = transformer_files / name
    fused, info = models.load_transformer_fp8(path, mode, fuse_qkv=True, **kw)
    plain, _ = models.load_transformer_fp8(path, mode, **kw)
    assert info.merged
    fused_sd, plain_sd = fused.state_dict(), plain.state_dict()
    groups = models._fused_qkv_keys(fused)
    assert len(groups) == 4 * len(fused.transformer_blocks) + 2 * len(fused.single_transformer_blocks)  # weights, biases
    assert set(fused_sd) == set(plain_sd) - {k for parts in groups.values() for k in parts} | set(groups)
    for k, v in fused_sd.items():
        want = torch.cat([plain_sd[part] for part in groups[k]]) if k in groups else plain_sd[k]
        assert v.dtype == want.dtype and torch.equal(v.view(torch.uint8), want.view(torch.uint8)), k
    assert fused_sd["transformer_blocks.0.attn.to_qkv.weight"].dtype == torch.float8_e4m3fn
    assert models.param_bytes(fused) == models.param_bytes(plain)
    fused_scales, plain_scales = _row_scales(fused), _row_scales(plain)
    assert bool(fused_scales) == (name == "scaled-fp8.safetensors")
    for k, parts in groups.items():
        if k.endswith(".weight") and k in fused_scales:
            assert torch.equal(fused_scales[k], torch.cat([plain_scales[part] for part in parts])), k
    assert set(fused_scales) - set(groups) == set(plain_scales) - {p for parts in groups.values() for p in parts}
    z, s = inputs
    with torch.no_grad():
        torch.testing.assert_close(models.DiffusersVelocity(fused)(z, s, cond), models.DiffusersVelocity(plain)(z, s, cond),
                                   rtol=0, atol=1e-5)
    # load_models takes this path, and apply_speedups leaves the fused model as it is
    loaded = models.load_models(path, "tiny", mode, "fp32", "cpu", lora=tiny_model_files.lora, speedups="fuse_qkv")
    assert loaded.transformer.state_dict().keys() == fused_sd.keys()


def test_fp8_fused_load_of_a_file_missing_a_projection_names_it(tmp_path, transformer_files):
    from safetensors.torch import load_file

    sd = load_file(str(transformer_files / "diffusers.safetensors"))
    del sd["single_transformer_blocks.0.attn.to_k.weight"]
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(W.CorruptWeightsError, match=r"missing \['single_transformer_blocks.0.attn.to_qkv.weight'\]"):
        models.load_transformer_fp8(tmp_path / "cut.safetensors", "fp8_storage", dtype="fp32", device="cpu",
                                    fuse_qkv=True)


def test_fp8_load_of_a_test_model_merges_through_peft(tiny_model_files, cond, inputs):
    """The shipped test names (no file to stream) load in full precision, merge through peft,
    then are cast."""
    from fluxsr_core.lora import load_lora

    got, info = models.load_transformer_fp8("tiny", "fp8_storage", dtype="fp32", device="cpu",
                                            lora=tiny_model_files.lora, lora_scale=0.5)
    assert info.merged and info.scale == 0.5
    ref = models.load_transformer("tiny", dtype="fp32")
    load_lora(ref, tiny_model_files.lora, scale=0.5, merge=True)
    models.apply_memory_mode(ref, models.load_vae("tiny", dtype="fp32"), "fp8_storage", "cpu")
    z, s = inputs
    with torch.no_grad():
        assert _rel(models.DiffusersVelocity(got)(z, s, cond), models.DiffusersVelocity(ref)(z, s, cond)) < 1e-6


# -------------------------------------------------------------------------------- auto mode

def test_auto_memory_mode_for_flux1_dev_by_free_gpu_memory():
    """FLUX.1-dev's weights per mode, from the shapes, against a card's free memory (3.5 GiB left
    for the activations): 12 GiB group_offload, 15 fp8_storage_all (a 16 GB card), 20 and 23 (a
    24 GB card) fp8_storage, 32 none."""
    gib = 2 ** 30
    need = models.weight_bytes_per_mode(W.shipped_config("flux1-dev-transformer"), 83_819_683 * 2, "bf16")
    assert round(need["none"] / gib, 1) == 22.3 and round(need["fp8_storage_all"] / gib, 1) == 11.2
    picks = {free: models.pick_memory_mode(need, free * gib)[0] for free in (12, 15, 20, 23, 32)}
    assert picks == {12: "group_offload", 15: "fp8_storage_all", 20: "fp8_storage", 23: "fp8_storage", 32: "none"}
    mode, why = models.pick_memory_mode(need, 15 * gib)
    assert "15.0 GiB free" in why and "11.2 GiB" in why
    assert models.pick_memory_mode(need, 1 * gib)[0] == "group_offload"


def test_auto_memory_mode_reads_the_files_headers(transformer_files, vae_files, monkeypatch):
    """The files' own shapes decide (nothing is loaded); off CUDA it is always none."""
    assert models.choose_memory_mode(transformer_files / "flux1-bfl.safetensors", vae_files / "ae.safetensors",
                                     "fp32", "cpu")[0] == "none"
    tr, vae = models.load_transformer("tiny", dtype="fp32"), models.load_vae("tiny", dtype="fp32")
    vae_bytes = sum(p.numel() * 4 for p in vae.parameters())
    need = models.weight_bytes_per_mode(dict(tr.config), vae_bytes, "fp32")
    assert need["none"] == sum(p.numel() * 4 for p in tr.parameters()) + vae_bytes
    monkeypatch.setattr(models, "resolve_device", lambda d="auto": torch.device("cuda", 0))
    for mode in ("none", "fp8_storage", "fp8_storage_all"):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None, free=need[mode]: (free, 2 * free))
        for t_src, v_src in ((transformer_files / "flux1-bfl.safetensors", vae_files / "ae.safetensors"),
                             (transformer_files / "sharded", vae_files / "pipeline")):
            got, _ = models.choose_memory_mode(t_src, v_src, "fp32", "cuda", headroom_bytes=0)
            assert got == mode, (t_src, mode)


def test_fp8_merge_finds_every_lora_layer_in_the_flux1_dev_file_layout():
    """On meta tensors, FLUX.1-dev's BFL file layout converted as the loader converts it: every
    layer a full FluxSR-style LoRA adapts (attention, added projections, MLPs, single blocks'
    proj_mlp/proj_out) names a weight the merge will meet. The loader also refuses, rather than
    drops, a LoRA layer it did not meet (tested below on the tiny model)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from fluxsr_core import lora as lora_mod

    cfg = {k: v for k, v in W.shipped_config("flux1-dev-transformer").items() if not k.startswith("_")}
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(cfg)
    bfl = W.transformer_state_dict_to_bfl(model.state_dict())
    converted, _ = W.transformer_state_dict_to_diffusers(bfl, "meta")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    with init_empty_weights():
        adapted = FluxTransformer2DModel.from_config(cfg)
        adapted.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=targets), adapter_name="fluxsr")
    lora_sd = {f"transformer.{k.replace('.fluxsr.', '.')}": v for k, v in adapted.state_dict().items()
               if ".lora_" in k}
    ranks = lora_mod._check_fits(model, lora_sd, "meta-lora")
    assert len(ranks) == 19 * 12 + 38 * 5 + 1  # 12 per double block, 5 per single block, the final proj_out
    missing = [m for m in ranks if f"{m}.weight" not in converted]
    assert not missing, missing[:5]


def test_fp8_merge_refuses_a_lora_layer_it_did_not_meet(transformer_files, tiny_model_files, monkeypatch):
    from fluxsr_core import lora as lora_mod

    real = lora_mod.merge_factors

    def with_a_stray_layer(*args, **kwargs):
        factors, info = real(*args, **kwargs)
        a, b, f = next(iter(factors.values()))
        factors["transformer_blocks.0.attn.not_a_layer.weight"] = (a, b, f)
        return factors, info

    monkeypatch.setattr(lora_mod, "merge_factors", with_a_stray_layer)
    with pytest.raises(lora_mod.LoraError, match="found no weight"):
        models.load_transformer_fp8(transformer_files / "flux1-bfl.safetensors", "fp8_storage", dtype="fp32",
                                    device="cpu", lora=tiny_model_files.lora)


def test_fp8_load_with_a_model_file_as_lora_says_so(transformer_files, vae_files):
    from fluxsr_core.lora import LoraError

    with pytest.raises(LoraError, match="not a LoRA"):
        models.load_transformer_fp8(transformer_files / "flux1-bfl.safetensors", "fp8_storage_all", dtype="fp32",
                                    device="cpu", lora=vae_files / "ae.safetensors")


def test_fp8_merge_follows_rslora_and_alpha_patterns_as_peft_does(tmp_path, transformer_files, tiny_model_files,
                                                                  cond, inputs):
    """A third-party file whose adapter metadata asks for rsLoRA (alpha / sqrt(r)) and a per-layer
    alpha: the streaming merge scales every layer as peft's merge does."""
    from safetensors import safe_open

    from fluxsr_core.lora import LORA_ADAPTER_METADATA_KEY, load_lora

    with safe_open(str(tiny_model_files.lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layer = "transformer_blocks.0.attn.to_q"
    meta = {LORA_ADAPTER_METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 8.0, "use_rslora": True,
                                                   "alpha_pattern": {layer: 2.0}, "rank_pattern": {}})}
    odd = tmp_path / "rslora.safetensors"
    save_file(tensors, str(odd), metadata=meta)
    path = transformer_files / "flux1-bfl.safetensors"
    ref = models.load_transformer(path, dtype="fp32")
    info_ref = load_lora(ref, odd, scale=0.7, merge=True)
    models.apply_memory_mode(ref, models.load_vae("tiny", dtype="fp32"), "fp8_storage", "cpu")
    got, info = models.load_transformer_fp8(path, "fp8_storage", dtype="fp32", device="cpu", lora=odd, lora_scale=0.7)
    assert info.alpha == info_ref.alpha == 8.0 and info.alphas == info_ref.alphas == {layer: 2.0}
    z, s = inputs
    with torch.no_grad():
        a, b = models.DiffusersVelocity(got)(z, s, cond), models.DiffusersVelocity(ref)(z, s, cond)
    plain = models.load_transformer(path, dtype="fp32")
    models.apply_memory_mode(plain, models.load_vae("tiny", dtype="fp32"), "fp8_storage", "cpu")
    with torch.no_grad():
        no_lora = models.DiffusersVelocity(plain)(z, s, cond)
    assert _rel(a, b) < 1e-3 < _rel(b, no_lora)  # the same LoRA, and a LoRA that does something


# ------------------------------------------------------------- checks made before loading

def test_wrong_files_are_refused_before_the_transformer_loads(tiny_model_files, tmp_path, monkeypatch):
    """A FLUX Fill/Depth transformer loaded in full and then failed on every image; a wrong VAE
    or a LoRA of another width was found only after the transformer's minutes of loading;
    FLUX.1-schnell ran without a word although the guidance it was given did nothing."""
    from safetensors.torch import load_file

    from fluxsr_core.lora import LoraError

    bfl = load_file(str(tiny_model_files.transformer))
    hidden = bfl["img_in.weight"].shape[0]
    fill = {**bfl, "img_in.weight": torch.zeros(hidden, 384)}
    save_file(fill, tmp_path / "flux1-fill.safetensors")
    save_file({k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}, tmp_path / "schnell.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(hidden, 2)},
              tmp_path / "other-width-lora.safetensors")

    def no_loading(*args, **kwargs):
        raise AssertionError("the transformer was loaded before the files were checked")

    monkeypatch.setattr(models, "load_transformer", no_loading)
    monkeypatch.setattr(models, "load_transformer_fp8", no_loading)
    with pytest.raises(W.WrongModelError, match="flux1-fill.safetensors is a FLUX transformer with 384 input "
                                                "channels, not FLUX.1-dev's 64: a FLUX.1 Fill, Depth or Canny"):
        models.load_models(tmp_path / "flux1-fill.safetensors", tiny_model_files.vae, "none", "fp32", "cpu")
    for mode in ("none", "fp8_storage"):
        with pytest.raises(W.WrongModelError, match="is not a FLUX VAE: it looks like a FLUX transformer"):
            models.load_models(tiny_model_files.transformer, tiny_model_files.transformer, mode, "fp32", "cpu")
        with pytest.raises(LoraError):
            models.load_models(tiny_model_files.transformer, tiny_model_files.vae, mode, "fp32", "cpu",
                               lora=tmp_path / "other-width-lora.safetensors")
    _, notes = models.check_model_files(tmp_path / "schnell.safetensors", tiny_model_files.vae)
    assert notes == ["schnell.safetensors has no guidance embedding (FLUX.1-schnell?), so the guidance setting has "
                     "no effect; FluxSR is distilled from FLUX.1-dev, and a FluxSR LoRA made on it gives results off "
                     "from its own on this model"]
    assert models.check_model_files(tiny_model_files.transformer, tiny_model_files.vae,
                                    tiny_model_files.lora)[1] == []


def test_a_comfyui_flux_checkpoint_gives_its_vae_and_sd3_is_refused(tiny_model_files, tmp_path):
    """A ComfyUI FLUX checkpoint (transformer + VAE in one file) given as the VAE was refused as
    'a FLUX transformer, pass it as --transformer'; an SD3 checkpoint was taken as a FLUX VAE."""
    from safetensors.torch import load_file

    bfl, ae = load_file(str(tiny_model_files.transformer)), load_file(str(tiny_model_files.vae))
    save_file({**{f"model.diffusion_model.{k}": v for k, v in bfl.items()},
               **{f"first_stage_model.{k}": v for k, v in ae.items()}}, tmp_path / "flux-checkpoint.safetensors")
    from_checkpoint = models.load_vae(tmp_path / "flux-checkpoint.safetensors", dtype="fp32")
    alone = models.load_vae(tiny_model_files.vae, dtype="fp32")
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in from_checkpoint.state_dict().items())
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2),
           "model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 16, 2, 2),
           **{f"first_stage_model.{k}": v for k, v in ae.items()}}
    save_file(sd3, tmp_path / "sd3_medium.safetensors")
    assert W.identify_checkpoint(sd3) == "sd3-mmdit"
    with pytest.raises(W.WrongModelError, match="sd3_medium.safetensors is not a FLUX VAE: it looks like a Stable "
                                                r"Diffusion 3 \(MMDiT\) model"):
        models.vae_config_of(tmp_path / "sd3_medium.safetensors")


def test_a_folder_quantised_by_a_diffusers_quantiser_is_named(transformer_files, tmp_path):
    """A bitsandbytes NF4 folder (diffusers/FLUX.1-dev-bnb-4bit's layout) was called 'weights
    from another model'."""
    import shutil

    folder = tmp_path / "bnb-4bit"
    shutil.copytree(transformer_files / "folder", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    for read in (models.transformer_config_of, models.load_transformer):
        with pytest.raises(W.UnsupportedWeightsError, match="bnb-4bit holds weights quantised with bitsandbytes"):
            read(folder)


def test_an_fp8_mode_on_a_device_without_float8_is_refused_before_loading(tiny_model_files, monkeypatch):
    """On Apple's MPS torch cannot hold float8: the fp8 modes failed at the first weight with a
    bare TypeError (uncaught by the CLI)."""
    def mps_like(device):
        raise TypeError("Trying to convert Float8_e4m3fn to the MPS backend but it does not have support for that dtype.")

    monkeypatch.setattr(models, "_fp8_probe", mps_like)
    monkeypatch.setattr(models, "_instantiate", lambda *a, **k: pytest.fail("loading began"))
    with pytest.raises(ValueError, match=r"memory mode fp8_storage stores weights as float8, which cpu cannot hold "
                                         r"with this torch .*use memory mode none or model_offload"):
        models.load_models(tiny_model_files.transformer, tiny_model_files.vae, "fp8_storage", "fp32", "cpu")


def test_a_vae_file_missing_one_mid_attention_tensor_is_refused_not_loaded_without_attention(tmp_path):
    """Whether the VAE has mid-block attention was read off one key: a file without
    encoder.mid.attn_1.q.weight was built without attention in the encoder and the decoder, and
    its other 19 attention tensors were dropped without a word (the decode off by 1.3)."""
    from safetensors.torch import save_file

    bfl = W.vae_state_dict_to_bfl(models.load_vae("tiny", dtype="fp32").state_dict())
    assert "encoder.mid.attn_1.q.weight" in bfl
    del bfl["encoder.mid.attn_1.q.weight"]
    save_file(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(W.CorruptWeightsError, match=r"does not fit a AutoencoderKL .*missing "
                                                    r"\['encoder.mid_block.attentions.0.to_q.weight'\]"):
        models.load_vae(tmp_path / "ae.safetensors", dtype="fp32")

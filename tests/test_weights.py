"""File formats and safe loading: safetensors errors, pickles, key identification, conversion."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from fluxsr_core import weights as W


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def flux_dev_meta():
    """FLUX.1-dev's full-size transformer state dict, shapes only (meta device, no memory)."""
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(W.shipped_config("flux1-dev-transformer"))
    return model.state_dict()


@pytest.fixture(scope="module")
def flux_vae_meta():
    from diffusers import AutoencoderKL

    with init_empty_weights():
        model = AutoencoderKL.from_config(W.shipped_config("flux1-dev-vae"))
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_sd():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(W.shipped_config("tiny-transformer"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _RunsCode:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# ----------------------------------------------------------------------- read_safetensors

def test_read_safetensors_roundtrip(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float8_e4m3fn)}, p,
              metadata={"fluxsr.t_l": "0.25"})
    sd, md = W.read_safetensors(p)
    assert torch.equal(sd["a"], torch.arange(6.0).reshape(2, 3)) and sd["b"].dtype == torch.float8_e4m3fn
    assert md == {"fluxsr.t_l": "0.25"}
    info, md2 = W.read_safetensors_header(p)
    assert info["a"] == ("F32", (2, 3)) and md2 == md


def test_read_safetensors_errors(tmp_path):
    with pytest.raises(W.WeightsNotFoundError, match="not found"):
        W.read_safetensors(tmp_path / "missing.safetensors")
    assert issubclass(W.WeightsNotFoundError, FileNotFoundError)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(W.CorruptWeightsError, match=r"empty \(0 bytes\).*re-download"):
        W.read_safetensors(tmp_path / "empty.safetensors")
    save_file({"a": torch.randn(64, 64)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("cut.safetensors",):
        with pytest.raises(W.CorruptWeightsError, match="truncated or not a safetensors file; re-download it"):
            W.read_safetensors(tmp_path / name)
        with pytest.raises(W.CorruptWeightsError, match="truncated"):
            W.read_safetensors_header(tmp_path / name)
    (tmp_path / "text.safetensors").write_text("<html>404 Not Found</html>")
    with pytest.raises(W.CorruptWeightsError, match="truncated or not a safetensors file"):
        W.read_safetensors(tmp_path / "text.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(W.UnsupportedWeightsError, match="GGUF"):
        W.read_safetensors(tmp_path / "model.gguf")
    with pytest.raises(W.WeightsError, match="is a folder"):
        W.read_safetensors(tmp_path)


@pytest.mark.parametrize("header_len", [128, 384, 1408])
def test_safetensors_header_length_that_starts_like_a_pickle_is_read(tmp_path, header_len):
    """A header of 128 + 256*k bytes begins 0x80 0x0k, like a pickle's PROTO opcode."""
    p = tmp_path / "small.safetensors"
    for pad in range(0, 2000):
        save_file({"w": torch.zeros(2)}, p, metadata={"pad": "x" * pad})
        if int.from_bytes(p.read_bytes()[:8], "little") == header_len:
            break
    else:
        pytest.fail("could not build the header length")
    assert p.read_bytes()[0] == 0x80
    sd, md = W.read_safetensors(p)
    assert torch.equal(sd["w"], torch.zeros(2)) and len(md["pad"]) == pad


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickled_model_weights_are_refused(tmp_path, suffix):
    p = tmp_path / f"flux1-dev{suffix}"
    torch.save({"img_in.weight": torch.zeros(2, 2)}, p)
    with pytest.raises(W.UnsafeWeightsError, match="never unpickles model weights.*Convert it to safetensors"):
        W.read_safetensors(p)


def test_pickle_disguised_as_safetensors_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "innocent.safetensors"
    p.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    with pytest.raises(W.UnsafeWeightsError, match="pickle"):
        W.read_safetensors(p)
    torch.save(torch.zeros(1), tmp_path / "zip.safetensors")  # torch's zip container
    with pytest.raises(W.UnsafeWeightsError):
        W.read_safetensors(tmp_path / "zip.safetensors")
    assert not marker.exists()


# ----------------------------------------------------------------- safe_torch_load_tensors

def test_safe_torch_load_tensors_accepts_plain_tensors(tmp_path):
    t = torch.randn(1, 77, 4096)
    torch.save(t, tmp_path / "t5_embedding.pth")
    assert torch.equal(W.safe_torch_load_tensors(tmp_path / "t5_embedding.pth"), t)
    torch.save({"clip": torch.ones(1, 768)}, tmp_path / "d.pth")
    assert torch.equal(W.safe_torch_load_tensors(tmp_path / "d.pth")["clip"], torch.ones(1, 768))
    torch.save((torch.ones(2), torch.zeros(3)), tmp_path / "l.pth")
    got = W.safe_torch_load_tensors(tmp_path / "l.pth")
    assert isinstance(got, list) and [x.shape[0] for x in got] == [2, 3]


def test_safe_torch_load_tensors_refuses_code_and_objects(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"emb": torch.ones(2), "evil": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(W.UnsafeWeightsError, match="refused without running it"):
        W.safe_torch_load_tensors(tmp_path / "evil.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(W.UnsafeWeightsError):
        W.safe_torch_load_tensors(tmp_path / "raw.pth")
    assert not marker.exists()
    torch.save({"emb": torch.ones(2), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(W.UnsafeWeightsError, match="not tensors"):
        W.safe_torch_load_tensors(tmp_path / "mixed.pth")
    torch.save({"nested": {"a": torch.ones(1)}}, tmp_path / "nested.pth")
    with pytest.raises(W.UnsafeWeightsError):
        W.safe_torch_load_tensors(tmp_path / "nested.pth")
    torch.save(torch.ones(100, 100), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(W.CorruptWeightsError, match="truncated"):
        W.safe_torch_load_tensors(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(W.CorruptWeightsError, match="0 bytes"):
        W.safe_torch_load_tensors(tmp_path / "empty.pth")


# -------------------------------------------------------------------------- identification

def test_identify_checkpoint_kinds(flux_dev_meta, flux_vae_meta):
    bfl = W.transformer_state_dict_to_bfl(flux_dev_meta)
    assert W.identify_checkpoint(flux_dev_meta) == "flux-transformer-diffusers"
    assert W.identify_checkpoint(bfl) == "flux-transformer-bfl"
    assert W.identify_checkpoint(f"model.diffusion_model.{k}" for k in bfl) == "flux-transformer-bfl"
    full_comfy = [f"model.diffusion_model.{k}" for k in bfl] + \
        [f"vae.{k}" for k in W.vae_state_dict_to_bfl(flux_vae_meta)] + \
        ["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    assert W.identify_checkpoint(full_comfy) == "flux-transformer-bfl"
    assert W.identify_checkpoint(flux_vae_meta) == "flux-vae-diffusers"
    ae = W.vae_state_dict_to_bfl(flux_vae_meta)
    assert W.identify_checkpoint(ae) == "flux-vae-bfl"
    assert W.identify_checkpoint(f"first_stage_model.{k}" for k in ae) == "flux-vae-bfl"
    cases = {
        "lora": ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
        "fluxsr-bundle": ["t5", "clip_pooled"],
        "clip-text": ["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.final_layer_norm.weight"],
        "t5-text": ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"],
        "sd-unet": ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"],
        "unknown": ["foo.weight", "bar.bias"],
    }
    for kind, keys in cases.items():
        assert W.identify_checkpoint(keys) == kind, kind
    assert W.identify_checkpoint(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "lora"
    assert W.identify_checkpoint(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "lora"
    assert W.identify_checkpoint(["double_blocks.0.processor.proj_lora1.down.weight"]) == "lora"


def test_wrong_kind_messages(flux_vae_meta):
    ae = W.vae_state_dict_to_bfl(flux_vae_meta)
    with pytest.raises(W.WrongModelError,
                       match=r"not a FLUX transformer: it looks like a VAE \(ae.safetensors\); pass it as --vae"):
        W.transformer_state_dict_to_diffusers(ae, "ae.safetensors")
    with pytest.raises(W.WrongModelError, match="looks like a LoRA"):
        W.transformer_state_dict_to_diffusers({"x.lora_A.weight": torch.zeros(1)}, "lora.safetensors")
    with pytest.raises(W.WrongModelError, match="first keys"):
        W.vae_state_dict_to_diffusers({"foo": torch.zeros(1)}, "mystery.safetensors")


# ----------------------------------------------------- conversion at FLUX.1-dev's real size

# Known shapes in the released flux1-dev.safetensors (780 tensors) and ae.safetensors (244).
FLUX_DEV_BFL_SHAPES = {
    "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
    "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
    "double_blocks.18.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_mod.lin.weight": (18432, 3072),
    "double_blocks.0.txt_attn.norm.key_norm.scale": (128,), "single_blocks.37.linear1.weight": (21504, 3072),
    "single_blocks.37.linear2.weight": (3072, 15360), "single_blocks.0.modulation.lin.weight": (9216, 3072),
    "final_layer.linear.weight": (64, 3072), "final_layer.adaLN_modulation.1.weight": (6144, 3072),
}
AE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1), "decoder.norm_out.weight": (128,),
}


def test_flux_dev_bfl_conversion_at_full_size(flux_dev_meta):
    bfl = W.transformer_state_dict_to_bfl(flux_dev_meta)
    assert len(bfl) == 780
    for k, shape in FLUX_DEV_BFL_SHAPES.items():
        assert tuple(bfl[k].shape) == shape, k
    # diffusers' converter (no placeholder path at width 3072) brings back every key and shape
    back, config = W.transformer_state_dict_to_diffusers(bfl)
    assert set(back) == set(flux_dev_meta)
    assert all(back[k].shape == flux_dev_meta[k].shape for k in back)
    expected = {k: v for k, v in W.shipped_config("flux1-dev-transformer").items() if not k.startswith("_")}
    assert config == expected
    # ComfyUI prefix; FLUX.1-schnell has no guidance embedder
    schnell = {f"model.diffusion_model.{k}": v for k, v in bfl.items() if not k.startswith("guidance_in")}
    assert W.infer_transformer_config(schnell)["guidance_embeds"] is False


def test_flux_vae_conversion_at_full_size(flux_vae_meta):
    ae = W.vae_state_dict_to_bfl(flux_vae_meta)
    assert len(ae) == 244
    for k, shape in AE_SHAPES.items():
        assert tuple(ae[k].shape) == shape, k
    back, config = W.vae_state_dict_to_diffusers(ae)
    assert set(back) == set(flux_vae_meta) and all(back[k].shape == flux_vae_meta[k].shape for k in back)
    shipped = W.shipped_config("flux1-dev-vae")
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv"):
        assert config[key] == shipped[key], key


def test_tiny_bfl_roundtrip_is_exact(tiny_sd):
    """Width 32 goes through the placeholder split; values come back bit for bit."""
    bfl = W.transformer_state_dict_to_bfl(tiny_sd)
    back, config = W.transformer_state_dict_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert set(back) == set(tiny_sd)
    assert all(torch.equal(back[k], tiny_sd[k]) for k in tiny_sd)
    assert config["num_attention_heads"] == 2 and config["joint_attention_dim"] == 32
    assert config["axes_dims_rope"] == [4, 6, 6]


def test_incomplete_or_odd_transformer_files(tiny_sd):
    bfl = W.transformer_state_dict_to_bfl(tiny_sd)
    missing = {k: v for k, v in bfl.items() if k != "double_blocks.0.img_attn.proj.weight"}
    with pytest.raises(W.CorruptWeightsError, match="img_attn.proj.weight"):
        W.transformer_state_dict_to_diffusers(missing)
    extra = dict(bfl, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(1)})
    with pytest.raises(W.UnsupportedWeightsError, match="no place"):
        W.transformer_state_dict_to_diffusers(extra)
    gap = {k.replace("single_blocks.0.", "single_blocks.1."): v for k, v in bfl.items()}
    with pytest.raises(W.CorruptWeightsError, match="numbered"):
        W.transformer_state_dict_to_diffusers(gap)
    odd = {k: v for k, v in tiny_sd.items()}
    odd["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(12)
    with pytest.raises(W.UnsupportedWeightsError, match="head size 12"):
        W.infer_transformer_config(odd)


def test_sd_vae_is_refused(flux_vae_meta):
    sd = dict(flux_vae_meta)
    sd["decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")
    with pytest.raises(W.WrongModelError, match="4 latent channels.*Stable Diffusion"):
        W.infer_vae_config(sd)


# ---------------------------------------------------------------------------------- fp8

def test_dequantize_scaled_fp8():
    w = torch.randn(8, 4)
    s = w.abs().max() / 448
    sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
          "a.weight": (w / s).to(torch.float8_e4m3fn), "a.scale_weight": s.reshape(1),
          "a.scale_input": torch.ones(1), "a.bias": torch.ones(8)}
    out = W.dequantize_scaled_fp8(sd)
    assert set(out) == {"a.weight", "a.bias"}
    expected = (w / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(out["a.weight"], expected)
    assert ((out["a.weight"] - w).abs().max() / w.abs().max()) < 0.07  # e4m3: 3 mantissa bits
    rows = torch.rand(8) + 0.5
    per_row = W.dequantize_scaled_fp8({"b.weight": torch.ones(8, 4, dtype=torch.float8_e4m3fn),
                                       "b.scale_weight": rows})
    assert torch.equal(per_row["b.weight"], rows[:, None].expand(8, 4))
    with pytest.raises(W.UnsupportedWeightsError, match="neither a scalar"):
        W.dequantize_scaled_fp8({"c.weight": torch.ones(8, 4), "c.scale_weight": torch.ones(3)})
    plain = {"d.weight": torch.ones(2)}
    assert W.dequantize_scaled_fp8(plain) is plain


def test_a_scaled_fp8_file_is_dequantised_tensor_by_tensor_as_it_loads(tmp_path, tiny_sd):
    """The whole file was dequantised to fp32 before loading began (47 GB of RAM for FLUX.1-dev's
    12 GB file): the conversion now keeps the fp8 values and each row's scale under its diffusers
    key (q | k | v split, the final layer's swap), applied as each tensor is placed."""
    from fluxsr_core import models

    bfl = W.transformer_state_dict_to_bfl(tiny_sd)
    gen = torch.Generator().manual_seed(5)
    scaled = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.ndim == 2:
            rows = (v.abs().amax(dim=1) / 448).clamp_min(1e-8) * (1 + torch.rand(v.shape[0], generator=gen))
            per_row = "linear1" in k or "qkv" in k or "adaLN" in k or "final_layer" in k
            scale = rows if per_row else rows.max().reshape(1)
            scaled[k] = (v / scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = scale
        else:
            scaled[k] = v
    eager, _ = W.transformer_state_dict_to_diffusers(W.dequantize_scaled_fp8(dict(scaled)))
    lazy, _ = W.transformer_state_dict_to_diffusers(dict(scaled))
    assert isinstance(lazy, W.RowScaledStateDict) and set(lazy) == set(eager)
    assert lazy["single_transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn
    assert {"transformer_blocks.0.attn.to_k.weight", "norm_out.linear.weight"} <= set(lazy.row_scales)
    for k, v in eager.items():
        got = W.apply_row_scale(lazy[k], lazy.row_scales[k]) if k in lazy.row_scales else lazy[k]
        assert torch.equal(got.to(v.dtype), v), k
    save_file(scaled, tmp_path / "scaled-fp8.safetensors")
    loaded = models.load_transformer(tmp_path / "scaled-fp8.safetensors", dtype="fp32", device="cpu")
    assert all(torch.equal(p, eager[k].float()) for k, p in loaded.state_dict().items())


def test_comfyuis_per_layer_fp8_format_loads_and_nvfp4_is_named(tmp_path, tiny_sd):
    """ComfyUI's newer quantised files (``<layer>.comfy_quant`` + ``weight_scale``) were refused
    as 'keys with no place in a FLUX.1 transformer'."""
    import json

    from fluxsr_core import models

    bfl = W.transformer_state_dict_to_bfl(tiny_sd)
    as_bytes = lambda fmt: torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)  # noqa: E731
    quantised, dequantised, nvfp4 = {}, {}, {}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith(("double_blocks", "single_blocks")):
            layer, scale = k[: -len(".weight")], v.abs().max() / 448
            quantised[k] = (v / scale).to(torch.float8_e4m3fn)
            quantised.update({f"{layer}.weight_scale": scale.reshape(()), f"{layer}.input_scale": torch.ones(()),
                              f"{layer}.comfy_quant": as_bytes("float8_e4m3fn")})
            dequantised[k] = quantised[k].float() * scale
            nvfp4.update({k: torch.zeros(v.shape[0], v.shape[1] // 2, dtype=torch.uint8),
                          f"{layer}.comfy_quant": as_bytes("nvfp4")})
        else:
            quantised[k] = dequantised[k] = nvfp4[k] = v
    save_file(quantised, tmp_path / "comfy-quant-fp8.safetensors")
    loaded = models.load_transformer(tmp_path / "comfy-quant-fp8.safetensors", dtype="fp32", device="cpu")
    expected, _ = W.transformer_state_dict_to_diffusers(dequantised)
    assert all(torch.equal(p, expected[k].float()) for k, p in loaded.state_dict().items())
    save_file(nvfp4, tmp_path / "nvfp4.safetensors")
    with pytest.raises(W.UnsupportedWeightsError, match="quantised in ComfyUI's 'nvfp4' format"):
        models.load_transformer(tmp_path / "nvfp4.safetensors", dtype="fp32", device="cpu")
    # the public dequantiser knows the per-layer format too (it passed its raw fp8 values through)
    at_once = W.dequantize_scaled_fp8(quantised)
    assert not any(k.endswith((".comfy_quant", ".weight_scale", ".input_scale")) for k in at_once)
    assert all(torch.equal(at_once[k].float(), dequantised[k].float()) for k in dequantised)


def test_describe_file(tmp_path, tiny_sd):
    save_file(W.transformer_state_dict_to_bfl(tiny_sd), tmp_path / "flux.safetensors")
    line = W.describe_file(tmp_path / "flux.safetensors")
    assert "FLUX transformer (BFL" in line and "F32" in line


def test_bfl_row_sources_of_flux1_dev():
    """FLUX.1-dev's fused BFL tensors, row by row, from the weight converter itself (meta shapes)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(W._strip_meta(W.shipped_config("flux1-dev-transformer")))
    sources = W.bfl_row_sources({k: v.shape for k, v in model.state_dict().items()})
    qkv = sources["double_blocks.7.txt_attn.qkv.weight"]
    assert [k for k, _ in qkv] == [f"transformer_blocks.7.attn.add_{x}_proj.weight" for x in "qkv"]
    assert [rows[0].item() for _, rows in qkv] == [0, 3072, 6144] and all(len(r) == 3072 for _, r in qkv)
    linear1 = sources["single_blocks.37.linear1.weight"]
    assert [len(r) for _, r in linear1] == [3072, 3072, 3072, 12288]
    (key, rows), = sources["final_layer.adaLN_modulation.1.weight"]
    assert key == "norm_out.linear.weight" and rows[:2].tolist() == [3072, 3073] and rows[3072].item() == 0

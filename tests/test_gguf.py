"""GGUF transformers (city96's quantisations of FLUX.1-dev, ComfyUI-GGUF's format) in
``fluxsr upscale`` and the Python API: the picture is the one of the weights diffusers
dequantises, the LoRA stays an adapter, and what GGUF cannot do is refused before loading."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxsr_core import bundle, cli, lora, models, weights

pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")


def _velocity(transformer, cond):
    latent = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return models.DiffusersVelocity(transformer)(latent, torch.tensor([0.25]), cond)


def test_a_gguf_transformer_computes_with_its_dequantised_weights(tiny_gguf_files, tiny_model_files):
    cond = bundle.load_bundle(tiny_model_files.conditioning).to_conditioning()
    quantised = models.load_transformer(tiny_gguf_files.gguf, dtype="fp32")
    reference = models.load_transformer(tiny_gguf_files.dequantized, dtype="fp32")
    assert models.is_gguf_model(quantised) and not models.is_gguf_model(reference)
    qkv = quantised.transformer_blocks[0].attn.to_q.weight
    assert type(qkv).__name__ == "GGUFParameter" and qkv.dtype == torch.uint8  # stays quantised in memory
    assert models.transformer_config_of(tiny_gguf_files.gguf) == models.transformer_config_of(tiny_model_files.transformer)
    assert torch.equal(_velocity(quantised, cond), _velocity(reference, cond))
    for model in (quantised, reference):
        lora.load_lora(model, tiny_model_files.lora, merge=False)
    with_lora = _velocity(quantised, cond)
    assert torch.equal(with_lora, _velocity(reference, cond))
    # and the quantisation is there at all: the original weights give another velocity
    original = models.load_transformer(tiny_model_files.transformer, dtype="fp32")
    lora.load_lora(original, tiny_model_files.lora, merge=False)
    assert not torch.equal(with_lora, _velocity(original, cond))


def test_fluxsr_upscale_runs_a_gguf_transformer(tiny_gguf_files, tiny_model_files, photo_png, tmp_path, capsys):
    """The same picture as the dequantised weights with the LoRA unmerged; the log says why it is."""
    from PIL import Image
    import numpy as np

    common = ["--vae", str(tiny_model_files.vae), "--lora", str(tiny_model_files.lora), "--conditioning",
              str(tiny_model_files.conditioning), "--device", "cpu", "--dtype", "fp32", "-q", "--scale", "2"]
    assert cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "gguf.png"),
                     "--transformer", str(tiny_gguf_files.gguf)] + common) == 0
    err = capsys.readouterr().err
    assert "the LoRA is kept as an adapter beside the GGUF weights" in err
    assert cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "reference.png"), "--no-merge-lora",
                     "--transformer", str(tiny_gguf_files.dequantized)] + common) == 0
    with Image.open(tmp_path / "gguf.png") as a, Image.open(tmp_path / "reference.png") as b:
        assert a.size == (80, 64)
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("flags, message", [
    (["--memory-mode", "fp8_storage"], "memory mode fp8_storage stores a safetensors transformer in fp8; this GGUF"),
    (["--memory-mode", "fp8_storage_all"], "quantised already: use none, model_offload, group_offload"),
    (["--speedups", "compile"], "compile cannot be used with a GGUF transformer"),
    (["--speedups", "fuse_qkv,compile_cudagraphs"], "fuse_qkv, compile_cudagraphs cannot be used with a GGUF"),
    (["--speedups", "fuse_qkv", "--no-merge-lora"], "fuse_qkv cannot be used with a GGUF"),  # not "merge it"
])
def test_what_gguf_cannot_do_is_refused_before_loading(flags, message, tiny_gguf_files, tiny_model_files, photo_png,
                                                        tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(models, "load_models", never)
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "out.png"), "--transformer",
                     str(tiny_gguf_files.gguf), "--vae", str(tiny_model_files.vae), "--lora", str(tiny_model_files.lora),
                     "--conditioning", str(tiny_model_files.conditioning), "--device", "cpu", "-q"] + flags)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_the_api_refuses_what_would_corrupt_gguf_weights(tiny_gguf_files, tiny_model_files):
    transformer = models.load_transformer(tiny_gguf_files.gguf, dtype="fp32")
    vae = models.load_vae("tiny", dtype="fp32")
    with pytest.raises(lora.LoraError, match="merge=True cannot change GGUF-quantised weights"):
        lora.load_lora(transformer, tiny_model_files.lora, merge=True)
    with pytest.raises(ValueError, match="GGUF-quantised weights already"):
        models.apply_memory_mode(transformer, vae, "fp8_storage_all", "cpu")
    with pytest.raises(ValueError, match="fuse_qkv cannot be used with a GGUF transformer"):
        models.apply_speedups(transformer, vae, "fuse_qkv")
    with pytest.raises(ValueError, match="quantised already"):
        models.load_transformer_fp8(tiny_gguf_files.gguf, "fp8_storage", dtype="fp32", device="cpu")
    loaded = models.load_models(tiny_gguf_files.gguf, tiny_model_files.vae, "none", "fp32", "cpu",
                                lora=tiny_model_files.lora)  # merge_lora=True asked: kept apart, and said so
    assert loaded.lora.merged is False and "kept as an adapter" in loaded.notes[0]


def test_gguf_offload_modes_give_the_same_velocity(tiny_gguf_files, tiny_model_files):
    cond = bundle.load_bundle(tiny_model_files.conditioning).to_conditioning()
    velocities = []
    for mode in models.GGUF_MEMORY_MODES:
        loaded = models.load_models(tiny_gguf_files.gguf, tiny_model_files.vae, mode, "fp32", "cpu")
        assert loaded.memory_mode == mode and models.is_gguf_model(loaded.transformer)
        velocities.append(_velocity(loaded.transformer, cond))
    assert all(torch.equal(v, velocities[0]) for v in velocities[1:])


def test_auto_counts_a_gguf_file_as_stored_and_never_picks_fp8(tiny_gguf_files, tiny_model_files, monkeypatch):
    header = weights.read_gguf_header(tiny_gguf_files.gguf)
    stored = sum(n for _, _, n in header.values())
    assert header["double_blocks.0.img_attn.qkv.weight"][:2] == ("Q8_0", (96, 32))
    assert header["img_in.weight"][0] == header["time_in.in_layer.weight"][0] == "BF16"  # as city96's files keep them
    assert header["double_blocks.0.img_attn.qkv.weight"][2] == 96 * 32 // 32 * 34  # 32 int8 + an fp16 scale per block
    # the adapter (GGUF keeps the LoRA apart) and one dequantised weight (the largest: 32 x 256, fp16 then bf16)
    workspace = 32 * 256 * (2 + 2)
    sizes = models.gguf_weight_bytes_per_mode(tiny_gguf_files.gguf, vae_bytes=1000, lora_bytes=500, dtype="bf16")
    assert set(sizes) == set(models.GGUF_MEMORY_MODES)
    assert sizes["none"] == stored + 1000 + 500 + workspace and sizes["model_offload"] == stored + 500 + workspace
    blocks = weights.gguf_transformer_bytes(tiny_gguf_files.gguf)["blocks"]
    assert len(blocks) == 2 and sizes["group_offload"] == stored - sum(blocks) + 2 * max(blocks) + 1000 + workspace
    assert models.pick_memory_mode(sizes, free_bytes=sizes["none"] + 10, headroom_bytes=0)[0] == "none"
    assert models.pick_memory_mode(sizes, free_bytes=sizes["none"] - 10, headroom_bytes=0)[0] == "group_offload"
    # choose_memory_mode's GGUF branch, as on a GPU whose free memory fits the weights but not the LoRA
    lora_bytes = sum(t.numel() for t in weights.meta_state_dict(tiny_model_files.lora).values()) * 2
    vae_bytes = sum(t.numel() for t in weights.meta_state_dict(tiny_model_files.vae).values()) * 2
    without = models.gguf_weight_bytes_per_mode(tiny_gguf_files.gguf, vae_bytes, 0, "bf16")["none"]
    monkeypatch.setattr(models, "resolve_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (without + lora_bytes // 2, 0))
    mode, why = models.choose_memory_mode(tiny_gguf_files.gguf, tiny_model_files.vae, torch.bfloat16, "cuda",
                                          headroom_bytes=0, lora=tiny_model_files.lora)
    assert mode == "group_offload" and "group_offload" in why
    assert models.choose_memory_mode(tiny_gguf_files.gguf, tiny_model_files.vae, torch.bfloat16, "cuda",
                                     headroom_bytes=0)[0] == "none"  # no LoRA: it fits


def test_broken_and_wrong_gguf_files_are_named(tiny_gguf_files, gguf_writer, tmp_path, monkeypatch):
    data = tiny_gguf_files.gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CorruptWeightsError, match="cut.gguf is a truncated or damaged GGUF file; re-download"):
        models.load_transformer(cut, dtype="fp32")
    renamed = tmp_path / "not-really.gguf"
    renamed.write_bytes(b"\x00" * 64)
    with pytest.raises(weights.CorruptWeightsError, match="named .gguf but does not start as a GGUF file does"):
        models.transformer_config_of(renamed)
    other = tmp_path / "llm.gguf"
    gguf_writer({"blk.0.attn_q.weight": torch.randn(64, 64)}, other)
    with pytest.raises(weights.WrongModelError, match="llm.gguf is not a FLUX transformer"):
        models.load_transformer(other, dtype="fp32")
    with pytest.raises(weights.UnsupportedWeightsError, match="GGUF only for the FLUX transformer"):
        models.load_vae(tiny_gguf_files.gguf, dtype="fp32")
    # a diffusers-keyed GGUF (ComfyUI-GGUF's convert.py takes those too) missing a tensor: named, as for
    # safetensors (diffusers' own loader handed it to its BFL converter, an IndexError)
    diffusers_keyed = {k: v for k, v in models.load_transformer("tiny", dtype="fp32").state_dict().items()
                       if k != "proj_out.bias"}
    gguf_writer(diffusers_keyed, tmp_path / "incomplete.gguf")
    with pytest.raises(weights.CorruptWeightsError, match=r"incomplete.gguf does not fit a FLUX transformer with the "
                                                          r"config read from it: missing \['proj_out.bias'\]"):
        models.load_transformer(tmp_path / "incomplete.gguf", dtype="fp32")
    assert weights.describe_file(tiny_gguf_files.gguf) == (
        "flux-tiny-Q8_0.gguf: GGUF, a FLUX transformer (BFL/ComfyUI keys, e.g. flux1-dev.safetensors); pass it as "
        "--transformer; 52 tensors, F32 x36, Q8_0 x11, BF16 x5")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(weights.UnsupportedWeightsError, match=r"needs the gguf package \(pip install gguf\)"):
        models.load_transformer(tiny_gguf_files.gguf, dtype="fp32")


def test_training_and_pairs_refuse_a_gguf_transformer(tiny_gguf_files):
    from fluxsr_training.config_io import ConfigError
    from fluxsr_training.generate import GenerateConfig, check_generate_config
    from fluxsr_training.trainer import check_config, load_train_config

    cfg = load_train_config(None, [f"model.transformer={tiny_gguf_files.gguf}", "model.vae=tiny", "data.pairs=/nowhere"])
    with pytest.raises(ConfigError, match="model.transformer=.*is a GGUF file; the frozen base"):
        check_config(cfg)
    pairs = GenerateConfig(transformer=str(tiny_gguf_files.gguf), vae="tiny", prompts="p.txt", output="out")
    with pytest.raises(ConfigError, match="is a GGUF file; the teacher"):
        check_generate_config(pairs)


def test_out_of_memory_advice_for_a_gguf_transformer_is_one_it_can_take(tiny_gguf_files, tiny_model_files, photo_png,
                                                                        tmp_path, capsys, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(models.DiffusersVelocity, "__call__", no_memory)
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "out.png"), "--transformer",
                     str(tiny_gguf_files.gguf), "--vae", str(tiny_model_files.vae), "--lora", str(tiny_model_files.lora),
                     "--conditioning", str(tiny_model_files.conditioning), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert ("out of memory even with the smallest tiles; try a smaller quantisation of FLUX.1-dev (e.g. Q4_K_S), "
            "or a smaller output size") in err  # on the CPU group_offload would not help
    assert "fp8_storage" not in err
    from fluxsr_core.upscaler import gguf_out_of_memory_advice

    cuda = torch.device("cuda")
    assert gguf_out_of_memory_advice("none", cuda).startswith("try --memory-mode group_offload, a smaller")
    assert "group_offload" not in gguf_out_of_memory_advice("group_offload", cuda)


# Byte offsets of the fp16 scales in a block (the rest of a K-quant block is any bytes): random
# blocks with finite scales are valid K-quant data, which gguf-py cannot quantise to itself.
_FP16_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("quant", sorted(_FP16_SCALE_OFFSETS))
def test_k_quant_files_load_with_every_row_in_its_place(quant, tmp_path, gguf_saver):
    """city96's common quantisations (Q4_K_S, Q6_K...) on a model whose rows fit 256-value blocks
    (2 heads of 128, FLUX.1's rope): each weight dequantises to what gguf-py reads from the file,
    through the key mapping and the fused-row splits."""
    import gguf
    import numpy as np
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    qtype = gguf.GGMLQuantizationType[quant]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    config = {k: v for k, v in weights.shipped_config("flux1-dev-transformer").items() if not k.startswith("_")}
    config.update(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=256,
                  pooled_projection_dim=256)
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bfl = weights.transformer_state_dict_to_bfl(FluxTransformer2DModel.from_config(config).state_dict())
    rng = np.random.default_rng(0)
    packed_tensors, reference = {}, {}
    for key, tensor in bfl.items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[1] % block == 0:
            blocks = rng.integers(0, 256, size=(data.size // block, block_bytes), dtype=np.uint8)
            for offset in _FP16_SCALE_OFFSETS[quant]:
                scales = (rng.uniform(0.5, 2.0, len(blocks)) * 1e-3).astype(np.float16)
                blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
            packed, kind = blocks.reshape(data.shape[0], -1), qtype
        else:
            packed, kind = data, gguf.GGMLQuantizationType.F32
        packed_tensors[key] = (packed, kind)
        reference[key] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(packed, kind))
                                          .reshape(data.shape).astype(np.float32))
    path = tmp_path / f"flux-w256-{quant}.gguf"
    gguf_saver(path, packed_tensors)

    expected, _ = weights.transformer_state_dict_to_diffusers(reference)
    model = models.load_transformer(path, dtype="fp32").requires_grad_(False)
    quantised = 0
    for name, param in model.named_parameters():
        got = dequantize_gguf_tensor(param).float() if isinstance(param, GGUFParameter) else param.float()
        quantised += isinstance(param, GGUFParameter)
        want = expected[name]
        assert got.shape == want.shape, name
        # diffusers dequantises in fp16: within its rounding of the largest value
        assert float((got - want).abs().max()) <= 2e-3 * float(want.abs().max()) + 1e-12, name
    assert quantised >= 14  # the block linears really are K-quant (split q/k/v/mlp rows included)


def test_gguf_weights_are_the_files_mapping_not_a_copy(tiny_gguf_files):
    """The quantised weights on the CPU live in the memory-mapped file (diffusers' own reader
    copies the whole file into RAM first), mapped copy-on-write: a write changes this process's
    page, not the file."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    model = models.load_transformer(tiny_gguf_files.gguf, dtype="fp32")
    target = os.path.realpath(tiny_gguf_files.gguf)
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    assert spans, "the GGUF file is not mapped"
    # (the q/k/v rows diffusers' key converter splits off a fused tensor are copies: torch.cat)
    weight = model.transformer_blocks[0].ff.net[0].proj.weight
    assert type(weight).__name__ == "GGUFParameter"
    assert any(start <= weight.data_ptr() < end for start, end in spans)
    before = tiny_gguf_files.gguf.read_bytes()
    with torch.no_grad():
        weight.as_tensor()[0, 0] ^= 0xFF  # a write into the mapping: private to this process
    assert tiny_gguf_files.gguf.read_bytes() == before

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


def test_auto_counts_a_gguf_file_as_stored_and_never_picks_fp8(tiny_gguf_files):
    header = weights.read_gguf_header(tiny_gguf_files.gguf)
    stored = sum(n for _, _, n in header.values())
    assert header["double_blocks.0.img_attn.qkv.weight"][:2] == ("Q8_0", (96, 32))
    assert header["double_blocks.0.img_attn.qkv.weight"][2] == 96 * 32 // 32 * 34  # 32 int8 + an fp16 scale per block
    sizes = models.gguf_weight_bytes_per_mode(tiny_gguf_files.gguf, vae_bytes=1000)
    assert set(sizes) == set(models.GGUF_MEMORY_MODES)
    assert sizes["none"] == stored + 1000 and sizes["model_offload"] == stored
    blocks = weights.gguf_transformer_bytes(tiny_gguf_files.gguf)["blocks"]
    assert len(blocks) == 2 and sizes["group_offload"] == stored - sum(blocks) + 2 * max(blocks)
    assert models.pick_memory_mode(sizes, free_bytes=sizes["none"] + 10, headroom_bytes=0)[0] == "none"
    assert models.pick_memory_mode(sizes, free_bytes=sizes["none"] - 10, headroom_bytes=0)[0] == "group_offload"


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

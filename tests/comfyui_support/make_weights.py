"""Random-weight model files in the formats ComfyUI users have, for the real-ComfyUI tests.

    python tests/comfyui_support/make_weights.py MODELS_DIR

writes (skipping files that already exist and are complete)::

    MODELS_DIR/diffusion_models/fluxsr-test-flux.safetensors   FLUX, BFL keys, hidden 3072,
                                                               1 double + 1 single block, bf16
    MODELS_DIR/vae/fluxsr-test-ae.safetensors                  full-size FLUX VAE, BFL/LDM keys
    MODELS_DIR/loras/fluxsr-test-lora.safetensors              diffusers-named LoRA (rank 4)
    MODELS_DIR/loras/fluxsr-test-lora-tl045.safetensors        the same tensors, T_L 0.45 in metadata
    MODELS_DIR/fluxsr/fluxsr-test-bundle.safetensors           conditioning bundle (T_L 0.3)
    MODELS_DIR/fluxsr/fluxsr-test-thirdparty/                  the same, third-party folder form
    MODELS_DIR/fluxsr/fluxsr-test-nosettings/                  the same embeddings, no run settings

and, with :func:`make_gguf` (needs the ``gguf`` package)::

    MODELS_DIR/diffusion_models/fluxsr-test-flux-Q8_0.gguf     the FLUX file quantised as
                                                               ComfyUI-GGUF's convert tool does
    MODELS_DIR/reference/fluxsr-test-flux-Q8_0-dequantized.safetensors
                                                               its weights dequantised (fp32)

ComfyUI's FLUX detection infers depth and widths from the file but fixes 24 heads of 128
dims, so hidden 3072 with one block of each kind is the smallest FLUX it loads (~0.5B
parameters). Run with the project's own Python (needs diffusers and fluxsr_core).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

SEED = 1234
FLUX_FILE = "diffusion_models/fluxsr-test-flux.safetensors"
VAE_FILE = "vae/fluxsr-test-ae.safetensors"
LORA_FILE = "loras/fluxsr-test-lora.safetensors"
LORA_T_L_FILE = "loras/fluxsr-test-lora-tl045.safetensors"
LORA_T_L = 0.45
BUNDLE_FILE = "fluxsr/fluxsr-test-bundle.safetensors"
THIRDPARTY_DIR = "fluxsr/fluxsr-test-thirdparty"
NOSETTINGS_DIR = "fluxsr/fluxsr-test-nosettings"
GGUF_FILE = "diffusion_models/fluxsr-test-flux-Q8_0.gguf"
GGUF_DEQUANTIZED_FILE = "reference/fluxsr-test-flux-Q8_0-dequantized.safetensors"
BUNDLE_T_L = 0.3
BUNDLE_GUIDANCE = 3.5
T5_TOKENS = 16

LORA_RANK = 4
# The layers a FLUX LoRA usually targets, in diffusers naming; ComfyUI maps each onto its fused
# BFL weights (q|k|v slices), so a key it cannot place shows up as "lora key not loaded".
LORA_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2"]
LORA_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


def transformer_config() -> dict:
    from fluxsr_core.weights import shipped_config

    cfg = dict(shipped_config("flux1-dev-transformer"))
    cfg.update(num_layers=1, num_single_layers=1)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_transformer(dtype=torch.bfloat16):
    """The random diffusers transformer every file here derives from (seeded)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    model = FluxTransformer2DModel(**transformer_config())
    # Random weights with diffusers' default init give a velocity of the same size as the
    # latent; small enough that one step keeps values in a sane range.
    return model.to(dtype).eval()


def build_vae(dtype=torch.float32):
    from diffusers import AutoencoderKL

    from fluxsr_core.weights import shipped_config

    torch.manual_seed(SEED + 1)
    cfg = {k: v for k, v in shipped_config("flux1-dev-vae").items() if not k.startswith("_")}
    return AutoencoderKL(**cfg).to(dtype).eval()


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def make_lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 2)
    modules = dict(transformer.named_modules())
    sd = {}
    names = [f"transformer_blocks.0.{m}" for m in LORA_DOUBLE] + \
            [f"single_transformer_blocks.0.{m}" for m in LORA_SINGLE]
    for name in names:
        layer = modules[name]
        a = torch.randn(LORA_RANK, layer.in_features, generator=g) / layer.in_features ** 0.5
        b = torch.randn(layer.out_features, LORA_RANK, generator=g) * 0.02
        sd[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16)
        sd[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    return sd


def make_all(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every file (missing ones only); returns their paths by role."""
    from fluxsr_core import bundle, lora
    from fluxsr_core.settings import RunSettings
    from fluxsr_core.weights import transformer_state_dict_to_bfl, vae_state_dict_to_bfl

    root = Path(models_dir)
    paths = {"flux": root / FLUX_FILE, "vae": root / VAE_FILE, "lora": root / LORA_FILE,
             "lora_t_l": root / LORA_T_L_FILE, "bundle": root / BUNDLE_FILE, "thirdparty": root / THIRDPARTY_DIR,
             "nosettings": root / NOSETTINGS_DIR}
    transformer = None
    if not paths["flux"].exists() or not paths["lora"].exists():
        transformer = build_transformer()
    if not paths["flux"].exists():
        _save(transformer_state_dict_to_bfl(transformer.state_dict()), paths["flux"])
    if not paths["lora"].exists():
        # alpha == rank: ComfyUI reads no alpha from metadata (only '<key>.alpha' tensors), so
        # only then do ComfyUI and diffusers apply the same LoRA scale.
        lora.save_lora(paths["lora"], make_lora_state_dict(transformer),
                       RunSettings(t_l=BUNDLE_T_L, guidance=BUNDLE_GUIDANCE), rank=LORA_RANK,
                       alpha=float(LORA_RANK))
    del transformer
    if not paths["lora_t_l"].exists():
        from safetensors.torch import load_file

        lora.save_lora(paths["lora_t_l"], load_file(str(paths["lora"])), RunSettings(t_l=LORA_T_L),
                       rank=LORA_RANK, alpha=float(LORA_RANK))
    if not paths["vae"].exists():
        _save(vae_state_dict_to_bfl(build_vae().state_dict()), paths["vae"])
    g = torch.Generator().manual_seed(SEED + 3)
    t5 = torch.randn(1, T5_TOKENS, 4096, generator=g) * 0.1
    clip = torch.randn(1, 768, generator=g) * 0.1
    if not paths["bundle"].exists():
        paths["bundle"].parent.mkdir(parents=True, exist_ok=True)
        bundle.save_bundle(paths["bundle"], t5, clip, RunSettings(t_l=BUNDLE_T_L, guidance=BUNDLE_GUIDANCE),
                           prompt="random test conditioning")
    third = paths["thirdparty"]
    if not (third / "clip_embedding.pth").exists():
        third.mkdir(parents=True, exist_ok=True)
        torch.save(t5[0].clone(), third / "t5_embedding.pth")
        (third / "training_config.json").write_text(json.dumps({"t_l": BUNDLE_T_L}))
        torch.save(clip[0].clone(), third / "clip_embedding.pth.tmp")
        os.replace(third / "clip_embedding.pth.tmp", third / "clip_embedding.pth")
    bare = paths["nosettings"]
    if not (bare / "clip_embedding.pth").exists():
        bare.mkdir(parents=True, exist_ok=True)
        torch.save(t5[0].clone(), bare / "t5_embedding.pth")
        torch.save(clip[0].clone(), bare / "clip_embedding.pth.tmp")
        os.replace(bare / "clip_embedding.pth.tmp", bare / "clip_embedding.pth")
    return paths


def make_gguf(models_dir: str | os.PathLike) -> dict[str, Path]:
    """The BFL FLUX file as a Q8_0 GGUF, by the rules of ComfyUI-GGUF's ``tools/convert.py``
    (architecture "flux"; 1-D tensors and those of at most 1024 elements kept in F32, the rest
    Q8_0), plus the dequantised weights as fp32 safetensors: exactly what a GGUF loader computes
    with. Missing files only; returns their paths."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    root = Path(models_dir)
    paths = {"gguf": root / GGUF_FILE, "dequantized": root / GGUF_DEQUANTIZED_FILE}
    if paths["gguf"].exists() and paths["dequantized"].exists():
        return paths
    source = make_all(models_dir)["flux"]
    sd = load_file(str(source))
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    dequantized = {}
    for key, tensor in sd.items():
        data = tensor.to(torch.float32).numpy()
        small = data.ndim == 1 or data.size <= 1024
        qtype = gguf.GGMLQuantizationType.F32 if small else gguf.GGMLQuantizationType.Q8_0
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(key, packed, raw_dtype=qtype)
        dequantized[key] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(packed, qtype)).reshape(data.shape))
    paths["gguf"].parent.mkdir(parents=True, exist_ok=True)
    tmp = paths["gguf"].with_name(paths["gguf"].name + ".tmp")
    writer.write_header_to_file(path=str(tmp))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, paths["gguf"])
    _save(dequantized, paths["dequantized"])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for role, p in make_all(sys.argv[1]).items():
        print(f"{role}: {p}")

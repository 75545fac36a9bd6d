"""Shared fixtures: tiny random FLUX-architecture model files in every format users have."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@dataclass
class TinyModelFiles:
    transformer: Path     # BFL-keyed single safetensors file (as flux1-dev.safetensors)
    vae: Path             # ae.safetensors-keyed single file
    lora: Path            # FluxSR LoRA, diffusers naming, with fluxsr.* metadata (t_l 0.3)
    conditioning: Path    # our bundle (.safetensors), guidance 2.0


def _make_tiny_files(folder: Path) -> TinyModelFiles:
    import safetensors.torch
    from peft import LoraConfig

    from fluxsr_core import bundle, lora, models, weights
    from fluxsr_core.settings import RunSettings

    transformer = models.load_transformer("tiny", dtype=torch.float32, seed=0)
    sd = weights.transformer_state_dict_to_bfl(transformer.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, folder / "flux-tiny.safetensors")

    vae = models.load_vae("tiny", dtype=torch.float32, seed=0)
    vsd = weights.vae_state_dict_to_bfl(vae.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in vsd.items()}, folder / "ae-tiny.safetensors")

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_out"],
                                       init_lora_weights=False), adapter_name="fluxsr")
    settings = RunSettings(t_l=0.3, guidance=2.0, scale=4.0, source={})
    lora.save_lora_from_model(folder / "fluxsr-lora.safetensors", transformer, settings)

    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    bundle.save_bundle(folder / "fluxsr-bundle.safetensors",
                       torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                       torch.randn(1, cfg.pooled_projection_dim, generator=g), settings, prompt="tiny test")
    return TinyModelFiles(folder / "flux-tiny.safetensors", folder / "ae-tiny.safetensors",
                          folder / "fluxsr-lora.safetensors", folder / "fluxsr-bundle.safetensors")


@pytest.fixture
def one_thread():
    """Tiny models on a small shared machine: one thread is fastest (use via pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> TinyModelFiles:
    """Tiny random models saved as a user would have them (BFL files, LoRA, bundle)."""
    return _make_tiny_files(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def photo_png(tmp_path_factory) -> Path:
    """A real photo (scikit-image's astronaut) downscaled to 40x32, as PNG."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((40, 32), Image.LANCZOS)
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    img.save(path)
    return path

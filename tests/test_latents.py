"""Packing and position ids against diffusers' FLUX pipeline helpers."""

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from fluxsr_core import latents


def test_pack_matches_diffusers_and_roundtrips():
    x = torch.randn(2, 16, 6, 10)
    ours = latents.pack(x)
    ref = FluxPipeline._pack_latents(x, 2, 16, 6, 10)
    assert torch.equal(ours, ref)
    assert torch.equal(latents.unpack(ours, 6, 10), x)


def test_local_ids_match_diffusers_and_offset_shifts_them():
    ref = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(latents.image_ids(6, 10), ref)
    shifted = latents.image_ids(6, 10, offset=(4, 7))
    assert torch.equal(shifted[:, 1], ref[:, 1] + 4)
    assert torch.equal(shifted[:, 2], ref[:, 2] + 7)
    assert torch.all(shifted[:, 0] == 0)


def test_normalisation_constants_and_inverse():
    raw = torch.tensor([0.1159, 1.1159])
    assert torch.allclose(latents.normalize(raw), torch.tensor([0.0, 0.3611]))
    assert torch.allclose(latents.denormalize(latents.normalize(raw)), raw)


def test_odd_latent_cannot_be_packed():
    import pytest
    with pytest.raises(ValueError, match="even"):
        latents.pack(torch.zeros(1, 16, 5, 4))

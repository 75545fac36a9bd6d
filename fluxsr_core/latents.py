"""FLUX latent layout, in one place: VAE normalisation, 2x2 packing, position ids."""

from __future__ import annotations

import torch

LATENT_SHIFT = 0.1159
LATENT_SCALE = 0.3611
LATENT_CHANNELS = 16
VAE_DOWNSCALE = 8
PATCH = 2  # FLUX tokens are 2x2 latent patches
PIXEL_MULTIPLE = VAE_DOWNSCALE * PATCH  # images are padded to a multiple of 16 pixels


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the transformer's space: ``(raw - shift) * scale``."""
    return (raw - LATENT_SHIFT) * LATENT_SCALE


def denormalize(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return latent / LATENT_SCALE + LATENT_SHIFT


def pack(latent: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> tokens ``[B, (h/2)(w/2), 4C]`` (diffusers' FLUX packing)."""
    b, c, h, w = latent.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latent height and width must be even to pack 2x2 (got {h}x{w})")
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[B, (h/2)(w/2), 4C]`` -> latent ``[B, C, h, w]``; inverse of :func:`pack`."""
    b, n, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, offset: tuple[int, int] = (0, 0), device=None,
              dtype=torch.float32) -> torch.Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` = (0, row, col) for a latent of ``h x w``.

    ``offset`` is the tile's top-left corner in token units: ``(0, 0)`` gives the tile-local ids
    every tile was trained with (the default); the tile's true offset gives global ids.
    """
    rows = torch.arange(h // 2, device=device, dtype=dtype) + offset[0]
    cols = torch.arange(w // 2, device=device, dtype=dtype) + offset[1]
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Text position ids: zeros ``[L, 3]``."""
    return torch.zeros(length, 3, device=device, dtype=dtype)

"""Latent tiling with Gaussian-blended velocities (to be filled in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TilingConfig:
    """Tile sizes. ``latent_tile``/``latent_overlap`` are in latent pixels (1 = 8 image pixels);
    ``vae_tile``/``vae_overlap`` in image pixels (0 = no VAE tiling). Fixed defaults give the same
    pixels on every machine."""

    latent_tile: int = 128        # 1024 image pixels: FLUX.1-dev's home resolution
    latent_overlap: int = 32
    vae_tile: int = 1024
    vae_overlap: int = 128
    blend: str = "gaussian"       # "gaussian" | "linear" | "constant"
    global_position_ids: bool = False
    tile_batch_size: int = 1

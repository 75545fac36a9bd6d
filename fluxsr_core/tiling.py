"""Latent tiling with Gaussian-blended results.

A large latent is cut into overlapping tiles; a function (the one-step velocity update, or any
tile-to-tile map) runs on each; the outputs are blended with per-tile weights and divided by the
summed weights, so every pixel is a convex combination of the tiles that cover it.

* :func:`tile_starts` lays tiles along one axis: stride ``tile - overlap``, starts aligned to 2
  (FLUX's 2x2 token packing, so token grids of neighbours line up), the last tile snapped to the
  border so no tile is ever smaller than the others.
* :func:`blend_weights` gives the per-tile weights (Gaussian by default, as MultiDiffusion /
  Mixture of Diffusers / Tiled Diffusion do; a linear ramp over the overlap; or a plain average).
* :func:`tiled_apply` runs the function over the grid with progress and cancel hooks.

Everything here is deterministic: a fixed tile order and float32 accumulation give the same
pixels on every run and machine (for a deterministic ``fn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch

from .interfaces import CancelCheck, ProgressCallback

BLEND_PROFILES = ("gaussian", "linear", "constant")
PACK_ALIGN = 2  # FLUX tokens are 2x2 latent patches
VAE_ALIGN = 8   # VAE tiles are in image pixels; the VAE downsamples by 8

# Gaussian sigma as a fraction of the tile side. Two things pull against each other where a tile
# of stride s and overlap o meets its neighbour: the incoming tile's share at its own first pixel,
# about 1 / (1 + exp(o * s / (2 sigma^2))), which shows as a step (a tile's border is where its
# context is cut off, its prediction least trustworthy), and the width of the hand-over between
# the two tiles, a logistic curve of scale sigma^2 / s (a narrow hand-over is a step of its own).
# MultiDiffusion / Tiled Diffusion use sigma = 0.1 x side: the edge share is ~1e-4 for 128/32
# tiles, but the hand-over then fills only a quarter of the overlap. 0.15 keeps the edge share at
# 1.5% and spreads the hand-over over half the overlap (~17 latent = 135 image pixels, 10%-90%,
# for 128/32). Measured with the tiny FLUX transformer at the default tiles (tests/test_tiling.py,
# largest step energy inside an overlap over the typical one): 0.1 -> 1.89, 0.15 -> 1.23,
# 0.2 -> 1.14, 0.25 -> 1.41 (its tile borders start to show: 1.38 on the border rows).
GAUSSIAN_SIGMA_FRACTION = 0.15


@dataclass(frozen=True)
class TilingConfig:
    """Tile sizes. ``latent_tile``/``latent_overlap`` are in latent pixels (1 = 8 image pixels);
    ``vae_tile``/``vae_overlap`` in image pixels (0 = no VAE tiling). Fixed defaults give the same
    pixels on every machine.

    ``blend``: how overlapping tiles are weighted (see :func:`blend_weights`).
    ``global_position_ids``: give each tile its true position in the whole latent (RoPE offsets);
    off, every tile sees the local ids ``(0, 0)...`` FluxSR trains with.
    ``tile_batch_size``: tiles sent through the model together (only with local ids, where all
    tiles share the same position ids).
    ``fit_tiles``: shrink the tiles, per axis, to the shortest length that still covers the
    latent with the same number of tiles and at least ``latent_overlap`` between neighbours
    (:func:`fit_tile_length`). The fixed grid snaps its last tile to the border, so a 2048 px
    image in 1024 px tiles is three tiles a side where the last two share 75%; fitted, they are
    864 px with 256-288 px overlaps: the same count, 29% fewer tokens.
    """

    latent_tile: int = 128        # 1024 image pixels: FLUX.1-dev's home resolution
    latent_overlap: int = 32
    vae_tile: int = 1024
    vae_overlap: int = 128
    blend: str = "gaussian"       # "gaussian" | "linear" | "constant"
    global_position_ids: bool = False
    tile_batch_size: int = 1
    fit_tiles: bool = False

    def validate(self) -> "TilingConfig":
        """Raise ``ValueError`` naming the first impossible value; return ``self``."""
        return validate_tiling(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_tiling(config: TilingConfig) -> TilingConfig:
    """Check a :class:`TilingConfig`; raise ``ValueError`` with what to change. Returns it."""
    c = config
    for name in ("latent_tile", "latent_overlap", "vae_tile", "vae_overlap", "tile_batch_size"):
        if not _is_int(getattr(c, name)):
            raise ValueError(f"{name} must be an integer (got {getattr(c, name)!r})")
    if c.latent_tile < PACK_ALIGN or c.latent_tile % PACK_ALIGN:
        raise ValueError(f"latent_tile must be a positive even number of latent pixels (FLUX packs "
                         f"2x2 latent patches); got {c.latent_tile} ({c.latent_tile * 8} image "
                         f"pixels: use a multiple of 16 pixels)")
    if c.latent_overlap < 0 or c.latent_overlap % PACK_ALIGN:
        raise ValueError(f"latent_overlap must be an even number >= 0 of latent pixels (a multiple "
                         f"of 16 image pixels); got {c.latent_overlap}")
    if c.latent_tile <= c.latent_overlap:
        raise ValueError(f"the tile ({c.latent_tile * 8} px) must be larger than its overlap "
                         f"({c.latent_overlap * 8} px; in latent pixels {c.latent_tile} <= {c.latent_overlap}). "
                         f"Lower the overlap (a quarter of the tile is usual) or enlarge the tile.")
    if c.vae_tile < 0 or c.vae_tile % VAE_ALIGN:
        raise ValueError(f"vae_tile must be 0 (no VAE tiling) or a positive multiple of "
                         f"{VAE_ALIGN} pixels; got {c.vae_tile}")
    if c.vae_overlap < 0 or c.vae_overlap % VAE_ALIGN:
        raise ValueError(f"vae_overlap must be a multiple of {VAE_ALIGN} pixels >= 0; "
                         f"got {c.vae_overlap}")
    if c.vae_tile and c.vae_tile <= c.vae_overlap:
        raise ValueError(f"VAE tile must be larger than its overlap: vae_tile {c.vae_tile} <= "
                         f"vae_overlap {c.vae_overlap}")
    if c.blend not in BLEND_PROFILES:
        raise ValueError(f"unknown blend '{c.blend}'; choose one of {', '.join(BLEND_PROFILES)}")
    if c.tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1 (got {c.tile_batch_size})")
    for name in ("global_position_ids", "fit_tiles"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False (got {getattr(c, name)!r})")
    return c


def tile_starts(length: int, tile: int, overlap: int, align: int = PACK_ALIGN) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    Stride ``tile - overlap`` (rounded down to ``align``), every start a multiple of ``align``,
    the last tile snapped to the border (``start = length - tile``; it may overlap its
    neighbour by more than ``overlap``). One tile ``[0]`` when ``length <= tile`` (that tile is
    then ``length`` long).
    """
    for name, v in (("length", length), ("tile", tile), ("overlap", overlap), ("align", align)):
        if not _is_int(v):
            raise ValueError(f"{name} must be an integer (got {v!r})")
    if align < 1:
        raise ValueError(f"align must be at least 1 (got {align})")
    if overlap < 0:
        raise ValueError(f"overlap must not be negative (got {overlap})")
    if tile <= overlap:
        raise ValueError(f"tile must be larger than overlap (tile {tile}, overlap {overlap})")
    if tile % align:
        raise ValueError(f"tile must be a multiple of {align} (got {tile})")
    if length <= 0:
        raise ValueError(f"length must be positive (got {length})")
    if length % align:
        raise ValueError(f"length must be a multiple of {align} (got {length}); pad the image to "
                         f"a multiple of 16 pixels first (images.pad_to_multiple)")
    if length <= tile:
        return [0]
    stride = (tile - overlap) // align * align
    if stride == 0:
        raise ValueError(f"tile - overlap must be at least {align} (tile {tile}, overlap {overlap})")
    starts = []
    s = 0
    while s + tile < length:
        starts.append(s)
        s += stride
    starts.append(length - tile)
    return starts


def fit_tile_length(length: int, tile: int, overlap: int, align: int = PACK_ALIGN) -> int:
    """The shortest tile (a multiple of ``align``, at most ``tile``) that covers ``length`` with as
    many tiles as ``tile_starts(length, tile, overlap)`` lays and overlaps of at least
    ``overlap``: ``n`` tiles need ``n * t >= length + (n - 1) * overlap``."""
    n = len(tile_starts(length, tile, overlap, align))
    if n == 1:
        return min(tile, length)
    fitted = -(-(length + (n - 1) * overlap) // n)
    fitted = -(-fitted // align) * align
    # tile_starts rounds the stride down to ``align``, which can leave the border one tile short
    while fitted < tile and len(tile_starts(length, fitted, overlap, align)) > n:
        fitted += align
    return min(fitted, tile)


def axis_tiles(length: int, config: TilingConfig) -> tuple[int, list[int]]:
    """``(tile length, starts)`` of the tiles along one latent axis of ``length``."""
    tile = config.latent_tile
    if config.fit_tiles and length > tile:  # one tile covering the axis needs no fitting (nor overlap)
        tile = fit_tile_length(length, config.latent_tile, config.latent_overlap)
    return min(tile, length), tile_starts(length, tile, config.latent_overlap)


def tile_grid(h: int, w: int, config: TilingConfig) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of the latent tiles, row by row, in latent pixels."""
    rows, cols = axis_tiles(h, config)[1], axis_tiles(w, config)[1]
    return [(r, c) for r in rows for c in cols]


def count_tiles(h: int, w: int, config: TilingConfig) -> int:
    """How many tiles (= progress steps of :func:`tiled_apply` with batch size 1) an ``h x w``
    latent needs."""
    validate_tiling(config)
    return len(axis_tiles(h, config)[1]) * len(axis_tiles(w, config)[1])


def _profile_1d(n: int, profile: str, ramp: Optional[float], device, dtype) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=torch.float64)
    if profile == "gaussian":
        sigma = GAUSSIAN_SIGMA_FRACTION * n
        w = torch.exp(-0.5 * ((i - (n - 1) / 2) / sigma) ** 2)
    elif profile == "linear":
        # Distance to the nearer edge, +1 so the edge pixel keeps a small positive weight.
        # With ramp == overlap, the two weights across an overlap sum to exactly 1: a straight
        # cross-fade over the whole overlap.
        r = float(ramp) if ramp else math.ceil(n / 2)
        w = torch.clamp((torch.minimum(i, n - 1 - i) + 1) / (r + 1), max=1.0)
    else:
        w = torch.ones(n, device=device, dtype=torch.float64)
    return w.to(dtype)


def blend_weights(h: int, w: int, profile: str = "gaussian", device=None,
                  dtype: torch.dtype = torch.float32, ramp: Optional[float] = None
                  ) -> torch.Tensor:
    """Per-tile blend weights ``[h, w]``, positive everywhere, separable.

    ``gaussian``: sigma = 0.15 x side, centred (see ``GAUSSIAN_SIGMA_FRACTION`` for why);
    ``linear``: rises linearly from each edge over ``ramp`` pixels (default: half the side, a
    tent) and is flat inside; :func:`tiled_apply` uses ``ramp = overlap``, which makes the
    cross-fade linear across the whole overlap; ``constant``: ones (plain average).
    The weights are never zero, so pixels only one tile covers (image borders) normalise to 1.
    """
    if profile not in BLEND_PROFILES:
        raise ValueError(f"unknown blend '{profile}'; choose one of {', '.join(BLEND_PROFILES)}")
    if h <= 0 or w <= 0:
        raise ValueError(f"blend weights need a positive size (got {h}x{w})")
    wy = _profile_1d(int(h), profile, ramp, device, torch.float64)
    wx = _profile_1d(int(w), profile, ramp, device, torch.float64)
    return (wy[:, None] * wx[None, :]).to(dtype)


TileFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def tiled_apply(fn: TileFn, latent: torch.Tensor, config: TilingConfig = TilingConfig(),
                progress: Optional[ProgressCallback] = None,
                cancel_check: Optional[CancelCheck] = None) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``latent`` ``[B, C, H, W]`` and blend the results.

    ``fn(tile_batch, position_offset)`` gets a contiguous ``[B', C, th, tw]`` tile batch and
    ``(row, col)`` of the tile's top-left corner in token units (latent pixels / 2) when
    ``config.global_position_ids``, else ``(0, 0)``. It returns ``[B', C_out, th*f, tw*f]`` for
    a fixed factor ``f`` (1 for a velocity update; 8 for a VAE decode): outputs are blended in
    output space. With ``config.tile_batch_size > 1`` and local position ids, up to that many
    tiles go through ``fn`` at once, concatenated along the batch (``B' = k * B``).

    ``cancel_check()`` runs before each call to ``fn`` and may raise to stop;
    ``progress(done_tiles, total_tiles, latest_tile_output)`` runs after each call (the output
    lets ComfyUI draw a preview; ignore it elsewhere). A latent that fits in one
    tile is passed to ``fn`` whole and its output returned unchanged. Otherwise the output is
    accumulated in float32 and returned in the dtype of ``fn``'s output, on its device.
    """
    validate_tiling(config)
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise ValueError(f"tiled_apply expects a [B, C, H, W] latent (got "
                         f"{tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent)})")
    B, _, H, W = latent.shape
    if H % PACK_ALIGN or W % PACK_ALIGN:
        raise ValueError(f"latent height and width must be even (got {H}x{W}); pad the image to a "
                         f"multiple of 16 pixels first (images.pad_to_multiple)")
    positions = tile_grid(H, W, config)
    total = len(positions)
    if total == 1:
        if cancel_check is not None:
            cancel_check()
        out = fn(latent, (0, 0))
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != B:
            raise ValueError(f"the tile function must return [B, C, h, w] with B = {B} "
                             f"(got {getattr(out, 'shape', type(out))})")
        if progress is not None:
            progress(1, 1, out)
        return out

    th, tw = axis_tiles(H, config)[0], axis_tiles(W, config)[0]
    batch = config.tile_batch_size if not config.global_position_ids else 1
    groups = [positions[i:i + batch] for i in range(0, total, batch)]

    acc = wsum = weights = None
    fy = fx = None
    out_dtype = None
    done = 0
    for group in groups:
        if cancel_check is not None:
            cancel_check()
        tiles = [latent[:, :, r:r + th, c:c + tw] for r, c in group]
        x = tiles[0].contiguous() if len(tiles) == 1 else torch.cat(tiles, dim=0)
        r0, c0 = group[0]
        offset = (r0 // PACK_ALIGN, c0 // PACK_ALIGN) if config.global_position_ids else (0, 0)
        y = fn(x, offset)
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[0] != x.shape[0]:
            raise ValueError(f"the tile function must return [B, C, h, w] with B = {x.shape[0]} "
                             f"(got {getattr(y, 'shape', type(y))})")
        if acc is None:
            oh, ow = y.shape[-2:]
            fy, fx = Fraction(oh, th), Fraction(ow, tw)
            if (fy * H).denominator != 1 or (fx * W).denominator != 1 or any(
                    (fy * r).denominator != 1 or (fx * c).denominator != 1 for r, c in positions):
                raise ValueError(f"the tile function maps {th}x{tw} tiles to {oh}x{ow}; the "
                                 f"tile grid does not fit that scale")
            out_shape = (B, y.shape[1], int(fy * H), int(fx * W))
            acc = torch.zeros(out_shape, device=y.device, dtype=torch.float32)
            wsum = torch.zeros((1, 1) + out_shape[2:], device=y.device, dtype=torch.float32)
            ramp = config.latent_overlap * float(fy) if config.latent_overlap else None
            weights = blend_weights(oh, ow, config.blend, device=y.device, dtype=torch.float32,
                                    ramp=ramp if fy == fx else None)
            out_dtype = y.dtype
            expected = tuple(y.shape[1:])
        elif tuple(y.shape[1:]) != expected:
            raise ValueError(f"the tile function returned {tuple(y.shape[1:])} for one tile and "
                             f"{expected} for another; it must map equal tiles to equal shapes")
        for j, (r, c) in enumerate(group):
            R, C = int(fy * r), int(fx * c)
            part = y[j * B:(j + 1) * B].to(torch.float32)
            acc[:, :, R:R + oh, C:C + ow] += part * weights
            wsum[:, :, R:R + oh, C:C + ow] += weights
        done += len(group)
        if progress is not None:
            progress(done, total, y[:B])  # the latest tile's result: a cheap live preview
    return (acc / wsum).to(out_dtype)

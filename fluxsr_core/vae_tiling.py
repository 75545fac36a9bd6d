"""VAE tiling with the whole image's GroupNorm statistics.

diffusers' VAE tiling (and ComfyUI's) runs the encoder or decoder on each tile alone, so every
GroupNorm normalises with that tile's mean and variance: a dark tile is brightened, a flat one
gets more contrast, and the blend over the overlap only hides the seam, not the tone shift. It
also runs the mid-block attention per tile. Here the VAE runs as a list of operations over all
tiles at once, as the "Tiled VAE" of multidiffusion-upscaler does, with two differences:

* at each GroupNorm every tile adds the sums of its *core* (the part of the image it alone
  owns), and all tiles are normalised with the combined mean and variance: the statistics the
  untiled VAE would compute, not an estimate from a downscaled copy;
* the low-resolution part runs untiled, where it costs little: the decoder's ``conv_in`` and mid
  block (its attention sees the whole latent) before the up blocks; the encoder's mid block and
  output layers after the down blocks.

Each tile is its core plus a halo of ``overlap / 2`` pixels on each side that has a neighbour;
only the core is kept. Where the halo covers the convolutions' reach, a tiled result equals the
untiled one up to rounding; the FLUX decoder's 3x3 convolutions reach about 100 image pixels
and the encoder's about 70 (the default 128 px overlap leaves small residuals at the cores'
edges; 256 px removes them; tests/test_vae_tiling.py measures both).

Cost: the same convolutions as untiled (plus the halos), but between two GroupNorms every
tile's activation is kept, so the memory is about that of the largest whole-image activation
(twice, with a residual), not one tile's: for the FLUX decoder at 2048x2048, 256 channels at
full size, 2 GiB in bf16 plus the halos. ``stash_device="cpu"`` keeps them in CPU memory
between GroupNorms (each tile moves to the device and back once per GroupNorm); ``"auto"``
does so when the device lacks room (:func:`stash_bytes`).

Supported: diffusers' ``AutoencoderKL`` with GroupNorm resnets (``DownEncoderBlock2D`` /
``UpDecoderBlock2D``, the FLUX and SD VAEs). :func:`unsupported_reason` says why another VAE
is not, and the codec then keeps diffusers' own tiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

ALIGN = 8  # tile edges in image pixels: the VAE's whole downscale, so they fall on every level's grid


@dataclass(frozen=True)
class TileBox:
    """One tile, in image pixels: the part it computes (``y0:y1, x0:x1``, core plus halo) and
    the part it owns (``cy0:cy1, cx0:cx1``). The cores partition the image."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def _core_edges(length: int, core: int) -> list[int]:
    """Edges of ``ceil(length / core)`` cores of near-equal size covering ``[0, length)``, on
    the :data:`ALIGN` grid (no thin strip at the end, as diffusers' last tile can be)."""
    count = max(1, math.ceil(length / core))
    units = length // ALIGN
    return [round(i * units / count) * ALIGN for i in range(count)] + [length]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[TileBox]:
    """The tiles of an image ``height x width`` (multiples of 8) for tiles of at most ``tile``
    pixels whose neighbours share ``overlap`` pixels: cores of at most ``tile - overlap``, a
    halo of ``overlap / 2`` (down to the 8 px grid) around each, clipped at the image's edge.
    Row-major order."""
    if height % ALIGN or width % ALIGN:
        raise ValueError(f"image height and width must be multiples of {ALIGN} (got {height}x{width})")
    if tile <= 0 or tile % ALIGN:
        raise ValueError(f"tile must be a positive multiple of {ALIGN} pixels (got {tile})")
    halo = (max(0, overlap) // 2) // ALIGN * ALIGN
    core = tile - 2 * halo
    if core < ALIGN:
        raise ValueError(f"overlap {overlap} leaves no core in a {tile} px tile; use an overlap under half the tile")
    boxes = []
    ys, xs = _core_edges(height, core), _core_edges(width, core)
    for cy0, cy1 in zip(ys, ys[1:]):
        for cx0, cx1 in zip(xs, xs[1:]):
            boxes.append(TileBox(max(0, cy0 - halo), min(height, cy1 + halo), max(0, cx0 - halo),
                                 min(width, cx1 + halo), cy0, cy1, cx0, cx1))
    return boxes


# ------------------------------------------------------------------ the VAE as a list of steps

@dataclass(frozen=True)
class _Step:
    """One operation on a tile's state. ``kind``: ``"call"`` (``x = module(x)``; ``rescale``
    2 or 1/2 for an up/downsampler), ``"save"`` (the resnet's input kept as its residual),
    ``"residual"`` (``x = (shortcut(saved) + x) / scale``), ``"norm"`` (a GroupNorm: a point
    where all tiles meet)."""

    kind: str
    module: Optional[torch.nn.Module] = None
    rescale: float = 1.0
    scale: float = 1.0


def _resnet_steps(resnet) -> list[_Step]:
    return [_Step("save"), _Step("norm", resnet.norm1), _Step("call", resnet.nonlinearity),
            _Step("call", resnet.conv1), _Step("norm", resnet.norm2), _Step("call", resnet.nonlinearity),
            _Step("call", resnet.dropout), _Step("call", resnet.conv2),
            _Step("residual", resnet.conv_shortcut, scale=float(resnet.output_scale_factor))]


def _blocks_steps(blocks, samplers_attr: str, rescale: float) -> list[_Step]:
    steps = []
    for block in blocks:
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for sampler in getattr(block, samplers_attr) or ():
            steps.append(_Step("call", sampler, rescale=rescale))
    return steps


def _resnet_problem(resnet) -> Optional[str]:
    if not all(hasattr(resnet, a) for a in ("norm1", "conv1", "norm2", "conv2", "nonlinearity", "dropout",
                                            "conv_shortcut", "output_scale_factor")):
        return f"{type(resnet).__name__} is not diffusers' ResnetBlock2D"
    if not (isinstance(resnet.norm1, torch.nn.GroupNorm) and isinstance(resnet.norm2, torch.nn.GroupNorm)):
        return f"its resnets normalise with {type(resnet.norm1).__name__}, not GroupNorm"
    if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
        return "its resnets resample inside"
    if getattr(resnet, "time_emb_proj", None) is not None:
        return "its resnets take a time embedding"
    return None


def unsupported_reason(vae) -> Optional[str]:
    """None when :func:`decode` / :func:`encode_moments` can run ``vae``; else why not, in a few
    words (the codec logs it and keeps diffusers' per-tile tiling)."""
    encoder, decoder = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    if encoder is None or decoder is None or not hasattr(decoder, "up_blocks") or not hasattr(encoder, "down_blocks"):
        return f"{type(vae).__name__} is not diffusers' AutoencoderKL"
    for block in list(encoder.down_blocks) + list(decoder.up_blocks):
        if not hasattr(block, "resnets") or getattr(block, "attentions", None):
            return f"its {type(block).__name__} blocks are not plain resnet blocks"
        for resnet in block.resnets:
            problem = _resnet_problem(resnet)
            if problem:
                return problem
    for norm in (encoder.conv_norm_out, decoder.conv_norm_out):
        if not isinstance(norm, torch.nn.GroupNorm):
            return f"its output norm is {type(norm).__name__}, not GroupNorm"
    return None


# ------------------------------------------------------------------------------ the executor

@dataclass
class _TileState:
    box: TileBox
    x: torch.Tensor
    saved: Optional[torch.Tensor] = None
    stats: Optional[tuple] = None  # (count, mean, m2) per (batch, group) of the core, for the next norm


def _core(state: _TileState, x: torch.Tensor, level: int) -> torch.Tensor:
    """The tile's core within its tensor ``x`` at a level ``level`` image pixels per pixel."""
    b = state.box
    return x[..., (b.cy0 - b.y0) // level:(b.cy1 - b.y0) // level, (b.cx0 - b.x0) // level:(b.cx1 - b.x0) // level]


def _core_stats(core: torch.Tensor, groups: int) -> tuple:
    """Count, mean and sum of squared deviations per (batch, group), in float32."""
    g = core.float().reshape(core.shape[0], groups, -1)
    mean = g.mean(dim=2)
    m2 = (g - mean.unsqueeze(2)).square().sum(dim=2)
    return g.shape[2], mean, m2


def _combine(stats: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased, as GroupNorm's) variance of the union of the tiles' cores, from their
    counts, means and squared deviations (Chan et al.'s pairwise update: no large sums of squares)."""
    total = sum(n for n, _, _ in stats)
    mean = sum(n * m for n, m, _ in stats) / total
    m2 = sum(s + n * (m - mean).square() for n, m, s in stats)
    return mean, m2 / total


def _normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with the given per-(batch, group) statistics, in float32 as torch's own
    kernels compute half-precision GroupNorm, then back to ``x``'s dtype."""
    b, c = x.shape[:2]
    g = x.float().reshape(b, norm.num_groups, -1)
    rstd = torch.rsqrt(var.to(x.device) + norm.eps)
    y = ((g - mean.to(x.device).unsqueeze(2)) * rstd.unsqueeze(2)).reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.float().reshape(1, c, 1, 1) + norm.bias.float().reshape(1, c, 1, 1)
    return y.to(x.dtype)


def _run_steps(steps: list[_Step], tiles: list[_TileState], level: int, device: torch.device,
               stash: Optional[torch.device], cancel_check: Optional[Callable[[], None]]) -> int:
    """Run ``steps`` over every tile, meeting at each GroupNorm. ``level``: image pixels per
    pixel at the start; returns it at the end."""
    segments: list[tuple[Optional[torch.nn.GroupNorm], list[_Step]]] = [(None, [])]
    for step in steps:
        if step.kind == "norm":
            segments.append((step.module, []))
        else:
            segments[-1][1].append(step)
    levels = []
    for _, seg in segments:
        levels.append(level)
        for step in seg:
            if step.rescale != 1.0:
                level = int(round(level / step.rescale))
    combined = None
    for index, (norm, seg) in enumerate(segments):
        next_norm = segments[index + 1][0] if index + 1 < len(segments) else None
        end_level = levels[index + 1] if index + 1 < len(segments) else level
        if norm is not None:
            combined = _combine([t.stats for t in tiles])
        for tile in tiles:
            if cancel_check is not None:
                cancel_check()
            x = tile.x.to(device)
            saved = tile.saved.to(device) if tile.saved is not None else None
            if norm is not None:
                x = _normalize(x, norm, *combined)
            for step in seg:
                if step.kind == "call":
                    x = step.module(x)
                elif step.kind == "save":
                    saved = x
                else:  # residual
                    shortcut = step.module(saved) if step.module is not None else saved
                    x = (shortcut + x) / step.scale
                    saved = None
            tile.stats = _core_stats(_core(tile, x, end_level), next_norm.num_groups) if next_norm is not None else None
            tile.x = x.to(stash) if stash is not None else x
            # the resnet's residual is often its input itself: one tensor, not two copies
            tile.saved = tile.x if saved is x else (saved.to(stash) if stash is not None and saved is not None else saved)
            del x, saved
    return level


def _assemble(tiles: list[_TileState], level: int, like: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The tiles' cores put together into one tensor (image ``height x width`` at ``level``)."""
    first = tiles[0].x
    out = torch.empty(first.shape[0], first.shape[1], height // level, width // level,
                      dtype=first.dtype, device=like.device)
    for t in tiles:
        b = t.box
        out[..., b.cy0 // level:b.cy1 // level, b.cx0 // level:b.cx1 // level] = _core(t, t.x, level).to(out.device)
    return out


def stash_bytes(vae, boxes: list[TileBox], batch: int, dtype: torch.dtype) -> int:
    """About the most bytes the tiles hold between two GroupNorms: the widest full-size
    activation (the decoder's upsampled input to its last level, the encoder's first level), an
    input and a residual, over all tiles with their halos."""
    widths = list(vae.config.block_out_channels)
    widest_full_size = max(widths[:2])
    pixels = sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in boxes)
    return 2 * batch * widest_full_size * pixels * torch.empty(0, dtype=dtype).element_size()


def _stash_device(stash_device: Union[str, torch.device, None], device: torch.device, vae, boxes: list[TileBox],
                  batch: int, dtype: torch.dtype) -> Optional[torch.device]:
    """Where tiles wait between GroupNorms: None (on ``device``) or the CPU. ``"auto"``: the
    CPU when a CUDA device has less than twice :func:`stash_bytes` free (the tiles' work needs
    room beside them), else the device."""
    if stash_device is None:
        return None
    if stash_device == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return torch.device("cpu") if free < 2 * stash_bytes(vae, boxes, batch, dtype) else None
    stash = torch.device(stash_device)
    return None if stash == device else stash


def decode(vae, z: torch.Tensor, tile: int, overlap: int, stash_device: Union[str, torch.device, None] = None,
           cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """``vae.decoder`` of a raw (not normalised) latent ``[B, C, h, w]``, with ``post_quant_conv``
    if the VAE has one, in tiles of at most ``tile`` image pixels (see the module's text).
    Returns what the untiled decoder returns: ``[B, 3, 8h, 8w]`` in about [-1, 1]."""
    problem = unsupported_reason(vae)
    if problem:
        raise NotImplementedError(f"whole-image GroupNorm tiling cannot run this VAE: {problem}")
    dec = vae.decoder
    levels = 2 ** (len(dec.up_blocks) - 1)
    device = z.device
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    x = dec.conv_in(z)
    x = dec.mid_block(x, None)
    x = x.to(next(iter(dec.up_blocks.parameters())).dtype)
    height, width = x.shape[-2] * levels, x.shape[-1] * levels
    boxes = tile_boxes(height, width, tile, overlap)
    stash = _stash_device(stash_device, device, vae, boxes, x.shape[0], x.dtype)
    tiles = [_TileState(b, x[..., b.y0 // levels:b.y1 // levels, b.x0 // levels:b.x1 // levels]) for b in boxes]
    del x
    steps = _blocks_steps(dec.up_blocks, "upsamplers", 2.0)
    steps += [_Step("norm", dec.conv_norm_out), _Step("call", dec.conv_act), _Step("call", dec.conv_out)]
    level = _run_steps(steps, tiles, levels, device, stash, cancel_check)
    return _assemble(tiles, level, z, height, width)


def encode_moments(vae, image: torch.Tensor, tile: int, overlap: int,
                   stash_device: Union[str, torch.device, None] = None,
                   cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """``vae.encoder`` of an image ``[B, 3, H, W]`` in [-1, 1] (H, W multiples of 8), with
    ``quant_conv`` if the VAE has one, in tiles of at most ``tile`` pixels: the posterior's
    moments ``[B, 2C, H/8, W/8]``, what diffusers' ``_encode`` returns."""
    problem = unsupported_reason(vae)
    if problem:
        raise NotImplementedError(f"whole-image GroupNorm tiling cannot run this VAE: {problem}")
    enc = vae.encoder
    height, width = image.shape[-2:]
    device = image.device
    boxes = tile_boxes(height, width, tile, overlap)
    stash = _stash_device(stash_device, device, vae, boxes, image.shape[0], image.dtype)
    tiles = []
    for b in boxes:
        first = enc.conv_in(image[..., b.y0:b.y1, b.x0:b.x1])
        tiles.append(_TileState(b, first.to(stash) if stash is not None else first))
        del first
    steps = _blocks_steps(enc.down_blocks, "downsamplers", 0.5)
    level = _run_steps(steps, tiles, 1, device, stash, cancel_check)
    x = _assemble(tiles, level, image, height, width)
    del tiles
    # the rest is at 1/8 size: untiled, so the mid block's attention sees the whole image
    x = enc.mid_block(x)
    x = enc.conv_out(enc.conv_act(enc.conv_norm_out(x)))
    if getattr(vae, "quant_conv", None) is not None:
        x = vae.quant_conv(x)
    return x


__all__ = ["TileBox", "tile_boxes", "unsupported_reason", "stash_bytes", "decode", "encode_moments"]

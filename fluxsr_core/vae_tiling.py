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

Each tile is its core plus a halo of ``overlap / 2`` pixels (down to the 8 px grid) on each
side that has a neighbour; only the core is kept. Where the halo covers the convolutions'
reach, a tiled result equals the untiled one up to rounding; the FLUX decoder's 3x3
convolutions reach about 100 image pixels and the encoder's about 70. On the FLUX VAE's
layout with random weights the default 128 px overlap leaves a relative error of 4e-5, 192 px
1.3e-6, none 0.22 (tests/test_vae_tiling.py).

Cost: the same convolutions as untiled (plus the halos), but between two GroupNorms every
tile's activation is kept, so the memory is about that of the largest whole-image activation
(with a residual beside it), not one tile's: for the FLUX decoder at 2048x2048 in 1024 px
tiles, 256 channels at full size plus halos, :func:`stash_bytes` reckons 5.3 GB in bf16 at
most. ``stash_device="cpu"`` keeps the tiles in CPU memory between GroupNorms (each moves to
the device and back once per GroupNorm); ``"auto"`` does so when the device lacks room.

Supported layouts: diffusers' ``AutoencoderKL`` (``Encoder``/``Decoder`` with GroupNorm
``ResnetBlock2D``; the FLUX and SD VAEs) and the original latent-diffusion one that BFL's
``ae.safetensors`` and ComfyUI build (``down[i].block[j]``, ``mid.block_1`` ...).
:func:`encoder_problem` / :func:`decoder_problem` say why another VAE is not, and the callers
then keep their library's own tiling.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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


def _core_edges(length: int, tile: int, halo: int) -> list[int]:
    """Edges of the fewest cores of near-equal size, on the :data:`ALIGN` grid, covering
    ``[0, length)`` such that every core with its halos (clipped at the ends) fits in ``tile``:
    no thin strip at the end, as diffusers' last tile can be; one core when the length fits."""
    units = length // ALIGN
    for count in range(1, units + 1):
        edges = [round(i * units / count) * ALIGN for i in range(count)] + [length]
        if all(min(length, b + halo) - max(0, a - halo) <= tile for a, b in zip(edges, edges[1:])):
            return edges
    raise ValueError(f"no tiling of {length} px into {tile} px tiles with {halo} px halos")  # tile_boxes prevents it


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
    ys, xs = _core_edges(height, tile, halo), _core_edges(width, tile, halo)
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
    ``"residual"`` (``x = shortcut(saved) + x``), ``"norm"`` (a GroupNorm: a point where all
    tiles meet)."""

    kind: str
    module: Optional[Callable] = None
    rescale: float = 1.0
    scale: float = 1.0


@dataclass(frozen=True)
class _Plan:
    """A VAE half as :func:`_run_plan` runs it: ``head`` untiled, ``steps`` in tiles, ``tail``
    untiled; ``level``: image pixels per pixel where the tiles start (8 for a decoder)."""

    head: Callable
    steps: list
    tail: Callable
    level: int


def _resnet_steps(norm1, act, conv1, norm2, dropout, conv2, shortcut, scale: float = 1.0) -> list[_Step]:
    return [_Step("save"), _Step("norm", norm1), _Step("call", act), _Step("call", conv1), _Step("norm", norm2),
            _Step("call", act), _Step("call", dropout), _Step("call", conv2), _Step("residual", shortcut, scale=scale)]


# diffusers' layout (AutoencoderKL's Encoder / Decoder, ResnetBlock2D)

def _diffusers_resnet_problem(resnet) -> Optional[str]:
    if not all(hasattr(resnet, a) for a in ("norm1", "conv1", "norm2", "conv2", "nonlinearity", "dropout",
                                            "conv_shortcut", "output_scale_factor")):
        return f"{type(resnet).__name__} is not diffusers' ResnetBlock2D"
    if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
        return "its resnets resample inside"
    if getattr(resnet, "time_emb_proj", None) is not None:
        return "its resnets take a time embedding"
    return _norms_problem(resnet.norm1, resnet.norm2)


def _diffusers_level_steps(blocks, samplers_attr: str, rescale: float) -> list[_Step]:
    steps = []
    for block in blocks:
        for r in block.resnets:
            steps += _resnet_steps(r.norm1, r.nonlinearity, r.conv1, r.norm2, r.dropout, r.conv2, r.conv_shortcut,
                                   float(r.output_scale_factor))
        for sampler in getattr(block, samplers_attr) or ():
            steps.append(_Step("call", sampler, rescale=rescale))
    return steps


def _diffusers_problem(half, blocks_attr: str) -> Optional[str]:
    for block in getattr(half, blocks_attr):
        if not hasattr(block, "resnets") or getattr(block, "attentions", None):
            return f"its {type(block).__name__} blocks are not plain resnet blocks"
        for resnet in block.resnets:
            problem = _diffusers_resnet_problem(resnet)
            if problem:
                return problem
    return _norms_problem(half.conv_norm_out)


def _diffusers_decoder_plan(dec) -> _Plan:
    def head(z):
        x = dec.mid_block(dec.conv_in(z), None)
        return x.to(next(iter(dec.up_blocks.parameters())).dtype)

    steps = _diffusers_level_steps(dec.up_blocks, "upsamplers", 2.0)
    steps += [_Step("norm", dec.conv_norm_out), _Step("call", dec.conv_act), _Step("call", dec.conv_out)]
    return _Plan(head, steps, lambda x: x, 2 ** (len(dec.up_blocks) - 1))


def _diffusers_encoder_plan(enc) -> _Plan:
    def tail(x):
        return enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(x))))

    steps = [_Step("call", enc.conv_in)] + _diffusers_level_steps(enc.down_blocks, "downsamplers", 0.5)
    return _Plan(lambda x: x, steps, tail, 1)


# the original latent-diffusion layout (BFL's ae.safetensors; ComfyUI's Encoder / Decoder, ResnetBlock)

def _ldm_resnet_steps(r) -> list[_Step]:
    shortcut = None
    if r.in_channels != r.out_channels:
        shortcut = r.conv_shortcut if getattr(r, "use_conv_shortcut", False) else r.nin_shortcut
    return _resnet_steps(r.norm1, F.silu, r.conv1, r.norm2, r.dropout, r.conv2, shortcut)


def _ldm_problem(half, levels_attr: str, blocks_per_level: int) -> Optional[str]:
    if getattr(half, "carried", False):
        return "it is a video VAE (its convolutions carry over frames)"
    if getattr(half, "tanh_out", False) or getattr(half, "give_pre_end", False):
        return "its decoder ends otherwise than FLUX's"
    for level in getattr(half, levels_attr):
        if len(getattr(level, "attn", ())):
            return "it has attention inside its levels"
        if len(level.block) != blocks_per_level:
            return "its levels have an unexpected number of resnets"
        for r in level.block:
            if not all(hasattr(r, a) for a in ("norm1", "conv1", "norm2", "conv2", "dropout", "in_channels",
                                                "out_channels")):
                return f"{type(r).__name__} is not a latent-diffusion ResnetBlock"
            if getattr(r, "temb_proj", None) is not None:
                return "its resnets take a time embedding"
            problem = _norms_problem(r.norm1, r.norm2)
            if problem:
                return problem
    return _norms_problem(half.norm_out)


def _ldm_decoder_plan(dec) -> _Plan:
    def head(z):
        x = dec.mid.block_2(dec.mid.attn_1(dec.mid.block_1(dec.conv_in(z), None)), None)
        return x

    steps = []
    for i_level in reversed(range(dec.num_resolutions)):
        for r in dec.up[i_level].block:
            steps += _ldm_resnet_steps(r)
        if i_level != 0:
            steps.append(_Step("call", dec.up[i_level].upsample, rescale=2.0))
    steps += [_Step("norm", dec.norm_out), _Step("call", F.silu), _Step("call", dec.conv_out)]
    return _Plan(head, steps, lambda x: x, 2 ** (dec.num_resolutions - 1))


def _ldm_encoder_plan(enc) -> _Plan:
    def tail(x):
        x = enc.mid.block_2(enc.mid.attn_1(enc.mid.block_1(x, None)), None)
        return enc.conv_out(F.silu(enc.norm_out(x)))

    steps = [_Step("call", enc.conv_in)]
    for i_level in range(enc.num_resolutions):
        for r in enc.down[i_level].block:
            steps += _ldm_resnet_steps(r)
        if i_level != enc.num_resolutions - 1:
            steps.append(_Step("call", enc.down[i_level].downsample, rescale=0.5))
    return _Plan(lambda x: x, steps, tail, 1)


def _norms_problem(*norms) -> Optional[str]:
    for norm in norms:
        if not isinstance(norm, torch.nn.GroupNorm):
            return f"it normalises with {type(norm).__name__}, not GroupNorm"
    return None


def _is_diffusers(half) -> bool:
    return hasattr(half, "up_blocks") or hasattr(half, "down_blocks")


def decoder_problem(decoder) -> Optional[str]:
    """None when :func:`run_decoder` can run ``decoder`` (diffusers' ``Decoder`` or the
    latent-diffusion one of BFL's files and ComfyUI); else why not, in a few words."""
    if hasattr(decoder, "up_blocks"):
        return _diffusers_problem(decoder, "up_blocks")
    if hasattr(decoder, "up") and hasattr(decoder, "mid") and hasattr(decoder, "num_resolutions"):
        return _ldm_problem(decoder, "up", getattr(decoder, "num_res_blocks", -1) + 1)
    return f"{type(decoder).__name__} is not a diffusers or latent-diffusion VAE decoder"


def encoder_problem(encoder) -> Optional[str]:
    """:func:`decoder_problem` for :func:`run_encoder`."""
    if hasattr(encoder, "down_blocks"):
        return _diffusers_problem(encoder, "down_blocks")
    if hasattr(encoder, "down") and hasattr(encoder, "mid") and hasattr(encoder, "num_resolutions"):
        return _ldm_problem(encoder, "down", getattr(encoder, "num_res_blocks", -1))
    return f"{type(encoder).__name__} is not a diffusers or latent-diffusion VAE encoder"


def unsupported_reason(vae) -> Optional[str]:
    """None when :func:`decode` / :func:`encode_moments` can run the diffusers ``vae``; else why
    not, in a few words (the codec logs it and keeps diffusers' per-tile tiling)."""
    encoder, decoder = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    if encoder is None or decoder is None:
        return f"{type(vae).__name__} is not diffusers' AutoencoderKL"
    return encoder_problem(encoder) or decoder_problem(decoder)


def warn_unsupported_once(owner, part: str, problem: str, fallback: str) -> None:
    """Log that whole-image tiling cannot run ``owner``'s ``part`` (``problem``) and that
    ``fallback`` runs instead: once per owner, part and problem, not at every call or retry."""
    said = getattr(owner, "_fluxsr_tiling_warned", None)
    said = said if isinstance(said, dict) else {}
    if said.get(part) == problem:
        return
    log.warning("VAE tiling: whole-image VAE tiling cannot run this VAE's %s (%s); %s is used, whose tiles may "
                "differ slightly in tone", part, problem, fallback)
    try:
        owner._fluxsr_tiling_warned = {**said, part: problem}
    except AttributeError:  # an object that takes no attributes: said again next time
        pass


def _plan(half, decoder: bool) -> _Plan:
    problem = decoder_problem(half) if decoder else encoder_problem(half)
    if problem:
        raise NotImplementedError(f"whole-image GroupNorm tiling cannot run this VAE: {problem}")
    if decoder:
        return _diffusers_decoder_plan(half) if _is_diffusers(half) else _ldm_decoder_plan(half)
    return _diffusers_encoder_plan(half) if _is_diffusers(half) else _ldm_encoder_plan(half)


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
    var, mean = torch.var_mean(g, dim=2, correction=0)
    return g.shape[2], mean, var * g.shape[2]


def _combine(stats: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased, as GroupNorm's) variance of the union of the tiles' cores, from their
    counts, means and squared deviations (Chan et al.'s pairwise update: no large sums of squares)."""
    total = sum(n for n, _, _ in stats)
    mean = sum(n * m for n, m, _ in stats) / total
    m2 = sum(s + n * (m - mean).square() for n, m, s in stats)
    return mean, m2 / total


def _normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with the given per-(batch, group) statistics, in float32 as torch's own
    kernels compute half-precision GroupNorm, then back to ``x``'s dtype: one fused
    ``x * scale + shift`` per channel (the normalisation and the affine folded together)."""
    c = x.shape[1]
    per_group = c // norm.num_groups
    scale = torch.rsqrt(var.to(x.device) + norm.eps).repeat_interleave(per_group, dim=1)  # [B, C]
    shift = -mean.to(x.device).repeat_interleave(per_group, dim=1) * scale
    if norm.affine:  # .to: ComfyUI may keep a VAE's weights elsewhere and cast them per call
        weight = norm.weight.to(device=x.device, dtype=torch.float32)
        scale, shift = scale * weight, shift * weight + norm.bias.to(device=x.device, dtype=torch.float32)
    # float32 math from x as it is (type promotion), without a float32 copy of the tile first
    return torch.addcmul(shift[..., None, None], x, scale[..., None, None]).to(x.dtype)


def _levels(steps: list[_Step], level: int) -> tuple[list[int], int]:
    """The level (image pixels per pixel) of the tensor each step receives, starting at
    ``level``, and the level after the last step."""
    at = []
    for step in steps:
        at.append(level)
        if step.rescale != 1.0:
            level = int(round(level / step.rescale))
    return at, level


def _stashed(t: Optional[torch.Tensor], stash: Optional[torch.device]) -> Optional[torch.Tensor]:
    return t if t is None or stash is None else t.to(stash)


def _run_steps(steps: list[_Step], tiles: list[_TileState], level: int, device: torch.device,
               stash: Optional[torch.device], cancel_check: Optional[Callable[[], None]]) -> int:
    """Run ``steps`` over every tile, meeting at each GroupNorm. ``level``: image pixels per
    pixel at the start; returns it at the end."""
    at_step, final_level = _levels(steps, level)
    # (the GroupNorm that starts it, its steps, the level it starts at)
    segments: list[tuple[Optional[torch.nn.GroupNorm], list[_Step], int]] = [(None, [], level)]
    for step, at in zip(steps, at_step):
        if step.kind == "norm":
            segments.append((step.module, [], at))
        else:
            segments[-1][1].append(step)
    combined = None
    for index, (norm, seg, _) in enumerate(segments):
        next_norm, _, end_level = segments[index + 1] if index + 1 < len(segments) else (None, None, final_level)
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
                    x = shortcut + x if step.scale == 1.0 else (shortcut + x) / step.scale
                    saved = None
            tile.stats = _core_stats(_core(tile, x, end_level), next_norm.num_groups) if next_norm is not None else None
            tile.x = _stashed(x, stash)
            # the resnet's residual is often its input itself: one tensor, not two copies
            tile.saved = tile.x if saved is x else _stashed(saved, stash)
            del x, saved
    return final_level


def _assemble(tiles: list[_TileState], level: int, device: torch.device, height: int, width: int) -> torch.Tensor:
    """The tiles' cores put together into one tensor (image ``height x width`` at ``level``)."""
    first = tiles[0].x
    out = torch.empty(first.shape[0], first.shape[1], height // level, width // level,
                      dtype=first.dtype, device=device)
    for t in tiles:
        b = t.box
        out[..., b.cy0 // level:b.cy1 // level, b.cx0 // level:b.cx1 // level] = _core(t, t.x, level).to(out.device)
    return out


def _widest_full_size(steps: list[_Step], level: int) -> int:
    """The most channels a GroupNorm sees at full size (level 1) in ``steps``."""
    at_step, _ = _levels(steps, level)
    return max((int(step.module.num_channels) for step, at in zip(steps, at_step)
                if step.kind == "norm" and at == 1), default=0)


def stash_bytes(widest_channels: int, boxes: list[TileBox], batch: int, dtype: torch.dtype) -> int:
    """About the most bytes the tiles hold between two GroupNorms: the widest full-size
    activation (``widest_channels``: the decoder's upsampled input to its last level), an input
    and a residual, over all tiles with their halos."""
    pixels = sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in boxes)
    return 2 * batch * int(widest_channels) * pixels * torch.empty(0, dtype=dtype).element_size()


def _stash_device(stash_device: Union[str, torch.device, None], device: torch.device, need: int
                  ) -> Optional[torch.device]:
    """Where tiles wait between GroupNorms: None (on ``device``) or the CPU. ``"auto"``: the
    CPU when a CUDA device has less than twice ``need`` (:func:`stash_bytes`) free (the tiles'
    work needs room beside them), else the device."""
    if stash_device is None:
        return None
    if stash_device == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return torch.device("cpu") if free < 2 * need else None
    stash = torch.device(stash_device)
    return None if stash == device else stash


def _fallback_stash(device: torch.device) -> Optional[torch.device]:
    """Where tiles go when they do not fit on ``device`` beside the work: CPU memory (None on
    the CPU itself)."""
    return None if device.type == "cpu" else torch.device("cpu")


def _run_plan(plan: _Plan, x: torch.Tensor, tile: int, overlap: int, stash_device, cancel_check) -> torch.Tensor:
    source = plan.head(x)  # kept for a retry: the latent-size part (decoder) or the image (encoder)
    height, width = source.shape[-2] * plan.level, source.shape[-1] * plan.level
    boxes = tile_boxes(height, width, tile, overlap)
    device = source.device
    need = stash_bytes(_widest_full_size(plan.steps, plan.level), boxes, source.shape[0], source.dtype)
    stash = _stash_device(stash_device, device, need)
    lv = plan.level
    while True:
        tiles = [_TileState(b, source[..., b.y0 // lv:b.y1 // lv, b.x0 // lv:b.x1 // lv]) for b in boxes]
        try:
            level = _run_steps(plan.steps, tiles, plan.level, device, stash, cancel_check)
            break
        except torch.OutOfMemoryError as exc:
            fallback = _fallback_stash(device)
            if stash is not None or fallback is None:
                raise
            # "auto" guessed that the tiles fit on the device: once more with them in CPU memory,
            # after the failed try's tensors (held by the traceback's frames too) are gone
            failed = exc.with_traceback(None)
        del tiles
        log.warning("VAE tiling: out of memory with the tiles held on %s (%s); again with them in CPU memory",
                    device, str(failed).splitlines()[0] if str(failed) else "no message")
        del failed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stash = fallback
    out = _assemble(tiles, level, device, height, width)
    del tiles, source
    return plan.tail(out)


def run_decoder(decoder, z: torch.Tensor, tile: int, overlap: int,
                stash_device: Union[str, torch.device, None] = None,
                cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """What ``decoder(z)`` returns (an image ``[B, 3, 8h, 8w]`` in about [-1, 1] from the raw
    latent), computed in tiles of at most ``tile`` image pixels, neighbours sharing ``overlap``
    (see the module's text). ``decoder``: diffusers' or the latent-diffusion layout
    (:func:`decoder_problem`); ``stash_device``: None, ``"cpu"`` or ``"auto"``."""
    return _run_plan(_plan(decoder, True), z, tile, overlap, stash_device, cancel_check)


def run_encoder(encoder, image: torch.Tensor, tile: int, overlap: int,
                stash_device: Union[str, torch.device, None] = None,
                cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """What ``encoder(image)`` returns (the posterior's moments ``[B, 2C, H/8, W/8]`` of an
    image in [-1, 1], H and W multiples of 8), in tiles as :func:`run_decoder`."""
    return _run_plan(_plan(encoder, False), image, tile, overlap, stash_device, cancel_check)


def decode(vae, z: torch.Tensor, tile: int, overlap: int, stash_device: Union[str, torch.device, None] = None,
           cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """A diffusers ``AutoencoderKL``'s decode of a raw latent (``post_quant_conv`` if it has one,
    then :func:`run_decoder`)."""
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    return run_decoder(vae.decoder, z, tile, overlap, stash_device, cancel_check)


def encode_moments(vae, image: torch.Tensor, tile: int, overlap: int,
                   stash_device: Union[str, torch.device, None] = None,
                   cancel_check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """A diffusers ``AutoencoderKL``'s ``_encode``: :func:`run_encoder`, then ``quant_conv`` if it
    has one; the posterior's moments."""
    x = run_encoder(vae.encoder, image, tile, overlap, stash_device, cancel_check)
    if getattr(vae, "quant_conv", None) is not None:
        x = vae.quant_conv(x)
    return x


@contextlib.contextmanager
def tiled_forwards(encoder, decoder, tile: int, overlap: int,
                   stash_device: Union[str, torch.device, None] = "auto",
                   cancel_check: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Within the block, calling ``encoder`` or ``decoder`` (modules :func:`encoder_problem` /
    :func:`decoder_problem` accept; either may be None) runs :func:`run_encoder` /
    :func:`run_decoder`: for a VAE whose own code (memory management, dtypes, batching) should
    stay in charge, as ComfyUI's."""
    bound = []
    try:
        for half, run in ((encoder, run_encoder), (decoder, run_decoder)):
            if half is None:
                continue

            def forward(x, *args, _run=run, _half=half, **kwargs):
                return _run(_half, x, tile, overlap, stash_device, cancel_check)

            half.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
            bound.append(half)
        yield
    finally:
        for half in bound:
            half.__dict__.pop("forward", None)


__all__ = ["TileBox", "tile_boxes", "decoder_problem", "encoder_problem", "unsupported_reason",
           "warn_unsupported_once", "stash_bytes",
           "run_decoder", "run_encoder", "decode", "encode_moments", "tiled_forwards"]

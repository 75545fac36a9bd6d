"""VAE tiling with the whole image's GroupNorm statistics: the untiled result, in tiles.

diffusers' VAE tiling (and ComfyUI's) runs the encoder or decoder on each tile alone, so every
GroupNorm normalises with that tile's mean and variance: a dark tile is brightened, a flat one
gets more contrast, and the blend over the overlap only hides the seam, not the tone shift. It
also runs the mid-block attention per tile, and each tile's zero padding shows near its edges.
Here the VAE runs as a list of segments, each from one GroupNorm to the next, over all tiles:

* at each GroupNorm every tile adds the sums of its *core* (the part of the image it alone
  owns), and all tiles are normalised with the combined mean and variance: the statistics the
  untiled VAE computes, not an estimate from a downscaled copy;
* between two GroupNorms the tiles' cores are put together into the whole activation, and the
  next segment cuts each tile again from it with a halo as wide as that segment's own
  convolutions reach (8 to 24 image pixels for the FLUX VAE, counted from the modules): every
  pixel a core keeps is computed from the same neighbours as untiled, so tiles of any size give
  the untiled result up to rounding, and the halos add a few percent of work, not the
  overlaps' tens of percent;
* the low-resolution part runs untiled, where it costs little: the decoder's ``conv_in`` and mid
  block (its attention sees the whole latent) before the up blocks; the encoder's mid block and
  output layers after the down blocks.

No overlap is needed, so none is taken: ``tile`` bounds each piece, halo included.

Cost: the same convolutions as untiled plus the halos, but between two GroupNorms the whole
activation is held (the segment's input, its output and a resnet's residual), so the memory is
about three whole-image activations, not one tile's: for the FLUX decoder at 2048x2048,
:func:`held_bytes` reckons 4.3 GB in bf16 (the untiled decoder holds more, with its own
temporaries at full size). ``stash_device="cpu"`` keeps them in CPU memory (each tile moves to
the device and back once per GroupNorm); ``"auto"`` does so when the device lacks room.

Held in CPU memory, they must also fit there: past what is available the system kills the
process, with no error to catch (the FLUX decoder at 8192x8192 would hold 64 GiB in bf16). Within
a memory limit (what is available, or ``memory_limit``) the segments whose whole activations do
not fit are *recomputed* instead: from the last activation held, one pass over the tiles for
each GroupNorm on the way runs them up to it, with the halo of all their reach, for its
statistics, and only the last pass keeps its output. The result is the same; the work grows
with the number of GroupNorms recomputed (:func:`_schedule` picks the runs with the least work
that fit: for the FLUX decoder at 4096 px, 16 GiB held whole, about 1.6x the decoder's work
in 8 GiB and 4x in 4 GiB; the encoder 1.15x and 1.6x).

Supported layouts: diffusers' ``AutoencoderKL`` (``Encoder``/``Decoder`` with GroupNorm
``ResnetBlock2D``; the FLUX and SD VAEs) and the original latent-diffusion one that BFL's
``ae.safetensors`` and ComfyUI build (``down[i].block[j]``, ``mid.block_1`` ...).
:func:`encoder_problem` / :func:`decoder_problem` say why another VAE is not, and the callers
then keep their library's own tiling.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from . import memory

log = logging.getLogger(__name__)

ALIGN = 8  # tile edges in image pixels: the VAE's whole downscale, so they fall on every level's grid
MIN_CORE = 64  # image pixels: smaller cores would cost more in per-tile work than the memory they save


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


def tile_boxes(height: int, width: int, tile: int, halo: int) -> list[TileBox]:
    """The tiles of an image ``height x width`` (multiples of 8) for pieces of at most ``tile``
    pixels: the fewest near-equal cores that fit with a ``halo`` (a multiple of 8) around each,
    clipped at the image's edge. Row-major order."""
    if height % ALIGN or width % ALIGN:
        raise ValueError(f"image height and width must be multiples of {ALIGN} (got {height}x{width})")
    if tile <= 0 or tile % ALIGN:
        raise ValueError(f"tile must be a positive multiple of {ALIGN} pixels (got {tile})")
    if halo < 0 or halo % ALIGN:
        raise ValueError(f"halo must be a multiple of {ALIGN} pixels (got {halo})")
    if tile - 2 * halo < ALIGN:
        raise ValueError(f"a {tile} px tile leaves no core inside {halo} px halos; use tiles of at least "
                         f"{2 * halo + ALIGN} px")
    ys, xs = _core_edges(height, tile, halo), _core_edges(width, tile, halo)
    return [_grown(TileBox(cy0, cy1, cx0, cx1, cy0, cy1, cx0, cx1), halo, height, width)
            for cy0, cy1 in zip(ys, ys[1:]) for cx0, cx1 in zip(xs, xs[1:])]


def _grown(box: TileBox, halo: int, height: int, width: int) -> TileBox:
    """``box``'s core with ``halo`` pixels around it, clipped at the image's edge."""
    return TileBox(max(0, box.cy0 - halo), min(height, box.cy1 + halo), max(0, box.cx0 - halo),
                   min(width, box.cx1 + halo), box.cy0, box.cy1, box.cx0, box.cx1)


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

# Modules whose output pixels read their neighbours; everything else in a plan is pointwise
_SPATIAL = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d)


def _reach(module, level: int, rescale: float) -> float:
    """Image pixels around a pixel that ``module``'s output reads (it runs at ``level`` image
    pixels per pixel; ``rescale`` 2 for an upsampler, whose convolution runs after the
    upsampling): ``(kernel - 1) x dilation`` of every convolution or pooling inside, at its
    level. Twice a centred kernel's reach, which also covers a downsampler's one-sided padding."""
    if not isinstance(module, torch.nn.Module):
        return 0.0  # an activation function
    inner_level = level / rescale if rescale > 1 else level
    reach = 0.0
    for m in module.modules():
        if isinstance(m, _SPATIAL):
            kernel, dilation = m.kernel_size, getattr(m, "dilation", 1)
            kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
            dilation = dilation if isinstance(dilation, tuple) else (dilation, dilation)
            reach += max((k - 1) * d for k, d in zip(kernel, dilation)) * inner_level
    return reach


def _work(module, level: int, rescale: float) -> float:
    """Multiply-adds per image pixel of ``module``'s convolutions (it runs at ``level`` image
    pixels per pixel; ``rescale`` as :func:`_reach`): each at the level of its output."""
    if not isinstance(module, torch.nn.Module):
        return 0.0
    out_level = level / rescale
    work = 0.0
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            kernel = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            work += m.in_channels * m.out_channels / m.groups * kernel[0] * kernel[1] / out_level ** 2
    return work


def _last_out_channels(steps: list[_Step]) -> Optional[int]:
    """The channels the last convolution among ``steps`` gives (None when none has one)."""
    out = None
    for step in steps:
        if step.kind == "call" and isinstance(step.module, torch.nn.Module):
            for m in step.module.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    out = int(m.out_channels)
    return out


@dataclass(frozen=True)
class _Segment:
    """The steps from one GroupNorm (``norm``, applied first; None for the first segment) to the
    next (``next_norm``, which its output meets; None for the last). Its input is at ``level``
    image pixels per pixel, its output at ``end_level``; ``halo``: the image pixels a tile needs
    around its core for these steps alone (their reach, up to the 8 px grid); ``saves``: its
    output is also a resnet's residual; ``residual``: it adds the one held."""

    norm: Optional[torch.nn.GroupNorm]
    steps: list
    level: int
    end_level: int
    halo: int
    next_norm: Optional[torch.nn.GroupNorm]
    saves: bool
    residual: bool
    in_channels: Optional[int]  # None: the plan's input
    out_channels: Optional[int]  # None: unknown (the input's)
    reach: float = 0.0  # the halo before rounding up to the grid (chains add them up)
    work: float = 0.0  # multiply-adds per image pixel, its convolutions' (what a recomputation costs)


def _on_grid(reach: float) -> int:
    """A halo of ``reach`` image pixels, up to the :data:`ALIGN` grid."""
    return int(-(-reach // ALIGN)) * ALIGN


def _segments(steps: list[_Step], level: int) -> list[_Segment]:
    """``steps`` cut at their GroupNorms (see :class:`_Segment`)."""
    groups: list[tuple[Optional[torch.nn.GroupNorm], list[_Step]]] = [(None, [])]
    for step in steps:
        if step.kind == "norm":
            groups.append((step.module, []))
        else:
            groups[-1][1].append(step)
    segments = []
    for index, (norm, seg) in enumerate(groups):
        next_norm = groups[index + 1][0] if index + 1 < len(groups) else None
        at, end_level = _levels(seg, level)
        if any(s.kind == "save" for s in seg[:-1]) or any(
                s.kind == "residual" and lv != level for s, lv in zip(seg, at)):
            # each segment's residual is cut with its input: a resnet's "save" just before a
            # GroupNorm and its sum before any resampling, as in both layouts this module knows
            raise NotImplementedError("whole-image GroupNorm tiling cannot run this VAE: its residuals are "
                                      "laid out otherwise than a resnet's")
        computing = [(s, lv) for s, lv in zip(seg, at) if s.kind in ("call", "residual")]
        reach = sum(_reach(s.module, lv, s.rescale) for s, lv in computing)
        out_channels = int(next_norm.num_channels) if next_norm is not None else _last_out_channels(seg)
        segments.append(_Segment(norm, seg, level, end_level, _on_grid(reach), next_norm,
                                 bool(seg) and seg[-1].kind == "save", any(s.kind == "residual" for s in seg),
                                 int(norm.num_channels) if norm is not None else None, out_channels,
                                 reach, sum(_work(s.module, lv, s.rescale) for s, lv in computing)))
        level = end_level
    return segments


def _passthrough(seg: _Segment) -> bool:
    """A segment that computes nothing (the decoder's first: the first resnet's input saved)."""
    return seg.norm is None and all(s.kind == "save" for s in seg.steps)


def _boundary_bytes(segments: list[_Segment], in_channels: int, height: int, width: int, batch: int,
                    element_size: int) -> list[int]:
    """Bytes of the whole-image activation at each boundary: ``[0]`` the plan's input, ``[i]``
    segment ``i - 1``'s output."""
    sizes, channels = [batch * in_channels * (height // segments[0].level) * (width // segments[0].level)
                       * element_size], in_channels
    for seg in segments:
        channels = seg.out_channels or channels
        sizes.append(batch * channels * (height // seg.end_level) * (width // seg.end_level) * element_size)
    return sizes


def _pending_residuals(segments: list[_Segment]) -> list[Optional[int]]:
    """For each boundary (``[i]``: before segment ``i``; ``[n]``: after the last), the boundary
    whose activation waits there as a resnet's residual, or None."""
    pending, waiting = [None], None
    for index, seg in enumerate(segments):
        if seg.residual:
            waiting = None
        if seg.saves:
            waiting = index + 1
        pending.append(waiting)
    return pending


def _held_peak(segments: list[_Segment], sizes: list[int], start: int, end: int) -> int:
    """The most bytes of whole-image activations at once while segments ``start:end`` run one
    after the other, each over all tiles (``start`` a :func:`_clean_boundaries` one): a segment's
    input, its output and the residual held beside them (when it is not the input itself)."""
    pending = _pending_residuals(segments)
    most = 0
    for index in range(start, end):
        residual = pending[index]
        held = sizes[residual] if residual is not None and residual != index else 0
        most = max(most, sizes[index] + (0 if _passthrough(segments[index]) else sizes[index + 1]) + held)
    return most


def _held_bytes(segments: list[_Segment], in_channels: int, height: int, width: int, batch: int,
                element_size: int) -> int:
    """The most bytes the whole-image activations take at once when every segment's are held."""
    sizes = _boundary_bytes(segments, in_channels, height, width, batch, element_size)
    return _held_peak(segments, sizes, 0, len(segments))


def _clean_boundaries(segments: list[_Segment]) -> list[int]:
    """The boundaries where no residual waits but the activation there itself (not halfway
    through a resnet): where a recomputed run may start and end."""
    return [index for index, residual in enumerate(_pending_residuals(segments)) if residual in (None, index)]


@dataclass(frozen=True)
class _Run:
    """Segments ``start:end``, each over all tiles with its whole activation held
    (``recomputed`` False), or recomputed: for each GroupNorm on the way one pass over the tiles
    runs them from the held input up to it, for its statistics; only the input and the output
    are held whole (:func:`_run_recomputed`)."""

    start: int
    end: int
    recomputed: bool


@functools.lru_cache(maxsize=4096)
def _halo_factor(height: int, width: int, tile: int, halo: int, chain_halo: int) -> float:
    """The pixels computed over the image's, for pieces cut with ``halo`` around the cores
    :func:`_cores` lays out for ``chain_halo``: the work the halos add."""
    computed = sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in (
        _grown(core, halo, height, width) for core in _cores(height, width, tile, chain_halo)))
    return computed / (height * width)


def _held_work(segments: list[_Segment], start: int, end: int, shape: tuple[int, int, int]) -> float:
    """The work of segments ``start:end`` run held, each over the tiles :func:`_run_segments`
    lays out for all segments' halos (in units of :attr:`_Segment.work`; ``shape``: the image's
    height and width and the tile)."""
    widest = max(seg.halo for seg in segments)
    return sum(seg.work * _halo_factor(*shape, seg.halo, widest) for seg in segments[start:end])


def _chain_halos(chain: list[_Segment]) -> list[int]:
    """The halo pass ``k`` of a recomputed run cuts its pieces with: all of ``chain[:k + 1]``'s reach."""
    return [_on_grid(sum(s.reach for s in chain[:k + 1])) for k in range(len(chain))]


def _recomputed_work(segments: list[_Segment], start: int, end: int, shape: tuple[int, int, int]) -> float:
    """The work of segments ``start:end`` recomputed (:func:`_run_recomputed`): pass ``k`` runs
    ``start..k`` again, in pieces with the halo of their reach around cores laid out for the
    whole run's."""
    halos = _chain_halos(segments[start:end])
    return sum(_halo_factor(*shape, halos[k - start], halos[-1]) * sum(s.work for s in segments[start:k + 1])
               for k in range(start, end))


def _schedule(segments: list[_Segment], sizes: list[int], limit: Optional[int], shape: tuple[int, int, int]
              ) -> tuple[list[_Run], float]:
    """The runs with the least work whose whole-image activations never take more than ``limit``
    bytes at once (None: no limit), and their work over all segments' held (``shape``: the
    image's height and width and the tile). Where no runs keep within ``limit``, the cheapest
    that keep within the plan's input and output."""
    n = len(segments)
    if limit is None or _held_peak(segments, sizes, 0, n) <= limit:
        return [_Run(0, n, False)], 1.0
    clean = _clean_boundaries(segments)

    def cheapest(limit: int) -> Optional[tuple[float, list[_Run]]]:
        best: dict[int, tuple[float, list[_Run]]] = {0: (0.0, [])}
        for q in clean[1:]:
            options = []
            for p in (p for p in clean if p < q and p in best):
                work, runs = best[p]
                if _held_peak(segments, sizes, p, q) <= limit:
                    options.append((work + _held_work(segments, p, q, shape), runs + [_Run(p, q, False)]))
                if sizes[p] + sizes[q] <= limit:
                    options.append((work + _recomputed_work(segments, p, q, shape), runs + [_Run(p, q, True)]))
            if options:
                best[q] = min(options, key=lambda option: option[0])
        return best.get(n)

    work, runs = cheapest(limit) or cheapest(sizes[0] + sizes[n])
    merged: list[_Run] = []
    for run in runs:  # held runs side by side are one
        if merged and not run.recomputed and not merged[-1].recomputed:
            run = _Run(merged.pop().start, run.end, False)
        merged.append(run)
    return merged, work / max(_held_work(segments, 0, n, shape), 1e-30)


# Of the CPU memory available, what the held activations may take: the rest stays for the
# process's other growth (the decoded image, its conversion, a tile's work moving through).
CPU_HOLD_FRACTION = 0.8
# A tile's own work beside the held activations, as a multiple of its held bytes at its size
# (FLUX decoder, 1024 px tile, bf16, torch's CPU kernels: 2561 MiB measured, 1024 MiB reckoned).
TILE_WORK_FACTOR = 3


# What one tile's work takes beside the held activations, in bytes, for a batch of images of
# height x width pixels in a dtype: the caller's own figure (ComfyUI's, so that what it frees
# and what the tiling weighs agree), else :func:`_tile_work_bytes`.
TileWork = Callable[[int, int, int, torch.dtype], int]


def _tile_work_bytes(segments: list[_Segment], in_channels: int, batch: int, element_size: int, tile: int,
                     height: int, width: int) -> int:
    """Our figure for one tile's work: :data:`TILE_WORK_FACTOR` times the activations held at the
    tile's size (the image's, where it is smaller)."""
    side = max(int(tile) // ALIGN * ALIGN, ALIGN)
    return TILE_WORK_FACTOR * _held_bytes(segments, in_channels, min(height, side), min(width, side), batch,
                                          element_size)


def _auto_limit(tile_work: int, hold: torch.device, device: torch.device) -> Optional[int]:
    """The bytes the whole-image activations may take when they are held in CPU memory (``hold``
    the CPU): :data:`CPU_HOLD_FRACTION` of what is available, less ``tile_work`` (one tile's
    work) where the CPU also computes; None (no limit) on a GPU, whose out-of-memory error is
    caught and retried, or where the available memory is unknown. Over what is available, the
    process would be killed by the system, not given an error."""
    if hold.type != "cpu":
        return None
    available = memory.available_cpu_bytes()
    if available is None:
        return None
    return max(0, int(available * CPU_HOLD_FRACTION) - (tile_work if device.type == "cpu" else 0))


def held_bytes(half, height: int, width: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """About the most bytes :func:`run_decoder` (``half`` a decoder; ``height x width`` the image
    it makes) or :func:`run_encoder` (an encoder of that image) holds in whole-image activations
    at once, beside one tile's work: with that work, what ``stash_device`` "auto" weighs against
    the device's free memory."""
    decoder = hasattr(half, "up_blocks") or hasattr(half, "up")
    plan = _plan(half, decoder)
    segments = _segments(plan.steps, plan.level)
    first_conv = next((m for s in segments[0].steps if isinstance(s.module, torch.nn.Module)
                       for m in s.module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    in_channels = first_conv.in_channels if first_conv is not None else segments[1].in_channels
    return _held_bytes(segments, int(in_channels), height, width, batch, torch.empty(0, dtype=dtype).element_size())


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


def _cut(full: torch.Tensor, box: TileBox, level: int) -> torch.Tensor:
    """``box`` (core and halo) of a whole-image tensor at ``level`` image pixels per pixel."""
    return full[..., box.y0 // level:box.y1 // level, box.x0 // level:box.x1 // level]


def _core(box: TileBox, x: torch.Tensor, level: int) -> torch.Tensor:
    """The core within a tile's tensor ``x`` (``box`` at ``level``)."""
    return x[..., (box.cy0 - box.y0) // level:(box.cy1 - box.y0) // level,
             (box.cx0 - box.x0) // level:(box.cx1 - box.x0) // level]


def _core_slices(box: TileBox, level: int) -> tuple:
    return (..., slice(box.cy0 // level, box.cy1 // level), slice(box.cx0 // level, box.cx1 // level))


def _cores(height: int, width: int, tile: int, halo: int) -> list[TileBox]:
    # a piece holds its halos and a core worth the per-tile work: a few pixels more than asked
    # for rather than an error (the whole activations are held anyway, so this costs no memory)
    return tile_boxes(height, width, max(int(tile), 2 * halo + MIN_CORE), halo)


def _apply(seg: _Segment, x: torch.Tensor, residual: Optional[torch.Tensor], statistics
           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``seg`` on one tile ``x``: its GroupNorm with the whole image's ``statistics``, then its
    steps, ``residual`` the tile's resnet input where one is added. Returns the output and the
    residual after it (the output, where the segment saves one)."""
    if seg.norm is not None:
        x = _normalize(x, seg.norm, *statistics)
    for step in seg.steps:
        if step.kind == "call":
            x = step.module(x)
        elif step.kind == "residual":
            shortcut = step.module(residual) if step.module is not None else residual
            x = shortcut + x if step.scale == 1.0 else (shortcut + x) / step.scale
            residual = None
        elif step.kind == "save":
            residual = x
    return x, residual


def _put(out_full: Optional[torch.Tensor], y: torch.Tensor, core: TileBox, level: int, height: int, width: int,
         where: torch.device) -> torch.Tensor:
    """``y``, a tile's core at ``level``, written into the whole activation (made on ``where``
    at the first tile)."""
    if out_full is None:
        out_full = torch.empty(*y.shape[:2], height // level, width // level, dtype=y.dtype, device=where)
    out_full[_core_slices(core, level)] = y
    return out_full


def _run_held(seg: _Segment, x_full: torch.Tensor, residual_full: Optional[torch.Tensor], stats: list,
              cores: list[TileBox], height: int, width: int, device: torch.device, stash: Optional[torch.device],
              cancel_check: Optional[Callable[[], None]]) -> tuple[torch.Tensor, list]:
    """One segment over all tiles: each cut from the whole activation ``x_full`` with the
    segment's halo, normalised with the statistics of ``stats`` (the tiles' cores'), its core
    put into the whole output (held on ``stash``, or on ``device`` when None). Returns the
    output and its cores' statistics for the GroupNorm ahead."""
    combined = _combine(stats) if seg.norm is not None else None
    passthrough = _passthrough(seg)
    out_full, next_stats = (x_full if passthrough else None), []
    for core in cores:
        if cancel_check is not None:
            cancel_check()
        if passthrough:  # nothing to compute: its statistics only
            y = x_full[_core_slices(core, seg.level)].to(device)
        else:
            box = _grown(core, seg.halo, height, width)
            x = _cut(x_full, box, seg.level).to(device)
            residual = _cut(residual_full, box, seg.level).to(device) if seg.residual else None
            x, _ = _apply(seg, x, residual, combined)
            y = _core(box, x, seg.end_level)
            out_full = _put(out_full, y, core, seg.end_level, height, width, stash or device)
            del x, residual
        if seg.next_norm is not None:
            next_stats.append(_core_stats(y, seg.next_norm.num_groups))
        del y
    return out_full, next_stats


def _run_recomputed(chain: list[_Segment], x_full: torch.Tensor, residual_is_input: bool, stats: list, tile: int,
                    height: int, width: int, device: torch.device, stash: Optional[torch.device],
                    cancel_check: Optional[Callable[[], None]]) -> tuple[torch.Tensor, list]:
    """The segments ``chain`` from the whole activation ``x_full`` with only their output held
    whole: pass ``k`` runs each tile through ``chain[:k + 1]`` (cut with the halo of all their
    reach, every GroupNorm with the statistics the passes before found) for the statistics of
    its output's core; the last pass writes the output. The untiled result still, for about
    ``len(chain)`` times the work (:func:`_recomputed_work`). ``residual_is_input``: the first
    resnet's residual is ``x_full`` itself. A long chain's halo can make its pieces larger than
    ``tile`` (two halos and a 64 px core): at very tight limits a piece's own work, which the
    schedule does not count, sets the peak."""
    halos = _chain_halos(chain)
    cores = _cores(height, width, tile, halos[-1])
    combined = [_combine(stats) if chain[0].norm is not None else None]
    out_full, next_stats = None, []
    for k in range(len(chain)):
        last, next_stats = k == len(chain) - 1, []
        for core in cores:
            if cancel_check is not None:
                cancel_check()
            box = _grown(core, halos[k], height, width)
            x = _cut(x_full, box, chain[0].level).to(device)
            residual = x if residual_is_input else None
            for seg, statistics in zip(chain[:k + 1], combined):
                x, residual = _apply(seg, x, residual, statistics)
            y = _core(box, x, chain[k].end_level)
            del x, residual
            if chain[k].next_norm is not None:
                next_stats.append(_core_stats(y, chain[k].next_norm.num_groups))
            if last:
                out_full = _put(out_full, y, core, chain[k].end_level, height, width, stash or device)
            del y
        if not last:
            combined.append(_combine(next_stats))
    return out_full, next_stats


def _run_segments(segments: list[_Segment], runs: list[_Run], source: torch.Tensor, tile: int, height: int,
                  width: int, device: torch.device, stash: Optional[torch.device],
                  cancel_check: Optional[Callable[[], None]]) -> torch.Tensor:
    """Run ``segments`` over the whole-image ``source`` as ``runs`` (:func:`_schedule`) say."""
    held_cores = _cores(height, width, tile, max(seg.halo for seg in segments))
    x_full, residual_full, stats = source, None, []
    for run in runs:
        if run.recomputed:
            residual_is_input = run.start > 0 and segments[run.start - 1].saves
            x_full, stats = _run_recomputed(segments[run.start:run.end], x_full, residual_is_input, stats, tile,
                                            height, width, device, stash, cancel_check)
            residual_full = x_full if segments[run.end - 1].saves else None
            continue
        for seg in segments[run.start:run.end]:
            x_full, stats = _run_held(seg, x_full, residual_full, stats, held_cores, height, width, device, stash,
                                      cancel_check)
            if seg.residual:
                residual_full = None
            if seg.saves:
                residual_full = x_full
    return x_full


def _stash_device(stash_device: Union[str, torch.device, None], device: torch.device, need: int,
                  tile_work: int) -> Optional[torch.device]:
    """Where the whole-image activations wait between GroupNorms: None (on ``device``) or the
    CPU. ``"auto"``: the CPU when a CUDA device has less free (:func:`memory.free_device_bytes`)
    than ``need`` (:func:`held_bytes`) and one tile's work beside it, else the device (where
    that was too little after all, the out-of-memory error is caught and the run goes again
    with them in CPU memory)."""
    if stash_device is None:
        return None
    if stash_device == "auto":
        free = memory.free_device_bytes(device)
        if free is None:
            return None
        return torch.device("cpu") if free < need + tile_work else None
    stash = torch.device(stash_device)
    return None if stash == device else stash


def _fallback_stash(device: torch.device) -> Optional[torch.device]:
    """Where the activations go when they do not fit on ``device`` beside the work: CPU memory
    (None on the CPU itself)."""
    return None if device.type == "cpu" else torch.device("cpu")


_SAID: set = set()


def _size(n: int) -> str:
    """Bytes for the log, in GiB or MiB."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _run_plan(plan: _Plan, x: torch.Tensor, tile: int, stash_device, cancel_check,
              memory_limit: Optional[int] = None, part: str = "VAE", tile_work: Optional[TileWork] = None
              ) -> torch.Tensor:
    source = plan.head(x)  # kept for a retry: the latent-size part (decoder) or the image (encoder)
    height, width = source.shape[-2] * plan.level, source.shape[-1] * plan.level
    segments = _segments(plan.steps, plan.level)
    device, batch, element_size = source.device, source.shape[0], source.element_size()
    sizes = _boundary_bytes(segments, source.shape[1], height, width, batch, element_size)
    need = _held_peak(segments, sizes, 0, len(segments))
    work_bytes = (tile_work(batch, height, width, source.dtype) if tile_work is not None else
                  _tile_work_bytes(segments, source.shape[1], batch, element_size, tile, height, width))
    stash = _stash_device(stash_device, device, need, work_bytes)
    while True:
        limit = memory_limit if memory_limit is not None else _auto_limit(work_bytes, stash or device, device)
        if limit is not None and torch.is_grad_enabled():
            # autograd keeps every pass's activations for the backward pass: recomputing would
            # hold more, not less (the upscaler and ComfyUI's nodes run without autograd)
            if need > limit:
                log.warning("VAE tiling: the %s's whole-image activations (%s) are over the %s they may take, "
                            "but autograd is recording, so they are held whole: run it under torch.no_grad() "
                            "to keep within it", part, _size(need), _size(limit))
            limit = None
        runs, work = _schedule(segments, sizes, limit, (height, width, int(tile)))
        if len(runs) > 1 or runs[0].recomputed:
            recomputed = sum(run.end - run.start for run in runs if run.recomputed)
            key = (part, need, limit, tuple(runs))
            say = log.info if key in _SAID else log.warning  # a warning once, then info (a folder of images)
            say("VAE tiling: the %s's whole-image activations would take %s at once, more than the %s %s; %d of its "
                "%d segments between GroupNorms are recomputed for each GroupNorm's statistics instead (the same "
                "result, about %.1fx its work)", part, _size(need), _size(limit or 0),
                "given" if memory_limit is not None else "of CPU memory they may take", recomputed, len(segments), work)
            _SAID.add(key)
        try:
            out = _run_segments(segments, runs, source, tile, height, width, device, stash, cancel_check)
            break
        except torch.OutOfMemoryError as exc:
            fallback = _fallback_stash(device)
            if stash is not None or fallback is None:
                raise
            # "auto" guessed that the activations fit on the device: once more with them in CPU
            # memory, after the failed try's tensors (held by the traceback's frames too) are gone
            failed = exc.with_traceback(None)
        log.warning("VAE tiling: out of memory with the activations held on %s (%s); again with them in CPU "
                    "memory", device, str(failed).splitlines()[0] if str(failed) else "no message")
        del failed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stash = fallback
    del source
    return plan.tail(out.to(device))


def run_decoder(decoder, z: torch.Tensor, tile: int, stash_device: Union[str, torch.device, None] = None,
                cancel_check: Optional[Callable[[], None]] = None, memory_limit: Optional[int] = None,
                tile_work: Optional[TileWork] = None) -> torch.Tensor:
    """What ``decoder(z)`` returns (an image ``[B, 3, 8h, 8w]`` in about [-1, 1] from the raw
    latent), computed in pieces of at most ``tile`` image pixels (see the module's text).
    ``decoder``: diffusers' or the latent-diffusion layout (:func:`decoder_problem`);
    ``stash_device``: where the whole-image activations wait, None (the device), ``"cpu"`` or
    ``"auto"``; ``cancel_check``: called before each tile, raises to stop; ``memory_limit``: the
    bytes those activations may take at once (None: in CPU memory, what is available there; on a
    GPU, no limit), kept to by recomputing parts of the decoder (the same result, more work);
    ``tile_work``: the caller's figure for one tile's work beside them (:data:`TileWork`), which
    ``"auto"`` and the CPU memory limit count (None: ours)."""
    return _run_plan(_plan(decoder, True), z, tile, stash_device, cancel_check, memory_limit, "decoder", tile_work)


def run_encoder(encoder, image: torch.Tensor, tile: int, stash_device: Union[str, torch.device, None] = None,
                cancel_check: Optional[Callable[[], None]] = None, memory_limit: Optional[int] = None,
                tile_work: Optional[TileWork] = None) -> torch.Tensor:
    """What ``encoder(image)`` returns (the posterior's moments ``[B, 2C, H/8, W/8]`` of an
    image in [-1, 1], H and W multiples of 8), in pieces as :func:`run_decoder`."""
    return _run_plan(_plan(encoder, False), image, tile, stash_device, cancel_check, memory_limit, "encoder",
                     tile_work)


def decode(vae, z: torch.Tensor, tile: int, stash_device: Union[str, torch.device, None] = None,
           cancel_check: Optional[Callable[[], None]] = None, memory_limit: Optional[int] = None) -> torch.Tensor:
    """A diffusers ``AutoencoderKL``'s decode of a raw latent (``post_quant_conv`` if it has one,
    then :func:`run_decoder`)."""
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    return run_decoder(vae.decoder, z, tile, stash_device, cancel_check, memory_limit)


def encode_moments(vae, image: torch.Tensor, tile: int, stash_device: Union[str, torch.device, None] = None,
                   cancel_check: Optional[Callable[[], None]] = None, memory_limit: Optional[int] = None
                   ) -> torch.Tensor:
    """A diffusers ``AutoencoderKL``'s ``_encode``: :func:`run_encoder`, then ``quant_conv`` if it
    has one; the posterior's moments."""
    x = run_encoder(vae.encoder, image, tile, stash_device, cancel_check, memory_limit)
    if getattr(vae, "quant_conv", None) is not None:
        x = vae.quant_conv(x)
    return x


@contextlib.contextmanager
def tiled_forwards(encoder, decoder, tile: int, stash_device: Union[str, torch.device, None] = "auto",
                   cancel_check: Optional[Callable[[], None]] = None,
                   tile_work: Optional[dict[str, TileWork]] = None) -> Iterator[None]:
    """Within the block, calling ``encoder`` or ``decoder`` (modules :func:`encoder_problem` /
    :func:`decoder_problem` accept; either may be None) runs :func:`run_encoder` /
    :func:`run_decoder`: for a VAE whose own code (memory management, dtypes, batching) should
    stay in charge, as ComfyUI's. ``tile_work``: ``{"encoder": ..., "decoder": ...}``, the
    owner's :data:`TileWork` figures (absent: ours)."""
    bound = []
    try:
        for name, half, run in (("encoder", encoder, run_encoder), ("decoder", decoder, run_decoder)):
            if half is None:
                continue

            def forward(x, *args, _run=run, _half=half, _work=(tile_work or {}).get(name), **kwargs):
                return _run(_half, x, tile, stash_device, cancel_check, tile_work=_work)

            half.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
            bound.append(half)
        yield
    finally:
        for half in bound:
            half.__dict__.pop("forward", None)


__all__ = ["TileBox", "TileWork", "tile_boxes", "decoder_problem", "encoder_problem", "unsupported_reason",
           "warn_unsupported_once", "held_bytes",
           "run_decoder", "run_encoder", "decode", "encode_moments", "tiled_forwards"]

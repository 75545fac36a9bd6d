"""The one-step FluxSR upscale of an image, given a velocity model, a latent codec and settings.

Pipeline (FLUXSR.md section 1): resize the LR image to the target size (bicubic), pad to the
model's multiple, encode to ``z_L``, one velocity call per latent tile
(``z_H = z_L - T_L * v(z_L, T_L)``, tiles Gaussian-blended), decode, crop back, colour fix
against the upsampled input. Only the interfaces of :mod:`fluxsr_core.interfaces` are used,
so the CLI (diffusers) and the ComfyUI nodes (ComfyUI's MODEL/VAE) run exactly this code.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import color, flow, images, tiling
from .interfaces import CancelCheck, LatentCodec, ProgressCallback, VelocityModel
from .latents import PIXEL_MULTIPLE
from .settings import DEFAULT_T_L
from .tiling import TilingConfig

log = logging.getLogger("fluxsr")

COLOR_FIXES = ("none", "adain", "wavelet")
DEFAULT_MAX_OUTPUT_PIXELS = images.DEFAULT_MAX_OUTPUT_PIXELS  # 8192 x 8192


@dataclass
class UpscaleOptions:
    """How to upscale. Exactly one of ``long_side``/``megapixels`` may replace ``scale``."""

    scale: float = 4.0
    long_side: Optional[int] = None
    megapixels: Optional[float] = None
    t_l: float = DEFAULT_T_L
    color_fix: str = "wavelet"
    tiling: TilingConfig = field(default_factory=TilingConfig)
    max_output_pixels: Optional[int] = DEFAULT_MAX_OUTPUT_PIXELS  # None: no limit

    def validate(self) -> "UpscaleOptions":
        """Raise ValueError naming the first impossible setting."""
        flow.check_t_l(self.t_l)
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix {self.color_fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        tiling.validate_tiling(self.tiling)
        limit = self.max_output_pixels  # None: no limit
        if limit is not None and not (isinstance(limit, (int, float)) and limit >= 1 and float(limit).is_integer()):
            raise ValueError(f"max_output_pixels must be None (no limit) or a whole number of pixels >= 1 "
                             f"(got {limit!r})")
        return self


def output_size(height: int, width: int, options: UpscaleOptions) -> tuple[int, int]:
    """The output size for an input of ``height x width`` (guarded by ``max_output_pixels``)."""
    return images.target_size(
        height, width,
        scale=None if (options.long_side or options.megapixels) else options.scale,
        long_side=options.long_side, megapixels=options.megapixels,
        max_output_pixels=options.max_output_pixels)


@torch.no_grad()
def upscale_tensor(
    image: torch.Tensor,
    model: VelocityModel,
    codec: LatentCodec,
    cond: Any,
    options: UpscaleOptions,
    progress: Optional[ProgressCallback] = None,
    cancel_check: Optional[CancelCheck] = None,
) -> torch.Tensor:
    """Upscale ``image`` ``[B, 3, H, W]`` in [0, 1] with one FluxSR step; returns ``[B, 3, H2, W2]``.

    ``progress(done, total, None)`` is called once per latent tile; ``cancel_check()`` runs
    before each tile and may raise to stop. The result lies in [0, 1], on the codec's output
    device, float32. Runs without autograd (training calls :func:`fluxsr_core.flow.one_step_sr`).
    """
    options.validate()
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch [B, 3, H, W], got shape {tuple(image.shape)}")
    out_h, out_w = output_size(image.shape[-2], image.shape[-1], options)
    upsampled = images.resize(image.float(), (out_h, out_w))
    padded, _ = images.pad_to_multiple(upsampled, PIXEL_MULTIPLE)
    if cancel_check is not None:
        cancel_check()
    z_l = codec.encode(padded)
    del padded  # full-size buffers dominate memory at large outputs; keep only what is needed
    t_l = options.t_l

    def one_tile(tile_latent: torch.Tensor, position_offset: tuple[int, int]) -> torch.Tensor:
        # The same function the trainer's SR branch calls (flow.one_step_sr).
        return flow.one_step_sr(model, tile_latent, t_l, cond, position_offset=position_offset)

    z_h = tiling.tiled_apply(one_tile, z_l, options.tiling, progress=progress, cancel_check=cancel_check)
    if cancel_check is not None:
        cancel_check()
    del z_l
    decoded = images.crop(codec.decode(z_h).float(), out_h, out_w)
    del z_h
    fixed = color.apply_color_fix(options.color_fix, decoded, upsampled.to(decoded.device))
    return fixed.clamp_(0.0, 1.0)  # in place: no further full-size copy


class OutOfMemoryAtSmallestTilesError(getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
    """Out of memory even with the smallest tiles, with what to try in the caller's terms.

    Still torch's out-of-memory error (a ``RuntimeError``), so what handles those goes on doing
    so: ComfyUI unloads its models and shows its memory advice only for that class.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures, whatever class the backend raises."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(
            exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def smaller_tiling(config: TilingConfig, min_latent_tile: int = 32, min_vae_tile: int = 256) -> Optional[TilingConfig]:
    """Smaller tiles for an out-of-memory retry: first one tile per call, then half-size
    transformer and VAE tiles (down to ``min_latent_tile`` latent pixels and ``min_vae_tile``
    pixels; a tile already below its minimum is kept). None when nothing can shrink any more."""
    if config.tile_batch_size > 1:
        return dataclasses.replace(config, tile_batch_size=1)
    tile = config.latent_tile
    if tile > min_latent_tile:
        tile = max(min_latent_tile, (tile // 2) // 2 * 2)
    overlap = min(config.latent_overlap, max(0, (tile // 4) // 2 * 2))
    # VAE tiles stay multiples of 8 pixels (the VAE's factor), overlaps too.
    if config.vae_tile:
        vae_tile = min(config.vae_tile, max(min_vae_tile, (config.vae_tile // 2) // 8 * 8))
        vae_overlap = min(config.vae_overlap, (vae_tile // 4) // 8 * 8)
    else:
        # an untiled VAE starts tiling, with the default's quarter overlap: its overlap of 0
        # meant "no tiles", and tiles without overlap leave seams
        vae_tile, vae_overlap = 512, 128
    smaller = dataclasses.replace(config, latent_tile=tile, latent_overlap=overlap,
                                  vae_tile=vae_tile, vae_overlap=vae_overlap)
    return None if smaller == config else smaller


class NonFiniteResultError(RuntimeError):
    """The upscale computed NaN values (an fp16 overflow, NaN weights)."""


CLI_OUT_OF_MEMORY_ADVICE = "try --memory-mode fp8_storage_all or group_offload, or a smaller output size"


def gguf_out_of_memory_advice(memory_mode: str, device: torch.device) -> str:
    """The CLI's advice for a GGUF transformer, which cannot take the fp8 modes: its own ways to
    need less (group_offload only where it is not in use already and would help, on CUDA)."""
    offload = "--memory-mode group_offload, " if memory_mode != "group_offload" and device.type == "cuda" else ""
    return f"try {offload}a smaller quantisation of FLUX.1-dev (e.g. Q4_K_S), or a smaller output size"


def upscale_tensor_with_retry(
    image: torch.Tensor,
    model: VelocityModel,
    codec: LatentCodec,
    cond: Any,
    options: UpscaleOptions,
    progress: Optional[ProgressCallback] = None,
    cancel_check: Optional[CancelCheck] = None,
    on_retry: Optional[Callable[[TilingConfig, BaseException], None]] = None,
    configure_codec: Optional[Callable[[TilingConfig], None]] = None,
    out_of_memory_advice: str = CLI_OUT_OF_MEMORY_ADVICE,
) -> tuple[torch.Tensor, TilingConfig]:
    """:func:`upscale_tensor`, retried with smaller tiles after an out-of-memory error.

    Returns the image and the tiling that succeeded. ``on_retry(new_tiling, error)`` is told of
    each retry (the CLI and ComfyUI log it); ``configure_codec(tiling)`` lets the caller move its
    codec to a VAE tile size: to ``options.tiling``'s first, then to each retry's. Other errors propagate unchanged; a result with NaN
    values raises :class:`NonFiniteResultError`. When even the smallest
    tiles do not fit, the error ends with ``out_of_memory_advice`` (what to try, in the caller's
    terms: the CLI's options by default), as :class:`OutOfMemoryAtSmallestTilesError`.
    """
    current = options
    if configure_codec is not None:
        # the codec may still hold an earlier call's retry tiles: this image gets the tiles asked for
        configure_codec(options.tiling)
    while True:
        try:
            result = upscale_tensor(image, model, codec, cond, current, progress, cancel_check)
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not is_out_of_memory(exc):
                raise
            nxt = smaller_tiling(current.tiling)
            if nxt is None:
                raise OutOfMemoryAtSmallestTilesError(
                    f"out of memory even with the smallest tiles; {out_of_memory_advice}") from exc
            # The traceback's frames hold the failed try's tensors: dropped here, they are free
            # before the cache is emptied and the caller's on_retry frees more (ComfyUI unloads
            # models); emptied inside this block, the cache could not give them back.
            failed = exc.with_traceback(None)
        else:
            # A NaN survives the clamp and is written as black: say so instead of handing it on.
            if bool(torch.isnan(result).any()):
                raise NonFiniteResultError(
                    "the upscale gave NaN values, so no picture is returned: the computation overflowed "
                    "(FLUX overflows in fp16: run it in bf16 or fp32) or the model or VAE weights hold NaN")
            return result, current.tiling
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_retry is not None:
            on_retry(nxt, failed)
        else:
            log.warning("out of memory; retrying with latent tiles of %d (overlap %d)",
                        nxt.latent_tile, nxt.latent_overlap)
        del failed
        if configure_codec is not None:
            configure_codec(nxt)
        current = dataclasses.replace(current, tiling=nxt)


def upscale_colour_and_alpha(
    rgb: torch.Tensor,
    alpha: Optional[torch.Tensor],
    model: VelocityModel,
    codec: LatentCodec,
    cond: Any,
    options: UpscaleOptions,
    progress: Optional[ProgressCallback] = None,
    cancel_check: Optional[CancelCheck] = None,
    on_retry: Optional[Callable[[TilingConfig, BaseException], None]] = None,
    configure_codec: Optional[Callable[[TilingConfig], None]] = None,
    out_of_memory_advice: str = CLI_OUT_OF_MEMORY_ADVICE,
) -> tuple[torch.Tensor, Optional[torch.Tensor], TilingConfig, bool]:
    """One picture, ``rgb`` ``[1, 3, H, W]`` with ``alpha`` ``[1, 1, H, W]`` or None, upscaled as
    ``fluxsr upscale`` and the ComfyUI node both do it: the colour under fully transparent pixels
    filled from the visible ones (:func:`images.fill_transparent`, so it does not bleed into the
    edges), the colour through the model (:func:`upscale_tensor_with_retry`), the alpha resized
    apart, and a grey picture (channels equal to within :data:`images.GRAY_TOLERANCE`; what lies
    under alpha 0 does not count) back grey, the luma of the result in every channel: the model
    may tint it. Returns ``(rgb, alpha, tiling used, grey)``."""
    source = rgb if alpha is None else images.fill_transparent(rgb, alpha)
    out, used = upscale_tensor_with_retry(source, model, codec, cond, options, progress,
                                          cancel_check, on_retry, configure_codec, out_of_memory_advice)
    grey = images.is_gray(source)
    if grey:
        out = images.luma(out).clamp(0, 1).expand(-1, 3, -1, -1)
    if alpha is not None:
        alpha = images.upscale_alpha(alpha.to(out.device), tuple(out.shape[-2:]))
    return out, alpha, used, grey


@dataclass
class UpscaledImage:
    """An upscaled image ready to save: rgb ``[1, 3, H, W]``, alpha ``[1, 1, H, W]`` or None.
    ``gray_in_color``: the source was a grey picture stored as colour, so ``rgb`` is the luma of
    the model's output in all three channels."""

    rgb: torch.Tensor
    alpha: Optional[torch.Tensor]
    bit_depth: int
    grayscale: bool
    tiling: TilingConfig
    icc_profile: Optional[bytes] = None
    exif: Optional[bytes] = None
    dpi: Optional[tuple[float, float]] = None
    gray_in_color: bool = False
    xmp: Optional[bytes] = None
    text: dict[str, str] = field(default_factory=dict)


def upscale_loaded_image(
    loaded: "images.LoadedImage",
    model: VelocityModel,
    codec: LatentCodec,
    cond: Any,
    options: UpscaleOptions,
    progress: Optional[ProgressCallback] = None,
    cancel_check: Optional[CancelCheck] = None,
    on_retry: Optional[Callable[[TilingConfig, BaseException], None]] = None,
    configure_codec: Optional[Callable[[TilingConfig], None]] = None,
    out_of_memory_advice: str = CLI_OUT_OF_MEMORY_ADVICE,
) -> UpscaledImage:
    """Upscale a :class:`fluxsr_core.images.LoadedImage` (:func:`upscale_colour_and_alpha`).

    A grey picture stored as colour (scans, black-and-white photos saved as RGB) comes back grey,
    the luma of the result in every channel (``gray_in_color``), as from the ComfyUI node;
    grey-mode files are written as one luma channel by :func:`images.save_image`."""
    rgb, alpha, used, grey = upscale_colour_and_alpha(loaded.rgb, loaded.alpha, model, codec, cond, options,
                                                      progress, cancel_check, on_retry, configure_codec,
                                                      out_of_memory_advice)
    gray_in_color = grey and not loaded.grayscale
    return UpscaledImage(rgb=rgb, alpha=alpha, bit_depth=loaded.bit_depth,
                         grayscale=loaded.grayscale, tiling=used,
                         icc_profile=getattr(loaded, "icc_profile", None), exif=getattr(loaded, "exif", None),
                         dpi=getattr(loaded, "dpi", None), gray_in_color=gray_in_color,
                         xmp=getattr(loaded, "xmp", None), text=dict(getattr(loaded, "text", None) or {}))

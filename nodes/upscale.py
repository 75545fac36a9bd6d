"""FluxSRUpscale: the one-step FluxSR upscale of an IMAGE batch over ComfyUI's MODEL and VAE."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch

from ..fluxsr_core import images, upscaler
from ..fluxsr_core.settings import DEFAULT_GUIDANCE, DEFAULT_T_L, disagreements
from ..fluxsr_core.tiling import TilingConfig
from . import comfy_adapters
from .common import CATEGORY, TILING_TYPE
from .conditioning import GUIDANCE_WIDGET_SOURCE

log = logging.getLogger("fluxsr")


def resolve_t_l(widget: float, conditioning: Any, model: Any = None) -> tuple[float, str]:
    """T_L to use and where it came from, in ``fluxsr upscale``'s order: the widget when > 0,
    else the conditioning bundle's, else the LoRA's (kept on the MODEL by FluxSR Load LoRA),
    else ours. A bundle without run settings carries our default; it is then not credited.
    """
    if widget and widget > 0:
        return float(widget), "FluxSRUpscale widget"
    lora = comfy_adapters.model_settings(model)
    for settings, where in ((comfy_adapters.conditioning_settings(conditioning), "conditioning"), (lora, "model")):
        if settings is not None and settings.given("t_l"):
            return float(settings.t_l), f"{where}: {settings.source_of('t_l')}"
    if lora is not None:  # the LoRA came through FluxSR Load LoRA, and its file has no T_L either
        return DEFAULT_T_L, ("default: neither the conditioning nor the LoRA carries a T_L; set the t_l widget "
                             "to the value the LoRA was trained with")
    return DEFAULT_T_L, ("default: neither the conditioning nor the MODEL carries a T_L; load the LoRA with "
                         "FluxSR Load LoRA, or set the t_l widget to the value the LoRA was trained with")


GUIDANCE_IN_THE_GRAPH = "conditioning: its guidance value (FluxGuidance or a text encoder's widget)"


def resolve_guidance(conditioning: Any, model: Any = None) -> tuple[float, str]:
    """Guidance to use and where it came from, in ``fluxsr upscale``'s order: the conditioning's
    when a file or a widget set it (FluxSR Conditioning), or a FluxGuidance / CLIPTextEncodeFlux
    value on a text conditioning; else the LoRA's (kept on the MODEL by FluxSR Load LoRA); else ours.
    """
    settings = comfy_adapters.conditioning_settings(conditioning)
    source = settings.source_of("guidance") if settings is not None else "default"
    written = float(settings.guidance) if source != "default" else None  # FluxSR Conditioning writes only these
    carried = comfy_adapters.conditioning_guidance(conditioning)
    # a value other than one FluxSR Conditioning wrote was put there in the graph (FluxGuidance,
    # CLIPTextEncodeFlux): chosen
    if carried is not None and (written is None or abs(carried - written) > 1e-9):
        return carried, GUIDANCE_IN_THE_GRAPH
    if written is not None:
        return written, f"conditioning: {source}"
    lora = comfy_adapters.model_settings(model)
    if lora is not None and lora.given("guidance"):
        return float(lora.guidance), f"model: {lora.source_of('guidance')}"
    return DEFAULT_GUIDANCE, "default"


def warn_about_the_inputs(model: Any, conditioning: Any, widget_t_l: float, guidance_source: Optional[str] = None
                          ) -> None:
    """Log what is likely a mistake but may be meant: a MODEL without any LoRA (FluxSR is FLUX.1-dev
    *plus* its LoRA; a merged checkpoint is fine), and a bundle and a LoRA that disagree on T_L
    (unless the t_l widget chose) or guidance (unless a widget or FluxGuidance chose: then
    ``guidance_source``, from :func:`resolve_guidance`, is not the bundle's file)."""
    if comfy_adapters.model_patches(model)[0] == 0:
        log.warning("FluxSR upscale: the MODEL carries no LoRA. FluxSR is FLUX.1-dev plus the FluxSR LoRA "
                    "(FluxSR Load LoRA); plain FLUX.1-dev in one step gives no upscale worth having. Ignore "
                    "this if the LoRA is merged into the model file.")
    if comfy_adapters.has_no_guidance_embedding(model):
        log.warning("FluxSR upscale: %s", comfy_adapters.NO_GUIDANCE_EMBEDDING_NOTE)
    settings = comfy_adapters.conditioning_settings(conditioning)
    fields = [] if widget_t_l and widget_t_l > 0 else ["t_l"]
    file_guidance = settings.source_of("guidance") if settings is not None else "default"
    if file_guidance not in ("default", GUIDANCE_WIDGET_SOURCE) and guidance_source in (
            None, f"conditioning: {file_guidance}"):
        fields.append("guidance")
    for difference in disagreements(settings, comfy_adapters.model_settings(model), tuple(fields)):
        widget = "FluxSR Upscale's t_l" if difference.startswith("T_L") else "FluxSR Conditioning's guidance"
        log.warning("FluxSR upscale: the conditioning and the MODEL's LoRA disagree: %s; the conditioning's is "
                    "used, as fluxsr upscale does. Set %s widget to choose.", difference, widget)


# What to try when even the smallest tiles do not fit, in ComfyUI's terms.
OUT_OF_MEMORY_ADVICE = ("load FLUX.1-dev with UNETLoader's weight_dtype fp8_e4m3fn, start ComfyUI with --lowvram, "
                        "or lower the scale")


def upscale_images(
    image: torch.Tensor,
    velocity: Any,
    codec: Any,
    cond: Any,
    options: upscaler.UpscaleOptions,
    progress_for: Optional[Callable[[int], Callable]] = None,
    cancel_check: Optional[Callable[[], None]] = None,
    on_retry: Optional[Callable[[TilingConfig, BaseException], None]] = None,
    configure_codec: Optional[Callable[[TilingConfig], None]] = None,
    output_device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Upscale a ComfyUI IMAGE ``[B, H, W, C]`` (C = 1, 3 or 4) with the core upscaler.

    Colour goes through the model one image at a time (memory stays that of one image; a
    smaller tiling found by an out-of-memory retry is kept for the rest of the batch); an alpha
    channel is upscaled apart and reattached; a single channel, or three that agree to within 2 levels
    (a grey picture: ComfyUI loads every picture as RGB), is run as grey RGB and comes back grey (the
    luma of the result, as ``fluxsr upscale`` writes a grey-mode file). Returns
    ``[B, H2, W2, C]`` float32 on ``output_device``.
    """
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE [B, H, W, C] with 1, 3 or 4 channels, got {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("the image batch is empty")
    with torch.no_grad():  # ComfyUI runs nodes under inference mode; elsewhere keep no graph either
        return _upscale_images(image, velocity, codec, cond, options, progress_for, cancel_check, on_retry,
                               configure_codec, output_device)


def _upscale_images(image, velocity, codec, cond, options, progress_for, cancel_check, on_retry,
                    configure_codec, output_device) -> torch.Tensor:
    channels = image.shape[-1]
    outputs = []
    current = options
    for index in range(image.shape[0]):
        item = images.bhwc_to_bchw(image[index:index + 1].float())
        rgb = item[:, :3] if channels >= 3 else item.expand(-1, 3, -1, -1)
        progress = progress_for(index) if progress_for is not None else None
        result, alpha, used, _ = upscaler.upscale_colour_and_alpha(
            rgb, item[:, 3:4] if channels == 4 else None, velocity, codec, cond, current, progress=progress,
            cancel_check=cancel_check, on_retry=on_retry, configure_codec=configure_codec,
            out_of_memory_advice=OUT_OF_MEMORY_ADVICE)
        if used != current.tiling:
            current = dataclasses.replace(current, tiling=used)
        result = result.float()
        if channels == 1:  # grey in, one channel out (the luma, in every channel of result)
            result = result[:, :1]
        if alpha is not None:
            result = torch.cat([result, alpha.to(result.dtype)], dim=1)
        outputs.append(images.bchw_to_bhwc(result).to(output_device or torch.device("cpu")))
    return torch.cat(outputs, dim=0)


class FluxSRUpscale:
    """One-step FluxSR super-resolution: FLUX.1-dev + FluxSR LoRA, one transformer pass per tile."""

    DESCRIPTION = (
        "Upscales images with FluxSR: the image is resized to the target size, encoded with the "
        "FLUX VAE, moved to the clean image by one transformer step of FLUX.1-dev with the FluxSR "
        "LoRA (z_H = z_L - T_L * v), decoded and colour-corrected. Connect UNETLoader (FLUX.1-dev) "
        "-> FluxSR Load LoRA to model, VAELoader (ae.safetensors) to vae and "
        "FluxSR Conditioning to conditioning. Large images run in tiles; RGBA keeps its alpha.")
    CATEGORY = CATEGORY
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The upscaled images (alpha kept when the input has it).",)

    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is part of the saved-workflow format: append new inputs at the end only.
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The images to upscale (a batch). RGBA keeps its alpha; Load Image "
                                               "gives the alpha apart as MASK: join them with Join Image with Alpha."}),
                "model": ("MODEL", {"tooltip": "FLUX.1-dev with the FluxSR LoRA applied (UNETLoader -> "
                                               "FluxSR Load LoRA, which also carries the LoRA's T_L and guidance)."}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors via VAELoader)."}),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "FluxSR Conditioning (carries T_L and guidance); a FLUX CLIPTextEncode "
                               "conditioning also works (T_L then from the LoRA, else 0.25; guidance its own, "
                               "from FluxGuidance, else the LoRA's, else 3.5)."}),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 16.0, "step": 0.05,
                                    "tooltip": "Upscale factor; any value, FluxSR was trained for 4x."}),
                "t_l": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                  "tooltip": "T_L, the time the LR latent is placed at. 0 = the "
                                             "conditioning bundle's value, else the LoRA's (via "
                                             "FluxSR Load LoRA), else 0.25."}),
                "color_fix": (list(upscaler.COLOR_FIXES), {
                    "default": "wavelet",
                    "tooltip": "Colour correction against the input: wavelet (keeps the low "
                               "frequencies of the input, default), adain (matches mean and "
                               "spread per channel) or none."}),
            },
            "optional": {
                "tiling": (TILING_TYPE, {"tooltip": "Tile sizes from FluxSR Tiling Options; without "
                                                    "it the fixed defaults are used."}),
            },
        }

    def upscale(self, image, model, vae, conditioning, scale=4.0, t_l=0.0, color_fix="wavelet", tiling=None):
        tiling_config = tiling if tiling is not None else TilingConfig()
        t_l_used, t_l_source = resolve_t_l(t_l, conditioning, model)
        guidance, guidance_source = resolve_guidance(conditioning, model)
        if not guidance_source.startswith("conditioning"):  # the conditioning chose none: fill it in
            conditioning = comfy_adapters.with_guidance(conditioning, guidance)
        options = upscaler.UpscaleOptions(scale=float(scale), t_l=t_l_used, color_fix=str(color_fix),
                                          tiling=tiling_config).validate()
        velocity = comfy_adapters.make_velocity(model)
        codec = comfy_adapters.make_codec(vae, tiling_config)
        warn_about_the_inputs(model, conditioning, t_l, guidance_source)
        log.info("FluxSR upscale: %d image(s) x%g, T_L=%g (%s), guidance %g (%s), colour fix %s, tiles %dpx/%dpx "
                 "overlap", image.shape[0], scale, t_l_used, t_l_source, guidance, guidance_source, color_fix,
                 tiling_config.latent_tile * 8, tiling_config.latent_overlap * 8)
        latent_format = getattr(getattr(model, "model", None), "latent_format", None)
        progress = comfy_adapters.ComfyProgress(image.shape[0], latent_format, getattr(model, "load_device", None))

        def on_retry(new_tiling: TilingConfig, exc: BaseException) -> None:
            log.warning("FluxSR: out of memory (%s); retrying with %dpx tiles (overlap %dpx, VAE tile %dpx)",
                        type(exc).__name__, new_tiling.latent_tile * 8, new_tiling.latent_overlap * 8,
                        new_tiling.vae_tile)
            comfy_adapters.free_memory()

        def configure_codec(new_tiling: TilingConfig) -> None:
            if hasattr(codec, "set_tiling"):
                codec.set_tiling(new_tiling.vae_tile, new_tiling.vae_overlap)

        try:
            out = upscale_images(image, velocity, codec, conditioning, options,
                                 progress_for=progress.for_item, cancel_check=comfy_adapters.cancel_check,
                                 on_retry=on_retry, configure_codec=configure_codec,
                                 output_device=comfy_adapters.intermediate_device())
        except images.OutputTooLargeError as exc:  # the node has no limit to raise: say what to do here
            # the scale widget starts at 1: below that, the advice is to shrink the input first
            lower = (f"lower the scale to at most {exc.max_scale:g}" if exc.max_scale >= 1 else
                     "even scale 1 is over it: shrink the image first (Upscale Image By, below 1)")
            raise images.OutputTooLargeError(
                f"FluxSR Upscale: the output would be {exc.width}x{exc.height} px, over the node's limit of "
                f"{options.max_output_pixels / 1e6:.1f} megapixels (8192x8192); {lower} for this "
                f"{exc.input_width}x{exc.input_height} image") from None
        return (out,)

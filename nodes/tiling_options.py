"""FluxSRTilingOptions: tile sizes and blending for FluxSR Upscale."""

from __future__ import annotations

from ..fluxsr_core import tiling
from ..fluxsr_core.latents import VAE_DOWNSCALE
from .comfy_adapters import check_vae_tiling
from .common import CATEGORY, TILING_TYPE, range_problem

_DEFAULT = tiling.TilingConfig()
BLENDS = ("gaussian", "linear", "constant")


def tiling_from_widgets(tile_size: int, tile_overlap: int, vae_tile_size: int, vae_tile_overlap: int,
                        blend: str, global_position_ids: bool = False, tile_batch_size: int = 1,
                        fit_tiles: bool = False) -> tiling.TilingConfig:
    """A validated TilingConfig from the node's pixel-unit widgets (latent sizes are pixels / 8)."""
    for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
        if value % (VAE_DOWNSCALE * 2):
            raise ValueError(f"{name} must be a multiple of 16 pixels (got {value})")
    config = tiling.TilingConfig(
        latent_tile=int(tile_size) // VAE_DOWNSCALE,
        latent_overlap=int(tile_overlap) // VAE_DOWNSCALE,
        vae_tile=int(vae_tile_size),
        vae_overlap=int(vae_tile_overlap),
        blend=str(blend),
        global_position_ids=bool(global_position_ids),
        tile_batch_size=int(tile_batch_size),
        fit_tiles=bool(fit_tiles),
    )
    tiling.validate_tiling(config)
    check_vae_tiling(config.vae_tile, config.vae_overlap)
    return config


class FluxSRTilingOptions:
    """Latent and VAE tile sizes for FluxSR Upscale on large images."""

    DESCRIPTION = (
        "Tile sizes for FluxSR Upscale. The transformer runs on overlapping latent tiles whose "
        "results are blended; the VAE encodes and decodes in tiles of its own. Without this node "
        "FluxSR Upscale uses the defaults shown here (1024 px tiles, 256 px overlap), which give "
        "the same pixels on every machine. Smaller tiles use less memory.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (TILING_TYPE,)
    RETURN_NAMES = ("tiling",)
    OUTPUT_TOOLTIPS = ("Tiling options for FluxSR Upscale's optional tiling input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tile_size": ("INT", {
                    "default": _DEFAULT.latent_tile * VAE_DOWNSCALE, "min": 256, "max": 4096, "step": 16,
                    "tooltip": "Transformer tile size in output pixels (multiple of 16). 1024 is "
                               "FLUX.1-dev's home resolution; lower it if you run out of memory."}),
                "tile_overlap": ("INT", {
                    "default": _DEFAULT.latent_overlap * VAE_DOWNSCALE, "min": 0, "max": 2048, "step": 16,
                    "tooltip": "Overlap between neighbouring transformer tiles in pixels (multiple "
                               "of 16); must be smaller than the tile. More overlap hides seams."}),
                "vae_tile_size": ("INT", {
                    "default": _DEFAULT.vae_tile, "min": 0, "max": 8192, "step": 64,
                    "tooltip": "VAE tile size in pixels; 0 encodes and decodes the whole image at "
                               "once (ComfyUI still falls back to tiles on out-of-memory). The tiles "
                               "share the whole image's normalisation and are cut with halos as wide "
                               "as the convolutions reach, so any size gives the untiled picture, "
                               "without seams or tone shifts between tiles."}),
                "vae_tile_overlap": ("INT", {
                    "default": _DEFAULT.vae_overlap, "min": 0, "max": 1024, "step": 32,
                    "tooltip": "Overlap between VAE tiles in pixels, for ComfyUI's own tiled VAE "
                               "only (the fallback for a VAE of another layout; FluxSR's VAE tiles "
                               "need none); less than half the VAE tile (that fallback also runs "
                               "half-size tiles), a quarter is usual."}),
                "blend": (list(BLENDS), {
                    "default": _DEFAULT.blend,
                    "tooltip": "How overlapping tiles are weighted: gaussian (smooth, default), "
                               "linear (ramps over the overlap) or constant (plain average)."}),
                "global_position_ids": ("BOOLEAN", {
                    "default": _DEFAULT.global_position_ids,
                    "tooltip": "Give each tile its position in the whole image (rope offsets). Off "
                               "(default): every tile sees the local positions FluxSR was trained "
                               "with, and older ComfyUI versions give the same pixels."}),
                "tile_batch_size": ("INT", {
                    "default": _DEFAULT.tile_batch_size, "min": 1, "max": 64, "step": 1,
                    "tooltip": "How many tiles go through the transformer at once; more is faster "
                               "on large GPUs and needs more memory. With global_position_ids on, "
                               "tiles run one at a time (each has its own positions)."}),
                # appended last: saved workflows keep widget values by position
                "fit_tiles": ("BOOLEAN", {
                    "default": _DEFAULT.fit_tiles,
                    "tooltip": "Shrink the tiles to the shortest that cover the image with as many "
                               "tiles and at least the overlap: a 2048 px output then runs 864 px "
                               "tiles instead of 1024 px ones whose last two share 75% (29% fewer "
                               "tokens, same seams). Off: tiles of exactly tile_size."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap):
        # At queue time, not after minutes of model loading upstream: the rules between two
        # widgets (overlap below the tile, below half the VAE tile). ComfyUI skips its own min/max
        # checks for the inputs named here, so range_problem makes them from INPUT_TYPES.
        values = {"tile_size": tile_size, "tile_overlap": tile_overlap, "vae_tile_size": vae_tile_size,
                  "vae_tile_overlap": vae_tile_overlap}
        problem = range_problem(cls, values)
        if problem is not None:
            return problem
        if any(v is None for v in values.values()):  # a linked widget: checked when the node runs
            return True
        try:
            tiling_from_widgets(tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, _DEFAULT.blend)
        except ValueError as exc:
            return str(exc)
        return True

    def build(self, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, blend,
              global_position_ids=False, tile_batch_size=1, fit_tiles=False):
        return (tiling_from_widgets(tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, blend,
                                    global_position_ids, tile_batch_size, fit_tiles),)

"""Constants shared by the FluxSR nodes."""

CATEGORY = "image/upscaling/FluxSR"
TILING_TYPE = "FLUXSR_TILING"

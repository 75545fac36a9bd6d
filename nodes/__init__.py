"""The FluxSR ComfyUI nodes (classic node API). Loaded through the pack's root ``__init__.py``."""

from .conditioning import FluxSRConditioning
from .lora_loader import FluxSRLoraLoader
from .teacher import FluxSRTeacherSampler
from .tiling_options import FluxSRTilingOptions
from .upscale import FluxSRUpscale

NODE_CLASS_MAPPINGS = {
    "FluxSRConditioning": FluxSRConditioning,
    "FluxSRTilingOptions": FluxSRTilingOptions,
    "FluxSRUpscale": FluxSRUpscale,
    "FluxSRTeacherSampler": FluxSRTeacherSampler,
    "FluxSRLoraLoader": FluxSRLoraLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxSRConditioning": "FluxSR Conditioning",
    "FluxSRTilingOptions": "FluxSR Tiling Options",
    "FluxSRUpscale": "FluxSR Upscale",
    "FluxSRTeacherSampler": "FluxSR Teacher Sampler",
    "FluxSRLoraLoader": "FluxSR Load LoRA",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

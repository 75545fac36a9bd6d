"""FluxSRConditioning: a FluxSR conditioning bundle from ``models/fluxsr`` as a FLUX CONDITIONING."""

from __future__ import annotations

import dataclasses
import logging

from ..fluxsr_core import bundle as bundle_mod
from . import comfy_adapters, paths
from .common import CATEGORY

log = logging.getLogger("fluxsr")

# Where a guidance set on the node's widget is said to come from (in the run settings' source).
GUIDANCE_WIDGET_SOURCE = "FluxSRConditioning node"


class FluxSRConditioning:
    """Loads a FluxSR bundle (fixed T5 + CLIP embeddings and run settings) as CONDITIONING."""

    DESCRIPTION = (
        "Loads a FluxSR conditioning bundle from models/fluxsr: FluxSR runs FLUX.1-dev with one "
        "fixed text conditioning, so no text encoder is needed at run time. Outputs a native FLUX "
        "CONDITIONING with the guidance and the bundle's run settings (T_L) attached, which "
        "FluxSR Upscale reads. Bundles are our .safetensors files or folders holding "
        "t5_embedding.pth + clip_embedding.pth.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("FLUX conditioning (T5 tokens, CLIP pooled, guidance) with FluxSR's run settings.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "bundle": (paths.list_bundles(), {
                    "tooltip": "The conditioning bundle, from models/fluxsr: a FluxSR .safetensors "
                               "bundle or a folder with t5_embedding.pth and clip_embedding.pth. "
                               "Use the bundle that came with your FluxSR LoRA."}),
                "guidance": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                    "tooltip": "FLUX distilled guidance. 0 = the bundle's own value; when the bundle "
                               "has none, the LoRA's (via FluxSR Load LoRA), else 3.5."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, bundle, guidance=0.0):
        # Re-run when the bundle's files change on disk, not only when the name changes.
        return f"{paths.bundle_signature(bundle)}|{guidance}"

    @classmethod
    def VALIDATE_INPUTS(cls, bundle):
        # Only bundle: ComfyUI skips its own min/max checks for every input named here.
        return paths.validation_answer(paths.resolve_bundle, bundle)

    def load(self, bundle, guidance=0.0):
        path = paths.resolve_bundle(bundle)
        loaded = bundle_mod.load_bundle(path)
        for line in getattr(loaded, "report", None) or ():
            log.info("FluxSR bundle %s: %s", bundle, line)
        settings = loaded.settings
        if guidance and guidance > 0:
            source = dict(settings.source or {})
            source["guidance"] = GUIDANCE_WIDGET_SOURCE
            settings = dataclasses.replace(settings, guidance=float(guidance), source=source)
        log.info("FluxSR conditioning %s: %s", bundle, settings.describe())
        return (comfy_adapters.make_conditioning(loaded.t5, loaded.clip_pooled, settings),)

"""FluxSRLoraLoader: the FluxSR LoRA applied to a MODEL, its run settings (T_L, guidance) kept with it."""

from __future__ import annotations

import logging
import os

from ..fluxsr_core import lora as lora_mod
from ..fluxsr_core.settings import RunSettings, merge_settings
from ..fluxsr_core.weights import UnsafeWeightsError
from . import comfy_adapters, paths
from .common import CATEGORY

log = logging.getLogger("fluxsr")


class FluxSRLoraLoader:
    """LoraLoaderModelOnly that also keeps the LoRA's FluxSR run settings (T_L, guidance) on the MODEL."""

    DESCRIPTION = (
        "Applies a FluxSR LoRA from models/loras to FLUX.1-dev, as LoraLoaderModelOnly does, and "
        "keeps the run settings written in the LoRA file (T_L, the time the LR latent is placed "
        "at, and guidance) with the MODEL, so FluxSR Upscale runs the LoRA as it was trained. "
        "ComfyUI's own LoRA loaders drop that metadata. Works on any FLUX MODEL loader "
        "(UNETLoader, fp8, GGUF).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("FLUX.1-dev with the FluxSR LoRA patched in, carrying the LoRA's T_L and guidance.",)

    def __init__(self):
        self._cached = None  # (path, signature, state dict): re-queueing does not re-read the file

    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is part of the saved-workflow format: append new inputs at the end only.
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "FLUX.1-dev (UNETLoader, or a GGUF / fp8 loader)."}),
                "lora_name": (paths.list_loras(), {
                    "tooltip": "The FluxSR LoRA, from models/loras. Its metadata's T_L and guidance are used "
                               "by FluxSR Upscale where the conditioning bundle and the widgets set none."}),
                "strength_model": ("FLOAT", {
                    "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                    "tooltip": "LoRA strength; FluxSR is trained for 1.0."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, strength_model=1.0, **_):
        # Re-run when the file changes on disk, not only when the name changes.
        return f"{paths.lora_signature(lora_name)}|{strength_model}"

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        # Only lora_name: ComfyUI skips its own min/max checks for every input named here.
        return paths.validation_answer(paths.resolve_lora, lora_name)

    def load(self, model, lora_name, strength_model=1.0):
        if strength_model == 0:  # as LoraLoaderModelOnly: the MODEL as it came, without the LoRA's T_L either
            log.info("FluxSR Load LoRA: strength 0, %s is not applied", lora_name)
            return (model,)
        path = paths.resolve_lora(lora_name)
        settings = None
        if path.lower().endswith((".safetensors", ".sft")):  # ComfyUI reads .sft as safetensors too
            # The header alone: a truncated or mislabelled file is named here, before ComfyUI reads it.
            try:
                settings = lora_mod.read_lora_settings(path, label=f"LoRA {lora_name}")
            except UnsafeWeightsError:
                raise UnsafeWeightsError(
                    f"FluxSR Load LoRA: {lora_name} is a pickle file named .safetensors. If you trust its "
                    "source, rename it to .pt (ComfyUI reads .pt LoRAs with torch.load(weights_only=True)); "
                    "better, get the .safetensors release") from None
        state_dict = self._state_dict(path)
        if settings is not None:
            # ComfyUI's loader reads alphas from '.alpha' tensors only; a diffusers/peft save keeps
            # its alpha in the metadata, which fluxsr upscale applies: hand it over as tensors.
            alphas, said = lora_mod.alpha_tensors_from_metadata(path, state_dict)
            if alphas:
                state_dict = {**state_dict, **alphas}  # a new dict: the cached one stays the file's
                log.info("FluxSR Load LoRA: %s: %s, given to ComfyUI's loader as '.alpha' tensors (it reads "
                         "no metadata)", lora_name, said)
        patched = comfy_adapters.apply_lora(model, state_dict, strength_model, lora_name)
        earlier = comfy_adapters.model_settings(model)
        carried = settings is not None and settings.given("t_l")
        earlier_carried = earlier is not None and earlier.given("t_l")
        if carried and earlier_carried:
            log.warning("FluxSR Load LoRA: the MODEL already carries a FluxSR LoRA's T_L %g (%s); %s's T_L %g "
                        "replaces it. Two FluxSR LoRAs on one MODEL is rarely meant.", earlier.t_l,
                        earlier.source["t_l"], lora_name, settings.t_l)
        if not carried:
            why = ("is not a .safetensors file, so it carries no FluxSR run settings" if settings is None
                   else "carries no FluxSR T_L (is it a FluxSR LoRA?)")
            if earlier_carried:
                log.info("FluxSR Load LoRA: %s %s; the MODEL keeps T_L %g (%s)", lora_name, why, earlier.t_l,
                         earlier.source["t_l"])
            else:
                log.warning("FluxSR Load LoRA: %s %s; FluxSR Upscale takes T_L from the bundle, its t_l widget "
                            "or its default 0.25", lora_name, why)
        # Per field, this LoRA's values over those of a FluxSR LoRA loaded earlier in the chain: a
        # style LoRA without settings after the FluxSR LoRA must not erase its T_L.
        settings = merge_settings(settings or RunSettings(), earlier)
        comfy_adapters.attach_model_settings(patched, settings)
        log.info("FluxSR Load LoRA %s at strength %g: %s", lora_name, strength_model, settings.describe())
        return (patched,)

    def _state_dict(self, path: str) -> dict:
        import comfy.utils  # noqa: PLC0415 - ComfyUI's module

        signature = paths.file_signature(path)
        if self._cached is None or self._cached[:2] != (path, signature):
            try:
                state_dict = comfy.utils.load_torch_file(path, safe_load=True)
            except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many kinds, none naming the file
                raise ValueError(f"FluxSR Load LoRA: {os.path.basename(path)} could not be read ({type(exc).__name__}: "
                                 f"{exc}); the file is damaged or not a LoRA: download it again") from exc
            self._cached = (path, signature, state_dict)
        return self._cached[2]

"""Constants and small helpers shared by the FluxSR nodes."""

from __future__ import annotations

from typing import Any, Mapping, Optional

CATEGORY = "image/upscaling/FluxSR"
TILING_TYPE = "FLUXSR_TILING"


def range_problem(node_class, values: Mapping[str, Any]) -> Optional[str]:
    """ComfyUI's own min/max check of ``values`` (input name: value), from the node's INPUT_TYPES:
    the first value out of its range, said as ComfyUI says it, or None. For the inputs a
    VALIDATE_INPUTS names, which ComfyUI then leaves unchecked."""
    spec = node_class.INPUT_TYPES()
    options = {name: entry[1] if len(entry) > 1 else {}
               for section in ("required", "optional") for name, entry in spec.get(section, {}).items()}
    for name, value in values.items():
        limits = options.get(name, {})
        if not isinstance(value, (int, float)):  # linked (None), or a value ComfyUI could not convert (it says so)
            continue
        if "min" in limits and value < limits["min"]:
            return f"{name}: value {value} smaller than min of {limits['min']}"
        if "max" in limits and value > limits["max"]:
            return f"{name}: value {value} bigger than max of {limits['max']}"
    return None

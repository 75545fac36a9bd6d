"""Run settings (T_L, guidance, scale) and the safetensors metadata keys that carry them.

Every LoRA and conditioning bundle FluxSR writes carries these keys (strings), so a file
always says how it must be run. Values missing from a file fall back to our defaults; the
paper publishes none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Mapping, Optional

from .flow import check_t_l

FORMAT_VERSION = "1"
DEFAULT_T_L = 0.25      # ours (and the one public re-implementation's)
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's and ComfyUI's usual value
DEFAULT_SCALE = 4.0
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"

KEY_FORMAT = "fluxsr.format"
KEY_T_L = "fluxsr.t_l"
KEY_GUIDANCE = "fluxsr.guidance"
KEY_SCALE = "fluxsr.scale"
KEY_BASE_MODEL = "fluxsr.base_model"
KEY_LORA_RANK = "fluxsr.lora_rank"


@dataclass
class RunSettings:
    """How a FluxSR student is run. ``source`` maps each field to where its value came from."""

    t_l: float = DEFAULT_T_L
    guidance: float = DEFAULT_GUIDANCE
    scale: float = DEFAULT_SCALE
    base_model: str = DEFAULT_BASE_MODEL
    lora_rank: Optional[int] = None
    source: dict | None = None

    def __post_init__(self):
        check_t_l(self.t_l)
        if self.source is None:
            self.source = {k: "default" for k in ("t_l", "guidance", "scale")}

    def to_metadata(self) -> dict[str, str]:
        """The ``fluxsr.*`` safetensors metadata for these settings."""
        md = {
            KEY_FORMAT: FORMAT_VERSION,
            KEY_T_L: repr(float(self.t_l)),
            KEY_GUIDANCE: repr(float(self.guidance)),
            KEY_SCALE: repr(float(self.scale)),
            KEY_BASE_MODEL: str(self.base_model),
        }
        if self.lora_rank is not None:
            md[KEY_LORA_RANK] = str(int(self.lora_rank))
        return md

    def source_of(self, name: str) -> str:
        """Where field ``name``'s value came from (a file's label, a widget, the command line), or
        ``"default"`` when nothing gave it."""
        return (self.source or {}).get(name, "default")

    def given(self, name: str) -> bool:
        """Whether a file, a widget or a flag gave field ``name`` (it is not our default)."""
        return self.source_of(name) != "default"

    def describe(self) -> str:
        """One line naming each value and where it came from (printed by the CLI)."""
        src = self.source or {}
        return (f"T_L={self.t_l:g} ({src.get('t_l', 'default')}), "
                f"guidance={self.guidance:g} ({src.get('guidance', 'default')}), "
                f"scale={self.scale:g} ({src.get('scale', 'default')})")

    def as_dict(self) -> dict:
        return asdict(self)


def _float(md: Mapping[str, str], key: str, what: str) -> Optional[float]:
    if key not in md:
        return None
    try:
        return float(md[key])
    except (TypeError, ValueError):
        raise ValueError(f"metadata {key}={md[key]!r} in {what} is not a number") from None


def settings_from_metadata(*sources: tuple[Optional[Mapping[str, str]], str],
                           base: Optional[RunSettings] = None) -> RunSettings:
    """Merge run settings from metadata sources, earliest source winning per key.

    ``sources`` are ``(metadata, label)`` pairs, e.g. ``(bundle_md, "bundle x.safetensors")``.
    Keys missing everywhere keep ``base``'s values (defaults when ``base`` is None).
    """
    out = RunSettings() if base is None else RunSettings(**{k: v for k, v in base.as_dict().items()})
    out.source = dict(out.source or {})
    seen = set()
    for md, label in sources:
        if not md:
            continue
        for field_name, key in (("t_l", KEY_T_L), ("guidance", KEY_GUIDANCE), ("scale", KEY_SCALE)):
            if field_name in seen:
                continue
            value = _float(md, key, label)
            if value is not None:
                setattr(out, field_name, value)
                out.source[field_name] = label
                seen.add(field_name)
        if KEY_BASE_MODEL in md and "base_model" not in seen:
            out.base_model = md[KEY_BASE_MODEL]
            seen.add("base_model")
        if KEY_LORA_RANK in md and out.lora_rank is None:
            try:
                out.lora_rank = int(md[KEY_LORA_RANK])
            except ValueError:
                pass
    check_t_l(out.t_l)
    return out


def disagreements(first: Optional[RunSettings], second: Optional[RunSettings],
                  fields: tuple[str, ...] = ("t_l", "guidance", "scale")) -> list[str]:
    """The fields both settings read from a file (not defaults) with different values, each as
    ``"T_L 0.3 (bundle a.safetensors) against 0.45 (LoRA b.safetensors)"``: what a user should
    hear when :func:`merge_settings` silently prefers one file's value."""
    if first is None or second is None:
        return []
    names = {"t_l": "T_L", "guidance": "guidance", "scale": "scale"}
    out = []
    for name in fields:
        a, b = first.source_of(name), second.source_of(name)
        if a != "default" and b != "default" and abs(getattr(first, name) - getattr(second, name)) > 1e-9:
            out.append(f"{names[name]} {getattr(first, name):g} ({a}) against {getattr(second, name):g} ({b})")
    return out


def merge_settings(*candidates: Optional[RunSettings]) -> RunSettings:
    """Per field, the value of the first candidate that read it from a file (not a default).

    ``merge_settings(bundle.settings, lora_info.settings)``: the bundle wins over the LoRA, and
    fields neither file carries keep our defaults, with ``source`` saying so.
    """
    out = RunSettings()
    out.source = dict(out.source or {})
    for field_name in ("t_l", "guidance", "scale"):
        for cand in candidates:
            if cand is None:
                continue
            if cand.given(field_name):
                setattr(out, field_name, getattr(cand, field_name))
                out.source[field_name] = cand.source_of(field_name)
                break
    for cand in candidates:
        if cand is not None and cand.lora_rank is not None:
            out.lora_rank = cand.lora_rank
            break
    return out

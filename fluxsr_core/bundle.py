"""The FluxSR conditioning bundle: the fixed text conditioning a student runs with.

FluxSR runs FLUX with one fixed prompt, so its conditioning is two fixed tensors: the T5-XXL token
embeddings ``t5 [1, L, 4096]`` and the CLIP-L pooled vector ``clip_pooled [1, 768]`` (tiny test
models: 32 and 16 wide). No text encoder is needed at run time. Two on-disk forms are read:

* ours: one safetensors file with tensors ``t5`` and ``clip_pooled`` and the ``fluxsr.*`` run
  settings in its metadata (:func:`save_bundle` writes it);
* the third-party folder form: ``t5_embedding.pth`` and ``clip_embedding.pth`` (pickled tensors,
  opened only with ``torch.load(weights_only=True)``) and an optional ``training_config.json``.

:func:`encode_prompt_bundle` makes a bundle from a prompt with the T5 and CLIP encoders, computing
exactly what diffusers' ``FluxPipeline.encode_prompt`` computes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch

from .files import atomic_write
from .interfaces import Conditioning
from .settings import KEY_GUIDANCE, KEY_SCALE, KEY_T_L, RunSettings, settings_from_metadata
from .weights import WeightsError, read_safetensors, safe_torch_load_tensors

T5_KEY = "t5"
CLIP_KEY = "clip_pooled"
KEY_CONTENT = "fluxsr.content"
CONTENT_BUNDLE = "conditioning"
KEY_PROMPT = "fluxsr.prompt"

T5_FILE = "t5_embedding.pth"
CLIP_FILE = "clip_embedding.pth"
CONFIG_FILE = "training_config.json"

FLUX_T5_WIDTH = 4096   # T5-XXL d_model: FLUX.1's joint_attention_dim
FLUX_CLIP_WIDTH = 768  # CLIP-L pooled width: FLUX.1's pooled_projection_dim

# Other names the two tensors go by (diffusers' encode_prompt outputs, common export names).
_T5_ALIASES = ("t5", "prompt_embeds", "t5_embedding", "t5_embeds", "t5_emb", "text_embeds",
               "encoder_hidden_states", "embedding", "embeds")
_CLIP_ALIASES = ("clip_pooled", "pooled_prompt_embeds", "clip_embedding", "pooled", "clip",
                 "pooled_projections", "pooled_embeds", "embedding", "embeds")

# training_config.json: names other trainers use for our three settings (compared lower-case,
# '-' read as '_'). Unknown keys are reported, never fatal.
_CONFIG_ALIASES = {
    "t_l": ("t_l", "tl", "t_lr", "lr_t", "t_lq", "timestep", "lr_timestep", "sr_timestep",
            "fixed_timestep", "start_timestep", "sigma_l", "t_low"),
    "guidance": ("guidance", "guidance_scale", "distilled_guidance", "flux_guidance", "cfg",
                 "embedded_guidance"),
    "scale": ("scale", "upscale", "sr_scale", "upscale_factor", "scale_factor", "upscaling_factor",
              "sf"),
}


class BundleError(WeightsError):
    """A conditioning bundle that cannot be used (the message names the file and the problem)."""


# diffusers' FluxTransformer2DModel defaults, which a config.json without the keys gets
_DEFAULT_WIDTHS = {"joint_attention_dim": 4096, "pooled_projection_dim": 768}


def conditioning_width_problems(t5: torch.Tensor, clip_pooled: torch.Tensor, transformer_or_config: Any) -> list[str]:
    """What keeps a conditioning (``t5 [..., L, D]``, ``clip_pooled [..., D]``) from fitting a FLUX
    transformer (a diffusers model, its ``config`` or a config dict; a key it lacks has diffusers'
    default), one sentence per width; empty when it fits."""
    cfg = getattr(transformer_or_config, "config", transformer_or_config)
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    want_t5, want_clip = (get(k) or _DEFAULT_WIDTHS[k] for k in ("joint_attention_dim", "pooled_projection_dim"))
    problems = []
    if t5.shape[-1] != want_t5:
        problems.append(f"t5 is {t5.shape[-1]} wide, the transformer takes {want_t5} (joint_attention_dim)")
    if clip_pooled.shape[-1] != want_clip:
        problems.append(f"clip_pooled is {clip_pooled.shape[-1]} wide, the transformer takes {want_clip} "
                        "(pooled_projection_dim)")
    return problems


@dataclass
class ConditioningBundle:
    """Fixed FluxSR conditioning plus the run settings it came with.

    ``t5``: ``[1, L, D_t5]``; ``clip_pooled``: ``[1, D_clip]``; ``settings``: T_L, guidance and
    scale (with where each came from); ``source``: the file or folder read; ``report``: notes
    about what was read (e.g. keys of ``training_config.json`` that were not used).
    """

    t5: torch.Tensor
    clip_pooled: torch.Tensor
    settings: RunSettings
    source: str
    report: list[str] = field(default_factory=list)

    def to_conditioning(self, guidance: Optional[float] = None) -> Conditioning:
        """The :class:`~fluxsr_core.interfaces.Conditioning` for a velocity model.

        ``guidance`` overrides the bundle's own (``settings.guidance``).
        """
        g = self.settings.guidance if guidance is None else float(guidance)
        return Conditioning(t5=self.t5, clip_pooled=self.clip_pooled, guidance=g,
                            extra={"bundle": self.source})

    def check_fits(self, transformer_or_config: Any) -> None:
        """Raise :class:`BundleError` unless the widths match a FLUX transformer's config.

        Accepts a diffusers ``FluxTransformer2DModel``, its ``config`` or a config dict; compares
        ``t5`` with ``joint_attention_dim`` and ``clip_pooled`` with ``pooled_projection_dim``.
        """
        problems = conditioning_width_problems(self.t5, self.clip_pooled, transformer_or_config)
        if problems:
            raise BundleError(f"conditioning {self.source} does not fit this transformer: "
                              + "; ".join(problems) + ". Use a bundle made for this model.")


# --- file reading ----------------------------------------------------------------------------

def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The one place this module reads a safetensors file: tensors (CPU) and metadata."""
    return read_safetensors(path, what="conditioning bundle")


def _load_tensor_pickle(path: str, what: str):
    """Open a ``.pth`` with ``torch.load(weights_only=True)`` only: tensors, never code.

    :func:`fluxsr_core.weights.safe_torch_load_tensors`: torch refuses any pickle that references
    a class or function outside tensors and plain containers before anything runs, and what comes
    back must be a tensor, a flat dict of tensors or a list of tensors.
    """
    return safe_torch_load_tensors(path, what=what)


def _pick(obj, aliases: Iterable[str], path: str, what: str) -> torch.Tensor:
    """The one tensor of a ``.pth`` payload (a tensor, a dict of tensors or a list of tensors)."""
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, dict):
        if len(obj) == 1:
            return next(iter(obj.values()))
        lower = {k.lower(): k for k in obj}
        for name in aliases:
            if name in lower:
                return obj[lower[name]]
        raise BundleError(f"{path} holds several tensors {sorted(obj)} and none is named like the "
                          f"{what} ({', '.join(aliases[:3])}); save the {what} alone")
    if len(obj) == 1:
        return obj[0]
    raise BundleError(f"{path} holds a list of {len(obj)} tensors; expected the {what} alone")


# --- shapes ----------------------------------------------------------------------------------

def _check_values(t: torch.Tensor, where: str, what: str) -> None:
    if not t.is_floating_point():
        raise BundleError(f"{where}: the {what} is {t.dtype}, not a floating-point tensor")
    if not torch.isfinite(t).all():
        raise BundleError(f"{where}: the {what} contains NaN or infinite values; the file is damaged")


def _normalise_t5(t: torch.Tensor, where: str, width: Optional[int] = None) -> torch.Tensor:
    """``[L, D]`` or ``[1, L, D]`` -> ``[1, L, D]``; anything else is refused with the shape."""
    shape = list(t.shape)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] != 1 or t.shape[1] < 1:
        hint = ""
        if t.ndim == 1 or (t.ndim == 2 and t.shape[0] == 1):
            hint = " A single vector looks like the pooled CLIP embedding: are the two files swapped?"
        elif t.ndim == 3:
            hint = f" It holds {t.shape[0]} prompts; a bundle holds one."
        raise BundleError(f"{where}: T5 embeddings have shape {shape}; expected [1, L, {width or 4096}] "
                          f"(or [L, {width or 4096}]).{hint}")
    if width is not None and t.shape[-1] != width:
        raise BundleError(f"{where}: T5 embeddings have shape {shape}; expected width {width} "
                          f"([1, L, {width}])")
    _check_values(t, where, "T5 embedding")
    return t


def _normalise_clip(t: torch.Tensor, where: str, width: Optional[int] = None) -> torch.Tensor:
    """``[D]``, ``[1, D]`` or ``[1, 1, D]`` -> ``[1, D]``; token embeddings are refused."""
    shape = list(t.shape)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    elif t.ndim == 3 and t.shape[0] == 1 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.ndim != 2 or t.shape[0] != 1:
        hint = ""
        if t.ndim >= 2 and t.shape[-2] > 1:
            hint = (" It looks like per-token embeddings, not the pooled vector (FLUX takes CLIP's "
                    "pooler_output).")
        raise BundleError(f"{where}: the pooled CLIP embedding has shape {shape}; expected "
                          f"[1, {width or 768}] (or [{width or 768}]).{hint}")
    if width is not None and t.shape[-1] != width:
        raise BundleError(f"{where}: the pooled CLIP embedding has shape {shape}; expected width "
                          f"{width} ([1, {width}])")
    _check_values(t, where, "pooled CLIP embedding")
    return t


def _describe(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"


# --- training_config.json --------------------------------------------------------------------

def _flatten(obj: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, name + "."))
        else:
            out.append((name, v))
    return out


def _number(v) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def read_training_config(path: str) -> tuple[dict[str, str], list[str]]:
    """Run settings from a third-party ``training_config.json``, read tolerantly.

    Returns ``(fluxsr metadata, report)``: the ``fluxsr.t_l`` / ``fluxsr.guidance`` /
    ``fluxsr.scale`` values found (as strings, for :func:`settings_from_metadata`) and one line per
    thing worth telling: keys not used, values out of range, a file that could not be parsed.
    Nothing here is fatal: missing values fall back to the defaults, which the report says.
    """
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, [f"{name} could not be read ({exc}); its settings were not used"]
    if not isinstance(data, Mapping):
        return {}, [f"{name} holds a {type(data).__name__}, not an object; its settings were not used"]

    md: dict[str, str] = {}
    report: list[str] = []
    unknown: list[str] = []
    keys = {"t_l": KEY_T_L, "guidance": KEY_GUIDANCE, "scale": KEY_SCALE}
    # top-level keys before nested ones, so {"t_l": ..., "train": {"t_l": ...}} takes the top one
    items = sorted(_flatten(data), key=lambda kv: kv[0].count("."))
    for full, value in items:
        leaf = full.rsplit(".", 1)[-1].lower().replace("-", "_")
        target = next((f for f, names in _CONFIG_ALIASES.items() if leaf in names), None)
        if target is None:
            unknown.append(full)
            continue
        v = _number(value)
        if v is None or not math.isfinite(v):
            report.append(f"{name}: {full}={value!r} is not a number; not used")
            continue
        if target == "t_l" and not (0.0 < v < 1.0):
            hint = ""
            if 1.0 <= v <= 1000.0:
                hint = (f" (if it is on a 0-1000 timestep scale, T_L would be {v / 1000:g}: pass that "
                        "explicitly)")
            report.append(f"{name}: {full}={value!r} is not in (0, 1), so it is not used as T_L{hint}")
            continue
        if target in ("guidance", "scale") and v <= 0:
            report.append(f"{name}: {full}={value!r} must be positive; not used")
            continue
        if keys[target] in md:
            if float(md[keys[target]]) != v:
                report.append(f"{name}: {full}={value!r} disagrees with an earlier value "
                              f"{md[keys[target]]}; the earlier one was used")
            continue
        md[keys[target]] = repr(v)
        report.append(f"{name}: {full}={value!r} -> {target.replace('t_l', 'T_L')}")
    if unknown:
        report.append(f"{name}: keys not used: {', '.join(unknown)}")
    return md, report


# --- loading ---------------------------------------------------------------------------------

def load_bundle(path: str | os.PathLike, t5_width: Optional[int] = None,
                clip_width: Optional[int] = None) -> ConditioningBundle:
    """Read a conditioning bundle: our safetensors file, or the third-party folder form.

    ``path``: a ``.safetensors`` bundle; a folder holding ``t5_embedding.pth`` and
    ``clip_embedding.pth`` (and optionally ``training_config.json``); or either of those files
    (its folder is used). Shapes are normalised to ``t5 [1, L, D]`` and ``clip_pooled [1, D]``;
    widths are taken from the file, and checked when ``t5_width`` / ``clip_width`` are given
    (FLUX.1: 4096 and 768). Run settings come from the bundle's metadata or the folder's
    ``training_config.json``, else the defaults (``settings.source`` says which).

    Raises ``FileNotFoundError`` naming what is missing and :class:`BundleError` for anything
    unusable (wrong shapes, a pickle holding more than tensors, a LoRA or model given instead).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"conditioning bundle not found: {path}")
    if os.path.isdir(path):
        return _load_folder(path, t5_width, clip_width)
    lower = path.lower()
    if lower.endswith((".pth", ".pt")) or os.path.basename(lower) == CONFIG_FILE:
        return _load_folder(os.path.dirname(os.path.abspath(path)), t5_width, clip_width)
    if not lower.endswith(".safetensors"):
        raise BundleError(f"{path}: a conditioning bundle is a .safetensors file or a folder with "
                          f"{T5_FILE} and {CLIP_FILE}")
    return _load_safetensors_bundle(path, t5_width, clip_width)


def _load_safetensors_bundle(path: str, t5_width, clip_width) -> ConditioningBundle:
    tensors, md = _read_safetensors(path)
    report: list[str] = []
    t5_name = next((k for k in _T5_ALIASES if k in tensors), None)
    clip_name = next((k for k in _CLIP_ALIASES if k in tensors and k != t5_name), None)
    if t5_name is None or clip_name is None:
        keys = sorted(tensors)
        if not keys:
            raise BundleError(f"{path} holds no tensors; a conditioning bundle holds '{T5_KEY}' and "
                              f"'{CLIP_KEY}'")
        looks = ""
        if any("lora" in k.lower() for k in keys):
            looks = " It looks like a LoRA: give it as the LoRA, and the bundle as the conditioning."
        elif len(keys) > 20:
            looks = " It looks like a model checkpoint, not a conditioning bundle."
        missing = [n for n, k in ((T5_KEY, t5_name), (CLIP_KEY, clip_name)) if k is None]
        raise BundleError(f"{path} has no {' or '.join(repr(m) for m in missing)} tensor (it holds "
                          f"{', '.join(keys[:6])}{'...' if len(keys) > 6 else ''}).{looks}")
    if (t5_name, clip_name) != (T5_KEY, CLIP_KEY):
        report.append(f"read tensors '{t5_name}' and '{clip_name}' as t5 and clip_pooled")
    where = os.path.basename(path)
    t5 = _normalise_t5(tensors[t5_name], f"{path} ({t5_name})", t5_width)
    clip = _normalise_clip(tensors[clip_name], f"{path} ({clip_name})", clip_width)
    settings = settings_from_metadata((md, f"bundle {path}"))
    report.insert(0, f"{where}: t5 {_describe(t5)}, clip_pooled {_describe(clip)}")
    if KEY_PROMPT in md:
        report.append(f"prompt: {md[KEY_PROMPT]}")
    if not any(k in md for k in (KEY_T_L, KEY_GUIDANCE, KEY_SCALE)):
        report.append(f"{where} carries no run settings; defaults used ({settings.describe()})")
    return ConditioningBundle(t5=t5, clip_pooled=clip, settings=settings, source=path, report=report)


def _load_folder(folder: str, t5_width, clip_width) -> ConditioningBundle:
    t5_path, clip_path = os.path.join(folder, T5_FILE), os.path.join(folder, CLIP_FILE)
    missing = [p for p in (t5_path, clip_path) if not os.path.isfile(p)]
    if missing:
        others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        hint = f" (it has {', '.join(others)}: give a .safetensors bundle file itself)" if others else ""
        raise FileNotFoundError(
            f"conditioning folder {folder} lacks {' and '.join(os.path.basename(p) for p in missing)}"
            f"{hint}; the folder form needs {T5_FILE} and {CLIP_FILE}")
    t5 = _normalise_t5(_pick(_load_tensor_pickle(t5_path, "T5 embedding file"), _T5_ALIASES, t5_path,
                             "T5 embedding"), t5_path, t5_width)
    clip = _normalise_clip(_pick(_load_tensor_pickle(clip_path, "CLIP embedding file"), _CLIP_ALIASES,
                                 clip_path, "pooled CLIP embedding"), clip_path, clip_width)
    report = [f"{T5_FILE}: {_describe(t5)}, {CLIP_FILE}: {_describe(clip)}"]
    config_path = os.path.join(folder, CONFIG_FILE)
    md: dict[str, str] = {}
    if os.path.isfile(config_path):
        md, lines = read_training_config(config_path)
        report.extend(lines)
    else:
        report.append(f"no {CONFIG_FILE} in {folder}")
    settings = settings_from_metadata((md, f"{CONFIG_FILE} in {folder}"))
    if not md:
        report.append(f"no run settings found; defaults used ({settings.describe()})")
    return ConditioningBundle(t5=t5, clip_pooled=clip, settings=settings, source=folder, report=report)


# --- saving ----------------------------------------------------------------------------------

def save_bundle(path: str | os.PathLike, t5: torch.Tensor, clip_pooled: torch.Tensor,
                settings: RunSettings, prompt: Optional[str] = None) -> str:
    """Write a conditioning bundle (safetensors: ``t5``, ``clip_pooled``, ``fluxsr.*`` metadata).

    Shapes are normalised as on loading (``[L, D]`` -> ``[1, L, D]``, ``[D]`` -> ``[1, D]``).
    ``prompt``, when given, is stored as ``fluxsr.prompt`` for provenance. The file is written
    to a temporary name and renamed, so a failure never leaves half a file. Returns the path.
    """
    path = os.fspath(path)
    t5 = _normalise_t5(t5.detach(), "t5 to save")
    clip = _normalise_clip(clip_pooled.detach(), "clip_pooled to save")
    md = {"format": "pt", KEY_CONTENT: CONTENT_BUNDLE, **settings.to_metadata()}
    if prompt is not None:
        md[KEY_PROMPT] = str(prompt)
    import safetensors.torch

    tensors = {T5_KEY: t5.to("cpu").contiguous(), CLIP_KEY: clip.to("cpu").contiguous()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=md))
    return path


def bundle_from_tensors(t5: torch.Tensor, clip_pooled: torch.Tensor, settings: RunSettings,
                        source: str = "tensors") -> ConditioningBundle:
    """A bundle from in-memory tensors (shapes normalised and checked as on loading)."""
    return ConditioningBundle(t5=_normalise_t5(t5, source), clip_pooled=_normalise_clip(clip_pooled, source),
                              settings=settings, source=source, report=[])


# --- encoding a prompt -----------------------------------------------------------------------

def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _truncation_note(tokenizer, prompt: str, ids: torch.Tensor, max_length: int, what: str) -> list[str]:
    """diffusers warns when a prompt is cut; we put the same fact in the bundle's report."""
    untruncated = tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
        return [f"prompt truncated to {max_length} {what} tokens"]
    return []


def encode_prompt_bundle(prompt: str, t5_encoder, t5_tokenizer, clip_encoder, clip_tokenizer,
                         settings: RunSettings, max_sequence_length: int = 512,
                         device=None) -> ConditioningBundle:
    """Encode ``prompt`` into a conditioning bundle, as diffusers' ``FluxPipeline.encode_prompt``.

    T5 (``T5EncoderModel``): tokens padded to ``max_sequence_length`` (truncated beyond), last hidden
    state ``[1, L, 4096]`` in the encoder's dtype. CLIP (``CLIPTextModel``): tokens padded to the
    tokenizer's ``model_max_length`` (77 for CLIP-L), ``pooler_output`` ``[1, 768]`` in the encoder's
    dtype. Token ids go to each encoder's own device; the results are returned on ``device``
    (CPU when None), ready for :func:`save_bundle`.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (got {type(prompt).__name__})")
    out_device = torch.device("cpu") if device is None else torch.device(device)
    # diffusers: tokenizer_max_length = tokenizer.model_max_length (77 for CLIP); a tokenizer with
    # no real limit reports a huge number, for which CLIP's 77 is the only sensible length.
    clip_len = getattr(clip_tokenizer, "model_max_length", 77) or 77
    if clip_len > 4096:
        clip_len = 77
    report: list[str] = []
    with torch.no_grad():
        clip_ids = clip_tokenizer([prompt], padding="max_length", max_length=clip_len, truncation=True,
                                  return_overflowing_tokens=False, return_length=False,
                                  return_tensors="pt").input_ids
        report += _truncation_note(clip_tokenizer, prompt, clip_ids, clip_len, "CLIP")
        pooled = clip_encoder(clip_ids.to(_module_device(clip_encoder)), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=clip_encoder.dtype, device=out_device)

        t5_ids = t5_tokenizer([prompt], padding="max_length", max_length=max_sequence_length,
                              truncation=True, return_length=False, return_overflowing_tokens=False,
                              return_tensors="pt").input_ids
        report += _truncation_note(t5_tokenizer, prompt, t5_ids, max_sequence_length, "T5")
        t5 = t5_encoder(t5_ids.to(_module_device(t5_encoder)), output_hidden_states=False)[0]
        t5 = t5.to(dtype=t5_encoder.dtype, device=out_device)

    source = f"prompt {prompt[:60]!r}" + ("..." if len(prompt) > 60 else "")
    report.insert(0, f"encoded {source}: t5 {_describe(t5)}, clip_pooled {_describe(pooled)}")
    return ConditioningBundle(t5=_normalise_t5(t5, source), clip_pooled=_normalise_clip(pooled, source),
                              settings=settings, source=source, report=report)

"""FluxSR student LoRA files: loading into a diffusers ``FluxTransformer2DModel``, saving, exporting.

The student is FLUX.1-dev plus a LoRA. Files use diffusers/peft naming
(``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight``), which diffusers'
``FluxPipeline.load_lora_weights`` and ComfyUI's LoRA loaders both read. Applying a LoRA is
peft's, driven through diffusers (``load_lora_adapter``, ``set_adapters``, ``fuse_lora``,
``unload_lora``), and so are most namings' conversions (diffusers' converters). Our own: the
BFL/ComfyUI naming (each ``linear1``/``qkv`` LoRA split into q, k, v and the MLP), kohya layers
outside the blocks, the alphas a file keeps only in its metadata (or peft's adapter_config.json
beside it), the merge into fp8-stored weights (:func:`merge_factors`), the checks that a file fits
the transformer with messages saying what does not, and the FluxSR run settings in the metadata.

LoRA arithmetic (peft's): ``W' = W + scale * (alpha / r) * B @ A`` for every targeted linear layer,
with ``A = lora_A [r, in]``, ``B = lora_B [out, r]``; ``alpha / sqrt(r)`` with rsLoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from .files import atomic_write
from .settings import KEY_LORA_RANK, RunSettings, settings_from_metadata
from .weights import FP8_DTYPES, WeightsError, read_safetensors, read_safetensors_header

# diffusers' key for the peft LoraConfig it stores in a LoRA file's safetensors metadata
# (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY; repeated here so reading a file never
# depends on a private import).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Ours, next to fluxsr.lora_rank: the alpha the tensors were trained with.
KEY_LORA_ALPHA = "fluxsr.lora_alpha"
KEY_CONTENT = "fluxsr.content"
CONTENT_LORA = "lora"

TRANSFORMER_PREFIX = "transformer."
DEFAULT_ADAPTER_NAME = "fluxsr"

# LoraConfig fields that change what a loaded LoRA computes and are safe to take from a file.
# Everything else in a file's adapter config (init schemes that rewrite base weights such as
# PiSSA/OLoRA, modules_to_save, target patterns) is ignored: the tensors decide what is targeted.
_SAFE_CONFIG_FIELDS = ("lora_alpha", "alpha_pattern", "use_rslora")


class LoraError(WeightsError):
    """A LoRA file that cannot be used with this transformer (the message says why and what to do)."""


@dataclass
class LoraInfo:
    """What :func:`load_lora` found and did.

    ``rank``/``alpha``: the most common rank and alpha over the LoRA's layers (``ranks`` and
    ``alphas`` list the layers that differ, usually empty); ``alpha_source`` says where the alphas
    come from. For kohya layers these are the file's own ``.alpha`` values, which diffusers'
    converter folds into A/B (the merge then applies alpha = rank there), and the ranks are the
    file's lora_down rows (what its alpha is divided by), also where diffusers splits a
    block-sparse fused q|k|v into parts of lower rank. ``target_modules``: the
    transformer layers the LoRA changes (diffusers module names). ``metadata``: the file's safetensors
    metadata. ``settings``: the run settings the file carries (defaults where it has none).
    ``adapter_name`` is None once the LoRA was merged into the weights and unloaded.
    """

    path: str
    rank: int
    alpha: float
    scale: float
    merged: bool
    adapter_name: Optional[str]
    target_modules: list[str]
    metadata: dict[str, str]
    settings: RunSettings
    alpha_source: str
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        how = "merged into the weights" if self.merged else f"as adapter '{self.adapter_name}'"
        return (f"LoRA {os.path.basename(self.path)}: rank {self.rank}, alpha {self.alpha:g} "
                f"({self.alpha_source}), {len(self.target_modules)} layers, scale {self.scale:g}, "
                f"{how}")


# --- reading -------------------------------------------------------------------------------

def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The one place this module reads a file: tensors (CPU) and the string metadata.

    :func:`fluxsr_core.weights.read_safetensors` refuses pickles (``.bin``/``.pt``: unpickling can
    run code), GGUF, empty and truncated files with messages naming the file.
    """
    _refuse_folder(path)
    return read_safetensors(path, what="LoRA file")


def _refuse_folder(path: str) -> None:
    if os.path.isdir(path):
        raise LoraError(f"{path} is a folder; give the LoRA .safetensors file inside it "
                        "(e.g. pytorch_lora_weights.safetensors)")


def read_lora_settings(path: str | os.PathLike, label: Optional[str] = None) -> RunSettings:
    """The run settings (T_L, guidance, scale) a LoRA file's ``fluxsr.*`` metadata carries.

    Reads the safetensors header only (cheap for any size). Fields the file does not carry keep
    our defaults, with ``source`` saying "default"; a value that is not a number, or a T_L out of
    range, is refused naming the file. ``label`` names the file in ``source`` (default
    ``"LoRA <path>"``, as :func:`load_lora` writes it).
    """
    path = os.fspath(path)
    _refuse_folder(path)
    _, md = read_safetensors_header(path, what="LoRA file")
    try:
        return settings_from_metadata((md, label or f"LoRA {path}"))
    except ValueError as exc:
        raise LoraError(f"{os.path.basename(path)}: {exc}") from None


# Key shapes of LoRAs for other model families, checked before anything is loaded so the user
# learns what the file is for instead of a peft error about missing modules.
_OTHER_FAMILIES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|\.)lora_te2_|text_encoder_2\.|(^|\.)conditioner\.embedders\.1"),
     "Stable Diffusion XL"),
    (re.compile(r"lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)"
                r"|(^|\.)(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d"),
     "a Stable Diffusion / SDXL UNet"),
    (re.compile(r"(^|[._])joint_blocks[._]\d"), "Stable Diffusion 3 (MMDiT)"),
    (re.compile(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\."), "a video transformer (Wan-style blocks)"),
)


def guess_model_family(keys) -> Optional[str]:
    """Name the model family a LoRA's keys look like, if it is clearly not FLUX."""
    keys = list(keys)
    for pattern, name in _OTHER_FAMILIES:
        if any(pattern.search(k) for k in keys):
            return name
    return None


def _looks_like_lora(keys) -> bool:
    return any(("lora" in k.lower()) or k.endswith(".alpha") or "lokr_" in k for k in keys)


# LyCORIS's other adapter kinds, by their tensors' names (LoHa, LoKr, OFT/BOFT; DoRA's
# dora_scale, which kohya writes too, has its own message where the naming is read).
_LYCORIS_KINDS = ((re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LoHa"),
                  (re.compile(r"\.lokr_(w[12](_[ab])?|t[12])$"), "LoKr"),
                  (re.compile(r"\.(oft_blocks|oft_diag|boft_\w+)$"), "OFT"))
# ComfyUI's full differences (its Train LoRA node, and its LoRA extraction with bias_diff on):
# a bias or norm scale's whole change, not a low-rank one.
_COMFY_DIFF = re.compile(r"\.(diff|diff_b|set_weight)$")
_COMFYUI_APPLIES = ("In ComfyUI, FluxSR Load LoRA (or ComfyUI's own LoRA loaders) applies such a file; "
                    "for fluxsr, use a plain LoRA")


def _refuse_other_adapter_kinds(keys: Sequence[str], name: str) -> None:
    """LyCORIS files and ComfyUI's full differences, named before any naming logic (which would
    call a LoHa a full model, or a LoKr a naming it cannot convert). Text-encoder tensors are
    left to the note that FluxSR does not use them."""
    keys = [k for k in keys if not is_text_encoder_key(k)]
    for pattern, kind in _LYCORIS_KINDS:
        example = next((k for k in keys if pattern.search(k)), None)
        if example is not None:
            raise LoraError(f"{name} is a LyCORIS {kind} (keys such as '{example}'), not a LoRA: FluxSR's own "
                            "loader reads low-rank LoRAs (lora_A/lora_B or lora_down/lora_up layers, as "
                            f"fluxsr-train export writes them). {_COMFYUI_APPLIES}.")
    example = next((k for k in keys if _COMFY_DIFF.search(k)), None)
    if example is not None:
        raise LoraError(f"{name} holds ComfyUI's full differences (keys such as '{example}': a bias's or norm's "
                        "whole change, as ComfyUI's Train LoRA node writes them, and its LoRA extraction with "
                        "bias_diff on) besides low-rank layers; FluxSR's own loader reads low-rank LoRA layers "
                        f"only. {_COMFYUI_APPLIES} (extract it again with bias_diff off).")


def _check_is_lora(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse empty files, whole models and other model families before diffusers sees them."""
    name = os.path.basename(path)
    if not state_dict:
        raise LoraError(f"{path} holds no tensors: it is empty, so it is not a LoRA. "
                        "Re-download or re-export the file.")
    keys = list(state_dict)
    _refuse_other_adapter_kinds(keys, name)
    if not _looks_like_lora(keys):
        example = ", ".join(sorted(keys)[:3])
        family = guess_model_family(keys)
        what = f" ({family})" if family else ""
        raise LoraError(
            f"{name}: this is a full model{what}, not a LoRA: its {len(keys)} tensors "
            f"(e.g. {example}) carry no lora_A/lora_B or lora_down/lora_up weights. Load it as the "
            "base transformer and give the FluxSR LoRA file (e.g. pytorch_lora_weights.safetensors) "
            "as the LoRA.")
    family = guess_model_family(keys)
    if family:
        example = sorted(keys)[0]
        raise LoraError(
            f"{name} looks like a LoRA for {family} (keys such as '{example}'), not for FLUX. "
            "FluxSR needs a LoRA trained on FLUX.1-dev (diffusers naming, e.g. "
            "'transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight').")


_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# text-encoder LoRA keys (kohya's lora_te*, diffusers' text_encoder.*, ComfyUI's text_encoders.*)
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "clip_l.", "t5xxl.", "te1.", "te2.")
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
# the part after a module's name -> what it is
_LORA_PARTS = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B",
               ".alpha": "alpha"}


def is_text_encoder_key(key: str) -> bool:
    """Whether a LoRA tensor's key is a text encoder's (kohya's ``lora_te*``, diffusers', ComfyUI's)."""
    return key.startswith(_TEXT_ENCODER_PREFIXES)


def text_encoder_note(count: int) -> str:
    """What FluxSR does with a LoRA's text-encoder tensors (none of them is used), for logs."""
    return (f"ignored {count} text-encoder LoRA tensors: FluxSR runs with fixed text embeddings, so a "
            "text-encoder LoRA must be baked into the conditioning bundle")


def _bfl_module(key: str) -> Optional[tuple[str, str]]:
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` -> ``("double_blocks.0.img_attn.qkv", "A")``;
    None for keys outside BFL's module names."""
    for pre in _BFL_PREFIXES:
        if key.startswith(pre):
            key = key[len(pre):]
            break
    if not key.startswith(_BFL_ROOTS):
        return None
    for suffix, part in _LORA_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, "other"


def _bfl_to_diffusers_naming(sd: dict[str, torch.Tensor], transformer, path: str, notes: list[str],
                             naming: str = "BFL/ComfyUI", shown: Optional[Mapping[str, str]] = None,
                             layers_are: str = "LoRA layers") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A LoRA in BFL/ComfyUI module names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A``,
    ``lora_down``/``lora_up`` too; every key of ``sd`` is one, as :func:`_naming_of` sorted them)
    -> diffusers naming, plus the ``.alpha`` values of the diffusers layers.

    Ours rather than diffusers' converters, which need every layer of a full BFL LoRA or fail on
    partial ones: each BFL layer's ``B`` is split by the rows its weight splits into (fused
    q|k|v, the single blocks' q|k|v|mlp, the final modulation's swapped halves), read off the
    weight converter itself (:func:`~fluxsr_core.weights.bfl_row_sources`); ``A`` and ``alpha``
    are shared by the parts. Exact: ``B_part @ A`` is the matching rows of ``B @ A``.

    ``naming``, ``shown`` (BFL key or module -> the file's own name) and ``layers_are`` are for messages, when
    another naming was renamed to BFL's first (:func:`_kohya_outside_blocks`).
    """
    from .weights import bfl_row_sources

    shown = shown or {}
    name = os.path.basename(path)
    bfl = {k: _bfl_module(k) for k in sd}
    odd = [k for k, (_, part) in bfl.items() if part == "other"]
    if odd:
        raise LoraError(f"{name}: '{shown.get(odd[0], odd[0])}' is no lora_A/lora_B (lora_down/lora_up) weight or "
                        f"alpha; FluxSR merges plain LoRAs (no DoRA magnitudes, no LoRA biases) in {naming} naming")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, (module, part) in bfl.items():
        layers.setdefault(module, {})[part] = sd[k]
    plain = {k.replace(".base_layer.", "."): v.shape for k, v in transformer.state_dict().items()
             if ".lora_" not in k and "lora_magnitude" not in k}
    try:
        sources = bfl_row_sources(plain)
    except WeightsError as exc:
        raise LoraError(f"{name}: a {naming}-named LoRA is mapped through the transformer's own layers, which have "
                        f"been changed ({exc}); load the LoRA before fusing projections") from None
    out, alphas = {}, {}
    for module, parts in layers.items():
        if "A" not in parts or "B" not in parts:
            raise LoraError(f"{name}: layer '{shown.get(module, module)}' has "
                            f"{'lora_A' if 'A' in parts else 'lora_B'} but not "
                            f"{'lora_B' if 'A' in parts else 'lora_A'}; the file is incomplete")
        if f"{module}.weight" not in sources:
            raise LoraError(f"{name}: '{shown.get(module, module)}' is no layer of this FLUX transformer ({naming} "
                            f"naming); the LoRA is for another model or depth")
        a, b = parts["A"], parts["B"]
        for dkey, rows in sources[f"{module}.weight"]:
            target = TRANSFORMER_PREFIX + dkey[: -len(".weight")]
            out[f"{target}.lora_A.weight"] = a
            out[f"{target}.lora_B.weight"] = b[rows]
            if "alpha" in parts:
                alpha = parts["alpha"]
                alphas[f"{target}.alpha"] = float(alpha.item() if torch.is_tensor(alpha) else alpha)
    split = " (fused q|k|v and q|k|v|mlp split by rows)" if len(out) // 2 > len(layers) else ""
    notes.append(f"converted {len(layers)} {layers_are} from {naming} naming into {len(out) // 2} diffusers "
                 f"layers{split}")
    return out, alphas


# BFL's layers outside the double/single blocks. sd-scripts names a layer "lora_unet_" + its BFL
# module name with "." -> "_" (lora_unet_final_layer_adaLN_modulation_1); the blocks' names are
# ambiguous that way (img_mlp_0), which is why diffusers' converter keeps those.
_KOHYA_PREFIX = "lora_unet_"
_BFL_OUTSIDE_BLOCKS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                       "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                       "final_layer.adaLN_modulation.1")
_KOHYA_OUTSIDE_BLOCKS = {_KOHYA_PREFIX + m.replace(".", "_"): m for m in _BFL_OUTSIDE_BLOCKS}


def _kohya_outside_blocks(sd: dict[str, torch.Tensor], transformer, path: str,
                          notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Take a kohya/sd-scripts LoRA's layers outside the blocks (``lora_unet_img_in``,
    ``lora_unet_final_layer_adaLN_modulation_1``, ``lora_unet_time_in_in_layer``, ...) out of
    ``sd`` and convert them: renamed to BFL names, then :func:`_bfl_to_diffusers_naming` (the
    final modulation's ``B`` gets its halves swapped, alphas stay per layer).

    Not diffusers' converter: as of diffusers 0.42 it maps these layers without the
    ``transformer.`` prefix (diffusers' own loader then drops them unnoticed) and discards the
    final layers' alphas. Returns empty dicts when the file has no such layers.
    """
    renamed, shown = {}, {}
    for key in [k for k in sd if k.split(".", 1)[0] in _KOHYA_OUTSIDE_BLOCKS]:
        kohya_module, rest = key.split(".", 1)
        bfl_module = _KOHYA_OUTSIDE_BLOCKS[kohya_module]
        renamed[f"{bfl_module}.{rest}"] = sd.pop(key)
        shown[f"{bfl_module}.{rest}"], shown[bfl_module] = key, kohya_module
    if not renamed:
        return {}, {}
    return _bfl_to_diffusers_naming(renamed, transformer, path, notes, naming="kohya/sd-scripts", shown=shown,
                                    layers_are="LoRA layers outside the blocks")


def _diffusers_converter(sd: dict[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers' own FLUX LoRA conversion (``FluxLoraLoaderMixin.lora_state_dict``): tensors in
    diffusers naming and the ``.alpha`` values it hands on (floats)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        out, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(sd), return_alphas=True)
    except Exception as exc:  # diffusers raises bare ValueError/KeyError/AssertionError here
        raise LoraError(
            f"{os.path.basename(path)}: diffusers could not convert this LoRA's naming to its own "
            f"({type(exc).__name__}: {exc}). FluxSR reads FLUX LoRAs in diffusers naming and the "
            "kohya/XLabs namings diffusers converts.") from exc
    if isinstance(out, tuple):  # older diffusers return (state_dict, alphas, ...) differently
        out = out[0]
    return dict(out), {k: float(v.item() if torch.is_tensor(v) else v) for k, v in (alphas or {}).items()}


# kohya's part names -> peft's, for files in diffusers module names that use kohya's (down = A, up = B).
_DOWN_UP_AS_A_B = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}


def _as_peft_reads_it(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_down/lora_up.weight`` -> ``lora_A/lora_B``, before diffusers'
    converter: it renames them too, but on its kohya path, which leaves ``.alpha`` tensors in the
    state dict for peft to drop; renamed first, they are the layers' alphas as next to lora_A/lora_B.
    A layer with a part under both names is refused (which one counts is unclear). Integer
    ``.alpha`` tensors become float, as kohya's path reads them. kohya's DoRA magnitudes
    (``.dora_scale``) are refused, as in kohya naming: diffusers drops them with a log line only,
    which would merge another LoRA than the file's."""
    dora = sorted(k for k in sd if k.endswith(".dora_scale"))
    if dora:
        raise LoraError(f"{os.path.basename(path)}: '{dora[0]}' is a DoRA magnitude; FluxSR merges plain LoRAs in "
                        "diffusers naming with kohya's part names (no DoRA magnitudes), and leaving it out would "
                        "change what the LoRA does")
    out = dict(sd)
    for key in sd:
        for down_up, a_b in _DOWN_UP_AS_A_B.items():
            if not key.endswith(down_up):
                continue
            renamed = key[: -len(down_up)] + a_b
            if renamed in sd:
                raise LoraError(f"{os.path.basename(path)}: layer '{key[len(TRANSFORMER_PREFIX):-len(down_up)]}' has "
                                f"both a {a_b[1:-len('.weight')]} and a {down_up[1:-len('.weight')]} weight, which "
                                "mean the same part; re-export the LoRA with each layer once")
            out[renamed] = out.pop(key)
    for key, value in sd.items():
        if key.endswith(".alpha") and not value.is_floating_point():
            out[key] = value.float()  # diffusers refuses integer alphas here (kohya's path takes them)
    return out


# The tensors of a plain kohya LoRA layer: anything else is another method's (DoRA, LyCORIS).
_KOHYA_PLAIN_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _layer_groups(sd: Mapping[str, torch.Tensor], name: str, naming: str) -> dict[str, dict[str, torch.Tensor]]:
    """kohya-style tensors by layer (``<layer>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``);
    refuses any other part (a DoRA scale, a LyCORIS diff), which leaving out would change the LoRA."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        groups.setdefault(k.split(".", 1)[0], {})[k] = v
    for group in groups.values():
        odd = sorted(k for k in group if not k.endswith(_KOHYA_PLAIN_SUFFIXES))
        if odd:  # diffusers' converter would drop these with a log line only
            raise LoraError(f"{name}: '{odd[0]}' is no lora_down/lora_up weight or alpha; FluxSR merges plain "
                            f"LoRAs (no DoRA magnitudes, no LyCORIS weight or bias diffs) in {naming} naming, "
                            "and leaving that part out would change what the LoRA does")
    return groups


def _layer_alpha(group: Mapping[str, torch.Tensor], layer: str, name: str) -> Optional[float]:
    """The layer's ``.alpha`` as a number (None when it has none); a damaged one is refused."""
    alpha = group.get(f"{layer}.alpha")
    if alpha is None:
        return None
    value = float(alpha.reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if not math.isfinite(value):
        shown = repr(value) if alpha.numel() == 1 else f"of shape {list(alpha.shape)}"
        raise LoraError(f"{name}: LoRA alpha {shown} of '{layer}' is not a finite number; the file's "
                        "alpha tensors are damaged. Re-export the LoRA")
    return value


def _kohya_layers(sd: dict[str, torch.Tensor], path: str, naming: str,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], dict[str, int]]:
    """kohya layers (``lora_unet_double_blocks_0_img_attn_qkv``) through diffusers' converter,
    one kohya layer at a time.

    diffusers folds each layer's ``alpha / r`` into its A/B, so peft must then apply alpha = rank
    there; converting layer by layer tells which diffusers layers got which of the file's alphas.
    ``r`` is the layer's lora_down rows, also where diffusers splits a block-sparse fused q|k|v
    (sd-scripts' split_qkv) into parts of a third of that rank (a quarter for q|k|v|mlp).
    Returns (tensors, the alphas peft applies, ``{module: the file's alpha}`` for the folded
    layers, ``{module: the file's rank}`` where that is not the part's rank: what
    :class:`LoraInfo` reports).
    """
    name = os.path.basename(path)
    out, alphas, file_alphas, file_ranks = {}, {}, {}, {}
    for layer, group in _layer_groups(sd, name, naming).items():
        converted, _ = _diffusers_converter(group, path)
        targets = [k[: -len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")]
        if not targets:  # diffusers' kohya converter drops keys it does not know, unannounced
            raise LoraError(f"{name}: diffusers' converter makes no LoRA layer of '{layer}' ({naming} naming; "
                            f"tensors {', '.join(sorted(group))}); the file is incomplete or in another naming")
        rank = int(group[f"{layer}.lora_down.weight"].shape[0])  # present: the converter made layers of it
        for target in targets:
            if converted[f"{target}.lora_A.weight"].shape[0] != rank:
                file_ranks[_module_of(target + ".lora_A.weight")] = rank
        value = _layer_alpha(group, layer, name)
        if value is not None:
            for target in targets:
                file_alphas[_module_of(target + ".lora_A.weight")] = value
                alphas[f"{target}.alpha"] = float(converted[f"{target}.lora_A.weight"].shape[0])
        out.update(converted)
    return out, alphas, file_alphas, file_ranks


_KOHYA_DIFFUSERS_PREFIX = "lora_transformer_"


def _kohya_diffusers_layers(sd: dict[str, torch.Tensor], transformer, path: str
                            ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], dict[str, int]]:
    """``lora_transformer_<diffusers module, '.' as '_'>`` layers (OneTrainer, ai-toolkit's
    kohya-style saves) matched to the transformer's own linear layers by that flattened name.
    Our own, not diffusers' converter: that one names a sub-module only inside ``attn``, so
    ``ff.net.0.proj``, ``proj_mlp`` or ``norm1.linear`` went to their block and the file was
    refused. The names are diffusers' own, so every layer maps one to one, its alpha kept as the
    file gives it (peft applies ``alpha / r``); returns what :func:`_kohya_layers` does."""
    name = os.path.basename(path)
    flat = {module.replace(".", "_"): module for module, layer in transformer.named_modules()
            if isinstance(layer, torch.nn.Linear)}
    out, alphas = {}, {}
    for layer, group in _layer_groups(sd, name, _KOHYA_DIFFUSERS).items():
        module = flat.get(layer[len(_KOHYA_DIFFUSERS_PREFIX):])
        if module is None:
            raise LoraError(f"{name}: '{layer}' names no linear layer of this FLUX transformer ({_KOHYA_DIFFUSERS} "
                            "naming: its diffusers module name with '_' for '.'); is it a LoRA for another model?")
        missing = [part for part in ("lora_down", "lora_up") if f"{layer}.{part}.weight" not in group]
        if missing:
            raise LoraError(f"{name}: layer '{layer}' has no {missing[0]}.weight; the file is incomplete")
        target = TRANSFORMER_PREFIX + module
        out[f"{target}.lora_A.weight"] = group[f"{layer}.lora_down.weight"]
        out[f"{target}.lora_B.weight"] = group[f"{layer}.lora_up.weight"]
        value = _layer_alpha(group, layer, name)
        if value is not None:
            alphas[f"{target}.alpha"] = value
    return out, alphas, {}, {}


# The namings a FLUX LoRA's keys come in. A file may mix them (LoRAs merged by hand, trainers that
# add layers in another naming); diffusers' converter would then keep one naming and drop the rest
# unannounced, so each is converted on its own and the results joined (see _to_diffusers_naming).
_DIFFUSERS = "diffusers/peft"
_DIFFUSERS_BARE = "diffusers/peft (no 'transformer.' prefix)"
_BFL = "BFL/ComfyUI"
_KOHYA = "kohya/sd-scripts"
_KOHYA_DIFFUSERS = "kohya-style diffusers (lora_transformer_*)"
_XLABS = "XLabs"
_OTHER = "unrecognised"
_TEXT_ENCODER = "text encoder"
_NAMINGS = (_DIFFUSERS, _DIFFUSERS_BARE, _BFL, _KOHYA, _KOHYA_DIFFUSERS, _XLABS, _OTHER)


def _naming_of(key: str, top_modules) -> str:
    """Which naming one LoRA key is in (``top_modules``: the transformer's top-level module names)."""
    if is_text_encoder_key(key):
        return _TEXT_ENCODER
    bfl = _bfl_module(key) is not None
    if bfl and ".processor." in key:  # XLabs: double_blocks.N.processor.qkv_lora1 (diffusers converts it)
        return _XLABS
    if bfl:
        return _BFL
    if key.startswith("lora_unet"):
        return _KOHYA
    if key.startswith(_KOHYA_DIFFUSERS_PREFIX):
        return _KOHYA_DIFFUSERS
    if key.startswith(TRANSFORMER_PREFIX):
        return _DIFFUSERS
    if key.split(".", 1)[0] in top_modules:
        return _DIFFUSERS_BARE
    return _OTHER


def _namings_text(counts: Mapping[str, int]) -> str:
    """``{"diffusers/peft": 2, "kohya/sd-scripts": 6}`` -> "2 tensors in diffusers/peft naming and 6 in ..."."""
    parts = [f"{n} {'tensors ' if i == 0 else ''}in {naming} naming" for i, (naming, n) in enumerate(counts.items())]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


@dataclass
class _Converted:
    """A LoRA in diffusers naming: ``sd`` (``transformer.``-prefixed), ``alphas`` (the
    ``transformer.<module>.alpha`` values peft applies), ``file_alphas`` (``{module: the file's
    alpha}`` where diffusers folded it into A/B), ``file_ranks`` (``{module: the file's rank}``
    where diffusers split a layer into parts of lower rank), ``namings`` (naming -> tensors of the
    file in it, text-encoder tensors left out)."""

    sd: dict[str, torch.Tensor]
    alphas: dict[str, float]
    file_alphas: dict[str, float]
    file_ranks: dict[str, int]
    namings: dict[str, int]


def _convert_naming(naming: str, sd: dict[str, torch.Tensor], transformer, path: str, notes: list[str],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], dict[str, int]]:
    """One naming's tensors -> (diffusers-named tensors, alphas peft applies, the file's folded
    alphas, the file's ranks of split layers)."""
    if naming == _BFL:
        return (*_bfl_to_diffusers_naming(sd, transformer, path, notes), {}, {})
    if naming == _KOHYA:
        rest = dict(sd)
        outside, outside_alphas = _kohya_outside_blocks(rest, transformer, path, notes)
        blocks, block_alphas, file_alphas, file_ranks = _kohya_layers(rest, path, naming)
        return {**blocks, **outside}, {**block_alphas, **outside_alphas}, file_alphas, file_ranks
    if naming == _KOHYA_DIFFUSERS:
        return _kohya_diffusers_layers(sd, transformer, path)
    if naming == _DIFFUSERS_BARE:
        sd = {TRANSFORMER_PREFIX + k: v for k, v in sd.items()}
    if naming in (_DIFFUSERS, _DIFFUSERS_BARE):
        sd = _as_peft_reads_it(sd, path)
    return (*_diffusers_converter(sd, path), {}, {})


def _to_diffusers_naming(state_dict: dict[str, torch.Tensor], path: str, notes: list[str],
                         transformer) -> _Converted:
    """A LoRA file's tensors in diffusers/peft naming with the ``transformer.`` prefix.

    Each key is sorted into its naming (:func:`_naming_of`) and each naming converted on its own:
    BFL/ComfyUI module names by :func:`_bfl_to_diffusers_naming` against ``transformer``'s layers,
    as are kohya's layers outside the blocks (:func:`_kohya_outside_blocks`); kohya's blocks,
    XLabs and the rest by diffusers' own FLUX converters. A file mixing namings is joined when
    they change different layers and refused when two change the same one; text-encoder tensors
    are noted and left out.
    """
    name = os.path.basename(path)
    sd = dict(state_dict)
    # peft's PeftModel.save_pretrained names keys "base_model.model.<module>..."; diffusers would
    # mistake that "base_model" for the fal-Kontext layout, so strip it first.
    peft_prefix = "base_model.model."
    if all(k.startswith(peft_prefix) for k in sd):
        sd = {k[len(peft_prefix):]: v for k, v in sd.items()}
    top_modules = {n for n, _ in transformer.named_children()}
    families: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        families.setdefault(_naming_of(k, top_modules), {})[k] = v
    text = families.pop(_TEXT_ENCODER, {})
    if text:
        notes.append(text_encoder_note(len(text)))
    if set(families) == {_OTHER} and any(".lora_A." in k or ".lora_B." in k for k in families[_OTHER]):
        # peft naming without the prefix, for modules this transformer lacks: _check_fits says
        # what the LoRA looks made for.
        families = {_DIFFUSERS_BARE: families[_OTHER]}
    if not families:
        raise LoraError(f"{name} holds no LoRA tensors for the FLUX transformer (only {len(text)} text-encoder "
                        "tensors, which FluxSR does not use).")

    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    file_alphas: dict[str, float] = {}
    file_ranks: dict[str, int] = {}
    owner: dict[str, str] = {}  # diffusers module -> the naming it came from
    namings = {n: len(families[n]) for n in _NAMINGS if n in families}
    for naming in namings:
        part, part_alphas, part_file_alphas, part_file_ranks = _convert_naming(naming, families[naming], transformer,
                                                                               path, notes)
        modules = {m for k in part if (m := _module_of(k)) is not None}
        if not modules:
            raise LoraError(f"{name}: its {namings[naming]} tensors in {naming} naming (e.g. "
                            f"'{next(iter(families[naming]))}') convert to no LoRA layer. FluxSR reads diffusers/peft, "
                            "BFL/ComfyUI ('diffusion_model.double_blocks...') and kohya/XLabs namings.")
        for module in sorted(modules):
            first = owner.setdefault(module, naming)
            if first != naming:
                raise LoraError(
                    f"{name} mixes namings: {namings[first]} tensors in {first} naming (e.g. "
                    f"'{next(iter(families[first]))}') and {namings[naming]} in {naming} naming (e.g. "
                    f"'{next(iter(families[naming]))}'), and both change the layer '{module}', so which one "
                    "counts is unclear. Re-export the LoRA in one naming, with each layer once.")
        out.update(part)
        alphas.update(part_alphas)
        file_alphas.update(part_file_alphas)
        file_ranks.update(part_file_ranks)
    if len(namings) > 1:
        notes.append(f"the file mixes namings ({_namings_text(namings)}); each was converted on its own and "
                     f"joined (they change different layers)")

    unknown = [k for k in out if not k.startswith((TRANSFORMER_PREFIX, "text_encoder."))]
    if unknown:
        raise LoraError(
            f"{name}: {len(unknown)} tensors are in a naming neither FluxSR nor diffusers "
            f"converts (e.g. '{unknown[0]}'). FluxSR reads diffusers/peft, BFL/ComfyUI "
            "('diffusion_model.double_blocks...') and kohya/XLabs namings.")
    te = [k for k in out if k.startswith("text_encoder.")]
    if te:  # a converter that also renamed text-encoder keys
        notes.append(text_encoder_note(len(te)))
        out = {k: v for k, v in out.items() if not k.startswith("text_encoder.")}
        alphas = {k: v for k, v in alphas.items() if not k.startswith("text_encoder.")}
    if not out:
        raise LoraError(f"{name} holds no LoRA tensors for the FLUX transformer.")
    return _Converted(out, alphas, file_alphas, file_ranks, namings)


def _module_of(key: str) -> Optional[str]:
    """``transformer.a.b.lora_A.weight`` -> ``a.b`` (None for keys that are not per-layer LoRA)."""
    k = key[len(TRANSFORMER_PREFIX):] if key.startswith(TRANSFORMER_PREFIX) else key
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector"):
        if marker in k:
            return k.split(marker)[0]
    return None


def _count_blocks(names, prefix: str) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(rf"{prefix}\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def _check_fits(transformer, sd: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """Every LoRA layer must name a linear layer of ``transformer`` with matching widths.

    Returns ``{module: rank}``. Raises :class:`LoraError` saying what the LoRA looks made for.
    """
    name = os.path.basename(path)
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        mod = _module_of(k)
        if mod is None:
            continue
        if ".lora_A." in k and k.endswith(".weight"):
            pairs.setdefault(mod, {})["A"] = v
        elif ".lora_B." in k and k.endswith(".weight"):
            pairs.setdefault(mod, {})["B"] = v
    if not pairs:
        raise LoraError(f"{name} has no lora_A/lora_B weight pairs for the transformer.")

    missing = sorted(m for m in pairs if m not in modules)
    if missing:
        names = list(pairs)
        family = guess_model_family(names)
        if family:
            raise LoraError(f"{name} looks like a LoRA for {family}, not for this FLUX transformer "
                            f"(layers such as '{missing[0]}').")
        if len(missing) == len(pairs):
            raise LoraError(
                f"{name}: none of its {len(pairs)} LoRA layers exists in this transformer "
                f"(e.g. '{missing[0]}'). It is not a LoRA for a diffusers FluxTransformer2DModel.")
        ld, ls = _count_blocks(names, "transformer_blocks"), _count_blocks(names, "single_transformer_blocks")
        cfg = transformer.config
        raise LoraError(
            f"{name}: {len(missing)} of its {len(pairs)} LoRA layers do not exist in this transformer "
            f"(e.g. '{missing[0]}'). The LoRA reaches {ld} double / {ls} single blocks; this "
            f"transformer has {cfg.num_layers} / {cfg.num_single_layers}. It was made for a "
            "different (deeper) FLUX model: use the base model it was trained on (FLUX.1-dev).")

    ranks: dict[str, int] = {}
    for mod, ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise LoraError(f"{name}: layer '{mod}' has lora_{'A' if 'A' in ab else 'B'} but no "
                            f"lora_{'B' if 'A' in ab else 'A'}; the file is incomplete.")
        a, b = ab["A"], ab["B"]
        layer = modules[mod]
        base = getattr(layer, "base_layer", layer)  # already wrapped by another peft adapter
        if not isinstance(base, torch.nn.Linear):
            raise LoraError(f"{name}: LoRA layer '{mod}' targets a {type(base).__name__}, not a "
                            "linear layer; FluxSR LoRAs only adapt linear layers.")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{name}: layer '{mod}' has lora_A {list(a.shape)} and lora_B "
                            f"{list(b.shape)}, which do not form a low-rank pair ([r, in] and [out, r]).")
        want_in, want_out = base.in_features, base.out_features
        if a.shape[1] != want_in or b.shape[0] != want_out:
            hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            raise LoraError(
                f"{name}: layer '{mod}' does not fit this transformer: the LoRA maps {a.shape[1]} -> "
                f"{b.shape[0]} features (lora_A {list(a.shape)}, lora_B {list(b.shape)}), the "
                f"transformer's layer maps {want_in} -> {want_out}. The LoRA was made for a FLUX "
                f"model of a different width (this one has hidden size {hidden}; FLUX.1 has 3072).")
        ranks[mod] = int(a.shape[0])
    return ranks


def _adapter_config_from_metadata(md: Mapping[str, str], path: str, notes: list[str]) -> dict:
    """The peft LoraConfig a diffusers-saved file stores under ``lora_adapter_metadata``."""
    raw = md.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        notes.append(f"ignored unreadable '{LORA_ADAPTER_METADATA_KEY}' metadata")
        return {}
    if not isinstance(cfg, dict):
        return {}
    # A pipeline save prefixes each field with the component ("transformer.r"); a model save does not.
    if any(k.startswith(TRANSFORMER_PREFIX) for k in cfg):
        cfg = {k[len(TRANSFORMER_PREFIX):]: v for k, v in cfg.items() if k.startswith(TRANSFORMER_PREFIX)}
    elif any(k.startswith("text_encoder.") for k in cfg):
        cfg = {}
    return cfg


PEFT_CONFIG_NAME = "adapter_config.json"  # what peft's save_pretrained writes beside adapter_model.safetensors


def _adapter_config_beside(path: str, notes: list[str]) -> dict:
    """The peft LoraConfig in ``adapter_config.json`` beside the file: peft's ``save_pretrained``
    keeps ``lora_alpha`` there, not in the safetensors, and without it the LoRA would run at
    rank / alpha of its strength. ``{}`` when there is none (or it is not a LoRA's config)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), PEFT_CONFIG_NAME)
    if not os.path.isfile(beside):
        return {}
    try:
        with open(beside, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        notes.append(f"ignored {PEFT_CONFIG_NAME} beside it: it cannot be read ({exc})")
        return {}
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return {}
    return cfg


def _lora_config(ranks: dict[str, int], sd_keys, network_alphas: dict[str, float],
                 md: Mapping[str, str], path: str, notes: list[str]) -> tuple[dict, str]:
    cfg, source = _lora_config_unchecked(ranks, sd_keys, network_alphas, md, path, notes)
    values = [cfg.get("lora_alpha")] + list((cfg.get("alpha_pattern") or {}).values())
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        raise LoraError(f"{os.path.basename(path)}: LoRA alpha {bad[0]!r} ({source}) is not a finite number; the "
                        "file's metadata or alpha tensors are damaged. Re-export the LoRA")
    return cfg, source


def _lora_config_unchecked(ranks: dict[str, int], sd_keys, network_alphas: dict[str, float],
                           md: Mapping[str, str], path: str, notes: list[str]) -> tuple[dict, str]:
    """LoraConfig kwargs: ranks from the tensors, alpha from ``.alpha`` tensors, else the file's
    adapter metadata, else ``fluxsr.lora_alpha``, else peft's ``adapter_config.json`` beside the
    file, else alpha = rank (the diffusers convention).

    Built with diffusers' own ``get_peft_kwargs`` so rank/alpha patterns mean what they mean there.
    """
    from diffusers.utils.peft_utils import get_peft_kwargs

    rank_dict = {f"^{m}.lora_B.weight": r for m, r in ranks.items()}
    # diffusers reads use_dora / lora_bias off the key names (lora_magnitude_vector, lora_B.bias)
    peft_sd_keys = {k[len(TRANSFORMER_PREFIX):] if k.startswith(TRANSFORMER_PREFIX) else k: None
                    for k in sd_keys}
    alphas = {k[len(TRANSFORMER_PREFIX):] if k.startswith(TRANSFORMER_PREFIX) else k: v
              for k, v in network_alphas.items()}
    if alphas:
        # A layer without its own .alpha has alpha = rank (kohya's convention); get_peft_kwargs
        # would give it the first layer's alpha instead.
        for module, rank in ranks.items():
            alphas.setdefault(f"{module}.alpha", float(rank))
        # peft matches pattern keys by suffix, so an alpha for the top-level "proj_out" would also
        # reach single_transformer_blocks.N.proj_out; "^" anchors each key to its own layer (as
        # rank_dict's keys are).
        alphas = {"^" + k: v for k, v in alphas.items()}
    cfg = get_peft_kwargs(rank_dict, alphas or None, peft_sd_keys, is_unet=True)
    # A regex of the full module names: peft full-matches a string target, so nothing outside the
    # file is adapted (a list would match by suffix: "proj_out" would also catch every block's).
    cfg["target_modules"] = "(" + "|".join(re.escape(m) for m in sorted(ranks)) + ")"
    if alphas:
        return cfg, "alpha tensors in the file"
    file_cfg = _adapter_config_from_metadata(md, path, notes)
    where = f"'{LORA_ADAPTER_METADATA_KEY}' metadata"
    if "lora_alpha" not in file_cfg and KEY_LORA_ALPHA not in md:
        beside = _adapter_config_beside(path, notes)
        if "lora_alpha" in beside:
            file_cfg, where = beside, f"{PEFT_CONFIG_NAME} beside it"
    if "lora_alpha" in file_cfg:
        for key in _SAFE_CONFIG_FIELDS:
            if key in file_cfg and file_cfg[key] is not None:
                cfg[key] = file_cfg[key]
        try:
            cfg["lora_alpha"] = float(cfg["lora_alpha"])
        except (TypeError, ValueError):
            raise LoraError(f"{os.path.basename(path)}: its {where} gives lora_alpha {cfg['lora_alpha']!r}, not a "
                            "number; re-export the LoRA") from None
        try:
            meta_rank = None if file_cfg.get("r") is None else int(file_cfg["r"])
        except (TypeError, ValueError):
            meta_rank = None
            notes.append(f"ignored the metadata's rank {file_cfg['r']!r}: not a whole number")
        if meta_rank is not None and meta_rank != cfg["r"] and not file_cfg.get("rank_pattern"):
            notes.append(f"{where} says rank {file_cfg['r']} but the tensors have rank {cfg['r']}; "
                         "the tensors were used")
        return cfg, where
    if KEY_LORA_ALPHA in md:
        try:
            cfg["lora_alpha"] = float(md[KEY_LORA_ALPHA])
            cfg["alpha_pattern"] = {}
            return cfg, f"{KEY_LORA_ALPHA} metadata"
        except ValueError:
            notes.append(f"ignored {KEY_LORA_ALPHA}={md[KEY_LORA_ALPHA]!r}: not a number")
    # diffusers' convention when nothing says otherwise: alpha = rank per layer (scale 1).
    cfg["lora_alpha"] = float(cfg["r"])
    cfg["alpha_pattern"] = {k: float(v) for k, v in cfg.get("rank_pattern", {}).items()}
    return cfg, "none in the file: alpha = rank"


# The down-projection key endings of the LoRA namings ComfyUI reads ("<layer><ending>"); its
# loader looks for that layer's alpha at "<layer>.alpha" and scales by alpha / rank.
_DOWN_KEY_ENDINGS = (".lora_A.weight", ".lora_down.weight", "_lora.down.weight")
# The first part of every layer name of diffusers' FluxTransformer2DModel.
_DIFFUSERS_TOP_MODULES = frozenset({"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                                    "norm_out", "proj_out", "time_text_embed"})


def alpha_tensors_from_metadata(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]
                                ) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """A LoRA's alphas that only its metadata holds, as ``"<layer>.alpha"`` tensors, with where they
    came from; ``({}, None)`` when its tensors carry their own alphas or nothing says any.

    For loaders that read tensors only (ComfyUI's: alpha from ``.alpha`` tensors, else alpha =
    rank): a diffusers/peft save keeps its ``lora_alpha`` (and ``alpha_pattern``, rsLoRA) in
    ``lora_adapter_metadata``, which :func:`load_lora` applies; through such a loader the
    LoRA would run at another strength. rsLoRA's ``alpha / sqrt(rank)`` is written as the alpha
    that gives it under ``alpha / rank``. ``state_dict`` is the file's, as read; it is not changed.
    """
    if any(key.endswith(".alpha") for key in state_dict):
        return {}, None
    path = os.fspath(path)
    _, md = read_safetensors_header(path, what="LoRA file")
    md = dict(md or {})
    layers = {}  # layer key prefix -> (module name as diffusers names it, rank)
    for key, tensor in state_dict.items():
        ending = next((e for e in _DOWN_KEY_ENDINGS if key.endswith(e)), None)
        if ending is not None and getattr(tensor, "ndim", 0) >= 2:
            layer = key[:-len(ending)]
            layers[layer] = (layer.removeprefix(TRANSFORMER_PREFIX), int(tensor.shape[0]))
    if not layers:
        return {}, None
    ranks = {module: rank for module, rank in layers.values()}
    cfg, source = _lora_config(ranks, [f"{layer}{_DOWN_KEY_ENDINGS[0]}" for layer in layers], {}, md, path, [])
    if source.startswith("none in the file"):
        return {}, None
    foreign = sorted(m for m, _ in layers.values() if m.split(".", 1)[0] not in _DIFFUSERS_TOP_MODULES)
    if (cfg.get("alpha_pattern") or {}) and foreign:
        # the pattern names diffusers' layers; which of these it means needs the naming converted
        # (load_lora does it against the transformer), which a tensors-only loader never sees
        raise LoraError(f"{os.path.basename(path)}: its metadata gives per-layer alphas (alpha_pattern) in diffusers "
                        f"naming, but its layers are named otherwise (e.g. {foreign[0]}), so ComfyUI's loader cannot "
                        "be told which alpha is whose: use fluxsr upscale, or re-export the LoRA in diffusers naming")
    rslora = bool(cfg.get("use_rslora"))
    out, given = {}, set()
    for layer, (module, rank) in layers.items():
        alpha = _alpha_for(module, cfg)
        given.add(alpha)
        out[f"{layer}.alpha"] = torch.tensor(alpha * math.sqrt(rank) if rslora else alpha)
    if all(float(out[f"{layer}.alpha"]) == rank for layer, (_, rank) in layers.items()):
        return {}, None  # alpha = rank everywhere: what such a loader assumes anyway (our own files)
    values = sorted(given)
    said = f"alpha {values[0]:g}" if len(values) == 1 else f"alphas {values[0]:g} to {values[-1]:g}"
    return out, f"{said} from its {source}" + (" (rsLoRA: alpha / sqrt(rank))" if rslora else "")


def _existing_adapters(transformer) -> list[str]:
    return list(getattr(transformer, "peft_config", {}) or {})


def load_lora(transformer, path: str | os.PathLike, scale: float = 1.0, merge: bool = False,
              adapter_name: str = DEFAULT_ADAPTER_NAME) -> LoraInfo:
    """Load a FluxSR (or any FLUX) LoRA file into a diffusers ``FluxTransformer2DModel``.

    ``scale`` multiplies the LoRA (``W + scale * alpha/r * B @ A``); 0 gives the base model.
    ``merge=False`` keeps it as the active peft adapter ``adapter_name`` (other adapters already on
    the model stay loaded but inactive); ``merge=True`` fuses it into the base weights and unloads
    the adapter, leaving a plain transformer (faster; needs no other adapter on the model).

    Reads diffusers naming with or without the ``transformer.`` prefix (``lora_A``/``lora_B``, or
    kohya's ``lora_down``/``lora_up`` part names), peft's ``base_model.model.`` naming, BFL/ComfyUI
    names, and whatever FLUX namings diffusers converts (kohya/sd-scripts, XLabs); a file mixing
    namings loads when they change different layers.
    Raises :class:`LoraError` for an empty file, a full model, a LoRA for another model family or
    for a FLUX model of another width or depth, a file whose namings change the same layer twice;
    ``FileNotFoundError`` for a missing file.
    """
    existing = _existing_adapters(transformer)
    if adapter_name in existing:
        raise LoraError(f"the transformer already has an adapter named '{adapter_name}'; pass another "
                        "adapter_name or load into a fresh transformer")
    if merge and existing:
        raise LoraError(f"merge=True needs a transformer without LoRA adapters, but it has "
                        f"{existing}; load with merge=False or start from a fresh transformer")
    if merge:
        from .models import is_gguf_model

        if is_gguf_model(transformer):
            raise LoraError("merge=True cannot change GGUF-quantised weights; load the LoRA with merge=False "
                            "(an adapter beside them)")
    lf = _read_checked(transformer, path, scale)

    # diffusers filters both the tensors and the config by the component prefix.
    prefixed_cfg = {TRANSFORMER_PREFIX + k: v for k, v in lf.cfg.items()}
    try:
        transformer.load_lora_adapter(lf.sd, prefix="transformer", adapter_name=adapter_name,
                                      metadata=prefixed_cfg)
    except Exception as exc:
        raise LoraError(f"{os.path.basename(lf.path)}: loading the LoRA failed in diffusers/peft: "
                        f"{type(exc).__name__}: {exc}") from exc

    _verify_loaded(transformer, adapter_name, lf.sd, lf.path)
    _adapter_out_of_fp8(transformer, adapter_name, lf.sd)

    if merge:
        # peft's merge: W += scale * scaling * B @ A; then drop the wrappers, keeping merged weights.
        transformer.fuse_lora(lora_scale=lf.scale, adapter_names=[adapter_name])
        transformer.unload_lora()
    else:
        transformer.set_adapters([adapter_name], weights=[lf.scale])
    return lf.info(merged=bool(merge), adapter_name=None if merge else adapter_name)


@dataclass
class _LoraFile:
    """A LoRA file read, converted to diffusers naming and checked against a transformer.

    ``cfg`` holds the alphas peft applies; ``file_alphas`` the file's own alphas of layers whose
    alpha diffusers folded into A/B (peft then applies alpha = rank there), which are reported;
    ``file_ranks`` the file's ranks of layers diffusers split into lower-rank parts (the rank
    ``ranks`` has there), which are reported.
    """

    path: str
    scale: float
    sd: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, int]
    cfg: dict
    alpha_source: str
    notes: list[str]
    file_alphas: dict[str, float] = field(default_factory=dict)
    file_ranks: dict[str, int] = field(default_factory=dict)

    def info(self, merged: bool, adapter_name: Optional[str]) -> LoraInfo:
        ranks = {**self.ranks, **self.file_ranks}
        rank = Counter(ranks.values()).most_common(1)[0][0]
        # a split layer without a file alpha: peft's alpha scaled to the reported rank, so that
        # alpha / rank stays the scaling applied (kohya's default, alpha = rank)
        per_alpha = {m: self.file_alphas[m] if m in self.file_alphas else
                     _alpha_for(m, self.cfg) * self.file_ranks[m] / self.ranks[m] if m in self.file_ranks else
                     _alpha_for(m, self.cfg) for m in self.ranks}
        if self.file_alphas or self.file_ranks:
            alpha = Counter(per_alpha.values()).most_common(1)[0][0]
        else:
            alpha = float(self.cfg["lora_alpha"])
        settings = settings_from_metadata((self.metadata, f"LoRA {self.path}"))
        notes = list(self.notes)
        if settings.lora_rank is None:
            settings.lora_rank = rank
        elif settings.lora_rank != rank:
            notes.append(f"metadata {KEY_LORA_RANK}={settings.lora_rank} but the tensors have rank {rank}")
        return LoraInfo(
            path=self.path, rank=rank, alpha=alpha, scale=self.scale, merged=merged,
            adapter_name=adapter_name, target_modules=sorted(self.ranks), metadata=self.metadata,
            settings=settings, alpha_source=self.alpha_source,
            ranks={m: r for m, r in ranks.items() if r != rank},
            alphas={m: a for m, a in per_alpha.items() if a != alpha},
            notes=notes,
        )


_FOLDED = "folded into the weights by diffusers' kohya converter"


def _read_checked(transformer, path, scale: float) -> _LoraFile:
    path = os.fspath(path)
    scale = float(scale)
    if not math.isfinite(scale):
        raise LoraError(f"LoRA scale must be a finite number (got {scale})")
    raw, md = _read_safetensors(path)
    md = dict(md or {})
    _check_is_lora(raw, path)
    notes: list[str] = _base_model_notes(md)
    conv = _to_diffusers_naming(raw, path, notes, transformer)
    ranks = _check_fits(transformer, conv.sd, path)
    if len(conv.namings) > 1:
        _refuse_metadata_alpha_when_mixed(md, conv.namings, path)
    cfg, alpha_source = _lora_config(ranks, list(conv.sd), conv.alphas, md, path, notes)
    if conv.file_alphas:
        # the alphas reported are the file's, not the alpha = rank peft applies to folded layers
        own = [k for k in conv.alphas if k.removeprefix(TRANSFORMER_PREFIX).removesuffix(".alpha")
               not in conv.file_alphas]
        n = len(conv.file_alphas)
        those = f"those of {n} layer{'s' if n != 1 else ''} " if own else ""
        alpha_source = f"'.alpha' tensors ({those}{_FOLDED})"
    return _LoraFile(path, scale, conv.sd, md, ranks, cfg, alpha_source, notes, conv.file_alphas, conv.file_ranks)


# Where trainers record the base model (kohya/sd-scripts and the modelspec most tools write).
_BASE_MODEL_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")


def _base_model_notes(md: Mapping[str, str]) -> list[str]:
    """A note when the file's metadata says it was trained on FLUX.1-schnell: it loads (same
    layers), but FluxSR runs on FLUX.1-dev, so its results would be odd."""
    for key in _BASE_MODEL_KEYS:
        value = str(md.get(key, ""))
        if "schnell" in value.lower():
            return [f"its metadata says it was trained on FLUX.1-schnell ({key}={value!r}); FluxSR runs on "
                    "FLUX.1-dev, whose layers it fits, so expect results off from a FluxSR LoRA's"]
    return []


def _refuse_metadata_alpha_when_mixed(md: Mapping[str, str], namings: Mapping[str, int], path: str) -> None:
    """Refuse a file that mixes namings and whose metadata sets one alpha: which naming's layers
    that alpha is for is unknown (the others carry theirs in tensors, or use none)."""
    file_cfg = _adapter_config_from_metadata(md, path, [])
    given = ([f"'{LORA_ADAPTER_METADATA_KEY}' lora_alpha {file_cfg['lora_alpha']!r}"] if "lora_alpha" in file_cfg
             else []) + ([f"{KEY_LORA_ALPHA}={md[KEY_LORA_ALPHA]!r}"] if KEY_LORA_ALPHA in md else [])
    if given:
        raise LoraError(f"{os.path.basename(path)} mixes namings ({_namings_text(namings)}) and its metadata sets "
                        f"one LoRA alpha ({given[0]}) without saying which layers it is for. Re-export the LoRA in "
                        "one naming.")


def check_lora(transformer, path: str | os.PathLike) -> None:
    """Raise :class:`LoraError` (naming what is wrong) unless the LoRA at ``path`` fits
    ``transformer``'s layers, as loading it would; ``transformer`` may be a meta-device model."""
    _read_checked(transformer, path, 1.0)


MergeFactors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def merge_factors(transformer, path: str | os.PathLike, scale: float = 1.0) -> tuple[MergeFactors, LoraInfo]:
    """A LoRA read for folding into the base weights while they load: ``{"<layer>.weight": (A, B,
    factor)}`` with ``W + factor * B @ A`` peft's merge (``factor = scale * alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA), and what :func:`load_lora` with ``merge=True`` reports.

    ``transformer`` may be a meta-device model: only its layer names and widths are checked.
    This serves the fp8 memory modes, where the model is built in fp8 straight from the file:
    peft can neither merge into fp8 weights nor keep a LoRA beside them in full precision (it
    casts the adapter to the base layer's dtype). DoRA and LoRA biases are refused here (load
    them with :func:`load_lora`).
    """
    lf = _read_checked(transformer, path, scale)
    if lf.cfg.get("use_dora") or lf.cfg.get("lora_bias"):
        raise LoraError(f"{os.path.basename(lf.path)} is a DoRA or has LoRA biases, which FluxSR merges only "
                        "through peft: load it without an fp8 memory mode, or unmerged (--no-merge-lora)")
    rslora = bool(lf.cfg.get("use_rslora"))
    factors: MergeFactors = {}
    for module, rank in lf.ranks.items():
        alpha = _alpha_for(module, lf.cfg)
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        a = lf.sd[f"{TRANSFORMER_PREFIX}{module}.lora_A.weight"]
        b = lf.sd[f"{TRANSFORMER_PREFIX}{module}.lora_B.weight"]
        factors[f"{module}.weight"] = (a, b, lf.scale * scaling)
    return factors, lf.info(merged=True, adapter_name=None)


def _alpha_for(module: str, cfg: dict) -> float:
    from peft.utils.other import get_pattern_key

    pattern = cfg.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return float(pattern.get(key, cfg["lora_alpha"]))


def _verify_loaded(transformer, adapter_name: str, sd: dict[str, torch.Tensor], path: str) -> None:
    """Every LoRA tensor of the file must now live in the model (peft only warns otherwise)."""
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        # peft mistakes 1-D lora_B biases for unsharded ZeRO-3 tensors and warns; they are fine.
        warnings.filterwarnings("ignore", message=".*have invalid shape.*")
        loaded = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    want = {k[len(TRANSFORMER_PREFIX):]: v for k, v in sd.items()}
    lost = [k for k, v in want.items() if k not in loaded or tuple(loaded[k].shape) != tuple(v.shape)]
    if lost:
        transformer.delete_adapters(adapter_name)
        raise LoraError(f"{os.path.basename(path)}: {len(lost)} LoRA tensors did not load into the "
                        f"transformer (e.g. '{lost[0]}'); the adapter was removed again.")


def _adapter_out_of_fp8(transformer, adapter_name: str, sd: dict[str, torch.Tensor]) -> None:
    """Keep an adapter on fp8-stored weights (the fp8 memory modes) in the compute dtype.

    peft creates each adapter layer in its base layer's dtype, so on fp8 weights the LoRA itself
    would be rounded to fp8 (3 mantissa bits) and its matmul would fail. Such adapter layers are
    cast to the compute dtype (that of the weights left unstored: norms, embedders) and the
    file's values set again, rounded once.
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import set_peft_model_state_dict

    compute = next((p.dtype for p in transformer.parameters() if p.dtype not in FP8_DTYPES), torch.bfloat16)
    cast = False
    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.adapter_layer_names:
            layers = getattr(module, name)
            if adapter_name in layers and any(p.dtype in FP8_DTYPES for p in layers[adapter_name].parameters()):
                layers[adapter_name].to(compute)
                cast = True
    if cast:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*have invalid shape.*")  # as in _verify_loaded
            set_peft_model_state_dict(transformer, {k[len(TRANSFORMER_PREFIX):]: v for k, v in sd.items()},
                                      adapter_name=adapter_name)


# --- writing -------------------------------------------------------------------------------

def _normalise_keys(lora_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in lora_state_dict.items():
        if not torch.is_tensor(v):
            raise TypeError(f"LoRA state dict entry '{k}' is a {type(v).__name__}, not a tensor")
        key = k
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        if not key.startswith(TRANSFORMER_PREFIX):
            key = TRANSFORMER_PREFIX + key
        out[key] = v.detach().to("cpu").contiguous()
    return out


def save_lora(path: str | os.PathLike, lora_state_dict: Mapping[str, torch.Tensor],
              settings: RunSettings, rank: int, alpha: float,
              extra_metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write a FluxSR LoRA: diffusers-named tensors (``transformer.`` prefix) plus metadata.

    Metadata: the ``fluxsr.*`` run settings (``settings.to_metadata()``, ``fluxsr.lora_rank``,
    ``fluxsr.lora_alpha``) and diffusers' ``lora_adapter_metadata`` (the peft LoraConfig), so
    ``FluxPipeline.load_lora_weights`` restores the same alpha. ``extra_metadata`` adds string
    entries (they may not replace the keys above). Written to a temporary file and renamed into
    place, so a failed save never leaves a half-written file. Returns the path.
    """
    import safetensors.torch

    path = os.fspath(path)
    rank = int(rank)
    alpha = float(alpha)
    if rank <= 0 or not math.isfinite(alpha):
        raise ValueError(f"LoRA rank must be positive and alpha finite (got rank={rank}, alpha={alpha})")
    sd = _normalise_keys(lora_state_dict)
    if not sd:
        raise ValueError("nothing to save: the LoRA state dict is empty")
    modules = set()
    for k, v in sd.items():
        mod = _module_of(k)
        if mod is None or not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            raise ValueError(f"'{k}' is not a LoRA weight in diffusers naming "
                             "(<module>.lora_A.weight / <module>.lora_B.weight)")
        r = v.shape[0] if ".lora_A." in k else v.shape[-1]
        if v.ndim != 2 or r != rank:
            raise ValueError(f"'{k}' has shape {list(v.shape)}, which is not rank {rank}")
        modules.add(mod)
    for mod in modules:
        for part in ("lora_A", "lora_B"):
            if f"{TRANSFORMER_PREFIX}{mod}.{part}.weight" not in sd:
                raise ValueError(f"layer '{mod}' has no {part} weight; the state dict is incomplete")

    if alpha != rank:
        # ComfyUI reads alpha only from "<key>.alpha" tensors and ignores metadata, so a file with
        # alpha != rank would run at another strength there. Fold alpha/rank into lora_B instead:
        # B @ A * (alpha / r) is unchanged and every loader agrees (alpha = rank, scale 1).
        fold = alpha / rank
        sd = {k: (v * fold if ".lora_B." in k else v) for k, v in sd.items()}
        alpha = float(rank)
    settings_md = RunSettings(**{**settings.as_dict(), "lora_rank": rank}).to_metadata()
    # target_modules as a full-match regex, as load_lora builds it: exact, where a list of names
    # would match by suffix ("proj_out" would also catch every single block's proj_out).
    adapter_cfg = {"r": rank, "lora_alpha": alpha,
                   "target_modules": "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")",
                   "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
                   "use_rslora": False}
    reserved = {**settings_md, KEY_LORA_ALPHA: "", KEY_CONTENT: "", LORA_ADAPTER_METADATA_KEY: "",
                "format": ""}
    metadata: dict[str, str] = {}
    for k, v in (extra_metadata or {}).items():
        if k in reserved:
            raise ValueError(f"extra_metadata may not set '{k}'; it is written from the settings")
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    metadata.update(settings_md)
    metadata.update({
        "format": "pt",
        KEY_CONTENT: CONTENT_LORA,
        KEY_LORA_ALPHA: repr(alpha),
        # Pipeline layout: fields prefixed with the component, as FluxPipeline.save_lora_weights does.
        LORA_ADAPTER_METADATA_KEY: json.dumps({TRANSFORMER_PREFIX + k: v for k, v in adapter_cfg.items()},
                                              indent=2, sort_keys=True),
    })
    atomic_write(path, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata=metadata))
    return path


# --- export from a model -------------------------------------------------------------------

def _peft_config(transformer, adapter_name: str):
    configs = getattr(transformer, "peft_config", None) or {}
    if adapter_name not in configs:
        raise LoraError(f"the transformer has no LoRA adapter named '{adapter_name}' "
                        f"(it has {sorted(configs) or 'none'})")
    return configs[adapter_name]


def lora_state_dict_from_model(transformer, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors in diffusers naming (``transformer.<module>.lora_A.weight``).

    Uses peft's ``get_peft_model_state_dict``; tensors are detached CPU copies, ready for
    :func:`save_lora`. Works on a diffusers model with an injected adapter and on a peft
    ``PeftModel`` wrapping one.
    """
    from peft.utils import get_peft_model_state_dict

    _peft_config(transformer, adapter_name)
    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    out = {}
    for k, v in sd.items():
        key = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        out[TRANSFORMER_PREFIX + key] = v.detach().to("cpu", copy=True).contiguous()
    return out


def adapter_rank_alpha(transformer, adapter_name: str = DEFAULT_ADAPTER_NAME) -> tuple[int, float]:
    """``(r, lora_alpha)`` of an adapter on the model (from its peft LoraConfig)."""
    cfg = _peft_config(transformer, adapter_name)
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise LoraError(f"adapter '{adapter_name}' has per-layer ranks/alphas; FluxSR files carry one "
                        "rank and one alpha")
    return int(cfg.r), float(cfg.lora_alpha)


def save_lora_from_model(path: str | os.PathLike, transformer, settings: RunSettings,
                         adapter_name: str = DEFAULT_ADAPTER_NAME,
                         extra_metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Export an adapter on ``transformer`` as a FluxSR LoRA file (see :func:`save_lora`)."""
    rank, alpha = adapter_rank_alpha(transformer, adapter_name)
    if getattr(_peft_config(transformer, adapter_name), "use_rslora", False):
        raise LoraError("rsLoRA adapters are not exported: FluxSR files use the plain alpha/r scaling")
    return save_lora(path, lora_state_dict_from_model(transformer, adapter_name), settings,
                     rank=rank, alpha=alpha, extra_metadata=extra_metadata)

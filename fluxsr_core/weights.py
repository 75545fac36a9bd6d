"""Model file formats and safe loading for the FLUX transformer and VAE.

What users have on disk, and what this module turns it into (diffusers key names plus a
diffusers config dict, ready for :mod:`fluxsr_core.models`):

* ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` in BFL keys (``double_blocks.*``,
  ``single_blocks.*``, ``img_in``...), also with ComfyUI's ``model.diffusion_model.`` prefix,
  in bf16, fp16, fp8 (``float8_e4m3fn`` / ``float8_e5m2``) or ComfyUI's *scaled* fp8.
* ``ae.safetensors`` (the FLUX VAE in BFL/LDM keys: ``encoder.down.0.block...``).
* single safetensors files in diffusers keys (``transformer_blocks.*``, ``encoder.down_blocks.*``).
* diffusers model folders: ``config.json`` beside ``diffusion_pytorch_model.safetensors`` or the
  shards its ``.index.json`` names (:func:`read_diffusers_folder`).
* GGUF transformers (city96's quantisations, ComfyUI-GGUF's format; :func:`read_gguf_transformer`).

Key conversion uses diffusers' own converters from ``diffusers.loaders.single_file_utils``
(the code behind ``from_single_file``), so we map keys exactly as diffusers does.

Safety: model weights are read from safetensors (and GGUF, which holds no code) only. Pickle files (``.pt``, ``.pth``,
``.ckpt``, ``.bin``) are refused for model weights, because unpickling can run code.
:func:`safe_torch_load_tensors` is the one place a pickle is opened, with
``torch.load(weights_only=True)``, for the small third-party embedding files.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

PathLike = Union[str, Path]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                "float8_e5m2fnuz") if hasattr(torch, n))

# diffusers' BFL->diffusers transformer converter hard-codes FLUX.1's width for one split
# (``single_blocks.N.linear1`` = q | k | v | mlp); see _convert_bfl_transformer.
_DIFFUSERS_CONVERTER_INNER_DIM = 3072
_DIFFUSERS_CONVERTER_MLP_RATIO = 4

# Prefixes other tools put in front of the keys we know.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")


# --------------------------------------------------------------------------------------- errors

class WeightsError(ValueError):
    """A weights file exists but cannot be used as asked (base class)."""


class WeightsNotFoundError(FileNotFoundError):
    """A weights path does not exist."""


class CorruptWeightsError(WeightsError):
    """Empty, truncated or not the format its name says."""


class UnsafeWeightsError(WeightsError):
    """A pickle where only safetensors is accepted, or a pickle holding more than tensors."""


class WrongModelError(WeightsError):
    """A valid file holding a different kind of model than the one asked for."""


class UnsupportedWeightsError(WeightsError):
    """A real model file in a variant FluxSR does not load (e.g. GGUF outside the transformer, odd widths)."""


# --------------------------------------------------------------------------------- file reading

def _sniff(path: Path, n: int = 9) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # u64 little-endian header length, then the JSON header itself, which starts with "{".
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= size


def _looks_like_pickle(head: bytes, size: int) -> bool:
    r"""torch.save's zip container ("PK\x03\x04") or a raw pickle (PROTO opcode 0x80, protocol 2-5).

    A safetensors header of 128 + 256*k bytes (k <= 5) also starts 0x80 0x0k, so a file that
    parses as safetensors is never called a pickle.
    """
    if _looks_like_safetensors(head, size):
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _existing_file(path: PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise WeightsError(f"{what} {p} is a folder; a file was expected here")
    if p.stat().st_size == 0:
        raise CorruptWeightsError(f"{what} {p} is empty (0 bytes): the download or copy failed; "
                                  f"re-download it")
    return p


def _check_safetensors_container(p: Path, what: str) -> None:
    """Refuse pickles and GGUF by name and by content before asking safetensors to parse."""
    head = _sniff(p)
    if p.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(head, p.stat().st_size):
        raise UnsafeWeightsError(
            f"{what} {p} is a pickle file ({p.suffix or 'pickle content'}); FluxSR never unpickles model "
            f"weights because loading a pickle can run arbitrary code. Convert it to safetensors "
            f"(e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')) "
            f"or download the .safetensors release")
    if head.startswith(GGUF_MAGIC) or p.suffix.lower() == ".gguf":
        raise UnsupportedWeightsError(
            f"{what} {p} is a GGUF quantised file; FluxSR reads GGUF only for the FLUX transformer "
            f"(--transformer); this file must be safetensors")


def _corrupt(p: Path, what: str, exc: BaseException) -> CorruptWeightsError:
    return CorruptWeightsError(f"{what} {p} is truncated or not a safetensors file; re-download it "
                               f"(safetensors said: {exc})")


def read_safetensors(path: PathLike, what: str = "weights file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file to CPU: ``(state_dict, metadata)``.

    Raises :class:`WeightsNotFoundError` (missing), :class:`CorruptWeightsError` (0 bytes,
    truncated, not safetensors), :class:`UnsafeWeightsError` (a pickle: never unpickled here)
    and :class:`UnsupportedWeightsError` (GGUF). ``what`` names the file in messages.
    """
    from safetensors import SafetensorError, safe_open

    p = _existing_file(path, what)
    _check_safetensors_container(p, what)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise _corrupt(p, what, exc) from None
    return state_dict, metadata


def read_safetensors_header(path: PathLike, what: str = "weights file"
                            ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Keys, dtypes and shapes without reading tensor data: ``({key: (dtype, shape)}, metadata)``.

    Cheap even for a 23 GB file; used to say what a file is before loading it.
    Same errors as :func:`read_safetensors`.
    """
    from safetensors import SafetensorError, safe_open

    p = _existing_file(path, what)
    _check_safetensors_container(p, what)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            info = {}
            for k in f.keys():
                sl = f.get_slice(k)
                info[k] = (str(sl.get_dtype()), tuple(sl.get_shape()))
    except (SafetensorError, OSError) as exc:
        raise _corrupt(p, what, exc) from None
    return info, metadata


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def meta_state_dict(path: PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The file's tensors as meta-device tensors of their shapes and dtypes (nothing is read
    but the header): enough to infer a config or count bytes. Errors as for
    :func:`read_safetensors_header`."""
    info, _ = read_safetensors_header(path, what)
    return {k: torch.empty(shape, dtype=getattr(torch, _SAFETENSORS_DTYPES.get(dtype, "float32")), device="meta")
            for k, (dtype, shape) in info.items()}


# ------------------------------------------------------------------------------------ GGUF
# city96's GGUF files of FLUX.1-dev (Q8_0 down to Q2_K; ComfyUI-GGUF's format) hold the BFL keys
# with the weights quantised block-wise along each row. gguf-py reads the file (memory-mapped);
# the quantised tensors become diffusers' ``GGUFParameter`` and its GGUF layers dequantise them;
# the keys are mapped as for a safetensors file.

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install gguf"


def is_gguf_file(path: PathLike) -> bool:
    """True for an existing file that starts with GGUF's magic bytes or is named ``*.gguf``."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    try:
        return p.suffix.lower() == ".gguf" or _sniff(p, 4) == GGUF_MAGIC
    except OSError:  # unreadable: the loader that opens it says why
        return False


def _gguf_reader(path: PathLike, what: str, mode: str = "r"):
    p = _existing_file(path, what)
    try:
        import gguf
    except ImportError as exc:
        why = f"({GGUF_INSTALL})" if exc.name in (None, "gguf") else f"(installed, but its import fails: {exc})"
        raise UnsupportedWeightsError(f"{what} {p} is a GGUF file; reading GGUF needs the gguf package {why}") from None
    if _sniff(p, 4) != GGUF_MAGIC:
        raise CorruptWeightsError(f"{what} {p} is named .gguf but does not start as a GGUF file does; the "
                                  f"download failed or it is another format: re-download it")
    try:
        return gguf.GGUFReader(str(p), mode)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors...
        raise CorruptWeightsError(f"{what} {p} is a truncated or damaged GGUF file; re-download it "
                                  f"(gguf said: {type(exc).__name__}: {exc})") from None


def read_gguf_header(path: PathLike, what: str = "GGUF file") -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``{name: (quantisation type, shape, bytes)}`` of a GGUF file's tensors, nothing dequantised
    (the file is memory-mapped). Shapes are the unquantised tensors', in torch's order."""
    return _gguf_header_of(_gguf_reader(path, what))


def _gguf_header_of(reader) -> dict[str, tuple[str, tuple[int, ...], int]]:
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())), int(t.n_bytes))
            for t in reader.tensors}


def _gguf_meta(header: Mapping[str, tuple[str, tuple[int, ...], int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, (_, shape, _) in header.items()}


def gguf_transformer_config(path: PathLike, what: str = "transformer file") -> dict:
    """The diffusers config of a GGUF FLUX transformer, read off its header; other models raise
    :class:`WrongModelError`, quantisation types diffusers cannot compute with
    :class:`UnsupportedWeightsError`."""
    p = Path(path).expanduser()
    return _gguf_config_of(p, read_gguf_header(p, what), what)


def _gguf_config_of(p: Path, header: Mapping[str, tuple[str, tuple[int, ...], int]], what: str) -> dict:
    meta = _gguf_meta(header)
    require_flux_transformer(p, meta)
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    known = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16", "BF16"}
    unknown = sorted({q for q, _, _ in header.values()} - known)
    if unknown:
        raise UnsupportedWeightsError(
            f"{what} {p} holds tensors quantised as {', '.join(unknown)}, which this diffusers cannot compute "
            f"with (it can: {', '.join(sorted(known))}); use another quantisation of FLUX.1-dev, e.g. Q8_0 or Q4_K_S")
    return infer_transformer_config(meta)


def gguf_transformer_bytes(path: PathLike, what: str = "transformer file") -> dict[str, Any]:
    """Bytes of a GGUF transformer's tensors as stored (quantised), for the memory-mode choice:
    ``{"blocks": [bytes per block...], "rest": bytes, "largest_quantised": elements}`` (the
    largest quantised tensor's element count: each call dequantises one weight at a time)."""
    header = read_gguf_header(path, what)
    blocks: dict[str, int] = {}
    rest = 0
    largest = max((math.prod(shape) for q, shape, _ in header.values() if q not in ("F32", "F16")), default=0)
    for key, (_, _, n) in header.items():
        key = _strip_any(key, TRANSFORMER_PREFIXES)
        m = re.match(r"((?:double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+)\.", key)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + n
        else:
            rest += n
    return {"blocks": list(blocks.values()), "rest": rest, "largest_quantised": largest}


def _gguf_tensors(reader) -> dict[str, torch.Tensor]:
    """A GGUF reader's tensors as views of the memory-mapped file, as diffusers' ``load_gguf_checkpoint``
    types them (quantised and BF16 ones as its ``GGUFParameter``, F32/F16 as plain tensors). Ours
    because that function copies every tensor: the whole file (12.7 GB for Q8_0) in RAM before a
    byte reaches the GPU; mapped, the file only passes through the page cache. ``reader`` is opened
    copy-on-write (mode "c"): a write into a weight (none of ours writes; an API user's might)
    changes this process's copy of that page, never the file, and never faults on a read-only
    mapping."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        data = torch.from_numpy(t.data)
        out[t.name] = data if t.tensor_type in plain else GGUFParameter(data, quant_type=t.tensor_type)
    return out


def read_gguf_transformer(path: PathLike, what: str = "transformer file") -> tuple[dict[str, torch.Tensor], dict]:
    """A GGUF FLUX transformer as ``(diffusers-keyed state dict, diffusers config)``: the quantised
    tensors stay quantised (diffusers' ``GGUFParameter``), views of the memory-mapped file. Keys that
    do not make up exactly the model the config describes raise :class:`CorruptWeightsError`."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    p = Path(path).expanduser()
    reader = _gguf_reader(p, what, mode="c")  # one mapping for the header's checks and the tensors
    config = _gguf_config_of(p, _gguf_header_of(reader), what)
    sd = _select_transformer_keys(_gguf_tensors(reader))
    if identify_checkpoint(sd.keys()) == "flux-transformer-bfl":
        sd = _convert_bfl_transformer(sd)  # row splits and concatenations keep the quantisation blocks whole
    with init_empty_weights():
        expected = set(FluxTransformer2DModel.from_config(config).state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:  # diffusers' loader would hand such a dict to its BFL converter, or leave meta weights
        raise keys_do_not_fit(f"{what} {p}", "a FLUX transformer", missing, unexpected)
    return sd, config


def keys_do_not_fit(source: str, model: str, missing: Sequence[str], unexpected: Sequence[str]) -> CorruptWeightsError:
    """The error for weights whose keys are not those of the model their config describes."""
    return CorruptWeightsError(
        f"{source} does not fit {model} with the config read from it: missing {list(missing[:5])}"
        f"{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected[:5])}{'...' if len(unexpected) > 5 else ''}. "
        f"The file is incomplete or a variant FluxSR does not load")


DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"


def _shard_map(folder: Path) -> Optional[dict[str, str]]:
    """A diffusers folder's shard index, ``{tensor: shard file}``; None when it has none."""
    index = folder / f"{DIFFUSERS_WEIGHTS_NAME}.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptWeightsError(f"{index} is not a valid shard index ({type(exc).__name__}: {exc}); "
                                  f"re-download the folder") from None


def diffusers_folder_files(folder: PathLike, what: str = "model folder") -> list[Path]:
    """The safetensors files holding a diffusers model folder's weights: its
    ``diffusion_pytorch_model.safetensors``, or the shards its ``.safetensors.index.json`` names.

    A missing shard raises :class:`WeightsNotFoundError` (an incomplete download), a broken
    index :class:`CorruptWeightsError`, a folder of pickles (``.bin``) :class:`UnsafeWeightsError`.
    """
    folder = Path(folder).expanduser()
    index = folder / f"{DIFFUSERS_WEIGHTS_NAME}.safetensors.index.json"
    single = folder / f"{DIFFUSERS_WEIGHTS_NAME}.safetensors"
    weight_map = _shard_map(folder)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsNotFoundError(f"{what} {folder}: {len(missing)} of the {len(names)} shards {index.name} "
                                       f"names are missing ({', '.join(missing[:3])}): the download is incomplete")
        return [folder / n for n in names]
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(f"{what} {folder} holds its weights as pickles ({', '.join(pickles[:3])}); FluxSR "
                                 f"never unpickles model weights because loading a pickle can run arbitrary code. "
                                 f"Use the folder's safetensors release")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    raise WeightsNotFoundError(f"{what} {folder} has no {single.name} or {index.name}"
                               + (f"; it holds {', '.join(others[:3])}: pass that file itself" if others else ""))


def read_diffusers_folder(folder: PathLike, what: str = "model folder") -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model folder (:func:`diffusers_folder_files`), read as
    :func:`read_safetensors` reads one file (memory-mapped, nothing copied yet). A tensor in two
    shards, or one the index names that no shard holds, raises :class:`CorruptWeightsError`."""
    files = diffusers_folder_files(folder, what)
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        shard, _ = read_safetensors(f, what)
        twice = sorted(set(shard) & set(state_dict))
        if twice:
            raise CorruptWeightsError(f"{what} {folder}: {twice[0]} is in two shards (one is {f.name}); "
                                      f"re-download the folder")
        state_dict.update(shard)
    weight_map = _shard_map(Path(folder).expanduser())
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state_dict))
        if absent:
            raise CorruptWeightsError(f"{what} {folder}: {len(absent)} tensors its index names are in no shard "
                                      f"(e.g. {absent[0]}); re-download the folder")
    return state_dict


TensorPayload = Union[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]


def safe_torch_load_tensors(path: PathLike, what: str = "tensor file") -> TensorPayload:
    """Open a torch pickle (``.pt``/``.pth``) that must hold only tensors, without running code.

    Uses ``torch.load(weights_only=True)``: a pickle that references any class or function
    beyond tensors and plain containers is refused by torch *before* anything runs; that
    refusal becomes :class:`UnsafeWeightsError`. Accepts a tensor, a flat dict ``{str: tensor}``
    or a flat list/tuple of tensors (returned as a list); anything else is refused.
    """
    p = _existing_file(path, what)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{what} {p} holds more than tensors (it references Python objects or code), so it was "
            f"refused without running it. Only plain tensor files are accepted; ask the author for "
            f"a safetensors file. (torch said: {str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptWeightsError(f"{what} {p} is truncated or not a torch tensor file; re-download it "
                                  f"(torch said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                                  ) from None
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise UnsafeWeightsError(f"{what} {p} is a dict whose entries {bad[:5]} are not tensors; "
                                     f"expected a flat {{name: tensor}} dict")
        return dict(obj)
    if isinstance(obj, (list, tuple)):
        if not all(isinstance(v, torch.Tensor) for v in obj):
            raise UnsafeWeightsError(f"{what} {p} is a list holding non-tensors; expected tensors only")
        return list(obj)
    raise UnsafeWeightsError(f"{what} {p} holds a {type(obj).__name__}; expected a tensor, "
                             f"a flat dict of tensors or a list of tensors")


# ------------------------------------------------------------------------------ identification

KIND_DESCRIPTIONS = {
    "flux-transformer-bfl": "a FLUX transformer (BFL/ComfyUI keys, e.g. flux1-dev.safetensors); pass it as --transformer",
    "flux-transformer-diffusers": "a FLUX transformer (diffusers keys); pass it as --transformer",
    "flux-vae-bfl": "a VAE (ae.safetensors); pass it as --vae",
    "flux-vae-diffusers": "a VAE (diffusers keys); pass it as --vae",
    "lora": "a LoRA; pass it as --lora",
    "fluxsr-bundle": "a FluxSR conditioning bundle (t5, clip_pooled); pass it as --conditioning",
    "clip-text": "a CLIP text encoder; FluxSR needs no text encoder at run time (it uses fixed embeddings)",
    "t5-text": "a T5 text encoder; FluxSR needs no text encoder at run time (it uses fixed embeddings)",
    "sd-unet": "a Stable Diffusion (SD1.x/SDXL) UNet checkpoint, not FLUX",
    "sd3-mmdit": "a Stable Diffusion 3 (MMDiT) model or checkpoint, not FLUX (its VAE is not FLUX's either)",
    "unknown": "not a model FluxSR recognises",
}


def _strip_any(key: str, prefixes: Iterable[str]) -> str:
    for pre in prefixes:
        if key.startswith(pre):
            return key[len(pre):]
    return key


def identify_checkpoint(keys: Iterable[str]) -> str:
    """Classify a state dict by its key names.

    Returns one of ``flux-transformer-bfl``, ``flux-transformer-diffusers``, ``flux-vae-bfl``,
    ``flux-vae-diffusers``, ``lora``, ``fluxsr-bundle``, ``clip-text``, ``t5-text``,
    ``sd-unet``, ``sd3-mmdit``, ``unknown`` (see :data:`KIND_DESCRIPTIONS`). ComfyUI's
    ``model.diffusion_model.`` and LDM's ``first_stage_model.``/``vae.`` prefixes are understood;
    a full ComfyUI checkpoint (transformer + VAE + text encoders) counts as a transformer.
    """
    keys = list(keys)
    kset = set(keys)
    if {"t5", "clip_pooled"} <= kset:
        return "fluxsr-bundle"
    # LoRA before the models: LoRA keys also contain "double_blocks" or "transformer_blocks".
    # Every LoRA naming (peft lora_A/B, kohya lora_unet_*/lora_down, XLabs proj_lora) says "lora";
    # no base-model key does.
    if any("lora" in k.lower() for k in keys):
        return "lora"
    tkeys = {_strip_any(k, TRANSFORMER_PREFIXES) for k in keys}
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in tkeys) and \
            any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd-unet"
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in tkeys) or "img_in.weight" in tkeys:
        return "flux-transformer-bfl"
    if any(k.startswith("joint_blocks.") for k in tkeys):  # SD3's MMDiT (its checkpoints bundle a VAE)
        return "sd3-mmdit"
    dkeys = {_strip_any(k, ("transformer.",)) for k in keys}
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in dkeys) and \
            ("x_embedder.weight" in dkeys or any(k.startswith("single_transformer_blocks.") for k in dkeys)):
        return "flux-transformer-diffusers"
    if any(k.startswith("input_blocks.0.0.") for k in tkeys):
        return "sd-unet"
    vkeys = {_strip_any(k, VAE_PREFIXES) for k in keys}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in vkeys):
        return "flux-vae-bfl"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in vkeys):
        return "flux-vae-diffusers"
    if any("text_model.encoder.layers." in k or "text_model.embeddings." in k or
           k.startswith("transformer.resblocks.") for k in keys):
        return "clip-text"
    if any(re.search(r"(^|\.)encoder\.block\.\d+\.layer\.", k) for k in keys) or \
            ("shared.weight" in kset and any(".SelfAttention." in k for k in keys)):
        return "t5-text"
    return "unknown"


def _wrong_kind(path: Path, wanted: str, kind: str, keys: Iterable[str]) -> WrongModelError:
    desc = KIND_DESCRIPTIONS.get(kind, KIND_DESCRIPTIONS["unknown"])
    if kind == "unknown":
        first = sorted(keys)[:4]
        desc += f" (first keys: {first})"
    return WrongModelError(f"{path} is not {wanted}: it looks like {desc}")


def require_flux_transformer(path: PathLike, keys: Iterable[str]) -> str:
    """The kind of a FLUX transformer file from its keys (BFL or diffusers naming); any other kind of
    file raises :class:`WrongModelError` saying what it looks like (a VAE: pass it as --vae)."""
    keys = list(keys)
    kind = identify_checkpoint(keys)
    if kind not in ("flux-transformer-bfl", "flux-transformer-diffusers"):
        raise _wrong_kind(Path(path), "a FLUX transformer", kind, keys)
    return kind


# ------------------------------------------------------------------------- shipped configs

def shipped_config(name: str) -> dict:
    """A JSON config shipped in ``fluxsr_core/configs`` (name without ``.json``)."""
    res = resources.files("fluxsr_core.configs").joinpath(f"{name}.json")
    if not res.is_file():
        available = sorted(p.name[:-5] for p in resources.files("fluxsr_core.configs").iterdir()
                           if p.name.endswith(".json"))
        raise KeyError(f"no shipped config {name!r}; available: {available}")
    return json.loads(res.read_text(encoding="utf-8"))


def _shipped(kind: str) -> list[dict]:
    out = []
    for p in sorted(resources.files("fluxsr_core.configs").iterdir(), key=lambda p: p.name):
        if p.name.endswith(f"-{kind}.json"):
            out.append(json.loads(p.read_text(encoding="utf-8")))
    return out


def _strip_meta(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------ fp8 handling

class RowScaledStateDict(dict):
    """A state dict some of whose weights are still a scaled-fp8 file's fp8 values:
    ``row_scales[key]`` (float32, one value per output row) is what each row of ``self[key]``
    is multiplied by. The model loader applies it one tensor at a time as the tensor goes to
    its device (``models._instantiate``), so no full-precision copy of the file is ever made
    (FLUX.1-dev's scaled fp8 file is 12 GB; dequantised at once it took 47 GB of RAM)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], row_scales: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.row_scales = row_scales


def split_scaled_fp8(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's *scaled* fp8 format taken apart: ``(tensors, row scales)``, where each scaled
    weight's true value is ``tensors[key] * row_scales[key]`` per output row.

    Such files carry a ``scaled_fp8`` marker and a ``<layer>.scale_weight`` per quantised
    layer (a scalar, or one value per output row); ``scale_input`` only serves fp8 matmuls and
    is dropped. ComfyUI's newer per-layer format is read too: ``<layer>.comfy_quant`` (JSON
    bytes) saying ``float8_e4m3fn`` or ``float8_e5m2``, with ``<layer>.weight_scale`` (and an
    ``input_scale``, dropped); its NVFP4 layers are refused (4-bit blocks FluxSR does not
    compute). The scales are float32 ``[rows]`` (a scalar repeated). Files without scales come
    back as they are, with no scales.
    """
    comfy_layers = [k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")]
    for layer in comfy_layers:
        fmt = _comfy_quant_format(sd[f"{layer}.comfy_quant"], layer)
        if fmt not in ("float8_e4m3fn", "float8_e5m2"):
            raise UnsupportedWeightsError(
                f"this file is quantised in ComfyUI's {fmt!r} format ({layer}.comfy_quant), which FluxSR does not "
                "load outside ComfyUI: use it in ComfyUI (FluxSR Upscale takes any MODEL ComfyUI loads), or give "
                "fluxsr the bf16, an fp8 (e4m3fn, also scaled) or a GGUF file of FLUX.1-dev")
    scale_keys = [k for k in sd if k.endswith(".scale_weight")] + [f"{layer}.weight_scale" for layer in comfy_layers]
    if not scale_keys and "scaled_fp8" not in sd:
        return dict(sd), {}
    dropped = {"scaled_fp8", *scale_keys, *(f"{layer}.{part}" for layer in comfy_layers
                                            for part in ("comfy_quant", "input_scale"))}
    out = {k: v for k, v in sd.items() if k not in dropped and not k.endswith(".scale_input")}
    scales = {}
    for sk in scale_keys:
        if sk not in sd:
            raise CorruptWeightsError(f"{sk[: -len('.weight_scale')]}.comfy_quant says fp8, but the file has no {sk}")
        wk = sk.rsplit(".", 1)[0] + ".weight"
        if wk not in out:
            raise CorruptWeightsError(f"scaled fp8 file has {sk} but no {wk}")
        w, s = out[wk], sd[sk].to(torch.float32)
        if s.numel() not in (1, w.shape[0]):
            raise UnsupportedWeightsError(
                f"scaled fp8 file: {sk} has shape {tuple(sd[sk].shape)}, which is neither a scalar nor "
                f"one value per output row of {wk} {tuple(w.shape)}; convert the file to bf16 first")
        scales[wk] = s.reshape(-1).expand(w.shape[0]).clone()
    return out, scales


def _comfy_quant_format(config: torch.Tensor, layer: str) -> str:
    """The ``format`` a ComfyUI ``<layer>.comfy_quant`` tensor (JSON text as uint8) names."""
    try:
        fmt = json.loads(bytes(config.to(torch.uint8).tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError, RuntimeError):
        fmt = None
    if not isinstance(fmt, str):
        raise CorruptWeightsError(f"{layer}.comfy_quant is not ComfyUI's JSON quantisation config with a format")
    return fmt


def apply_row_scale(weight: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight * row_scale`` per output row (a scaled-fp8 weight's true value), in ``dtype``."""
    scale = row_scale.to(weight.device, dtype).reshape(-1, *([1] * (weight.ndim - 1)))
    return weight.to(dtype) * scale


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
                          ) -> dict[str, torch.Tensor]:
    """Undo ComfyUI's *scaled* fp8 format at once: ``weight = weight_fp8 * scale_weight``
    (:func:`split_scaled_fp8`); every scaled weight comes back in ``dtype``. Returns a new dict;
    files without scales pass through. Model loading does not use it: it applies the scales
    tensor by tensor (:class:`RowScaledStateDict`)."""
    out, scales = split_scaled_fp8(sd)  # both formats (.scale_weight and .comfy_quant/.weight_scale)
    if not scales and "scaled_fp8" not in sd:
        return sd
    for wk, s in scales.items():
        out[wk] = apply_row_scale(out[wk], s, dtype)
    return out


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors (fp8 included) to ``dtype``; fp8 -> wider is exact."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


# --------------------------------------------------------------------- transformer conversion

def _block_count(keys: Iterable[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise CorruptWeightsError(f"blocks {prefix}N are not numbered 0..{max(idx)} (have {sorted(idx)}): "
                                  f"the file is incomplete")
    return max(idx) + 1


def _select_transformer_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ComfyUI's prefix; from a full checkpoint keep only the transformer."""
    for pre in TRANSFORMER_PREFIXES:
        if any(k.startswith(pre) for k in sd):
            return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    if all(k.startswith("transformer.") for k in sd):
        return {k[len("transformer."):]: v for k, v in sd.items()}
    return dict(sd)


def _convert_bfl_transformer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL keys -> diffusers keys with diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``.

    That converter splits ``single_blocks.N.linear1`` (q | k | v | mlp) with FLUX.1's widths
    hard-coded (3072, 4 x 3072). For other widths (the tiny test models) we split linear1
    ourselves with the file's width, hand the converter a shape-only placeholder on the meta
    device so it walks its usual path, and put our pieces in place of its (meta) output.
    Everything else (every name, the final layer's shift/scale swap) is the converter's.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    work = dict(sd)  # the converter pops from its argument
    hidden = work["img_in.weight"].shape[0]
    n_single = _block_count(work, "single_blocks.")
    ours: dict[str, torch.Tensor] = {}
    if hidden != _DIFFUSERS_CONVERTER_INNER_DIM:
        expected_rows = _DIFFUSERS_CONVERTER_INNER_DIM * (3 + _DIFFUSERS_CONVERTER_MLP_RATIO)
        for i in range(n_single):
            for part in ("weight", "bias"):
                key = f"single_blocks.{i}.linear1.{part}"
                if key not in work:  # as the converter says it at FLUX.1's own width
                    raise CorruptWeightsError(f"the file lacks {key!r}: it is incomplete or not a FLUX.1 "
                                              "transformer in BFL keys")
                t = work.pop(key)
                mlp = t.shape[0] - 3 * hidden
                if mlp != _DIFFUSERS_CONVERTER_MLP_RATIO * hidden:
                    raise UnsupportedWeightsError(
                        f"{key} has {t.shape[0]} rows; a FLUX single block of width {hidden} has "
                        f"{(3 + _DIFFUSERS_CONVERTER_MLP_RATIO) * hidden} (q, k, v and a 4x MLP)")
                q, k, v, m = torch.split(t, [hidden, hidden, hidden, mlp], dim=0)
                pre = f"single_transformer_blocks.{i}."
                ours.update({f"{pre}attn.to_q.{part}": q, f"{pre}attn.to_k.{part}": k,
                             f"{pre}attn.to_v.{part}": v, f"{pre}proj_mlp.{part}": m})
                work[key] = torch.empty((expected_rows, *t.shape[1:]), device="meta", dtype=t.dtype)
    try:
        out = convert_flux_transformer_checkpoint_to_diffusers(work)
    except KeyError as exc:
        raise CorruptWeightsError(f"the file lacks {exc.args[0]!r}: it is incomplete or not a FLUX.1 "
                                  f"transformer in BFL keys") from None
    leftover = sorted(work)
    if leftover:
        raise UnsupportedWeightsError(
            f"{len(leftover)} keys of this file have no place in a FLUX.1 transformer "
            f"(e.g. {leftover[:5]}); it may be a FLUX variant FluxSR does not load")
    out.update(ours)
    return out


def infer_transformer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers ``FluxTransformer2DModel`` config read off a state dict's shapes.

    Accepts BFL or diffusers keys. Reads depth (double/single blocks), width, head size,
    ``guidance_embeds`` (FLUX.1-dev yes, schnell no), ``joint_attention_dim`` (BFL
    ``context_in_dim``) and ``pooled_projection_dim`` (``vec_in_dim``). The rotary split
    ``axes_dims_rope`` is not stored in weights: it comes from the shipped config with the
    same head size (FLUX.1: [16, 56, 56]); for other head sizes pass a config.
    """
    keys = list(sd)
    if identify_checkpoint(keys) == "flux-transformer-bfl":
        sd = _select_transformer_keys(dict(sd))
        try:
            inner, in_ch = sd["img_in.weight"].shape
            joint = sd["txt_in.weight"].shape[1]
            pooled = sd["vector_in.in_layer.weight"].shape[1]
            out_ch = sd["final_layer.linear.weight"].shape[0]
            head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0] \
                if "double_blocks.0.img_attn.norm.query_norm.scale" in sd \
                else sd["single_blocks.0.norm.query_norm.scale"].shape[0]
        except KeyError as exc:
            raise CorruptWeightsError(f"the file lacks {exc.args[0]!r}; it is incomplete or not FLUX.1") from None
        n_double = _block_count(sd, "double_blocks.")
        n_single = _block_count(sd, "single_blocks.")
        guidance = "guidance_in.in_layer.weight" in sd
    else:
        sd = _select_transformer_keys(dict(sd))
        try:
            inner, in_ch = sd["x_embedder.weight"].shape
            joint = sd["context_embedder.weight"].shape[1]
            pooled = sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]
            out_ch = sd["proj_out.weight"].shape[0]
            head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0] \
                if "transformer_blocks.0.attn.norm_q.weight" in sd \
                else sd["single_transformer_blocks.0.attn.norm_q.weight"].shape[0]
        except KeyError as exc:
            raise CorruptWeightsError(f"the file lacks {exc.args[0]!r}; it is incomplete or not FLUX.1") from None
        n_double = _block_count(sd, "transformer_blocks.")
        n_single = _block_count(sd, "single_transformer_blocks.")
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    if inner % head_dim:
        raise UnsupportedWeightsError(f"width {inner} is not a multiple of the head size {head_dim}")
    matches = [c for c in _shipped("transformer") if c["attention_head_dim"] == head_dim]
    if not matches:
        raise UnsupportedWeightsError(
            f"no shipped FLUX config has head size {head_dim} (FLUX.1 uses 128), so the rotary "
            f"embedding split is unknown; load it from a diffusers folder with its config.json")
    config = _strip_meta(matches[0])
    config.update({
        "in_channels": int(in_ch), "num_layers": n_double, "num_single_layers": n_single,
        "attention_head_dim": int(head_dim), "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(joint), "pooled_projection_dim": int(pooled),
        "guidance_embeds": bool(guidance), "patch_size": 1,
    })
    if out_ch != in_ch:
        config["out_channels"] = int(out_ch)
    return config


def transformer_state_dict_to_diffusers(sd: dict[str, torch.Tensor], source: str = "state dict"
                                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """Any FLUX transformer state dict -> ``(diffusers-keyed state dict, diffusers config)``.

    BFL/ComfyUI keys are converted; diffusers keys pass through. Tensors keep their dtype (fp8
    stays fp8; the caller casts). A scaled-fp8 file comes back as a :class:`RowScaledStateDict`:
    its tensors still hold the raw fp8 values, their row scales apart (applied tensor by tensor
    when loaded, or :func:`apply_row_scale`); a plain cast would lose the scales. Other kinds of
    model raise :class:`WrongModelError` naming what the file looks like.
    """
    kind = identify_checkpoint(sd.keys())
    if kind == "flux-transformer-bfl":
        sd, scales = split_scaled_fp8(_select_transformer_keys(sd))
        config = infer_transformer_config(sd)
        converted = _convert_bfl_transformer(sd)
        if scales:
            converted = RowScaledStateDict(converted, _convert_row_scales(sd, scales))
        return converted, config
    if kind == "flux-transformer-diffusers":
        sd, scales = split_scaled_fp8(_select_transformer_keys(sd))
        return (RowScaledStateDict(sd, scales) if scales else sd), infer_transformer_config(sd)
    raise _wrong_kind(Path(source), "a FLUX transformer", kind, sd.keys())


def _convert_row_scales(bfl: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL file's row scales under the diffusers keys their rows end up in.

    The conversion only splits, joins and reorders rows (q | k | v, the final layer's
    shift/scale swap), so the same conversion of a stand-in dict, whose every tensor is its
    rows' scales (1 where the file has none), carries each scale to its rows' new key."""
    ones = torch.ones(1)
    stand_in = {k: scales[k] if k in scales else ones.expand(v.shape[0] if v.ndim else 1) for k, v in bfl.items()}
    return {k: v.contiguous() for k, v in _convert_bfl_transformer(stand_in).items() if not bool((v == 1).all())}


# ------------------------------------------------------------------------------ VAE conversion

def _select_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for pre in VAE_PREFIXES:
        if any(k.startswith(pre) for k in sd):
            return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return dict(sd)


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers ``AutoencoderKL`` config read off a diffusers-keyed VAE state dict.

    Reads channel widths per level, blocks per level, latent channels and whether quant
    convs exist. ``norm_num_groups``, ``sample_size`` and the latent shift/scale are not in
    the weights: they come from the shipped config with the same widths (FLUX VAE or the
    tiny test VAE), else FLUX's values with 32 groups (every SD/FLUX VAE uses 32).
    """
    try:
        levels = _block_count(sd, "encoder.down_blocks.")
        widths = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
        layers = _block_count(sd, "encoder.down_blocks.0.resnets.")
        latent = int(sd["decoder.conv_in.weight"].shape[1])
        in_ch = int(sd["encoder.conv_in.weight"].shape[1])
        out_ch = int(sd["decoder.conv_out.weight"].shape[0])
    except KeyError as exc:
        raise CorruptWeightsError(f"the VAE lacks {exc.args[0]!r}; it is incomplete") from None
    if latent != 16:
        raise WrongModelError(
            f"this VAE has {latent} latent channels; FLUX needs its 16-channel VAE (ae.safetensors). "
            f"A 4-channel VAE is a Stable Diffusion VAE")
    shipped = _shipped("vae")
    match = next((c for c in shipped if list(c["block_out_channels"]) == widths), None)
    config = _strip_meta(match if match is not None else shipped[0])
    if match is None:
        if any(w % 32 for w in widths):
            raise UnsupportedWeightsError(
                f"VAE widths {widths} match no shipped config and are not multiples of 32 groups; "
                f"load it from a diffusers folder with its config.json")
        config["norm_num_groups"] = 32
    n = len(widths)
    config.update({
        "block_out_channels": widths, "layers_per_block": layers, "latent_channels": latent,
        "in_channels": in_ch, "out_channels": out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
        # any of its tensors: from one key alone, a file missing it lost all the others unnoticed
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in sd),
    })
    return config


def vae_state_dict_to_diffusers(sd: dict[str, torch.Tensor], source: str = "state dict"
                                ) -> tuple[dict[str, torch.Tensor], dict]:
    """Any FLUX VAE state dict -> ``(diffusers-keyed state dict, diffusers config)``.

    ``ae.safetensors`` (LDM keys) goes through diffusers' ``convert_ldm_vae_checkpoint``,
    which needs only the number of levels from the config; diffusers keys pass through.
    """
    kind = identify_checkpoint(sd.keys())
    if kind == "flux-transformer-bfl" and any(k.startswith(VAE_PREFIXES) for k in sd):
        # a ComfyUI FLUX checkpoint (transformer, VAE and text encoders in one file): its VAE
        sd = _select_vae_keys(sd)
        kind = identify_checkpoint(sd.keys())
    if kind == "flux-vae-bfl":
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = _select_vae_keys(sd)
        levels = _block_count(sd, "encoder.down.")
        shape_config = {"down_block_types": ["DownEncoderBlock2D"] * levels,
                        "up_block_types": ["UpDecoderBlock2D"] * levels}
        converted = convert_ldm_vae_checkpoint(sd, shape_config)
        return converted, infer_vae_config(converted)
    if kind == "flux-vae-diffusers":
        sd = _select_vae_keys(sd)
        return sd, infer_vae_config(sd)
    raise _wrong_kind(Path(source), "a FLUX VAE", kind, sd.keys())


# ----------------------------------------------------------------- diffusers -> BFL (export)

def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_state_dict_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FLUX transformer keys -> BFL keys (the layout of ``flux1-dev.safetensors``).

    The exact inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: fuses
    q|k|v (and the single blocks' q|k|v|mlp) back into one tensor and swaps the final
    modulation's halves back to BFL's (shift, scale). Writes files ComfyUI's UNETLoader reads;
    the tests use it to check that diffusers' converter brings them back bit for bit.
    Raises :class:`WeightsError` if a key has no BFL place.
    """
    src = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(dk: str, bk: str) -> None:
        out[bk] = src.pop(dk)

    def fuse(dks: list[str], bk: str) -> None:
        out[bk] = torch.cat([src.pop(k) for k in dks], dim=0)

    has_guidance = "time_text_embed.guidance_embedder.linear_1.weight" in src
    for part in ("weight", "bias"):
        take(f"x_embedder.{part}", f"img_in.{part}")
        take(f"context_embedder.{part}", f"txt_in.{part}")
        take(f"proj_out.{part}", f"final_layer.linear.{part}")
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(src.pop(f"norm_out.linear.{part}"))
        for dname, bname in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                             ("guidance_embedder", "guidance_in")):
            if dname == "guidance_embedder" and not has_guidance:
                continue
            take(f"time_text_embed.{dname}.linear_1.{part}", f"{bname}.in_layer.{part}")
            take(f"time_text_embed.{dname}.linear_2.{part}", f"{bname}.out_layer.{part}")
    for i in range(_block_count(src, "transformer_blocks.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part in ("weight", "bias"):
            take(f"{d}norm1.linear.{part}", f"{b}img_mod.lin.{part}")
            take(f"{d}norm1_context.linear.{part}", f"{b}txt_mod.lin.{part}")
            fuse([f"{d}attn.to_{x}.{part}" for x in "qkv"], f"{b}img_attn.qkv.{part}")
            fuse([f"{d}attn.add_{x}_proj.{part}" for x in "qkv"], f"{b}txt_attn.qkv.{part}")
            take(f"{d}attn.to_out.0.{part}", f"{b}img_attn.proj.{part}")
            take(f"{d}attn.to_add_out.{part}", f"{b}txt_attn.proj.{part}")
            take(f"{d}ff.net.0.proj.{part}", f"{b}img_mlp.0.{part}")
            take(f"{d}ff.net.2.{part}", f"{b}img_mlp.2.{part}")
            take(f"{d}ff_context.net.0.proj.{part}", f"{b}txt_mlp.0.{part}")
            take(f"{d}ff_context.net.2.{part}", f"{b}txt_mlp.2.{part}")
        take(f"{d}attn.norm_q.weight", f"{b}img_attn.norm.query_norm.scale")
        take(f"{d}attn.norm_k.weight", f"{b}img_attn.norm.key_norm.scale")
        take(f"{d}attn.norm_added_q.weight", f"{b}txt_attn.norm.query_norm.scale")
        take(f"{d}attn.norm_added_k.weight", f"{b}txt_attn.norm.key_norm.scale")
    for i in range(_block_count(src, "single_transformer_blocks.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part in ("weight", "bias"):
            take(f"{d}norm.linear.{part}", f"{b}modulation.lin.{part}")
            fuse([f"{d}attn.to_q.{part}", f"{d}attn.to_k.{part}", f"{d}attn.to_v.{part}",
                  f"{d}proj_mlp.{part}"], f"{b}linear1.{part}")
            take(f"{d}proj_out.{part}", f"{b}linear2.{part}")
        take(f"{d}attn.norm_q.weight", f"{b}norm.query_norm.scale")
        take(f"{d}attn.norm_k.weight", f"{b}norm.key_norm.scale")
    if src:
        raise WeightsError(f"{len(src)} keys have no place in a BFL FLUX file (e.g. {sorted(src)[:5]}); "
                           f"unmerged LoRA layers must be fused first")
    return out


def bfl_row_sources(shapes: Mapping[str, Iterable[int]]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Where each BFL tensor's rows come from, for a FLUX transformer whose diffusers keys have
    these shapes: ``{bfl_key: [(diffusers_key, rows), ...]}``, ``rows`` the positions in the BFL
    tensor (dim 0) holding that diffusers tensor's rows 0, 1, ... in order.

    Read off :func:`transformer_state_dict_to_bfl` itself, run on tensors whose entries are row
    labels: so the split of the fused q|k|v and q|k|v|mlp and the swapped halves of the final
    modulation are exactly the converter's. A LoRA's ``B`` in BFL names splits the same way
    (its ``A`` is shared), which is how :mod:`fluxsr_core.lora` reads BFL-named LoRAs.
    """
    probe, starts, names, start = {}, [], [], 0
    for key, shape in shapes.items():
        n = int(list(shape)[0]) if len(list(shape)) else 1
        probe[key] = torch.arange(start, start + n, dtype=torch.float64)  # exact integers to 2**53
        starts.append(start)
        names.append(key)
        start += n
    first_row = torch.tensor(starts, dtype=torch.long)
    out = {}
    for bkey, labels in transformer_state_dict_to_bfl(probe).items():
        ids = labels.reshape(-1).long()
        owner = torch.searchsorted(first_row, ids, right=True) - 1
        parts = []
        for o in dict.fromkeys(owner.tolist()):
            positions = (owner == o).nonzero().reshape(-1)
            rows = ids[positions] - first_row[o]
            parts.append((names[o], positions[torch.argsort(rows)]))
        out[bkey] = parts
    return out


def vae_state_dict_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM/BFL keys (the layout of ``ae.safetensors``).

    Inverse of diffusers' ``convert_ldm_vae_checkpoint``: LDM numbers decoder levels the
    other way round and stores the mid-block attention projections as 1x1 convolutions.
    """
    src = dict(sd)
    out: dict[str, torch.Tensor] = {}
    n_up = _block_count(src, "decoder.up_blocks.")

    def resnet(dk: str) -> str:
        return dk.replace("conv_shortcut", "nin_shortcut")

    for k in list(src):
        t = src.pop(k)
        nk = k
        m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k)
        if m:
            nk = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)):
            nk = resnet(f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}")
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            nk = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)):
            nk = resnet(f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}")
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            nk = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k)):
            nk = resnet(f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}")
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k)):
            names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            layer, part = m.group(2).rsplit(".", 1)
            if layer not in names:
                raise WeightsError(f"VAE key {k} has no place in an LDM/BFL VAE")
            nk = f"{m.group(1)}.mid.attn_1.{names[layer]}.{part}"
            if layer != "group_norm" and part == "weight" and t.ndim == 2:
                t = t[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        elif not re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", k):
            raise WeightsError(f"VAE key {k} has no place in an LDM/BFL VAE")
        out[nk] = t
    return out


def describe_file(path: PathLike) -> str:
    """One line saying what a safetensors or GGUF file holds (kind, tensor count, dtypes or
    quantisation types)."""
    if is_gguf_file(path):
        header = read_gguf_header(path)
        kind = identify_checkpoint(header)
        counts = Counter(q for q, _, _ in header.values())
        types = ", ".join(f"{q} x{n}" for q, n in counts.most_common())
        return f"{Path(path).name}: GGUF, {KIND_DESCRIPTIONS.get(kind, kind)}; {len(header)} tensors, {types}"
    info, _ = read_safetensors_header(path)
    kind = identify_checkpoint(info)
    dtypes = sorted({d for d, _ in info.values()})
    return f"{Path(path).name}: {KIND_DESCRIPTIONS.get(kind, kind)}; {len(info)} tensors, {', '.join(dtypes)}"


# --------------------------------------------------------------------------------- identity

_FINGERPRINT_CHUNKS = 16
_FINGERPRINT_CHUNK_BYTES = 64 * 1024


def _file_digest(path: Path, h) -> int:
    """Feed ``path``'s size and content into ``h``: the whole file up to 1 MiB, else 16 chunks of
    64 KiB spread evenly over it (a few reads, however large the file); returns its size."""
    size = path.stat().st_size
    h.update(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= _FINGERPRINT_CHUNKS * _FINGERPRINT_CHUNK_BYTES:
            h.update(f.read())
        else:
            step = (size - _FINGERPRINT_CHUNK_BYTES) / (_FINGERPRINT_CHUNKS - 1)
            for i in range(_FINGERPRINT_CHUNKS):
                f.seek(int(i * step))
                h.update(f.read(_FINGERPRINT_CHUNK_BYTES))
    return size


def weights_fingerprint(*paths: PathLike) -> str:
    """``"<bytes>:<16 hex>"``: a cheap fingerprint of model files or folders (every file in a
    folder, hidden files and ``.md`` left out): their sizes and a sampled hash (see
    :func:`_file_digest`), not a full hash. Other weights changed throughout (a fine-tune, an fp8
    file, another seed) give another fingerprint, as the samples are spread over the whole file
    and not only its ends; a change confined to some tensors (a LoRA merged into a few layers)
    can fall between the samples of a large file and leave it as it was. Moving or renaming a
    file or folder does not change it. The one
    algorithm ``fluxsr-train pairs`` (its teacher, the path given) and ``fluxsr-train train`` (the
    base model of a resume, a pipeline folder's ``transformer/``) fingerprint weights with; the
    two values are not compared with each other."""
    h = hashlib.sha256()
    total = 0
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                  p.relative_to(root).parts)
            and p.suffix.lower() != ".md")
        for f in files:
            if f != root:  # a folder's layout is part of it; a single file's name is not
                h.update(f.relative_to(root).as_posix().encode() + b"\0")
            total += _file_digest(f, h)
    return f"{total}:{h.hexdigest()[:16]}"


__all__ = [
    "weights_fingerprint",
    "WeightsError", "WeightsNotFoundError", "CorruptWeightsError", "UnsafeWeightsError",
    "WrongModelError", "UnsupportedWeightsError", "read_safetensors", "read_safetensors_header", "meta_state_dict",
    "is_gguf_file", "read_gguf_header", "require_flux_transformer", "gguf_transformer_config", "gguf_transformer_bytes", "read_gguf_transformer",
    "DIFFUSERS_WEIGHTS_NAME", "diffusers_folder_files", "read_diffusers_folder",
    "safe_torch_load_tensors", "identify_checkpoint", "KIND_DESCRIPTIONS", "shipped_config",
    "dequantize_scaled_fp8", "split_scaled_fp8", "apply_row_scale", "RowScaledStateDict", "cast_state_dict", "infer_transformer_config",
    "transformer_state_dict_to_diffusers", "infer_vae_config", "vae_state_dict_to_diffusers",
    "describe_file", "FP8_DTYPES", "PICKLE_SUFFIXES", "transformer_state_dict_to_bfl", "bfl_row_sources",
    "vae_state_dict_to_bfl",
]

"""Assembling the diffusers FLUX transformer and VAE, and the two interfaces over them.

* :func:`load_transformer` / :func:`load_vae`: from a diffusers folder, a single safetensors
  file (BFL/ComfyUI or diffusers keys; bf16, fp16, fp8, scaled fp8), a GGUF transformer
  (city96's quantisations, through diffusers' GGUF support) or a shipped test config.
  Nothing ever comes from the hub: folders are built from their own ``config.json`` and single
  files from configs inferred from their shapes plus ``fluxsr_core/configs``; either way the
  tensors go to the device one at a time.
* :class:`DiffusersVelocity` (a :class:`~fluxsr_core.interfaces.VelocityModel`) and
  :class:`DiffusersCodec` (a :class:`~fluxsr_core.interfaces.LatentCodec`).
* :func:`apply_memory_mode`: none, model_offload, group_offload (diffusers' and accelerate's own
  hooks), fp8_storage, fp8_storage_all (:func:`store_in_fp8`: diffusers' layer selection, a
  traceable cast per call).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import latents as L
from . import memory
from .files import first_line
from .interfaces import Conditioning
from .weights import (CorruptWeightsError, FP8_DTYPES, WeightsNotFoundError, WrongModelError, apply_row_scale,
                      is_gguf_file, read_safetensors, shipped_config, transformer_state_dict_to_diffusers,
                      vae_state_dict_to_diffusers)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
MEMORY_MODES = ("none", "model_offload", "group_offload", "fp8_storage", "fp8_storage_all")
FP8_MODES = ("fp8_storage", "fp8_storage_all")
# A GGUF transformer is quantised already (fp8 storage would have nothing to store) and its
# weights are diffusers' GGUFParameter, which a LoRA merge, a q|k|v fusion and torch.compile of
# the dequantising layers are not made for (compile: untested here, so not offered).
GGUF_MEMORY_MODES = ("none", "model_offload", "group_offload")
GGUF_REFUSED_SPEEDUPS = ("fuse_qkv", "compile", "compile_cudagraphs")
# Names of shipped configs that may be built with random weights. Test models only: a random
# FLUX.1-dev would be 12B parameters of noise, so it is never offered.
RANDOM_INIT_NAMES = {"tiny": "tiny"}

TRANSFORMER_HELP = ("Pass a FLUX.1 transformer: a single .safetensors file (flux1-dev.safetensors in "
                    "BFL/ComfyUI keys, an fp8 release, or diffusers keys), a GGUF file "
                    "(flux1-dev-Q8_0.gguf; needs pip install gguf) or a diffusers folder "
                    "(with config.json, or a pipeline folder with a transformer/ subfolder).")
# Training's base and teacher: no GGUF (its quantised weights would change what the student learns).
TRANSFORMER_HELP_NO_GGUF = ("Pass a FLUX.1 transformer: a single .safetensors file (flux1-dev.safetensors in "
                            "BFL/ComfyUI keys, an fp8 release, or diffusers keys) or a diffusers folder (with "
                            "config.json, or a pipeline folder with a transformer/ subfolder); not a GGUF file.")
VAE_HELP = ("Pass the FLUX VAE: ae.safetensors, a diffusers VAE .safetensors file, or a diffusers "
            "folder (with config.json, or a pipeline folder with a vae/ subfolder).")

_EXEC_DEVICE_ATTR = "_fluxsr_execution_device"
_FP8_MODE_ATTR = "_fluxsr_fp8_mode"
_COMPUTE_DTYPE_ATTR = "_fluxsr_compute_dtype"


# ----------------------------------------------------------------------------- device, dtype

def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` -> a device.

    A device that is not there raises ValueError saying what is available. ``cuda`` becomes
    ``cuda:<current>`` so device comparisons (offload hooks) see one spelling.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not has_mps:
            raise ValueError("device 'mps' asked for but Apple's MPS backend is not available here; "
                             "use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if name == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"device {name!r}: expected cuda:N with N a number") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise ValueError(f"device {name!r}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                "float32": torch.float32, "float": torch.float32}


def resolve_dtype(name: Union[str, torch.dtype, None] = "auto",
                  device: Union[str, torch.device, None] = None) -> torch.dtype:
    """``bf16`` | ``fp16`` | ``fp32`` | ``auto`` (or a torch dtype) -> compute dtype.

    ``auto``: bf16 on CUDA GPUs with bf16 hardware (compute capability 8 and up: Ampere and
    later), fp16 on older ones (T4, V100: ``torch.cuda.is_bf16_supported()`` says yes there too,
    by emulation, and torch's fused attention has no bf16 kernel below sm80, so every attention
    would take the slow math path), on MPS bf16 from macOS 14 (where Metal has it; FLUX's
    activations overflow fp16, and from macOS 14.5 fp16 attention gives black images, as
    ComfyUI also found) and fp16 before, fp32 on CPU (bf16 matmuls on CPU are slow and fp16
    ones are missing on some builds). ``device`` defaults to :func:`resolve_device`
    ``("auto")``; its own capability decides, not the current GPU's.
    """
    if isinstance(name, torch.dtype):
        if name not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute dtype must be bf16, fp16 or fp32, not {name}")
        return name
    key = (name or "auto").strip().lower()
    if key in _DTYPE_NAMES:
        return _DTYPE_NAMES[key]
    if key != "auto":
        raise ValueError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32")
    dev = resolve_device(device if device is not None else "auto")
    if dev.type == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        return torch.bfloat16 if major >= 8 else torch.float16
    if dev.type == "mps":
        return torch.bfloat16 if _macos_version() >= (14,) else torch.float16
    return torch.float32


def _macos_version() -> tuple[int, ...]:
    """The macOS version as numbers (``(14, 5)``); ``()`` elsewhere or when unreadable."""
    import platform

    try:
        return tuple(int(n) for n in platform.mac_ver()[0].split(".") if n)
    except ValueError:
        return ()


# ------------------------------------------------------------------------------- assembling

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous, 64-byte aligned tensor (a copy only when needed).

    Tensors read from safetensors are not 64-byte aligned (measured: 16), and the converters
    hand out views (split q|k|v, sliced 1x1 convs). Adopted as parameters as they are, CPU
    matmul kernels take other code paths for them and results drift in the last bits, so the
    same weights would not give identical outputs from a file and from a folder.
    """
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _instantiate(cls, config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 source: str, device: Optional[torch.device] = None,
                 prepare: Optional[Callable[[Any], Optional[Callable]]] = None):
    """Build ``cls`` on the meta device and adopt the tensors (no second copy of 12B weights).

    Each tensor is cast and moved to ``device`` (default: the CPU) on its own, so loading
    straight onto a GPU never holds the model in RAM: with safetensors' memory-mapped tensors
    the file passes through the page cache (which the OS can drop), one tensor at a time.

    ``prepare(meta_model)`` may lay the meta model out first (fp8 storage: each tensor then
    takes the dtype its parameter has there, or keeps a file's own fp8 values, see
    :func:`_stored_in_fp8`) and return ``edit(key, tensor_on_device)``, given every floating
    tensor at its true value before its cast, returning the tensor to use instead (a LoRA
    merge) or None to leave it as it is.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    target = torch.device("cpu") if device is None else device
    edit, dtypes = None, {}
    if prepare is not None:
        model = torch.nn.Module.to(model, dtype=dtype)  # meta: free; the layout starts from dtype
        edit = prepare(model)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    parts_of, pending = _fused_qkv_keys(model), {}
    fused_of = {part: fused for fused, parts in parts_of.items() for part in parts}
    row_scales = getattr(state_dict, "row_scales", {})  # a scaled-fp8 file's (weights.RowScaledStateDict)
    kept_scales = {}  # fp8 weights kept as the file stores them, with the file's row scales
    # One tensor at a time, replacing in place, so a 23 GB file never exists twice in memory.
    for k in list(state_dict):
        t = state_dict.pop(k)
        t = _storable_on(target, t, dtype)
        placed = t.to(device=target)
        if t.is_floating_point():
            layout = dtypes.get(fused_of.get(k, k), dtype)
            if layout in FP8_DTYPES:
                placed, scale = _stored_in_fp8(k, placed, row_scales.get(k), layout, edit)
                if scale is not None:
                    kept_scales[k] = scale
            else:
                if k in row_scales:
                    placed = apply_row_scale(placed, row_scales[k])
                edited = edit(k, placed) if edit is not None else None
                placed = (placed if edited is None else edited).to(layout)
        if target.type == "cpu" and placed.dtype not in FP8_DTYPES:  # fp8: each call computes with a copy
            placed = _aligned(placed)
        fused = fused_of.get(k)
        if fused is None:
            state_dict[k] = placed
        else:  # a fused layout (fuse_qkv): q|k|v concatenated as soon as all three are here
            pending[k] = placed
            if all(part in pending for part in parts_of[fused]):
                state_dict[fused] = _fuse_rows(fused, parts_of[fused], pending, kept_scales,
                                               dtypes.get(fused, dtype))
        del t, placed
    state_dict.update(pending)  # an incomplete group: reported below as the file's fault
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that disagree with the config (a folder's hand-edited config.json)
        detail = str(exc).strip().splitlines()
        raise CorruptWeightsError(f"{source}: the weights do not fit a {cls.__name__} with its config "
                                  f"({detail[-1].strip() if detail else exc}); the config or the weights are "
                                  f"from another model") from None
    # load_state_dict does not count a key under a child that is None (a layer the config left
    # out) as unexpected: compared here, such a tensor is not dropped unnoticed
    unexpected = sorted(set(result.unexpected_keys) | (set(state_dict) - set(model.state_dict())))
    if result.missing_keys or unexpected:
        from .weights import keys_do_not_fit

        raise keys_do_not_fit(source, f"a {cls.__name__}", result.missing_keys, unexpected)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CorruptWeightsError(f"{source}: no weights for {still_meta[:5]}")
    for key, scale in kept_scales.items():
        setattr(model.get_submodule(key.rsplit(".", 1)[0]), _FP8_ROW_SCALE_ATTR, scale)
    return model.eval()


def pinned_copy_bytes(module: torch.nn.Module) -> int:
    """Page-locked bytes a pinned copy of ``module``'s tensors takes: torch's pinned allocator
    rounds each allocation up to a power of two (its CachingHostAllocator), so FLUX.1-dev's
    22.2 GiB of bf16 weights take 34.6 GiB pinned, tensor by tensor."""
    sizes = (t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))
    return sum(1 << (n - 1).bit_length() if n > 1 else n for n in sizes)


def _pin_as_it_goes(pinned_bytes: int) -> bool:
    """Whether diffusers' streamed group offloading should pin each block as it moves it
    (``low_cpu_mem_usage``, slower) instead of keeping a pinned copy of all the weights
    (``pinned_bytes``, :func:`pinned_copy_bytes`), made beside the transformer already in CPU
    memory before the copies replace it. Pinned as it goes where CPU memory has less than that
    and a quarter more available (:func:`memory.available_cpu_bytes`)."""
    available = memory.available_cpu_bytes()
    pin_as_it_goes = available is not None and available < pinned_bytes * 5 // 4
    if pin_as_it_goes:
        log.info("group_offload: %.1f GiB of CPU memory available, a pinned copy of the weights takes %.1f GiB: each "
                 "block is pinned as it moves (slower) rather than all at once", available / GIB, pinned_bytes / GIB)
    return pin_as_it_goes


def _storable_on(target: torch.device, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in a dtype ``target`` can hold: an fp8 file's weight bound for Apple's MPS, which has
    no float8 in most torch releases (moving one there raises TypeError), widened to ``dtype``
    on the CPU first, exactly (every e4m3fn and e5m2 value is a bf16, fp16 and fp32 value);
    anything else as it is."""
    if target.type == "mps" and t.dtype in FP8_DTYPES:
        return t.to(dtype)
    return t


def _stored_in_fp8(key: str, weight: torch.Tensor, row_scale: Optional[torch.Tensor], layout: torch.dtype,
                   edit: Optional[Callable]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A tensor an fp8 mode stores in fp8 (``layout``): ``(stored tensor, row scale or None)``,
    the stored value times the scale per output row being the weight the layer computes with.

    A file's own fp8 values are kept bit for bit, in its own fp8 dtype and with its scales, so
    an e5m2 or a scaled fp8 file is not rounded a second time (to e4m3fn: a scaled file's
    weights lay up to half an e4m3fn step off, an e5m2 file's small weights lost their bits).
    A weight the LoRA changes is merged in fp32 at its true value and stored again over the
    file's row scale where it has one (a row the merge takes past the fp8 range gets the scale
    that just holds it); a wider file's weights are cast to ``layout`` as diffusers' layerwise
    casting does.
    """
    if edit is not None:
        edited = edit(key, weight if row_scale is None else apply_row_scale(weight, row_scale))
        if edited is not None:
            if row_scale is None:
                return edited.to(layout), None
            stored = weight.dtype if weight.dtype in FP8_DTYPES else layout
            edited = edited.to(torch.float32)
            # the file's scale puts its largest weight at the top of the fp8 range: a row the
            # LoRA pushes past it takes a larger scale, so nothing is clipped
            reach = edited.abs().reshape(edited.shape[0], -1).amax(dim=1) / torch.finfo(stored).max
            scale = torch.maximum(row_scale.to(edited.device, torch.float32), reach)
            rows = scale.reshape(-1, *([1] * (edited.ndim - 1)))
            return _saturated(edited / rows, stored), scale
    if weight.dtype in FP8_DTYPES:
        return weight, None if row_scale is None else row_scale.to(weight.device, torch.float32)
    if row_scale is not None:
        weight = apply_row_scale(weight, row_scale)
    return weight.to(layout), None


def _saturated(values: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``values`` cast to an fp8 dtype, clamped to its range first (torch's cast saturates some
    fp8 dtypes and overflows others to inf or NaN)."""
    limit = torch.finfo(fp8).max
    return values.clamp_(-limit, limit).to(fp8)


def _fuse_rows(fused: str, parts: list[str], pending: dict[str, torch.Tensor], kept_scales: dict[str, torch.Tensor],
               layout: torch.dtype) -> torch.Tensor:
    """The q|k|v parts of one fused projection (:func:`fuse_qkv_projections`) concatenated by
    rows, taken out of ``pending``; their row scales (1 for a part without) join under the
    fused key. Parts stored in different dtypes are joined at their true values in ``layout``."""
    tensors = [pending.pop(part) for part in parts]
    scales = [kept_scales.pop(part, None) for part in parts]
    if any(s is not None for s in scales):
        if len({t.dtype for t in tensors}) == 1:
            kept_scales[fused] = torch.cat([torch.ones(t.shape[0], device=t.device) if s is None else s
                                            for t, s in zip(tensors, scales)])
            return torch.cat(tensors)
        tensors = [t if s is None else apply_row_scale(t, s) for t, s in zip(tensors, scales)]
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.to(torch.float32) for t in tensors]
    return torch.cat(tensors).to(layout) if tensors[0].dtype not in FP8_DTYPES else torch.cat(tensors)


def _random_init(cls, config: dict, dtype: torch.dtype, seed: int):
    # fork_rng: building a test model must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config)
    # nn.Module.to, not ModelMixin.to: diffusers' override warns about fp32-kept modules on
    # every dtype cast, even for models that keep none.
    return torch.nn.Module.to(model, dtype=dtype).eval()


def _folder_with_config(path: Path, subfolder: str, expected_class: str, what: str,
                        help_text: str) -> tuple[Path, Optional[str]]:
    """Find the diffusers model folder: ``path`` itself or ``path/<subfolder>``."""
    import json

    candidates = [(path, None), (path / subfolder, subfolder)]
    for folder, sub in candidates:
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                cls_name = json.loads(cfg.read_text(encoding="utf-8")).get("_class_name")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptWeightsError(f"{cfg} is not valid JSON ({exc})") from None
            if cls_name and cls_name != expected_class:
                hint = {"AutoencoderKL": "a VAE folder; pass it as --vae",
                        "FluxTransformer2DModel": "a FLUX transformer folder; pass it as --transformer"}
                raise WrongModelError(f"{folder} is not {what}: its config.json is a {cls_name}"
                                      f"{' (' + hint[cls_name] + ')' if cls_name in hint else ''}")
            return path, sub
    listing = sorted(p.name for p in path.iterdir())[:12]
    raise WeightsNotFoundError(f"{path} is a folder without config.json or {subfolder}/config.json "
                               f"(it holds {listing}). {help_text}")


def _load_from_file(path: Path, cls, to_diffusers, dtype: torch.dtype, what: str,
                    device: Optional[torch.device] = None, prepare=None):
    sd, _ = read_safetensors(path, what)
    diffusers_sd, config = to_diffusers(sd, str(path))
    del sd
    return _instantiate(cls, config, diffusers_sd, dtype, str(path), device, prepare)


def _folder_config(folder: Path) -> dict:
    """A model folder's ``config.json``; a folder quantised by diffusers' quantisers
    (bitsandbytes, torchao, ...) is refused by name: its weights are not tensors of the model's
    shapes, and its loading would otherwise end in a 'do not fit' error blaming the file."""
    import json

    from .weights import UnsupportedWeightsError

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantised = config.get("quantization_config")
    if quantised:
        method = quantised.get("quant_method", "an unknown method") if isinstance(quantised, dict) else quantised
        raise UnsupportedWeightsError(
            f"{folder} holds weights quantised with {method} (its config.json has a quantization_config), which "
            "FluxSR does not load: use the bf16 or an fp8 file of FLUX.1-dev (with --memory-mode fp8_storage for "
            "a small card), or a GGUF file")
    return config


def _load_from_folder(folder: Path, cls, dtype: torch.dtype, what: str, device: Optional[torch.device] = None,
                      prepare=None):
    """A diffusers model folder built like a single file (:func:`_instantiate`), not with
    ``from_pretrained``: its shards then go to the device one tensor at a time too, so loading
    FLUX.1-dev's folder onto a GPU, or into an fp8 mode, never holds 22 GiB of bf16 in RAM
    (``from_pretrained`` builds the model on the CPU first)."""
    from .weights import read_diffusers_folder

    return _instantiate(cls, _folder_config(folder), read_diffusers_folder(folder, what), dtype, str(folder),
                        device, prepare)


def _model_folder(path: Path, subfolder: str, expected_class: str, what: str, help_text: str) -> Path:
    folder, sub = _folder_with_config(path, subfolder, expected_class, what, help_text)
    return folder / sub if sub else folder


def _align_parameters(model) -> None:
    """Give every parameter/buffer aligned contiguous storage (see :func:`_aligned`); in place.
    fp8 weights are left as they are (mapped from the file, not copied): every call computes
    with a fresh compute-dtype copy of them."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not p.is_meta and p.dtype not in FP8_DTYPES:
                    fixed = _aligned(p.data)
                    if fixed is not p.data:
                        p.data = fixed
            for name, b in list(module._buffers.items()):
                if b is not None and not b.is_meta:
                    module._buffers[name] = _aligned(b)


def _placement(device) -> Optional[torch.device]:
    return resolve_device(device) if device is not None else None


def is_gguf_model(module) -> bool:
    """Whether a model holds GGUF-quantised weights (diffusers' GGUF quantiser built it: it records
    ``quantization_method``, so no walk over the parameters is needed)."""
    return getattr(module, "quantization_method", None) == "gguf"


def _load_gguf(path: Path, dtype: torch.dtype, device: Optional[torch.device]):
    """A GGUF transformer through diffusers' GGUF support: its layers dequantise their weights to
    ``dtype`` at each call, so the weights stay as small as the file. diffusers' ``from_single_file``
    gets the state dict with our keys and a config read off the file (written to a temporary
    folder, as it wants one), so nothing is looked up on the hub."""
    from .weights import read_gguf_transformer

    state_dict, config = read_gguf_transformer(path, "transformer file")
    return gguf_transformer(state_dict, config, dtype, device)


def gguf_transformer(state_dict: dict, config: dict, dtype: torch.dtype, device: Optional[torch.device] = None):
    """A ``FluxTransformer2DModel`` over a diffusers-keyed state dict whose quantised tensors are
    diffusers' ``GGUFParameter`` (:func:`~fluxsr_core.weights.read_gguf_transformer`), built by
    diffusers' GGUF quantiser: its linears dequantise to ``dtype`` at each call."""
    import json
    import tempfile

    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    with tempfile.TemporaryDirectory(prefix="fluxsr-gguf-config-") as folder:
        Path(folder, "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}),
                                               encoding="utf-8")
        model = FluxTransformer2DModel.from_single_file(
            state_dict, config=folder, local_files_only=True, torch_dtype=dtype, device=device,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
    return model.eval()


def _finish(model, dtype, device):
    if not is_gguf_model(model):  # GGUF's tensors are the file's mapping: copying them would undo it (and drop their type)
        _align_parameters(model)
    setattr(model, _COMPUTE_DTYPE_ATTR, dtype)
    if device is not None:
        dev = resolve_device(device)
        model.to(dev)
        setattr(model, _EXEC_DEVICE_ATTR, dev)
    return model


def load_transformer(source: Union[PathLike, str], dtype: Union[str, torch.dtype] = "auto",
                     device: Union[str, torch.device, None] = "cpu", seed: int = 0):
    """Load a FLUX ``FluxTransformer2DModel``.

    ``source``: a diffusers folder (``config.json`` + safetensors, one file or shards, or a
    pipeline folder with ``transformer/``); a single ``.safetensors`` file in BFL/ComfyUI or
    diffusers keys (fp8 and scaled fp8 are cast to ``dtype``); a GGUF file (needs the ``gguf``
    package; the weights stay quantised and are dequantised to ``dtype`` at each call, see
    :func:`is_gguf_model`); or, only when no such path exists, the name of a shipped test config
    (``"tiny"``) built with random weights from ``seed``. ``device=None`` leaves it on the CPU
    without recording an execution device.
    Files go straight to ``device`` one tensor at a time: loaded onto a GPU, the model is never
    held in RAM (the files only pass through the page cache).
    Missing paths raise :class:`~fluxsr_core.weights.WeightsNotFoundError` saying what to pass;
    a file of another kind raises :class:`~fluxsr_core.weights.WrongModelError`.
    """
    from diffusers import FluxTransformer2DModel

    torch_dtype = resolve_dtype(dtype, device if device is not None else "cpu")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        folder = _model_folder(path, "transformer", "FluxTransformer2DModel", "a FLUX transformer", TRANSFORMER_HELP)
        model = _load_from_folder(folder, FluxTransformer2DModel, torch_dtype, "transformer folder", _placement(device))
    elif is_gguf_file(path):
        model = _load_gguf(path, torch_dtype, _placement(device))
    elif path.exists():
        model = _load_from_file(path, FluxTransformer2DModel, transformer_state_dict_to_diffusers,
                                torch_dtype, "transformer file", _placement(device))
    elif str(source) in RANDOM_INIT_NAMES:
        config = shipped_config(f"{RANDOM_INIT_NAMES[str(source)]}-transformer")
        model = _random_init(FluxTransformer2DModel, config, torch_dtype, seed)
    else:
        raise WeightsNotFoundError(f"transformer not found: {path}. {TRANSFORMER_HELP}")
    return _finish(model, torch_dtype, device)


def load_vae(source: Union[PathLike, str], dtype: Union[str, torch.dtype] = "auto",
             device: Union[str, torch.device, None] = "cpu", seed: int = 0):
    """Load the FLUX VAE (``AutoencoderKL``, 16 latent channels).

    ``source``: a diffusers folder (or a pipeline folder with ``vae/``), ``ae.safetensors`` (BFL
    keys, converted with diffusers' own converter), a diffusers-keyed ``.safetensors`` file, or
    (only when no such path exists) ``"tiny"``, the random test VAE. Errors as for
    :func:`load_transformer`.
    """
    from diffusers import AutoencoderKL

    torch_dtype = resolve_dtype(dtype, device if device is not None else "cpu")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        vae_config_of(path)  # a VAE of other latent channels is refused
        folder = _model_folder(path, "vae", "AutoencoderKL", "a VAE", VAE_HELP)
        model = _load_from_folder(folder, AutoencoderKL, torch_dtype, "VAE folder", _placement(device))
    elif path.exists():
        model = _load_from_file(path, AutoencoderKL, vae_state_dict_to_diffusers, torch_dtype, "VAE file",
                                _placement(device))
    elif str(source) in RANDOM_INIT_NAMES:
        config = shipped_config(f"{RANDOM_INIT_NAMES[str(source)]}-vae")
        model = _random_init(AutoencoderKL, config, torch_dtype, seed)
    else:
        raise WeightsNotFoundError(f"VAE not found: {path}. {VAE_HELP}")
    return _finish(model, torch_dtype, device)


def _fp8_probe(device: torch.device) -> None:
    """Store a float8 tensor on ``device`` and read it back (raises where the backend cannot)."""
    torch.zeros(1, device=device).to(torch.float8_e4m3fn).to(torch.float32)


def _refuse_fp8_where_unsupported(device: torch.device, memory_mode: str) -> None:
    """A device whose torch backend has no float8 (Apple's MPS, so far) would fail at the
    first weight with a bare TypeError: say so, and what to use instead, before any loading."""
    try:
        _fp8_probe(device)
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"memory mode {memory_mode} stores weights as float8, which {device.type} cannot hold with "
                         f"this torch ({torch.__version__}: {first_line(exc)}); use memory mode none or model_offload "
                         "(or a GGUF transformer) there") from None


def load_transformer_fp8(source: Union[PathLike, str], memory_mode: str, dtype: Union[str, torch.dtype] = "auto",
                         device: Union[str, torch.device] = "auto", lora: Optional[PathLike] = None,
                         lora_scale: float = 1.0, seed: int = 0, fuse_qkv: bool = False):
    """A FLUX transformer built straight into an fp8 memory mode on ``device``, the LoRA merged
    on the way; returns ``(transformer, LoraInfo or None)``.

    A single file is read one tensor at a time: each weight goes to the device, takes its LoRA
    delta there in fp32 (``lora.merge_factors``: peft's merge formula) and is cast to the dtype
    the mode stores it in, so neither RAM nor the device ever holds the model in full precision
    (FLUX.1-dev: 14.3 or 11.2 GiB on the device for fp8_storage / fp8_storage_all, instead of
    22 GiB of bf16 in RAM first); an fp8 file's weights are kept exactly as they are, in its
    own fp8 dtype (e4m3fn or e5m2) and with a scaled file's row scales, which each call applies
    in fp32 (a LoRA-merged weight is stored again with the file's scale). A
    diffusers folder is read the same way, shard by shard; the test names load as usual, merge through
    peft, then are cast. ``fuse_qkv``: laid out fused (:func:`fuse_qkv_projections`), each
    attention's q, k and v concatenated as they arrive, after their LoRA merge and cast (the
    cast is per element, so this equals fusing in full precision and casting after).
    :func:`apply_memory_mode` with the same mode afterwards only places the VAE.
    """
    from diffusers import FluxTransformer2DModel

    from . import lora as lora_mod

    if memory_mode not in FP8_MODES:
        raise ValueError(f"load_transformer_fp8 is for {', '.join(FP8_MODES)}, not {memory_mode!r}")
    check_gguf_options(source, memory_mode)
    dev = resolve_device(device)
    _refuse_fp8_where_unsupported(dev, memory_mode)
    torch_dtype = resolve_dtype(dtype, dev)
    every_linear = memory_mode == "fp8_storage_all"
    path = Path(str(source)).expanduser()
    if not path.exists():
        model = load_transformer(source, dtype=torch_dtype, device="cpu", seed=seed)
        info = lora_mod.load_lora(model, lora, scale=lora_scale, merge=True) if lora is not None else None
        if fuse_qkv:
            fuse_qkv_projections(model)
        store_in_fp8(model, torch_dtype, every_linear)
        return _finish(model, torch_dtype, dev), info
    found, merged_keys = {}, set()

    def prepare(meta):
        edit = None
        if lora is not None:
            found["factors"], found["info"] = lora_mod.merge_factors(meta, lora, lora_scale)
            factors = found["factors"]

            def edit(key: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
                if key not in factors:
                    return None
                a, b, factor = factors[key]
                merged_keys.add(key)
                merged = weight.to(torch.float32)
                return merged.addmm_(b.to(merged.device, torch.float32), a.to(merged.device, torch.float32),
                                     alpha=factor)
        if fuse_qkv:  # after merge_factors, which looks the LoRA's layers up by their own names
            fuse_qkv_projections(meta)
        store_in_fp8(meta, torch_dtype, every_linear)
        return edit

    if path.is_dir():
        folder = _model_folder(path, "transformer", "FluxTransformer2DModel", "a FLUX transformer", TRANSFORMER_HELP)
        model = _load_from_folder(folder, FluxTransformer2DModel, torch_dtype, "transformer folder", dev, prepare)
    else:
        model = _load_from_file(path, FluxTransformer2DModel, transformer_state_dict_to_diffusers, torch_dtype,
                                "transformer file", dev, prepare)
    missed = sorted(set(found.get("factors", ())) - merged_keys)
    if missed:  # a layer the LoRA names but the file's tensors did not bring: never drop it silently
        raise lora_mod.LoraError(f"{lora}: {len(missed)} LoRA layers found no weight in {path.name} while merging "
                                 f"(e.g. {missed[0]}); load without an fp8 memory mode to merge through peft")
    return _finish(model, torch_dtype, dev), found.get("info")


# ----------------------------------------------------------------------------- memory modes

def _hook_offload_pair(transformer, vae, device: torch.device) -> None:
    """Model-level CPU offload: each model sits on the device only while it runs.

    accelerate's ``cpu_offload_with_hook`` moves a model to the device on its first forward
    (diffusers' ``apply_forward_hook`` does the same for ``vae.encode``/``decode``) and
    offloads the *previous* model first. FluxSR alternates encode, transformer, decode per
    tile, so each model's hook offloads the other: a cycle, closed after both exist.
    """
    from accelerate import cpu_offload_with_hook

    transformer.to("cpu")
    vae.to("cpu")
    _, vae_hook = cpu_offload_with_hook(vae, execution_device=device)
    _, tr_hook = cpu_offload_with_hook(transformer, execution_device=device, prev_module_hook=vae_hook)
    vae_hook.hook.prev_module_hook = tr_hook
    transformer._fluxsr_offload_hook = tr_hook
    vae._fluxsr_offload_hook = vae_hook


_FP8_COMPUTE_ATTR = "_fluxsr_fp8_compute"


# A scaled fp8 file's row scales kept beside its fp8 weights (float32, one per output row). A
# plain attribute, not a buffer: DDP would broadcast every buffer at every training step.
_FP8_ROW_SCALE_ATTR = "_fluxsr_fp8_row_scale"


def _fp8_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The forward of a Linear whose weights are stored in fp8: a compute-dtype copy for this
    call only, which dynamo traces (the cast then fuses into the compiled graph). A scaled
    file's weight is its fp8 value times the row scale, multiplied in fp32 and rounded once:
    the weight memory mode none loads from the file. The fp8 value is exact in any compute
    dtype, and an in-place multiply by a float32 scale computes in float32, so no float32 copy
    of the weight is made (read 1 byte, write 2, then read 2 and write 2 per weight in bf16)."""
    dtype = getattr(self, _FP8_COMPUTE_ATTR)
    bias = None if self.bias is None else self.bias.to(dtype)
    row_scale = getattr(self, _FP8_ROW_SCALE_ATTR, None)
    if row_scale is None:
        weight = self.weight.to(dtype)
    else:  # copy=True: never scale the stored weight itself in place
        weight = self.weight.to(dtype, copy=True).mul_(row_scale.to(self.weight.device).unsqueeze(1))
    return torch.nn.functional.linear(x, weight, bias)


def fp8_layers(transformer, every_linear: bool) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers an fp8 mode stores in fp8: diffusers' layerwise-casting selection.

    ``enable_layerwise_casting``'s skip list (diffusers' defaults, the model's
    ``_keep_in_fp32_modules`` and ``_skip_layerwise_casting_patterns``, peft adapter layers), a
    name matching it skipping its whole subtree as there. FLUX's own pattern "norm" also matches
    its AdaLN modulation linears (``norm1.linear``...): ``every_linear`` leaves that pattern out
    (FLUX's RMSNorm/LayerNorm layers are no Linear, so nothing else changes).
    """
    import re

    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer

    patterns = (tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
                + tuple(getattr(transformer, "_skip_layerwise_casting_patterns", None) or ()))
    if every_linear:
        patterns = tuple(p for p in patterns if p != "norm")
    for layer in (LoraLayer, LoHaLayer, LoKrLayer):
        patterns += tuple(layer.adapter_layer_names)
    found = []

    def walk(module, prefix: str) -> None:
        if prefix and any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, torch.nn.Linear):
            found.append((prefix, module))
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(transformer, "")
    return found


def store_in_fp8(transformer, compute: torch.dtype, every_linear: bool) -> None:
    """The fp8 memory modes: the Linear weights :func:`fp8_layers` selects stored as
    ``float8_e4m3fn``, each call computing with a compute-dtype copy (in place, on any device,
    meta included; a second call for the same mode does nothing).

    The layers are diffusers' layerwise casting's, but only their weights are rounded to fp8
    (the biases stay: 4 MB in bf16 for FLUX.1-dev, 6 MB under fp8_storage_all; with biases
    ten times the tiny test model's initial ones, the velocity's relative error from fp32
    halved, 0.031 to 0.015), and not
    through its hooks, which re-create the layer's parameters in the compute dtype before each
    call and cast them back to fp8 after it. Here each call casts once, for the call only, and
    the forward stays traceable, so ``compile`` takes whole blocks. Measured with
    bench/run.py's small model on the CPU (fp32, one thread): 0.074 s per forward against the
    hooks' 0.093 s; compiled 0.044 s, where the hooks' graphs broke at every Linear (0.094 s).
    """
    mode = "fp8_storage_all" if every_linear else "fp8_storage"
    done = getattr(transformer, _FP8_MODE_ATTR, None)
    if done is not None:
        if done != mode:
            raise ValueError(f"the transformer is already stored as {done}; load it again for {mode}")
        return
    setattr(transformer, _FP8_MODE_ATTR, mode)
    import types

    for _, layer in fp8_layers(transformer, every_linear):
        # the weight only: a bias is one number per output (FLUX.1-dev's: 4 to 6 MB in bf16)
        # and is added after the product, where e4m3fn's 3 mantissa bits would be its error
        # alone; diffusers' layerwise casting rounds the biases too
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn),
                                          requires_grad=False)
        setattr(layer, _FP8_COMPUTE_ATTR, compute)
        layer.forward = types.MethodType(_fp8_linear_forward, layer)


GIB = 2 ** 30
# What ``auto`` leaves free beside the weights for the activations of an upscale with the
# default 1024 px tiles. Measured (bench/run.py --full-size --activation-peaks, FLUX.1-dev's width,
# bf16, torch's CPU kernels): the VAE decode of one 1024 px tile peaks at 2.50 GiB beyond the
# weights (2026-12-03). A whole x4 upscale to 2048 px peaks at 5.41 GiB with the VAE's whole-image
# activations (4.0 GiB, vae_tiling.held_bytes) on the device; with less than twice those free
# vae_tiling holds them in CPU memory, so this headroom needs only the tile's work. The other GiB
# is for what CUDA adds and the CPU cannot show (cuBLAS/cuDNN workspaces, the caching
# allocator's slack): an allowance until a GPU run measures it.
AUTO_HEADROOM_BYTES = int(3.5 * GIB)
# The order auto tries, fastest first; model_offload needs as much room as none, so never wins.
AUTO_ORDER = ("none", "fp8_storage", "fp8_storage_all", "group_offload")


def param_bytes(module) -> int:
    """Bytes of a module's parameters as stored (fp8 layers count one byte per weight)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_bytes_per_mode(transformer_config: dict, vae_bytes: int,
                          dtype: Union[str, torch.dtype] = torch.bfloat16) -> dict[str, int]:
    """Bytes of weights each memory mode keeps on the device, counted from the shapes.

    Meta-device models, nothing allocated: ``none`` both models; the fp8 modes the transformer
    laid out by the mode itself (:func:`store_in_fp8`) plus the VAE; ``model_offload`` the larger
    model; ``group_offload`` the layers outside the repeated blocks plus two of the largest
    block (the one running and the one prefetched), and the VAE. FLUX.1-dev in bf16: 22.3, 14.3,
    11.2, 22.2, 1.5 GiB.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    torch_dtype = resolve_dtype(dtype, "cpu")
    config = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}

    def skeleton():
        with init_empty_weights():
            return torch.nn.Module.to(FluxTransformer2DModel.from_config(config), dtype=torch_dtype)

    transformer = skeleton()
    t_bytes = param_bytes(transformer)
    blocks = [param_bytes(b) for b in
              list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)]
    out = {"none": t_bytes + vae_bytes}
    for mode in FP8_MODES:
        laid_out = skeleton()
        store_in_fp8(laid_out, torch_dtype, every_linear=mode == "fp8_storage_all")
        out[mode] = param_bytes(laid_out) + vae_bytes
    out["model_offload"] = max(t_bytes, vae_bytes)
    out["group_offload"] = t_bytes - sum(blocks) + 2 * max(blocks, default=0) + vae_bytes  # the VAE stays whole
    return out


def gguf_weight_bytes_per_mode(transformer_source, vae_bytes: int, lora_bytes: int = 0,
                               dtype: Union[str, torch.dtype] = torch.bfloat16) -> dict[str, int]:
    """:func:`weight_bytes_per_mode` for a GGUF transformer, from the sizes its tensors are stored
    in (they stay quantised on the device), only for the modes of :data:`GGUF_MEMORY_MODES`. Two
    costs GGUF always has are added: the LoRA, which stays an adapter (``lora_bytes``: in the
    compute dtype, on the device with the transformer), and the weight each layer dequantises at
    its call (the largest, as fp16 and then in the compute dtype)."""
    from .weights import gguf_transformer_bytes

    sizes = gguf_transformer_bytes(transformer_source)
    t_bytes = sizes["rest"] + sum(sizes["blocks"])
    workspace = sizes["largest_quantised"] * (2 + resolve_dtype(dtype, "cpu").itemsize)
    return {"none": t_bytes + vae_bytes + lora_bytes + workspace,
            "model_offload": max(t_bytes + lora_bytes, vae_bytes) + workspace,
            "group_offload": sizes["rest"] + 2 * max(sizes["blocks"], default=0) + vae_bytes + workspace}


def check_gguf_options(transformer_source, memory_mode: Optional[str], speedups=()) -> None:
    """Refuse, before anything loads, what a GGUF transformer cannot do (ValueError): an fp8
    memory mode (it is quantised already) and the speed-ups of :data:`GGUF_REFUSED_SPEEDUPS`.
    Other sources pass."""
    if is_gguf_file(transformer_source):
        _refuse_for_gguf(memory_mode, speedups)


def _refuse_for_gguf(memory_mode: Optional[str], speedups=()) -> None:
    if memory_mode in FP8_MODES:
        raise ValueError(f"memory mode {memory_mode} stores a safetensors transformer in fp8; this GGUF transformer "
                         f"is quantised already: use {', '.join(GGUF_MEMORY_MODES)} (or auto, which picks one)")
    refused = [n for n in _speedup_names(speedups) if n in GGUF_REFUSED_SPEEDUPS]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be used with a GGUF transformer (its weights stay quantised "
                         f"and are dequantised at each call); leave {'it' if len(refused) == 1 else 'them'} out")


def pick_memory_mode(weights: dict[str, int], free_bytes: int,
                     headroom_bytes: int = AUTO_HEADROOM_BYTES) -> tuple[str, str]:
    """The fastest mode of :data:`AUTO_ORDER` whose weights plus ``headroom_bytes`` fit in
    ``free_bytes``: ``(mode, reason)``; ``group_offload`` when none does. Modes missing from
    ``weights`` are not available for the files (fp8 storage of a GGUF file)."""
    for mode in (m for m in AUTO_ORDER if m in weights):
        if weights[mode] + headroom_bytes <= free_bytes:
            return mode, (f"{free_bytes / GIB:.1f} GiB free; {mode} keeps {weights[mode] / GIB:.1f} GiB of weights "
                          f"there, plus about {headroom_bytes / GIB:.1f} GiB for the activations")
    return "group_offload", (f"only {free_bytes / GIB:.1f} GiB free: even group_offload's "
                             f"{weights['group_offload'] / GIB:.1f} GiB of weights leave little room")


def transformer_config_of(source) -> dict:
    """The diffusers config of a transformer source (file, folder or test name), read from its
    header or config.json: no weights are loaded."""
    from .weights import infer_transformer_config, meta_state_dict, require_flux_transformer

    path = Path(str(source)).expanduser()
    if path.is_dir():
        return _folder_config(_model_folder(path, "transformer", "FluxTransformer2DModel", "a FLUX transformer",
                                            TRANSFORMER_HELP))
    if is_gguf_file(path):
        from .weights import gguf_transformer_config

        return gguf_transformer_config(path)
    if path.exists():
        meta = meta_state_dict(path, "transformer file")
        require_flux_transformer(path, meta)  # a VAE, a LoRA...: say which, before the shapes are read
        return infer_transformer_config(meta)
    if str(source) in RANDOM_INIT_NAMES:
        return shipped_config(f"{RANDOM_INIT_NAMES[str(source)]}-transformer")
    raise WeightsNotFoundError(f"transformer not found: {path}. {TRANSFORMER_HELP}")


def empty_transformer(config: dict):
    """A FLUX transformer of ``config`` on the meta device: its modules' names, kinds and shapes
    without memory or weights (a third of a second for FLUX.1-dev), for the checks that need the
    layout before the minutes of loading."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config)


# FLUX.1's text-to-image transformers take 64 input channels (a 2x2 patch of the 16-channel
# latent); the Fill, Depth and Canny variants concatenate a condition to it and take more.
FLUX_IN_CHANNELS = 64


def check_model_files(transformer_source, vae_source, lora: Optional[PathLike] = None) -> tuple[dict, list[str]]:
    """What can be refused without loading a weight, refused before the minutes of loading:
    the transformer is a FLUX.1 text-to-image transformer (Fill, Depth and Canny, which take a
    condition in more input channels, are refused), the VAE a 16-channel FLUX VAE, and the LoRA
    fits the transformer's layers (checked on a model of no memory, the meta device). Headers,
    config files and the LoRA are read. Returns the transformer's diffusers config and notes
    (a transformer without guidance embedding, such as FLUX.1-schnell, is noted, not refused).
    """
    config = transformer_config_of(transformer_source)
    in_channels = int(config.get("in_channels", FLUX_IN_CHANNELS))
    if in_channels != FLUX_IN_CHANNELS:
        raise WrongModelError(
            f"{transformer_source} is a FLUX transformer with {in_channels} input channels, not FLUX.1-dev's "
            f"{FLUX_IN_CHANNELS}: a FLUX.1 Fill, Depth or Canny model, which takes a condition image beside the "
            "latent. FluxSR runs on FLUX.1-dev itself (flux1-dev.safetensors or one of its fp8/GGUF files)")
    notes = []
    if not config.get("guidance_embeds", True):
        notes.append(f"{Path(str(transformer_source)).name} has no guidance embedding (FLUX.1-schnell?), so the "
                     "guidance setting has no effect; FluxSR is distilled from FLUX.1-dev, and a FluxSR LoRA made "
                     "on it gives results off from its own on this model")
    vae_config_of(vae_source)
    if lora is not None:
        from accelerate import init_empty_weights
        from diffusers import FluxTransformer2DModel

        from . import lora as lora_mod

        with init_empty_weights():
            meta = FluxTransformer2DModel.from_config(config)
        lora_mod.check_lora(meta, lora)
    return config, notes


def vae_config_of(source) -> dict:
    """The diffusers config of a VAE source (file, folder or test name), read from its header
    or config.json (no weights are loaded); :class:`WrongModelError` for a file that is not a
    16-channel FLUX VAE, naming what it looks like."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        config = _folder_config(_model_folder(path, "vae", "AutoencoderKL", "a VAE", VAE_HELP))
        if config.get("latent_channels") != L.LATENT_CHANNELS:
            raise WrongModelError(f"{path} is a {config.get('latent_channels')}-channel VAE; FLUX needs its 16-channel "
                                  "VAE (ae.safetensors)")
        return config
    if path.exists():
        from .weights import WeightsError, meta_state_dict

        try:
            return vae_state_dict_to_diffusers(meta_state_dict(path, "VAE file"), str(path))[1]
        except WeightsError as exc:
            if str(path) in str(exc):
                raise
            raise type(exc)(f"{path}: {exc}") from None  # the shape checks' messages name no file
    if str(source) in RANDOM_INIT_NAMES:
        return shipped_config(f"{RANDOM_INIT_NAMES[str(source)]}-vae")
    raise WeightsNotFoundError(f"VAE not found: {path}. {VAE_HELP}")


def _header_bytes(files, what: str, dtype: torch.dtype) -> int:
    """Bytes the tensors of ``files`` take in ``dtype``, read off their headers."""
    from .weights import meta_state_dict

    return sum(t.numel() for f in files for t in meta_state_dict(f, what).values()) * dtype.itemsize


def _vae_bytes_of(source, dtype: torch.dtype) -> int:
    path = Path(str(source)).expanduser()
    if path.is_dir():
        from .weights import diffusers_folder_files

        files = diffusers_folder_files(_model_folder(path, "vae", "AutoencoderKL", "a VAE", VAE_HELP), "VAE folder")
    elif path.exists():
        files = [path]
    else:  # a test name: the shipped config's model is tiny
        return 0
    return _header_bytes(files, "VAE file", dtype)


def _lora_bytes_of(lora_source, dtype: torch.dtype) -> int:
    """Bytes of a LoRA file's tensors in ``dtype`` (its header only); 0 without one."""
    if lora_source is None or not Path(str(lora_source)).expanduser().is_file():
        return 0
    try:
        return _header_bytes([lora_source], "LoRA file", dtype)
    except Exception:  # noqa: BLE001 - the LoRA loader names what is wrong with the file later
        return 0


def choose_memory_mode(transformer_source, vae_source, dtype: Union[str, torch.dtype] = "auto",
                       device: Union[str, torch.device] = "auto",
                       headroom_bytes: int = AUTO_HEADROOM_BYTES, lora=None) -> tuple[str, str]:
    """``auto``: the memory mode for these files on ``device``, read from the files' headers
    (nothing is loaded) and the GPU's free memory: ``(mode, reason)``. Off CUDA: ``none``.
    ``lora``: the LoRA file, counted for a GGUF transformer (which keeps it as an adapter)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return "none", f"{dev.type}: the weights live in RAM whatever the mode"
    torch_dtype = resolve_dtype(dtype, dev)
    vae_bytes = _vae_bytes_of(vae_source, torch_dtype)
    if is_gguf_file(transformer_source):  # the LoRA stays an adapter there: it counts (merged, it adds nothing)
        weights = gguf_weight_bytes_per_mode(transformer_source, vae_bytes, _lora_bytes_of(lora, torch_dtype),
                                             torch_dtype)
    else:
        weights = weight_bytes_per_mode(transformer_config_of(transformer_source), vae_bytes, torch_dtype)
    return pick_memory_mode(weights, memory.free_device_bytes(dev), headroom_bytes)


def load_device(memory_mode: str, device: Union[str, torch.device]) -> torch.device:
    """Where :func:`load_transformer` / :func:`load_vae` should put the weights for ``memory_mode``
    on ``device``: straight onto the device when they will all live there in the dtype they are
    loaded in (``none``), so RAM never holds the model; else the CPU, where the offload modes
    keep them and where the fp8 modes cast them (:func:`load_transformer_fp8` builds an fp8
    transformer on the device directly)."""
    return resolve_device(device) if memory_mode == "none" else torch.device("cpu")


def apply_memory_mode(transformer, vae, mode: str, device: Union[str, torch.device]) -> tuple:
    """Place the models for running on ``device`` under a memory mode; returns ``(transformer, vae)``.

    * ``none``: both models on the device.
    * ``model_offload``: both on the CPU; each moves to the device while it runs and the other
      goes back (accelerate's ``cpu_offload_with_hook``). Needs room for the largest model.
    * ``group_offload``: diffusers' ``enable_group_offload`` (block level, one block per group)
      on the transformer: only one of its blocks is on the device at a time (and the next,
      prefetched on CUDA); the VAE on the device whole. Slowest, least memory.
    * ``fp8_storage``: the Linear weights diffusers' ``enable_layerwise_casting`` would cast
      (their biases stay in the compute dtype), stored as ``float8_e4m3fn`` and cast per call
      to the compute dtype
      (:func:`store_in_fp8`). Norms, embeddings and (through
      FLUX's own skip pattern "norm") the AdaLN modulation linears stay in the compute dtype, as
      do unmerged peft LoRA layers: for FLUX.1-dev 14.3 GiB of weights instead of 22.2 GiB
      (``bench/run.py --full-size --weights-only``), not half. The VAE is small and stays as is.
    * ``fp8_storage_all``: ``fp8_storage`` with the modulation linears in fp8 too, as ComfyUI's
      ``fp8_e4m3fn`` weight dtype stores FLUX's linears (ComfyUI stores every parameter in fp8;
      here the output projection, the q/k norm scales and unmerged LoRA layers stay in the
      compute dtype). FLUX.1-dev's transformer: 11.2 GiB, the mode meant for 16 GB
      cards (a 2048 px upscale needs about 2.5 GiB more with the VAE's whole-image activations in
      CPU memory, 5.4 GiB with them on the device; measured with torch's CPU kernels).

    The compute dtype is the one the models were loaded in. Records the execution device on
    both models so :class:`DiffusersVelocity`/:class:`DiffusersCodec` send inputs there.
    """
    dev = resolve_device(device)
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; use one of {', '.join(MEMORY_MODES)}")
    for m in (transformer, vae):
        if getattr(m, _COMPUTE_DTYPE_ATTR, None) is None:
            setattr(m, _COMPUTE_DTYPE_ATTR, _param_dtype(m))
    if mode == "none":
        transformer.to(dev)
        vae.to(dev)
    elif mode == "model_offload":
        _hook_offload_pair(transformer, vae, dev)
    elif mode == "group_offload":
        transformer.to("cpu")
        streamed = dev.type == "cuda"
        options = {}
        if streamed and "low_cpu_mem_usage" in inspect.signature(transformer.enable_group_offload).parameters:
            options["low_cpu_mem_usage"] = _pin_as_it_goes(pinned_copy_bytes(transformer))
        # the prefetch stream is made on the current CUDA device: dev's, not cuda:0's
        with torch.cuda.device(dev) if streamed else contextlib.nullcontext():
            transformer.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"),
                                             offload_type="block_level", num_blocks_per_group=1,
                                             use_stream=streamed, **options)
        # The VAE stays on the device whole (FLUX's: 160 MiB in bf16): diffusers' offload hooks sit
        # on the forward of its encoder, decoder and their blocks, which the whole-image tiling
        # never calls (it runs their layers one by one), so their weights would stay in CPU memory.
        vae.to(dev)
    elif mode in FP8_MODES:
        if is_gguf_model(transformer):
            raise ValueError(f"memory mode {mode} stores a transformer's weights in fp8; this one holds GGUF-quantised "
                             f"weights already: use {', '.join(GGUF_MEMORY_MODES)}")
        store_in_fp8(transformer, getattr(transformer, _COMPUTE_DTYPE_ATTR), every_linear=mode == "fp8_storage_all")
        transformer.to(dev)
        vae.to(dev)
    for m in (transformer, vae):
        setattr(m, _EXEC_DEVICE_ATTR, dev)
    return transformer, vae


# ------------------------------------------------------------------------------- speed-ups

SPEEDUPS = ("fuse_qkv", "compile", "compile_cudagraphs", "channels_last_vae", "cudnn_attention", "flash_attention")
# diffusers attention backends: torch's SDPA held to one kernel (it otherwise picks per call)
_ATTENTION_BACKENDS = {"cudnn_attention": "_native_cudnn", "flash_attention": "_native_flash"}


def _has_unmerged_lora(module) -> bool:
    return any(hasattr(m, "lora_A") for m in module.modules())


def _has_placement_hooks(module) -> bool:
    """A memory mode applied: diffusers' group offload hooks, accelerate's offload, fp8 storage."""
    return any(hasattr(m, "_diffusers_hook") or hasattr(m, "_hf_hook") or hasattr(m, _FP8_COMPUTE_ATTR)
               for m in module.modules())


# The projections diffusers' ``fuse_projections`` concatenates, as (fused layer, its parts).
_QKV_GROUPS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


def _qkv_fused(transformer) -> bool:
    return any(getattr(m, "fused_projections", False) for m in transformer.modules())


def _fused_qkv_keys(model) -> dict[str, list[str]]:
    """``{"<attn>.to_qkv.weight": ["<attn>.to_q.weight", ...], ...}`` for the attention layers
    :func:`fuse_qkv_projections` fused (empty for an unfused model)."""
    keys = {}
    for name, module in model.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, parts in _QKV_GROUPS:
            layer = getattr(module, fused, None)
            if layer is None or hasattr(module, parts[0]):
                continue
            for tensor in ("weight", "bias"):
                if getattr(layer, tensor, None) is not None:
                    keys[f"{name}.{fused}.{tensor}"] = [f"{name}.{part}.{tensor}" for part in parts]
    return keys


def fuse_qkv_projections(transformer) -> None:
    """diffusers' ``fuse_qkv_projections`` (one q|k|v matmul per stream), then the separate
    q/k/v layers removed. In place, on any device, meta included; a second call does nothing.

    diffusers keeps the separate layers beside the fused ones, for ``unfuse_qkv_projections``,
    though the fused attention never reads them: for FLUX.1-dev 2.1 billion parameters
    held twice, 4.0 GiB more in bf16. FluxSR never unfuses, so they go.
    """
    if not _qkv_fused(transformer):
        with torch.no_grad():
            transformer.fuse_qkv_projections()
    for module in list(transformer.modules()):
        if not getattr(module, "fused_projections", False):
            continue
        for fused, parts in _QKV_GROUPS:
            if getattr(module, fused, None) is not None:
                for part in parts:
                    if part in module._modules:
                        delattr(module, part)


def _speedup_names(speedups) -> list[str]:
    """``"fuse_qkv,compile"`` or a list of names -> the names, stripped."""
    return [s.strip() for s in (speedups.split(",") if isinstance(speedups, str) else speedups) if s.strip()]


def parse_speedups(speedups, merge_lora: bool = True, memory_mode: Optional[str] = None,
                   device: Union[str, torch.device, None] = None) -> list[str]:
    """``"fuse_qkv,compile"`` (or a list of names) -> the list of names, checked before any model
    is loaded: unknown names, two compile modes or two attention backends at once, an attention
    backend without a CUDA GPU (or, ``device`` given, where the models do not run on one),
    ``fuse_qkv`` with a LoRA kept unmerged (``merge_lora`` False) and ``compile_cudagraphs``
    with an offload mode (when ``memory_mode`` is given) raise ValueError."""
    names = _speedup_names(speedups)
    unknown = [s for s in names if s not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up {unknown[0]!r}; choose from {', '.join(SPEEDUPS)}")
    for pair in (("compile", "compile_cudagraphs"), tuple(_ATTENTION_BACKENDS)):
        if all(p in names for p in pair):
            raise ValueError(f"choose one of {' and '.join(pair)}")
    for name in _ATTENTION_BACKENDS:
        if name in names and not torch.cuda.is_available():
            raise ValueError(f"{name} needs a CUDA GPU (its attention kernel is CUDA's)")
        if name in names and device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"{name} needs the models on a CUDA GPU (its attention kernel is CUDA's); the device is "
                             f"{torch.device(device)}")
    if "fuse_qkv" in names and not merge_lora:
        raise ValueError("fuse_qkv needs the LoRA merged (an unmerged LoRA on to_q/to_k/to_v would be left out "
                         "of the fused projection); merge it, or leave fuse_qkv out")
    if "compile_cudagraphs" in names and memory_mode in ("model_offload", "group_offload"):
        # CUDA graphs replay the recorded weight addresses; offloading moves the weights. (The fp8
        # modes' per-call casts happen inside the graphs, from weights that stay put.)
        raise ValueError(f"compile_cudagraphs needs the weights resident where the CUDA graphs recorded them; "
                         f"{memory_mode} moves them on every call. Use compile, or memory mode none or an fp8 mode")
    return names


def _compiles_whole_blocks(memory_mode: str) -> bool:
    """Whether dynamo can trace a transformer block in one graph under ``memory_mode``.

    Measured on the tiny model (torch 2.14, diffusers 0.42): group offloading's hooks call
    ``torch.compiler.disable``d onload/offload functions (two graph breaks per block, which
    diffusers supports). model_offload hooks the whole model, not a block; the fp8 modes'
    forwards are traceable (:func:`store_in_fp8`; diffusers' layerwise casting hooks, which
    re-create each Linear's parameters, broke the graph at every Linear).
    """
    return memory_mode != "group_offload"


def set_attention_backend(transformer, backend: str) -> None:
    """diffusers' ``set_attention_backend`` for this transformer only.

    diffusers records the backend on each of the model's attention processors (which pass it to
    every attention call) and also makes it the process-wide default, which would change every
    other model in the process that was never asked (in bench/run.py, every variant measured
    after ``cudnn_attention``); the default is put back.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(backend)
    finally:
        # the class attribute itself: diffusers 0.35 has no set_active_backend (0.42's only sets it)
        _AttentionBackendRegistry._active_backend = previous


def apply_speedups(transformer, vae, speedups, *, compile_backend: str = "inductor",
                   memory_mode: Optional[str] = None) -> list[str]:
    """Opt-in speed changes from the stack itself, applied in place; returns the names applied.

    * ``fuse_qkv``: :func:`fuse_qkv_projections`: one matmul for q|k|v (and the text stream's
      q|k|v) instead of three, in no more memory. Same maths; bf16 results differ in the last
      bits. A transformer :func:`load_transformer_fp8` built fused is left as it is.
    * ``compile``: ``torch.compile`` of the repeated transformer blocks (diffusers'
      ``compile_repeated_blocks``: one compiled graph serves all 19 + 38 blocks, so compiling
      takes seconds rather than minutes). The first call of each new tile shape compiles.
      With ``group_offload`` each block's graph breaks at its onload and offload; the fp8 modes
      compile whole blocks, their casts included.
    * ``compile_cudagraphs``: the same with ``mode="reduce-overhead"``: CUDA graphs replay each
      block's kernels without per-kernel launch cost (the single step has fixed shapes). Each
      block's output, still in the graphs' memory pool, is the next replay's input, which torch's
      CUDA-graph trees refuse unless told to clone such outputs
      (:func:`_clone_outputs_between_cudagraph_runs`).
    * ``channels_last_vae``: the VAE's convolution weights in channels-last memory format, the
      layout cuDNN's fastest convolution kernels use.
    * ``cudnn_attention``: diffusers' attention backend ``_native_cudnn`` (torch's SDPA held to
      cuDNN's fused attention, faster than its flash kernel on Hopper by NVIDIA's account);
      ``flash_attention``: ``_native_flash`` (held to torch's flash kernel). CUDA only.

    Call after loading (and merging) the LoRA and before :func:`apply_memory_mode`, naming the
    mode it will apply (``memory_mode``; by default ``none``, or the fp8 mode the transformer is
    already stored in): fusing copies the q/k/v weights into a new layer, which an unmerged LoRA
    would silently miss and a memory mode's hooks would not manage; both cases raise
    ``ValueError``. ``bench/run.py`` measures each change against the unchanged models in the
    same run.
    """
    if memory_mode is None:
        memory_mode = getattr(transformer, _FP8_MODE_ATTR, None) or "none"
    names = parse_speedups(speedups, memory_mode=memory_mode)
    if any(n in GGUF_REFUSED_SPEEDUPS for n in names) and is_gguf_model(transformer):
        _refuse_for_gguf(None, names)
    if "fuse_qkv" in names and not _qkv_fused(transformer):  # the fp8 loader fuses as the file loads
        if _has_unmerged_lora(transformer):
            raise ValueError("fuse_qkv needs the LoRA merged into the weights (an unmerged LoRA on to_q/to_k/to_v "
                             "would be left out of the fused projection); load it with merge=True")
        if _has_placement_hooks(transformer):
            raise ValueError("fuse_qkv must come before the memory mode (apply_speedups, then apply_memory_mode)")
        fuse_qkv_projections(transformer)
    for name, backend in _ATTENTION_BACKENDS.items():
        if name in names:
            set_attention_backend(transformer, backend)
    if "channels_last_vae" in names:
        vae.to(memory_format=torch.channels_last)
    for name, options in (("compile", {}), ("compile_cudagraphs", {"mode": "reduce-overhead"})):
        if name not in names:
            continue
        # fullgraph where a block has no hooks, so that a graph break there is an error, not a
        # silent slowdown
        fullgraph = _compiles_whole_blocks(memory_mode)
        if not fullgraph:
            log.info("compile with memory mode %s: the blocks' graphs break at its hooks", memory_mode)
        if name == "compile_cudagraphs":
            _clone_outputs_between_cudagraph_runs()
        if hasattr(transformer, "compile_repeated_blocks"):
            transformer.compile_repeated_blocks(fullgraph=fullgraph, backend=compile_backend, **options)
        else:  # diffusers < 0.35: the same per-block compilation by hand
            for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
                block.compile(fullgraph=fullgraph, backend=compile_backend, **options)
    return names


_CUDAGRAPH_CLONING_OPTION = "cudagraph_trees_generation_cloning"  # torch._inductor.config.triton's, 2.14+


def cudagraph_output_cloning_available() -> bool:
    """Whether this torch can copy a CUDA graph's outputs out of its pool before the next replay
    (torch 2.14's inductor option; see :func:`_clone_outputs_between_cudagraph_runs`)."""
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, _CUDAGRAPH_CLONING_OPTION)


def _clone_outputs_between_cudagraph_runs() -> bool:
    """Let one block's CUDA-graph output feed the next replay of the same graph. Blocks compiled
    one by one with CUDA graphs (FLUX's loop hands each block's output to the next) stop with
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"
    (pytorch/pytorch#152887, open); torch 2.14's inductor option
    ``triton.cudagraph_trees_generation_cloning = "user_visible"`` copies such outputs out of
    the graphs' pool first (process-wide: it only adds copies where the error would be). On an
    older torch a warning says what may happen; returns whether the option was set."""
    import torch._inductor.config as inductor_config

    if cudagraph_output_cloning_available():
        setattr(inductor_config.triton, _CUDAGRAPH_CLONING_OPTION, "user_visible")
        return True
    log.warning("compile_cudagraphs on torch %s: its CUDA graphs per block may refuse one block's output as the "
                "next block's input (\"accessing tensor output of CUDAGraphs that has been overwritten\", "
                "pytorch/pytorch#152887), which torch 2.14 and newer clone; use compile if it does", torch.__version__)
    return False


def _param_dtype(module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _execution_device(module) -> torch.device:
    dev = getattr(module, _EXEC_DEVICE_ATTR, None)
    if dev is not None:
        return dev
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def _compute_dtype(module, given) -> torch.dtype:
    if given is not None:
        return resolve_dtype(given, "cpu")
    recorded = getattr(module, _COMPUTE_DTYPE_ATTR, None)
    if recorded is not None:
        return recorded
    dt = _param_dtype(module)
    if dt in FP8_DTYPES:
        raise ValueError("the model's weights are stored in fp8; pass compute_dtype (bf16, fp16 or fp32)")
    return dt


# ------------------------------------------------------------------------- velocity model

class DiffusersVelocity:
    """:class:`~fluxsr_core.interfaces.VelocityModel` over diffusers' ``FluxTransformer2DModel``.

    Does what ``FluxPipeline`` does around its transformer call: 2x2 packing, image ids
    ``(0, row, col)`` (shifted by ``position_offset`` in token units), zero text ids,
    ``timestep = sigma`` (the transformer multiplies by 1000 inside), ``guidance`` only for
    guidance-distilled models (FLUX.1-dev; ignored for schnell-like ones). Conditioning
    tensors with batch 1 are broadcast to the latent batch. Gradients flow (training uses it).
    """

    def __init__(self, transformer, compute_dtype: Union[str, torch.dtype, None] = None,
                 device: Union[str, torch.device, None] = None):
        self.transformer = transformer
        self.compute_dtype = _compute_dtype(transformer, compute_dtype)
        self._device = resolve_device(device) if device is not None else None
        cfg = transformer.config
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.joint_attention_dim = int(cfg.joint_attention_dim)
        self.pooled_projection_dim = int(cfg.pooled_projection_dim)
        self.in_channels = int(cfg.in_channels)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else _execution_device(self.transformer)

    def _batch(self, t: torch.Tensor, b: int, name: str, dims: int) -> torch.Tensor:
        if t.ndim != dims:
            raise ValueError(f"conditioning {name} must have {dims} dims, got shape {tuple(t.shape)}")
        if t.shape[0] == b:
            return t
        if t.shape[0] == 1:
            return t.expand(b, *t.shape[1:])
        raise ValueError(f"conditioning {name} has batch {t.shape[0]}; expected 1 or {b}")

    def __call__(self, latent: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 position_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if latent.ndim != 4 or latent.shape[1] * 4 != self.in_channels:
            raise ValueError(f"latent must be [B, {self.in_channels // 4}, h, w], got {tuple(latent.shape)}")
        b, _, h, w = latent.shape
        dev, dt = self.device, self.compute_dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latent.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        if sigma.shape != (b,):
            raise ValueError(f"sigma must be a scalar or shaped [{b}], got {tuple(sigma.shape)}")
        t5 = self._batch(cond.t5, b, "t5", 3)
        pooled = self._batch(cond.clip_pooled, b, "clip_pooled", 2)
        if t5.shape[-1] != self.joint_attention_dim or pooled.shape[-1] != self.pooled_projection_dim:
            raise ValueError(f"conditioning widths t5 {t5.shape[-1]}, clip_pooled {pooled.shape[-1]} do not fit "
                             f"this transformer ({self.joint_attention_dim}, {self.pooled_projection_dim}); "
                             f"the bundle was made for another model")
        tokens = L.pack(latent.to(device=dev, dtype=dt))
        guidance = None
        if self.guidance_embeds:
            # FluxPipeline: torch.full([1], g, float32).expand(B); the model casts it itself.
            guidance = torch.full((b,), float(cond.guidance), device=dev, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=t5.to(device=dev, dtype=dt),
            pooled_projections=pooled.to(device=dev, dtype=dt),
            timestep=sigma.to(device=dev, dtype=dt),
            # float32 whatever the compute dtype: bf16 holds integers exactly only up to 256, so
            # global ids past 4096 px would merge neighbouring positions (ComfyUI builds them in
            # float32 too; diffusers' rotary embedding computes in float anyway).
            img_ids=L.image_ids(h, w, offset=tuple(position_offset), device=dev, dtype=torch.float32),
            txt_ids=L.text_ids(t5.shape[1], device=dev, dtype=torch.float32),
            guidance=guidance,
            return_dict=False,
        )[0]
        return L.unpack(out, h, w).to(device=latent.device, dtype=latent.dtype)


# ----------------------------------------------------------------------------------- codec

def _overlap_factor(tile: int, overlap: int) -> Fraction:
    """diffusers' ``tile_overlap_factor`` for ``tile`` pixels overlapping by ``overlap``, exactly.

    diffusers derives its tile steps and blend widths by truncating products of this factor:
    ``int(tile * (1 - f))``, ``int(tile / 8 * f)`` (encode), ``int(tile / 8 * (1 - f))``,
    ``int(tile * f)`` (decode). In real numbers only ``f = overlap / tile`` gives all four, and
    for many pairs (136/40, 264/48, 272/80 px ...) no float does: the encode step came out a pixel
    short, off the 8 px grid, and each tile's latent drifted a pixel further from where it
    belongs. A Fraction makes every product exact (diffusers only multiplies and truncates it).
    """
    return Fraction(int(overlap), int(tile))


VAE_TILE_NORMS = ("image", "tile")
_WHOLE_IMAGE_TILING_METHODS = ("_tiled_encode", "tiled_decode")


def _bind_whole_image_tiling(vae, tile: int, on: bool, stash_device, memory_limit: Optional[int] = None) -> None:
    """Make diffusers' tiled encode/decode of this ``vae`` run :mod:`fluxsr_core.vae_tiling`
    (``on``) or its own again. Bound on the instance, where ``AutoencoderKL._encode``/``_decode``
    look them up: every hook diffusers and accelerate put around ``encode``/``decode`` still runs."""
    from . import vae_tiling

    for name in _WHOLE_IMAGE_TILING_METHODS:
        vae.__dict__.pop(name, None)
    if not on:
        return
    problem = vae_tiling.unsupported_reason(vae)
    if problem is None and not all(callable(getattr(type(vae), n, None)) for n in _WHOLE_IMAGE_TILING_METHODS):
        problem = "this diffusers version tiles through other methods"
    if problem:
        vae_tiling.warn_unsupported_once(vae, "encoder or decoder", problem, "diffusers' per-tile tiling")
        return
    from diffusers.models.autoencoders.vae import DecoderOutput

    def tiled_encode(x):
        return vae_tiling.encode_moments(vae, x, tile, stash_device=stash_device, memory_limit=memory_limit)

    def tiled_decode(z, return_dict=True):
        sample = vae_tiling.decode(vae, z, tile, stash_device=stash_device, memory_limit=memory_limit)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae._tiled_encode, vae.tiled_decode = tiled_encode, tiled_decode


_SD3_VAE = (0.0609, 1.5305)  # (shift_factor, scaling_factor) of SD3's and SD3.5's 16-channel VAE


class DiffusersCodec:
    """:class:`~fluxsr_core.interfaces.LatentCodec` over diffusers' ``AutoencoderKL`` (the FLUX VAE).

    ``encode``: image ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 8) -> the posterior's
    *mode* (its mean: deterministic, no sampling) -> ``(raw - 0.1159) * 0.3611``.
    ``decode``: the inverse, clamped to [0, 1]. Outputs keep the input's float dtype and device.

    ``tile > 0`` (pixels, multiple of 8) tiles images larger than one tile. ``tile_norm`` says how:
      * ``"image"`` (default): :mod:`fluxsr_core.vae_tiling`, every GroupNorm with the whole
        image's statistics, the attention over the whole latent, and each tile cut again between
        GroupNorms with a halo its convolutions' reach: the untiled result up to rounding at any
        tile size (``tile_overlap`` is not needed). With the shipped demo VAE, 256 px tiles of a
        512 px photo differ from the untiled decode by 0.00001 levels (of 255) on average;
        diffusers' tiling by 7.2 (tests/test_vae_tiling.py). Memory: about three whole-image
        activations, not one tile's; ``stash_device`` ``"auto"`` keeps them in CPU memory
        between GroupNorms when the GPU lacks room (``"cpu"``: always; None: never), and in CPU
        memory they take no more than is available there: past it, parts of the VAE are
        recomputed for each GroupNorm instead (the same result, more work). ``memory_limit``
        (bytes) bounds them wherever they are held.
      * ``"tile"``: diffusers' own tiling, neighbours sharing ``tile_overlap`` pixels, each tile
        normalised alone (colour and contrast shift from tile to tile; the blend hides only the
        seam), for the least device memory.
    A VAE :func:`fluxsr_core.vae_tiling.unsupported_reason` refuses gets diffusers' tiling, logged.
    """

    downscale = L.VAE_DOWNSCALE
    latent_channels = L.LATENT_CHANNELS

    def __init__(self, vae, compute_dtype: Union[str, torch.dtype, None] = None, tile: int = 0,
                 tile_overlap: int = 0, device: Union[str, torch.device, None] = None, *,
                 tile_norm: str = "image", stash_device: Union[str, torch.device, None] = "auto",
                 memory_limit: Optional[int] = None):
        cfg = vae.config
        if int(cfg.latent_channels) != L.LATENT_CHANNELS:
            raise WrongModelError(f"this VAE has {cfg.latent_channels} latent channels; FLUX's has 16")
        shift, scale = cfg.get("shift_factor"), cfg.get("scaling_factor")
        if shift is not None and scale is not None and abs(shift - _SD3_VAE[0]) < 1e-4 and abs(scale - _SD3_VAE[1]) < 1e-4:
            # the same shapes as FLUX's, so only its config tells: its latents are another space
            raise WrongModelError(f"this is the SD3/SD3.5 VAE (shift_factor {shift}, scaling_factor {scale}), not "
                                  f"FLUX's ({L.LATENT_SHIFT}, {L.LATENT_SCALE}); its latents are not FLUX's, so the "
                                  "colours would come out wrong. Pass FLUX.1-dev's ae.safetensors (or its vae/ folder)")
        if shift is None or scale is None or abs(shift - L.LATENT_SHIFT) > 1e-4 or abs(scale - L.LATENT_SCALE) > 1e-4:
            # We always normalise with FLUX's constants (the transformer was trained on them), so
            # a differing config value is unused; it usually means a hand-written config.json.
            log.warning("VAE config has shift_factor=%s, scaling_factor=%s; FLUX's are %s and %s. "
                        "Using FLUX's values; if this is not the FLUX VAE, results will be wrong.",
                        shift, scale, L.LATENT_SHIFT, L.LATENT_SCALE)
        self.vae = vae
        self.compute_dtype = _compute_dtype(vae, compute_dtype)
        stored = _param_dtype(vae)
        if stored not in FP8_DTYPES and stored != self.compute_dtype:
            raise ValueError(f"the VAE's weights are {stored} but compute_dtype is {self.compute_dtype}; "
                             f"load the VAE with dtype={self.compute_dtype}")
        self._device = resolve_device(device) if device is not None else None
        if tile_norm not in VAE_TILE_NORMS:
            raise ValueError(f"tile_norm must be one of {', '.join(VAE_TILE_NORMS)} (got {tile_norm!r})")
        self.tile_norm = tile_norm
        self.stash_device = stash_device
        self.memory_limit = memory_limit
        self.set_tiling(tile, tile_overlap)

    def set_tiling(self, tile: int, tile_overlap: int = 0) -> None:
        """Turn diffusers' VAE tiling on (``tile`` pixels, multiple of 8) or off (``tile=0``).

        Called again by the upscaler's out-of-memory retry with smaller tiles.
        """
        tile, tile_overlap = int(tile), int(tile_overlap)
        if tile:
            if tile < 0 or tile % self.downscale:
                raise ValueError(f"VAE tile must be a positive multiple of {self.downscale} pixels (got {tile})")
            if not 0 <= tile_overlap < tile or tile_overlap % self.downscale:
                raise ValueError(f"VAE tile overlap must be a multiple of {self.downscale} pixels and smaller "
                                 f"than the tile {tile} (got {tile_overlap})")
            # diffusers decides when to tile (an image over one tile) and runs the placement
            # hook (model offload) around it; "image" replaces only the tiling itself
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = tile
            self.vae.tile_latent_min_size = tile // self.downscale
            self.vae.tile_overlap_factor = _overlap_factor(tile, tile_overlap)
        else:
            self.vae.disable_tiling()
        self.tile, self.tile_overlap = tile, tile_overlap
        _bind_whole_image_tiling(self.vae, tile, self.tile_norm == "image" and tile > 0, self.stash_device,
                                 self.memory_limit)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else _execution_device(self.vae)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` in [0, 1] -> normalised latent ``[B, 16, H/8, W/8]``."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        if image.shape[-2] % self.downscale or image.shape[-1] % self.downscale:
            raise ValueError(f"image height and width must be multiples of {self.downscale} "
                             f"(got {image.shape[-2]}x{image.shape[-1]}); pad it first")
        out_dtype = image.dtype if image.is_floating_point() else torch.float32
        x = image.to(device=self.device, dtype=self.compute_dtype) * 2 - 1
        raw = self.vae.encode(x).latent_dist.mode()
        return L.normalize(raw.float()).to(device=image.device, dtype=out_dtype)

    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latent ``[B, 16, h, w]`` -> image ``[B, 3, 8h, 8w]`` in [0, 1].

        ``clamp=False`` keeps the decoder's overshoot past 0 and 1: training's image losses use
        it, since a clamped pixel passes no gradient back (the loss would see it wrong and
        never correct it)."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, 16, h, w], got {tuple(latent.shape)}")
        raw = L.denormalize(latent.float()).to(device=self.device, dtype=self.compute_dtype)
        img = self.vae.decode(raw).sample
        out_dtype = latent.dtype if latent.is_floating_point() else torch.float32
        img = (img.float() + 1) / 2
        return (img.clamp(0, 1) if clamp else img).to(device=latent.device, dtype=out_dtype)


# ------------------------------------------------------------------------------ convenience

@dataclass
class LoadedModels:
    """What :func:`load_models` placed: the models, the LoRA's report, and the memory mode used
    with why (``"given"``, or what ``auto`` read off the files and the GPU)."""

    transformer: Any
    vae: Any
    lora: Any
    memory_mode: str
    memory_mode_reason: str
    dtype: torch.dtype
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what was done otherwise than asked, and why


def load_models(transformer_source: PathLike, vae_source: PathLike, memory_mode: str = "auto",
                dtype: Union[str, torch.dtype] = "auto", device: Union[str, torch.device] = "auto", *,
                lora: Optional[PathLike] = None, lora_scale: float = 1.0, merge_lora: bool = True,
                speedups=(), seed: int = 0) -> LoadedModels:
    """Both models loaded and placed for a memory mode, with the LoRA and the speed-ups: the one
    loading path of ``fluxsr upscale`` and ``fluxsr-train pairs``.

    First :func:`check_model_files` (wrong files are refused before anything loads). ``auto``:
    :func:`choose_memory_mode`. ``none``: straight onto the device. A GGUF transformer
    (:func:`check_gguf_options`) takes the LoRA as an adapter (said in ``notes``). The fp8 modes:
    :func:`load_transformer_fp8`, built in fp8 as the files load, the LoRA merged on the way or
    (``merge_lora`` False) added afterwards as a peft adapter kept in the compute dtype.
    Otherwise the weights load to the CPU, the LoRA goes in through peft, then the speed-ups
    (:func:`apply_speedups`) and the memory mode (:func:`apply_memory_mode`). With an fp8 mode
    ``fuse_qkv`` is done while the file loads.
    """
    from . import lora as lora_mod

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    _, notes = check_model_files(transformer_source, vae_source, lora)
    reason = "given"
    if memory_mode == "auto":
        memory_mode, reason = choose_memory_mode(transformer_source, vae_source, torch_dtype, dev, lora=lora)
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory_mode!r}; use auto or one of {', '.join(MEMORY_MODES)}")
    check_gguf_options(transformer_source, memory_mode, speedups)
    if lora is not None and merge_lora and is_gguf_file(transformer_source):
        merge_lora = False
        notes.append("the LoRA is kept as an adapter beside the GGUF weights (quantised weights cannot take a merge)")
    names = parse_speedups(speedups, merge_lora=lora is None or merge_lora, memory_mode=memory_mode, device=dev)
    direct_fp8 = memory_mode in FP8_MODES
    where = dev if direct_fp8 else load_device(memory_mode, dev)
    info = None
    if direct_fp8:
        transformer, info = load_transformer_fp8(transformer_source, memory_mode, torch_dtype, dev,
                                                 lora=lora if merge_lora else None, lora_scale=lora_scale, seed=seed,
                                                 fuse_qkv="fuse_qkv" in names)
        if lora is not None and not merge_lora:  # an adapter beside the fp8 weights, in the compute dtype
            info = lora_mod.load_lora(transformer, lora, scale=lora_scale, merge=False)
    else:
        transformer = load_transformer(transformer_source, dtype=torch_dtype, device=where, seed=seed)
        if lora is not None:
            info = lora_mod.load_lora(transformer, lora, scale=lora_scale, merge=merge_lora)
    vae = load_vae(vae_source, dtype=torch_dtype, device=where, seed=seed)
    apply_speedups(transformer, vae, names, memory_mode=memory_mode)
    apply_memory_mode(transformer, vae, memory_mode, dev)
    return LoadedModels(transformer, vae, info, memory_mode, reason, torch_dtype, dev, notes)


def build_models(transformer_source: PathLike, vae_source: PathLike, dtype: Union[str, torch.dtype] = "auto",
                 device: Union[str, torch.device] = "auto", memory_mode: str = "none", *,
                 vae_tile: int = 0, vae_tile_overlap: int = 0, seed: int = 0
                 ) -> tuple[DiffusersVelocity, DiffusersCodec]:
    """:func:`load_models` without a LoRA, wrapped: ``(velocity, codec)``."""
    loaded = load_models(transformer_source, vae_source, memory_mode, dtype, device, seed=seed)
    return (DiffusersVelocity(loaded.transformer, compute_dtype=loaded.dtype),
            DiffusersCodec(loaded.vae, compute_dtype=loaded.dtype, tile=vae_tile, tile_overlap=vae_tile_overlap))


__all__ = ["resolve_device", "resolve_dtype", "load_transformer", "load_vae", "load_device", "load_models",
           "LoadedModels", "VAE_TILE_NORMS", "load_transformer_fp8", "apply_memory_mode", "store_in_fp8", "fp8_layers", "parse_speedups",
           "fuse_qkv_projections",
           "set_attention_backend",
           "apply_speedups", "DiffusersVelocity", "DiffusersCodec", "build_models", "MEMORY_MODES", "FP8_MODES",
           "SPEEDUPS", "param_bytes", "transformer_config_of", "vae_config_of", "check_model_files",
           "weight_bytes_per_mode", "pick_memory_mode", "choose_memory_mode",
           "AUTO_HEADROOM_BYTES", "is_gguf_model", "gguf_transformer", "check_gguf_options", "gguf_weight_bytes_per_mode",
           "GGUF_MEMORY_MODES", "GGUF_REFUSED_SPEEDUPS"]

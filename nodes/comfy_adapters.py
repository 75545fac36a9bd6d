"""The two FluxSR interfaces over ComfyUI's own types, plus ComfyUI's progress/interrupt hooks.

* :class:`ComfyVelocity` is a :class:`~fluxsr_core.interfaces.VelocityModel` over a ComfyUI MODEL
  (a ``ModelPatcher``). The transformer runs through ComfyUI's model management
  (``load_models_gpu``; LoRA patches, weight dtypes, offloading and GGUF loaders all stay
  ComfyUI's business) and ``BaseModel.apply_model`` with sigma as the timestep. ComfyUI returns
  the denoised ``x0 = x - sigma * v``; we turn it back into the velocity ``v = (x - x0) / sigma``.
  ``apply_model`` takes the latent already in the model's space (``process_latent_in``, i.e.
  ``(raw - 0.1159) * 0.3611`` for FLUX), which is exactly our normalised latent, so no mapping
  is needed beyond checking that the MODEL really has FLUX's latent format.
* :class:`ComfyCodec` is a :class:`~fluxsr_core.interfaces.LatentCodec` over a ComfyUI VAE:
  ComfyUI's VAE takes ``[B, H, W, C]`` pixels and returns *raw* latents, so we normalise with
  :func:`fluxsr_core.latents.normalize` (and denormalise before decoding).

Every ComfyUI import happens inside a function: this module imports (and CI exercises the
conditioning helpers) without ComfyUI installed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import uuid
from typing import Any, Callable, Iterator, Optional

import torch

from ..fluxsr_core.interfaces import Conditioning
from ..fluxsr_core.weights import FP8_DTYPES
from ..fluxsr_core.latents import LATENT_CHANNELS, LATENT_SCALE, LATENT_SHIFT, VAE_DOWNSCALE, denormalize, normalize
from ..fluxsr_core.settings import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_T_L, RunSettings
from ..fluxsr_core.tiling import TilingConfig
from ..fluxsr_core import vae_tiling

log = logging.getLogger("fluxsr")

# The key under which FluxSRConditioning stores the run settings in a CONDITIONING entry's dict.
# ComfyUI hands every key of that dict to the model's ``extra_conds``; FLUX's ignores unknown
# keys, so the settings travel through any node that copies conditioning dicts.
SETTINGS_KEY = "fluxsr_settings"


# --- conditioning ----------------------------------------------------------------------------

def _check_conditioning(conditioning: Any) -> list:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(
            "expected a ComfyUI CONDITIONING (a non-empty list of [tensor, dict] entries); connect "
            "FluxSRConditioning or a FLUX CLIPTextEncode to the conditioning input")
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[1], dict)):
            raise ValueError("a CONDITIONING entry is not a [tensor, dict] pair; is the input really "
                             "a CONDITIONING?")
    return list(conditioning)


def conditioning_settings(conditioning: Any) -> Optional[RunSettings]:
    """The run settings FluxSRConditioning attached to a CONDITIONING (first entry that has them).

    None for a conditioning from CLIPTextEncode & co.: T_L then comes from the LoRA (FluxSR Load
    LoRA), else our default.
    """
    for _, extra in _check_conditioning(conditioning):
        data = extra.get(SETTINGS_KEY)
        if data:
            return _settings_from_dict(data)
    return None


def conditioning_guidance(conditioning: Any) -> Optional[float]:
    """The ``guidance`` value the CONDITIONING's first entry carries (FluxGuidance, CLIPTextEncodeFlux,
    FluxSR Conditioning); None when it carries none (a plain CLIPTextEncode)."""
    value = _check_conditioning(conditioning)[0][1].get("guidance")
    return None if value is None else float(value)


def with_guidance(conditioning: Any, guidance: float) -> Any:
    """``conditioning`` with every entry's ``guidance`` set to ``guidance``: a new list, the input's
    entries and dicts untouched (ComfyUI caches and reuses node outputs)."""
    entries = _check_conditioning(conditioning)
    if all(entry[1].get("guidance") == guidance for entry in entries):
        return conditioning
    return [[entry[0], {**entry[1], "guidance": float(guidance)}, *entry[2:]] for entry in entries]


def _settings_to_dict(settings: RunSettings) -> dict:
    # Plain floats and strings: the dicts are deep-copied and pickled by ComfyUI's caches.
    return {"t_l": float(settings.t_l), "guidance": float(settings.guidance), "scale": float(settings.scale),
            "source": dict(settings.source or {})}


def _settings_from_dict(data: dict) -> RunSettings:
    return RunSettings(t_l=float(data.get("t_l", DEFAULT_T_L)), guidance=float(data.get("guidance", DEFAULT_GUIDANCE)),
                       scale=float(data.get("scale", DEFAULT_SCALE)), source=dict(data.get("source") or {}))


def make_conditioning(t5: torch.Tensor, clip_pooled: torch.Tensor, settings: RunSettings) -> list:
    """A ComfyUI CONDITIONING for native FLUX: T5 tokens, CLIP pooled, guidance, our run settings."""
    # Widths are the model's business (FLUX.1: 4096 and 768; the tiny test models: 32 and 16).
    if t5.ndim != 3 or t5.shape[0] != 1:
        raise ValueError(f"T5 embedding must be [1, L, D], got {tuple(t5.shape)}")
    if clip_pooled.ndim != 2 or clip_pooled.shape[0] != 1:
        raise ValueError(f"CLIP pooled embedding must be [1, D], got {tuple(clip_pooled.shape)}")
    extra = {"pooled_output": clip_pooled.float(), SETTINGS_KEY: _settings_to_dict(settings)}
    if settings.given("guidance"):
        # only a chosen value: without one the key stays out (FLUX's 3.5 in a KSampler), so any value
        # found there later was put there in the graph (FluxGuidance), even one equal to ours
        extra["guidance"] = float(settings.guidance)
    return [[t5.float(), extra]]


def conditioning_to_core(conditioning: Any, guidance: Optional[float] = None) -> Conditioning:
    """The first CONDITIONING entry as a core :class:`Conditioning` (T5 tokens, CLIP pooled, guidance).

    Used where the core needs the tensors themselves (the pair-dataset writer stores them once
    per dataset) and by the CI tests that run the nodes on diffusers-backed models.
    """
    entries = _check_conditioning(conditioning)
    t5, extra = entries[0][0], entries[0][1]
    pooled = extra.get("pooled_output")
    if t5 is None or pooled is None:
        raise ValueError("this CONDITIONING has no T5 tokens or no CLIP pooled output; FLUX needs "
                         "both (use FluxSRConditioning, or CLIPTextEncode with a FLUX DualCLIPLoader)")
    if t5.ndim != 3 or pooled.ndim not in (1, 2):
        raise ValueError(f"not a FLUX conditioning: tokens {tuple(t5.shape)}, pooled {tuple(pooled.shape)} "
                         "(FLUX needs T5-XXL tokens [1, L, 4096] and a CLIP-L pooled vector [1, 768])")
    g = extra.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance
    return Conditioning(t5=t5, clip_pooled=pooled.reshape(1, -1),
                        guidance=DEFAULT_GUIDANCE if g is None else float(g))


# --- velocity model over a ComfyUI MODEL ------------------------------------------------------

def check_flux_model(model: Any, teacher: bool = False) -> None:
    """Raise ValueError unless ``model`` is a ComfyUI MODEL of a FLUX-style flow transformer.
    ``teacher``: for the Teacher Sampler, whose advice is plain FLUX.1-dev, without the LoRA."""
    inner = getattr(model, "model", None)
    fmt = getattr(inner, "latent_format", None)
    if inner is None or fmt is None or not hasattr(inner, "apply_model"):
        raise ValueError("the model input is not a ComfyUI MODEL; connect a UNETLoader (FLUX.1-dev) "
                         + ("straight to the Teacher Sampler, without the FluxSR LoRA (the teacher is the plain "
                            "base model)" if teacher else "followed by FluxSR Load LoRA with the FluxSR LoRA"))
    channels = getattr(fmt, "latent_channels", None)
    scale, shift = getattr(fmt, "scale_factor", None), getattr(fmt, "shift_factor", None)
    if channels != LATENT_CHANNELS or scale is None or shift is None or \
            not (math.isclose(scale, LATENT_SCALE, rel_tol=1e-4) and math.isclose(shift, LATENT_SHIFT, rel_tol=1e-4)):
        raise ValueError(
            f"the MODEL is not a FLUX.1 model (latent format {type(fmt).__name__}); FluxSR needs "
            + ("FLUX.1-dev (UNETLoader) without the FluxSR LoRA as its teacher" if teacher
               else "FLUX.1-dev (UNETLoader) with the FluxSR LoRA"))
    img_in = getattr(getattr(inner, "diffusion_model", None), "img_in", None)
    packed = getattr(img_in, "in_features", LATENT_CHANNELS * 4)
    if packed != LATENT_CHANNELS * 4:  # 2x2 patches of the 16-channel latent, nothing concatenated
        raise ValueError(f"the MODEL takes {packed} input features per token, not {LATENT_CHANNELS * 4}: a FLUX "
                         "variant with extra image inputs (Fill, Depth, Canny?); FluxSR needs FLUX.1-dev")
    import comfy.model_sampling  # noqa: PLC0415 - ComfyUI only
    if not isinstance(getattr(inner, "model_sampling", None), comfy.model_sampling.CONST):
        raise ValueError("the MODEL is not a rectified-flow model (its sampling is not CONST); FluxSR "
                         "needs FLUX.1-dev")


def _supports_rope_shift(diffusion_model: Any) -> bool:
    """ComfyUI versions whose FLUX ``process_img`` reads ``transformer_options['rope_options']``."""
    fn = getattr(diffusion_model, "process_img", None)
    try:
        return fn is not None and "transformer_options" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _in_features(module: Any, *path: str) -> Optional[int]:
    for name in path:
        module = getattr(module, name, None)
    return getattr(module, "in_features", None)


def _check_widths(diffusion_model: Any, tokens: Any, pooled: Any) -> None:
    """ValueError, before any matmul, when a conditioning's widths do not fit the FLUX model
    (an SD1.5/SDXL/SD3 CLIPTextEncode, a bundle for another model)."""
    want_t5 = _in_features(diffusion_model, "txt_in")
    want_clip = _in_features(diffusion_model, "vector_in", "in_layer")
    problems = []
    if want_t5 is not None and isinstance(tokens, torch.Tensor) and tokens.shape[-1] != want_t5:
        problems.append(f"its text tokens are {tokens.shape[-1]} wide, the model takes {want_t5} (T5-XXL)")
    if want_clip is not None and isinstance(pooled, torch.Tensor) and pooled.shape[-1] != want_clip:
        problems.append(f"its pooled vector is {pooled.shape[-1]} wide, the model takes {want_clip} (CLIP-L)")
    if problems:
        raise ValueError("the conditioning does not fit this FLUX model: " + "; ".join(problems)
                         + ". Connect FluxSR Conditioning (a bundle made for FLUX.1-dev), or CLIPTextEncode "
                           "with FLUX's DualCLIPLoader (clip_l + t5xxl, type flux)")


# The wrapper kinds around the model call itself (comfy.patcher_extension.WrappersMP); the others
# wrap a sampler's loop, which a one-step pass never runs.
_MODEL_CALL_WRAPPERS = ("apply_model", "diffusion_model")


def model_call_options(patcher: Any) -> tuple[dict, list]:
    """The MODEL's ``transformer_options`` as ComfyUI's samplers hand them to the model
    (``prepare_model_patcher`` in comfy/sampler_helpers.py): with the wrappers registered on the
    patcher itself merged in, so that ComfyUI's TorchCompileModel (an apply_model wrapper) still
    compiles the model here. Only the kinds around the model call are taken, and not those of a
    key that also wraps the sampler's loop (EasyCache, LazyCache: their state is set up per
    sampling run, which a one-step pass never has). Returns ``(options, keys left out)``."""
    base = dict((getattr(patcher, "model_options", None) or {}).get("transformer_options", {}))
    registered = getattr(patcher, "wrappers", None) or {}
    sampler_keys = {key for kind, by_key in registered.items() if kind not in _MODEL_CALL_WRAPPERS for key in by_key}
    wrappers = {kind: {key: list(funcs) for key, funcs in by_key.items()}
                for kind, by_key in (base.get("wrappers") or {}).items()}
    left_out = []
    for kind in _MODEL_CALL_WRAPPERS:
        for key, funcs in (registered.get(kind) or {}).items():
            if key in sampler_keys:
                left_out.append(key)
            elif funcs:
                wrappers.setdefault(kind, {}).setdefault(key, []).extend(funcs)
    if wrappers:
        base["wrappers"] = wrappers
    return base, sorted({str(k) for k in left_out})


class ComfyVelocity:
    """:class:`~fluxsr_core.interfaces.VelocityModel` over a ComfyUI MODEL (``ModelPatcher``).

    ``cond`` at call time is a ComfyUI CONDITIONING. Its entries are turned into model inputs by
    the model's own ``extra_conds`` (as ComfyUI's samplers do), so FLUX variants and the
    ``guidance`` key behave as in a KSampler. Several entries are averaged by their ``strength``,
    as ComfyUI's sampler averages unmasked conditionings; area/mask conditioning and ControlNets
    are refused with a clear error (they have no meaning for a one-step tile pass).
    """

    def __init__(self, model: Any, teacher: bool = False):
        check_flux_model(model, teacher)
        self.patcher = model
        self._cache: dict = {}
        self._warned_rope = False
        self._warned_wrappers = False

    # ComfyUI's loader decides where and how much of the model goes on the GPU.
    def _load(self, shape: tuple) -> None:
        import comfy.model_management as mm  # noqa: PLC0415
        memory = None
        try:
            memory = self.patcher.model.memory_required(list(shape))
        except Exception:  # noqa: BLE001 - older ComfyUI: no estimate, load as usual
            memory = None
        if memory is not None:
            mm.load_models_gpu([self.patcher], memory_required=memory)
        else:
            mm.load_models_gpu([self.patcher])

    def _model_conds(self, conditioning: Any, x: torch.Tensor) -> list[tuple[dict, float]]:
        key = (id(conditioning), tuple(x.shape), str(x.device))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is conditioning:
            return hit[1]
        inner = self.patcher.model
        prepared = []
        for tokens, extra in _check_conditioning(conditioning):
            for bad, what in (("area", "area conditioning"), ("mask", "mask conditioning"),
                              ("control", "ControlNet conditioning"), ("gligen", "GLIGEN conditioning"),
                              ("hooks", "a conditioning with hooks (Set CLIP Hooks, hook LoRAs)")):
                if extra.get(bad) is not None:
                    advice = " (a LoRA goes on the MODEL: FluxSR Load LoRA)" if bad == "hooks" else ""
                    raise ValueError(f"{what} is not supported by FluxSR's one-step upscale; connect a "
                                     f"plain FLUX conditioning (FluxSRConditioning){advice}")
            start, end = extra.get("start_percent", 0.0), extra.get("end_percent", 1.0)
            if (start, end) != (0.0, 1.0):  # ComfyUI's samplers drop it outside its range; it was used throughout
                raise ValueError(f"the conditioning applies from {start:.0%} to {end:.0%} of the sampling only "
                                 "(ConditioningSetTimestepRange), which FluxSR does not follow: the one-step upscale "
                                 "runs at one timestep, and a teacher pair stores one conditioning for every step; "
                                 "connect it without the timestep range")
            _check_widths(getattr(inner, "diffusion_model", None), tokens, extra.get("pooled_output"))
            params = {k: v for k, v in extra.items() if k != SETTINGS_KEY}
            if tokens is not None:
                params["cross_attn"] = tokens
            params.update(device=x.device, noise=x, width=x.shape[-1] * VAE_DOWNSCALE,
                          height=x.shape[-2] * VAE_DOWNSCALE, prompt_type="positive")
            out = inner.extra_conds(**params)
            kwargs = {}
            for name, value in out.items():
                processed = value.process_cond(batch_size=x.shape[0], device=x.device, area=None)
                kwargs[name] = processed.cond
            prepared.append((kwargs, float(extra.get("strength", 1.0))))
        self._cache = {key: (conditioning, prepared)}  # one shape at a time: tiles share it
        return prepared

    def __call__(self, latent: torch.Tensor, sigma: torch.Tensor, cond: Any,
                 position_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        self._load(tuple(latent.shape))
        patcher = self.patcher
        inner = patcher.model
        device = patcher.load_device
        x = latent.to(device=device, dtype=torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] > 1:
            sigma = sigma.expand(x.shape[0])
        if bool((sigma <= 0).any()):
            raise ValueError("the velocity is undefined at sigma 0 (ComfyUI returns x0 there)")

        options = getattr(patcher, "model_options", {}) or {}
        call_options, left_out = model_call_options(patcher)
        if left_out and not self._warned_wrappers:
            log.warning("FluxSR: the MODEL's %s wrapper%s not run: %s the sampler's loop, which a one-step "
                        "upscale has none of", ", ".join(left_out), "s are" if len(left_out) > 1 else " is",
                        "they wrap" if len(left_out) > 1 else "it wraps")
            self._warned_wrappers = True
        total, weight = None, 0.0
        for kwargs, strength in self._model_conds(cond, x):
            transformer_options = dict(call_options)
            transformer_options.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
            if position_offset != (0, 0):
                if not self._warned_rope and not _supports_rope_shift(getattr(inner, "diffusion_model", None)):
                    log.warning("FluxSR: this ComfyUI's FLUX ignores rope offsets; tiles use local "
                                "position ids")
                    self._warned_rope = True
                rope = dict(transformer_options.get("rope_options") or {})
                rope["shift_y"] = rope.get("shift_y", 0.0) + float(position_offset[0])
                rope["shift_x"] = rope.get("shift_x", 0.0) + float(position_offset[1])
                transformer_options["rope_options"] = rope
            c = dict(kwargs)
            c["transformer_options"] = transformer_options
            wrapper = options.get("model_function_wrapper")
            if wrapper is not None:
                x0 = wrapper(inner.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
            else:
                x0 = inner.apply_model(x, sigma, **c)
            x0 = x0.float() * strength
            total = x0 if total is None else total + x0
            weight += strength
        if not weight:
            raise ValueError("all conditioning entries have strength 0")
        x0 = total / weight
        velocity = (x - x0) / sigma.view(-1, *([1] * (x.ndim - 1)))
        return velocity.to(device=latent.device, dtype=latent.dtype)


# --- latent codec over a ComfyUI VAE --------------------------------------------------------

def _latent_vae_tiling(vae_tile: int, vae_overlap: int) -> tuple[int, int]:
    """The tile and overlap, in latent pixels, that :meth:`ComfyCodec.decode` hands ComfyUI."""
    return max(8, int(vae_tile) // VAE_DOWNSCALE), int(vae_overlap or 0) // VAE_DOWNSCALE  # 64 px at least


def check_vae_tiling(vae_tile: int, vae_overlap: int) -> None:
    """ValueError unless ComfyUI's tiled VAE can run these: ``encode_tiled``/``decode_tiled`` also
    run tiles of half the size with the same overlap, so the overlap must stay under half the tile
    (at half it divides by zero; above, no tile is run and the picture comes back NaN, black)."""
    if not vae_tile:
        return
    latent_tile, latent_overlap = _latent_vae_tiling(vae_tile, vae_overlap)
    if int(vae_overlap or 0) >= int(vae_tile) // 2 or latent_overlap >= latent_tile // 2:
        raise ValueError(f"vae_tile_overlap {vae_overlap} must be less than half of vae_tile_size {vae_tile}: ComfyUI's "
                         f"tiled VAE also runs tiles of half that size with the same overlap (a quarter, "
                         f"{int(vae_tile) // 4 // 8 * 8}, is usual)")


def _comfy_interrupt_check() -> Optional[Callable[[], None]]:
    """ComfyUI's own check for a pressed Cancel (raises its InterruptProcessingException), or
    None outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return getattr(mm, "throw_exception_if_processing_interrupted", None)


@contextlib.contextmanager
def _tiled_memory_reckoning(vae: Any, half_name: str, half: torch.nn.Module, tile: int
                            ) -> Iterator[Optional[vae_tiling.TileWork]]:
    """Within the block, ComfyUI's VAE reckons the memory of an encode or decode (what it frees
    other models for, and how many images it runs at once) for whole-image tiles: the
    activations they hold (:func:`~fluxsr_core.vae_tiling.held_bytes`) and its own figure for
    one tile, never more than its figure for the untiled pass. Its ``memory_used_encode`` /
    ``memory_used_decode`` reckon an untiled pass (its own tiled VAE uses them too, a TODO in
    comfy/sd.py): at 2048 px about 18 GB for the FLUX decoder in bf16, which would unload the
    diffusion model on a 24 GB card before every decode.

    Yields that figure for one tile (:data:`~fluxsr_core.vae_tiling.TileWork`; None for a VAE
    without the reckoning) for the tiling's own weighing, so that where ComfyUI freed room for
    the held activations beside one tile, the tiling keeps them there."""
    name = "memory_used_encode" if half_name == "encoder" else "memory_used_decode"
    untiled = getattr(vae, name, None)
    if not callable(untiled):
        yield None
        return
    # encode: [B, 3, H, W] pixels; decode: the [B, 16, H/8, W/8] latent
    pixels_per, channels = (1, 3) if half_name == "encoder" else (VAE_DOWNSCALE, LATENT_CHANNELS)
    side = max(1, int(tile) // pixels_per)

    def one_tile(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
        shape = (1, channels, min(height // pixels_per, side), min(width // pixels_per, side))
        return int(batch) * int(untiled(shape, dtype))

    def reckon(shape, dtype, *args, **kwargs):
        whole = untiled(shape, dtype, *args, **kwargs)
        if len(shape) != 4:
            return whole
        height, width = shape[2] * pixels_per, shape[3] * pixels_per
        return min(whole, vae_tiling.held_bytes(half, height, width, 1, dtype) + one_tile(1, height, width, dtype))

    own = name in getattr(vae, "__dict__", {})  # comfy.sd.VAE sets them per instance, in __init__
    setattr(vae, name, reckon)
    try:
        yield one_tile
    finally:
        if own:
            setattr(vae, name, untiled)
        else:
            delattr(vae, name)


class ComfyCodec:
    """:class:`~fluxsr_core.interfaces.LatentCodec` over a ComfyUI VAE.

    ``vae_tile``/``vae_overlap`` (image pixels, from the tiling options) tile images larger than
    one tile; 0 disables tiling (ComfyUI still falls back to tiles by itself on out-of-memory).
    The tiles are :mod:`fluxsr_core.vae_tiling`'s, every GroupNorm with the whole image's
    statistics (the untiled result up to rounding), run inside ComfyUI's own ``encode`` /
    ``decode`` so its memory management, dtypes and batching stay in charge. ComfyUI's
    ``encode_tiled``/``decode_tiled`` (each tile normalised alone, three passes of differently
    shaped tiles averaged, so three times the work) are used for a VAE that
    :func:`~fluxsr_core.vae_tiling.encoder_problem` refuses, with a warning.
    """

    downscale = VAE_DOWNSCALE
    latent_channels = LATENT_CHANNELS

    def __init__(self, vae: Any, vae_tile: int = 0, vae_overlap: int = 0):
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise ValueError("the vae input is not a ComfyUI VAE; connect a VAELoader with the FLUX "
                             "VAE (ae.safetensors)")
        channels = getattr(vae, "latent_channels", LATENT_CHANNELS)
        if channels != LATENT_CHANNELS:
            raise ValueError(f"the VAE has {channels} latent channels; FluxSR needs the 16-channel FLUX "
                             "VAE (ae.safetensors)")
        self.vae = vae
        self.set_tiling(vae_tile, vae_overlap)

    def set_tiling(self, vae_tile: int, vae_overlap: int) -> None:
        """Change the VAE tile size (the out-of-memory retry calls this); :func:`check_vae_tiling`."""
        check_vae_tiling(vae_tile, vae_overlap)
        self.vae_tile = int(vae_tile or 0)
        self.vae_overlap = int(vae_overlap or 0)

    def _whole_image_half(self, name: str) -> Optional[torch.nn.Module]:
        """The VAE's ``encoder``/``decoder`` module when whole-image tiling can run it, else None
        (said once per VAE)."""
        half = getattr(getattr(self.vae, "first_stage_model", None), name, None)
        problem = "it has no first_stage_model." + name if half is None else (
            vae_tiling.encoder_problem(half) if name == "encoder" else vae_tiling.decoder_problem(half))
        if problem is None:
            return half
        vae_tiling.warn_unsupported_once(self.vae, name, problem, "ComfyUI's own tiled VAE")
        return None

    def _tiled(self, height: int, width: int) -> bool:
        return self.vae_tile > 0 and max(height, width) > self.vae_tile

    def _run(self, half_name: str, height: int, width: int, plain: Callable[[], Any],
             comfy_tiled: Callable[[], Any]) -> Any:
        """``plain()`` (ComfyUI's untiled VAE call) for an image of one tile; for a larger one
        the same call with the VAE's ``half_name`` module running whole-image tiles, else
        ``comfy_tiled()`` (ComfyUI's tiled pass)."""
        if not self._tiled(height, width):
            return plain()
        half = self._whole_image_half(half_name)
        if half is None:
            return comfy_tiled()
        encoder, decoder = (half, None) if half_name == "encoder" else (None, half)
        with _tiled_memory_reckoning(self.vae, half_name, half, self.vae_tile) as tile_work, \
                vae_tiling.tiled_forwards(encoder, decoder, self.vae_tile, cancel_check=_comfy_interrupt_check(),
                                          tile_work={half_name: tile_work} if tile_work else None):
            return plain()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> normalised latent ``[B, 16, H/8, W/8]``."""
        pixels = image.float().clamp(0.0, 1.0).movedim(1, -1)
        raw = self._run("encoder", image.shape[-2], image.shape[-1], lambda: self.vae.encode(pixels),
                        lambda: self.vae.encode_tiled(pixels, tile_x=self.vae_tile, tile_y=self.vae_tile,
                                                      overlap=self.vae_overlap))
        if raw.ndim != 4 or raw.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"the VAE encoded to a latent of shape {tuple(raw.shape)}, not [B, 16, h, w] (a video "
                             "VAE?); FluxSR needs the FLUX VAE (ae.safetensors)")
        return normalize(raw.float())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> ``[B, 3, H, W]`` in [0, 1]."""
        raw = denormalize(latent.float())
        tile, overlap = _latent_vae_tiling(self.vae_tile, self.vae_overlap)  # as ComfyUI's VAEDecodeTiled
        pixels = self._run("decoder", latent.shape[-2] * VAE_DOWNSCALE, latent.shape[-1] * VAE_DOWNSCALE,
                           lambda: self.vae.decode(raw),
                           lambda: self.vae.decode_tiled(raw, tile_x=tile, tile_y=tile, overlap=overlap))
        if pixels.ndim == 5:  # video-capable VAEs return [B, T, H, W, C]
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
        return pixels[..., :3].movedim(-1, 1).float()


# --- MODEL: a LoRA applied by FluxSRLoraLoader, and the run settings it carries ----------------

# The key under which FluxSRLoraLoader keeps the LoRA's run settings in the MODEL's
# ``model_options``. ``ModelPatcher.clone`` deep-copies that dict, so the settings follow the
# MODEL through later patch and LoRA nodes; ComfyUI ignores keys it does not know. (ComfyUI's own
# LoRA loaders read tensors only, so a LoRA's metadata, T_L included, is lost with them.)
MODEL_SETTINGS_KEY = "fluxsr_lora_settings"

# A LoRA layer's down/A and up/B tensors, in the namings ComfyUI reads.
_LORA_LAYER_PARTS = (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight"),
                     ("lora.down.weight", "lora.up.weight"), ("lora_A.default.weight", "lora_B.default.weight"),
                     (".lora_A", ".lora_B"), ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"))
_LORA_LAYER_KEY = tuple(down for down, _ in _LORA_LAYER_PARTS)  # one per layer


def _patch_count(model: Any) -> int:
    return sum(len(v) for v in getattr(model, "patches", {}).values())


def has_no_guidance_embedding(model: Any) -> bool:
    """True for a ComfyUI MODEL whose FLUX transformer has no guidance embedding (FLUX.1-schnell
    and models made from it): ComfyUI then ignores the conditioning's guidance. False for
    FLUX.1-dev, and whenever the MODEL does not say (not a ComfyUI FLUX model)."""
    inner = getattr(model, "model", None)
    embed = getattr(getattr(getattr(inner, "diffusion_model", None), "params", None), "guidance_embed", None)
    if embed is None:
        unet_config = getattr(getattr(inner, "model_config", None), "unet_config", None)
        embed = unet_config.get("guidance_embed") if isinstance(unet_config, dict) else None
    return embed is False


# Said by both nodes (and, in its own words, by fluxsr upscale) for such a MODEL.
NO_GUIDANCE_EMBEDDING_NOTE = (
    "the MODEL has no guidance embedding (FLUX.1-schnell?), so the guidance setting has no effect; FluxSR is "
    "distilled from FLUX.1-dev, and a FluxSR LoRA made on it gives results off from its own on this model: "
    "pick flux1-dev (or one of its fp8/GGUF files) in the model loader")


def model_patches(model: Any) -> tuple[int, str]:
    """``(number of patched weights, short fingerprint)`` of the weight patches (LoRAs) a ComfyUI
    MODEL carries; ``(0, "")`` for a plain model. The fingerprint covers which weights are patched
    and with what strengths, not the patch values."""
    import hashlib

    found = getattr(model, "patches", None) or {}
    if not isinstance(found, dict) or not found:
        return 0, ""
    digest = hashlib.sha256()
    for key in sorted(found):
        strengths = [(entry[0], entry[2]) if isinstance(entry, (list, tuple)) and len(entry) > 2 else ()
                     for entry in found[key]]
        digest.update(f"{key}:{strengths!r};".encode())
    return len(found), digest.hexdigest()[:8]


_FLOAT_GGUF_TYPES = ("F32", "F16", "BF16")


def _fp8_name(dtype: Any, layout: str = "") -> str:
    """``"fp8"`` for e4m3fn (FLUX's fp8 files, and the name pairs have always recorded), else
    ``"fp8_<format>"`` (``fp8_e5m2``): the two round weights differently, so their teachers differ.
    ``layout``: a comfy_kitchen layout's name, which says the format when its storage dtype does not."""
    if "e5m2" in layout.lower():
        return "fp8_e5m2"
    name = str(dtype).replace("torch.", "")
    return "fp8_" + name.replace("float8_", "") if dtype in FP8_DTYPES and name != "float8_e4m3fn" else "fp8"


def model_weight_storage(model: Any) -> str:
    """How a ComfyUI MODEL stores its diffusion model's weights, as pairs record it: ``"full"``;
    ``"fp8"`` (UNETLoader's fp8_e4m3fn weight dtype, or a scaled-fp8 file that ComfyUI 0.8 holds as
    comfy_kitchen's ``QuantizedTensor``, whose dtype reads bf16), ``"fp8_e5m2"`` (the other); ``"nvfp4"`` (such a tensor in
    an FP4 layout); ``"gguf-<types>"`` (ComfyUI-GGUF's GGMLTensor weights, e.g. ``gguf-Q8_0``).
    Each changes the numbers a teacher samples."""
    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion, torch.nn.Module):
        return "full"
    gguf_types, kinds = set(), set()
    for param in diffusion.parameters():
        tensor_type = getattr(param, "tensor_type", None)
        layout = getattr(param, "layout_cls", None)
        if tensor_type is not None:
            name = str(getattr(tensor_type, "name", tensor_type))
            if name not in _FLOAT_GGUF_TYPES:
                gguf_types.add(name)
        elif layout is not None and hasattr(param, "storage_dtype"):  # comfy_kitchen's QuantizedTensor
            layout_name = str(getattr(layout, "__name__", layout))
            kinds.add("nvfp4" if "fp4" in layout_name.lower()
                      else _fp8_name(getattr(param, "storage_dtype", None), layout_name))
        elif param.dtype in FP8_DTYPES:
            kinds.add(_fp8_name(param.dtype))
    if gguf_types:
        return "gguf-" + "+".join(sorted(gguf_types))
    return "+".join(sorted(kinds)) if kinds else "full"


_FINGERPRINT_WEIGHTS = 16  # weights sampled, spread over the model (a fine-tune changes them all)
_FINGERPRINT_VALUES = 256  # bytes per weight; per patch tensor, 32


def _sampled_bytes(tensor: Any, count: int) -> bytes:
    """``count`` bytes spread evenly over a tensor's storage (its packed blocks for ComfyUI-GGUF's
    GGMLTensor and comfy_kitchen's QuantizedTensor), with its dtype and shape; only they leave
    the device."""
    data = getattr(tensor, "_qdata", None)  # comfy_kitchen's QuantizedTensor keeps its bytes there
    data = (data if isinstance(data, torch.Tensor) else tensor).detach()
    if type(data) not in (torch.Tensor, torch.nn.Parameter):
        data = torch.Tensor.as_subclass(data, torch.Tensor)  # a GGMLTensor's shape is the unpacked one
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    if data.device.type == "meta" or data.numel() == 0:
        return head
    raw = data.reshape(-1).contiguous().view(torch.uint8)
    n, k = raw.numel(), min(count, raw.numel())
    # in integers: float32 linspace overshoots the last index past 2**24 bytes (a FLUX weight)
    index = (torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)).to(raw.device)
    return head + raw[index].cpu().numpy().tobytes()


def _patch_parts(value: Any, depth: int = 0):
    """The tensors and numbers of a ComfyUI weight patch (a LoRAAdapter's ``weights``, or the
    older ``("lora", (up, down, alpha, ...))`` tuples), in order."""
    if isinstance(value, torch.Tensor) or isinstance(value, (int, float, str)) or value is None:
        yield value
    elif depth < 5:
        if isinstance(value, (list, tuple)):
            for item in value:
                yield from _patch_parts(item, depth + 1)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                yield key
                yield from _patch_parts(value[key], depth + 1)
        elif hasattr(value, "weights"):  # comfy.weight_adapter's adapters
            yield type(value).__name__
            yield from _patch_parts(value.weights, depth + 1)


def teacher_model_fingerprint(model: Any) -> str:
    """16 hex digits telling one teacher MODEL's numbers from another's, for pairs to record:
    bytes sampled from its diffusion model's weights (spread over the model: FLUX.1-dev,
    FLUX.1-schnell and a fine-tune of either differ everywhere) and from its patches' values
    (two LoRAs on the same layers at the same strength, which :func:`model_patches` cannot tell
    apart). The MODEL's own patched weights are not sampled, and the others are read as they were
    before any patch (ComfyUI adds a LoRA into the weights while a MODEL is loaded, and its clones
    share them), so the value does not move with what ran before. A cheap
    sample, not a hash of 24 GB. "" when the MODEL has no diffusion model to read (not ComfyUI's)."""
    import hashlib

    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion, torch.nn.Module):
        return ""
    found = getattr(model, "patches", None)
    found = found if isinstance(found, dict) else {}
    # Clones of one MODEL share its weights: another clone's LoRA (FluxSR Load LoRA's, say, from an
    # upscale run just before) stays added into them until a clone without it loads. ComfyUI keeps
    # every patched weight's original in the shared ``backup``: read from there.
    backup = getattr(model, "backup", None)
    backup = backup if isinstance(backup, dict) else {}
    weights = [(n, p) for n, p in diffusion.named_parameters() if f"diffusion_model.{n}" not in found]
    step = max(1, len(weights) // _FINGERPRINT_WEIGHTS)
    digest = hashlib.sha256()
    for name, param in weights[::step][:_FINGERPRINT_WEIGHTS]:
        original = getattr(backup.get(f"diffusion_model.{name}"), "weight", None)
        tensor = original if isinstance(original, torch.Tensor) else param
        digest.update(name.encode() + _sampled_bytes(tensor, _FINGERPRINT_VALUES))
    for key in sorted(found):
        digest.update(str(key).encode())
        for entry in found[key]:
            for part in _patch_parts(entry):
                digest.update(_sampled_bytes(part, 32) if isinstance(part, torch.Tensor) else repr(part).encode())
    return digest.hexdigest()[:16]


def apply_lora(model: Any, lora_state_dict: dict, strength: float, name: str) -> Any:
    """``model`` with the LoRA patched in by ComfyUI (as LoraLoaderModelOnly does); a clone.

    Refuses a LoRA none of whose layers fit the MODEL (another model family, or a MODEL that is
    not FLUX.1), naming what it looks like; warns when only some layers found a place.
    """
    import comfy.sd  # noqa: PLC0415 - ComfyUI's module

    from ..fluxsr_core.lora import guess_model_family, is_text_encoder_key

    if not lora_state_dict:
        raise ValueError(f"FluxSR Load LoRA: {name} holds no tensors, so it is not a LoRA; re-download or "
                         "re-export it")
    layers = sum(1 for k in lora_state_dict if k.endswith(_LORA_LAYER_KEY) and not is_text_encoder_key(k))
    with _ComfyLeftOut() as left_out:
        patched = comfy.sd.load_lora_for_models(model, None, lora_state_dict, float(strength), 0)[0]
    placed = _patch_count(patched) - _patch_count(model)
    if placed <= 0:
        text = [k for k in lora_state_dict if is_text_encoder_key(k)]
        if len(text) == len(lora_state_dict):  # as fluxsr upscale says it: nothing here is for the transformer
            raise ValueError(f"FluxSR Load LoRA: {name} holds no LoRA tensors for the FLUX transformer (only "
                             f"{len(text)} text-encoder tensors, which FluxSR does not use: it runs with fixed text "
                             "embeddings); pick the FluxSR LoRA")
        family = guess_model_family(lora_state_dict)
        what = f"it looks like a LoRA for {family}" if family else "is it a FLUX.1 LoRA, and the MODEL FLUX.1-dev?"
        # layers in a naming we know; else the tensors (a layer has two or three of them)
        count = f"{layers} layers" if layers else f"{len(lora_state_dict)} tensors"
        raise ValueError(f"FluxSR Load LoRA: none of the {count} of {name} fit "
                         f"this MODEL ({what}); connect FLUX.1-dev and pick the FluxSR LoRA")
    _warn_left_out(left_out.keys, name)
    if layers and placed < layers:
        log.warning("FluxSR Load LoRA: only %d of the %d layers of %s found a place in this MODEL (ComfyUI logs "
                    "the others as 'lora key not loaded'); the upscale runs without them", placed, layers, name)
    return patched


class _ComfyLeftOut(logging.Handler):
    """The LoRA keys ComfyUI's loader leaves out, as it logs them ("lora key not loaded: <key>",
    on the root logger, in every ComfyUI version this pack supports): its loader returns no list."""

    PREFIX = "lora key not loaded: "

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith(self.PREFIX):
            self.keys.append(text[len(self.PREFIX):])

    def __enter__(self) -> "_ComfyLeftOut":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


# What a left-out key is, by its name: said so the user knows what the upscale runs without.
_LEFT_OUT_KINDS = (("lora_magnitude_vector", "DoRA magnitudes"), (".bias", "LoRA biases"))
# A layer's own tensors: a layer left out is counted by apply_lora's layers-placed warning.
_LAYER_PART_KEY = tuple(part for pair in _LORA_LAYER_PARTS for part in pair) + (".alpha",)


def _warn_left_out(keys: list[str], name: str) -> None:
    """Warnings for the tensors of LoRA ``name`` that ComfyUI left out, by kind, besides whole
    layers (counted apart): text-encoder ones with what FluxSR does with them, DoRA magnitudes
    and LoRA biases (which ``fluxsr upscale`` applies), others."""
    from ..fluxsr_core.lora import is_text_encoder_key, text_encoder_note

    text = [k for k in keys if is_text_encoder_key(k)]
    kinds: dict[str, list[str]] = {}
    for k in keys:
        if not is_text_encoder_key(k) and not k.endswith(_LAYER_PART_KEY):
            kind = next((label for part, label in _LEFT_OUT_KINDS if part in k), "other tensors")
            kinds.setdefault(kind, []).append(k)
    parts = [f"{kind}: {len(v)} (e.g. {v[0]})" for kind, v in kinds.items()]
    if parts:
        log.warning("FluxSR Load LoRA: ComfyUI's loader did not apply these tensors of %s: %s; the upscale runs "
                    "without them%s", name, "; ".join(parts),
                    " (fluxsr upscale applies peft-named DoRA magnitudes and LoRA biases outside its fp8 memory "
                    "modes: its result differs from this one)"
                    if set(kinds) & {"DoRA magnitudes", "LoRA biases"} else "")
    if text:
        log.warning("FluxSR Load LoRA: %s: %s", name, text_encoder_note(len(text)))


def attach_model_settings(model: Any, settings: RunSettings) -> None:
    """Keep the LoRA's run settings in ``model``'s options (a clone of its own, not the input)."""
    options = getattr(model, "model_options", None)
    if options is None:
        raise ValueError("the MODEL has no model_options: is it a ComfyUI MODEL (ModelPatcher)?")
    options[MODEL_SETTINGS_KEY] = _settings_to_dict(settings)


def model_settings(model: Any) -> Optional[RunSettings]:
    """The run settings FluxSRLoraLoader attached to a MODEL; None for any other MODEL."""
    data = (getattr(model, "model_options", None) or {}).get(MODEL_SETTINGS_KEY)
    return _settings_from_dict(data) if data else None


# --- factories (CI tests replace these with diffusers-backed ones) ---------------------------

def make_velocity(model: Any, teacher: bool = False) -> Any:
    """The velocity model for a MODEL input (``teacher``: the Teacher Sampler's, plain FLUX.1-dev)."""
    return ComfyVelocity(model, teacher)


# The teacher decodes whole images: ComfyUI tiles by itself only when memory runs out.
NO_VAE_TILING = TilingConfig(vae_tile=0, vae_overlap=0)


def make_codec(vae: Any, tiling: TilingConfig) -> Any:
    """The latent codec for a VAE input, tiled as ``tiling`` says."""
    return ComfyCodec(vae, tiling.vae_tile, tiling.vae_overlap)


# --- ComfyUI runtime hooks -----------------------------------------------------------------

def intermediate_device() -> torch.device:
    """Where ComfyUI wants node outputs (CPU unless --gpu-only); CPU without ComfyUI."""
    try:
        import comfy.model_management as mm  # noqa: PLC0415
    except ImportError:
        return torch.device("cpu")
    return mm.intermediate_device()


def cancel_check() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel; no-op without ComfyUI."""
    try:
        import comfy.model_management as mm  # noqa: PLC0415
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class ComfyProgress:
    """ProgressBar over several core calls (one per image of a batch).

    ``for_item(i)`` returns the core :data:`~fluxsr_core.interfaces.ProgressCallback` of item
    ``i``; the bar runs over ``items * tiles`` units. A latent preview, when the core passes one,
    is drawn with ComfyUI's own previewer (Latent2RGB or TAESD, per the user's setting) on
    ``device`` (the MODEL's load device, as ComfyUI's samplers do: the latents of a tiled upscale
    sit on the CPU, where a TAESD decode per tile would cost more than the tile itself).
    """

    def __init__(self, items: int, latent_format: Any = None, device: Optional[torch.device] = None):
        self.items = max(1, int(items))
        self.latent_format = latent_format
        self.device = device
        self._bar = None
        self._previewer = None
        self._preview_failed = False
        try:
            import comfy.utils  # noqa: PLC0415
        except ImportError:
            return
        self._bar = comfy.utils.ProgressBar(self.items)

    def _preview(self, latent: Optional[torch.Tensor]):
        if latent is None or self.latent_format is None or self._preview_failed:
            return None
        device = self.device or latent.device
        try:
            if self._previewer is None:
                import latent_preview  # noqa: PLC0415 - ComfyUI's module
                self._previewer = latent_preview.get_previewer(device, self.latent_format) or False
            if self._previewer is False:
                return None
            return self._previewer.decode_latent_to_preview_image("JPEG", latent[:1].to(device))
        except Exception as exc:  # noqa: BLE001 - a preview must never break an upscale
            log.debug("FluxSR: no preview (%s)", exc)
            self._preview_failed = True
            return None

    def for_item(self, index: int) -> Callable[[int, int, Optional[torch.Tensor]], None]:
        def callback(done: int, total: int, preview: Optional[torch.Tensor] = None) -> None:
            if self._bar is None or total <= 0:
                return
            self._bar.update_absolute(index * total + done, self.items * total, self._preview(preview))
        return callback


def free_memory() -> None:
    """Ask ComfyUI to release cached GPU memory (before an out-of-memory retry)."""
    try:
        import comfy.model_management as mm  # noqa: PLC0415
    except ImportError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    mm.soft_empty_cache()

"""FluxSR distillation: a FLUX transformer + LoRA learns the one-step LR -> HR map (FLUXSR.md 1-4).

Per optimizer step, for every pair ``(eps, z_0)`` of the batch (teacher pairs from
``fluxsr-train pairs``):

1. ``x_0``: the teacher's decoded image (stored in the pair, else ``decode(z_0)``);
2. ``LR = degrade_to_hr_size(x_0)`` (Real-ESRGAN, seeded per sample) and ``z_L = encode(LR)``
   with the frozen VAE, no gradient;
3. SR branch ``z_H = flow.one_step_sr(student, z_L, T_L, cond)`` (the function the upscaler calls
   per tile), ``x_H = decode(z_H)`` with gradient through the decoder;
4. ``L = w_ftd L_FTD + w_mse MSE(x_H, x_0) + w_tvlpips TV-LPIPS(x_H, x_0) + w_adl ADL``.
   A term of weight 0 is not computed at all (no decode without MSE/TV-LPIPS, no perceptual
   network, no ADL hooks).

Engine: HF accelerate (DDP on CPU/GPU; FSDP/DeepSpeed through accelerate config files, see
``configs/accelerate_*.yaml``), mixed precision, gradient accumulation, gradient checkpointing,
AdamW (bitsandbytes 8-bit when asked for and installed), warm-up + constant/cosine/linear LR
(diffusers' schedules), EMA of the LoRA weights, fp8 storage of the frozen base.

Reproducibility: the data order, the degradation seed and the FTD time of every sample are
functions of ``(data.seed, position in the sample stream)``, where the stream is the
concatenation of seeded per-epoch permutations. A global batch therefore holds the same
samples whatever the number of processes, and ``--resume`` continues the stream exactly.
Checkpoints (accelerate's ``save_state`` with the LoRA instead of the full model) hold the
optimizer, scheduler, EMA, RNG states and step; they are written to a temporary folder and
renamed, and only the last ``checkpoint.keep_last`` are kept. Each is self-contained: it also
holds the fixed conditioning the student trained with (``conditioning.safetensors``, its content
hash in ``trainer_state.json``), the held-out pair ids and an identity of the base model, which
a resume and ``fluxsr-train export`` check.

Public API: :class:`TrainConfig` (+ :func:`load_train_config`), :func:`train` ->
:class:`TrainResult` (or :class:`TrainingInterrupted`), :func:`build_student`,
:func:`compute_losses`, :func:`latest_checkpoint`, :func:`conditioning_digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from fluxsr_core import flow
from fluxsr_core.bundle import ConditioningBundle, conditioning_width_problems, load_bundle, save_bundle
from fluxsr_core.files import atomic_write, first_line, fsync_dir, fsync_tree
from fluxsr_core.interfaces import Conditioning
from fluxsr_core.lora import DEFAULT_ADAPTER_NAME
from fluxsr_core.models import FP8_MODES
from fluxsr_core.settings import DEFAULT_BASE_MODEL, DEFAULT_GUIDANCE, DEFAULT_T_L, RunSettings

from . import config_io
from .config_io import ConfigError
from .degradation import DegradationConfig, degrade, degrade_to_hr_size
from .losses import (ADL_FORMS, DEFAULT_ADL_BLOCKS, DEFAULT_ADL_QUERIES, ADLHook, make_adl_hook,
                     parse_block_spec, tv_lpips)

log = logging.getLogger("fluxsr.train")

# Checkpoint LoRA files hold the trainer's tensors exactly (alpha in fluxsr.lora_alpha), so a
# resume restores them bit for bit; `fluxsr-train export` writes the user-facing file.
LORA_FILE = "lora_weights.safetensors"
EMA_LORA_FILE = "ema_lora_weights.safetensors"
CONFIG_FILE = "config.toml"
STATE_FILE = "trainer_state.json"
CONDITIONING_FILE = "conditioning.safetensors"   # in each checkpoint: the conditioning it trained with
METRICS_FILE = "metrics.jsonl"                   # in the run folder: every log line, appended across resumes
CHECKPOINT_DIR = "checkpoints"
RUN_LOCK_FILE = ".train.lock"  # held by the run writing the folder (the OS drops it if the run dies)
_CKPT_RE = re.compile(r"^step-(\d{7,})$")

# Every linear projection of attention and MLP in both block kinds (diffusers names, relative
# to a block). Double blocks: image and text attention q/k/v/out and both MLPs; single blocks:
# q/k/v, the MLP input and the fused output. The AdaLN modulation linears (norm*.linear) and the
# embedders stay frozen. The same set as diffusers' FLUX LoRA training scripts, all blocks.
DEFAULT_LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
]
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_KIND_OF = {"transformer_blocks": "double", "single_transformer_blocks": "single"}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the message names the last one kept."""


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch's serializer failing on a full disk (a RuntimeError from its C++ writer:
    "PytorchStreamWriter failed writing file", "unexpected pos"); for another process's failure,
    what that process found of its own error."""
    if isinstance(exc, OtherProcessError):
        return exc.write_failure
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(s in text for s in ("PytorchStreamWriter", "unexpected pos", "No space left", "Disk quota"))


def exit_without_teardown(code: int = 0) -> None:
    """End this process with ``code`` at once, skipping the interpreter's teardown, after logging
    and the standard streams are flushed (atexit handlers do not run). For each process of a
    multi-process run, once its work is done: torch's C++ distributed state, torn down at
    interpreter exit, aborts the process now and then (SIGABRT, "terminate called without an
    active exception", in no Python frame, after the run completed and its checkpoint was
    written: 2 of 8 two-process CPU runs with torch 2.14.1, even with the process group
    destroyed), and launchers report that as a failed job. ``fluxsr-train`` does this itself;
    a script of one's own that calls :func:`train` under a launcher ends with it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


class OtherProcessError(RuntimeError):
    """Another process of the run failed (while setting up or in a training step): the message
    names it, what it was doing and its error; that process raised its own. ``write_failure``:
    whether that error was a failed write (:func:`_is_write_failure` on that process)."""

    def __init__(self, message: str, write_failure: bool = False):
        super().__init__(message)
        self.write_failure = write_failure


# =========================================================================================
# config
# =========================================================================================

@dataclass
class ModelConfig:
    """The frozen base. ``transformer``/``vae``: a file or folder (see ``fluxsr_core.models``),
    or ``"tiny"`` for the random test models. ``dtype``: storage/compute dtype of the frozen
    base (``auto``: bf16 on GPUs, fp32 on CPU). ``memory_mode``: ``none``, ``fp8_storage`` or ``fp8_storage_all``
    (base weights stored as float8_e4m3fn, cast per layer; the LoRA stays fp32)."""

    transformer: str = ""
    vae: str = ""
    dtype: str = "auto"
    memory_mode: str = "none"
    gradient_checkpointing: bool = False
    base_model: str = DEFAULT_BASE_MODEL   # written into the exported files' metadata
    init_seed: int = 0                     # weights of "tiny" test models only


@dataclass
class LoraConfig:
    """The student's LoRA. ``target_modules``: layer names relative to a block (default: every
    attention and MLP projection, :data:`DEFAULT_LORA_TARGETS`), or ``"re:<regex>"`` matched
    against full module names. ``blocks``: which blocks get them (``"double:all;single:all"``,
    or e.g. ``"double:0,1;single:-1"``). Defaults: rank 64, alpha 64 (scale 1)."""

    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    blocks: str = "double:all;single:all"


@dataclass
class SettingsConfig:
    """Run settings the student is trained (and later run) with; the scale is ``degradation.scale``."""

    t_l: float = DEFAULT_T_L
    guidance: float = DEFAULT_GUIDANCE


@dataclass
class DataConfig:
    """``pairs``: a pair-dataset folder. ``conditioning``: ``"pairs"`` (each pair's own stored
    conditioning) or a conditioning bundle file used for every pair (the fixed conditioning the
    student runs with). ``teacher_image``: ``auto`` (the pair's stored image, else decode z_0),
    ``stored`` or ``decode``. ``batch_size`` is per process. ``holdout``: the last N pairs (by
    id) when the run starts are kept out of training and used as validation images; the run
    records their ids and keeps exactly those out on every resume (pairs added later train). ``seed``: data order,
    degradation draws and FTD times."""

    pairs: str = ""
    conditioning: str = "pairs"
    teacher_image: str = "auto"
    batch_size: int = 1
    num_workers: int = 0
    holdout: int = 0
    seed: int = 0


@dataclass
class LossConfig:
    """Loss weights (0 turns a term off entirely) and the perceptual network for TV-LPIPS.

    ``perceptual``: a kind of :func:`fluxsr_training.perceptual.load_perceptual` (``lpips-vgg``
    needs a local torchvision backbone: ``perceptual_path`` or the torch hub cache;
    ``stlpips-vgg`` ships in the stlpips-pytorch wheel; ``random-test`` is for tests only).
    ``tv_gamma``: weight of the TV-map term. ``adl_blocks``: the blocks ADL reads.
    ``adl_form``: ``tokens`` (cosine of each image token's block output with the mean token) or
    ``attention`` (cosine of each sampled image-token query's attention row with the mean row,
    per head; ``adl_queries`` queries per sample and block). ``clamp_decoded``: clamp the decoded one-step image to [0, 1] before MSE and TV-LPIPS
    (0.3.0's way; a clamped pixel passes no gradient, so by default they see the overshoot).
    The paper publishes no weights; these defaults are ours."""

    w_ftd: float = 1.0
    w_mse: float = 1.0
    w_tvlpips: float = 1.0
    w_adl: float = 0.01
    perceptual: str = "lpips-vgg"
    perceptual_path: str = ""
    tv_gamma: float = 1.0
    adl_blocks: str = DEFAULT_ADL_BLOCKS
    adl_form: str = "tokens"
    adl_queries: int = DEFAULT_ADL_QUERIES
    clamp_decoded: bool = False


@dataclass
class OptimConfig:
    """AdamW. ``adam_8bit``: ``auto`` (bitsandbytes' AdamW8bit on CUDA when installed),
    ``true`` (required) or ``false``. ``schedule``: a diffusers schedule name (``constant``,
    ``constant_with_warmup``, ``cosine``, ``linear``, ...) with ``warmup_steps``."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    adam_8bit: str = "auto"
    max_grad_norm: float = 1.0
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 100


@dataclass
class EmaConfig:
    """EMA of the LoRA weights (used for validation and export when enabled). With ``warmup``
    the decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates."""

    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoint every ``every`` steps (and at the end); keep the last ``keep_last``."""

    every: int = 500
    keep_last: int = 3


@dataclass
class ValidationConfig:
    """Every ``every`` steps (0: never), upscale held-out LR images with the student through
    ``fluxsr_core.upscaler.upscale_tensor`` and log PSNR against their HR originals.
    ``images``: a folder or file of HR images (their LR is made with the degradation, seeded);
    held-out pairs (``data.holdout``) are added. ``count``: at most this many images."""

    every: int = 0
    images: str = ""
    count: int = 4
    color_fix: str = "wavelet"
    use_ema: bool = True
    seed: int = 1234
    save_images: bool = True


@dataclass
class TrainLoopConfig:
    """The loop. ``mixed_precision``: ``auto`` (bf16 on GPU, none on CPU), ``no``, ``bf16``,
    ``fp16``. ``stop_at``: stop (with a checkpoint) once this step is reached without ending
    the schedule (0: run to ``max_steps``), for budgets and resume tests. ``resume``: ``""``,
    ``"latest"`` (newest checkpoint in ``output_dir``, if any) or a checkpoint folder.
    ``tensorboard``: ``auto``, ``true`` or ``false``."""

    output_dir: str = "runs/fluxsr"
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    stop_at: int = 0
    resume: str = ""
    tensorboard: str = "auto"
    progress_bar: bool = True
    ddp_find_unused_parameters: bool = False


@dataclass
class TrainConfig:
    """Everything ``fluxsr-train train`` needs; TOML sections mirror the fields.

    Load with :func:`load_train_config` (``path`` + ``"section.key=value"`` overrides); the
    resolved config is written beside each checkpoint as ``config.toml``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    settings: SettingsConfig = field(default_factory=SettingsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    @classmethod
    def from_toml(cls, path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Defaults, then the TOML file, then ``"a.b=value"`` overrides."""
        return load_train_config(path, overrides)

    def with_overrides(self, overrides: Sequence[str]) -> "TrainConfig":
        """A copy with ``"a.b=value"`` overrides applied."""
        return config_io.apply_overrides(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return config_io.to_dict(self)

    def save(self, path: str | os.PathLike) -> str:
        """Write as TOML (atomically)."""
        return config_io.save_config(self, path, header="FluxSR training config (resolved)")

    def run_settings(self) -> RunSettings:
        """The :class:`RunSettings` the student is trained with (and exported with)."""
        return RunSettings(t_l=self.settings.t_l, guidance=self.settings.guidance,
                           scale=float(self.degradation.scale), base_model=self.model.base_model,
                           lora_rank=self.lora.rank,
                           source={"t_l": "training config", "guidance": "training config",
                                   "scale": "training config"})


def load_train_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """:class:`TrainConfig` from defaults, an optional TOML file and ``"a.b=value"`` overrides."""
    return config_io.load_config(TrainConfig, path, overrides)


_CHOICES = {
    ("model", "memory_mode"): ("none",) + FP8_MODES,
    ("data", "teacher_image"): ("auto", "stored", "decode"),
    ("optim", "adam_8bit"): ("auto", "true", "false"),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    ("train", "tensorboard"): ("auto", "true", "false"),
    ("validation", "color_fix"): ("none", "adain", "wavelet"),
}


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first unusable value (before anything is loaded)."""
    for (sec, key), choices in _CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in choices:
            raise ConfigError(f"{sec}.{key}={v!r}; choose one of {', '.join(choices)}")
    if not cfg.model.transformer:
        raise ConfigError("model.transformer is required: a FLUX transformer .safetensors file or diffusers "
                          "folder (or 'tiny' for the random test model)")
    config_io.refuse_gguf(cfg.model.transformer, "model.transformer", "the frozen base the LoRA trains on")
    if not cfg.model.vae:
        raise ConfigError("model.vae is required: the FLUX VAE (ae.safetensors or a diffusers folder), "
                          "or 'tiny' for the random test VAE")
    if not cfg.data.pairs:
        raise ConfigError("data.pairs is required: a pair-dataset folder written by `fluxsr-train pairs`")
    flow.check_t_l(cfg.settings.t_l)
    positive = [("lora.rank", cfg.lora.rank), ("data.batch_size", cfg.data.batch_size),
                ("train.max_steps", cfg.train.max_steps),
                ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps),
                ("train.log_every", cfg.train.log_every), ("checkpoint.every", cfg.checkpoint.every),
                ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("optim.lr", cfg.optim.lr)]
    for name, v in positive:
        if not v > 0:
            raise ConfigError(f"{name} must be positive (got {v})")
    for name, v in [("lora.alpha", cfg.lora.alpha), ("settings.guidance", cfg.settings.guidance)]:
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{name} must be a positive number (got {v})")
    for name in ("w_ftd", "w_mse", "w_tvlpips", "w_adl", "tv_gamma"):
        v = getattr(cfg.loss, name)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"loss.{name} must be >= 0 (got {v})")
    if not any(getattr(cfg.loss, n) > 0 for n in ("w_ftd", "w_mse", "w_tvlpips", "w_adl")):
        raise ConfigError("every loss weight is 0: nothing to train (set loss.w_ftd, w_mse, w_tvlpips or w_adl)")
    if cfg.loss.w_adl > 0 and not any(getattr(cfg.loss, n) > 0 for n in ("w_ftd", "w_mse", "w_tvlpips")):
        raise ConfigError("ADL alone is a regulariser, not a training signal; add loss.w_ftd or w_mse")
    if cfg.loss.adl_form not in ADL_FORMS:
        raise ConfigError(f"loss.adl_form must be one of {', '.join(ADL_FORMS)} (got {cfg.loss.adl_form!r})")
    if cfg.loss.adl_queries < 1:
        raise ConfigError(f"loss.adl_queries must be at least 1 (got {cfg.loss.adl_queries})")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must lie in [0, 1) (got {cfg.lora.dropout})")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must lie in (0, 1) (got {cfg.ema.decay})")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1) (got {cfg.optim.betas})")
    if cfg.optim.warmup_steps < 0 or cfg.data.holdout < 0 or cfg.data.num_workers < 0 \
            or cfg.validation.every < 0 or cfg.train.stop_at < 0:
        raise ConfigError("optim.warmup_steps, data.holdout, data.num_workers, validation.every and "
                          "train.stop_at must be >= 0")
    for name, v in (("optim.weight_decay", cfg.optim.weight_decay), ("optim.eps", cfg.optim.eps)):
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0 (got {v})")
    for name, v in (("train.seed", cfg.train.seed), ("data.seed", cfg.data.seed),
                    ("validation.seed", cfg.validation.seed), ("model.init_seed", cfg.model.init_seed)):
        if not 0 <= v < 2 ** 32:  # torch's and numpy's seeding take 32-bit seeds
            raise ConfigError(f"{name} must lie in 0..2**32-1 (got {v})")
    try:
        from fluxsr_core.models import resolve_dtype

        resolve_dtype(cfg.model.dtype, "cpu")
    except ValueError as exc:
        raise ConfigError(f"model.dtype: {exc}") from None
    if cfg.optim.schedule not in _SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}; choose one of {', '.join(_SCHEDULES)}")
    if cfg.optim.schedule == "constant" and cfg.optim.warmup_steps > 0:
        raise ConfigError(f"optim.schedule='constant' has no warm-up (optim.warmup_steps={cfg.optim.warmup_steps} "
                          "would be ignored); use 'constant_with_warmup', or set optim.warmup_steps=0")
    from .perceptual import PERCEPTUAL_KINDS

    if cfg.loss.w_tvlpips > 0 and cfg.loss.perceptual not in PERCEPTUAL_KINDS:
        raise ConfigError(f"loss.perceptual={cfg.loss.perceptual!r}; choose one of {', '.join(PERCEPTUAL_KINDS)}")
    if cfg.optim.adam_8bit == "true" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(_NEEDS_BITSANDBYTES)


_NEEDS_BITSANDBYTES = "optim.adam_8bit=true needs bitsandbytes: pip install bitsandbytes (or set optim.adam_8bit=false)"


_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that make a run weaker than it looks, without making it meaningless (:func:`train`
    logs them at the start): a warm-up not shorter than the run, which never reaches ``optim.lr``."""
    out = []
    o, steps = cfg.optim, cfg.train.max_steps
    if o.warmup_steps > 0 and o.warmup_steps >= steps:
        peak = o.lr * min(1.0, (steps - 1) / o.warmup_steps)  # step k (from 0) runs at lr * k / warmup_steps
        decay = "" if o.schedule == "constant_with_warmup" else f" and the {o.schedule} decay never starts"
        out.append(f"optim.warmup_steps={o.warmup_steps} is not shorter than train.max_steps={steps}: the learning "
                   f"rate is still warming up when the run ends (it reaches at most {peak:.3g}, not optim.lr="
                   f"{o.lr:g}){decay}; set optim.warmup_steps below train.max_steps (e.g. {max(0, steps // 10)})")
    return out


def bundle_prompt(bundle_path: str | os.PathLike) -> Optional[str]:
    """The prompt a ``.safetensors`` bundle records (``fluxsr.prompt``), or None."""
    from fluxsr_core.bundle import KEY_PROMPT

    if not os.fspath(bundle_path).lower().endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(bundle_path), framework="pt") as f:
            return (f.metadata() or {}).get(KEY_PROMPT)
    except Exception:  # noqa: BLE001 - provenance only; the bundle itself was read already
        return None


# =========================================================================================
# the student
# =========================================================================================

def resolve_lora_targets(transformer, targets: Sequence[str], blocks: str = "double:all;single:all") -> list[str]:
    """Full module names of the linear layers the LoRA adapts.

    ``targets``: names relative to a block (``"attn.to_q"``), applied to each selected block
    that has them, or ``"re:<regex>"`` full-matched against every module name. ``blocks``: a
    block selection as in :func:`fluxsr_training.losses.parse_block_spec`. Raises
    :class:`ConfigError` for a target that matches no linear layer (naming the available ones).
    """
    n_double = len(transformer.transformer_blocks)
    n_single = len(transformer.single_transformer_blocks)
    try:
        selected = set(parse_block_spec(blocks, n_double, n_single))
    except ValueError as exc:
        raise ConfigError(f"lora.blocks: {exc}") from None
    plain = [t for t in targets if not t.startswith("re:")]
    regexes = []
    for t in targets:
        if t.startswith("re:"):
            try:
                regexes.append((t, re.compile(t[3:])))
            except re.error as exc:
                raise ConfigError(f"lora.target_modules: {t!r} is not a valid regex ({exc})") from None
    hits: dict[str, int] = {t: 0 for t in targets}
    names: list[str] = []
    available: set[str] = set()
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name or name.endswith("base_layer"):
            continue
        m = _BLOCK_RE.match(name)
        chosen = False
        if m:
            available.add(m.group(3))
            if (_KIND_OF[m.group(1)], int(m.group(2))) in selected and m.group(3) in plain:
                hits[m.group(3)] += 1
                chosen = True
        for t, rx in regexes:
            if rx.fullmatch(name):
                hits[t] += 1
                chosen = True
        if chosen:
            names.append(name)
    unmatched = [t for t, n in hits.items() if n == 0]
    # A plain target may exist in one block kind only (to_add_out: double blocks); it is an
    # error only when no selected block has it.
    if unmatched:
        raise ConfigError(f"lora.target_modules {unmatched} match no linear layer of the selected blocks; "
                          f"block layers are: {', '.join(sorted(available))} (or use 're:<regex>' on full names)")
    if not names:
        raise ConfigError("the LoRA targets no layer; check lora.target_modules and lora.blocks")
    return names


def adl_hook_for(cfg: TrainConfig, transformer) -> ADLHook:
    """The ADL hook ``cfg.loss`` asks for on ``transformer``, inactive until captured;
    :class:`ConfigError` naming ``loss.adl_blocks`` and ``loss.adl_form`` for a selection the
    model cannot take (a block it does not have, an attention without FLUX's q/k norms)."""
    try:
        return make_adl_hook(transformer, cfg.loss.adl_form, cfg.loss.adl_blocks, queries=cfg.loss.adl_queries,
                             active=False)
    except ValueError as exc:
        raise ConfigError(f"loss.adl_blocks={cfg.loss.adl_blocks!r} with loss.adl_form={cfg.loss.adl_form}: "
                          f"{exc}") from None


def check_student_layout(cfg: TrainConfig, transformer_config: dict) -> None:
    """Refuse a ``lora.target_modules``, ``lora.blocks`` or ``loss.adl_blocks`` the transformer of
    ``transformer_config`` cannot take: the very checks the loaded student gets, run on its
    empty (meta-device) layout, so they come before the minutes of loading 12B weights."""
    from fluxsr_core.models import empty_transformer

    layout = empty_transformer(transformer_config)
    resolve_lora_targets(layout, cfg.lora.target_modules, cfg.lora.blocks)
    if cfg.loss.w_adl > 0:
        adl_hook_for(cfg, layout).remove()


def build_student(cfg: TrainConfig, device: torch.device | str = "cpu"):
    """Load the frozen base, add the LoRA (fp32) and place both models on ``device``.

    Returns ``(transformer, vae, compute_dtype)``. The transformer carries the trainable
    adapter :data:`fluxsr_core.lora.DEFAULT_ADAPTER_NAME`; everything else is frozen. With
    ``model.memory_mode = "fp8_storage"`` (or ``fp8_storage_all``) the base weights are built in
    float8 on the device as the file loads (``models.store_in_fp8``; the LoRA stays fp32). The
    LoRA's initial values come from the torch RNG: seed it first for reproducible runs
    (:func:`train` does).
    """
    from peft import LoraConfig as PeftLoraConfig

    from fluxsr_core import models

    dev = _device(device)
    dtype = models.resolve_dtype(cfg.model.dtype, dev)
    # Straight onto this rank's device, so N ranks never hold N models in RAM: in bf16 (none), or
    # built in fp8 as the file loads (the fp8 modes); the memory mode is in place from here on
    loaded = models.load_models(cfg.model.transformer, cfg.model.vae, cfg.model.memory_mode, dtype, dev,
                                seed=cfg.model.init_seed)
    transformer, vae = loaded.transformer, loaded.vae
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    targets = resolve_lora_targets(transformer, cfg.lora.target_modules, cfg.lora.blocks)
    peft_cfg = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=targets, init_lora_weights=True)
    transformer.add_adapter(peft_cfg, adapter_name=DEFAULT_ADAPTER_NAME)
    # Trainable LoRA weights in fp32 whatever the base dtype (AdamW on bf16 weights loses updates).
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    if cfg.model.memory_mode in FP8_MODES:
        # peft made the adapter in its base layer's storage dtype, fp8, rounding lora_A's random
        # start to 3 mantissa bits: draw it again in fp32 (lora_B starts at zero either way)
        from peft.tuners.lora.layer import LoraLayer

        with torch.no_grad():
            for module in transformer.modules():
                if isinstance(module, LoraLayer) and DEFAULT_ADAPTER_NAME in module.lora_A:
                    module.reset_lora_parameters(DEFAULT_ADAPTER_NAME, True)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        # The decoder runs with gradient too (x_H = decode(z_H)); at 1024 px its activations
        # rival the transformer's.
        vae.enable_gradient_checkpointing()
    return transformer, vae, dtype


def _device(device) -> torch.device:
    """A device in the one spelling fluxsr_core uses (accelerate says ``cpu:0`` on CPU ranks)."""
    from fluxsr_core import models

    dev = torch.device(device) if not isinstance(device, str) or ":" in device else None
    if dev is not None and dev.type == "cpu":
        return torch.device("cpu")
    return models.resolve_device(str(dev) if dev is not None else device)


def lora_parameters(transformer, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters keyed by their LoRA-file name (``transformer.<module>.lora_A.weight``)."""
    marker = f".{adapter_name}."
    out = {}
    for name, p in transformer.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and marker in name:
            key = "transformer." + name.replace(marker, ".")
            out[key] = p
    if not out:
        raise ValueError(f"the transformer has no LoRA adapter '{adapter_name}'")
    return out


def save_lora_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], settings: RunSettings, rank: int,
                    alpha: float, extra: Optional[dict[str, str]] = None) -> str:
    """Write LoRA tensors exactly as trained (diffusers naming, fp32) with the ``fluxsr.*`` metadata.

    Unlike :func:`fluxsr_core.lora.save_lora` (the export, which folds ``alpha / r`` into
    ``lora_B`` for ComfyUI), nothing is rescaled: the training alpha is kept in
    ``fluxsr.lora_alpha``, which :func:`fluxsr_core.lora.load_lora` also reads.
    """
    from safetensors.torch import save_file

    from fluxsr_core.lora import KEY_CONTENT, KEY_LORA_ALPHA

    md = {**RunSettings(**{**settings.as_dict(), "lora_rank": int(rank)}).to_metadata(), "format": "pt",
          KEY_CONTENT: "lora", KEY_LORA_ALPHA: repr(float(alpha)),
          "fluxsr.lora_state": "training checkpoint (tensors as trained); `fluxsr-train export` writes the file "
                               "for fluxsr and ComfyUI", **(extra or {})}
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, os.fspath(path),
              metadata=md)
    return os.fspath(path)


def read_lora_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int, float]:
    """``(tensors, rank, alpha)`` of a file written by :func:`save_lora_state`."""
    from fluxsr_core.lora import KEY_LORA_ALPHA
    from fluxsr_core.settings import KEY_LORA_RANK
    from fluxsr_core.weights import CorruptWeightsError, read_safetensors

    try:
        sd, md = read_safetensors(path, "LoRA checkpoint")
    except CorruptWeightsError:  # its own advice is to download the file again: training wrote this one
        raise CorruptWeightsError(f"{os.path.basename(path)} is truncated or not a safetensors file (cut short as it "
                                  "was written: a killed run, a full disk?)") from None
    md = md or {}
    if KEY_LORA_RANK not in md or KEY_LORA_ALPHA not in md:
        raise ValueError(f"{path} is not a FluxSR training checkpoint LoRA (no {KEY_LORA_RANK}/{KEY_LORA_ALPHA})")
    return sd, int(md[KEY_LORA_RANK]), float(md[KEY_LORA_ALPHA])


# =========================================================================================
# EMA
# =========================================================================================

class LoraEMA:
    """Exponential moving average of named LoRA parameters (fp32 shadows).

    Kept by name (not position) so it can be written as a LoRA file in diffusers naming.
    ``decay_at(n) = min(decay, (1 + n) / (10 + n))`` with ``warmup``, else ``decay``.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.999, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {k: p.detach().to(torch.float32).clone() for k, p in params.items()}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        d = self.decay_at(self.num_updates)
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().to(self.shadow[k].device, torch.float32), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied_to(self, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``params`` (restored on exit)."""
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} LoRA tensors (e.g. {sorted(missing)[0]}); "
                             "the checkpoint was made with other LoRA targets")
        self.num_updates = int(state["num_updates"])
        for k in self.shadow:
            self.shadow[k] = state["shadow"][k].to(self.shadow[k].device, torch.float32).clone()


@dataclass
class _TrainState:
    """Counters saved in every checkpoint (accelerate custom object)."""

    step: int = 0
    # Stream positions consumed (samples, all processes): where a resumed run's data goes on,
    # whatever its batch size or process count. None: a checkpoint older than this counter.
    samples: Optional[int] = 0
    # Training pairs when the checkpoint was written: the order is a permutation of them, so
    # a dataset grown (or shrunk) before a resume continues in another order.
    train_pairs: Optional[int] = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "train_pairs": self.train_pairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples = int(state["samples"]) if state.get("samples") is not None else None
        self.train_pairs = int(state["train_pairs"]) if state.get("train_pairs") is not None else None


# =========================================================================================
# data
# =========================================================================================

def end_step(loop: TrainLoopConfig) -> int:
    """The step a run stops at: ``train.max_steps``, or ``train.stop_at`` when set and nearer."""
    return min(loop.stop_at, loop.max_steps) if loop.stop_at else loop.max_steps


def _derived_seed(*parts) -> int:
    """A 31-bit seed from a tuple (stable across runs, processes and platforms)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class SampleStream:
    """The training order: concatenated seeded permutations of ``n`` items, addressed by position.

    Position ``p`` is epoch ``p // n``, item ``perm_epoch[p % n]``. Per position it also fixes
    the degradation seed and the FTD time draw, so a sample is the same wherever it lands
    (any process count, any resume point).
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.seed = int(n), int(seed)
        self._perm: dict[int, list[int]] = {}

    def index(self, pos: int) -> int:
        epoch, off = divmod(int(pos), self.n)
        perm = self._perm.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(_derived_seed(self.seed, "order", epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perm = {epoch: perm}  # one epoch cached is enough for a sequential stream
        return perm[off]

    def degradation_seed(self, pos: int) -> int:
        return _derived_seed(self.seed, "degradation", int(pos))

    def adl_seed(self, pos: int) -> int:
        return _derived_seed(self.seed, "adl", int(pos))

    def ftd_uniform(self, pos: int) -> float:
        g = torch.Generator().manual_seed(_derived_seed(self.seed, "ftd", int(pos)))
        return float(torch.rand(1, generator=g, dtype=torch.float64))


class _StreamBatches(torch.utils.data.Sampler):
    """This process's micro-batches of stream positions, from position ``start`` on, forever.

    Micro-step ``m`` covers global positions ``[start + m G, start + (m + 1) G)`` with
    ``G = batch * world``; process ``r`` takes the ``r``-th ``batch`` of them.
    """

    def __init__(self, batch: int, rank: int, world: int, start: int):
        self.batch, self.rank, self.world, self.start = batch, rank, world, start

    def __iter__(self):
        g = self.batch * self.world
        m = 0
        while True:
            base = self.start + m * g + self.rank * self.batch
            yield list(range(base, base + self.batch))
            m += 1

    def __len__(self):  # pragma: no cover - infinite; DataLoader only asks in some code paths
        return 2 ** 62


class _TrainItems(torch.utils.data.Dataset):
    """Stream position -> pair item with its LR image (degraded here when the image is stored)."""

    def __init__(self, pairs, indices: list[int], stream: SampleStream, degradation: DegradationConfig,
                 teacher_image: str):
        self.pairs, self.indices, self.stream = pairs, indices, stream
        self.degradation, self.teacher_image = degradation, teacher_image

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, pos: int) -> dict[str, Any]:
        item = self.pairs[self.indices[self.stream.index(pos)]]
        item["pos"] = int(pos)
        image = item.pop("image", None)
        if self.teacher_image == "stored" and image is None:
            raise ValueError(f"pair {item['id']} has no stored teacher image but data.teacher_image='stored'; "
                             "use 'auto' or 'decode' (decodes z_0 with the VAE)")
        if image is not None and self.teacher_image != "decode":
            x0 = image.float().div(255.0)[None]
            item["x0"] = x0[0]
            item["lr"] = degrade_to_hr_size(x0, self.degradation, seed=self.stream.degradation_seed(pos))[0]
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    from fluxsr_core.pairs import collate_pairs

    extra = {k: [it.pop(k) for it in items] for k in ("pos", "x0", "lr") if k in items[0]}
    out = collate_pairs(items)
    out["pos"] = extra["pos"]
    for k in ("x0", "lr"):
        if k in extra:
            out[k] = torch.stack(extra[k])
    return out


# =========================================================================================
# losses
# =========================================================================================

@dataclass
class LossParts:
    """The weighted total and each unweighted term (None when its weight is 0)."""

    total: torch.Tensor
    ftd: Optional[torch.Tensor] = None
    mse: Optional[torch.Tensor] = None
    tvlpips: Optional[torch.Tensor] = None
    adl: Optional[torch.Tensor] = None

    def as_floats(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        for k in ("ftd", "mse", "tvlpips", "adl"):
            v = getattr(self, k)
            if v is not None:
                out[k] = float(v.detach())
        return out


def compute_losses(velocity, codec, *, z_l: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor,
                   x0: Optional[torch.Tensor], cond: Any, t_l: float, ftd_t: Optional[torch.Tensor],
                   loss: LossConfig, perceptual: Optional[Callable] = None,
                   adl_hook: Optional[ADLHook] = None,
                   adl_seeds: Optional[Sequence[int]] = None) -> LossParts:
    """The FluxSR training loss for one batch (FLUXSR.md section 2).

    ``codec``: a :class:`~fluxsr_core.models.DiffusersCodec` (``decode(..., clamp=...)``).
    ``z_l``, ``z0``, ``eps``: ``[B, 16, h, w]``; ``x0``: the teacher image ``[B, 3, H, W]`` in
    [0, 1] (needed when ``w_mse`` or ``w_tvlpips`` > 0); ``ftd_t``: FTD times ``[B]`` in
    [T_L, 1] (needed when ``w_ftd`` > 0). The SR branch is ``flow.one_step_sr`` and runs only
    when an image term or ADL needs it; ``adl_hook`` (from :func:`~.losses.make_adl_hook`)
    records during the SR branch only; ``adl_seeds``: one per sample, for a form that samples.
    """
    terms: dict[str, torch.Tensor] = {}
    need_image = loss.w_mse > 0 or loss.w_tvlpips > 0
    if need_image or loss.w_adl > 0:
        if loss.w_adl > 0:
            if adl_hook is None:
                raise ValueError("loss.w_adl > 0 needs an ADL hook (losses.make_adl_hook) on the student")
            with adl_hook.capture():
                z_h = flow.one_step_sr(velocity, z_l, t_l, cond)
            terms["adl"] = adl_hook.loss(sample_seeds=adl_seeds)
            adl_hook.clear()
        else:
            z_h = flow.one_step_sr(velocity, z_l, t_l, cond)
        if need_image:
            if x0 is None:
                raise ValueError("MSE / TV-LPIPS need the teacher image x0")
            x_h = codec.decode(z_h, clamp=loss.clamp_decoded).float()  # unclamped: overshoot gets a gradient
            target = x0.to(x_h.device, torch.float32)
            if loss.w_mse > 0:
                terms["mse"] = F.mse_loss(x_h, target)
            if loss.w_tvlpips > 0:
                if perceptual is None:
                    raise ValueError("loss.w_tvlpips > 0 needs a perceptual network")
                terms["tvlpips"] = tv_lpips(x_h, target, perceptual, gamma=loss.tv_gamma)
    if loss.w_ftd > 0:
        if ftd_t is None:
            raise ValueError("loss.w_ftd > 0 needs FTD times")
        from .losses import ftd_loss

        terms["ftd"] = ftd_loss(velocity, z_l, z0, eps, t_l, cond, t=ftd_t.to(z_l.device))
    weights = {"ftd": loss.w_ftd, "mse": loss.w_mse, "tvlpips": loss.w_tvlpips, "adl": loss.w_adl}
    total = sum(weights[k] * v.float() for k, v in terms.items())
    return LossParts(total=total, **terms)


# =========================================================================================
# checkpoints
# =========================================================================================

def deepspeed_clipping_problem(ds_config: Optional[dict], max_grad_norm: float) -> Optional[str]:
    """Why a DeepSpeed config's ``gradient_clipping`` and ``optim.max_grad_norm`` cannot both
    hold, or None. DeepSpeed's engine clips by its own value and accelerate's
    ``clip_grad_norm_`` then does nothing, so a different max_grad_norm would be ignored."""
    clip = (ds_config or {}).get("gradient_clipping")
    if clip in (None, "auto"):
        return None
    if float(clip) != float(max_grad_norm):
        return (f"the DeepSpeed config clips gradients at {float(clip):g} (gradient_clipping) but optim.max_grad_norm "
                f"is {float(max_grad_norm):g}, which DeepSpeed would ignore; make the two equal")
    return None


def conditioning_digest(t5: torch.Tensor, clip_pooled: torch.Tensor) -> str:
    """The content key of a conditioning (:func:`fluxsr_core.pairs.conditioning_key`) over its
    float32 values: equal for the same embeddings whatever file, dtype, path or metadata they
    come with."""
    from fluxsr_core.pairs import conditioning_key

    return conditioning_key(t5.detach().to("cpu", torch.float32), clip_pooled.detach().to("cpu", torch.float32))


def _transformer_weights_root(p: Path) -> Path:
    """A transformer file or folder; for a whole pipeline folder its ``transformer/`` subfolder."""
    return p / "transformer" if p.is_dir() and (p / "transformer").is_dir() else p


def base_model_identity(transformer: str, init_seed: int = 0) -> dict[str, Any]:
    """What identifies the frozen base a LoRA is trained on, cheaply (no full read).

    A file or folder: :func:`fluxsr_core.weights.weights_fingerprint` of it (of a pipeline folder's
    ``transformer/``): sizes and 16 chunks sampled over each file, by the algorithm ``fluxsr-train
    pairs`` fingerprints its teacher with (of the path it is given). A moved or renamed copy matches; another checkpoint of the
    same architecture, or the same one with a LoRA merged in, does not. A random test model name
    (:data:`fluxsr_core.models.RANDOM_INIT_NAMES`, e.g. ``"tiny"``): its name and ``init_seed``.
    Any other path that does not exist raises :class:`~fluxsr_core.weights.WeightsNotFoundError`
    naming it (before any model is built).
    """
    from fluxsr_core.models import RANDOM_INIT_NAMES, TRANSFORMER_HELP_NO_GGUF
    from fluxsr_core.weights import WeightsNotFoundError, weights_fingerprint

    p = Path(transformer).expanduser()
    if p.exists():
        return {"weights_fingerprint": weights_fingerprint(_transformer_weights_root(p))}
    if str(transformer) in RANDOM_INIT_NAMES:
        return {"test_model": str(transformer), "init_seed": int(init_seed)}
    raise WeightsNotFoundError(f"model.transformer {transformer}: no such file or folder ({p}). {TRANSFORMER_HELP_NO_GGUF}")


# The identity checkpoints recorded before the sampled fingerprint: its key, and what it read.
_HEAD_TAIL_KEY = "sha256_head_tail"
_HEAD_TAIL_CHUNK = 1 << 20
_HEAD_TAIL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _head_tail_identity(transformer: str) -> dict[str, Any]:
    """The base-model identity older checkpoints recorded (sha256 of each weight file's size,
    first and last MiB), computed the same way, so their runs stay resumable. It cannot see a
    change in the middle of a file only; new checkpoints record :func:`base_model_identity`."""
    root = _transformer_weights_root(Path(transformer).expanduser())
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file()
                                                 and f.suffix.lower() in _HEAD_TAIL_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix() if f != root else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_HEAD_TAIL_CHUNK))
            if size > _HEAD_TAIL_CHUNK:
                fh.seek(max(_HEAD_TAIL_CHUNK, size - _HEAD_TAIL_CHUNK))
                h.update(fh.read(_HEAD_TAIL_CHUNK))
    return {"weight_files": len(files), _HEAD_TAIL_KEY: h.hexdigest()}


def _fmt(v: Any) -> str:
    """A config value as the user writes it in an override."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)


# Settings that define what the student is: a resume may not change them (the exported files
# would claim values the weights were not trained with, or the checkpoint's state cannot load).
_RESUME_FIXED = ("settings.t_l", "settings.guidance", "degradation.scale", "ema.enabled", "lora.rank",
                 "lora.alpha", "lora.target_modules", "lora.blocks")
# Changes a resume takes without a word: bookkeeping, paths, checks made elsewhere
# (base model and conditioning by content, held-out pairs, optimizer values and the global batch:
# their own notices), or the loop's own controls.
_RESUME_QUIET = ("train.output_dir", "train.resume", "train.stop_at", "train.log_every", "train.progress_bar",
                 "train.tensorboard", "train.ddp_find_unused_parameters", "checkpoint.", "validation.",
                 "data.num_workers", "data.holdout", "data.conditioning", "data.batch_size",
                 "model.transformer", "model.init_seed", "model.gradient_checkpointing", "optim.lr", "optim.betas",
                 "optim.weight_decay", "optim.eps", "train.gradient_accumulation_steps")
_RESUME_CONSEQUENCE = {
    "data.seed": "the data order, degradation draws and FTD times from here on are not the run's",
    "train.seed": "no effect on a resume: the checkpoint's random state is restored",
    "optim.schedule": "the learning-rate curve from here on follows the new schedule",
    "optim.warmup_steps": "the learning-rate curve from here on follows the new warm-up",
    "train.max_steps": "the schedule is stretched or cut to the new length",
    "model.base_model": "the exported files will name the new base model",
    "data.pairs": "the pairs are read from the new folder from here on; the held-out ones stay out by id",
}


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {f"{sec}.{k}": v for sec, vals in cfg.to_dict().items() for k, v in vals.items()}


def _check_resumable(checkpoint: Path, cfg: TrainConfig, state: dict[str, Any],
                     identity: dict[str, Any]) -> list[str]:
    """Compare the checkpoint's saved config and state with ``cfg`` before anything is loaded.

    Raises :class:`ConfigError` naming old and new values for a change of what defines the
    student (:data:`_RESUME_FIXED`, the base model by content). Returns notices for the softer
    changes (data seed, schedule, length, loss weights, degradation, ...), which apply from
    the resumed step on.
    """
    saved = checkpoint / CONFIG_FILE
    if not saved.is_file():
        return []
    try:
        then = load_train_config(saved)
    except Exception:  # noqa: BLE001 - an unreadable old config: let the load itself decide
        return []
    old, new = _flat_config(then), _flat_config(cfg)
    refused = [f"{k}={_fmt(old[k])}, this config has {k}={_fmt(new[k])}" for k in _RESUME_FIXED
               if old.get(k) != new.get(k)]
    recorded = state.get("base_model_identity")
    if recorded is None:  # a checkpoint from before the identity was recorded: its config's base, if still there
        from fluxsr_core.models import RANDOM_INIT_NAMES

        src = then.model.transformer
        if src in RANDOM_INIT_NAMES or Path(src).expanduser().exists():
            recorded = base_model_identity(src, then.model.init_seed)
    if recorded is not None and _HEAD_TAIL_KEY in recorded and "test_model" not in identity:
        # recorded by an older version: compared the way it was made (new checkpoints of this
        # run record the sampled fingerprint)
        identity = _head_tail_identity(cfg.model.transformer)
    if recorded is not None and recorded != identity:
        def base(c: TrainConfig, ident: dict[str, Any]) -> str:
            return f"model.transformer={c.model.transformer}" + (
                f" with model.init_seed={c.model.init_seed}" if "test_model" in ident else "")

        refused.append(f"{base(then, recorded)}, this config has {base(cfg, identity)}, a different base model "
                       "(compared by content, so a moved copy of the same file would be accepted)")
    if refused:
        raise ConfigError(f"checkpoint {checkpoint} was trained with " + "; with ".join(refused)
                          + ". These define the student (the exported files claim them): resume with the same "
                          f"setting (the values in its {CONFIG_FILE}), or start a new run with its own "
                          "train.output_dir")
    notices = []
    for k in sorted(set(old) | set(new)):
        if k in _RESUME_FIXED or k.startswith(_RESUME_QUIET) or old.get(k) == new.get(k):
            continue
        why = _RESUME_CONSEQUENCE.get(k) or ("the loss from here on is the new one" if k.startswith("loss.") else
                                             "the LR images from here on are degraded the new way"
                                             if k.startswith("degradation.") else "used from here on")
        notices.append(f"{k} {_fmt(old.get(k))} -> {_fmt(new.get(k))} ({why})")
    return notices


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read; the message names it and the one to use instead."""


def checkpoint_before(checkpoint: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of ``checkpoint``'s run before it, or None (none, or
    ``checkpoint`` is no ``step-N`` folder of a run)."""
    checkpoint = Path(checkpoint)
    if not _CKPT_RE.match(checkpoint.name):
        return None
    earlier = [c for c in list_checkpoints(checkpoint.parent.parent) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    return earlier[-1] if earlier else None


def damaged_checkpoint(checkpoint: str | os.PathLike, what: str) -> DamagedCheckpointError:
    """The error for ``checkpoint`` being damaged (``what``: which file, and how), advising the
    newest complete checkpoint before it, if its run has one."""
    checkpoint = Path(checkpoint)
    earlier = checkpoint_before(checkpoint)
    advice = (f"resume from the one before it (--resume {earlier}), or move this one away"
              if earlier else "move it away and start the run again")
    return DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {what}; {advice}")


def read_checkpoint_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``; :class:`DamagedCheckpointError` when it cannot be read.

    Never ``{}`` for a damaged file: the resume checks (conditioning, settings) read it, and an
    empty state would let a resume change what the student is trained on unnoticed.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise damaged_checkpoint(checkpoint, f"its {STATE_FILE} cannot be read ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise damaged_checkpoint(checkpoint, f"its {STATE_FILE} holds no step")
    return state


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a checkpoint folder (``step-0000040`` -> 40)."""
    return int(_CKPT_RE.match(Path(checkpoint).name).group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first: ``step-N`` folders holding their
    ``trainer_state.json``, which a checkpoint gets last (it is written into a temporary folder,
    then renamed). Temporary folders and ``step-N`` folders without it (a copy cut short, a
    folder made by hand) are not checkpoints: see :func:`incomplete_checkpoints`."""
    return [p for p in _step_folders(output_dir) if (p / STATE_FILE).is_file()]


def incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``step-N`` folders of a run without their ``trainer_state.json``, oldest first."""
    return [p for p in _step_folders(output_dir) if not (p / STATE_FILE).is_file()]


def _step_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The run's ``checkpoints/step-N`` folders, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if _CKPT_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Optional[Path]:
    """``""`` -> None; ``"latest"`` -> newest checkpoint or None; a path -> that checkpoint
    (a run folder means its newest). Raises FileNotFoundError for a path with no checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not p.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    if (p / STATE_FILE).is_file():
        return p
    newest = latest_checkpoint(p)
    if newest is None:
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) and holds no "
                                f"{CHECKPOINT_DIR}/step-* folders")
    return newest


# =========================================================================================
# Ctrl-C
# =========================================================================================

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped :func:`train` during the loop.

    ``step``: the step reached; ``checkpoint``: the newest checkpoint kept (None: none yet);
    ``saved``: whether that checkpoint was written at the interrupt (then no step is lost);
    ``terminated``: it was SIGTERM (the command then exits 143, not 130).
    :meth:`advice` says how to continue.
    """

    def __init__(self, step: int, checkpoint: Optional[Path], saved: bool, terminated: bool = False):
        super().__init__(step, checkpoint, saved)
        self.step, self.checkpoint, self.saved, self.terminated = step, checkpoint, saved, terminated

    def advice(self) -> str:
        """One line for the user: what was kept, what was lost, the exact way to continue."""
        return interrupted_advice(self.checkpoint, self.step, self.saved)

    def __str__(self) -> str:
        return self.advice()


def interrupted_advice(checkpoint: Optional[Path], step: Optional[int] = None, saved: bool = False) -> str:
    """What an interrupted ``train`` kept and how to continue (``step`` None: before the loop began)."""
    where = "before training began" if step is None else f"at step {step}"
    if checkpoint is None:
        return f"interrupted {where}; no checkpoint was written yet, so there is nothing to resume: run the same " \
               "command again to start over"
    kept = checkpoint_step(checkpoint)
    if saved:
        what = f"checkpoint {checkpoint} written, no step lost"
    elif step is not None and step > kept:
        lost = "the step after it is lost" if step - kept == 1 else f"the {step - kept} steps after it are lost"
        what = f"the last checkpoint kept is {checkpoint}; {lost}"
    else:
        what = f"the last checkpoint kept is {checkpoint}"
    return (f"interrupted {where}; {what}. Continue with the same command plus --resume latest "
            f"(or --resume {checkpoint})")


class _InterruptRequest:
    """SIGINT or SIGTERM during the loop (main thread only): the first asks the run to stop after
    the current step with a checkpoint (SIGTERM is what a scheduler's preemption or ``kill``
    sends, with a grace period before SIGKILL); a second one stops at once, except while a
    checkpoint is being written (it is let finish: the rename is what makes it complete)."""

    def __init__(self):
        self.requested = False
        self.terminated = False
        self.saving = False
        self.quiet = False  # no notice (the other processes of a launch)
        self._previous: dict[int, Any] = {}

    def install(self) -> "_InterruptRequest":
        # Only over Python's default handlers: an ignored SIGINT (a background job) or an
        # application's own handler is left alone.
        if threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def remove(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # Only a second Ctrl-C stops at once: SIGTERM often comes twice (the launcher forwards its
        # own to each worker's group while the scheduler signals every process), and what ends
        # a run for good after it is the scheduler's SIGKILL.
        if self.requested and not self.saving and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and not self.quiet:
            if signum == signal.SIGTERM:
                log.warning("SIGTERM: stopping after this step with a checkpoint (another SIGTERM changes nothing; "
                            "Ctrl-C stops at once, losing the steps since the last checkpoint)")
            else:
                log.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once, losing "
                            "the steps since the last checkpoint)")
        self.terminated = self.terminated or signum == signal.SIGTERM
        self.requested = True


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C and SIGTERM (a scheduler signals every process of a job)
    are the main process's to handle (a worker that dies of one would fail the batch the main
    process still needs to finish its step). Workers still end with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# =========================================================================================
# the result
# =========================================================================================

@dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses``: the total loss of every optimizer step run by this call (mean over processes).
    ``history``: one dict per logging step (step, loss, each term, lr, seconds per step).
    ``validation``: one dict per validation (step, psnr, bicubic_psnr, per-image values).
    ``checkpoint``: the last checkpoint folder written; ``lora_path``/``ema_lora_path`` and
    ``conditioning_path`` (the fixed conditioning it trained with; None when it trained on
    several) inside it. ``metrics_path``: the run's ``metrics.jsonl``.
    """

    output_dir: str
    step: int
    start_step: int
    checkpoint: Optional[str]
    lora_path: Optional[str]
    ema_lora_path: Optional[str]
    conditioning_path: Optional[str]
    losses: list[float]
    history: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    perceptual_label: Optional[str]
    stopped_early: bool
    seconds: float
    config: TrainConfig
    metrics_path: Optional[str] = None


# =========================================================================================
# training
# =========================================================================================

def _psnr(a: torch.Tensor, b: torch.Tensor, scale: int) -> float:
    """Validation PSNR by the field's protocol (Y channel, ``scale`` border), as ``fluxsr-train eval``."""
    from .evaluate import psnr_y

    return psnr_y(a.float().clamp(0, 1), b.float().clamp(0, 1), crop_border=int(scale))


ADAMW_8BIT, ADAMW = "AdamW8bit (bitsandbytes)", "AdamW (torch)"


def optimizer_choice(cfg: OptimConfig, device: torch.device) -> str:
    """The optimizer ``optim.adam_8bit`` gives on ``device`` (:data:`ADAMW_8BIT` or :data:`ADAMW`):
    ``auto`` is the 8-bit one on CUDA where bitsandbytes is installed. Known before anything is
    built, so a resume whose checkpoint holds the other one's state is refused up front."""
    use_8bit = cfg.adam_8bit == "true" or (cfg.adam_8bit == "auto" and device.type == "cuda")
    if use_8bit and importlib.util.find_spec("bitsandbytes") is not None:
        return ADAMW_8BIT
    if use_8bit and cfg.adam_8bit == "true":
        raise ConfigError(_NEEDS_BITSANDBYTES)
    return ADAMW


def _make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device):
    name = optimizer_choice(cfg, device)
    if name == ADAMW_8BIT:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # installed, but broken (a CUDA library it cannot find, ...)
            raise ConfigError(f"bitsandbytes is installed but cannot be imported ({exc}); fix it, or set "
                              "optim.adam_8bit=false") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay), name
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay), name


def _mixed_precision(name: str, device_type: str) -> str:
    """accelerate's mixed precision for ``train.mixed_precision`` on ``device_type``: ``auto``
    is bf16 on GPUs with bf16 hardware and fp16 on older ones (as the upscaler's dtype), none on
    the CPU. fp16 on the CPU is refused: accelerate would run fp32 there without a word."""
    if name == "auto":
        if device_type == "cuda":
            from fluxsr_core import models

            return "bf16" if models.resolve_dtype("auto", "cuda") is torch.bfloat16 else "fp16"
        return "no"
    if name == "fp16" and device_type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU: on the CPU accelerate runs fp32 without saying "
                          "so; use no (or bf16)")
    return name


def deepspeed_setup_problem(ds_config: Optional[dict]) -> Optional[str]:
    """Why the trainer cannot run under this DeepSpeed config, or None: ZeRO stage 3 partitions
    every parameter, the LoRA's too, so its saved and exported tensors would be empty
    partitions, and the validation the main process runs alone would wait for the others'
    gathers."""
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage")
    if stage is not None and stage != "auto" and int(stage) >= 3:
        return ("DeepSpeed ZeRO stage 3 is not supported (it partitions the LoRA itself: checkpoints and the export "
                "would hold empty tensors); use zero_stage 2 (accelerate_deepspeed_flux.yaml) or FSDP")
    return None


def fill_deepspeed_batch_size(ds_config: dict, batch_size: int) -> None:
    """Put ``data.batch_size`` in a DeepSpeed config whose micro-batch size is "auto" (an
    accelerate config without a DeepSpeed file): accelerate fills it from the DataLoaders handed
    to ``prepare``, and the trainer hands it none, so ``prepare`` would refuse to start."""
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = int(batch_size)


def _load_validation_images(cfg: TrainConfig, say_notes: bool = True) -> list[tuple[str, torch.Tensor]]:
    """``validation.images`` as ``(name, rgb)``, cropped to the scale; ``say_notes``: log what the
    loader noted about them (the main process does, once)."""
    from fluxsr_core import images

    out: list[tuple[str, torch.Tensor]] = []
    if not cfg.validation.images:
        return out
    p = Path(cfg.validation.images)
    if not p.exists():
        raise FileNotFoundError(f"validation.images: {p} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix.lower() in
                                           (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))
    s = cfg.degradation.scale
    for f in files[:cfg.validation.count]:
        loaded = images.load_image(f, metadata=False)
        for note in loaded.notes if say_notes else ():  # (only the first frame used, values clipped...)
            log.warning("validation image %s: %s", f, note)
        rgb = loaded.rgb.float()
        h, w = rgb.shape[-2] - rgb.shape[-2] % s, rgb.shape[-1] - rgb.shape[-1] % s
        if min(h, w) < 3 * s:  # its LR must keep a few pixels, and its PSNR leaves out a border of s
            raise ConfigError(f"validation.images: {f} is {rgb.shape[-1]}x{rgb.shape[-2]} px; at degradation.scale={s} "
                              f"a validation image needs at least {3 * s}x{3 * s} (its PSNR leaves out a border of "
                              f"{s} px): use larger pictures, or take this one out")
        out.append((f.stem, rgb[..., :h, :w]))
    if not out:
        raise FileNotFoundError(f"validation.images: no images found in {p}")
    return out


@dataclass(frozen=True)
class DataSplit:
    """Which pairs a run trains on and holds out, by id (dataset order), and where its teacher
    images come from (``teacher_image``: ``stored`` / ``auto`` / ``decode``, after the check of
    the stored images). ``holdout_ids`` may name pairs no longer in the dataset (kept as
    recorded, so a pair that comes back stays out)."""

    train_ids: list[str]
    holdout_ids: list[str]
    teacher_image: str


def split_pairs(pairs, data: DataConfig, recorded_holdout: Optional[Sequence[str]] = None) -> DataSplit:
    """The :class:`DataSplit` of a :class:`~fluxsr_core.pairs.PairDataset` for ``data``.

    A fresh run (``recorded_holdout`` None) holds out the last ``data.holdout`` ids; a resume
    keeps the ids it recorded. Raises :class:`ConfigError` (ValueError for an empty dataset)
    when nothing is left to train on, or when ``teacher_image='stored'`` and some pairs lack the
    image; with images on some pairs only, every pair is decoded (each said in the log, as are
    held-out pairs that are gone and a ``data.holdout`` a resume does not apply). Reads the
    dataset's ids and shard headers only.
    """
    n = len(pairs)
    if n == 0:
        raise ValueError(f"pair dataset {data.pairs} holds no complete pairs; run `fluxsr-train pairs` first")
    ids = pairs.ids
    present = set(ids)
    if recorded_holdout is None:
        if data.holdout >= n:
            raise ConfigError(f"data.holdout={data.holdout} leaves no training pairs (the dataset has {n})")
        holdout_ids = ids[n - data.holdout:] if data.holdout else []
    else:
        holdout_ids = list(recorded_holdout)  # kept as recorded: a pair that comes back stays out
        gone = [i for i in holdout_ids if i not in present]
        if gone:
            log.warning("%d held-out pair(s) the run started with are no longer in %s (%s): validation goes on "
                        "with the %d that remain", len(gone), data.pairs, ", ".join(gone[:5]),
                        len(holdout_ids) - len(gone))
        if data.holdout != len(holdout_ids):
            log.warning("data.holdout=%d is not applied on a resume: the run keeps the %d pair(s) it held out "
                        "from the start (any other pair may have been trained on; for more validation images "
                        "use validation.images)", data.holdout, len(holdout_ids))
    held = set(holdout_ids)
    train_ids = [i for i in ids if i not in held]
    if not train_ids:
        raise ConfigError(f"every pair of {data.pairs} is held out; add pairs or lower data.holdout")
    teacher_image = data.teacher_image
    if teacher_image != "decode":
        stored, total = pairs.stored_image_count(), n
        if teacher_image == "stored" and stored < total:
            raise ConfigError(f"data.teacher_image='stored' but {total - stored} of the {total} pairs have no "
                              "stored teacher image; use 'auto' or 'decode' (decodes z_0 with the VAE)")
        if 0 < stored < total:
            # one treatment for every pair: a batch mixing both kinds cannot be collated
            log.warning("%d of the %d pairs have no stored teacher image: decoding z_0 for every pair "
                        "(data.teacher_image='decode')", total - stored, total)
            teacher_image = "decode"
    return DataSplit(train_ids=train_ids, holdout_ids=holdout_ids, teacher_image=teacher_image)


def _sizes_listed(sizes: Sequence[tuple[str, int, str]], limit: int = 4) -> str:
    """``"1024x1024 px (9,000 pairs), 768x1024 px (12 pairs, e.g. p000013-s13)"``: the commonest first,
    an example id beside each but the commonest; ``(label, count, example id)`` rows."""
    rows = sorted(sizes, key=lambda r: -r[1])
    shown = [f"{label} ({n:,} pair{'s' if n != 1 else ''}" + (f", e.g. {example})" if k else ")")
             for k, (label, n, example) in enumerate(rows[:limit])]
    return ", ".join(shown) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def check_pair_shapes(pairs, train_ids: Sequence[str], data: DataConfig, scale: int, teacher_image: str) -> None:
    """Refuse training pairs the run could not use, from the shard and conditioning headers only
    (no tensor is read, so it costs one header read per shard): found here, before any model
    loads, instead of at the first batch that holds one, maybe hours in (and again on a resume).

    Every distinct latent size must be even (FLUX packs 2x2 latent patches: images are
    multiples of 16 px) and its image size divisible by ``scale``; with ``data.batch_size`` > 1
    every pair must have one size and one conditioning shape (a batch stacks them); with
    ``teacher_image`` not ``decode``, each stored image must be the size its latent decodes to.
    ``pairs``: a :class:`~fluxsr_core.pairs.PairDataset`. Raises :class:`ConfigError` naming the
    sizes, how many pairs have each, an example pair, and what to do.
    """
    from fluxsr_core.latents import PIXEL_MULTIPLE, VAE_DOWNSCALE
    from fluxsr_core.pairs import image_size_problem, latent_size_problem

    folder = data.pairs
    shapes = pairs.shapes(train_ids)
    by_size: dict[tuple[int, ...], list] = {}   # z0 shape -> [count, an example id]
    bad_images: list[tuple[str, str]] = []
    for pid, sh in shapes.items():  # (eps has z0's shape: PairWriter refuses others)
        row = by_size.setdefault(sh.z0, [0, pid])
        row[0] += 1
        if teacher_image != "decode" and sh.image is not None:
            problem = image_size_problem(sh.image, sh.z0)
            if problem:
                bad_images.append((pid, problem))

    def px(shape) -> str:
        return f"{shape[-1] * VAE_DOWNSCALE}x{shape[-2] * VAE_DOWNSCALE} px"

    for shape, (n, example) in sorted(by_size.items(), key=lambda kv: -kv[1][0]):
        problem = latent_size_problem(shape)
        if problem:
            raise ConfigError(f"{n:,} training pair(s) of {folder} (e.g. {example}) cannot be trained on: {problem}. "
                              f"Make them again at a multiple of {PIXEL_MULTIPLE} px, or leave them out (a folder "
                              "of their own)")
        if (shape[-2] * VAE_DOWNSCALE) % scale or (shape[-1] * VAE_DOWNSCALE) % scale:
            raise ConfigError(f"{n:,} training pair(s) of {folder} (e.g. {example}) are {px(shape)}, not divisible "
                              f"by degradation.scale={scale}; use a scale that divides the pair resolution")
    if bad_images:
        pid, problem = bad_images[0]
        raise ConfigError(f"{len(bad_images):,} training pair(s) of {folder} store an image of another size than "
                          f"their latent, e.g. {pid}: {problem}. `fluxsr-train verify {folder}` lists their shards "
                          "and --drop-bad sets them aside; or set data.teacher_image=decode (decodes z_0, reads no "
                          "stored image)")
    if data.batch_size > 1 and len(by_size) > 1:
        listed = _sizes_listed([(px(shape) + ("" if shape[0] == 16 else f" with {shape[0]} channels"), n, ex)
                                for shape, (n, ex) in by_size.items()])
        raise ConfigError(f"the training pairs of {folder} have {len(by_size)} sizes: {listed}; a batch "
                          f"(data.batch_size={data.batch_size}) holds pairs of one size, so the run would stop at "
                          "the first batch that mixes them: set data.batch_size=1, or put each size in a folder of "
                          "its own and train on one")
    if data.batch_size > 1:
        # a batch stacks each pair's conditioning too (also when data.conditioning is a bundle)
        by_key: dict[str, list] = {}
        for pid, sh in shapes.items():
            row = by_key.setdefault(sh.cond_key, [0, pid])
            row[0] += 1
        by_cond: dict[tuple, list] = {}
        for key, cond_shapes in pairs.conditioning_shapes(by_key).items():
            n, example = by_key[key]
            row = by_cond.setdefault(cond_shapes, [0, example])
            row[0] += n
        if len(by_cond) > 1:
            listed = _sizes_listed([(f"T5 {list(t5)} and CLIP {list(clip)}", n, ex)
                                    for (t5, clip), (n, ex) in by_cond.items()])
            raise ConfigError(f"the training pairs of {folder} have conditionings of {len(by_cond)} shapes: {listed}; "
                              f"a batch (data.batch_size={data.batch_size}) stacks them, so the run would stop at the "
                              "first batch that mixes them: set data.batch_size=1, or put the pairs of each T5 "
                              "length in a folder of their own and train on one")


class _Run:
    """One call of :func:`train` (kept in an object so the pieces can share state plainly)."""

    def __init__(self, cfg: TrainConfig, stop_check: Optional[Callable[[int], bool]] = None):
        self.cfg = cfg
        self.stop_check = stop_check
        self.out = Path(cfg.train.output_dir)
        self.interrupt = _InterruptRequest()
        self.run_lock = None

    def release_run_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _take_run_lock(self) -> None:
        """One run at a time writes a folder: two would replace each other's checkpoints, interleave
        metrics.jsonl and prune each other's steps (two jobs started on one folder, a requeued job
        while the first still runs). The main process holds it for the whole run; the other
        process's refusals come first (it sees no checkpoints yet only when both start at once)."""
        from fluxsr_core.files import ExclusiveFileLock, LockHeldError

        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.run_lock = ExclusiveFileLock(self.out / RUN_LOCK_FILE)
        except LockHeldError:
            raise ConfigError(f"another fluxsr-train train is writing {self.out} (it holds {RUN_LOCK_FILE}); wait for "
                              "it to end, or give this run its own train.output_dir") from None
        except OSError as exc:
            try:  # whether the folder can be written at all, apart from locking (FUSE mounts answer flock oddly)
                tempfile.TemporaryFile(dir=self.out).close()
            except OSError as write_exc:
                raise ConfigError(f"cannot write into {self.out} ({write_exc.strerror or write_exc}); give a "
                                  "train.output_dir this run can write (checkpoints, metrics.jsonl and the config "
                                  "go there)") from None
            # a file system without locks (NFS without lockd, some FUSE mounts)
            log.warning("cannot lock %s (%s): this run goes on unlocked; start no other run into %s meanwhile",
                        self.out / RUN_LOCK_FILE, exc.strerror or exc, self.out)

    # -- setup -------------------------------------------------------------------------------

    def _setup_accelerator(self) -> None:
        """The accelerator and the refusals that depend on the launch; loads and writes nothing."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, parse_flag_from_env

        from fluxsr_core import models

        cfg = self.cfg
        device_probe = "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"
        self.mixed_precision = mp = _mixed_precision(cfg.train.mixed_precision, device_probe)
        self.trackers = None
        if cfg.train.tensorboard != "false":
            if importlib.util.find_spec("tensorboard") is not None:
                self.trackers = "tensorboard"
            elif cfg.train.tensorboard == "true":
                raise ConfigError("train.tensorboard=true needs tensorboard: pip install tensorboard")
        self.accelerator = acc = Accelerator(
            mixed_precision=mp,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=self.trackers,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=cfg.train.ddp_find_unused_parameters)],
        )
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
        if launched not in ("no", mp) and acc.is_main_process:
            # accelerate launch passes its --mixed_precision (or its config's) on; the trainer's
            # own setting wins, as it decides how checkpoints resume: said, not silently dropped
            log.warning("accelerate launch asked for mixed precision %s, but this run uses %s (train.mixed_precision="
                        "%s): set train.mixed_precision=%s to train in %s", launched, mp, cfg.train.mixed_precision,
                        launched, launched)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and acc.num_processes == 1:
            # torchrun/accelerate started several processes but accelerate did not join them
            # (e.g. `--multi_gpu` on a machine without GPUs): each would train alone.
            raise ConfigError(f"{world} processes were launched but accelerate runs them as independent "
                               "single-process jobs. For multi-process CPU training set ACCELERATE_USE_CPU=1 "
                               "(e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`)")
        if acc.gradient_accumulation_steps != cfg.train.gradient_accumulation_steps:
            # The loop runs the config's count of micro-batches per step; accelerate would sync
            # (and step) after its own count, so steps, schedule, EMA and checkpoints would drift.
            raise ConfigError(
                f"accelerate accumulates {acc.gradient_accumulation_steps} micro-batches per optimizer step "
                f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS, set by `accelerate launch` from the DeepSpeed "
                f"config's gradient_accumulation_steps) but train.gradient_accumulation_steps is "
                f"{cfg.train.gradient_accumulation_steps}; make the two equal")
        self.main = acc.is_main_process
        if self._distributed("FSDP") and cfg.ema.enabled:
            raise ConfigError("ema.enabled=true is not supported with FSDP (the LoRA is sharded across processes); "
                              "set ema.enabled=false, or use DeepSpeed ZeRO-2 (accelerate_deepspeed_flux.yaml)")
        if self._distributed("DEEPSPEED") and cfg.model.memory_mode in FP8_MODES:
            raise ConfigError(f"model.memory_mode={cfg.model.memory_mode} does not combine with DeepSpeed (its bf16 "
                              "engine re-casts every weight); use memory_mode=none with ZeRO-2")
        if self._distributed("DEEPSPEED"):
            ds_config = getattr(acc.state.deepspeed_plugin, "deepspeed_config", None)
            problem = (deepspeed_setup_problem(ds_config)
                       or deepspeed_clipping_problem(ds_config, cfg.optim.max_grad_norm))
            if problem:
                raise ConfigError(problem)
            if ds_config is not None:
                fill_deepspeed_batch_size(ds_config, cfg.data.batch_size)
        if self._distributed("FSDP") and cfg.model.memory_mode in FP8_MODES:
            raise ConfigError(f"model.memory_mode={cfg.model.memory_mode} does not combine with FSDP (it flattens "
                              "fp8 and bf16 weights into one buffer); use memory_mode=none")
        fsdp_plugin = getattr(acc.state, "fsdp_plugin", None)
        if (self._distributed("FSDP") and int(getattr(fsdp_plugin, "fsdp_version", 1) or 1) == 1
                and models.resolve_dtype(cfg.model.dtype, device_probe) is not torch.float32):
            # FSDP 1 flattens each wrapped block's weights into one buffer of one dtype: the fp32
            # LoRA beside a bf16 base cannot be flattened ("Must flatten tensors with uniform dtype")
            raise ConfigError(f"FSDP (fsdp_version 1) needs model.dtype=fp32: it flattens each block's frozen weights and "
                              f"its fp32 LoRA into one buffer of one dtype, and model.dtype={cfg.model.dtype} is "
                              f"{models.resolve_dtype(cfg.model.dtype, device_probe)} (its mixed precision still "
                              f"computes in {mp})")
        if self._distributed("FSDP") and cfg.validation.every:
            # validation runs the whole student on the main process, which FSDP has sharded
            raise ConfigError("validation.every needs the whole model on one process, which FSDP shards; set "
                              "validation.every=0 and score exported checkpoints with `fluxsr-train eval`")

    def _preflight(self) -> Optional[Path]:
        """Every refusal that needs no model, before any model is built or any file written.

        Resolves ``train.resume`` (returns the checkpoint, or None for a fresh run), refuses a
        fresh run into a folder with checkpoints and a resume that would change what defines the
        student, reads the data and the conditioning (refusing one the checkpoint was not
        trained with), and fixes the held-out pairs.
        """
        # Each part runs on every process and stops them all when one fails (a refusal read off
        # files, a rank that cannot read them); the data setup between them has its own guards.
        # The lock first: what the folder holds is read only once no other run can change it.
        made_folder = not self.out.exists()
        try:
            self._on_every_process(lambda: self._take_run_lock() if self.main else None, "lock the run folder")
            resume_from = self._on_every_process(self._preflight_resume, "check the run folder")
            self._check_one_base_everywhere()
            self._setup_data(self.resume_state.get("holdout_ids") if resume_from is not None else None)
            self._on_every_process(lambda: self._preflight_conditioning(resume_from), "set up the conditioning")
        except BaseException:
            if self.main and made_folder:  # a refused run leaves nothing behind: not even its lock
                self.release_run_lock()
                with contextlib.suppress(OSError):
                    (self.out / RUN_LOCK_FILE).unlink()
                    self.out.rmdir()
            raise
        return resume_from

    def _preflight_resume(self) -> Optional[Path]:
        """The resume and the run folder's refusals (:meth:`_preflight`'s first part)."""
        cfg, acc = self.cfg, self.accelerator
        self.settings = cfg.run_settings()
        self._info(f"FluxSR training: {acc.num_processes} process(es) on {acc.device}, mixed precision "
                   f"{self.mixed_precision}, {self.settings.describe()}")
        resume_from = resolve_resume(cfg.train.resume, self.out)
        existing = list_checkpoints(self.out)
        incomplete = [p for p in incomplete_checkpoints(self.out)
                      if not existing or checkpoint_step(p) > checkpoint_step(existing[-1])]
        if incomplete and self.main:
            one = len(incomplete) == 1
            log.warning("%s: %s %s no %s, so %s not a checkpoint (a copy cut short?): not resumed from, and "
                        "replaced if this run writes a checkpoint of %s step", self.out / CHECKPOINT_DIR,
                        ", ".join(p.name for p in incomplete), "has" if one else "have", STATE_FILE,
                        "it is" if one else "they are", "its" if one else "their")
        if resume_from is None and existing:
            raise ConfigError(f"{self.out} already holds checkpoints ({existing[-1].name} the newest): continue "
                              "that run with --resume latest, or give this one its own train.output_dir")
        own = (self.out / CHECKPOINT_DIR).resolve()
        if resume_from is not None and existing and own not in Path(resume_from).resolve().parents:
            # Its checkpoints would be superseded and pruned by another run's: the two would mix.
            # (This folder's own, superseded ones included, are under checkpoints/.)
            where = Path(resume_from).resolve().parent
            home = (f"in its own folder (train.output_dir={where.parent})" if where.name == CHECKPOINT_DIR
                    else "in an empty train.output_dir")
            raise ConfigError(f"--resume {resume_from} is not a checkpoint of {self.out}, which holds another run's "
                              f"checkpoints ({existing[-1].name} the newest): resuming here would mix the two runs "
                              f"and prune that one's. Continue it {home}")
        self.resume_state = read_checkpoint_state(resume_from) if resume_from is not None else {}
        done = int(self.resume_state.get("step", 0) or 0)
        if resume_from is not None and done >= cfg.train.max_steps:
            # Nothing would be trained, and the summary would report a loss of nan.
            raise ConfigError(f"checkpoint {resume_from} is at step {done} and train.max_steps is "
                              f"{cfg.train.max_steps}: nothing is left to train. To train on, raise it "
                              f"(e.g. train.max_steps={done + max(1, cfg.train.max_steps)}); to use the student, "
                              f"fluxsr-train export {self.out} -o <folder>")
        if resume_from is not None and done >= end_step(cfg.train):  # train.stop_at is the nearer end
            raise ConfigError(f"checkpoint {resume_from} is at step {done} and train.stop_at is {cfg.train.stop_at}: "
                              f"nothing is left to train. To train on, raise it above {done} (e.g. train.stop_at="
                              f"{min(done + cfg.train.stop_at, cfg.train.max_steps)}), or set train.stop_at=0 to "
                              f"train to train.max_steps={cfg.train.max_steps}")
        if resume_from is not None:
            trained_with, now = self.resume_state.get("optimizer"), optimizer_choice(cfg.optim, acc.device)
            if isinstance(trained_with, str) and trained_with != now:  # older checkpoints do not say
                fix = ("install bitsandbytes (or set optim.adam_8bit=true where it is)" if trained_with == ADAMW_8BIT
                       else "set optim.adam_8bit=false")
                raise ConfigError(f"checkpoint {resume_from} was trained with {trained_with}, and this run would make "
                                  f"{now} (optim.adam_8bit={cfg.optim.adam_8bit} on {acc.device.type}): the one's "
                                  f"state cannot go on in the other; {fix}")
            if own not in Path(resume_from).resolve().parents:
                self._info(f"continuing the run of {resume_from} in train.output_dir={self.out}: its checkpoints go "
                           "there from now on")
        self.base_identity = base_model_identity(cfg.model.transformer, cfg.model.init_seed)
        self.resume_notices = (_check_resumable(resume_from, cfg, self.resume_state, self.base_identity)
                               if resume_from is not None else [])
        return resume_from

    def _check_one_base_everywhere(self) -> None:
        """Refuse a launch whose processes load different base models, compared by content (a
        node with another file at ``model.transformer``'s path): the frozen base is not broadcast
        from the main process (:meth:`_prepare_models`), so each process trains on what it loads."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        identities = gather_object([self.base_identity])
        other = next((rank for rank, identity in enumerate(identities) if identity != identities[0]), None)
        if other is not None:
            raise ConfigError(f"process {other} loads another base model than process 0 from model.transformer="
                              f"{self.cfg.model.transformer} (compared by content): every process, on every node, "
                              "must load the same file; copy the main node's to the others")

    def _preflight_conditioning(self, resume_from: Optional[Path]) -> None:
        """The conditioning, its checks against the checkpoint's and the transformer's, the LoRA's
        and ADL's layout checks, the validation set's refusals (:meth:`_preflight`'s last part)."""
        from fluxsr_core.models import transformer_config_of

        cfg = self.cfg
        self._setup_conditioning()
        transformer_config = transformer_config_of(cfg.model.transformer)
        self._check_conditioning_fits(transformer_config)
        check_student_layout(cfg, transformer_config)
        if resume_from is not None and "conditioning_sha256" in self.resume_state:
            then = self.resume_state["conditioning_sha256"]
            if then != self.conditioning_sha256:
                def said(source, digest):
                    return f"{source} (sha256 {digest[:16]})" if digest else source

                own = resume_from / CONDITIONING_FILE
                raise ConfigError(
                    f"checkpoint {resume_from} was trained with the conditioning of "
                    f"{said(self.resume_state.get('conditioning_source', '?'), then)}; this config gives the one of "
                    f"{said(self.conditioning_source, self.conditioning_sha256)}. The student learns its conditioning: "
                    + (f"resume with data.conditioning={own} (the checkpoint's own copy)" if own.is_file() else
                       "resume with the data.conditioning it was trained with")
                    + ", or start a new run with its own train.output_dir")
        elif resume_from is not None and self.main:
            log.warning("checkpoint %s records no conditioning hash (written by an older version): cannot check that "
                        "data.conditioning is the one it was trained with", resume_from)
        if self.main:
            for text in config_warnings(cfg):
                log.warning("%s", text)
        self._validation_images = _load_validation_images(cfg, say_notes=self.main)  # bad paths fail here
        if cfg.validation.every and (cfg.validation.count < 1
                                     or (not self._validation_images and not self.holdout_indices)):
            raise ConfigError(f"validation.every={cfg.validation.every} but there is nothing to validate on: set "
                              "validation.images to a folder of HR images, or data.holdout to keep pairs out")

    def _setup_models(self) -> None:
        """The perceptual network, the student, optimizer, schedule, EMA (the slow part).

        Each process builds its own models first; a failure there on any process (a GPU out of
        memory, a file one node cannot read) stops every process before accelerate's prepare,
        whose collectives would otherwise leave the others waiting until they time out."""
        optimizer = self._on_every_process(self._build_models, "build its models")
        self._prepare_models(optimizer)

    def _build_models(self) -> torch.optim.Optimizer:
        """:meth:`_setup_models`' per-process part (no collective): returns the optimizer."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        # Cheap next to the student, so a missing backbone fails before the minutes of loading it
        self.perceptual, self.perceptual_label = None, None
        if cfg.loss.w_tvlpips > 0:
            from .perceptual import load_perceptual

            self.perceptual, self.perceptual_label = load_perceptual(
                cfg.loss.perceptual, cfg.loss.perceptual_path or None, device=acc.device)
            self._info(f"perceptual term: TV-LPIPS with {self.perceptual_label} (kind {cfg.loss.perceptual}, "
                       f"gamma {cfg.loss.tv_gamma:g}, weight {cfg.loss.w_tvlpips:g})")
        else:
            self._info("perceptual term: off (loss.w_tvlpips = 0)")

        # Same seed on every process: identical LoRA initialisation everywhere.
        set_seed(cfg.train.seed)
        self.transformer, self.vae, self.dtype = build_student(cfg, acc.device)
        # The LoRA is initialised alike everywhere (same seed above); from here each process
        # draws its own random stream (LoRA dropout), else every rank would drop the same units.
        set_seed(_derived_seed(cfg.train.seed, "process", acc.process_index))
        self.transformer.train()
        self.params = lora_parameters(self.transformer)
        n_lora = sum(p.numel() for p in self.params.values())
        self._info(f"student: {cfg.model.transformer} + LoRA rank {cfg.lora.rank} alpha {cfg.lora.alpha:g} on "
                   f"{len(self.params) // 2} layers ({n_lora:,} trainable parameters), base {self.dtype} "
                   f"({cfg.model.memory_mode}), gradient checkpointing "
                   f"{'on' if cfg.model.gradient_checkpointing else 'off'}")

        optimizer, self.optimizer_name = _make_optimizer(list(self.params.values()), cfg.optim, acc.device)
        self._info(f"optimizer: {self.optimizer_name}, lr {cfg.optim.lr:g}, {cfg.optim.schedule} schedule with "
                   f"{cfg.optim.warmup_steps} warm-up steps; EMA "
                   f"{f'decay {cfg.ema.decay:g}' if cfg.ema.enabled else 'off'}")
        return optimizer

    def _prepare_models(self, optimizer: torch.optim.Optimizer) -> None:
        """:meth:`_setup_models`' collective part: schedule, accelerate's prepare, EMA, hooks."""
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.accelerator

        # Stepped by us once per optimizer step (not prepared: accelerate would step it once per
        # process, changing the schedule with the process count).
        self.scheduler = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                       num_training_steps=cfg.train.max_steps)
        # Every process loaded the same frozen base (checked by content in the preflight): DDP would
        # broadcast all of it from the main process as it wraps the model (24 GB of FLUX.1-dev in
        # bf16, and fp8 storage gloo cannot send at all); the trainable LoRA alone is synced.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self.transformer, [n for n, p in self.transformer.named_parameters() if not p.requires_grad])
        self.model, self.optimizer = acc.prepare(self.transformer, optimizer)
        self.ema = LoraEMA(self.params, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.state = _TrainState()
        acc.register_for_checkpointing(self.scheduler)
        acc.register_for_checkpointing(self.state)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

        from fluxsr_core.models import DiffusersCodec, DiffusersVelocity

        self.velocity = DiffusersVelocity(self.transformer, compute_dtype=self.dtype, device=_device(acc.device))
        self.velocity.transformer = self.model  # forward through DDP/autocast wrappers
        self.eval_velocity = DiffusersVelocity(self.transformer, compute_dtype=self.dtype, device=_device(acc.device))
        self.codec = DiffusersCodec(self.vae, compute_dtype=self.dtype)

        self.adl_hook = None
        if cfg.loss.w_adl > 0:
            self.adl_hook = adl_hook_for(cfg, self.transformer)
            form = cfg.loss.adl_form + (f", {cfg.loss.adl_queries} queries" if cfg.loss.adl_form == "attention" else "")
            self._info(f"ADL ({form}) on blocks {', '.join(self.adl_hook.labels)} (weight {cfg.loss.w_adl:g})")

        if self.trackers:
            # main process only (accelerate's own rule); guarded, so a failure there stops the others too
            self._on_every_process(lambda: acc.init_trackers("fluxsr", config=_flat_scalars(cfg.to_dict())),
                                   "start its trackers")

    def _setup_data(self, recorded_holdout: Optional[list[str]] = None) -> None:
        """Open the pairs and split them. ``recorded_holdout``: the held-out ids a resumed run
        started with (kept, so no validation pair is ever trained on); None: a fresh run (or a
        checkpoint older than the record), which holds out the last ``data.holdout`` ids.

        The split is decided by id on the main process and given to the others (a writer may add
        pairs while the processes open the folder one after the other: each deciding alone, one
        could train on another's validation pair, or run a sample stream of another length);
        every process then maps those ids to its own dataset's indices, ignoring pairs added since.
        """
        from fluxsr_core.pairs import PairDataset

        cfg = self.cfg

        def decide() -> DataSplit:  # inside: a dataset that cannot be opened stops every process
            self.pairs = PairDataset(cfg.data.pairs, load_image=cfg.data.teacher_image != "decode")
            split = split_pairs(self.pairs, cfg.data, recorded_holdout)
            # every training pair's sizes, from the headers (the main process alone: its refusal reaches all)
            check_pair_shapes(self.pairs, split.train_ids, cfg.data, cfg.degradation.scale, split.teacher_image)
            return split

        split = self._decided_on_main(decide)
        self.holdout_ids, self.teacher_image = split.holdout_ids, split.teacher_image

        def map_ids() -> None:
            if not self.main or (self.teacher_image == "decode") != (cfg.data.teacher_image == "decode"):
                # the others open the folder now; the main process again when it decided to decode
                self.pairs = PairDataset(cfg.data.pairs, load_image=self.teacher_image != "decode")
            present = set(self.pairs.ids)
            lost = [i for i in split.train_ids if i not in present]
            if lost:
                raise ConfigError(f"pair {lost[0]} that the main process chose for training is not in "
                                  f"{cfg.data.pairs} as this process (rank {self.accelerator.process_index}) reads it: "
                                  "the folder changed while the run started (e.g. `fluxsr-train verify --drop-bad`); "
                                  "start it again")
            self.holdout_indices = sorted(self.pairs.index_of(i) for i in self.holdout_ids if i in present)
            self.train_indices = sorted(self.pairs.index_of(i) for i in split.train_ids)
            # the first read of a pair's data: here too, a process that cannot read it stops all (the
            # sizes were checked on the main process, check_pair_shapes)
            _ = self.pairs[self.train_indices[0]]

        self._on_every_process(map_ids)
        self.stream = SampleStream(len(self.train_indices), cfg.data.seed)
        self._info(f"data: {len(self.train_indices)} training pairs from {cfg.data.pairs}"
                   f"{f', {len(self.holdout_indices)} held out' if self.holdout_indices else ''}; global batch "
                   f"{cfg.data.batch_size} x {self.accelerator.num_processes} process(es) x "
                   f"{cfg.train.gradient_accumulation_steps} accumulation")

    def _on_every_process(self, work: Callable[[], Any], what: str = "set up its data") -> Any:
        """``work()`` on every process; when it fails on any, every process raises (the failing
        ones their own error, the others :class:`OtherProcessError` naming the failing process and
        ``what`` it was doing), so none is left waiting at the next collective. ``work`` itself
        must hold no collective that a failing process could skip (under FSDP a forward does, so
        there a failure inside the forward still waits for the group's timeout). The success
        path costs one one-element all-reduce (it guards every training micro-step); the errors'
        texts travel only when one failed. One process: just ``work()``."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return work()
        from accelerate.utils import gather_object

        error, result = None, None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - reported to every process, raised here below
            error = exc
        failures = acc.reduce(torch.tensor([0.0 if error is None else 1.0], device=acc.device), "sum")
        if float(failures) == 0:
            return result
        reports = gather_object([None if error is None
                                 else (f"{type(error).__name__}: {error}", _is_write_failure(error))])
        if error is not None:
            raise error
        rank, (text, write_failure) = next((r, t) for r, t in enumerate(reports) if t is not None)
        raise OtherProcessError(f"process {rank} could not {what}: {text}", write_failure)

    def _decided_on_main(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` run on the main process only, its result (or the error it raised) given to
        every process, so a decision read off files that may change meanwhile is the same on all
        (and a refusal stops all, none waits for the others). One process: just ``decide()``."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return decide()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", decide())
            except Exception as exc:  # noqa: BLE001 - handed on, raised on every process
                box[0] = ("error", exc)
                try:
                    pickle.dumps(exc)
                except Exception:  # noqa: BLE001 - an error that cannot travel: its text does
                    box[0] = ("error", RuntimeError(f"on the main process: {type(exc).__name__}: {exc}"))
                broadcast_object_list(box, from_process=0)
                raise
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def _check_conditioning_fits(self, config: dict) -> None:
        """Refuse a conditioning whose widths the transformer of ``config`` (read from its header
        or config.json, no weights loaded) cannot take, before the minutes of loading."""
        if self.fixed_bundle is not None:
            self.fixed_bundle.check_fits(config)
            return
        # One pair's conditioning stands for all: `fluxsr-train pairs` refuses to mix encoders in one
        # folder (pairs of other widths added otherwise fail at their first batch).
        problems = conditioning_width_problems(self.val_cond.t5, self.val_cond.clip_pooled, config)
        if problems:
            raise ConfigError(f"the conditionings in {self.cfg.data.pairs} do not fit {self.cfg.model.transformer}: "
                              + "; ".join(problems) + ". The pairs were made for another model: train the model "
                              "they were made with, or give data.conditioning=<a bundle made for this one>")

    def _setup_conditioning(self) -> None:
        """The fixed conditioning (a bundle, or the dataset's only one) and its content hash.

        Nothing is written here: each checkpoint gets its own copy (:meth:`save_checkpoint`).
        """
        cfg = self.cfg
        settings = cfg.run_settings()
        self.fixed_bundle: Optional[ConditioningBundle] = None
        if cfg.data.conditioning != "pairs":
            self.fixed_bundle = load_bundle(cfg.data.conditioning)
            self._info(f"conditioning: bundle {cfg.data.conditioning} for every pair")
            bs = self.fixed_bundle.settings
            differ = [f"{k} {getattr(bs, k):g} (bundle) vs {getattr(settings, k):g} (config)"
                      for k in ("t_l", "guidance") if bs.given(k)
                      and abs(getattr(bs, k) - getattr(settings, k)) > 1e-9]
            if differ and self.main:
                log.warning("the bundle's run settings differ from the training config: %s; training uses the "
                            "config's, and the exported files will carry them", "; ".join(differ))
            t5, clip = self.fixed_bundle.t5, self.fixed_bundle.clip_pooled
            self.conditioning_prompt = bundle_prompt(cfg.data.conditioning)  # None when it records none
            self.conditioning_source = f"bundle {os.path.abspath(cfg.data.conditioning)}"
        else:
            # the conditionings this run's pairs use (a cond file stored ahead for pairs a killed or
            # refused `pairs` run never made is not one of them)
            ids = self.pairs.ids
            used = [ids[i] for i in sorted(self.train_indices + self.holdout_indices)]
            keys = sorted({str(rec.get("cond")) for rec in self.pairs.records(used).values()})
            t5 = clip = self.conditioning_prompt = None
            folder = os.path.abspath(cfg.data.pairs)
            self.conditioning_source = f"pairs folder {folder} (each pair's own, {len(keys)} distinct)"
            self._info(f"conditioning: each pair's own ({len(keys)} distinct in the dataset)")
            if len(keys) == 1:
                first = self.pairs[self.train_indices[0]]
                t5, clip = first["t5"], first["clip_pooled"]
                meta = first["meta"]
                # pairs made with --bundle keep their prompt line (seeds, order), not what encoded them
                made_from_bundle = str(meta.get("conditioning", "")).startswith("bundle:")
                self.conditioning_prompt = None if made_from_bundle else meta.get("prompt")
                self.conditioning_source = f"pairs folder {folder} (its only one, cond-{keys[0]})"
            elif len(keys) > 1 and self.main:
                # FluxSR runs the student with one fixed prompt's embeddings; these would be many
                log.warning("data.conditioning=pairs and %s holds %d distinct conditionings: the student trains on "
                            "each pair's own prompt embedding, but FluxSR runs it with ONE fixed conditioning "
                            "(validation here uses the first training pair's), and `fluxsr-train export` will "
                            "need --bundle. To train with the conditioning the student will run with, make a bundle "
                            "(fluxsr-train bundle --prompt \"...\" --text-encoders ... -o student_bundle.safetensors) "
                            "and give data.conditioning=student_bundle.safetensors", cfg.data.pairs, len(keys))
        # The one conditioning the student trains with (None: several), copied into each checkpoint.
        self.fixed_t5, self.fixed_clip = t5, clip
        self.conditioning_sha256 = conditioning_digest(t5, clip) if t5 is not None else None
        self.conditioning_path: Optional[str] = None   # the newest checkpoint's copy, once written
        # Validation conditioning: the fixed one, else the first training pair's.
        if t5 is None:
            first = self.pairs[self.train_indices[0]]
            t5, clip = first["t5"], first["clip_pooled"]
        self.val_cond = Conditioning(t5=t5.reshape(1, -1, t5.shape[-1]), clip_pooled=clip.reshape(1, -1),
                                     guidance=cfg.settings.guidance)

    # -- checkpoint hooks ---------------------------------------------------------------------

    def _distributed(self, kind: str) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == getattr(DistributedType, kind)

    def _lora_state(self) -> dict[str, torch.Tensor]:
        """The current LoRA tensors in file naming (collective under FSDP; full on the main process)."""
        if self._distributed("FSDP"):
            full = self.accelerator.get_state_dict(self.model)
            marker = f".{DEFAULT_ADAPTER_NAME}."
            return {"transformer." + k.replace(marker, "."): v for k, v in (full or {}).items()
                    if (".lora_A." in k or ".lora_B." in k) and marker in k}
        return {k: p.detach() for k, p in self.params.items()}

    def _save_hook(self, models, weights, output_dir) -> None:
        # Only the LoRA is trained: write it (and its EMA) and drop the full-model state dict
        # accelerate gathered, so a checkpoint of a 12B base weighs what the LoRA weighs.
        sd = self._lora_state()
        if self.main:
            rank, alpha = self.cfg.lora.rank, self.cfg.lora.alpha
            save_lora_state(os.path.join(output_dir, LORA_FILE), sd, self.settings, rank, alpha)
            if self.ema is not None:
                save_lora_state(os.path.join(output_dir, EMA_LORA_FILE), self.ema.shadow, self.settings, rank, alpha,
                                extra={"fluxsr.ema_decay": repr(self.ema.decay),
                                       "fluxsr.ema_updates": str(self.ema.num_updates)})
        weights.clear()

    def _load_hook(self, models, input_dir) -> None:
        models.clear()  # accelerate must not look for a full-model file
        if self._distributed("FSDP") or self._distributed("DEEPSPEED"):
            return  # their own checkpoints already restored the LoRA (sharded / engine state)
        sd, rank, alpha = read_lora_state(os.path.join(input_dir, LORA_FILE))
        if (rank, alpha) != (self.cfg.lora.rank, self.cfg.lora.alpha):
            raise ValueError(f"checkpoint {input_dir} was trained with LoRA rank {rank}, alpha {alpha:g}; this config "
                             f"has rank {self.cfg.lora.rank}, alpha {self.cfg.lora.alpha:g}. Resume with the lora.* "
                             f"settings of its {CONFIG_FILE}")
        missing = sorted(set(self.params) - set(sd))
        extra = sorted(set(sd) - set(self.params))
        if missing or extra:
            lacks = [f"lacks {len(missing)} of its tensors (e.g. {', '.join(missing[:3])})"] if missing else []
            more = [f"has {len(extra)} it does not know (e.g. {', '.join(extra[:3])})"] if extra else []
            raise ValueError(f"checkpoint {input_dir} does not fit this LoRA: it " + " and ".join(lacks + more)
                             + f"; resume with the lora.* settings it was made with (see its {CONFIG_FILE})")
        with torch.no_grad():
            for k, p in self.params.items():
                if tuple(sd[k].shape) != tuple(p.shape):
                    raise ValueError(f"checkpoint {input_dir}: {k} has shape {list(sd[k].shape)}, the model's "
                                     f"{list(p.shape)}; resume with the LoRA rank it was made with")
                p.copy_(sd[k].to(p.device, p.dtype))

    def _load_checkpoint(self, checkpoint: Path) -> None:
        """accelerate's state from ``checkpoint``; :class:`DamagedCheckpointError` when it cannot be read.

        A checkpoint trained without fp16 holds no loss-scale state (accelerate's ``scaler.pt``),
        which accelerate would ask for and fail on: resumed in fp16, the scaler starts afresh, as
        in a fresh fp16 run (it finds its scale within the first steps, skipping those that overflow).
        """
        from accelerate.utils.constants import SCALER_NAME

        acc = self.accelerator
        scaler = getattr(acc, "scaler", None)
        fresh_scaler = scaler is not None and not (checkpoint / SCALER_NAME).is_file()
        if fresh_scaler:
            acc.scaler = None  # what load_state restores from; the prepared optimizer keeps its own reference
        try:
            acc.load_state(str(checkpoint), **({"load_module_strict": False} if self._distributed("DEEPSPEED") else {}))
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            from fluxsr_core.upscaler import is_out_of_memory

            if is_out_of_memory(exc):  # the device's fault, not the checkpoint's
                raise
            # torch and accelerate name neither the checkpoint nor what to do
            raise damaged_checkpoint(checkpoint, f"its state could not be loaded ({type(exc).__name__}: "
                                                 f"{first_line(exc)})") from exc
        finally:
            acc.scaler = scaler
        if fresh_scaler and self.main:
            log.warning("checkpoint %s holds no fp16 loss scale (no %s: it was trained without fp16 mixed "
                        "precision): the loss scale starts afresh, as in a new fp16 run", checkpoint, SCALER_NAME)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (atomically: a temporary folder, renamed)."""
        self.interrupt.saving = True   # a second Ctrl-C now would leave the rename half done
        try:
            return self._write_checkpoint()
        finally:
            self.interrupt.saving = False

    def _write_checkpoint(self) -> Path:
        step = self.state.step
        root = self.out / CHECKPOINT_DIR
        final = root / f"step-{step:07d}"
        tmp = root / f".tmp-step-{step:07d}"
        what = f"write checkpoint step {step}"

        def make_folder() -> None:
            bad = self._non_finite_weights()
            if bad:  # never a checkpoint that cannot be resumed, pushing out those that can
                raise FloatingPointError(
                    f"the LoRA at step {step} holds inf or NaN ({len(bad)} tensors, {bad[0]} first), so no checkpoint "
                    f"of it is written and the earlier ones in {root} are kept: resume from the last of them, with "
                    "a lower optim.lr")
            if self.main:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()

        try:
            # Each part on every process, so that a rank whose write fails (each writes its own
            # RNG state, the main process the folder and the files) stops the others too instead
            # of leaving them at the next collective; the first one's all-reduce is the barrier
            # before the others write into the folder.
            self._on_every_process(make_folder, what)
            self._on_every_process(lambda: self._save_state_into(tmp), what)
            self._on_every_process(lambda: self._finish_checkpoint(tmp, final, root, step) if self.main else None,
                                   what)  # its all-reduce is the barrier after the rename
        except BaseException as exc:
            if self.main:  # a part-written checkpoint holds the space it took, and no resume can use it
                shutil.rmtree(tmp, ignore_errors=True)
            if not _is_write_failure(exc):
                raise
            kept = latest_checkpoint(self.out)
            raise CheckpointWriteError(
                f"writing checkpoint step {step} into {root} failed ({first_line(exc)}); the part written is "
                f"removed. " + (f"The last complete checkpoint is {kept}: " if kept else "No checkpoint is kept yet: ")
                + "free some space (or fix the folder) and continue with --resume latest") from exc
        if self.fixed_t5 is not None:
            self.conditioning_path = str(final / CONDITIONING_FILE)
        return final

    def _save_state_into(self, tmp: Path) -> None:
        """:meth:`_write_checkpoint`'s first part, on every process: accelerate's state into ``tmp``."""
        # DeepSpeed writes its own model checkpoint: leave the frozen 12B base out of it.
        extra = {"exclude_frozen_parameters": True} if self._distributed("DEEPSPEED") else {}
        self.accelerator.save_state(str(tmp), safe_serialization=True, **extra)

    def _finish_checkpoint(self, tmp: Path, final: Path, root: Path, step: int) -> None:
        """:meth:`_write_checkpoint`'s second part, on the main process: the config, conditioning
        and state into ``tmp``, the rename to ``final`` and the pruning."""
        acc = self.accelerator
        self.cfg.save(tmp / CONFIG_FILE)
        if self.fixed_t5 is not None:
            # Self-contained: the conditioning it trained with travels (and is pruned) with it
            save_bundle(tmp / CONDITIONING_FILE, self.fixed_t5, self.fixed_clip, self.settings,
                        prompt=self.conditioning_prompt)
        state = {"step": step, "max_steps": self.cfg.train.max_steps, "processes": acc.num_processes,
                 "global_batch": self.cfg.data.batch_size * acc.num_processes
                 * self.cfg.train.gradient_accumulation_steps,
                 "samples_seen": self.state.samples, "optimizer": self.optimizer_name,
                 "lora": LORA_FILE, "ema_lora": EMA_LORA_FILE if self.ema is not None else None,
                 # file names inside this folder; the hash is what export and resume check
                 "conditioning": CONDITIONING_FILE if self.fixed_t5 is not None else None,
                 "conditioning_sha256": self.conditioning_sha256,
                 "conditioning_source": self.conditioning_source,
                 "base_model_identity": self.base_identity,
                 "holdout_ids": self.holdout_ids,
                 "perceptual": self.perceptual_label,
                 "last": self.history[-1] if self.history else None,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        # On the disk before the rename and before older checkpoints go: after a power cut the
        # newest must not be the only one left, and unreadable.
        fsync_tree(tmp)
        old = None
        if final.exists():  # the same step saved again after a resume: replace it whole
            old = root / f".old-step-{step:07d}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(self.out)[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        self._info(f"checkpoint {final}")

    def _apply_optim_config(self) -> None:
        """After a resume: the config's lr, betas, weight decay and eps, not the checkpoint's.

        Loading the optimizer and scheduler state brings back the values the checkpoint ran with
        (param groups and the scheduler's base lr); the schedule's shape (kind, warm-up, length)
        is the config's already, since the scheduler's functions are not saved.
        """
        o = self.cfg.optim
        wanted = {"betas": tuple(o.betas), "weight_decay": o.weight_decay, "eps": o.eps}
        # the base lr the checkpoint ran with (a group's "lr" is the scheduled one)
        changed = [f"lr {b} -> {o.lr}" for b in self.scheduler.base_lrs if b != o.lr]
        for group in self.optimizer.param_groups:
            for key, value in wanted.items():
                old = group.get(key)
                if key in group and (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
                    changed.append(f"{key} {old} -> {value}")
                    group[key] = value
            group["initial_lr"] = o.lr
        self.scheduler.base_lrs = [o.lr for _ in self.scheduler.base_lrs]
        # the current lr from the (restored) position in the config's schedule
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if changed:
            self._info("resume: optimizer settings from the config, not the checkpoint: "
                       + ", ".join(sorted(set(changed))))

    def _set_aside_superseded(self, step: int) -> None:
        """What this output folder holds past the step resumed from belongs to the history this
        run replaces: its checkpoints and its ``metrics.jsonl`` lines (a killed run logged steps
        after its last checkpoint) move into ``checkpoints/superseded-<time>/`` (kept, not
        deleted), so that neither ``--resume latest`` nor pruning mistakes those checkpoints for
        this run's, and the metrics hold each step once, this run's."""
        aside = self.out / CHECKPOINT_DIR / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        later = [c for c in list_checkpoints(self.out) if checkpoint_step(c) > step]
        if later:
            aside.mkdir(parents=True, exist_ok=True)
            for c in later:
                os.replace(c, aside / c.name)
            log.warning("resumed from step %d: the later checkpoints %s were moved to %s", step,
                        ", ".join(c.name for c in later), aside)
        metrics = self.out / METRICS_FILE
        if not metrics.is_file():
            return
        _drop_torn_last_line(metrics)
        kept, moved = [], []
        for line in metrics.read_bytes().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, not UTF-8: not one of ours, left where it is
                record = None
            record_step = record.get("step") if isinstance(record, dict) else None
            later = isinstance(record_step, int) and not isinstance(record_step, bool) and record_step > step
            (moved if later else kept).append(line)
        if not moved:
            return
        aside.mkdir(parents=True, exist_ok=True)
        # the lines moved first, the file rewritten then: a failure between the two loses no line
        earlier = (aside / METRICS_FILE).read_bytes() if (aside / METRICS_FILE).is_file() else b""  # same second
        atomic_write(aside / METRICS_FILE, lambda tmp: Path(tmp).write_bytes(earlier + b"".join(moved)))
        atomic_write(metrics, lambda tmp: Path(tmp).write_bytes(b"".join(kept)))
        log.warning("resumed from step %d: %d later lines of %s were moved to %s", step, len(moved),
                    METRICS_FILE, aside / METRICS_FILE)

    def _set_aside_earlier_metrics(self) -> None:
        """A fresh run into a folder where a run stopped before its first checkpoint: that run's
        metrics.jsonl is renamed (``metrics.before-<time>.jsonl``), so this run's steps are not
        interleaved with its steps of the same numbers."""
        metrics = self.out / METRICS_FILE
        if not metrics.is_file():
            return
        aside = self.out / f"metrics.before-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
        os.replace(metrics, aside)
        log.warning("%s holds the %s of a run that wrote no checkpoint; it was renamed %s, and this run starts "
                    "its own", self.out, METRICS_FILE, aside.name)

    # -- validation ---------------------------------------------------------------------------

    def _validation_set(self) -> list[tuple[str, torch.Tensor]]:
        if not hasattr(self, "_val_set"):
            items = list(self._validation_images)  # read (and checked) before the models
            for i in self.holdout_indices[:max(0, self.cfg.validation.count - len(items))]:
                it = self.pairs[i]
                if "image" in it:
                    hr = it["image"].float().div(255.0)[None]
                else:
                    with torch.no_grad():
                        hr = self.codec.decode(it["z0"][None].to(self.accelerator.device)).float().cpu()
                s = self.cfg.degradation.scale
                items.append((f"pair-{it['id']}", hr[..., :hr.shape[-2] - hr.shape[-2] % s, :hr.shape[-1] - hr.shape[-1] % s]))
            self._val_set = items
        return self._val_set

    def validate(self) -> Optional[dict[str, Any]]:
        """The validation of the current step on the main process (its record; None on the others
        or with nothing to validate on). Guarded: its failure there (an out-of-memory, a full disk
        for the images) stops every process, which would otherwise wait at the next collective."""
        return self._on_every_process(lambda: self._validate_on_main() if self.main else None,
                                      f"validate step {self.state.step}")

    @torch.no_grad()
    def _validate_on_main(self) -> Optional[dict[str, Any]]:
        """:meth:`validate`'s work: PSNR-Y of the student's one-step upscale of each validation
        image's degraded copy, logged, recorded in metrics.jsonl and (``validation.save_images``)
        saved as images."""
        from fluxsr_core import images
        from fluxsr_core.upscaler import UpscaleOptions, upscale_tensor

        acc = self.accelerator
        val = self._validation_set()
        if not val:
            return None
        opts = UpscaleOptions(scale=float(self.cfg.degradation.scale), t_l=self.cfg.settings.t_l,
                              color_fix=self.cfg.validation.color_fix)
        self.transformer.eval()
        use_ema = self.ema is not None and self.cfg.validation.use_ema
        ctx = self.ema.applied_to(self.params) if use_ema else contextlib.nullcontext()
        per_image, folder = [], self.out / "validation" / f"step-{self.state.step:07d}"
        with ctx, acc.autocast():
            for k, (name, hr) in enumerate(val):
                lr = degrade(hr, self.cfg.degradation, seed=self.cfg.validation.seed + k)
                sr = upscale_tensor(lr, self.eval_velocity, self.codec, self.val_cond, opts).float().cpu()
                bic = images.resize(lr, tuple(hr.shape[-2:])).clamp(0, 1)
                scale = self.cfg.degradation.scale
                per_image.append({"name": name, "psnr": _psnr(sr, hr, scale),
                                  "bicubic_psnr": _psnr(bic, hr, scale)})
                if self.cfg.validation.save_images:
                    images.save_image(folder / f"{name}-sr.png", sr)
                    if self.state.step == 0 or not (folder.parent / f"{name}-lr.png").exists():
                        images.save_image(folder.parent / f"{name}-lr.png", lr)
                        images.save_image(folder.parent / f"{name}-hr.png", hr)
        self.transformer.train()
        result = {"step": self.state.step, "ema": use_ema,
                  "psnr": sum(r["psnr"] for r in per_image) / len(per_image),
                  "bicubic_psnr": sum(r["bicubic_psnr"] for r in per_image) / len(per_image),
                  "images": per_image}
        self._info(f"validation step {self.state.step}: PSNR-Y {result['psnr']:.2f} dB "
                   f"(bicubic {result['bicubic_psnr']:.2f} dB) on {len(per_image)} image(s)"
                   f"{' with EMA weights' if use_ema else ''}")
        acc.log({"val/psnr": result["psnr"], "val/bicubic_psnr": result["bicubic_psnr"]},
                step=self.state.step)
        self._append_metrics({"kind": "validation", **result})
        return result

    # -- the loop ------------------------------------------------------------------------------

    def _info(self, msg: str) -> None:
        if getattr(self, "main", True):
            log.info(msg)

    def _record_metrics(self, record: dict[str, Any], then: Optional[Callable[[], None]] = None) -> None:
        """:meth:`_append_metrics` on the main process (and ``then()``, more of its work), called by
        every process: a failure there (a full disk) stops every process, which would otherwise
        wait at the next collective."""
        def work() -> None:
            if self.main:
                self._append_metrics(record)
                if then is not None:
                    then()

        self._on_every_process(work, f"write {METRICS_FILE}")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``<output_dir>/metrics.jsonl`` (main process; flushed at once),
        so the numbers outlive stdout whether or not tensorboard is installed. Called on the main
        process alone, outside :meth:`_record_metrics`, only where no collective follows."""
        if not self.main:
            return
        path = self.out / METRICS_FILE
        if not getattr(self, "_metrics_tail_checked", False):
            _drop_torn_last_line(path)  # a run killed mid-append; before this run's first line
            self._metrics_tail_checked = True
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _batch_tensors(self, batch: dict[str, Any]):
        dev = self.accelerator.device
        eps = batch["eps"].to(dev, torch.float32)
        z0 = batch["z0"].to(dev, torch.float32)
        pos = batch["pos"]
        with torch.no_grad():
            if "lr" in batch:
                x0, lr = batch["x0"].to(dev), batch["lr"].to(dev)
            else:
                x0 = self.codec.decode(z0).float()
                lr = degrade_to_hr_size(x0, self.cfg.degradation, seed=[self.stream.degradation_seed(p) for p in pos])
            z_l = self.codec.encode(lr.float()).float()
        t_l = self.cfg.settings.t_l
        ftd_t = torch.tensor([t_l + (1.0 - t_l) * self.stream.ftd_uniform(p) for p in pos], dtype=torch.float32)
        if self.fixed_bundle is not None:
            cond = self.fixed_bundle.to_conditioning(self.cfg.settings.guidance)
        else:
            cond = Conditioning(t5=batch["t5"], clip_pooled=batch["clip_pooled"], guidance=self.cfg.settings.guidance)
        return z_l, z0, eps, x0, cond, ftd_t

    def _micro_step_losses(self, batches: Iterator[dict[str, Any]]) -> LossParts:
        """The next micro-batch's losses (forward only); refuses a non-finite total."""
        cfg = self.cfg
        batch = next(batches)
        z_l, z0, eps, x0, cond, ftd_t = self._batch_tensors(batch)
        parts = compute_losses(self.velocity, self.codec, z_l=z_l, z0=z0, eps=eps, x0=x0,
                               cond=cond, t_l=cfg.settings.t_l, ftd_t=ftd_t, loss=cfg.loss,
                               perceptual=self.perceptual, adl_hook=self.adl_hook,
                               adl_seeds=[self.stream.adl_seed(p) for p in batch["pos"]])
        if not torch.isfinite(parts.total):
            raise FloatingPointError(f"loss is {float(parts.total.detach())} at step {self.state.step + 1}; "
                                     "lower optim.lr or check the data")
        return parts

    def _clip_and_check_gradient(self) -> None:
        """Clip the gradient to ``optim.max_grad_norm`` (0: not clipped, only measured) and refuse a
        non-finite one: a finite loss can still have an inf or NaN gradient (a bf16 overflow in the
        backward), which the optimizer step would write into the LoRA and the EMA, and the next
        checkpoint would then push the good ones out. fp16's loss scale handles it itself (its
        step is skipped and the scale lowered). Every process sees the same norm, taken after the
        gradients are reduced, so all stop together."""
        cfg, acc = self.cfg, self.accelerator
        # FSDP clips through its own module: give it all of the model's parameters.
        params = self.model.parameters() if self._distributed("FSDP") else list(self.params.values())
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        norm = acc.clip_grad_norm_(params, max_norm)  # None under DeepSpeed, which clips itself
        if norm is None or acc.scaler is not None or bool(torch.isfinite(torch.as_tensor(norm))):
            return
        raise FloatingPointError(
            f"the gradient is not finite (norm {float(norm)}) at step {self.state.step + 1} although the loss is; "
            f"the LoRA and its EMA are left as they were after step {self.state.step}, and no checkpoint of this "
            "step is written. Lower optim.lr (or keep optim.max_grad_norm on), or train in fp32 "
            "(model.dtype=fp32) if bf16 overflows; resume from the last checkpoint")

    def _non_finite_weights(self) -> list[str]:
        """Names of the LoRA tensors (and EMA shadows) holding inf or NaN on this process."""
        bad = [n for n, p in self.params.items() if not bool(torch.isfinite(p.detach()).all())]
        if self.ema is not None:
            bad += [f"EMA {n}" for n, p in self.ema.shadow.items() if not bool(torch.isfinite(p).all())]
        return bad

    def run(self) -> TrainResult:
        t_start = time.time()
        self._setup_accelerator()
        resume_from = self._preflight()   # refusals first: nothing built, nothing written yet
        self._setup_models()
        cfg, acc = self.cfg, self.accelerator
        self.history: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        losses: list[float] = []

        accum = cfg.train.gradient_accumulation_steps
        global_batch = cfg.data.batch_size * acc.num_processes * accum
        if resume_from is not None:
            self._load_checkpoint(resume_from)
            # accelerate restores its micro-batch counter, and syncs (and steps) when it reaches a
            # multiple of the accumulation count: with another train.gradient_accumulation_steps
            # than the checkpoint's, steps would end mid-window, and a rank without its own saved
            # counter (more processes than before) would all-reduce out of step with the others.
            # The loop always runs whole windows, so every rank starts counting afresh.
            acc.step = 0
            self._info(f"resumed from {resume_from} at step {self.state.step}")
            if self.state.train_pairs is not None and self.state.train_pairs != len(self.train_indices) and self.main:
                log.warning("the checkpoint was trained on %d pairs, the dataset now has %d for training: the data "
                            "order from here on is not the one the run had", self.state.train_pairs,
                            len(self.train_indices))
            if self.resume_notices and self.main:
                log.warning("resume: settings changed since %s, the new ones apply from step %d on: %s",
                            resume_from.name, self.state.step, "; ".join(self.resume_notices))
            self._apply_optim_config()
            resumed_step = self.state.step  # the main process's files; a failure there stops every process
            self._on_every_process(lambda: self._set_aside_superseded(resumed_step) if self.main else None,
                                   "set aside what the resumed run replaces")
        else:
            if cfg.train.resume == "latest":
                self._info("resume=latest: no checkpoint yet, starting fresh")
            self._on_every_process(lambda: self._set_aside_earlier_metrics() if self.main else None,
                                   "set aside the metrics of a run that wrote no checkpoint")
        start_step = self.state.step
        self.state.train_pairs = len(self.train_indices)
        if self.state.samples is None:  # a checkpoint from before the counter: its batch is assumed
            self.state.samples = start_step * global_batch
        then_batch = self.resume_state.get("global_batch") if resume_from is not None else None
        if then_batch is not None and then_batch != global_batch:
            # allowed (e.g. more GPUs on resume), but it changes what a step is
            if self.main:
                log.warning("resume: the global batch was %s and is now %d (%d per process x %d process(es) x %d "
                            "accumulation): each step from here on averages %d samples (optim.lr is not "
                            "rescaled); the data stream goes on from sample %d", then_batch, global_batch,
                            cfg.data.batch_size, acc.num_processes, accum, global_batch, self.state.samples)
        elif resume_from is not None and self.state.samples != start_step * global_batch:
            self._info(f"the global batch is now {global_batch}: the data stream goes on from sample "
                       f"{self.state.samples}")
        self._record_metrics({"kind": "resume" if resume_from is not None else "start", "step": start_step,
                              "checkpoint": str(resume_from) if resume_from is not None else None,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                             then=lambda: cfg.save(self.out / CONFIG_FILE))

        sampler = _StreamBatches(cfg.data.batch_size, acc.process_index, acc.num_processes, self.state.samples)
        items = _TrainItems(self.pairs, self.train_indices, self.stream, cfg.degradation, self.teacher_image)
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global
        # torch RNG, which would shift the LoRA dropout stream of a resumed run by one draw.
        loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=_collate,
                                             num_workers=cfg.data.num_workers,
                                             persistent_workers=cfg.data.num_workers > 0,
                                             worker_init_fn=_ignore_sigint if cfg.data.num_workers > 0 else None,
                                             generator=torch.Generator().manual_seed(cfg.data.seed))
        batches = iter(loader)
        end = end_step(cfg.train)
        last_ckpt: Optional[Path] = None
        stopped = interrupted = False

        progress = None
        if self.main and cfg.train.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="training", unit="step",
                            dynamic_ncols=True)
        self.interrupt.quiet = not self.main  # the launcher signals every process: one notice per run
        self.interrupt.install()
        window: dict[str, float] = {}
        window_n, window_seconds = 0, 0.0  # the steps' own time: checkpoints and validations are not in s_per_step
        try:
            if cfg.validation.every and start_step == 0:
                v = self.validate()
                if v:
                    self.validations.append(v)
            while self.state.step < end:
                t_step = time.time()
                sums: dict[str, float] = {}
                for _ in range(accum):
                    with acc.accumulate(self.model):
                                        # Guarded: an error on one process (its batch, an out-of-memory forward, a
                        # non-finite loss) stops every process here, before the backward's
                        # all-reduce where the others would wait for it until the group timed out.
                        # Not guarded: the backward and the optimizer step themselves (their
                        # collectives are inside), nor, under FSDP or ZeRO-3, the forward's.
                        parts = self._on_every_process(lambda: self._micro_step_losses(batches),
                                                       f"run training step {self.state.step + 1}")
                        acc.backward(parts.total)
                        if acc.sync_gradients:
                            self._clip_and_check_gradient()
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for k, v in parts.as_floats().items():
                        sums[k] = sums.get(k, 0.0) + v / accum
                lr_used = self.scheduler.get_last_lr()[0]  # this step's; step() sets the next one's
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.params)
                self.state.step += 1
                self.state.samples += global_batch
                keys = sorted(sums)
                # A Ctrl-C on any process rides along with the losses' reduce, so every process
                # stops after the same step (a checkpoint is a collective).
                reduced = acc.reduce(torch.tensor([sums[k] for k in keys] + [float(self.interrupt.requested)],
                                                  device=acc.device), "mean").tolist()
                interrupted = reduced.pop() > 0
                step_vals = dict(zip(keys, reduced))
                losses.append(step_vals["loss"])
                for k, v in step_vals.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                window_seconds += time.time() - t_step
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_vals['loss']:.4g}")
                if self.state.step % cfg.train.log_every == 0 or self.state.step == end or interrupted:
                    dt = window_seconds / window_n
                    entry = {"step": self.state.step, **{k: v / window_n for k, v in window.items()},
                             "lr": lr_used, "s_per_step": dt}
                    self.history.append(entry)
                    terms = " ".join(f"{k} {entry[k]:.4g}" for k in ("ftd", "mse", "tvlpips", "adl") if k in entry)
                    line = (f"step {self.state.step}/{cfg.train.max_steps} | loss {entry['loss']:.4g} ({terms}) | "
                            f"lr {lr_used:.3g} | {dt:.2f} s/step")
                    if progress is not None:
                        progress.write(line)
                    self._info(line) if progress is None else log.debug(line)
                    self._record_metrics({"kind": "train", **entry}, then=lambda: acc.log(
                        {f"train/{k}": v for k, v in entry.items() if k != "step"}, step=self.state.step))
                    window, window_n, window_seconds = {}, 0, 0.0
                if interrupted:
                    break  # the checkpoint of this step is written below
                if self.state.step % cfg.checkpoint.every == 0:
                    last_ckpt = self.save_checkpoint()
                if cfg.validation.every and self.state.step % cfg.validation.every == 0:
                    v = self.validate()
                    if v:
                        self.validations.append(v)
                if self.stop_check is not None and self.stop_check(self.state.step):
                    stopped = True
                    break
            if last_ckpt is None or not last_ckpt.name.endswith(f"{self.state.step:07d}"):
                if self.state.step > start_step or resume_from is None:
                    last_ckpt = self.save_checkpoint()
                else:
                    last_ckpt = resume_from
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the handler's reach): what is on disk is what is kept.
            # the others may be anywhere (or gone): this process's own record, no collective
            self._append_metrics({"kind": "interrupt", "step": self.state.step, "saved": False})
            raise TrainingInterrupted(self.state.step, latest_checkpoint(self.out), saved=False,
                                      terminated=self.interrupt.terminated) from None
        finally:
            self.interrupt.remove()
            if progress is not None:
                progress.close()
        stopped = stopped or interrupted or self.state.step < cfg.train.max_steps
        if self.adl_hook is not None:
            self.adl_hook.remove()
        if interrupted:  # before end_training, which ends the process group
            self._record_metrics({"kind": "interrupt", "step": self.state.step, "saved": True})
        acc.end_training()
        if interrupted:
            raise TrainingInterrupted(self.state.step, last_ckpt, saved=True, terminated=self.interrupt.terminated)
        if resume_from is not None and last_ckpt == resume_from and self.fixed_t5 is not None:
            own = resume_from / CONDITIONING_FILE
            self.conditioning_path = str(own) if own.is_file() else None
        return TrainResult(
            output_dir=str(self.out), step=self.state.step, start_step=start_step,
            checkpoint=str(last_ckpt), lora_path=str(last_ckpt / LORA_FILE),
            ema_lora_path=str(last_ckpt / EMA_LORA_FILE) if self.ema is not None else None,
            conditioning_path=self.conditioning_path, losses=losses, history=self.history,
            validation=self.validations, perceptual_label=self.perceptual_label, stopped_early=stopped,
            seconds=time.time() - t_start, config=cfg, metrics_path=str(self.out / METRICS_FILE))


def _drop_torn_last_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last whole line (a kill mid-append leaves part of one),
    so the lines appended next stay one JSON record each. Nothing happens to a whole file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # the torn tail is short (one record): look back in chunks for the newline before it
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        log.warning("%s: dropping a last line cut short by a stopped run (%d bytes)", path, size - keep)
        f.truncate(keep)


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def train(config: TrainConfig, stop_check: Optional[Callable[[int], bool]] = None) -> TrainResult:
    """Distil a FluxSR student as configured; returns a :class:`TrainResult`.

    Runs in the current process, or in each process of an ``accelerate launch`` (DDP, FSDP or
    DeepSpeed as the accelerate config says). ``stop_check(step)`` is asked after every
    optimizer step; returning True stops the run there (with a checkpoint), like
    ``train.stop_at``. Bad configs, a fresh run into a folder that holds checkpoints, and a
    resume that would change what defines the student (T_L, guidance, scale, base model, LoRA
    shape, EMA, conditioning content) raise :class:`~fluxsr_training.config_io.ConfigError`
    before any model is loaded or any file written.

    Ctrl-C during the loop (main thread) finishes the current step, writes a checkpoint and
    raises :class:`TrainingInterrupted` (``saved=True``); a second Ctrl-C stops at once
    (``saved=False``, naming the last checkpoint kept). Every log line and validation is also
    appended to ``<output_dir>/metrics.jsonl``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    check_config(config)
    run = _Run(config, stop_check)
    try:
        return run.run()
    finally:
        run.release_run_lock()


__all__ = ["TrainConfig", "ModelConfig", "LoraConfig", "SettingsConfig", "DataConfig", "LossConfig",
           "OptimConfig", "EmaConfig", "CheckpointConfig", "ValidationConfig", "TrainLoopConfig",
           "TrainResult", "LossParts", "LoraEMA", "SampleStream", "DEFAULT_LORA_TARGETS", "ConfigError",
           "load_train_config", "check_config", "train", "build_student", "resolve_lora_targets",
           "lora_parameters", "compute_losses", "list_checkpoints", "latest_checkpoint", "resolve_resume",
           "save_lora_state", "read_lora_state", "LORA_FILE", "EMA_LORA_FILE", "CONFIG_FILE", "STATE_FILE",
           "read_checkpoint_state", "DamagedCheckpointError", "incomplete_checkpoints",
           "CONDITIONING_FILE", "METRICS_FILE", "exit_without_teardown", "TrainingInterrupted", "interrupted_advice", "conditioning_digest", "base_model_identity",
           "config_warnings", "DataSplit", "split_pairs", "check_pair_shapes", "end_step"]

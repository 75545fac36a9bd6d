"""Export a trained student: the LoRA (diffusers naming, ``fluxsr.*`` metadata) and its conditioning bundle.

``fluxsr-train export RUN_OR_CHECKPOINT -o OUT`` writes

* ``OUT/pytorch_lora_weights.safetensors``: the EMA weights (when the run kept an EMA, unless
  ``--no-ema``) or the raw weights of the checkpoint, through :func:`fluxsr_core.lora.save_lora`
  (diffusers naming, ``lora_adapter_metadata``, the run settings; ``alpha / r`` folded into
  ``lora_B`` so every loader, ComfyUI's included, applies the same strength);
* ``OUT/conditioning.safetensors``: the fixed conditioning the student was trained with,
  through :func:`fluxsr_core.bundle.save_bundle`, carrying the same run settings (and the
  source's prompt). It comes from the checkpoint's own copy, checked against the content hash
  the checkpoint recorded, so an archived or moved run exports what it trained with.

Both are what ``fluxsr upscale --lora ... --bundle ...`` and the ComfyUI nodes load; ComfyUI's own
LoRA loader reads the LoRA file onto a native FLUX.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from fluxsr_core.bundle import ConditioningBundle, load_bundle, save_bundle
from fluxsr_core.files import replaced_together
from fluxsr_core.lora import save_lora
from fluxsr_core.settings import RunSettings
from fluxsr_core.weights import CorruptWeightsError

from .trainer import (CHECKPOINT_DIR, CONDITIONING_FILE, CONFIG_FILE, EMA_LORA_FILE, LORA_FILE, STATE_FILE,
                      DamagedCheckpointError, TrainConfig, bundle_prompt, checkpoint_before, conditioning_digest,
                      latest_checkpoint, load_train_config, read_checkpoint_state, read_lora_state)

log = logging.getLogger("fluxsr.export")

EXPORT_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file
BUNDLE_FILE = "conditioning.safetensors"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (the message says why and what to do)."""


@dataclass
class ExportResult:
    """Where the files went and what they hold."""

    lora_path: str
    bundle_path: str
    checkpoint: str
    step: int
    ema: bool
    settings: RunSettings
    rank: int
    alpha: float


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (``checkpoints/step-N``), or a run folder meaning its newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint or run folder: {p}")
    if (p / STATE_FILE).is_file():
        return p
    newest = latest_checkpoint(p)
    if newest is None:
        raise FileNotFoundError(f"{p} is neither a checkpoint folder (no {STATE_FILE}) nor a run folder with "
                                "checkpoints/step-*; give the training output_dir or one of its checkpoints")
    return newest


def checkpoint_config(checkpoint: str | os.PathLike) -> TrainConfig:
    """The resolved :class:`TrainConfig` saved beside a checkpoint."""
    ckpt = Path(checkpoint)
    cfg_path = ckpt / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{ckpt} has no {CONFIG_FILE}; it was not written by fluxsr-train train")
    return load_train_config(cfg_path)


NO_FIXED_CONDITIONING_HELP = (
    "Pass --bundle with the conditioning the student should run with: make one from the prompt with "
    "`fluxsr-train bundle --prompt \"...\" --text-encoders ... -o student_bundle.safetensors` (or use one of the "
    "pairs folder's cond-*.safetensors), and next time train with data.conditioning=student_bundle.safetensors "
    "so the student learns the conditioning it runs with")


def _conditioning_source(ckpt: Path, state: dict, bundle: Optional[str]) -> tuple[str, ConditioningBundle]:
    """The conditioning to ship, read and checked: ``(path, bundle)``.

    ``bundle`` (the user's --bundle) wins. Otherwise the checkpoint's own
    ``conditioning.safetensors``, then (checkpoints from before they carried one) the run
    folder's; a recorded content hash must match. Paths in ``trainer_state.json`` are never
    used: they were relative to wherever training ran, and may name another run's file.
    """
    recorded = state.get("conditioning_sha256")
    records_hash = "conditioning_sha256" in state   # written by every checkpoint since the hash exists
    if bundle:
        b = load_bundle(bundle)
        if recorded and conditioning_digest(b.t5, b.clip_pooled) != recorded:
            log.warning("%s is not the conditioning %s was trained with (%s); shipping it as asked", bundle, ckpt,
                        state.get("conditioning_source", f"sha256 {recorded[:16]}"))
        return bundle, b
    if records_hash and recorded is None:
        raise ExportError(f"{ckpt}: the run has no single fixed conditioning (it trained with data.conditioning=pairs, "
                          f"on the conditionings of {state.get('conditioning_source', 'several prompts')}). "
                          + NO_FIXED_CONDITIONING_HELP)
    candidates = [ckpt / CONDITIONING_FILE]
    if ckpt.parent.name == CHECKPOINT_DIR:   # <run>/checkpoints/step-N: the run folder's (older runs)
        candidates.append(ckpt.parent.parent / CONDITIONING_FILE)
    mismatched = []
    for c in candidates:
        if not c.is_file():
            continue
        b = load_bundle(c)
        if not records_hash:
            if c != candidates[0]:
                log.warning("%s predates checkpoints with their own conditioning: exporting the run folder's %s, "
                            "which a later run into the same folder would have replaced (no hash to check)", ckpt, c)
            return str(c), b
        got = conditioning_digest(b.t5, b.clip_pooled)
        if got == recorded:
            return str(c), b
        mismatched.append(f"{c} holds sha256 {got[:16]}")
    if mismatched:
        raise ExportError(f"{ckpt} was trained with the conditioning of {state.get('conditioning_source', '?')} "
                          f"(sha256 {recorded[:16]}), but " + "; ".join(mismatched)
                          + ": the file was replaced or belongs to another run. Restore the checkpoint's own "
                          f"{CONDITIONING_FILE}, or pass --bundle with the conditioning you mean to ship")
    if records_hash:
        raise ExportError(f"{ckpt} lacks its {CONDITIONING_FILE} (sha256 {recorded[:16]}); the checkpoint is "
                          "incomplete. Pass --bundle with the conditioning it was trained with "
                          f"(that of {state.get('conditioning_source', '?')}; see data.conditioning in its "
                          f"{CONFIG_FILE})")
    raise ExportError(f"{ckpt}: the run has no single fixed conditioning (it trained on pairs with several prompts' "
                      f"conditionings, or its {CONDITIONING_FILE} was moved). " + NO_FIXED_CONDITIONING_HELP)


def _check_bundle_widths(ckpt: Path, cfg: TrainConfig, cond_src: str, b: ConditioningBundle) -> None:
    """ExportError when a --bundle's widths are not those the student takes (the checkpoint's own
    conditioning, else the base model's header): fluxsr upscale would refuse the pair only later."""
    own = ckpt / CONDITIONING_FILE
    if own.is_file():
        ref = load_bundle(own)
        widths, where = (ref.t5.shape[-1], ref.clip_pooled.shape[-1]), f"its own {CONDITIONING_FILE}"
    else:
        from fluxsr_core.models import transformer_config_of

        try:
            config = transformer_config_of(cfg.model.transformer)
        except (OSError, ValueError):  # the base is elsewhere now: nothing to compare with
            return
        widths = (config["joint_attention_dim"], config["pooled_projection_dim"])
        where = f"its base model {cfg.model.transformer}"
    if (b.t5.shape[-1], b.clip_pooled.shape[-1]) != tuple(widths):
        raise ExportError(f"--bundle {cond_src} holds t5 {b.t5.shape[-1]} and clip_pooled {b.clip_pooled.shape[-1]} wide; "
                          f"the student of {ckpt} takes {widths[0]} and {widths[1]} ({where}): it is a bundle for "
                          "another model")


def export_student(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, use_ema: Optional[bool] = None,
                   bundle: Optional[str] = None, lora_name: str = EXPORT_LORA_FILE,
                   bundle_name: str = BUNDLE_FILE, overwrite: bool = False) -> ExportResult:
    """Write the student's LoRA and conditioning bundle to ``output_dir``; returns :class:`ExportResult`.

    ``checkpoint``: a checkpoint folder or a run folder (its newest checkpoint). ``use_ema``:
    None = the EMA weights when the checkpoint has them, True = require them, False = the raw
    weights. ``bundle``: a conditioning bundle to ship instead of the run's own (needed when the
    run trained on several conditionings). Both files carry the run settings of the training
    config (T_L, guidance, scale, base model, rank). Raises :class:`ExportError` when the
    checkpoint's conditioning is missing or does not match its recorded hash, when ``bundle``
    is for a model of other widths, and when ``output_dir`` holds either file already (unless
    ``overwrite``). Both files are written under temporary names first and put in place
    together, so a failed export leaves an earlier one as it was.
    """
    ckpt = find_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    state = read_checkpoint_state(ckpt)
    ema_file = ckpt / EMA_LORA_FILE
    if use_ema is None:
        use_ema = ema_file.is_file()
    if use_ema and not ema_file.is_file():
        raise ExportError(f"{ckpt} has no EMA weights ({EMA_LORA_FILE}); the run had ema.enabled=false. "
                          "Export without --ema")
    src = ema_file if use_ema else ckpt / LORA_FILE
    if not src.is_file():
        raise FileNotFoundError(f"{ckpt} lacks {src.name}; the checkpoint is incomplete")
    try:
        tensors, rank, alpha = read_lora_state(src)
    except CorruptWeightsError as exc:
        earlier = checkpoint_before(ckpt)
        advice = [f"export an earlier checkpoint ({earlier})" if earlier else "",
                  "export its raw weights with --no-ema" if use_ema and (ckpt / LORA_FILE).is_file() else ""]
        advice = " or ".join(a for a in advice if a) or "train again from its run's last whole checkpoint"
        raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {exc}; {advice}") from None
    if (rank, alpha) != (cfg.lora.rank, cfg.lora.alpha):
        raise ExportError(f"{src}: rank {rank}, alpha {alpha:g} disagree with its {CONFIG_FILE} "
                          f"(rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}); the checkpoint was edited")
    settings = cfg.run_settings()
    step = int(state.get("step", 0))
    # Everything is read before anything is written: a problem leaves no half export behind.
    cond_src, b = _conditioning_source(ckpt, state, bundle)
    if bundle:
        _check_bundle_widths(ckpt, cfg, cond_src, b)
    prompt = bundle_prompt(cond_src)
    out = Path(output_dir)
    targets = (out / lora_name, out / bundle_name)
    folders = [t.name for t in targets if t.is_dir()]
    if folders:
        raise ExportError(f"{out} holds a folder named {' and '.join(folders)}, where the export writes a file; "
                          "move it, or choose another -o")
    taken = [t.name for t in targets if t.exists() or t.is_symlink()]
    if taken and not overwrite:
        raise ExportError(f"{out} holds {' and '.join(taken)} already (an earlier export?); pass --overwrite to "
                          "replace them, or choose another -o")
    if out.exists() and not out.is_dir():
        raise ExportError(f"-o {out} is a file; the export writes a folder (the LoRA and the conditioning bundle, "
                          f"{lora_name} and {bundle_name}): give a folder's path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder above it should be, no permission, ...
        raise ExportError(f"the export folder {out} cannot be made ({exc.strerror or exc}); choose another -o") from None
    with replaced_together(targets) as staged:
        save_lora(staged[0], tensors, settings, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                  extra_metadata={"fluxsr.step": str(step), "fluxsr.weights": "ema" if use_ema else "raw",
                                  "fluxsr.transformer": os.path.basename(os.path.normpath(cfg.model.transformer))})
        save_bundle(staged[1], b.t5, b.clip_pooled, settings,
                    prompt=prompt)  # none recorded: none claimed (a file name is no prompt)
    lora_path, bundle_path = (str(t) for t in targets)
    log.info("exported step %d (%s weights) to %s and %s; %s", step, "EMA" if use_ema else "raw", lora_path,
             bundle_path, settings.describe())
    return ExportResult(lora_path=str(lora_path), bundle_path=str(bundle_path), checkpoint=str(ckpt), step=step,
                        ema=bool(use_ema), settings=settings, rank=cfg.lora.rank, alpha=cfg.lora.alpha)


def load_student(lora_path: str | os.PathLike, bundle_path: str | os.PathLike, transformer: str,
                 vae: str, dtype="auto", device="cpu", init_seed: int = 0):
    """Load an exported student the way users do: ``(velocity, codec, conditioning, settings)``.

    A fresh base from ``transformer``/``vae`` (paths, or ``"tiny"`` with ``init_seed``), the
    LoRA through :func:`fluxsr_core.lora.load_lora`, the bundle through
    :func:`fluxsr_core.bundle.load_bundle`.
    """
    from fluxsr_core import models
    from fluxsr_core.lora import load_lora

    dev = models.resolve_device(device)
    dt = models.resolve_dtype(dtype, dev)
    tr = models.load_transformer(transformer, dtype=dt, device=None, seed=init_seed)
    v = models.load_vae(vae, dtype=dt, device=None, seed=init_seed)
    info = load_lora(tr, lora_path)
    models.apply_memory_mode(tr, v, "none", dev)
    b = load_bundle(bundle_path)
    b.check_fits(tr)
    return (models.DiffusersVelocity(tr, compute_dtype=dt), models.DiffusersCodec(v, compute_dtype=dt),
            b.to_conditioning(), info.settings)


__all__ = ["ExportError", "ExportResult", "export_student", "find_checkpoint", "checkpoint_config", "load_student",
           "BUNDLE_FILE", "EXPORT_LORA_FILE"]

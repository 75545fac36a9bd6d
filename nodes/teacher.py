"""FluxSRTeacherSampler: FLUX.1-dev's multi-step sampler for teacher pairs (noise, image latent).

The sampling is the core's (:func:`fluxsr_core.flow.flux_sigmas` + :func:`~fluxsr_core.flow.euler_sample`
over the velocity interface), so a pair made here and one made by ``fluxsr-train pairs`` follow
the same schedule; pairs go to disk through the core's :class:`~fluxsr_core.pairs.PairWriter`.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..fluxsr_core import flow, images, pairs
from ..fluxsr_core.flow import seeded_noise  # the seed convention shared with fluxsr-train pairs
from ..fluxsr_core.latents import PIXEL_MULTIPLE, denormalize
from . import comfy_adapters
from .common import CATEGORY, range_problem

log = logging.getLogger("fluxsr")

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def preview_steps(steps: int, count: int) -> list[int]:
    """Which steps (1-based, after the step) the trajectory shows: ``count`` evenly spaced, last included."""
    if count <= 0:
        return []
    count = min(count, steps)
    return sorted({max(1, round(steps * (k + 1) / count)) for k in range(count)})


@dataclass
class TeacherResult:
    """One teacher sample: ``image`` ``[1, 3, H, W]``, ``z0``/``noise`` normalised latents."""

    image: torch.Tensor
    z0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    trajectory: Optional[torch.Tensor]  # decoded states [S, 3, H, W], or None
    trajectory_steps: list[int]


def sample_teacher(velocity: Any, codec: Any, cond: Any, seed: int, steps: int, width: int, height: int,
                   trajectory_previews: int = 0,
                   progress: Optional[Callable[[int, int, Optional[torch.Tensor]], None]] = None,
                   cancel_check: Optional[Callable[[], None]] = None) -> TeacherResult:
    """Sample one image with the teacher: FLUX.1-dev sigmas for the size, Euler steps from noise."""
    if width % PIXEL_MULTIPLE or height % PIXEL_MULTIPLE:
        raise ValueError(f"width and height must be multiples of {PIXEL_MULTIPLE} pixels (got {width}x{height})")
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    noise = seeded_noise(seed, height, width)
    tokens = (height // PIXEL_MULTIPLE) * (width // PIXEL_MULTIPLE)
    sigmas = flow.flux_sigmas(int(steps), tokens)
    wanted = set(preview_steps(int(steps), int(trajectory_previews)))
    states: dict[int, torch.Tensor] = {}

    def on_step(i: int, sigma: float, sigma_next: float, x: torch.Tensor, v: torch.Tensor) -> None:
        done = i + 1
        if done in wanted and done != steps:
            states[done] = x.detach().to("cpu", torch.float32)
        if progress is not None:  # the preview shows the image the step heads for, as a KSampler's does
            progress(done, int(steps), x - sigma_next * v)

    with torch.no_grad():  # as ComfyUI's inference mode: no autograd graph over 28 steps
        z0 = flow.euler_sample(velocity, noise, sigmas, cond, callback=on_step, cancel_check=cancel_check)
        z0 = z0.detach().float()
        if cancel_check is not None:
            cancel_check()
        image = codec.decode(z0).float().cpu()
        trajectory = None
        order = sorted(wanted)
        if order:
            frames = []
            for step in order:
                if cancel_check is not None:
                    cancel_check()
                frames.append(image if step == steps else codec.decode(states[step]).float().cpu())
            trajectory = torch.cat(frames, dim=0)
    return TeacherResult(image=image, z0=z0.cpu(), noise=noise, sigmas=sigmas, trajectory=trajectory,
                         trajectory_steps=order)


def teacher_pair_id(cond_key: str, seed: int, width: int, height: int, steps: int, guidance: float,
                    patches: str = "", weights: str = "full") -> str:
    """The pair id: the same conditioning, seed, size, steps and guidance (and, for a patched
    MODEL, the same patches: :func:`~.comfy_adapters.model_patches`; for quantised weights, the
    same storage: :func:`~.comfy_adapters.model_weight_storage`) give the same pair."""
    pid = f"c{cond_key}-s{int(seed)}-{int(width)}x{int(height)}-n{int(steps)}-g{float(guidance):g}"
    if patches:
        pid += f"-p{patches}"
    return pid if weights == "full" else f"{pid}-w{weights}"


def pair_id_for(core_cond: Any, seed: int, width: int, height: int, steps: int, patches: str = "",
                weights: str = "full") -> str:
    """:func:`teacher_pair_id` of a core conditioning (its content key)."""
    key = pairs.conditioning_key(core_cond.t5.reshape(-1, core_cond.t5.shape[-1]), core_cond.clip_pooled.reshape(-1))
    return teacher_pair_id(key, seed, width, height, steps, core_cond.guidance, patches, weights)


def check_same_teacher(folder: str, pair_id: str, teacher_model: str) -> None:
    """ValueError when ``folder`` already stores ``pair_id`` sampled by another teacher MODEL
    (:func:`~.comfy_adapters.teacher_model_fingerprint`): the id would be the same, so this
    MODEL's pair would silently not be stored. Pairs that record no fingerprint are not compared."""
    found = pairs.stored_record(folder, pair_id) if teacher_model else None
    if found is None or found[1] is None:
        return
    shard, record = found
    stored = record.get("teacher_model")
    if isinstance(stored, str) and stored and stored != teacher_model:
        raise ValueError(
            f"FluxSR teacher: pair {pair_id} in {folder} ({shard}) was sampled by another teacher MODEL (weights "
            f"fingerprint {stored}; this MODEL's is {teacher_model}: other weights, such as a fine-tune or "
            "FLUX.1-schnell, or a LoRA with other values): both give the same pair id, so this MODEL's pair would "
            "not be stored. Give this MODEL a dataset folder of its own")


def write_pair(folder: str, pid: str, result: TeacherResult, core_cond: Any, seed: int, steps: int,
               width: int, height: int, patches: tuple[int, str] = (0, ""),
               weights: str = "full", teacher_model: str = "") -> tuple[Optional[str], bool]:
    """Add the pair ``pid`` (:func:`pair_id_for`) to ``folder`` as one new shard; returns
    ``(shard, added)``.

    ``added`` False means the same pair was already stored (re-running a graph never duplicates
    pairs); ``shard`` is then the one holding it (None if no manifest lists it any more).
    ``patches``: :func:`~.comfy_adapters.model_patches` of the teacher MODEL, kept in the id and the metadata;
    ``weights``: its :func:`~.comfy_adapters.model_weight_storage`, recorded as ``teacher_weights`` (and in
    the id, when not ``full``); ``teacher_model``: its :func:`~.comfy_adapters.teacher_model_fingerprint`,
    recorded as ``teacher_model`` (compared by :func:`check_same_teacher`).
    """
    meta = {"seed": int(seed), "width": int(width), "height": int(height), "steps": int(steps),
            "guidance": float(core_cond.guidance), "sigmas": [float(s) for s in result.sigmas],
            "source": "ComfyUI FluxSRTeacherSampler", "teacher_weights": weights}
    if teacher_model:
        meta["teacher_model"] = teacher_model
    if patches[0]:
        meta.update(teacher_patched_weights=int(patches[0]), teacher_patches=patches[1])
    writer_id = ("comfyui-" + pairs.default_writer_id())[:100]
    # shard_size=1: add() writes the pair as its own shard at once (one shard per run).
    with pairs.PairWriter(folder, writer_id=writer_id, shard_size=1) as writer:
        # First, so a re-run restores a deleted or damaged cond file its stored pair needs (the
        # pair's id holds the conditioning's key); add() stores nothing for a stored pair.
        writer.store_conditioning(core_cond.t5, core_cond.clip_pooled)
        added = writer.add(pid, result.noise[0], result.z0[0], core_cond.t5, core_cond.clip_pooled,
                           meta=meta, image=result.image[0])
    found = pairs.stored_record(folder, pid)
    return (found[0] if found else None), added


# Folders (os.pathsep-separated) where datasets may go besides ComfyUI's output folder.
DATASET_ROOTS_ENV = "FLUXSR_DATASET_ROOTS"


def _within(root: str, path: str) -> bool:
    """Whether ``path`` lies in ``root`` (both real, absolute). ``relpath`` rather than
    ``commonpath``, which on Windows raises for a network share's root (``\\\\nas\\share``);
    both raise ValueError for paths on two drives, which are not within each other."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return False
    return rel != os.pardir and not rel.startswith(os.pardir + os.sep) and not os.path.isabs(rel)


def resolve_dataset_folder(folder: str) -> str:
    """The dataset folder as an absolute path: relative paths are inside ComfyUI's output folder.

    The result must lie inside the output folder or inside a folder named in the environment
    variable ``FLUXSR_DATASET_ROOTS``; anything else (an absolute path elsewhere, ``..`` out of
    the output folder, a link leading out) raises ValueError. Without this a shared workflow,
    or any client of a server started with ``--listen``, could write wherever ComfyUI may.
    """
    try:
        import folder_paths  # noqa: PLC0415 - ComfyUI's module
        base = folder_paths.get_output_directory()
    except ImportError:
        base = os.getcwd()
    path = os.path.realpath(os.path.join(base, os.path.expanduser(folder.strip())))
    roots = [base] + [r for r in os.environ.get(DATASET_ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    for root in roots:
        root = os.path.realpath(os.path.expanduser(root.strip()))
        if path == root:  # shards, manifests and locks would lie loose among the user's pictures
            raise ValueError(f"dataset folder {folder!r} is {path}, the allowed folder itself: name a folder inside "
                             f"it for the pairs (e.g. fluxsr_pairs)")
        if _within(root, path):
            return path
    raise ValueError(
        f"dataset folder {folder!r} is {path}, outside ComfyUI's output folder ({base}): give a path "
        f"inside it, or name the folder datasets may go to in the environment variable "
        f"{DATASET_ROOTS_ENV} (several separated by {os.pathsep!r}) before starting ComfyUI")


def _folder_identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "absent"
    return f"{st.st_dev}:{st.st_ino}"


# Per dataset folder: (the value IS_CHANGED gave, the folder identity that value stands for, the
# shards of the pairs that value's runs stored or found). The node's own first run creates the
# folder; that must not count as a change, or the next queue would sample again for nothing. The
# shards tell a folder deleted and made again from the one that was there: the new one may get the
# old one's inode (ext4 hands a freed inode out again at once). Only the node's process sees this;
# a restart empties ComfyUI's cache too.
_FOLDER_TOKENS: dict[str, tuple[str, str, tuple[str, ...]]] = {}
_FOLDER_TOKENS_LOCK = threading.Lock()
_TRACKED_SHARDS = 256  # per folder, the latest; an older pair's loss goes unnoticed (a rerun is harmless)


def dataset_folder_token(folder: str) -> str:
    """ComfyUI's IS_CHANGED value for ``folder``: ``"none"``, or a token that changes when the
    folder is deleted or replaced by another one, or loses a pair this node stored or found there,
    but not when this node created it or wrote into it."""
    if not folder or not folder.strip():
        return "none"
    try:
        path = resolve_dataset_folder(folder)
    except ValueError:  # refused folders are VALIDATE_INPUTS' to report
        return "refused"
    identity = _folder_identity(path)
    with _FOLDER_TOKENS_LOCK:
        known = _FOLDER_TOKENS.get(path)
        if known is not None and known[1] == identity and all(os.path.exists(os.path.join(path, shard))
                                                              for shard in known[2]):
            return known[0]
        token = f"{identity}#{uuid.uuid4().hex[:8]}"
        _FOLDER_TOKENS[path] = (token, identity, ())
        return token


def _folder_written(path: str, shard: Optional[str]) -> None:
    """After a run stored (or found) its pair in ``shard`` of ``path``: the folder it may have
    created keeps the queued token, and that shard's loss will change it."""
    with _FOLDER_TOKENS_LOCK:
        known = _FOLDER_TOKENS.get(path)
        if known is not None:
            shards = tuple(s for s in known[2] if s != shard) + ((shard,) if shard else ())
            _FOLDER_TOKENS[path] = (known[0], _folder_identity(path), shards[-_TRACKED_SHARDS:])


class FluxSRTeacherSampler:
    """FLUX.1-dev multi-step sampling of teacher pairs for FluxSR training."""

    DESCRIPTION = (
        "Samples an image with FLUX.1-dev (the teacher, without the FluxSR LoRA) using FluxSR's "
        "multi-step sampler: FLUX.1-dev's shifted sigma schedule and Euler steps from seeded "
        "noise. Outputs the image, its latent and a trajectory of decoded intermediate states. "
        "With a dataset folder set, the (noise, image latent) pair is added to that folder as "
        "one new shard, ready for fluxsr-train.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    # It writes pairs: a graph of it alone (dataset folder set, outputs unconnected) must run.
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "LATENT", "IMAGE")
    RETURN_NAMES = ("image", "latent", "trajectory")
    OUTPUT_TOOLTIPS = (
        "The teacher's image.",
        "Its latent (ComfyUI's raw VAE latent space).",
        "Decoded states after the chosen steps, oldest first (the last one is the image).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is part of the saved-workflow format: append new inputs at the end only.
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "FLUX.1-dev without the FluxSR LoRA (UNETLoader)."}),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "The prompt: CLIPTextEncode with FLUX's DualCLIPLoader (T5-XXL + CLIP-L), "
                               "guidance from FluxGuidance (3.5 when unset)."}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors), to decode the image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed; the pair id includes it, so a seed is stored once."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 200,
                                  "tooltip": "Euler steps of FLUX.1-dev's schedule (28 is FLUX's usual)."}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": PIXEL_MULTIPLE,
                                  "tooltip": "Image width in pixels (multiple of 16); FluxSR trains at 1024."}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": PIXEL_MULTIPLE,
                                   "tooltip": "Image height in pixels (multiple of 16)."}),
                "trajectory_previews": ("INT", {
                    "default": 4, "min": 0, "max": 64,
                    "tooltip": "How many evenly spaced steps to decode into the trajectory output "
                               "(each costs one VAE decode); 0 = none (the image alone)."}),
                "dataset_folder": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Pair-dataset folder to add the pair to (created if needed), inside "
                               "ComfyUI's output folder (relative paths start there) or inside a "
                               "folder listed in the environment variable FLUXSR_DATASET_ROOTS. "
                               "Empty: nothing is saved."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, dataset_folder="", **_):
        # ComfyUI re-runs a node only when an input or this value changes. A dataset folder that
        # was deleted (or replaced) since the last run must get its pair again, so the folder's
        # identity is part of the value; our own writes into it leave that identity alone, so
        # re-queueing an unchanged graph stays a cached no-op.
        return dataset_folder_token(dataset_folder)

    @classmethod
    def VALIDATE_INPUTS(cls, dataset_folder="", width=None, height=None):
        # at queue time, not after the models load (the size) or 28 steps of sampling (the
        # folder). The page's widgets step by 16, but a prompt sent to the API need not; ComfyUI
        # skips its own min/max checks for the inputs named here, so range_problem makes them.
        problem = range_problem(cls, {"width": width, "height": height})
        if problem is not None:
            return problem
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, int) and value % PIXEL_MULTIPLE:
                below = value // PIXEL_MULTIPLE * PIXEL_MULTIPLE
                return (f"{name} must be a multiple of {PIXEL_MULTIPLE} pixels (FLUX packs 2x2 latent pixels of 8 "
                        f"px into a token), got {value}: use {below} or {below + PIXEL_MULTIPLE}")
        if dataset_folder and dataset_folder.strip():
            try:
                resolve_dataset_folder(dataset_folder)
            except ValueError as exc:
                return str(exc)
        return True

    def sample(self, model, conditioning, vae, seed, steps, width, height, trajectory_previews=4,
               dataset_folder=""):
        velocity = comfy_adapters.make_velocity(model, teacher=True)
        codec = comfy_adapters.make_codec(vae, comfy_adapters.NO_VAE_TILING)
        core_cond = comfy_adapters.conditioning_to_core(conditioning)
        if dataset_folder and dataset_folder.strip() and len(conditioning) > 1:
            # the sampler averages the entries; a pair stores one conditioning, and would lie
            raise ValueError(f"FluxSR teacher: the conditioning has {len(conditioning)} entries (Conditioning "
                             "Combine?), which the sampler averages, but a pair stores one conditioning: connect "
                             "a single one to write pairs")
        latent_format = getattr(getattr(model, "model", None), "latent_format", None)
        progress = comfy_adapters.ComfyProgress(1, latent_format, getattr(model, "load_device", None))
        folder = resolve_dataset_folder(dataset_folder) if dataset_folder and dataset_folder.strip() else None
        patches = comfy_adapters.model_patches(model)
        if patches[0]:
            log.warning("FluxSR teacher: the MODEL carries patches on %d weights (a LoRA?); FluxSR's teacher is "
                        "plain FLUX.1-dev. Pairs from it are stored under their own ids (suffix -p%s).",
                        patches[0], patches[1])
        if comfy_adapters.has_no_guidance_embedding(model):
            log.warning("FluxSR teacher: %s. Pairs from it teach the student this model's images, not "
                        "FLUX.1-dev's.", comfy_adapters.NO_GUIDANCE_EMBEDDING_NOTE)
        storage = comfy_adapters.model_weight_storage(model)
        if storage != "full":
            log.warning("FluxSR teacher: the MODEL's weights are stored as %s, which changes the teacher's samples "
                        "(FluxSR distils FLUX.1-dev; fluxsr-train pairs refuses GGUF). Pairs from it record "
                        "teacher_weights %s and are stored under their own ids (suffix -w%s).", storage, storage, storage)
        teacher_model = pid = ""
        if folder is not None:  # before 28 steps of sampling, not after
            teacher_model = comfy_adapters.teacher_model_fingerprint(model)
            pid = pair_id_for(core_cond, int(seed), int(width), int(height), int(steps), patches[1], storage)
            check_same_teacher(folder, pid, teacher_model)
        result = sample_teacher(velocity, codec, conditioning, int(seed), int(steps), int(width), int(height),
                                int(trajectory_previews), progress=progress.for_item(0),
                                cancel_check=comfy_adapters.cancel_check)
        if folder is not None:
            shard, added = write_pair(folder, pid, result, core_cond, int(seed), int(steps), int(width),
                                      int(height), patches, storage, teacher_model)
            _folder_written(folder, shard)
            if added:
                log.info("FluxSR teacher: pair %s written to %s (%s)", pid, folder, shard)
            else:
                log.warning("FluxSR teacher: pair %s is already in %s; not written again (change the seed for "
                            "a new pair)", pid, folder)
        device = comfy_adapters.intermediate_device()
        image = images.bchw_to_bhwc(result.image).to(device)
        trajectory = images.bchw_to_bhwc(result.trajectory).to(device) if result.trajectory is not None else image
        latent = {"samples": denormalize(result.z0).to(device)}
        return (image, latent, trajectory)

"""Teacher pairs: the frozen FLUX teacher samples ``(eps, z_0)`` from text prompts (``fluxsr-train pairs``).

For every job (prompt, seed): ``eps ~ N(0, I)`` drawn on the CPU from the seed (so a pair is the
same on any device and in any process), ``z_0 = euler_sample(teacher, eps, flux_sigmas(steps))``
with :mod:`fluxsr_core.flow`'s sampler over :class:`fluxsr_core.models.DiffusersVelocity`, and,
optionally, the decoded teacher image and the trajectory. Pairs go through
:class:`fluxsr_core.pairs.PairWriter`, so a killed run restarts with only the missing pairs,
several processes share one folder, and conditionings are stored once per distinct prompt.

Conditioning per distinct prompt comes from local text encoders (CLIP-L and T5-XXL, encoded
as ``FluxPipeline`` does by :func:`fluxsr_core.bundle.encode_prompt_bundle`), or from one fixed
bundle file for every prompt (no T5 needed; the prompt is then only recorded). All of a run's
conditionings are encoded before the transformer loads and stored at once in the dataset
folder (``cond-<key>.safetensors``); sampling reads each back when its batch comes, so memory
does not grow with the number of prompts. An existing cond file is checked when its prompt is
encoded again, and a damaged one replaced; a rerun also encodes again the prompts of stored
pairs whose cond file is missing (deleted) or unreadable, so it restores them.

Distributed: under ``accelerate launch`` (or torchrun) process ``r`` of ``W`` takes the prompts
whose index ``i`` has ``i % W == r`` and writes as ``<writer_prefix>-rank<r>`` (a stable id, so
a restarted rank resumes its own files). Independent runs (SLURM array tasks, machines that
share a folder but no launcher) split the prompts with ``part = "K/N"``: run ``K`` takes the
prompts with ``i % N == K - 1`` (its ranks share those evenly) and writes as
``[<writer_prefix>-]part<K>of<N>-rank<r>`` (no machine name by default, so a rerun elsewhere
resumes it); without it, independent runs would each sample every
pair (never storing one twice, but doing the work N times).

Prompt files: ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (one object per line with
``"prompt"`` and optionally ``"seed"``); a prompt has at most :data:`MAX_PROMPT_CHARS`
characters. Seeds: a JSONL seed ``s`` gives pairs ``s, s+1, ...``; otherwise prompt ``i`` gets
``seed + i * pairs_per_prompt + j`` for its ``j``-th pair.
Pair ids are :func:`fluxsr_core.pairs.pair_id` ``(i, seed)``: they follow the prompt file's order,
so a rerun skips what is stored, and an edited prompt file (or another one written into the same
folder) is refused, not mixed in.

What else defines a pair is stored in its metadata (:func:`pair_recipe`: size, steps, guidance,
a fingerprint of the teacher's weights, the conditioning source, the T5 length, the compute dtype,
the teacher's weight storage, and the seed rule's ``pairs_per_prompt`` and ``seed``, which
change nearly every pair's seed), and a run that would add pairs made otherwise to a folder is
refused before anything loads, naming the setting. Several processes may write one folder: each
re-reads the others' manifests before every batch and skips (and never stores twice) pairs
another has stored meanwhile; its summary counts only the pairs it stored.

:func:`write_student_bundle` (``fluxsr-train bundle``) encodes the student's one fixed prompt with
the same text-encoder loading, for ``data.conditioning`` of ``fluxsr-train train``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch

from fluxsr_core import flow
from fluxsr_core.interfaces import Conditioning
from fluxsr_core.latents import LATENT_CHANNELS, PIXEL_MULTIPLE, VAE_DOWNSCALE
from fluxsr_core.pairs import PairWriter, conditioning_key, pair_id
from fluxsr_core.settings import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_T_L, RunSettings
from fluxsr_core.weights import weights_fingerprint

from . import config_io
from .config_io import ConfigError

log = logging.getLogger("fluxsr.pairs")


@dataclass
class GenerateConfig:
    """What ``fluxsr-train pairs`` does (TOML keys and ``--flags`` have these names).

    Teacher: ``transformer`` and ``vae`` (files or folders; ``"tiny"`` for the test models),
    ``dtype`` (``auto``: bf16 on GPU, fp32 on CPU), ``device``, ``memory_mode`` (none,
    model_offload, group_offload, fp8_storage, fp8_storage_all, auto). Conditioning: ``bundle`` (a fixed bundle for
    every prompt) or ``text_encoders`` (a FLUX pipeline folder with ``text_encoder``,
    ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``) and/or ``clip`` / ``t5`` folders holding
    model and tokenizer. Sampling: ``steps``, ``guidance``, ``height``, ``width`` (multiples of
    16), ``seed``, ``pairs_per_prompt``, ``batch_size``. Output: ``output`` folder,
    ``save_image``, ``save_trajectory``, ``shard_size``, ``writer_prefix``; ``limit`` stops each
    process after that many new pairs (0: no limit); ``part`` (``"K/N"``, K from 1 to N): this
    independent run's share of the prompts (see the module doc; empty: all of them).
    """

    transformer: str = ""
    vae: str = ""
    prompts: str = ""
    output: str = ""
    bundle: str = ""
    text_encoders: str = ""
    clip: str = ""
    t5: str = ""
    max_sequence_length: int = 512
    steps: int = 28
    guidance: float = DEFAULT_GUIDANCE
    height: int = 1024
    width: int = 1024
    seed: int = 0
    pairs_per_prompt: int = 1
    batch_size: int = 1
    save_image: bool = True
    save_trajectory: bool = False
    shard_size: int = 8
    writer_prefix: str = ""
    limit: int = 0
    part: str = ""
    dtype: str = "auto"
    device: str = "auto"
    memory_mode: str = "none"
    init_seed: int = 0
    fsync: bool = True
    progress_bar: bool = True


def load_generate_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> GenerateConfig:
    """:class:`GenerateConfig` from defaults, an optional TOML file and ``"key=value"`` overrides."""
    return config_io.load_config(GenerateConfig, path, overrides)


@dataclass(frozen=True)
class Job:
    """One pair to make: prompt number ``index`` sampled with ``seed``; ``line``: the prompt's
    line in its prompt file (1-based, blank lines counted; None when not from a file);
    ``own_seed``: its prompt gave its seeds (a JSONL ``"seed"``), so ``--seed`` plays no part."""

    index: int
    prompt: str
    seed: int
    line: Optional[int] = None
    own_seed: bool = False

    @property
    def pair_id(self) -> str:
        return pair_id(self.index, self.seed)

    @property
    def where(self) -> str:
        """Where its prompt is, for messages: ``"line <n>"`` (``"prompt <index + 1>"`` when not from a file)."""
        return f"line {self.line}" if self.line is not None else f"prompt {self.index + 1}"


@dataclass
class GenerateResult:
    """What :func:`generate_pairs` did in this process."""

    output: str
    writer_id: str
    rank: int
    world: int
    jobs: int          # jobs of this process
    skipped: int       # already stored (by any writer) before this run
    written: list[str] = field(default_factory=list)  # pair ids this process stored in this run
    # pair ids of this process's share that another writer stored during this run (not made again,
    # or made but not stored twice)
    made_by_others: list[str] = field(default_factory=list)
    stopped_by_limit: bool = False
    seconds: float = 0.0


# --- prompts -------------------------------------------------------------------------------

# The longest prompt accepted, in characters. Every pair stores its prompt in its shard's
# safetensors header, which safetensors limits to 100 MB, so a 13 MB line would fail only
# after sampling; and the encoders read far less (T5 512 tokens, a few thousand characters;
# CLIP 77 tokens): a longer line is a pasted file or a missing line break, not a prompt.
MAX_PROMPT_CHARS = 100_000


def _check_prompt_length(path: Path, line: int, prompt: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{path} line {line}: the prompt is {len(prompt):,} characters long, more than the "
                         f"{MAX_PROMPT_CHARS:,} accepted (every pair stores its prompt in its shard's safetensors "
                         "header, which is limited to 100 MB, and T5 reads only its first 512 tokens): shorten "
                         "the line, or split it if it holds several prompts")


class PromptLine(NamedTuple):
    """One prompt of a prompt file: its text, its seed (a JSONL ``"seed"``; None: the seed rule)
    and its line number in the file (1-based, blank lines counted), for messages naming it."""

    prompt: str
    seed: Optional[int] = None
    line: Optional[int] = None


def read_prompts(path: str | os.PathLike) -> list[PromptLine]:
    """``[PromptLine(prompt, seed or None, line)]`` from a ``.txt`` (one per non-empty line) or
    ``.jsonl`` file.

    ValueError naming the line for a line that is not usable (bad JSON, a prompt longer than
    :data:`MAX_PROMPT_CHARS`, ...).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    try:
        # utf-8-sig: a byte-order mark is not part of the first prompt
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                         "UTF-8") from None
    # Lines end at \n (and \r\n) only: str.splitlines would also split inside a prompt at
    # U+2028, NEL or form feed and shift every later prompt's index (and so its pair ids).
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[PromptLine] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p} line {n} is not JSON ({exc.msg}); each line must be an object like "
                                 '{"prompt": "a photo of ...", "seed": 3}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{p} line {n}: expected an object with a non-empty \"prompt\" string")
            seed = obj.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
                raise ValueError(f"{p} line {n}: \"seed\" must be an integer from 0 to 2**63 - 1 (got {seed!r})")
            _check_prompt_length(p, n, obj["prompt"].strip())
            out.append(PromptLine(obj["prompt"].strip(), seed, n))
    else:
        for n, line in enumerate(lines, start=1):
            if line.strip():
                _check_prompt_length(p, n, line.strip())
                out.append(PromptLine(line.strip(), None, n))
    if not out:
        raise ValueError(f"{p} holds no prompts")
    return out


def _stored_records(folder: str | os.PathLike, pair_ids: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
    """``{pair id: stored metadata}`` of the given pairs (all the folder's when None), from the
    shard headers only. A damaged or conflicting dataset raises its :class:`PairDataError`."""
    from fluxsr_core.pairs import PairDataset

    if not Path(folder).is_dir():
        return {}
    ds = PairDataset(folder, load_image=False)
    return ds.records(ds.ids if pair_ids is None else pair_ids)


# What a recipe key is set by, for the refusal's advice.
_RECIPE_FLAGS = {"height": "--height", "width": "--width", "steps": "--steps", "guidance": "--guidance",
                 "teacher_fingerprint": "--transformer", "vae_fingerprint": "--vae",
                 "teacher_weights": "--memory-mode", "dtype": "--dtype",
                 "conditioning": "--bundle / --text-encoders / --clip / --t5",
                 "max_sequence_length": "--max-sequence-length", "pairs_per_prompt": "--pairs-per-prompt",
                 "base_seed": "--seed"}
# Recipe keys that decide which seed each pair id gets (the seed rule).
_SEED_RULE_KEYS = ("pairs_per_prompt", "base_seed")


def _check_stored_pairs_match(cfg: GenerateConfig, recipe: Mapping[str, Any], stored: Sequence[Job],
                              records: Mapping[str, Mapping]) -> None:
    """ConfigError when this run would add to pairs made otherwise.

    ``records``: stored metadata by pair id. A pair of ``stored`` (a job this run skips as stored)
    made from another prompt means the prompt file was edited, or is another file (ids follow the
    prompts' order). Every pair made by ``fluxsr-train pairs`` (a ComfyUI graph's are left out)
    must match ``recipe`` (:func:`pair_recipe`) on each key it carries: older pairs lack the
    newer keys, which are then not compared.
    """
    for job in stored:
        rec = records.get(job.pair_id)
        if rec is not None and rec.get("prompt") is not None and rec["prompt"] != job.prompt:
            raise ConfigError(f"pair {job.pair_id} in {cfg.output} was made from the prompt {rec['prompt']!r}, but "
                              f"{job.where} of {cfg.prompts} is now {job.prompt!r} (ids follow the prompts' order, so "
                              "an edited prompt file, or another one, cannot add to this folder): append new prompts "
                              "at the end, or write to another --output")
    for pid, rec in records.items():
        if "prompt_index" not in rec:  # not made by fluxsr-train pairs (a ComfyUI graph's pair)
            continue
        differ = [k for k, v in recipe.items() if k in rec and not _same_value(rec[k], v)]
        if differ:
            names = {"teacher_fingerprint": (rec.get("teacher"), _teacher_name(cfg)),
                     "vae_fingerprint": (rec.get("vae"), _model_name(cfg.vae))}
            texts = [f"{k} {_shown(k, rec[k], names.get(k, ('', ''))[0])} (stored) vs "
                     f"{_shown(k, recipe[k], names.get(k, ('', ''))[1])} (now)" for k in differ]
            flags = ", ".join(dict.fromkeys(_recipe_flag(cfg, k) for k in differ))
            why = ("" if not set(differ) & set(_SEED_RULE_KEYS) else
                   ". Pair seeds follow --seed + prompt index x --pairs-per-prompt, so other values would make nearly "
                   "every pair again, some from another prompt's starting noise")
            raise ConfigError(f"pair {pid} in {cfg.output} was made with other settings: " + ", ".join(texts)
                              + f"; a folder holds pairs made one way ({flags}): resume with the settings of that "
                              "run, or write to another --output" + why)


def _shown(key: str, value: Any, name: Any) -> str:
    """A recipe value for a message; a model fingerprint with the model's name beside it."""
    return f"{value} of {name!r}" if key in ("teacher_fingerprint", "vae_fingerprint") and name else str(value)


def _recipe_flag(cfg: GenerateConfig, key: str) -> str:
    from fluxsr_core.models import RANDOM_INIT_NAMES

    model = {"teacher_fingerprint": cfg.transformer, "vae_fingerprint": cfg.vae}.get(key)
    if model is not None and str(model) in RANDOM_INIT_NAMES:  # a test model: its weights come from the seed
        return f"{_RECIPE_FLAGS[key]}, --init-seed"
    return _RECIPE_FLAGS.get(key, key)


def _same_value(stored: Any, now: Any) -> bool:
    if isinstance(now, (int, float)) and not isinstance(now, bool) and isinstance(stored, (int, float)):
        return float(stored) == float(now)
    return stored == now


# Seeds are stored and batched as 64-bit signed integers.
MAX_SEED = 2 ** 63 - 1


def make_jobs(prompts: Sequence[PromptLine | tuple], seed: int = 0, pairs_per_prompt: int = 1) -> list[Job]:
    """All jobs, in prompt order (see the module doc for the seed rule).

    ``prompts``: :func:`read_prompts`'s lines, or plain ``(prompt, seed or None)`` pairs.
    """
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be at least 1 (got {pairs_per_prompt})")
    jobs = []
    for i, entry in enumerate(prompts):
        prompt, s, line = PromptLine(*entry)
        first = s if s is not None else seed + i * pairs_per_prompt
        if first + pairs_per_prompt - 1 > MAX_SEED:
            raise ValueError(f"{Job(i, prompt, first, line).where} would get seeds past 2**63 - 1 (from {first}); use "
                             "a smaller --seed")
        jobs.extend(Job(i, prompt, first + j, line, own_seed=s is not None) for j in range(pairs_per_prompt))
    return jobs


def parse_part(part: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; ``""`` -> ``(1, 1)``. ConfigError otherwise."""
    if not part:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"part must be K/N with K from 1 to N, e.g. 1/4 (got {part!r}); a SLURM array of 0..N-1 "
                          "gives K as $((SLURM_ARRAY_TASK_ID + 1))")
    return int(m.group(1)), int(m.group(2))


def jobs_for_rank(jobs: Sequence[Job], rank: int, world: int, part: tuple[int, int] = (1, 1)) -> list[Job]:
    """This process's share: with ``part = (K, N)`` the jobs whose prompt index ``i`` has
    ``i % N == K - 1`` (this independent run's), and of those the ones whose ``i // N`` has
    ``(i // N) % world == rank``; by default ``i % world == rank``.

    Whole prompts go to one process, so each conditioning is encoded once. Each part is shared
    evenly and completely among its own ranks, whatever another part's process count.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    k, n = part
    return [j for j in jobs if j.index % n == k - 1 and (j.index // n) % world == rank]


def noise_for(seed: int, height: int, width: int) -> torch.Tensor:
    """The starting noise ``eps`` ``[16, H/8, W/8]`` of a pair: :func:`fluxsr_core.flow.seeded_noise`.

    The core's convention (CPU float32 draws from the seed alone), shared with the ComfyUI teacher
    node, so a seed means the same pair on any device, in any process and in both tools.
    """
    return flow.seeded_noise(int(seed), height, width, channels=LATENT_CHANNELS, downscale=VAE_DOWNSCALE)[0]


# --- conditioning --------------------------------------------------------------------------

def _stable_writer_prefix() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "host")[:80] or "host"


def text_encoder_paths(cfg: GenerateConfig) -> dict[str, tuple[Path, Path]]:
    """``{"clip": (model folder, tokenizer folder), "t5": (...)}`` from ``cfg.text_encoders`` (a
    FLUX pipeline folder) or ``cfg.clip`` / ``cfg.t5``; FileNotFoundError naming what is missing."""
    def where(explicit: str, sub_model: str, sub_tok: str) -> tuple[Path, Path]:
        if explicit:
            root = Path(explicit)
            model = root / sub_model if (root / sub_model / "config.json").is_file() else root
            tok = root / sub_tok if (root / sub_tok).is_dir() else model
            return model, tok
        root = Path(cfg.text_encoders)
        return root / sub_model, root / sub_tok

    paths = {"clip": where(cfg.clip, "text_encoder", "tokenizer"), "t5": where(cfg.t5, "text_encoder_2", "tokenizer_2")}
    for name, (model, tok) in paths.items():
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{name.upper()} text encoder not found at {model} (no config.json). Give "
                                    "--text-encoders <FLUX.1-dev folder with text_encoder/ and text_encoder_2/> "
                                    f"or --{name} <folder>; or use --bundle with fixed embeddings instead")
        if not tok.is_dir():
            raise FileNotFoundError(f"{name.upper()} tokenizer folder not found at {tok}")
    return paths


def load_text_encoders(cfg: GenerateConfig, dtype: torch.dtype, device: torch.device):
    """``(t5_encoder, t5_tokenizer, clip_encoder, clip_tokenizer)`` from local folders only
    (:func:`text_encoder_paths`)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    paths = text_encoder_paths(cfg)
    kw = dict(local_files_only=True, torch_dtype=dtype)
    try:
        clip = CLIPTextModel.from_pretrained(paths["clip"][0], **kw).to(device).eval()
        clip_tok = AutoTokenizer.from_pretrained(paths["clip"][1], local_files_only=True)
        t5 = T5EncoderModel.from_pretrained(paths["t5"][0], **kw).to(device).eval()
        t5_tok = AutoTokenizer.from_pretrained(paths["t5"][1], local_files_only=True)
    except OSError as exc:
        raise FileNotFoundError(f"could not load the text encoders from local files: {exc}") from None
    return t5, t5_tok, clip, clip_tok


# --- what defines a pair ---------------------------------------------------------------------

def _teacher_name(cfg: GenerateConfig) -> str:
    return _model_name(cfg.transformer)


def _model_name(value: Any) -> str:
    return os.path.basename(os.path.normpath(str(value)))


def teacher_fingerprint(cfg: GenerateConfig) -> str:
    """What identifies the teacher's weights (:func:`weights_fingerprint` of ``cfg.transformer``);
    a test model name built from a seed (``tiny``) is identified by that seed."""
    from fluxsr_core.models import TRANSFORMER_HELP_NO_GGUF

    return _model_fingerprint(cfg.transformer, cfg.init_seed, "transformer", TRANSFORMER_HELP_NO_GGUF)


def vae_fingerprint(cfg: GenerateConfig) -> str:
    """The same for ``cfg.vae``, which decodes the pairs' stored images (the latents owe it nothing)."""
    from fluxsr_core.models import VAE_HELP

    return _model_fingerprint(cfg.vae, cfg.init_seed, "VAE", VAE_HELP)


def _model_fingerprint(value: str, init_seed: int, what: str, advice: str) -> str:
    from fluxsr_core.models import RANDOM_INIT_NAMES
    from fluxsr_core.weights import WeightsNotFoundError

    path = Path(str(value)).expanduser()
    if path.exists():
        return weights_fingerprint(path)
    if str(value) in RANDOM_INIT_NAMES:
        return f"{value}:init_seed={init_seed}"
    raise WeightsNotFoundError(f"{what} not found: {path}. {advice}")


def _bundle_key(cfg: GenerateConfig) -> str:
    from fluxsr_core.bundle import load_bundle

    b = load_bundle(cfg.bundle)
    return conditioning_key(b.t5, b.clip_pooled)


def pair_recipe(cfg: GenerateConfig, dtype: torch.dtype, memory_mode: str) -> dict[str, Any]:
    """What defines this run's pairs besides prompt and seed, as stored in every pair's metadata
    and compared on a rerun: ``height``, ``width``, ``steps``, ``guidance``;
    ``teacher_fingerprint`` (:func:`teacher_fingerprint`); ``vae_fingerprint`` (:func:`vae_fingerprint`,
    when images are stored: they are its decodes); ``teacher_weights`` (``full``, or the
    fp8 memory mode that stores them in fp8, which changes the numbers; the offload modes do not);
    ``dtype`` (the compute dtype); ``conditioning`` (``bundle:<content key>``, or
    ``text-encoders:<fingerprint of both encoders and tokenizers>``) and, with text encoders,
    ``max_sequence_length`` (the T5 length); ``pairs_per_prompt`` and ``base_seed`` (``--seed``), which
    give each pair id its seed (a pair whose prompt has its own JSONL seed stores no ``base_seed``:
    :func:`pair_meta`). Cheap: no model is loaded (a few reads per file)."""
    if cfg.bundle:
        conditioning = f"bundle:{_bundle_key(cfg)}"
    elif cfg.text_encoders or (cfg.clip and cfg.t5):
        paths = text_encoder_paths(cfg)
        folders = dict.fromkeys(p for model_and_tokenizer in paths.values() for p in model_and_tokenizer)
        conditioning = "text-encoders:" + weights_fingerprint(*folders)
    else:
        raise ConfigError("no conditioning: give --bundle (fixed embeddings) or --text-encoders (local CLIP-L and "
                          "T5-XXL, e.g. the FLUX.1-dev folder), or --clip and --t5")
    recipe: dict[str, Any] = {"height": cfg.height, "width": cfg.width, "steps": cfg.steps, "guidance": cfg.guidance,
                              "teacher_fingerprint": teacher_fingerprint(cfg),
                              "teacher_weights": _teacher_weights(memory_mode),
                              "dtype": str(dtype).replace("torch.", ""), "conditioning": conditioning,
                              "pairs_per_prompt": cfg.pairs_per_prompt, "base_seed": cfg.seed}
    # Found before the output folder is made, stored images or not: the run loads the VAE either way.
    vae = vae_fingerprint(cfg)
    if cfg.save_image:  # the stored images are the VAE's decodes: another VAE, other images
        recipe["vae_fingerprint"] = vae
    if not cfg.bundle:
        recipe["max_sequence_length"] = cfg.max_sequence_length
    return recipe


def pair_meta(job: Job, recipe: Mapping[str, Any], sigmas: Sequence[float], teacher: str,
              vae: str = "") -> dict[str, Any]:
    """The metadata stored with ``job``'s pair: its seed, prompt and prompt index, the sigmas, the
    teacher's name (and the VAE's, when the recipe has its fingerprint) and the ``recipe`` (without
    ``base_seed`` when its prompt gave its own seeds: a rerun with another ``--seed`` does not
    change that pair)."""
    meta = {"seed": job.seed, "prompt": job.prompt, "prompt_index": job.index,
            "sigmas": [round(float(s), 8) for s in sigmas], "teacher": teacher, **recipe}
    if vae and "vae_fingerprint" in recipe:
        meta["vae"] = vae
    if job.own_seed:
        meta.pop("base_seed", None)
    return meta


def _stored_t5_lengths(folder: Path, records: Mapping[str, Mapping]) -> dict[int, str]:
    """``{T5 length: a pair id having it}`` of the stored pairs' conditionings (cond file headers
    only; a missing or unreadable one, restored by this run, is left out)."""
    from safetensors import safe_open

    lengths: dict[int, str] = {}
    seen: set[str] = set()
    for pid, rec in records.items():
        key = rec.get("cond")
        if not isinstance(key, str) or key in seen:
            continue
        seen.add(key)
        try:
            with safe_open(str(folder / f"cond-{key}.safetensors"), framework="pt") as f:
                shape = f.get_slice("t5").get_shape()
        except Exception:
            continue
        lengths.setdefault(int(shape[-2]) if len(shape) >= 2 else -1, pid)
    return lengths


def _check_t5_lengths(cfg: GenerateConfig, stored: Mapping[str, "StoredConditioning"], jobs: Sequence[Job],
                      records: Mapping[str, Mapping]) -> None:
    """ConfigError when this run's conditionings have another T5 length than the stored pairs'
    (the trainer cannot batch them); catches it for datasets older than the recipe keys too."""
    have = _stored_t5_lengths(Path(cfg.output), records)
    for job in jobs:
        length = stored[job.prompt].t5_shape[-2]
        if have and length not in have:
            old, pid = next(iter(have.items()))
            raise ConfigError(f"this run's T5 conditionings are {length} tokens long, but those of the pairs in "
                              f"{cfg.output} (e.g. {pid}) are {old}: the trainer cannot batch them together "
                              "(--max-sequence-length, or other text encoders or bundle, than the run that made "
                              "them): resume with the settings of that run, or write to another --output")


def _stored_teacher_weights(records: Mapping[str, Mapping]) -> Optional[tuple[str, str]]:
    """``(teacher_weights, pair id)`` of the first stored pair made by ``fluxsr-train pairs`` that
    records how the teacher's weights were stored, or None (a fresh folder, or older pairs)."""
    for pid, rec in records.items():
        if "prompt_index" in rec and isinstance(rec.get("teacher_weights"), str):
            return rec["teacher_weights"], pid
    return None


def _all_ranks(value: Any, world: int) -> list[Any]:
    """``value`` of every process, in rank order (a collective: every process must call it)."""
    if world == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _resolve_memory_mode(cfg: GenerateConfig, dtype: torch.dtype, device: torch.device,
                         world: int = 1) -> tuple[str, str]:
    """``(memory mode, reason)``: ``auto`` decided from the files' headers and free memory, before
    anything loads (the mode is part of the recipe when it stores the weights in fp8).

    ``auto`` must not make the recipe depend on how busy the GPU is: when ``cfg.output`` already
    holds pairs that record ``teacher_weights``, it keeps that (an fp8 mode as it was; ``full``:
    the fastest mode that does not store in fp8 and fits, else ``group_offload``). With several
    processes (a collective: each tells the others its choice) whose choices would store the
    weights differently, every one uses the mode the tightest of them needs, so all their pairs
    record the same ``teacher_weights``. The reason is logged when the models load.
    """
    from fluxsr_core import models

    if cfg.memory_mode != "auto":
        return cfg.memory_mode, "given"
    mode, reason = models.choose_memory_mode(cfg.transformer, cfg.vae, dtype, device)
    stored = _stored_teacher_weights(_stored_records(cfg.output))
    if stored is not None:
        weights, pid = stored
        made = f"the pairs in {cfg.output} were made with teacher_weights {weights} (e.g. {pid}), which this run keeps"
        if weights in models.FP8_MODES:
            mode, reason = weights, made
        elif mode in models.FP8_MODES:  # full weights, and `none` does not fit: the offload that keeps them whole
            mode, reason = "group_offload", f"{made}; {reason}, but {mode} stores them in fp8"
        else:
            reason = f"{reason}; {made}"
    choices = _all_ranks((mode, reason), world)
    if len({_teacher_weights(m) for m, _ in choices}) > 1:  # the ranks' pairs would differ: the tightest decides
        tightest, why = max(choices, key=lambda c: models.AUTO_ORDER.index(c[0]) if c[0] in models.AUTO_ORDER else -1)
        if tightest != mode:
            mode, reason = tightest, (f"rank {choices.index((tightest, why))} needs it ({why}), and all ranks store "
                                      "the teacher's weights alike so their pairs record the same teacher_weights")
    return mode, reason


def _teacher_weights(memory_mode: str) -> str:
    """How ``memory_mode`` stores the teacher's weights, as pairs record it (``teacher_weights``)."""
    from fluxsr_core.models import FP8_MODES

    return memory_mode if memory_mode in FP8_MODES else "full"


def encode_conditionings(cfg: GenerateConfig, prompts: Sequence[str], transformer_config, dtype: torch.dtype,
                         device: torch.device) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(prompt, t5 [1, L, D], clip_pooled [1, D])`` for each distinct prompt, one at a time (CPU tensors).

    A generator: a caller that stores each conditioning before taking the next holds one in
    memory, however many prompts there are. The encoders load at the first ``next()`` (a bad
    path fails there) and are freed after the last prompt. With ``cfg.bundle`` every prompt
    gets the bundle's (same) tensors.
    """
    from fluxsr_core.bundle import encode_prompt_bundle, load_bundle

    distinct = list(dict.fromkeys(prompts))
    if cfg.bundle:
        b = load_bundle(cfg.bundle)
        b.check_fits(transformer_config)
        t5_fixed, clip_fixed = b.t5.cpu(), b.clip_pooled.cpu()
        for p in distinct:
            yield p, t5_fixed, clip_fixed
        return
    if not (cfg.text_encoders or (cfg.clip and cfg.t5)):
        raise ConfigError("no conditioning: give --bundle (fixed embeddings) or --text-encoders (local CLIP-L and "
                          "T5-XXL, e.g. the FLUX.1-dev folder), or --clip and --t5")
    t5, t5_tok, clip, clip_tok = load_text_encoders(cfg, dtype, device)
    settings = RunSettings(guidance=cfg.guidance)
    try:
        for p in distinct:
            b = encode_prompt_bundle(p, t5, t5_tok, clip, clip_tok, settings,
                                     max_sequence_length=cfg.max_sequence_length, device="cpu")
            b.check_fits(transformer_config)
            yield p, b.t5, b.clip_pooled
            del b
    finally:
        # Free the encoders before sampling (T5-XXL alone is ~9 GB in bf16).
        del t5, clip
        if device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class StoredConditioning:
    """A prompt's conditioning stored in the dataset folder: its key and the T5 shape (for batching)."""

    key: str
    t5_shape: tuple[int, ...]


def store_conditionings(writer: PairWriter, cfg: GenerateConfig, prompts: Sequence[str], transformer_config,
                        dtype: torch.dtype, device: torch.device) -> dict[str, StoredConditioning]:
    """Encode the distinct ``prompts`` and store each in ``writer``'s folder as soon as it is made.

    Returns ``{prompt: StoredConditioning}``; only keys stay in memory, and
    :meth:`~fluxsr_core.pairs.PairWriter.load_conditioning` reads a conditioning back.
    """
    stored: dict[str, StoredConditioning] = {}
    last: Optional[tuple[torch.Tensor, torch.Tensor, StoredConditioning]] = None
    for prompt, t5, clip in encode_conditionings(cfg, prompts, transformer_config, dtype, device):
        if last is not None and last[0] is t5 and last[1] is clip:  # a bundle: hashed and stored once
            stored[prompt] = last[2]
            continue
        entry = StoredConditioning(writer.store_conditioning(t5, clip), tuple(t5.shape))
        stored[prompt] = entry
        last = (t5, clip, entry) if cfg.bundle else None
    return stored


def _conditionings_to_restore(writer: PairWriter, cfg: GenerateConfig, stored: Sequence[Job],
                               records: Mapping[str, Mapping]) -> dict[str, str]:
    """``{prompt: key}`` for the already-stored pairs of ``stored`` whose conditioning file is
    missing (deleted) or visibly damaged (unreadable, truncated): their prompts are encoded
    again so the pairs can be read. Reads cond file headers only, so a resume stays cheap."""
    restore: dict[str, str] = {}
    checked: set[str] = set()
    for job in stored:
        key = (records.get(job.pair_id) or {}).get("cond")
        if not isinstance(key, str) or key in checked:
            continue
        checked.add(key)
        problem = writer.conditioning_problem(key, full=False)
        if problem is not None:
            log.warning("conditioning file cond-%s.safetensors, needed by stored pairs of %s of %s, is not usable "
                        "(%s); encoding that prompt again to restore it", key, job.where, cfg.prompts, problem)
            restore[job.prompt] = key
    return restore


# --- sampling ------------------------------------------------------------------------------

def check_generate_config(cfg: GenerateConfig) -> None:
    """Raise :class:`ConfigError` naming the first unusable value."""
    for name in ("transformer", "vae", "prompts", "output"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required (--{name.replace('_', '-')})")
    if cfg.height <= 0 or cfg.width <= 0 or cfg.height % PIXEL_MULTIPLE or cfg.width % PIXEL_MULTIPLE:
        raise ConfigError(f"height and width must be positive multiples of {PIXEL_MULTIPLE} "
                          f"(got {cfg.height}x{cfg.width})")
    for name in ("steps", "pairs_per_prompt", "batch_size", "shard_size", "max_sequence_length"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    config_io.refuse_gguf(cfg.transformer, "transformer", "the teacher whose samples the student learns")
    parse_part(cfg.part)
    if cfg.limit < 0 or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"limit must be >= 0 and seed from 0 to 2**63 - 1 (got limit {cfg.limit}, seed {cfg.seed})")
    if not cfg.guidance > 0:
        raise ConfigError(f"guidance must be positive (got {cfg.guidance})")
    from fluxsr_core.models import MEMORY_MODES

    if cfg.memory_mode not in ("auto",) + tuple(MEMORY_MODES):
        raise ConfigError(f"memory_mode {cfg.memory_mode!r} is not one of auto, {', '.join(MEMORY_MODES)}")


def sample_batch(velocity, jobs: Sequence[Job], conds: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 cfg: GenerateConfig, device: torch.device, keep_trajectory: bool = False):
    """Run the teacher for ``jobs`` together; returns ``(eps, z0, trajectory or None, sigmas)`` on CPU.

    The trajectory is the latent after every Euler step, ``[B, steps, 16, h, w]`` (its last
    entry is ``z_0``); ``sigmas`` the schedule used (``steps + 1`` values).
    """
    eps = torch.stack([noise_for(j.seed, cfg.height, cfg.width) for j in jobs])
    h, w = eps.shape[-2:]
    sigmas = flow.flux_sigmas(cfg.steps, (h // 2) * (w // 2))
    t5 = torch.cat([conds[j.prompt][0] for j in jobs])
    clip = torch.cat([conds[j.prompt][1] for j in jobs])
    cond = Conditioning(t5=t5.to(device), clip_pooled=clip.to(device), guidance=cfg.guidance)
    states: list[torch.Tensor] = []

    def keep(i, s, s_next, x, v):
        states.append(x.detach().to("cpu", torch.float32))

    with torch.no_grad():
        z0 = flow.euler_sample(velocity, eps.to(device), sigmas, cond, callback=keep if keep_trajectory else None)
    traj = torch.stack(states, dim=1) if keep_trajectory else None
    return eps, z0.detach().to("cpu", torch.float32), traj, sigmas


def _batches(jobs: Sequence[Job], t5_shapes: Mapping[str, tuple[int, ...]], size: int) -> list[list[Job]]:
    """Consecutive jobs grouped up to ``size``, never mixing conditionings of different shapes."""
    out: list[list[Job]] = []
    for j in jobs:
        if out and len(out[-1]) < size and t5_shapes[out[-1][0].prompt] == t5_shapes[j.prompt]:
            out[-1].append(j)
        else:
            out.append([j])
    return out


def _read_back(writer: PairWriter, stored: StoredConditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored conditioning as ``(t5 [1, L, D], clip_pooled [1, D])``, as it was encoded."""
    t5, clip = writer.load_conditioning(stored.key)
    return t5[None], clip[None]


def generate_pairs(cfg: GenerateConfig, on_pair: Optional[Callable[[str], None]] = None) -> GenerateResult:
    """Make the missing teacher pairs of this process's share of the prompts; see the module doc.

    ``on_pair(pair_id)`` is called after each pair is handed to the writer (progress; raising
    from it stops the run, keeping the pairs already made). Returns a :class:`GenerateResult`.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from fluxsr_core import models

    check_generate_config(cfg)
    t0 = time.time()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or cfg.device == "cpu")
    rank, world = state.process_index, state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world == 1:
        raise ConfigError(f"{launched} processes were launched but accelerate runs them unconnected, so each would "
                           "take every prompt. On CPUs set ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 accelerate "
                           "launch --multi_gpu --num_processes 2 ...`)")
    if cfg.device == "auto":
        dev = state.device if state.device.type != "cpu" else torch.device("cpu")
    else:
        dev = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, dev)

    all_jobs = make_jobs(read_prompts(cfg.prompts), cfg.seed, cfg.pairs_per_prompt)
    ids = [j.pair_id for j in all_jobs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"pair id {dup} occurs twice; give distinct seeds")
    part = parse_part(cfg.part)
    mine = jobs_for_rank(all_jobs, rank, world, part)
    # Before the output folder is made: a bad bundle, encoder or transformer path fails here.
    memory_mode, mode_reason = _resolve_memory_mode(cfg, dtype, dev, world)
    recipe = pair_recipe(cfg, dtype, memory_mode)
    # A part's id is its own (two parts on one machine must not take each other's lock) and, by
    # default, without the machine's name: a rerun of a SLURM array task lands on another node
    # and must resume the same writer (its temporary files, its unlisted shard).
    if part[1] > 1:
        writer_id = f"{cfg.writer_prefix + '-' if cfg.writer_prefix else ''}part{part[0]}of{part[1]}-rank{rank}"
    else:
        writer_id = f"{cfg.writer_prefix or _stable_writer_prefix()}-rank{rank}"

    with PairWriter(cfg.output, writer_id=writer_id, shard_size=cfg.shard_size, fsync=cfg.fsync) as writer:
        pending_ids = set(writer.pending([j.pair_id for j in mine]))
        done = [j for j in mine if j.pair_id not in pending_ids]
        records = _stored_records(cfg.output)
        # every stored pair of the prompt file, not only this share's: another part (or rank) may
        # have stored a line that this run's file now reads otherwise
        _check_stored_pairs_match(cfg, recipe, [j for j in all_jobs if j.pair_id in records], records)
        restore = _conditionings_to_restore(writer, cfg, done, records)
        todo = [j for j in mine if j.pair_id in pending_ids]
        if cfg.limit:
            todo = todo[:cfg.limit]
        result = GenerateResult(output=str(cfg.output), writer_id=writer_id, rank=rank, world=world,
                                jobs=len(mine), skipped=len(mine) - len(pending_ids))
        log.info("rank %d/%d (%s)%s: %d pairs assigned, %d already stored, %d to make now", rank, world,
                 writer_id, f", part {part[0]} of {part[1]}" if part[1] > 1 else "", len(mine), result.skipped,
                 len(todo))
        if todo or restore:
            # The conditionings first, against the config read off the transformer's header: a bad
            # encoder path fails before the 12B load, and the encoders are freed before it (T5-XXL
            # and the transformer never share the GPU). Each goes to disk as soon as it is made,
            # into the content-addressed cond files the pairs need anyway (written atomically,
            # create-if-absent, so a rerun or another rank reuses them; a damaged one is
            # replaced), and only its key stays in memory: held in RAM they would be 4 MiB per
            # prompt, 40 GB for 10,000.
            stored = store_conditionings(writer, cfg, [j.prompt for j in todo] + list(restore),
                                         models.transformer_config_of(cfg.transformer), dtype, dev)
            for prompt, key in restore.items():
                if stored[prompt].key != key:
                    log.warning("cond-%s.safetensors could not be restored: its prompt now encodes to %s (other text "
                                "encoders, max_sequence_length or bundle than the run that made its pairs?)",
                                key, stored[prompt].key)
            _check_t5_lengths(cfg, stored, todo, records)
        if todo:
            # The VAE is small next to the transformer; loading it always keeps one code path.
            loaded = models.load_models(cfg.transformer, cfg.vae, memory_mode, dtype, dev, seed=cfg.init_seed)
            if mode_reason != "given":
                log.info("memory mode %s (auto: %s)", memory_mode, mode_reason)
            transformer, vae = loaded.transformer, loaded.vae
            velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype, device=dev)
            codec = models.DiffusersCodec(vae, compute_dtype=dtype) if cfg.save_image else None
            teacher = _teacher_name(cfg)
            progress = None
            if cfg.progress_bar and state.is_local_main_process:
                from tqdm.auto import tqdm

                progress = tqdm(total=len(todo), desc=f"pairs (rank {rank})", unit="pair", dynamic_ncols=True)
            conds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            try:
                for batch in _batches(todo, {p: s.t5_shape for p, s in stored.items()}, cfg.batch_size):
                    kept = _drop_jobs_stored_by_others(writer, cfg, recipe, batch, result)
                    if progress is not None and len(kept) < len(batch):
                        progress.update(len(batch) - len(kept))
                    batch = kept
                    if not batch:
                        continue
                    # This batch's conditionings only (kept from the last batch when a prompt spans both).
                    conds = {p: conds[p] if p in conds else _read_back(writer, stored[p])
                             for p in dict.fromkeys(j.prompt for j in batch)}
                    eps, z0, traj, sigmas = sample_batch(velocity, batch, conds, cfg, dev, cfg.save_trajectory)
                    imgs = None
                    if codec is not None:
                        with torch.no_grad():
                            imgs = codec.decode(z0.to(dev)).float().cpu()
                    for k, job in enumerate(batch):
                        meta = pair_meta(job, recipe, sigmas, teacher, _model_name(cfg.vae))
                        added = writer.add(job.pair_id, eps[k], z0[k], conds[job.prompt][0], conds[job.prompt][1],
                                           meta=meta, image=None if imgs is None else imgs[k],
                                           trajectory=None if traj is None else traj[k])
                        if not added:  # a flush in this batch found it stored by another writer meanwhile
                            _check_stored_pairs_match(cfg, recipe, [job], _stored_records(cfg.output, [job.pair_id]))
                            result.made_by_others.append(job.pair_id)
                        if progress is not None:
                            progress.update(1)
                        if on_pair is not None:
                            on_pair(job.pair_id)
            finally:
                if progress is not None:
                    progress.close()
        result.stopped_by_limit = bool(cfg.limit) and len(pending_ids) > len(todo)
    # After the writer closed (its last shard is written): what it stored, and what it had made
    # but did not store because another writer stored the same pairs first.
    result.written = list(writer.written_ids)
    result.made_by_others.extend(writer.stored_by_others)
    result.seconds = time.time() - t0
    log.info("rank %d: wrote %d pairs to %s in %.1f s", rank, len(result.written), cfg.output, result.seconds)
    return result


def _drop_jobs_stored_by_others(writer: PairWriter, cfg: GenerateConfig, recipe: Mapping[str, Any],
                                batch: Sequence[Job], result: GenerateResult) -> list[Job]:
    """The jobs of ``batch`` no writer has stored yet (the manifests are read again). Another
    writer's pair under one of their ids must be the same pair (ConfigError otherwise, as at the
    start); those jobs are skipped and listed in ``result.made_by_others``."""
    fresh = set(writer.pending([j.pair_id for j in batch]))
    taken = [j for j in batch if j.pair_id not in fresh]
    if taken:
        _check_stored_pairs_match(cfg, recipe, taken, _stored_records(cfg.output, [j.pair_id for j in taken]))
        result.made_by_others.extend(j.pair_id for j in taken)
        log.info("%d pairs of this batch were stored meanwhile by another writer; skipped", len(taken))
    return [j for j in batch if j.pair_id in fresh]


# --- the student's conditioning bundle (fluxsr-train bundle) ---------------------------------

@dataclass
class StudentBundleResult:
    """What :func:`write_student_bundle` wrote."""

    path: str
    prompt: str
    t5_shape: tuple[int, ...]
    clip_shape: tuple[int, ...]
    dtype: str
    settings: RunSettings
    notes: list[str] = field(default_factory=list)  # e.g. "prompt truncated to 512 T5 tokens"


def read_single_prompt(path: str | os.PathLike) -> str:
    """The one prompt of a prompt file (``.txt`` or ``.jsonl``, read as :func:`read_prompts` does);
    ValueError when it holds more than one (the student runs with ONE fixed prompt)."""
    lines = read_prompts(path)
    if len(lines) > 1:
        where = ", ".join(str(p.line) for p in lines[:5]) + (", ..." if len(lines) > 5 else "")
        raise ValueError(f"{path} holds {len(lines)} prompts (lines {where}); the student runs with one fixed prompt: "
                         "put that one alone in a file, or pass it with --prompt")
    return lines[0].prompt


def write_student_bundle(output: str | os.PathLike, prompt: str, *, text_encoders: str = "", clip: str = "",
                         t5: str = "", max_sequence_length: int = 512, guidance: float = DEFAULT_GUIDANCE,
                         t_l: float = DEFAULT_T_L, scale: float = DEFAULT_SCALE, dtype: str = "auto",
                         device: str = "auto", overwrite: bool = False) -> StudentBundleResult:
    """Encode the student's fixed ``prompt`` into a conditioning bundle file (``fluxsr-train bundle``).

    The text encoders load as for ``fluxsr-train pairs`` (:func:`load_text_encoders`: ``text_encoders``
    a FLUX pipeline folder, or ``clip`` and ``t5`` folders) and encode as diffusers' FluxPipeline does
    (:func:`fluxsr_core.bundle.encode_prompt_bundle`). The file carries the prompt and the run
    settings (``t_l``, ``guidance``, ``scale``) in its metadata; give it to the trainer as
    ``data.conditioning``. It is written under a temporary name and then linked into place, so it
    is never half-written; an existing ``output`` is refused (before the encoders load) unless
    ``overwrite``. ConfigError / ValueError / FileNotFoundError name what is wrong.
    """
    from fluxsr_core import models
    from fluxsr_core.bundle import encode_prompt_bundle, save_bundle

    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"-o {out}: a conditioning bundle is a .safetensors file (e.g. student_bundle.safetensors)")
    if out.is_dir():
        raise ConfigError(f"-o {out} is a folder; give the bundle file's name "
                          f"(e.g. {out / 'student_bundle.safetensors'})")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or give another -o")
    prompt = (prompt or "").strip()
    if not prompt:
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-file FILE")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"the prompt is {len(prompt):,} characters long, more than the {MAX_PROMPT_CHARS:,} accepted")
    if max_sequence_length < 1 or not guidance > 0 or not scale > 0:
        raise ConfigError(f"max_sequence_length must be at least 1 and guidance and scale positive (got "
                          f"{max_sequence_length}, {guidance}, {scale})")
    if not (text_encoders or (clip and t5)):
        raise ConfigError("no text encoders: give --text-encoders (a FLUX.1-dev folder with text_encoder/ and "
                          "text_encoder_2/), or --clip and --t5")
    label = "fluxsr-train bundle"
    settings = RunSettings(t_l=t_l, guidance=guidance, scale=scale,
                           source={"t_l": label, "guidance": label, "scale": label})
    cfg = GenerateConfig(text_encoders=text_encoders, clip=clip, t5=t5, max_sequence_length=max_sequence_length)
    text_encoder_paths(cfg)  # a missing folder fails here, with its message
    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    encoders = load_text_encoders(cfg, torch_dtype, dev)
    try:
        b = encode_prompt_bundle(prompt, *encoders, settings, max_sequence_length=max_sequence_length, device="cpu")
    finally:
        del encoders
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_bundle(tmp, b.t5, b.clip_pooled, settings, prompt=prompt)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # create-if-absent: a file made meanwhile is never replaced
            except FileExistsError:
                raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or give another -o") from None
            except OSError:  # no hard links on this file system
                if out.exists():
                    raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or give another "
                                      "-o") from None
                os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return StudentBundleResult(path=str(out), prompt=prompt, t5_shape=tuple(b.t5.shape),
                               clip_shape=tuple(b.clip_pooled.shape), dtype=str(b.t5.dtype).replace("torch.", ""),
                               settings=settings, notes=[n for n in b.report[1:]])


__all__ = ["GenerateConfig", "GenerateResult", "Job", "load_generate_config", "read_prompts", "make_jobs",
           "noise_for", "jobs_for_rank", "parse_part", "sample_batch", "generate_pairs", "check_generate_config", "load_text_encoders",
           "encode_conditionings", "store_conditionings", "StoredConditioning", "PromptLine",
           "MAX_PROMPT_CHARS", "text_encoder_paths", "weights_fingerprint", "teacher_fingerprint", "pair_recipe",
           "pair_meta",
           "write_student_bundle", "read_single_prompt", "StudentBundleResult"]

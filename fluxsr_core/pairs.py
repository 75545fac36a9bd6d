"""The pair dataset: teacher (noise, image-latent) pairs on disk, written and read safely.

A pair dataset is a folder shared by every process that adds to it (``accelerate`` ranks of
``fluxsr-train pairs``, a ComfyUI graph with the teacher-sampler node) and by the trainer that
reads it. Its layout::

    folder/
      shard-<writer_id>-<seq:06d>.safetensors   immutable; up to ``shard_size`` pairs each
      cond-<key>.safetensors                    one per distinct conditioning (t5, clip_pooled)
      manifest-<writer_id>.jsonl                append-only; one line per COMPLETE shard
      .lock-<writer_id>                         held while a writer with that id is alive
      quarantine/                               shards and cond files set aside by drop_bad_shards

Shard tensors, per pair ``i`` of the shard: ``"<i>.eps"`` and ``"<i>.z0"`` ``[16, h, w]`` in the
normalised latent space (``h``, ``w`` even: FLUX packs 2x2 latent patches), optional
``"<i>.image"`` (uint8 ``[3, 8h, 8w]``, the teacher's decoded image) and ``"<i>.trajectory"``
(``[S, 16, h, w]``); :class:`PairWriter` refuses other sizes. The shard's safetensors metadata holds
``fluxsr.pairs`` = a JSON list with one object per pair: ``id``, ``cond`` (the conditioning
key) and the caller's metadata (seed, resolution, prompt, steps, guidance, sigmas, ...).

Why it is safe to kill, resume and share:

* A shard is written to ``<name>.tmp``, fsync'd, renamed with :func:`os.replace` (atomic) and
  the folder fsync'd; only then is its manifest line appended. A reader trusts manifests only,
  so it never sees a half-written shard. A finished shard is never opened for writing again:
  a resumed writer numbers new shards after every shard of its own that exists on disk.
* Each writer appends to its own manifest and writes shards under its own name, so no file is
  shared between writers. Conditioning files are content-addressed and created only if absent
  (``os.link`` fails on an existing name), so two writers racing on the same prompt never
  rewrite a whole one.
* Before writing a shard a writer re-reads every manifest: a buffered pair another writer has
  stored meanwhile is not stored twice when it is the same pair (same metadata: prompt, seed,
  settings), and is refused (:class:`PairConflictError`) when that id holds another pair. Two
  copies of an id left by a race are told apart the same way by readers: a duplicate is read
  once, a conflict is an error (:func:`verify_pairs`, :class:`PairDataset`).
* A writer killed between the rename and the manifest append leaves a complete shard that no
  manifest names; the next writer with the same id checks and adopts it (appends its line).
  A killed writer's ``.tmp`` files are removed by the next writer with the same id and are
  ignored by everyone else. A manifest line torn by a kill is skipped by readers (its shard is
  adopted instead), and the resumed writer starts a fresh line after it.
* A conditioning file that already exists is checked when a writer stores the same
  conditioning again (its tensors read and hashed): a damaged one (unreadable, or other content
  than its name says) is replaced atomically with the content in hand, which is safe because the
  name is the content's hash (two writers replacing it at once write the same bytes).
* Every manifest line carries the shard's sha256 and size: :func:`verify_pairs` and
  :class:`PairDataset` detect truncated or corrupted shards and name them.
  :func:`drop_bad_shards` (``fluxsr-train verify DIR --drop-bad``) takes them out of their
  writers' manifests (atomically, under each writer's lock) and moves them to ``quarantine/``;
  the writer then makes those pairs again. A shard the system cannot read (permission denied,
  EIO: the problem ``io-error``) is reported, never a traceback, and left in place: it may be
  whole, and the fix is the disk or the permissions.
* A failed write (no space left on device, ...) raises one :class:`PairWriteError` naming the
  file; its temporary file is removed, and the writer stops there (it neither retries nor
  writes its buffer on close). The complete shards are kept; a rerun with the same writer id
  adopts a shard that was renamed before its manifest line failed, and goes on. Opening a
  writer fails the same way when the folder or the lock file cannot be made, and removes the
  (empty) folders it made. A lock file left behind never blocks anyone: the OS lock on it,
  released when its process ends, is what marks a writer id as taken.
* A shard's header holds every pair's metadata (prompt included), and safetensors refuses
  headers over :data:`SAFETENSORS_MAX_HEADER_BYTES`: a shard is started early when the next
  pair would not fit, and one pair that alone would not fit is refused when added.

Writer ids must be unique among writers running at the same time (a lock file enforces it);
to resume a killed run, start the new writer with the same id (e.g. ``<host>-rank<r>``).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .files import fsync_dir
from .latents import PATCH, PIXEL_MULTIPLE, VAE_DOWNSCALE

logger = logging.getLogger(__name__)

PAIRS_FORMAT = "1"
META_KEY_FORMAT = "fluxsr.pairs.format"
META_KEY_PAIRS = "fluxsr.pairs"
META_KEY_COND = "fluxsr.cond"

_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The sequence number is always the last 6+ digits, so ``.+`` for the writer id is unambiguous.
_SHARD_RE = re.compile(r"^shard-(?P<writer>.+)-(?P<seq>\d{6,})\.safetensors$")
_SHARD_TMP_RE = re.compile(r"^shard-(?P<writer>.+)-(?P<seq>\d{6,})\.safetensors\.tmp$")
_COND_TMP_RE = re.compile(r"^cond-(?P<key>[0-9a-f]+)\.safetensors\.(?P<writer>.+)\.tmp$")
_MANIFEST_RE = re.compile(r"^manifest-(?P<writer>.+)\.jsonl$")
COND_KEY_LENGTH = 16  # hex characters of sha256: 64 bits, ample for the prompts of one dataset
# safetensors refuses to write or read a file whose JSON header is larger (MAX_HEADER_SIZE in
# its Rust core). A shard's header holds the tensor entries and every pair's metadata record.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
_TENSOR_ENTRY_MAX_BYTES = 256  # one tensor's header entry: name, dtype, shape, data offsets
_HEADER_FIXED_BYTES = 1024     # braces, the format key, alignment padding


def _no_dataset_folder(folder: Path) -> str:
    if folder.exists():
        return f"pair dataset folder {folder} is a file, not a folder (give the folder fluxsr-train pairs wrote)"
    return f"pair dataset folder {folder} does not exist"


class PairDataError(ValueError):
    """A pair dataset is damaged (missing, truncated or corrupted shard) or used wrongly."""


class WriterBusyError(RuntimeError):
    """Another live process already writes with this writer id."""


class PairConflictError(PairDataError):
    """One pair id stands for two different pairs (another prompt, seed or setting): two writers
    gave the same ids to different work, e.g. two prompt files writing one folder."""


class PairWriteError(PairDataError, OSError):
    """Writing to a pair dataset failed (e.g. no space left on device); names the file.

    An :class:`OSError` (``errno``, ``strerror`` and ``filename`` of the failed write) and, as a
    :class:`PairDataError`, a ``ValueError``, so tools that report bad input as a message report
    this one too. Nothing is left half-written under a final name; the complete shards are kept.
    """

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ...: 'file'"
        return str(self.args[0]) if self.args else ""


def _write_error(path: Path, cause: OSError) -> PairWriteError:
    """The :class:`PairWriteError` for ``cause`` (an OSError) raised while writing ``path``."""
    if cause.errno == errno.ENOSPC:
        what, fix = "no space left on device", "free space"
    elif cause.errno == getattr(errno, "EDQUOT", None):
        what, fix = "disk quota exceeded", "free space (or raise the quota)"
    else:
        what, fix = f"{cause.strerror or cause}", "fix that"
    err = PairWriteError(f"{what} writing {path}; {fix} and run the same command again: the finished pairs are kept")
    err.errno, err.strerror, err.filename = cause.errno, cause.strerror, str(path)
    return err


# --- small helpers ------------------------------------------------------------------------

def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders this call created,
    innermost first. A failure raises :class:`PairWriteError` naming the folder it could not
    make, after removing the ones made so far."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty_folders(missing)
        raise _write_error(Path(exc.filename) if exc.filename else folder, exc) from exc
    return missing


def _remove_empty_folders(folders: Sequence[Path]) -> None:
    """rmdir each of ``folders`` (innermost first), keeping any that is not empty: another
    writer may have put its files there meanwhile."""
    for p in folders:
        try:
            p.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty: its parents are not empty either


def pair_id(prompt_index: int, seed: int) -> str:
    """The conventional pair id for prompt number ``prompt_index`` sampled with ``seed``.

    Zero-padded so ids sort in prompt order even as plain strings.
    """
    return f"p{int(prompt_index):06d}-s{int(seed)}"


def default_writer_id() -> str:
    """``<hostname>-<pid>[-rank<r>]``: unique among running processes.

    A run that wants to resume after a kill should pass a *stable* id instead (e.g.
    ``<hostname>-rank<r>``): the pid changes on restart, so leftovers of the killed process
    (its temporary files) are only cleaned up by a writer with the same id.
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "host") or "host"
    wid = f"{host}-{os.getpid()}"
    rank = os.environ.get("RANK")
    if rank is not None and rank.isdigit():
        wid += f"-rank{rank}"
    return wid[:100]


def _check_writer_id(writer_id: str) -> str:
    if not isinstance(writer_id, str) or not _WRITER_ID_RE.match(writer_id):
        raise ValueError(
            f"writer_id {writer_id!r} is not usable in file names: use 1-100 characters from "
            "letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(e.g. 'myhost-rank0')"
        )
    return writer_id


def _natural_key(s: str) -> tuple:
    """Sort key comparing digit runs as numbers ("s9" before "s10")."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p)


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _write_file_durably(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _jsonable(value: Any, where: str) -> Any:
    """Turn tensors/numpy values into JSON types; reject anything JSON cannot carry."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist") and type(value).__module__.startswith("numpy"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"pair metadata {where} is {value}; JSON cannot store it")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(
        f"pair metadata {where} has type {type(value).__name__}, which JSON cannot store; "
        "pass strings, numbers, lists or dicts"
    )


def _record_header_bytes(record: Mapping[str, Any]) -> int:
    """Bytes a pair's metadata record takes in a shard header: JSON (ASCII) inside a JSON string,
    plus the list separator."""
    return len(json.dumps(json.dumps(record, ensure_ascii=True))) + 2


def _unbatch(t: torch.Tensor, ndim: int, name: str, shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.ndim == ndim + 1 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {shape_doc} (one pair, no batch), got shape {tuple(t.shape)}")
    return t.detach().to("cpu").contiguous()


def _px(shape: Sequence[int]) -> str:
    """``"WxH px"`` of a latent shape ``(..., h, w)``: the image size it decodes to."""
    return f"{int(shape[-1]) * VAE_DOWNSCALE}x{int(shape[-2]) * VAE_DOWNSCALE} px"


def latent_size_problem(latent_shape: Sequence[int]) -> Optional[str]:
    """What makes a pair latent ``(..., h, w)`` unusable by FLUX (odd ``h`` or ``w``: it packs 2x2
    latent patches into tokens), or None."""
    h, w = (int(d) for d in latent_shape[-2:])
    if h % PATCH or w % PATCH:
        return (f"the latent is {w}x{h} ({_px(latent_shape)}); FLUX packs 2x2 latent patches, so the latent width "
                f"and height must be even: images must be multiples of {PIXEL_MULTIPLE} px")
    return None


def image_size_problem(image_shape: Sequence[int], latent_shape: Sequence[int]) -> Optional[str]:
    """What is wrong with a stored teacher image ``(3, H, W)`` for a pair latent ``(..., h, w)``
    (not ``8h x 8w``: not the image the latent decodes to), or None."""
    H, W = (int(d) for d in image_shape[-2:])
    h, w = (int(d) for d in latent_shape[-2:])
    if (H, W) != (h * VAE_DOWNSCALE, w * VAE_DOWNSCALE):
        return f"the image is {W}x{H} px but the {w}x{h} latent decodes to {_px(latent_shape)}"
    return None


def conditioning_key(t5: torch.Tensor, clip_pooled: torch.Tensor) -> str:
    """Content key of a conditioning: short sha256 over both tensors (bytes, dtype, shape).

    ``t5`` ``[L, D]`` or ``[1, L, D]``, ``clip_pooled`` ``[D]`` or ``[1, D]`` give the same key.
    """
    t5 = _unbatch(t5, 2, "cond_t5", "[L, 4096] or [1, L, 4096]")
    clip = _unbatch(clip_pooled, 1, "cond_clip", "[768] or [1, 768]")
    return hashlib.sha256(st_save_bytes({"t5": t5, "clip_pooled": clip})).hexdigest()[:COND_KEY_LENGTH]


# Record keys that say how a copy was stored, not which pair it is; two copies of one id are the
# same pair when every other key they both carry agrees. "cond": the same prompt encoded on
# another machine can differ in the last bits; "teacher": the teacher's file name, which may
# differ between machines (the pair's own settings, e.g. a teacher fingerprint, are compared).
_NOT_IDENTITY_KEYS = frozenset({"id", "cond", "teacher"})


def pair_record_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The metadata keys (sorted) on which two stored copies of one pair id disagree.

    Empty for a true duplicate (same prompt, seed and settings, e.g. two writers given
    overlapping work); non-empty for a conflict (one id given to two different pairs). Keys
    only one copy carries (an older writer's record) are not compared.
    """
    return sorted(k for k in (a.keys() & b.keys()) - _NOT_IDENTITY_KEYS if a[k] != b[k])


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], keys: Sequence[str],
                          ours_label: str, theirs_label: str) -> str:
    """``"prompt 'car' (ours_label) vs 'cat' (theirs_label)"`` for the first two keys."""
    shown = [f"{k} {_short(ours[k])} ({ours_label}) vs {_short(theirs[k])} ({theirs_label})" for k in keys[:2]]
    return ", ".join(shown) + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")


def repair_hint(folder: str | os.PathLike) -> str:
    """What to do about damaged or conflicting shards, as commands (shown in every such error)."""
    return (f"run `fluxsr-train verify {folder}` to list every problem, then `fluxsr-train verify {folder} "
            f"--drop-bad` to set the bad shards aside (into {Path(folder) / QUARANTINE_FOLDER}) and take them out "
            "of the dataset; `fluxsr-train pairs` with the same arguments then makes their pairs again")


# --- manifests ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: a complete shard and the pair ids inside it."""

    shard: str
    sha256: str
    bytes: int
    count: int
    pairs: tuple[str, ...]
    writer: str
    manifest: str
    line: int

    @staticmethod
    def parse(text: str, manifest: str, line: int) -> "ManifestEntry":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        pairs = d["pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
            raise ValueError("'pairs' is not a list of strings")
        if int(d["count"]) != len(pairs):
            raise ValueError(f"'count' {d['count']} differs from {len(pairs)} pair ids")
        shard = str(d["shard"])
        if os.path.basename(shard) != shard or not _SHARD_RE.match(shard):
            raise ValueError(f"'shard' {shard!r} is not a shard file name")
        return ManifestEntry(shard=shard, sha256=str(d["sha256"]), bytes=int(d["bytes"]),
                             count=len(pairs), pairs=tuple(pairs), writer=str(d.get("writer", "")),
                             manifest=manifest, line=line)


@dataclass
class ManifestScan:
    entries: list[ManifestEntry] = field(default_factory=list)
    # (manifest, line number, reason) of lines that are not valid records
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)


def _manifest_line(shard: str, sha: str, nbytes: int, ids: Sequence[str], writer: str) -> bytes:
    rec = {"shard": shard, "sha256": sha, "bytes": nbytes, "count": len(ids), "pairs": list(ids),
           "writer": writer, "format": PAIRS_FORMAT,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return (json.dumps(rec, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def _read_manifest(path: Path) -> ManifestScan:
    scan = ManifestScan()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return scan
    lines = data.split(b"\n")
    # The text after the last newline is a record still being appended, or torn by a kill.
    complete, tail = lines[:-1], lines[-1]
    for i, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            scan.entries.append(ManifestEntry.parse(raw.decode("utf-8"), path.name, i))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            scan.bad_lines.append((path.name, i, f"not a valid record ({e}); probably torn by a kill"))
    if tail.strip():
        scan.bad_lines.append((path.name, len(complete) + 1,
                               "incomplete last line (being written, or torn by a kill)"))
    return scan


def scan_manifests(folder: str | os.PathLike) -> ManifestScan:
    """Read every ``manifest-*.jsonl`` in ``folder`` (sorted by name, lines in file order)."""
    folder = Path(folder)
    total = ManifestScan()
    if not folder.is_dir():
        return total
    for p in sorted(folder.glob("manifest-*.jsonl")):
        s = _read_manifest(p)
        total.entries.extend(s.entries)
        total.bad_lines.extend(s.bad_lines)
    return total


def stored_record(folder: str | os.PathLike, pair_id: str) -> Optional[tuple[str, Optional[dict[str, Any]]]]:
    """``(shard, stored metadata)`` of pair ``pair_id`` in ``folder``, from the manifests and that
    one shard's header (no tensors, no other shard: cheap in a folder of thousands); the metadata
    is None when the shard cannot be read. None when no manifest lists the pair."""
    for entry in reversed(scan_manifests(folder).entries):
        if pair_id in entry.pairs:
            try:
                records, _ = _read_shard_header(Path(folder) / entry.shard)
            except Exception:  # noqa: BLE001 - a damaged shard is the dataset checks' to report
                return entry.shard, None
            return entry.shard, next((r for r in records if r.get("id") == pair_id), None)
    return None


# --- writer -------------------------------------------------------------------------------

class _WriterLock:
    """An exclusive OS lock on ``.lock-<writer_id>`` (:class:`~fluxsr_core.files.ExclusiveFileLock`).

    :class:`WriterBusyError` when another process holds it; :class:`PairWriteError` naming the
    lock file when it cannot be created (no space left, ...) or locked at all.
    """

    def __init__(self, path: Path):
        from .files import ExclusiveFileLock, LockHeldError

        self.path = path
        try:
            self._lock = ExclusiveFileLock(path)
        except LockHeldError:
            raise WriterBusyError(
                f"another live process is writing pairs with this writer id ({path.name} is "
                "locked); give each concurrent writer its own writer_id"
            ) from None
        except OSError as exc:
            raise _write_error(path, exc) from exc

    def release(self) -> None:
        self._lock.release()


@dataclass
class _Pending:
    pair_id: str
    eps: torch.Tensor
    z0: torch.Tensor
    cond_key: str
    meta: dict
    image: Optional[torch.Tensor]
    trajectory: Optional[torch.Tensor]
    header_bytes: int  # what this pair adds to its shard's header (upper bound)


class PairWriter:
    """Adds teacher pairs to a pair-dataset folder; resumes where a killed writer stopped.

    ``PairWriter(folder, writer_id=None, shard_size=8)``: opens (creating if needed) the folder.
    With the ``writer_id`` of a killed run it removes that run's temporary files, adopts a
    complete shard the run renamed but had not yet listed, and numbers new shards after the
    run's last one. Use :meth:`pending` to skip pairs already stored by any writer.

    Pairs are buffered and written ``shard_size`` at a time (fewer when their metadata would
    not fit one safetensors header); :meth:`flush` writes the buffer now. As a context manager
    it flushes and releases the writer id on exit (also after an exception: the buffered pairs
    are complete and worth keeping). After a failed write (:class:`PairWriteError`) the writer
    stops: later adds raise, and closing releases the id without writing the buffer (a rerun
    makes those pairs again).
    """

    def __init__(self, folder: str | os.PathLike, writer_id: Optional[str] = None,
                 shard_size: int = 8, fsync: bool = True):
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be at least 1 (got {shard_size})")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"pair dataset path {self.folder} exists and is not a folder")
        self.writer_id = _check_writer_id(writer_id if writer_id is not None else default_writer_id())
        self.shard_size = int(shard_size)
        self.fsync = bool(fsync)
        self.manifest_path = self.folder / f"manifest-{self.writer_id}.jsonl"
        self._buffer: list[_Pending] = []
        # What this writer did since it opened: pairs it stored, and pairs it had made but did
        # not store because another writer stored the same pair first.
        self.written_ids: list[str] = []
        self.stored_by_others: list[str] = []
        self._known_conds: set[str] = set()
        self._closed = False
        self._failed: Optional[PairWriteError] = None
        made = self._made_folders = _make_folder(self.folder)
        try:
            self._lock = _WriterLock(self.folder / f".lock-{self.writer_id}")
        except BaseException:
            _remove_empty_folders(made)  # a rerun must not find a half-made dataset folder
            raise
        try:
            self._recover()
            self._done: set[str] = self.done_ids()
        except OSError as exc:  # e.g. a leftover temp file that cannot be removed (read-only folder)
            self._lock.release()
            if isinstance(exc, PairWriteError):
                raise
            raise _write_error(Path(exc.filename) if exc.filename else self.folder, exc) from exc
        except BaseException:
            self._lock.release()
            raise

    # -- resume ---------------------------------------------------------------------------

    def _own_shard_seq(self, name: str) -> Optional[int]:
        m = _SHARD_RE.match(name)
        return int(m.group("seq")) if m and m.group("writer") == self.writer_id else None

    def _recover(self) -> None:
        """Clean up after a killed writer with the same id (we hold its lock, so it is dead)."""
        for p in self.folder.iterdir():
            m = _SHARD_TMP_RE.match(p.name) or _COND_TMP_RE.match(p.name)
            if m and m.group("writer") == self.writer_id:
                logger.info("removing %s left by a killed writer", p.name)
                p.unlink(missing_ok=True)
        # A torn last line: end it so the next record starts on a line of its own. The torn
        # text stays (append-only); readers skip it, and its shard is adopted below.
        if self.manifest_path.exists():
            data = self.manifest_path.read_bytes()
            if data and not data.endswith(b"\n"):
                warnings.warn(f"{self.manifest_path.name}: closing a manifest line torn by a kill")
                self._append_checked(b"\n")
        listed = {e.shard for e in _read_manifest(self.manifest_path).entries}
        seqs = [0]
        for p in sorted(self.folder.glob(f"shard-{self.writer_id}-*.safetensors")):
            seq = self._own_shard_seq(p.name)
            if seq is None:
                continue
            seqs.append(seq)
            if p.name not in listed:
                self._adopt(p)
        for e in _read_manifest(self.manifest_path).entries:
            seq = self._own_shard_seq(e.shard)
            if seq is not None:
                seqs.append(seq)
        self._next_seq = max(seqs) + 1

    def _adopt(self, path: Path) -> None:
        """List a complete shard renamed by a writer that was killed before its manifest line."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
            pairs = json.loads(meta[META_KEY_PAIRS])
            ids = [str(p["id"]) for p in pairs]
            for i in range(len(ids)):
                if f"{i}.eps" not in keys or f"{i}.z0" not in keys:
                    raise ValueError(f"pair {i} has no eps/z0 tensor")
            sha, nbytes = _sha256_file(path), path.stat().st_size  # a read error here is the same case
        except Exception as e:  # unreadable: leave it unlisted, so nobody reads it
            warnings.warn(f"{path.name}: unlisted shard is unreadable ({e}); leaving it out of the dataset")
            return
        self._append_manifest(path.name, sha, nbytes, ids)
        logger.info("adopted complete shard %s (%d pairs) left unlisted by a killed writer",
                    path.name, len(ids))

    # -- state ----------------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """Pair ids stored in complete shards by any writer of the folder (re-read now)."""
        return {pid for e in scan_manifests(self.folder).entries for pid in e.pairs}

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids from ``ids`` (order kept) that no writer has stored yet, nor this one buffered."""
        self._done |= self.done_ids()
        buffered = {p.pair_id for p in self._buffer}
        return [i for i in ids if i not in self._done and i not in buffered]

    @property
    def buffered(self) -> int:
        """Number of pairs added but not yet written to a shard."""
        return len(self._buffer)

    # -- adding ---------------------------------------------------------------------------

    def add(self, pair_id: str, eps: torch.Tensor, z0: torch.Tensor, cond_t5: torch.Tensor,
            cond_clip: torch.Tensor, meta: Optional[Mapping[str, Any]] = None,
            image: Optional[torch.Tensor] = None, trajectory: Optional[torch.Tensor] = None) -> bool:
        """Buffer one pair; writes a shard when ``shard_size`` pairs are buffered.

        ``eps``, ``z0``: ``[16, h, w]`` (or ``[1, 16, h, w]``) normalised latents, ``h`` and ``w``
        even (FLUX packs 2x2 latent patches: images are multiples of 16 px).
        ``cond_t5``: ``[L, 4096]`` / ``[1, L, 4096]``; ``cond_clip``: ``[768]`` / ``[1, 768]``:
        stored once per distinct conditioning in ``cond-<key>.safetensors``.
        ``meta``: JSON-able per-pair metadata (seed, resolution, prompt, steps, guidance,
        sigmas; tensors become lists). ``image``: uint8 ``[3, 8h, 8w]``, the image the latent
        decodes to (a float image in [0, 1] is rounded to uint8). ``trajectory``: ``[S, 16, h, w]``.

        Returns False (and stores nothing) when ``pair_id`` is already stored or buffered, so
        re-running the same ids never duplicates a pair.
        """
        self._check_usable()
        if not isinstance(pair_id, str) or not pair_id or "\n" in pair_id:
            raise ValueError(f"pair_id must be a non-empty one-line string, got {pair_id!r}")
        if pair_id in self._done or any(p.pair_id == pair_id for p in self._buffer):
            logger.debug("pair %s already stored; skipped", pair_id)
            return False
        eps = _unbatch(eps, 3, "eps", "[C, h, w]")
        z0 = _unbatch(z0, 3, "z0", "[C, h, w]")
        if eps.shape != z0.shape:
            raise ValueError(f"eps {tuple(eps.shape)} and z0 {tuple(z0.shape)} must have the same shape")
        problem = latent_size_problem(z0.shape)
        if problem is not None:  # found here, not inside the model at the first training step
            raise ValueError(f"pair {pair_id}: {problem}")
        if image is not None:
            image = _unbatch(image, 3, "image", "uint8 [3, H, W]")
            if image.shape[0] != 3:
                raise ValueError(f"image must be [3, H, W] (channels first), got {tuple(image.shape)}")
            problem = image_size_problem(image.shape, z0.shape)
            if problem is not None:  # training compares the two pixel for pixel
                raise ValueError(f"pair {pair_id}: {problem}; store the image the latent decodes to (or was "
                                 "encoded from)")
            if image.dtype != torch.uint8:
                if not image.is_floating_point():
                    raise ValueError(f"image must be uint8 or float in [0, 1], got {image.dtype}")
                image = (image.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        if trajectory is not None:
            trajectory = _unbatch(trajectory, 4, "trajectory", "[S, C, h, w]")
            if trajectory.shape[1:] != eps.shape:
                raise ValueError(f"trajectory {tuple(trajectory.shape)} must be [S, {', '.join(map(str, eps.shape))}]")
        meta_json = _jsonable(dict(meta or {}), "meta")
        for reserved in ("id", "cond"):
            if reserved in meta_json:
                raise ValueError(f"pair metadata may not use the reserved key {reserved!r}")
        n_tensors = 2 + (image is not None) + (trajectory is not None)
        header_bytes = (_record_header_bytes({"id": pair_id, "cond": "0" * COND_KEY_LENGTH, **meta_json})
                        + n_tensors * _TENSOR_ENTRY_MAX_BYTES)
        header_budget = SAFETENSORS_MAX_HEADER_BYTES - _HEADER_FIXED_BYTES
        if header_bytes > header_budget:
            raise ValueError(f"pair {pair_id}: its metadata takes {header_bytes:,} bytes of the shard header, more "
                             f"than a safetensors header may hold ({SAFETENSORS_MAX_HEADER_BYTES:,} bytes); "
                             "shorten the prompt (or other metadata)")
        key = self._store_conditioning(cond_t5, cond_clip)
        if self._buffer and sum(p.header_bytes for p in self._buffer) + header_bytes > header_budget:
            logger.info("shard cut at %d pairs: one more would not fit a safetensors header", len(self._buffer))
            self.flush()
        self._buffer.append(_Pending(pair_id, eps, z0, key, meta_json, image, trajectory, header_bytes))
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return True

    def store_conditioning(self, cond_t5: torch.Tensor, cond_clip: torch.Tensor) -> str:
        """Store a conditioning now (once per content, in ``cond-<key>.safetensors``); returns its key.

        :meth:`add` does this itself; calling it first lets a caller encode many prompts ahead
        and keep only their keys in memory (:meth:`load_conditioning` reads one back). A
        conditioning no pair uses yet is harmless: readers look up only the keys pairs name.
        """
        self._check_usable()
        return self._store_conditioning(cond_t5, cond_clip)

    def load_conditioning(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t5 [L, D], clip_pooled [D])`` of a stored conditioning key, checked against its key."""
        return _load_conditioning_file(self.folder / f"cond-{key}.safetensors", key)

    def conditioning_problem(self, key: str, full: bool = True) -> Optional[str]:
        """What is wrong with the stored conditioning ``key`` ("it is missing", "it cannot be
        read (...)", ...), or None when it is whole.

        ``full``: read its tensors and check they hash to ``key`` (~4 MiB for FLUX); otherwise
        only its header is read, which finds a missing, truncated or unreadable file, not one
        with wrong bytes of the right size. :meth:`store_conditioning` replaces a damaged file.
        """
        path = self.folder / f"cond-{key}.safetensors"
        if not path.exists():
            return "it is missing"
        try:
            if full:
                _conditioning_from_bytes(path.read_bytes(), key)
            else:
                _check_conditioning_header(path)
        except (OSError, ValueError) as why:
            return str(why)
        return None

    def _store_conditioning(self, t5: torch.Tensor, clip: torch.Tensor) -> str:
        t5 = _unbatch(t5, 2, "cond_t5", "[L, 4096] or [1, L, 4096]")
        clip = _unbatch(clip, 1, "cond_clip", "[768] or [1, 768]")
        key = conditioning_key(t5, clip)
        if key in self._known_conds:
            return key
        final = self.folder / f"cond-{key}.safetensors"
        # An existing file is checked (once per writer): a damaged one from an earlier run would
        # otherwise be found only when read back, after the transformer has loaded.
        exists = final.exists()
        damage = self.conditioning_problem(key, full=True) if exists else None
        if exists and damage is None:
            self._known_conds.add(key)
            return key
        if damage is not None:
            logger.warning("conditioning file %s is damaged (%s); replacing it with the conditioning in hand "
                           "(its name is the hash of that content)", final, damage)
        data = st_save_bytes({"t5": t5, "clip_pooled": clip},
                             metadata={META_KEY_FORMAT: PAIRS_FORMAT, META_KEY_COND: key})
        tmp = self.folder / f"cond-{key}.safetensors.{self.writer_id}.tmp"
        try:
            _write_file_durably(tmp, data, self.fsync)
            if damage is not None:
                # Atomic: a reader sees the old file or the new one. Another writer repairing it at
                # the same time renames the same content over it, which is just as right.
                os.replace(tmp, final)
            else:
                try:
                    # Create-if-absent: a hard link fails on an existing name, so a conditioning
                    # another writer created meanwhile is never replaced.
                    os.link(tmp, final)
                except FileExistsError:
                    pass
                except OSError:  # no hard links here (some network/FAT file systems)
                    if not final.exists():
                        os.replace(tmp, final)
        except OSError as exc:
            raise self._stop(final, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            fsync_dir(self.folder)
        self._known_conds.add(key)
        return key

    # -- writing --------------------------------------------------------------------------

    def flush(self) -> Optional[str]:
        """Write the buffered pairs as one shard now; returns its file name (None if nothing to write).

        The other writers' manifests are read first: a buffered pair another writer stored
        meanwhile is dropped when it is the same pair (listed in :attr:`stored_by_others`), and
        a pair stored under its id with other content (another prompt, seed or setting) raises
        :class:`PairConflictError` after the other buffered pairs are written.
        """
        if not self._buffer:
            return None
        self._check_usable()
        conflict = self._drop_pairs_stored_by_others()
        name = self._write_buffer() if self._buffer else None
        if conflict is not None:
            raise conflict
        return name

    def _drop_pairs_stored_by_others(self) -> Optional[PairConflictError]:
        """Take out of the buffer the pairs other writers have stored since this one last looked;
        returns the conflict error for pairs stored under their ids with other content (also
        taken out: they are not this dataset's pairs), or None."""
        stored_at: dict[str, ManifestEntry] = {}
        for e in scan_manifests(self.folder).entries:
            for pid in e.pairs:
                stored_at.setdefault(pid, e)
        self._done |= stored_at.keys()
        taken = [p for p in self._buffer if p.pair_id in stored_at]
        if not taken:
            return None
        headers: dict[str, list[dict]] = {}
        conflicts: list[tuple[_Pending, ManifestEntry, dict, list[str]]] = []
        drop: set[str] = set()
        for p in taken:
            e = stored_at[p.pair_id]
            try:
                rows = headers.get(e.shard)
                if rows is None:
                    rows = headers[e.shard] = _read_shard_header(self.folder / e.shard)[0]
                theirs = rows[e.pairs.index(p.pair_id)]
            except Exception:  # their copy is unreadable: keep ours (verify_pairs names the damaged one)
                continue
            ours = {"id": p.pair_id, "cond": p.cond_key, **p.meta}
            differ = pair_record_differences(ours, theirs)
            drop.add(p.pair_id)
            if differ:
                conflicts.append((p, e, theirs, differ))
            else:
                self.stored_by_others.append(p.pair_id)
                logger.info("pair %s was stored meanwhile by writer %s (%s); not stored twice", p.pair_id,
                            e.writer, e.shard)
        self._buffer = [p for p in self._buffer if p.pair_id not in drop]
        if not conflicts:
            return None
        p, e, theirs, differ = conflicts[0]
        ours = {"id": p.pair_id, "cond": p.cond_key, **p.meta}
        return PairConflictError(
            f"pair {p.pair_id} is already stored in {self.folder / e.shard} (writer {e.writer}) as another pair: "
            f"{_describe_differences(ours, theirs, differ, 'this writer', 'stored')}; {len(conflicts)} such pair(s) "
            "were not stored. Two writers are giving the same ids to different pairs (e.g. two prompt files writing "
            "one folder: ids follow the prompt lines); make the other pairs in a folder of their own")

    def _write_buffer(self) -> str:
        """Write the buffered pairs as one shard; returns its file name."""
        tensors: dict[str, torch.Tensor] = {}
        records = []
        for i, p in enumerate(self._buffer):
            tensors[f"{i}.eps"] = p.eps
            tensors[f"{i}.z0"] = p.z0
            if p.image is not None:
                tensors[f"{i}.image"] = p.image
            if p.trajectory is not None:
                tensors[f"{i}.trajectory"] = p.trajectory
            records.append({"id": p.pair_id, "cond": p.cond_key, **p.meta})
        data = st_save_bytes(tensors, metadata={
            META_KEY_FORMAT: PAIRS_FORMAT,
            META_KEY_PAIRS: json.dumps(records, ensure_ascii=True),
        })
        name = f"shard-{self.writer_id}-{self._next_seq:06d}.safetensors"
        try:
            self._write_shard_file(name, data)
        except OSError as exc:
            raise self._stop(self.folder / name, exc) from exc
        ids = [p.pair_id for p in self._buffer]
        # A failure from here on leaves a complete shard no manifest lists: the next writer with
        # this id adopts it.
        self._append_manifest(name, hashlib.sha256(data).hexdigest(), len(data), ids)
        self._next_seq += 1
        self._done.update(ids)
        self.written_ids.extend(ids)
        self._buffer.clear()
        return name

    def _write_shard_file(self, name: str, data: bytes) -> None:
        final = self.folder / name
        if final.exists():  # cannot happen through this class; never overwrite a shard
            raise PairDataError(f"refusing to overwrite existing shard {final}")
        tmp = self.folder / (name + ".tmp")
        try:
            _write_file_durably(tmp, data, self.fsync)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)  # a half-written file only takes space (disk full)
            raise
        if self.fsync:
            fsync_dir(self.folder)

    def _append_raw(self, data: bytes) -> None:
        # One write() on an O_APPEND descriptor: the line lands whole at the end of the file.
        fd = os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            while data:  # a short write (disk filling up) goes on; the next write raises ENOSPC
                data = data[os.write(fd, data):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _append_checked(self, data: bytes) -> None:
        """Append to the manifest; a failure stops the writer. A line torn by it is closed and
        skipped by the next writer with this id, as after a kill."""
        try:
            self._append_raw(data)
        except OSError as exc:
            raise self._stop(self.manifest_path, exc) from exc

    def _append_manifest(self, shard: str, sha: str, nbytes: int, ids: Sequence[str]) -> None:
        self._append_checked(_manifest_line(shard, sha, nbytes, ids, self.writer_id))

    def _stop(self, path: Path, exc: OSError) -> PairWriteError:
        """Record a failed write; the writer writes nothing more (a retry would fail the same way,
        or find its own shard already renamed)."""
        self._failed = _write_error(path, exc)
        return self._failed

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this PairWriter is closed")
        if self._failed is not None:
            raise RuntimeError(f"this PairWriter stopped after a failed write ({self._failed}); open a new one "
                               "with the same writer id to go on")

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the buffer and release the writer id (after a failed write: only release it)."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.flush()
            elif self._buffer:
                logger.info("PairWriter %s: %d buffered pairs not written after the failed write; a rerun "
                            "makes them again", self.writer_id, len(self._buffer))
        finally:
            self._closed = True
            self._lock.release()

    def __enter__(self) -> "PairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except PairConflictError as second:  # the error in flight came first and says more
            logger.warning("%s", second)
        self._remove_folder_if_untouched()

    def _remove_folder_if_untouched(self) -> None:
        """After a run that failed before writing anything (a refused setting) into a folder this
        writer made: remove its lock file and the folders, so that a rerun does not find a
        dataset folder that holds nothing. A folder anyone else wrote into is left as it is."""
        if not self._made_folders:
            return
        lock_file = self._lock.path
        try:
            if [p.name for p in self.folder.iterdir()] != [lock_file.name]:
                return
            lock_file.unlink()
        except OSError:
            return
        _remove_empty_folders(self._made_folders)

    def __del__(self):  # pragma: no cover - best effort: never lose the OS lock
        lock = getattr(self, "_lock", None)
        if lock is not None and not getattr(self, "_closed", True):
            if self._buffer:
                warnings.warn(f"PairWriter {self.writer_id} dropped {len(self._buffer)} unflushed "
                              "pairs; use it as a context manager or call close()")
            lock.release()


# --- verification -------------------------------------------------------------------------

# Kinds that mean data named by a manifest cannot be read, that one id names two different
# pairs ("conflict"), or that a pair's stored image is not the size its latent decodes to ("size":
# written before PairWriter refused it; training on it fails). The others are notes: leftovers of
# a kill, and true duplicates (the same pair stored by two writers), which readers handle safely.
# "io-error": the system could not read the file (permission denied, EIO): unlike the others it
# says nothing about the file's content.
ERROR_KINDS = ("missing", "truncated", "hash", "unreadable", "mismatch", "conflict", "size", "missing-cond",
               "bad-cond", "io-error")
# Errors `--drop-bad` leaves in place: the shard may be whole, and setting it aside would make
# `fluxsr-train pairs` sample its pairs again for a permission or disk problem.
KEPT_ON_DROP_KINDS = ("io-error",)
# Where `fluxsr-train verify --drop-bad` (drop_bad_shards) moves the files it takes out of a dataset.
QUARANTINE_FOLDER = "quarantine"


@dataclass(frozen=True)
class PairProblem:
    """One finding of :func:`verify_pairs`."""

    kind: str   # one of ERROR_KINDS, or "torn-line", "unlisted", "temp-file", "duplicate"
    path: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS

    def __str__(self) -> str:
        return f"[{self.kind}] {self.path}: {self.message}"


@dataclass
class VerifyReport:
    """Everything :func:`verify_pairs` found. ``ok`` is True when no shard is damaged."""

    folder: str
    shards: int = 0
    pairs: int = 0
    problems: list[PairProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[PairProblem]:
        return [p for p in self.problems if p.is_error]

    @property
    def notes(self) -> list[PairProblem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def bad_shards(self) -> set[str]:
        return {Path(p.path).name for p in self.errors if Path(p.path).name.startswith("shard-")}

    def __str__(self) -> str:
        head = (f"pair dataset {self.folder}: {self.shards} shards, {self.pairs} distinct pairs, "
                f"{len(self.errors)} errors, {len(self.notes)} notes")
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def _check_shard(folder: Path, e: ManifestEntry, check_hash: bool) -> Optional[PairProblem]:
    """Return the first problem of the shard named by manifest entry ``e``, or None."""
    return _check_shard_records(folder, e, check_hash)[0]


def _check_shard_records(folder: Path, e: ManifestEntry, check_hash: bool,
                         sizes: bool = False) -> tuple[Optional[PairProblem], list[dict]]:
    """``(first problem or None, the shard's pair records)`` of the shard named by ``e``. An
    OSError reading it (permission denied, EIO) is the problem ``io-error``, not a traceback.
    ``sizes``: also check each stored image's size against its latent (the problem ``size``)."""
    path = folder / e.shard
    where = f"(listed in {e.manifest} line {e.line})"
    try:
        if not path.exists():
            return PairProblem("missing", str(path), f"shard file is missing {where}"), []
        size = path.stat().st_size
        if size != e.bytes:
            return PairProblem("truncated", str(path),
                               f"shard has {size} bytes, the manifest says {e.bytes} {where}"), []
        if check_hash:
            sha = _sha256_file(path)
            if sha != e.sha256:
                return PairProblem("hash", str(path),
                                   f"shard content is corrupted: sha256 {sha[:12]}... differs from "
                                   f"{e.sha256[:12]}... {where}"), []
        try:
            records, keys = _read_shard_header(path, shapes=sizes)
        except OSError:
            raise
        except Exception as ex:  # safetensors raises its own error type for a damaged header
            return PairProblem("unreadable", str(path), f"shard cannot be read ({ex}) {where}"), []
    except OSError as ex:
        return PairProblem("io-error", str(path),
                           f"shard cannot be read from disk ({ex.strerror or ex}) {where}; the file may be whole: "
                           "fix its permissions or the disk, then run again"), []
    ids = [str(r.get("id")) for r in records]
    if ids != list(e.pairs):
        return PairProblem("mismatch", str(path), f"shard holds pairs {ids}, the manifest says {list(e.pairs)}"), []
    for i in range(len(ids)):
        if f"{i}.eps" not in keys or f"{i}.z0" not in keys:
            return PairProblem("unreadable", str(path), f"pair {ids[i]} has no eps/z0 tensor {where}"), []
    if sizes:
        prob = _image_size_problem_of_shard(path, ids, keys)
        if prob is not None:
            return prob, []
    return None, records


def _tensor_shapes(f) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of an open safetensors file, from its header (no tensor is read)."""
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _image_size_problem_of_shard(path: Path, pairs: Sequence[str],
                                 shapes: Mapping[str, tuple[int, ...]]) -> Optional[PairProblem]:
    """The ``size`` problem of a shard holding a pair whose latent FLUX cannot take (odd: written
    by another tool, PairWriter refuses it) or whose stored image is not the size its latent
    decodes to (``shapes``: the shard's tensor shapes, from its header), or None."""
    odd = [(pid, problem) for i, pid in enumerate(pairs)
           for problem in [latent_size_problem(shapes[f"{i}.z0"])] if problem]
    if odd:
        pid, problem = odd[0]
        return PairProblem("size", str(path),
                           f"{len(odd)} of its pairs have a latent FLUX cannot take, e.g. {pid}: {problem}. Training "
                           "on them fails; --drop-bad sets this shard aside (then make its pairs again at such a size)")
    bad = [(pid, problem) for i, pid in enumerate(pairs) if f"{i}.image" in shapes
           for problem in [image_size_problem(shapes[f"{i}.image"], shapes[f"{i}.z0"])] if problem]
    if not bad:
        return None
    pid, problem = bad[0]
    return PairProblem("size", str(path),
                       f"{len(bad)} of its pairs store an image of another size than their latent, e.g. {pid}: "
                       f"{problem}. Training on them fails; --drop-bad sets this shard aside (then make its pairs "
                       "again), or train with data.teacher_image=decode, which decodes z_0 and reads no stored image")


def _problem_error(prob: PairProblem, folder: Path) -> PairDataError:
    """The :class:`PairDataError` a reader raises for ``prob``: with the verify / --drop-bad
    commands for damage, without them for a file the system could not read (nothing to drop)."""
    hint = "" if prob.kind in KEPT_ON_DROP_KINDS else f". {repair_hint(folder)}"
    return PairDataError(f"{prob.message}: {prob.path}{hint}")


def _read_shard_header(path: Path, shapes: bool = False) -> tuple[list[dict], Any]:
    """``(pair records, tensor names)`` of a shard, from its header; with ``shapes`` the names map
    to their tensors' shapes (``{name: shape}``; still no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = _tensor_shapes(f) if shapes else set(f.keys())
    if META_KEY_PAIRS not in meta:
        raise ValueError(f"no '{META_KEY_PAIRS}' metadata; not a FluxSR pair shard")
    records = json.loads(meta[META_KEY_PAIRS])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"'{META_KEY_PAIRS}' metadata is not a list of objects")
    return records, keys


def _conditioning_from_bytes(data: bytes, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t5, clip_pooled)`` of a conditioning file's bytes; ValueError saying what is wrong
    when they are not the conditioning ``key`` names (unreadable, tensors absent, other content)."""
    try:
        tensors = st_load_bytes(data)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"it cannot be read ({e})") from None
    if "t5" not in tensors or "clip_pooled" not in tensors:
        raise ValueError(f"it holds tensors {sorted(tensors)}, not t5 and clip_pooled")
    t5, clip = tensors["t5"], tensors["clip_pooled"]
    try:
        actual = conditioning_key(t5, clip)
    except (TypeError, ValueError) as e:
        raise ValueError(f"its tensors are not a conditioning ({e})") from None
    if actual != key:
        raise ValueError(f"its content does not hash to {key}: corrupted")
    return t5, clip


def _check_conditioning_header(path: Path) -> None:
    """ValueError unless ``path``'s safetensors header reads, covers the whole file (safetensors
    checks the size) and names t5 and clip_pooled. Reads the header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"it cannot be read ({e})") from None
    if not {"t5", "clip_pooled"} <= names:
        raise ValueError(f"it holds tensors {sorted(names)}, not t5 and clip_pooled")


def _rerun_hint(folder: Path) -> str:
    return (f"run `fluxsr-train pairs` again on {folder} with the same prompts and settings, which encodes the "
            "prompt again and stores it (the pairs are kept)")


class _ConditioningReadError(PairDataError):
    """A conditioning file the system could not read (permission denied, EIO): not damage."""


def _load_conditioning_file(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.exists():
        raise PairDataError(f"conditioning file {path} is missing (needed by key {key}): {_rerun_hint(path.parent)}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _ConditioningReadError(f"conditioning file {path} cannot be read from disk ({e.strerror or e}); the "
                                     "file may be whole: fix its permissions or the disk, then run again") from None
    try:
        return _conditioning_from_bytes(data, key)
    except ValueError as why:
        # "Delete it": a rerun restores any missing one, but checks the cond files of stored pairs by
        # their headers only, so it would keep one with wrong bytes of the right size.
        raise PairDataError(f"conditioning file {path} is damaged ({why}); delete it and "
                            f"{_rerun_hint(path.parent)}") from None


def verify_pairs(folder: str | os.PathLike, check_hash: bool = True) -> VerifyReport:
    """Check a pair-dataset folder: every listed shard present, whole, uncorrupted, readable.

    Errors: a shard a manifest names that is missing, truncated, fails its sha256 (with
    ``check_hash``), cannot be parsed, or holds other pairs than listed; a shard holding a later
    copy of a pair id with other content than the first copy ("conflict": one id given to two
    different pairs; readers would see only the first); a pair whose latent is odd, or whose
    stored image is not the size its latent decodes to ("size", read from the shard headers); a
    conditioning file missing or not
    matching its key. Notes (harmless, ignored by readers): torn manifest lines, unlisted
    shards, temporary files, true duplicates (the same pair stored twice; one copy is read).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(_no_dataset_folder(folder))
    report = VerifyReport(folder=str(folder))
    scan = scan_manifests(folder)
    for manifest, line, why in scan.bad_lines:
        report.problems.append(PairProblem("torn-line", str(folder / manifest), f"line {line}: {why}"))
    seen: dict[str, tuple[str, dict]] = {}  # pair id -> (shard, record) of its first copy
    listed: set[str] = set()
    conds: set[str] = set()
    # shard -> [(pair id, its record there, the first copy's shard and record, keys that differ)]
    conflicts: dict[str, list[tuple[str, dict, str, dict, list[str]]]] = {}
    for e in scan.entries:
        listed.add(e.shard)
        report.shards += 1
        prob, records = _check_shard_records(folder, e, check_hash, sizes=True)
        if prob is not None:
            report.problems.append(prob)
            continue
        conds.update(str(r.get("cond")) for r in records)
        for pid, rec in zip(e.pairs, records):
            if pid not in seen:
                seen[pid] = (e.shard, rec)
                continue
            first_shard, first = seen[pid]
            differ = pair_record_differences(rec, first)
            if differ:
                conflicts.setdefault(e.shard, []).append((pid, rec, first_shard, first, differ))
            else:
                report.problems.append(PairProblem(
                    "duplicate", str(folder / e.shard), f"pair {pid} is also in {first_shard} (the same pair); "
                    "readers use one copy"))
    for shard, rows in conflicts.items():
        pid, rec, first_shard, first, differ = rows[0]
        report.problems.append(PairProblem(
            "conflict", str(folder / shard),
            f"{len(rows)} of its pair ids are also in other shards as other pairs, e.g. {pid}: "
            f"{_describe_differences(rec, first, differ, 'here', first_shard)}. Two writers gave the same ids to "
            "different pairs (e.g. two prompt files writing one folder: ids follow the prompt lines) and readers "
            "would see only the first copy; --drop-bad sets this shard aside, then make its pairs in a folder "
            "of their own"))
    report.pairs = len(seen)
    for key in sorted(conds):
        path = folder / f"cond-{key}.safetensors"
        try:
            _load_conditioning_file(path, key)
        except _ConditioningReadError as ex:
            report.problems.append(PairProblem("io-error", str(path), str(ex)))
        except PairDataError as ex:
            report.problems.append(PairProblem("bad-cond" if path.exists() else "missing-cond", str(path), str(ex)))
    for p in sorted(folder.iterdir()):
        if _SHARD_RE.match(p.name) and p.name not in listed:
            report.problems.append(PairProblem("unlisted", str(p), "no manifest names this shard; "
                                               "ignored (its writer will adopt it on resume)"))
        elif _SHARD_TMP_RE.match(p.name) or _COND_TMP_RE.match(p.name):
            report.problems.append(PairProblem("temp-file", str(p), "temporary file of a writer "
                                               "(running or killed); ignored"))
    return report


@dataclass
class DropReport:
    """What :func:`drop_bad_shards` did."""

    folder: str
    # (shard file name, problem kind, pairs its manifest line listed): out of the dataset now
    dropped: list[tuple[str, str, int]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # files moved into the quarantine folder
    busy: list[str] = field(default_factory=list)   # writer ids left alone: their writer is running
    # shards left in place because the system could not read them (KEPT_ON_DROP_KINDS): (file name, problem)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pairs_dropped(self) -> int:
        return sum(n for _, _, n in self.dropped)

    def __str__(self) -> str:
        quarantine = Path(self.folder) / QUARANTINE_FOLDER
        lines = [f"dropped {len(self.dropped)} shards ({self.pairs_dropped} pairs) from {self.folder}"
                 + (f"; moved {len(self.moved)} files to {quarantine}" if self.moved else "")]
        lines += [f"  {name} ({kind}, {n} pairs)" for name, kind, n in self.dropped]
        lines += [f"  left alone: writer {w} is running (its lock file .lock-{w} is held); stop it or let it "
                  "finish, then run this again" for w in self.busy]
        lines += [f"  left in place (not set aside, it may be whole): {name}: {problem}"
                  for name, problem in self.unreadable]
        return "\n".join(lines)


def _quarantine(path: Path, quarantine: Path) -> Path:
    """Move ``path`` into ``quarantine`` (made if needed) under a name no earlier move took."""
    quarantine.mkdir(exist_ok=True)
    target, n = quarantine / path.name, 1
    while target.exists():
        target, n = quarantine / f"{path.name}.{n}", n + 1
    os.replace(path, target)
    fsync_dir(quarantine)
    fsync_dir(path.parent)
    return target


def _rewrite_manifest_without(path: Path, shards: set[str]) -> int:
    """Atomically rewrite a manifest without the lines naming ``shards``; every other byte (torn
    lines too) stays as it was. Returns how many lines went."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    keep: list[bytes] = []
    removed = 0
    for raw in lines[:-1]:
        try:
            shard = json.loads(raw.decode("utf-8")).get("shard")
        except (ValueError, UnicodeDecodeError, AttributeError):
            shard = None
        if shard in shards:
            removed += 1
        else:
            keep.append(raw + b"\n")
    keep.append(lines[-1])  # the text after the last newline: kept as is
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file_durably(tmp, b"".join(keep), fsync=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return removed


def drop_bad_shards(folder: str | os.PathLike, report: Optional[VerifyReport] = None) -> DropReport:
    """Take the shards :func:`verify_pairs` reports as errors out of the dataset, keeping their files.

    For each writer whose manifest lists a bad shard (missing, truncated, corrupted, unreadable,
    mismatched, or holding conflicting copies of other shards' pair ids): its lock is taken (a
    running writer is left alone and named in ``busy``), the shard files are moved into
    ``quarantine/`` and then the manifest is rewritten atomically without their lines. Moving
    first means a kill in between leaves a listed shard that is missing, which a rerun drops; never
    an unlisted bad shard the writer would adopt again. A damaged conditioning file is moved to
    ``quarantine/`` too (``fluxsr-train pairs`` stores it again). The dropped pairs are then missing,
    so a rerun of ``fluxsr-train pairs`` makes them again. ``report``: a :func:`verify_pairs` report
    of the folder, to spare a second full read (None: verified now). A shard the system could not
    read (``io-error``: permission denied, EIO) is left in place and listed in ``unreadable``: its
    content may be whole, and the fix is the file's permissions or the disk, not new pairs.
    """
    folder = Path(folder)
    if report is None:
        report = verify_pairs(folder)
    result = DropReport(folder=str(folder))
    shard_errors = [p for p in report.errors if _SHARD_RE.match(Path(p.path).name)]
    result.unreadable = [(Path(p.path).name, p.message) for p in shard_errors if p.kind in KEPT_ON_DROP_KINDS]
    bad = {Path(p.path).name: p.kind for p in shard_errors if p.kind not in KEPT_ON_DROP_KINDS}
    quarantine = folder / QUARANTINE_FOLDER
    by_manifest: dict[str, list[ManifestEntry]] = collections.defaultdict(list)
    for e in scan_manifests(folder).entries:
        if e.shard in bad:
            by_manifest[e.manifest].append(e)
    for manifest, entries in sorted(by_manifest.items()):
        m = _MANIFEST_RE.match(manifest)
        writer = m.group("writer") if m else manifest
        try:
            lock = _WriterLock(folder / f".lock-{writer}")
        except WriterBusyError:
            result.busy.append(writer)
            continue
        try:
            names = {e.shard for e in entries}
            for name in sorted(names):
                if (folder / name).exists():
                    result.moved.append(str(_quarantine(folder / name, quarantine)))
            _rewrite_manifest_without(folder / manifest, names)
            unique = {e.shard: e for e in entries}.values()  # a shard listed twice is dropped once
            result.dropped.extend((e.shard, bad[e.shard], e.count) for e in unique)
        finally:
            lock.release()
    for p in report.errors:
        path = Path(p.path)
        if p.kind == "bad-cond" and path.exists():
            result.moved.append(str(_quarantine(path, quarantine)))
    return result


# --- reader -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairShapes:
    """A stored pair's tensor shapes, from its shard's header (:meth:`PairDataset.shapes`):
    ``eps`` and ``z0`` ``(16, h, w)``, ``image`` ``(3, H, W)`` (None when none is stored), and
    ``cond_key``, the key of its conditioning."""

    eps: tuple[int, ...]
    z0: tuple[int, ...]
    image: Optional[tuple[int, ...]]
    cond_key: str


@dataclass(frozen=True)
class _PairRef:
    pair_id: str
    shard: str
    index: int  # position inside the shard


class PairDataset(torch.utils.data.Dataset):
    """Read-only view of a pair-dataset folder (all complete shards of all writers).

    Items (``dataset[i]``) are dicts: ``id``, ``eps`` and ``z0`` ``[16, h, w]``, ``cond_key``,
    ``t5`` ``[L, 4096]``, ``clip_pooled`` ``[768]``, ``meta`` (the pair's metadata dict), and
    ``image`` (uint8 ``[3, H, W]``) / ``trajectory`` when stored and requested.

    Pairs are ordered by id (digit runs compared as numbers), so the order does not depend on
    how many writers produced the folder. An id stored twice as the same pair (two writers given
    overlapping work) is read from its first copy in (manifest name, line) order.

    ``on_error="raise"`` (default): a listed shard that is missing or has the wrong size, or an
    id stored twice as two different pairs (:class:`PairConflictError`: another prompt, seed
    or setting; e.g. two prompt files written into one folder), raises here; a corrupted shard
    (sha256 checked the first time each shard is read in this process) raises when read. The
    messages name the shards and the ``fluxsr-train verify`` commands that list and set them
    aside. ``on_error="skip"``: every shard is verified now (a full read of the folder), damaged
    ones are left out and conflicting ids read from their first copy, with a warning.
    """

    def __init__(self, folder: str | os.PathLike, on_error: str = "raise", load_image: bool = True,
                 load_trajectory: bool = False, cond_cache_size: int = 8):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(_no_dataset_folder(self.folder))
        self.on_error = on_error
        self.load_image = load_image
        self.load_trajectory = load_trajectory
        self._cond_cache: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._cond_cache_size = max(1, int(cond_cache_size))
        self._verified: set[str] = set()
        self.skipped: list[PairProblem] = []

        scan = scan_manifests(self.folder)
        for manifest, line, why in scan.bad_lines:
            logger.info("%s line %d skipped: %s", manifest, line, why)
        self._entries: dict[str, ManifestEntry] = {}
        refs: dict[str, _PairRef] = {}
        repeats: dict[str, list[_PairRef]] = {}  # ids stored more than once: every copy, first first
        for e in scan.entries:
            if e.shard in self._entries:  # the same shard listed twice: one copy is enough
                continue
            prob = _check_shard(self.folder, e, check_hash=False) if on_error == "raise" else \
                _check_shard(self.folder, e, check_hash=True)
            if prob is not None:
                if on_error == "raise":
                    raise _problem_error(prob, self.folder)
                warnings.warn(f"skipping {'unreadable' if prob.kind in KEPT_ON_DROP_KINDS else 'damaged'} "
                              f"shard: {prob}")
                self.skipped.append(prob)
                continue
            if on_error == "skip":
                self._verified.add(e.shard)
            self._entries[e.shard] = e
            for idx, pid in enumerate(e.pairs):
                ref = _PairRef(pid, e.shard, idx)
                first = refs.setdefault(pid, ref)
                if first is not ref:
                    repeats.setdefault(pid, [first]).append(ref)
        if repeats:
            self._check_repeated_ids(repeats)
        self._refs = [refs[k] for k in sorted(refs, key=_natural_key)]
        self._index = {r.pair_id: i for i, r in enumerate(self._refs)}

    def _check_repeated_ids(self, repeats: Mapping[str, Sequence[_PairRef]]) -> None:
        """Refuse (or, with ``on_error="skip"``, warn about) ids whose copies are different pairs."""
        rows: dict[str, list[dict]] = {}
        conflicts: list[tuple[_PairRef, _PairRef, str]] = []
        for pid, copies in repeats.items():
            for ref in copies:
                if ref.shard not in rows:
                    try:
                        rows[ref.shard] = _read_shard_header(self.folder / ref.shard)[0]
                    except Exception as e:
                        raise PairDataError(f"shard {self.folder / ref.shard} cannot be read ({e}); "
                                            f"{repair_hint(self.folder)}") from None
            first = rows[copies[0].shard][copies[0].index]
            for ref in copies[1:]:
                rec = rows[ref.shard][ref.index]
                differ = pair_record_differences(rec, first)
                if differ:
                    conflicts.append((copies[0], ref, _describe_differences(rec, first, differ, ref.shard,
                                                                            copies[0].shard)))
        if not conflicts:
            return
        first, later, desc = conflicts[0]
        shards = sorted({ref.shard for _, ref, _ in conflicts})
        message = (f"pair dataset {self.folder} holds {len(conflicts)} pair id(s) stored twice as different pairs, "
                   f"e.g. {first.pair_id}: {desc}; shards holding the later copies: {', '.join(shards[:4])}"
                   f"{' ...' if len(shards) > 4 else ''}. Two writers gave the same ids to different pairs (e.g. two "
                   "prompt files writing one folder: ids follow the prompt lines), so one of them would be lost: "
                   f"{repair_hint(self.folder)}, and make the set-aside pairs in a folder of their own")
        if self.on_error == "raise":
            raise PairConflictError(message)
        warnings.warn(f"{message}; reading the first copy of each")

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def ids(self) -> list[str]:
        """Pair ids in dataset order."""
        return [r.pair_id for r in self._refs]

    def _headers(self, refs: Iterable[_PairRef], shapes: bool = False) -> Iterator[tuple[list[_PairRef], Any,
                                                                                         dict[str, str]]]:
        """``(refs, tensor names, metadata)`` per shard holding ``refs``: headers only, no tensors.
        With ``shapes`` the tensor names map to their shapes (``{name: shape}``)."""
        by_shard: dict[str, list[_PairRef]] = collections.defaultdict(list)
        for ref in refs:
            by_shard[ref.shard].append(ref)
        for shard, group in by_shard.items():
            try:
                with safe_open(str(self.folder / shard), framework="pt") as f:
                    keys = _tensor_shapes(f) if shapes else set(f.keys())
                    meta = f.metadata() or {}
            except Exception as e:
                raise PairDataError(f"shard {self.folder / shard} cannot be read ({e}); "
                                    f"{repair_hint(self.folder)}") from None
            yield group, keys, meta

    def records(self, pair_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{pair id: its stored metadata}`` (seed, prompt, steps, size, ...) for the ids this
        dataset holds, read from the shards' headers only (no tensors)."""
        refs = [self._refs[self._index[pid]] for pid in pair_ids if pid in self._index]
        out: dict[str, dict[str, Any]] = {}
        for group, _, meta in self._headers(refs):
            rows = json.loads(meta[META_KEY_PAIRS])
            out.update({ref.pair_id: dict(rows[ref.index]) for ref in group})
        return out

    def shapes(self, pair_ids: Sequence[str]) -> dict[str, PairShapes]:
        """``{pair id: its tensors' shapes and conditioning key}`` (:class:`PairShapes`) for the ids
        this dataset holds, read from the shards' headers only (no tensors): cheap enough for a
        check of every pair before a run (one header read per shard)."""
        refs = [self._refs[self._index[pid]] for pid in pair_ids if pid in self._index]
        out: dict[str, PairShapes] = {}
        for group, shapes, meta in self._headers(refs, shapes=True):
            rows = json.loads(meta[META_KEY_PAIRS])
            for ref in group:
                i = ref.index
                out[ref.pair_id] = PairShapes(eps=shapes[f"{i}.eps"], z0=shapes[f"{i}.z0"],
                                              image=shapes.get(f"{i}.image"), cond_key=str(rows[i].get("cond")))
        return out

    def conditioning_shapes(self, keys: Iterable[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """``{conditioning key: (t5 shape, clip_pooled shape)}`` (``[L, D]``, ``[D]``), from the cond
        files' headers only; a missing or damaged file raises the :class:`PairDataError` reading it
        would (naming it and what to do)."""
        out: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for key in keys:
            path = self.folder / f"cond-{key}.safetensors"
            try:
                with safe_open(str(path), framework="pt") as f:
                    out[key] = (tuple(f.get_slice("t5").get_shape()), tuple(f.get_slice("clip_pooled").get_shape()))
            except Exception:  # noqa: BLE001 - reading it whole raises the error that says what is wrong
                t5, clip = self.conditioning(key)
                out[key] = (tuple(t5.shape), tuple(clip.shape))
        return out

    def stored_image_count(self) -> int:
        """How many pairs carry a stored teacher image (read from the shards' headers only)."""
        return sum(f"{ref.index}.image" in keys for group, keys, _ in self._headers(self._refs) for ref in group)

    def index_of(self, pair_id: str) -> int:
        """Position of ``pair_id`` in the dataset (KeyError if absent)."""
        return self._index[pair_id]

    def verify(self, check_hash: bool = True) -> VerifyReport:
        """:func:`verify_pairs` on this dataset's folder."""
        return verify_pairs(self.folder, check_hash=check_hash)

    def _ensure_verified(self, shard: str) -> None:
        if shard in self._verified:
            return
        e = self._entries[shard]
        prob = _check_shard(self.folder, e, check_hash=True)
        if prob is not None:
            raise _problem_error(prob, self.folder)
        self._verified.add(shard)

    def conditioning(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t5 [L, 4096], clip_pooled [768])`` for a conditioning key (small LRU cache)."""
        hit = self._cond_cache.get(key)
        if hit is not None:
            self._cond_cache.move_to_end(key)
            return hit
        pair = _load_conditioning_file(self.folder / f"cond-{key}.safetensors", key)
        self._cond_cache[key] = pair
        while len(self._cond_cache) > self._cond_cache_size:
            self._cond_cache.popitem(last=False)
        return pair

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        ref = self._refs[i]
        self._ensure_verified(ref.shard)
        path = self.folder / ref.shard
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                record = dict(json.loads(meta[META_KEY_PAIRS])[ref.index])
                keys = set(f.keys())
                item: dict[str, Any] = {
                    "id": ref.pair_id,
                    "eps": f.get_tensor(f"{ref.index}.eps"),
                    "z0": f.get_tensor(f"{ref.index}.z0"),
                }
                if self.load_image and f"{ref.index}.image" in keys:
                    item["image"] = f.get_tensor(f"{ref.index}.image")
                if self.load_trajectory and f"{ref.index}.trajectory" in keys:
                    item["trajectory"] = f.get_tensor(f"{ref.index}.trajectory")
        except Exception as e:
            raise PairDataError(f"shard {path} cannot be read ({e}); {repair_hint(self.folder)}") from None
        key = str(record.pop("cond"))
        record.pop("id", None)
        item["cond_key"] = key
        item["t5"], item["clip_pooled"] = self.conditioning(key)
        item["meta"] = record
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked (all pairs must share sizes), ids/meta as lists.

    Use as ``DataLoader(dataset, collate_fn=collate_pairs)``; the default collate would try
    to batch variable-length metadata (sigmas, prompts).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {"id": [it["id"] for it in items], "cond_key": [it["cond_key"] for it in items],
                           "meta": [it["meta"] for it in items]}
    for k in ("eps", "z0", "t5", "clip_pooled", "image", "trajectory"):
        present = [k in it for it in items]
        if not any(present):
            continue
        if not all(present):
            raise PairDataError(f"some pairs of the batch have '{k}' and some do not; "
                                "store it for every pair or for none")
        shapes = {tuple(it[k].shape) for it in items}
        if len(shapes) > 1:
            raise PairDataError(f"cannot batch '{k}' of different shapes {sorted(shapes)}; "
                                "use batch size 1 or bucket pairs by resolution")
        out[k] = torch.stack([it[k] for it in items])
    return out

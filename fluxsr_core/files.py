"""Writing a file so that a failure never leaves a half-written file under its final name, an
exclusive lock that the OS releases when its process dies, and a console that cannot fail a run."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

PathLike = Union[str, os.PathLike]
_NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, XFS, APFS, NTFS)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    The folder is created if needed. On any failure (also Ctrl-C) the temporary file is removed
    and ``path`` is left as it was; the file's data reach the disk before the rename, and the
    rename after it (:func:`fsync_file`, :func:`fsync_dir`), so a crash or a power cut leaves
    the old file or the new one, never an empty one. A new file gets mode 0o666 less the umask,
    as any file the user makes (``tempfile.mkstemp`` and safetensors give 0o600: a ComfyUI
    running as another user could not read a LoRA exported that way); a file replaced keeps its
    own mode (a private 0o600 one stays private). ``path`` a symbolic link: the file it points
    to is replaced, as Pillow, ``cp`` and editors write through it, and the link stays. The
    file is written owner-writable whatever the umask (0o222 too), its final mode set last.
    Returns ``path`` as a string.
    """
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = target.with_name(f".{target.name}.{token}.tmp")
    if len(os.fsencode(tmp.name)) > _NAME_MAX:  # a long target name: the temporary one must still fit
        tmp = target.with_name(f".fluxsr-{token}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        # The mode: the replaced file's, else what the umask made of 0o666, read back (Python
        # cannot read the umask without changing it). Set last, since some writers replace the
        # file (safetensors makes its output 0o600) and a read-only mode would stop the writing
        # and the fsync, which reopen it.
        try:
            old = os.stat(target)
            mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
        except OSError:
            mode = None
        if mode is None:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        os.chmod(tmp, mode | stat.S_IRUSR | stat.S_IWUSR)
        write(str(tmp))
        os.chmod(tmp, mode | stat.S_IRUSR | stat.S_IWUSR)
        fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # never made (a read-only folder), or cannot go: the first error is the one to tell
            pass
        raise
    return str(target)


@contextlib.contextmanager
def replaced_together(targets: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Temporary paths beside ``targets``, one each, to write the files into; when the block ends
    without error they are renamed over ``targets``, on any error (also Ctrl-C) removed, leaving
    every target as it was. For files that belong together (an exported LoRA and its bundle):
    a failed write replaces none of them. The renames come one after another: one that fails
    (no space is needed, but on Windows a target another program holds open cannot be replaced)
    leaves the targets before it replaced, and its error names the file."""
    targets = [Path(t) for t in targets]  # an iterator would be used up before the renames
    token = uuid.uuid4().hex[:8]
    staged = []
    for target in targets:
        tmp = target.with_name(f".{target.name}.{token}.tmp")
        if len(os.fsencode(tmp.name)) > _NAME_MAX:
            tmp = target.with_name(f".fluxsr-{token}-{len(staged)}.tmp")
        staged.append(tmp)
    try:
        yield staged
        for tmp in staged:
            fsync_file(tmp)
        for tmp, target in zip(staged, targets):
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for target in targets):
            fsync_dir(folder)
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


def nearest_existing(path: PathLike) -> Path:
    """``path`` itself or its nearest ancestor that is there: exists, or is a symbolic link (a
    broken one too, which the caller may want to name: a folder cannot be created through it).
    What a "can this be written?" check looks at before anything is made."""
    place = Path(path)
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    return place


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type's name when it has none), for a one-line report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to the disk. Before it is renamed over the file it replaces:
    without it, a crash soon after the rename can leave an empty or partial file in the old
    one's place (the rename reaches the disk before the data on some file systems)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows cannot fsync a read-only handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable. Not possible (nor needed) on Windows: ignored there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """:func:`fsync_file` every file under ``folder`` and :func:`fsync_dir` every folder in it,
    itself included: before a folder written by others (accelerate's checkpoint) is renamed
    into place and what it replaces is deleted."""
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(here)


def atomic_write_text(path: PathLike, text: str) -> str:
    """:func:`atomic_write` of UTF-8 text."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


# What a non-blocking lock attempt raises when another process holds the lock (flock: EWOULDBLOCK
# = EAGAIN; msvcrt.locking: EACCES or EDEADLOCK). Any other errno (ENOLCK on an NFS mount without
# a lock daemon, ...) is a failure to lock, not a lock held: reporting it as held would refuse
# every rerun too.
_LOCK_HELD_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EAGAIN)}


class LockHeldError(RuntimeError):
    """Another live process holds the lock."""


class ExclusiveFileLock:
    """An exclusive OS lock on the file ``path`` (created if missing, and left in place: removing a
    lock file that another process may be about to lock would let two processes lock two files;
    only its creator may remove it, after releasing it, when nothing else can know of it). The
    OS releases it when the process dies, so a killed run never leaves a stale lock.

    Raises :class:`LockHeldError` when another process holds it, ``OSError`` when the file cannot
    be created or locked at all (no space, a lock-less network file system).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._f = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt

                self._f.seek(0)
                msvcrt.locking(self._f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._f.close()
            if exc.errno not in _LOCK_HELD_ERRNOS:
                raise
            raise LockHeldError(f"{self.path} is locked by another live process") from None

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._f.closed:
            return
        try:
            if os.name == "nt":
                import msvcrt

                self._f.seek(0)
                msvcrt.locking(self._f.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        except OSError:
            pass
        self._f.close()


def tolerate_unencodable_console() -> None:
    """Let stdout and stderr replace what their encoding cannot write (``?``) instead of raising.

    A Windows console or a redirect in cp1252 cannot encode a table's arrows or a file name in
    another script; the ``UnicodeEncodeError`` would end a run whose work is done, before its
    files are written. A stream a caller set to a non-strict handler is left alone.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(ValueError, OSError):  # a closed or detached stream
                reconfigure(errors="replace")

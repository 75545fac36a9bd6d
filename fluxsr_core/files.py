"""Writing a file so that a failure never leaves a half-written file under its final name, and an
exclusive lock that the OS releases when its process dies."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
_NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, XFS, APFS, NTFS)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    The folder is created if needed. On any failure (also Ctrl-C) the temporary file is removed
    and ``path`` is left as it was. The temporary file is created with mode 0o666, so the umask
    applies as for any file the user makes (``tempfile.mkstemp`` and safetensors give 0o600: a
    ComfyUI running as another user could not read a LoRA exported that way). Returns ``path``
    as a string.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = target.with_name(f".{target.name}.{token}.tmp")
    if len(os.fsencode(tmp.name)) > _NAME_MAX:  # a long target name: the temporary one must still fit
        tmp = target.with_name(f".fluxsr-{token}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        # What the umask made of 0o666, read back (Python cannot read the umask without changing
        # it); set again after writing, since some writers replace the file (safetensors makes
        # its output 0o600).
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # never made (a read-only folder), or cannot go: the first error is the one to tell
            pass
        raise
    return str(target)


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

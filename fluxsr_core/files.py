"""Writing a file so that a failure never leaves a half-written file under its final name."""

from __future__ import annotations

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

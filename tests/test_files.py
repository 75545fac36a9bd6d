"""Atomic writes: whole files or none, with the permissions any file the user makes gets."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from fluxsr_core import bundle, files, lora
from fluxsr_core.settings import RunSettings
from fluxsr_training.config_io import save_config
from fluxsr_training.trainer import TrainConfig


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_permissions_not_0600(tmp_path, umask_022):
    """mkstemp's 0600 made exported LoRAs unreadable to a ComfyUI running as another user."""
    sd = {f"transformer.x_embedder.lora_{p}.weight": torch.zeros(2, 2) for p in "AB"}
    written = [
        lora.save_lora(tmp_path / "lora.safetensors", sd, RunSettings(), rank=2, alpha=2.0),
        bundle.save_bundle(tmp_path / "bundle.safetensors", torch.zeros(1, 3, 8), torch.zeros(1, 4), RunSettings()),
        save_config(TrainConfig(), tmp_path / "config.toml"),
        files.atomic_write_text(tmp_path / "deep" / "note.txt", "hello"),
    ]
    assert [_mode(p) for p in written] == [0o644] * 4
    assert (tmp_path / "deep" / "note.txt").read_text(encoding="utf-8") == "hello"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, broken)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == ["out.bin"]
    files.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_files_replaced_together_are_all_replaced_or_none(tmp_path):
    """The files of one export: on success every target is replaced; a failure while writing any
    of them (also Ctrl-C) leaves every target as it was and no temporary file. A name at the
    file system's limit still gets a temporary name that fits."""
    long_name = "l" * 255
    targets = [tmp_path / "a.bin", tmp_path / long_name]
    for t in targets:
        t.write_bytes(b"old")
    for failure in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with files.replaced_together(targets) as staged:
                staged[0].write_bytes(b"new")
                raise failure
        assert [t.read_bytes() for t in targets] == [b"old", b"old"]
        assert sorted(os.listdir(tmp_path)) == sorted(["a.bin", long_name])
    with files.replaced_together(iter(targets)) as staged:  # any iterable, a generator too
        assert all(s.parent == tmp_path and len(s.name) <= 255 for s in staged)
        for s, text in zip(staged, (b"new a", b"new l")):
            s.write_bytes(text)
    assert [t.read_bytes() for t in targets] == [b"new a", b"new l"]
    assert sorted(os.listdir(tmp_path)) == sorted(["a.bin", long_name])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the synced files through /proc (Linux)")
def test_data_reach_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Without an fsync before the rename, a crash soon after it can leave an empty file where the
    old one was (the rename reaches the disk first on some file systems): the failure a user sees
    as a lost LoRA or config after a power cut. Each written file is synced before it is renamed
    over its target, and the folder after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", os.path.basename(path), os.path.isdir(path)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst)), False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert [(e[0], e[2]) for e in events] == [("fsync", False), ("replace", False), ("fsync", True)]
    assert events[0][1].startswith(".config.yaml.") and events[1][1] == "config.yaml"
    assert events[2][1] == tmp_path.name
    events.clear()
    with files.replaced_together([tmp_path / "a.bin", tmp_path / "b.bin"]) as staged:
        for s in staged:
            s.write_bytes(b"new")
    assert [(e[0], e[2]) for e in events] == [("fsync", False)] * 2 + [("replace", False)] * 2 + [("fsync", True)]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n" and (tmp_path / "b.bin").read_bytes() == b"new"


def test_a_replaced_file_keeps_its_mode_a_link_is_written_through_and_any_umask_can_write(tmp_path):
    """--overwrite of a private 0o600 picture made it 0o644 (the umask's mode); over a symbolic
    link the link was replaced by a file while the picture it points to stayed old; under umask
    0o222 the temporary file was read-only while being written (a non-root user could not)."""
    import stat as st

    private = tmp_path / "private.png"
    private.write_bytes(b"old")
    private.chmod(0o600)
    files.atomic_write(private, lambda tmp: open(tmp, "wb").write(b"new"))
    assert private.read_bytes() == b"new" and st.S_IMODE(private.stat().st_mode) == 0o600
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    files.atomic_write(link, lambda tmp: open(tmp, "wb").write(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new"
    seen = []
    old_umask = os.umask(0o222)
    try:
        files.atomic_write(tmp_path / "fresh.png",
                           lambda tmp: (seen.append(st.S_IMODE(os.stat(tmp).st_mode)), open(tmp, "wb").write(b"x")))
    finally:
        os.umask(old_umask)
    assert seen[0] & st.S_IWUSR  # writable while written
    assert st.S_IMODE((tmp_path / "fresh.png").stat().st_mode) == 0o444  # the umask's mode in the end

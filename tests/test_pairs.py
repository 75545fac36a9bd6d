"""The pair dataset: write/read round trip, kill-and-resume, several writers, damage detection."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

from fluxsr_core import pairs as P
from fluxsr_core.pairs import (PairConflictError, PairDataError, PairDataset, PairWriter, WriterBusyError,
                               collate_pairs, conditioning_key, drop_bad_shards, pair_id, verify_pairs)

H = W = 4  # latent size of the test pairs


def make_pair(pid: str, prompt: int = 0):
    """Deterministic tensors for a pair id, so a re-run (after a kill) reproduces them."""
    g = torch.Generator().manual_seed(zlib.crc32(pid.encode()))
    eps = torch.randn(16, H, W, generator=g)
    z0 = torch.randn(16, H, W, generator=g)
    img = torch.randint(0, 256, (3, 8 * H, 8 * W), generator=g, dtype=torch.uint8)
    gc = torch.Generator().manual_seed(1000 + prompt)
    t5 = torch.randn(1, 5, 32, generator=gc)
    clip = torch.randn(1, 16, generator=gc)
    return eps, z0, t5, clip, img


def add_pair(w: PairWriter, pid: str, prompt: int = 0, with_traj: bool = False, prompt_text: str | None = None) -> bool:
    eps, z0, t5, clip, img = make_pair(pid, prompt)
    traj = torch.stack([eps, 0.5 * (eps + z0), z0]) if with_traj else None
    meta = {"seed": int(pid.split("-s")[1]), "prompt": prompt_text or f"prompt {prompt}", "steps": 2,
            "guidance": 3.5, "sigmas": torch.tensor([1.0, 0.5, 0.0]), "resolution": [8 * H, 8 * W]}
    return w.add(pid, eps, z0, t5, clip, meta, image=img, trajectory=traj)


def check_item(item, pid, prompt=0):
    eps, z0, t5, clip, img = make_pair(pid, prompt)
    assert item["id"] == pid
    assert torch.equal(item["eps"], eps) and torch.equal(item["z0"], z0)
    assert torch.equal(item["t5"], t5[0]) and torch.equal(item["clip_pooled"], clip[0])
    assert torch.equal(item["image"], img)
    assert item["cond_key"] == conditioning_key(t5, clip)
    assert item["meta"]["seed"] == int(pid.split("-s")[1])


IDS = [pair_id(p, s) for p in range(3) for s in range(3)]  # 9 pairs, 3 prompts


def prompt_of(pid: str) -> int:
    return int(pid[1:7])


# --- round trip ---------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    with PairWriter(tmp_path, "w0", shard_size=4) as w:
        for pid in IDS:
            assert add_pair(w, pid, prompt_of(pid), with_traj=True)
        assert w.buffered == 1  # 9 = 4 + 4 + 1
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert [f for f in files if f.startswith("shard-")] == [
        "shard-w0-000001.safetensors", "shard-w0-000002.safetensors", "shard-w0-000003.safetensors"]
    # stored once per prompt, named by content
    assert [f for f in files if f.startswith("cond-")] == sorted(
        f"cond-{conditioning_key(*make_pair(pair_id(k, 0), k)[2:4])}.safetensors" for k in range(3))
    lines = (tmp_path / "manifest-w0.jsonl").read_text().splitlines()
    assert [json.loads(l)["count"] for l in lines] == [4, 4, 1]

    ds = PairDataset(tmp_path, load_trajectory=True)
    assert len(ds) == 9 and ds.ids == IDS
    for pid in IDS:
        item = ds[ds.index_of(pid)]
        check_item(item, pid, prompt_of(pid))
        assert item["meta"]["sigmas"] == [1.0, 0.5, 0.0]
        assert item["meta"]["resolution"] == [32, 32] and item["meta"]["prompt"] == f"prompt {prompt_of(pid)}"
        assert item["trajectory"].shape == (3, 16, H, W)
        assert torch.equal(item["trajectory"][1], 0.5 * (item["eps"] + item["z0"]))
    assert verify_pairs(tmp_path).ok

    batch = collate_pairs([ds[0], ds[1]])
    assert batch["eps"].shape == (2, 16, H, W) and batch["t5"].shape == (2, 5, 32)
    assert batch["id"] == IDS[:2] and batch["image"].dtype == torch.uint8


def test_conditioning_key_ignores_batch_dim_and_sees_content():
    t5, clip = torch.randn(1, 3, 8), torch.randn(1, 4)
    assert conditioning_key(t5, clip) == conditioning_key(t5[0], clip[0])
    t5b = t5.clone()
    t5b[0, 0, 0] += 1
    assert conditioning_key(t5b, clip) != conditioning_key(t5, clip)


def test_duplicate_add_is_skipped_and_pending(tmp_path):
    with PairWriter(tmp_path, "w0", shard_size=2) as w:
        assert add_pair(w, IDS[0])
        assert not add_pair(w, IDS[0])          # buffered already
        assert add_pair(w, IDS[1])              # shard written
        assert not add_pair(w, IDS[1])          # stored already
        assert w.pending(IDS[:4]) == IDS[2:4]
        assert w.done_ids() == set(IDS[:2])
    assert len(PairDataset(tmp_path)) == 2


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="writer_id"):
        PairWriter(tmp_path, "bad/id")
    with PairWriter(tmp_path, "w0") as w:
        eps, z0, t5, clip, img = make_pair(IDS[0])
        with pytest.raises(ValueError, match="same shape"):
            w.add("a", eps, z0[:, :2], t5, clip)
        with pytest.raises(ValueError, match="JSON"):
            w.add("a", eps, z0, t5, clip, {"x": object()})
        with pytest.raises(ValueError, match="image must be"):
            w.add("a", eps, z0, t5, clip, image=img.permute(1, 2, 0))
        with pytest.raises(ValueError, match="reserved"):
            w.add("a", eps, z0, t5, clip, {"cond": 1})
        assert w.buffered == 0
    with pytest.raises(FileNotFoundError):
        PairDataset(tmp_path / "nope")


def test_odd_latents_and_images_of_another_size_are_refused_when_added(tmp_path):
    """A 5x5 latent (40 px: FLUX packs 2x2 latent patches) and an image that is not 8x its latent
    were stored, verified OK and failed training at its first step."""
    eps, z0, t5, clip, img = make_pair(IDS[0])
    with PairWriter(tmp_path, "w0") as w:
        with pytest.raises(ValueError, match=r"^pair a: the latent is 5x5 \(40x40 px\); FLUX packs 2x2 latent patches, "
                                             r"so the latent width and height must be even: images must be multiples "
                                             r"of 16 px$"):
            w.add("a", torch.randn(16, 5, 5), torch.randn(16, 5, 5), t5, clip)
        with pytest.raises(ValueError, match="latent is 4x3 .32x24 px.; FLUX packs 2x2"):
            w.add("a", eps[:, :3], z0[:, :3], t5, clip)
        with pytest.raises(ValueError, match=r"^pair a: the image is 40x48 px but the 4x4 latent decodes to 32x32 px; "
                                             r"store the image the latent decodes to \(or was encoded from\)$"):
            w.add("a", eps, z0, t5, clip, image=torch.rand(3, 48, 40))
        with pytest.raises(ValueError, match="the image is 32x64 px but the 4x4 latent"):
            w.add("a", eps, z0, t5, clip, image=img.repeat(1, 2, 1))
        assert w.buffered == 0 and not list(tmp_path.glob("cond-*"))   # refused before anything is stored
        assert w.add("a", eps[:, :2], z0[:, :2], t5, clip, image=img[:, :16])  # 32x16 px: fine
    assert verify_pairs(tmp_path).ok


def test_same_writer_id_twice_is_refused(tmp_path):
    with PairWriter(tmp_path, "w0"):
        with pytest.raises(WriterBusyError, match="writer id"):
            PairWriter(tmp_path, "w0")
    PairWriter(tmp_path, "w0").close()  # released on close


# --- kill and resume ----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {testdir!r})
    import test_pairs as T
    from fluxsr_core import pairs as P

    folder, mode = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    n_shards = [0]
    orig_write, orig_append = P.PairWriter._write_shard_file, P.PairWriter._append_raw

    def write_shard(self, name, data):
        if mode == "mid-temp" and n_shards[0] == 2:
            with open(os.path.join(folder, name + ".tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        orig_write(self, name, data)
        n_shards[0] += 1
        if mode == "after-rename" and n_shards[0] == 3:
            die()                       # renamed, manifest line not yet appended

    def append_raw(self, data):
        if mode == "mid-manifest" and n_shards[0] == 2:
            orig_append(self, data[: len(data) // 2])
            die()                       # a torn manifest line
        orig_append(self, data)

    P.PairWriter._write_shard_file = write_shard
    P.PairWriter._append_raw = append_raw
    w = P.PairWriter(folder, "rank0", shard_size=2, fsync=(mode == "random"))
    for pid in T.IDS:
        T.add_pair(w, pid, T.prompt_of(pid))
        print("added", pid, flush=True)
        if mode == "random":
            import time; time.sleep(0.05)
    w.close()
    print("finished", flush=True)
""")


def run_child(folder: Path, mode: str, kill_after_lines: int | None = None) -> int:
    script = folder.parent / "child.py"
    script.write_text(CHILD.format(testdir=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(folder), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_lines is not None:
        manifest = folder / "manifest-rank0.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= kill_after_lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode


def resume_and_finish(folder: Path, expect_missing_at_least: int = 1):
    with PairWriter(folder, "rank0", shard_size=2) as w:
        todo = w.pending(IDS)
        assert len(todo) >= expect_missing_at_least
        assert todo == [i for i in IDS if i not in w.done_ids()]
        for pid in todo:
            assert add_pair(w, pid, prompt_of(pid))
    report = verify_pairs(folder)
    assert report.ok, str(report)
    assert not any(p.kind in ("temp-file", "unlisted", "duplicate") for p in report.problems), str(report)
    ds = PairDataset(folder)
    assert ds.ids == IDS                                   # nothing lost, nothing twice
    entries = P.scan_manifests(folder).entries
    stored = [pid for e in entries for pid in e.pairs]
    assert sorted(stored) == sorted(IDS)                   # no pair stored twice either
    for pid in IDS:
        check_item(ds[ds.index_of(pid)], pid, prompt_of(pid))
    return report


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_killed_after_rename_before_manifest_line(tmp_path):
    folder = tmp_path / "pairs"
    assert run_child(folder, "after-rename") == -signal.SIGKILL
    listed = {e.shard for e in P.scan_manifests(folder).entries}
    assert listed == {"shard-rank0-000001.safetensors", "shard-rank0-000002.safetensors"}
    assert (folder / "shard-rank0-000003.safetensors").exists()        # complete but unlisted
    assert len(PairDataset(folder)) == 4                               # readers trust manifests only
    assert any(p.kind == "unlisted" for p in verify_pairs(folder).problems)
    before = (folder / "shard-rank0-000003.safetensors").read_bytes()
    resume_and_finish(folder)
    # adopted, never rewritten
    assert (folder / "shard-rank0-000003.safetensors").read_bytes() == before


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_an_unlisted_shard_that_cannot_be_read_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """An I/O error while hashing the shard a killed writer left unlisted (a bad sector, a
    permission) is the unreadable case: warned, left unlisted; the writer still opens."""
    import errno

    folder = tmp_path / "pairs"
    assert run_child(folder, "after-rename") == -signal.SIGKILL

    def failing_read(path, chunk=1 << 22):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(P, "_sha256_file", failing_read)
    with pytest.warns(UserWarning, match=r"shard-rank0-000003\.safetensors: unlisted shard is unreadable "
                                         r"\(\[Errno 5\] Input/output error"):
        PairWriter(folder, "rank0").close()
    assert {e.shard for e in P.scan_manifests(folder).entries} == {"shard-rank0-000001.safetensors",
                                                                   "shard-rank0-000002.safetensors"}


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_killed_while_writing_a_shard(tmp_path):
    folder = tmp_path / "pairs"
    assert run_child(folder, "mid-temp") == -signal.SIGKILL
    tmp = folder / "shard-rank0-000003.safetensors.tmp"
    assert tmp.exists()
    assert len(PairDataset(folder)) == 4                               # half-written file ignored
    assert any(p.kind == "temp-file" for p in verify_pairs(folder).problems)
    # another writer id does not touch it
    PairWriter(folder, "other").close()
    assert tmp.exists()
    resume_and_finish(folder)
    assert not tmp.exists()                                            # cleaned by its own writer id


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_killed_while_appending_the_manifest_line(tmp_path):
    folder = tmp_path / "pairs"
    assert run_child(folder, "mid-manifest") == -signal.SIGKILL
    assert not (folder / "manifest-rank0.jsonl").read_bytes().endswith(b"\n")  # torn line
    assert len(PairDataset(folder)) == 2          # shard 2 renamed, its line torn: not listed
    with pytest.warns(UserWarning, match="torn"):
        report = resume_and_finish(folder)
    assert any(p.kind == "torn-line" for p in report.problems)       # a note, not an error


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_killed_at_a_random_moment(tmp_path):
    folder = tmp_path / "pairs"
    rc = run_child(folder, "random", kill_after_lines=2)
    assert rc == -signal.SIGKILL
    with PairWriter(folder, "rank0", shard_size=2) as w:
        assert 4 <= len(w.done_ids()) < 9
    resume_and_finish(folder)


def test_writer_dropped_without_flush_loses_only_unflushed_pairs(tmp_path):
    w = PairWriter(tmp_path, "w0", shard_size=4)
    for pid in IDS[:6]:
        add_pair(w, pid, prompt_of(pid))
    with pytest.warns(UserWarning, match="unflushed"):
        del w                                     # like a crash: 2 pairs only in memory
    with PairWriter(tmp_path, "w0", shard_size=4) as w2:
        assert w2.pending(IDS) == IDS[4:]
        for pid in w2.pending(IDS):
            add_pair(w2, pid, prompt_of(pid))
    assert PairDataset(tmp_path).ids == IDS


# --- several writers ----------------------------------------------------------------------

def test_two_writers_one_folder(tmp_path):
    a = PairWriter(tmp_path, "host-rank0", shard_size=2)
    b = PairWriter(tmp_path, "host-rank1", shard_size=2)
    late = PairWriter(tmp_path, "host-rank2", shard_size=2)   # opened before anything was stored
    for k, pid in enumerate(IDS):                 # interleaved, same prompts in both
        add_pair(a if k % 2 == 0 else b, pid, prompt_of(pid))
    # b's flushes read a's manifest: it knows IDS[0] is stored and does not take it again
    assert not b.add(IDS[0], *make_pair(IDS[0])[:4], {"seed": 0})
    # late has not looked since it opened: it takes the same pairs (same metadata), and its flush,
    # reading the manifests first, stores neither twice
    assert add_pair(late, IDS[0], 0) and add_pair(late, IDS[2], 0)
    assert late.flush() is None and late.stored_by_others == [IDS[0], IDS[2]] and late.written_ids == []
    a.close()
    b.close()
    late.close()
    assert b.stored_by_others == [] and sorted(a.written_ids + b.written_ids) == sorted(IDS)
    assert not list(tmp_path.glob("shard-host-rank2-*"))
    assert len(list(tmp_path.glob("cond-*.safetensors"))) == 3
    assert len(list(tmp_path.glob("manifest-*.jsonl"))) == 2
    ds = PairDataset(tmp_path)
    assert ds.ids == IDS
    for pid in IDS:
        check_item(ds[ds.index_of(pid)], pid, prompt_of(pid))   # a's copy of IDS[0], the only one
    report = verify_pairs(tmp_path)
    assert report.ok and report.pairs == 9 and report.problems == []
    # a fresh writer sees the other writers' work
    with PairWriter(tmp_path, "comfyui-graph") as c:
        assert c.pending(IDS + ["p000009-s0"]) == ["p000009-s0"]


def test_order_does_not_depend_on_writers(tmp_path):
    ids = [pair_id(0, s) for s in (10, 9, 100, 2)]
    with PairWriter(tmp_path / "one", "w") as w:
        for pid in ids:
            add_pair(w, pid)
    with PairWriter(tmp_path / "two", "b") as b, PairWriter(tmp_path / "two", "a") as a:
        for k, pid in enumerate(ids):
            add_pair(a if k % 2 else b, pid)
    expect = [pair_id(0, s) for s in (2, 9, 10, 100)]
    assert PairDataset(tmp_path / "one").ids == expect == PairDataset(tmp_path / "two").ids


def test_record_differences_compare_what_defines_a_pair():
    rec = {"id": "p000000-s0", "cond": "aa", "seed": 0, "prompt": "a cat", "steps": 2, "teacher": "flux1-dev"}
    assert P.pair_record_differences(rec, dict(rec)) == []
    # where a copy was stored (its conditioning's last bits, the teacher file's name) is not the pair
    assert P.pair_record_differences(rec, {**rec, "cond": "bb", "teacher": "/models/flux"}) == []
    assert P.pair_record_differences(rec, {"seed": 0, "newer_key": 1}) == []   # keys one copy lacks: not compared
    assert P.pair_record_differences(rec, {**rec, "prompt": "a car", "steps": 3}) == ["prompt", "steps"]


def _copy_writer_files(src: Path, dst: Path, writer: str) -> None:
    """Put one writer's shards and manifest (and the cond files) of folder ``src`` into ``dst``, as two
    writers racing on one folder, or a user merging two folders, leave them."""
    import shutil

    for f in list(src.glob(f"shard-{writer}-*")) + list(src.glob(f"manifest-{writer}.jsonl")) + list(src.glob("cond-*")):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def test_a_true_duplicate_is_a_note_and_a_conflict_an_error_that_readers_refuse(tmp_path):
    """Ids follow prompt lines, so two prompt files written into one folder give one id to two pairs:
    readers would silently see only the first. The same pair stored twice is harmless."""
    folder, other = tmp_path / "pairs", tmp_path / "other"
    with PairWriter(folder, "a", shard_size=3) as a:
        for pid in IDS[:3]:
            add_pair(a, pid, 0)
    with PairWriter(other, "b", shard_size=2) as b:
        add_pair(b, IDS[0], 0)                                        # the same pair as a's
        b.flush()
        add_pair(b, IDS[1], 0, prompt_text="a car")                   # the same id, another pair
        add_pair(b, IDS[5], 1)
    _copy_writer_files(other, folder, "b")
    a1, b1, b2 = "shard-a-000001.safetensors", "shard-b-000001.safetensors", "shard-b-000002.safetensors"

    report = verify_pairs(folder)
    assert [(p.kind, Path(p.path).name) for p in report.problems] == [("duplicate", b1), ("conflict", b2)]
    assert not report.ok and report.bad_shards() == {b2} and report.pairs == 4
    assert report.errors[0].message.startswith(
        f"1 of its pair ids are also in other shards as other pairs, e.g. {IDS[1]}: prompt 'a car' (here) vs "
        f"'prompt 0' ({a1}). Two writers gave the same ids to different pairs")
    assert "--drop-bad" in report.errors[0].message

    with pytest.raises(PairConflictError) as info:
        PairDataset(folder)
    text = str(info.value)
    assert text.startswith(f"pair dataset {folder} holds 1 pair id(s) stored twice as different pairs, e.g. {IDS[1]}: "
                           f"prompt 'a car' ({b2}) vs 'prompt 0' ({a1}); shards holding the later copies: {b2}.")
    assert f"`fluxsr-train verify {folder} --drop-bad`" in text and "folder of their own" in text
    with pytest.warns(UserWarning, match="stored twice as different pairs"):
        ds = PairDataset(folder, on_error="skip")
    assert ds.ids == [IDS[0], IDS[1], IDS[2], IDS[5]]
    assert ds[ds.index_of(IDS[1])]["meta"]["prompt"] == "prompt 0"   # the first copy

    # --drop-bad: the shard with the later copy leaves the dataset (its file kept in quarantine/)
    b2_bytes = (folder / b2).read_bytes()
    dropped = drop_bad_shards(folder)
    assert dropped.dropped == [(b2, "conflict", 2)] and dropped.busy == []
    assert (folder / "quarantine" / b2).read_bytes() == b2_bytes and not (folder / b2).exists()
    assert [json.loads(line)["shard"] for line in (folder / "manifest-b.jsonl").read_text().splitlines()] == [b1]
    assert verify_pairs(folder).ok and PairDataset(folder).ids == IDS[:3]


def test_a_writer_refuses_a_pair_another_writer_stored_as_another_pair(tmp_path, caplog):
    a = PairWriter(tmp_path, "a", shard_size=1)
    b = PairWriter(tmp_path, "b", shard_size=2)                      # opened before a stored anything
    add_pair(a, IDS[0], 0)
    add_pair(b, IDS[0], 0, prompt_text="a car")
    with pytest.raises(PairConflictError) as info:
        add_pair(b, IDS[1], 0)                                       # the shard is full: the flush checks
    assert str(info.value) == (
        f"pair {IDS[0]} is already stored in {tmp_path / 'shard-a-000001.safetensors'} (writer a) as another pair: "
        "prompt 'a car' (this writer) vs 'prompt 0' (stored); 1 such pair(s) were not stored. Two writers are giving "
        "the same ids to different pairs (e.g. two prompt files writing one folder: ids follow the prompt lines); "
        "make the other pairs in a folder of their own")
    assert b.written_ids == [IDS[1]] and b.buffered == 0             # the other pair of the shard is kept
    a.close()
    b.close()
    assert verify_pairs(tmp_path).ok and verify_pairs(tmp_path).problems == []
    assert PairDataset(tmp_path).records([IDS[0]])[IDS[0]]["prompt"] == "prompt 0"

    # an error already in flight is not replaced by the conflict found when the writer closes
    c = PairWriter(tmp_path, "c", shard_size=4)
    with caplog.at_level("WARNING", logger="fluxsr_core.pairs"), pytest.raises(RuntimeError, match="^stopped$"):
        with c:
            with PairWriter(tmp_path, "d", shard_size=1) as d:
                add_pair(d, IDS[2], 0)
            add_pair(c, IDS[2], 0, prompt_text="a boat")
            raise RuntimeError("stopped")
    assert any(f"pair {IDS[2]} is already stored" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob("shard-c-*"))


# --- damage -------------------------------------------------------------------------------

def test_verify_names_a_stored_image_of_another_size_and_drop_bad_sets_it_aside(tmp_path, monkeypatch):
    """Written before PairWriter refused them, such pairs passed verify and failed training; the
    sizes come from the shard headers (PairDataset.shapes, no tensor read)."""
    with monkeypatch.context() as m:
        m.setattr(P, "image_size_problem", lambda *a: None)          # a writer from before the check
        with PairWriter(tmp_path, "w0", shard_size=3) as w:
            for k, pid in enumerate(IDS[:6]):
                eps, z0, t5, clip, img = make_pair(pid)
                w.add(pid, eps, z0, t5, clip, image=torch.zeros(3, 64, 64, dtype=torch.uint8) if k == 4 else img)
    bad = tmp_path / "shard-w0-000002.safetensors"
    report = verify_pairs(tmp_path)
    assert [(p.kind, p.path) for p in report.errors] == [("size", str(bad))]
    assert report.errors[0].message == (
        f"1 of its pairs store an image of another size than their latent, e.g. {IDS[4]}: the image is 64x64 px but "
        "the 4x4 latent decodes to 32x32 px. Training on them fails; --drop-bad sets this shard aside (then make its "
        "pairs again), or train with data.teacher_image=decode, which decodes z_0 and reads no stored image")
    ds = PairDataset(tmp_path)                                       # still readable, e.g. to decode z_0
    shapes = ds.shapes([IDS[3], IDS[4], "not-there"])
    key = conditioning_key(*make_pair(IDS[0])[2:4])
    assert shapes == {IDS[3]: P.PairShapes((16, H, W), (16, H, W), (3, 32, 32), key),
                      IDS[4]: P.PairShapes((16, H, W), (16, H, W), (3, 64, 64), key)}
    assert ds.conditioning_shapes([key]) == {key: ((5, 32), (16,))}
    dropped = drop_bad_shards(tmp_path, report)
    assert dropped.dropped == [(bad.name, "size", 3)] and (tmp_path / "quarantine" / bad.name).is_file()
    assert verify_pairs(tmp_path).ok and PairDataset(tmp_path).ids == IDS[:3]
    (tmp_path / f"cond-{key}.safetensors").unlink()
    with pytest.raises(PairDataError, match=f"conditioning file .*cond-{key}.safetensors is missing"):
        ds.conditioning_shapes([key])


def test_verify_names_an_odd_latent_written_by_another_tool(tmp_path, monkeypatch):
    """PairWriter refuses odd latents (FLUX packs 2x2 patches); a shard written without that
    check passed verify and failed at training start-up only."""
    with monkeypatch.context() as m:
        m.setattr(P, "latent_size_problem", lambda *a: None)         # another tool's writer
        with PairWriter(tmp_path, "w0", shard_size=2) as w:
            for k, pid in enumerate(IDS[:4]):
                eps, z0, t5, clip, img = make_pair(pid)
                if k == 3:
                    eps, z0, img = eps[:, :3], z0[:, :3], img[:, :24]
                w.add(pid, eps, z0, t5, clip, image=img)
    report = verify_pairs(tmp_path)
    assert [(p.kind, p.path) for p in report.errors] == [("size", str(tmp_path / "shard-w0-000002.safetensors"))]
    assert report.errors[0].message.startswith(
        f"1 of its pairs have a latent FLUX cannot take, e.g. {IDS[3]}: the latent is 4x3 (32x24 px); FLUX packs 2x2 "
        "latent patches")
    assert drop_bad_shards(tmp_path, report).dropped == [("shard-w0-000002.safetensors", "size", 2)]
    assert verify_pairs(tmp_path).ok


def _three_shards(folder: Path):
    with PairWriter(folder, "w0", shard_size=3) as w:
        for pid in IDS:
            add_pair(w, pid, prompt_of(pid))
    return sorted(folder.glob("shard-*.safetensors"))


def test_corrupted_shard_found_by_verify_and_by_reading(tmp_path):
    shards = _three_shards(tmp_path)
    bad = shards[1]
    data = bytearray(bad.read_bytes())
    data[-20] ^= 0xFF                              # a flipped byte inside tensor data
    bad.write_bytes(bytes(data))
    report = verify_pairs(tmp_path)
    assert not report.ok
    assert [(p.kind, Path(p.path).name) for p in report.errors] == [("hash", bad.name)]
    assert report.bad_shards() == {bad.name}

    ds = PairDataset(tmp_path)                     # size is right: found on first read
    ds[0]                                          # a pair of a good shard reads fine
    with pytest.raises(PairDataError, match=bad.name):
        ds[3]
    with pytest.warns(UserWarning, match=bad.name):
        ds_skip = PairDataset(tmp_path, on_error="skip")
    assert ds_skip.ids == IDS[:3] + IDS[6:]
    assert [Path(p.path).name for p in ds_skip.skipped] == [bad.name]


def test_truncated_shard_found(tmp_path):
    shards = _three_shards(tmp_path)
    bad = shards[2]
    bad.write_bytes(bad.read_bytes()[:-100])
    report = verify_pairs(tmp_path)
    assert [(p.kind, Path(p.path).name) for p in report.errors] == [("truncated", bad.name)]
    with pytest.raises(PairDataError) as info:
        PairDataset(tmp_path)
    assert str(info.value) == (
        f"shard has {bad.stat().st_size} bytes, the manifest says {bad.stat().st_size + 100} (listed in "
        f"manifest-w0.jsonl line 3): {bad}. run `fluxsr-train verify {tmp_path}` to list every problem, then "
        f"`fluxsr-train verify {tmp_path} --drop-bad` to set the bad shards aside (into {tmp_path / 'quarantine'}) "
        "and take them out of the dataset; `fluxsr-train pairs` with the same arguments then makes their pairs again")
    assert "verify_pairs(" not in str(info.value) and "on_error" not in str(info.value)  # no Python-only advice
    with pytest.warns(UserWarning):
        assert len(PairDataset(tmp_path, on_error="skip")) == 6


def test_garbage_shard_with_matching_size_is_unreadable(tmp_path):
    shards = _three_shards(tmp_path)
    bad = shards[0]
    bad.write_bytes(b"\x00" * bad.stat().st_size)   # size right, header destroyed
    kinds = {p.kind for p in verify_pairs(tmp_path, check_hash=False).errors}
    assert kinds == {"unreadable"}
    assert {p.kind for p in verify_pairs(tmp_path).errors} == {"hash"}


def test_manifest_naming_a_missing_shard(tmp_path):
    shards = _three_shards(tmp_path)
    shards[0].unlink()
    report = verify_pairs(tmp_path)
    assert [(p.kind, Path(p.path).name) for p in report.errors] == [("missing", shards[0].name)]
    assert "manifest-w0.jsonl line 1" in report.errors[0].message
    with pytest.raises(PairDataError, match=f"missing.*{shards[0].name}"):
        PairDataset(tmp_path)


def test_drop_bad_shards_sets_them_aside_and_the_writer_makes_their_pairs_again(tmp_path, monkeypatch):
    shards = _three_shards(tmp_path)                                 # w0: 3 shards of 3 pairs
    truncated = shards[1].read_bytes()[:-100]
    shards[1].write_bytes(truncated)
    shards[2].unlink()
    manifest = tmp_path / "manifest-w0.jsonl"
    with open(manifest, "ab") as f:
        f.write(b'{"shard": "shard-w0-0000')                         # a line torn by a kill: kept as it is

    # a kill between moving the shards and rewriting the manifest: a listed shard is missing, no more
    monkeypatch.setattr(P, "_rewrite_manifest_without", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        drop_bad_shards(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "quarantine" / shards[1].name).read_bytes() == truncated
    assert {p.kind for p in verify_pairs(tmp_path).errors} == {"missing"}

    dropped = drop_bad_shards(tmp_path)                              # run again: finishes the job
    assert dropped.dropped == [(shards[1].name, "missing", 3), (shards[2].name, "missing", 3)]
    assert dropped.pairs_dropped == 6 and dropped.busy == []
    assert [json.loads(line)["shard"] for line in manifest.read_text().splitlines()[:-1]] == [shards[0].name]
    assert manifest.read_bytes().endswith(b'\n{"shard": "shard-w0-0000')
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == [shards[1].name]
    report = verify_pairs(tmp_path)
    assert report.ok and [p.kind for p in report.problems] == ["torn-line"]
    assert PairDataset(tmp_path).ids == IDS[:3]
    with pytest.warns(UserWarning, match="torn"):                    # the writer closes the torn line
        with PairWriter(tmp_path, "w0", shard_size=3) as w:
            assert w.pending(IDS) == IDS[3:]                         # the dropped pairs are missing now
            for pid in w.pending(IDS):
                add_pair(w, pid, prompt_of(pid))
    ds = PairDataset(tmp_path)
    assert ds.ids == IDS and verify_pairs(tmp_path).ok
    for pid in IDS:
        check_item(ds[ds.index_of(pid)], pid, prompt_of(pid))


def test_drop_bad_shards_leaves_a_running_writer_alone(tmp_path):
    shards = _three_shards(tmp_path)
    shards[0].write_bytes(shards[0].read_bytes()[:-10])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with PairWriter(tmp_path, "w0"):                                 # w0 runs: its manifest is its own
        dropped = drop_bad_shards(tmp_path)
    assert dropped.busy == ["w0"] and dropped.dropped == [] and dropped.moved == []
    assert "left alone: writer w0 is running (its lock file .lock-w0 is held)" in str(dropped)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "quarantine").exists()
    assert drop_bad_shards(tmp_path).dropped == [(shards[0].name, "truncated", 3)]   # once it has stopped


def _unreadable_from_disk(monkeypatch, target: Path, err: int = errno.EIO) -> None:
    """Make the system refuse to read ``target`` (its stat still works), as a failing disk or a
    file without read permission does: opening it raises OSError ``err``."""
    real_open, real_safe_open = open, P.safe_open

    def refuse(path) -> None:
        if Path(path) == target:
            raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(P, "open", lambda path, *a, **k: refuse(path) or real_open(path, *a, **k), raising=False)
    monkeypatch.setattr(P, "safe_open", lambda path, *a, **k: refuse(path) or real_safe_open(path, *a, **k))


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES])
def test_a_shard_the_system_cannot_read_is_reported_and_left_in_place(tmp_path, monkeypatch, capsys, err):
    """An OSError other than a missing file while checking a shard used to crash verify, skip-mode
    reading and --drop-bad with a traceback. It is the problem "io-error", naming the error;
    --drop-bad leaves such a shard where it is (it may be whole: the fix is the disk or the
    permissions, not sampling its pairs again) and says so."""
    from fluxsr_training.cli import main as cli_main

    shards = _three_shards(tmp_path)
    bad = shards[1]
    _unreadable_from_disk(monkeypatch, bad, err)
    report = verify_pairs(tmp_path)
    assert [(p.kind, Path(p.path).name) for p in report.errors] == [("io-error", bad.name)]
    assert os.strerror(err) in report.errors[0].message and "manifest-w0.jsonl line 2" in report.errors[0].message
    assert report.pairs == 6                                         # the other shards were read

    with pytest.warns(UserWarning, match=f"skipping unreadable shard: \\[io-error\\] {bad}"):
        ds = PairDataset(tmp_path, on_error="skip")
    assert ds.ids == IDS[:3] + IDS[6:] and [p.kind for p in ds.skipped] == ["io-error"]
    with pytest.raises(PairDataError, match=f"{os.strerror(err)}.*fix its permissions or the disk") as info:
        PairDataset(tmp_path)                                        # the header read fails too
    assert "--drop-bad" not in str(info.value)                       # no advice that would not help

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p != bad}
    assert cli_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"[io-error] {bad}: shard cannot be read from disk ({os.strerror(err)})" in out
    assert "1 of them could not be read from disk (io-error): --drop-bad leaves those in place" in out
    assert cli_main(["verify", str(tmp_path), "--drop-bad"]) == 1
    out = capsys.readouterr().out
    assert f"dropped 0 shards (0 pairs) from {tmp_path}" in out
    assert f"left in place (not set aside, it may be whole): {bad.name}: shard cannot be read from disk" in out
    assert "verify: still not usable" in out
    assert bad.exists() and not (tmp_path / "quarantine").exists()   # nothing moved, the manifest as it was
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p != bad} == before

    monkeypatch.undo()                                               # the disk is back: the shard was whole
    assert verify_pairs(tmp_path).ok and PairDataset(tmp_path).ids == IDS


def test_a_conditioning_file_the_system_cannot_read_is_not_set_aside(tmp_path, monkeypatch):
    _three_shards(tmp_path)
    cond = sorted(tmp_path.glob("cond-*.safetensors"))[0]
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
                        if self == cond else real_read_bytes(self))
    report = verify_pairs(tmp_path)
    assert [(p.kind, p.path) for p in report.errors] == [("io-error", str(cond))]
    assert "cannot be read from disk (Input/output error)" in report.errors[0].message
    dropped = drop_bad_shards(tmp_path, report)
    assert dropped.moved == [] and cond.exists()


def test_corrupted_conditioning_found(tmp_path):
    _three_shards(tmp_path)
    cond = sorted(tmp_path.glob("cond-*.safetensors"))[0]
    from safetensors.torch import load_file, save_file
    t = load_file(cond)
    t["t5"] = t["t5"] + 1
    save_file(t, cond)
    report = verify_pairs(tmp_path)
    assert [p.kind for p in report.errors] == ["bad-cond"]
    ds = PairDataset(tmp_path)
    # found at read time (training): the error names the file and says what to do
    with pytest.raises(PairDataError) as info:
        for i in range(len(ds)):
            ds[i]
    assert str(info.value) == (f"conditioning file {cond} is damaged (its content does not hash to "
                               f"{cond.name[5:-12]}: corrupted); delete it and run `fluxsr-train pairs` again on "
                               f"{tmp_path} with the same prompts and settings, which encodes the prompt again and "
                               "stores it (the pairs are kept)")
    cond.unlink()
    assert [p.kind for p in verify_pairs(tmp_path).errors] == ["missing-cond"]
    with pytest.raises(PairDataError, match=rf"{cond.name} is missing .*: run `fluxsr-train pairs` again on "):
        PairDataset(tmp_path)[0]


def _cond_content(path: Path) -> tuple[dict, dict]:
    """A cond file's tensors and metadata (its bytes vary: safetensors orders metadata keys at random)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()  # clone: not backed by the file


def _same_cond(path: Path, content: tuple[dict, dict]) -> bool:
    tensors, meta = _cond_content(path)
    return (meta == content[1] and tensors.keys() == content[0].keys()
            and all(torch.equal(tensors[k], content[0][k]) for k in tensors))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped":                                   # same size, a tensor byte changed
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":                                   # e.g. lost in a power cut before its data reached disk
        path.write_bytes(b"")
    else:                                                  # a whole file of another conditioning
        with PairWriter(path.parent / "other", "x", fsync=False) as w:
            key = w.store_conditioning(torch.ones(2, 32), torch.ones(16))
        path.write_bytes((path.parent / "other" / f"cond-{key}.safetensors").read_bytes())


@pytest.mark.parametrize("how, why", [
    ("flipped", "its content does not hash to {key}: corrupted"),
    ("truncated", "it cannot be read ("),                              # then safetensors' own words
    ("empty", "it cannot be read ("),
    ("other-content", "its content does not hash to {key}: corrupted"),
])
def test_a_damaged_conditioning_file_is_replaced_when_stored_again(tmp_path, caplog, how, why):
    """Cond files are content-addressed: a writer that has the tensors of a damaged one (an
    earlier run's) writes the right content over it, instead of failing once sampling reads it."""
    folder = tmp_path / "pairs"
    _, _, t5, clip, _ = make_pair(IDS[0])
    with PairWriter(folder, "w0") as w:
        key = w.store_conditioning(t5, clip)
    cond = folder / f"cond-{key}.safetensors"
    good = _cond_content(cond)
    _damage(cond, how)
    with caplog.at_level("WARNING", logger="fluxsr_core.pairs"), PairWriter(folder, "w1") as w:
        assert w.store_conditioning(t5[0], clip[0]) == key
        t5_back, clip_back = w.load_conditioning(key)
    assert _same_cond(cond, good) and torch.equal(t5_back, t5[0]) and torch.equal(clip_back, clip[0])
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"conditioning file {cond} is damaged ({why.format(key=key)}")
    assert warning.endswith("); replacing it with the conditioning in hand (its name is the hash of that content)")
    assert not list(folder.glob("*.tmp")) and verify_pairs(folder).ok

    # What finds which damage: the full check all of it, the header check (cheap) all but wrong bytes.
    _damage(cond, how)
    with PairWriter(folder, "w2") as w:
        assert w.conditioning_problem(key).startswith(why.format(key=key))
        assert (w.conditioning_problem(key, full=False) is None) == (how in ("flipped", "other-content"))
        cond.unlink()
        assert w.conditioning_problem(key) == w.conditioning_problem(key, full=False) == "it is missing"


def test_a_whole_conditioning_file_is_reused_not_rewritten_and_repairs_may_race(tmp_path, monkeypatch):
    folder = tmp_path / "pairs"
    _, _, t5, clip, _ = make_pair(IDS[0])
    with PairWriter(folder, "w0") as w:
        key = w.store_conditioning(t5, clip)
    cond = folder / f"cond-{key}.safetensors"
    inode = cond.stat().st_ino
    with PairWriter(folder, "w1") as w:
        assert w.store_conditioning(t5, clip) == key
    assert cond.stat().st_ino == inode                                  # checked, kept as it was

    # Two ranks find it damaged at once: both rename the same content over it, in either order.
    good = _cond_content(cond)
    _damage(cond, "flipped")
    a, b = PairWriter(folder, "rank0"), PairWriter(folder, "rank1")
    check = P.PairWriter.conditioning_problem

    def rank0_repairs_while_rank1_decides(self, k, full=True):
        problem = check(self, k, full)
        if self is b:
            assert a.store_conditioning(t5, clip) == key and _same_cond(cond, good)
        return problem

    monkeypatch.setattr(P.PairWriter, "conditioning_problem", rank0_repairs_while_rank1_decides)
    assert b.store_conditioning(t5, clip) == key
    a.close()
    b.close()
    assert _same_cond(cond, good) and not list(folder.glob("*.tmp"))


# --- disk full, header limit --------------------------------------------------------------

class DiskFull:
    """Simulated ENOSPC: the write named by ``kind`` fails half-way at its ``at``-th occurrence
    (the half is really written, as a full disk does), and every write after it fails too."""

    def __init__(self, monkeypatch, kind: str, at: int):
        self.kind, self.at, self.seen, self.full = kind, at, 0, False
        self.failed: list[str] = []   # names whose writes failed, in order
        orig_write, orig_append = P._write_file_durably, P.PairWriter._append_raw

        def write_file(path, data, fsync):
            self._maybe_fail(Path(path).name, lambda part: orig_write(path, part, fsync), data)
            orig_write(path, data, fsync)

        def append_raw(writer, data):
            self._maybe_fail(writer.manifest_path.name, lambda part: orig_append(writer, part), data)
            orig_append(writer, data)

        monkeypatch.setattr(P, "_write_file_durably", write_file)
        monkeypatch.setattr(P.PairWriter, "_append_raw", append_raw)

    def _maybe_fail(self, name: str, write_part, data: bytes) -> None:
        if not self.full and name.startswith(self.kind):
            self.seen += 1
            if self.seen == self.at:
                write_part(data[: len(data) // 2])
                self.full = True
        if self.full:
            self.failed.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind, at, expect_file, stored", [
    ("cond-", 2, "cond-{cond1}.safetensors", 2),               # prompt 1's conditioning (pair 4)
    ("shard-", 2, "shard-rank0-000002.safetensors", 2),        # the second shard's data
    ("manifest-", 2, "manifest-rank0.jsonl", 2),               # the second shard's manifest line
])
def test_disk_full_is_one_clear_error_nothing_half_written_and_a_rerun_finishes(tmp_path, monkeypatch, kind, at,
                                                                               expect_file, stored):
    folder = tmp_path / "pairs"
    disk = DiskFull(monkeypatch, kind, at)
    with pytest.raises(P.PairWriteError) as info:
        with PairWriter(folder, "rank0", shard_size=2) as w:
            for pid in IDS:
                add_pair(w, pid, prompt_of(pid))
    failed_path = folder / expect_file.format(cond1=conditioning_key(*make_pair(IDS[3], 1)[2:4]))
    assert str(info.value) == (f"no space left on device writing {failed_path}; free space and run the same "
                               "command again: the finished pairs are kept")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert info.value.filename == str(failed_path)
    # one failed write, no second attempt (no retry on close: no double error, no "refusing to overwrite")
    assert len(disk.failed) == 1 and disk.failed[0].startswith(failed_path.name)  # itself or its temp file
    assert not list(folder.glob("*.tmp"))                              # the half-written temp file is gone
    if kind != "manifest-":                                            # nothing under the final name either
        assert not failed_path.exists()
    assert len(PairDataset(folder)) == stored and verify_pairs(folder).ok

    monkeypatch.undo()                                                 # space freed: the same run again
    if kind == "manifest-":
        with pytest.warns(UserWarning, match="torn"):                  # the half line, closed and skipped
            resume_and_finish(folder)
    else:
        resume_and_finish(folder)


def test_a_writer_stops_after_a_failed_write(tmp_path, monkeypatch):
    DiskFull(monkeypatch, "shard-", 1)
    w = PairWriter(tmp_path, "w0", shard_size=1)
    with pytest.raises(P.PairWriteError, match="no space left on device"):
        add_pair(w, IDS[0])
    with pytest.raises(RuntimeError, match="stopped after a failed write .no space left.*same writer id"):
        add_pair(w, IDS[1])
    w.close()                                                          # releases the id, writes nothing
    monkeypatch.undo()
    with PairWriter(tmp_path, "w0", shard_size=1) as w2:
        assert w2.pending(IDS[:2]) == IDS[:2]


def _fail_os_mkdir_at(monkeypatch, target: Path, err: int = errno.ENOSPC):
    mkdir = os.mkdir

    def mkdir_or_fail(path, *a, **k):
        if Path(path) == target:
            raise OSError(err, os.strerror(err), str(path))
        mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir_or_fail)


def _fail_lock_file(monkeypatch, err: int = errno.ENOSPC):
    """Creating ``.lock-*`` fails; every other file of the module opens as usual."""
    def open_or_fail(path, *a, **k):
        if Path(path).name.startswith(".lock-"):
            raise OSError(err, os.strerror(err), str(path))
        return open(path, *a, **k)

    from fluxsr_core import files  # where the lock file is opened

    monkeypatch.setattr(files, "open", open_or_fail, raising=False)


def test_disk_full_when_opening_is_the_same_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """Making the dataset folder or the writer's lock file can fail too (ENOSPC, a quota): one
    PairWriteError naming the path, as for any write, and no folder or file left half-made."""
    folder = tmp_path / "new" / "pairs"
    hint = "free space and run the same command again: the finished pairs are kept"
    _fail_os_mkdir_at(monkeypatch, folder)
    with pytest.raises(P.PairWriteError) as info:
        PairWriter(folder, "rank0")
    assert str(info.value) == f"no space left on device writing {folder}; {hint}"
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(folder)
    assert list(tmp_path.iterdir()) == []                              # "new", made on the way, removed too
    monkeypatch.undo()

    _fail_lock_file(monkeypatch)
    with pytest.raises(P.PairWriteError) as info:
        PairWriter(folder, "rank0")
    assert str(info.value) == f"no space left on device writing {folder / '.lock-rank0'}; {hint}"
    assert list(tmp_path.iterdir()) == []                              # the folders it made: removed
    monkeypatch.undo()

    with PairWriter(folder, "rank0", shard_size=2) as w:               # an existing dataset: kept as it is
        for pid in IDS[:2]:
            add_pair(w, pid, prompt_of(pid))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _fail_lock_file(monkeypatch, errno.EDQUOT)
    with pytest.raises(P.PairWriteError, match=rf"^disk quota exceeded writing {folder / '.lock-rank1'}; free space "):
        PairWriter(folder, "rank1")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    resume_and_finish(folder)                                          # the rerun goes on


@pytest.mark.skipif(os.name == "nt", reason="fcntl")
def test_a_lock_that_cannot_be_taken_is_not_reported_as_a_busy_writer(tmp_path, monkeypatch):
    """flock fails with ENOLCK on NFS without a lock daemon: not "another live process" (which
    every rerun would repeat) but what failed, on which file."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(P.PairWriteError) as info:
        PairWriter(tmp_path, "w0")
    assert str(info.value) == (f"{os.strerror(errno.ENOLCK)} writing {tmp_path / '.lock-w0'}; fix that and run the "
                               "same command again: the finished pairs are kept")
    assert not isinstance(info.value, WriterBusyError)


def _header_bytes(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_shards_are_cut_to_fit_the_safetensors_header_limit(tmp_path, monkeypatch):
    """A shard's header holds every pair's prompt: with long prompts a shard is started early
    instead of writing a header safetensors refuses; one pair that cannot fit is refused."""
    monkeypatch.setattr(P, "SAFETENSORS_MAX_HEADER_BYTES", 20_000)
    prompt = 'a "quoted" caf\u00e9 \U0001f600 ' * 200                   # escaping makes it ~2.5x longer
    with PairWriter(tmp_path, "w0", shard_size=8) as w:
        for pid in IDS:
            eps, z0, t5, clip, img = make_pair(pid)
            assert w.add(pid, eps, z0, t5, clip, {"prompt": prompt}, image=img)
        big = "x" * 20_000
        with pytest.raises(ValueError, match=f"pair big-s0: .* bytes of the shard header, more than a safetensors "
                                             "header may hold .20,000 bytes.; shorten the prompt"):
            w.add("big-s0", eps, z0, t5 + 1, clip, {"prompt": big})
        assert w.pending(["big-s0"]) == ["big-s0"]
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) > 2                                             # shard_size alone would give 8 + 1
    assert all(_header_bytes(s) <= 20_000 for s in shards)
    assert len(list(tmp_path.glob("cond-*.safetensors"))) == 1         # nothing stored for the refused pair
    ds = PairDataset(tmp_path)
    assert ds.ids == sorted(IDS) and all(r["prompt"] == prompt for r in ds.records(IDS).values())
    assert verify_pairs(tmp_path).ok


def test_the_header_limit_is_the_one_safetensors_enforces(tmp_path):
    """A 13 MB prompt in 8 pairs of one shard (a 104 MB header) used to fail after sampling."""
    prompt = "a photo of a cat " * 800_000                              # 13.6 MB
    with PairWriter(tmp_path, "w0", shard_size=8, fsync=False) as w:
        for s in range(8):
            eps, z0, t5, clip, _ = make_pair(pair_id(0, s))
            w.add(pair_id(0, s), eps, z0, t5, clip, {"prompt": prompt})
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) == 2 and all(_header_bytes(s) <= P.SAFETENSORS_MAX_HEADER_BYTES for s in shards)
    assert len(PairDataset(tmp_path)) == 8
    # safetensors' own limit, just above ours: a reader refuses such a file (newer versions also
    # refuse to write one; older ones wrote what no version can read back)
    import struct

    from safetensors import SafetensorError, safe_open

    header = json.dumps({"__metadata__": {"m": "x" * P.SAFETENSORS_MAX_HEADER_BYTES},
                         "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    too_large = tmp_path / "too-large.safetensors"
    too_large.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(SafetensorError, match="(?i)header ?too ?large"):
        safe_open(str(too_large), framework="pt")


def test_a_missing_or_file_dataset_folder_is_named_as_such(tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo\n")
    for open_it in (P.PairDataset, P.verify_pairs):
        with pytest.raises(FileNotFoundError, match=r"prompts.txt is a file, not a folder \(give the folder"):
            open_it(tmp_path / "prompts.txt")
        with pytest.raises(FileNotFoundError, match=r"pair dataset folder .*nowhere does not exist$"):
            open_it(tmp_path / "nowhere")


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tmp_path):
    """A refused run (an encoder that fails to load, before any file) into a new folder took the
    folder and its lock file with it no more: a rerun finds no dataset folder that holds nothing.
    A folder that existed, or that holds anything written, is kept."""
    new = tmp_path / "a" / "pairs"
    with pytest.raises(RuntimeError, match="refused"):
        with PairWriter(new, "w0"):
            raise RuntimeError("refused")
    assert not (tmp_path / "a").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError):
        with PairWriter(tmp_path / "old", "w0"):
            raise RuntimeError("refused")
    assert (tmp_path / "old").is_dir()
    with pytest.raises(RuntimeError):
        with PairWriter(new, "w0", shard_size=8) as w:
            eps, z0, t5, clip, img = make_pair(IDS[0])
            w.add(IDS[0], eps, z0, t5, clip, {"prompt": "a photo"})
            w.flush()
            raise RuntimeError("stopped after one pair")
    assert PairDataset(new).ids == [IDS[0]]  # the pair written is kept

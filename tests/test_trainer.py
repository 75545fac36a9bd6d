"""The distillation loop on the tiny FLUX models (CPU): learning, loss wiring, DDP, resume, config."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxsr_core.interfaces import Conditioning
from fluxsr_core.pairs import PairWriter, pair_id
from fluxsr_training import trainer as T
from fluxsr_training.config_io import ConfigError
from fluxsr_training.losses import ADLFeatureHook


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Five 32x32 pairs: smooth images, z0 = encode(image), stored image = decode(z0), one conditioning."""
    from fluxsr_core import models

    folder = tmp_path_factory.mktemp("pairs")
    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=0))
    g = torch.Generator().manual_seed(0)
    t5, clip = torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g)
    with PairWriter(folder, writer_id="t0", shard_size=2, fsync=False) as w, torch.no_grad():
        for i in range(5):
            x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bicubic",
                                                align_corners=False).clamp(0, 1)
            z0 = codec.encode(x)
            w.add(pair_id(i, i), torch.randn(z0.shape, generator=g), z0, t5, clip, meta={"seed": i},
                  image=codec.decode(z0)[0])
    return folder


def tiny_overrides(pairs: Path, out: Path, *extra: str) -> list[str]:
    """The tiny run's ``section.key=value`` overrides (as `fluxsr-train train` takes them)."""
    return ["model.transformer=tiny", "model.vae=tiny", "model.dtype=fp32", f"data.pairs={str(pairs)!r}",
            f"train.output_dir={str(out)!r}", "train.progress_bar=false", "train.log_every=5",
            "lora.rank=4", "lora.alpha=4", "optim.lr=1e-2", "optim.warmup_steps=0", "loss.w_tvlpips=0",
            "loss.w_adl=0", "data.batch_size=2", "degradation.scale=2", "degradation.second_stage=false",
            "train.tensorboard=false", *extra]


# `fluxsr-train train` without --config starts from the shipped train_default; these put back the
# dataclass defaults the tiny runs are written against (before the tiny run's own overrides).
CLI_PLAIN_DEFAULTS = ("data.holdout=0", "validation.every=0", "train.gradient_accumulation_steps=1",
                      "data.num_workers=0", "model.gradient_checkpointing=false")


def tiny_cli_args(pairs: Path, out: Path, *extra: str) -> list[str]:
    """``fluxsr-train train`` arguments for the tiny run (as :func:`tiny_config` builds it)."""
    return ["train", *CLI_PLAIN_DEFAULTS, *tiny_overrides(pairs, out, *extra)]


def tiny_config(pairs: Path, out: Path, *extra: str) -> T.TrainConfig:
    return T.load_train_config(None, tiny_overrides(pairs, out, *extra))


def write_pair_folder(folder: Path, ids: range, writer: str = "t0", seed: int = 0, meta: dict | None = None) -> Path:
    """Pairs like the ``pairs`` fixture's (one conditioning), with ids ``pair_id(i, i)`` for ``i`` in ``ids``;
    another ``writer`` adds to an existing folder."""
    from fluxsr_core import models

    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=0))
    g = torch.Generator().manual_seed(0)
    t5, clip = torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g)
    g.manual_seed(seed + 1)
    with PairWriter(folder, writer_id=writer, shard_size=2, fsync=False) as w, torch.no_grad():
        for i in ids:
            z0 = codec.encode(torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32),
                                                              mode="bicubic", align_corners=False).clamp(0, 1))
            w.add(pair_id(i, i), torch.randn(z0.shape, generator=g), z0, t5, clip, meta={"seed": i, **(meta or {})},
                  image=codec.decode(z0)[0])
    return folder


def write_bundle(path: Path, seed: int) -> Path:
    """A tiny conditioning bundle (t5 [1, 8, 32], clip_pooled [1, 16]) with a recorded prompt."""
    from fluxsr_core.bundle import save_bundle
    from fluxsr_core.settings import RunSettings

    g = torch.Generator().manual_seed(seed)
    save_bundle(path, torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g), RunSettings(),
                prompt=f"prompt {seed}")
    return path


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: a snapshot to compare."""
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def lora_file(ckpt: str | Path, name: str = T.LORA_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / name))


# --- learning -------------------------------------------------------------------------------

def test_a_few_dozen_steps_reduce_the_loss_and_validate(pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxsr.train")
    cfg = tiny_config(pairs, tmp_path / "run", "train.max_steps=30", "lora.rank=8", "lora.alpha=8",
                      "checkpoint.every=15", "data.holdout=1", "validation.every=30", "ema.decay=0.9")
    r = T.train(cfg)
    assert r.step == 30 and len(r.losses) == 30 and not r.stopped_early
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # every logged term is one of the enabled ones, and the total is their weighted sum
    for h in r.history:
        assert set(h) >= {"loss", "ftd", "mse"} and "tvlpips" not in h and "adl" not in h
        assert h["loss"] == pytest.approx(h["ftd"] + h["mse"], rel=1e-5)
    # validation ran through the upscaler at step 0 and 30, on the held-out pair, with EMA weights
    assert [v["step"] for v in r.validation] == [0, 30]
    v = r.validation[-1]
    assert v["ema"] and len(v["images"]) == 1 and 5.0 < v["psnr"] < 60.0 and v["bicubic_psnr"] > 5.0
    assert (tmp_path / "run" / "validation" / "step-0000030" / f"pair-{pair_id(4, 4)}-sr.png").is_file()
    # checkpoints: atomic names, resolved config, both LoRA files, keep_last=3 of [15, 30]
    assert [p.name for p in T.list_checkpoints(tmp_path / "run")] == ["step-0000015", "step-0000030"]
    ck = Path(r.checkpoint)
    assert (ck / T.CONFIG_FILE).is_file() and (ck / T.EMA_LORA_FILE).is_file()
    assert T.load_train_config(ck / T.CONFIG_FILE) == cfg
    assert not list((tmp_path / "run" / T.CHECKPOINT_DIR).glob(".tmp-*"))
    text = caplog.text
    assert "perceptual term: off" in text and "step 30/30 | loss" in text


# --- the loss terms and their weights ---------------------------------------------------------

class CountingVelocity:
    """Wraps a velocity model and counts its calls (SR branch and FTD branch are one call each)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def test_compute_losses_combines_the_configured_weights():
    from fluxsr_core import models
    from fluxsr_training.losses import ftd_loss
    from fluxsr_training.perceptual import load_perceptual

    torch.manual_seed(0)
    tr = models.load_transformer("tiny", dtype="fp32", device=None, seed=0)
    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=0))
    vel = CountingVelocity(models.DiffusersVelocity(tr))
    cond = Conditioning(torch.randn(1, 8, 32), torch.randn(1, 16))
    z_l, z0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    x0, t = torch.rand(2, 3, 32, 32), torch.tensor([0.3, 0.9])
    lpips_fn, label = load_perceptual("random-test")
    hook = ADLFeatureHook(tr, "double:0;single:0", active=False)
    w = T.LossConfig(w_ftd=2.0, w_mse=3.0, w_tvlpips=0.5, w_adl=0.25, tv_gamma=1.0, perceptual="random-test")
    p = T.compute_losses(vel, codec, z_l=z_l, z0=z0, eps=eps, x0=x0, cond=cond, t_l=0.25, ftd_t=t, loss=w,
                         perceptual=lpips_fn, adl_hook=hook)
    assert vel.calls == 2  # one SR branch (shared by MSE, TV-LPIPS and ADL) + one FTD branch
    assert p.total.item() == pytest.approx(2 * p.ftd.item() + 3 * p.mse.item() + 0.5 * p.tvlpips.item()
                                           + 0.25 * p.adl.item(), rel=1e-6)
    assert p.ftd.item() == pytest.approx(ftd_loss(vel, z_l, z0, eps, 0.25, cond, t=t).item(), rel=1e-6)
    assert 0 < p.adl.item() <= 1 and p.tvlpips.item() > 0 and p.mse.item() > 0
    # The image terms see the decoder's overshoot past [0, 1] (clamped, it would pass no gradient)
    from fluxsr_core import flow

    x_h = codec.decode(flow.one_step_sr(vel, z_l, 0.25, cond), clamp=False)
    assert ((x_h < 0) | (x_h > 1)).any()  # this random tiny VAE overshoots
    assert p.mse.item() == pytest.approx(torch.nn.functional.mse_loss(x_h, x0).item(), rel=1e-6)
    assert p.mse.item() != pytest.approx(torch.nn.functional.mse_loss(x_h.clamp(0, 1), x0).item(), rel=1e-4)
    clamped = T.compute_losses(vel, codec, z_l=z_l, z0=z0, eps=eps, x0=x0, cond=cond, t_l=0.25, ftd_t=t,
                               loss=T.LossConfig(w_ftd=0, w_mse=1, w_tvlpips=0, w_adl=0, clamp_decoded=True))
    assert clamped.mse.item() == pytest.approx(torch.nn.functional.mse_loss(x_h.clamp(0, 1), x0).item(), rel=1e-6)
    # the ADL features came from the SR branch only: the hook is inactive again afterwards
    assert not hook.active
    hook.remove()

    # FTD alone: no SR branch, no decode, the other terms absent
    vel.calls = 0
    only = T.LossConfig(w_ftd=1.0, w_mse=0.0, w_tvlpips=0.0, w_adl=0.0)
    q = T.compute_losses(vel, codec, z_l=z_l, z0=z0, eps=eps, x0=None, cond=cond, t_l=0.25, ftd_t=t, loss=only)
    assert vel.calls == 1 and q.mse is None and q.tvlpips is None and q.adl is None
    assert q.total.item() == pytest.approx(q.ftd.item())
    assert set(q.as_floats()) == {"loss", "ftd"}


def test_zero_weight_terms_are_not_even_built(pairs, tmp_path, monkeypatch, caplog):
    built_hooks, built_perceptual = [], []
    real_hook = T.make_adl_hook

    def spy_hook(model, form, blocks, **kwargs):
        h = real_hook(model, form, blocks, **kwargs)
        built_hooks.append((h, blocks))
        return h

    import fluxsr_training.perceptual as perceptual

    real_load = perceptual.load_perceptual
    monkeypatch.setattr(T, "make_adl_hook", spy_hook)
    monkeypatch.setattr(perceptual, "load_perceptual",
                        lambda *a, **k: built_perceptual.append(a) or real_load(*a, **k))
    caplog.set_level(logging.INFO, logger="fluxsr.train")

    T.train(tiny_config(pairs, tmp_path / "off", "train.max_steps=1", "ema.enabled=false"))
    assert built_hooks == [] and built_perceptual == []
    assert "perceptual term: off" in caplog.text

    caplog.clear()
    r = T.train(tiny_config(pairs, tmp_path / "on", "train.max_steps=2", "ema.enabled=false", "loss.w_adl=0.5",
                            "loss.w_tvlpips=0.1", "loss.perceptual=random-test", "loss.adl_blocks=single:0",
                            "train.log_every=1"))
    # one on the empty layout (the preflight's check, removed at once), one on the student
    on_layout = [h for h, _ in built_hooks if next(h.transformer.parameters()).is_meta]
    assert len(on_layout) == 1 and on_layout[0]._handles == []
    built_hooks = [(h, b) for h, b in built_hooks if h not in on_layout]
    assert [b for _, b in built_hooks] == ["single:0"] and built_perceptual[0][0] == "random-test"
    assert "TV-LPIPS with random-backbone LPIPS (TEST ONLY" in caplog.text  # the log names the network
    assert "ADL (tokens) on blocks single:0 (weight 0.5)" in caplog.text
    assert r.perceptual_label.startswith("random-backbone LPIPS")
    h = r.history[-1]
    assert h["loss"] == pytest.approx(h["ftd"] + h["mse"] + 0.1 * h["tvlpips"] + 0.5 * h["adl"], rel=1e-5)
    # the hooks are removed when training ends
    tr_hooks = [m for m, _ in built_hooks][0]
    assert tr_hooks._handles == []


# --- resume -----------------------------------------------------------------------------------

def test_stop_and_resume_gives_the_same_weights_bit_for_bit(pairs, tmp_path):
    # LoRA dropout draws from the torch RNG, so this also checks the RNG state is restored.
    common = ("train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=1", "lora.dropout=0.2",
              "optim.schedule=cosine", "optim.warmup_steps=2", "train.gradient_accumulation_steps=2",
              "ema.decay=0.9", "lora.alpha=2")  # alpha != rank: the checkpoint must keep the tensors as trained
    full = T.train(tiny_config(pairs, tmp_path / "full", *common))
    part = T.train(tiny_config(pairs, tmp_path / "part", *common, "train.stop_at=3"))
    assert part.step == 3 and part.stopped_early
    # a kill in the middle of a later save leaves only a temporary folder, which resume ignores
    (tmp_path / "part" / T.CHECKPOINT_DIR / ".tmp-step-0000004").mkdir()
    rest = T.train(tiny_config(pairs, tmp_path / "part", *common, "train.resume=latest"))
    assert rest.start_step == 3 and rest.step == 6 and len(rest.losses) == 3
    assert rest.losses == full.losses[3:]
    for name in (T.LORA_FILE, T.EMA_LORA_FILE):
        a, b = lora_file(full.checkpoint, name), lora_file(rest.checkpoint, name)
        assert T.read_lora_state(Path(full.checkpoint) / name)[1:] == (4, 2.0)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [p.name for p in T.list_checkpoints(tmp_path / "part")] == ["step-0000006"]  # keep_last=1
    # resuming a finished run is refused: nothing is left to train
    with pytest.raises(ConfigError, match="is at step 6 and train.max_steps is 6: nothing is left to train"):
        T.train(tiny_config(pairs, tmp_path / "part", *common, "train.resume=latest"))


def test_a_checkpoint_trained_without_fp16_resumes_in_fp16_with_a_fresh_loss_scale(pairs, tmp_path, monkeypatch,
                                                                                   caplog):
    """bf16 (or fp32) checkpoints hold no loss-scale state (scaler.pt); resumed with fp16 mixed
    precision, accelerate asked for it and the checkpoint was called damaged. Now the loss scale
    starts afresh, with a notice, and the next checkpoint holds it. fp16 needs a GPU, so a CPU
    GradScaler stands in for the one accelerate makes for fp16."""
    from accelerate.utils.constants import SCALER_NAME

    common = ("train.max_steps=4", "checkpoint.every=2", "ema.enabled=false")
    first = T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=2"))
    assert not (Path(first.checkpoint) / SCALER_NAME).exists()
    setup = T._Run._setup_accelerator

    def with_loss_scaling(self):
        setup(self)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    monkeypatch.setattr(T._Run, "_setup_accelerator", with_loss_scaling)
    caplog.clear()
    rest = T.train(tiny_config(pairs, tmp_path / "run", *common, "train.resume=latest"))
    assert rest.start_step == 2 and rest.step == 4 and all(math.isfinite(v) for v in rest.losses)
    assert f"holds no fp16 loss scale (no {SCALER_NAME}: it was trained without fp16 mixed precision)" in caplog.text
    saved = torch.load(Path(rest.checkpoint) / SCALER_NAME, weights_only=True)
    assert saved["scale"] > 0 and saved["_growth_tracker"] == 2  # two steps scaled since the fresh start
    monkeypatch.undo()  # and back again: a checkpoint's scaler.pt is ignored by a run without fp16
    more = T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=5", "checkpoint.every=2",
                               "ema.enabled=false", "train.resume=latest"))
    assert more.start_step == 4 and more.step == 5


def test_sigkill_then_resume_matches_an_uninterrupted_run(pairs, tmp_path):
    common = ["train.max_steps=8", "checkpoint.every=2", "lora.dropout=0.1", "ema.decay=0.8"]
    script = tmp_path / "slow_train.py"
    # Slowed down (0.4 s per step) so the kill lands mid-run; the process never learns it is killed.
    script.write_text(textwrap.dedent("""
        import sys, time, torch
        torch.set_num_threads(1)
        from fluxsr_training.trainer import load_train_config, train
        train(load_train_config(sys.argv[1]), stop_check=lambda step: time.sleep(0.4) or False)
    """))
    run_dir = tmp_path / "killed"
    tiny_config(pairs, run_dir, *common).save(tmp_path / "config.toml")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "config.toml")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / T.CHECKPOINT_DIR / "step-0000004").is_dir():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert T.latest_checkpoint(run_dir).name in ("step-0000004", "step-0000006")
    resumed = T.train(tiny_config(pairs, run_dir, *common, "train.resume=latest"))
    assert 0 < resumed.start_step < 8 and resumed.step == 8
    full = T.train(tiny_config(pairs, tmp_path / "full", *common))
    for name in (T.LORA_FILE, T.EMA_LORA_FILE):
        a, b = lora_file(full.checkpoint, name), lora_file(resumed.checkpoint, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(pairs, tmp_path):
    """Resuming from step 4 of a run that reached step 8 replaces steps 6 and 8: they move to
    checkpoints/superseded-*/ (kept), so pruning and --resume latest see this run's own only;
    so do metrics.jsonl's lines past step 4, so that it holds each step once, this run's.
    A fresh run into a folder with checkpoints is refused."""
    common = ("train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=3", "train.log_every=1")
    T.train(tiny_config(pairs, tmp_path / "run", *common))
    assert [c.name for c in T.list_checkpoints(tmp_path / "run")] == ["step-0000004", "step-0000006", "step-0000008"]
    metrics = tmp_path / "run" / T.METRICS_FILE
    with open(metrics, "ab") as f:
        f.write(b"a line of someone else's\n" + b'{"step": true, "not": "utf-8 \xff"}\n')
    first = [json.loads(line) for line in metrics.read_bytes().splitlines()[:-2]]
    step4 = tmp_path / "run" / T.CHECKPOINT_DIR / "step-0000004"
    r = T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=6", f"train.resume={str(step4)!r}"))
    assert r.start_step == 4 and r.step == 6
    assert [c.name for c in T.list_checkpoints(tmp_path / "run")] == ["step-0000004", "step-0000006"]
    (aside,) = (tmp_path / "run" / T.CHECKPOINT_DIR).glob("superseded-*")
    assert sorted(c.name for c in aside.iterdir()) == sorted(["step-0000006", "step-0000008", T.METRICS_FILE])
    lines = metrics.read_bytes().splitlines()
    assert b"a line of someone else's" in lines and b'{"step": true, "not": "utf-8 \xff"}' in lines  # left as they were
    records = [json.loads(line) for line in lines if line.startswith(b'{"kind"')]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["kind"] for r in records if r["kind"] != "train"] == ["start", "resume"]
    moved = [json.loads(line) for line in (aside / T.METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    assert moved == [rec for rec in first if rec.get("step", 0) > 4]
    assert [rec["step"] for rec in moved if rec["kind"] == "train"] == [5, 6, 7, 8]
    assert T.resolve_resume("latest", tmp_path / "run").name == "step-0000006"
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume latest"):
        T.train(tiny_config(pairs, tmp_path / "run", *common))
    # a superseded checkpoint is still this folder's own: not refused as another run's
    with pytest.raises(ConfigError, match="is at step 8 and train.max_steps is 8: nothing is left to train"):
        T.train(tiny_config(pairs, tmp_path / "run", *common, f"train.resume={str(aside / 'step-0000008')!r}"))


def test_a_checkpoint_is_on_the_disk_before_its_rename_and_before_older_ones_go(pairs, tmp_path, monkeypatch):
    """accelerate writes the checkpoint's files without syncing them; it was renamed into place
    and the older checkpoints pruned at once, so a power cut could leave only the newest, with
    empty files. Every file in it is now synced before the rename, the folder after it."""
    seen = []
    real_tree, real_dir = T.fsync_tree, T.fsync_dir

    def tree(folder):
        files = sorted(p.name for p in Path(folder).rglob("*") if p.is_file())
        checkpoints = [c.name for c in T.list_checkpoints(tmp_path / "run")]
        seen.append(("tree", Path(folder).name, files, checkpoints))
        real_tree(folder)

    def folder_synced(folder):
        seen.append(("dir", Path(folder).name, [], [c.name for c in T.list_checkpoints(tmp_path / "run")]))
        real_dir(folder)

    monkeypatch.setattr(T, "fsync_tree", tree)
    monkeypatch.setattr(T, "fsync_dir", folder_synced)
    T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=1"))
    trees = [e for e in seen if e[0] == "tree"]
    assert len(trees) == 3 and all(not e[1].startswith("step-") for e in trees)  # the temporary folder
    assert all({T.LORA_FILE, T.STATE_FILE, T.CONFIG_FILE} <= set(e[2]) for e in trees)
    # each tree sync came while the previous checkpoint was still the only one; the root's after the rename
    assert [e[3] for e in trees] == [[], ["step-0000001"], ["step-0000002"]]
    dirs = [e for e in seen if e[0] == "dir" and e[1] == T.CHECKPOINT_DIR]
    assert [e[3] for e in dirs] == [["step-0000001"], ["step-0000001", "step-0000002"], ["step-0000002", "step-0000003"]]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_nan_gradient_under_a_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(pairs, tmp_path,
                                                                                          monkeypatch, max_grad_norm):
    """A finite loss whose gradient is NaN (a bf16 overflow in the backward) went through the clip
    into the optimizer and the EMA; the next checkpoint saved the NaN LoRA and its rotation
    removed the good ones, so no resume could work. Refused before the step, clipped or not."""
    original = T.compute_losses
    calls = {"n": 0}

    def overflowing_backward(velocity, codec, **kw):
        parts = original(velocity, codec, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # d sqrt(x) / dx at 0 is inf, times 0: a NaN gradient for a loss of + 0
            p = next(p for p in velocity.transformer.parameters() if p.requires_grad)
            parts.total = parts.total + (p * 0).sum().sqrt()
        return parts

    monkeypatch.setattr(T, "compute_losses", overflowing_backward)
    out = tmp_path / "run"
    cfg = tiny_config(pairs, out, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=1",
                      f"optim.max_grad_norm={max_grad_norm}")
    with pytest.raises(FloatingPointError, match=r"the gradient is not finite \(norm nan\) at step 3 although the loss "
                                                 r"is; the LoRA and its EMA are left as they were after step 2"):
        T.train(cfg)
    kept = sorted(p.name for p in (out / T.CHECKPOINT_DIR).iterdir())
    assert kept == ["step-0000002"]
    assert all(bool(torch.isfinite(t).all()) for t in lora_file(out / T.CHECKPOINT_DIR / kept[0]).values())
    monkeypatch.undo()
    resumed = T.train(tiny_config(pairs, out, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=1",
                                  f"optim.max_grad_norm={max_grad_norm}", "train.resume=latest"))
    assert Path(resumed.checkpoint).name == "step-0000004"


def test_a_checkpoint_of_a_lora_holding_nan_is_not_written(pairs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = T._Run(tiny_config(pairs, out, "train.max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=1"))
    original = trainer._non_finite_weights
    monkeypatch.setattr(trainer, "_non_finite_weights", lambda: ["double_blocks.0.lora_A"]
                        if trainer.state.step == 2 else original())
    with pytest.raises(FloatingPointError, match="the LoRA at step 2 holds inf or NaN .1 tensors, double_blocks.0.lora_A "
                                                 "first., so no checkpoint of it is written and the earlier ones"):
        trainer.run()
    assert sorted(p.name for p in (out / T.CHECKPOINT_DIR).iterdir()) == ["step-0000001"]


def test_s_per_step_is_the_steps_own_time_without_checkpoints(pairs, tmp_path, monkeypatch):
    """The logged s/step times the training steps: a checkpoint written in the window (here made
    to take 2 s) is not in it. Before, one slow checkpoint made every window's step look slow."""
    import time

    real = T._Run.save_checkpoint

    def slow_checkpoint(self):
        time.sleep(2.0)
        return real(self)

    monkeypatch.setattr(T._Run, "save_checkpoint", slow_checkpoint)
    r = T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=2", "checkpoint.every=1", "train.log_every=2"))
    (entry,) = r.history
    assert entry["step"] == 2 and 0 < entry["s_per_step"] < 1.0, entry  # with the checkpoint: > 1 s a step


def test_one_run_at_a_time_per_folder_and_no_mixing_of_two_runs(pairs, tmp_path):
    """A second run into a folder another live run writes is refused (they would replace each
    other's checkpoints); so is resuming run A's checkpoint into run B's folder (B's would be set
    aside and pruned). Into an empty folder A's checkpoint still starts a branch."""
    from fluxsr_core.files import ExclusiveFileLock

    common = ("train.max_steps=4", "checkpoint.every=2")
    (tmp_path / "busy").mkdir()
    held = ExclusiveFileLock(tmp_path / "busy" / T.RUN_LOCK_FILE)  # as the live run holds it
    try:
        with pytest.raises(ConfigError, match=r"another fluxsr-train train is writing .*busy \(it holds \.train\.lock\); "
                                              "wait for it to end, or give this run its own train.output_dir"):
            T.train(tiny_config(pairs, tmp_path / "busy", *common))
        assert [f.name for f in (tmp_path / "busy").iterdir()] == [T.RUN_LOCK_FILE]  # nothing written
    finally:
        held.release()
    T.train(tiny_config(pairs, tmp_path / "busy", *common))  # the lock is the OS's: free once released
    T.train(tiny_config(pairs, tmp_path / "a", *common))
    a_step2 = tmp_path / "a" / T.CHECKPOINT_DIR / "step-0000002"
    before = file_hashes(tmp_path / "busy")
    with pytest.raises(ConfigError, match=r"is not a checkpoint of .*busy, which holds another run's checkpoints "
                                          r"\(step-0000004 the newest\): resuming here would mix the two runs"):
        T.train(tiny_config(pairs, tmp_path / "busy", *common, f"train.resume={str(a_step2)!r}"))
    assert file_hashes(tmp_path / "busy") == before
    branch = T.train(tiny_config(pairs, tmp_path / "branch", *common, f"train.resume={str(a_step2)!r}"))
    assert branch.start_step == 2 and branch.step == 4


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(pairs, tmp_path, monkeypatch, caplog):
    import errno
    import logging

    from fluxsr_core import files

    def no_locks(path):
        raise OSError(errno.ENOLCK, "No locks available", str(path))

    monkeypatch.setattr(files, "ExclusiveFileLock", no_locks)
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    r = T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=2", "checkpoint.every=2"))
    assert r.step == 2
    assert f"cannot lock {tmp_path / 'run' / T.RUN_LOCK_FILE} (No locks available): this run goes on unlocked" \
        in caplog.text
    # a folder that cannot be written at all is refused there, before the student is built (it was
    # taken for a file system without locks and failed at the first write, after the models loaded)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    def no_build(*args, **kwargs):
        raise AssertionError("built the student before refusing")

    monkeypatch.setattr(files, "ExclusiveFileLock", read_only)
    monkeypatch.setattr(T.tempfile, "TemporaryFile", read_only)  # the folder cannot be written either
    monkeypatch.setattr(T, "build_student", no_build)
    with pytest.raises(ConfigError, match=r"cannot write into .*ro \(Read-only file system\); give a "
                                          r"train.output_dir this run can write"):
        T.train(tiny_config(pairs, tmp_path / "ro", "train.max_steps=2"))


def test_a_checkpoint_that_cannot_be_written_is_removed_and_named(pairs, tmp_path, monkeypatch, capsys):
    """A full disk inside torch's serializer (a RuntimeError from its C++ writer) or any OSError:
    the part-written folder goes (it holds the space), the last complete checkpoint is named."""
    from accelerate import Accelerator

    from fluxsr_training.cli import main

    real_save = Accelerator.save_state
    calls = []

    def full_at_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"x" * 1000)  # part of it made it to disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 113920 vs 113808")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_the_second)
    run = tmp_path / "run"
    assert main(tiny_cli_args(pairs, run, "train.max_steps=4", "checkpoint.every=2")) == 2
    err = capsys.readouterr().err
    assert ("writing checkpoint step 4 into " in err and "failed ([enforce fail at inline_container.cc:672] . "
            "unexpected pos" in err and f"The last complete checkpoint is {run / T.CHECKPOINT_DIR / 'step-0000002'}: "
            "free some space (or fix the folder) and continue with --resume latest" in err)
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / T.CHECKPOINT_DIR).iterdir()) == ["step-0000002"]
    calls.clear()
    monkeypatch.setattr(Accelerator, "save_state", lambda self, d, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # not a write failure: not dressed up as one
        T.train(tiny_config(pairs, tmp_path / "run2", "train.max_steps=2", "checkpoint.every=2"))
    assert not (tmp_path / "run2" / T.CHECKPOINT_DIR / ".tmp-step-0000002").exists()


def test_a_validation_image_too_small_for_the_scale_is_refused_before_any_model(pairs, tmp_path, monkeypatch):
    """A 3x3 picture crashed inside the degradation, and an 8x8 one at x4 failed at the first
    validation with no file named; both are named before anything is built."""
    from PIL import Image

    folder = tmp_path / "val"
    folder.mkdir()
    Image.new("RGB", (12, 12), (90, 120, 30)).save(folder / "fine.png")
    Image.new("RGB", (5, 9), (90, 120, 30)).save(folder / "tiny.png")
    monkeypatch.setattr(T, "build_student", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=r"validation.images: .*tiny.png is 5x9 px; at degradation.scale=2 a "
                                          r"validation image needs at least 6x6"):
        T.train(tiny_config(pairs, tmp_path / "run", f"validation.images={str(folder)!r}", "validation.every=1"))
    assert not (tmp_path / "run").exists()


def test_resume_uses_the_configs_optimizer_settings_and_refuses_an_ema_change(pairs, tmp_path, caplog):
    common = ("train.max_steps=6", "train.log_every=1", "optim.schedule=constant")
    T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=2", "optim.lr=1e-2"))
    caplog.set_level(logging.INFO, logger="fluxsr.train")
    r = T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=4", "optim.lr=1e-3",
                            "optim.weight_decay=0.5", "train.resume=latest"))
    assert [h["lr"] for h in r.history] == [pytest.approx(1e-3)] * 2  # not the checkpoint's 1e-2
    assert "lr 0.01 -> 0.001" in caplog.text and "weight_decay 0.0001 -> 0.5" in caplog.text
    saved = T.load_train_config(Path(r.checkpoint) / T.CONFIG_FILE)
    assert saved.optim.lr == 1e-3 and saved.optim.weight_decay == 0.5
    with pytest.raises(ConfigError, match="ema.enabled=true.*same setting"):
        T.train(tiny_config(pairs, tmp_path / "run", *common, "ema.enabled=false", "train.resume=latest"))


def test_refusals_come_before_any_model_is_built_or_any_file_written(pairs, tmp_path, monkeypatch):
    """A fresh run into a folder with checkpoints, a resume with another conditioning (by content)
    or another T_L / scale / base model, and a resume of a missing checkpoint are refused before
    the student is built; the existing run's files are left byte for byte as they were."""
    from fluxsr_core.bundle import load_bundle
    from fluxsr_core.settings import DEFAULT_T_L

    trained_with, other = write_bundle(tmp_path / "a.safetensors", 1), write_bundle(tmp_path / "b.safetensors", 2)
    run = tmp_path / "run"
    common = ("train.max_steps=4", "checkpoint.every=2", "ema.enabled=false")
    r = T.train(tiny_config(pairs, run, *common, "train.stop_at=2", f"data.conditioning={str(trained_with)!r}"))
    # the checkpoint is self-contained: its own copy of the conditioning, whose content hash it records
    ck, a = Path(r.checkpoint), load_bundle(trained_with)
    own = load_bundle(ck / T.CONDITIONING_FILE)
    assert torch.equal(own.t5, a.t5) and torch.equal(own.clip_pooled, a.clip_pooled)
    state = json.loads((ck / T.STATE_FILE).read_text())
    digest = T.conditioning_digest(a.t5, a.clip_pooled)
    assert state["conditioning"] == T.CONDITIONING_FILE and state["conditioning_sha256"] == digest
    assert r.conditioning_path == str(ck / T.CONDITIONING_FILE) and not (run / T.CONDITIONING_FILE).exists()
    before = file_hashes(run)

    monkeypatch.setattr(T, "build_student", lambda *a, **k: pytest.fail("a model was built before the refusal"))
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume latest"):
        T.train(tiny_config(pairs, run, *common, f"data.conditioning={str(other)!r}"))
    with pytest.raises(ConfigError) as e:
        T.train(tiny_config(pairs, run, *common, f"data.conditioning={str(other)!r}", "train.resume=latest"))
    msg = str(e.value)
    assert f"bundle {trained_with} (sha256 {digest[:16]})" in msg and f"bundle {other} (sha256" in msg
    assert f"data.conditioning={ck / T.CONDITIONING_FILE} (the checkpoint's own copy)" in msg
    for change, was in [("settings.t_l=0.5", f"settings.t_l={DEFAULT_T_L:g}"), ("settings.guidance=2", "settings.guidance=3.5"),
                        ("degradation.scale=4", "degradation.scale=2"), ("lora.rank=8", "lora.rank=4")]:
        with pytest.raises(ConfigError, match=f"trained with {was}, this config has {change}. These define"):
            T.train(tiny_config(pairs, run, *common, change, f"data.conditioning={str(trained_with)!r}",
                                "train.resume=latest"))
    with pytest.raises(ConfigError, match="trained with model.transformer=tiny with model.init_seed=0, this config "
                                          "has model.transformer=tiny with model.init_seed=3, a different base model"):
        T.train(tiny_config(pairs, run, *common, "model.init_seed=3", f"data.conditioning={str(trained_with)!r}",
                            "train.resume=latest"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        T.train(tiny_config(pairs, tmp_path / "fresh", *common, f"train.resume={str(tmp_path / 'nowhere')!r}"))
    # a resume with nothing left to train (it reported "loss nan" before)
    with pytest.raises(ConfigError, match=r"is at step 2 and train.max_steps is 2: nothing is left to train.*"
                                          r"train.max_steps=4"):
        T.train(tiny_config(pairs, run, "train.max_steps=2", "checkpoint.every=2", "ema.enabled=false",
                            f"data.conditioning={str(trained_with)!r}", "train.resume=latest"))
    # ... also when train.stop_at is the nearer end (it trained nothing and reported "loss nan")
    for stop_at, example in ((2, 4), (1, 3)):
        with pytest.raises(ConfigError, match=rf"is at step 2 and train.stop_at is {stop_at}: nothing is left to "
                                              rf"train. To train on, raise it above 2 \(e.g. train.stop_at={example}\), "
                                              r"or set train.stop_at=0 to train to train.max_steps=4$"):
            T.train(tiny_config(pairs, run, *common, f"train.stop_at={stop_at}",
                                f"data.conditioning={str(trained_with)!r}", "train.resume=latest"))
    # a base model path that is not there is named as missing, not called "a different base model"
    gone = tmp_path / "moved-away" / "flux1-dev.safetensors"
    for resume in ("train.resume=latest", "train.resume=''"):
        with pytest.raises(FileNotFoundError, match=rf"^model.transformer {re.escape(str(gone))}: no such file or "
                                                    "folder") as e:
            T.train(tiny_config(pairs, run if "latest" in resume else tmp_path / "fresh", *common,
                                f"model.transformer={str(gone)!r}", f"data.conditioning={str(trained_with)!r}",
                                resume))
        assert "different base model" not in str(e.value)
    assert file_hashes(run) == before and not (tmp_path / "fresh").exists()


def test_the_base_model_is_identified_by_sampled_content_and_older_checkpoints_still_resume(tmp_path):
    """The identity is the sampled fingerprint `fluxsr-train pairs` records of its teacher: it sees
    a file that differs from the base only between its first and last MiB (e.g. a LoRA merged
    in), which the head-and-tail hash older checkpoints recorded did not. Those checkpoints are
    compared the way they were recorded, so their runs resume."""
    from fluxsr_core.weights import weights_fingerprint

    base = tmp_path / "flux.safetensors"
    content = bytes(range(256)) * (3 * 4096)                          # 3 MiB
    base.write_bytes(content)
    merged = tmp_path / "flux-merged.safetensors"
    merged.write_bytes(content[:1 << 20] + bytes(b ^ 0x55 for b in content[1 << 20:2 << 20]) + content[2 << 20:])
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(content)

    identity = T.base_model_identity(str(base))
    assert identity == {"weights_fingerprint": weights_fingerprint(base)} == T.base_model_identity(str(moved))
    assert T.base_model_identity(str(merged)) != identity
    assert T._head_tail_identity(str(merged)) == T._head_tail_identity(str(base))  # what the old identity missed
    assert T.base_model_identity("tiny", 3) == {"test_model": "tiny", "init_seed": 3}

    ckpt = tmp_path / "run" / T.CHECKPOINT_DIR / "step-0000002"
    ckpt.mkdir(parents=True)

    def config(transformer: Path) -> T.TrainConfig:
        return T.load_train_config(None, [f"model.transformer={str(transformer)!r}", "model.vae=tiny"])

    config(base).save(ckpt / T.CONFIG_FILE)
    now = {"base_model_identity": identity}
    assert T._check_resumable(ckpt, config(moved), now, T.base_model_identity(str(moved))) == []
    with pytest.raises(ConfigError, match="a different base model"):
        T._check_resumable(ckpt, config(merged), now, T.base_model_identity(str(merged)))
    older = {"base_model_identity": T._head_tail_identity(str(base))}
    assert set(older["base_model_identity"]) == {"weight_files", "sha256_head_tail"}
    assert T._check_resumable(ckpt, config(moved), older, T.base_model_identity(str(moved))) == []
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"\x01" + content[1:])
    with pytest.raises(ConfigError, match="a different base model"):
        T._check_resumable(ckpt, config(other), older, T.base_model_identity(str(other)))


def test_a_conditioning_file_no_pair_uses_does_not_count(tmp_path, caplog):
    """`fluxsr-train pairs` stores every conditioning before it samples; a run killed or refused in
    between leaves cond files no pair uses. The dataset's pairs still have one conditioning:
    the student trains with it and each checkpoint carries it (no warning of several)."""
    folder = write_pair_folder(tmp_path / "pairs", range(3))
    g = torch.Generator().manual_seed(7)
    with PairWriter(folder, writer_id="killed", fsync=False) as w:
        w.store_conditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g))
    assert len(list(folder.glob("cond-*.safetensors"))) == 2
    caplog.set_level(logging.INFO, logger="fluxsr.train")
    r = T.train(tiny_config(folder, tmp_path / "run", "train.max_steps=1"))
    assert "distinct conditionings" not in caplog.text
    assert "conditioning: each pair's own (1 distinct in the dataset)" in caplog.text
    assert r.conditioning_path == str(Path(r.checkpoint) / T.CONDITIONING_FILE) and Path(r.conditioning_path).is_file()


def test_resume_takes_softer_changes_with_a_notice(pairs, tmp_path, caplog):
    """data.seed, the schedule and max_steps may change at a resume, each named with old -> new; the
    conditioning is compared by content, so the checkpoint's own copy resumes a run whose bundle is gone."""
    bundle = write_bundle(tmp_path / "a.safetensors", 1)
    run = tmp_path / "run"
    r = T.train(tiny_config(pairs, run, "train.max_steps=4", "checkpoint.every=2", "train.stop_at=2",
                            "ema.enabled=false", f"data.conditioning={str(bundle)!r}"))
    copy = tmp_path / "kept.safetensors"
    copy.write_bytes((Path(r.checkpoint) / T.CONDITIONING_FILE).read_bytes())
    bundle.unlink()
    moved = tmp_path / "pairs-moved"
    shutil.copytree(pairs, moved)
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    rest = T.train(tiny_config(moved, run, "train.max_steps=3", "checkpoint.every=2", "ema.enabled=false",
                               f"data.conditioning={str(copy)!r}", "data.seed=7", "optim.schedule=cosine",
                               "train.resume=latest"))
    assert rest.start_step == 2 and rest.step == 3
    text = caplog.text
    assert "resume: settings changed since step-0000002, the new ones apply from step 2 on" in text
    assert "data.seed 0 -> 7 (the data order" in text and "optim.schedule constant_with_warmup -> cosine" in text
    assert "train.max_steps 4 -> 3" in text and "data.conditioning" not in text
    assert f"data.pairs {pairs} -> {moved} (the pairs are read from the new folder" in text
    assert "the global batch was" not in text  # unchanged


def test_resume_with_another_batch_goes_on_from_the_samples_seen(pairs, tmp_path, monkeypatch, caplog):
    starts = []
    original = T._StreamBatches.__init__
    monkeypatch.setattr(T._StreamBatches, "__init__",
                        lambda self, batch, rank, world, start: starts.append(start) or original(self, batch, rank, world, start))
    common = ("train.max_steps=6", "checkpoint.every=2")
    T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=2", "data.batch_size=2"))
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    r = T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=4", "data.batch_size=1",
                            "train.resume=latest"))
    assert ("resume: the global batch was 2 and is now 1 (1 per process x 1 process(es) x 1 accumulation): "
            "each step from here on averages 1 samples (optim.lr is not rescaled); the data stream goes on "
            "from sample 4") in caplog.text
    assert starts == [0, 4]  # 2 steps x batch 2 seen; not 2 steps x the new batch 1
    state = json.loads((Path(r.checkpoint) / T.STATE_FILE).read_text())
    assert state["samples_seen"] == 4 + 2 * 1


def test_resume_keeps_the_held_out_pairs_it_started_with_and_appends_to_metrics_jsonl(tmp_path, caplog):
    """The held-out ids are recorded at the start; pairs added before a resume all go to training,
    the validation image stays the same, and a recorded pair that is gone is named. Every log
    line and validation is in metrics.jsonl, appended across the resume."""
    folder = write_pair_folder(tmp_path / "pairs", range(3))
    run = tmp_path / "run"
    common = ("train.max_steps=4", "checkpoint.every=2", "data.holdout=1", "validation.every=2",
              "validation.count=1", "train.log_every=1", "ema.enabled=false")
    first = T.train(tiny_config(folder, run, *common, "train.stop_at=2"))
    held = f"pair-{pair_id(2, 2)}"
    assert [im["name"] for im in first.validation[-1]["images"]] == [held]
    assert json.loads((Path(first.checkpoint) / T.STATE_FILE).read_text())["holdout_ids"] == [pair_id(2, 2)]
    write_pair_folder(folder, range(3, 6), writer="t1", seed=1)  # the dataset grows: p5 is now the last id
    with open(run / T.METRICS_FILE, "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a kill mid-append: dropped, not glued to the next line
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    rest = T.train(tiny_config(folder, run, *common, "train.resume=latest"))
    assert [v["step"] for v in rest.validation] == [4]
    assert [im["name"] for im in rest.validation[-1]["images"]] == [held]  # not pair-p000005-s5
    assert "trained on 2 pairs, the dataset now has 5 for training" in caplog.text
    assert "dropping a last line cut short by a stopped run (32 bytes)" in caplog.text
    assert not (run / "validation" / "step-0000004" / f"pair-{pair_id(5, 5)}-sr.png").exists()

    lines = [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in lines] == [
        ("start", 0), ("validation", 0), ("train", 1), ("train", 2), ("validation", 2),
        ("resume", 2), ("train", 3), ("train", 4), ("validation", 4)]
    trains = [m for m in lines if m["kind"] == "train"]
    assert [m["loss"] for m in trains] == pytest.approx(first.losses + rest.losses)
    assert all(m["loss"] == pytest.approx(m["ftd"] + m["mse"]) and m["lr"] > 0 for m in trains)
    assert lines[-1]["psnr"] == pytest.approx(rest.validation[-1]["psnr"]) and lines[-1]["images"][0]["name"] == held
    assert rest.metrics_path == str(run / T.METRICS_FILE)

    # a held-out pair recorded at the start that is no longer in the dataset is said
    state_file = Path(rest.checkpoint) / T.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "holdout_ids": [pair_id(2, 2), "p000099-s99"]}))
    caplog.clear()
    T.train(tiny_config(folder, run, *common[1:], "train.max_steps=5", "data.holdout=3", "train.resume=latest"))
    assert "1 held-out pair(s) the run started with are no longer in" in caplog.text and "p000099-s99" in caplog.text
    assert "data.holdout=3 is not applied on a resume: the run keeps the 2 pair(s)" in caplog.text


def test_settings_that_would_be_silently_ignored_are_refused(pairs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'constant' has no warm-up"):
        T.check_config(tiny_config(pairs, tmp_path / "a", "optim.schedule=constant", "optim.warmup_steps=10"))
    with pytest.raises(ConfigError, match="validation.every=2 but there is nothing to validate"):
        T.train(tiny_config(pairs, tmp_path / "b", "train.max_steps=2", "validation.every=2"))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(ConfigError, match="accelerate accumulates 2 .* train.gradient_accumulation_steps is 1"):
        T.train(tiny_config(pairs, tmp_path / "c", "train.max_steps=1"))


def test_a_resume_onto_the_other_optimizer_is_refused_and_a_move_to_another_folder_is_said(pairs, tmp_path, caplog):
    """optim.adam_8bit=auto picks the 8-bit AdamW where bitsandbytes is installed: a resume on a
    machine without it put AdamW8bit's state into torch's AdamW (a bare KeyError at the first
    step). The optimizer is recorded and a mismatch refused before any model loads. A resume into
    another train.output_dir goes on there, and says so."""
    import json
    import logging

    first = T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=2", "checkpoint.every=2"))
    state_file = Path(first.checkpoint) / T.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["optimizer"] == T.ADAMW
    caplog.set_level(logging.INFO, logger="fluxsr")
    moved = T.train(tiny_config(pairs, tmp_path / "elsewhere", "train.max_steps=3", f"train.resume={first.checkpoint!r}"))
    assert f"continuing the run of {first.checkpoint} in train.output_dir={tmp_path / 'elsewhere'}" in caplog.text
    assert Path(moved.checkpoint).parent == tmp_path / "elsewhere" / T.CHECKPOINT_DIR
    state_file.write_text(json.dumps({**state, "optimizer": T.ADAMW_8BIT}))
    with pytest.raises(ConfigError, match=r"was trained with AdamW8bit \(bitsandbytes\), and this run would make AdamW "
                                          r"\(torch\) \(optim.adam_8bit=auto on cpu\).*install bitsandbytes"):
        T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=4", "train.resume=latest"))


def test_the_launchers_mixed_precision_is_not_dropped_without_a_word(pairs, tmp_path, monkeypatch, caplog):
    """`accelerate launch --mixed_precision bf16` set ACCELERATE_MIXED_PRECISION, which the trainer's
    own train.mixed_precision overrode silently (the first log line said "no")."""
    import logging

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    caplog.set_level(logging.WARNING, logger="fluxsr")
    T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=1"))
    assert ("accelerate launch asked for mixed precision bf16, but this run uses no (train.mixed_precision=auto): "
            "set train.mixed_precision=bf16 to train in bf16") in caplog.text
    caplog.clear()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's own default: nothing to say
    T.train(tiny_config(pairs, tmp_path / "again", "train.max_steps=1"))
    assert "accelerate launch asked" not in caplog.text


def test_lora_and_adl_selections_the_model_cannot_take_are_refused_before_it_loads(pairs, tmp_path, monkeypatch):
    """A LoRA block, target or ADL block the transformer lacks, and the 8-bit AdamW without
    bitsandbytes, are refused from the model's layout before its weights load (on FLUX.1-dev
    they were found only after minutes of loading 24 GB), and the run folder is not made."""
    import importlib.util

    monkeypatch.setattr(T, "build_student", lambda *a, **k: pytest.fail("a model was built before the refusal"))
    run = tmp_path / "run"
    for setting, message in [
            ("lora.blocks='double:5'", r"^lora.blocks: block selection 'double:5': index 5 is out of range; this model has 1 double "),
            ("lora.target_modules=['attn.to_q', 'attn.to_qq']", r"^lora.target_modules \['attn.to_qq'\] match no "
                                                               r"linear layer of the selected blocks"),
            ("loss.adl_blocks='single:9'", r"^loss.adl_blocks='single:9' with loss.adl_form=tokens: block selection "
                                           r"'single:9': index 9 is out of range"),
            ("loss.adl_blocks='double:-1;triple:0'", r"^loss.adl_blocks='double:-1;triple:0' with "
                                                     r"loss.adl_form=tokens: ")]:
        with pytest.raises(ConfigError, match=message):
            T.train(tiny_config(pairs, run, "train.max_steps=2", "loss.w_adl=0.1", setting))
    monkeypatch.undo()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real_find_spec(name, *a, **k))
    with pytest.raises(ConfigError, match="^optim.adam_8bit=true needs bitsandbytes: pip install bitsandbytes"):
        T.train(tiny_config(pairs, run, "train.max_steps=2", "optim.adam_8bit=true"))
    assert not run.exists()


def test_resume_with_another_accumulation_count_syncs_at_the_end_of_each_window(pairs, tmp_path, monkeypatch):
    """accelerate restores its micro-batch counter and syncs when it reaches a multiple of the
    accumulation count: resumed with 3 micro-batches per step after a run of 2, every step
    stepped after its 2nd micro-batch and the 3rd leaked into the next. The counter starts afresh."""
    import contextlib

    import accelerate

    syncs = []
    real = accelerate.Accelerator.accumulate

    @contextlib.contextmanager
    def accumulate(self, *models_):
        with real(self, *models_):
            syncs.append(self.sync_gradients)
            yield

    monkeypatch.setattr(accelerate.Accelerator, "accumulate", accumulate)
    common = ("train.max_steps=6", "checkpoint.every=2", "data.batch_size=1")
    T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=2", "train.gradient_accumulation_steps=2"))
    assert syncs == [False, True] * 2
    syncs.clear()
    T.train(tiny_config(pairs, tmp_path / "run", *common, "train.stop_at=4", "train.gradient_accumulation_steps=3",
                        "train.resume=latest"))
    assert syncs == [False, False, True] * 2


def test_deepspeed_setups_the_trainer_cannot_run_are_refused_and_the_batch_size_filled():
    """ZeRO-3 partitions the LoRA itself (empty tensors in checkpoints and export); an accelerate
    config without a DeepSpeed file leaves the micro-batch "auto", which accelerate fills only
    from DataLoaders handed to prepare (the trainer hands none)."""
    assert T.deepspeed_setup_problem({"zero_optimization": {"stage": 2}}) is None
    assert T.deepspeed_setup_problem(None) is None
    assert "ZeRO stage 3 is not supported" in T.deepspeed_setup_problem({"zero_optimization": {"stage": 3}})
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    T.fill_deepspeed_batch_size(config, 2)
    assert config["train_micro_batch_size_per_gpu"] == 2
    config = {"train_micro_batch_size_per_gpu": 4}
    T.fill_deepspeed_batch_size(config, 2)  # a DeepSpeed file's own value stays
    assert config["train_micro_batch_size_per_gpu"] == 4


def test_mixed_precision_fp16_on_the_cpu_is_refused_and_auto_follows_the_gpus_hardware(monkeypatch):
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 needs a GPU"):
        T._mixed_precision("fp16", "cpu")
    assert T._mixed_precision("bf16", "cpu") == "bf16" and T._mixed_precision("auto", "cpu") == "no"
    from fluxsr_core import models

    monkeypatch.setattr(models, "resolve_device", lambda device="auto": torch.device("cuda", 0))
    for capability, expected in (((7, 0), "fp16"), ((8, 6), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert T._mixed_precision("auto", "cuda") == expected


def test_deepspeed_clipping_must_agree_with_max_grad_norm():
    assert T.deepspeed_clipping_problem({"gradient_clipping": 1.0}, 1.0) is None
    assert T.deepspeed_clipping_problem({"gradient_clipping": "auto"}, 0.5) is None
    assert T.deepspeed_clipping_problem(None, 0.5) is None
    assert "clips gradients at 1 (gradient_clipping) but optim.max_grad_norm is 0.5" in \
        T.deepspeed_clipping_problem({"gradient_clipping": 1.0}, 0.5)


def test_pairs_with_and_without_stored_images_train_alike(tmp_path, caplog):
    """A dataset where only some pairs carry the teacher image: every pair is decoded from z_0
    (one treatment, said in the log); 'stored' is refused at setup, not mid-run."""
    from fluxsr_core import models

    folder = tmp_path / "mixed"
    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=0))
    g = torch.Generator().manual_seed(0)
    t5, clip = torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g)
    with PairWriter(folder, writer_id="t0", shard_size=1, fsync=False) as w, torch.no_grad():
        for i in range(4):
            z0 = codec.encode(torch.rand(1, 3, 32, 32, generator=g))
            w.add(pair_id(i, i), torch.randn(z0.shape, generator=g), z0, t5, clip, meta={"seed": i},
                  image=codec.decode(z0)[0] if i % 2 else None)
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    r = T.train(tiny_config(folder, tmp_path / "run", "train.max_steps=4", "data.batch_size=2"))
    assert r.step == 4 and "2 of the 4 pairs have no stored teacher image" in caplog.text
    with pytest.raises(ConfigError, match="teacher_image='stored' but 2 of the 4 pairs"):
        T.train(tiny_config(folder, tmp_path / "run2", "train.max_steps=1", "data.teacher_image=stored"))


def write_sized_pairs(folder: Path, sizes, t5_lengths=None, image_sizes=None) -> Path:
    """Random pairs with latents of ``sizes`` ((h, w) each), their images 8x (or ``image_sizes``),
    T5 conditionings ``t5_lengths`` tokens long (8 each by default; one conditioning per length)."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 16, generator=g)
    with PairWriter(folder, writer_id="t0", shard_size=2, fsync=False) as w:
        for i, (h, wd) in enumerate(sizes):
            length = t5_lengths[i] if t5_lengths else 8
            hw = image_sizes[i] if image_sizes else (8 * h, 8 * wd)
            w.add(pair_id(i, i), torch.randn(16, h, wd, generator=g), torch.randn(16, h, wd, generator=g),
                  torch.randn(1, length, 32, generator=torch.Generator().manual_seed(length)), clip,
                  meta={"seed": i}, image=torch.randint(0, 256, (3, *hw), generator=g, dtype=torch.uint8))
    return folder


def test_pairs_a_run_could_not_use_are_refused_before_any_model(tmp_path, monkeypatch):
    """Start-up read the first training pair's size only: a folder holding two resolutions (e.g.
    ComfyUI teacher-node pairs) stopped at the first batch mixing them, maybe hours in, and a
    resume at that same batch; an odd latent, a stored image of another size or another T5 length
    failed in a training step. Every training pair's sizes are read from the headers now."""
    from fluxsr_core import pairs as P
    from fluxsr_core.pairs import PairDataset

    def check(folder, *extra):
        cfg = tiny_config(folder, tmp_path / "unused", *extra)
        ds = PairDataset(folder)
        split = T.split_pairs(ds, cfg.data)
        T.check_pair_shapes(ds, split.train_ids, cfg.data, cfg.degradation.scale, split.teacher_image)

    mixed = write_sized_pairs(tmp_path / "mixed", [(4, 4)] * 5 + [(6, 4)])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "build_student", lambda *a, **k: pytest.fail("a model was built before the refusal"))
        with pytest.raises(ConfigError) as e:
            T.train(tiny_config(mixed, tmp_path / "run", "train.max_steps=2"))
        assert str(e.value) == (
            f"the training pairs of {mixed} have 2 sizes: 32x32 px (5 pairs), 32x48 px (1 pair, e.g. {pair_id(5, 5)}); "
            "a batch (data.batch_size=2) holds pairs of one size, so the run would stop at the first batch that mixes "
            "them: set data.batch_size=1, or put each size in a folder of its own and train on one")
        assert not (tmp_path / "run").exists()
        with pytest.raises(ConfigError, match=rf"^5 training pair\(s\) of {mixed} \(e.g. {pair_id(0, 0)}\) are "
                                              r"32x32 px, not divisible by degradation.scale=3"):
            check(mixed, "data.batch_size=1", "degradation.scale=3")
    check(mixed, "data.holdout=1")  # the odd one out is held out: validation takes one image at a time
    r = T.train(tiny_config(mixed, tmp_path / "run", "train.max_steps=3", "data.batch_size=1"))
    assert r.step == 3

    # folders written before PairWriter refused odd latents and images of another size
    with pytest.MonkeyPatch.context() as m:
        m.setattr(P, "latent_size_problem", lambda *a: None)
        m.setattr(P, "image_size_problem", lambda *a: None)
        odd = write_sized_pairs(tmp_path / "odd", [(5, 5)] * 3)
        wrong = write_sized_pairs(tmp_path / "image", [(4, 4)] * 3, image_sizes=[(32, 32), (64, 64), (32, 32)])
    with pytest.raises(ConfigError, match=rf"^3 training pair\(s\) of {odd} \(e.g. {pair_id(0, 0)}\) cannot be trained "
                                          r"on: the latent is 5x5 \(40x40 px\); FLUX packs 2x2 latent patches, so the "
                                          r"latent width and height must be even: images must be multiples of 16 px. "
                                          r"Make them again at a multiple of 16 px, or leave them out"):
        check(odd, "data.batch_size=1")
    with pytest.raises(ConfigError, match=rf"^1 training pair\(s\) of {wrong} store an image of another size than "
                                          rf"their latent, e.g. {pair_id(1, 1)}: the image is 64x64 px but the 4x4 latent "
                                          rf"decodes to 32x32 px. `fluxsr-train verify {wrong}` lists their shards .*"
                                          r"data.teacher_image=decode"):
        check(wrong)
    check(wrong, "data.teacher_image=decode")  # the stored images are not read

    # a batch stacks the conditionings too
    lengths = write_sized_pairs(tmp_path / "t5", [(4, 4)] * 4, t5_lengths=[8, 8, 8, 9])
    with pytest.raises(ConfigError, match=rf"^the training pairs of {lengths} have conditionings of 2 shapes: T5 \[8, 32\] "
                                          rf"and CLIP \[16\] \(3 pairs\), T5 \[9, 32\] and CLIP \[16\] \(1 pair, e.g. "
                                          rf"{pair_id(3, 3)}\); a batch \(data.batch_size=2\) stacks them.*set "
                                          r"data.batch_size=1"):
        check(lengths)
    check(lengths, "data.batch_size=1")


def test_damaged_and_incomplete_checkpoints_are_named_not_trusted(pairs, tmp_path, caplog):
    """A trainer_state.json that cannot be read was taken as empty, which switched the resume
    checks off (a resume could change the conditioning); a step-N folder without one (a copy cut
    short) was taken as the newest checkpoint; a damaged optimizer file ended in torch's traceback."""
    import shutil

    from fluxsr_training import export

    T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=2"))
    ckpts = T.list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000004"]
    # a step folder without its state file is no checkpoint: the newest complete one is resumed
    (tmp_path / "run" / T.CHECKPOINT_DIR / "step-0000099").mkdir()
    assert T.latest_checkpoint(tmp_path / "run") == ckpts[-1]
    assert T.incomplete_checkpoints(tmp_path / "run") == [tmp_path / "run" / T.CHECKPOINT_DIR / "step-0000099"]
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        T.train(tiny_config(pairs, tmp_path / "run", "train.max_steps=5", "checkpoint.every=2",
                            "checkpoint.keep_last=3", "train.resume=latest"))
    assert "step-0000099 has no trainer_state.json, so it is not a checkpoint" in caplog.text
    assert export.find_checkpoint(tmp_path / "run").name == "step-0000005"
    # a damaged state file: refused, naming it and the checkpoint before it
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    newest = T.latest_checkpoint(copy)
    (newest / T.STATE_FILE).write_text('{"step": 5, ', encoding="utf-8")
    for run in (lambda: T.train(tiny_config(pairs, copy, "train.max_steps=8", "train.resume=latest")),
                lambda: export.export_student(copy, tmp_path / "exported")):
        with pytest.raises(T.DamagedCheckpointError, match=rf"checkpoint {re.escape(str(newest))} is damaged: its "
                                                           rf"trainer_state.json cannot be read .*--resume .*step-0000004"):
            run()
    assert not (tmp_path / "exported").exists()
    # a damaged optimizer state: the same kind of message, not torch's traceback
    shutil.rmtree(copy)
    shutil.copytree(tmp_path / "run", copy)
    optimizer = next(T.latest_checkpoint(copy).glob("optimizer*.bin"))
    optimizer.write_bytes(optimizer.read_bytes()[:50])
    with pytest.raises(T.DamagedCheckpointError, match=r"is damaged: its state could not be loaded .*--resume "):
        T.train(tiny_config(pairs, copy, "train.max_steps=8", "train.resume=latest"))


def test_the_run_claims_a_prompt_only_for_pairs_encoded_from_it(tmp_path):
    """Pairs made with --bundle keep their prompt line (it picks seeds and order) but were not
    encoded from it: the run's conditioning (and so the exported bundle) claimed it."""
    import safetensors

    from fluxsr_core.bundle import KEY_PROMPT

    for name, meta, want in (("from_bundle", {"prompt": "photo number 1", "conditioning": "bundle:ee7a"}, None),
                             ("from_text", {"prompt": "a cat", "conditioning": "text-encoders:3f1c"}, "a cat")):
        folder = write_pair_folder(tmp_path / name, range(3), meta=meta)
        result = T.train(tiny_config(folder, tmp_path / f"run_{name}", "train.max_steps=1"))
        with safetensors.safe_open(str(Path(result.checkpoint) / T.CONDITIONING_FILE), "pt") as f:
            assert (f.metadata() or {}).get(KEY_PROMPT) == want, name


def test_a_fresh_run_sets_aside_the_metrics_of_one_killed_before_its_first_checkpoint(pairs, tmp_path):
    """Appended, the two runs' steps 1..N were interleaved in one metrics.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    earlier = b'{"kind": "start", "step": 0}\n{"kind": "train", "step": 1, "loss": 9.0}\n'
    (run / T.METRICS_FILE).write_bytes(earlier)
    T.train(tiny_config(pairs, run, "train.max_steps=1", "train.log_every=1"))
    (aside,) = run.glob("metrics.before-*.jsonl")
    assert aside.read_bytes() == earlier
    records = [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines()]
    assert records[0]["kind"] == "start" and [r["step"] for r in records if r["kind"] == "train"] == [1]
    assert all(r.get("loss") != 9.0 for r in records)


def test_resume_from_a_missing_path_is_a_clear_error(pairs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        T.train(tiny_config(pairs, tmp_path / "x", f"train.resume={str(tmp_path / 'nowhere')!r}"))


def test_a_conditioning_of_other_widths_is_refused_before_the_models_load(pairs, tmp_path, monkeypatch):
    """A bundle (or pairs) made for another model is refused from the transformer's header, before
    anything is built: before, the bundle's check came after the minutes of loading, and the
    pairs' widths failed at the first step."""
    from fluxsr_core.bundle import BundleError, save_bundle
    from fluxsr_core.settings import RunSettings

    def no_build(*args, **kwargs):
        raise AssertionError("built the student before refusing")

    monkeypatch.setattr(T, "build_student", no_build)
    wide = save_bundle(tmp_path / "flux_bundle.safetensors", torch.randn(1, 8, 4096), torch.randn(1, 768), RunSettings())
    with pytest.raises(BundleError, match="t5 is 4096 wide, the transformer takes 32"):
        T.train(tiny_config(pairs, tmp_path / "run", f"data.conditioning={wide!r}"))
    other = tmp_path / "other_pairs"
    with PairWriter(other, writer_id="t0", fsync=False) as w:
        for i in range(3):
            w.add(pair_id(i, i), torch.randn(16, 4, 4), torch.randn(16, 4, 4), torch.randn(8, 64), torch.randn(16))
    with pytest.raises(ConfigError, match=r"the conditionings in .*other_pairs do not fit tiny: t5 is 64 wide, the "
                                          r"transformer takes 32 \(joint_attention_dim\)\. The pairs were made for"):
        T.train(tiny_config(other, tmp_path / "run2", "data.teacher_image=decode"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_a_torn_last_line_is_cut_back_to_the_last_whole_one(tmp_path):
    path = tmp_path / "m.jsonl"
    T._drop_torn_last_line(path)  # no file: nothing to do
    assert not path.exists()
    for whole, torn in [(b'{"a": 1}\n' * 3, b'{"b": "' + b"x" * 70000), (b"", b'{"only": "a torn line'),
                        (b'{"a": 1}\n', b"")]:
        path.write_bytes(whole + torn)  # the first torn line is longer than the 64 KiB look-back chunk
        T._drop_torn_last_line(path)
        assert path.read_bytes() == whole


# --- two processes ----------------------------------------------------------------------------

def launch_two_cpu_processes(script: Path, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``script args`` as two CPU processes (gloo) on a free port."""
    with socket.socket() as sock:  # a free port for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


TWO_PROCESS_TRAIN_ARGS = ["model.transformer=tiny", "model.vae=tiny", "model.dtype=fp32", "train.progress_bar=false",
                          "lora.rank=4", "lora.alpha=4", "loss.w_tvlpips=0", "degradation.scale=2",
                          "train.max_steps=2", "checkpoint.every=2", "train.tensorboard=false", "data.batch_size=1"]


def failed_two_process_run(script: Path, pairs: Path, tmp_path: Path, *extra: str) -> str:
    """``script`` (a training run) as two CPU processes on the tiny model, which must fail: their
    output."""
    proc = launch_two_cpu_processes(script, [*TWO_PROCESS_TRAIN_ARGS, f"data.pairs={str(pairs)!r}", *extra,
                                             f"train.output_dir={str(tmp_path / 'run')!r}"], timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    return out


@pytest.mark.parametrize("phase,doing", [("build_student", "build its models"),
                                         ("load_bundle", "set up the conditioning"),
                                         ("first_pair_read", "set up its data")])
def test_a_setup_failure_on_one_process_stops_both_without_waiting(pairs, tmp_path, phase, doing):
    """A failure on rank 1 alone while it builds its models (a GPU out of memory), reads the
    conditioning or the first pair (a file that node cannot read) stops rank 0 with an error
    naming rank 1's. Before, rank 0 went on into accelerate's prepare (or the next collective) and
    waited there: `accelerate launch` on one machine then killed it, but processes started by
    other means (one per SLURM task, other nodes) waited until the process group timed out."""
    bundle = tmp_path / "student_bundle.safetensors"
    write_bundle(bundle, seed=0)
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from fluxsr_core.pairs import PairDataset
        from fluxsr_training import trainer as T

        if int(os.environ["RANK"]) == 1:
            def fail(*args, **kwargs):
                raise RuntimeError("simulated failure of rank 1 in {phase}")

            owner, name = {{"build_student": (T, "build_student"), "load_bundle": (T, "load_bundle"),
                            "first_pair_read": (PairDataset, "__getitem__")}}["{phase}"]
            setattr(owner, name, fail)
        T.train(T.load_train_config(None, sys.argv[1:]))
    """))
    out = failed_two_process_run(script, pairs, tmp_path, f"data.conditioning={str(bundle)!r}")
    assert f"process 1 could not {doing}: RuntimeError: simulated failure of rank 1 in {phase}" in out, out[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/*")), "no checkpoint of a run that never started"


@pytest.mark.parametrize("failure,message", [
    ("error", "process 1 could not run training step 2: RuntimeError: simulated failure of rank 1 at step 2"),
    ("nan", "process 1 could not run training step 1: FloatingPointError: loss is nan at step 1")])
def test_a_failure_in_a_training_step_on_one_process_stops_both(pairs, tmp_path, failure, message):
    """An error on rank 1 alone in a step's forward (an out-of-memory, a bad batch) or a
    non-finite loss there stops rank 0 too, with an error naming rank 1's. Before, rank 0 went on
    into the backward's all-reduce and waited: `accelerate launch` on one machine then killed it
    without a word, and processes started by other means waited for the group's timeout."""
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        import torch
        from fluxsr_training import trainer as T

        if int(os.environ["RANK"]) == 1:
            real, calls = T.compute_losses, []

            def failing(*args, **kwargs):
                calls.append(1)
                parts = real(*args, **kwargs)
                if "{failure}" == "nan":
                    parts.total = parts.total * float("nan")
                elif len(calls) == 2:
                    raise RuntimeError("simulated failure of rank 1 at step 2")
                return parts

            T.compute_losses = failing
        T.train(T.load_train_config(None, sys.argv[1:]))
    """))
    out = failed_two_process_run(script, pairs, tmp_path)
    assert message in out, out[-3000:]                      # rank 0's own error, naming rank 1's
    assert not list((tmp_path / "run").glob("checkpoints/*")), "no checkpoint of a failed step"


@pytest.mark.parametrize("failure,message", [
    ("validation", "process 0 could not validate step 0: RuntimeError: simulated failure of rank 0's validation"),
    ("metrics", "process 0 could not write metrics.jsonl: OSError: [Errno 28] No space left on device"),
    ("checkpoint folder", "process 0 could not write checkpoint step 2: PermissionError: [Errno 13] Permission "
                          "denied")])
def test_a_failure_in_the_main_process_alone_stops_the_others(pairs, tmp_path, failure, message):
    """The main process alone validates, appends to metrics.jsonl and makes each checkpoint's
    folder: when that fails there (an out-of-memory in validation, a full disk), rank 1 stops too,
    with an error naming rank 0's. Before, rank 1 went on to the next collective and waited there
    (`accelerate launch` on one machine then killed it without a word; processes started by other
    means waited for the group's timeout)."""
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(f"""
        import errno, os, sys
        import fluxsr_core.upscaler
        from fluxsr_training import trainer as T

        if int(os.environ["RANK"]) == 0:
            if "{failure}" == "validation":
                def fail(*args, **kwargs):
                    raise RuntimeError("simulated failure of rank 0's validation")

                fluxsr_core.upscaler.upscale_tensor = fail
            elif "{failure}" == "metrics":
                real = T._Run._append_metrics

                def full(self, record):
                    if record["kind"] == "train":
                        raise OSError(errno.ENOSPC, "No space left on device")
                    real(self, record)

                T._Run._append_metrics = full
            else:
                real = T.Path.mkdir

                def refused(self, *args, **kwargs):
                    if self.name.startswith(".tmp-step-"):
                        raise PermissionError(errno.EACCES, "Permission denied", str(self))
                    real(self, *args, **kwargs)

                T.Path.mkdir = refused
        T.train(T.load_train_config(None, sys.argv[1:]))
    """))
    extra = ("validation.every=2", "data.holdout=1") if failure == "validation" else ()
    out = failed_two_process_run(script, pairs, tmp_path, "train.log_every=1", *extra)
    assert message in out, out[-3000:]  # rank 1's error, naming rank 0's
    assert not list((tmp_path / "run").glob("checkpoints/*")), "no checkpoint was written"


def test_a_checkpoint_write_failing_on_one_process_stops_both_and_leaves_no_part(pairs, tmp_path):
    """Each rank writes its own part of a checkpoint (its RNG state): when rank 1's write fails
    (a full disk), rank 0 stops too instead of waiting at the next collective, the part-written
    folder is removed, and both say so."""
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent("""
        import errno, os, sys
        from accelerate import Accelerator
        from fluxsr_training import trainer as T

        if int(os.environ["RANK"]) == 1:
            def full(self, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", "random_states_1.pkl")

            Accelerator.save_state = full
        T.train(T.load_train_config(None, sys.argv[1:]))
    """))
    out = failed_two_process_run(script, pairs, tmp_path)
    assert "writing checkpoint step 2 into" in out and "No checkpoint is kept yet" in out, out[-3000:]
    assert "process 1 could not write checkpoint step 2: OSError" in out, out[-3000:]  # rank 0's, naming rank 1's
    assert list((tmp_path / "run" / T.CHECKPOINT_DIR).iterdir()) == []  # the part-written folder removed


def test_two_cpu_processes_match_one_with_the_same_global_batch(pairs, tmp_path):
    """Two processes of batch 1 train as one of batch 2. They also agree on the held-out pair when a
    writer adds a pair between their opens of the folder (here: rank 1 reads a copy holding one
    pair more, which sorts last): the main process decides the split by id, so rank 1 neither
    trains on rank 0's validation pair nor runs a longer sample stream."""
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(pairs, grown)
    write_pair_folder(grown, range(5, 6), writer="t1", seed=1)
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from pathlib import Path
        from fluxsr_training import trainer as T

        rank, grown, overrides = int(os.environ["RANK"]), sys.argv[1], sys.argv[2:]
        if rank == 1:  # the folder as it reads after a writer added a pair
            overrides.append(f"data.pairs={grown!r}")
        setup = T._Run._setup_data

        def record_split(self, *args):
            setup(self, *args)
            ids = self.pairs.ids
            Path(grown).with_name(f"split-rank{rank}.json").write_text(json.dumps(
                {"train": [ids[i] for i in self.train_indices], "holdout": self.holdout_ids}))

        T._Run._setup_data = record_split
        T.train(T.load_train_config(None, overrides))
        T.exit_without_teardown(0)  # as fluxsr-train ends each process of a launch
    """))
    common = ["model.transformer=tiny", "model.vae=tiny", "model.dtype=fp32", f"data.pairs={str(pairs)!r}",
              "train.progress_bar=false", "lora.rank=4", "lora.alpha=4", "optim.lr=1e-2", "optim.warmup_steps=0",
              "loss.w_tvlpips=0", "loss.w_adl=0.1", "degradation.scale=2", "degradation.second_stage=false",
              "train.max_steps=3", "checkpoint.every=3", "train.tensorboard=false", "data.holdout=1",
              "loss.adl_form=attention", "loss.adl_queries=3"]  # its query draw is seeded per sample
    proc = launch_two_cpu_processes(script, [str(grown), *common, "data.batch_size=1",
                                             f"train.output_dir={str(tmp_path / 'two')!r}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    splits = [json.loads((tmp_path / f"split-rank{r}.json").read_text()) for r in (0, 1)]
    assert splits[0] == splits[1] == {"train": [pair_id(i, i) for i in range(4)], "holdout": [pair_id(4, 4)]}
    one = T.train(T.load_train_config(None, [*common, "data.batch_size=2", f"train.output_dir={str(tmp_path / 'one')!r}"]))
    state = (tmp_path / "two" / T.CHECKPOINT_DIR / "step-0000003" / T.STATE_FILE).read_text()
    assert '"processes": 2' in state and '"global_batch": 2' in state
    a = lora_file(one.checkpoint)
    b = lora_file(tmp_path / "two" / T.CHECKPOINT_DIR / "step-0000003")
    assert a.keys() == b.keys()
    moved = max(float(a[k].abs().max()) for k in a if ".lora_B." in k)
    assert moved > 1e-3  # the weights did move (lora_B starts at zero)
    # Gradients summed in another order (all-reduce of two halves vs one batch) differ in the last
    # bits; Adam's normalised steps carry that into the weights, most where a gradient is near
    # zero (measured 1.3e-4 after 3 steps at lr 1e-2, against weight changes of 3.0e-2; 2e-5 when
    # the decode was clamped and many gradients were exactly zero).
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2 * moved


def test_the_frozen_base_is_not_broadcast_so_fp8_storage_trains_on_two_cpu_processes(pairs, tmp_path):
    """DDP broadcasts every parameter of the model it wraps from rank 0, the frozen base too: 24 GB
    of FLUX.1-dev in bf16 that every process has just loaded from the same file, and with fp8
    storage a dtype gloo cannot send ("Invalid scalar type"), so two CPU processes could not train
    in fp8. The LoRA alone is synced now; the base is checked to be the same by content instead,
    and a process that loaded another one is refused by name."""
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch
        from fluxsr_training import trainer as T

        rank, overrides = int(os.environ["RANK"]), sys.argv[1:]
        broadcast = []
        real = torch.distributed._broadcast_coalesced

        def counting(group, tensors, *args, **kwargs):
            broadcast.extend(t.numel() for t in tensors)
            return real(group, tensors, *args, **kwargs)

        torch.distributed._broadcast_coalesced = counting
        if "other-base" in overrides:  # rank 1 on another node, with another file at the same path
            overrides = [o for o in overrides if o != "other-base"] + (["model.init_seed=7"] if rank == 1 else [])
        T.train(T.load_train_config(None, overrides))
        print(f"rank {rank} broadcast {sum(broadcast)} values", flush=True)
        T.exit_without_teardown(0)
    """))
    args = [*TWO_PROCESS_TRAIN_ARGS, f"data.pairs={str(pairs)!r}", "model.memory_mode=fp8_storage"]
    proc = launch_two_cpu_processes(script, [*args, f"train.output_dir={str(tmp_path / 'run')!r}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # the LoRA alone: rank 4 on 17 layers of the tiny model (6,784 values, as its log says)
    assert "rank 0 broadcast 6784 values" in out and "rank 1 broadcast 6784 values" in out, out[-3000:]
    assert (tmp_path / "run" / T.CHECKPOINT_DIR / "step-0000002" / T.LORA_FILE).is_file()
    proc = launch_two_cpu_processes(script, [*args, "other-base", f"train.output_dir={str(tmp_path / 'other')!r}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("process 1 loads another base model than process 0 from model.transformer=tiny (compared by content)"
            in out), out[-3000:]
    assert not (tmp_path / "other" / T.CHECKPOINT_DIR).exists()


def test_a_decision_of_the_main_process_reaches_the_others_errors_included(monkeypatch):
    """What `_decided_on_main` gives every process (a fake broadcast carries the main process's box
    to the other one): the main's result, not a decision of their own; the main's refusal,
    raised everywhere (no process left waiting for the others)."""
    import accelerate.utils

    sent: list = []

    def broadcast(box, from_process=0):  # the main process sends first, the other receives
        if sent:
            box[0] = sent.pop()
        else:
            sent.append(box[0])
        return box

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)

    class Acc:
        num_processes = 2

    def process(main: bool) -> T._Run:
        run = T._Run.__new__(T._Run)
        run.accelerator, run.main = Acc(), main
        return run

    assert process(True)._decided_on_main(lambda: ["p1", "p2"]) == ["p1", "p2"]
    assert process(False)._decided_on_main(lambda: pytest.fail("decided on another process")) == ["p1", "p2"]

    def refuse():
        raise ConfigError("data.holdout=9 leaves no training pairs")

    for main in (True, False):
        with pytest.raises(ConfigError, match="data.holdout=9 leaves no training pairs"):
            process(main)._decided_on_main(refuse if main else lambda: pytest.fail("decided on another process"))


def test_a_failure_on_one_process_stops_every_process(monkeypatch):
    """What `_on_every_process` does with a fake reduce and gather of both processes: the failing
    process raises its own error, the other one an error naming it, instead of waiting at the
    next collective; with no failure both go on with their own result, and no report travels
    (the check guards every training micro-step: one flag is reduced, nothing gathered)."""
    import accelerate.utils

    other: dict = {"report": None}   # what process 1 reports; this one is process 0
    gathered = []

    class Acc:
        num_processes = 2
        device = "cpu"

        def reduce(self, flags, op):
            assert op == "sum"
            return flags + (0.0 if other["report"] is None else 1.0)

    def gather(mine):  # both processes' reports, this one's in its place
        gathered.append(mine)
        return [mine[0], other["report"]]

    run = T._Run.__new__(T._Run)
    run.accelerator = Acc()
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    assert run._on_every_process(lambda: 7) == 7 and gathered == []
    other["report"] = ("ConfigError: pair p000004-s4 that the main process chose is not in the folder", False)
    with pytest.raises(T.OtherProcessError, match="process 1 could not set up its data: ConfigError: pair p000004-s4") as e:
        run._on_every_process(lambda: 7)  # this process (the main) succeeded; process 1 did not
    assert not T._is_write_failure(e.value)
    # Whether the other process's error was a failed write is its own verdict, not read off the
    # text here: a permission error (no "No space left" in it) still makes a checkpoint write error.
    other["report"] = ("PermissionError: [Errno 13] Permission denied: 'random_states_1.pkl'", True)
    with pytest.raises(T.OtherProcessError) as e:
        run._on_every_process(lambda: 7, "write checkpoint step 2")
    assert T._is_write_failure(e.value) and "process 1 could not write checkpoint step 2: PermissionError" in str(e.value)

    def lost():
        raise ConfigError("pair p000004-s4 ...")

    other["report"] = None
    with pytest.raises(ConfigError, match=r"^pair p000004-s4 \.\.\.$"):
        run._on_every_process(lost)  # the failing process raises its own error
    assert gathered[-1] == [("ConfigError: pair p000004-s4 ...", False)]

    def denied():
        raise PermissionError(13, "Permission denied", "random_states_0.pkl")

    with pytest.raises(PermissionError):
        run._on_every_process(denied)
    assert gathered[-1] == [("PermissionError: [Errno 13] Permission denied: 'random_states_0.pkl'", True)]


# --- the sample stream ----------------------------------------------------------------------------

def test_sample_stream_is_a_seeded_sequence_of_permutations():
    s = T.SampleStream(5, seed=3)
    epoch0 = [s.index(p) for p in range(5)]
    epoch1 = [s.index(p) for p in range(5, 10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(5)) and epoch0 != epoch1
    again = T.SampleStream(5, seed=3)
    assert [again.index(p) for p in range(7, 10)] == epoch1[2:]  # random access = sequential
    assert again.degradation_seed(7) == s.degradation_seed(7) != s.degradation_seed(8)
    assert 0.0 <= s.ftd_uniform(4) < 1.0 and T.SampleStream(5, seed=4).index(0) is not None


def test_lora_targets_default_and_errors():
    from fluxsr_core import models

    tr = models.load_transformer("tiny", dtype="fp32", device=None)
    names = T.resolve_lora_targets(tr, T.DEFAULT_LORA_TARGETS)
    assert "transformer_blocks.0.attn.to_add_out" in names and "single_transformer_blocks.0.proj_out" in names
    assert "proj_out" not in names and not any("norm" in n or "embed" in n for n in names)
    assert len(names) == 17  # 12 double-block + 5 single-block projections
    assert T.resolve_lora_targets(tr, ["attn.to_q"], "single:0") == ["single_transformer_blocks.0.attn.to_q"]
    assert T.resolve_lora_targets(tr, ["re:proj_out"]) == ["proj_out"]
    with pytest.raises(ConfigError, match="attn.to_qq"):
        T.resolve_lora_targets(tr, ["attn.to_qq"])
    with pytest.raises(ConfigError, match="lora.blocks"):
        T.resolve_lora_targets(tr, ["attn.to_q"], "double:5")


# --- config -----------------------------------------------------------------------------------

def test_config_toml_overrides_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlr = 3e-5\n[lora]\nrank = 16\n[degradation]\nscale = 2\njpeg1 = false\n')
    cfg = T.load_train_config(p, ["lora.alpha=8", "data.pairs=/x y/z", "loss.w_adl=0", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-5 and cfg.lora.rank == 16 and cfg.lora.alpha == 8.0
    assert cfg.data.pairs == "/x y/z" and cfg.loss.w_adl == 0.0 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.degradation.scale == 2 and cfg.degradation.jpeg1 is False
    assert cfg.run_settings().scale == 2.0 and cfg.run_settings().lora_rank == 16
    cfg.save(tmp_path / "saved.toml")
    assert T.load_train_config(tmp_path / "saved.toml") == cfg
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        T.load_train_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="whole number"):
        T.load_train_config(None, ["lora.rank=1.5"])
    with pytest.raises(ConfigError, match="is a section"):
        T.load_train_config(None, ["optim=1"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.foo'"):
        p.write_text("[optim]\nfoo = 1\n")
        T.load_train_config(p)
    # A number where a path or a name goes: refused in a file (it was the string "3"); on the
    # command line it is the text as typed (train.output_dir=1e3 was "1000.0").
    p.write_text("[model]\ntransformer = 3\n")
    with pytest.raises(ConfigError, match=r"^\S+c\.toml: config key 'model.transformer' must be a string "
                                          r"\(in quotes: \"3\"\), got 3$"):
        T.load_train_config(p)
    cli = T.load_train_config(None, ["train.output_dir=1e3", "model.transformer=3", "train.tensorboard=false",
                                     "data.pairs=2024-05-01"])
    assert (cli.train.output_dir, cli.model.transformer, cli.train.tensorboard, cli.data.pairs) == (
        "1e3", "3", "false", "2024-05-01")
    p.write_text("[model\n")
    with pytest.raises(ConfigError) as broken:
        T.load_train_config(p)
    assert str(broken.value).count(str(p)) == 1 and "is not valid TOML" in str(broken.value)  # the path once
    bad = T.load_train_config(None, ["model.transformer=tiny", "model.vae=tiny", "data.pairs=x",
                                     "loss.w_ftd=0", "loss.w_mse=0", "loss.w_tvlpips=0", "loss.w_adl=0"])
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        T.train(bad)
    for override, msg in [("loss.adl_form=maps", "loss.adl_form must be one of tokens, attention"),
                          ("loss.adl_queries=0", "loss.adl_queries must be at least 1")]:
        with pytest.raises(ConfigError, match=msg):
            T.check_config(T.load_train_config(None, ["model.transformer=tiny", "model.vae=tiny", "data.pairs=x",
                                                      override]))
    with pytest.raises(ConfigError, match="model.transformer is required"):
        T.train(T.TrainConfig())


# --- memory options -----------------------------------------------------------------------------

def _grads(cfg: T.TrainConfig, z_l, z0, eps, x0, cond, t) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    from fluxsr_core import models

    torch.manual_seed(0)  # the LoRA's initial values
    tr, vae, dtype = T.build_student(cfg, "cpu")
    tr.train()
    params = T.lora_parameters(tr)
    with torch.no_grad():
        # lora_B starts at zero; make the LoRA path carry gradient to lora_A too. lora_A is set
        # as well, so that runs with different memory modes (whose random starts differ: the fp8
        # modes draw lora_A again in fp32) compare the same LoRA.
        for k, p in params.items():
            if ".lora_B." in k:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
            elif ".lora_A." in k:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k) + 1000))
    hook = ADLFeatureHook(tr, "double:0;single:0", active=False)
    vel = models.DiffusersVelocity(tr, compute_dtype=dtype)
    codec = models.DiffusersCodec(vae, compute_dtype=dtype)
    parts = T.compute_losses(vel, codec, z_l=z_l, z0=z0, eps=eps, x0=x0, cond=cond, t_l=0.25, ftd_t=t,
                             loss=T.LossConfig(w_tvlpips=0.0, w_adl=0.5), adl_hook=hook)
    parts.total.backward()
    hook.remove()
    return {k: p.grad.clone() for k, p in params.items()}, tr


def test_gradient_checkpointing_and_fp8_storage(pairs, tmp_path):
    g = torch.Generator().manual_seed(1)
    z_l, z0, eps = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    x0, t = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([0.4, 0.8])
    cond = Conditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g))
    base = tiny_config(pairs, tmp_path)
    plain, _ = _grads(base, z_l, z0, eps, x0, cond, t)
    ckpt, tr = _grads(base.with_overrides(["model.gradient_checkpointing=true"]), z_l, z0, eps, x0, cond, t)
    assert tr.gradient_checkpointing and plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)  # same maths, less memory
    assert all(float(v.abs().max()) > 0 for v in plain.values())
    torch.manual_seed(0)
    fresh, _, _ = T.build_student(base.with_overrides(["model.memory_mode=fp8_storage"]), "cpu")
    start = fresh.transformer_blocks[0].attn.to_q.lora_A[T.DEFAULT_ADAPTER_NAME].weight
    # the fp8 modes' random start is a full fp32 draw, not one rounded to fp8's 3 mantissa bits
    assert start.dtype == torch.float32 and (start.to(torch.float8_e4m3fn).float() != start).float().mean() > 0.9
    fp8, tr8 = _grads(base.with_overrides(["model.memory_mode=fp8_storage"]), z_l, z0, eps, x0, cond, t)
    q = tr8.transformer_blocks[0].attn.to_q
    assert q.base_layer.weight.dtype == torch.float8_e4m3fn and not q.base_layer.weight.requires_grad
    assert q.lora_A[T.DEFAULT_ADAPTER_NAME].weight.dtype == torch.float32 and q.lora_A[T.DEFAULT_ADAPTER_NAME].weight.requires_grad
    assert all(torch.isfinite(v).all() and float(v.abs().max()) > 0 for v in fp8.values())
    # fp8 rounding of the base changes the gradients a little, not their direction
    cos = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in plain.values()]),
                                                torch.cat([v.flatten() for v in fp8.values()]), dim=0)
    assert cos > 0.9, float(cos)
    # fp8_storage_all: the modulation linears in fp8 too; the LoRA still fp32 and trainable
    fp8all, tra = _grads(base.with_overrides(["model.memory_mode=fp8_storage_all"]), z_l, z0, eps, x0, cond, t)
    assert tra.transformer_blocks[0].norm1.linear.weight.dtype == torch.float8_e4m3fn
    assert tr8.transformer_blocks[0].norm1.linear.weight.dtype != torch.float8_e4m3fn
    assert tra.transformer_blocks[0].attn.to_q.lora_A[T.DEFAULT_ADAPTER_NAME].weight.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in plain.values()]),
                                                torch.cat([v.flatten() for v in fp8all.values()]), dim=0)
    assert cos > 0.9, float(cos)


def test_cli_unwraps_errors_raised_in_dataloader_workers():
    from fluxsr_training.cli import _user_message

    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: pair p7 has no stored teacher image")
    assert _user_message(wrapped) == "pair p7 has no stored teacher image"
    assert _user_message(ValueError("plain message")) == "plain message"


def test_cli_ends_each_process_of_a_launch_without_the_teardown(pairs, tmp_path, monkeypatch):
    """In a multi-process launch (WORLD_SIZE > 1) fluxsr-train ends its process through
    exit_without_teardown with the run's exit status, the refused run's 2 too; alone it returns."""
    from fluxsr_training.cli import main

    ended = []

    def end(code):
        ended.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(T, "exit_without_teardown", end)
    monkeypatch.setattr(T, "train", lambda cfg: (_ for _ in ()).throw(ConfigError("refused")))
    assert main(tiny_cli_args(pairs, tmp_path / "run")) == 2 and ended == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(tiny_cli_args(pairs, tmp_path / "run"))
    assert ended == [2]


def test_cli_reports_another_process_failure_in_one_line(pairs, tmp_path, monkeypatch, capsys):
    from fluxsr_training.cli import main

    def fails(cfg):
        raise T.OtherProcessError("process 3 could not run training step 7: OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(T, "train", fails)
    assert main(tiny_cli_args(pairs, tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == ("fluxsr-train train: error: process 3 could not run training "
                                               "step 7: OutOfMemoryError: CUDA out of memory")
    monkeypatch.setattr(T, "train", lambda cfg: 1 / 0)   # not the user's: the traceback, as before
    with pytest.raises(ZeroDivisionError):
        main(tiny_cli_args(pairs, tmp_path / "run"))


def test_cli_names_a_folder_it_cannot_write_and_a_wrong_model(pairs, tmp_path, capsys):
    """Ordinary mistakes end in one line, not a traceback: an output_dir inside a file, a VAE
    given as the transformer (named as a VAE, as fluxsr upscale names it)."""
    from fluxsr_training.cli import main

    (tmp_path / "notes.txt").write_text("x")
    assert main(tiny_cli_args(pairs, tmp_path / "notes.txt" / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxsr-train train: error: Not a directory: ") and "notes.txt" in err
    assert "Traceback" not in err
    from fluxsr_core import models, weights

    vae_file = tmp_path / "ae.safetensors"
    import safetensors.torch

    safetensors.torch.save_file(weights.vae_state_dict_to_bfl(models.load_vae("tiny", dtype="fp32").state_dict()),
                                str(vae_file))
    assert main(tiny_cli_args(pairs, tmp_path / "run", f"model.transformer={str(vae_file)!r}")) == 2
    assert "is not a FLUX transformer: it looks like a VAE (ae.safetensors); pass it as --vae" in capsys.readouterr().err


def test_cli_ctrl_c_writes_a_checkpoint_and_says_how_to_continue(pairs, tmp_path, monkeypatch, capsys, request):
    """A first Ctrl-C (a real SIGINT) finishes the step and writes a checkpoint; a hard interrupt names
    the last checkpoint kept and the steps lost. Both say `--resume latest`, which continues exactly."""
    from fluxsr_training.cli import main

    # Python's own handler, as in a terminal: a suite started as a background job inherits an
    # ignored SIGINT, which training leaves alone (by design), and this test would see no Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    real_train = T.train

    def interrupt_at(step, how):
        def stop_check(s):
            if s == step:
                if how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                elif how == "sigterm":  # twice, as a launcher and a scheduler both send one: still one stop
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise KeyboardInterrupt  # as a second Ctrl-C would, mid-run
            return False
        monkeypatch.setattr(T, "train", lambda cfg: real_train(cfg, stop_check=stop_check))

    run = tmp_path / "run"
    args = tiny_cli_args(pairs, run, "train.max_steps=6", "checkpoint.every=2", "lora.dropout=0.1")
    interrupt_at(3, "raise")
    assert main(args) == 130
    err = capsys.readouterr().err
    ck2 = run / T.CHECKPOINT_DIR / "step-0000002"
    assert f"interrupted at step 3; the last checkpoint kept is {ck2}; the step after it is lost" in err
    assert "Continue with the same command plus --resume latest" in err

    interrupt_at(4, "sigint")  # seen after step 4: step 5 is finished, then checkpointed
    assert main([*args, "--resume", "latest"]) == 130
    err = capsys.readouterr().err
    ck5 = run / T.CHECKPOINT_DIR / "step-0000005"
    assert f"interrupted at step 5; checkpoint {ck5} written, no step lost" in err and "--resume latest" in err
    assert json.loads((ck5 / T.STATE_FILE).read_text())["step"] == 5
    assert json.loads((run / T.METRICS_FILE).read_text().splitlines()[-1]) == {"kind": "interrupt", "step": 5,
                                                                               "saved": True}
    # SIGTERM (a scheduler's preemption, `kill`): the same, with its own exit code
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    interrupt_at(1, "sigterm")
    other = tmp_path / "terminated"
    assert main(tiny_cli_args(pairs, other, "train.max_steps=6", "checkpoint.every=4")) == 143
    out, err = capsys.readouterr()
    ck2 = other / T.CHECKPOINT_DIR / "step-0000002"
    assert "SIGTERM: stopping after this step with a checkpoint" in out + err
    assert f"interrupted at step 2; checkpoint {ck2} written, no step lost" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the run
    monkeypatch.setattr(T, "train", real_train)
    assert main([*args, "--resume", "latest"]) == 0
    assert "train: step 6/6" in capsys.readouterr().out
    # the interrupt's checkpoint is an ordinary one: the result is the uninterrupted run's, bit for bit
    full = real_train(tiny_config(pairs, tmp_path / "full", "train.max_steps=6", "checkpoint.every=2",
                                  "lora.dropout=0.1"))
    a, b = lora_file(full.checkpoint), lora_file(run / T.CHECKPOINT_DIR / "step-0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_summary_names_the_step_of_its_validation_and_warns_of_a_long_warm_up(pairs, tmp_path, capsys):
    from fluxsr_training.cli import main

    assert main(tiny_cli_args(pairs, tmp_path / "run", "train.max_steps=2", "data.holdout=1", "validation.every=5",
                              "optim.warmup_steps=5", "train.log_every=1")) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert re.search(r"train: step 2/2, loss [0-9.]+, validation PSNR [0-9.]+ dB at step 0 \(before training\)", out)
    assert "optim.warmup_steps=5 is not shorter than train.max_steps=2: the learning rate is still warming up" in out
    # steps 1 and 2 run at lr 0 and 0.01 * 1/5 (diffusers' warm-up): the log says the lr each step ran at
    assert "reaches at most 0.002, not optim.lr=0.01" in out
    said = out + captured.err
    assert re.search(r"step 1/2 \|[^\n]*\| lr 0 \|", said) and re.search(r"step 2/2 \|[^\n]*\| lr 0.002 \|", said)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics if m.get("kind") == "train"] == [0.0, pytest.approx(0.002)]
    assert T.config_warnings(tiny_config(pairs, tmp_path, "train.max_steps=2", "optim.warmup_steps=1")) == []


def test_cli_train_config_resolution(capsys, tmp_path):
    from fluxsr_training.cli import main, shipped_config

    assert main(["train", "--config", "train_tiny", "--print-config", "--resume", "data.pairs=/d", "lora.rank=2"]) == 0
    cfg = T.load_train_config(None, [])
    out = capsys.readouterr().out
    (tmp_path / "printed.toml").write_text(out)
    printed = T.load_train_config(tmp_path / "printed.toml")
    assert printed.data.pairs == "/d" and printed.lora.rank == 2 and printed.train.resume == "latest"
    assert printed.model.transformer == "tiny" and printed.train.max_steps == 50 and printed != cfg
    for shipped in ("train_default", "train_tiny"):
        T.check_config(T.load_train_config(shipped_config(shipped), ["model.transformer=t", "model.vae=v",
                                                                     "data.pairs=p"]))
    # overrides on both sides of --resume
    assert main(["train", "--config", "train_tiny", "data.pairs=/d", "--resume", "latest", "lora.rank=3",
                 "--print-config"]) == 0
    both = capsys.readouterr().out
    (tmp_path / "both.toml").write_text(both)
    both = T.load_train_config(tmp_path / "both.toml")
    assert both.data.pairs == "/d" and both.lora.rank == 3 and both.train.resume == "latest"
    assert main(["train", "--config", "no_such_config"]) == 2
    assert "shipped config" in capsys.readouterr().err
    assert main(["train", "optim.lr=-1", "model.transformer=tiny", "model.vae=tiny", "data.pairs=x"]) == 2
    assert "optim.lr must be positive" in capsys.readouterr().err
    # values torch or numpy would only refuse later, naming no key
    for override, said in (("train.seed=-1", "train.seed must lie in 0..2**32-1 (got -1)"),
                           ("data.seed=4294967296", "data.seed must lie in 0..2**32-1"),
                           ("optim.weight_decay=-1", "optim.weight_decay must be a number >= 0 (got -1.0)"),
                           ("optim.eps=-1e-8", "optim.eps must be a number >= 0"),
                           ("model.dtype=fp64", "model.dtype: unknown dtype 'fp64'; use auto, bf16, fp16 or fp32")):
        assert main(["train", override, "model.transformer=tiny", "model.vae=tiny", "data.pairs=x"]) == 2
        assert said in capsys.readouterr().err
    # without --config the shipped defaults the README documents, not the dataclasses' own
    assert main(["train", "--print-config", "data.pairs=/d"]) == 0
    printed = capsys.readouterr()
    (tmp_path / "plain.toml").write_text(printed.out)
    # the value checks are said, not fatal: a template to fill in
    assert "note: as it stands, a run of this config is refused: model.transformer is required" in printed.err
    assert main(["train", "--config", "train_tiny", "--print-config", "data.pairs=/d", "optim.warmup_steps=60"]) == 0
    assert "note: optim.warmup_steps=60 is not shorter than train.max_steps=50" in capsys.readouterr().err
    assert T.load_train_config(tmp_path / "plain.toml") == T.load_train_config(shipped_config("train_default"),
                                                                                ["data.pairs=/d"])


def test_a_users_config_can_extend_train_default_and_is_told_what_it_leaves_to_the_builtin_defaults(tmp_path,
                                                                                                   capsys):
    """A config of one's own holding only what it changes fell back to the dataclass defaults for
    the rest (no gradient checkpointing, no held-out pairs, no validation) without a word.
    `extends` starts it from another config (a shipped name, or a path beside it); without it
    the CLI says which train_default settings it leaves to the built-in defaults."""
    from fluxsr_training.cli import main, shipped_config
    from fluxsr_training.config_io import ConfigError

    mine = tmp_path / "mine.toml"
    mine.write_text('[optim]\nlr = 5e-5\n')
    assert main(["train", "--config", str(mine), "--print-config", "data.pairs=/d"]) == 0
    err = capsys.readouterr().err
    assert f"note: {mine} extends no config, so the" in err
    assert "model.gradient_checkpointing False (train_default: True)" in err
    assert 'put  extends = "train_default"  at the top of the file' in err
    mine.write_text('extends = "train_default"\n[optim]\nlr = 5e-5\n')
    cfg = T.load_train_config(mine)
    assert cfg == T.load_train_config(shipped_config("train_default"), ["optim.lr=5e-5"])
    assert main(["train", "--config", str(mine), "--print-config", "data.pairs=/d"]) == 0
    assert "extends no config" not in capsys.readouterr().err
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"
    child.write_text('extends = "../mine.toml"\n[lora]\nrank = 16\n')  # a path, from the file's own folder
    layered = T.load_train_config(child)
    assert (layered.optim.lr, layered.lora.rank, layered.model.gradient_checkpointing) == (5e-5, 16, True)
    mine.write_text('extends = "sub/child.toml"\n')
    with pytest.raises(ConfigError, match="'extends' goes round in a circle"):
        T.load_train_config(child)
    mine.write_text('extends = "train_nothing"\n')
    with pytest.raises(ConfigError, match="extends = 'train_nothing': config 'train_nothing' is neither a file nor"):
        T.load_train_config(mine)


def test_a_missing_base_is_not_advised_to_be_a_gguf_file_which_training_refuses(pairs, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        T.train(tiny_config(pairs, tmp_path / "run", f"model.transformer={str(tmp_path / 'flux1-dev.safetensors')!r}"))
    said = str(info.value)
    assert "no such file or folder" in said and "not a GGUF file" in said and "pip install gguf" not in said


def test_train_default_validates_every_pair_it_holds_out():
    """holdout 8 with validation.count 4 kept four pairs out of training that no validation used."""
    from fluxsr_training.cli import shipped_config

    cfg = T.load_train_config(shipped_config("train_default"))
    assert cfg.data.holdout > 0 and cfg.validation.count >= cfg.data.holdout

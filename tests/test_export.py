"""Export: the student's LoRA + bundle reload in fluxsr_core on a fresh base and reproduce its output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxsr_core import flow, models
from fluxsr_core.bundle import load_bundle
from fluxsr_core.pairs import PairWriter, pair_id
from fluxsr_training import trainer as T
from fluxsr_training.cli import main as cli_main
from fluxsr_training.export import ExportError, export_student, load_student


pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(folder: Path, n: int, conds: int = 1) -> Path:
    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=0))
    g = torch.Generator().manual_seed(1)
    cs = [(torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g)) for _ in range(conds)]
    with PairWriter(folder, writer_id="e0", shard_size=4, fsync=False) as w, torch.no_grad():
        for i in range(n):
            x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bicubic",
                                                align_corners=False).clamp(0, 1)
            z0 = codec.encode(x)
            t5, clip = cs[i % conds]
            w.add(pair_id(i, i), torch.randn(z0.shape, generator=g), z0, t5, clip, image=codec.decode(z0)[0])
    return folder


def config(pairs: Path, out: Path, *extra: str) -> T.TrainConfig:
    return T.load_train_config(None, [
        "model.transformer=tiny", "model.vae=tiny", "model.dtype=fp32", "model.init_seed=7",
        f"data.pairs={str(pairs)!r}", f"train.output_dir={str(out)!r}", "train.progress_bar=false",
        "lora.rank=4", "lora.alpha=2", "optim.lr=2e-2", "optim.warmup_steps=0", "loss.w_tvlpips=0", "loss.w_adl=0",
        "data.batch_size=2", "degradation.scale=2", "degradation.second_stage=false", "settings.t_l=0.3",
        "settings.guidance=2.5", "train.max_steps=4", "ema.decay=0.5", "ema.warmup=false",
        "train.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    pairs = write_pairs(root / "pairs", 4)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = T.train(config(pairs, root / "run"))
    finally:
        torch.set_num_threads(n)
    return result


def student_output(cfg: T.TrainConfig, lora: dict[str, torch.Tensor], z_l: torch.Tensor, cond) -> torch.Tensor:
    """The trainer's own student (build_student) with the given LoRA tensors, one SR step."""
    tr, _, dtype = T.build_student(cfg, "cpu")
    params = T.lora_parameters(tr)
    assert params.keys() == lora.keys()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(lora[k])
        tr.eval()
        return flow.one_step_sr(models.DiffusersVelocity(tr, compute_dtype=dtype), z_l, cfg.settings.t_l, cond)


def test_export_reloads_in_fluxsr_core_and_reproduces_the_student(run, tmp_path):
    cfg = run.config
    r = export_student(run.output_dir, tmp_path / "out")
    assert r.ema and r.step == 4 and Path(r.checkpoint) == Path(run.checkpoint)
    # the user path: fresh base, fluxsr_core.lora.load_lora, fluxsr_core.bundle.load_bundle
    velocity, codec, cond, settings = load_student(r.lora_path, r.bundle_path, "tiny", "tiny", dtype="fp32",
                                                   init_seed=7)
    assert (settings.t_l, settings.guidance, settings.scale, settings.lora_rank) == (0.3, 2.5, 2.0, 4)
    assert cond.guidance == 2.5
    z_l = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = flow.one_step_sr(velocity, z_l, settings.t_l, cond)
    ema, rank, alpha = T.read_lora_state(Path(run.checkpoint) / T.EMA_LORA_FILE)
    assert (rank, alpha) == (4, 2.0)
    reference = student_output(cfg, ema, z_l, cond)
    assert torch.allclose(exported, reference, atol=1e-6), float((exported - reference).abs().max())
    # ... and it is not the base model's output: the LoRA does something
    base = models.DiffusersVelocity(models.load_transformer("tiny", dtype="fp32", device=None, seed=7))
    with torch.no_grad():
        plain = flow.one_step_sr(base, z_l, settings.t_l, cond)
    assert float((exported - plain).abs().max()) > 1e-3

    # metadata: fluxsr.* run settings, rank/alpha, diffusers' adapter config; the bundle carries the same
    with safe_open(r.lora_path, "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["fluxsr.t_l"] == "0.3" and md["fluxsr.guidance"] == "2.5" and md["fluxsr.scale"] == "2.0"
    # alpha / r = 0.5 is folded into lora_B: alpha = rank in the file, so ComfyUI gets the same strength
    assert md["fluxsr.lora_rank"] == "4" and md["fluxsr.lora_alpha"] == "4.0" and md["fluxsr.weights"] == "ema"
    tensors = load_file(r.lora_path)
    for k, v in ema.items():
        assert torch.allclose(tensors[k], v * (0.5 if ".lora_B." in k else 1.0), rtol=0, atol=0)
    assert md["fluxsr.base_model"] == "black-forest-labs/FLUX.1-dev" and "lora_adapter_metadata" in md
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    b = load_bundle(r.bundle_path)
    assert (b.settings.t_l, b.settings.guidance, b.settings.scale) == (0.3, 2.5, 2.0)
    with safe_open(str(Path(cfg.data.pairs) / next(p.name for p in Path(cfg.data.pairs).glob("cond-*"))), "pt") as f:
        assert torch.equal(b.t5[0], f.get_tensor("t5")) and torch.equal(b.clip_pooled[0], f.get_tensor("clip_pooled"))


def test_raw_weights_and_errors(run, tmp_path):
    raw = export_student(run.checkpoint, tmp_path / "raw", use_ema=False)
    assert not raw.ema
    a = load_file(raw.lora_path)
    b, _, _ = T.read_lora_state(Path(run.checkpoint) / T.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k] * (0.5 if ".lora_B." in k else 1.0)) for k in a)
    ema, _, _ = T.read_lora_state(Path(run.checkpoint) / T.EMA_LORA_FILE)
    assert any(not torch.equal(b[k], ema[k]) for k in b)  # decay 0.5 over 4 steps: EMA != raw
    # the checkpoint's own file (tensors as trained, alpha in the metadata) loads in fluxsr_core
    # and computes what the export computes
    from fluxsr_core.lora import load_lora

    outs = []
    for path in (raw.lora_path, Path(run.checkpoint) / T.LORA_FILE):
        tr = models.load_transformer("tiny", dtype="fp32", device=None, seed=7)
        info = load_lora(tr, path)
        assert info.rank == 4
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            outs.append(models.DiffusersVelocity(tr)(z, torch.tensor([0.3]), load_bundle(raw.bundle_path).to_conditioning()))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        export_student(tmp_path, tmp_path / "x")


def test_runs_without_ema_or_a_single_conditioning(tmp_path, caplog, monkeypatch, capsys):
    pairs = write_pairs(tmp_path / "pairs2", 2, conds=2)
    caplog.set_level(logging.WARNING, logger="fluxsr.train")
    r = T.train(config(pairs, tmp_path / "run2", "train.max_steps=1", "ema.enabled=false"))
    assert r.conditioning_path is None and r.ema_lora_path is None
    # the end-of-run hint of `fluxsr-train train` gives the --bundle that export will need
    monkeypatch.setattr(T, "train", lambda cfg: r)
    assert cli_main(["train", "model.transformer=tiny", "model.vae=tiny", f"data.pairs={str(pairs)!r}",
                     f"train.output_dir={str(tmp_path / 'run2')!r}"]) == 0
    (hint,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("export with:")]
    assert hint.startswith(f"export with: fluxsr-train export {r.output_dir} -o <folder> --bundle <bundle.safetensors> "
                           "(the run trained on several conditionings")
    # said at the start of training, with what to do instead
    assert f"data.conditioning=pairs and {pairs} holds 2 distinct conditionings" in caplog.text
    assert "fluxsr-train bundle --prompt" in caplog.text
    assert "data.conditioning=student_bundle.safetensors" in caplog.text
    with pytest.raises(ExportError, match="no EMA weights"):
        export_student(r.output_dir, tmp_path / "o", use_ema=True)
    with pytest.raises(ExportError, match="no single fixed conditioning.*--bundle.*fluxsr-train bundle --prompt"):
        export_student(r.output_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written: the bundle is found before the LoRA is written
    # with an explicit bundle it exports, and the bundle gets the run's settings
    cond = next(pairs.glob("cond-*.safetensors"))
    from fluxsr_core.bundle import save_bundle
    from fluxsr_core.settings import RunSettings

    t = load_file(str(cond))
    save_bundle(tmp_path / "mine.safetensors", t["t5"], t["clip_pooled"], RunSettings(t_l=0.5))
    e = export_student(r.output_dir, tmp_path / "o", bundle=str(tmp_path / "mine.safetensors"))
    assert not e.ema and load_bundle(e.bundle_path).settings.t_l == 0.3


def test_an_archived_run_exports_the_conditioning_it_trained_with(tmp_path, monkeypatch):
    """Run A is moved aside and run B trains at A's old place (relative paths, same working
    directory): A's export ships A's conditioning, checked against the hash A's checkpoint recorded."""
    from fluxsr_core.bundle import save_bundle
    from fluxsr_core.settings import RunSettings

    monkeypatch.chdir(tmp_path)
    pairs = write_pairs(tmp_path / "pairs", 2)
    bundles = []
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        save_bundle(f"{name}.safetensors", torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g),
                    RunSettings(), prompt=f"the prompt of {name}")
        bundles.append(load_bundle(f"{name}.safetensors"))
    relative = ("train.max_steps=1", "ema.enabled=false")
    T.train(config(pairs, Path("runs/fluxsr"), *relative, "data.conditioning=a.safetensors"))
    Path("archive").mkdir()
    Path("runs/fluxsr").rename("archive/A")
    T.train(config(pairs, Path("runs/fluxsr"), *relative, "data.conditioning=b.safetensors"))
    e = export_student("archive/A", tmp_path / "exp-a")
    shipped = load_bundle(e.bundle_path)
    assert torch.equal(shipped.t5, bundles[0].t5) and not torch.equal(shipped.t5, bundles[1].t5)
    with safe_open(e.bundle_path, "pt") as f:
        assert f.metadata()["fluxsr.prompt"] == "the prompt of a"   # the source's prompt, kept

    ck = T.latest_checkpoint("archive/A")
    own = ck / T.CONDITIONING_FILE
    own.write_bytes(Path("b.safetensors").read_bytes())  # replaced by another run's bundle
    with pytest.raises(ExportError, match=f"{own} holds sha256 .*: the file was replaced or belongs to another run"):
        export_student("archive/A", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # its own copy gone: the run folder's file is accepted only when it matches the recorded hash
    own.unlink()
    Path("archive/A/conditioning.safetensors").write_bytes(Path("b.safetensors").read_bytes())
    with pytest.raises(ExportError, match="sha256"):
        export_student("archive/A", tmp_path / "refused")
    Path("archive/A/conditioning.safetensors").write_bytes(Path("a.safetensors").read_bytes())
    assert torch.equal(load_bundle(export_student("archive/A", tmp_path / "exp-a2").bundle_path).t5, bundles[0].t5)
    # a checkpoint from before the hash was recorded: the run folder's file, as before
    state_file = ck / T.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["conditioning_sha256"]
    state_file.write_text(json.dumps({**state, "conditioning": "runs/fluxsr/conditioning.safetensors"}))
    Path("runs/fluxsr/conditioning.safetensors").write_bytes(Path("b.safetensors").read_bytes())  # never read
    assert torch.equal(load_bundle(export_student("archive/A", tmp_path / "exp-a3").bundle_path).t5, bundles[0].t5)


def test_cli_export(run, tmp_path, capsys):
    assert cli_main(["export", run.output_dir, "-o", str(tmp_path / "cli"), "--no-ema"]) == 0
    out = capsys.readouterr().out
    assert "raw weights" in out and (tmp_path / "cli" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "cli" / "conditioning.safetensors").is_file()
    assert cli_main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_an_earlier_export_is_kept_unless_overwrite_and_never_half_replaced(run, tmp_path):
    first = export_student(run.output_dir, tmp_path / "out", use_ema=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ExportError, match="holds pytorch_lora_weights.safetensors and conditioning.safetensors already"
                                          ".*--overwrite"):
        export_student(run.output_dir, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # a failure while writing the second file leaves the earlier pair as it was, and no temporary files
    import fluxsr_training.export as E

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    original = E.save_bundle
    E.save_bundle = full_disk
    try:
        with pytest.raises(OSError, match="No space left"):
            export_student(run.output_dir, tmp_path / "out", overwrite=True)
    finally:
        E.save_bundle = original
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    second = export_student(run.output_dir, tmp_path / "out", overwrite=True)  # EMA weights this time
    assert load_file(second.lora_path).keys() == load_file(first.lora_path).keys()
    assert Path(second.lora_path).read_bytes() != before["pytorch_lora_weights.safetensors"]  # replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(before)
    (tmp_path / "blocked" / "conditioning.safetensors").mkdir(parents=True)
    with pytest.raises(ExportError, match="a folder named conditioning.safetensors"):
        export_student(run.output_dir, tmp_path / "blocked", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "blocked").iterdir()) == ["conditioning.safetensors"]


def test_a_file_as_the_folder_and_a_cut_checkpoint_file_are_named_with_what_to_do(run, tmp_path):
    """`-o` an existing file stopped with a bare "File exists"; a truncated EMA file in the
    checkpoint was to be "re-downloaded" (training wrote it): named now, with the earlier
    checkpoint or the raw weights beside it to use instead."""
    import shutil

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ExportError, match=r"-o .*taken is a file; the export writes a folder .*give a folder's path"):
        export_student(run.output_dir, tmp_path / "taken")
    with pytest.raises(ExportError, match=r"the export folder .*taken/sub cannot be made .*choose another -o"):
        export_student(run.output_dir, tmp_path / "taken" / "sub")
    copy = Path(shutil.copytree(run.output_dir, tmp_path / "run"))
    newest = T.latest_checkpoint(copy)
    ema = newest / T.EMA_LORA_FILE
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(T.DamagedCheckpointError) as info:
        export_student(copy, tmp_path / "out")
    said = str(info.value)
    assert f"checkpoint {newest} is damaged: {T.EMA_LORA_FILE} is truncated or not a safetensors file" in said
    assert said.endswith("(cut short as it was written: a killed run, a full disk?); export its raw weights with --no-ema")
    assert "download" not in said and not (tmp_path / "out").exists()
    assert export_student(copy, tmp_path / "out", use_ema=False).ema is False


def test_a_bundle_for_another_model_is_refused(run, tmp_path):
    from fluxsr_core.bundle import save_bundle
    from fluxsr_core.settings import RunSettings

    save_bundle(tmp_path / "wide.safetensors", torch.zeros(1, 8, 4096), torch.zeros(1, 768), RunSettings())
    with pytest.raises(ExportError, match=r"holds t5 4096 and clip_pooled 768 wide; the student .* takes 32 and 16"):
        export_student(run.output_dir, tmp_path / "out", bundle=str(tmp_path / "wide.safetensors"))
    assert not (tmp_path / "out").exists()

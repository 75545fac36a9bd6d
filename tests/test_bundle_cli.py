"""`fluxsr-train bundle`: the student's one fixed prompt encoded into a conditioning bundle, as `pairs` encodes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fluxsr_core import bundle as B
from fluxsr_core.bundle import encode_prompt_bundle, load_bundle
from fluxsr_core.pairs import PairDataset
from fluxsr_core.settings import RunSettings
from fluxsr_training import generate as G
from fluxsr_training.cli import main as cli_main


def _test_generate():
    """tests/test_generate.py as a module (pytest runs in importlib mode: test files are not importable by name)."""
    spec = importlib.util.spec_from_file_location("_fluxsr_test_generate", Path(__file__).with_name("test_generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# its tiny text encoders, and its autouse fixture that detaches the CLI's log handlers after each test
tiny_text_encoders = _test_generate().tiny_text_encoders
cli_log_handlers_removed = _test_generate().cli_log_handlers_removed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def te(tmp_path_factory) -> Path:
    return tiny_text_encoders(tmp_path_factory.mktemp("encoders") / "flux")


def bundle_args(te: Path, out: Path, *extra: str) -> list[str]:
    return ["bundle", "--text-encoders", str(te), "--max-sequence-length", "6", "--dtype", "fp32", "--device", "cpu",
            "-o", str(out), *extra]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_bundle_encodes_the_prompt_as_pairs_does_and_records_prompt_and_settings(te, tmp_path, capsys):
    out = tmp_path / "student_bundle.safetensors"
    assert cli_main(bundle_args(te, out, "--prompt", "a cat", "--t-l", "0.3", "--guidance", "2")) == 0
    stdout = capsys.readouterr().out
    assert f"bundle: wrote {out} from the prompt 'a cat': t5 [1, 6, 32], clip_pooled [1, 16] (float32)" in stdout
    assert "run settings in its metadata: T_L=0.3, guidance=2, scale=4" in stdout
    assert f"fluxsr-train train ... data.conditioning={out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]          # no temporary file left

    b = load_bundle(out)
    cfg = G.GenerateConfig(text_encoders=str(te))
    direct = encode_prompt_bundle("a cat", *G.load_text_encoders(cfg, torch.float32, torch.device("cpu")),
                                  RunSettings(), max_sequence_length=6)
    assert torch.equal(b.t5, direct.t5) and torch.equal(b.clip_pooled, direct.clip_pooled)
    assert (b.settings.t_l, b.settings.guidance, b.settings.scale) == (0.3, 2.0, 4.0)
    assert b.settings.source["t_l"] == f"bundle {out}"                       # read from the file, not defaulted
    assert metadata(out)["fluxsr.prompt"] == "a cat"

    # the CLIP and T5 folders given one by one (model and tokenizer in each), and a one-prompt file
    for name, model, tok in (("clip", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2")):
        shutil.copytree(te / model, tmp_path / name)
        shutil.copytree(te / tok, tmp_path / name, dirs_exist_ok=True)
    prompt_file = tmp_path / "student.jsonl"
    prompt_file.write_text('\n{"prompt": "a cat"}\n')
    out2 = tmp_path / "again.safetensors"
    assert cli_main(["bundle", "--clip", str(tmp_path / "clip"), "--t5", str(tmp_path / "t5"), "--prompt-file",
                     str(prompt_file), "--max-sequence-length", "6", "--dtype", "fp32", "--device", "cpu",
                     "-o", str(out2)]) == 0
    assert torch.equal(load_bundle(out2).t5, b.t5) and metadata(out2)["fluxsr.prompt"] == "a cat"


def test_an_existing_bundle_is_kept_unless_overwrite_and_none_is_ever_half_written(te, tmp_path, capsys, monkeypatch):
    out = tmp_path / "student_bundle.safetensors"
    assert cli_main(bundle_args(te, out, "--prompt", "a cat")) == 0
    first = out.read_bytes()
    capsys.readouterr()
    load = G.load_text_encoders
    monkeypatch.setattr(G, "load_text_encoders", lambda *a, **k: pytest.fail("encoders loaded for a refused run"))
    assert cli_main(bundle_args(te, out, "--prompt", "a dog")) == 2
    assert capsys.readouterr().err == (f"fluxsr-train bundle: error: {out} already exists; pass --overwrite to "
                                       "replace it, or give another -o\n")
    assert out.read_bytes() == first
    monkeypatch.setattr(G, "load_text_encoders", load)
    assert cli_main(bundle_args(te, out, "--prompt", "a dog", "--overwrite")) == 0
    assert metadata(out)["fluxsr.prompt"] == "a dog" and out.read_bytes() != first

    # a file made at the same path while the prompt was being encoded is not replaced
    encode = B.encode_prompt_bundle
    late = tmp_path / "late.safetensors"

    def someone_writes_it_meanwhile(*a, **k):
        late.write_bytes(b"theirs")
        return encode(*a, **k)

    monkeypatch.setattr(B, "encode_prompt_bundle", someone_writes_it_meanwhile)
    assert cli_main(bundle_args(te, late, "--prompt", "a cat")) == 2
    assert "already exists" in capsys.readouterr().err and late.read_bytes() == b"theirs"
    monkeypatch.undo()

    # Ctrl-C once the bundle is written under its temporary name, as it is linked into place: no
    # file under the name, and the temporary file is gone too
    never = tmp_path / "never.safetensors"
    written: list[str] = []

    def interrupted(src, dst, *a, **k):
        assert Path(dst) == never and Path(src).parent == tmp_path
        written.append(Path(src).name)
        assert metadata(Path(src))["fluxsr.prompt"] == "a cat"       # whole, under the temporary name
        raise KeyboardInterrupt

    monkeypatch.setattr(G.os, "link", interrupted)
    assert cli_main(bundle_args(te, never, "--prompt", "a cat")) == 130
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.splitlines()[-1] == f"fluxsr-train bundle: interrupted; {never} was not written"
    assert len(written) == 1 and written[0] != never.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.safetensors", "student_bundle.safetensors"]


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a cat", "-o", "{tmp}/bundle.pt"], "a conditioning bundle is a .safetensors file"),
    (["--prompt", "  ", "-o", "{tmp}/b.safetensors"], "the prompt is empty"),
    (["--prompt-file", "{tmp}/two.txt", "-o", "{tmp}/b.safetensors"],
     "{tmp}/two.txt holds 2 prompts (lines 1, 3); the student runs with one fixed prompt"),
    (["--prompt", "a cat", "--t-l", "1.5", "-o", "{tmp}/b.safetensors"], "T_L must lie strictly between 0 and 1"),
])
def test_bundle_argument_errors_are_one_line_each(te, tmp_path, capsys, extra, message):
    (tmp_path / "two.txt").write_text("a cat\n\na dog\n")
    args = ["bundle", "--text-encoders", str(te), "--device", "cpu"] + [a.format(tmp=tmp_path) for a in extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxsr-train bundle: error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and not list(tmp_path.glob("*.safetensors"))


def test_bundle_needs_text_encoders(tmp_path, capsys):
    out = str(tmp_path / "b.safetensors")
    assert cli_main(["bundle", "--prompt", "a cat", "-o", out]) == 2
    assert "no text encoders: give --text-encoders" in capsys.readouterr().err
    assert cli_main(["bundle", "--prompt", "a cat", "--text-encoders", str(tmp_path), "-o", out]) == 2
    assert "CLIP text encoder not found at" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                          # one of --prompt / --prompt-file
        cli_main(["bundle", "--text-encoders", str(tmp_path), "-o", out])
    assert "one of the arguments --prompt --prompt-file is required" in capsys.readouterr().err


def test_the_training_journey_pairs_from_many_prompts_then_a_student_bundle_trains_and_exports(te, tmp_path, capsys):
    """README steps 1-3: pairs from several prompts have one conditioning per prompt, so the run has no
    single conditioning to export unless it trains with a bundle made by `fluxsr-train bundle`."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    pairs = tmp_path / "pairs"
    assert cli_main(["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
                     "--prompts", str(prompts), "--output", str(pairs), "--text-encoders", str(te),
                     "--max-sequence-length", "6", "--steps", "2", "--height", "32", "--width", "32",
                     "--pairs-per-prompt", "2", "--no-progress-bar", "--no-fsync"]) == 0
    student = tmp_path / "student_bundle.safetensors"
    assert cli_main(bundle_args(te, student, "--prompt", "a cat")) == 0
    ds = PairDataset(pairs)
    cat = next(ds[i] for i in range(len(ds)) if ds[i]["meta"]["prompt"] == "a cat")
    b = load_bundle(student)
    assert torch.equal(b.t5[0], cat["t5"]) and torch.equal(b.clip_pooled[0], cat["clip_pooled"])  # as pairs encodes

    run = tmp_path / "run"
    assert cli_main(["train", "--config", "train_tiny", f"data.pairs={pairs}", f"data.conditioning={student}",
                     f"train.output_dir={run}", "train.max_steps=1", "train.progress_bar=false", "data.holdout=0",
                     "validation.every=0", "degradation.scale=2", "degradation.second_stage=false",
                     "lora.rank=2", "lora.alpha=2"]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(run), "-o", str(tmp_path / "exported")]) == 0
    exported = load_bundle(tmp_path / "exported" / "conditioning.safetensors")
    assert torch.equal(exported.t5, b.t5) and torch.equal(exported.clip_pooled, b.clip_pooled)

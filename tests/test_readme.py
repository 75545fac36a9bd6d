"""The README's commands and its Python API example are what users copy: they must still work.

Each ``fluxsr``/``fluxsr-train`` command in the README's shell blocks is parsed by the real
parsers (a renamed flag or a dropped override key fails here), ``train``'s overrides are resolved
into a config, and the Python API block runs end to end on tiny model files (the only edits: our
file names and the CPU for the GPU).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def readme_commands(program: str) -> list[list[str]]:
    """Every command line of ``program`` in the README's bash blocks (continuations joined,
    comments dropped), as argv without the program name."""
    commands = []
    for block in readme_blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            name = Path(words[0]).name
            if name == program:
                commands.append(words[1:])
    return commands


def test_the_readme_has_the_commands_this_file_checks():
    # Guards the extraction itself: if the blocks change shape, the checks below must not go empty.
    assert readme_commands("fluxsr")[:1] == [["upscale", "photo.png", "-o", "out.png"]]
    assert {argv[0] for argv in readme_commands("fluxsr-train")} == {"pairs", "bundle", "train", "export", "eval"}
    assert len(readme_blocks("python")) == 1


@pytest.mark.parametrize("argv", readme_commands("fluxsr"), ids=lambda argv: " ".join(argv)[:60])
def test_fluxsr_commands_in_the_readme_parse(argv):
    from fluxsr_core import cli

    args = cli.build_parser().parse_args(argv)
    assert args.command == "upscale"


@pytest.mark.parametrize("argv", readme_commands("fluxsr-train"), ids=lambda argv: " ".join(argv)[:60])
def test_fluxsr_train_commands_in_the_readme_parse(argv, capsys):
    from fluxsr_training import cli
    from fluxsr_training.evaluate import build_eval_parser

    if argv[0] == "eval":
        build_eval_parser().parse_args(argv[1:])
        return
    if argv[0] == "train":
        # Resolving the overrides checks every section.key against the config classes.
        assert cli.main(argv + ["--print-config"]) == 0
        printed = capsys.readouterr().out
        for override in argv[1:]:
            if "=" in override and not override.startswith("-"):
                key, value = override.split("=", 1)
                assert value in printed, f"{key}={value} did not reach the resolved config"
        return
    parser, _ = cli.build_parser()
    args, rest = parser.parse_known_args(argv)
    assert args.command == argv[0] and rest == []


def test_the_python_api_example_runs(tiny_model_files, tmp_path, monkeypatch):
    """The README's Python API block, on tiny files and the CPU; then its fp8 alternative."""
    from PIL import Image

    example = readme_blocks("python")[0]
    names = {"flux1-dev.safetensors": tiny_model_files.transformer, "ae.safetensors": tiny_model_files.vae,
             "fluxsr_lora.safetensors": tiny_model_files.lora,
             "fluxsr_bundle.safetensors": tiny_model_files.conditioning}
    for name in (*names, "photo.png", "out.png", '"cuda"'):
        assert name in example, f"the README's example no longer names {name}"
    for name, path in names.items():
        example = example.replace(f'"{name}"', repr(str(path)))
    example = example.replace('"cuda"', '"cpu"')
    Image.new("RGB", (24, 16), (120, 80, 40)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)

    exec(compile(example, "README.md (Python API)", "exec"), {})
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (96, 64)

    # The commented fp8 lines are the alternative to the first two statements: run them instead.
    lines = example.splitlines()
    fp8_start = "# transformer, info = models.load_transformer_fp8("
    first = next((i for i, line in enumerate(lines) if line.startswith(fp8_start)), None)
    assert first is not None, "the README's fp8 alternative is gone or changed shape"
    last = first + 1
    while last < len(lines) and lines[last].startswith("#   "):  # the call's continuation lines
        last += 1
    fp8_call = [line[2:] for line in lines[first:last]]
    start = next(i for i, line in enumerate(lines) if line.startswith("transformer = "))
    assert lines[start + 1].startswith("info = lora.load_lora(")
    fp8_example = "\n".join(lines[:start] + fp8_call + lines[start + 2:])
    (tmp_path / "out.png").unlink()
    namespace: dict = {}
    exec(compile(fp8_example, "README.md (Python API, fp8)", "exec"), namespace)
    assert any(p.dtype == torch.float8_e4m3fn for p in namespace["transformer"].parameters())
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (96, 64)

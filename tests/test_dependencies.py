"""The declared oldest versions: one list in three places, and a clear refusal of older installs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

from fluxsr_core import dependencies as D

REPO = Path(__file__).resolve().parents[1]


def _bounds(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", line.split("#")[0])
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_the_minimum_versions_are_the_ones_pyproject_and_requirements_declare():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _bounds(project["dependencies"]) == D.MINIMUM_VERSIONS
    requirements = _bounds((REPO / "requirements.txt").read_text().splitlines())
    # ComfyUI brings its own torch: the pack's requirements leave it (and torchvision) out
    assert requirements == {k: v for k, v in D.MINIMUM_VERSIONS.items() if k not in ("torch", "torchvision")}
    assert set(D.UPSCALE_NEEDS) <= set(D.MINIMUM_VERSIONS) and set(D.NODES_NEED) <= set(D.MINIMUM_VERSIONS)


def fake_versions(monkeypatch, absent_modules=(), **versions):
    """Installed distributions as ``versions`` say (None: no such distribution); the modules in
    ``absent_modules`` cannot be imported either."""
    real_version, real_import = importlib.metadata.version, importlib.import_module

    def version(name):
        if name in versions:
            if versions[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return real_version(name)

    def import_module(name, *args):
        if name in absent_modules:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(D.importlib.metadata, "version", version)
    monkeypatch.setattr(D.importlib, "import_module", import_module)


def test_outdated_dependencies_compare_release_numbers(monkeypatch):
    fake_versions(monkeypatch, diffusers="0.32.2", torch="2.14.1+cu130", peft="0.17.0rc1", pillow="10.4.0",
                  numpy="2.3.0", accelerate=None, absent_modules=("accelerate",))
    assert D.outdated_dependencies(["diffusers", "torch", "peft", "pillow", "numpy", "accelerate"]) == [
        "diffusers 0.32.2 (FluxSR needs >= 0.35)", "pillow 10.4.0 (FluxSR needs >= 11.0)",
        "accelerate is not installed (FluxSR needs >= 1.10)"]
    fake_versions(monkeypatch, diffusers="0.100.0")        # numbers, not strings: 0.100 > 0.35
    assert D.outdated_dependencies(["diffusers"]) == []
    advice = D.upgrade_advice(["diffusers 0.32.2 (FluxSR needs >= 0.35)", "accelerate is not installed (FluxSR needs >= 1.10)"])
    assert advice.endswith('Upgrade them with: pip install -U "diffusers>=0.35" "accelerate>=1.10"')
    torch_advice = D.upgrade_advice(["torch 2.5.1 (FluxSR needs >= 2.6)"])
    assert 'pip install -U "torch>=2.6" (torch and torchvision: take the command for your GPU from pytorch.org' \
        in torch_advice


def test_a_build_under_another_distribution_name_is_found_by_its_module(monkeypatch):
    import PIL

    fake_versions(monkeypatch, pillow=None)                # e.g. Pillow-SIMD: no "pillow" distribution
    monkeypatch.setattr(PIL, "__version__", "11.1.0.post1")
    assert D.outdated_dependencies(["pillow"]) == []
    monkeypatch.setattr(PIL, "__version__", "9.5.0")
    assert D.outdated_dependencies(["pillow"]) == ["pillow 9.5.0 (FluxSR needs >= 11.0)"]


def test_both_clis_refuse_an_old_diffusers_naming_it(monkeypatch, capsys, tmp_path):
    import signal

    from fluxsr_core import cli
    from fluxsr_training import cli as train_cli

    fake_versions(monkeypatch, diffusers="0.32.2")
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png")]) == 2
    assert signal.getsignal(signal.SIGTERM) is handler     # refused before it took SIGTERM over
    err = capsys.readouterr().err
    assert err.startswith("fluxsr: error: these packages are older than FluxSR needs: diffusers 0.32.2 "
                          '(FluxSR needs >= 0.35). Upgrade them with: pip install -U "diffusers>=0.35"')
    assert train_cli.main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "x")]) == 2
    assert "fluxsr-train export: error: these packages are older than FluxSR needs: diffusers 0.32.2" in \
        capsys.readouterr().err
    for command in ("demo", "eval"):                        # handed to their own modules, checked first
        assert train_cli.main([command, "--help"]) == 2
        assert f"fluxsr-train {command}: error: these packages are older" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "x").exists()


def load_pack_as_comfyui_does(monkeypatch, caplog):
    """Import the pack's root ``__init__.py`` under a custom_nodes-style name, its log captured,
    and return it; its submodules leave ``sys.modules`` again, so each test imports it afresh."""
    name = "custom_nodes_deps_test_ComfyUI-FluxSR"
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        spec.loader.exec_module(module)
    for key in [k for k in sys.modules if k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)
    return module


def test_the_node_pack_still_loads_with_an_old_diffusers_and_says_what_to_upgrade(monkeypatch, caplog):
    fake_versions(monkeypatch, diffusers="0.32.2")
    module = load_pack_as_comfyui_does(monkeypatch, caplog)
    assert "FluxSRUpscale" in module.NODE_CLASS_MAPPINGS          # saved workflows still load
    assert "[FluxSR] these packages are older than FluxSR needs: diffusers 0.32.2 (FluxSR needs >= 0.35)" in caplog.text


@pytest.mark.parametrize("diffusers,torch,said", [
    ("0.42.1", "2.5.1+cu124", True), ("0.39.0", "2.4.1", True),
    ("0.38.0", "2.5.1", False), ("0.42.1", "2.6.0", False), ("0.42.1", "2.14.1+cu130", False),
])
def test_a_diffusers_that_needs_a_newer_torch_than_comfyuis_is_named(monkeypatch, diffusers, torch, said):
    fake_versions(monkeypatch, diffusers=diffusers, torch=torch)
    message = D.diffusers_torch_mismatch()
    assert (message is not None) == said
    if said:
        assert message.startswith(f"diffusers {diffusers} needs torch >= 2.6 but this Python has torch {torch}")
        assert 'pip install "diffusers>=0.35,<0.39"' in message


def test_the_node_pack_logs_a_diffusers_too_new_for_its_torch(monkeypatch, caplog):
    fake_versions(monkeypatch, diffusers="0.42.1", torch="2.5.1")
    module = load_pack_as_comfyui_does(monkeypatch, caplog)
    assert "FluxSRUpscale" in module.NODE_CLASS_MAPPINGS
    assert "[FluxSR] diffusers 0.42.1 needs torch >= 2.6 but this Python has torch 2.5.1" in caplog.text

"""The shipped workflows: parse, use only our and core nodes, type-check, fit the nodes, agree.

Our nodes' definitions come from the pack itself; the few core nodes the workflows use are
described below in ComfyUI's ``/object_info`` shape (their inputs as ComfyUI 0.3.40 - 0.8 define
them). tests/test_comfyui_real.py runs the same checks against a real server's /object_info.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "comfyui_support"


def _load(name: str, path: Path):
    full = f"fluxsr_test_support_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod


check = _load("workflow_check", SUPPORT / "workflow_check.py")
build = _load("build_workflows", SUPPORT / "build_workflows.py")

NAMES = ["fluxsr_upscale", "fluxsr_upscale_tiled", "fluxsr_teacher_pairs"]

_F = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
CORE_SPECS = {
    "UNETLoader": {"input": {"required": {"unet_name": [[]], "weight_dtype": [
        ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]]}}, "output": ["MODEL"]},
    "VAELoader": {"input": {"required": {"vae_name": [[]]}}, "output": ["VAE"]},
    "LoadImage": {"input": {"required": {"image": [[], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "output": []},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": []},
    "DualCLIPLoader": {"input": {"required": {"clip_name1": [[]], "clip_name2": [[]],
                                              "type": [["sdxl", "sd3", "flux", "hunyuan_video"]]},
                                 "optional": {"device": [["default", "cpu"], {"advanced": True}]}},
                       "output": ["CLIP"]},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
                       "output": ["CONDITIONING"]},
    "FluxGuidance": {"input": {"required": {"conditioning": ["CONDITIONING"], "guidance": [
        "FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}]}}, "output": ["CONDITIONING"]},
}


@pytest.fixture(scope="module")
def specs():
    nodes_test = _load("test_nodes", REPO / "tests" / "test_nodes.py")
    pack = nodes_test.load_pack()
    ours = {name: check.spec_from_class(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    return {**CORE_SPECS, **ours}


def read(folder: str, name: str) -> dict:
    """A shipped workflow: ``name`` in UI format from workflows/, ``name_api`` from workflows/api/."""
    sub = "api" if name.endswith("_api") else ""
    return json.loads((REPO / folder / sub / f"{name}.json").read_text(encoding="utf-8"))


# The folders of a node pack whose *.json ComfyUI's template browser lists
# (app/custom_node_manager.py, 0.3.64 and 0.8.0 alike).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_every_workflow_is_a_template_once_and_its_api_form_is_not():
    """ComfyUI lists each of these folders' JSON files as the pack's templates: a copy in two of
    them shows twice, and an API-format file opens as an empty graph."""
    listed = sorted(p.relative_to(REPO).as_posix() for f in TEMPLATE_FOLDERS for p in (REPO / f).glob("*.json"))
    assert listed == sorted(f"workflows/{n}.json" for n in NAMES)
    api = sorted(p.name for p in (REPO / "workflows" / "api").glob("*.json"))
    assert api == sorted(f"{n}_api.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_files_are_what_the_description_builds(name):
    """The JSON files are generated from build_workflows.py; edit it and run it, not the files."""
    wf = next(w for w in build.all_workflows() if w.name == name)
    assert read("workflows", name) == json.loads(json.dumps(build.to_ui(wf)))
    assert read("workflows", f"{name}_api") == json.loads(json.dumps(build.to_api(wf)))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_checks(name, specs):
    wf = read("workflows", name)
    assert wf["version"] == 0.4
    assert check.check_ui(wf, specs) == []
    types = {n["type"] for n in wf["nodes"]}
    assert types <= set(specs) | check.FRONTEND_ONLY
    assert any(t.startswith("FluxSR") for t in types)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_checks_and_agrees_with_ui(name, specs):
    api = read("workflows", f"{name}_api")
    assert check.check_api(api, specs) == []
    assert check.compare_ui_api(read("workflows", name), api, specs) == []


FOLDER_OF = {"unet_name": "models/diffusion_models", "lora_name": "models/loras", "vae_name": "models/vae",
             "bundle": "models/fluxsr", "clip_name1": "models/text_encoders", "clip_name2": "models/text_encoders"}


@pytest.mark.parametrize("name", NAMES)
def test_note_tells_where_each_file_goes(name):
    note = check.notes_text(read("workflows", name))
    files = list(check.model_files(read("workflows", f"{name}_api")))
    assert files
    for node_type, widget, filename in files:
        line = next((ln for ln in note.splitlines() if filename in ln), None)
        assert line is not None, f"the note does not name {filename} ({node_type})"
        assert FOLDER_OF[widget] in line, f"the note does not say {filename} goes to {FOLDER_OF[widget]}"


def test_checker_catches_mistakes(specs):
    """The checks can fail: a shifted widget, a bad link type, an out-of-range value, a note in API."""
    wf = read("workflows", "fluxsr_upscale_tiled")
    bad = json.loads(json.dumps(wf))
    up = next(n for n in bad["nodes"] if n["type"] == "FluxSRUpscale")
    up["widgets_values"] = [0.0, 4.0, "wavelet"]  # scale and t_l swapped
    assert any("scale=0.0 is below" in x for x in check.check_ui(bad, specs))
    bad = json.loads(json.dumps(wf))
    bad["links"][0][5] = "VAE"
    assert any("MODEL" in x or "VAE" in x for x in check.check_ui(bad, specs))
    tiling = next(n for n in bad["nodes"] if n["type"] == "FluxSRTilingOptions")
    tiling["widgets_values"] = tiling["widgets_values"][:-1]
    assert any("no value for widget fit_tiles" in x for x in check.check_ui(bad, specs))
    api = read("workflows", "fluxsr_teacher_pairs_api")
    api["99"] = {"class_type": "Note", "inputs": {}}
    api["6"]["inputs"]["steps"] = 0
    problems = check.check_api(api, specs)
    assert any("notes are frontend-only" in x for x in problems)
    assert any("steps=0 is below" in x for x in problems)
    ui = read("workflows", "fluxsr_teacher_pairs")
    sampler = next(n for n in ui["nodes"] if n["type"] == "FluxSRTeacherSampler")
    sampler["widgets_values"].remove("increment")
    assert any("control value" in x for x in check.check_ui(ui, specs))

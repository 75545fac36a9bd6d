"""The pack in a real ComfyUI server (skipped unless COMFYUI_DIR points at a ComfyUI checkout).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python \
        .venv/bin/pytest tests/test_comfyui_real.py -q

``COMFYUI_PYTHON`` is the Python ComfyUI runs under (its own venv with ComfyUI's requirements and
this repository's requirements.txt; the pack itself is NOT pip-installed there: it is loaded from
a link in a custom_nodes folder, as a clone would be). ``FLUXSR_COMFY_MODELS`` may name a folder
to keep the ~1.5 GB of random-weight files between runs (made on first use).

The server runs on 127.0.0.1 with ``--cpu``, its own base directory and database in a temporary
folder, and an extra_model_paths.yaml for the models and the pack. Checked: the pack registers
its nodes; every shipped workflow validates against the server's own /object_info (no missing
node, widget values in order and range, links typed); each API workflow runs to success at small
sizes; the graph and ``fluxsr upscale`` give the same image from the same files; an interrupt
in the middle of an upscale leaves the server able to run the next prompt; the UI workflows load
in ComfyUI's own page (headless Chromium, when playwright and Chromium are there) with no missing
node, every widget where it belongs, the page's own API prompt equal to the shipped one, and no
page error while they load (errors the page raises on its own with an empty graph must be known
frontend bugs, frontend_check.KNOWN_PAGE_ERRORS: frontend 1.27.x, shipped with ComfyUI 0.3.6x,
throws one on every start).
``FLUXSR_SCREENSHOT=docs/comfyui_upscale_workflow.png`` keeps the page's picture of the upscale
workflow. ``COMFYUI_GGUF_DIR`` may name a checkout of city96/ComfyUI-GGUF (its ``gguf`` package
installed in ComfyUI's venv and in this one): the upscale then also runs on a Q8_0 GGUF of the
test transformer through its ``UnetLoaderGGUF``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "comfyui_support"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
GGUF_PACK = os.environ.get("COMFYUI_GGUF_DIR")

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to run "
                                                         "the real-ComfyUI tests")]


def _load(name: str):
    full = f"fluxsr_test_support_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, SUPPORT / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
    return sys.modules[full]


server_mod = _load("comfy_server")
frontend = _load("frontend_check")
weights = _load("make_weights")
check = _load("workflow_check")


def read_workflow(name: str) -> dict:
    """A shipped workflow: ``name`` in UI format from workflows/, ``name_api`` from workflows/api/."""
    folder = REPO / "workflows" / ("api" if name.endswith("_api") else "")
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = os.environ.get("FLUXSR_COMFY_MODELS") or str(tmp_path_factory.mktemp("comfy_models"))
    weights.make_all(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A folder outside ComfyUI's output folder where the server may write pair datasets."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def server(models_dir, datasets_root, tmp_path_factory):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    srv = server_mod.ComfyServer(COMFYUI_DIR, python, models_dir, tmp_path_factory.mktemp("comfy_run"),
                                 other_packs=(GGUF_PACK,) if GGUF_PACK else (),
                                 env={"FLUXSR_DATASET_ROOTS": str(datasets_root)})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def input_image(server, tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    # Smooth structure plus noise: a photo-like 48x40 input.
    yy, xx = np.mgrid[0:40, 0:48]
    base = np.stack([128 + 90 * np.sin(xx / 7.0), 128 + 90 * np.cos(yy / 5.0), 128 + 60 * np.sin((xx + yy) / 9.0)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("inputs") / "fluxsr_test_input.png"
    Image.fromarray(img).save(path)
    return path, server.upload_image(path)


def with_test_files(prompt: dict, image_name: str | None = None) -> dict:
    """The shipped API workflow with the random-weight files and small settings."""
    p = copy.deepcopy(prompt)
    for node in p.values():
        inputs = node["inputs"]
        if "unet_name" in inputs:
            inputs["unet_name"] = Path(weights.FLUX_FILE).name
        if "lora_name" in inputs:
            inputs["lora_name"] = Path(weights.LORA_FILE).name
        if "vae_name" in inputs:
            inputs["vae_name"] = Path(weights.VAE_FILE).name
        if "bundle" in inputs:
            inputs["bundle"] = Path(weights.BUNDLE_FILE).name
        if node["class_type"] == "LoadImage" and image_name:
            inputs["image"] = image_name
    return p


def load_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


# --- loading ------------------------------------------------------------------------------------

def test_pack_registers_its_nodes(server, object_info):
    ours = {k: v for k, v in object_info.items() if k.startswith("FluxSR")}
    assert set(ours) == {"FluxSRConditioning", "FluxSRTilingOptions", "FluxSRUpscale", "FluxSRTeacherSampler",
                         "FluxSRLoraLoader"}
    assert all(v["category"] == "image/upscaling/FluxSR" for v in ours.values())
    bundles = ours["FluxSRConditioning"]["input"]["required"]["bundle"][0]
    assert bundles == sorted(Path(p).name for p in (weights.BUNDLE_FILE, weights.THIRDPARTY_DIR, weights.NOSETTINGS_DIR))
    loras = ours["FluxSRLoraLoader"]["input"]["required"]["lora_name"][0]
    assert {Path(weights.LORA_FILE).name, Path(weights.LORA_T_L_FILE).name} <= set(loras)
    log = server.log_text()
    assert server_mod.PACK_DIR_NAME in log  # listed under "Import times for custom nodes"
    assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if server_mod.PACK_DIR_NAME in ln)


def test_the_template_browser_lists_each_workflow_once(server):
    """ComfyUI's /workflow_templates, what Workflow > Browse Templates shows under the pack: each
    UI workflow once (a copy in a second listed folder showed twice), no API-format file (its
    page opens one as an empty graph)."""
    templates = server.get("/workflow_templates")
    assert sorted(templates[server_mod.PACK_DIR_NAME]) == ["fluxsr_teacher_pairs", "fluxsr_upscale",
                                                           "fluxsr_upscale_tiled"]


@pytest.mark.parametrize("name", ["fluxsr_upscale", "fluxsr_upscale_tiled", "fluxsr_teacher_pairs"])
def test_workflows_validate_against_the_real_nodes(name, object_info):
    ui, api = read_workflow(name), read_workflow(f"{name}_api")
    missing = {n["type"] for n in ui["nodes"]} - set(object_info) - check.FRONTEND_ONLY
    assert missing == set(), f"missing nodes: {missing}"
    assert check.check_ui(ui, object_info) == []
    assert check.check_api(api, object_info) == []
    assert check.compare_ui_api(ui, api, object_info) == []


# --- running the workflows ----------------------------------------------------------------------

def _core_upscale(models_dir: Path, image_path: Path, scale: float, flux_file: str = weights.FLUX_FILE) -> torch.Tensor:
    """The same files through the core's diffusers path, in this process (float result)."""
    from PIL import Image

    from fluxsr_core import bundle, lora, models, upscaler

    transformer = models.load_transformer(models_dir / flux_file, dtype=torch.float32, device="cpu")
    lora.load_lora(transformer, models_dir / weights.LORA_FILE, merge=True)
    vae = models.load_vae(models_dir / weights.VAE_FILE, dtype=torch.float32, device="cpu")
    b = bundle.load_bundle(models_dir / weights.BUNDLE_FILE)
    img = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB")).astype(np.float32) / 255.0)
    options = upscaler.UpscaleOptions(scale=scale, t_l=b.settings.t_l, color_fix="wavelet")
    with torch.no_grad():
        out = upscaler.upscale_tensor(img.permute(2, 0, 1)[None], models.DiffusersVelocity(transformer),
                                      models.DiffusersCodec(vae), b.to_conditioning(), options)
    return out[0].permute(1, 2, 0)


def run_upscale_graph(server, image_name: str, prefix: str, loader: dict | None = None,
                      scale: float = 2.0, edit: Optional[Callable[[dict], None]] = None) -> np.ndarray:
    """The shipped upscale workflow on the test files (``loader`` replaces or edits node 1,
    the model loader; ``edit`` changes the prompt further); returns the saved picture."""
    prompt = with_test_files(read_workflow("fluxsr_upscale_api"), image_name)
    if loader is not None:
        prompt["1"] = loader if "class_type" in loader else dict(prompt["1"], inputs={**prompt["1"]["inputs"], **loader})
    if edit is not None:
        edit(prompt)
    prompt["6"]["inputs"]["scale"] = scale
    prompt["7"]["inputs"]["filename_prefix"] = prefix
    (out_file,) = server.output_files(server.run(prompt, timeout=900))
    return load_png(out_file)


def run_cli(models_dir: Path, image: Path, target: Path, *extra: str, lora: str = weights.LORA_FILE,
            conditioning: str = weights.BUNDLE_FILE) -> np.ndarray:
    """``fluxsr upscale`` x2 on the test files (fp32, CPU); returns the written picture."""
    cmd = [sys.executable, "-m", "fluxsr_core.cli", "upscale", str(image), "-o", str(target), "--quiet",
           "--transformer", str(models_dir / weights.FLUX_FILE), "--vae", str(models_dir / weights.VAE_FILE),
           "--lora", str(models_dir / lora), "--conditioning", str(models_dir / conditioning),
           "--scale", "2", "--device", "cpu", "--dtype", "fp32", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_png(target)


def as_comfy_png(image: torch.Tensor) -> np.ndarray:
    """A float result as ComfyUI's SaveImage writes it: floor(255 x), clipped."""
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.int64)


def assert_is_the_float_result(graph: np.ndarray, ref: torch.Tensor) -> None:
    # ComfyUI's PNG is floor(255 x) of the float result, up to float noise.
    floor = as_comfy_png(ref)
    assert np.abs(floor - graph).max() <= 1
    assert (floor == graph).mean() > 0.98


def test_upscale_workflow_matches_the_cli(server, models_dir, input_image, tmp_path):
    path, name = input_image
    graph = run_upscale_graph(server, name, "parity")
    assert graph.shape == (80, 96, 3)
    assert "lora key not loaded" not in server.log_text()  # ComfyUI placed every LoRA tensor
    assert re.search(r"T_L=0\.3 \(conditioning: bundle \S*fluxsr-test-bundle\.safetensors\)", server.log_text())
    cli = run_cli(models_dir, path, tmp_path / "cli.png")
    # The CLI rounds to 8 bits, ComfyUI's SaveImage truncates: at most one level apart.
    diff = np.abs(cli - graph)
    assert diff.max() <= 1 and diff.mean() < 0.75, (diff.max(), diff.mean())
    assert_is_the_float_result(graph, _core_upscale(models_dir, path, 2.0))
    assert graph.std() > 5  # not a flat image: the comparison means something


def test_the_loras_t_l_reaches_the_upscale_through_fluxsr_load_lora(server, models_dir, input_image, tmp_path):
    """ComfyUI's LoRA loaders drop a LoRA's metadata; FluxSR Load LoRA keeps its T_L with the
    MODEL. With a bundle that carries no T_L, the graph runs at the LoRA's T_L (0.45), as
    ``fluxsr upscale`` does with the same files; through LoraLoaderModelOnly it falls back to
    the default and says so."""
    path, name = input_image
    lora_name, bundle_name = Path(weights.LORA_T_L_FILE).name, Path(weights.NOSETTINGS_DIR).name

    def files(prompt: dict) -> None:
        prompt["2"]["inputs"]["lora_name"] = lora_name
        prompt["4"]["inputs"]["bundle"] = bundle_name

    graph = run_upscale_graph(server, name, "lora_t_l", edit=files)
    assert re.search(r"T_L=0\.45 \(model: LoRA fluxsr-test-lora-tl045\.safetensors\)", server.log_text())
    cli = run_cli(models_dir, path, tmp_path / "cli.png", lora=weights.LORA_T_L_FILE,
                  conditioning=weights.NOSETTINGS_DIR)
    diff = np.abs(cli - graph)
    assert diff.max() <= 1 and diff.mean() < 0.75, (diff.max(), diff.mean())

    def comfy_loader(prompt: dict) -> None:
        files(prompt)
        prompt["2"]["class_type"] = "LoraLoaderModelOnly"

    plain = run_upscale_graph(server, name, "lora_t_l_plain", edit=comfy_loader)
    assert "T_L=0.25 (default: neither the conditioning nor the MODEL carries a T_L" in server.log_text()
    assert np.abs(plain - graph).mean() > 1  # T_L matters: 0.25 is another picture


def test_a_loras_alpha_in_its_metadata_reaches_comfyui(server, models_dir, input_image, tmp_path):
    """A diffusers/peft LoRA keeps lora_alpha in its metadata, which ComfyUI's loader never reads
    (it takes '.alpha' tensors); FluxSR Load LoRA hands it over, so the graph runs it as `fluxsr
    upscale` does: at alpha 8 on rank 4, twice the test LoRA's strength."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, name = input_image
    source = models_dir / weights.LORA_FILE
    with safe_open(str(source), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": weights.LORA_RANK,
                                                    "transformer.lora_alpha": 2 * weights.LORA_RANK})
    metadata.pop("fluxsr.lora_alpha", None)
    target = source.with_name("fluxsr-test-lora-alpha8.safetensors")
    save_file(tensors, str(target), metadata=metadata)

    def lora(prompt: dict) -> None:
        prompt["2"]["inputs"]["lora_name"] = target.name

    graph = run_upscale_graph(server, name, "lora_alpha8", edit=lora)
    assert "alpha 8 from its 'lora_adapter_metadata' metadata, given to ComfyUI's loader" in server.log_text()
    cli = run_cli(models_dir, path, tmp_path / "cli.png", lora=str(target.relative_to(models_dir)))
    diff = np.abs(cli - graph)
    assert diff.max() <= 1 and diff.mean() < 0.75, (diff.max(), diff.mean())
    plain = run_upscale_graph(server, name, "lora_alpha_plain")
    assert np.abs(plain - graph).max() > 2  # alpha 8 is another strength than the file's alpha = rank


def test_upscale_on_a_gguf_model_through_comfyui_gguf(server, models_dir, input_image, object_info):
    """A GGUF FLUX (Q8_0, as ComfyUI-GGUF's converter writes it) loaded by ComfyUI-GGUF's own
    loader, the LoRA through FluxSR Load LoRA: the upscale equals the core's on the
    dequantised weights, as the safetensors graph equals it on the file's."""
    if not GGUF_PACK:
        pytest.skip("set COMFYUI_GGUF_DIR to a ComfyUI-GGUF checkout")
    pytest.importorskip("gguf")
    assert "UnetLoaderGGUF" in object_info, "ComfyUI-GGUF did not load (is gguf installed in ComfyUI's venv?)"
    gguf_name = weights.make_gguf(models_dir)["gguf"].name
    # asked again: on a first run the file is made after the server listed its models
    assert gguf_name in server.object_info()["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0]
    path, name = input_image
    graph = run_upscale_graph(server, name, "gguf", {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": gguf_name}})
    assert graph.shape == (80, 96, 3)
    assert_is_the_float_result(graph, _core_upscale(models_dir, path, 2.0, weights.GGUF_DEQUANTIZED_FILE))
    # Q8_0 changes the weights: against the unquantised file's result the picture moves a little
    assert 0 < np.abs(as_comfy_png(_core_upscale(models_dir, path, 2.0)) - graph).mean() < 3  # measured: 0.19
    assert "gguf qtypes: F32 (29), Q8_0 (23)" in server.log_text()
    assert "lora key not loaded" not in server.log_text()


def test_upscale_with_comfyuis_fp8_weight_dtype(server, models_dir, input_image, tmp_path):
    """UNETLoader's weight_dtype fp8_e4m3fn (what 16 GB users pick), LoRA patched onto the fp8
    weights by ComfyUI: near the full-precision picture and near ``fluxsr upscale --memory-mode
    fp8_storage_all``. ComfyUI stores every parameter in fp8 (biases, norm scales and the
    output projection too), so it lands farther from full precision than fp8_storage_all.
    Measured (mean |difference| in 8-bit levels, random test model): ComfyUI fp8 against fp32
    2.61, against fp8_storage_all 2.47; fp8_storage_all against fp32 1.28."""
    path, name = input_image
    graph = run_upscale_graph(server, name, "fp8", {"weight_dtype": "fp8_e4m3fn"})
    outs = {mode: run_cli(models_dir, path, tmp_path / f"{mode}.png", "--memory-mode", mode)
            for mode in ("fp8_storage_all", "none")}
    assert graph.shape == outs["none"].shape == (80, 96, 3)
    assert 0.5 < np.abs(outs["none"] - graph).mean() < 4  # fp8 really used, and no worse than that
    assert np.abs(outs["fp8_storage_all"] - graph).mean() < 4
    assert 0.3 < np.abs(outs["none"] - outs["fp8_storage_all"]).mean()


# The test VAE is the FLUX architecture with random weights, and the random transformer between
# encode and decode magnifies what differs; the whole-image tiles (vae_tiling) give the untiled
# picture up to rounding: measured under 0.0005 levels of 255 on average (ComfyUI 0.8.0 and
# 0.3.64). Per-tile tiling (the pack's 0.7.3 halos) was 7.6 levels off here, ComfyUI's own
# tiled VAE 22.3 on the VAE alone.
VAE_TILED_MAX_MEAN_LEVELS = 0.05


def test_tiled_workflow_runs(server, input_image):
    _, name = input_image
    prompt = with_test_files(read_workflow("fluxsr_upscale_tiled_api"), name)
    prompt["6"]["inputs"]["scale"] = 4.0
    # VAE tiles smaller than the output: the pack's whole-image GroupNorm tiles run inside
    # ComfyUI's own VAE encode and decode (one transformer tile: only the VAE is tiled)
    prompt["8"]["inputs"].update(tile_size=256, tile_overlap=64, vae_tile_size=128, vae_tile_overlap=32)
    prompt["7"]["inputs"]["filename_prefix"] = "tiled"
    entry = server.run(prompt, timeout=900)
    (out_file,) = server.output_files(entry)
    picture = load_png(out_file)
    assert picture.shape == (160, 192, 3)
    assert picture.std() > 5  # a picture, not the black of a NaN latent
    untiled_prompt = copy.deepcopy(prompt)
    untiled_prompt["8"]["inputs"].update(vae_tile_size=0, vae_tile_overlap=0)
    untiled_prompt["7"]["inputs"]["filename_prefix"] = "vae_untiled"
    (untiled_file,) = server.output_files(server.run(untiled_prompt, timeout=900))
    off = np.abs(picture.astype(np.float64) - load_png(untiled_file).astype(np.float64)).mean()
    print(f"tiled VAE vs untiled: {off:.6f} levels of 255 on average")
    assert off < VAE_TILED_MAX_MEAN_LEVELS
    # An overlap of half the tile is refused when queued, before any model loads (ComfyUI would
    # divide by zero there, and above it return NaN, a black picture); so are values out of the
    # widgets' ranges, which ComfyUI leaves to the VALIDATE_INPUTS that names them.
    prompt["8"]["inputs"].update(vae_tile_size=128, vae_tile_overlap=64)
    with pytest.raises(server_mod.ComfyError, match="vae_tile_overlap 64 must be less than half of vae_tile_size 128"):
        server.queue(prompt)
    prompt["8"]["inputs"].update(vae_tile_overlap=32, tile_size=128)
    with pytest.raises(server_mod.ComfyError, match="tile_size: value 128 smaller than min of 256"):
        server.queue(prompt)


def test_teacher_workflow_writes_a_pair(server, datasets_root):
    from fluxsr_core.pairs import PairDataset

    api = read_workflow("fluxsr_teacher_pairs_api")
    # A random T5-XXL is too big for this machine: the prompt's conditioning comes from a bundle.
    for nid in ("2", "3", "4"):
        del api[nid]
    api["4"] = {"class_type": "FluxSRConditioning", "inputs": {"bundle": "x", "guidance": 3.5}}
    prompt = with_test_files(api)
    folder = datasets_root / "pairs"  # allowed by FLUXSR_DATASET_ROOTS
    prompt["6"]["inputs"].update(steps=2, width=80, height=64, trajectory_previews=2, seed=5,
                                 dataset_folder=str(folder))
    prompt["7"]["inputs"]["filename_prefix"] = "teacher"
    # a size the latent cannot take is refused when queued (the page's widgets step by 16; a
    # prompt sent to the API need not), before the models load
    odd = copy.deepcopy(prompt)
    odd["6"]["inputs"]["width"] = 72
    with pytest.raises(server_mod.ComfyError, match="width must be a multiple of 16 pixels .*got 72: use 64 or 80"):
        server.queue(odd)
    entry = server.run(prompt, timeout=900)
    saved = server.output_files(entry)
    assert [load_png(p).shape for p in saved if "teacher" in p.name] == [(64, 80, 3)]
    data = PairDataset(folder)
    assert len(data) == 1
    item = data[0]
    assert item["eps"].shape == item["z0"].shape == (16, 8, 10)
    assert item["meta"]["seed"] == 5 and item["meta"]["steps"] == 2
    assert torch.equal(item["eps"], torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(5))[0])
    # The next seed (the workflow's "increment") adds a second pair as a second shard.
    prompt["6"]["inputs"]["seed"] = 6
    server.run(prompt, timeout=900)
    assert len(PairDataset(folder)) == 2
    # A deleted cond file comes back when the graph runs again after ComfyUI forgot its cache
    # (a restart; here /free, which the server applies after the next prompt it runs).
    (cond_file,) = folder.glob("cond-*.safetensors")
    cond_file.unlink()
    server.post("/free", {"free_memory": True})
    server.run(prompt, timeout=900)  # still cached; the cache is dropped after it
    server.run(prompt, timeout=900)  # the teacher node runs again: its pair is stored, the cond file is not
    assert cond_file.is_file() and len(PairDataset(folder)) == 2
    assert torch.equal(PairDataset(folder)[0]["t5"], PairDataset(folder)[1]["t5"])
    # A graph that only writes pairs (no Save or Preview Image) runs: the sampler is an output node.
    only_pairs = {k: v for k, v in prompt.items() if v["class_type"] not in ("SaveImage", "PreviewImage")}
    assert len(only_pairs) < len(prompt)
    only_pairs["6"] = dict(only_pairs["6"], inputs={**only_pairs["6"]["inputs"], "seed": 7})
    server.run(only_pairs, timeout=900)
    assert len(PairDataset(folder)) == 3
    # A folder outside the output folder and the allowed roots is refused when queued.
    prompt["6"]["inputs"]["dataset_folder"] = "../../escaped_pairs"
    with pytest.raises(server_mod.ComfyError, match="outside ComfyUI's output folder"):
        server.queue(prompt)
    assert not (server.base / "output" / ".." / ".." / "escaped_pairs").exists()


def test_a_gguf_teacher_records_its_weights(server, models_dir, datasets_root, object_info):
    """ComfyUI-GGUF's loader feeding the Teacher Sampler: its pairs say teacher_weights gguf-Q8_0
    and keep ids of their own (a quantised teacher samples other targets)."""
    if not GGUF_PACK:
        pytest.skip("set COMFYUI_GGUF_DIR to a ComfyUI-GGUF checkout")
    pytest.importorskip("gguf")
    from fluxsr_core.pairs import PairDataset

    assert "UnetLoaderGGUF" in object_info
    api = read_workflow("fluxsr_teacher_pairs_api")
    for nid in ("2", "3", "4"):
        del api[nid]
    api["4"] = {"class_type": "FluxSRConditioning", "inputs": {"bundle": "x", "guidance": 3.5}}
    prompt = with_test_files(api)
    prompt["1"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": weights.make_gguf(models_dir)["gguf"].name}}
    folder = datasets_root / "gguf-pairs"
    prompt["6"]["inputs"].update(steps=2, width=64, height=64, trajectory_previews=0, seed=3,
                                 dataset_folder=str(folder))
    prompt["7"]["inputs"]["filename_prefix"] = "gguf-teacher"
    server.run(prompt, timeout=900)
    data = PairDataset(folder)
    assert len(data) == 1 and data[0]["meta"]["teacher_weights"] == "gguf-Q8_0"
    assert data.ids[0].endswith("-wgguf-Q8_0")
    assert "stored as gguf-Q8_0, which changes the teacher's samples" in server.log_text()


def test_interrupt_mid_upscale_then_next_prompt_runs(server, input_image):
    _, name = input_image
    prompt = with_test_files(read_workflow("fluxsr_upscale_tiled_api"), name)
    # 48x40 -> x8 = 384x320 px = 48x40 latent, tiles of 32 with overlap 16: 3x2 = 6 tiles.
    prompt["6"]["inputs"]["scale"] = 8.0
    prompt["8"]["inputs"].update(tile_size=256, tile_overlap=128, vae_tile_size=0, vae_tile_overlap=0)
    prompt["7"]["inputs"]["filename_prefix"] = "interrupted"
    marker = "FluxSR upscale: 1 image(s) x8"
    before = server.log_text().count(marker)
    pid = server.queue(prompt)
    deadline = time.monotonic() + 300
    while server.log_text().count(marker) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.log_text().count(marker) > before, "the upscale never started"
    time.sleep(3.0)  # the encode and the first tile(s) are running
    server.interrupt()
    entry = server.wait(pid, timeout=600)
    assert entry["status"]["status_str"] == "error"
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds, kinds
    assert kinds["execution_interrupted"]["node_type"] == "FluxSRUpscale"
    assert not server.output_files(entry)
    # The server goes on: the next prompt runs to success.
    nxt = with_test_files(read_workflow("fluxsr_upscale_api"), name)
    nxt["6"]["inputs"]["scale"] = 1.5
    nxt["7"]["inputs"]["filename_prefix"] = "after_interrupt"
    entry = server.run(nxt, timeout=900)
    (out_file,) = server.output_files(entry)
    assert load_png(out_file).shape == (60, 72, 3)


# --- ComfyUI's own page -------------------------------------------------------------------------

WORKFLOWS = ["fluxsr_upscale", "fluxsr_upscale_tiled", "fluxsr_teacher_pairs"]


def test_ui_workflows_load_in_comfyuis_page(server, tmp_path):
    why = frontend.available()
    if why:
        pytest.skip(why)
    example = Path(COMFYUI_DIR) / "input" / "example.png"
    if example.exists():  # LoadImage shows its preview in the screenshot
        server.upload_image(example)
    shot = Path(os.environ.get("FLUXSR_SCREENSHOT") or tmp_path / "upscale.png")
    report = frontend.load_in_page(server, {n: read_workflow(n) for n in WORKFLOWS}, {"fluxsr_upscale": shot})
    # The page's own errors, raised with an empty graph before any of ours: only known frontend bugs.
    unknown = [e for e in report["baseline_errors"] if not frontend.is_known_page_error(e)]
    assert unknown == [], f"frontend {report['frontend_version']} errors with an empty graph: {unknown}"
    results = report["workflows"]
    for name in WORKFLOWS:
        res = results[name]
        assert [n["type"] for n in res["nodes"] if not n["registered"]] == [], f"{name}: missing nodes"
        assert len(res["nodes"]) == len(read_workflow(name)["nodes"])
        api = read_workflow(f"{name}_api")
        for node in res["nodes"]:
            if str(node["id"]) not in api:
                continue
            widgets = dict(node["widgets"])
            for key, value in api[str(node["id"])]["inputs"].items():
                if not isinstance(value, list):
                    assert widgets.get(key) == value, f"{name} node {node['id']}: widget {key} is {widgets.get(key)!r}"
        # What the page would queue is exactly the shipped API workflow.
        strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
        assert strip(res["prompt"]) == strip(api), name
        assert {k: v["_meta"]["title"] for k, v in res["prompt"].items()} == \
            {k: v["_meta"]["title"] for k, v in api.items()}
        # Anything raised while one of ours loaded counts, known frontend bugs included.
        assert res["page_errors"] == [], f"{name} in frontend {report['frontend_version']}: {res['page_errors']}"
    from PIL import Image

    picture = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert picture.shape == (940, 1600) and picture.std() > 10  # a drawn graph, not a blank page


def test_the_teacher_fingerprint_ignores_another_clone_s_lora_left_in_the_weights(tmp_path):
    """ComfyUI's clones of one MODEL share its weights, and a clone's LoRA stays added into them
    (an upscale through FluxSR Load LoRA just before) until a clone without it loads: the teacher's
    fingerprint read them so, and refused its own folder ("sampled by another teacher MODEL").
    With ComfyUI's own ModelPatcher and loader: the same value fresh, after the LoRA clone's load,
    and after the teacher's own load."""
    script = tmp_path / "fingerprint.py"
    script.write_text(f"""
import importlib.util, sys
sys.argv = ["fingerprint", "--cpu"]
sys.path.insert(0, {str(COMFYUI_DIR)!r})
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_management as mm
import comfy.model_patcher as mp
spec = importlib.util.spec_from_file_location("fluxsr_pack", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["fluxsr_pack"] = pack
spec.loader.exec_module(pack)
adapters = sys.modules["fluxsr_pack.nodes.comfy_adapters"]

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(20)))

base = mp.ModelPatcher(Model(), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
seen = [adapters.teacher_model_fingerprint(base)]
lora = base.clone()
lora.add_patches({{f"diffusion_model.{{i}}.weight": ("diff", (torch.randn(64, 64),)) for i in range(0, 20, 2)}}, 1.0)
mm.load_models_gpu([lora])
changed = not torch.equal(base.model.diffusion_model[0].weight, lora.backup["diffusion_model.0.weight"].weight)
seen.append(adapters.teacher_model_fingerprint(base))
mm.load_models_gpu([base])
seen.append(adapters.teacher_model_fingerprint(base))
print("FINGERPRINTS", changed, *seen)
""")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=300, cwd=COMFYUI_DIR)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FINGERPRINTS")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-4000:]
    _, lora_was_in_the_weights, fresh, after_lora, after_own_load = line.split()
    assert lora_was_in_the_weights == "True"  # the case the test is about did happen
    assert len(fresh) == 16 and fresh == after_lora == after_own_load

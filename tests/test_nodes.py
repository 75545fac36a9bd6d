"""The ComfyUI node pack without ComfyUI: loading, node definitions, and every node run end to end.

The pack is loaded the way ComfyUI loads a custom node (``spec_from_file_location`` on the root
``__init__.py`` under a path-derived module name). Nodes run on the tiny diffusers-backed models;
the ComfyUI side (ModelPatcher, VAE, model management, progress bar) is a small stand-in that
keeps ComfyUI's contracts (``apply_model`` returns ``x - sigma * v`` for model-space latents,
``extra_conds`` -> ``process_cond``, VAE takes ``[B, H, W, C]`` pixels and gives raw latents),
so the adapters' arithmetic is checked against the core's diffusers path number for number.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = str(REPO / "custom_nodes_test" / "ComfyUI-FluxSR").replace(".", "_x_")


def load_pack(name: str = PACK_NAME):
    """Import the pack as ComfyUI does (nodes.load_custom_node)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def sub(pack, dotted: str):
    return sys.modules[f"{pack.__name__}.{dotted}"]


# --- the tiny diffusers models ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(pack):
    models = importlib.import_module(f"{pack.__name__}.fluxsr_core.models")
    transformer = models.load_transformer("tiny", dtype=torch.float32, device="cpu", seed=0)
    vae = models.load_vae("tiny", dtype=torch.float32, device="cpu", seed=0)
    return types.SimpleNamespace(
        models=models, transformer=transformer, vae=vae,
        velocity=models.DiffusersVelocity(transformer, compute_dtype=torch.float32),
        codec=models.DiffusersCodec(vae, compute_dtype=torch.float32))


def tiny_conditioning(pack, t_l=None, guidance=3.5, t_l_source="bundle tiny.safetensors", guidance_source="default"):
    adapters = sub(pack, "nodes.comfy_adapters")
    settings_mod = sub(pack, "fluxsr_core.settings")
    g = torch.Generator().manual_seed(7)
    settings = settings_mod.RunSettings(t_l=t_l or settings_mod.DEFAULT_T_L, guidance=guidance,
                                        source={"t_l": t_l_source, "guidance": guidance_source, "scale": "default"})
    if t_l is None:
        return [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g),
                                                       "guidance": guidance}]]
    return adapters.make_conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 16, generator=g),
                                      settings)


# --- a stand-in for ComfyUI's side ------------------------------------------------------------

class FakeCond:
    """ComfyUI's CONDRegular: ``process_cond`` repeats to the batch."""

    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        c = self.cond
        return FakeCond(c.repeat(batch_size // c.shape[0], *([1] * (c.ndim - 1))) if c.shape[0] != batch_size else c)


class FakeLatentFormat:
    latent_channels = 16
    scale_factor = 0.3611
    shift_factor = 0.1159
    latent_rgb_factors = None


class FakeBaseModel:
    """Like comfy.model_base.Flux: apply_model(x, sigma, c_crossattn, y, guidance) -> x - sigma * v."""

    def __init__(self, velocity, const_cls):
        self.velocity = velocity
        self.latent_format = FakeLatentFormat()
        self.model_sampling = const_cls()
        self.calls = []

    def extra_conds(self, **kw):
        out = {"c_crossattn": FakeCond(kw["cross_attn"]), "y": FakeCond(kw["pooled_output"])}
        g = kw.get("guidance", 3.5)
        if g is not None:
            out["guidance"] = FakeCond(torch.FloatTensor([g]))
        return out

    def memory_required(self, shape):
        return 1

    def apply_model(self, x, t, c_crossattn=None, y=None, guidance=None, transformer_options=None, **kw):
        self.calls.append({"shape": tuple(x.shape), "t": t.clone(), "transformer_options": transformer_options,
                           "guidance": None if guidance is None else float(guidance[0])})
        rope = (transformer_options or {}).get("rope_options") or {}
        offset = (int(rope.get("shift_y", 0)), int(rope.get("shift_x", 0)))
        cond = types.SimpleNamespace(t5=c_crossattn[:1], clip_pooled=y[:1], guidance=float(guidance[0]))
        v = self.velocity(x, t, cond, position_offset=offset)
        return x - t.view(-1, 1, 1, 1) * v


class FakePatcher:
    def __init__(self, velocity, const_cls):
        self.model = FakeBaseModel(velocity, const_cls)
        self.load_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}


class FakeVAE:
    """Like comfy.sd.VAE for FLUX: [B, H, W, C] pixels in [0, 1] <-> raw latents (posterior mode)."""

    latent_channels = 16

    def __init__(self, diffusers_vae):
        self.vae = diffusers_vae
        self.calls = []

    def encode(self, pixels):
        self.calls.append(("encode", tuple(pixels.shape)))
        x = pixels.movedim(-1, 1) * 2 - 1
        return self.vae.encode(x).latent_dist.mode()

    def decode(self, raw):
        self.calls.append(("decode", tuple(raw.shape)))
        return ((self.vae.decode(raw).sample + 1) / 2).clamp(0, 1).movedim(1, -1)

    def encode_tiled(self, pixels, tile_x, tile_y, overlap):
        self.calls.append(("encode_tiled", tile_x, overlap))
        return self.encode(pixels)

    def decode_tiled(self, raw, tile_x, tile_y, overlap):
        self.calls.append(("decode_tiled", tile_x, overlap))
        return self.decode(raw)


@pytest.fixture
def fake_comfy(monkeypatch):
    """Minimal ``comfy`` modules: model_sampling.CONST, model_management, utils.ProgressBar."""
    comfy = types.ModuleType("comfy")
    ms = types.ModuleType("comfy.model_sampling")
    mm = types.ModuleType("comfy.model_management")
    utils = types.ModuleType("comfy.utils")

    class CONST:
        pass

    class InterruptProcessingException(Exception):
        pass

    state = types.SimpleNamespace(loads=[], bars=[], interrupt_after=None, checks=0, emptied=0)

    def load_models_gpu(models, memory_required=0, **kw):
        state.loads.append((models, memory_required))

    def throw_exception_if_processing_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks > state.interrupt_after:
            raise InterruptProcessingException()

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.updates = total, []
            state.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total))

    ms.CONST = CONST
    mm.load_models_gpu = load_models_gpu
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.InterruptProcessingException = InterruptProcessingException
    mm.soft_empty_cache = lambda force=False: setattr(state, "emptied", state.emptied + 1)
    utils.ProgressBar = ProgressBar
    comfy.model_sampling, comfy.model_management, comfy.utils = ms, mm, utils
    for name, mod in (("comfy", comfy), ("comfy.model_sampling", ms), ("comfy.model_management", mm),
                      ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    state.CONST = CONST
    state.Interrupt = InterruptProcessingException
    return state


# --- loading ------------------------------------------------------------------------------------

NODE_IDS = ["FluxSRConditioning", "FluxSRTilingOptions", "FluxSRUpscale", "FluxSRTeacherSampler", "FluxSRLoraLoader"]


def test_pack_loads_as_comfyui_loads_it(pack):
    assert sorted(pack.NODE_CLASS_MAPPINGS) == sorted(NODE_IDS)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    assert all(name.startswith("FluxSR") for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values())


def test_pack_runs_its_own_core_copy(pack):
    upscale_mod = sub(pack, "nodes.upscale")
    assert upscale_mod.upscaler.__name__ == f"{pack.__name__}.fluxsr_core.upscaler"
    assert Path(upscale_mod.upscaler.__file__).resolve() == REPO / "fluxsr_core" / "upscaler.py"


def _absolute_core_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in ("fluxsr_core", "fluxsr_training")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] in ("fluxsr_core", "fluxsr_training"):
            bad.append(node.module)
    return bad


@pytest.mark.parametrize("folder", ["nodes", "fluxsr_core"])
def test_pack_code_imports_the_core_relatively(folder):
    """A plain clone has no installed ``fluxsr_core``: every import inside the pack is relative."""
    offenders = {p.name: _absolute_core_imports(p) for p in sorted((REPO / folder).glob("*.py"))
                 if p.name != "cli.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _absolute_core_imports(REPO / "__init__.py") == []


def test_pack_works_without_the_installed_core(tmp_path):
    """As after `git clone` + `pip install -r requirements.txt`: top-level fluxsr_core is absent."""
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys, torch
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fluxsr_core", "fluxsr_training"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        name = "{tmp_path}/custom_nodes/ComfyUI-FluxSR"
        spec = importlib.util.spec_from_file_location(name, "{REPO / '__init__.py'}")
        pack = importlib.util.module_from_spec(spec); sys.modules[name] = pack; spec.loader.exec_module(pack)
        tiling = pack.NODE_CLASS_MAPPINGS["FluxSRTilingOptions"]().build(256, 64, 0, 0, "gaussian")[0]
        up = sys.modules[name + ".nodes.upscale"]
        core = sys.modules[name + ".fluxsr_core.upscaler"]
        class Vel:
            def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
                return torch.zeros_like(latent)
        class Codec:
            downscale, latent_channels = 8, 16
            def encode(self, x):
                return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]
            def decode(self, z):
                return torch.nn.functional.interpolate(z[:, :3], scale_factor=8)
        out = up.upscale_images(torch.rand(1, 16, 16, 3), Vel(), Codec(), None,
                                core.UpscaleOptions(scale=2.0, color_fix="none", tiling=tiling))
        assert tuple(out.shape) == (1, 32, 32, 3), out.shape
        assert "fluxsr_core" not in sys.modules
        # ComfyUI-only imports happen inside functions: none ran here.
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")


# --- node definitions ---------------------------------------------------------------------------

def _inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            yield section, name, value


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_validate_inputs_keeps_comfyuis_range_checks(pack, node_id):
    """ComfyUI skips its own min/max checks for every input VALIDATE_INPUTS names (all of them
    when it takes **kwargs): a ranged input named there must get them from VALIDATE_INPUTS, at
    each end of its range, with the other inputs at their defaults."""
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    if not hasattr(cls, "VALIDATE_INPUTS"):
        return
    params = inspect.signature(cls.VALIDATE_INPUTS).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    specs = {n: v for _, n, v in _inputs(cls)}
    defaults = {n: specs[n][1].get("default") for n in params if n in specs and len(specs[n]) > 1}
    assert cls.VALIDATE_INPUTS(**defaults) is True
    for name in params:
        if specs.get(name, ("",))[0] not in ("INT", "FLOAT"):
            continue
        limits = specs[name][1]
        for end, beyond in (("min", -1), ("max", 1)):
            if end in limits:
                answer = cls.VALIDATE_INPUTS(**{**defaults, name: limits[end] + beyond})
                assert isinstance(answer, str) and name in answer and f"{end} of {limits[end]}" in answer, answer


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_definition_is_well_formed(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY == "image/upscaling/FluxSR"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 80
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    seen = []
    for section, name, value in _inputs(cls):
        seen.append(name)
        assert name in params, f"{node_id}.{cls.FUNCTION} does not take input {name}"
        assert isinstance(value, tuple) and len(value) == 2, f"{node_id}.{name}: (type, options) expected"
        kind, opts = value
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name} default out of range"
            if kind == "INT":
                assert all(isinstance(opts[k], int) for k in ("min", "max", "default"))
        elif isinstance(kind, list):
            assert "default" not in opts or opts["default"] in kind or not kind
        else:
            assert isinstance(kind, str) and kind.isupper() or kind == "FLUXSR_TILING"
    # Every parameter without a default is a required input (ComfyUI passes inputs by name).
    required = {n for s, n, _ in _inputs(cls) if s == "required"}
    for pname, p in params.items():
        if pname != "self" and p.default is inspect.Parameter.empty:
            assert pname in required


def test_widget_order_is_frozen(pack):
    """Saved workflows store widget values by position: this order only ever grows at the end."""
    expect = {
        "FluxSRConditioning": ["bundle", "guidance"],
        "FluxSRTilingOptions": ["tile_size", "tile_overlap", "vae_tile_size", "vae_tile_overlap", "blend",
                                "global_position_ids", "tile_batch_size", "fit_tiles"],
        "FluxSRUpscale": ["image", "model", "vae", "conditioning", "scale", "t_l", "color_fix", "tiling"],
        "FluxSRTeacherSampler": ["model", "conditioning", "vae", "seed", "steps", "width", "height",
                                 "trajectory_previews", "dataset_folder"],
        "FluxSRLoraLoader": ["model", "lora_name", "strength_model"],
    }
    for node_id, names in expect.items():
        got = [n for _, n, _ in _inputs(pack.NODE_CLASS_MAPPINGS[node_id])]
        assert got[:len(names)] == names


# --- FluxSRConditioning -------------------------------------------------------------------------

@pytest.fixture
def bundle_dir(pack, tmp_path, monkeypatch):
    bundle = sub(pack, "fluxsr_core.bundle")
    settings = sub(pack, "fluxsr_core.settings")
    g = torch.Generator().manual_seed(3)
    t5, clip = torch.randn(1, 6, 32, generator=g), torch.randn(1, 16, generator=g)
    root = tmp_path / "fluxsr"
    root.mkdir()
    bundle.save_bundle(root / "ours.safetensors", t5, clip, settings.RunSettings(t_l=0.4, guidance=2.5))
    third = root / "release"
    third.mkdir()
    torch.save(t5[0].clone(), third / "t5_embedding.pth")
    torch.save(clip[0].clone(), third / "clip_embedding.pth")
    (third / "pytorch_lora_weights.safetensors").write_bytes(b"not listed")
    (root / "notes.txt").write_text("not a bundle")
    monkeypatch.setattr(sub(pack, "nodes.paths"), "search_dirs", lambda: [str(root)])
    return types.SimpleNamespace(root=root, t5=t5, clip=clip)


def test_conditioning_lists_and_loads_bundles(pack, bundle_dir):
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRConditioning"]
    assert cls.INPUT_TYPES()["required"]["bundle"][0] == ["ours.safetensors", "release"]
    (cond,) = cls().load("ours.safetensors", 0.0)
    t5, extra = cond[0]
    assert torch.equal(t5, bundle_dir.t5) and torch.equal(extra["pooled_output"], bundle_dir.clip)
    assert extra["guidance"] == 2.5
    settings = sub(pack, "nodes.comfy_adapters").conditioning_settings(cond)
    assert (settings.t_l, settings.guidance) == (0.4, 2.5)
    (cond2,) = cls().load("release", 4.0)  # the third-party folder form, guidance overridden
    assert torch.equal(cond2[0][0], bundle_dir.t5) and cond2[0][1]["guidance"] == 4.0
    assert sub(pack, "nodes.comfy_adapters").conditioning_settings(cond2).t_l == 0.25  # folder has no config


def test_conditioning_errors_and_change_detection(pack, bundle_dir):
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRConditioning"]
    with pytest.raises(FileNotFoundError, match="not found"):
        cls().load("missing.safetensors", 0.0)
    with pytest.raises(FileNotFoundError, match="relative"):
        cls().load("../ours.safetensors", 0.0)
    assert cls.VALIDATE_INPUTS("missing.safetensors") != True  # noqa: E712 - ComfyUI wants True or a message
    assert cls.VALIDATE_INPUTS("ours.safetensors") is True
    before = cls.IS_CHANGED("ours.safetensors", 0.0)
    path = bundle_dir.root / "ours.safetensors"
    os.utime(path, ns=(1, 1))
    assert cls.IS_CHANGED("ours.safetensors", 0.0) != before


def test_register_folder_keeps_user_paths_and_filters(pack, monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    extra = str(tmp_path / "elsewhere" / "fluxsr")
    fp.folder_names_and_paths = {"fluxsr": ([extra], set())}  # as extra_model_paths.yaml leaves it
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    paths = sub(pack, "nodes.paths")
    assert paths.register_folder() is True
    folders, exts = fp.folder_names_and_paths["fluxsr"]
    assert folders == [os.path.join(fp.models_dir, "fluxsr"), extra]
    assert exts == {".safetensors"}


# --- FluxSRLoraLoader ---------------------------------------------------------------------------

class FakeLoraPatcher:
    """ComfyUI's ModelPatcher as far as LoRAs go: ``patches`` per weight, ``clone`` deep-copies
    ``model_options`` (ModelPatcher.clone does), and only the ``known`` layers take a patch."""

    def __init__(self, known):
        self.known, self.patches, self.model_options = set(known), {}, {"transformer_options": {}}

    def clone(self):
        import copy
        n = FakeLoraPatcher(self.known)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        return n


@pytest.fixture
def lora_dir(pack, tmp_path, monkeypatch):
    """models/loras with a FluxSR LoRA (T_L 0.4), a LoRA without settings and an SDXL LoRA, plus
    the folder_paths / comfy.utils / comfy.sd calls the loader makes."""
    from safetensors.torch import load_file, save_file

    lora = sub(pack, "fluxsr_core.lora")
    settings = sub(pack, "fluxsr_core.settings")
    root = tmp_path / "loras"
    root.mkdir()
    sd = {f"transformer.{m}.lora_{p}.weight": torch.zeros(2, 2)
          for m in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out") for p in "AB"}
    lora.save_lora(root / "fluxsr.safetensors", sd, settings.RunSettings(t_l=0.4, guidance=2.0), rank=2, alpha=2.0)
    save_file(sd, str(root / "plain.safetensors"))
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 2)}, str(root / "sdxl.safetensors"))
    save_file(sd, str(root / "bad_t_l.safetensors"), metadata={settings.KEY_T_L: "fast"})

    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda name: sorted(p.name for p in root.iterdir()) if name == "loras" else []
    fp.get_full_path = lambda name, f: str(root / f) if (root / f).is_file() else None
    fp.get_folder_paths = lambda name: [str(root)]
    comfy = types.ModuleType("comfy")
    utils, sd_mod = types.ModuleType("comfy.utils"), types.ModuleType("comfy.sd")
    reads = []

    def load_torch_file(path, safe_load=False):
        reads.append(path)
        return load_file(path)

    given = []

    def load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip):
        given.append(lora_sd)
        new = model.clone()
        for k in lora_sd:
            layer = k.removeprefix("transformer.").rsplit(".lora_", 1)[0].removesuffix(".alpha")
            if ".lora_A." in k and layer in model.known:
                new.patches.setdefault(layer, []).append(strength_model)
            elif not ((k.endswith(".lora_B.weight") or k.endswith(".alpha")) and layer in model.known):
                logging.warning("lora key not loaded: %s", k)  # as ComfyUI's comfy.lora.load_lora says it
        return new, None

    utils.load_torch_file, sd_mod.load_lora_for_models = load_torch_file, load_lora_for_models
    comfy.utils, comfy.sd = utils, sd_mod
    for name, mod in (("folder_paths", fp), ("comfy", comfy), ("comfy.utils", utils), ("comfy.sd", sd_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    flux = FakeLoraPatcher({"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"})
    return types.SimpleNamespace(root=root, flux=flux, reads=reads, given=given)


def test_lora_loader_patches_the_model_and_carries_its_t_l(pack, lora_dir):
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRLoraLoader"]
    up = sub(pack, "nodes.upscale")
    assert cls.INPUT_TYPES()["required"]["lora_name"][0] == ["bad_t_l.safetensors", "fluxsr.safetensors",
                                                             "plain.safetensors", "sdxl.safetensors"]
    node = cls()
    (model,) = node.load(lora_dir.flux, "fluxsr.safetensors", 0.8)
    assert sorted(model.patches) == sorted(lora_dir.flux.known) and model.patches[
        "transformer_blocks.0.attn.to_q"] == [0.8]
    assert lora_dir.flux.patches == {} and "fluxsr_lora_settings" not in lora_dir.flux.model_options  # input untouched
    # T_L order as in `fluxsr upscale`: widget > bundle > LoRA > default
    plain, bare = tiny_conditioning(pack), tiny_conditioning(pack, t_l=0.25, t_l_source="default")
    assert up.resolve_t_l(0.0, plain, model) == (0.4, "model: LoRA fluxsr.safetensors")
    assert up.resolve_t_l(0.0, bare, model) == (0.4, "model: LoRA fluxsr.safetensors")
    assert up.resolve_t_l(0.0, tiny_conditioning(pack, t_l=0.3), model)[0] == 0.3
    assert up.resolve_t_l(0.2, plain, model)[0] == 0.2
    assert up.resolve_t_l(0.0, plain, lora_dir.flux)[1].startswith("default")
    # the settings survive a later clone (another LoRA or patch node after ours)
    assert up.resolve_t_l(0.0, plain, model.clone())[0] == 0.4
    # re-queueing reads the file once; rewriting it is noticed
    node.load(lora_dir.flux, "fluxsr.safetensors", 1.0)
    assert len(lora_dir.reads) == 1
    before = cls.IS_CHANGED("fluxsr.safetensors", 1.0)
    os.utime(lora_dir.root / "fluxsr.safetensors", ns=(1, 1))
    assert cls.IS_CHANGED("fluxsr.safetensors", 1.0) != before
    node.load(lora_dir.flux, "fluxsr.safetensors", 1.0)
    assert len(lora_dir.reads) == 2


def test_lora_loader_hands_comfyui_the_alpha_only_the_metadata_holds(pack, lora_dir, caplog):
    # ComfyUI's loader reads '.alpha' tensors only; a diffusers/peft save keeps lora_alpha in its
    # metadata, which fluxsr upscale applies (alpha 8 at rank 2: four times the strength)
    from safetensors.torch import load_file, save_file

    cls = pack.NODE_CLASS_MAPPINGS["FluxSRLoraLoader"]
    sd = load_file(str(lora_dir.root / "plain.safetensors"))
    save_file(sd, str(lora_dir.root / "peft.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": '{"r": 2, "lora_alpha": 8}'})
    node = cls()
    with caplog.at_level(logging.INFO, logger="fluxsr"):
        node.load(lora_dir.flux, "peft.safetensors", 1.0)
    handed = lora_dir.given[-1]
    assert {k: float(v) for k, v in handed.items() if k.endswith(".alpha")} == {
        "transformer.transformer_blocks.0.attn.to_q.alpha": 8.0,
        "transformer.single_transformer_blocks.0.proj_out.alpha": 8.0}
    assert "alpha 8 from its 'lora_adapter_metadata' metadata, given to ComfyUI's loader" in caplog.text
    assert not any(k.endswith(".alpha") for k in node._cached[2])  # the cached file is not changed
    assert "did not apply" not in caplog.text and "found a place" not in caplog.text
    # our own files (alpha folded in, alpha = rank) and files without metadata go as they are
    node.load(lora_dir.flux, "fluxsr.safetensors", 1.0)
    node.load(lora_dir.flux, "plain.safetensors", 1.0)
    assert not any(k.endswith(".alpha") for sd_ in lora_dir.given[-2:] for k in sd_)


def test_lora_loader_errors(pack, lora_dir, caplog):
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRLoraLoader"]
    lora = sub(pack, "fluxsr_core.lora")
    assert cls.VALIDATE_INPUTS("missing.safetensors") != True  # noqa: E712 - True or a message
    assert "missing.safetensors" in cls.VALIDATE_INPUTS("missing.safetensors")
    assert cls.VALIDATE_INPUTS("fluxsr.safetensors") is True
    # a linked lora_name reaches VALIDATE_INPUTS as None (checked when the node runs), as bundle does
    assert cls.VALIDATE_INPUTS(None) is True and pack.NODE_CLASS_MAPPINGS["FluxSRConditioning"].VALIDATE_INPUTS(None)
    # strength 0: the MODEL as it came (as LoraLoaderModelOnly), without the LoRA's T_L
    assert cls().load(lora_dir.flux, "fluxsr.safetensors", 0.0)[0] is lora_dir.flux
    # .sft is safetensors to ComfyUI: its metadata is read
    (lora_dir.root / "fluxsr.sft").write_bytes((lora_dir.root / "fluxsr.safetensors").read_bytes())
    assert sub(pack, "nodes.upscale").resolve_t_l(0.0, tiny_conditioning(pack),
                                                  cls().load(lora_dir.flux, "fluxsr.sft", 1.0)[0])[0] == 0.4
    with pytest.raises(ValueError, match="Stable Diffusion / SDXL UNet"):
        cls().load(lora_dir.flux, "sdxl.safetensors", 1.0)
    # a text-encoder-only LoRA is named as such (it was "none of the 4 layers ... is it a FLUX.1 LoRA?",
    # counting its tensors as layers), as fluxsr upscale names it
    from safetensors.torch import save_file

    save_file({f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj.lora_{p}.weight": torch.zeros(2, 2)
               for i in range(2) for p in ("down", "up")}, str(lora_dir.root / "te_only.safetensors"))
    with pytest.raises(ValueError, match=r"te_only.safetensors holds no LoRA tensors for the FLUX transformer "
                                         r"\(only 4 text-encoder tensors, which FluxSR does not use"):
        cls().load(lora_dir.flux, "te_only.safetensors", 1.0)
    save_file({"something.else.weight": torch.zeros(2, 2), "other.thing.weight": torch.zeros(2, 2)},
              str(lora_dir.root / "unknown.safetensors"))
    with pytest.raises(ValueError, match="none of the 2 tensors of unknown.safetensors fit"):
        cls().load(lora_dir.flux, "unknown.safetensors", 1.0)
    with pytest.raises(lora.LoraError, match="bad_t_l.safetensors.*not a number"):
        cls().load(lora_dir.flux, "bad_t_l.safetensors", 1.0)
    (lora_dir.root / "cut.safetensors").write_bytes((lora_dir.root / "fluxsr.safetensors").read_bytes()[:-7])
    with pytest.raises(lora.WeightsError, match="cut.safetensors"):
        cls().load(lora_dir.flux, "cut.safetensors", 1.0)
    # the bad T_L and the truncated file were refused on the header, before ComfyUI read a tensor
    assert [os.path.basename(r) for r in lora_dir.reads] == ["fluxsr.sft", "sdxl.safetensors", "te_only.safetensors",
                                                             "unknown.safetensors"]
    # a LoRA without FluxSR metadata still applies, says so, and leaves T_L to the defaults
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        (model,) = cls().load(lora_dir.flux, "plain.safetensors", 1.0)
    assert len(model.patches) == 2 and "carries no FluxSR T_L" in caplog.text
    t_l, source = sub(pack, "nodes.upscale").resolve_t_l(0.0, tiny_conditioning(pack), model)
    assert t_l == 0.25 and "nor the LoRA carries" in source and "load the LoRA with" not in source
    # ... and after the FluxSR LoRA in a chain it keeps that LoRA's T_L
    (fluxsr,) = cls().load(lora_dir.flux, "fluxsr.safetensors", 1.0)
    (chained,) = cls().load(fluxsr, "plain.safetensors", 1.0)
    assert sub(pack, "nodes.upscale").resolve_t_l(0.0, tiny_conditioning(pack), chained) == (
        0.4, "model: LoRA fluxsr.safetensors")
    # ... a MODEL that already has a FluxSR LoRA's T_L keeps it, and is told so without a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fluxsr"):
        cls().load(cls().load(lora_dir.flux, "fluxsr.safetensors", 1.0)[0], "plain.safetensors", 1.0)
    assert "the MODEL keeps T_L 0.4" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # two FluxSR LoRAs: the later one's T_L, with a warning
    other = lora_dir.root / "other.safetensors"
    sub(pack, "fluxsr_core.lora").save_lora(other, {f"transformer.transformer_blocks.0.attn.to_q.lora_{p}.weight":
                                                    torch.zeros(2, 2) for p in "AB"},
                                            sub(pack, "fluxsr_core.settings").RunSettings(t_l=0.3), rank=2, alpha=2.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        (two,) = cls().load(cls().load(lora_dir.flux, "fluxsr.safetensors", 1.0)[0], "other.safetensors", 1.0)
    assert "already carries a FluxSR LoRA's T_L 0.4" in caplog.text and "T_L 0.3 replaces it" in caplog.text
    assert sub(pack, "nodes.upscale").resolve_t_l(0.0, tiny_conditioning(pack), two)[0] == 0.3
    # an empty file, a pickle under a .safetensors name
    from safetensors.torch import save_file
    save_file({}, str(lora_dir.root / "empty.safetensors"))
    with pytest.raises(ValueError, match="empty.safetensors holds no tensors"):
        cls().load(lora_dir.flux, "empty.safetensors", 1.0)
    (lora_dir.root / "cut.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ValueError, match=r"cut\.pt could not be read .*damaged or not a LoRA"):
        cls().load(lora_dir.flux, "cut.pt", 1.0)
    torch.save({"x": torch.zeros(1)}, lora_dir.root / "pickled.safetensors")
    with pytest.raises(sub(pack, "fluxsr_core.weights").UnsafeWeightsError, match="rename it to .pt"):
        cls().load(lora_dir.flux, "pickled.safetensors", 1.0)


def test_lora_loader_names_the_tensors_comfyui_leaves_out(pack, lora_dir, caplog):
    """ComfyUI's loader skips DoRA magnitudes, LoRA biases and text-encoder layers with a bare
    "lora key not loaded" line each; the node says what they are, and that `fluxsr upscale`,
    which applies the first two, gives another result. A LoRA ComfyUI takes whole says nothing."""
    from safetensors.torch import save_file

    cls = pack.NODE_CLASS_MAPPINGS["FluxSRLoraLoader"]
    base = {f"transformer.transformer_blocks.0.attn.to_q.lora_{p}.weight": torch.zeros(2, 2) for p in "AB"}
    save_file({**base, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(2),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.bias": torch.zeros(2),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 2)},
              str(lora_dir.root / "dora_te.safetensors"))
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        (model,) = cls().load(lora_dir.flux, "dora_te.safetensors", 1.0)
    assert len(model.patches) == 1
    ours = [r.getMessage() for r in caplog.records if r.name == "fluxsr"]
    assert any("did not apply these tensors of dora_te.safetensors: " in m
               and "DoRA magnitudes: 1 (e.g. transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector)" in m
               and "LoRA biases: 1 (e.g. transformer.transformer_blocks.0.attn.to_q.lora_B.bias)" in m
               and "fluxsr upscale applies peft-named DoRA magnitudes and LoRA biases" in m for m in ours), ours
    assert any("ignored 2 text-encoder LoRA tensors" in m for m in ours), ours
    assert not any("found a place" in m for m in ours)  # the text-encoder layer is not counted as a FLUX layer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        cls().load(lora_dir.flux, "fluxsr.safetensors", 1.0)
    assert not [r for r in caplog.records if r.name == "fluxsr"]
    # only some layers placed: a warning with the counts
    caplog.clear()
    half = FakeLoraPatcher({"transformer_blocks.0.attn.to_q"})
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        cls().load(half, "fluxsr.safetensors", 1.0)
    assert "only 1 of the 2 layers" in caplog.text


# --- FluxSRTilingOptions ------------------------------------------------------------------------

def test_tiling_options_defaults_and_errors(pack):
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRTilingOptions"]
    tiling = sub(pack, "fluxsr_core.tiling")
    req = cls.INPUT_TYPES()["required"]
    defaults = [req[k][1]["default"] for k in req]
    assert cls().build(*defaults)[0] == tiling.TilingConfig()
    assert cls().build(512, 128, 0, 0, "linear", True, 2)[0] == tiling.TilingConfig(
        latent_tile=64, latent_overlap=16, vae_tile=0, vae_overlap=0, blend="linear",
        global_position_ids=True, tile_batch_size=2)
    assert cls().build(1024, 256, 1024, 128, "gaussian", False, 1, True)[0] == tiling.TilingConfig(fit_tiles=True)
    assert list(req)[-1] == "fit_tiles"  # saved workflows keep widget values by position: appended last
    with pytest.raises(ValueError, match=r"tile \(512 px\) must be larger than its overlap \(512 px"):
        cls().build(512, 512, 0, 0, "gaussian")
    with pytest.raises(ValueError, match="multiple of 16"):
        cls().build(520, 128, 0, 0, "gaussian")
    # at queue time too (VALIDATE_INPUTS), before minutes of model loading upstream
    assert "must be larger than its overlap (512 px" in cls.VALIDATE_INPUTS(512, 512, 0, 0)
    assert "must be less than half of vae_tile_size 128" in cls.VALIDATE_INPUTS(1024, 256, 128, 64)
    assert cls.VALIDATE_INPUTS(1024, 256, 128, 32) is True
    assert cls.VALIDATE_INPUTS(1024, None, 128, 64) is True  # a linked widget: checked when the node runs


def test_an_rgba_image_keeps_its_colour_at_the_edges(pack, lossless_codec):
    """FluxSR Upscale on RGBA (Join Image with Alpha): the black under the transparent pixels does
    not bleed into the edges the upscale makes semi-transparent (lossless stand-in VAE, zero
    velocity: what is left is the resize)."""
    up, core = sub(pack, "nodes.upscale"), sub(pack, "fluxsr_core.upscaler")

    class Zero:
        def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
            return torch.zeros_like(latent)

    image = torch.zeros(1, 32, 32, 4)
    image[:, 8:24, 8:24] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = up.upscale_images(image, Zero(), lossless_codec, None, core.UpscaleOptions(scale=4.0, color_fix="none"))
    alpha = out[0, ..., 3]
    edge = (alpha > 0.02) & (alpha < 0.98)
    assert out.shape == (1, 128, 128, 4) and int(edge.sum()) > 500
    assert float(out[0, ..., 0][edge].min()) > 0.999


# --- the adapters over ComfyUI's MODEL and VAE --------------------------------------------------

def test_comfy_velocity_hands_the_model_the_wrappers_registered_on_the_patcher(pack, tiny, fake_comfy, caplog):
    """As ComfyUI's samplers merge the patcher's own wrappers into transformer_options (where
    BaseModel.apply_model and FLUX's forward look them up): TorchCompileModel's apply_model
    wrapper reaches the model. A key that also wraps the sampler's loop (EasyCache) is left out,
    with one warning: its per-sampling state is never set up by a one-step pass."""
    adapters = sub(pack, "nodes.comfy_adapters")
    cond = tiny_conditioning(pack, t_l=0.3)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    mine, compiled, cache_forward, cache_sample = (lambda *a: None), (lambda *a: None), (lambda *a: None), (lambda *a: None)
    patcher.model_options["transformer_options"]["wrappers"] = {"apply_model": {"mine": [mine]}}
    patcher.wrappers = {"apply_model": {"torch.compile": [compiled]},
                        "diffusion_model": {"easycache": [cache_forward]},
                        "outer_sample": {"easycache": [cache_sample]}}
    vel = adapters.ComfyVelocity(patcher)
    x = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        vel(x, torch.tensor([0.3]), cond)
        vel(x, torch.tensor([0.3]), cond)
    handed = patcher.model.calls[-1]["transformer_options"]["wrappers"]
    assert handed == {"apply_model": {"mine": [mine], "torch.compile": [compiled]}}
    # the MODEL's own dicts are left as they were (ComfyUI clones share them)
    assert patcher.model_options["transformer_options"]["wrappers"] == {"apply_model": {"mine": [mine]}}
    assert patcher.wrappers["apply_model"] == {"torch.compile": [compiled]}
    assert caplog.text.count("the MODEL's easycache wrapper is not run: it wraps the sampler's loop") == 1


def test_comfy_velocity_recovers_the_velocity(pack, tiny, fake_comfy):
    adapters = sub(pack, "nodes.comfy_adapters")
    cond = tiny_conditioning(pack, t_l=0.3)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    vel = adapters.ComfyVelocity(patcher)
    x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.7])
    core = adapters.conditioning_to_core(cond)
    want = tiny.velocity(x, sigma, core)
    got = vel(x, sigma, cond)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert fake_comfy.loads and fake_comfy.loads[-1][0] == [patcher]
    # Position offsets become ComfyUI's rope shifts (token units).
    got_off = vel(x, sigma, cond, position_offset=(2, 4))
    torch.testing.assert_close(got_off, tiny.velocity(x, sigma, core, position_offset=(2, 4)), atol=2e-5, rtol=1e-4)
    assert patcher.model.calls[-1]["transformer_options"]["rope_options"] == {"shift_y": 2.0, "shift_x": 4.0}
    assert not torch.allclose(got_off, got)
    # A patch wrapper (model_function_wrapper) is honoured.
    seen = []
    patcher.model_options["model_function_wrapper"] = lambda f, a: seen.append(a["timestep"]) or f(a["input"], a["timestep"], **a["c"])
    torch.testing.assert_close(vel(x, sigma, cond), want, atol=2e-5, rtol=1e-4)
    assert len(seen) == 1


def test_comfy_velocity_averages_entries_and_refuses_areas(pack, tiny, fake_comfy):
    adapters = sub(pack, "nodes.comfy_adapters")
    a, b = tiny_conditioning(pack)[0], tiny_conditioning(pack, guidance=1.0)[0]
    b = [b[0] * 0.5, dict(b[1], strength=3.0)]
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    vel = adapters.ComfyVelocity(patcher)
    x, sigma = torch.randn(1, 16, 4, 4), torch.tensor([0.5])
    va = vel(x, sigma, [a])
    vb = vel(x, sigma, [b])
    torch.testing.assert_close(vel(x, sigma, [a, b]), (va + 3 * vb) / 4, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="area conditioning"):
        vel(x, sigma, [[a[0], dict(a[1], area=(8, 8, 0, 0))]])
    with pytest.raises(ValueError, match=r"applies from 0% to 50% of the sampling only .ConditioningSetTimestepRange"):
        vel(x, sigma, [[a[0], dict(a[1], start_percent=0.0, end_percent=0.5)]])
    vel(x, sigma, [[a[0], dict(a[1], start_percent=0.0, end_percent=1.0)]])  # the whole range: as without
    with pytest.raises(ValueError, match=r"hooks .Set CLIP Hooks, hook LoRAs. is not supported.*FluxSR Load LoRA"):
        vel(x, sigma, [[a[0], dict(a[1], hooks=object())]])  # ComfyUI would apply them; we would not
    with pytest.raises(ValueError, match="sigma 0"):
        vel(x, torch.tensor([0.0]), [a])


def test_comfy_velocity_refuses_models_that_are_not_flux(pack, tiny, fake_comfy):
    adapters = sub(pack, "nodes.comfy_adapters")
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.model.latent_format.scale_factor = 0.13025  # SDXL's
    with pytest.raises(ValueError, match="not a FLUX.1 model"):
        adapters.ComfyVelocity(patcher)
    patcher = FakePatcher(tiny.velocity, object)
    with pytest.raises(ValueError, match="rectified-flow"):
        adapters.ComfyVelocity(patcher)
    with pytest.raises(ValueError, match="not a ComfyUI MODEL"):
        adapters.ComfyVelocity(object())
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.model.latent_format.scale_factor = 0.13025
    with pytest.raises(ValueError, match="FluxSR needs FLUX.1-dev .UNETLoader. without the FluxSR LoRA as its teacher"):
        adapters.ComfyVelocity(patcher, teacher=True)  # the teacher is the plain base model
    with pytest.raises(ValueError, match="straight to the Teacher Sampler, without the FluxSR LoRA"):
        adapters.make_velocity(object(), teacher=True)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)  # FLUX Fill: 384 = 64 + mask and masked image
    patcher.model.diffusion_model = types.SimpleNamespace(img_in=torch.nn.Linear(384, 8))
    with pytest.raises(ValueError, match="384 input features per token.*Fill"):
        adapters.ComfyVelocity(patcher)


def test_comfy_velocity_refuses_a_conditioning_of_other_widths(pack, tiny, fake_comfy):
    """An SDXL-like CLIPTextEncode (2048-wide tokens, 1280 pooled) is named before any matmul."""
    adapters = sub(pack, "nodes.comfy_adapters")
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.model.diffusion_model = types.SimpleNamespace(
        txt_in=torch.nn.Linear(32, 8), vector_in=types.SimpleNamespace(in_layer=torch.nn.Linear(16, 8)))
    vel = adapters.ComfyVelocity(patcher)
    x, sigma = torch.randn(1, 16, 4, 4), torch.tensor([0.5])
    vel(x, sigma, tiny_conditioning(pack))  # FLUX's widths (the tiny model's 32 and 16) pass
    wrong = [[torch.randn(1, 5, 48), {"pooled_output": torch.randn(1, 20), "guidance": 3.5}]]
    with pytest.raises(ValueError, match=r"tokens are 48 wide, the model takes 32 \(T5-XXL\).*"
                                         r"pooled vector is 20 wide, the model takes 16 \(CLIP-L\).*DualCLIPLoader"):
        vel(x, sigma, wrong)
    assert len(patcher.model.calls) == 1


def test_comfy_codec_normalises_and_tiles(pack, tiny):
    adapters = sub(pack, "nodes.comfy_adapters")
    vae = FakeVAE(tiny.vae)
    codec = adapters.ComfyCodec(vae, vae_tile=32, vae_overlap=8)
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(codec.encode(img), tiny.codec.encode(img), atol=1e-6, rtol=1e-5)
    z = tiny.codec.encode(img)
    torch.testing.assert_close(codec.decode(z), tiny.codec.decode(z), atol=1e-6, rtol=1e-5)
    assert [c[0] for c in vae.calls] == ["encode", "decode"]
    big = torch.rand(1, 3, 48, 40)
    codec.encode(big)
    codec.decode(tiny.codec.encode(big))
    assert vae.calls[2] == ("encode_tiled", 32, 8) and vae.calls[4] == ("decode_tiled", 8, 1)  # at least 64 px, as VAEDecodeTiled
    with pytest.raises(ValueError, match="16-channel FLUX"):
        adapters.ComfyCodec(types.SimpleNamespace(encode=None, decode=None, latent_channels=4))
    video = types.SimpleNamespace(latent_channels=16, decode=None,  # a Wan-like VAE: [B, C, T, h, w] latents
                                  encode=lambda px: torch.zeros(px.shape[0], 16, 1, px.shape[1] // 8, px.shape[2] // 8))
    with pytest.raises(ValueError, match=r"latent of shape \(1, 16, 1, 2, 3\).*video VAE"):
        adapters.ComfyCodec(video).encode(img)


class FakeLdmVAE(FakeVAE):
    """FakeVAE whose encode/decode run a latent-diffusion ``first_stage_model`` as comfy.sd.VAE
    does (its memory management and batching left out)."""

    def __init__(self, diffusers_vae, ldm_layout):
        super().__init__(diffusers_vae)
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.encoder, self.first_stage_model.decoder = ldm_layout(diffusers_vae)
        # comfy.sd.VAE's reckoning of an untiled pass (AutoencoderKL's), per instance as there
        self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * dtype.itemsize
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * dtype.itemsize
        self.memory_required = []  # what encode/decode would ask load_models_gpu for
        self.vae_dtype = torch.float32  # comfy.sd.VAE reckons in the dtype it runs the VAE in

    def encode(self, pixels):
        self.calls.append(("encode", tuple(pixels.shape)))
        x = pixels.movedim(-1, 1)
        self.memory_required.append(self.memory_used_encode(x.shape, self.vae_dtype))
        return self.first_stage_model.encoder(x * 2 - 1)[:, :16]

    def decode(self, raw):
        self.calls.append(("decode", tuple(raw.shape)))
        self.memory_required.append(self.memory_used_decode(raw.shape, self.vae_dtype))
        return ((self.first_stage_model.decoder(raw) + 1) / 2).clamp(0, 1).movedim(1, -1)


def test_comfy_codec_tiles_inside_comfyuis_own_encode_and_decode(pack, tiny, ldm_layout, monkeypatch, caplog):
    """Tiled with whole-image statistics through ComfyUI's own VAE.encode/decode (its memory
    management stays in charge), close to untiled; a VAE without a latent-diffusion
    first_stage_model gets ComfyUI's tiled passes, with one warning."""
    adapters = sub(pack, "nodes.comfy_adapters")
    vae_tiling = sub(pack, "fluxsr_core.vae_tiling")
    runs = []
    for name in ("run_encoder", "run_decoder"):
        real = getattr(vae_tiling, name)
        monkeypatch.setattr(vae_tiling, name, lambda half, x, *a, _real=real, _name=name, **k:
                            runs.append(_name) or _real(half, x, *a, **k))
    weighed = []  # what the tiling weighs the device's free memory against: held activations, one tile's work
    real_stash = vae_tiling._stash_device
    monkeypatch.setattr(vae_tiling, "_stash_device", lambda stash, device, need, work:
                        weighed.append(need + work) or real_stash(stash, device, need, work))
    vae = FakeLdmVAE(tiny.vae, ldm_layout)
    codec = adapters.ComfyCodec(vae, vae_tile=192, vae_overlap=88)  # the overlap: for ComfyUI's fallback only
    img = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 320, 256, generator=torch.Generator().manual_seed(3)), 5, 1, 2)
    with torch.no_grad():
        z = codec.encode(img)
        untiled_z = tiny.codec.encode(img)
        out = codec.decode(untiled_z)
        untiled = tiny.codec.decode(untiled_z)
        per_tile = tiny.models.DiffusersCodec(tiny.vae, compute_dtype=torch.float32, tile=192, tile_overlap=88,
                                              tile_norm="tile").decode(untiled_z)
        tiny.models.DiffusersCodec(tiny.vae, compute_dtype=torch.float32)  # the shared VAE untiled again
    assert [c[0] for c in vae.calls] == ["encode", "decode"] and runs == ["run_encoder", "run_decoder"]
    # ComfyUI's memory reckoning of the tiled pass: the held activations and one 192 px tile (the
    # encoder's 24x24 latent, the decoder's), not the untiled pass; put back afterwards
    encoder, decoder = vae.first_stage_model.encoder, vae.first_stage_model.decoder
    fp32 = torch.float32
    assert vae.memory_required == [vae_tiling.held_bytes(encoder, 320, 256, 1, fp32) + 1767 * 192 * 192 * 4,
                                   vae_tiling.held_bytes(decoder, 320, 256, 1, fp32) + 2178 * 24 * 24 * 64 * 4]
    assert vae.memory_required[1] < 2178 * 40 * 32 * 64 * 4  # the untiled reckoning
    # and the tiling keeps them on the device when it has what ComfyUI was asked to free for them
    assert weighed == vae.memory_required
    assert vae.memory_used_decode((1, 16, 40, 32), torch.bfloat16) == 2178 * 40 * 32 * 64 * 2
    assert (z - untiled_z).abs().max() < 1e-3 * untiled_z.abs().mean()
    # the untiled picture up to rounding, where diffusers' per-tile tiling of the same tiles is
    # 12.2 levels of 255 off on average
    assert (out - untiled).abs().mean() * 255 < 1e-3
    assert (per_tile - untiled).abs().mean() * 255 > 2.0
    assert "forward" not in vae.first_stage_model.encoder.__dict__
    plain = FakeVAE(tiny.vae)
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        other = adapters.ComfyCodec(plain, vae_tile=96, vae_overlap=40)
        other.encode(img)
        other.encode(img)
    assert [c[0] for c in plain.calls] == ["encode_tiled", "encode", "encode_tiled", "encode"]
    assert caplog.text.count("whole-image VAE tiling cannot run this VAE's encoder (it has no "
                             "first_stage_model.encoder)") == 1


def test_vae_tiling_comfyui_cannot_run_is_refused(pack):
    """ComfyUI's encode_tiled/decode_tiled also run half-size tiles with the same overlap: at half
    the tile the step is 0 (ZeroDivisionError), above it no tile runs and the picture is NaN (black)."""
    adapters = sub(pack, "nodes.comfy_adapters")
    options = sub(pack, "nodes.tiling_options")
    for vae_tile, vae_overlap in ((128, 96), (64, 32), (128, 64), (72, 32)):  # 72/32: the decode's 9/4 latent tiles
        with pytest.raises(ValueError, match=f"vae_tile_overlap {vae_overlap} must be less than half of "
                                             f"vae_tile_size {vae_tile}"):
            options.tiling_from_widgets(256, 64, vae_tile, vae_overlap, "gaussian")
        with pytest.raises(ValueError, match="half that size with the same overlap"):
            adapters.ComfyCodec(FakeVAE(None), vae_tile=vae_tile, vae_overlap=vae_overlap)
    for vae_tile, vae_overlap in ((128, 56), (128, 32), (1024, 256), (64, 24), (0, 512)):
        config = options.tiling_from_widgets(256, 64, vae_tile, vae_overlap, "gaussian")
        assert (config.vae_tile, config.vae_overlap) == (vae_tile, vae_overlap)


# --- FluxSRUpscale ------------------------------------------------------------------------------

def test_upscale_node_matches_the_core_upscaler(pack, tiny, fake_comfy):
    upscaler = sub(pack, "fluxsr_core.upscaler")
    images = sub(pack, "fluxsr_core.images")
    adapters = sub(pack, "nodes.comfy_adapters")
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    cond = tiny_conditioning(pack, t_l=0.35)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    image = torch.rand(2, 24, 20, 4, generator=torch.Generator().manual_seed(5))  # RGBA batch
    (out,) = node.upscale(image, patcher, FakeVAE(tiny.vae), cond, scale=2.0, t_l=0.0, color_fix="wavelet")
    assert out.shape == (2, 48, 40, 4) and out.dtype == torch.float32 and out.device.type == "cpu"
    options = upscaler.UpscaleOptions(scale=2.0, t_l=0.35, color_fix="wavelet")
    core_cond = adapters.conditioning_to_core(cond)
    for i in range(2):
        want = upscaler.upscale_tensor(images.bhwc_to_bchw(image[i:i + 1, ..., :3]), tiny.velocity, tiny.codec,
                                       core_cond, options)
        torch.testing.assert_close(images.bhwc_to_bchw(out[i:i + 1, ..., :3]), want, atol=1e-4, rtol=1e-4)
        alpha = images.upscale_alpha(images.bhwc_to_bchw(image[i:i + 1, ..., 3:]), (48, 40))
        torch.testing.assert_close(out[i, ..., 3], alpha[0, 0])
    # T_L came from the conditioning (0.35): the default 0.25 gives another image.
    other = upscaler.upscale_tensor(images.bhwc_to_bchw(image[:1, ..., :3]), tiny.velocity, tiny.codec, core_cond,
                                    upscaler.UpscaleOptions(scale=2.0, t_l=0.25, color_fix="wavelet"))
    assert (other - images.bhwc_to_bchw(out[:1, ..., :3])).abs().max() > 1e-3
    # One progress bar over the whole batch, ending at its total; interrupt checks ran.
    bar = fake_comfy.bars[-1]
    assert bar.updates[-1][0] == bar.updates[-1][1] and len(bar.updates) == 2
    assert fake_comfy.checks >= 4
    assert patcher.model.calls[0]["t"].tolist() == pytest.approx([0.35])


def test_upscale_node_warns_about_a_missing_lora_and_disagreeing_t_ls(pack, caplog):
    up = sub(pack, "nodes.upscale")
    adapters = sub(pack, "nodes.comfy_adapters")
    settings = sub(pack, "fluxsr_core.settings")
    plain = types.SimpleNamespace(patches={}, model_options={})
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        up.warn_about_the_inputs(plain, tiny_conditioning(pack, t_l=0.3), 0.0)
    assert "carries no LoRA" in caplog.text and "T_L" not in caplog.text
    caplog.clear()
    patched = types.SimpleNamespace(patches={"w": [(1.0, None, 1.0)]}, model_options={})
    adapters.attach_model_settings(patched, settings.RunSettings(t_l=0.45, source={"t_l": "LoRA a.safetensors"}))
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        up.warn_about_the_inputs(patched, tiny_conditioning(pack, t_l=0.3), 0.0)
        up.warn_about_the_inputs(patched, tiny_conditioning(pack, t_l=0.3), 0.5)  # the widget decides: quiet
        up.warn_about_the_inputs(patched, tiny_conditioning(pack, t_l=0.45), 0.0)  # they agree: quiet
    assert caplog.text.count("FluxSR upscale") == 1
    assert "disagree: T_L 0.3 (bundle tiny.safetensors) against 0.45 (LoRA a.safetensors)" in caplog.text
    assert "no LoRA" not in caplog.text


def test_a_model_without_guidance_embedding_is_named_by_both_nodes(pack, tiny, fake_comfy, caplog):
    """FLUX.1-schnell in UNETLoader (ComfyUI's FLUX with guidance_embed False) ran the upscale and
    the teacher without a word, where ``fluxsr upscale`` notes it: both nodes now say so."""
    import logging

    up = sub(pack, "nodes.upscale")
    adapters = sub(pack, "nodes.comfy_adapters")

    def flux(guidance_embed, where="params"):
        inner = types.SimpleNamespace()
        if where == "params":
            inner.diffusion_model = types.SimpleNamespace(params=types.SimpleNamespace(guidance_embed=guidance_embed))
        else:
            inner.model_config = types.SimpleNamespace(unet_config={"guidance_embed": guidance_embed})
        return types.SimpleNamespace(model=inner, patches={"w": [(1.0, None, 1.0)]}, model_options={})

    assert adapters.has_no_guidance_embedding(flux(False)) and adapters.has_no_guidance_embedding(flux(False, "config"))
    for quiet in (flux(True), flux(True, "config"), types.SimpleNamespace(), None):
        assert not adapters.has_no_guidance_embedding(quiet)
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        up.warn_about_the_inputs(flux(True), tiny_conditioning(pack), 0.0)
    assert "guidance embedding" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        up.warn_about_the_inputs(flux(False), tiny_conditioning(pack), 0.0)
    assert "FluxSR upscale: the MODEL has no guidance embedding (FLUX.1-schnell?)" in caplog.text
    caplog.clear()
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.model.diffusion_model = types.SimpleNamespace(params=types.SimpleNamespace(guidance_embed=False))
    node = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]()
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        node.sample(patcher, tiny_conditioning(pack), FakeVAE(tiny.vae), seed=1, steps=1, width=32, height=32,
                    trajectory_previews=0)
    assert "FluxSR teacher: the MODEL has no guidance embedding (FLUX.1-schnell?)" in caplog.text


def test_upscale_guidance_in_the_order_of_fluxsr_upscale(pack, tiny, fake_comfy, caplog):
    # conditioning chosen (a bundle's value, the FluxSR Conditioning widget, FluxGuidance on a text
    # conditioning) > the LoRA's (on the MODEL, from FluxSR Load LoRA) > ours
    up = sub(pack, "nodes.upscale")
    adapters = sub(pack, "nodes.comfy_adapters")
    settings = sub(pack, "fluxsr_core.settings")
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.patches = {"w": [(1.0, None, 1.0)]}
    adapters.attach_model_settings(patcher, settings.RunSettings(guidance=2.0, source={
        "t_l": "default", "guidance": "LoRA a.safetensors", "scale": "default"}))
    third_party = tiny_conditioning(pack, t_l=0.3)  # a bundle without guidance: 3.5 by default
    assert up.resolve_guidance(third_party, patcher) == (2.0, "model: LoRA a.safetensors")
    assert up.resolve_guidance(third_party) == (3.5, "default")
    ours = tiny_conditioning(pack, t_l=0.3, guidance=5.0, guidance_source="bundle tiny.safetensors")
    assert up.resolve_guidance(ours, patcher) == (5.0, "conditioning: bundle tiny.safetensors")
    text = tiny_conditioning(pack, guidance=4.0)  # FluxGuidance on a CLIPTextEncode conditioning
    assert up.resolve_guidance(text, patcher)[:1] == (4.0,)
    assert up.resolve_guidance(text, patcher)[1].startswith("conditioning: its guidance value")
    # FluxGuidance after FluxSR Conditioning: its value, whether the bundle set one or not, also
    # one equal to what the bundle lacks (3.5 over the LoRA's 2)
    for cond, value in ((third_party, 1.5), (ours, 1.5), (third_party, 3.5)):
        after = [[cond[0][0], {**cond[0][1], "guidance": value}]]
        assert up.resolve_guidance(after, patcher) == (value, up.GUIDANCE_IN_THE_GRAPH)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fluxsr"):  # chosen in the graph: nothing to warn of
            up.warn_about_the_inputs(patcher, after, 0.0, up.resolve_guidance(after, patcher)[1])
        assert "disagree" not in caplog.text
    # the FluxSR Conditioning widget chose: no warning either
    widget = tiny_conditioning(pack, t_l=0.3, guidance=5.0, guidance_source="FluxSRConditioning node")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        up.warn_about_the_inputs(patcher, widget, 0.0, up.resolve_guidance(widget, patcher)[1])
    assert up.resolve_guidance(widget, patcher)[0] == 5.0 and "disagree" not in caplog.text
    caplog.clear()
    bare_text = [[text[0][0], {"pooled_output": text[0][1]["pooled_output"]}]]  # a plain CLIPTextEncode
    assert up.resolve_guidance(bare_text, patcher)[0] == 2.0 and up.resolve_guidance(bare_text)[0] == 3.5
    # the node runs the model at the LoRA's guidance, without touching its input conditioning
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="fluxsr"):
        node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
        (out,) = node.upscale(image, patcher, FakeVAE(tiny.vae), third_party, scale=2.0)
        (chosen,) = node.upscale(image, patcher, FakeVAE(tiny.vae), ours, scale=2.0)
    assert [c["guidance"] for c in patcher.model.calls] == [2.0, 5.0]
    assert "guidance" not in third_party[0][1]  # untouched (FluxSR Conditioning writes only a chosen value)
    assert "guidance 2 (model: LoRA a.safetensors)" in caplog.text
    assert "disagree: guidance 5 (bundle tiny.safetensors) against 2 (LoRA a.safetensors)" in caplog.text
    assert "FluxSR Conditioning's guidance widget" in caplog.text
    # guidance changes the result (the tiny model embeds it), so the fill-in is not cosmetic
    assert (out - chosen).abs().max() > 1e-4


def test_upscale_t_l_resolution(pack):
    up = sub(pack, "nodes.upscale")
    with_settings = tiny_conditioning(pack, t_l=0.4)
    plain = tiny_conditioning(pack)
    assert up.resolve_t_l(0.0, with_settings) == (0.4, "conditioning: bundle tiny.safetensors")
    assert up.resolve_t_l(0.2, with_settings) == (0.2, "FluxSRUpscale widget")
    assert up.resolve_t_l(0.0, plain)[0] == 0.25 and up.resolve_t_l(0.0, plain)[1].startswith("default")
    # a bundle without run settings carries our default: said so, not credited to the bundle
    bare = tiny_conditioning(pack, t_l=0.25, t_l_source="default")
    t_l, source = up.resolve_t_l(0.0, bare)
    assert t_l == 0.25 and source.startswith("default") and "t_l widget" in source
    with pytest.raises(ValueError, match="CONDITIONING"):
        up.resolve_t_l(0.0, [])


def test_upscale_node_grey_and_tiled(pack, tiny, fake_comfy):
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    tiling = pack.NODE_CLASS_MAPPINGS["FluxSRTilingOptions"]().build(256, 64, 64, 16, "gaussian")[0]
    vae = FakeVAE(tiny.vae)
    grey = torch.rand(1, 40, 36, 1)
    (out,) = node.upscale(grey, FakePatcher(tiny.velocity, fake_comfy.CONST), vae, tiny_conditioning(pack),
                          scale=4.0, t_l=0.25, color_fix="none", tiling=tiling)
    assert out.shape == (1, 160, 144, 1)
    patcher_calls = [c for c in vae.calls if c[0].endswith("tiled")]
    assert patcher_calls == [("encode_tiled", 64, 16), ("decode_tiled", 8, 2)]


def test_upscale_node_keeps_a_grey_picture_grey(pack, tiny, fake_comfy):
    """LoadImage makes every picture RGB: three channels equal to within 2 levels come back equal
    (the luma of the colour result, as `fluxsr upscale` writes a grey input), a colour picture is
    left alone."""
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    images = sub(pack, "fluxsr_core.images")
    run = lambda img: node.upscale(img, FakePatcher(tiny.velocity, fake_comfy.CONST), FakeVAE(tiny.vae),  # noqa: E731
                                   tiny_conditioning(pack), scale=2.0, t_l=0.25, color_fix="none")[0]
    grey = torch.rand(1, 24, 32, 1, generator=torch.Generator().manual_seed(5)).expand(-1, -1, -1, 3)
    out = run(grey)
    assert out.shape == (1, 48, 64, 3)
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])
    # what the model made of it, in colour (the tiny random model tints it), reduced by luma
    colour = run(grey.clone().contiguous() + torch.tensor([0.0, 0.0, 3 / 255]))  # 3 levels apart: colour
    assert (colour[..., 0] - colour[..., 2]).abs().max() > 1e-2
    near = run(grey.clone().contiguous() + torch.tensor([0.0, 0.0, 1 / 255]))  # a level apart: still grey
    assert torch.equal(near[..., 0], near[..., 2])
    one = run(grey[..., :1].contiguous())
    assert one.shape == (1, 48, 64, 1) and torch.allclose(one[..., 0], out[..., 0], atol=1e-6)
    assert torch.allclose(images.luma(torch.ones(1, 3, 2, 2)), torch.ones(1, 1, 2, 2))


def test_upscale_node_retries_with_smaller_tiles_on_oom(pack, tiny, fake_comfy, caplog):
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    tiling = pack.NODE_CLASS_MAPPINGS["FluxSRTilingOptions"]().build(512, 128, 0, 0, "gaussian")[0]
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    real_apply = patcher.model.apply_model

    failures = []

    def apply_model(x, t, **kw):
        if not failures:  # the first pass runs out of memory
            failures.append(tuple(x.shape))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_apply(x, t, **kw)

    patcher.model.apply_model = apply_model
    with caplog.at_level(logging.WARNING, logger="fluxsr"):
        (out,) = node.upscale(torch.rand(2, 20, 20, 3), patcher, FakeVAE(tiny.vae), tiny_conditioning(pack),
                              scale=3.2, t_l=0.25, color_fix="none", tiling=tiling)
    assert out.shape == (2, 64, 64, 3)
    retries = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(retries) == 1 and "256px tiles" in retries[0].getMessage()
    assert fake_comfy.emptied == 1 and len(failures) == 1


def test_upscale_node_stops_on_interrupt(pack, tiny, fake_comfy):
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    fake_comfy.interrupt_after = 2
    tiling = pack.NODE_CLASS_MAPPINGS["FluxSRTilingOptions"]().build(256, 64, 0, 0, "gaussian")[0]
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    with pytest.raises(fake_comfy.Interrupt):
        node.upscale(torch.rand(1, 24, 24, 3), patcher, FakeVAE(tiny.vae), tiny_conditioning(pack),
                     scale=4.0, t_l=0.25, color_fix="none", tiling=tiling)
    assert 0 < len(patcher.model.calls) < 4  # 96 px output = 4 tiles of 256/64: stopped between tiles


def test_upscale_node_refuses_bad_images(pack, tiny, fake_comfy):
    node = pack.NODE_CLASS_MAPPINGS["FluxSRUpscale"]()
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        node.upscale(torch.rand(1, 16, 16, 2), patcher, FakeVAE(tiny.vae), tiny_conditioning(pack))
    with pytest.raises(ValueError, match="T_L"):
        node.upscale(torch.rand(1, 16, 16, 3), patcher, FakeVAE(tiny.vae), tiny_conditioning(pack), t_l=1.5)


# --- FluxSRTeacherSampler -----------------------------------------------------------------------

def test_teacher_sampler_is_the_core_sampler(pack, tiny, fake_comfy, tmp_path, monkeypatch):
    flow = sub(pack, "fluxsr_core.flow")
    latents = sub(pack, "fluxsr_core.latents")
    pairs = sub(pack, "fluxsr_core.pairs")
    teacher = sub(pack, "nodes.teacher")
    adapters = sub(pack, "nodes.comfy_adapters")
    node = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]()
    monkeypatch.setenv(teacher.DATASET_ROOTS_ENV, str(tmp_path))  # outside the (stand-in) output folder
    cond = tiny_conditioning(pack, guidance=3.0)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    image, latent, trajectory = node.sample(patcher, cond, FakeVAE(tiny.vae), seed=11, steps=3, width=32,
                                            height=48, trajectory_previews=2, dataset_folder=str(tmp_path / "pairs"))
    noise = teacher.seeded_noise(11, 48, 32)
    assert torch.equal(noise, torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(11)))
    sigmas = flow.flux_sigmas(3, (48 // 16) * (32 // 16))
    core_cond = adapters.conditioning_to_core(cond)
    z0 = flow.euler_sample(tiny.velocity, noise, sigmas, core_cond)
    torch.testing.assert_close(latents.normalize(latent["samples"]), z0, atol=1e-4, rtol=1e-4)
    assert image.shape == (1, 48, 32, 3)
    torch.testing.assert_close(image[0], tiny.codec.decode(z0)[0].movedim(0, -1), atol=1e-4, rtol=1e-4)
    assert trajectory.shape == (2, 48, 32, 3) and teacher.preview_steps(3, 2) == [2, 3]
    torch.testing.assert_close(trajectory[-1], image[0])
    # The pair is on disk, readable by the trainer's dataset, and not duplicated by a re-run.
    data = pairs.PairDataset(tmp_path / "pairs")
    assert len(data) == 1
    item = data[0]
    assert torch.equal(item["eps"], noise[0])
    torch.testing.assert_close(item["z0"], z0[0], atol=1e-4, rtol=1e-4)
    assert item["meta"]["seed"] == 11 and item["meta"]["steps"] == 3 and item["meta"]["guidance"] == 3.0
    assert torch.equal(item["t5"], cond[0][0][0]) and item["image"].dtype == torch.uint8
    # A re-run of the same pair stores nothing new, but restores the cond file the pair needs.
    (cond_file,) = (tmp_path / "pairs").glob("cond-*.safetensors")
    cond_file.unlink()
    node.sample(patcher, cond, FakeVAE(tiny.vae), seed=11, steps=3, width=32, height=48,
                trajectory_previews=0, dataset_folder=str(tmp_path / "pairs"))
    assert torch.equal(pairs.PairDataset(tmp_path / "pairs")[0]["t5"], cond[0][0][0])
    node.sample(patcher, cond, FakeVAE(tiny.vae), seed=12, steps=3, width=32, height=48,
                trajectory_previews=0, dataset_folder=str(tmp_path / "pairs"))
    assert len(pairs.PairDataset(tmp_path / "pairs")) == 2
    assert len(list((tmp_path / "pairs").glob("shard-*.safetensors"))) == 2  # one shard per new pair
    # A patched MODEL (a LoRA on the teacher) is warned about and its pair is its own, marked as such.
    patcher.patches = {"double_blocks.0.img_attn.qkv.weight": [(1.0, object(), 1.0, None, None)]}
    node.sample(patcher, cond, FakeVAE(tiny.vae), seed=11, steps=3, width=32, height=48,
                trajectory_previews=0, dataset_folder=str(tmp_path / "pairs"))
    data = pairs.PairDataset(tmp_path / "pairs")
    assert len(data) == 3
    patched = [data[i]["meta"] for i in range(3) if "teacher_patches" in data[i]["meta"]]
    assert len(patched) == 1 and patched[0]["teacher_patched_weights"] == 1 and patched[0]["seed"] == 11
    assert {data[i]["meta"]["teacher_weights"] for i in range(3)} == {"full"}


def test_a_quantised_teacher_model_is_recorded_and_kept_apart(pack, tiny, fake_comfy, tmp_path, monkeypatch, caplog):
    """ComfyUI-GGUF's weights (GGMLTensor, with a tensor_type) and UNETLoader's fp8 change the
    teacher's numbers: warned about, recorded as teacher_weights, under ids of their own."""
    import logging

    pairs = sub(pack, "fluxsr_core.pairs")
    teacher = sub(pack, "nodes.teacher")
    adapters = sub(pack, "nodes.comfy_adapters")
    monkeypatch.setenv(teacher.DATASET_ROOTS_ENV, str(tmp_path))
    node = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]()
    cond = tiny_conditioning(pack, guidance=3.0)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    assert adapters.model_weight_storage(patcher) == "full"  # no diffusion_model to look at
    diffusion = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    patcher.model.diffusion_model = diffusion
    assert adapters.model_weight_storage(patcher) == "full"
    diffusion[0].weight.tensor_type = types.SimpleNamespace(name="Q8_0")  # as ComfyUI-GGUF's GGMLTensor
    diffusion[1].weight.tensor_type = types.SimpleNamespace(name="F32")
    assert adapters.model_weight_storage(patcher) == "gguf-Q8_0"
    caplog.set_level(logging.WARNING, logger="fluxsr")
    for _ in range(2):  # the same quantised pair twice: stored once
        node.sample(patcher, cond, FakeVAE(tiny.vae), seed=5, steps=2, width=32, height=32, trajectory_previews=0,
                    dataset_folder=str(tmp_path / "pairs"))
    assert "stored as gguf-Q8_0, which changes the teacher's samples" in caplog.text
    del patcher.model.diffusion_model
    node.sample(patcher, cond, FakeVAE(tiny.vae), seed=5, steps=2, width=32, height=32, trajectory_previews=0,
                dataset_folder=str(tmp_path / "pairs"))
    data = pairs.PairDataset(tmp_path / "pairs")
    assert sorted(data[i]["meta"]["teacher_weights"] for i in range(len(data))) == ["full", "gguf-Q8_0"]
    assert sorted(pid.endswith("-wgguf-Q8_0") for pid in data.ids) == [False, True]
    fp8 = torch.nn.Linear(4, 4)
    fp8.weight.data = fp8.weight.data.to(torch.float8_e4m3fn)
    patcher.model.diffusion_model = fp8
    assert adapters.model_weight_storage(patcher) == "fp8"
    # ComfyUI 0.8 holds scaled-fp8 and NVFP4 files as comfy_kitchen QuantizedTensors: dtype bf16,
    # a storage_dtype and a layout_cls (a layout's name)
    kitchen = torch.nn.Linear(4, 4).to(torch.bfloat16)
    kitchen.weight.storage_dtype, kitchen.weight.layout_cls = torch.uint8, "TensorCoreNVFP4Layout"
    patcher.model.diffusion_model = kitchen
    assert adapters.model_weight_storage(patcher) == "nvfp4"
    kitchen.weight.layout_cls = "TensorCoreFP8E4M3Layout"
    assert adapters.model_weight_storage(patcher) == "fp8"
    kitchen.weight.layout_cls = "TensorCoreFP8E5M2Layout"
    assert adapters.model_weight_storage(patcher) == "fp8_e5m2"
    # UNETLoader's fp8_e5m2 rounds the weights otherwise than e4m3fn: another teacher, another id
    fp8.weight.data = fp8.weight.data.float().to(torch.float8_e5m2)
    patcher.model.diffusion_model = fp8
    assert adapters.model_weight_storage(patcher) == "fp8_e5m2"


def test_a_teacher_model_is_told_from_another_by_its_weights_and_patch_values(pack, tiny, fake_comfy):
    """The fingerprint pairs record: other weights (a fine-tune, FLUX.1-schnell) or another LoRA's
    values on the same layers at the same strength give another; the weights ComfyUI patches in
    place while the model is loaded do not move it; GGUF's packed blocks are read as stored."""
    adapters = sub(pack, "nodes.comfy_adapters")
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    assert adapters.teacher_model_fingerprint(patcher) == ""  # no diffusion model to read
    torch.manual_seed(0)
    patcher.model.diffusion_model = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(40)))
    base = adapters.teacher_model_fingerprint(patcher)
    assert len(base) == 16 and adapters.teacher_model_fingerprint(patcher) == base
    with torch.no_grad():
        for layer in patcher.model.diffusion_model:  # a fine-tune moves every weight a little
            layer.weight.add_(1e-3)
    tuned = adapters.teacher_model_fingerprint(patcher)
    assert tuned != base
    up, down = torch.randn(32, 4), torch.randn(4, 32)
    patcher.patches = {"diffusion_model.3.weight": [(1.0, ("lora", (up, down, 4.0, None)), 1.0, None, None)]}
    lora = adapters.teacher_model_fingerprint(patcher)
    with torch.no_grad():  # as ComfyUI loading the model: the LoRA added into the weight it patches
        patcher.model.diffusion_model[3].weight.add_(up @ down)
    assert adapters.teacher_model_fingerprint(patcher) == lora != tuned
    # another clone's LoRA left added into a weight it shares (an upscale run before): read from ComfyUI's backup
    shared = patcher.model.diffusion_model[0].weight  # the first weight is among those sampled
    patcher.backup = {"diffusion_model.0.weight": types.SimpleNamespace(weight=shared.detach().clone(),
                                                                         inplace_update=True)}
    with torch.no_grad():
        shared.add_(0.25)
    assert adapters.teacher_model_fingerprint(patcher) == lora
    patcher.backup = {}
    assert adapters.teacher_model_fingerprint(patcher) != lora
    with torch.no_grad():
        shared.sub_(0.25)
    patcher.patches = {"diffusion_model.3.weight": [(1.0, ("lora", (up + 0.5, down, 4.0, None)), 1.0, None, None)]}
    assert adapters.teacher_model_fingerprint(patcher) not in (lora, tuned)  # other values, same layer and strength
    assert adapters.model_patches(patcher)[1] == adapters.model_patches(types.SimpleNamespace(patches={
        "diffusion_model.3.weight": [(1.0, ("lora", (up, down, 4.0, None)), 1.0, None, None)]}))[1]
    large = torch.nn.Linear(1, 1)  # over 2**24 bytes, where float32 index arithmetic runs past the end
    large.weight = torch.nn.Parameter(torch.zeros(2 ** 22 + 3, 3), requires_grad=False)
    patcher.patches, patcher.model.diffusion_model = {}, large
    assert len(adapters.teacher_model_fingerprint(patcher)) == 16
    packed = torch.nn.Linear(4, 64)
    packed.weight.tensor_type = types.SimpleNamespace(name="Q8_0")
    patcher.patches, patcher.model.diffusion_model = {}, packed
    before = adapters.teacher_model_fingerprint(patcher)
    with torch.no_grad():
        packed.weight[5, 2] += 1
    assert adapters.teacher_model_fingerprint(patcher) != before


def test_the_teacher_refuses_a_folder_whose_pair_another_model_sampled(pack, tiny, fake_comfy, tmp_path,
                                                                      monkeypatch):
    """The same conditioning, seed, size and steps from two teacher MODELs (FLUX.1-dev, then a
    fine-tune of it) give the same pair id: the second pair was silently not stored (the node
    said it was "already in" the folder). Refused now, before the sampling, naming both."""
    pairs = sub(pack, "fluxsr_core.pairs")
    teacher = sub(pack, "nodes.teacher")
    monkeypatch.setenv(teacher.DATASET_ROOTS_ENV, str(tmp_path))
    node = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]()
    cond = tiny_conditioning(pack)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    patcher.model.diffusion_model = torch.nn.Linear(8, 8)
    folder = str(tmp_path / "pairs")
    run = lambda: node.sample(patcher, cond, FakeVAE(tiny.vae), seed=5, steps=2, width=32, height=32,
                              trajectory_previews=0, dataset_folder=folder)
    run()
    run()  # the same MODEL again: stored once, no error
    data = pairs.PairDataset(folder)
    assert len(data) == 1 and data[0]["meta"]["teacher_model"] == sub(
        pack, "nodes.comfy_adapters").teacher_model_fingerprint(patcher)
    with torch.no_grad():
        patcher.model.diffusion_model.weight.mul_(1.01)
    sampled = []
    monkeypatch.setattr(teacher, "sample_teacher", lambda *a, **k: sampled.append(a))
    with pytest.raises(ValueError, match=r"pair c\w+-s5-32x32-n2-g3.5 in .*pairs .shard-.* was sampled by another "
                                         r"teacher MODEL .weights fingerprint \w{16}; this MODEL's is \w{16}.*"
                                         "a dataset folder of its own"):
        run()
    assert sampled == [] and len(pairs.PairDataset(folder)) == 1


def test_teacher_dataset_folder_stays_inside_the_allowed_folders(pack, tmp_path, monkeypatch):
    """Relative paths start in the output folder; ``..``, absolute paths and links out of it are
    refused unless FLUXSR_DATASET_ROOTS names their folder; the node refuses them at queue time."""
    teacher = sub(pack, "nodes.teacher")
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setitem(sys.modules, "folder_paths",
                        types.SimpleNamespace(get_output_directory=lambda: str(out)))
    monkeypatch.delenv(teacher.DATASET_ROOTS_ENV, raising=False)
    assert teacher.resolve_dataset_folder("fluxsr_pairs") == os.path.realpath(out / "fluxsr_pairs")
    assert teacher.resolve_dataset_folder(str(out / "a" / "b")) == os.path.realpath(out / "a" / "b")
    (out / "link").symlink_to(tmp_path, target_is_directory=True)
    for bad in ("../escaped", str(tmp_path / "elsewhere"), "link/x", "~/pairs"):
        with pytest.raises(ValueError, match="outside ComfyUI's output folder.*FLUXSR_DATASET_ROOTS"):
            teacher.resolve_dataset_folder(bad)
    for root_itself in (".", str(out), "a/.."):  # the pairs' files would lie among the saved pictures
        with pytest.raises(ValueError, match="the allowed folder itself: name a folder inside it"):
            teacher.resolve_dataset_folder(root_itself)
    node = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]
    assert "FLUXSR_DATASET_ROOTS" in node.VALIDATE_INPUTS(dataset_folder="../escaped")
    assert node.VALIDATE_INPUTS(dataset_folder="fluxsr_pairs") is True and node.VALIDATE_INPUTS() is True
    # a size the latent cannot take, from a prompt sent to the API (the page steps by 16)
    assert node.VALIDATE_INPUTS(width=1000, height=1024) == (
        "width must be a multiple of 16 pixels (FLUX packs 2x2 latent pixels of 8 px into a token), got 1000: "
        "use 992 or 1008")
    assert "height must be a multiple of 16" in node.VALIDATE_INPUTS(width=1024, height=520)
    assert node.VALIDATE_INPUTS(width=1024, height=None) is True  # linked: checked when the node runs
    monkeypatch.setenv(teacher.DATASET_ROOTS_ENV, os.pathsep.join([str(tmp_path / "nowhere"), str(tmp_path)]))
    assert teacher.resolve_dataset_folder(str(tmp_path / "elsewhere")) == os.path.realpath(tmp_path / "elsewhere")
    assert teacher.resolve_dataset_folder("../escaped") == os.path.realpath(tmp_path / "escaped")
    with pytest.raises(ValueError, match="the allowed folder itself"):
        teacher.resolve_dataset_folder(str(tmp_path))


def test_teacher_dataset_folder_on_another_windows_drive_than_the_output(pack, monkeypatch):
    """A root on another drive (D:, a UNC share) than ComfyUI's output folder: the output folder is
    tried first, and Windows' commonpath raises for paths on two drives; the next root still counts."""
    import ntpath

    teacher = sub(pack, "nodes.teacher")
    windows = types.SimpleNamespace(path=ntpath, pathsep=";", sep="\\", pardir="..", getcwd=lambda: "C:\\ComfyUI",
                                    environ={teacher.DATASET_ROOTS_ENV: "\\\\nas\\share\\sets;D:\\datasets;\\\\nas2\\pairs"})
    monkeypatch.setattr(teacher, "os", windows)
    monkeypatch.setitem(sys.modules, "folder_paths",
                        types.SimpleNamespace(get_output_directory=lambda: "C:\\ComfyUI\\output"))
    assert teacher.resolve_dataset_folder("D:\\datasets\\pairs") == "D:\\datasets\\pairs"
    assert teacher.resolve_dataset_folder("\\\\nas\\share\\sets\\a") == "\\\\nas\\share\\sets\\a"
    assert teacher.resolve_dataset_folder("pairs") == "C:\\ComfyUI\\output\\pairs"
    assert teacher.resolve_dataset_folder("\\\\nas2\\pairs\\run1") == "\\\\nas2\\pairs\\run1"  # a share's root
    with pytest.raises(ValueError, match="outside ComfyUI's output folder"):
        teacher.resolve_dataset_folder("D:\\datasets2\\x")  # beside a root, not in it
    with pytest.raises(ValueError, match="outside ComfyUI's output folder"):
        teacher.resolve_dataset_folder("E:\\elsewhere")


def test_teacher_reruns_when_its_dataset_folder_is_gone(pack, tiny, fake_comfy, tmp_path, monkeypatch):
    """ComfyUI re-runs a node only when IS_CHANGED changes: a deleted or replaced dataset folder
    must change it (the pair is written again); the node's own run, which creates the folder and
    writes into it, must not (re-queueing would sample again for nothing)."""
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_output_directory=lambda: str(out)))
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]
    patcher, cond = FakePatcher(tiny.velocity, fake_comfy.CONST), tiny_conditioning(pack)

    def run():
        cls().sample(patcher, cond, FakeVAE(tiny.vae), seed=5, steps=2, width=32, height=32, trajectory_previews=0,
                     dataset_folder="pairs")

    assert cls.IS_CHANGED(dataset_folder="") == "none"
    first = cls.IS_CHANGED(dataset_folder="pairs", seed=5)  # the folder does not exist yet
    run()  # creates it and writes the pair
    assert (out / "pairs").is_dir() and cls.IS_CHANGED(dataset_folder="pairs", seed=5) == first
    run()  # nothing new: the same seed is stored
    assert cls.IS_CHANGED(dataset_folder="pairs", seed=5) == first
    (out / "pairs").rename(out / "pairs.old")
    gone = cls.IS_CHANGED(dataset_folder="pairs", seed=5)
    assert gone != first
    run()  # the pair is written again, into the new folder
    assert len(sub(pack, "fluxsr_core.pairs").PairDataset(out / "pairs")) == 1
    assert cls.IS_CHANGED(dataset_folder="pairs", seed=5) == gone
    # a folder deleted and made again may get the old one's inode (ext4 reuses a freed one at
    # once): the same inode emptied stands for it, and the pair it lost is what tells
    for f in (out / "pairs").iterdir():
        f.unlink()
    lost = cls.IS_CHANGED(dataset_folder="pairs", seed=5)
    assert lost not in (first, gone)
    run()
    assert len(sub(pack, "fluxsr_core.pairs").PairDataset(out / "pairs")) == 1
    assert cls.IS_CHANGED(dataset_folder="pairs", seed=5) == lost
    (out / "pairs").rename(out / "pairs.older")
    (out / "pairs").mkdir()  # replaced by another folder
    assert cls.IS_CHANGED(dataset_folder="pairs", seed=5) not in (first, gone, lost)
    assert cls.IS_CHANGED(dataset_folder="../escaped") == "refused"  # VALIDATE_INPUTS reports it


def test_teacher_previews_the_image_each_step_heads_for(pack, tiny):
    # as a KSampler's preview (x0 = x - sigma * v), not the noisy state: the last step's is the image
    flow = sub(pack, "fluxsr_core.flow")
    teacher = sub(pack, "nodes.teacher")
    cond = sub(pack, "nodes.comfy_adapters").conditioning_to_core(tiny_conditioning(pack))
    seen = []
    result = teacher.sample_teacher(tiny.velocity, tiny.codec, cond, 5, 3, 32, 32,
                                    progress=lambda done, total, latent: seen.append(latent.clone()))
    sigmas = flow.flux_sigmas(3, 4)
    x = teacher.seeded_noise(5, 32, 32)
    for i, shown in enumerate(seen):
        v = tiny.velocity(x, torch.full((1,), float(sigmas[i])), cond)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        torch.testing.assert_close(shown, x - float(sigmas[i + 1]) * v)
    assert float(sigmas[1]) > 0 and (seen[0] - x).abs().max() > 1e-3  # not the noisy state
    torch.testing.assert_close(seen[-1], result.z0)


def test_teacher_is_an_output_node_and_refuses_a_combined_conditioning_for_pairs(pack, tiny, fake_comfy, tmp_path,
                                                                                 monkeypatch):
    teacher = sub(pack, "nodes.teacher")
    cls = pack.NODE_CLASS_MAPPINGS["FluxSRTeacherSampler"]
    assert cls.OUTPUT_NODE is True  # a graph of it alone, writing pairs, runs
    monkeypatch.setenv(teacher.DATASET_ROOTS_ENV, str(tmp_path))
    combined = tiny_conditioning(pack) + tiny_conditioning(pack, guidance=2.0)
    patcher = FakePatcher(tiny.velocity, fake_comfy.CONST)
    with pytest.raises(ValueError, match="2 entries .* a pair stores one conditioning"):
        cls().sample(patcher, combined, FakeVAE(tiny.vae), seed=1, steps=2, width=32, height=32,
                     trajectory_previews=0, dataset_folder=str(tmp_path / "pairs"))
    assert not (tmp_path / "pairs").exists() and patcher.model.calls == []  # refused before sampling
    cls().sample(patcher, combined, FakeVAE(tiny.vae), seed=1, steps=2, width=32, height=32,
                 trajectory_previews=0, dataset_folder="")  # no pairs: sampled, as a KSampler would


def test_previews_are_drawn_on_the_models_device(pack, fake_comfy, monkeypatch):
    adapters = sub(pack, "nodes.comfy_adapters")
    made, decoded = [], []

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, latent):
            decoded.append(latent.device)
            return ("JPEG", None, 512)

    preview = types.ModuleType("latent_preview")
    preview.get_previewer = lambda device, fmt: made.append(device) or Previewer()
    monkeypatch.setitem(sys.modules, "latent_preview", preview)
    progress = adapters.ComfyProgress(1, FakeLatentFormat(), torch.device("meta"))
    progress.for_item(0)(1, 2, torch.zeros(1, 16, 4, 4))  # a CPU latent, as ComfyUI's VAE hands them
    assert made == [torch.device("meta")] and decoded == [torch.device("meta")]


def test_teacher_preview_steps_and_errors(pack, tiny):
    teacher = sub(pack, "nodes.teacher")
    assert teacher.preview_steps(28, 4) == [7, 14, 21, 28]
    assert teacher.preview_steps(3, 10) == [1, 2, 3]
    assert teacher.preview_steps(5, 0) == []
    with pytest.raises(ValueError, match="multiples of 16"):
        teacher.sample_teacher(tiny.velocity, tiny.codec, None, 0, 2, 40, 32)

"""Write the FluxSR example workflows (UI and API format) from one description each.

    python tests/comfyui_support/build_workflows.py        # rewrites workflows/ and workflows/api/

The UI files lie in workflows/, one of the folders ComfyUI's template browser lists (Workflow >
Browse Templates, under the pack's name; it also lists example_workflows/ and three other names, so
a copy there would show each twice); the API-format ones, for scripts posting to /prompt, in
workflows/api/, which it does not list (its page would load one as an empty graph).

Each workflow is described once (nodes, widget values, links, layout); both formats are derived
from it, so they cannot drift apart. tests/test_workflows.py checks the written files against
the nodes' real definitions, and tests/test_comfyui_real.py runs them in ComfyUI.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]

FLUX_FILE = "flux1-dev.safetensors"
LORA_FILE = "fluxsr_lora.safetensors"
VAE_FILE = "ae.safetensors"
BUNDLE_FILE = "fluxsr_bundle.safetensors"
CLIP_L_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"

WHERE_UPSCALE = f"""FluxSR one-step upscale: where each file goes

ComfyUI/models/diffusion_models/{FLUX_FILE}
    FLUX.1-dev transformer (black-forest-labs/FLUX.1-dev; fp8 files work too: pick the weight_dtype)
ComfyUI/models/loras/{LORA_FILE}
    the FluxSR LoRA (diffusers naming; a release named pytorch_lora_weights.safetensors works too)
ComfyUI/models/vae/{VAE_FILE}
    the FLUX VAE (ae.safetensors from FLUX.1-dev)
ComfyUI/models/fluxsr/{BUNDLE_FILE}
    the FluxSR conditioning bundle that came with the LoRA, or a folder
    ComfyUI/models/fluxsr/<name>/ holding t5_embedding.pth + clip_embedding.pth
    (then pick <name> in FluxSR Conditioning)

No text encoder is needed: the bundle holds the fixed embeddings.
T_L 0 = the bundle's value, else the LoRA's (FluxSR Load LoRA reads it
from the file; ComfyUI's own LoRA loaders drop it).
FLUX.1-dev and weights derived from it are under the
FLUX.1 [dev] Non-Commercial License."""

WHERE_TILED = WHERE_UPSCALE + """

FluxSR Tiling Options: smaller tiles use less memory; the overlap hides seams.
Without that node the upscaler uses the same defaults (1024 px tiles, 256 px overlap)."""

WHERE_TEACHER = f"""FluxSR teacher pairs: where each file goes

ComfyUI/models/diffusion_models/{FLUX_FILE}
    FLUX.1-dev transformer, WITHOUT the FluxSR LoRA (it is the teacher)
ComfyUI/models/text_encoders/{CLIP_L_FILE}
ComfyUI/models/text_encoders/{T5_FILE}
    FLUX's text encoders (CLIP-L and T5-XXL; t5xxl_fp8_e4m3fn.safetensors works too)
ComfyUI/models/vae/{VAE_FILE}
    the FLUX VAE

Every run adds one (noise, image latent) pair to ComfyUI/output/fluxsr_pairs/
as one new shard (folders elsewhere: list them in FLUXSR_DATASET_ROOTS before
starting ComfyUI); the seed increments after each run.
Queue as many runs as you want pairs, then give that folder to fluxsr-train
as its pair dataset (see the README)."""

PROMPT = ("a high-resolution photograph of a city street with people, shop signs, brick walls "
          "and trees, natural light, sharp fine detail")


# Titles of nodes the workflows do not rename: the frontend's defaults (display names), written
# out in both formats so the API file's _meta titles are what the page itself would send.
DEFAULT_TITLES = {
    "LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)", "FluxGuidance": "FluxGuidance",
    "FluxSRUpscale": "FluxSR Upscale", "FluxSRTilingOptions": "FluxSR Tiling Options",
    "FluxSRTeacherSampler": "FluxSR Teacher Sampler", "FluxSRConditioning": "FluxSR Conditioning",
    "FluxSRLoraLoader": "FluxSR Load LoRA",
}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)     # name -> value, in widget order
    inputs: list[tuple[str, str]] = field(default_factory=list)   # link inputs (name, type)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    title: Optional[str] = None
    ui_extra_after: dict[str, Any] = field(default_factory=dict)  # frontend-only values after a widget
    color: Optional[tuple[str, str]] = None


@dataclass
class Workflow:
    name: str
    nodes: list[Node]
    links: list[tuple[int, int, int, str, str]]   # (from_node, from_slot, to_node, to_input_name, type)


def _note(id_: int, pos, size, text: str) -> Node:
    return Node(id_, "Note", pos, size, widgets={"text": text}, title="Where each file goes",
                color=("#432", "#653"))


def upscale_nodes(tiled: bool) -> Workflow:
    nodes = [
        Node(1, "UNETLoader", (40, 40), (330, 82),
             {"unet_name": FLUX_FILE, "weight_dtype": "default"}, outputs=[("MODEL", "MODEL")],
             title="FLUX.1-dev (models/diffusion_models)"),
        Node(2, "FluxSRLoraLoader", (410, 40), (330, 82),
             {"lora_name": LORA_FILE, "strength_model": 1.0}, inputs=[("model", "MODEL")],
             outputs=[("model", "MODEL")], title="FluxSR LoRA (models/loras)"),
        Node(3, "VAELoader", (40, 170), (330, 58), {"vae_name": VAE_FILE}, outputs=[("VAE", "VAE")],
             title="FLUX VAE (models/vae)"),
        Node(4, "FluxSRConditioning", (40, 270), (330, 82),
             {"bundle": BUNDLE_FILE, "guidance": 0.0}, outputs=[("conditioning", "CONDITIONING")],
             title="FluxSR Conditioning (models/fluxsr)"),
        Node(5, "LoadImage", (40, 400), (330, 330), {"image": "example.png"},
             outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], ui_extra_after={"image": "image"}),
        Node(6, "FluxSRUpscale", (980, 40), (330, 190),
             {"scale": 4.0, "t_l": 0.0, "color_fix": "wavelet"},
             inputs=[("image", "IMAGE"), ("model", "MODEL"), ("vae", "VAE"),
                     ("conditioning", "CONDITIONING")] + ([("tiling", "FLUXSR_TILING")] if tiled else []),
             outputs=[("image", "IMAGE")]),
        Node(7, "SaveImage", (1350, 40), (400, 440), {"filename_prefix": "FluxSR"},
             inputs=[("images", "IMAGE")]),
    ]
    links = [(1, 0, 2, "model", "MODEL"), (5, 0, 6, "image", "IMAGE"), (2, 0, 6, "model", "MODEL"),
             (3, 0, 6, "vae", "VAE"), (4, 0, 6, "conditioning", "CONDITIONING"),
             (6, 0, 7, "images", "IMAGE")]
    if tiled:
        nodes.append(Node(8, "FluxSRTilingOptions", (980, 290), (330, 250),
                          {"tile_size": 1024, "tile_overlap": 256, "vae_tile_size": 1024,
                           "vae_tile_overlap": 128, "blend": "gaussian", "global_position_ids": False,
                           "tile_batch_size": 1, "fit_tiles": False},
                          outputs=[("tiling", "FLUXSR_TILING")]))
        links.append((8, 0, 6, "tiling", "FLUXSR_TILING"))
        nodes.append(_note(9, (410, 440), (530, 400), WHERE_TILED))
        # tiled example: a larger input benefits from 2x
        nodes[5].widgets["scale"] = 2.0
        return Workflow("fluxsr_upscale_tiled", nodes, links)
    nodes.append(_note(8, (410, 440), (530, 310), WHERE_UPSCALE))
    return Workflow("fluxsr_upscale", nodes, links)


def teacher_nodes() -> Workflow:
    nodes = [
        Node(1, "UNETLoader", (40, 40), (380, 82),
             {"unet_name": FLUX_FILE, "weight_dtype": "default"}, outputs=[("MODEL", "MODEL")],
             title="FLUX.1-dev, no LoRA (models/diffusion_models)"),
        Node(2, "DualCLIPLoader", (40, 170), (380, 130),
             {"clip_name1": CLIP_L_FILE, "clip_name2": T5_FILE, "type": "flux", "device": "default"},
             outputs=[("CLIP", "CLIP")], title="FLUX text encoders (models/text_encoders)"),
        Node(3, "CLIPTextEncode", (460, 40), (400, 160), {"text": PROMPT}, inputs=[("clip", "CLIP")],
             outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(4, "FluxGuidance", (460, 240), (320, 58), {"guidance": 3.5},
             inputs=[("conditioning", "CONDITIONING")], outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(5, "VAELoader", (40, 340), (380, 58), {"vae_name": VAE_FILE}, outputs=[("VAE", "VAE")],
             title="FLUX VAE (models/vae)"),
        Node(6, "FluxSRTeacherSampler", (980, 40), (340, 330),
             {"seed": 0, "steps": 28, "width": 1024, "height": 1024, "trajectory_previews": 4,
              "dataset_folder": "fluxsr_pairs"},
             inputs=[("model", "MODEL"), ("conditioning", "CONDITIONING"), ("vae", "VAE")],
             outputs=[("image", "IMAGE"), ("latent", "LATENT"), ("trajectory", "IMAGE")],
             ui_extra_after={"seed": "increment"}),
        Node(7, "SaveImage", (1370, 40), (380, 400), {"filename_prefix": "FluxSR_teacher"},
             inputs=[("images", "IMAGE")]),
        Node(8, "PreviewImage", (1370, 480), (380, 300), {}, inputs=[("images", "IMAGE")],
             title="Trajectory"),
        _note(9, (460, 340), (480, 330), WHERE_TEACHER),
    ]
    links = [(2, 0, 3, "clip", "CLIP"), (3, 0, 4, "conditioning", "CONDITIONING"),
             (1, 0, 6, "model", "MODEL"), (4, 0, 6, "conditioning", "CONDITIONING"),
             (5, 0, 6, "vae", "VAE"), (6, 0, 7, "images", "IMAGE"), (6, 2, 8, "images", "IMAGE")]
    return Workflow("fluxsr_teacher_pairs", nodes, links)


def _order(wf: Workflow) -> dict[int, int]:
    deps = {n.id: {f for f, _, t, _, _ in wf.links if t == n.id} for n in wf.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def to_ui(wf: Workflow) -> dict:
    """LiteGraph (frontend) format, version 0.4."""
    order = _order(wf)
    link_rows = []
    in_links: dict[tuple[int, str], int] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    for i, (src, slot, dst, name, typ) in enumerate(wf.links, start=1):
        dst_node = next(n for n in wf.nodes if n.id == dst)
        to_slot = [x[0] for x in dst_node.inputs].index(name)
        link_rows.append([i, src, slot, dst, to_slot, typ])
        in_links[(dst, name)] = i
        out_links.setdefault((src, slot), []).append(i)
    nodes = []
    for n in wf.nodes:
        values = []
        for k, v in n.widgets.items():
            values.append(v)
            if k in n.ui_extra_after:
                values.append(n.ui_extra_after[k])
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
            "order": order[n.id], "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": in_links.get((n.id, name))} for name, typ in n.inputs],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, s), []), "slot_index": s}
                        for s, (name, typ) in enumerate(n.outputs)],
            "properties": {"Node name for S&R": n.type} if n.type != "Note" else {},
            "widgets_values": values,
        }
        if n.title or n.type in DEFAULT_TITLES:
            node["title"] = n.title or DEFAULT_TITLES[n.type]
        if n.color:
            node["color"], node["bgcolor"] = n.color
        nodes.append(node)
    return {"last_node_id": max(n.id for n in wf.nodes), "last_link_id": len(wf.links), "nodes": nodes,
            "links": link_rows, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [90, 110]}}, "version": 0.4}


def to_api(wf: Workflow) -> dict:
    """API format (POST /prompt): frontend-only nodes (notes) are left out."""
    out = {}
    for n in wf.nodes:
        if n.type in ("Note", "MarkdownNote"):
            continue
        inputs: dict[str, Any] = dict(n.widgets)
        for src, slot, dst, name, _ in wf.links:
            if dst == n.id:
                inputs[name] = [str(src), slot]
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                          "_meta": {"title": n.title or DEFAULT_TITLES.get(n.type, n.type)}}
    return out


def all_workflows() -> list[Workflow]:
    return [upscale_nodes(False), upscale_nodes(True), teacher_nodes()]


def write(folder: Path) -> list[Path]:
    """The UI files into ``folder``, the API ones into ``folder/api``; returns their paths."""
    written = []
    for wf in all_workflows():
        for path, data in ((folder / f"{wf.name}.json", to_ui(wf)), (folder / "api" / f"{wf.name}_api.json", to_api(wf))):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write(REPO / "workflows"):
        print(p.relative_to(REPO))
    sys.exit(0)

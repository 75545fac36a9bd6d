"""Check ComfyUI workflows (UI and API format) against node definitions in ``/object_info`` shape.

The same checks run in CI (definitions: our nodes' INPUT_TYPES plus a hand-written table of the
few core nodes the workflows use) and against a real server (its own ``/object_info``). Every
function returns a list of problems (empty = fine) so a test can show them all at once.

Frontend facts the checks model: widget values are stored by position; a widget with
``control_after_generate`` (seeds) is followed by its control value ("increment", ...); an
``image_upload`` combo (LoadImage) is followed by the upload widget's value; note nodes exist
only in the frontend and never appear in API format.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Combos whose options are the files on a machine: any file name is acceptable in a workflow.
FILE_COMBOS = {"unet_name", "lora_name", "vae_name", "image", "clip_name", "clip_name1", "clip_name2",
               "bundle", "ckpt_name"}


def spec_from_class(cls) -> dict:
    """An ``/object_info`` entry built from a classic node class (what ComfyUI itself does)."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": {k: v for k, v in inputs.items() if k in ("required", "optional")},
        "input_order": {k: list(v) for k, v in inputs.items() if k in ("required", "optional")},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
    }


def _kind(value: Any) -> tuple[str, list, dict]:
    """(type, combo options, options dict) of an input definition."""
    kind = value[0]
    opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return "COMBO", list(kind), opts
    if kind == "COMBO":
        return "COMBO", list(opts.get("options", [])), opts
    return kind, [], opts


def inputs_of(spec: dict) -> list[tuple[str, str, list, dict, bool]]:
    """``(name, type, combo options, options, required)`` in ComfyUI's input order."""
    out = []
    order = spec.get("input_order") or {}
    for section in ("required", "optional"):
        defs = spec.get("input", {}).get(section, {})
        for name in order.get(section, list(defs)):
            kind, options, opts = _kind(defs[name])
            out.append((name, kind, options, opts, section == "required"))
    return out


def widgets_of(spec: dict) -> list[tuple[str, str, list, dict]]:
    return [(n, k, o, d) for n, k, o, d, _ in inputs_of(spec) if k in WIDGET_TYPES and not d.get("forceInput")]


def sockets_of(spec: dict) -> dict[str, tuple[str, bool]]:
    return {n: (k, r) for n, k, _, d, r in inputs_of(spec) if k not in WIDGET_TYPES or d.get("forceInput")}


def check_value(where: str, name: str, kind: str, options: list, opts: dict, value: Any) -> list[str]:
    """Does ``value`` fit the widget's type and range?"""
    p = []
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: {name}={value!r} is not an integer"]
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return [f"{where}: {name}={value!r} is not a number"]
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return [f"{where}: {name}={value!r} is not a boolean"]
    elif kind == "STRING":
        if not isinstance(value, str):
            return [f"{where}: {name}={value!r} is not a string"]
    elif kind == "COMBO":
        if name not in FILE_COMBOS and options and value not in options:
            return [f"{where}: {name}={value!r} is not one of {options}"]
        if not isinstance(value, str):
            return [f"{where}: {name}={value!r} is not a string"]
    if kind in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            p.append(f"{where}: {name}={value} is below its minimum {opts['min']}")
        if "max" in opts and value > opts["max"]:
            p.append(f"{where}: {name}={value} is above its maximum {opts['max']}")
    return p


def _ui_widget_values(node: dict, spec: dict) -> tuple[dict, list[str]]:
    """Map a UI node's positional widgets_values onto widget names (with the frontend's extras)."""
    where = f"UI node {node['id']} ({node['type']})"
    values = list(node.get("widgets_values") or [])
    named, problems, i = {}, [], 0
    for name, kind, options, opts in widgets_of(spec):
        if i >= len(values):
            problems.append(f"{where}: no value for widget {name}")
            return named, problems
        named[name] = values[i]
        i += 1
        if opts.get("control_after_generate"):
            if i >= len(values) or values[i] not in CONTROL_VALUES:
                problems.append(f"{where}: widget {name} must be followed by its control value "
                                f"({', '.join(sorted(CONTROL_VALUES))})")
            i += 1
        if opts.get("image_upload"):
            i += 1  # the upload button's own value
    if i != len(values):
        problems.append(f"{where}: {len(values)} widget values, the node has {i}")
    return named, problems


def check_ui(workflow: dict, specs: dict[str, dict]) -> list[str]:
    p: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        p.append("UI: duplicate node ids")
    links = {row[0]: row for row in workflow.get("links", [])}
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        p.append("UI: last_node_id is smaller than a node id")
    if links and workflow.get("last_link_id", 0) < max(links):
        p.append("UI: last_link_id is smaller than a link id")
    for nid, node in nodes.items():
        t = node.get("type")
        where = f"UI node {nid} ({t})"
        if t in FRONTEND_ONLY:
            continue
        spec = specs.get(t)
        if spec is None:
            p.append(f"{where}: unknown node type")
            continue
        named, problems = _ui_widget_values(node, spec)
        p += problems
        for name, kind, options, opts in widgets_of(spec):
            if name in named:
                p += check_value(where, name, kind, options, opts, named[name])
        sockets = sockets_of(spec)
        linked = set()
        for slot in node.get("inputs", []):
            name = slot.get("name")
            if slot.get("widget"):
                continue
            if name not in sockets:
                p.append(f"{where}: input {name} does not exist")
                continue
            if slot.get("type") != sockets[name][0]:
                p.append(f"{where}: input {name} is {slot.get('type')}, the node takes {sockets[name][0]}")
            if slot.get("link") is not None:
                linked.add(name)
                if slot["link"] not in links or links[slot["link"]][3] != nid:
                    p.append(f"{where}: input {name} names link {slot['link']}, which does not end here")
        for name, (kind, required) in sockets.items():
            if required and name not in linked:
                p.append(f"{where}: required input {name} ({kind}) is not connected")
        out_types = spec.get("output", [])
        for s, out in enumerate(node.get("outputs", [])):
            if s >= len(out_types) or out.get("type") != out_types[s]:
                p.append(f"{where}: output {s} is {out.get('type')}, the node gives "
                         f"{out_types[s] if s < len(out_types) else 'nothing'}")
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1] != nid or links[lid][2] != s:
                    p.append(f"{where}: output {s} names link {lid}, which does not start here")
    for lid, (_, src, src_slot, dst, dst_slot, typ) in links.items():
        where = f"UI link {lid}"
        if src not in nodes or dst not in nodes:
            p.append(f"{where}: joins missing nodes {src} -> {dst}")
            continue
        s_spec, d_spec = specs.get(nodes[src]["type"]), specs.get(nodes[dst]["type"])
        if s_spec is None or d_spec is None:
            continue
        outs = s_spec.get("output", [])
        if src_slot >= len(outs) or outs[src_slot] != typ:
            p.append(f"{where}: {nodes[src]['type']} output {src_slot} is not {typ}")
        d_inputs = nodes[dst].get("inputs", [])
        if dst_slot >= len(d_inputs):
            p.append(f"{where}: {nodes[dst]['type']} has no input slot {dst_slot}")
            continue
        name = d_inputs[dst_slot]["name"]
        want = sockets_of(d_spec).get(name, (None,))[0]
        if want != typ:
            p.append(f"{where}: {typ} into {nodes[dst]['type']}.{name}, which takes {want}")
        if d_inputs[dst_slot].get("link") != lid:
            p.append(f"{where}: {nodes[dst]['type']}.{name} does not name this link")
    return p


def check_api(prompt: dict, specs: dict[str, dict]) -> list[str]:
    p: list[str] = []
    for nid, node in prompt.items():
        t = node.get("class_type")
        where = f"API node {nid} ({t})"
        spec = specs.get(t)
        if spec is None:
            p.append(f"{where}: unknown node type" + (" (notes are frontend-only)" if t in FRONTEND_ONLY else ""))
            continue
        inputs = node.get("inputs", {})
        known = {n for n, *_ in inputs_of(spec)}
        for name in inputs:
            if name not in known:
                p.append(f"{where}: input {name} does not exist")
        for name, kind, options, opts, required in inputs_of(spec):
            if name not in inputs:
                if required:
                    p.append(f"{where}: required input {name} is missing")
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2 or str(value[0]) not in prompt:
                    p.append(f"{where}: {name} links to a missing node {value}")
                    continue
                src = prompt[str(value[0])]
                outs = specs.get(src.get("class_type"), {}).get("output", [])
                got = outs[value[1]] if isinstance(value[1], int) and value[1] < len(outs) else None
                if got != kind:
                    p.append(f"{where}: {name} takes {kind} but gets {got} from node {value[0]}")
            elif kind in WIDGET_TYPES:
                p += check_value(where, name, kind, options, opts, value)
            else:
                p.append(f"{where}: {name} ({kind}) must be a link, not {value!r}")
    return p


def ui_as_api(workflow: dict, specs: dict[str, dict]) -> dict:
    """The API prompt a UI workflow stands for (what the frontend would send), notes left out."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {row[0]: row for row in workflow.get("links", [])}
    out = {}
    for nid, node in nodes.items():
        if node["type"] in FRONTEND_ONLY:
            continue
        named, _ = _ui_widget_values(node, specs[node["type"]])
        inputs = dict(named)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] in links:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        out[str(nid)] = {"class_type": node["type"], "inputs": inputs}
    return out


def compare_ui_api(workflow: dict, prompt: dict, specs: dict[str, dict]) -> list[str]:
    """The UI workflow and the API prompt describe the same graph with the same values."""
    p = []
    derived = ui_as_api(workflow, specs)
    if set(derived) != set(prompt):
        p.append(f"node ids differ: UI {sorted(derived)} vs API {sorted(prompt)}")
    for nid in sorted(set(derived) & set(prompt), key=int):
        a, b = derived[nid], prompt[nid]
        if a["class_type"] != b["class_type"]:
            p.append(f"node {nid}: {a['class_type']} in UI, {b['class_type']} in API")
            continue
        if a["inputs"] != b["inputs"]:
            p.append(f"node {nid} ({a['class_type']}): inputs differ: UI {a['inputs']} vs API {b['inputs']}")
    titles_ui = {str(n["id"]): n.get("title") for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
    for nid, node in prompt.items():
        title = (node.get("_meta") or {}).get("title")
        if titles_ui.get(nid) and title != titles_ui[nid]:
            p.append(f"node {nid}: title {titles_ui[nid]!r} in UI, {title!r} in API")
    return p


def notes_text(workflow: dict) -> str:
    return "\n".join(str(v) for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY
                     for v in (n.get("widgets_values") or []))


def model_files(prompt: dict) -> Iterable[tuple[str, str, str]]:
    """``(node type, widget, file name)`` for every model file a prompt loads."""
    for node in prompt.values():
        for name, value in node.get("inputs", {}).items():
            if name in FILE_COMBOS - {"image"} and isinstance(value, str):
                yield node["class_type"], name, value

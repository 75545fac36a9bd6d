"""Where the pack's files live in ComfyUI's model folders.

``models/fluxsr`` holds conditioning bundles and is registered here with ComfyUI's
folder_paths. A bundle is either our ``.safetensors`` file, or a folder holding the third-party
``t5_embedding.pth`` + ``clip_embedding.pth`` pair. ComfyUI's file lists only see files, so
bundle folders are found here by a shallow scan of the registered folders. LoRAs stay in
ComfyUI's own ``models/loras``.
"""

from __future__ import annotations

import os
from typing import Optional

FOLDER_NAME = "fluxsr"
# Only bundles are listed: loose .pth files (the embedding halves of a third-party bundle) and
# LoRAs belong elsewhere (a LoRA goes to models/loras).
BUNDLE_EXTENSIONS = {".safetensors"}
FOLDER_BUNDLE_FILES = ("t5_embedding.pth", "clip_embedding.pth")
_MAX_DEPTH = 3


def register_folder() -> bool:
    """Register ``models/fluxsr`` (with an extension filter) with ComfyUI; False without ComfyUI.

    Paths a user already added under ``fluxsr`` in extra_model_paths.yaml are kept (ComfyUI
    reads that file before loading custom nodes); only the extension filter is set.
    """
    try:
        import folder_paths  # noqa: PLC0415 - ComfyUI's module
    except ImportError:
        return False
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    existing = folder_paths.folder_names_and_paths.get(FOLDER_NAME)
    paths = list(existing[0]) if existing else []
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(BUNDLE_EXTENSIONS))
    return True


def search_dirs() -> list[str]:
    """The folders registered as ``fluxsr`` (empty without ComfyUI)."""
    try:
        import folder_paths  # noqa: PLC0415
    except ImportError:
        return []
    if FOLDER_NAME not in folder_paths.folder_names_and_paths:
        register_folder()
    return list(folder_paths.get_folder_paths(FOLDER_NAME))


def _is_folder_bundle(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in FOLDER_BUNDLE_FILES)


def list_bundles() -> list[str]:
    """Names of the bundles found in the ``fluxsr`` folders, relative to their folder, sorted.

    Folder bundles are listed by their folder name (``/``-separated, no trailing slash).
    """
    names: set[str] = set()
    for root in search_dirs():
        if not os.path.isdir(root):
            continue
        base_depth = root.rstrip(os.sep).count(os.sep)
        for current, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if current.rstrip(os.sep).count(os.sep) - base_depth >= _MAX_DEPTH:
                dirs[:] = []
            rel_dir = os.path.relpath(current, root)
            if rel_dir != "." and _is_folder_bundle(current):
                names.add(rel_dir.replace(os.sep, "/"))
                dirs[:] = []  # a bundle folder's own contents are not bundles
                continue
            for name in files:
                if os.path.splitext(name)[1].lower() in BUNDLE_EXTENSIONS:
                    rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                    names.add(rel.replace(os.sep, "/"))
    return sorted(names)


def resolve_bundle(name: str) -> str:
    """The full path of bundle ``name`` (a file or a folder); FileNotFoundError naming the folders."""
    if not name:
        raise FileNotFoundError("no conditioning bundle selected; put a FluxSR bundle in models/fluxsr "
                                "and refresh the page")
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if any(p == ".." for p in parts) or os.path.isabs(name):
        raise FileNotFoundError(f"bundle name {name!r} must be relative to models/fluxsr")
    roots = search_dirs()
    for root in roots:
        path = os.path.join(root, *parts)
        if os.path.isfile(path) or (os.path.isdir(path) and _is_folder_bundle(path)):
            return path
    where = ", ".join(roots) if roots else "models/fluxsr"
    raise FileNotFoundError(f"conditioning bundle {name!r} not found in {where}; a bundle is a FluxSR "
                            ".safetensors file or a folder holding t5_embedding.pth and clip_embedding.pth")


def bundle_signature(name: str) -> Optional[str]:
    """A string that changes when the bundle's files change (ComfyUI's IS_CHANGED)."""
    try:
        path = resolve_bundle(name)
    except FileNotFoundError:
        return None
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    parts = []
    for f in files:
        try:
            parts.append(f"{os.path.basename(f)}:{file_signature(f)}")
        except OSError:
            continue
    return "|".join(parts)


# --- models/loras (ComfyUI's folder) -------------------------------------------------------------

LORA_FOLDER_NAME = "loras"


def list_loras() -> list[str]:
    """The LoRA files ComfyUI lists under ``models/loras`` (empty without ComfyUI)."""
    try:
        import folder_paths  # noqa: PLC0415
    except ImportError:
        return []
    return list(folder_paths.get_filename_list(LORA_FOLDER_NAME))


def resolve_lora(name: str) -> str:
    """The full path of LoRA ``name`` from ComfyUI's list; FileNotFoundError naming the folders."""
    if not name:
        raise FileNotFoundError("no LoRA selected; put the FluxSR LoRA in models/loras and refresh the page")
    try:
        import folder_paths  # noqa: PLC0415
    except ImportError:
        raise FileNotFoundError(f"LoRA {name!r}: ComfyUI's folder_paths is not available") from None
    path = folder_paths.get_full_path(LORA_FOLDER_NAME, name)
    if path is None or not os.path.isfile(path):
        where = ", ".join(folder_paths.get_folder_paths(LORA_FOLDER_NAME)) or "models/loras"
        raise FileNotFoundError(f"LoRA {name!r} not found in {where}")
    return path


def validation_answer(resolve, name: str):
    """ComfyUI's VALIDATE_INPUTS answer for a file input: True, or the message saying why
    ``resolve(name)`` cannot find it (shown at queue time, before anything runs). A linked input
    arrives as None: it is checked when the node runs."""
    if name is None:
        return True
    try:
        resolve(name)
    except FileNotFoundError as exc:
        return str(exc)
    return True


def file_signature(path: str) -> str:
    """Size and modification time: changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def lora_signature(name: str) -> Optional[str]:
    """A string that changes when the LoRA file changes (ComfyUI's IS_CHANGED); None if missing."""
    try:
        return file_signature(resolve_lora(name))
    except OSError:  # FileNotFoundError included
        return None

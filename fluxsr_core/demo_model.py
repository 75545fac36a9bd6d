"""Where the shipped demo model lives, and whether it is there.

FluxSR's real student (FLUX.1-dev + LoRA, 12B parameters) cannot ship with the package. So that
``fluxsr upscale photo.png -o out.png`` works offline right after installation, the package
carries a tiny *demo* model in ``fluxsr_core/demo/`` (package data, a few MB), made by the
committed recipe ``python -m fluxsr_training.demo``: a small FLUX-architecture transformer and a
16-channel VAE trained from scratch on photos that ship with scikit-image, plus a FluxSR LoRA
distilled from that small teacher and its conditioning bundle, all in the real file formats.
It shows the whole pipeline working; it is not FLUX.1-dev quality. ``report.json`` holds the
numbers measured on held-out photos when it was made (see ``docs/demo_results.md``).

Nothing here imports torch; :func:`demo_paths` only locates files.
"""

from __future__ import annotations

import atexit
import contextlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

DEMO_PACKAGE = "fluxsr_core"
DEMO_FOLDER = "demo"
TRANSFORMER_FILE = "transformer.safetensors"
VAE_FILE = "vae.safetensors"
LORA_FILE = "lora.safetensors"
CONDITIONING_FILE = "conditioning.safetensors"
REPORT_FILE = "report.json"
DEMO_FILES = (TRANSFORMER_FILE, VAE_FILE, LORA_FILE, CONDITIONING_FILE, REPORT_FILE)

# Keeps files extracted from a zipped install alive until the interpreter exits.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


@dataclass(frozen=True)
class DemoPaths:
    """The shipped demo model's files: base transformer and VAE (diffusers-keyed safetensors),
    the FluxSR LoRA, the conditioning bundle, and the report of measured numbers."""

    transformer: Path
    vae: Path
    lora: Path
    conditioning: Path
    report: Path

    @property
    def folder(self) -> Path:
        return self.transformer.parent

    def cli_args(self) -> list[str]:
        """The ``fluxsr upscale`` model-file flags that select the demo model."""
        return ["--transformer", str(self.transformer), "--vae", str(self.vae), "--lora", str(self.lora),
                "--conditioning", str(self.conditioning)]

    def read_report(self) -> dict[str, Any]:
        """The measured numbers (``report.json``) as a dict."""
        return json.loads(self.report.read_text(encoding="utf-8"))


def demo_folder() -> Optional[Path]:
    """The folder of the shipped demo files on disk (extracted if the package is zipped), or None."""
    try:
        root = resources.files(DEMO_PACKAGE).joinpath(DEMO_FOLDER)
    except (ModuleNotFoundError, TypeError):
        return None
    if not root.is_dir():
        return None
    try:
        return Path(_extracted.enter_context(resources.as_file(root)))
    except (FileNotFoundError, NotImplementedError, OSError):
        return None


def demo_paths(folder: Optional[Path] = None) -> Optional[DemoPaths]:
    """The demo model's files, or None when any of them is missing (e.g. a build without them).

    ``folder`` checks another folder written by the recipe instead of the shipped one.
    """
    base = Path(folder) if folder is not None else demo_folder()
    if base is None:
        return None
    paths = {name: base / name for name in DEMO_FILES}
    if not all(p.is_file() and p.stat().st_size > 0 for p in paths.values()):
        return None
    return DemoPaths(transformer=paths[TRANSFORMER_FILE], vae=paths[VAE_FILE], lora=paths[LORA_FILE],
                     conditioning=paths[CONDITIONING_FILE], report=paths[REPORT_FILE])


__all__ = ["DemoPaths", "demo_paths", "demo_folder", "DEMO_FILES"]

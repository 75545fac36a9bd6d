"""The oldest version of each dependency that FluxSR works with, and a check of what is installed.

The same bounds are written in ``pyproject.toml`` and ``requirements.txt`` (a test keeps the three
equal); each is a version the whole test suite passed with (README, "Tested versions"). torch
2.6 is also the oldest that today's diffusers imports with (it calls ``torch.accelerator``), and
torch 2.4 fails with diffusers 0.35 too (its attention passes ``enable_gqa`` to SDPA). The check
exists because an install can be older than they say: a ComfyUI whose other node packs pinned
an old diffusers, or a pack updated by ``git pull`` without ``pip install -r requirements.txt``. What breaks there is deep inside diffusers (a missing
``diffusers.hooks``, a missing attention registry method); the check names the package instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Optional, Sequence

# distribution name -> the oldest version that works
MINIMUM_VERSIONS = {
    "torch": "2.6",
    "torchvision": "0.21",
    "diffusers": "0.35",
    "transformers": "4.44",
    "safetensors": "0.5",
    "peft": "0.17",
    "accelerate": "1.10",
    "lpips": "0.1.4",
    "numpy": "1.26",
    "pillow": "11.0",
    "tqdm": "4.60",
}


# What each entry point imports (the ComfyUI nodes run ComfyUI's torch and models, but read
# LoRAs through diffusers' and peft's converters).
UPSCALE_NEEDS = ("torch", "diffusers", "safetensors", "peft", "accelerate", "numpy", "pillow", "tqdm")
NODES_NEED = ("diffusers", "safetensors", "peft", "numpy", "pillow")


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: ``"2.14.1+cu130"`` -> ``(2, 14, 1)``."""
    numbers = []
    for part in version.split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        numbers.append(int(m.group()))
        if m.end() < len(part):  # "0rc1", "1+cu130": the rest is a pre-release or local tag
            break
    return tuple(numbers)


# Import names where they differ from the distribution's: a drop-in build under another
# distribution name (Pillow-SIMD) is found by its module's own __version__.
_MODULES = {"pillow": "PIL"}


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(_MODULES.get(name, name))
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else None


def outdated_dependencies(names: Optional[Sequence[str]] = None) -> list[str]:
    """One line per dependency in ``names`` (default: all) that is missing or older than
    :data:`MINIMUM_VERSIONS` says, e.g. ``"diffusers 0.32.2 (FluxSR needs >= 0.35)"``."""
    problems = []
    for name in names or MINIMUM_VERSIONS:
        minimum = MINIMUM_VERSIONS[name]
        installed = _installed_version(name)
        if installed is None:
            problems.append(f"{name} is not installed (FluxSR needs >= {minimum})")
            continue
        if _release(installed) < _release(minimum):
            problems.append(f"{name} {installed} (FluxSR needs >= {minimum})")
    return problems


# diffusers from 0.39 declare torch >= 2.6 (0.42.1 cannot even be imported on torch 2.4.1: it
# calls torch.accelerator). The CLIs need torch >= 2.6 anyway; ComfyUI brings its own torch, and
# `pip install -r requirements.txt` there takes the newest diffusers whatever that torch is.
DIFFUSERS_NEEDING_NEW_TORCH = ("0.39", "2.6")


def diffusers_torch_mismatch() -> Optional[str]:
    """A message when the installed diffusers asks for a newer torch than the installed one (a
    ComfyUI on an old torch, its requirements installed with pip), else None."""
    first, needed = DIFFUSERS_NEEDING_NEW_TORCH
    diffusers, torch = _installed_version("diffusers"), _installed_version("torch")
    if diffusers is None or torch is None:
        return None
    if _release(diffusers) < _release(first) or _release(torch) >= _release(needed):
        return None
    return (f"diffusers {diffusers} needs torch >= {needed} but this Python has torch {torch}, so the LoRA "
            f"converters FluxSR borrows from it fail to import. Install a diffusers for this torch: "
            f'pip install "diffusers>={MINIMUM_VERSIONS["diffusers"]},<{first}" (or update torch as your '
            f"ComfyUI's own instructions say: a plain pip install can replace a CUDA build with another)")


def upgrade_advice(problems: Sequence[str]) -> str:
    """The message for :func:`outdated_dependencies`' lines, with the pip command that fixes them."""
    names = [p.split()[0] for p in problems]
    pins = " ".join(f'"{n}>={MINIMUM_VERSIONS[n]}"' for n in names)  # double quotes: Windows' cmd too
    advice = (f"these packages are older than FluxSR needs: {'; '.join(problems)}. "
              f"Upgrade them with: pip install -U {pins}")
    if {"torch", "torchvision"} & set(names):
        advice += (" (torch and torchvision: take the command for your GPU from pytorch.org; a plain pip "
                   "install may bring another CUDA build, or none)")
    return advice


def refuse_outdated(program: str, names: Optional[Sequence[str]] = None) -> bool:
    """For a command-line entry point: print ``"<program>: error: <advice>"`` to stderr and
    return True when :func:`outdated_dependencies` finds any of ``names``; False otherwise."""
    problems = outdated_dependencies(names)
    if problems:
        print(f"{program}: error: {upgrade_advice(problems)}", file=sys.stderr)
    return bool(problems)

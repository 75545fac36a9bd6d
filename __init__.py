"""FluxSR node pack: ComfyUI's entry point.

Install: clone this repository into ``ComfyUI/custom_nodes/`` and ``pip install -r
requirements.txt`` (torch is ComfyUI's own). Nothing else is installed or downloaded at run
time; model files go where the workflows' note nodes say (``models/diffusion_models``,
``models/loras``, ``models/vae``, ``models/fluxsr``).

How the core is found: ComfyUI imports this folder as a package, so the nodes import the
bundled ``fluxsr_core`` *relatively* (``from ..fluxsr_core import upscaler``); the core imports
its own modules relatively too. The pack therefore always runs its own copy of the core, under
this package's name, and never the top-level ``fluxsr_core`` that ``pip install`` of the
project (for the CLI) may also provide. That is deliberate: the copy that matches these nodes
is the one next to them, and the core keeps no module-level state that the two copies would
need to share (all state lives in files and in the objects the nodes create), so a
pip-installed CLI and the pack can live side by side in ComfyUI's Python.
"""

import logging as _logging

from .fluxsr_core.dependencies import NODES_NEED as _NODES_NEED
from .fluxsr_core.dependencies import diffusers_torch_mismatch as _diffusers_torch_mismatch
from .fluxsr_core.dependencies import outdated_dependencies as _outdated
from .fluxsr_core.dependencies import upgrade_advice as _upgrade_advice
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.paths import register_folder as _register_folder

# models/fluxsr, with an extension filter; a no-op when imported outside ComfyUI (tests).
_register_folder()

# Said once, at start-up, in ComfyUI's log; the nodes still register, so saved workflows load.
_problems = _outdated(_NODES_NEED)
if _problems:
    _logging.getLogger("fluxsr").warning("[FluxSR] %s (in ComfyUI's Python)", _upgrade_advice(_problems))
_mismatch = _diffusers_torch_mismatch()
if _mismatch:
    _logging.getLogger("fluxsr").warning("[FluxSR] %s", _mismatch)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

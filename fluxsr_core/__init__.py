"""FluxSR core: one-step real-world super-resolution distilled from FLUX.1-dev.

Pure torch/diffusers. Never imports ComfyUI. The ComfyUI node pack (``nodes/``) and the
training package (``fluxsr_training``) both build on the two interfaces in
:mod:`fluxsr_core.interfaces`.
"""

__version__ = "0.7.8"

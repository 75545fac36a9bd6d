"""The two small interfaces every FluxSR algorithm is written against.

* A **velocity model** predicts the rectified-flow velocity ``v = eps - x_0`` of a FLUX
  transformer for a spatial latent in the *normalised* VAE space.
* A **latent codec** maps images ``[B, 3, H, W]`` in ``[0, 1]`` to normalised latents
  ``[B, 16, H/8, W/8]`` and back.

``fluxsr_core.models`` implements both over diffusers modules; the ComfyUI node pack
implements both over ComfyUI's MODEL and VAE. The one-step upscaler, the tiler, the colour
fix and the teacher sampler only ever see these interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch


@dataclass
class Conditioning:
    """Fixed FLUX.1-dev text conditioning.

    ``t5``: T5-XXL token embeddings ``[1, L, 4096]``; ``clip_pooled``: CLIP-L pooled vector
    ``[1, 768]``; ``guidance``: the distilled-guidance scale fed to FLUX.1-dev's guidance
    embedding (ignored by models without one).
    """

    t5: torch.Tensor
    clip_pooled: torch.Tensor
    guidance: float = 3.5
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Return a copy with both tensors moved/cast."""
        return Conditioning(
            t5=self.t5.to(device=device, dtype=dtype),
            clip_pooled=self.clip_pooled.to(device=device, dtype=dtype),
            guidance=self.guidance,
            extra=dict(self.extra),
        )


@runtime_checkable
class VelocityModel(Protocol):
    """``velocity(latent, sigma, cond, position_offset=(0, 0)) -> velocity``.

    ``latent``: ``[B, 16, h, w]`` normalised latent (``h``, ``w`` even: FLUX packs 2x2 patches).
    ``sigma``: float tensor ``[B]`` in ``[0, 1]`` (t = 0 image, t = 1 noise).
    ``cond``: the conditioning the implementation understands (a :class:`Conditioning` for
    the diffusers implementation; opaque to every algorithm in the core).
    ``position_offset``: ``(row, col)`` of the tile's top-left corner in *token* units, used
    only when global position ids are requested; ``(0, 0)`` gives tile-local ids.
    Returns a tensor shaped like ``latent``.
    """

    def __call__(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any,
        position_offset: tuple[int, int] = (0, 0),
    ) -> torch.Tensor: ...


@runtime_checkable
class LatentCodec(Protocol):
    """Image <-> normalised latent. ``downscale`` is the spatial factor (8 for FLUX)."""

    downscale: int
    latent_channels: int

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


# Called once per finished unit of work: (done, total, preview_or_None).
ProgressCallback = Callable[[int, int, Optional[torch.Tensor]], None]
# Returns normally to go on; raises (e.g. :class:`Cancelled` or ComfyUI's interrupt) to stop.
CancelCheck = Callable[[], None]


class Cancelled(RuntimeError):
    """Raised by a cancel check to stop an upscale between tiles."""

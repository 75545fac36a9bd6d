"""Flow math of FluxSR, written to be read side by side with FLUXSR.md sections 1-2 and 6.

Convention (FLUX, diffusers, ComfyUI): ``x_t = (1 - t) * x_0 + t * eps``, t = 0 is the image,
t = 1 is noise, velocity ``v = eps - x_0`` and ``x_0 = x_t - t * v``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .interfaces import VelocityModel

# The paper's figure prints "-" before the eps term of z_t; the straight path between z_L
# (t = T_L) and eps (t = 1) needs "+". Kept here, in one place, so it is easy to flip.
FTD_EPS_SIGN = +1.0


def check_t_l(t_l: float) -> float:
    """Validate the LR time T_L; it must lie strictly inside (0, 1)."""
    t_l = float(t_l)
    if not (0.0 < t_l < 1.0) or math.isnan(t_l):
        raise ValueError(
            f"T_L must lie strictly between 0 and 1 (got {t_l}); FluxSR's usual value is 0.25"
        )
    return t_l


def _sigma_batch(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    return sigma


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample ``[B]`` time against a ``[B, ...]`` tensor."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 1:
        t = t.view(-1, *([1] * (like.ndim - 1)))
    return t


# --- one-step SR (section 1) -------------------------------------------------------------

def one_step_from_velocity(z_l: torch.Tensor, velocity: torch.Tensor, t_l: float) -> torch.Tensor:
    """``z_H = z_L - T_L * v``: one Euler step from sigma T_L to 0."""
    return z_l - t_l * velocity


def one_step_sr(
    model: VelocityModel,
    z_l: torch.Tensor,
    t_l: float,
    cond: Any,
    position_offset: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """One-step super-resolution of the encoded, upsampled LR latent ``z_L``.

    ``z_H = z_L - T_L * v_theta(z_L, T_L)``. No noise is added. This is the exact function the
    upscaler calls per tile and the trainer calls for the SR branch.
    """
    t_l = check_t_l(t_l)
    v = model(z_l, _sigma_batch(t_l, z_l), cond, position_offset=position_offset)
    return one_step_from_velocity(z_l, v.to(z_l.dtype), t_l)


# --- Flow Trajectory Distillation (section 2) ---------------------------------------------

def teacher_velocity(eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """``u = eps - z_0``: the teacher's straight-line velocity, known from the pair."""
    return eps - z0


def sr_velocity(z_l: torch.Tensor, z0: torch.Tensor, t_l: float) -> torch.Tensor:
    """``u_SR = (z_L - z_0) / T_L``: the LR->HR velocity the student predicts."""
    return (z_l - z0) / t_l


def noise_to_lr_velocity(eps: torch.Tensor, z_l: torch.Tensor, t_l: float) -> torch.Tensor:
    """``u_L = (eps - z_L) / (1 - T_L)``: the noise->LR velocity."""
    return (eps - z_l) / (1.0 - t_l)


def ftd_interpolate(z_l: torch.Tensor, eps: torch.Tensor, t, t_l: float) -> torch.Tensor:
    """``z_t = ((1 - t) z_L + (t - T_L) eps) / (1 - T_L)`` for t in [T_L, 1]."""
    t = _bcast(t, z_l)
    return ((1.0 - t) * z_l + FTD_EPS_SIGN * (t - t_l) * eps) / (1.0 - t_l)


def implied_noise_to_lr_velocity(u: torch.Tensor, v_t: torch.Tensor, t_l: float) -> torch.Tensor:
    """``v_phi = (u - T_L * v_t) / (1 - T_L)``: the noise->LR velocity the student implies."""
    return (u - t_l * v_t) / (1.0 - t_l)


def sample_ftd_time(batch: int, t_l: float, generator: Optional[torch.Generator] = None,
                    device=None) -> torch.Tensor:
    """t ~ U[T_L, 1] per sample."""
    r = torch.rand(batch, generator=generator, device=device)
    return t_l + (1.0 - t_l) * r


def ftd_loss(
    model: VelocityModel,
    z_l: torch.Tensor,
    z0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_l: float,
    cond: Any,
) -> torch.Tensor:
    """``L_FTD = mean || v_phi - (eps - z_L) / (1 - T_L) ||^2`` with ``z_t`` at time ``t``."""
    t_l = check_t_l(t_l)
    z_t = ftd_interpolate(z_l, eps, t, t_l)
    v_t = model(z_t, _sigma_batch(t, z_t), cond).to(z_l.dtype)
    v_phi = implied_noise_to_lr_velocity(teacher_velocity(eps, z0), v_t, t_l)
    return torch.mean((v_phi - noise_to_lr_velocity(eps, z_l, t_l)) ** 2)


# --- FLUX.1-dev sigma schedule (section 6) ------------------------------------------------

def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu, linear in the number of image tokens: 0.5 at 256 tokens, 1.15 at 4096."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (image_seq_len - base_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """``s(t) = e^mu / (e^mu + (1/t - 1))``, FLUX's resolution-dependent shift."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flux_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX.1-dev sampling sigmas: ``linspace(1, 1/N, N)``, shifted, then a final 0 (N + 1 values)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1 (got {num_steps})")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = time_shift(flux_mu(image_seq_len), base)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


# (step index, sigma, sigma_next, latent after the step, velocity used)
StepCallback = Callable[[int, float, float, torch.Tensor, torch.Tensor], None]


def euler_sample(
    model: VelocityModel,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    callback: Optional[StepCallback] = None,
    cancel_check: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Euler sampler over the velocity interface: ``x <- x + (sigma_next - sigma) * v``.

    Starts from ``noise`` at ``sigmas[0]`` and returns the latent at ``sigmas[-1]``.
    ``callback`` sees every intermediate state (teacher trajectories are built from it).
    """
    x = noise
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        if cancel_check is not None:
            cancel_check()
        v = model(x, _sigma_batch(sig[i], x), cond).to(x.dtype)
        x = x + (sig[i + 1] - sig[i]) * v
        if callback is not None:
            callback(i, sig[i], sig[i + 1], x, v)
    return x


def seeded_noise(seed: int, height: int, width: int, channels: int = 16, downscale: int = 8) -> torch.Tensor:
    """The teacher's starting noise ``[1, 16, height/8, width/8]`` for ``seed`` (pixel sizes).

    CPU float32 normal draws from a fresh generator seeded with ``seed``: the same stream
    ComfyUI's ``prepare_noise`` draws for a KSampler, independent of the device. The ComfyUI
    teacher node and ``fluxsr-train pairs`` both use it, so a seed means the same pair in both.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (1, channels, height // downscale, width // downscale)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")

"""Real-ESRGAN's second-order degradation, in plain torch, seeded per sample.

This re-implements the LR synthesis of Real-ESRGAN (Wang et al., ICCVW 2021): the kernel
sampling of ``realesrgan/data/realesrgan_dataset.py`` and ``basicsr/data/degradations.py``
and the degradation order of ``realesrgan/models/realesrgan_model.py::feed_data``, with the
parameter table of ``options/train_realesrgan_x4plus.yml`` as :class:`DegradationConfig`'s
defaults. basicsr itself is not used: it imports ``torchvision.transforms.functional_tensor``,
which current torchvision no longer has.

Pipeline for one HR image ``[3, H, W]`` (each step can be switched off in the config):

1. blur with kernel 1 (Gaussian / generalized Gaussian / plateau, iso or aniso, or a 2D sinc);
   random up/down/keep resize (area, bilinear or bicubic); Gaussian or Poisson noise (colour or
   gray); JPEG.
2. with probability ``second_blur_prob`` blur with kernel 2; random resize to
   ``H / scale * s``; noise; then, 50/50, either [resize to ``H / scale`` + final sinc] then JPEG,
   or JPEG then [resize + final sinc].
3. ``clamp(round(out * 255), 0, 255) / 255``.

Where this differs from Real-ESRGAN (nothing else is meant to):

* Every random choice is drawn **per sample** from that sample's seed. Real-ESRGAN draws the
  resize factor/mode, the noise type and the final order once per *batch* (and mixes batches
  through a 180-image queue to regain diversity); per-sample draws make that queue unnecessary
  and make one image's LR independent of its batch mates.
* JPEG is Pillow's libjpeg encoder (exact baseline JPEG, 4:2:0 chroma, the drawn quality rounded
  to an integer) on the image rounded to 8 bits. Real-ESRGAN uses DiffJPEG, a torch emulation
  with the same 4:2:0 layout and IJG tables scaled by a *float* quality and no 8-bit rounding of
  its input or output; the artifacts are the same kind, the exact numbers are not.
* A blur kernel is applied at its own size with reflect padding (Real-ESRGAN zero-pads every
  kernel to 21x21 and pads the image by 10: the same result). When an image side is not larger
  than the padding (tiny images after a strong down-resize), reflect padding is impossible and
  replicate padding is used instead.
* Real-ESRGAN degrades the USM-sharpened GT; that is off here by default (``usm_sharpen``),
  because FluxSR's HR target is the unsharpened teacher image.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "DegradationConfigError",
    "DegradationConfig",
    "KernelDraw",
    "ResizeDraw",
    "NoiseDraw",
    "DegradationParams",
    "shipped_config_path",
    "bivariate_gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "circular_lowpass_kernel",
    "random_mixed_kernel",
    "filter2d",
    "usm_sharp",
    "add_gaussian_noise",
    "add_poisson_noise",
    "jpeg_roundtrip",
    "sample_params",
    "degrade",
    "degrade_to_hr_size",
]

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
_MIN_KERNEL_SIZE = 7  # Real-ESRGAN: kernel sizes are the odd numbers 7..21
# torchvision's rgb_to_grayscale weights (ITU-R 601), which basicsr's gray Poisson noise uses.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


class DegradationConfigError(ValueError):
    """A degradation config value or file is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

_FLAGS = ("blur1", "resize1", "noise1", "jpeg1", "second_stage", "blur2", "resize2", "noise2",
          "jpeg2", "final_sinc", "usm_sharpen")


@dataclass(frozen=True)
class DegradationConfig:
    """All parameters of the degradation; defaults are Real-ESRGAN x4plus's published table.

    Names follow ``train_realesrgan_x4plus.yml``. Ranges are ``(low, high)`` and drawn
    uniformly (``low == high`` fixes a value). ``resize_prob*`` are the probabilities of
    (up, down, keep). Stage switches: ``blur1``, ``resize1``, ``noise1``, ``jpeg1`` (first
    order); ``second_stage`` switches off the whole second order (blur2, resize2, noise2 and
    jpeg2) at once, and ``blur2``, ``resize2``, ``noise2``, ``jpeg2`` each part of it;
    ``final_sinc`` the final sinc filter. The final resize to ``H / scale`` always happens: it is
    what makes the LR. ``resize_modes`` are the interpolation modes drawn for the two random
    resizes, ``final_resize_modes`` for the final one. ``usm_sharpen`` sharpens the input first,
    as Real-ESRGAN does to its GT (off by default; see the module docstring).
    """

    scale: int = 4
    usm_sharpen: bool = False

    # first-order blur kernel (realesrgan_dataset.py)
    blur_kernel_size: int = 21
    kernel_list: tuple = KERNEL_TYPES
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)

    # second-order blur kernel
    blur_kernel_size2: int = 21
    kernel_list2: tuple = KERNEL_TYPES
    kernel_prob2: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)

    final_sinc_prob: float = 0.8

    # first degradation process (train_realesrgan_x4plus.yml)
    resize_prob: tuple = (0.2, 0.7, 0.1)
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30.0, 95.0)

    # second degradation process
    second_blur_prob: float = 0.8
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30.0, 95.0)

    resize_modes: tuple = RESIZE_MODES
    final_resize_modes: tuple = RESIZE_MODES

    # stage switches
    blur1: bool = True
    resize1: bool = True
    noise1: bool = True
    jpeg1: bool = True
    second_stage: bool = True
    blur2: bool = True
    resize2: bool = True
    noise2: bool = True
    jpeg2: bool = True
    final_sinc: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # accept lists (JSON) but store tuples (hashable, frozen)
                object.__setattr__(self, f.name, tuple(value))
        self._validate()

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def err(key, msg):
            raise DegradationConfigError(f"degradation config: {key}={getattr(self, key)!r} {msg}")

        for key in _FLAGS:
            if not isinstance(getattr(self, key), bool):
                err(key, "must be true or false")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            err("scale", "must be a whole number >= 1 (e.g. 4 for x4)")
        for key in ("blur_kernel_size", "blur_kernel_size2"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < _MIN_KERNEL_SIZE or v % 2 == 0:
                err(key, f"must be an odd whole number >= {_MIN_KERNEL_SIZE} (Real-ESRGAN: 21)")
        for lkey, pkey in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            names, probs = getattr(self, lkey), getattr(self, pkey)
            if not isinstance(names, tuple) or not names:
                err(lkey, f"must be a non-empty list of kernel names from {list(KERNEL_TYPES)}")
            bad = [n for n in names if n not in KERNEL_TYPES]
            if bad:
                err(lkey, f"has unknown kernel names {bad}; choose from {list(KERNEL_TYPES)}")
            if not isinstance(probs, tuple) or len(probs) != len(names):
                err(pkey, f"must be a list of {len(names)} weights, one per entry of {lkey}")
            self._check_numbers(pkey, probs)
            if any(p < 0 for p in probs) or sum(probs) <= 0:
                err(pkey, "weights must be >= 0 with a positive sum")
        for key in ("sinc_prob", "sinc_prob2", "final_sinc_prob", "gaussian_noise_prob",
                    "gray_noise_prob", "second_blur_prob", "gaussian_noise_prob2", "gray_noise_prob2"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                err(key, "must be a probability in [0, 1]")
        for key in ("resize_prob", "resize_prob2"):
            v = getattr(self, key)
            if not isinstance(v, tuple) or len(v) != 3:
                err(key, "must be three probabilities (up, down, keep)")
            self._check_numbers(key, v)
            if any(p < 0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
                err(key, "must be three probabilities >= 0 (up, down, keep) that sum to 1")
        positive_ranges = ("blur_sigma", "blur_sigma2", "resize_range", "resize_range2",
                           "betag_range", "betag_range2", "betap_range", "betap_range2")
        for key in positive_ranges + ("noise_range", "noise_range2", "poisson_scale_range",
                                      "poisson_scale_range2", "jpeg_range", "jpeg_range2"):
            v = getattr(self, key)
            if not isinstance(v, tuple) or len(v) != 2:
                err(key, "must be a [low, high] pair")
            self._check_numbers(key, v)
            if v[0] > v[1]:
                err(key, "must have low <= high")
            if key in positive_ranges and v[0] <= 0:
                err(key, "must be > 0")
            if v[0] < 0:
                err(key, "must be >= 0")
        for key in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, key)
            if lo > 1.0 or hi < 1.0:
                err(key, "must contain 1 (low is the strongest down-scale, high the strongest up-scale)")
        for key in ("jpeg_range", "jpeg_range2"):
            lo, hi = getattr(self, key)
            if lo < 1 or hi > 100:
                err(key, "JPEG qualities must lie in [1, 100]")
        for key in ("resize_modes", "final_resize_modes"):
            v = getattr(self, key)
            if not isinstance(v, tuple) or not v or any(m not in RESIZE_MODES for m in v):
                err(key, f"must be a non-empty list drawn from {list(RESIZE_MODES)}")

    def _check_numbers(self, key, values) -> None:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DegradationConfigError(
                    f"degradation config: {key}={getattr(self, key)!r} must hold finite numbers")

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Optional["DegradationConfig"] = None
                  ) -> "DegradationConfig":
        """Defaults (or ``base``) overridden by ``values``.

        Keys starting with ``_`` are comments and ignored (JSON has no comments). Any other key
        that is not a field raises :class:`DegradationConfigError` naming it and the closest
        valid names.
        """
        if not isinstance(values, Mapping):
            raise DegradationConfigError(
                f"degradation config must be a mapping of names to values, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if not (isinstance(k, str) and k.startswith("_")) and k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=2)
                hints.append(f"{k!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
            raise DegradationConfigError(
                "degradation config has unknown keys: " + ", ".join(hints)
                + f". Valid keys: {', '.join(names)}")
        kwargs = {k: v for k, v in values.items() if not k.startswith("_")}
        return dataclasses.replace(base if base is not None else cls(), **kwargs)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], base: Optional["DegradationConfig"] = None
                  ) -> "DegradationConfig":
        """Read overrides from a ``.json`` or ``.toml`` file (flat table of the field names)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"degradation config file not found: {p}")
        suffix = p.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(p.read_text(encoding="utf-8"))
            elif suffix == ".toml":
                try:
                    import tomllib  # Python >= 3.11
                except ImportError:  # pragma: no cover - Python 3.10
                    try:
                        import tomli as tomllib
                    except ImportError:
                        raise DegradationConfigError(
                            f"reading {p} needs Python >= 3.11 or `pip install tomli`; "
                            "or use a .json config") from None
                data = tomllib.loads(p.read_text(encoding="utf-8"))
            else:
                raise DegradationConfigError(
                    f"degradation config {p}: unsupported extension {p.suffix!r}; use .json or .toml")
        except (json.JSONDecodeError, ValueError) as exc:
            if isinstance(exc, DegradationConfigError):
                raise
            raise DegradationConfigError(f"degradation config {p} is not valid {suffix[1:].upper()}: {exc}") from None
        try:
            return cls.from_dict(data, base=base)
        except DegradationConfigError as exc:
            raise DegradationConfigError(f"{p}: {exc}") from None


def shipped_config_path(name: str = "degradation_realesrgan.json") -> Path:
    """Path of a degradation config shipped in ``fluxsr_training/configs``."""
    path = Path(str(resources.files("fluxsr_training.configs").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped degradation config named {name!r} (looked at {path})")
    return path


# --------------------------------------------------------------------------------------------
# kernels (basicsr/data/degradations.py, in torch float64)
# --------------------------------------------------------------------------------------------

def _check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")


def _mesh_grid(kernel_size: int) -> torch.Tensor:
    """``[k, k, 2]`` grid of (x, y) offsets from the centre (basicsr's ``mesh_grid``)."""
    ax = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")  # xx varies along columns, like np.meshgrid
    return torch.stack([xx, yy], dim=-1)


def _quadratic_form(kernel_size: int, sig_x: float, sig_y: float, theta: float, isotropic: bool) -> torch.Tensor:
    """``g^T Sigma^-1 g`` on the grid, Sigma = U diag(sx^2, sy^2) U^T rotated by ``theta``."""
    _check_kernel_size(kernel_size)
    if sig_x <= 0 or (not isotropic and sig_y <= 0):
        raise ValueError(f"kernel sigmas must be > 0, got sig_x={sig_x}, sig_y={sig_y}")
    if isotropic:
        sig_y, theta = sig_x, 0.0
    c, s = math.cos(theta), math.sin(theta)
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    d = torch.diag(torch.tensor([sig_x ** 2, sig_y ** 2], dtype=torch.float64))
    inv = torch.linalg.inv(u @ d @ u.T)
    grid = _mesh_grid(kernel_size)
    return torch.einsum("hwi,ij,hwj->hw", grid, inv, grid)


def bivariate_gaussian_kernel(kernel_size: int, sig_x: float, sig_y: float = 0.0, theta: float = 0.0,
                              isotropic: bool = True) -> torch.Tensor:
    """Bivariate Gaussian ``exp(-q/2)`` on a ``k x k`` grid, normalised to sum 1 (float64).

    Isotropic uses ``sig_x`` only; anisotropic has axes ``sig_x``, ``sig_y`` rotated by ``theta``
    (radians).
    """
    k = torch.exp(-0.5 * _quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic))
    return k / k.sum()


def generalized_gaussian_kernel(kernel_size: int, sig_x: float, sig_y: float = 0.0, theta: float = 0.0,
                                beta: float = 1.0, isotropic: bool = True) -> torch.Tensor:
    """Generalized Gaussian ``exp(-q^beta / 2)`` (beta = 1 is the Gaussian), sum 1."""
    k = torch.exp(-0.5 * torch.pow(_quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic), beta))
    return k / k.sum()


def plateau_kernel(kernel_size: int, sig_x: float, sig_y: float = 0.0, theta: float = 0.0,
                   beta: float = 1.0, isotropic: bool = True) -> torch.Tensor:
    """Plateau-shaped ``1 / (1 + q^beta)``, sum 1."""
    k = torch.reciprocal(torch.pow(_quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic), beta) + 1.0)
    return k / k.sum()


def circular_lowpass_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> torch.Tensor:
    """Circularly symmetric 2D sinc (jinc) low-pass: ``wc * J1(wc r) / (2 pi r)``, sum 1.

    ``cutoff`` is the cut-off angular frequency in radians per pixel (pi = Nyquist). The centre
    takes the limit ``wc^2 / (4 pi)``. ``pad_to`` (odd, 0 = none) zero-pads to that size.
    """
    _check_kernel_size(kernel_size)
    if not 0 < cutoff <= math.pi:
        raise ValueError(f"cutoff must be in (0, pi], got {cutoff}")
    r = torch.linalg.vector_norm(_mesh_grid(kernel_size), dim=-1)
    centre = kernel_size // 2
    r_safe = torch.where(r == 0, torch.ones_like(r), r)  # avoid 0/0; the centre is set below
    k = cutoff * torch.special.bessel_j1(cutoff * r_safe) / (2 * math.pi * r_safe)
    k[centre, centre] = cutoff ** 2 / (4 * math.pi)
    k = k / k.sum()
    if pad_to > kernel_size:
        if pad_to % 2 == 0:
            raise ValueError(f"pad_to must be odd, got {pad_to}")
        p = (pad_to - kernel_size) // 2
        k = F.pad(k, (p, p, p, p))
    return k


@dataclass
class KernelDraw:
    """One drawn blur kernel and the numbers that made it (``kernel``: ``[k, k]`` float64)."""

    kind: str                       # one of KERNEL_TYPES, or "sinc"
    size: int
    kernel: torch.Tensor = field(repr=False)
    sigma_x: Optional[float] = None
    sigma_y: Optional[float] = None
    theta: Optional[float] = None
    beta: Optional[float] = None
    omega_c: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """The describing numbers (no kernel values), JSON-ready."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kernel" and v is not None}


def _draw_beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    # basicsr: half the time U(lo, 1), half U(1, hi), which assumes lo <= 1 <= hi (for the
    # published betap_range [1, 2] this gives beta = 1 half the time). Outside that assumption
    # we draw U(lo, hi), which is what the range plainly says.
    if lo <= 1.0 <= hi:
        return float(rng.uniform(lo, 1.0)) if rng.uniform() < 0.5 else float(rng.uniform(1.0, hi))
    return float(rng.uniform(lo, hi))


def random_mixed_kernel(rng: np.random.Generator, kernel_list: Sequence[str], kernel_prob: Sequence[float],
                        kernel_size: int, sigma_range: Sequence[float], betag_range: Sequence[float],
                        betap_range: Sequence[float], rotation_range: Sequence[float] = (-math.pi, math.pi)
                        ) -> KernelDraw:
    """basicsr's ``random_mixed_kernels`` (no multiplicative kernel noise, as Real-ESRGAN uses it).

    The kernel type is drawn with weights ``kernel_prob``; ``sigma_x`` (and for anisotropic
    types ``sigma_y`` and a rotation) uniformly from ``sigma_range``/``rotation_range``.
    """
    p = np.asarray(kernel_prob, dtype=np.float64)
    kind = kernel_list[int(rng.choice(len(kernel_list), p=p / p.sum()))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; choose from {list(KERNEL_TYPES)}")
    isotropic = kind.endswith("iso") and not kind.endswith("aniso")
    sig_x = float(rng.uniform(sigma_range[0], sigma_range[1]))
    if isotropic:
        sig_y, theta = sig_x, 0.0
    else:
        sig_y = float(rng.uniform(sigma_range[0], sigma_range[1]))
        theta = float(rng.uniform(rotation_range[0], rotation_range[1]))
    beta = None
    if kind in ("iso", "aniso"):
        k = bivariate_gaussian_kernel(kernel_size, sig_x, sig_y, theta, isotropic)
    elif kind.startswith("generalized"):
        beta = _draw_beta(rng, *betag_range)
        k = generalized_gaussian_kernel(kernel_size, sig_x, sig_y, theta, beta, isotropic)
    else:
        beta = _draw_beta(rng, *betap_range)
        k = plateau_kernel(kernel_size, sig_x, sig_y, theta, beta, isotropic)
    return KernelDraw(kind=kind, size=kernel_size, kernel=k, sigma_x=sig_x,
                      sigma_y=None if isotropic else sig_y, theta=None if isotropic else theta, beta=beta)


def _draw_blur_kernel(rng: np.random.Generator, max_size: int, kernel_list, kernel_prob, sinc_prob,
                      sigma_range, betag_range, betap_range) -> KernelDraw:
    """One stage's kernel, as in ``RealESRGANDataset.__getitem__``."""
    size = int(rng.choice(np.arange(_MIN_KERNEL_SIZE, max_size + 1, 2)))
    if rng.uniform() < sinc_prob:
        # Real-ESRGAN: "this sinc filter setting is for kernels ranging from [7, 21]"
        omega_c = float(rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi))
        return KernelDraw(kind="sinc", size=size, kernel=circular_lowpass_kernel(omega_c, size), omega_c=omega_c)
    return random_mixed_kernel(rng, kernel_list, kernel_prob, size, sigma_range, betag_range, betap_range)


# --------------------------------------------------------------------------------------------
# image operations
# --------------------------------------------------------------------------------------------

def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel of ``img [B, C, H, W]`` with one odd ``kernel [k, k]``.

    Reflect padding like basicsr's ``filter2D``; replicate padding when a side is too small
    to reflect (see the module docstring). The kernel is applied as a correlation, as
    ``F.conv2d`` (and basicsr) do.
    """
    if img.dim() != 4:
        raise ValueError(f"filter2d expects [B, C, H, W], got shape {tuple(img.shape)}")
    k = kernel.shape[-1]
    if kernel.dim() != 2 or kernel.shape[0] != k or k % 2 == 0:
        raise ValueError(f"kernel must be square with an odd size, got shape {tuple(kernel.shape)}")
    b, c, h, w = img.shape
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    x = F.pad(img.reshape(b * c, 1, h, w), (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(x, kernel.to(device=img.device, dtype=img.dtype).view(1, 1, k, k))
    return out.view(b, c, h, w)


def _cv2_gaussian_1d(ksize: int, sigma: float) -> torch.Tensor:
    # OpenCV's getGaussianKernel, including its sigma for sigma <= 0 (basicsr's USMSharp uses 0).
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def usm_sharp(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as basicsr's ``USMSharp`` (Real-ESRGAN sharpens its GT with it)."""
    if radius % 2 == 0:
        radius += 1
    g = _cv2_gaussian_1d(radius, 0)
    kernel = torch.outer(g, g)
    blur = filter2d(img, kernel)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = filter2d(mask, kernel)
    sharp = torch.clamp(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def _resize(img: torch.Tensor, mode: str, *, scale_factor: Optional[float] = None,
            size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``F.interpolate`` as Real-ESRGAN calls it (align_corners=False, no antialias).

    A zero-sized result (tiny images, strong down-scale) is bumped to 1 pixel; an unchanged
    size is the identity and skipped.
    """
    h, w = img.shape[-2:]
    if size is None:
        out_h, out_w = int(math.floor(h * scale_factor)), int(math.floor(w * scale_factor))
        if out_h < 1 or out_w < 1:
            size, scale_factor = (max(1, out_h), max(1, out_w)), None
        elif (out_h, out_w) == (h, w) and scale_factor == 1:
            return img
    else:
        size = (max(1, int(size[0])), max(1, int(size[1])))
        if size == (h, w):
            return img
    kwargs = {} if mode == "area" else {"align_corners": False}
    if scale_factor is not None:
        return F.interpolate(img, scale_factor=scale_factor, mode=mode, **kwargs)
    return F.interpolate(img, size=size, mode=mode, **kwargs)


def _unique_levels(x: torch.Tensor) -> torch.Tensor:
    # basicsr: vals = 2 ** ceil(log2(number of distinct 8-bit levels in the sample))
    n = int(torch.unique(x).numel())
    return torch.tensor(2.0 ** math.ceil(math.log2(n)), dtype=x.dtype, device=x.device)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, (sigma/255)^2) noise to ``img [1, 3, H, W]`` and clamp to [0, 1].

    ``gray``: one noise field shared by the three channels. The noise is drawn on the CPU
    from ``generator`` so a seed gives the same noise on every device.
    """
    _, c, h, w = img.shape
    noise = torch.randn((1, 1 if gray else c, h, w), generator=generator, dtype=torch.float32)
    noise = (noise * (sigma / 255.0)).to(device=img.device, dtype=img.dtype).expand(1, c, h, w)
    return torch.clamp(img + noise, 0, 1)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """basicsr's ``add_poisson_noise_pt`` for one image ``[1, 3, H, W]``, then clamp to [0, 1].

    The image (its luminance when ``gray``) is rounded to 8 bits, ``vals = 2**ceil(log2(number of
    distinct levels))``, ``noise = Poisson(img * vals) / vals - img``, and ``scale * noise`` is
    added to the *unrounded* input. Gray noise is computed on torchvision's luminance
    (0.2989 R + 0.587 G + 0.114 B) and shared by the three channels.
    """
    src = img
    if gray:
        wts = torch.tensor(_GRAY_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
        src = (img * wts).sum(dim=1, keepdim=True)
    q = torch.clamp((src * 255.0).round(), 0, 255) / 255.0
    vals = _unique_levels(q)
    rate = (q * vals).to(device="cpu", dtype=torch.float32)
    sample = torch.poisson(rate, generator=generator).to(device=img.device, dtype=img.dtype)
    noise = (sample / vals - q) * scale
    return torch.clamp(img + noise.expand_as(img), 0, 1)


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode ``img [1, 3, H, W]`` (clamped, rounded to 8 bits) as JPEG with Pillow and decode.

    Pillow's libjpeg is exact baseline JPEG with 4:2:0 chroma subsampling, the layout
    Real-ESRGAN's DiffJPEG emulates; the numbers differ from DiffJPEG's (see module docstring).
    """
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    arr = torch.clamp((img[0].detach().float() * 255.0).round(), 0, 255).to(torch.uint8)
    arr = arr.permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=q, subsampling="4:2:0")
    buf.seek(0)
    with Image.open(buf) as im:
        dec = np.asarray(im.convert("RGB"), dtype=np.uint8)
    out = torch.from_numpy(dec.copy()).permute(2, 0, 1).unsqueeze(0)
    return out.to(device=img.device, dtype=img.dtype) / 255.0


# --------------------------------------------------------------------------------------------
# the random plan for one sample
# --------------------------------------------------------------------------------------------

@dataclass
class ResizeDraw:
    """A random resize: ``updown`` in up/down/keep, the factor and the interpolation mode."""

    updown: str
    factor: float
    mode: str


@dataclass
class NoiseDraw:
    """Noise of one stage: Gaussian (``sigma`` in 0..255 units) or Poisson (``poisson_scale``)."""

    kind: str          # "gaussian" | "poisson"
    sigma: float
    poisson_scale: float
    gray: bool
    seed: int          # seeds the CPU torch.Generator that draws the noise field


@dataclass
class DegradationParams:
    """Everything drawn for one sample. Switched-off stages are drawn too (and not applied), so
    switching one stage off never changes what the others draw for the same seed."""

    seed: int
    kernel1: KernelDraw
    resize1: ResizeDraw
    noise1: NoiseDraw
    jpeg1_quality: int
    apply_blur2: bool
    kernel2: KernelDraw
    resize2: ResizeDraw
    noise2: NoiseDraw
    sinc: Optional[KernelDraw]        # None: the final sinc was not drawn (identity)
    resize_first: bool                # final order: [resize + sinc] then JPEG, or JPEG first
    final_mode: str
    jpeg2_quality: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (kernels by their parameters), for logs and dataset metadata."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, KernelDraw):
                v = v.to_dict()
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            d[f.name] = v
        return d


def _draw_resize(rng: np.random.Generator, probs, rng_range, modes) -> ResizeDraw:
    updown = ("up", "down", "keep")[int(rng.choice(3, p=np.asarray(probs, dtype=np.float64) / sum(probs)))]
    if updown == "up":
        factor = float(rng.uniform(1.0, rng_range[1]))
    elif updown == "down":
        factor = float(rng.uniform(rng_range[0], 1.0))
    else:
        factor = 1.0
    return ResizeDraw(updown=updown, factor=factor, mode=str(modes[int(rng.integers(len(modes)))]))


def _draw_noise(rng: np.random.Generator, gaussian_prob, sigma_range, poisson_range, gray_prob) -> NoiseDraw:
    gaussian = bool(rng.uniform() < gaussian_prob)
    sigma = float(rng.uniform(sigma_range[0], sigma_range[1]))
    pscale = float(rng.uniform(poisson_range[0], poisson_range[1]))
    gray = bool(rng.uniform() < gray_prob)
    seed = int(rng.integers(0, 2 ** 63 - 1))
    return NoiseDraw(kind="gaussian" if gaussian else "poisson", sigma=sigma, poisson_scale=pscale,
                     gray=gray, seed=seed)


def _draw_quality(rng: np.random.Generator, q_range) -> int:
    # Real-ESRGAN draws a float quality for DiffJPEG; libjpeg takes an integer.
    return int(round(float(rng.uniform(q_range[0], q_range[1]))))


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
    return int(seed)


def sample_params(config: DegradationConfig, seed: int) -> DegradationParams:
    """Draw one sample's degradation from ``seed``.

    Each part (kernel 1, kernel 2, final sinc, first stage, second stage, final stage) has its
    own stream spawned from ``numpy.random.SeedSequence(seed)``, so changing one part's
    settings does not change what the others draw.
    """
    seed = _check_seed(seed)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    c = config
    k1 = _draw_blur_kernel(streams[0], c.blur_kernel_size, c.kernel_list, c.kernel_prob, c.sinc_prob,
                           c.blur_sigma, c.betag_range, c.betap_range)
    k2 = _draw_blur_kernel(streams[1], c.blur_kernel_size2, c.kernel_list2, c.kernel_prob2, c.sinc_prob2,
                           c.blur_sigma2, c.betag_range2, c.betap_range2)
    rs = streams[2]
    sinc = None
    if rs.uniform() < c.final_sinc_prob:
        size = int(rs.choice(np.arange(_MIN_KERNEL_SIZE, 21 + 1, 2)))  # Real-ESRGAN: 7..21 here
        omega_c = float(rs.uniform(math.pi / 3, math.pi))
        sinc = KernelDraw(kind="sinc", size=size, kernel=circular_lowpass_kernel(omega_c, size), omega_c=omega_c)
    r1 = streams[3]
    resize1 = _draw_resize(r1, c.resize_prob, c.resize_range, c.resize_modes)
    noise1 = _draw_noise(r1, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
    jpeg1 = _draw_quality(r1, c.jpeg_range)
    r2 = streams[4]
    apply_blur2 = bool(r2.uniform() < c.second_blur_prob)
    resize2 = _draw_resize(r2, c.resize_prob2, c.resize_range2, c.resize_modes)
    noise2 = _draw_noise(r2, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2)
    r3 = streams[5]
    resize_first = bool(r3.uniform() < 0.5)
    final_mode = str(c.final_resize_modes[int(r3.integers(len(c.final_resize_modes)))])
    jpeg2 = _draw_quality(r3, c.jpeg_range2)
    return DegradationParams(seed=seed, kernel1=k1, resize1=resize1, noise1=noise1, jpeg1_quality=jpeg1,
                             apply_blur2=apply_blur2, kernel2=k2, resize2=resize2, noise2=noise2, sinc=sinc,
                             resize_first=resize_first, final_mode=final_mode, jpeg2_quality=jpeg2)


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------

def _apply_noise(img: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(draw.seed)
    if draw.kind == "gaussian":
        return add_gaussian_noise(img, draw.sigma, draw.gray, g)
    return add_poisson_noise(img, draw.poisson_scale, draw.gray, g)


def _degrade_one(x: torch.Tensor, config: DegradationConfig, p: DegradationParams) -> torch.Tensor:
    """``x [1, 3, H, W]`` float32 -> LR ``[1, 3, H/scale, W/scale]`` (as ``RealESRGANModel.feed_data``)."""
    c = config
    ori_h, ori_w = x.shape[-2:]
    out = usm_sharp(x) if c.usm_sharpen else x

    # ----- first degradation -----
    if c.blur1:
        out = filter2d(out, p.kernel1.kernel)
    if c.resize1:
        out = _resize(out, p.resize1.mode, scale_factor=p.resize1.factor)
    if c.noise1:
        out = _apply_noise(out, p.noise1)
    if c.jpeg1:
        # Real-ESRGAN clamps before JPEG ("otherwise JPEGer will result in unpleasant artifacts")
        out = jpeg_roundtrip(torch.clamp(out, 0, 1), p.jpeg1_quality)

    # ----- second degradation -----
    second = c.second_stage
    if second and c.blur2 and p.apply_blur2:
        out = filter2d(out, p.kernel2.kernel)
    if second and c.resize2:
        out = _resize(out, p.resize2.mode, size=(int(ori_h / c.scale * p.resize2.factor),
                                                 int(ori_w / c.scale * p.resize2.factor)))
    if second and c.noise2:
        out = _apply_noise(out, p.noise2)

    # ----- final: [resize back + sinc] and JPEG, in a random order -----
    def resize_and_sinc(t):
        t = _resize(t, p.final_mode, size=(ori_h // c.scale, ori_w // c.scale))
        if c.final_sinc and p.sinc is not None:
            t = filter2d(t, p.sinc.kernel)
        return t

    def jpeg(t):
        if second and c.jpeg2:
            t = jpeg_roundtrip(torch.clamp(t, 0, 1), p.jpeg2_quality)
        return t

    out = jpeg(resize_and_sinc(out)) if p.resize_first else resize_and_sinc(jpeg(out))
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def _check_input(hr: torch.Tensor, config: DegradationConfig) -> None:
    if not isinstance(hr, torch.Tensor):
        raise TypeError(f"hr must be a torch.Tensor [B, 3, H, W], got {type(hr).__name__}")
    if hr.dim() != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must be [B, 3, H, W] (RGB), got shape {tuple(hr.shape)}")
    if not hr.is_floating_point():
        raise ValueError(f"hr must be a float tensor in [0, 1], got dtype {hr.dtype}; "
                         "for 8-bit images use hr.float() / 255")
    if hr.shape[0] == 0:
        raise ValueError("hr is an empty batch")
    h, w = hr.shape[-2:]
    s = config.scale
    if h % s or w % s:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {s}; crop or pad it to a "
                         f"multiple of {s} (e.g. {h - h % s}x{w - w % s})")
    if not torch.isfinite(hr).all():
        raise ValueError("hr contains NaN or infinite values")
    lo, hi = float(hr.min()), float(hr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"hr values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]; clamp them first")


def _seeds_for(seed: Union[int, Sequence[int]], batch: int) -> list[int]:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        base = _check_seed(seed)
        return [base + i for i in range(batch)]
    if isinstance(seed, torch.Tensor):
        seed = seed.flatten().tolist()
    if not isinstance(seed, Sequence) or isinstance(seed, (str, bytes)):
        raise ValueError(f"seed must be an int or a list of ints, got {type(seed).__name__}")
    seeds = [_check_seed(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}; give one seed per image or a single int")
    return seeds


@torch.no_grad()
def degrade(hr: torch.Tensor, config: Optional[DegradationConfig] = None,
            seed: Union[int, Sequence[int]] = 0) -> torch.Tensor:
    """Real-ESRGAN second-order degradation of ``hr [B, 3, H, W]`` in [0, 1].

    Returns the LR ``[B, 3, H/scale, W/scale]``, float32 on ``hr``'s device, in [0, 1] and on
    the 8-bit grid (multiples of 1/255). ``seed``: one non-negative int per image, or a single
    int ``s`` meaning ``[s, s+1, ..., s+B-1]`` (so ``degrade(x, cfg, s)[i]`` equals
    ``degrade(x[i:i+1], cfg, s + i)``). The same seeds, config and input give identical output.
    ``H`` and ``W`` must be divisible by ``config.scale``.
    """
    config = DegradationConfig() if config is None else config
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig, got {type(config).__name__}")
    _check_input(hr, config)
    seeds = _seeds_for(seed, hr.shape[0])
    x = hr.detach().to(torch.float32)
    outs = [_degrade_one(x[i:i + 1], config, sample_params(config, s)) for i, s in enumerate(seeds)]
    return torch.cat(outs, dim=0)


@torch.no_grad()
def degrade_to_hr_size(hr: torch.Tensor, config: Optional[DegradationConfig] = None,
                       seed: Union[int, Sequence[int]] = 0, kind: Optional[str] = None) -> torch.Tensor:
    """:func:`degrade`, then back to ``H x W`` with ``fluxsr_core.images.resize``.

    This is the student's training input: the same resize the upscaler applies to an LR image
    at run time, so training and inference see identically prepared inputs. ``kind`` is passed
    to ``images.resize`` when given (else its default, the upscaler's).
    """
    from fluxsr_core.images import resize  # lazy: keeps degrade() usable on its own

    lr = degrade(hr, config, seed)
    size = (int(hr.shape[-2]), int(hr.shape[-1]))
    return resize(lr, size) if kind is None else resize(lr, size, kind=kind)

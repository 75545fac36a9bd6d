"""Evaluation of super-resolved images: the field's PSNR-Y/SSIM-Y protocol plus perceptual metrics.

``fluxsr-train eval OUTPUTS --references HR [--lr LR] --scale 4`` compares a folder of outputs
(or several) against reference images, adds a bicubic baseline row, and writes a Markdown and a
JSON table.

Protocol (BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel=True``,
``crop_border=scale``, the numbers SR papers report):

* images are 8-bit (float images are rounded to 8 bits, as saving a PNG would);
* ``scale`` pixels are cut from every border;
* luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (ITU-R BT.601, studio range, on R, G, B in
  ``[0, 1]``), kept unrounded on the ``[0, 255]`` scale;
* PSNR with peak 255; SSIM with an 11x11 Gaussian window (sigma 1.5), constants
  ``(0.01 * 255)^2`` and ``(0.03 * 255)^2``, averaged over the "valid" region (no padding).

References are cropped (top-left) to a multiple of ``scale`` first, as the field does, so an LR
of ``H/scale x W/scale`` upscales to exactly the compared area. The bicubic baseline upsamples
the LR images when ``--lr`` is given, else a bicubic (antialiased) downscale of each reference,
rounded to 8 bits. Its kernel is MATLAB's ``imresize(..., 'bicubic')`` by default
(:func:`matlab_imresize`: a = -0.5, antialiased when shrinking, symmetric borders), the one
papers' bicubic rows and LR sets use; ``--bicubic-kernel torch`` takes
:func:`fluxsr_core.images.resize` (torch's, a = -0.75) instead, which scores higher (0.12 dB
PSNR-Y on six scikit-image photos, README).

Perceptual metrics (computed on the whole image, no border cut, as pyiqa's defaults do):

* ``lpips``: LPIPS v0.1 with the AlexNet backbone (the ``lpips`` package's heads, which ship in
  the package, and torchvision's ImageNet AlexNet file read from the weights folder).
* ``stlpips`` / ``stlpips_vgg``: ST-LPIPS (shift-tolerant LPIPS, AlexNet / VGG), whose complete
  weights ship inside the ``stlpips-pytorch`` wheel; always available when that package is
  installed. Labelled as what it is; it is not LPIPS.
* ``dists``, ``musiq``, ``maniqa``, ``clipiqa``, ``topiq_nr``, ``topiq_fr``: through ``pyiqa``,
  only when pyiqa is installed AND every weight file the metric needs is already on this
  machine. Nothing is ever downloaded: files are checked before the metric is built, and while
  it is built every download function is replaced by one that refuses.

A metric that cannot run is listed under "skipped" with the reason (the missing file and where
to put it); it is never replaced by a stand-in.

The weights folder (``--weights-dir``, default ``torch.hub.get_dir()``, i.e.
``$TORCH_HOME/hub`` = ``~/.cache/torch/hub``) has the layout of torch's hub cache, which is where
pyiqa and torchvision put their downloads on a connected machine: ``checkpoints/`` (torchvision
backbones), ``pyiqa/`` (pyiqa's metric weights) and ``clip/`` (CLIP models). timm backbones
(MANIQA, TOPIQ) are looked up in the Hugging Face hub cache (``HF_HUB_CACHE``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

# scan_suffixes: the images `fluxsr upscale` reads from a folder, so a reference set in any of
# them is scored and none is silently passed over
from fluxsr_core.cli import scan_suffixes
from fluxsr_core.files import atomic_write_text, nearest_existing, tolerate_unencodable_console

PathLike = Union[str, os.PathLike]

# BT.601 studio-range luma on [0, 1] RGB, giving Y on the [0, 255] scale (BasicSR's bgr2ycbcr,
# written for RGB order).
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

PSNR_Y, SSIM_Y = "psnr_y", "ssim_y"
ALL_METRICS = (PSNR_Y, SSIM_Y, "lpips", "stlpips", "stlpips_vgg", "dists", "musiq", "maniqa", "clipiqa",
               "topiq_nr", "topiq_fr")
DEFAULT_METRICS = ALL_METRICS

BICUBIC_ROW = "bicubic"


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (mismatched sizes, missing files); the message says which."""


class MetricUnavailable(RuntimeError):
    """A metric cannot run on this machine; ``str(exc)`` is the reason shown under "skipped"."""


# ============================================================================ PSNR-Y / SSIM-Y

# Floats a little above 1 (a model's overshoot) are clipped; far above, the image is on another scale.
_FLOAT_IMAGE_MAX = 1.5


def to_uint8_hwc(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """An image as an 8-bit ``[H, W, 3]`` array, the form the protocol measures.

    Accepts uint8 arrays ``[H, W, 3]`` / ``[H, W]`` (gray is repeated to RGB, as BasicSR's
    colour reading does), float arrays ``[H, W, 3]`` in ``[0, 1]``, and tensors ``[3, H, W]`` or
    ``[1, 3, H, W]``: uint8, or float in ``[0, 1]``. Floats are clipped and rounded to 8 bits;
    a float image reaching above 1.5 (one on ``[0, 255]``) is refused, not clipped to white.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu")
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
        # uint8 as torchvision.io.read_image gives it stays 8-bit; other tensors are read as float
        arr = t.permute(1, 2, 0).numpy() if t.dtype == torch.uint8 else t.permute(1, 2, 0).float().numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 3] or [H, W], got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    if arr.size and float(arr.max()) > _FLOAT_IMAGE_MAX:
        # clipped, an image on [0, 255] (BasicSR's functions take those) would score as near white
        raise ValueError(f"a float image must lie in [0, 1], this one reaches {float(arr.max()):.4g}: divide an "
                         "image on [0, 255] by 255, or pass it as uint8")
    return np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an 8-bit RGB image ``[H, W, 3]`` as float64 on the ``[0, 255]`` scale.

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in ``[0, 1]``: white is 235,
    black 16. Not rounded (BasicSR's ``to_y_channel``).
    """
    x = to_uint8_hwc(image).astype(np.float64) / 255.0
    w = np.asarray(Y_WEIGHTS, dtype=np.float64)
    return x @ w + Y_OFFSET


def _crop_border(x: np.ndarray, border: int) -> np.ndarray:
    border = int(border)
    if border < 0:
        raise ValueError(f"crop_border must be >= 0 (got {border})")
    if border == 0:
        return x
    if x.shape[0] <= 2 * border or x.shape[1] <= 2 * border:
        raise EvaluationError(f"an image of {x.shape[1]}x{x.shape[0]} has nothing left after cutting a "
                              f"border of {border} pixels")
    return x[border:-border, border:-border, ...]


def _y_pair(a, b, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    a8, b8 = to_uint8_hwc(a), to_uint8_hwc(b)
    if a8.shape != b8.shape:
        raise EvaluationError(f"images differ in size: {a8.shape[1]}x{a8.shape[0]} vs "
                              f"{b8.shape[1]}x{b8.shape[0]}")
    return rgb_to_y(_crop_border(a8, crop_border)), rgb_to_y(_crop_border(b8, crop_border))


def psnr_y(output, reference, crop_border: int = 0) -> float:
    """PSNR (dB, peak 255) on the BT.601 Y channel after cutting ``crop_border`` pixels.

    Equal images give ``inf``. Inputs as for :func:`to_uint8_hwc`.
    """
    ya, yb = _y_pair(output, reference, crop_border)
    mse = float(np.mean((ya - yb) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0 * 255.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The SSIM window: outer product of ``cv2.getGaussianKernel(size, sigma)`` with itself."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r ** 2) / (2.0 * sigma * sigma))
    g /= g.sum()
    return np.outer(g, g)


def ssim_map(y1: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """SSIM map of two single-channel float images on the ``[0, 255]`` scale, "valid" region only.

    BasicSR's ``_ssim``: Gaussian-filtered means, variances and covariance (``cv2.filter2D``
    then dropping 5 pixels per side equals a valid convolution), constants for peak 255.
    """
    if min(y1.shape) < SSIM_WINDOW:
        raise EvaluationError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after "
                              f"the border cut (got {y1.shape[1]}x{y1.shape[0]})")
    win = torch.from_numpy(gaussian_window())[None, None]
    stack = torch.from_numpy(np.stack([y1, y2, y1 * y1, y2 * y2, y1 * y2]))[:, None]
    mu1, mu2, s11, s22, s12 = F.conv2d(stack, win)[:, 0].numpy()
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = s11 - mu1_sq, s22 - mu2_sq, s12 - mu12
    return ((2 * mu12 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
        (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2))


def ssim_y(output, reference, crop_border: int = 0) -> float:
    """SSIM on the BT.601 Y channel after cutting ``crop_border`` pixels (BasicSR's protocol)."""
    ya, yb = _y_pair(output, reference, crop_border)
    return float(ssim_map(ya, yb).mean())


# ============================================================================ weight files

def default_weights_dir() -> Path:
    """torch's hub cache (``$TORCH_HOME/hub``), where pyiqa and torchvision keep their downloads."""
    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs. ``kind``: ``checkpoints`` (torchvision), ``pyiqa``, ``clip``
    (all under the weights folder) or ``hf`` (``name`` = ``repo_id/filename`` in the HF cache)."""

    kind: str
    name: str

    def locate(self, weights_dir: Path) -> Optional[Path]:
        """The local path of the file, or None when it is not on this machine."""
        if self.kind == "hf":
            repo, _, fname = self.name.rpartition("/")
            try:
                from huggingface_hub import try_to_load_from_cache
            except ImportError:
                return None
            hit = try_to_load_from_cache(repo, fname)
            return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None
        p = weights_dir / self.kind / self.name
        return p if p.is_file() else None

    def where(self, weights_dir: Path) -> str:
        """Where the file is expected (for messages)."""
        if self.kind == "hf":
            repo, _, fname = self.name.rpartition("/")
            return f"Hugging Face cache entry {repo} / {fname}"
        return str(weights_dir / self.kind / self.name)


# The files pyiqa 0.1.x fetches for each metric (its arch files' URLs and backbones). A newer
# pyiqa that needs something else is still safe: downloads are refused while a metric is built
# and the metric is skipped with the URL it wanted.
_VGG16 = WeightFile("checkpoints", "vgg16-397923af.pth")
_ALEXNET = WeightFile("checkpoints", "alexnet-owt-7be5be79.pth")
_RESNET50_TIMM = WeightFile("hf", "timm/resnet50.a1_in1k/model.safetensors")


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is and what it needs."""

    name: str
    title: str
    mode: str                 # "FR" (needs the reference) or "NR"
    lower_better: bool
    backend: str              # "protocol", "lpips", "stlpips" or "pyiqa"
    files: tuple[WeightFile, ...] = ()
    pyiqa_name: Optional[str] = None


METRIC_SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec(PSNR_Y, "PSNR-Y", "FR", False, "protocol"),
    MetricSpec(SSIM_Y, "SSIM-Y", "FR", False, "protocol"),
    MetricSpec("lpips", "LPIPS", "FR", True, "lpips", (_ALEXNET,)),
    MetricSpec("stlpips", "ST-LPIPS", "FR", True, "stlpips"),
    MetricSpec("stlpips_vgg", "ST-LPIPS-VGG", "FR", True, "stlpips"),
    MetricSpec("dists", "DISTS", "FR", True, "pyiqa",
               (_VGG16, WeightFile("pyiqa", "DISTS_weights-f5e65c96.pth")), "dists"),
    MetricSpec("musiq", "MUSIQ", "NR", False, "pyiqa",
               (WeightFile("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),), "musiq"),
    MetricSpec("maniqa", "MANIQA", "NR", False, "pyiqa",
               (WeightFile("hf", "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k/model.safetensors"),
                WeightFile("pyiqa", "ckpt_koniq10k.pt")), "maniqa"),
    MetricSpec("clipiqa", "CLIPIQA", "NR", False, "pyiqa", (WeightFile("clip", "RN50.pt"),), "clipiqa"),
    MetricSpec("topiq_nr", "TOPIQ-NR", "NR", False, "pyiqa",
               (_RESNET50_TIMM, WeightFile("pyiqa", "cfanet_nr_koniq_res50-9a73138b.pth")), "topiq_nr"),
    MetricSpec("topiq_fr", "TOPIQ-FR", "FR", False, "pyiqa",
               (_RESNET50_TIMM, WeightFile("pyiqa", "cfanet_fr_kadid_res50-2c4cc61d.pth")), "topiq_fr"),
)}


def parse_metrics(spec: Union[str, Sequence[str], None]) -> list[str]:
    """``"psnr_y,ssim_y,lpips"``, a list, ``"all"`` or None (all) -> validated metric names."""
    if spec is None:
        return list(DEFAULT_METRICS)
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(ALL_METRICS)
    unknown = [n for n in names if n not in METRIC_SPECS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)} (or 'all')")
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no metric asked for")
    return out


# ============================================================================ metric backends

class _Metric:
    """A ready metric: ``score(output, reference) -> float`` on float tensors ``[1, 3, H, W]``."""

    def __init__(self, spec: MetricSpec, label: str, fn: Callable[[torch.Tensor, torch.Tensor], float]):
        self.spec, self.label, self._fn = spec, label, fn

    def __call__(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        return float(self._fn(output, reference))


def _lpips_like(module: torch.nn.Module, device: torch.device):
    def score(out: torch.Tensor, ref: torch.Tensor) -> float:
        with torch.no_grad():
            d = module(out.to(device) * 2 - 1, ref.to(device) * 2 - 1)
        return float(d.flatten()[0])
    return score


class _DownloadRefused(RuntimeError):
    pass


@contextlib.contextmanager
def _no_downloads(weights_dir: Path) -> Iterator[None]:
    """While a pyiqa metric is built: every download path refuses, files come from ``weights_dir``.

    torch's hub folder is pointed at ``weights_dir`` (torchvision reads ``checkpoints/`` there,
    pyiqa's CLIP loader ``clip/``), pyiqa's cache at ``weights_dir/pyiqa``, the Hugging Face hub
    is put offline, and the download functions of torch.hub, pyiqa and urllib raise.
    """
    import urllib.parse
    import urllib.request

    def refuse(url, *args, **kwargs):
        name = os.path.basename(urllib.parse.urlparse(str(url)).path)
        present = sorted(Path(weights_dir).rglob(name)) if name and Path(weights_dir).is_dir() else []
        if present:  # pyiqa fetches again a file whose checksum it rejected
            raise _DownloadRefused(f"{present[0]} is there but was rejected (its checksum does not match the "
                                   f"published file; replace it with {url})")
        raise _DownloadRefused(f"it wanted to download {url}")

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    patches: list[tuple[Any, str, Any]] = []

    def patch(obj, attr, value):
        if obj is not None and hasattr(obj, attr):
            patches.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)

    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hf_constants
            patch(hf_constants, "HF_HUB_OFFLINE", True)
        except ImportError:
            pass
        # torch.hub.set_dir pins the folder for good (TORCH_HOME is no longer read), so the
        # private attribute behind it is patched and restored to exactly what it was.
        patch(torch.hub, "_hub_dir", str(weights_dir))
        patch(torch.hub, "download_url_to_file", refuse)
        patch(urllib.request, "urlopen", refuse)
        try:
            import pyiqa.utils.download_util as dl
            patch(dl, "DEFAULT_CACHE_DIR", str(weights_dir / "pyiqa"))
            patch(dl, "download_url_to_file", refuse)
            patch(dl, "download_file_from_google_drive", refuse)
        except ImportError:
            pass
        yield
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pyiqa_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyiqa") is not None


def build_metric(name: str, device: Union[str, torch.device] = "cpu",
                 weights_dir: Optional[PathLike] = None, crop_border: int = 0) -> _Metric:
    """Build one metric or raise :class:`MetricUnavailable` saying why it cannot run here.

    ``crop_border``: the pixels PSNR-Y and SSIM-Y cut from each side (the protocol's: the
    scale; :func:`evaluate_images` passes its own), ignored by the other metrics.

    Never downloads: every file the metric needs must already be under ``weights_dir`` (default
    :func:`default_weights_dir`) or, for timm backbones, in the Hugging Face cache.
    """
    spec = METRIC_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")
    device = torch.device(device)
    wdir = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    if spec.backend == "protocol":
        # evaluate_images scores these itself, with the same border; the object also works alone.
        fn = psnr_y if name == PSNR_Y else ssim_y
        border = f"{crop_border}-px border cut" if crop_border else "no border cut"
        return _Metric(spec, f"{spec.title} on BT.601 Y (16 + 65.481 R + 128.553 G + 24.966 B), {border}, "
                             "BasicSR protocol", lambda o, r: fn(to_uint8_hwc(o), to_uint8_hwc(r), crop_border))
    if spec.backend == "pyiqa" and not _pyiqa_available():
        raise MetricUnavailable("pyiqa is not installed (pip install pyiqa, then put its weight files "
                                "in the weights folder; nothing is downloaded)")
    missing = [f for f in spec.files if f.locate(wdir) is None]
    if missing:
        raise MetricUnavailable("weight file(s) not on this machine: "
                                + "; ".join(f.where(wdir) for f in missing))
    from fluxsr_training import perceptual

    # The messages name eval's own option, not the training keys: the AlexNet file comes from
    # --weights-dir; ST-LPIPS's weights only from its package (eval has no option for them).
    if spec.backend == "lpips":
        try:
            module, label = perceptual.load_perceptual(
                "lpips-alex", backbone_path=_ALEXNET.locate(wdir), device=device,
                names=perceptual.SettingNames(path="--weights-dir", kind=None, turn_off=None))
        except (perceptual.PerceptualBackboneMissing, perceptual.PerceptualWeightsError, ImportError) as exc:
            raise MetricUnavailable(str(exc)) from None
        return _Metric(spec, label, _lpips_like(module, device))
    if spec.backend == "stlpips":
        try:
            kind = "stlpips-vgg" if name == "stlpips_vgg" else "stlpips-alex"
            module, label = perceptual.load_perceptual(
                kind, device=device, names=perceptual.SettingNames(path=None, kind=None, turn_off=None))
        except (perceptual.PerceptualBackboneMissing, perceptual.PerceptualWeightsError, ImportError) as exc:
            raise MetricUnavailable(str(exc)) from None
        return _Metric(spec, label, _lpips_like(module, device))
    return _build_pyiqa(spec, device, wdir)


def _build_pyiqa(spec: MetricSpec, device: torch.device, wdir: Path) -> _Metric:
    try:
        with _no_downloads(wdir):
            import pyiqa

            metric = pyiqa.create_metric(spec.pyiqa_name, as_loss=False, device=device)
    except _DownloadRefused as exc:
        raise MetricUnavailable(f"pyiqa's {spec.pyiqa_name} needs a file it cannot use ({exc}); "
                                f"downloads are off") from None
    except Exception as exc:  # noqa: BLE001 - whatever pyiqa raises, the metric is skipped with why
        raise MetricUnavailable(f"pyiqa could not build {spec.pyiqa_name}: {type(exc).__name__}: {exc}") from None
    version = getattr(sys.modules.get("pyiqa"), "__version__", "?")

    def score(out: torch.Tensor, ref: torch.Tensor) -> float:
        with torch.no_grad():
            value = metric(out.to(device), ref.to(device)) if spec.mode == "FR" else metric(out.to(device))
        return float(torch.as_tensor(value).flatten()[0])

    return _Metric(spec, f"{spec.title} (pyiqa {version} '{spec.pyiqa_name}', local weights)", score)


# ============================================================================ the report

@dataclass
class MethodResult:
    """One row: a method's per-image scores and their means."""

    name: str
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    """Scores of every method on every image, the metrics used and the ones skipped (with why)."""

    scale: int
    crop_border: int
    images: list[str]
    metrics: list[str]
    rows: list[MethodResult]
    labels: dict[str, str]
    skipped: dict[str, str]
    baseline: str
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> MethodResult:
        """The row of method ``name`` (KeyError naming the rows there are)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (``inf`` PSNR of identical images becomes the string "inf")."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return clean(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False)

    def to_markdown(self, per_image: bool = False) -> str:
        """A Markdown table of the means (and optionally one table per image), labels and skips."""
        def fmt(name: str, v: Optional[float]) -> str:
            if v is None:
                return "-"
            if not math.isfinite(v):
                return "inf"
            return f"{v:.2f}" if name == PSNR_Y else f"{v:.4f}"

        def table(values: Callable[[MethodResult], Mapping[str, float]]) -> list[str]:
            heads = [f"{METRIC_SPECS[m].title} {'↓' if METRIC_SPECS[m].lower_better else '↑'}"
                     for m in self.metrics]
            lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
            for r in self.rows:
                vals = values(r)
                lines.append(f"| {r.name} | " + " | ".join(fmt(m, vals.get(m)) for m in self.metrics) + " |")
            return lines

        out = [f"x{self.scale}, {len(self.images)} image(s); PSNR-Y/SSIM-Y with a {self.crop_border}-pixel "
               f"border cut; {self.baseline}.", ""]
        out += table(lambda r: r.mean)
        if per_image:
            for img in self.images:
                out += ["", f"**{img}**", ""]
                out += table(lambda r, _i=img: r.per_image.get(_i, {}))
        out += ["", "Metrics:"]
        out += [f"- {METRIC_SPECS[m].title}: {self.labels[m]}" for m in self.metrics]
        if self.skipped:
            out += ["", "Skipped (never faked):"]
            out += [f"- {METRIC_SPECS[m].title}: {why}" for m, why in self.skipped.items()]
        if self.notes:
            out += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write(self, json_path: Optional[PathLike] = None, markdown_path: Optional[PathLike] = None,
              per_image: bool = True) -> None:
        """Write the JSON and/or Markdown forms atomically (temporary file, then rename)."""
        if json_path is not None:
            atomic_write_text(json_path, self.to_json() + "\n")
        if markdown_path is not None:
            atomic_write_text(markdown_path, self.to_markdown(per_image=per_image))


def _as_float_tensor(image) -> torch.Tensor:
    """8-bit ``[H, W, 3]`` -> float ``[1, 3, H, W]`` in [0, 1] (what the perceptual nets take)."""
    arr = to_uint8_hwc(image)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left part of ``image`` whose sides are multiples of ``scale``."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


BICUBIC_KERNELS = ("matlab", "torch")


def _matlab_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, MATLAB's ``cubic``."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def _matlab_resize_matrix(in_len: int, out_len: int) -> np.ndarray:
    """``[out_len, in_len]`` weights of MATLAB's bicubic ``imresize`` along one axis (its
    ``contributions``): sample ``u = x / s + (1 - 1 / s) / 2`` for output pixel ``x`` (1-based),
    the kernel widened by ``1 / s`` when shrinking (antialiasing), rows normalised, indices
    past the border mirrored (``[1..n, n..1]``)."""
    s = out_len / in_len
    width = 4.0 / s if s < 1 else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64) / s + 0.5 * (1.0 - 1.0 / s)
    taps = int(np.ceil(width)) + 2
    idx = np.floor(u - width / 2)[:, None] + np.arange(taps)[None, :]
    w = s * _matlab_cubic(s * (u[:, None] - idx)) if s < 1 else _matlab_cubic(u[:, None] - idx)
    w /= w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps), cols.ravel()), w.ravel())
    return m


def matlab_imresize(image, size: tuple[int, int]) -> np.ndarray:
    """MATLAB's ``imresize(image, size, 'bicubic')`` on an ``[H, W, C]`` image (any dtype, values
    as given), float64 and unrounded: rows first, then columns, as BasicSR's port
    (``matlab_functions.imresize``) computes it on float images.

    Our own, because the field's numbers are defined by this kernel and no dependency of this
    project has it; Pillow's bicubic has the same weights but treats the borders otherwise.
    """
    arr = np.asarray(image, dtype=np.float64)
    rows = _matlab_resize_matrix(arr.shape[0], int(size[0]))
    cols = _matlab_resize_matrix(arr.shape[1], int(size[1]))
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    along_rows = np.tensordot(rows, arr, axes=(1, 0))                          # [out_h, W, C]
    return np.tensordot(along_rows, cols, axes=(1, 1)).transpose(0, 2, 1)      # [out_h, out_w, C]


def bicubic_kernel_words(kernel: str) -> str:
    """``kernel`` (one of :data:`BICUBIC_KERNELS`) in words, for reports."""
    return "MATLAB's imresize bicubic" if kernel == "matlab" else "torch's bicubic (a = -0.75, antialiased)"


def _bicubic(image, size: tuple[int, int], kernel: str) -> np.ndarray:
    if kernel not in BICUBIC_KERNELS:
        raise ValueError(f"bicubic kernel {kernel!r}; choose one of {', '.join(BICUBIC_KERNELS)}")
    if kernel == "matlab":
        return to_uint8_hwc(matlab_imresize(to_uint8_hwc(image).astype(np.float64) / 255.0, size))
    from fluxsr_core.images import resize

    return to_uint8_hwc(resize(_as_float_tensor(image), size, "bicubic")[0])


def bicubic_upscale(lr, scale: int, kernel: str = "matlab") -> np.ndarray:
    """Upsample an LR image by ``scale`` (``kernel``: MATLAB's bicubic or torch's); 8-bit ``[H, W, 3]``."""
    h, w = to_uint8_hwc(lr).shape[:2]
    return _bicubic(lr, (h * scale, w * scale), kernel)


def bicubic_downscale(hr, scale: int, kernel: str = "matlab") -> np.ndarray:
    """A bicubic (antialiased) x``scale`` downscale of a mod-cropped HR image, rounded to 8 bits."""
    hr8 = mod_crop(to_uint8_hwc(hr), scale)
    return _bicubic(hr8, (hr8.shape[0] // scale, hr8.shape[1] // scale), kernel)


def evaluate_images(methods: Mapping[str, Mapping[str, Any]], references: Mapping[str, Any],
                    scale: int, lr_images: Optional[Mapping[str, Any]] = None,
                    metrics: Union[str, Sequence[str], None] = None, bicubic: bool = True,
                    crop_border: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                    weights_dir: Optional[PathLike] = None,
                    notes: Sequence[str] = (), bicubic_kernel: str = "matlab") -> EvalReport:
    """Score in-memory images: ``methods[name][image] -> image``, ``references[image] -> image``.

    Images as for :func:`to_uint8_hwc`. Each reference is mod-cropped to a multiple of
    ``scale``; an output must have that size or the reference's full size (then it is cropped
    the same way). With ``bicubic`` a first row upsamples ``lr_images[image]`` (which must be
    exactly ``1/scale`` of the mod-cropped reference) or, without LR images, a bicubic downscale
    of the reference, with ``bicubic_kernel`` (``matlab``, papers' convention, or ``torch``).
    ``crop_border`` defaults to ``scale``. Metrics that cannot run here are listed in ``skipped``.
    """
    if bicubic_kernel not in BICUBIC_KERNELS:
        raise ValueError(f"bicubic kernel {bicubic_kernel!r}; choose one of {', '.join(BICUBIC_KERNELS)}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer (got {scale})")
    border = scale if crop_border is None else int(crop_border)
    names = parse_metrics(metrics)
    if not references:
        raise EvaluationError("no reference images")
    image_names = sorted(references)
    refs = {k: mod_crop(to_uint8_hwc(v), scale) for k, v in references.items()}

    rows_in: dict[str, dict[str, np.ndarray]] = {}
    if bicubic:
        if BICUBIC_ROW in methods:
            raise EvaluationError(f"a method is named {BICUBIC_ROW!r}, the baseline's name; rename it")
        base = {}
        for k in image_names:
            if lr_images is not None:
                if k not in lr_images:
                    raise EvaluationError(f"no LR image for reference {k!r}")
                lr = to_uint8_hwc(lr_images[k])
                want = (refs[k].shape[0] // scale, refs[k].shape[1] // scale)
                if lr.shape[:2] != want:
                    raise EvaluationError(
                        f"LR image {k!r} is {lr.shape[1]}x{lr.shape[0]}; x{scale} of the reference "
                        f"({refs[k].shape[1]}x{refs[k].shape[0]} after cropping to a multiple of {scale}) "
                        f"needs {want[1]}x{want[0]}. Is --scale right?")
            else:
                lr = bicubic_downscale(refs[k], scale, bicubic_kernel)
            base[k] = bicubic_upscale(lr, scale, bicubic_kernel)
        rows_in[BICUBIC_ROW] = base
    for mname, imgs in methods.items():
        missing = [k for k in image_names if k not in imgs]
        if missing:
            raise EvaluationError(f"method {mname!r} has no output for {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(image_names)})")
        row = {}
        for k in image_names:
            out = to_uint8_hwc(imgs[k])
            full = to_uint8_hwc(references[k]).shape[:2]
            if out.shape[:2] == full and full != refs[k].shape[:2]:
                out = mod_crop(out, scale)
            if out.shape[:2] != refs[k].shape[:2]:
                raise EvaluationError(
                    f"{mname}: output {k!r} is {out.shape[1]}x{out.shape[0]} but the reference is "
                    f"{refs[k].shape[1]}x{refs[k].shape[0]} (cropped to a multiple of {scale}); the "
                    f"output must be the reference's size. Is --scale right?")
            row[k] = out
        rows_in[mname] = row

    labels, skipped, built = {}, {}, {}
    for m in names:
        try:
            metric = build_metric(m, device=device, weights_dir=weights_dir, crop_border=border)
        except MetricUnavailable as exc:
            skipped[m] = str(exc)
            continue
        built[m] = metric
        labels[m] = metric.label
    used = [m for m in names if m in built]
    if not used:  # a table of nothing, exit 0, would read as a run that scored
        raise EvaluationError("none of the metrics asked for can run here: " + "; ".join(
            f"{METRIC_SPECS[m].title}: {why}" for m, why in skipped.items()))

    # float copies for the networks one image at a time: of a whole set they were gigabytes
    perceptual = any(METRIC_SPECS[m].backend != "protocol" for m in used)
    rows = []
    for mname, imgs in rows_in.items():
        res = MethodResult(mname)
        for k in image_names:
            out = imgs[k]
            scores = {}
            out_t, ref_t = (_as_float_tensor(out), _as_float_tensor(refs[k])) if perceptual else (None, None)
            for m in used:
                try:
                    if m == PSNR_Y:
                        scores[m] = psnr_y(out, refs[k], border)
                    elif m == SSIM_Y:
                        scores[m] = ssim_y(out, refs[k], border)
                    else:
                        scores[m] = built[m](out_t, ref_t)
                except EvaluationError as exc:  # which image: a set of hundreds stopped on "an image of 8x8"
                    raise EvaluationError(f"{mname}, image {k}: {exc}") from None
            res.per_image[k] = scores
        for m in used:
            vals = [res.per_image[k][m] for k in image_names]
            res.mean[m] = float(np.mean(vals))
            finite = [v for v in vals if math.isfinite(v)]
            if m == PSNR_Y and len(finite) < len(vals):  # BasicSR's mean is inf then: say what the rest give
                rest = f"the mean of the other {len(finite)} is {np.mean(finite):.2f} dB" if finite else "no other"
                notes = [*notes, f"{mname}: {len(vals) - len(finite)} of {len(vals)} images are identical to their "
                                 f"reference (PSNR-Y inf, and so the mean, as BasicSR averages); {rest}"]
        rows.append(res)
    what = bicubic_kernel_words(bicubic_kernel)
    baseline = (f"bicubic baseline ({what}) from the given LR images" if lr_images is not None
                else f"bicubic baseline ({what}) from a bicubic x{scale} downscale of each reference") if bicubic \
        else "no bicubic baseline"
    return EvalReport(scale=scale, crop_border=border, images=image_names, metrics=used, rows=rows,
                      labels=labels, skipped=skipped, baseline=baseline, notes=list(notes))


# ============================================================================ folders

def list_images(folder: PathLike) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder`` (error on a missing folder or clashing stems)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    out: dict[str, Path] = {}
    suffixes = scan_suffixes()
    for p in sorted(folder.iterdir()):
        # dot files are hidden ones (macOS's ._name.png resource forks), as `fluxsr upscale` skips them
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            if p.stem in out:
                raise EvaluationError(f"{folder} holds both {out[p.stem].name} and {p.name}; images are "
                                      "matched by name without extension, keep one")
            out[p.stem] = p
    if not out:
        raise EvaluationError(f"{folder} holds no images ({', '.join(sorted(suffixes))})")
    return out


def read_image_8bit(path: PathLike) -> np.ndarray:
    """Read an image file as 8-bit RGB ``[H, W, 3]`` (gray repeated; 16-bit rounded to 8 bits;
    alpha ignored) through :func:`fluxsr_core.images.load_image`."""
    from fluxsr_core.images import load_image

    loaded = load_image(path, metadata=False)
    for note in loaded.notes:  # what changes the pixels scored (first frame only, clipped values...)
        logging.getLogger("fluxsr.eval").warning("%s: %s", path, note)
    return to_uint8_hwc(loaded.rgb[0])


def evaluate_folders(outputs_dir: Union[PathLike, Mapping[str, PathLike]], references_dir: PathLike,
                     scale: int = 4, lr_dir: Optional[PathLike] = None,
                     metrics: Union[str, Sequence[str], None] = None, *, bicubic: bool = True,
                     device: Union[str, torch.device] = "cpu", weights_dir: Optional[PathLike] = None,
                     crop_border: Optional[int] = None, bicubic_kernel: str = "matlab") -> EvalReport:
    """Evaluate a folder of outputs (or ``{row name: folder}``) against a folder of references.

    Images are matched by file name without extension; every reference needs an output (and an
    LR image when ``lr_dir`` is given). See :func:`evaluate_images` for sizes and the baseline.
    """
    refs_paths = list_images(references_dir)
    if isinstance(outputs_dir, Mapping):
        out_dirs = {str(k): Path(v) for k, v in outputs_dir.items()}
    else:
        out_dirs = {Path(outputs_dir).name or str(outputs_dir): Path(outputs_dir)}
    methods, notes = {}, []
    for name, folder in out_dirs.items():
        found = list_images(folder)
        # outputs of DIV2K's LR files keep the LR's name (fluxsr upscale lr/ writes 0801x4.png)
        output_of = _matched_names(refs_paths, found, scale)
        missing = [k for k, v in output_of.items() if v is None]
        if missing:
            raise EvaluationError(f"{folder} has no output for {len(missing)} reference(s), e.g. "
                                  f"{missing[:5]} (outputs are matched to {references_dir} by name "
                                  f"without extension, or with x{scale} after the name as DIV2K's LR files "
                                  f"have it{_case_hint(missing, found)})")
        extra = sorted(set(found) - set(output_of.values()))
        if extra:
            notes.append(f"{len(extra)} image(s) of {folder} have no reference in {references_dir} and are not "
                         f"scored, e.g. {extra[:3]}")
        methods[name] = {k: read_image_8bit(found[v]) for k, v in output_of.items()}
    lr = None
    if lr_dir is not None:
        lr_paths = list_images(lr_dir)
        lr_of = _matched_names(refs_paths, lr_paths, scale)
        missing = [k for k, v in lr_of.items() if v is None]
        if missing:
            raise EvaluationError(f"{lr_dir} has no LR image for {missing[:5]} (named as the reference, or with "
                                  f"x{scale} after the name as in DIV2K{_case_hint(missing, lr_paths)})")
        lr = {k: read_image_8bit(lr_paths[v]) for k, v in lr_of.items()}
    refs = {k: read_image_8bit(p) for k, p in refs_paths.items()}
    return evaluate_images(methods, refs, scale, lr_images=lr, metrics=metrics, bicubic=bicubic,
                           crop_border=crop_border, device=device, weights_dir=weights_dir,
                           bicubic_kernel=bicubic_kernel, notes=notes)


def _matched_names(references: Mapping[str, Path], found: Mapping[str, Path], scale: int) -> dict[str, Optional[str]]:
    """For each reference name, the name in ``found`` that is its image: the same name, else
    the name with ``x<scale>`` after it (DIV2K's LR files: 0801x4.png for 0801.png), else None."""
    return {k: k if k in found else f"{k}x{scale}" if f"{k}x{scale}" in found else None for k in references}


def _case_hint(missing: Sequence[str], found: Mapping[str, Path]) -> str:
    """", and names differ only in case: ..." when some of ``missing`` are in ``found`` but for case."""
    lower = {k.lower(): k for k in found}
    pairs = [f"{k} / {lower[k.lower()]}" for k in missing if k.lower() in lower]
    return f"; matching is case-sensitive, and these differ only in case: {pairs[:3]}" if pairs else ""


# ============================================================================ command line

def build_eval_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The ``fluxsr-train eval`` arguments (added to ``parser`` when given, e.g. a subparser)."""
    p = parser or argparse.ArgumentParser(
        prog="fluxsr-train eval",
        description="PSNR-Y/SSIM-Y (BasicSR protocol) and perceptual metrics of SR outputs against "
                    "references, with a bicubic baseline. Nothing is downloaded.")
    p.add_argument("outputs", nargs="+", help="folder(s) of outputs; NAME=FOLDER names the row")
    p.add_argument("-r", "--references", required=True, help="folder of reference (HR) images")
    p.add_argument("--lr", default=None, help="folder of the LR inputs (bicubic baseline from them; "
                                              "default: a bicubic downscale of each reference)")
    p.add_argument("--scale", type=int, default=4, help="upscale factor; also the border cut (default 4)")
    p.add_argument("--crop-border", type=int, default=None, help="border cut in pixels (default: scale)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from {', '.join(ALL_METRICS)} or 'all' (default: all)")
    p.add_argument("--weights-dir", default=None,
                   help="folder laid out like torch's hub cache (checkpoints/, pyiqa/, clip/) holding the "
                        "metric weights (default: torch.hub.get_dir())")
    p.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline row")
    p.add_argument("--bicubic-kernel", choices=BICUBIC_KERNELS, default="matlab",
                   help="the baseline's bicubic: matlab (imresize, as papers' tables; default) or torch "
                        "(the upscaler's own resize, a = -0.75)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--json", default=None, help="write the JSON table here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument("--per-image", action="store_true", help="also print one table per image")
    return p


def _outputs_arg(items: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or os.path.isdir(item):
            name, folder = Path(item).name or item, item
        if name in out:
            raise EvaluationError(f"two output folders would both be row {name!r}; name them NAME=FOLDER")
        out[name] = Path(folder)
    return out


def _check_writable(flag: str, path: Optional[str]) -> None:
    """EvaluationError now, before minutes of metrics, for an output file that cannot be written:
    a folder of that name, or a place (the nearest folder that exists) this user cannot write."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise EvaluationError(f"{flag} {path} is a folder; give the file to write")
    place = nearest_existing(target.parent)
    from fluxsr_core.images import broken_link_message

    broken = broken_link_message(place, advice="Mount or create where it points, or give another path.")
    if broken:
        raise EvaluationError(f"{flag} {path}: {broken}")
    if not os.access(place, os.W_OK):
        raise EvaluationError(f"{flag} {path}: {place} cannot be written (permission or read-only file system)")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``fluxsr-train eval`` from parsed arguments; prints the Markdown table, then writes the
    files asked for (a write that still fails leaves the printed table as the result)."""
    from fluxsr_core.models import resolve_device

    _check_writable("--json", args.json)
    _check_writable("--markdown", args.markdown)
    device = resolve_device(args.device)  # a device not there is said now, not after every image is read
    report = evaluate_folders(_outputs_arg(args.outputs), args.references, scale=args.scale, lr_dir=args.lr,
                              metrics=args.metrics, bicubic=not args.no_bicubic, device=device,
                              weights_dir=args.weights_dir, crop_border=args.crop_border,
                              bicubic_kernel=args.bicubic_kernel)
    print(report.to_markdown(per_image=args.per_image), end="", flush=True)
    try:
        report.write(json_path=args.json, markdown_path=args.markdown)
    except OSError as exc:
        print(f"fluxsr-train eval: error: the table above is complete, but a file was not written: "
              f"{exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    return 0


def main_eval(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fluxsr-train eval``; returns the exit code (2 for unusable inputs)."""
    tolerate_unencodable_console()
    args = build_eval_parser().parse_args(argv)
    try:
        return run_eval(args)
    except (EvaluationError, ValueError, FileNotFoundError) as exc:
        print(f"fluxsr-train eval: error: {exc}", file=sys.stderr)
        return 2


# ``fluxsr-train eval`` delegates to ``fluxsr_training.evaluate.main``.
main = main_eval


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_eval())

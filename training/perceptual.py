"""The perceptual network behind the TV-LPIPS loss, always labelled with what it really is.

LPIPS needs two parts: linear heads (shipped inside the ``lpips`` package) and an ImageNet
backbone (VGG16 or AlexNet) that the package normally downloads through torchvision. Nothing
may be downloaded here, so :func:`load_perceptual` offers:

``"lpips-vgg"`` / ``"lpips-alex"``
    Real LPIPS. The backbone comes from ``backbone_path`` or from the file torchvision's own
    download would have left in the torch hub cache (``$TORCH_HOME/hub/checkpoints``, by
    default ``~/.cache/torch/hub/checkpoints``): ``vgg16-397923af.pth`` or
    ``alexnet-owt-7be5be79.pth``. A missing file raises :class:`PerceptualBackboneMissing`
    naming the file, the folder and where to get it.
``"stlpips-vgg"`` / ``"stlpips-alex"``
    ST-LPIPS (Ghildyal & Liu, ECCV 2022), a shift-tolerant LPIPS whose complete networks
    (backbone and heads, trained by its authors) ship inside the ``stlpips-pytorch`` wheel, so
    it works offline. Its shift-tolerant architecture builds no torchvision model and
    downloads nothing. The package imports two modules it never uses (``IPython.embed``,
    ``torchsummary.summary``) without declaring them; when they are absent, stand-ins are
    provided for the duration of the import only.
``"random-test"``
    LPIPS with a random backbone and random heads (fixed seed). It runs the same code for
    tests on machines without weights and is NOT a perceptual metric; its label says so.

The returned module takes two images in ``[-1, 1]`` (``[B, 3, H, W]``) and returns
``[B, 1, 1, 1]``; it is in eval mode with every parameter frozen (gradients still reach
the inputs).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

PERCEPTUAL_KINDS = ("lpips-vgg", "lpips-alex", "stlpips-vgg", "stlpips-alex", "random-test")
RANDOM_TEST_LABEL = "random-backbone LPIPS (TEST ONLY, not a perceptual metric)"
STLPIPS_LABEL = "ST-LPIPS (shift-tolerant LPIPS, stlpips-pytorch package weights)"

# The checkpoints torchvision downloads for these backbones (file name, where it comes from).
TORCHVISION_BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
# The start of each published file's SHA-256, which torchvision puts in its name and checks on
# download: a file of that name with other weights (random, fine-tuned) would give numbers that
# are not LPIPS under LPIPS's name.
TORCHVISION_BACKBONE_SHA256 = {"vgg": "397923af", "alex": "7be5be79"}


@dataclass(frozen=True)
class SettingNames:
    """The settings a caller's user types, as :func:`load_perceptual`'s error messages name them.

    ``path``: the one that gives ``backbone_path``; ``kind``: the one that picks the kind;
    ``turn_off``: how the user does without the network. None: the caller has no such
    setting, and no message suggests it.
    """

    path: Optional[str] = "loss.perceptual_path"
    kind: Optional[str] = "loss.perceptual"
    turn_off: Optional[str] = "turn the perceptual loss off (loss.w_tvlpips=0)"


# `fluxsr-train train`'s keys (the default).
TRAINING_SETTINGS = SettingNames()


class PerceptualBackboneMissing(FileNotFoundError):
    """The weight file of a perceptual network is not on this machine."""


class PerceptualWeightsError(ValueError):
    """A perceptual weight file exists but cannot be read or does not fit the network."""


def torchvision_checkpoint_path(net: str) -> Path:
    """Where torchvision's download puts the backbone ``net`` (``"vgg"`` or ``"alex"``)."""
    if net not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; use 'vgg' or 'alex'")
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_BACKBONES[net][0]


@contextlib.contextmanager
def _quiet_torchvision():
    # lpips builds its backbone with the deprecated ``pretrained=False``; the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*'pretrained' is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Arguments other than a weight enum.*")
        yield


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PerceptualWeightsError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); "
                                     "the file may be truncated: fetch it again") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PerceptualWeightsError(f"{what} {path} does not hold a state dict of tensors")
    return sd


def _finish(module: torch.nn.Module, device) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module.to(device) if device is not None else module


def _check_published_backbone(path: Path, net: str) -> None:
    """PerceptualWeightsError unless ``path`` is torchvision's published backbone file (by the
    SHA-256 start torchvision names it with; about a second for VGG16's 528 MB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise PerceptualWeightsError(f"LPIPS {net} backbone file {path} cannot be read: {exc.strerror or exc}") from None
    want = TORCHVISION_BACKBONE_SHA256[net]
    if not digest.hexdigest().startswith(want):
        fname, url = TORCHVISION_BACKBONES[net]
        raise PerceptualWeightsError(
            f"{path} is not torchvision's published {'VGG16' if net == 'vgg' else 'AlexNet'} checkpoint {fname} "
            f"(its SHA-256 starts {digest.hexdigest()[:8]}, the published file's {want}): LPIPS with it would not "
            f"be LPIPS. Download {url} again")


def _load_lpips_backbone(lp: torch.nn.Module, net: str, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' ``net.slice<k>.<i>.*`` modules,
    from the file torchvision publishes (checked by its SHA-256)."""
    _check_published_backbone(path, net)
    sd = _read_state_dict(path, f"LPIPS {net} backbone file")
    targets: dict[str, torch.nn.Parameter] = {}
    for sl in lp.net.children():              # slice1..slice5 hold torchvision's modules by index
        for idx, mod in sl.named_children():
            for pname, p in mod.named_parameters(recurse=False):
                targets[f"features.{idx}.{pname}"] = p
    missing = [k for k in targets if k not in sd]
    if missing:
        raise PerceptualWeightsError(
            f"{path} is not a torchvision {'VGG16' if net == 'vgg' else 'AlexNet'} checkpoint: "
            f"{len(missing)} backbone tensors missing (e.g. {missing[0]}); expected the file "
            f"torchvision downloads ({TORCHVISION_BACKBONES[net][0]})")
    with torch.no_grad():
        for k, p in targets.items():
            src = sd[k]
            if tuple(src.shape) != tuple(p.shape):
                raise PerceptualWeightsError(
                    f"{path}: {k} has shape {tuple(src.shape)}, the {net} backbone needs {tuple(p.shape)}; "
                    "is this the other backbone's file?")
            p.copy_(src.to(p.dtype))


def _load_lpips(net: str, backbone_path: Optional[Union[str, Path]],
                names: SettingNames) -> tuple[torch.nn.Module, str]:
    import lpips

    path = Path(backbone_path).expanduser() if backbone_path is not None else torchvision_checkpoint_path(net)
    if not path.is_file():
        fname, url = TORCHVISION_BACKBONES[net]
        given = f" ({names.path})" if backbone_path is not None and names.path else ""
        # where the caller looks: the given path, else torchvision's cache (or a path of one's own)
        hub = torchvision_checkpoint_path(net)
        if backbone_path is not None:
            put = f"put it at {path}" + (f" (or leave {names.path} empty and put it in torchvision's hub cache, "
                                         f"{hub})" if names.path else "")
        else:
            put = (f"put it at {hub} (torchvision's hub cache; TORCH_HOME moves it)"
                   + (f" or give its path as {names.path}" if names.path else ""))
        instead = [f"use {names.kind}=stlpips-{net} (weights ship in the stlpips-pytorch package)"] if names.kind else []
        instead += [names.turn_off] if names.turn_off else []
        raise PerceptualBackboneMissing(
            f"LPIPS-{net} needs its ImageNet backbone file and none was found at {path}{given}. "
            f"Download {url} on a connected machine and {put}."
            + (f" Without it {' or '.join(instead)}." if instead else ""))
    with _quiet_torchvision():
        # pnet_rand: build the backbone without downloading; pretrained: the linear heads
        # that ship inside the lpips package.
        lp = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _load_lpips_backbone(lp, net, path)
    label = f"LPIPS v0.1 ({'VGG16' if net == 'vgg' else 'AlexNet'} backbone from {path})"
    return lp, label


@contextlib.contextmanager
def _stand_ins_for_unused_imports():
    """Provide ``IPython.embed`` and ``torchsummary.summary`` while stlpips-pytorch imports.

    The package imports both at module level but calls neither, and does not declare them as
    dependencies. Stand-ins are added only for modules that are not installed, and removed
    right after, so no one else ever sees them.
    """
    added = []
    stubs = {"IPython": ("embed",), "torchsummary": ("summary",)}
    for name, attrs in stubs.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name, "stand-in for an unused import of stlpips-pytorch")

        def _unavailable(*args, _name=name, **kwargs):
            raise RuntimeError(f"{_name} is not installed (stlpips-pytorch imported it unused)")

        for a in attrs:
            setattr(mod, a, _unavailable)
        sys.modules[name] = mod
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _import_stlpips():
    if importlib.util.find_spec("stlpips_pytorch") is None:
        raise ImportError("ST-LPIPS needs the stlpips-pytorch package: pip install stlpips-pytorch "
                          "(its wheel carries the network weights, nothing is downloaded later)")
    with _stand_ins_for_unused_imports():
        return importlib.import_module("stlpips_pytorch.stlpips")


def stlpips_weights_path(net: str) -> Path:
    """The weight file of ST-LPIPS ``net`` inside the installed stlpips-pytorch package."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("stlpips-pytorch is not installed: pip install stlpips-pytorch")
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


def _load_stlpips(net: str, weights_path: Optional[Union[str, Path]],
                  names: SettingNames) -> tuple[torch.nn.Module, str]:
    st = _import_stlpips()
    path = Path(weights_path).expanduser() if weights_path is not None else stlpips_weights_path(net)
    if not path.is_file() and weights_path is not None:
        # the user's path is wrong, not the install: leaving it empty uses the packaged weights
        given = f" ({names.path})" if names.path else ""
        empty = f"leave {names.path} empty" if names.path else "give none"
        raise PerceptualBackboneMissing(
            f"ST-LPIPS-{net} weight file {path}{given} does not exist; fix the path, or {empty} to use the "
            "weights that ship in stlpips-pytorch")
    if not path.is_file():
        raise PerceptualBackboneMissing(
            f"ST-LPIPS-{net} weights not found at {path}, inside the installed stlpips-pytorch; reinstall it "
            "(pip install --force-reinstall stlpips-pytorch)"
            + (f" or give a copy of the file as {names.path}" if names.path else ""))
    with _quiet_torchvision():
        model = st.LPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
    sd = _read_state_dict(path, f"ST-LPIPS {net} weight file")
    # Load it ourselves, strictly: the package's own loader uses strict=False, which would
    # leave a mismatched network silently random. ``lins.<k>`` alias ``lin<k>``.
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("lins.")]
    if missing or result.unexpected_keys:
        raise PerceptualWeightsError(
            f"{path} does not fit ST-LPIPS-{net}: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}")
    return model, f"{STLPIPS_LABEL} [{net}]"


def _load_random_test() -> tuple[torch.nn.Module, str]:
    import lpips

    # A fixed seed makes the test metric reproducible without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]), _quiet_torchvision():
        torch.manual_seed(0)
        lp = lpips.LPIPS(net="alex", pnet_rand=True, pretrained=False, verbose=False)
    return lp, RANDOM_TEST_LABEL


def load_perceptual(kind: str = "lpips-vgg", backbone_path: Optional[Union[str, Path]] = None,
                    device: Optional[Union[str, torch.device]] = None,
                    names: SettingNames = TRAINING_SETTINGS) -> tuple[torch.nn.Module, str]:
    """Build the perceptual distance for TV-LPIPS; returns ``(module, label)``.

    ``kind``: one of :data:`PERCEPTUAL_KINDS` (see the module doc). ``backbone_path``: for
    ``lpips-*`` the torchvision backbone checkpoint (default: torchvision's hub cache file);
    for ``stlpips-*`` a replacement for the packaged weight file. ``module(x, y)`` takes
    images in ``[-1, 1]`` and returns ``[B, 1, 1, 1]``; it is frozen and in eval mode.
    ``label`` says honestly what the network is; log it next to every perceptual number.

    Error messages name the settings the caller's user types (``names``, a :class:`SettingNames`):
    by default ``fluxsr-train train``'s, where ``kind`` is ``loss.perceptual`` and
    ``backbone_path`` is ``loss.perceptual_path``; another front end (``fluxsr-train eval``) passes
    its own, or None for a setting it does not have.
    """
    if kind not in PERCEPTUAL_KINDS:
        raise ValueError(f"unknown perceptual kind {kind!r}; choose one of {', '.join(PERCEPTUAL_KINDS)}")
    family, _, net = kind.partition("-")
    if family == "lpips":
        module, label = _load_lpips(net, backbone_path, names)
    elif family == "stlpips":
        module, label = _load_stlpips(net, backbone_path, names)
    else:
        if backbone_path is not None:
            what = f"{names.kind}=random-test" if names.kind else "the random-test kind"
            path = names.path or "backbone path"
            raise ValueError(f"{what} takes no {path} (it has random weights); leave {path} empty")
        module, label = _load_random_test()
    return _finish(module, device), label

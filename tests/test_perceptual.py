"""The perceptual network loader: honest labels, offline weights, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxsr_training import perceptual as PC
from fluxsr_training.losses import tv_lpips
from fluxsr_training.perceptual import (PerceptualBackboneMissing, PerceptualWeightsError,
                                        load_perceptual, torchvision_checkpoint_path)


def images(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, size, size, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    return a, b


def test_random_test_kind_runs_and_says_what_it_is():
    fn, label = load_perceptual("random-test")
    assert label == "random-backbone LPIPS (TEST ONLY, not a perceptual metric)"
    assert not fn.training and not any(p.requires_grad for p in fn.parameters())
    a, b = images()
    x = (a * 2 - 1).requires_grad_(True)
    d = fn(x, b * 2 - 1)
    assert d.shape == (2, 1, 1, 1) and bool((d > 0).all())
    assert fn(x, x).abs().max().item() == 0.0
    d.sum().backward()
    assert x.grad.abs().sum() > 0                      # usable as a loss
    fn2, _ = load_perceptual("random-test")            # fixed seed: reproducible
    assert torch.equal(fn2(a * 2 - 1, b * 2 - 1), d.detach())
    assert tv_lpips(a, a, fn).item() == 0.0 and tv_lpips(a, b, fn).item() > 0
    with pytest.raises(ValueError, match="loss.perceptual=random-test takes no loss.perceptual_path"):
        load_perceptual("random-test", backbone_path="x.pth")


def test_unknown_kind():
    with pytest.raises(ValueError, match="lpips-vgg, lpips-alex, stlpips-vgg"):
        load_perceptual("dists")


def test_missing_backbone_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert torchvision_checkpoint_path("vgg") == expected
    with pytest.raises(PerceptualBackboneMissing) as e:
        load_perceptual("lpips-vgg")
    msg = str(e.value)
    assert str(expected) in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert isinstance(e.value, FileNotFoundError)
    # the keys a `fluxsr-train train` user types, not the Python argument names
    assert "loss.perceptual_path" in msg and "loss.perceptual=stlpips-vgg" in msg and "loss.w_tvlpips=0" in msg
    assert "backbone_path" not in msg and "kind=" not in msg
    with pytest.raises(PerceptualBackboneMissing, match="alexnet-owt-7be5be79.pth") as e:
        load_perceptual("lpips-alex", backbone_path=tmp_path / "nope.pth")
    assert f"{tmp_path / 'nope.pth'} (loss.perceptual_path)" in str(e.value)
    assert f"put it at {tmp_path / 'nope.pth'} (or leave loss.perceptual_path empty" in str(e.value)


def test_messages_name_the_callers_own_settings(tmp_path, monkeypatch):
    """`fluxsr-train eval` shows these messages too, where the training keys mean nothing: the
    caller names its settings (eval: the AlexNet file comes from --weights-dir; no setting
    gives ST-LPIPS weights, and a missing metric is skipped, not turned off)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    eval_names = PC.SettingNames(path="--weights-dir", kind=None, turn_off=None)
    where = tmp_path / "w" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(PerceptualBackboneMissing) as e:
        load_perceptual("lpips-alex", backbone_path=where, names=eval_names)
    msg = str(e.value)
    assert f"none was found at {where} (--weights-dir)" in msg and f"put it at {where}" in msg
    assert "loss." not in msg and "Without it" not in msg
    with pytest.raises(PerceptualBackboneMissing) as e:
        load_perceptual("lpips-vgg", names=PC.SettingNames(path=None, kind=None, turn_off=None))
    assert "loss." not in str(e.value) and "give its path" not in str(e.value)
    with pytest.raises(ValueError, match="^the random-test kind takes no --weights-dir"):
        load_perceptual("random-test", backbone_path="x.pth", names=eval_names)


def _alexnet_features_file(path, seed=3):
    """A torchvision-format AlexNet checkpoint with random weights (features only, ~10 MB)."""
    import torchvision

    torch.manual_seed(seed)
    feats = torchvision.models.alexnet(weights=None).features
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def published(monkeypatch, path, net="alex"):
    """Take ``path`` (random test weights) for torchvision's published file in the SHA-256 check."""
    import hashlib

    monkeypatch.setitem(PC.TORCHVISION_BACKBONE_SHA256, net, hashlib.sha256(path.read_bytes()).hexdigest()[:8])


def test_lpips_backbone_loads_from_hub_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = torchvision_checkpoint_path("alex")
    sd = _alexnet_features_file(path)
    # under the published name, other weights are no LPIPS backbone: refused by their SHA-256
    with pytest.raises(PerceptualWeightsError, match=r"is not torchvision's published AlexNet checkpoint "
                                                     r"alexnet-owt-7be5be79.pth \(its SHA-256 starts [0-9a-f]{8}, the "
                                                     r"published file's 7be5be79\)"):
        load_perceptual("lpips-alex")
    published(monkeypatch, path)
    fn, label = load_perceptual("lpips-alex")
    assert label == f"LPIPS v0.1 (AlexNet backbone from {path})"
    # the backbone is the file's, the heads are the lpips package's (not random)
    assert torch.equal(fn.net.slice1[0].weight, sd["features.0.weight"])
    assert torch.equal(getattr(fn.net.slice5, "10").weight, sd["features.10.weight"])
    import os

    import lpips
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"),
                       map_location="cpu", weights_only=True)
    assert torch.equal(fn.lin0.model[1].weight, heads["lin0.model.1.weight"])
    a, b = images()
    assert fn(a * 2 - 1, a * 2 - 1).abs().max().item() == 0.0
    assert bool((fn(a * 2 - 1, b * 2 - 1) > 0).all())


def test_lpips_backbone_file_errors(tmp_path, monkeypatch):
    """Files that pass the SHA-256 check (as if published) and still do not fit are named."""
    wrong = tmp_path / "vgg-for-alex.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    published(monkeypatch, wrong)
    with pytest.raises(PerceptualWeightsError, match="not a torchvision AlexNet checkpoint"):
        load_perceptual("lpips-alex", backbone_path=wrong)
    good = tmp_path / "alex.pth"
    sd = _alexnet_features_file(good)
    shapes = dict(sd)
    shapes["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(shapes, tmp_path / "bad-shape.pth")
    published(monkeypatch, tmp_path / "bad-shape.pth")
    with pytest.raises(PerceptualWeightsError, match=r"features.0.weight has shape \(64, 3, 3, 3\)"):
        load_perceptual("lpips-alex", backbone_path=tmp_path / "bad-shape.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    published(monkeypatch, tmp_path / "cut.pth")
    with pytest.raises(PerceptualWeightsError, match="cannot be read"):
        load_perceptual("lpips-alex", backbone_path=tmp_path / "cut.pth")


def test_stlpips_missing_package_is_a_clear_error(monkeypatch):
    real = PC.importlib.util.find_spec
    monkeypatch.setattr(PC.importlib.util, "find_spec",
                        lambda name, *a: None if name == "stlpips_pytorch" else real(name, *a))
    monkeypatch.delitem(sys.modules, "stlpips_pytorch.stlpips", raising=False)
    with pytest.raises(ImportError, match="pip install stlpips-pytorch"):
        load_perceptual("stlpips-alex")


def test_stlpips_with_a_wrong_path_blames_the_path_not_the_install(tmp_path):
    pytest.importorskip("stlpips_pytorch")
    with pytest.raises(PerceptualBackboneMissing) as e:
        load_perceptual("stlpips-vgg", backbone_path=tmp_path / "y.pth")
    msg = str(e.value)
    assert f"{tmp_path / 'y.pth'} (loss.perceptual_path) does not exist" in msg
    assert "leave loss.perceptual_path empty" in msg and "reinstall" not in msg and "backbone_path" not in msg


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_stlpips_offline(net):
    pytest.importorskip("stlpips_pytorch")
    had_ipython = "IPython" in sys.modules
    fn, label = load_perceptual(f"stlpips-{net}")
    assert label == f"ST-LPIPS (shift-tolerant LPIPS, stlpips-pytorch package weights) [{net}]"
    assert ("IPython" in sys.modules) == had_ipython       # no stand-in left behind
    assert not fn.training and not any(p.requires_grad for p in fn.parameters())
    # the packaged weights were really loaded (not the random init)
    sd = torch.load(PC.stlpips_weights_path(net), map_location="cpu", weights_only=True)
    for k, v in fn.state_dict().items():
        if not k.startswith("lins."):
            assert torch.equal(v, sd[k]), k
    a, b = images()
    x, y = a * 2 - 1, b * 2 - 1
    assert fn(x, x).abs().max().item() == 0.0
    d_noise = fn(x, y).flatten()
    assert bool((d_noise > 0).all())
    d_more = fn(x, (a + 0.5 * (b - a) * 3).clamp(0, 1) * 2 - 1).flatten()
    assert bool((d_more > d_noise).all())                 # more distortion, larger distance

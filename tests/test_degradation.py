"""Real-ESRGAN degradation: reproducibility, sizes, value grid, stage switches, noise and JPEG
numbers, kernels against their closed forms, config files and errors."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fluxsr_training import degradation as D
from fluxsr_training.degradation import DegradationConfig, DegradationConfigError, degrade

ALL_OFF = dict(blur1=False, resize1=False, noise1=False, jpeg1=False, second_stage=False,
               blur2=False, resize2=False, noise2=False, jpeg2=False, final_sinc=False)


def only(scale=1, **kw) -> DegradationConfig:
    """Config with every stage off except those switched on in ``kw``."""
    return DegradationConfig(**{**ALL_OFF, "scale": scale, **kw})


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """skimage's astronaut, area-downscaled to 96x96 (divisible by 2, 3 and 4)."""
    from skimage import data

    img = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(img, size=(96, 96), mode="area").clamp(0, 1)


def flat(value=0.5, size=128) -> torch.Tensor:
    return torch.full((1, 3, size, size), value)


def to_u8(x: torch.Tensor) -> np.ndarray:
    return torch.clamp((x[0] * 255).round(), 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------ reproducibility, shapes

def test_same_seed_same_output_other_seed_different(photo):
    a = degrade(photo, seed=7)
    b = degrade(photo, seed=7)
    assert torch.equal(a, b)
    c = degrade(photo, seed=8)
    assert not torch.equal(a, c)


def test_int_seed_means_consecutive_per_image_seeds(photo):
    batch = torch.cat([photo, photo.flip(-1), photo.flip(-2)])
    out = degrade(batch, seed=11)
    for i in range(3):
        assert torch.equal(out[i:i + 1], degrade(batch[i:i + 1], seed=11 + i))
    listed = degrade(batch, seed=[11, 12, 13])
    assert torch.equal(out, listed)
    # identical images with different seeds get different degradations
    two = degrade(torch.cat([photo, photo]), seed=[1, 2])
    assert not torch.equal(two[0], two[1])


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_size_range_and_8bit_grid(photo, scale):
    cfg = DegradationConfig(scale=scale)
    for seed in range(6):
        lr = degrade(photo, cfg, seed)
        assert lr.shape == (1, 3, 96 // scale, 96 // scale)
        assert lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.allclose(lr * 255, (lr * 255).round(), atol=1e-4)


def test_rectangular_and_tiny_images_survive_strong_downscale():
    # 8 px sides: the first resize can reach 0.15 x, kernels up to 21 px exceed the image
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    for seed in range(0, 40, 2):
        assert degrade(x, seed=seed).shape == (2, 3, 2, 3)


def test_published_table_is_the_default_and_the_shipped_file():
    c = DegradationConfig()
    assert c.scale == 4 and c.blur_kernel_size == 21
    assert c.kernel_list == ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    assert c.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (c.sinc_prob, c.blur_sigma, c.betag_range, c.betap_range) == (0.1, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
    assert (c.sinc_prob2, c.blur_sigma2, c.betag_range2, c.betap_range2) == (0.1, (0.2, 1.5), (0.5, 4.0), (1.0, 2.0))
    assert c.final_sinc_prob == 0.8
    assert (c.resize_prob, c.resize_range, c.gaussian_noise_prob, c.noise_range) == (
        (0.2, 0.7, 0.1), (0.15, 1.5), 0.5, (1, 30))
    assert (c.poisson_scale_range, c.gray_noise_prob, c.jpeg_range) == ((0.05, 3), 0.4, (30, 95))
    assert (c.second_blur_prob, c.resize_prob2, c.resize_range2, c.gaussian_noise_prob2) == (
        0.8, (0.3, 0.4, 0.3), (0.3, 1.2), 0.5)
    assert (c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2, c.jpeg_range2) == (
        (1, 25), (0.05, 2.5), 0.4, (30, 95))
    assert c.resize_modes == ("area", "bilinear", "bicubic")
    assert DegradationConfig.from_file(D.shipped_config_path()) == c


def test_draw_frequencies_follow_the_table():
    cfg = DegradationConfig()
    n = 1500
    draws = [D.sample_params(cfg, s) for s in range(n)]
    freq = lambda pred: sum(pred(p) for p in draws) / n  # noqa: E731
    tol = 4 * math.sqrt(0.25 / n)  # 4 sigma of a proportion
    assert abs(freq(lambda p: p.kernel1.kind == "sinc") - 0.1) < tol
    assert abs(freq(lambda p: p.kernel1.kind == "iso") - 0.9 * 0.45) < tol
    assert abs(freq(lambda p: p.sinc is not None) - 0.8) < tol
    assert abs(freq(lambda p: p.resize1.updown == "down") - 0.7) < tol
    assert abs(freq(lambda p: p.resize2.updown == "keep") - 0.3) < tol
    assert abs(freq(lambda p: p.noise1.kind == "gaussian") - 0.5) < tol
    assert abs(freq(lambda p: p.noise2.gray) - 0.4) < tol
    assert abs(freq(lambda p: p.apply_blur2) - 0.8) < tol
    assert abs(freq(lambda p: p.resize_first) - 0.5) < tol
    assert {p.kernel1.size for p in draws} == set(range(7, 22, 2))
    assert all(0.15 <= p.resize1.factor <= 1.5 and 30 <= p.jpeg1_quality <= 95 for p in draws)
    assert all(0.2 <= p.kernel2.sigma_x <= 1.5 for p in draws if p.kernel2.kind != "sinc")
    sinc_small = [p.kernel1.omega_c for p in draws if p.kernel1.kind == "sinc" and p.kernel1.size < 13]
    assert all(math.pi / 3 <= w <= math.pi for w in sinc_small)
    json.dumps(draws[0].to_dict())  # the description is JSON-ready


def test_switching_one_stage_off_keeps_the_other_draws():
    a = D.sample_params(DegradationConfig(), 5)
    b = D.sample_params(DegradationConfig(noise1=False, second_stage=False), 5)
    assert a.to_dict() == b.to_dict()
    c = D.sample_params(DegradationConfig(kernel_prob=(1, 0, 0, 0, 0, 0)), 5)
    assert (c.resize1, c.noise1, c.noise2, c.jpeg2_quality) == (a.resize1, a.noise1, a.noise2, a.jpeg2_quality)


# ------------------------------------------------------------------ stage switches

def test_all_off_area_is_block_mean_rounded(photo):
    lr = degrade(photo, only(scale=4, final_resize_modes=("area",)), seed=3)
    expect = photo.reshape(1, 3, 24, 4, 24, 4).mean(dim=(3, 5))
    assert torch.equal(lr, torch.clamp((expect * 255).round(), 0, 255) / 255)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_all_off_is_plain_interpolate_rounded(photo, mode):
    lr = degrade(photo, only(scale=3, final_resize_modes=(mode,)), seed=3)
    ref = F.interpolate(photo, size=(32, 32), mode=mode, align_corners=False)
    assert torch.equal(lr, torch.clamp((ref * 255).round(), 0, 255) / 255)


def test_all_off_scale_one_only_rounds(photo):
    assert torch.equal(degrade(photo, only(scale=1), seed=0), (photo * 255).round() / 255)


def test_blur_only_applies_the_drawn_kernel(photo):
    cfg = only(blur1=True)
    p = D.sample_params(cfg, 21)
    ref = D.filter2d(photo, p.kernel1.kernel)
    out = degrade(photo, cfg, 21)
    assert torch.equal(out, torch.clamp((ref * 255).round(), 0, 255) / 255)
    assert not torch.equal(out, degrade(photo, only(), 21))


def test_each_stage_switch_changes_the_result(photo):
    # a seed's draws are fixed, so turning on any one stage (with its probabilities at 1)
    # must move the output away from the all-off result
    base = degrade(photo, only(scale=2), seed=4)
    forced = dict(second_blur_prob=1.0, final_sinc_prob=1.0, resize_prob=(0, 1, 0), resize_prob2=(0, 1, 0))
    for stage in ("blur1", "resize1", "noise1", "jpeg1", "final_sinc"):
        out = degrade(photo, only(scale=2, **forced, **{stage: True}), seed=4)
        assert out.shape == base.shape and not torch.equal(out, base), stage
    for stage in ("blur2", "resize2", "noise2", "jpeg2"):
        on = degrade(photo, only(scale=2, second_stage=True, **forced, **{stage: True}), seed=4)
        off = degrade(photo, only(scale=2, second_stage=False, **forced, **{stage: True}), seed=4)
        assert not torch.equal(on, base), stage
        assert torch.equal(off, base), f"second_stage=False must switch off {stage}"


# ------------------------------------------------------------------ noise

def test_gaussian_noise_std_on_flat_grey():
    cfg = only(noise1=True, gaussian_noise_prob=1.0, noise_range=(10, 10), gray_noise_prob=0.0)
    out = degrade(flat(0.5), cfg, seed=1)
    noise = out - 0.5
    assert abs(noise.mean().item()) < 0.3 / 255
    assert noise.std().item() * 255 == pytest.approx(10.0, rel=0.04)
    assert not torch.equal(out[:, 0], out[:, 1])  # colour noise: channels differ


def test_gray_gaussian_noise_is_shared_by_the_channels():
    cfg = only(noise1=True, gaussian_noise_prob=1.0, noise_range=(10, 10), gray_noise_prob=1.0)
    out = degrade(flat(0.5), cfg, seed=1)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert (out - 0.5).std().item() * 255 == pytest.approx(10.0, rel=0.04)


def _poisson_probe(scale_value: float, gray: bool = False) -> torch.Tensor:
    # flat 0.5 with one ramp row holding all 256 levels: vals = 256 (basicsr's formula)
    img = flat(0.5)
    img[:, :, 0, :] = torch.linspace(0, 1, 128)
    img[:, :, 1, :] = torch.linspace(1, 0, 128)
    img = (img * 255).round() / 255
    assert torch.unique(img).numel() > 128
    cfg = only(noise1=True, gaussian_noise_prob=0.0, poisson_scale_range=(scale_value, scale_value),
               gray_noise_prob=1.0 if gray else 0.0)
    return degrade(img, cfg, seed=2)[:, :, 8:, :]


def test_poisson_noise_std_scales_with_the_configured_scale():
    q = round(0.5 * 255) / 255  # the 8-bit level basicsr rounds the image to
    expected_unit = math.sqrt(q * 256) / 256  # std of Poisson(q * vals) / vals
    s1 = (_poisson_probe(1.0) - 0.5).std().item()
    s05 = (_poisson_probe(0.5) - 0.5).std().item()
    assert s1 == pytest.approx(expected_unit, rel=0.06)
    assert s05 == pytest.approx(0.5 * expected_unit, rel=0.08)
    # same seed -> same Poisson sample, so the noise itself halves (up to 8-bit rounding)
    assert torch.allclose(_poisson_probe(0.5) - 0.5, (_poisson_probe(1.0) - 0.5) / 2, atol=1.01 / 255)


def test_gray_poisson_noise_is_shared_by_the_channels():
    out = _poisson_probe(1.0, gray=True)
    d = out - out.mean()
    assert torch.allclose(d[:, 0], d[:, 1], atol=1.01 / 255) and torch.allclose(d[:, 1], d[:, 2], atol=1.01 / 255)
    assert d.std().item() > 5 / 255


# ------------------------------------------------------------------ JPEG

@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_only_equals_pillow_roundtrip(photo, quality):
    out = degrade(photo, only(jpeg1=True, jpeg_range=(quality, quality)), seed=0)
    buf = io.BytesIO()
    Image.fromarray(to_u8(photo)).save(buf, format="JPEG", quality=quality)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(to_u8(out), ref)
    assert not np.array_equal(ref, to_u8(photo))


def test_second_jpeg_uses_its_own_range(photo):
    out = degrade(photo, only(second_stage=True, jpeg2=True, jpeg_range2=(40, 40)), seed=0)
    buf = io.BytesIO()
    Image.fromarray(to_u8(photo)).save(buf, format="JPEG", quality=40)
    assert np.array_equal(to_u8(out), np.asarray(Image.open(buf).convert("RGB")))


# ------------------------------------------------------------------ kernels

def _np_quadratic(k, sx, sy, theta):
    ax = np.arange(k) - k // 2
    xx, yy = np.meshgrid(ax, ax)
    u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv = np.linalg.inv(u @ np.diag([sx ** 2, sy ** 2]) @ u.T)
    return inv[0, 0] * xx ** 2 + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy ** 2


def test_kernels_match_closed_forms_and_sum_to_one():
    q = _np_quadratic(15, 2.0, 0.7, 0.6)
    for got, form in [
        (D.bivariate_gaussian_kernel(15, 2.0, 0.7, 0.6, isotropic=False), np.exp(-0.5 * q)),
        (D.generalized_gaussian_kernel(15, 2.0, 0.7, 0.6, 1.7, isotropic=False), np.exp(-0.5 * q ** 1.7)),
        (D.plateau_kernel(15, 2.0, 0.7, 0.6, 1.3, isotropic=False), 1 / (1 + q ** 1.3)),
    ]:
        assert got.sum().item() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(got.numpy(), form / form.sum(), rtol=1e-10, atol=1e-14)
    # a Gaussian's sample variance along its axis is about sigma^2 when the kernel is wide enough
    g = D.bivariate_gaussian_kernel(21, 1.5)
    ax = torch.arange(21, dtype=torch.float64) - 10
    assert (g.sum(0) * ax ** 2).sum().item() == pytest.approx(1.5 ** 2, rel=1e-3)


def test_kernel_symmetries():
    for k in (D.bivariate_gaussian_kernel(13, 1.8), D.generalized_gaussian_kernel(13, 1.8, beta=0.6),
              D.plateau_kernel(13, 1.8, beta=1.5), D.circular_lowpass_kernel(1.2, 13)):
        assert torch.allclose(k, k.T, atol=1e-15)
        assert torch.allclose(k, k.flip(0), atol=1e-15) and torch.allclose(k, k.flip(1), atol=1e-15)
    aniso = D.generalized_gaussian_kernel(13, 2.5, 0.8, 0.4, 1.5, isotropic=False)
    assert torch.allclose(aniso, aniso.flip(0, 1), atol=1e-15)  # point-symmetric
    assert not torch.allclose(aniso, aniso.T, atol=1e-6)  # but not isotropic
    assert torch.equal(D.bivariate_gaussian_kernel(9, 2.0, 0.5, 1.0, isotropic=True),
                       D.bivariate_gaussian_kernel(9, 2.0))  # isotropic ignores sig_y and theta


def test_sinc_kernel_is_the_jinc_and_low_pass():
    from scipy import special

    wc, k = 1.3, 21
    got = D.circular_lowpass_kernel(wc, k)
    ax = np.arange(k) - k // 2
    r = np.hypot(*np.meshgrid(ax, ax))
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = wc * special.j1(wc * r) / (2 * np.pi * r)
    ref[k // 2, k // 2] = wc ** 2 / (4 * np.pi)
    np.testing.assert_allclose(got.numpy(), ref / ref.sum(), atol=1e-7)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)

    cutoff = math.pi / 3
    kern = D.circular_lowpass_kernel(cutoff, 21, pad_to=21).numpy()
    n = 128
    resp = np.abs(np.fft.fftshift(np.fft.fft2(kern, s=(n, n))))
    f = np.fft.fftshift(np.fft.fftfreq(n)) * 2 * np.pi
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rad = np.hypot(fx, fy)
    assert resp[rad == 0].item() == pytest.approx(1.0, abs=1e-9)
    assert resp[rad < 0.7 * cutoff].min() > 0.85  # pass band
    assert resp[rad > 1.4 * cutoff].max() < 0.1  # stop band (ripple of the truncated jinc)
    padded = D.circular_lowpass_kernel(cutoff, 13, pad_to=21)
    assert padded.shape == (21, 21) and torch.equal(padded[4:17, 4:17], D.circular_lowpass_kernel(cutoff, 13))


def test_filter2d_pads_by_reflection():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    k = D.bivariate_gaussian_kernel(7, 1.2)
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect").view(3, 1, 22, 22), k.float().view(1, 1, 7, 7))
    assert torch.allclose(D.filter2d(x, k), ref.view(1, 3, 16, 16), atol=1e-6)
    delta = torch.zeros(7, 7, dtype=torch.float64)
    delta[3, 3] = 1
    assert torch.equal(D.filter2d(x, delta), x)
    # image smaller than the padding: replicate instead of failing
    assert D.filter2d(torch.rand(1, 3, 3, 3), D.bivariate_gaussian_kernel(21, 2.0)).shape == (1, 3, 3, 3)


def test_usm_sharpen_raises_edge_contrast_and_leaves_flat_alone():
    step = torch.zeros(1, 3, 64, 64)
    step[..., 32:] = 0.8
    step += 0.1
    sharp = D.usm_sharp(step)
    assert sharp[..., 31].mean() < step[..., 31].mean() and sharp[..., 32].mean() > step[..., 32].mean()
    assert torch.allclose(D.usm_sharp(flat(0.4, 64)), flat(0.4, 64), atol=1e-6)
    cfg = only(scale=1, usm_sharpen=True)
    assert not torch.equal(degrade(step, cfg, 0), degrade(step, only(scale=1), 0))


# ------------------------------------------------------------------ config files and errors

def test_from_dict_and_files_roundtrip(tmp_path):
    c = DegradationConfig.from_dict({"scale": 2, "noise_range": [5, 5], "_note": "comments are ignored"})
    assert c.scale == 2 and c.noise_range == (5, 5) and c.jpeg_range == (30, 95)
    assert DegradationConfig.from_dict(c.to_dict()) == c
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"scale": 3, "jpeg1": False}))
    assert DegradationConfig.from_file(p) == DegradationConfig(scale=3, jpeg1=False)
    t = tmp_path / "d.toml"
    t.write_text('scale = 2\nresize_prob = [0.0, 1.0, 0.0]\nfinal_resize_modes = ["area"]\nnoise1 = false\n')
    assert DegradationConfig.from_file(t) == DegradationConfig(
        scale=2, resize_prob=(0.0, 1.0, 0.0), final_resize_modes=("area",), noise1=False)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(DegradationConfigError, match=r"unknown keys: 'noise_rnage' \(did you mean noise_range"):
        DegradationConfig.from_dict({"noise_rnage": [1, 2]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scael": 4}))
    with pytest.raises(DegradationConfigError, match="bad.json.*scael"):
        DegradationConfig.from_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{scale: 4")
    with pytest.raises(DegradationConfigError, match="not valid JSON"):
        DegradationConfig.from_file(broken)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DegradationConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(DegradationConfigError, match="unsupported extension"):
        (tmp_path / "c.yaml").write_text("scale: 4")
        DegradationConfig.from_file(tmp_path / "c.yaml")
    for kw, msg in [
        ({"scale": 0}, "scale"), ({"scale": 2.5}, "scale"), ({"scale": True}, "scale"),
        ({"resize_prob": (0.5, 0.5, 0.5)}, "sum to 1"), ({"noise_range": (30, 1)}, "low <= high"),
        ({"kernel_list": ("iso", "box")}, "unknown kernel names"), ({"kernel_prob": (1.0,)}, "kernel_prob"),
        ({"sinc_prob": 1.5}, r"\[0, 1\]"), ({"jpeg_range": (30, 120)}, r"\[1, 100\]"),
        ({"resize_modes": ("lanczos",)}, "resize_modes"), ({"blur_kernel_size": 20}, "odd"),
        ({"blur1": "yes"}, "true or false"), ({"resize_range": (1.2, 1.5)}, "contain 1"),
    ]:
        with pytest.raises(DegradationConfigError, match=msg):
            DegradationConfig(**kw)


def test_input_errors(photo):
    with pytest.raises(ValueError, match="not divisible by scale 4.*92x96"):
        degrade(photo[..., :94, :], seed=0)
    with pytest.raises(ValueError, match="divisible by scale 3"):
        degrade(photo[..., :94, :94], DegradationConfig(scale=3), seed=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        degrade(photo[:, :1], seed=0)
    with pytest.raises(ValueError, match="float"):
        degrade((photo * 255).to(torch.uint8), seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(photo * 1.5, seed=0)
    with pytest.raises(ValueError, match="2 seeds for a batch of 1"):
        degrade(photo, seed=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        degrade(photo, seed=-1)
    with pytest.raises(TypeError, match="DegradationConfig"):
        degrade(photo, {"scale": 4}, seed=0)


def test_config_is_frozen_and_replace_validates():
    c = DegradationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.scale = 2  # type: ignore[misc]
    with pytest.raises(DegradationConfigError):
        dataclasses.replace(c, gray_noise_prob=-0.1)


# ------------------------------------------------------------------ back to HR size

def test_degrade_to_hr_size_uses_the_upscalers_resize(photo):
    from fluxsr_core import images

    batch = torch.cat([photo, photo.flip(-1)])
    out = D.degrade_to_hr_size(batch, DegradationConfig(), seed=[3, 9])
    lr = degrade(batch, DegradationConfig(), seed=[3, 9])
    assert out.shape == batch.shape
    assert torch.equal(out, images.resize(lr, (96, 96)))  # the upscaler's call: default kind
    assert out.min() >= 0 and out.max() <= 1
    near = D.degrade_to_hr_size(batch, DegradationConfig(), seed=[3, 9], kind="nearest")
    assert torch.equal(near, images.resize(lr, (96, 96), kind="nearest"))
    # all stages off, x2: the round trip only loses what the downscale and 8-bit rounding lose
    plain = D.degrade_to_hr_size(photo, only(scale=2, final_resize_modes=("area",)), seed=0)
    assert (plain - photo).abs().mean() < 0.05
    degraded = D.degrade_to_hr_size(photo, DegradationConfig(scale=2), seed=0)
    assert (degraded - photo).abs().mean() > (plain - photo).abs().mean()

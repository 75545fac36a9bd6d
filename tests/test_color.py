"""Tests for fluxsr_core.color against hand-computed numbers and measured cast removal."""

from __future__ import annotations

import math

import pytest
import torch

from fluxsr_core.color import (
    COLOR_FIXES, adain_color_fix, apply_color_fix, wavelet_color_fix, wavelet_decomposition,
)


def smooth_image(b=1, h=48, w=40, seed=0):
    """Low-frequency content plus fine detail, well inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 4, 4, generator=g)
    base = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic",
                                           align_corners=False)
    detail = 0.05 * torch.randn(b, 3, h, w, generator=g)
    return (0.2 + 0.6 * base + detail).clamp(0.05, 0.95)


# --- AdaIN -----------------------------------------------------------------------------------

def test_adain_constant_target_becomes_source_mean():
    target = torch.full((1, 3, 2, 2), 0.2)
    source = torch.tensor([0.0, 0.1, 0.2, 0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = adain_color_fix(target, source)
    # (t - mean_t) is exactly 0, so every pixel becomes the source mean (0 + .1 + .2 + .5) / 4
    assert torch.allclose(out, torch.full_like(out, 0.2), atol=1e-7)
    out2 = adain_color_fix(torch.full((1, 3, 2, 2), 0.9), source)
    assert torch.allclose(out2, torch.full_like(out2, 0.2), atol=1e-7)


def test_adain_linear_ramp_by_hand():
    # target: ramp 0, 1/3, 2/3, 1 (mean 1/2, unbiased variance 5/27);
    # source: 0.5 * ramp + 0.1 (mean 0.35, variance 5/108).
    ramp = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = adain_color_fix(ramp, 0.5 * ramp + 0.1)
    eps = 1e-5
    k = math.sqrt(5 / 108 + eps) / math.sqrt(5 / 27 + eps)
    expected = [(x - 0.5) * k + 0.35 for x in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert torch.allclose(out[0, 1, 0], torch.tensor(expected), atol=1e-6)
    # ... which is the source itself up to the eps regularisation
    assert (out - (0.5 * ramp + 0.1)).abs().max() < 5e-5


def test_adain_per_channel_and_per_image():
    t = smooth_image(b=2, seed=1)
    s = smooth_image(b=2, seed=2)
    out = adain_color_fix(t, s)
    assert torch.allclose(out.mean(dim=(2, 3)), s.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.flatten(2).std(dim=2), s.flatten(2).std(dim=2), atol=1e-4)
    # image 1 of the batch does not influence image 0
    assert torch.allclose(adain_color_fix(t[:1], s[:1]), out[:1], atol=1e-7)


# --- wavelet ---------------------------------------------------------------------------------

def test_wavelet_kernel_by_hand():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 16.0
    high, low = wavelet_decomposition(x, levels=1)
    # one level: the impulse spreads as [[1,2,1],[2,4,2],[1,2,1]]
    assert low[0, 0, 3:6, 3:6].tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    assert low.sum() == 16 and high[0, 0, 4, 4] == 12
    # level 2 uses the kernel dilated by 2: a single blur of a centred impulse at dilation 2
    from fluxsr_core.color import _wavelet_blur
    d2 = _wavelet_blur(x, 2)
    assert d2[0, 0, 2, 2] == 1 and d2[0, 0, 4, 2] == 2 and d2[0, 0, 3, 3] == 0


@pytest.mark.parametrize("shape,dilation", [((2, 3, 40, 56), 1), ((1, 3, 33, 20), 4), ((1, 1, 5, 7), 8)])
def test_separable_blur_is_the_dilated_3x3_kernel(shape, dilation):
    """The blur runs as two passes of shifted adds; it is the 3x3 kernel with holes and
    replicate borders, as a depthwise conv2d computes it (also where the dilation exceeds the
    image)."""
    import torch.nn.functional as F

    from fluxsr_core.color import _wavelet_blur

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(dilation))
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).expand(shape[1], 1, 3, 3)
    ref = F.conv2d(F.pad(x, (dilation,) * 4, mode="replicate"), k, groups=shape[1], dilation=dilation)
    torch.testing.assert_close(_wavelet_blur(x, dilation), ref, rtol=0, atol=1e-6)


def test_wavelet_decomposition_sums_to_input():
    x = smooth_image(b=2, seed=3)
    for levels in (1, 3, 5):
        high, low = wavelet_decomposition(x, levels)
        assert (high + low - x).abs().max() < 1e-6
    # the low residual of 5 levels is smooth: far less gradient energy than the input
    high, low = wavelet_decomposition(x, 5)
    assert low.diff(dim=-1).pow(2).mean() < 0.05 * x.diff(dim=-1).pow(2).mean()


def test_wavelet_constant_image_is_all_low():
    x = torch.full((1, 3, 7, 5), 0.37)
    high, low = wavelet_decomposition(x, 5)  # dilation 16 > image size: replicate padding
    assert high.abs().max() < 1e-7 and (low - 0.37).abs().max() < 1e-7


def test_fix_with_itself_is_identity():
    x = smooth_image(seed=4)
    assert (wavelet_color_fix(x, x) - x).abs().max() < 1e-6
    assert (adain_color_fix(x, x) - x).abs().max() < 1e-5
    assert torch.equal(apply_color_fix("none", x, x), x)


# --- cast removal, measured ------------------------------------------------------------------

def test_global_cast_removed_by_both():
    source = smooth_image(seed=5)
    cast = torch.tensor([0.08, -0.05, 0.06]).view(1, 3, 1, 1)
    target = source + cast
    before = (target - source).abs().mean().item()          # 0.0633
    after_adain = (adain_color_fix(target, source) - source).abs().mean().item()
    after_wave = (wavelet_color_fix(target, source) - source).abs().mean().item()
    assert abs(before - 0.19 / 3) < 1e-6
    assert after_adain < 1e-5 and after_wave < 1e-5, (after_adain, after_wave)


def test_varying_tint_removed_by_wavelet_better_than_adain():
    source = smooth_image(h=96, w=128, seed=6)
    ramp = torch.linspace(-0.1, 0.1, source.shape[-1]).view(1, 1, 1, -1)
    target = source + ramp * torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    before = (target - source).abs().mean().item()
    after_adain = (adain_color_fix(target, source) - source).abs().mean().item()
    after_wave = (wavelet_color_fix(target, source) - source).abs().mean().item()
    # measured: before 0.0336, adain 0.0303, wavelet 0.00095 (the tint is low frequency; what is
    # left sits within ~30 px of the left/right borders, where replicate padding bends the ramp)
    assert after_wave < 0.05 * before and after_wave < 0.05 * after_adain, (after_adain, after_wave)
    assert after_adain > 0.5 * before  # one mean/std per channel cannot undo a varying tint


def test_detail_of_target_is_kept_by_wavelet():
    source = smooth_image(seed=7)
    g = torch.Generator().manual_seed(8)
    fine = 0.05 * torch.randn(source.shape, generator=g)  # pixel-level detail only the SR has
    out = wavelet_color_fix(source + fine + 0.1, source)
    # the colour cast is gone, the fine detail stays (most of its energy is high-frequency)
    kept = ((out - source) * fine).sum() / (fine * fine).sum()
    assert kept > 0.9 and (out - source - fine).mean().abs() < 1e-3


# --- entry point -----------------------------------------------------------------------------

def test_apply_color_fix_names_and_clamp():
    source = smooth_image(seed=9)
    target = source + 0.5  # pushed out of range
    for name in ("adain", "WAVELET", " wavelet "):
        out = apply_color_fix(name, target, source)
        assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(apply_color_fix("adain", target, source),
                          adain_color_fix(target, source).clamp(0, 1))
    assert COLOR_FIXES == ("none", "adain", "wavelet")
    with pytest.raises(ValueError, match="unknown colour fix 'histogram'.*none, adain, wavelet"):
        apply_color_fix("histogram", target, source)


def test_shape_mismatch_and_dtype():
    with pytest.raises(ValueError, match="same shape.*resize"):
        adain_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    x = smooth_image(seed=10).half()
    assert wavelet_color_fix(x, x).dtype == torch.float16
    assert adain_color_fix(x, x).dtype == torch.float16

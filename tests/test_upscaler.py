"""The one-step upscaler over the two interfaces: sizes, exactness, tiling, retries, cancel."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fluxsr_core import flow, upscaler
from fluxsr_core.interfaces import Cancelled
from fluxsr_core.tiling import TilingConfig
from fluxsr_core.upscaler import UpscaleOptions


class PixelCodec:
    """A lossless stand-in VAE: 8x8 pixel blocks <-> 16 latent channels (3 x 64 would not fit, so
    it keeps the block mean per channel in 3 channels and zeros elsewhere) and back by nearest."""

    downscale = 8
    latent_channels = 16

    def encode(self, image):
        z = F.avg_pool2d(image, 8)
        return torch.cat([z, torch.zeros(z.shape[0], 13, *z.shape[-2:])], dim=1)

    def decode(self, latent):
        return F.interpolate(latent[:, :3], scale_factor=8, mode="nearest")

    def set_tiling(self, tile, overlap):
        pass


class ConstantVelocity:
    def __init__(self, value=0.0):
        self.value, self.calls = value, []

    def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
        self.calls.append((tuple(latent.shape), sigma.clone(), position_offset))
        return torch.full_like(latent, self.value)


def no_fix(**kw):
    return UpscaleOptions(color_fix="none", **kw)


@pytest.mark.parametrize("kw,expected", [
    (dict(scale=4), (96, 128)),
    (dict(scale=2.5), (60, 80)),
    (dict(long_side=200), (150, 200)),
])
def test_output_sizes(kw, expected):
    img = torch.rand(1, 3, 24, 32)
    out = upscaler.upscale_tensor(img, ConstantVelocity(), PixelCodec(), None, no_fix(**kw))
    assert tuple(out.shape) == (1, 3, *expected)


def test_megapixels_target():
    out = upscaler.upscale_tensor(torch.rand(1, 3, 30, 40), ConstantVelocity(), PixelCodec(), None,
                                  no_fix(megapixels=0.0192))
    assert abs(out.shape[-1] * out.shape[-2] - 19200) / 19200 < 0.05


def test_one_step_is_z_l_minus_t_l_v():
    """With a constant velocity c the output is decode(encode(x) - T_L * c): here, x - T_L c."""
    img = torch.full((1, 3, 8, 8), 0.5)
    out = upscaler.upscale_tensor(img, ConstantVelocity(0.4), PixelCodec(), None, no_fix(scale=2, t_l=0.25))
    torch.testing.assert_close(out, torch.full((1, 3, 16, 16), 0.4))


def test_sigma_given_to_model_is_t_l():
    model = ConstantVelocity()
    upscaler.upscale_tensor(torch.rand(2, 3, 8, 8), model, PixelCodec(), None, no_fix(t_l=0.3))
    assert all(torch.allclose(s, torch.full((2,), 0.3)) for _, s, _ in model.calls)


def test_padding_is_cropped_back_for_odd_sizes():
    img = torch.rand(1, 3, 13, 7)
    out = upscaler.upscale_tensor(img, ConstantVelocity(), PixelCodec(), None, no_fix(scale=3))
    assert tuple(out.shape) == (1, 3, 39, 21)


def test_tiles_are_used_and_counted():
    model = ConstantVelocity()
    seen = []
    tiling = TilingConfig(latent_tile=8, latent_overlap=2)
    upscaler.upscale_tensor(torch.rand(1, 3, 32, 32), model, PixelCodec(), None,
                            no_fix(scale=4, tiling=tiling), progress=lambda d, t, p: seen.append((d, t)))
    assert len(model.calls) > 1
    assert all(shape[-2:] == (8, 8) for shape, _, _ in model.calls)
    assert seen[-1][0] == seen[-1][1] == len(model.calls)


def test_cancel_between_tiles():
    model = ConstantVelocity()
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        if calls["n"] > 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        upscaler.upscale_tensor(torch.rand(1, 3, 32, 32), model, PixelCodec(), None,
                                no_fix(tiling=TilingConfig(latent_tile=8, latent_overlap=2)), cancel_check=cancel)
    assert 0 < len(model.calls) < 20


class OOMOnBigTiles(ConstantVelocity):
    def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
        if latent.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().__call__(latent, sigma, cond, position_offset)


def test_out_of_memory_retries_with_smaller_tiles():
    retries = []
    opts = no_fix(scale=4, tiling=TilingConfig(latent_tile=64, latent_overlap=16))
    out, used = upscaler.upscale_tensor_with_retry(
        torch.rand(1, 3, 128, 128), OOMOnBigTiles(), PixelCodec(), None, opts,
        on_retry=lambda t, e: retries.append(t.latent_tile))
    assert out.shape[-1] == 512
    assert retries == [32] and used.latent_tile == 32 and used.latent_overlap <= 8


def test_the_failed_try_is_let_go_before_the_cache_is_emptied_and_on_retry_runs(monkeypatch):
    """The out-of-memory error's traceback held the failed try's tensors while the CUDA cache
    was emptied and ComfyUI was asked to free memory, so neither could give them back."""
    import weakref

    held = []

    class OOMHoldingActivations(ConstantVelocity):
        def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
            if latent.shape[-1] > 32:
                activations = torch.empty(1 << 16)  # what the failed forward had allocated
                held.append(weakref.ref(activations))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().__call__(latent, sigma, cond, position_offset)

    freed_at = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed_at.append(("empty_cache", [r() for r in held])))
    opts = no_fix(scale=4, tiling=TilingConfig(latent_tile=64, latent_overlap=16))
    out, used = upscaler.upscale_tensor_with_retry(
        torch.rand(1, 3, 128, 128), OOMHoldingActivations(), PixelCodec(), None, opts,
        on_retry=lambda t, e: freed_at.append(("on_retry", [r() for r in held])))
    assert used.latent_tile == 32 and out.shape[-1] == 512
    assert [what for what, _ in freed_at] == ["empty_cache", "on_retry"]
    assert held and all(alive == [None] * len(alive) for _, alive in freed_at)


def test_smaller_tiling_shrinks_what_can_shrink_and_keeps_overlaps():
    """An untiled VAE (0/0) retried at 512 px tiles with 0 overlap (a 16-level seam); at the
    smallest transformer tiles the VAE tile was no longer tried smaller; a 128 px VAE tile grew."""
    untiled = upscaler.smaller_tiling(TilingConfig(latent_tile=64, latent_overlap=16, vae_tile=0, vae_overlap=0))
    assert (untiled.latent_tile, untiled.vae_tile, untiled.vae_overlap) == (32, 512, 128)
    smallest = TilingConfig(latent_tile=32, latent_overlap=8, vae_tile=1024, vae_overlap=128)
    steps = []
    while (smallest := upscaler.smaller_tiling(smallest)) is not None:
        steps.append((smallest.latent_tile, smallest.vae_tile, smallest.vae_overlap))
    assert steps == [(32, 512, 128), (32, 256, 64)]
    small_vae = upscaler.smaller_tiling(TilingConfig(latent_tile=64, latent_overlap=16, vae_tile=128, vae_overlap=32))
    assert (small_vae.latent_tile, small_vae.vae_tile, small_vae.vae_overlap) == (32, 128, 32)
    assert upscaler.smaller_tiling(TilingConfig(latent_tile=32, latent_overlap=8, vae_tile=128, vae_overlap=32)) is None
    batched = upscaler.smaller_tiling(TilingConfig(latent_tile=32, latent_overlap=8, vae_tile=256, tile_batch_size=4))
    assert batched == TilingConfig(latent_tile=32, latent_overlap=8, vae_tile=256, tile_batch_size=1)


def test_each_call_starts_with_the_vae_tiles_asked_for():
    """After one image's retry the codec kept the smaller VAE tile, so the next image of a
    `fluxsr upscale` run came out other than alone (up to 7 levels)."""
    told = []
    opts = no_fix(scale=4, tiling=TilingConfig(latent_tile=64, latent_overlap=16, vae_tile=1024, vae_overlap=128))
    for image in (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 16, 16)):
        upscaler.upscale_tensor_with_retry(image, OOMOnBigTiles(), PixelCodec(), None, opts,
                                           on_retry=lambda t, e: None,
                                           configure_codec=lambda t: told.append((t.vae_tile, t.vae_overlap)))
    assert told == [(1024, 128), (512, 128), (1024, 128)]


def test_options_take_no_limit_or_a_whole_number_of_pixels():
    assert upscaler.UpscaleOptions(max_output_pixels=None).validate().max_output_pixels is None
    assert upscaler.UpscaleOptions(max_output_pixels=64e6).validate().max_output_pixels == 64e6
    for bad in (0, 0.5, 1.5, -3, "many"):
        with pytest.raises(ValueError, match="max_output_pixels must be None"):
            upscaler.UpscaleOptions(max_output_pixels=bad).validate()


def test_out_of_memory_gives_up_with_advice():
    class AlwaysOOM(ConstantVelocity):
        raised: BaseException

        def __call__(self, *a, **k):
            raise self.raised

    # still torch's out-of-memory class: ComfyUI unloads its models and gives its advice only for it
    for raised in (torch.OutOfMemoryError("out of memory"), RuntimeError("DefaultCPUAllocator: can't allocate memory")):
        AlwaysOOM.raised = raised
        with pytest.raises(torch.cuda.OutOfMemoryError, match="smallest tiles") as info:
            upscaler.upscale_tensor_with_retry(torch.rand(1, 3, 16, 16), AlwaysOOM(), PixelCodec(), None,
                                               no_fix(tiling=TilingConfig(latent_tile=32, latent_overlap=8)),
                                               on_retry=lambda t, e: None)
        assert isinstance(info.value, upscaler.OutOfMemoryAtSmallestTilesError) and info.value.__cause__ is raised


def test_other_errors_are_not_retried():
    class Broken(ConstantVelocity):
        def __call__(self, *a, **k):
            raise ValueError("bad conditioning")

    with pytest.raises(ValueError, match="bad conditioning"):
        upscaler.upscale_tensor_with_retry(torch.rand(1, 3, 16, 16), Broken(), PixelCodec(), None, no_fix())


def test_a_nan_result_is_an_error_not_a_black_picture():
    """NaN survives the final clamp and would be written as black (an fp16 overflow, NaN weights)."""
    with pytest.raises(upscaler.NonFiniteResultError, match="NaN values.*bf16 or fp32"):
        upscaler.upscale_tensor_with_retry(torch.rand(1, 3, 16, 16), ConstantVelocity(float("nan")), PixelCodec(),
                                           None, no_fix())
    out, _ = upscaler.upscale_tensor_with_retry(torch.rand(1, 3, 16, 16), ConstantVelocity(0.5), PixelCodec(), None,
                                                no_fix())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(t_l=0.0), "T_L"), (dict(t_l=1.2), "T_L"), (dict(color_fix="sepia"), "colour fix"),
    (dict(tiling=TilingConfig(latent_tile=8, latent_overlap=8)), "overlap"),
])
def test_impossible_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        upscaler.upscale_tensor(torch.rand(1, 3, 8, 8), ConstantVelocity(), PixelCodec(), None, UpscaleOptions(**kw))


def test_output_size_guard():
    with pytest.raises(ValueError, match="pixels"):
        upscaler.upscale_tensor(torch.rand(1, 3, 100, 100), ConstantVelocity(), PixelCodec(), None,
                                no_fix(scale=8, max_output_pixels=100_000))


def test_the_colour_under_transparent_pixels_does_not_bleed_into_the_edges(tmp_path, lossless_codec):
    """A red square on pixels transparent and black (as most exporters store them), x4 through a
    lossless stand-in VAE and a zero velocity: the edges the upscale makes semi-transparent stay
    red. Before, the black was resized into them: red 0.49 on average at the edge, a dark ring
    (0.76) over white."""
    from PIL import Image

    from fluxsr_core import images
    import numpy as np

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    loaded = images.load_image(tmp_path / "logo.png")
    for fix in ("none", "wavelet"):
        result = upscaler.upscale_loaded_image(loaded, ConstantVelocity(), lossless_codec, None,
                                               UpscaleOptions(scale=4, color_fix=fix))
        alpha = result.alpha[0, 0]
        edge = (alpha > 0.02) & (alpha < 0.98)
        assert int(edge.sum()) > 500
        assert float(result.rgb[0, 0][edge].min()) > 0.999, fix        # red at every edge pixel
        over_white = result.rgb[0, 0] * alpha + (1 - alpha)
        assert float(over_white.min()) > 0.999, fix
    # a grey sprite keyed on magenta is a grey picture: what lies under alpha 0 does not count
    rgba[...] = (255, 0, 255, 0)
    rgba[8:24, 8:24] = (90, 90, 90, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "grey.png")
    result = upscaler.upscale_loaded_image(images.load_image(tmp_path / "grey.png"), ConstantVelocity(),
                                           lossless_codec, None, UpscaleOptions(scale=4, color_fix="none"))
    assert result.gray_in_color and torch.equal(result.rgb[:, 0], result.rgb[:, 2])


def test_the_default_colour_fix_takes_the_upsampled_input_s_colours():
    """A model that shifts red up and blue down by 0.1 (z_H = z_L - T_L v): the default colour fix
    (wavelet) gives back the colours of the upsampled input, which the output keeps without it."""
    class Cast:
        def __call__(self, z, sigma, cond, position_offset=(0, 0)):
            v = torch.zeros_like(z)
            v[:, 0], v[:, 2] = -0.4, 0.4
            return v

    g = torch.Generator().manual_seed(0)
    image = (0.3 + 0.4 * F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bicubic")).clamp(0, 1)
    upsampled = F.interpolate(image, size=(64, 64), mode="bicubic").clamp(0, 1).mean((2, 3))
    plain = upscaler.upscale_tensor(image, Cast(), PixelCodec(), None, UpscaleOptions(scale=2, t_l=0.25, color_fix="none"))
    torch.testing.assert_close(plain.mean((2, 3)) - upsampled, torch.tensor([[0.1, 0.0, -0.1]]), atol=2e-3, rtol=0)
    assert UpscaleOptions().color_fix == "wavelet"
    fixed = upscaler.upscale_tensor(image, Cast(), PixelCodec(), None, UpscaleOptions(scale=2, t_l=0.25))
    assert (fixed.mean((2, 3)) - upsampled).abs().max() < 1e-3

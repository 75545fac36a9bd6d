"""VAE tiling with whole-image GroupNorm statistics (fluxsr_core.vae_tiling) against the untiled
VAE and against diffusers' per-tile tiling, on the shipped demo VAE (trained weights) and a photo,
and on the FLUX VAE's own layout with random weights."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from fluxsr_core import memory, models, vae_tiling
from fluxsr_core.models import DiffusersCodec, load_vae

DEMO_VAE = "fluxsr_core/demo/vae.safetensors"


@pytest.fixture(scope="module")
def demo_vae():
    from pathlib import Path
    return load_vae(Path(__file__).resolve().parents[1] / DEMO_VAE, dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="module")
def photo():
    """A 512x512 crop of scikit-image's astronaut, [1, 3, 512, 512] in [0, 1]."""
    from skimage import data
    return torch.from_numpy(np.ascontiguousarray(data.astronaut()[:512, :512])).permute(2, 0, 1)[None].float() / 255


def _levels(a, b):
    """Mean and largest difference in 8-bit levels of two decoder outputs in [-1, 1]."""
    d = (a.clamp(-1, 1) - b.clamp(-1, 1)).abs() * 127.5
    return d.mean().item(), d.max().item()


def _diffusers_tiling(vae, tile, overlap):
    vae.__dict__.pop("_tiled_encode", None)
    vae.__dict__.pop("tiled_decode", None)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    vae.tile_overlap_factor = overlap / tile


@pytest.mark.parametrize("height,width,tile,halo", [(512, 512, 256, 64), (200, 328, 128, 16), (64, 64, 256, 32),
                                                     (1024, 72, 256, 48), (8, 8, 8, 0)])
def test_tile_cores_partition_the_image(height, width, tile, halo):
    boxes = vae_tiling.tile_boxes(height, width, tile, halo)
    owned = torch.zeros(height, width, dtype=torch.int32)
    for b in boxes:
        owned[b.cy0:b.cy1, b.cx0:b.cx1] += 1
        assert b.y1 - b.y0 <= tile and b.x1 - b.x0 <= tile
        assert all(v % 8 == 0 for v in (b.y0, b.y1, b.x0, b.x1, b.cy0, b.cy1, b.cx0, b.cx1))
        assert b.y0 == max(0, b.cy0 - halo) and b.y1 == min(height, b.cy1 + halo)
        assert b.x0 == max(0, b.cx0 - halo) and b.x1 == min(width, b.cx1 + halo)
    assert torch.equal(owned, torch.ones_like(owned))  # every pixel owned by exactly one tile
    for sizes in ({b.cy1 - b.cy0 for b in boxes if b.cx0 == 0}, {b.cx1 - b.cx0 for b in boxes if b.cy0 == 0}):
        assert max(sizes) - min(sizes) <= 8  # near-equal cores along each axis: no thin last strip


def test_tile_boxes_refuse_impossible_settings():
    with pytest.raises(ValueError, match="no core inside 128 px halos; use tiles of at least 264 px"):
        vae_tiling.tile_boxes(512, 512, 256, 128)
    with pytest.raises(ValueError, match="halo must be a multiple of 8"):
        vae_tiling.tile_boxes(512, 512, 256, 12)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_tiling.tile_boxes(510, 512, 256, 64)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        vae_tiling.tile_boxes(512, 512, 100, 0)


def test_decode_matches_untiled_where_diffusers_tiling_shifts_tones(demo_vae, photo):
    vae = demo_vae
    with torch.no_grad():
        z = vae._encode(photo * 2 - 1)[:, :16]
        untiled = vae.decoder(z)
        ours = vae_tiling.decode(vae, z, 256)
        ours_small = vae_tiling.decode(vae, z, 64)  # 64 px asked for: a 64 px core in its halos
        _diffusers_tiling(vae, 256, 128)
        theirs = vae.tiled_decode(z).sample
        vae.disable_tiling()
    assert ours.shape == untiled.shape == (1, 3, 512, 512)
    mean, peak = _levels(ours, untiled)
    assert mean < 1e-3 and peak < 0.05  # measured 1e-5 and 1e-4: the untiled decode up to rounding
    mean_small, peak_small = _levels(ours_small, untiled)
    assert mean_small < 1e-3 and peak_small < 0.05  # as exact with 64 px tiles (the halos are the reach)
    theirs_mean, _ = _levels(theirs, untiled)
    assert theirs_mean > 2.0  # per-tile statistics: 7.2 levels on average


def test_encode_matches_untiled(demo_vae, photo):
    vae = demo_vae
    x = photo * 2 - 1
    with torch.no_grad():
        untiled = vae._encode(x)
        ours = vae_tiling.encode_moments(vae, x, 256)
        _diffusers_tiling(vae, 256, 128)
        theirs = vae._tiled_encode(x)
        vae.disable_tiling()
    assert ours.shape == untiled.shape == (1, 32, 64, 64)
    scale = untiled[:, :16].abs().mean()
    assert (ours - untiled)[:, :16].abs().max() < 1e-4 * scale * 100  # measured 4e-7 mean
    assert (ours - untiled)[:, :16].abs().mean() < 1e-5 * scale
    assert (theirs - untiled)[:, :16].abs().mean() > 0.05 * scale  # per-tile: 0.40 of a mean 2.95


def test_statistics_stay_per_image_in_a_batch_and_any_shape(demo_vae, photo):
    """Two different pictures in one batch, a non-square size: each image normalised with its own
    statistics, as untiled."""
    vae = demo_vae
    batch = torch.cat([photo[..., :200, :328], 1 - photo[..., 100:300, :328] * 0.5]) * 2 - 1
    with torch.no_grad():
        untiled = vae._encode(batch)
        ours = vae_tiling.encode_moments(vae, batch, 128)
        z = untiled[:, :16]
        assert _levels(vae_tiling.decode(vae, z, 128), vae.decoder(z))[0] < 1e-3
    assert (ours - untiled)[:, :16].abs().mean() < 1e-4


def test_codec_tiles_with_whole_image_statistics_by_default(demo_vae, photo):
    vae = demo_vae
    plain = DiffusersCodec(vae, compute_dtype=torch.float32)
    with torch.no_grad():
        latent = plain.encode(photo)
        untiled = plain.decode(latent, clamp=False)
        image_norm = DiffusersCodec(vae, compute_dtype=torch.float32, tile=256, tile_overlap=128)
        assert "tiled_decode" in vae.__dict__
        tiled_latent = image_norm.encode(photo)
        tiled = image_norm.decode(latent, clamp=False)
        per_tile = DiffusersCodec(vae, compute_dtype=torch.float32, tile=256, tile_overlap=128, tile_norm="tile")
        assert "tiled_decode" not in vae.__dict__
        per_tile_image = per_tile.decode(latent, clamp=False)
        per_tile_latent = per_tile.encode(photo)
    assert (tiled - untiled).abs().mean() * 255 < 1e-3
    assert (tiled_latent - latent).abs().mean() < 1e-5
    assert (per_tile_image - untiled).abs().mean() * 255 > 1.0
    assert (per_tile_latent - latent).abs().mean() > 1e-2
    image_norm.set_tiling(0)
    assert "tiled_decode" not in vae.__dict__ and not vae.use_tiling


def test_codec_refuses_an_unknown_tile_norm(demo_vae):
    with pytest.raises(ValueError, match="tile_norm must be one of image, tile"):
        DiffusersCodec(demo_vae, compute_dtype=torch.float32, tile=256, tile_overlap=64, tile_norm="global")


def test_unsupported_vae_keeps_diffusers_tiling_and_says_so(demo_vae, caplog):
    norm = demo_vae.decoder.conv_norm_out
    demo_vae.decoder.conv_norm_out = torch.nn.LayerNorm(16)
    try:
        assert "normalises with LayerNorm, not GroupNorm" in vae_tiling.unsupported_reason(demo_vae)
        with caplog.at_level(logging.WARNING, logger="fluxsr_core.models"):
            codec = DiffusersCodec(demo_vae, compute_dtype=torch.float32, tile=256, tile_overlap=64)
            codec.set_tiling(128, 32)  # as the out-of-memory retry does: said once, not again
        assert "tiled_decode" not in demo_vae.__dict__ and demo_vae.use_tiling
        assert caplog.text.count("per-tile tiling is used") == 1 and "LayerNorm" in caplog.text
        with pytest.raises(NotImplementedError, match="LayerNorm"):
            vae_tiling.decode(demo_vae, torch.zeros(1, 16, 8, 8), 64)
    finally:
        demo_vae.decoder.conv_norm_out = norm


def _flux_vae_config(**changes):
    import json
    from pathlib import Path

    cfg = json.loads((Path(models.__file__).parent / "configs" / "flux1-dev-vae.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and not k.startswith("latents_")}
    return {**cfg, **changes}


def test_auto_stash_moves_activations_to_cpu_only_when_the_gpu_lacks_room():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        flux = AutoencoderKL(**_flux_vae_config())
    need = vae_tiling.held_bytes(flux.decoder, 2048, 2048, dtype=torch.bfloat16)
    # the most at once: the first full-size resnet's second half, its 128-channel input and output
    # beside its 256-channel residual (the upsampled last level's input), 2048x2048 in bf16
    assert need == (128 + 128 + 256) * 2048 * 2048 * 2
    # the encoder's: a full-size resnet's second half, 128 channels in, out and residual
    assert vae_tiling.held_bytes(flux.encoder, 2048, 2048, dtype=torch.bfloat16) == 3 * 128 * 2048 * 2048 * 2
    cuda = torch.device("cuda", 0)
    work = 2 ** 30  # one tile's work beside them
    # the driver's free memory and, after a model ran, what torch's cache holds unused: both count
    for driver_free, cached, expected in ((need + work - 1, 0, torch.device("cpu")), (need + work, 0, None),
                                          (need, work - 1, torch.device("cpu")), (need, work, None)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "mem_get_info", lambda device=None, free=driver_free: (free, 10 * need))
            mp.setattr(torch.cuda, "memory_reserved", lambda device=None, cached=cached: 3 * work + cached)
            mp.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * work)
            assert vae_tiling._stash_device("auto", cuda, need, work) == expected, (driver_free, cached)
    assert vae_tiling._stash_device("auto", torch.device("cpu"), need, work) is None
    assert vae_tiling._stash_device("cpu", torch.device("cpu"), need, work) is None
    assert vae_tiling._stash_device("cpu", cuda, need, work) == torch.device("cpu")
    assert vae_tiling._stash_device(None, cuda, need, work) is None


def test_cancel_check_stops_between_tiles(demo_vae, photo):
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("cancelled")

    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        vae_tiling.decode(demo_vae, torch.zeros(1, 16, 64, 64), 256, cancel_check=cancel)
    assert len(calls) == 3


def test_random_flux_architecture_matches_untiled_at_any_tile_size(monkeypatch):
    """The FLUX VAE's own layout (three resnets a level), random weights, narrow channels: each
    segment's halo is its convolutions' reach, so tiles of any size give the untiled result
    (relative mean error measured 1.4e-6 to 1.8e-6 for 256 px down to 8 px asked for, which
    becomes 112 px: 24 px halos round a 64 px core); without the halos the tiles' zero padding shows.
    The tiling of the previous release, one halo for the whole decoder, measured 0.41 at 64/16 px
    and 6e-3 at 256/64 px."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**_flux_vae_config(block_out_channels=[32, 32, 64, 64], norm_num_groups=8)).eval()
    z = torch.randn(1, 16, 32, 40)
    x = torch.rand(1, 3, 256, 320) * 2 - 1
    halos = [s.halo for s in vae_tiling._segments(vae_tiling._plan(vae.decoder, True).steps, 8)]
    # reach doubled (both sides of a 3x3 kernel) at 8 px per latent pixel; 24: a conv and the upsampler's
    assert max(halos) == 24 and min(halos[1:]) == 8 and halos[0] == 0
    with torch.no_grad():
        untiled, moments = vae.decoder(z), vae.encoder(x)
        scale, moments_scale = untiled.abs().mean(), moments.abs().mean()
        for tile in (8, 128):
            decoded = vae_tiling.decode(vae, z, tile)
            assert ((decoded - untiled).abs().mean() / scale).item() < 1e-5, tile
            assert ((decoded - untiled).abs().max() / scale).item() < 1e-4, tile
            encoded = vae_tiling.encode_moments(vae, x, tile)
            assert ((encoded - moments).abs().mean() / moments_scale).item() < 1e-5, tile
        real_segments = vae_tiling._segments
        monkeypatch.setattr(vae_tiling, "_segments", lambda steps, level: [
            dataclasses.replace(s, halo=0) for s in real_segments(steps, level)])
        no_halo = vae_tiling.decode(vae, z, 128)
    assert ((no_halo - untiled).abs().mean() / scale).item() > 0.01


def test_residuals_laid_out_otherwise_than_a_resnets_are_refused(demo_vae):
    conv = demo_vae.decoder.conv_out
    steps = [vae_tiling._Step("save"), vae_tiling._Step("call", conv), vae_tiling._Step("residual")]
    with pytest.raises(NotImplementedError, match="residuals are laid out otherwise"):
        vae_tiling._segments(steps, 1)


def test_latent_diffusion_layout_tiles_as_the_diffusers_one(demo_vae, photo, ldm_layout):
    """The layout ComfyUI builds its VAE in: the same modules rearranged compute the same thing
    untiled, and tiled with whole-image statistics they match untiled as diffusers' layout does."""
    encoder, decoder = ldm_layout(demo_vae)
    assert vae_tiling.encoder_problem(encoder) is None and vae_tiling.decoder_problem(decoder) is None
    x = photo[..., :256, :384] * 2 - 1
    with torch.no_grad():
        moments = encoder(x)
        torch.testing.assert_close(moments, demo_vae.encoder(x), rtol=0, atol=1e-5)
        assert (vae_tiling.run_encoder(encoder, x, 128) - moments)[:, :16].abs().mean() < 1e-5
        z = moments[:, :16]
        untiled = decoder(z)
        torch.testing.assert_close(untiled, demo_vae.decoder(z), rtol=0, atol=1e-5)
        assert _levels(vae_tiling.run_decoder(decoder, z, 128), untiled)[0] < 1e-3
        with vae_tiling.tiled_forwards(encoder, decoder, 128):
            assert (encoder(x) - moments)[:, :16].abs().mean() < 1e-5
            bound = decoder(z)
        assert "forward" not in encoder.__dict__ and "forward" not in decoder.__dict__
    assert _levels(bound, untiled)[0] < 1e-3
    decoder.tanh_out = True
    assert "ends otherwise" in vae_tiling.decoder_problem(decoder)


def test_an_image_that_fits_one_tile_is_one_tile_and_tiles_are_as_few_as_fit():
    assert vae_tiling.tile_boxes(512, 384, 512, 24) == [vae_tiling.TileBox(0, 512, 0, 384, 0, 512, 0, 384)]
    # 2048 px in 1024 px tiles with 24 px halos: two cores of 1024 would need 1048 px, so three of ~680
    boxes = vae_tiling.tile_boxes(2048, 2048, 1024, 24)
    assert len(boxes) == 9 and max(b.y1 - b.y0 for b in boxes) <= 1024
    assert len(vae_tiling.tile_boxes(1536, 1536, 1024, 24)) == 4  # cores of 768, tiles of 792


def test_group_norm_with_given_statistics_matches_torchs(demo_vae):
    norm = demo_vae.decoder.up_blocks[0].resnets[0].norm1
    x = torch.randn(2, norm.num_channels, 12, 20) * 3 + 1.5
    n, mean, m2 = vae_tiling._core_stats(x, norm.num_groups)
    torch.testing.assert_close(vae_tiling._normalize(x, norm, mean, m2 / n), norm(x), rtol=1e-5, atol=1e-5)
    half = x.to(torch.bfloat16)  # float32 inside, as torch's kernels: the same as theirs up to bf16's rounding
    n, mean, m2 = vae_tiling._core_stats(half, norm.num_groups)
    ours = vae_tiling._normalize(half, norm.to(torch.bfloat16), mean, m2 / n)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), norm(half).float(), rtol=0.02, atol=0.02)
    norm.float()


def test_out_of_memory_with_tiles_on_the_device_retries_with_them_in_cpu_memory(demo_vae, monkeypatch, caplog):
    """stash "auto" keeps tiles on a GPU it reckons roomy enough; when that was wrong, the run goes
    again with them in CPU memory instead of failing (the upscaler's smaller tiles would not help:
    the held tiles are the whole image whatever their size)."""
    z = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = vae_tiling.decode(demo_vae, z, 128, stash_device=None)
    real_run_segments = vae_tiling._run_segments
    stashes = []

    def run_segments(segments, runs, source, tile, height, width, device, stash, cancel_check):
        stashes.append(stash)
        if stash is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        # the CPU is the device here
        return real_run_segments(segments, runs, source, tile, height, width, device, None, cancel_check)

    monkeypatch.setattr(vae_tiling, "_run_segments", run_segments)
    monkeypatch.setattr(vae_tiling, "_fallback_stash", lambda device: torch.device("cpu"))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fluxsr_core.vae_tiling"):
        out = vae_tiling.decode(demo_vae, z, 128, stash_device="auto")
    assert stashes == [None, torch.device("cpu")]
    assert torch.equal(out, expected)  # the retry starts from scratch: nothing of the failed try is left in
    assert "again with them in CPU memory" in caplog.text and "Tried to allocate 2.00 GiB" in caplog.text
    # tiles already in CPU memory, or a CPU run: an out-of-memory error is the caller's
    monkeypatch.setattr(vae_tiling, "_fallback_stash", lambda device: None)
    with pytest.raises(torch.OutOfMemoryError):
        vae_tiling.decode(demo_vae, z, 128, stash_device="auto")


def _narrow_flux_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**_flux_vae_config(block_out_channels=[32, 32, 64, 64], norm_num_groups=8)).eval()


def _runs_peak(segments, sizes, runs):
    """The most bytes of whole-image activations the runs hold at once."""
    return max(sizes[r.start] + sizes[r.end] if r.recomputed else vae_tiling._held_peak(segments, sizes, r.start, r.end)
               for r in runs)


def test_a_memory_limit_is_kept_by_recomputing_and_the_result_stays_untiled():
    """Over a memory limit the segments whose whole activations do not fit are recomputed from
    the last one held, one pass per GroupNorm for its statistics: the held activations stay
    within the limit and the result is still the untiled VAE's (FLUX layout, random weights)."""
    vae = _narrow_flux_vae()
    z = torch.randn(1, 16, 32, 40, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        untiled, moments = vae.decoder(z), vae.encoder(x)
        for half, run, source, reference in ((vae.decoder, vae_tiling.run_decoder, z, untiled),
                                             (vae.encoder, vae_tiling.run_encoder, x, moments)):
            decoder = half is vae.decoder
            plan = vae_tiling._plan(half, decoder)
            segments = vae_tiling._segments(plan.steps, plan.level)
            sizes = vae_tiling._boundary_bytes(segments, 64 if decoder else 3, 256, 320, 1, 4)
            need = vae_tiling.held_bytes(half, 256, 320, dtype=torch.float32)
            assert need == vae_tiling._held_peak(segments, sizes, 0, len(segments))
            works = []
            for fraction in (0.5, 0.25, 0.0):
                runs, work = vae_tiling._schedule(segments, sizes, int(fraction * need), (256, 320, 96))
                clean = vae_tiling._clean_boundaries(segments)
                assert any(r.recomputed for r in runs) and runs[0].start == 0 and runs[-1].end == len(segments)
                assert all(r.start in clean and r.end in clean and a.end == b.start for r, a, b in
                           zip(runs[1:], runs, runs[1:]))
                # within the limit; at no room at all, within the input and output themselves
                assert _runs_peak(segments, sizes, runs) <= max(int(fraction * need), sizes[0] + sizes[-1])
                works.append(work)
                out = run(half, source, 96, memory_limit=int(fraction * need))
                error = ((out - reference).abs().mean() / reference.abs().mean()).item()
                assert error < 1e-5, (half.__class__.__name__, fraction, error)
            assert 1 < works[0] <= works[1] <= works[2]  # less memory, more work
            assert vae_tiling._schedule(segments, sizes, need, (256, 320, 96)) == ([vae_tiling._Run(0, len(segments), False)], 1.0)
            assert vae_tiling._schedule(segments, sizes, None, (256, 320, 96))[1] == 1.0


def test_memory_limit_bounds_the_measured_peak(caplog):
    """The peak of torch's CPU allocations during a decode follows the limit (measured: 101 MiB
    untiled-held, 50 MiB at a 48 MiB limit, 28 MiB at 24), and the run says what it does."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fluxsr_bench_for_vae_tiling",
                                                  Path(__file__).resolve().parents[1] / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    vae = _narrow_flux_vae()
    z = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(3))
    need = vae_tiling.held_bytes(vae.decoder, 512, 512, dtype=torch.float32)
    peaks = {}
    with torch.no_grad():
        for limit in (None, need // 2, need // 4):
            with bench.PeakMemory(torch.device("cpu")) as pm, \
                    caplog.at_level(logging.WARNING, logger="fluxsr_core.vae_tiling"):
                vae_tiling.decode(vae, z, 128, memory_limit=limit)
            peaks[limit] = pm.peak
    assert peaks[None] > need
    assert peaks[need // 2] < 0.6 * peaks[None] and peaks[need // 4] < 0.35 * peaks[None]
    assert "would take 96 MiB at once, more than the 48 MiB given" in caplog.text
    assert "recomputed for each GroupNorm's statistics" in caplog.text


def test_activations_held_in_cpu_memory_keep_to_what_is_available(demo_vae, photo, monkeypatch, caplog):
    """Held in CPU memory (the CPU the device, or the stash beside a GPU), the whole-image
    activations take no more than CPU_HOLD_FRACTION of the memory available, less a tile's work
    where the CPU computes too: past it the system kills the process, no error to catch."""
    plan = vae_tiling._plan(demo_vae.decoder, True)
    segments = vae_tiling._segments(plan.steps, plan.level)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 100 * 2 ** 20)
    # our figure for one tile's work: three times what the tile's size holds (the image's, smaller)
    tile_work = vae_tiling._tile_work_bytes(segments, 16, 1, 4, 128, 512, 512)
    assert tile_work == vae_tiling.TILE_WORK_FACTOR * vae_tiling._held_bytes(segments, 16, 128, 128, 1, 4)
    assert vae_tiling._tile_work_bytes(segments, 16, 1, 4, 128, 512, 64) == \
        vae_tiling.TILE_WORK_FACTOR * vae_tiling._held_bytes(segments, 16, 128, 64, 1, 4)
    assert 0 < tile_work < 80 * 2 ** 20
    assert vae_tiling._auto_limit(tile_work, cpu, cpu) == 80 * 2 ** 20 - tile_work
    assert vae_tiling._auto_limit(tile_work, cpu, cuda) == 80 * 2 ** 20  # the work is the GPU's
    assert vae_tiling._auto_limit(tile_work, cuda, cuda) is None  # a GPU's OOM is caught and retried
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: None)
    assert vae_tiling._auto_limit(tile_work, cpu, cpu) is None
    z = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = vae_tiling.decode(demo_vae, z, 128)
        need = vae_tiling.held_bytes(demo_vae.decoder, 512, 512, dtype=torch.float32)
        monkeypatch.setattr(memory, "available_cpu_bytes", lambda: int(need / vae_tiling.CPU_HOLD_FRACTION) // 2)
        with caplog.at_level(logging.WARNING, logger="fluxsr_core.vae_tiling"):
            out = vae_tiling.decode(demo_vae, z, 128, stash_device="auto")
    assert "of CPU memory they may take" in caplog.text
    assert _levels(out, expected)[1] < 0.01


def test_under_autograd_a_memory_limit_holds_the_activations_whole_and_says_so(caplog):
    """Recomputing under autograd would keep every pass's graph (measured in a script without
    no_grad: the process was killed); the activations are held whole and the log says why."""
    vae = _narrow_flux_vae()
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = vae_tiling.decode(vae, z, 64)
    with caplog.at_level(logging.WARNING, logger="fluxsr_core.vae_tiling"):
        out = vae_tiling.decode(vae, z, 64, memory_limit=1)
    assert out.requires_grad and torch.allclose(out, expected, atol=1e-5)
    assert "autograd is recording" in caplog.text and "recomputed" not in caplog.text

#!/usr/bin/env python
"""FluxSR benchmark: a report, not a test. Prints a table and writes JSON (and markdown).

    python bench/run.py --tiny          # seconds, CPU: the whole path runs (CI smoke check)
    python bench/run.py                 # CPU, a small FLUX-architecture model (minutes)
    python bench/run.py --full-size     # FLUX.1-dev architecture, random weights, bf16, on the GPU

Measured:
  1. pipeline overhead: wall time of one upscale over the sum of its parts, each timed alone
     (resize+pad, VAE encode, the tiled one-step transformer, VAE decode, colour fix); goal <= 1.10;
  2. peak memory of an upscale at 4x the pixel count with the same fixed tiles, over the base
     size's (goal <= 1.3); CPU: the peak of torch's live allocations (profiler memory events), GPU: max allocated;
  3. one step against FLUX.1-dev's 28-step Euler teacher sampler at the same size (speed ratio);
  full size (and --tiny): 4. transformer FLOPs counted from the shapes over the measured time, as a
     fraction of a large bf16 matmul's rate measured in the same run; 5. tiled against untiled
     transformer time per output pixel at the larger size; 6. each opt-in speed-up
     (``models.SPEEDUPS``, equal-shape tile batching) against the unchanged models, same run, with
     the change in the outputs; 7. peak memory per memory mode at the larger size (on CUDA also
     the absolute peak, weights included: what has to fit on the card).
Random weights: the timings are the architecture's, the pixels mean nothing. The report is
rewritten after every section, so a run cut short (a lent GPU's time limit) keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

# Before torch loads kineto: its CPU-only builds log an ERROR line (no GPU count) per profiled block.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
import torch  # noqa: E402

from fluxsr_core import color, flow, images, models, tiling, vae_tiling
from fluxsr_core.interfaces import Conditioning
from fluxsr_core.latents import PIXEL_MULTIPLE
from fluxsr_core.tiling import TilingConfig
from fluxsr_core.upscaler import UpscaleOptions, upscale_tensor
from fluxsr_core.weights import shipped_config

# A small FLUX-architecture model for CPU runs: FLUX.1-dev's layout at 1/12 the width, 6 blocks.
SMALL_TRANSFORMER = dict(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                         axes_dims_rope=[8, 28, 28])
SMALL_VAE = dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16)

PROFILES = {
    # name: transformer config overrides, vae overrides, LR size, tile (latent), overlap, text tokens
    "tiny": dict(transformer="tiny", vae="tiny", lr=16, tile=8, overlap=2, vae_tile=64, vae_overlap=16, text=8,
                 dtype="fp32", repeats=2),
    "small": dict(transformer=SMALL_TRANSFORMER, vae=SMALL_VAE, lr=64, tile=32, overlap=8, vae_tile=256,
                  vae_overlap=64, text=64, dtype="fp32", repeats=3),
    "full": dict(transformer={}, vae={}, lr=256, tile=128, overlap=32, vae_tile=1024, vae_overlap=128, text=512,
                 dtype="bf16", repeats=5),
}


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = now()
        out = fn()
        times.append(now() - t0)
    return statistics.median(times), out


class PeakMemory:
    """Peak memory growth of a block.

    CUDA: ``max_memory_allocated`` over its value at the start (``total``: the absolute peak,
    resident weights included; ``reserved``: what the caching allocator held). CPU: the peak of
    the running sum of torch's own allocations and frees, read from the profiler's memory
    events: exact, unlike the process's peak RSS, which glibc's reuse of freed buffers and
    fragmentation move by tens of MiB either way (measured: 48 MiB for 4x the pixels against
    60 MiB for the base size).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ("cuda max_memory_allocated" if device.type == "cuda"
                       else "peak of torch's CPU allocations (profiler memory events)")

    def __enter__(self):
        gc.collect()
        self.total = self.reserved = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.total = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            self.peak = self.total - self.base
            return
        self._profiler.__exit__(*exc)
        from torch._C._autograd import DeviceType

        events = sorted((e.start_ns(), e.nbytes()) for e in self._profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        self.peak = peak


def random_model(cls, config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``cls(config)`` with random weights made directly on ``device`` in ``dtype``.

    Built on the meta device, then each layer's own ``reset_parameters`` runs where the weights
    live. ``from_config`` would first make FLUX.1-dev's 12B parameters in fp32 on the CPU (48 GB
    and minutes of single-threaded init): too slow for a lent GPU's 15 minutes.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    if any(True for _ in model.buffers()):
        raise RuntimeError(f"{cls.__name__} has buffers, which to_empty would leave uninitialised")
    model = torch.nn.Module.to(model, dtype=dtype).to_empty(device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for p in own:
                    p.fill_(1.0)  # norm scales; every FLUX layer with weights has reset_parameters
    return model.eval().requires_grad_(False)


def from_state(cls, config, state: dict):
    """A fresh ``cls(config)`` over the tensors of ``state`` (no copy): a variant or a memory mode
    changes its own module tree and leaves the others' alone."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def rebuild(model):
    return from_state(type(model), dict(model.config), model.state_dict())


def build(profile: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer and VAE of the profile's architecture (no files, no hub)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    if profile["transformer"] == "tiny":
        tcfg, vcfg = shipped_config("tiny-transformer"), shipped_config("tiny-vae")
    else:
        tcfg = {**shipped_config("flux1-dev-transformer"), **profile["transformer"]}
        vcfg = {**shipped_config("flux1-dev-vae"), **profile["vae"]}
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    return (random_model(FluxTransformer2DModel, strip(tcfg), dtype, device, seed=0),
            random_model(AutoencoderKL, strip(vcfg), dtype, device, seed=1))


def resident_weights(profile: dict, dtype: torch.dtype) -> dict:
    """Bytes of weights each memory mode keeps on the device, from the shapes
    (``models.weight_bytes_per_mode``, what ``--memory-mode auto`` decides with)."""
    transformer, vae = build(profile, torch.device("meta"), dtype)
    t_bytes, v_bytes = models.param_bytes(transformer), models.param_bytes(vae)
    return dict(transformer_bytes=t_bytes, vae_bytes=v_bytes,
                modes=models.weight_bytes_per_mode(dict(transformer.config), v_bytes, dtype))


def conditioning(transformer, n_text: int, device, dtype) -> Conditioning:
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    return Conditioning(t5=torch.randn(1, n_text, cfg.joint_attention_dim, generator=g).to(device, dtype),
                        clip_pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                        guidance=3.5)


def transformer_flops(cfg, n_img: int, n_txt: int) -> float:
    """Multiply-add FLOPs (x2) of one FLUX transformer forward, from the shapes.

    Linear layers: per token 2*in*out. Double block (image and text streams): qkv 3D^2 + out D^2
    + MLP 8D^2 = 12 D^2 per token, x2 FLOPs. Single block: linear1 D->7D, linear2 5D->D = 12 D^2.
    Attention over T = n_img + n_txt tokens: QK^T and AV, 2 * 2 * T^2 * D. Embedders and the
    output projection are added; the per-block modulation (one vector) is negligible.
    """
    d = cfg.num_attention_heads * cfg.attention_head_dim
    t = n_img + n_txt
    per_block = 2 * 12 * d * d * t + 4 * t * t * d
    blocks = (cfg.num_layers + cfg.num_single_layers) * per_block
    embed = 2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.joint_attention_dim * d + 2 * n_img * d * cfg.in_channels
    return float(blocks + embed)


def counted_flops(profile: dict, dtype: torch.dtype, side: int) -> dict:
    """FLOPs of one transformer forward, one VAE encode and one VAE decode for a ``side`` px
    square, counted by torch's ``FlopCounterMode`` on meta tensors (matmuls, convolutions,
    attention; nothing is allocated, so FLUX.1-dev counts anywhere)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    transformer, vae = build(profile, meta, dtype)
    velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    cond = conditioning(transformer, profile["text"], meta, dtype)
    latent = torch.empty(1, 16, side // 8, side // 8, device=meta, dtype=dtype)
    jobs = {"transformer": lambda: velocity(latent, torch.full((1,), 0.25, device=meta), cond),
            "vae_encode": lambda: vae.encode(torch.empty(1, 3, side, side, device=meta, dtype=dtype)),
            "vae_decode": lambda: vae.decode(latent)}
    out = {}
    for name, job in jobs.items():
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            job()
        out[name] = float(counter.get_total_flops())
    return out


def matmul_rate(device, dtype, n: int, calls: int = 10) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (the hardware yardstick):
    ``calls`` products into one output between two synchronisations, so that the sync and
    launch cost (a few percent of one 8192^2 bf16 product on an H100-class GPU, about 1.5 ms)
    does not lower the yardstick the transformer's fraction is taken of."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def products() -> None:
        for _ in range(calls):
            torch.matmul(a, b, out=out)

    t, _ = timed(products, 5)
    return 2 * n ** 3 * calls / t


def run_size(velocity, codec, cond, lr_size: int, tiling_cfg: TilingConfig, repeats: int) -> dict:
    """Time one upscale of an ``lr_size`` square image and each of its parts alone."""
    image = torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(1))
    options = UpscaleOptions(scale=4, t_l=0.25, color_fix="wavelet", tiling=tiling_cfg)
    out_h = out_w = lr_size * 4

    total, _ = timed(lambda: upscale_tensor(image, velocity, codec, cond, options), repeats)
    # The same with the image on the models' device: resize, padding and colour fix then run
    # there too (the CLI and ComfyUI hand over CPU images, so that is what ``total`` measures).
    on_device = image.to(codec.device)
    total_on_device, _ = timed(lambda: upscale_tensor(on_device, velocity, codec, cond, options), repeats)
    t_resize, upsampled = timed(lambda: images.pad_to_multiple(images.resize(image, (out_h, out_w)),
                                                                PIXEL_MULTIPLE)[0], repeats)
    t_encode, z_l = timed(lambda: codec.encode(upsampled), repeats)
    tiles = tiling.count_tiles(z_l.shape[-2], z_l.shape[-1], tiling_cfg)
    step = lambda z, off: flow.one_step_sr(velocity, z, 0.25, cond, off)
    t_transformer, z_h = timed(lambda: tiling.tiled_apply(step, z_l, tiling_cfg), repeats)
    # Tiling's own cost: the tiled transformer over its tiles' forwards (every tile of a grid
    # has one shape), i.e. the cropping, the moves and the blending between them.
    th, tw = tiling.axis_tiles(z_l.shape[-2], tiling_cfg)[0], tiling.axis_tiles(z_l.shape[-1], tiling_cfg)[0]
    one_tile = z_l[..., :th, :tw].contiguous()
    t_tile, _ = timed(lambda: step(one_tile, (0, 0)), repeats)
    t_decode, decoded = timed(lambda: codec.decode(z_h), repeats)
    t_color, _ = timed(lambda: color.apply_color_fix("wavelet", decoded[..., :out_h, :out_w], upsampled[..., :out_h, :out_w]), repeats)
    parts = dict(resize_pad=t_resize, vae_encode=t_encode, transformer_tiled=t_transformer,
                 vae_decode=t_decode, color_fix=t_color)
    return dict(lr=lr_size, out=out_h, tiles=tiles, total_s=total, parts_s=parts,
                overhead_ratio=total / sum(parts.values()), latent=list(z_l.shape[-2:]),
                tile_forward_s=t_tile, tiling_overhead_s=t_transformer - tiles * t_tile,
                total_image_on_device_s=total_on_device, device=str(codec.device))


def upscale_seconds(velocity, codec, cond, lr_size: int, tiling_cfg: TilingConfig) -> float:
    """Seconds of one whole upscale of an ``lr_size`` image (after a warm-up)."""
    image = torch.rand(1, 3, lr_size, lr_size)
    options = UpscaleOptions(scale=4, t_l=0.25, tiling=tiling_cfg)
    return timed(lambda: upscale_tensor(image, velocity, codec, cond, options), 1)[0]


def peak_memory(velocity, codec, cond, lr_size: int, tiling_cfg: TilingConfig, device) -> float:
    image = torch.rand(1, 3, lr_size, lr_size)
    options = UpscaleOptions(scale=4, t_l=0.25, tiling=tiling_cfg)
    upscale_tensor(image, velocity, codec, cond, options)  # warm-up: allocator caches, lazy inits
    with PeakMemory(device) as pm:
        upscale_tensor(image, velocity, codec, cond, options)
    return pm.peak


def vae_tiling_variants(vae, dtype: torch.dtype, device: torch.device, side: int, tile: int, overlap: int,
                        repeats: int) -> dict:
    """VAE encode and decode of a ``side`` px image: untiled, diffusers' per-tile tiling, and
    whole-image GroupNorm tiling (tiles kept on the device, and in CPU memory): seconds, peak
    device memory (CUDA only: on the CPU it would need the profiler, which slows what follows),
    and the difference from untiled (latent relative L2; decoded image, mean levels of 255)."""
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 3, side, side, generator=g), 9, 1, 4).to(device)
    variants = {"untiled": dict(tile=0), "per_tile": dict(tile_norm="tile"),
                "whole_image": dict(stash_device=None), "whole_image_cpu_stash": dict(stash_device="cpu")}
    if device.type != "cuda":
        del variants["whole_image_cpu_stash"]  # the CPU is the device: nothing to move
    out, reference = {}, None
    for name, kw in variants.items():
        kw = {"tile": tile, "tile_overlap": overlap if kw.get("tile", tile) else 0, **kw}
        codec = models.DiffusersCodec(vae, compute_dtype=dtype, **kw)
        t_encode, z = timed(lambda: codec.encode(image), repeats)
        if reference is None:
            reference = (z, codec.decode(z))
        t_decode, x = timed(lambda: codec.decode(reference[0]), repeats)
        entry = dict(encode_s=t_encode, decode_s=t_decode, latent_rel_l2=rel_l2(z, reference[0]),
                     image_mean_levels=float((x.float() - reference[1].float()).abs().mean() * 255))
        if device.type == "cuda":
            with PeakMemory(device) as pm:
                codec.decode(codec.encode(image))
            entry["peak_bytes"] = pm.peak
        if name.startswith("whole_image"):  # what stash "auto" weighs, to set beside the measured peak
            entry["decoder_held_bytes_reckoned"] = vae_tiling.held_bytes(vae.decoder, side, side, 1, dtype)
        out[name] = entry
    return dict(side=side, tile=tile, overlap=overlap, variants=out)


def teacher_ratio(velocity, cond, latent_hw, steps: int, one_step_s: float) -> dict:
    h, w = latent_hw
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(2))
    sigmas = flow.flux_sigmas(steps, (h // 2) * (w // 2))
    # once: the one-step timings warmed the model up at this very shape (twice was 6 s of a lease)
    t0 = now()
    flow.euler_sample(velocity, noise, sigmas, cond)
    t = now() - t0
    return dict(steps=steps, teacher_s=t, one_step_s=one_step_s, speed_ratio=t / one_step_s)


def tiling_throughput(velocity, cond, lr_size: int, tiling_cfg: TilingConfig, repeats: int) -> dict:
    """The one-step transformer over a ``4 * lr_size`` output, untiled and tiled: seconds per
    output megapixel and their ratio (goal: tiled within 10% of untiled where both fit)."""
    side = lr_size * 4
    z = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(3))
    step = lambda lat, off=(0, 0): flow.one_step_sr(velocity, lat, 0.25, cond, off)
    t_untiled, _ = timed(lambda: step(z), repeats)
    t_tiled, _ = timed(lambda: tiling.tiled_apply(step, z, tiling_cfg), repeats)
    mp = side * side / 1e6
    cfg, n_txt = velocity.transformer.config, cond.t5.shape[1]
    # The work the grid itself adds: overlapping tiles repeat tokens; attention over fewer tokens
    # per call costs less. Counted from the shapes, this is the floor of the time ratio.
    tiled_flops = _grid_flops(cfg, z.shape[-2], z.shape[-1], tiling_cfg, n_txt)
    untiled_flops = transformer_flops(cfg, (z.shape[-2] // 2) * (z.shape[-1] // 2), n_txt)
    fitted = dataclasses.replace(tiling_cfg, fit_tiles=True)
    fitted_flops = _grid_flops(cfg, z.shape[-2], z.shape[-1], fitted, n_txt)
    out = dict(out=side, tiles=tiling.count_tiles(z.shape[-2], z.shape[-1], tiling_cfg),
               untiled_s_per_mp=t_untiled / mp, tiled_s_per_mp=t_tiled / mp, tiled_over_untiled=t_tiled / t_untiled,
               flops_tiled_over_untiled=tiled_flops / untiled_flops,
               flops_fitted_over_untiled=fitted_flops / untiled_flops)
    fewer = fewer_tiles(z.shape[-1], tiling_cfg)
    if fewer is not None and z.shape[-2] == z.shape[-1]:
        # Larger tiles, one fewer per axis: attention grows per tile, the overlaps' repeats shrink.
        t_fewer, _ = timed(lambda: tiling.tiled_apply(step, z, fewer), repeats)
        fewer_flops = _grid_flops(cfg, z.shape[-2], z.shape[-1], fewer, n_txt)
        out["fewer_tiles"] = dict(tile_px=fewer.latent_tile * 8, tiles=tiling.count_tiles(*z.shape[-2:], fewer),
                                  tiled_over_untiled=t_fewer / t_untiled, flops_over_untiled=fewer_flops / untiled_flops)
    return out


def fewer_tiles(length: int, config: TilingConfig) -> Optional[TilingConfig]:
    """The shortest tile (an even latent length) that covers ``length`` with one tile fewer per
    axis than ``config`` and the same overlap; None when ``config`` has one tile per axis."""
    n = len(tiling.axis_tiles(length, config)[1])
    if n < 2:
        return None
    o = config.latent_overlap
    tile = -(-(length + (n - 2) * o) // (n - 1))  # n - 1 tiles of `tile` overlapping by `o` cover length
    return dataclasses.replace(config, latent_tile=tile + tile % 2, fit_tiles=False)


def _grid_flops(cfg, h: int, w: int, config: TilingConfig, n_txt: int) -> float:
    """Transformer FLOPs of one tiled pass over an ``h x w`` latent (2x2 packing: a token per 2x2)."""
    return sum(transformer_flops(cfg, (th // 2) * (tw // 2), n_txt) for th, tw in _tile_shapes(h, w, config))


def _tile_shapes(h: int, w: int, config: TilingConfig) -> list[tuple[int, int]]:
    (th, rows), (tw, cols) = tiling.axis_tiles(h, config), tiling.axis_tiles(w, config)
    return [(th, tw) for _ in rows for _ in cols]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is empty on Linux; the CPU's model name is in /proc/cpuinfo
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def _error_text(exc: BaseException) -> str:
    """``Type: the message's first line``, at most 300 characters (for the report)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def speedup_variants(transformer, vae, cond, profile, tiles: TilingConfig, dtype, names, repeats: int,
                     compile_backend: str = "inductor", report: Optional[dict] = None,
                     after_each: Optional[Callable[[], None]] = None) -> dict:
    """Each speed-up alone against the unchanged models, in this run: seconds before and after
    and the relative L2 change of the output.

    Transformer changes (``fuse_qkv``, ``compile``): one untiled forward at the base size and
    the tiled transformer at twice the side. ``channels_last_vae``: VAE encode and decode at the
    base size. ``tile_batch``: the tiled transformer with a whole row of tiles per call. Every
    variant gets a fresh module tree over the same weights (:func:`rebuild`), so none leaks
    into the next. ``first_call_s`` is the warm-up call (compilation included). ``compile_fp8``:
    ``compile`` where 16-24 GB cards run, memory mode fp8_storage_all (the casts compiled into
    the blocks), against the same fp8 model uncompiled. Results go into ``report``
    (a new dict by default) as they come, ``after_each()`` is called after each (the bench saves
    there: a GPU lease that runs out mid-section keeps the variants measured so far).
    """
    side, g = profile["lr"] * 4, torch.Generator().manual_seed(4)
    z = torch.randn(1, 16, side // 8, side // 8, generator=g)
    z2 = torch.randn(1, 16, side // 4, side // 4, generator=g)
    image = torch.rand(1, 3, side, side, generator=g)
    kw = dict(vae_tile=profile["vae_tile"], vae_overlap=profile["vae_overlap"])

    def measure(velocity, codec, which, tiling_cfg=tiles) -> dict:
        step = lambda lat, off=(0, 0): flow.one_step_sr(velocity, lat, 0.25, cond, off)
        jobs = {"transformer_one_forward": lambda: step(z),
                "transformer_tiled": lambda: tiling.tiled_apply(step, z2, tiling_cfg),
                "vae_encode": lambda: codec.encode(image),
                "vae_decode": lambda: codec.decode(z)}
        out = {}
        for key in which:
            t0 = now()
            jobs[key]()
            first = now() - t0
            # the 9-tile 2048 px pass takes seconds on an H200: 2 timed runs, not 5, per variant
            seconds, result = timed(jobs[key], min(repeats, 2) if key == "transformer_tiled" else repeats)
            out[key] = dict(seconds=seconds, first_call_s=first, result=result)
        return out

    def codec_for(v):
        return models.DiffusersCodec(v, compute_dtype=dtype, tile=kw["vae_tile"], tile_overlap=kw["vae_overlap"])

    transformer_keys = ["transformer_one_forward", "transformer_tiled"]
    vae_keys = ["vae_encode", "vae_decode"]
    wanted = {"fuse_qkv": transformer_keys, "compile": transformer_keys, "compile_cudagraphs": transformer_keys,
              "compile_fp8": transformer_keys,
              "cudnn_attention": transformer_keys, "flash_attention": transformer_keys, "channels_last_vae": vae_keys,
              "tile_batch": ["transformer_tiled"],
              "tile_fit": ["transformer_tiled"]}
    unknown = [n for n in names if n not in wanted]
    if unknown:
        raise SystemExit(f"unknown speed-up {unknown[0]!r}; choose from {', '.join(wanted)}")
    base_velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    needed = sorted({k for n in names for k in wanted[n]})
    baseline = measure(base_velocity, codec_for(vae), needed)
    from torch._dynamo.utils import counters

    row_tiles = len(tiling.axis_tiles(z2.shape[-1], tiles)[1])
    report = {} if report is None else report
    report["baseline"] = {k: v["seconds"] for k, v in baseline.items()}
    if after_each is not None:
        after_each()
    for name in names:
        before = baseline
        if name.startswith("compile"):
            # Dynamo's caches live on the blocks' shared code objects: a variant compiled before
            # would be reused, or its recompiles would exhaust the limit and leave this one eager.
            torch.compiler.reset()
            counters.clear()
        if name == "compile_cudagraphs" and not models.cudagraph_output_cloning_available():
            # FLUX's block loop needs torch 2.14's output cloning (pytorch#152887): without it the
            # variant fails after compiling and recording, a minute of a lease for an error
            report[name] = {"error": f"skipped: needs torch 2.14 or newer (cudagraph output cloning, "
                                     f"pytorch/pytorch#152887); this torch is {torch.__version__}"}
            if after_each is not None:
                after_each()
            continue
        try:
            if name == "compile_fp8":
                t2 = rebuild(transformer)
                models.store_in_fp8(t2, dtype, every_linear=True)
                v2 = models.DiffusersVelocity(t2, compute_dtype=dtype)
                before = measure(v2, codec_for(vae), wanted[name])
                models.apply_speedups(t2, vae, ["compile"], compile_backend=compile_backend,
                                      memory_mode="fp8_storage_all")
                after = measure(v2, codec_for(vae), wanted[name])
                detail = "fp8_storage_all, against it uncompiled"
                del t2, v2
            elif name == "tile_batch":
                batched = dataclasses.replace(tiles, tile_batch_size=row_tiles)
                after = measure(base_velocity, codec_for(vae), wanted[name], batched)
                detail = f"{row_tiles} tiles per call"
            elif name == "tile_fit":  # changes the grid, so the output changes too (see the rel. L2)
                fitted = dataclasses.replace(tiles, fit_tiles=True)
                after = measure(base_velocity, codec_for(vae), wanted[name], fitted)
                size = tiling.axis_tiles(z2.shape[-1], fitted)[0] * 8
                detail = f"{size} px tiles instead of {tiles.latent_tile * 8}"
            else:
                t2, v2 = rebuild(transformer), rebuild(vae)
                models.apply_speedups(t2, v2, [name], compile_backend=compile_backend)
                after = measure(models.DiffusersVelocity(t2, compute_dtype=dtype), codec_for(v2), wanted[name])
                detail = ""
                del t2, v2
        except Exception as exc:  # noqa: BLE001 - one failing change must not cost the rest of a GPU lease
            report[name] = {"error": _error_text(exc)}
            gc.collect()
            if after_each is not None:
                after_each()
            continue
        report[name] = {k: dict(before_s=before[k]["seconds"], after_s=a["seconds"],
                                speedup=before[k]["seconds"] / a["seconds"], first_call_s=a["first_call_s"],
                                output_rel_l2=rel_l2(a["result"], before[k]["result"]))
                        for k, a in after.items()}
        if name.startswith("compile"):
            # what would make the figure a plain eager (or plain compile) one without saying so
            breaks, skips = sum(counters["graph_break"].values()), counters["inductor"].get("cudagraph_skips", 0)
            said = [f"{breaks} graph breaks" if breaks else "", f"CUDA graphs skipped {skips}x" if skips else ""]
            detail = "; ".join(p for p in [detail, *said] if p)
        if detail:
            report[name]["detail"] = detail
        gc.collect()
        if after_each is not None:
            after_each()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny models, CPU, seconds (smoke check)")
    mode.add_argument("--full-size", action="store_true", help="FLUX.1-dev architecture, random weights, bf16")
    parser.add_argument("--device", default=None, help="default: cpu for --tiny and the small model, auto for --full-size")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON/markdown report")
    parser.add_argument("--teacher-steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--memory-modes", default="none,fp8_storage,fp8_storage_all,group_offload,model_offload,"
                                                  "gguf_q8_0",
                        help="full size and --tiny: memory modes to measure ('' for none; model_offload late: "
                             "it copies the whole transformer to and from the GPU at every VAE call; gguf_q8_0: "
                             "the weights quantised to Q8_0 as city96's GGUF files are, through diffusers' GGUF "
                             "layers, all on the device)")
    parser.add_argument("--speedups", default=None,
                        help="speed-ups to measure against the unchanged models, comma-separated, from "
                             "fuse_qkv, channels_last_vae, tile_batch, tile_fit, flash_attention, cudnn_attention, "
                             "compile, compile_cudagraphs, compile_fp8 (compile under fp8_storage_all) ('' for none; "
                             "default: all on CUDA, the first four elsewhere)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--weights-only", action="store_true",
                      help="only the weights each memory mode keeps on the device, from the shapes "
                           "(no device needed: --full-size --weights-only gives FLUX.1-dev's on any machine)")
    only.add_argument("--activation-peaks", action="store_true",
                      help="only the memory beyond the weights, per part of an upscale, at the profile's width "
                           "with one block of each kind (--full-size: FLUX.1-dev's, in about 4 GB: runs on a CPU)")
    args = parser.parse_args(argv)

    name = "tiny" if args.tiny else ("full" if args.full_size else "small")
    profile = PROFILES[name]
    if args.weights_only:
        w = resident_weights(profile, torch.bfloat16 if profile["dtype"] == "bf16" else torch.float32)
        print(markdown_weights(w, name))
        return 0
    device = models.resolve_device(args.device or ("auto" if args.full_size else "cpu"))
    dtype = models.resolve_dtype(profile["dtype"], device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and name != "tiny":
        torch.set_num_threads(os.cpu_count() or 1)
    if args.activation_peaks:
        import diffusers

        a = activation_peaks(profile, device, dtype)
        a.update(profile=name, date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=str(device),
                 device_name=_device_name(device), torch=torch.__version__, diffusers=diffusers.__version__,
                 dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads())
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"bench-{name}-activations"
        md = markdown_activations(a, name)
        stem.with_suffix(".json").write_text(json.dumps(a, indent=2))
        stem.with_suffix(".md").write_text(md)
        print(md)
        print(f"written: {stem}.json, {stem}.md ({a['device_name']}, {a['dtype']}, {a['date']})")
        return 0
    speedups = args.speedups
    if speedups is None:
        # compile right after the quick transformer changes (the one most likely to pay), its fp8
        # and CUDA-graph forms last: the slowest to set up, so a run cut short loses the least
        speedups = "fuse_qkv,cudnn_attention,flash_attention,compile,tile_batch,channels_last_vae,tile_fit," \
            "compile_fp8,compile_cudagraphs" \
            if device.type == "cuda" else \
            "fuse_qkv,channels_last_vae,tile_batch,tile_fit"
    speedups = [n.strip() for n in speedups.split(",") if n.strip()]
    t0 = time.perf_counter()
    transformer, vae = build(profile, device, dtype)
    build_s = time.perf_counter() - t0
    velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    codec = models.DiffusersCodec(vae, compute_dtype=dtype, tile=profile["vae_tile"],
                                  tile_overlap=profile["vae_overlap"])
    cond = conditioning(transformer, profile["text"], device, dtype)
    tiles = TilingConfig(latent_tile=profile["tile"], latent_overlap=profile["overlap"],
                         vae_tile=profile["vae_tile"], vae_overlap=profile["vae_overlap"])

    import diffusers
    report = dict(profile=name, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  device=str(device), device_name=_device_name(device),
                  threads=torch.get_num_threads(), torch=torch.__version__, diffusers=diffusers.__version__,
                  dtype=str(dtype).replace("torch.", ""), build_s=build_s,
                  tiling=dict(latent_tile=tiles.latent_tile, latent_overlap=tiles.latent_overlap,
                              vae_tile=tiles.vae_tile, vae_overlap=tiles.vae_overlap))
    report["resident_weights"] = resident_weights(profile, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{name}"

    def save() -> None:
        """Rewrite the report (atomically) after each section: a cut-short run keeps its figures."""
        for suffix, text in ((".json", json.dumps(report, indent=2)), (".md", markdown(report))):
            target = args.out / f"{stem}{suffix}"
            tmp = target.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)

    def section(title: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {title}", file=sys.stderr, flush=True)

    def guarded(key: str, fn: Callable[[], object]):
        """Run one section; a failure (out of memory, a path only a GPU takes) is recorded under
        ``report["errors"][key]``, its traceback goes to stderr, and the run goes on: one stage
        failing must not cost a GPU lease the sections after it. Returns ``fn()``, or None."""
        failed = False
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[key] = _error_text(exc)
            print(f"section {key} failed: {report['errors'][key]}; going on", file=sys.stderr, flush=True)
            failed = True
        if failed:  # the traceback's frames (and their tensors) are gone once the except block ends
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                if hasattr(torch._C, "_host_emptyCache"):  # pinned copies a failed group offload made
                    torch._C._host_emptyCache()
            save()
        return None

    # tiny runs every part of the full-size report on the CPU, so that path stays tested
    full_report = name in ("full", "tiny")
    with torch.inference_mode():
        section("upscale, parts timed alone")
        report["upscale"] = []
        base = guarded("upscale", lambda: run_size(velocity, codec, cond, profile["lr"], tiles, profile["repeats"]))
        if base is not None:
            report["upscale"].append(base)
        if full_report:
            larger = guarded("upscale_larger", lambda: run_size(velocity, codec, cond, profile["lr"] * 2, tiles, 2))
            if larger is not None:
                report["upscale"].append(larger)
        save()
        # (3) one step vs the teacher sampler at the same (untiled) latent size
        section(f"one step vs the {args.teacher_steps}-step teacher")
        side = profile["lr"] * 4
        z_hw = tuple(base["latent"]) if base is not None else (side // 8, side // 8)
        z = torch.randn(1, 16, *z_hw)
        one = guarded("one_step", lambda: timed(lambda: flow.one_step_sr(velocity, z, 0.25, cond),
                                                profile["repeats"])[0])
        if one is not None:
            guarded("teacher", lambda: report.__setitem__(
                "teacher", teacher_ratio(velocity, cond, z_hw, args.teacher_steps, one)))
        save()
        if full_report and one is not None:
            section("transformer FLOP rate against the matmul rate")

            def efficiency() -> None:
                flops = transformer_flops(transformer.config, (z_hw[0] // 2) * (z_hw[1] // 2), profile["text"])
                rate = matmul_rate(device, dtype, 8192 if name == "full" else 256)
                counted = counted_flops(profile, dtype, z_hw[0] * 8)
                e = dict(flops=flops, flops_counted=counted["transformer"], one_forward_s=one,
                         achieved_flops_per_s=flops / one, matmul_flops_per_s=rate,
                         fraction_of_matmul=(flops / one) / rate,
                         # the ratio if every part ran at the transformer's rate: the floor the VAE sets
                         upscale_over_transformer_flops=sum(counted.values()) / counted["transformer"])
                if base is not None:
                    parts = base["parts_s"]
                    e.update(upscale_over_transformer=base["total_s"] / parts["transformer_tiled"],
                             # the same with the image already on the device (resize and colour fix there)
                             upscale_over_transformer_image_on_device=base["total_image_on_device_s"]
                             / parts["transformer_tiled"],
                             vae={k: dict(flops=counted[k], seconds=parts[k],
                                          fraction_of_matmul=counted[k] / parts[k] / rate)
                                  for k in ("vae_encode", "vae_decode")})
                report["transformer_efficiency"] = e

            guarded("transformer_efficiency", efficiency)
        section("tiled vs untiled transformer at the larger size")
        guarded("tiling_throughput", lambda: report.__setitem__(
            "tiling_throughput", tiling_throughput(velocity, cond, profile["lr"] * 2, tiles, 2)))
        save()
        if full_report:
            section("VAE: untiled, per-tile and whole-image GroupNorm tiling at the larger size")
            guarded("vae_tiling", lambda: report.__setitem__("vae_tiling", vae_tiling_variants(
                vae, dtype, device, profile["lr"] * 8, profile["vae_tile"], profile["vae_overlap"],
                1 if name == "full" else 2)))
            codec.set_tiling(profile["vae_tile"], profile["vae_overlap"])  # the variants re-tiled the shared VAE
            save()
        # (2) memory at 4x the pixels (2x the side) with the same fixed tiles. After every timing:
        # on the CPU it runs torch's profiler, after which torch's ops run up to 40x slower for a
        # while (measured: a tiny one-step forward 0.25 s against 0.006 s just before).
        section("peak memory at 1x and 4x the pixels")

        def memory() -> None:
            # the VAE's whole-image activations grow with the image; held to the base size's,
            # the VAE recomputes instead (vae_tiling's memory_limit): its time first (see above)
            limit = max(vae_tiling.held_bytes(half, profile["lr"] * 4, profile["lr"] * 4, 1, dtype)
                        for half in (vae.encoder, vae.decoder))

            def vae_limit(value) -> None:
                codec.memory_limit = value
                codec.set_tiling(codec.tile, codec.tile_overlap)  # binds the limit

            times = {}
            try:
                for key, value in (("unlimited", None), ("limited", limit)):
                    vae_limit(value)
                    times[key] = upscale_seconds(velocity, codec, cond, profile["lr"] * 2, tiles)
                vae_limit(None)
                m1 = peak_memory(velocity, codec, cond, profile["lr"], tiles, device)
                m4 = peak_memory(velocity, codec, cond, profile["lr"] * 2, tiles, device)
                vae_limit(limit)
                m4_limited = peak_memory(velocity, codec, cond, profile["lr"] * 2, tiles, device)
            finally:
                vae_limit(None)
            report["memory"] = dict(base_bytes=m1, four_x_bytes=m4, ratio=m4 / m1 if m1 else float("nan"),
                                    method=PeakMemory(device).method, vae_memory_limit_bytes=limit,
                                    four_x_limited_bytes=m4_limited,
                                    ratio_limited=m4_limited / m1 if m1 else float("nan"),
                                    four_x_upscale_s=times["unlimited"], four_x_limited_upscale_s=times["limited"])

        guarded("memory", memory)
        save()
    modes = [m.strip() for m in args.memory_modes.split(",") if m.strip()]
    if "gguf_q8_0" in modes and importlib.util.find_spec("gguf") is None:
        print("memory mode gguf_q8_0 left out: the gguf package is not installed (bench/fetch_device_wheels.sh)")
        modes.remove("gguf_q8_0")
    if full_report:
        # The memory modes go before the speed-ups (the goals first, should a lease's
        # time run out); each starts from CPU weights, as after loading a file.
        states = [(type(m), dict(m.config), {k: v.to("cpu") for k, v in m.state_dict().items()})
                  for m in (transformer, vae)]
        del transformer, vae, velocity, codec
        if modes:
            section(f"memory modes at {profile['lr'] * 8}px: {', '.join(modes)}")
            report["memory_modes"] = {}
            for mode in modes:
                result = guarded(f"memory_mode {mode}", lambda: memory_mode(states, profile, device, dtype, mode, tiles))
                report["memory_modes"][mode] = (result if result is not None
                                                else {"error": report["errors"][f"memory_mode {mode}"]})
                save()
        # Before the speed-ups: the only check of the loaders' direct-to-device paths on CUDA,
        # and quick, while compiling the speed-ups may outlast a lease.
        section("loading the transformer from a single file straight onto the device")
        guarded("load_from_file", lambda: report.__setitem__("load_from_file", load_from_file(states, device, dtype)))
        save()
        if speedups:
            transformer, vae = (from_state(cls, cfg, {k: v.to(device) for k, v in sd.items()})
                                for cls, cfg, sd in states)
    if speedups:
        section(f"speed-ups against the unchanged models: {', '.join(speedups)}")
        with torch.inference_mode():
            guarded("speedups", lambda: speedup_variants(
                transformer, vae, cond, profile, tiles, dtype, speedups, profile["repeats"],
                report=report.setdefault("speedups", {}), after_each=save))
        # compiled code and CUDA graph pools hold the variants' modules, and so the weights
        torch.compiler.reset()
    save()
    print(markdown(report))
    print(f"written: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 0


def activation_peaks(profile: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Memory beyond the weights: the peak of each part of an upscale for one tile (full size:
    1024 px, the default tile and VAE tile) and of a whole tiled upscale to twice that side.

    The transformer has the profile's width but one double and one single block: without
    autograd each block's activations are freed before the next block runs, so the peak does not
    grow with depth (measured: FLUX.1-dev's width with 1+1 and 3+3 blocks, 0.453 GiB both; a
    test checks it). So FLUX.1-dev's activation peaks can be measured on a machine without room
    for its 22 GiB of weights, the CPU included (there: torch's CPU kernels, which allocate
    somewhat differently from CUDA's and have no cuBLAS/cuDNN workspaces).
    """
    shallow = dict(profile, transformer=(profile["transformer"] if profile["transformer"] == "tiny"
                                         else {**profile["transformer"], "num_layers": 1, "num_single_layers": 1}))
    transformer, vae = build(shallow, device, dtype)
    velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    codec = models.DiffusersCodec(vae, compute_dtype=dtype, tile=profile["vae_tile"],
                                  tile_overlap=profile["vae_overlap"])
    cond = conditioning(transformer, profile["text"], device, dtype)
    side = profile["tile"] * 8
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, side, side, generator=g)
    latent = torch.randn(1, 16, side // 8, side // 8, generator=g)
    tiles = TilingConfig(latent_tile=profile["tile"], latent_overlap=profile["overlap"],
                         vae_tile=profile["vae_tile"], vae_overlap=profile["vae_overlap"])
    lr = torch.rand(1, 3, side // 2, side // 2, generator=g)  # x4 to twice the tile's side
    jobs = {"transformer_tile": lambda: flow.one_step_sr(velocity, latent, 0.25, cond),
            "vae_encode_tile": lambda: codec.encode(image),
            "vae_decode_tile": lambda: codec.decode(latent),
            "upscale_2x_tile_side": lambda: upscale_tensor(lr, velocity, codec, cond, UpscaleOptions(tiling=tiles))}
    peaks = {}
    with torch.inference_mode():
        for name, job in jobs.items():
            job()  # warm-up: lazy inits and allocator caches are not activations
            with PeakMemory(device) as pm:
                job()
            peaks[name] = pm.peak
    cfg = transformer.config
    return dict(tile_px=side, upscale_px=side * 2, text_tokens=profile["text"], peaks_bytes=peaks,
                blocks=f"{cfg.num_layers} double + {cfg.num_single_layers} single",
                weights_bytes=models.param_bytes(transformer) + models.param_bytes(vae),
                method=PeakMemory(device).method)


def markdown_activations(a: dict, profile: str) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"
    names = {"transformer_tile": f"transformer, one {a['tile_px']} px tile ({a['text_tokens']} text tokens)",
             "vae_encode_tile": f"VAE encode, one {a['tile_px']} px tile",
             "vae_decode_tile": f"VAE decode, one {a['tile_px']} px tile",
             "upscale_2x_tile_side": f"whole x4 upscale to {a['upscale_px']} px, tiled"}
    lines = [f"Memory beyond the weights ({profile} width, {a['blocks']} block(s): the peak does not grow with "
             f"depth; {a['method']}):", "", "| part | peak MiB |", "|---|---|"]
    lines += [f"| {names[k]} | {mib(v)} |" for k, v in a["peaks_bytes"].items()]
    return "\n".join(lines) + "\n"


# diffusers' names of the layers city96's llama-quantize patch keeps unquantised in FLUX files
# (BFL img_in, txt_in, time_in, vector_in, guidance_in, final_layer)
_GGUF_UNQUANTISED = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")


def quantize_q8_0(weight: torch.Tensor):
    """``weight`` ``[rows, cols]`` (cols a multiple of 32) as GGUF Q8_0 blocks, on its device: per
    32 values an fp16 scale (max |w| / 127) and 32 int8s, as gguf-py's quantiser lays them out;
    a diffusers ``GGUFParameter`` of ``[rows, cols / 32 * 34]`` bytes."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    blocks = weight.float().reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    x = torch.where(scale > 0, blocks / scale.clamp_min(1e-30), 0)
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(-127, 127).to(torch.int8)  # ties away from 0, as gguf-py
    packed = torch.cat([scale.half().view(torch.uint8), q.view(torch.uint8)], dim=1)
    return GGUFParameter(packed.reshape(weight.shape[0], -1), quant_type=gguf.GGMLQuantizationType.Q8_0)


def gguf_q8_0_transformer(state: dict, config: dict, dtype: torch.dtype, device: torch.device):
    """The transformer of ``state`` quantised as a city96 Q8_0 file is (block linears in Q8_0; 1-D
    tensors, small ones and :data:`_GGUF_UNQUANTISED` as they are), built by ``models.gguf_transformer``
    straight onto ``device``: what ``fluxsr upscale --transformer flux1-dev-Q8_0.gguf`` runs."""
    quantised = {}
    for key, tensor in state.items():
        keep = tensor.ndim != 2 or tensor.numel() <= 1024 or tensor.shape[1] % 32 or key.startswith(_GGUF_UNQUANTISED)
        quantised[key] = tensor.to(device) if keep else quantize_q8_0(tensor.to(device))
    return models.gguf_transformer(quantised, config, dtype, device)


def memory_mode(states, profile, device, dtype, mode: str, tiles: TilingConfig) -> dict:
    """Peak memory and time of one x4 upscale to twice the base side (full size: 2048 px, tiled)
    under one memory mode, with fresh models over the CPU weights ``states``; ``gguf_q8_0``: the
    transformer quantised to Q8_0 (:func:`gguf_q8_0_transformer`), both models on the device."""
    gc.collect()
    leftover = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        leftover = torch.cuda.memory_allocated(device)  # should be ~0: counted in peak_total_bytes
    (t_cls, t_config, t_state), (v_cls, v_config, v_state) = states
    vae, quantise_s, placed_as = from_state(v_cls, v_config, v_state), None, mode
    if mode == "gguf_q8_0":  # the bench's own quantising is no part of placing a file's weights
        t0 = now()
        transformer = gguf_q8_0_transformer(t_state, t_config, dtype, device)
        quantise_s, placed_as = now() - t0, "none"
    else:
        transformer = from_state(t_cls, t_config, t_state)
    pinning = {}
    if mode == "group_offload":  # what decided whether the stream pins all at once or block by block
        from fluxsr_core import memory

        pinning = dict(pinned_copy_bytes=models.pinned_copy_bytes(transformer),
                       cpu_available_bytes=memory.available_cpu_bytes())
    t0 = now()
    models.apply_memory_mode(transformer, vae, placed_as, device)
    place_s = now() - t0
    velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    codec = models.DiffusersCodec(vae, compute_dtype=dtype, tile=profile["vae_tile"],
                                  tile_overlap=profile["vae_overlap"])
    cond = conditioning(transformer, profile["text"], device, dtype)
    lr = torch.rand(1, 3, profile["lr"] * 2, profile["lr"] * 2)
    options = UpscaleOptions(tiling=tiles)
    with torch.inference_mode():
        upscale_tensor(lr, velocity, codec, cond, options)  # warm-up
        with PeakMemory(device) as pm:  # one run gives both (on the CPU the time includes the profiler's)
            t0 = now()
            upscale_tensor(lr, velocity, codec, cond, options)
            t = now() - t0
    outside = None
    if device.type == "cuda":
        # the CUDA context and the kernels' modules (cuBLAS, cuDNN, flash) loaded on first use:
        # on the card, but outside torch's allocator, so outside its peaks
        free, total = torch.cuda.mem_get_info(device)
        outside = total - free - torch.cuda.memory_reserved(device)
    out = dict(out=profile["lr"] * 8, peak_bytes=pm.peak, peak_total_bytes=pm.total, peak_reserved_bytes=pm.reserved,
               outside_torch_bytes=outside,
               must_fit_bytes=None if outside is None or pm.reserved is None else pm.reserved + outside,
               seconds=t, place_s=place_s, allocated_before_bytes=leftover, quantise_s=quantise_s, **pinning)
    del transformer, vae, velocity, codec
    gc.collect()
    if mode == "group_offload" and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # its pinned CPU copy of the weights (24 GB) stays cached otherwise
    return out


def markdown_weights(w: dict, profile: str) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [f"Weights on the device per memory mode ({profile} architecture, from the shapes; transformer "
             f"{gib(w['transformer_bytes'])} GiB, VAE {gib(w['vae_bytes'])} GiB):",
             "", "| memory mode | weights on the device GiB |", "|---|---|"]
    lines += [f"| {mode} | {gib(b)} |" for mode, b in w["modes"].items()]
    return "\n".join(lines) + "\n"


def _rss_anon() -> int:
    """This process's anonymous resident memory (heap, not the page cache of mapped files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def load_from_file(states, device, dtype) -> dict:
    """Write the transformer as the single BFL file users have, then time loading it onto the
    device and sample the anonymous RSS meanwhile: ``none`` (``models.load_transformer``: bf16
    straight onto the device) and ``fp8_storage_all`` (``models.load_transformer_fp8``: cast to
    fp8 on the device as each tensor arrives).

    Both keep RAM flat on a GPU: the file passes through the page cache one tensor at a time.
    The file was just written, so it is read from the page cache: this is the load's own cost,
    not the disk's.
    """
    import tempfile
    import threading

    from safetensors.torch import save_file

    from fluxsr_core.weights import transformer_state_dict_to_bfl

    import shutil

    (_, _, transformer_state), _ = states
    out = {}
    with tempfile.TemporaryDirectory(prefix="fluxsr-bench-") as folder:
        # FLUX.1-dev: a 24 GB file. Said at once rather than after minutes of writing (a lent
        # machine's disk also holds its image).
        need = sum(t.numel() * t.element_size() for t in transformer_state.values())
        free = shutil.disk_usage(folder).free
        if free < need + 2**30:
            raise OSError(f"{free / 2**30:.1f} GiB free in {folder}; the single file needs {need / 2**30:.1f} GiB "
                          f"and 1 more to spare (set TMPDIR to a larger disk)")
        path = Path(folder) / "flux1-random.safetensors"
        t0 = time.perf_counter()
        bfl = transformer_state_dict_to_bfl(transformer_state)
        save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
        del bfl
        out.update(file_bytes=path.stat().st_size, write_s=time.perf_counter() - t0,
                   method="RssAnon sampled every 2 ms")
        loaders = {"none": lambda: models.load_transformer(path, dtype=dtype, device=device),
                   "fp8_storage_all": lambda: models.load_transformer_fp8(path, "fp8_storage_all", dtype=dtype,
                                                                          device=device)[0]}
        for mode, load in loaders.items():
            gc.collect()
            base, peak, stop = _rss_anon(), [0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_anon())
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = now()
            model = load()
            seconds = now() - t0
            stop.set()
            sampler.join()
            out[mode] = dict(load_s=seconds, ram_growth_peak_bytes=max(0, peak[0] - base),
                             weights_bytes=models.param_bytes(model),
                             parameters_on=sorted({p.device.type for p in model.parameters()}))
            del model
    return out


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def markdown(r: dict) -> str:
    """The report as markdown; sections that have not run yet are left out."""
    lines = [f"### FluxSR benchmark: {r['profile']} ({r['device_name']}, {r['device']}, {r['dtype']}, "
             f"torch {r['torch']}, diffusers {r['diffusers']}, {r['threads']} threads, {r['date']})", ""]
    if "resident_weights" in r:
        lines += [markdown_weights(r["resident_weights"], r["profile"])]
    if "upscale" in r:
        lines += ["| LR -> output | tiles | total s | resize | encode | transformer | of it tiling overhead | decode | colour "
                  "| overhead (goal <= 1.10) | total s, image on the device |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for u in r["upscale"]:
            p = u["parts_s"]
            lines.append(f"| {u['lr']} -> {u['out']} | {u['tiles']} | {u['total_s']:.3f} | {p['resize_pad']:.3f} | "
                         f"{p['vae_encode']:.3f} | {p['transformer_tiled']:.3f} | "
                         f"{u.get('tiling_overhead_s', float('nan')):.3f} | {p['vae_decode']:.3f} | "
                         f"{p['color_fix']:.3f} | {u['overhead_ratio']:.3f} | "
                         f"{u.get('total_image_on_device_s', float('nan')):.3f} ({u.get('device', '?')}) |")
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"Peak memory ({m['method']}): base {m['base_bytes'] / 2**20:.1f} MiB, 4x pixels "
                      f"{m['four_x_bytes'] / 2**20:.1f} MiB, ratio {m['ratio']:.2f} (goal <= 1.3)."]
        if "four_x_limited_bytes" in m:
            lines.append(f"With the VAE's whole-image activations held to the base size's "
                         f"({m['vae_memory_limit_bytes'] / 2**20:.1f} MiB, recomputing the rest): 4x pixels "
                         f"{m['four_x_limited_bytes'] / 2**20:.1f} MiB, ratio {m['ratio_limited']:.2f}; "
                         f"the upscale {m['four_x_limited_upscale_s']:.2f} s against {m['four_x_upscale_s']:.2f} s.")
    if "teacher" in r:
        t = r["teacher"]
        lines.append(f"One step {t['one_step_s'] * 1000:.1f} ms vs {t['steps']}-step teacher {t['teacher_s']:.3f} s: "
                     f"{t['speed_ratio']:.1f}x faster.")
    if "transformer_efficiency" in r:
        e = r["transformer_efficiency"]
        text = (f"Transformer: {e['flops'] / 1e12:.3g} TFLOP per forward in {e['one_forward_s'] * 1000:.1f} ms = "
                f"{e['achieved_flops_per_s'] / 1e12:.3g} TFLOP/s, {100 * e['fraction_of_matmul']:.0f}% of the "
                f"measured {r['dtype']} matmul rate ({e['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s; goal >= 60%).")
        if "upscale_over_transformer" in e:  # not when the upscale section failed
            text += (f" Whole upscale / transformer alone: {e['upscale_over_transformer']:.2f} (goal <= 1.3; "
                     f"{e.get('upscale_over_transformer_image_on_device', float('nan')):.2f} with the image on the "
                     f"device; {e['upscale_over_transformer_flops']:.2f} by FLOPs). VAE encode "
                     f"{e['vae']['vae_encode']['flops'] / 1e12:.3g} TFLOP at "
                     f"{100 * e['vae']['vae_encode']['fraction_of_matmul']:.0f}% of the matmul rate, decode "
                     f"{e['vae']['vae_decode']['flops'] / 1e12:.3g} TFLOP at "
                     f"{100 * e['vae']['vae_decode']['fraction_of_matmul']:.0f}%.")
        lines.append(text)
    if "tiling_throughput" in r:
        tt = r["tiling_throughput"]
        lines.append(f"Transformer at {tt['out']} px: untiled {tt['untiled_s_per_mp']:.3f} s/MP, {tt['tiles']} tiles "
                     f"{tt['tiled_s_per_mp']:.3f} s/MP: tiled / untiled {tt['tiled_over_untiled']:.2f} (goal <= 1.10; "
                     f"the grid's own FLOP ratio, from the shapes: {tt['flops_tiled_over_untiled']:.2f}; with fitted "
                     f"tiles: {tt['flops_fitted_over_untiled']:.2f}).")
        if "fewer_tiles" in tt:
            f = tt["fewer_tiles"]
            lines.append(f"With {f['tile_px']} px tiles ({f['tiles']} tiles): tiled / untiled {f['tiled_over_untiled']:.2f} "
                         f"(FLOP ratio {f['flops_over_untiled']:.2f}).")
    if "vae_tiling" in r:
        vt = r["vae_tiling"]
        lines += ["", f"| VAE at {vt['side']} px ({vt['tile']}/{vt['overlap']} px tiles) | encode s | decode s | "
                      f"peak MiB | latent rel. L2 to untiled | image mean levels off untiled |", "|---|---|---|---|---|---|"]
        for vname, v in vt["variants"].items():
            peak = f"{v['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in v else "-"
            lines.append(f"| {vname} | {v['encode_s']:.3f} | {v['decode_s']:.3f} | {peak} | {v['latent_rel_l2']:.1e} | "
                         f"{v['image_mean_levels']:.4f} |")
    if "speedups" in r:
        lines += ["", "| speed-up | measure | before s | after s | speed-up | first call s | output rel. L2 |",
                  "|---|---|---|---|---|---|---|"]
        for sname, entries in r["speedups"].items():
            if sname == "baseline":
                continue
            label = sname + (f" ({entries['detail']})" if "detail" in entries else "")
            if "error" in entries:
                lines.append(f"| {label} | failed: {entries['error']} | | | | | |")
                continue
            for key, v in entries.items():
                if key == "detail":
                    continue
                lines.append(f"| {label} | {key} | {v['before_s']:.4f} | {v['after_s']:.4f} | {v['speedup']:.2f}x | "
                             f"{v['first_call_s']:.2f} | {v['output_rel_l2']:.1e} |")
    if "load_from_file" in r:
        lf = r["load_from_file"]
        for mode in ("none", "fp8_storage_all"):
            if mode in lf:
                v = lf[mode]
                lines.append(f"Loading the transformer's {lf['file_bytes'] / 2**30:.2f} GiB single file onto "
                             f"{'/'.join(v['parameters_on'])} for memory mode {mode}: {v['load_s']:.1f} s (file in "
                             f"the page cache), {v['weights_bytes'] / 2**30:.2f} GiB of weights, RAM growth at most "
                             f"{v['ram_growth_peak_bytes'] / 2**20:.0f} MiB ({lf['method']}).")
    if r.get("memory_modes"):
        out_px = next((v["out"] for v in r["memory_modes"].values() if "out" in v), "?")
        lines += ["", f"| memory mode ({out_px} px output) | peak total MiB (weights included) | "
                      f"peak reserved MiB | + outside torch (CUDA context, kernels) = must fit MiB | growth during "
                      f"the upscale MiB (offload modes: weights they bring in included) | s per image | placing s |",
                  "|---|---|---|---|---|---|---|"]
        for mode, v in r["memory_modes"].items():
            if "error" in v:
                lines.append(f"| {mode} | failed: {v['error']} | | | | | |")
                continue
            fit = "-" if v.get("must_fit_bytes") is None else \
                f"{_mib(v['outside_torch_bytes'])} = {_mib(v['must_fit_bytes'])}"
            lines.append(f"| {mode} | {_mib(v['peak_total_bytes'])} | {_mib(v['peak_reserved_bytes'])} | {fit} | "
                         f"{_mib(v['peak_bytes'])} | {v['seconds']:.2f} | {v['place_s']:.2f} |")
        for mode, v in r["memory_modes"].items():
            if v.get("pinned_copy_bytes") is not None:
                available = v.get("cpu_available_bytes")
                lines.append(f"\n{mode}: a pinned copy of the weights takes {v['pinned_copy_bytes'] / 2**30:.1f} GiB "
                             f"(torch rounds each tensor to a power of two); CPU memory available "
                             f"{'unknown' if available is None else f'{available / 2**30:.1f} GiB'}.")
    if r.get("errors"):
        lines += ["", "Sections that failed (the run went on; tracebacks in the log):", ""]
        lines += [f"* {key}: {text}" for key, text in r["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

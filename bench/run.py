#!/usr/bin/env python
"""FluxSR benchmark: a report, not a test. Prints a table and writes JSON (and markdown).

    python bench/run.py --tiny          # seconds, CPU: the whole path runs (CI smoke check)
    python bench/run.py                 # CPU, a small FLUX-architecture model (minutes)
    python bench/run.py --full-size     # FLUX.1-dev architecture, random weights, bf16, on the GPU

Measured:
  1. pipeline overhead: wall time of one upscale over the sum of its parts, each timed alone
     (resize+pad, VAE encode, the tiled one-step transformer, VAE decode, colour fix); goal <= 1.10;
  2. peak memory of an upscale at 4x the pixel count with the same fixed tiles, over the base
     size's (goal <= 1.3); CPU: peak RSS growth (VmHWM after resetting it), GPU: max allocated;
  3. one step against FLUX.1-dev's 28-step Euler teacher sampler at the same size (speed ratio);
  full size only: 4. transformer FLOPs counted from the shapes over the measured time, as a
     fraction of a large bf16 matmul's rate measured in the same run; 5. peak memory per memory mode.
Random weights: the timings are the architecture's, the pixels mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fluxsr_core import color, flow, images, models, tiling
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
    """Peak memory growth of a block: CUDA max allocated, or CPU peak RSS (VmHWM reset via clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (Linux >= 4.0)
                self.resettable = True
            except OSError:
                self.resettable = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = (self._rss("VmHWM") - self.base) if self.resettable else float("nan")

    @staticmethod
    def _rss(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0


def build(profile: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer and VAE of the profile's architecture (no files, no hub)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(0)
    if profile["transformer"] == "tiny":
        transformer = models.load_transformer("tiny", dtype=dtype, device=device)
        vae = models.load_vae("tiny", dtype=dtype, device=device)
    else:
        tcfg = {**shipped_config("flux1-dev-transformer"), **profile["transformer"]}
        vcfg = {**shipped_config("flux1-dev-vae"), **profile["vae"]}
        transformer = FluxTransformer2DModel.from_config(tcfg).to(dtype)
        vae = AutoencoderKL.from_config(vcfg).to(dtype)
        transformer.to(device).eval()
        vae.to(device).eval()
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae


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


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (the hardware yardstick)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t, _ = timed(lambda: a @ b, 5)
    return 2 * n ** 3 / t


def run_size(velocity, codec, cond, lr_size: int, tiling_cfg: TilingConfig, repeats: int) -> dict:
    """Time one upscale of an ``lr_size`` square image and each of its parts alone."""
    image = torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(1))
    options = UpscaleOptions(scale=4, t_l=0.25, color_fix="wavelet", tiling=tiling_cfg)
    out_h = out_w = lr_size * 4

    total, _ = timed(lambda: upscale_tensor(image, velocity, codec, cond, options), repeats)
    t_resize, upsampled = timed(lambda: images.pad_to_multiple(images.resize(image, (out_h, out_w)),
                                                                PIXEL_MULTIPLE)[0], repeats)
    t_encode, z_l = timed(lambda: codec.encode(upsampled), repeats)
    tiles = tiling.count_tiles(z_l.shape[-2], z_l.shape[-1], tiling_cfg)
    step = lambda z, off: flow.one_step_sr(velocity, z, 0.25, cond, off)
    t_transformer, z_h = timed(lambda: tiling.tiled_apply(step, z_l, tiling_cfg), repeats)
    t_decode, decoded = timed(lambda: codec.decode(z_h), repeats)
    t_color, _ = timed(lambda: color.apply_color_fix("wavelet", decoded[..., :out_h, :out_w], upsampled[..., :out_h, :out_w]), repeats)
    parts = dict(resize_pad=t_resize, vae_encode=t_encode, transformer_tiled=t_transformer,
                 vae_decode=t_decode, color_fix=t_color)
    return dict(lr=lr_size, out=out_h, tiles=tiles, total_s=total, parts_s=parts,
                overhead_ratio=total / sum(parts.values()), latent=list(z_l.shape[-2:]))


def peak_memory(velocity, codec, cond, lr_size: int, tiling_cfg: TilingConfig, device) -> float:
    image = torch.rand(1, 3, lr_size, lr_size)
    options = UpscaleOptions(scale=4, t_l=0.25, tiling=tiling_cfg)
    upscale_tensor(image, velocity, codec, cond, options)  # warm-up: allocator caches, lazy inits
    with PeakMemory(device) as pm:
        upscale_tensor(image, velocity, codec, cond, options)
    return pm.peak


def teacher_ratio(velocity, cond, latent_hw, steps: int, one_step_s: float) -> dict:
    h, w = latent_hw
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(2))
    sigmas = flow.flux_sigmas(steps, (h // 2) * (w // 2))
    t, _ = timed(lambda: flow.euler_sample(velocity, noise, sigmas, cond), 1)
    return dict(steps=steps, teacher_s=t, one_step_s=one_step_s, speed_ratio=t / one_step_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny models, CPU, seconds (smoke check)")
    mode.add_argument("--full-size", action="store_true", help="FLUX.1-dev architecture, random weights, bf16")
    parser.add_argument("--device", default=None, help="default: cpu for --tiny and the small model, auto for --full-size")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON/markdown report")
    parser.add_argument("--teacher-steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--memory-modes", default="none,fp8_storage,model_offload,group_offload",
                        help="full size: memory modes to measure")
    args = parser.parse_args(argv)

    name = "tiny" if args.tiny else ("full" if args.full_size else "small")
    profile = PROFILES[name]
    device = models.resolve_device(args.device or ("auto" if args.full_size else "cpu"))
    dtype = models.resolve_dtype(profile["dtype"], device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and name != "tiny":
        torch.set_num_threads(os.cpu_count() or 1)
    transformer, vae = build(profile, device, dtype)
    velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
    codec = models.DiffusersCodec(vae, compute_dtype=dtype, tile=profile["vae_tile"],
                                  tile_overlap=profile["vae_overlap"])
    cond = conditioning(transformer, profile["text"], device, dtype)
    tiles = TilingConfig(latent_tile=profile["tile"], latent_overlap=profile["overlap"],
                         vae_tile=profile["vae_tile"], vae_overlap=profile["vae_overlap"])

    report = dict(profile=name, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                   else platform.processor() or platform.machine()),
                  threads=torch.get_num_threads(), torch=torch.__version__, dtype=str(dtype).replace("torch.", ""),
                  tiling=dict(latent_tile=tiles.latent_tile, latent_overlap=tiles.latent_overlap,
                              vae_tile=tiles.vae_tile, vae_overlap=tiles.vae_overlap))
    import diffusers
    report["diffusers"] = diffusers.__version__

    with torch.inference_mode():
        base = run_size(velocity, codec, cond, profile["lr"], tiles, profile["repeats"])
        report["upscale"] = [base]
        # tiny runs every part of the full-size report on the CPU, so that path stays tested
        full_report = name in ("full", "tiny")
        if full_report:
            report["upscale"].append(run_size(velocity, codec, cond, profile["lr"] * 2, tiles, 2))
        # (2) memory at 4x the pixels (2x the side) with the same fixed tiles
        m1 = peak_memory(velocity, codec, cond, profile["lr"], tiles, device)
        m4 = peak_memory(velocity, codec, cond, profile["lr"] * 2, tiles, device)
        report["memory"] = dict(base_bytes=m1, four_x_bytes=m4, ratio=m4 / m1 if m1 else float("nan"),
                                method="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth (VmHWM)")
        # (3) one step vs the teacher sampler at the same (untiled) latent size
        z_hw = tuple(base["latent"])
        z = torch.randn(1, 16, *z_hw)
        one, _ = timed(lambda: flow.one_step_sr(velocity, z, 0.25, cond), profile["repeats"])
        report["teacher"] = teacher_ratio(velocity, cond, z_hw, args.teacher_steps, one)
        if full_report:
            flops = transformer_flops(transformer.config, (z_hw[0] // 2) * (z_hw[1] // 2), profile["text"])
            rate = matmul_rate(device, dtype, 8192 if name == "full" else 256)
            report["transformer_efficiency"] = dict(
                flops=flops, one_forward_s=one, achieved_flops_per_s=flops / one, matmul_flops_per_s=rate,
                fraction_of_matmul=(flops / one) / rate)
    if full_report:
        report["memory_modes"] = memory_modes(profile, device, dtype, args.memory_modes.split(","), tiles)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{name}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"written: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 0


def memory_modes(profile, device, dtype, modes, tiles) -> dict:
    """Peak device memory and time of one upscale (LR side ``profile['lr']``, x4) per memory mode,
    with fresh models each time (full size: 1024px output)."""
    out = {}
    for mode in modes:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        transformer, vae = build(profile, torch.device("cpu"), dtype)
        models.apply_memory_mode(transformer, vae, mode, device)
        velocity = models.DiffusersVelocity(transformer, compute_dtype=dtype)
        codec = models.DiffusersCodec(vae, compute_dtype=dtype, tile=profile["vae_tile"],
                                      tile_overlap=profile["vae_overlap"])
        cond = conditioning(transformer, profile["text"], device, dtype)
        with torch.inference_mode():
            lr = torch.rand(1, 3, profile["lr"], profile["lr"])
            t, _ = timed(lambda: upscale_tensor(lr, velocity, codec, cond, UpscaleOptions(tiling=tiles)), 1)
            with PeakMemory(device) as pm:
                upscale_tensor(lr, velocity, codec, cond, UpscaleOptions(tiling=tiles))
        out[mode] = dict(peak_bytes=pm.peak, seconds=t)
        del transformer, vae, velocity, codec
    return out


def markdown(r: dict) -> str:
    lines = [f"### FluxSR benchmark: {r['profile']} ({r['device_name']}, {r['device']}, {r['dtype']}, "
             f"torch {r['torch']}, {r['threads']} threads, {r['date']})", "",
             "| LR -> output | tiles | total s | resize | encode | transformer | decode | colour | overhead (goal <= 1.10) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for u in r["upscale"]:
        p = u["parts_s"]
        lines.append(f"| {u['lr']} -> {u['out']} | {u['tiles']} | {u['total_s']:.3f} | {p['resize_pad']:.3f} | "
                     f"{p['vae_encode']:.3f} | {p['transformer_tiled']:.3f} | {p['vae_decode']:.3f} | "
                     f"{p['color_fix']:.3f} | {u['overhead_ratio']:.3f} |")
    m = r["memory"]
    lines += ["", f"Peak memory ({m['method']}): base {m['base_bytes'] / 2**20:.1f} MiB, 4x pixels "
                  f"{m['four_x_bytes'] / 2**20:.1f} MiB, ratio {m['ratio']:.2f} (goal <= 1.3)."]
    t = r["teacher"]
    lines.append(f"One step {t['one_step_s'] * 1000:.1f} ms vs {t['steps']}-step teacher {t['teacher_s']:.3f} s: "
                 f"{t['speed_ratio']:.1f}x faster.")
    if "transformer_efficiency" in r:
        e = r["transformer_efficiency"]
        lines.append(f"Transformer: {e['flops'] / 1e12:.3g} TFLOP per forward in {e['one_forward_s'] * 1000:.1f} ms = "
                     f"{e['achieved_flops_per_s'] / 1e12:.3g} TFLOP/s, {100 * e['fraction_of_matmul']:.0f}% of the "
                     f"measured {r['dtype']} matmul rate ({e['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s).")
    if "memory_modes" in r:
        out_px = r["upscale"][0]["out"]
        lines += ["", f"| memory mode | peak MiB | s per {out_px}px image |", "|---|---|---|"]
        for mode, v in r["memory_modes"].items():
            lines.append(f"| {mode} | {v['peak_bytes'] / 2**20:.1f} | {v['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

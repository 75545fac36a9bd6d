"""The demo model recipe: ``python -m fluxsr_training.demo [--out DIR] [--quick]``.

FluxSR's student is FLUX.1-dev (12B) plus a LoRA; it cannot ship inside a Python package. So that
``fluxsr upscale photo.png -o out.png`` works offline right after installation, the package
carries a tiny demo model made by this recipe, from nothing but photos that ship in PyPI packages:

1. **Photos**: scikit-image's sample photos (``skimage.data``; no download). Three are held out
   for the report (:data:`HOLDOUT`) and never seen by any training step.
2. **VAE**: a 16-channel ``AutoencoderKL`` in FLUX's layout (8x downscale, 16 latent channels,
   small widths), trained from scratch on random crops (L1 + KL + a latent-statistics term so
   that FLUX's fixed normalisation ``(raw - 0.1159) * 0.3611`` gives latents with about zero mean
   and unit variance; a last exact per-channel rescale of the encoder output and decoder input
   makes the standard deviations exactly 1 on the training crops).
3. **Teacher**: a small ``FluxTransformer2DModel`` (FLUX architecture: double and single blocks,
   RoPE, guidance embedding), trained by rectified flow on VAE latents of photo crops, with one
   fixed conditioning: a seeded random "T5" and "CLIP" embedding (no text encoder can run here),
   saved as our conditioning bundle. The prompt it stands for is recorded as text.
4. **Pairs**: teacher pairs ``(eps, z_0)`` sampled with the core's Euler sampler, in the pair
   dataset format, plus real-photo pairs (``z_0 = encode(photo crop)``, ``eps ~ N(0, 1)``, the
   photo crop stored as the pair's image). The tiny teacher's samples are poor images, so the
   photo pairs are what teaches the student real detail; the report says so.
5. **Student**: teacher + LoRA distilled by the trainer (:func:`fluxsr_training.trainer.train`):
   FTD + MSE + TV-LPIPS (ST-LPIPS, whose weights ship in the stlpips-pytorch wheel) + ADL, the LR
   made by the Real-ESRGAN degradation.
6. **Export**: base transformer and VAE (diffusers keys, fp16), the LoRA (diffusers naming with
   the ``fluxsr.*`` run settings) and the conditioning bundle, into ``fluxsr_core/demo/``.
7. **Report**: PSNR-Y/SSIM-Y (and ST-LPIPS) on the held-out photos at x4, for a bicubic-downscaled
   LR and a Real-ESRGAN-degraded LR: bicubic, the VAE round trip of bicubic, the untrained student
   (LoRA off) and the trained student through ``fluxsr upscale`` itself (the users' path).

Everything is seeded. Results are reproducible on one machine with one thread count; CPU
kernels may round differently elsewhere. Each stage's output is kept in the work folder, so an
interrupted run continues at the first unfinished stage (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fluxsr_core.files import atomic_write, atomic_write_text

log = logging.getLogger("fluxsr.demo")

# Photos of skimage.data that ship inside the scikit-image wheel (no pooch download).
HOLDOUT = ("chelsea", "coffee", "rocket")
TRAIN_PHOTOS = ("astronaut", "camera", "coins", "moon", "clock", "brick", "grass", "gravel",
                "immunohistochemistry", "hubble_deep_field", "retina", "text",
                "motorcycle_left", "motorcycle_right")
# skimage.data.cat() is chelsea again: never used, so the held-out cat stays unseen.
DEMO_PROMPT = "a sharp, detailed, high-resolution photograph"
DEMO_BASE_MODEL = "fluxsr-demo (tiny FLUX-architecture teacher trained by fluxsr_training.demo)"
SCALE = 4
# The demo's LR inputs and bicubic rows use the upscaler's own (torch) bicubic: its shipped
# numbers (docs/demo_results.md) were made so, and stay reproducible.
DEMO_BICUBIC = "torch"


# =========================================================================================
# configuration
# =========================================================================================

@dataclass
class DemoConfig:
    """Every number of the recipe. :meth:`full` is the shipped demo, :meth:`quick` a smoke test."""

    seed: int = 0
    # VAE (FLUX layout: 4 levels = 8x, 16 latent channels). Widths of the shipped tiny-vae config,
    # whose 8-group GroupNorm the single-file loader then uses; other widths must be multiples of
    # 32 and get 32 groups. Measured on the held-out photos (PSNR of the round trip, 1 thread):
    # these widths reach 26.4 / 22.8 / 23.6 dB after 3000 steps; (64, 64, 64, 64) learns at about
    # the same rate per step for four times the compute.
    vae_widths: tuple = (16, 16, 32, 32)
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_w_kl: float = 1e-6
    vae_w_mse: float = 1.0
    vae_init_logvar: float = -8.0
    vae_w_stats: float = 0.01
    # teacher (head size 16: the rotary split [4, 6, 6] of the shipped tiny config)
    heads: int = 8
    double_blocks: int = 2
    single_blocks: int = 4
    t5_tokens: int = 8
    t5_width: int = 64
    clip_width: int = 32
    guidance: float = 3.5
    teacher_latents: int = 768          # photo crops encoded once for the teacher
    teacher_crops: tuple = (128, 256)   # crop sizes; batches alternate between them
    teacher_steps: int = 700
    teacher_batch: int = 16
    teacher_lr: float = 6e-4
    # pairs
    pair_size: int = 192
    teacher_pairs: int = 64
    sample_steps: int = 16
    photo_pairs: int = 448
    # student
    t_l: float = 0.25
    lora_rank: int = 32
    student_steps: int = 300
    student_batch: int = 4
    student_lr: float = 6e-4
    # The image MSE must dominate the SR branch of this tiny model: a first full run with
    # w_mse 2, w_tvlpips 0.2, w_adl 0.01 (450 steps) gave a 16-pixel (one token) periodic grid,
    # PSNR-Y 27.54 / SSIM-Y 0.712 on the bicubic-LR held-out set, worse than the untrained student.
    w_ftd: float = 1.0
    w_mse: float = 10.0
    w_tvlpips: float = 0.02
    w_adl: float = 0.001
    perceptual: str = "stlpips-alex"
    ema_decay: float = 0.99
    # report
    report_max_side: int = 0            # 0: whole held-out photos
    report_metrics: str = "psnr_y,ssim_y,stlpips,stlpips_vgg"

    @classmethod
    def full(cls) -> "DemoConfig":
        return cls()

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A few minutes at most: the whole recipe with tiny step counts (for tests)."""
        return cls(vae_widths=(16, 16, 32, 32), vae_steps=8, vae_batch=2, vae_crop=32, heads=2,
                   double_blocks=1, single_blocks=1, t5_tokens=4, t5_width=16, clip_width=8,
                   teacher_latents=8, teacher_crops=(64,), teacher_steps=4, teacher_batch=2,
                   pair_size=64, teacher_pairs=2, sample_steps=2, photo_pairs=4, lora_rank=4,
                   student_steps=3, student_batch=2, report_max_side=96,
                   report_metrics="psnr_y,ssim_y,stlpips")

    def section(self, *names: str) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in names}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# =========================================================================================
# photos
# =========================================================================================

def load_photo(name: str) -> torch.Tensor:
    """A skimage sample photo as float ``[3, H, W]`` in [0, 1] (gray repeated to RGB)."""
    import skimage.data as data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        raise ValueError(f"skimage photo {name} is {arr.dtype}, expected uint8")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


def _recolor(crop: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour augmentation: rotate the chroma around the gray axis by a random angle and scale
    the saturation (0.6-1.4). Most sample photos are gray or single-toned; the held-out ones are
    colourful, so the models must see every hue. Luma is unchanged."""
    theta = 2 * math.pi * float(torch.rand(1, generator=gen))
    sat = 0.6 + 0.8 * float(torch.rand(1, generator=gen))
    k = torch.full((3,), 1 / math.sqrt(3.0))
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = torch.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * (kx @ kx)   # Rodrigues
    gray = torch.full((3, 3), 1 / 3.0)
    m = gray + sat * (rot @ (torch.eye(3) - gray))
    return torch.einsum("ij,jhw->ihw", m, crop).clamp(0, 1)


class PhotoCrops:
    """Random square crops of the training photos: uniform photo choice, random zoom-out
    (sharper detail from large photos), flips and quarter turns. Deterministic per generator."""

    def __init__(self, photos: dict[str, torch.Tensor], color: bool = True):
        self.names = sorted(photos)
        self.photos = photos
        self.color = color

    def sample(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        from fluxsr_core.images import resize

        out = []
        for _ in range(n):
            img = self.photos[self.names[int(torch.randint(len(self.names), (1,), generator=gen))]]
            _, H, W = img.shape
            # zoom-out factor in [1, max_zoom]: the crop covers size*zoom pixels, resized to size
            max_zoom = max(1.0, min(2.0, min(H, W) / size))
            zoom = 1.0 + (max_zoom - 1.0) * float(torch.rand(1, generator=gen))
            side = min(min(H, W), int(round(size * zoom)))
            y = int(torch.randint(H - side + 1, (1,), generator=gen))
            x = int(torch.randint(W - side + 1, (1,), generator=gen))
            crop = img[:, y:y + side, x:x + side][None]
            if side != size:
                crop = resize(crop, (size, size))
            crop = crop[0]
            if float(torch.rand(1, generator=gen)) < 0.5:
                crop = crop.flip(-1)
            crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=gen)), dims=(1, 2))
            if self.color and float(torch.rand(1, generator=gen)) < 0.5:
                crop = _recolor(crop, gen)
            # 8-bit, as a photo crop saved to disk would be
            out.append((crop.clamp(0, 1) * 255).round() / 255)
        return torch.stack(out).contiguous()


# =========================================================================================
# VAE
# =========================================================================================

def vae_config(cfg: DemoConfig) -> dict:
    """An ``AutoencoderKL`` config in the FLUX VAE layout (16 channels, 8x, FLUX's shift/scale)."""
    n = len(cfg.vae_widths)
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": list(cfg.vae_widths), "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            # the groups the single-file loader infers (weights.infer_vae_config)
            "norm_num_groups": 8 if tuple(cfg.vae_widths) == (16, 16, 32, 32) else 32,
            "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
            "mid_block_add_attention": True, "sample_size": 1024, "force_upcast": True,
            "scaling_factor": 0.3611, "shift_factor": 0.1159}


def train_vae(cfg: DemoConfig, crops: PhotoCrops, say: Callable[[str], None],
              every: Optional[Callable[[int, Any], None]] = None):
    """Train the demo VAE; returns it (fp32, eval mode) and a dict of training facts.

    ``every(step, vae)`` is called every 100 steps (for experiments and progress checks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**vae_config(cfg))
    with torch.no_grad():
        # Start the posterior narrow (std ~0.02 of the raw latent): a wide one drowns the decoder's
        # input in noise and slows learning many-fold; the KL term then keeps it honest.
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = cfg.vae_init_logvar
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=max(2, cfg.vae_steps),
                                                pct_start=0.05)
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        x = crops.sample(cfg.vae_batch, cfg.vae_crop, gen)
        post = vae.encode(x * 2 - 1).latent_dist
        noise = torch.randn(post.mean.shape, generator=gen)
        z = post.mean + post.std * noise
        y = vae.decode(z).sample
        zn = (post.mean - 0.1159) * 0.3611
        # FLUX's fixed normalisation must give ~N(0, 1) latents: per-channel mean 0, std 1.
        stats = zn.mean(dim=(0, 2, 3)).pow(2).mean() + (zn.std(dim=(0, 2, 3)) - 1).pow(2).mean()
        err = y - (x * 2 - 1)
        loss = (err.abs().mean() + cfg.vae_w_mse * err.pow(2).mean() + cfg.vae_w_kl * post.kl().mean()
                + cfg.vae_w_stats * stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.vae_steps:
            say(f"  vae step {step + 1}/{cfg.vae_steps}: loss {loss.item():.4f} (stats {stats.item():.3f}), "
                f"{(time.time() - t0) / (step + 1):.2f} s/step")
            if every is not None:
                vae.eval()
                every(step + 1, vae)
                vae.train()
    vae.eval()
    facts = calibrate_vae(vae, crops, cfg, say)
    facts["seconds"] = time.time() - t0
    return vae, facts


@torch.no_grad()
def calibrate_vae(vae, crops: PhotoCrops, cfg: DemoConfig, say: Callable[[str], None]) -> dict:
    """Rescale each latent channel exactly so normalised latents have unit std on training crops.

    ``raw' = a * raw`` (encoder ``conv_out`` rows of the mean scaled by ``a``, log-variance
    shifted by ``2 log a``) and the decoder's ``conv_in`` input columns divided by ``a``: the
    decoder sees exactly what it saw before, so reconstructions do not change. The mean is left to
    the training term (a shift is not exact at the zero-padded borders of ``conv_in``).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 12)
    x = crops.sample(max(8, 4 * cfg.vae_batch), max(cfg.vae_crop, 64), gen)
    raw = torch.cat([vae.encode(x[i:i + 8] * 2 - 1).latent_dist.mean for i in range(0, len(x), 8)])
    before = (raw - 0.1159) * 0.3611
    std = before.std(dim=(0, 2, 3))
    # z = (a * raw - 0.1159) * 0.3611 has std a * std(before) = 1; its mean moves by
    # 0.3611 * 0.1159 * (a - 1) when the training term has centred it, which stays small.
    a = (1.0 / std).clamp(0.05, 20.0)
    conv_out, conv_in = vae.encoder.conv_out, vae.decoder.conv_in
    c = vae.config.latent_channels
    conv_out.weight[:c] *= a.view(-1, 1, 1, 1)
    conv_out.bias[:c] *= a
    conv_out.bias[c:] += 2 * torch.log(a)
    conv_in.weight /= a.view(1, -1, 1, 1)
    after = (torch.cat([vae.encode(x[i:i + 8] * 2 - 1).latent_dist.mean for i in range(0, len(x), 8)])
             - 0.1159) * 0.3611
    facts = {"latent_std_before": [round(float(v), 4) for v in std],
             "latent_mean_after": round(float(after.mean()), 4), "latent_std_after": round(float(after.std()), 4),
             "channel_mean_after": [round(float(v), 4) for v in after.mean(dim=(0, 2, 3))],
             "channel_std_after": [round(float(v), 4) for v in after.std(dim=(0, 2, 3))]}
    say(f"  vae latents (FLUX normalisation): mean {facts['latent_mean_after']:+.3f}, std "
        f"{facts['latent_std_after']:.3f} (per-channel std was {min(facts['latent_std_before']):.2f}.."
        f"{max(facts['latent_std_before']):.2f} before the exact rescale)")
    return facts


# =========================================================================================
# teacher
# =========================================================================================

def teacher_config(cfg: DemoConfig) -> dict:
    """A small ``FluxTransformer2DModel`` config (FLUX architecture, head size 16)."""
    return {"attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": cfg.t5_width, "num_attention_heads": cfg.heads,
            "num_layers": cfg.double_blocks, "num_single_layers": cfg.single_blocks, "patch_size": 1,
            "pooled_projection_dim": cfg.clip_width}


def demo_conditioning(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed conditioning: seeded N(0, 1) 'T5' tokens ``[1, L, D]`` and 'CLIP' vector ``[1, P]``.

    A stand-in for encoding :data:`DEMO_PROMPT`: no text encoder can run offline here, and the
    teacher is trained with this one conditioning, so any fixed tensors serve.
    """
    g = torch.Generator().manual_seed(cfg.seed + 21)
    t5 = torch.randn(1, cfg.t5_tokens, cfg.t5_width, generator=g)
    clip = torch.randn(1, cfg.clip_width, generator=g)
    return t5, clip


@torch.no_grad()
def encode_crops(codec, crops: PhotoCrops, n: int, size: int, gen: torch.Generator, batch: int = 8) -> torch.Tensor:
    """``n`` photo crops of ``size`` encoded to normalised latents ``[n, 16, size/8, size/8]``."""
    out = []
    for i in range(0, n, batch):
        x = crops.sample(min(batch, n - i), size, gen)
        out.append(codec.encode(x))
    return torch.cat(out)


def train_teacher(cfg: DemoConfig, codec, crops: PhotoCrops, say: Callable[[str], None]):
    """Rectified-flow training of the small FLUX transformer on photo latents; returns it (eval)."""
    from diffusers import FluxTransformer2DModel

    from fluxsr_core.interfaces import Conditioning
    from fluxsr_core.models import DiffusersVelocity

    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed + 31)
    pools = {}
    per_size = max(1, cfg.teacher_latents // len(cfg.teacher_crops))
    for size in cfg.teacher_crops:
        # fewer large crops: each holds four times the tokens
        n = max(cfg.teacher_batch, per_size * 128 * 128 // (size * size) * len(cfg.teacher_crops) // 2)
        pools[size] = encode_crops(codec, crops, n, size, gen)
    say("  teacher data: " + ", ".join(f"{len(v)} latents of {k}px" for k, v in pools.items())
        + f" ({time.time() - t0:.0f} s)")
    torch.manual_seed(cfg.seed + 32)
    model = FluxTransformer2DModel(**teacher_config(cfg))
    velocity = DiffusersVelocity(model, compute_dtype=torch.float32, device="cpu")
    t5, clip = demo_conditioning(cfg)
    cond = Conditioning(t5=t5, clip_pooled=clip, guidance=cfg.guidance)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.teacher_lr, total_steps=max(2, cfg.teacher_steps),
                                                pct_start=0.05)
    model.train()
    sizes = list(cfg.teacher_crops)
    for step in range(cfg.teacher_steps):
        size = sizes[step % len(sizes)]
        pool = pools[size]
        bs = cfg.teacher_batch if size <= 128 else max(1, cfg.teacher_batch // 4)
        idx = torch.randint(len(pool), (bs,), generator=gen)
        x0 = pool[idx]
        eps = torch.randn(x0.shape, generator=gen)
        # times: half uniform, half logit-normal (SD3/FLUX-style emphasis on the middle)
        u = torch.rand(bs, generator=gen)
        ln = torch.sigmoid(torch.randn(bs, generator=gen))
        t = torch.where(torch.rand(bs, generator=gen) < 0.5, u, ln).clamp(1e-3, 1.0)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        v = velocity(x_t, t, cond)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.teacher_steps:
            say(f"  teacher step {step + 1}/{cfg.teacher_steps}: loss {loss.item():.4f}, "
                f"{(time.time() - t0) / (step + 1):.2f} s/step")
    model.eval()
    return model, {"seconds": time.time() - t0, "final_loss": float(loss.item())}


# =========================================================================================
# files
# =========================================================================================

def save_model_file(model, path: Path, metadata: dict[str, str], dtype=torch.float16) -> Path:
    """Write a diffusers-keyed safetensors file (``dtype`` storage) atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", **metadata}))
    return path


# =========================================================================================
# pairs
# =========================================================================================

def write_photo_pairs(folder: Path, cfg: DemoConfig, codec, crops: PhotoCrops, t5, clip,
                      say: Callable[[str], None]) -> int:
    """Real-photo pairs: ``z_0 = encode(crop)``, ``eps ~ N(0, 1)``, the crop stored as the image."""
    from fluxsr_core.pairs import PairWriter

    gen = torch.Generator().manual_seed(cfg.seed + 41)
    written = 0
    with PairWriter(folder, writer_id="photos", shard_size=32, fsync=False) as writer:
        for i in range(0, cfg.photo_pairs, 8):
            n = min(8, cfg.photo_pairs - i)
            x = crops.sample(n, cfg.pair_size, gen)
            with torch.no_grad():
                z0 = codec.encode(x)
            eps = torch.randn(z0.shape, generator=gen)
            for j in range(n):
                written += writer.add(f"photo{i + j:06d}", eps[j], z0[j], t5, clip,
                                      meta={"source": "photo crop (skimage.data)", "resolution": cfg.pair_size},
                                      image=x[j])
    say(f"  {written} real-photo pairs")
    return written


# =========================================================================================
# the recipe
# =========================================================================================

class Recipe:
    """Runs the stages in order, each skipped when its outputs exist for the same settings."""

    def __init__(self, cfg: DemoConfig, out: Path, work: Path, docs: Optional[Path], quick: bool,
                 say: Callable[[str], None] = print):
        self.cfg, self.out, self.work, self.docs, self.quick = cfg, out, work, docs, quick
        self.say = say
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path = work / "stages.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        # per stage: {"wall": s, "cpu": s} of the run that made its outputs
        self.timings: dict[str, dict] = {k: v for k, v in self.state.get("_timings", {}).items()
                                         if isinstance(v, dict)}
        self._cpu0 = _cpu_seconds()
        self.photos_train = {n: load_photo(n) for n in TRAIN_PHOTOS}
        self.crops = PhotoCrops(self.photos_train)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _done(self, stage: str, key: Any, files: Sequence[Path]) -> bool:
        rec = self.state.get(stage)
        return bool(rec) and rec.get("key") == _digest(key) and all(Path(f).exists() for f in files)

    def _finish(self, stage: str, key: Any, seconds: float, facts: Optional[dict] = None) -> None:
        self.state[stage] = {"key": _digest(key), "facts": facts or {}}
        self.timings[stage] = {"wall": round(seconds, 1), "cpu": round(_cpu_seconds() - self._cpu0, 1)}
        self.state["_timings"] = self.timings
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2))

    def facts(self, stage: str) -> dict:
        return self.state.get(stage, {}).get("facts", {})

    # -- stages -----------------------------------------------------------------------------------

    @property
    def vae_path(self) -> Path:
        return self.work / "vae.safetensors"

    @property
    def teacher_path(self) -> Path:
        return self.work / "transformer.safetensors"

    @property
    def bundle_path(self) -> Path:
        return self.work / "conditioning.safetensors"

    @property
    def pairs_dir(self) -> Path:
        return self.work / "pairs"

    def codec(self):
        from fluxsr_core.models import DiffusersCodec, load_vae

        return DiffusersCodec(load_vae(self.vae_path, dtype="fp32", device="cpu"))

    def stage_vae(self) -> None:
        key = self.cfg.section("seed", "vae_widths", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_w_kl",
                               "vae_w_stats", "vae_w_mse", "vae_init_logvar")
        if self._done("vae", key, [self.vae_path]):
            self.say("[1/6] VAE: done before, kept")
            return
        self.say(f"[1/6] VAE: {self.cfg.vae_steps} steps on {self.cfg.vae_crop}px crops of {len(TRAIN_PHOTOS)} photos")
        t0 = time.time()
        vae, facts = train_vae(self.cfg, self.crops, self.say)
        save_model_file(vae, self.vae_path, {"fluxsr.content": "demo VAE",
                                             "fluxsr.note": "FluxSR demo VAE trained by fluxsr_training.demo"})
        self._finish("vae", key, time.time() - t0, facts)

    def stage_teacher(self) -> None:
        from fluxsr_core.bundle import save_bundle
        from fluxsr_core.settings import RunSettings

        key = [self.state.get("vae", {}).get("key"),
               self.cfg.section("seed", "heads", "double_blocks", "single_blocks", "t5_tokens", "t5_width",
                                "clip_width", "guidance", "teacher_latents", "teacher_crops", "teacher_steps",
                                "teacher_batch", "teacher_lr", "t_l")]
        if self._done("teacher", key, [self.teacher_path, self.bundle_path]):
            self.say("[2/6] teacher: done before, kept")
            return
        self.say(f"[2/6] teacher: FLUX architecture, {self.cfg.double_blocks} double + {self.cfg.single_blocks} "
                 f"single blocks, width {16 * self.cfg.heads}; {self.cfg.teacher_steps} rectified-flow steps")
        t0 = time.time()
        model, facts = train_teacher(self.cfg, self.codec(), self.crops, self.say)
        facts["parameters"] = sum(p.numel() for p in model.parameters())
        save_model_file(model, self.teacher_path, {"fluxsr.content": "demo transformer",
                                                   "fluxsr.note": "FluxSR demo teacher trained by fluxsr_training.demo"})
        t5, clip = demo_conditioning(self.cfg)
        settings = RunSettings(t_l=self.cfg.t_l, guidance=self.cfg.guidance, scale=float(SCALE),
                               base_model=DEMO_BASE_MODEL)
        save_bundle(self.bundle_path, t5, clip, settings,
                    prompt=f"{DEMO_PROMPT} (stand-in: seeded random embedding, no text encoder)")
        self._finish("teacher", key, time.time() - t0, facts)

    def stage_pairs(self) -> None:
        key = [self.state.get("teacher", {}).get("key"),
               self.cfg.section("seed", "pair_size", "teacher_pairs", "sample_steps", "photo_pairs")]
        if self._done("pairs", key, [self.pairs_dir]):
            self.say("[3/6] pairs: done before, kept")
            return
        if self.pairs_dir.exists():
            shutil.rmtree(self.pairs_dir)
        self.say(f"[3/6] pairs: {self.cfg.teacher_pairs} teacher pairs ({self.cfg.sample_steps} Euler steps) + "
                 f"{self.cfg.photo_pairs} real-photo pairs at {self.cfg.pair_size}px")
        t0 = time.time()
        from fluxsr_core.bundle import load_bundle

        b = load_bundle(self.bundle_path)
        n_teacher = self._teacher_pairs(b)
        n_photo = write_photo_pairs(self.pairs_dir, self.cfg, self.codec(), self.crops, b.t5, b.clip_pooled,
                                    self.say)
        self._finish("pairs", key, time.time() - t0, {"teacher_pairs": n_teacher, "photo_pairs": n_photo})

    def _teacher_pairs(self, bundle) -> int:
        """Teacher pairs through ``fluxsr_training.generate`` (the ``fluxsr-train pairs`` engine)."""
        from .generate import GenerateConfig, generate_pairs

        prompts = self.work / "prompts.txt"
        prompts.write_text(DEMO_PROMPT + "\n", encoding="utf-8")
        gcfg = GenerateConfig(transformer=str(self.teacher_path), vae=str(self.vae_path), prompts=str(prompts),
                              output=str(self.pairs_dir), bundle=str(self.bundle_path), steps=self.cfg.sample_steps,
                              guidance=self.cfg.guidance, height=self.cfg.pair_size, width=self.cfg.pair_size,
                              seed=self.cfg.seed + 1000, pairs_per_prompt=self.cfg.teacher_pairs, batch_size=8,
                              save_image=True, shard_size=32, writer_prefix="teacher", dtype="fp32",
                              device="cpu", fsync=False, progress_bar=False)
        result = generate_pairs(gcfg)
        self.say(f"  {len(result.written)} teacher pairs ({result.seconds:.0f} s)")
        return len(result.written)

    @property
    def student_dir(self) -> Path:
        return self.work / "student"

    def train_config(self):
        """The :class:`~fluxsr_training.trainer.TrainConfig` of the demo student."""
        from . import trainer as T
        from .degradation import DegradationConfig

        c = self.cfg
        return T.TrainConfig(
            model=T.ModelConfig(transformer=str(self.teacher_path), vae=str(self.vae_path), dtype="fp32",
                                base_model=DEMO_BASE_MODEL),
            lora=T.LoraConfig(rank=c.lora_rank, alpha=float(c.lora_rank)),
            settings=T.SettingsConfig(t_l=c.t_l, guidance=c.guidance),
            data=T.DataConfig(pairs=str(self.pairs_dir), conditioning=str(self.bundle_path), teacher_image="auto",
                              batch_size=c.student_batch, seed=c.seed),
            degradation=DegradationConfig(scale=SCALE),
            # the image losses clamped, as when the shipped demo was made (before 0.3.1)
            loss=T.LossConfig(w_ftd=c.w_ftd, w_mse=c.w_mse, w_tvlpips=c.w_tvlpips, w_adl=c.w_adl,
                              perceptual=c.perceptual, clamp_decoded=True),
            optim=T.OptimConfig(lr=c.student_lr, weight_decay=0.0, schedule="cosine",
                                warmup_steps=max(1, c.student_steps // 20)),
            ema=T.EmaConfig(enabled=True, decay=c.ema_decay),
            checkpoint=T.CheckpointConfig(every=max(1, c.student_steps), keep_last=1),
            validation=T.ValidationConfig(every=0),
            train=T.TrainLoopConfig(output_dir=str(self.student_dir), max_steps=c.student_steps,
                                    mixed_precision="no", seed=c.seed, log_every=max(1, min(50, c.student_steps)),
                                    tensorboard="false", progress_bar=False),
        )

    def stage_student(self) -> None:
        from .trainer import latest_checkpoint, train

        tcfg = self.train_config()
        key = [self.state.get("pairs", {}).get("key"), tcfg.to_dict()]
        if self._done("student", key, [self.student_dir]) and latest_checkpoint(self.student_dir) is not None:
            self.say("[4/6] student: done before, kept")
            return
        if self.student_dir.exists():
            shutil.rmtree(self.student_dir)
        self.say(f"[4/6] student: teacher + LoRA rank {self.cfg.lora_rank}, {self.cfg.student_steps} steps, "
                 f"FTD {self.cfg.w_ftd:g} + MSE {self.cfg.w_mse:g} + TV-LPIPS {self.cfg.w_tvlpips:g} "
                 f"({self.cfg.perceptual}) + ADL {self.cfg.w_adl:g}")
        t0 = time.time()
        result = train(tcfg)
        hist = result.history
        facts = {"first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
                 "history": hist, "perceptual": result.perceptual_label, "steps": result.step}
        self._finish("student", key, time.time() - t0, facts)

    def stage_export(self) -> None:
        from fluxsr_core import demo_model as D

        from .export import export_student

        self.say(f"[5/6] export to {self.out}")
        t0 = time.time()
        staging = self.work / "export"
        if staging.exists():
            shutil.rmtree(staging)
        res = export_student(self.student_dir, staging, use_ema=True, lora_name=D.LORA_FILE,
                             bundle_name=D.CONDITIONING_FILE)
        self.out.mkdir(parents=True, exist_ok=True)
        for src, name in ((Path(res.lora_path), D.LORA_FILE), (Path(res.bundle_path), D.CONDITIONING_FILE),
                          (self.teacher_path, D.TRANSFORMER_FILE), (self.vae_path, D.VAE_FILE)):
            atomic_write(self.out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        self._finish("export", None, time.time() - t0, {"step": res.step, "ema": res.ema, "rank": res.rank})

    def stage_report(self) -> dict:
        self.say("[6/6] report on the held-out photos: " + ", ".join(HOLDOUT))
        t0 = time.time()
        report = make_report(self.out, self.work / "report", self.cfg, self.say)
        self._finish("report", None, time.time() - t0)
        return report

    def run(self) -> dict:
        cpu0 = _cpu_seconds()
        t0 = time.time()
        for stage in (self.stage_vae, self.stage_teacher, self.stage_pairs, self.stage_student, self.stage_export):
            self._cpu0 = _cpu_seconds()
            stage()
        self._cpu0 = _cpu_seconds()
        report = self.stage_report()
        report["recipe"] = self.summary(time.time() - t0, _cpu_seconds() - cpu0)
        _atomic_json(self.out / "report.json", report)
        if self.docs is not None:

            atomic_write_text(self.docs, render_markdown(report))
        return report

    def summary(self, wall: float, cpu: float) -> dict:
        files = {p.name: p.stat().st_size for p in sorted(self.out.iterdir()) if p.is_file() and
                 not p.name.startswith(".")}
        return {
            "command": "python -m fluxsr_training.demo" + (" --quick" if self.quick else ""),
            "quick": self.quick, "config": dataclasses.asdict(self.cfg),
            "holdout": list(HOLDOUT), "train_photos": list(TRAIN_PHOTOS), "prompt": DEMO_PROMPT,
            "stage_seconds": dict(self.timings), "this_run_wall_seconds": round(wall, 1),
            "total_wall_seconds": round(sum(v["wall"] for v in self.timings.values()), 1),
            "total_cpu_seconds": round(sum(v["cpu"] for v in self.timings.values()), 1),
            "this_run_cpu_seconds": round(cpu, 1),
            "facts": {k: self.facts(k) for k in ("vae", "teacher", "pairs", "student", "export")},
            "files": files, "total_bytes": sum(files.values()),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count()},
        }


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _atomic_json(path: Path, obj: Any) -> None:

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")


# =========================================================================================
# report
# =========================================================================================

ROW_VAE = "VAE round trip of bicubic: decode(encode(bicubic))"
ROW_VAE_FIX = "VAE round trip + wavelet colour fix"
ROW_UNTRAINED = "untrained student (LoRA off)"
ROW_TRAINED = "trained student (fluxsr upscale)"
LR_KINDS = {"bicubic": "bicubic x4 downscale (antialiased, 8-bit)",
            "realesrgan": "Real-ESRGAN second-order degradation x4 (shipped config, seed 100 + i)"}


def holdout_images(cfg: DemoConfig) -> dict[str, np.ndarray]:
    """The held-out photos, 8-bit, cropped to multiples of 16 (and centre-cropped in quick mode)."""
    from .evaluate import to_uint8_hwc

    out = {}
    for name in HOLDOUT:
        img = to_uint8_hwc(load_photo(name))
        h, w = img.shape[:2]
        if cfg.report_max_side:
            m = cfg.report_max_side
            y, x = max(0, (h - m) // 2), max(0, (w - m) // 2)
            img = img[y:y + m, x:x + m]
            h, w = img.shape[:2]
        out[name] = np.ascontiguousarray(img[: h - h % 16, : w - w % 16])
    return out


def _upscale_with_cli(paths, lr_dir: Path, out_dir: Path, lora_scale: float) -> dict[str, np.ndarray]:
    """Run ``fluxsr upscale`` itself on a folder of LR PNGs; returns the outputs by name."""
    from fluxsr_core import cli

    from .evaluate import read_image_8bit

    argv = ["upscale", str(lr_dir), "-o", str(out_dir), *paths.cli_args(), "--device", "cpu", "--dtype", "fp32",
            "--overwrite", "-q", "--lora-scale", repr(float(lora_scale))]
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "fluxsr-upscale.log"
    with open(log_path, "w", encoding="utf-8") as f, contextlib.redirect_stderr(f):
        code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"fluxsr upscale failed (exit {code}) on {lr_dir}; see {log_path}")
    return {p.stem: read_image_8bit(p) for p in sorted(out_dir.glob("*.png"))}


def make_report(out: Path, work: Path, cfg: DemoConfig, say: Callable[[str], None]) -> dict:
    """Score the shipped files on the held-out photos (see the module doc, step 7)."""
    from PIL import Image

    from fluxsr_core import color, images
    from fluxsr_core import demo_model as D
    from fluxsr_core.models import DiffusersCodec, load_vae

    from .degradation import DegradationConfig, degrade
    from .evaluate import bicubic_downscale, bicubic_upscale, evaluate_images, to_uint8_hwc

    paths = D.demo_paths(out) if (out / D.REPORT_FILE).exists() else None
    if paths is None:
        # report.json is written at the end; until then point at the other four files directly.
        paths = D.DemoPaths(transformer=out / D.TRANSFORMER_FILE, vae=out / D.VAE_FILE, lora=out / D.LORA_FILE,
                            conditioning=out / D.CONDITIONING_FILE, report=out / D.REPORT_FILE)
    hr = holdout_images(cfg)
    codec = DiffusersCodec(load_vae(paths.vae, dtype="fp32", device="cpu"))
    results: dict[str, Any] = {"lr_kinds": {}, "holdout": {k: list(v.shape[:2]) for k, v in hr.items()}}
    # The ceiling the VAE puts on any student: the round trip of the HR photo itself.
    with torch.no_grad():
        ceiling = {name: to_uint8_hwc(codec.decode(codec.encode(
            torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255))[0]) for name, img in hr.items()}
    ceil_rep = evaluate_images({"VAE round trip of HR": ceiling}, hr, SCALE, metrics="psnr_y,ssim_y", bicubic=False)
    results["vae_hr_round_trip"] = ceil_rep.row("VAE round trip of HR").mean
    say(f"  VAE round trip of the HR photos: {results['vae_hr_round_trip']['psnr_y']:.2f} dB / "
        f"{results['vae_hr_round_trip']['ssim_y']:.4f}")
    for kind, what in LR_KINDS.items():
        lr = {}
        for i, (name, img) in enumerate(hr.items()):
            if kind == "bicubic":
                lr[name] = bicubic_downscale(img, SCALE, DEMO_BICUBIC)
            else:
                t = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
                lr[name] = to_uint8_hwc(degrade(t, DegradationConfig(scale=SCALE), seed=100 + i)[0])
        lr_dir = work / f"lr-{kind}"
        lr_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in lr.items():
            Image.fromarray(arr).save(lr_dir / f"{name}.png")
        methods: dict[str, dict[str, np.ndarray]] = {ROW_VAE: {}, ROW_VAE_FIX: {}}
        with torch.no_grad():
            for name, arr in lr.items():
                up = torch.from_numpy(bicubic_upscale(arr, SCALE, DEMO_BICUBIC)).permute(2, 0, 1).float()[None] / 255
                padded, _ = images.pad_to_multiple(up, 16)
                rt = images.crop(codec.decode(codec.encode(padded)), *up.shape[-2:])
                methods[ROW_VAE][name] = to_uint8_hwc(rt[0])
                methods[ROW_VAE_FIX][name] = to_uint8_hwc(color.apply_color_fix("wavelet", rt, up)[0])
        methods[ROW_UNTRAINED] = _upscale_with_cli(paths, lr_dir, work / f"untrained-{kind}", 0.0)
        methods[ROW_TRAINED] = _upscale_with_cli(paths, lr_dir, work / f"trained-{kind}", 1.0)
        rep = evaluate_images(methods, hr, SCALE, lr_images=lr, metrics=cfg.report_metrics,
                              notes=[f"LR: {what}"], bicubic_kernel=DEMO_BICUBIC)
        results["lr_kinds"][kind] = {"lr": what, "table": rep.as_dict(), "markdown": rep.to_markdown()}
        means = {r.name: r.mean for r in rep.rows}
        say(f"  LR {kind}: " + "; ".join(f"{n.split(' (')[0].split(':')[0]} {m['psnr_y']:.2f} dB / {m['ssim_y']:.4f}"
                                         for n, m in means.items()))
    results["checks"] = _checks(results)
    return results


def _checks(results: dict) -> dict:
    """Does the trained student beat the untrained one, the VAE round trip and bicubic (PSNR-Y, SSIM-Y)?"""
    out = {}
    for kind, data in results["lr_kinds"].items():
        means = {r["name"]: r["mean"] for r in data["table"]["rows"]}
        t = means[ROW_TRAINED]
        out[kind] = {
            f"beats {other} on {m}": bool(float(t[m]) > float(means[other][m]))
            for other in ("bicubic", ROW_VAE, ROW_VAE_FIX, ROW_UNTRAINED) for m in ("psnr_y", "ssim_y")
        }
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def render_markdown(report: dict) -> str:
    """``docs/demo_results.md``: what the demo is, how it was made, the measured numbers."""
    from .evaluate import bicubic_kernel_words

    r = report["recipe"]
    c = r["config"]
    f = r["facts"]
    mb = r["total_bytes"] / 1e6
    lines = [
        "# The shipped demo model: what it is and how well it does",
        "",
        "FluxSR's real student is FLUX.1-dev (12B parameters) plus a LoRA; it cannot ship inside a Python "
        "package. So that `fluxsr upscale photo.png -o out.png` works offline right after installation, "
        "`fluxsr_core/demo/` carries a **tiny demo model** "
        f"({mb:.1f} MB) made by the committed recipe `{r['command']}`. It runs the whole FluxSR pipeline "
        "(one-step LoRA student over a FLUX-architecture transformer, 16-channel VAE, conditioning bundle, "
        "the same files and code path as the real model), but it is a toy: a few million parameters trained "
        "for minutes on a handful of photos. **It is not FLUX.1-dev quality and is not meant for real work.**",
        "",
        "## How it was made",
        "",
        f"- Photos: `skimage.data` sample photos that ship inside the scikit-image wheel. Training: "
        f"{', '.join(r['train_photos'])}. **Held out** (never seen by any training step): "
        f"{', '.join(r['holdout'])}.",
        f"- VAE: diffusers `AutoencoderKL` in FLUX's layout (8x downscale, 16 latent channels), widths "
        f"{c['vae_widths']}, trained from scratch for {c['vae_steps']} steps (batch {c['vae_batch']}, "
        f"{c['vae_crop']} px crops, L1 + a latent-statistics term), then rescaled exactly per channel so FLUX's "
        f"fixed normalisation `(raw - 0.1159) * 0.3611` gives latents with mean "
        f"{f['vae'].get('latent_mean_after', float('nan')):+.3f} and std {f['vae'].get('latent_std_after', float('nan')):.3f} "
        "on training crops. Its round trip of the held-out HR photos scores "
        f"{report['vae_hr_round_trip']['psnr_y']:.2f} dB PSNR-Y / {report['vae_hr_round_trip']['ssim_y']:.4f} "
        "SSIM-Y: a ceiling that no student decoded by it can pass by much, and below bicubic.",
        f"- Teacher: diffusers `FluxTransformer2DModel` (FLUX architecture with guidance embedding), "
        f"{c['double_blocks']} double + {c['single_blocks']} single blocks, width {16 * c['heads']} "
        f"({f['teacher'].get('parameters', 0) / 1e6:.2f} M parameters), trained by rectified flow for "
        f"{c['teacher_steps']} steps on VAE latents of {', '.join(str(s) for s in c['teacher_crops'])} px photo crops. "
        f"Conditioning: one fixed, seeded random \"T5\" [1, {c['t5_tokens']}, {c['t5_width']}] and \"CLIP\" "
        f"[1, {c['clip_width']}] embedding standing for the prompt \"{r['prompt']}\" (no text encoder runs "
        "offline; with one fixed conditioning any fixed tensors serve).",
        f"- Pairs: {f['pairs'].get('teacher_pairs')} teacher pairs (Euler sampler, {c['sample_steps']} steps, "
        f"{c['pair_size']} px) through `fluxsr-train pairs`' engine, **plus {f['pairs'].get('photo_pairs')} "
        "real-photo pairs** (`z_0 = encode(photo crop)`, `eps ~ N(0, 1)`, the crop stored as the pair's image). "
        "The tiny teacher's samples are poor images (texture-like, with visible 8-pixel blocks), so what the "
        "student learns about real photos comes from the photo pairs; the real FluxSR recipe uses teacher "
        "pairs only.",
        f"- Student: teacher + LoRA rank {c['lora_rank']} on every attention/MLP linear layer, distilled by "
        f"`fluxsr_training.trainer.train` for {c['student_steps']} steps (batch {c['student_batch']}): "
        f"FTD x{c['w_ftd']:g} + MSE x{c['w_mse']:g} + TV-LPIPS x{c['w_tvlpips']:g} with "
        f"{f['student'].get('perceptual')} (the AlexNet variant for CPU speed) + ADL x{c['w_adl']:g}; "
        f"T_L = {c['t_l']}, LR made by the Real-ESRGAN degradation; EMA {c['ema_decay']} exported. Loss "
        f"{f['student'].get('first_loss', float('nan')):.4f} at the first log, "
        f"{f['student'].get('last_loss', float('nan')):.4f} at the last.",
        "- Loss weights: the image MSE dominates the one-step branch. A first full run with MSE x2, "
        "TV-LPIPS x0.2 and ADL x0.01 (450 steps) made the student draw a grid with the period of one "
        "transformer token (16 pixels), PSNR-Y 27.54 dB / SSIM-Y 0.712 on the bicubic-LR held-out set: no "
        "better than the untrained student on PSNR-Y, far below it on SSIM-Y; these weights are the fix.",
        "- Export: base transformer and VAE as diffusers-keyed fp16 safetensors, the LoRA in diffusers naming "
        "with the `fluxsr.*` run settings, the conditioning bundle: " +
        ", ".join(f"`{k}` ({_size(v)})" for k, v in r["files"].items()) + ".",
        "",
        "## Results on the held-out photos (x4)",
        "",
        "PSNR-Y / SSIM-Y: BasicSR protocol (BT.601 Y, 4-pixel border cut, 8-bit images), "
        "`fluxsr_training.evaluate`. ST-LPIPS (AlexNet) is also the network inside the student's TV-LPIPS "
        "loss, so it is not an independent judge; ST-LPIPS-VGG is shown beside it. The trained and untrained "
        "students are the outputs of `fluxsr upscale` itself on the LR files (wavelet colour fix, its default); "
        "\"untrained\" is `--lora-scale 0`, the teacher alone used as a one-step student. The bicubic LR and the "
        f"bicubic row use {bicubic_kernel_words(DEMO_BICUBIC)} (`fluxsr-train eval --bicubic-kernel "
        f"{DEMO_BICUBIC}`; the eval command's default is `matlab`, MATLAB's imresize).",
        "",
    ]
    for kind, data in report["lr_kinds"].items():
        lines += [f"### LR: {data['lr']}", ""]
        md = data["markdown"].split("\n")
        table = [ln for ln in md if ln.startswith("|")]
        lines += table + [""]
        chk = report["checks"][kind]
        trained_vs = []
        for other, label in (("untrained student (LoRA off)", "the untrained student"),
                             (ROW_VAE, "the VAE round trip"), (ROW_VAE_FIX, "the VAE round trip + colour fix"),
                             ("bicubic", "bicubic")):
            p, s = chk[f"beats {other} on psnr_y"], chk[f"beats {other} on ssim_y"]
            verdict = ("beats" if p and s else "does not beat" if not p and not s else
                       f"beats on {'PSNR-Y' if p else 'SSIM-Y'} only")
            trained_vs.append(f"{verdict} {label}")
        lines += ["The trained student " + "; ".join(trained_vs) + ".", ""]
        rows = {row["name"]: row["mean"] for row in data["table"]["rows"]}
        gap = float(rows[ROW_TRAINED]["psnr_y"]) - float(rows[ROW_VAE_FIX]["psnr_y"])
        gain = float(rows[ROW_TRAINED]["psnr_y"]) - float(rows[ROW_UNTRAINED]["psnr_y"])
        if abs(gap) < 0.25:
            lines += [f"In words: the LoRA gains {gain:.2f} dB over the teacher used as a one-step student, "
                      "mostly by cancelling the teacher's change to the latent (a one-step teacher damages a "
                      f"clean latent); it ends within {abs(gap):.2f} dB of the plain VAE round trip with the same "
                      "colour fix, adding little detail of its own.", ""]
    ceiling = report.get("vae_hr_round_trip")
    if ceiling:
        lines += [f"Why not better than bicubic: this VAE's round trip of the HR photos themselves scores only "
                  f"{ceiling['psnr_y']:.2f} dB / {ceiling['ssim_y']:.4f}, below bicubic; every student output is "
                  "decoded by it. A real FLUX VAE and teacher are what make FluxSR useful; the demo only proves "
                  "the machinery end to end.", ""]
    m = r["machine"]
    st = r["stage_seconds"]
    lines += [
        "## Time",
        "",
        "| stage | wall (s) | CPU (s, user + system) |",
        "|---|---|---|",
    ] + [f"| {k} | {v['wall']:.0f} | {v['cpu']:.0f} |" for k, v in st.items()] + [
        f"| **total** | **{r['total_wall_seconds']:.0f}** ({r['total_wall_seconds'] / 60:.1f} min) | "
        f"**{r['total_cpu_seconds']:.0f}** ({r['total_cpu_seconds'] / 60:.1f} min) |",
        "",
        f"Measured on {m['platform']} with {m['cpu_count']} CPU core(s) shared with other jobs, torch "
        f"{m['torch']} with {m['torch_threads']} thread(s) (`--threads`). Wall time counts the waiting for "
        "the other jobs; the CPU time is the work itself, so with one thread it is about what the recipe "
        "takes on one dedicated core (two threads on two free cores take less).",
        "",
        "## Reproduce",
        "",
        "```",
        "python -m fluxsr_training.demo --docs docs/demo_results.md --threads 1  # rebuilds fluxsr_core/demo/",
        "python -m fluxsr_training.demo --quick --out /tmp/demo-quick  # smoke test, a few minutes",
        "```",
        "",
        "Every step is seeded: the same code on the same machine and thread count repeats the numbers "
        "exactly (CPU kernels may round differently elsewhere, and later code changes move them a little). "
        "`fluxsr_core/demo/report.json` holds every number above, per image, plus the full recipe "
        "configuration.",
        "",
    ]
    return "\n".join(lines)


# =========================================================================================
# command line
# =========================================================================================

def _default_out() -> Path:
    return Path(__file__).resolve().parent.parent / "fluxsr_core" / "demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fluxsr_training.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="where the demo model files go (default: fluxsr_core/demo of this checkout)")
    p.add_argument("--work", type=Path, default=None, help="intermediate files (default: <out>/../.demo-work)")
    p.add_argument("--docs", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of a few minutes")
    p.add_argument("--fresh", action="store_true", help="redo every stage (default: keep finished ones)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the recipe; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "peft", "fluxsr.pairs", "fluxsr.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    import fluxsr_core

    out = args.out if args.out is not None else Path(fluxsr_core.__file__).resolve().parent / "demo"
    work = args.work if args.work is not None else Path.home() / ".cache" / "fluxsr" / (
        "demo-work-quick" if args.quick else "demo-work")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()

    def say(msg: str) -> None:
        print(msg, flush=True)

    say(f"FluxSR demo recipe{' (quick)' if args.quick else ''}: output {out}, work {work}")
    report = Recipe(cfg, out, work, args.docs, args.quick, say).run()
    bad = [f"{k}: {name}" for k, chk in report["checks"].items() for name, ok in chk.items()
           if not ok and ("untrained" in name or "VAE round trip of" in name)]
    say(f"done in {report['recipe']['this_run_wall_seconds'] / 60:.1f} min; files in {out} "
        f"({report['recipe']['total_bytes'] / 1e6:.1f} MB)")
    if bad and not args.quick:
        say("WARNING: the trained student does not beat: " + "; ".join(bad))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

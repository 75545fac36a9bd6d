"""``fluxsr``: the headless one-step upscaler.

    fluxsr upscale INPUT... -o OUT --transformer flux1-dev.safetensors --vae ae.safetensors \
        --lora fluxsr_lora.safetensors --conditioning fluxsr_bundle.safetensors
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .dependencies import UPSCALE_NEEDS, refuse_outdated
from .files import first_line, nearest_existing, tolerate_unencodable_console

# What folder scans pick up (Pillow reads them all; .mpo is a camera's multi-picture JPEG), with
# HEIC/HEIF, AVIF and JPEG 2000 where this install reads them.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".mpo", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                  ".pgm", ".pbm", ".pnm"}
# Other image formats' suffixes: an -o ending in one of these is a file name in a format FluxSR
# does not write, not a folder name.
OTHER_IMAGE_SUFFIXES = {".exr", ".hdr", ".pfm", ".jxl", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".jpx",
                        ".tga", ".dds", ".ico", ".icns", ".psd", ".qoi", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                        ".raf", ".orf", ".rw2", ".svg"}
# Write errors that every later image would hit too: the run stops at the first one.
DISK_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())

MODEL_FILES_HELP = """\
fluxsr upscale needs four model files (nothing is downloaded):
  --transformer  FLUX.1-dev transformer: flux1-dev.safetensors (BFL/ComfyUI single file, fp8 e4m3fn
                 files work too), a GGUF file (flux1-dev-Q8_0.gguf ...; pip install gguf) or a
                 diffusers folder (the 'transformer' folder of FLUX.1-dev).
                 In ComfyUI it lives in models/diffusion_models/ (GGUF: models/unet/).
                 [env FLUXSR_TRANSFORMER]
  --vae          FLUX VAE: ae.safetensors or a diffusers 'vae' folder (ComfyUI: models/vae/).
                 [env FLUXSR_VAE]
  --lora         the FluxSR LoRA (diffusers naming, e.g. pytorch_lora_weights.safetensors;
                 ComfyUI: models/loras/).  [env FLUXSR_LORA]
  --conditioning the FluxSR conditioning bundle: our .safetensors bundle, or the folder holding
                 t5_embedding.pth + clip_embedding.pth (ComfyUI: models/fluxsr/).
                 [env FLUXSR_CONDITIONING]
FLUX.1-dev weights are under the FLUX.1 [dev] Non-Commercial License (huggingface.co/black-forest-labs/FLUX.1-dev)."""


# --format -> the suffix written; the suffixes a file -o may have, and the format each names
OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
# The largest side each holds: libjpeg's JPEG_MAX_DIMENSION; WebP stores sizes in 14 bits.
_MAX_SIDE = {"jpg": 65500, "webp": 16383}
_FORMAT_NAMES = {"png": "PNG", "jpg": "JPEG", "webp": "WebP"}


class UsageError(Exception):
    """A problem the user can fix from the command line (exit code 2, no traceback)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler), raised in the main thread so that it stops
    a run as Ctrl-C does: the pending write is finished, the counts are printed, nothing
    half-written or temporary is left. Exit code 143 (128 + SIGTERM)."""


@dataclass
class Job:
    source: Path
    target: Path
    # the target was found among the inputs and taken for an earlier run's output (collect_jobs)
    earlier_output: bool = False

    @property
    def output_format(self) -> str:
        """``png``, ``jpg`` or ``webp``: what the target's suffix names."""
        return OUTPUT_SUFFIXES[self.target.suffix.lower()]


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


def _output_megapixels(text: str) -> float:
    # round, not int: 4.1 * 1e6 is 4099999.9999999995 in floats, and the limit lost a pixel
    value = _positive_float(text)
    if round(value * 1e6) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0.000001 (one pixel; got {text})")
    return value


def _quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100 (got {text})")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number (got {text})")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models import MEMORY_MODES, SPEEDUPS, VAE_TILE_NORMS
    from .tiling import TilingConfig
    from .upscaler import COLOR_FIXES, DEFAULT_MAX_OUTPUT_PIXELS

    defaults = TilingConfig()
    parser = argparse.ArgumentParser(prog="fluxsr", description="FluxSR: one-step FLUX super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upscale", help="upscale images with one FluxSR step",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODEL_FILES_HELP)
    up.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    up.add_argument("-o", "--output", required=True,
                    help="output folder (created), or a .png, .jpg or .webp path when there is one input (a "
                         "trailing / makes it a folder whatever its name)")
    up.add_argument("--format", choices=tuple(OUTPUT_FORMATS), default=None,
                    help="what a folder -o gets (default png; a file -o's suffix decides): png (8 or 16 bit, "
                         "alpha), jpg (8 bit, no alpha), webp (8 bit, alpha, at most 16383 px a side)")
    up.add_argument("--quality", type=_quality, default=None, help="JPEG and WebP quality, 1-100 (default 95)")
    up.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")

    m = up.add_argument_group("model files")
    m.add_argument("--transformer", default=os.environ.get("FLUXSR_TRANSFORMER"))
    m.add_argument("--vae", default=os.environ.get("FLUXSR_VAE"))
    m.add_argument("--lora", default=os.environ.get("FLUXSR_LORA"))
    m.add_argument("--conditioning", default=os.environ.get("FLUXSR_CONDITIONING"))
    m.add_argument("--lora-scale", type=_finite_float, default=1.0, help="LoRA strength (default 1.0)")
    m.add_argument("--no-merge-lora", action="store_true",
                   help="keep the LoRA as a separate peft adapter instead of merging it (slower; exact)")

    s = up.add_argument_group("size (pick one; default x4)")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--scale", type=_positive_float, help="upscale factor, any value (default: 4, or the files' own)")
    size.add_argument("--long-side", type=_positive_int, help="target long side in pixels")
    size.add_argument("--megapixels", type=_positive_float, help="target size in megapixels")
    s.add_argument("--max-output-megapixels", type=_output_megapixels,
                   default=DEFAULT_MAX_OUTPUT_PIXELS / 1e6, help="refuse larger outputs (default %(default)g)")

    r = up.add_argument_group("run settings (default: from the bundle/LoRA, else T_L 0.25, guidance 3.5)")
    r.add_argument("--t-l", type=float, default=None, help="LR time T_L in (0, 1)")
    r.add_argument("--guidance", type=_positive_float, default=None, help="FLUX.1-dev guidance value")
    r.add_argument("--color-fix", choices=COLOR_FIXES, default="wavelet")

    t = up.add_argument_group("tiling")
    t.add_argument("--tile", type=int, default=defaults.latent_tile * 8,
                   help="transformer tile size in image pixels (multiple of 16; default %(default)s)")
    t.add_argument("--tile-overlap", type=int, default=defaults.latent_overlap * 8,
                   help="transformer tile overlap in image pixels (default %(default)s)")
    t.add_argument("--vae-tile", type=int, default=defaults.vae_tile,
                   help="VAE tile size in pixels, 0 = untiled (default %(default)s)")
    t.add_argument("--vae-overlap", type=int, default=defaults.vae_overlap,
                   help="pixels neighbouring VAE tiles share with --vae-tile-norm tile (default %(default)s); "
                        "the default tiling needs none")
    t.add_argument("--vae-tile-norm", choices=VAE_TILE_NORMS, default="image",
                   help="image (default): VAE tiles normalised with the whole image's statistics and cut with "
                        "halos of the convolutions' reach, the untiled result up to rounding at any tile size; "
                        "tile: diffusers' own tiling, each tile alone (its tone can shift from tile to tile), "
                        "for the least memory")
    t.add_argument("--blend", choices=("gaussian", "linear", "constant"), default=defaults.blend)
    t.add_argument("--global-position-ids", action="store_true",
                   help="give tiles their global positions (default: tile-local, as in training)")
    t.add_argument("--tile-batch", type=_positive_int, default=1, help="equal-shape tiles per transformer call")
    t.add_argument("--tile-fit", action="store_true",
                   help="shrink the tiles to the shortest that cover the image with as many tiles and the same "
                        "overlap (2048 px: 864 px tiles instead of 1024, 29%% fewer tokens)")

    d = up.add_argument_group("device")
    d.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    d.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    d.add_argument("--memory-mode", default="auto", choices=("auto",) + MEMORY_MODES,
                   help="for small GPUs: CPU offload (diffusers' hooks) or fp8 weight storage; FLUX.1-dev's "
                        "weights on the GPU: none 22.3 GiB, fp8_storage 14.3, fp8_storage_all 11.2 (modulation "
                        "in fp8 too, as ComfyUI's fp8), model_offload 22.2, group_offload 1.5. auto (default): "
                        "the fastest whose weights leave 3.5 GiB of the GPU's free memory (none off CUDA)")
    d.add_argument("--speedups", default="",
                   help=f"opt-in, comma-separated: {', '.join(SPEEDUPS)} (see bench/run.py for measured "
                        f"effects; fuse_qkv needs the LoRA merged)")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _tiling_from_args(args):
    """The transformer/VAE tiling the command line asks for, its pixel values checked here so the
    errors speak of the options as typed (the tiling itself works in latent pixels, 8 px each)."""
    from .tiling import TilingConfig, validate_tiling

    if args.tile <= 0 or args.tile % 16:
        raise UsageError(f"--tile must be a positive multiple of 16 pixels (got {args.tile})")
    if args.tile_overlap < 0 or args.tile_overlap % 16:
        raise UsageError(f"--tile-overlap must be 0 or a positive multiple of 16 pixels (got {args.tile_overlap})")
    if args.tile_overlap >= args.tile:
        raise UsageError(f"--tile-overlap ({args.tile_overlap} px) must be smaller than --tile ({args.tile} px); "
                         "a quarter of the tile is usual")
    if args.vae_tile < 0 or args.vae_tile % 8:
        raise UsageError(f"--vae-tile must be 0 (untiled) or a positive multiple of 8 pixels (got {args.vae_tile})")
    if args.vae_overlap < 0 or args.vae_overlap % 8:
        raise UsageError(f"--vae-overlap must be 0 or a positive multiple of 8 pixels (got {args.vae_overlap})")
    vae_overlap = args.vae_overlap
    if args.vae_tile and vae_overlap >= args.vae_tile:
        if args.vae_tile_norm == "tile":
            whose = ", its default" if vae_overlap == TilingConfig().vae_overlap else ""
            raise UsageError(f"--vae-overlap ({vae_overlap} px{whose}) must be smaller than --vae-tile "
                             f"({args.vae_tile} px) with --vae-tile-norm tile; a quarter of the tile is usual: "
                             f"--vae-overlap {args.vae_tile // 4 // 8 * 8}")
        vae_overlap = 0  # whole-image tiles are cut with halos of the convolutions' reach: no overlap is used
    return validate_tiling(TilingConfig(
        latent_tile=args.tile // 8, latent_overlap=args.tile_overlap // 8,
        vae_tile=args.vae_tile, vae_overlap=vae_overlap, blend=args.blend,
        global_position_ids=args.global_position_ids, tile_batch_size=args.tile_batch, fit_tiles=args.tile_fit))


def collect_jobs(inputs: Sequence[Path], output: Path, output_is_folder: bool = False,
                 output_format: Optional[str] = None,
                 overwrite: bool = False) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Expand folders, map each input to ``<stem>.png`` (or the suffix of ``output_format``, one
    of :data:`OUTPUT_FORMATS`); a single input may name a .png, .jpg/.jpeg or .webp file (unless
    ``output_is_folder``: the user typed ``-o`` with a trailing slash), whose suffix must then
    agree with ``output_format`` when one is given.

    Folder scans take the image files directly in the folder (see :func:`scan_suffixes`), not
    hidden ones (names starting with "."; a hidden file given by name is an input).
    Returns ``(jobs, unreadable)``: ``unreadable`` holds the inputs that cannot be read at all,
    each with why (missing files, broken links, given or in a folder; inputs and folder entries
    that cannot be looked at; folders that cannot be listed); they get no job, so they neither
    clash with another input's output nor load the models.
    Output folders are checked for writing apart (:func:`_check_writable`), once the existing
    outputs to skip are known.

    Writing into a folder that is also read (``-o photos`` on ``photos``): ``a.jpg`` beside
    ``a.png``, with ``a.jpg`` this run's output name for ``a.png``, is taken for an earlier run's
    output, not an input, so the run can be run again. Nothing in a file says whether it is one,
    so with ``overwrite`` such a file is refused rather than replaced: it may be a photo of its own.
    """
    from .images import broken_link_message, missing_file_message

    if output.is_symlink() and not output.exists():
        raise UsageError(_broken_output_link_message(output))
    # Inputs that cannot be read fail one by one (so the others still run) and are named here,
    # before minutes of model loading, not when their turn comes.
    files: list[Path] = []
    scanned: set[int] = set()  # id() of the files a folder scan found (not typed by the user)
    unreadable: list[tuple[Path, str]] = []
    for item in inputs:
        if (broken := broken_link_message(item)) is not None:
            unreadable.append((item, broken))
            continue
        try:
            is_dir = stat.S_ISDIR(item.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            unreadable.append((item, missing_file_message(item)))
            continue
        except OSError as exc:  # permission denied on a folder above it, an I/O error...
            unreadable.append((item, f"cannot be looked at ({exc.strerror or exc}); check its permissions"))
            continue
        if is_dir:
            found, bad = _folder_images(item)
            if not found and not bad:
                raise UsageError(f"folder {item} holds no images ({', '.join(sorted(scan_suffixes()))}; "
                                 "hidden files and subfolders are not looked in)")
            files.extend(found)
            scanned.update(id(f) for f in found)
            unreadable.extend(bad)
        else:
            files.append(item)
    first_by_identity: dict = {}
    unique: list[Path] = []
    for f in files:
        if (first := first_by_identity.setdefault(_identity(f), f)) is f:
            unique.append(f)
        elif id(f) in scanned and id(first) in scanned:  # a link in a folder to a file there: one is enough,
            if first.is_symlink() and not f.is_symlink():  # under the file's own name, not the link's
                unique[unique.index(first)] = f
                first_by_identity[_identity(f)] = f
            continue
        else:
            same = f"{f} is given twice" if first == f else f"{first} and {f} are the same file"
            raise UsageError(f"{same}; give each input once")
    files = unique
    # An earlier run into a folder it also reads (-o photos on photos, --format jpg): a.jpg beside
    # a.png is a.png's output, not an input (else the rerun that goes on would clash, a.png and
    # a.jpg -> a.jpg); so is a.png beside a.jpg for PNG outputs. An input whose output is itself
    # (a.png -> a.png) is refused below as replacing its input.
    out_suffix = OUTPUT_FORMATS[output_format or "png"]
    outputs = {_identity(output / f"{f.stem}{out_suffix}"): f for f in files if f.suffix.lower() != out_suffix}
    earlier = {i: f for i, f in first_by_identity.items() if id(f) in scanned and i in outputs}
    if earlier and overwrite:
        i, f = next(iter(earlier.items()))
        raise UsageError(f"--overwrite would replace {f}, taken for the output of {outputs[i]} by an earlier run "
                         f"into this folder, but it may be a picture of its own (nothing in a file says which): "
                         f"write to another folder with -o, or move the earlier outputs away first"
                         + (f" ({len(earlier)} such files)" if len(earlier) > 1 else ""))
    earlier_outputs, dropped = set(earlier), {id(f) for f in earlier.values()}
    files = [f for f in files if id(f) not in dropped]
    suffix = output.suffix.lower()
    if not output_is_folder and suffix in OUTPUT_SUFFIXES and not output.is_dir():
        given = len(files) + len(unreadable)
        if given != 1:
            raise UsageError(f"-o {output} is a file name but there are {given} inputs; give a folder")
        if output_format is not None and OUTPUT_SUFFIXES[suffix] != output_format:
            raise UsageError(f"-o {output} names a {OUTPUT_SUFFIXES[suffix]} file but --format is {output_format}; "
                             "give one of the two, or make them agree")
        jobs = [Job(f, output) for f in files]
    elif not output_is_folder and suffix in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES and not output.is_dir():
        raise UsageError(f"outputs are written as PNG, JPEG or WebP; use -o {output.with_suffix('.png')} (or .jpg, "
                         f".webp) or a folder (end it with / for a folder named {output.name})")
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"-o {output} is an existing file, not a folder; give a folder (or a .png, .jpg or "
                             ".webp name for one input)")
        jobs, seen, clashes = [], {}, []
        for f in files:
            target = output / f"{f.stem}{OUTPUT_FORMATS[output_format or 'png']}"
            if target in seen:
                clashes.append(f"{f} and {seen[target]} -> {target}")
            seen[target] = f
            jobs.append(Job(f, target))
        if clashes:
            raise UsageError("outputs would be written twice; rename one of each: " + "; ".join(clashes))
    for j in jobs:
        j.earlier_output = _identity(j.target) in earlier_outputs
    sources = set(first_by_identity) - earlier_outputs
    replaced = [j for j in jobs if _identity(j.target) in sources]
    if replaced:
        raise UsageError(f"{replaced[0].target} is also an input: its upscale would replace "
                         f"{'it' if replaced[0].source == replaced[0].target else 'an input'}; write to another "
                         "folder with -o")
    return jobs, unreadable


def scan_suffixes() -> set[str]:
    """The file name suffixes folder scans pick up: :data:`IMAGE_SUFFIXES`, and HEIC/HEIF, AVIF
    and JPEG 2000 where this install can read them."""
    from .images import optional_image_suffixes

    return IMAGE_SUFFIXES | set(optional_image_suffixes())


def _folder_images(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files directly in ``folder`` (sorted), and its entries with an image name that
    cannot be read, each with why: a broken link or an entry that cannot be looked at must be
    reported, not dropped. Subfolders, other names and hidden files (macOS's "._x.png"
    AppleDouble files hold no image) are left alone. A folder that cannot be listed is itself
    the one unreadable input."""
    from .images import broken_link_message, unsupported_format_message

    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        # An input that cannot be read, like a broken link: it fails alone, not the whole run
        # (an empty folder is a usage error instead: the wrong folder was named).
        if isinstance(exc, PermissionError):
            advice = f"check its permissions (listing needs read and execute permission: chmod u+rx '{folder}')"
        else:
            advice = "check that the disk or network share it is on is mounted and readable"
        return [], [(folder, f"the folder cannot be listed ({exc.strerror or exc}); {advice}")]
    suffixes = scan_suffixes()
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() not in suffixes:
            # a phone's HEIC photos, say, without pillow-heif: said, not passed over in silence
            unsupported = unsupported_format_message(entry)
            if unsupported is not None and entry.is_file():
                unreadable.append((entry, unsupported))
            continue
        broken = broken_link_message(entry)
        if broken is not None:
            unreadable.append((entry, broken))
            continue
        try:
            is_file = stat.S_ISREG(entry.stat().st_mode)
        except OSError as exc:  # permission denied on the entry, an I/O error...
            unreadable.append((entry, f"cannot be looked at ({exc.strerror or exc}); check its permissions"))
            continue
        if is_file:
            found.append(entry)
    return found, unreadable


def _identity(path: Path):
    """What names one file: the resolved path (links followed; a file not there yet by its name)."""
    return os.path.normcase(os.path.realpath(path))


def _broken_output_link_message(link: Path) -> str:
    from .images import broken_link_message

    points_to = os.readlink(link)
    return (f"cannot write the outputs: {broken_link_message(link, advice='')}(A drive that is not mounted?) "
            f"Mount or create '{points_to}', or give another -o.")


def _check_writable(jobs: Sequence[Job]) -> None:
    """UsageError now, before minutes of loading, when an output folder of ``jobs`` (those that
    will write) cannot be written."""
    for parent in sorted({j.target.parent for j in jobs}):
        existing = nearest_existing(parent)
        if existing.is_symlink() and not existing.exists():  # a link to nothing: creating the folder would fail
            raise UsageError(_broken_output_link_message(existing))
        if not existing.is_dir():
            raise UsageError(f"cannot create the output folder {parent}: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {existing} (permission denied); choose another -o")


def demo_defaults():
    """The shipped demo model's files, or None when this install has none."""
    try:
        from .demo_model import demo_paths
    except ImportError:
        return None
    return demo_paths()


def _prepare_run(args, log):
    """The cheap part before the models load: resolve the model files (or the demo model), the
    device and dtype, read the conditioning bundle and the LoRA's metadata (its header only), and
    settle the run settings, so each input's output size is known, and checked, before minutes
    of loading. Returns ``(cond_bundle, settings, device, dtype)``."""
    from . import bundle as bundle_mod
    from . import models
    from .lora import read_lora_settings
    from .settings import disagreements, merge_settings

    given = {"--transformer": args.transformer, "--vae": args.vae, "--lora": args.lora,
             "--conditioning": args.conditioning}
    missing = [flag for flag, value in given.items() if not value]
    demo = demo_defaults() if len(missing) == len(given) else None
    if demo is not None:
        args.transformer, args.vae, args.lora, args.conditioning = (
            str(demo.transformer), str(demo.vae), str(demo.lora), str(demo.conditioning))
        log("fluxsr: no model files given: using the bundled DEMO model (a tiny FLUX-architecture "
            "student trained on a dozen photos, NOT FluxSR on FLUX.1-dev; see the README). "
            "Pass --transformer/--vae/--lora/--conditioning for real results.")
    elif missing:
        raise UsageError(f"missing {', '.join(missing)}\n\n{MODEL_FILES_HELP}")
    device = models.resolve_device(args.device)
    if device.type == "cuda":  # --device cuda:N: what torch and diffusers make on "the" GPU (streams) go there
        import torch

        torch.cuda.set_device(device)
    dtype = models.resolve_dtype(args.dtype, device)
    cond_bundle = bundle_mod.load_bundle(args.conditioning)
    for line in cond_bundle.report:
        log(f"conditioning: {line}")
    # the bundle's widths against the transformer's header: a wrong one is said before the loading
    cond_bundle.check_fits(models.transformer_config_of(args.transformer))
    lora_settings = read_lora_settings(args.lora)  # what load_lora reads from the same metadata
    settings = merge_settings(cond_bundle.settings, lora_settings)
    # scale counts as chosen also when the size is asked another way (then no scale is used)
    size_given = args.scale is not None or args.long_side is not None or args.megapixels is not None
    given = {"t_l": args.t_l, "guidance": args.guidance, "scale": True if size_given else None}
    differ = disagreements(cond_bundle.settings, lora_settings, tuple(k for k, v in given.items() if v is None))
    if differ:
        log(f"warning: the conditioning bundle and the LoRA disagree: {'; '.join(differ)}. The bundle's values are "
            "used; give --t-l / --guidance / --scale to choose")
    if args.t_l is not None:
        settings.t_l, settings.source["t_l"] = args.t_l, "command line"
    if args.guidance is not None:
        settings.guidance, settings.source["guidance"] = args.guidance, "command line"
    if args.scale is not None:
        settings.scale, settings.source["scale"] = args.scale, "command line"
    return cond_bundle, settings, device, dtype


def _load_pipeline(args, tiling, log, cond_bundle, settings, device, dtype):
    """Load the models (minutes for FLUX.1-dev) and build the velocity model, codec and
    conditioning; returns ``(velocity, codec, cond)``."""
    from . import models

    if args.memory_mode == "auto":  # said before the minutes of loading, not after
        args.memory_mode, why = models.choose_memory_mode(args.transformer, args.vae, dtype, device, lora=args.lora)
        log(f"fluxsr: memory mode {args.memory_mode} (auto: {why})")
    try:
        loaded = models.load_models(args.transformer, args.vae, args.memory_mode, dtype, device, lora=args.lora,
                                    lora_scale=args.lora_scale, merge_lora=not args.no_merge_lora,
                                    speedups=args.speedups)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is turned into advice
        from .upscaler import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        from .weights import is_gguf_file

        if is_gguf_file(args.transformer):
            from .upscaler import gguf_out_of_memory_advice

            raise UsageError(f"the models do not fit on {device} with --memory-mode {args.memory_mode} "
                             f"({type(exc).__name__}); a GGUF transformer takes about its file's size there: "
                             f"{gguf_out_of_memory_advice(args.memory_mode, device)}") from None
        raise UsageError(f"the models do not fit on {device} with --memory-mode {args.memory_mode} "
                         f"({type(exc).__name__}); FLUX.1-dev needs 22.3 GiB for its weights in bf16, "
                         f"14.3 GiB with --memory-mode fp8_storage, 11.2 GiB with fp8_storage_all, and "
                         f"--memory-mode model_offload or group_offload keep them in RAM") from None
    if loaded.lora is not None:  # what the LoRA file turned out to be: its layers, conversions, what was left out
        log(f"fluxsr: {loaded.lora.describe()}")
        for note in loaded.lora.notes:
            log(f"fluxsr: LoRA: {note}")
    for note in loaded.notes:
        log(f"fluxsr: {note}")
    velocity = models.DiffusersVelocity(loaded.transformer, compute_dtype=dtype)
    codec = models.DiffusersCodec(loaded.vae, compute_dtype=dtype, tile=tiling.vae_tile,
                                  tile_overlap=tiling.vae_overlap, tile_norm=args.vae_tile_norm)
    return velocity, codec, cond_bundle.to_conditioning(guidance=settings.guidance)


def _describe_run(settings, args) -> str:
    """The run settings and where each came from, with the output size as the user asked for it
    (a long side or megapixels replace the scale)."""
    src = settings.source or {}
    if args.long_side:
        size = f"long side {args.long_side} px (command line)"
    elif args.megapixels:
        size = f"{args.megapixels:g} megapixels (command line)"
    else:
        size = f"scale={settings.scale:g} ({src.get('scale', 'default')})"
    return (f"T_L={settings.t_l:g} ({src.get('t_l', 'default')}), "
            f"guidance={settings.guidance:g} ({src.get('guidance', 'default')}), {size}")


def _write_failure(target: Path, exc: BaseException) -> str:
    """Why writing ``target`` failed, naming it (an OSError's own text names no file, or the
    temporary one)."""
    if isinstance(exc, OSError):
        return f"cannot write {target}: {exc.strerror or exc}"
    return first_line(exc)


def run_upscale(args) -> int:
    """``fluxsr upscale``: check everything that can be checked cheaply (inputs, their headers,
    output places), load the models only if something is left to do, then upscale and write each
    image; returns the exit code (0 all done, 1 some failed, 130/143 interrupted)."""
    from .flow import check_t_l
    from .images import load_image, probe_image
    from .models import check_gguf_options, parse_speedups
    from .upscaler import UpscaleOptions, output_size, upscale_loaded_image

    quiet = args.quiet

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tiling = _tiling_from_args(args)
    if args.t_l is not None:
        check_t_l(args.t_l)  # before minutes of model loading, not after
    # before the loading, too (load_models checks again once auto has chosen the memory mode);
    # what a GGUF transformer cannot do first, so that its advice is not one GGUF cannot take
    if args.transformer:
        try:
            check_gguf_options(args.transformer, args.memory_mode, args.speedups)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    parse_speedups(args.speedups, merge_lora=not args.no_merge_lora, memory_mode=args.memory_mode)
    output_text = os.fspath(args.output)  # as typed: Path() would drop a trailing slash
    jobs, unreadable = collect_jobs(args.inputs, Path(output_text), output_is_folder=output_text.endswith(("/", os.sep)),
                                    output_format=args.format, overwrite=args.overwrite)
    if args.quality is not None and any(j.target.suffix.lower() == ".png" for j in jobs):
        raise UsageError("--quality is for JPEG and WebP outputs; these are PNG, which is lossless (add --format "
                         "jpg or webp, or give a .jpg or .webp -o)")
    # Inputs, and outputs, that fail before any work: named now, counted in the summary.
    failed_early: list[tuple[Path, str]] = []

    def failed_before_work(source: Path, reason: str) -> None:
        failed_early.append((source, reason))
        log(f"FAIL {source}: {reason}")

    for source, reason in unreadable:
        failed_before_work(source, reason)
    # An output name taken by a folder is no output that exists (to skip), and no write could
    # replace it: a failure now, not after the upscale.
    blocked = [j for j in jobs if j.target.is_dir()]
    for j in blocked:
        failed_before_work(j.source, f"cannot write {j.target}: a folder of that name is in the way; move or "
                                     "rename the folder, or choose another -o")
    blocked_ids = {id(j) for j in blocked}
    jobs = [j for j in jobs if id(j) not in blocked_ids]
    todo = []
    for j in jobs:  # one pass: with 10,000 inputs a membership test per job took seconds
        if args.overwrite or not j.target.exists():
            todo.append(j)
        else:
            log(f"skip {j.source}: {j.target} exists ("
                + ("taken for its output by an earlier run into this folder, so not upscaled itself; if it is a "
                   "picture of its own, write to another folder with -o" if j.earlier_output
                   else "use --overwrite to replace it") + ")")
    # Only where something will be written: a rerun whose outputs all exist writes nothing.
    _check_writable(todo)
    skipped = len(jobs) - len(todo)
    if not todo:
        if not failed_early:
            log(f"nothing to do: all {len(jobs)} output(s) exist")
            return 0
        return _summary(log, 0, skipped, failed_early, 0.0)

    cond_bundle, settings, device, dtype = _prepare_run(args, log)
    options = UpscaleOptions(scale=settings.scale, long_side=args.long_side, megapixels=args.megapixels,
                             t_l=settings.t_l, color_fix=args.color_fix, tiling=tiling,
                             max_output_pixels=round(args.max_output_megapixels * 1e6)).validate()

    input_pixels: dict[Path, int] = {}  # by source, from the headers: an output smaller is said

    def check_size_for(job: Job) -> Callable[[int, int], None]:
        """The size check of ``job``'s input: the output within the size limit, and within what
        its format holds."""
        limit = _MAX_SIDE.get(job.output_format)

        def check_size(h: int, w: int) -> None:
            input_pixels[job.source] = h * w
            long_side = max(output_size(h, w, options))
            if limit is not None and long_side > limit:
                raise ValueError(f"the output's long side would be {long_side:,} pixels, but "
                                 f"{_FORMAT_NAMES[job.output_format]} holds at most {limit:,}; write PNG (--format "
                                 "png, or a .png -o), or ask for a smaller size")
        return check_size

    # Each input's header (not its pixels, but for float and 32-bit or signed integer files, whose
    # values decide): not an image, empty, cut short, unreadable, values out of range, or an
    # output over the limit is found now, not after the models load.
    headers_ok = []
    for job in todo:
        try:
            probe_image(job.source, check_size=check_size_for(job))
            if job.output_format == "jpg" and _transparent(job.source):
                raise ValueError(_NO_ALPHA_IN_JPEG)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            failed_before_work(job.source, first_line(exc))
        else:
            headers_ok.append(job)
    todo = headers_ok
    if not todo:
        return _summary(log, 0, skipped, failed_early, 0.0)

    velocity, codec, cond = _load_pipeline(args, tiling, log, cond_bundle, settings, device, dtype)
    from .upscaler import CLI_OUT_OF_MEMORY_ADVICE, gguf_out_of_memory_advice
    from .weights import is_gguf_file

    oom_advice = (gguf_out_of_memory_advice(args.memory_mode, device) if is_gguf_file(args.transformer)
                  else CLI_OUT_OF_MEMORY_ADVICE)
    log(f"fluxsr: device {device}, dtype {str(dtype).replace('torch.', '')}, memory mode {args.memory_mode}; "
        f"{_describe_run(settings, args)}")

    def configure_codec(new_tiling):
        codec.set_tiling(new_tiling.vae_tile, new_tiling.vae_overlap)

    def on_retry(new_tiling, exc):
        log(f"  out of memory; retrying with {new_tiling.latent_tile * 8}px tiles "
            f"(overlap {new_tiling.latent_overlap * 8}px, VAE tile {new_tiling.vae_tile}px)")

    failures: list[tuple[Path, str]] = []
    done = 0
    started = time.perf_counter()
    bar = None
    if not quiet:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="fluxsr", file=sys.stderr)
    say = bar.write if bar else log

    def failed(source: Path, reason: str) -> None:
        failures.append((source, reason))
        say(f"FAIL {source}: {reason}")

    def saved(job: Job, result, notes: Sequence[str]) -> None:
        nonlocal done
        done += 1
        h, w = result.rgb.shape[-2:]
        say(f"ok   {job.source} -> {job.target} ({w}x{h})")
        if h * w < input_pixels.get(job.source, 0):  # asked for (--long-side, --megapixels, a scale below 1)
            say(f"note {job.target}: {w}x{h} is smaller than the input: it was scaled down before the model ran, "
                "as the size asked for says")
        for note in notes:  # what the file's format could not hold
            say(f"note {job.target}: {note}")

    def still_writing(job: Job) -> None:
        say(f"fluxsr: finishing the write of {job.target} first (nothing is left half-written)")

    writer = _BackgroundWriter(saved, lambda job, exc: failed(job.source, _write_failure(job.target, exc)),
                               still_writing, quality=95 if args.quality is None else args.quality)
    interrupted: Optional[KeyboardInterrupt] = None
    try:
        for job in todo:
            if writer.disk_full is not None:
                break  # every later write would fail too
            tile_bar = None
            try:
                loaded = load_image(job.source, check_size=check_size_for(job))
                for note in loaded.notes:
                    say(f"note {job.source}: {note}")
                fmt = job.output_format
                if loaded.alpha is not None and fmt == "jpg":
                    if _see_through(loaded.alpha):  # (the probe found none; the file changed since)
                        raise ValueError(_NO_ALPHA_IN_JPEG)
                    loaded.alpha = None
                    say(f"note {job.source}: its alpha channel is opaque everywhere; the JPEG is written without it")
                if not quiet:
                    from tqdm.auto import tqdm
                    tile_bar = tqdm(total=None, unit="tile", desc=job.source.name, leave=False, file=sys.stderr)

                def progress(done_tiles, total_tiles, preview, _bar=tile_bar):
                    if _bar is not None:
                        _bar.total = total_tiles
                        _bar.n = done_tiles
                        _bar.refresh()

                result = upscale_loaded_image(loaded, velocity, codec, cond, options, progress=progress,
                                              on_retry=on_retry, configure_codec=configure_codec,
                                              out_of_memory_advice=oom_advice)
                if loaded.bit_depth == 16 and fmt != "png":
                    say(f"note {job.source}: its samples have more than 8 bits; {_FORMAT_NAMES[fmt]} is written with "
                        "8 (PNG keeps 16: --format png, or a .png -o)")
                if result.gray_in_color:
                    say(f"note {job.source}: a grey picture (its three colour channels agree to within 2 levels): "
                        "the result is made grey too (its luma, in all three channels)")
                if not writer.submit(job, result):  # the disk filled while it upscaled: not done, said so
                    say(f"not written: {job.source} (the disk is full; it is among the images not done)")
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                failed(job.source, first_line(exc))
            finally:
                if tile_bar is not None:
                    tile_bar.close()
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:  # Ctrl-C too: the image already upscaled is still written
        late = writer.close()
        if interrupted is None:
            interrupted = late  # a Ctrl-C while the last write finished
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    not_done = len(todo) - done - len(failures)
    n_failed = len(failed_early) + len(failures)
    if interrupted is not None:
        what = "terminated (SIGTERM)" if isinstance(interrupted, Terminated) else "interrupted"
        log(f"fluxsr: {what} after {elapsed:.1f} s: {done} upscaled, {not_done} not done, {n_failed} failed. Run the "
            f"same command again to go on (finished outputs are skipped).")
        return 143 if isinstance(interrupted, Terminated) else 130
    if writer.disk_full is not None:
        where = writer.disk_full_target.parent
        kept = f"The {done} finished output(s) are kept; " if done else "Nothing was written; "
        log(f"fluxsr: stopped: no room left to write in {where} ({writer.disk_full.strerror}). {kept}{not_done} "
            f"image(s) not done. Free some space and run the same command again to go on (finished outputs are "
            f"skipped).")
    return _summary(log, done, skipped, failed_early + failures, elapsed)


def _summary(log, done: int, skipped: int, failures: Sequence[tuple[Path, str]], elapsed: float) -> int:
    """Log the closing counts and each failure again (the FAIL lines may have scrolled away);
    return the exit code."""
    log(f"fluxsr: {done} upscaled, {skipped} skipped, {len(failures)} failed in {elapsed:.1f} s")
    for path, reason in failures:
        log(f"  failed: {path}: {reason}")
    return 1 if failures else 0


class _BackgroundWriter:
    """Saves each upscaled image in a worker thread while the next one upscales.

    Encoding is CPU work (a 4096 px PNG: 2.5 s here) and Pillow's encoders release the GIL,
    so with the models on a GPU it overlaps the next image's compute instead of adding to it.
    One write at most is pending: memory holds one finished image beside the one in progress.
    ``saved(job, result, notes)`` / ``failed(job, exc)`` report each write in the calling thread
    (``notes``: the warnings of :func:`fluxsr_core.images.save_image`, e.g. metadata the format
    cannot hold),
    in the order the images were submitted. A write that fails for a full disk (or quota) sets
    ``disk_full`` (the error) and ``disk_full_target``, and no later write is started.
    ``still_writing(job)`` is told when :meth:`close` is interrupted while ``job`` is written.
    """

    def __init__(self, saved, failed, still_writing=lambda job: None, quality: int = 95):
        from concurrent.futures import ThreadPoolExecutor

        self._quality = quality
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxsr-save")
        self._saved, self._failed, self._still_writing = saved, failed, still_writing
        self._pending = None
        self.disk_full: Optional[OSError] = None
        self.disk_full_target: Optional[Path] = None

    def submit(self, job: Job, result) -> bool:
        """Wait for the previous write, then start writing ``result`` to ``job.target``; False (and
        nothing started) once the disk is full."""
        self.wait()
        if self.disk_full is not None:
            return False
        # off the device here, so the next image has its memory
        rgb, alpha = result.rgb.cpu(), None if result.alpha is None else result.alpha.cpu()
        self._pending = (job, result, self._pool.submit(_save_result, job.target, result, rgb, alpha, self._quality))
        return True

    def wait(self) -> None:
        """Wait for the pending write, if any, and report it. Interrupted (Ctrl-C), the write
        stays pending, to be waited for again."""
        if self._pending is None:
            return
        job, result, future = self._pending
        try:
            notes = future.result()
        except Exception as exc:  # noqa: BLE001 - reported like any failed image
            self._pending = None
            if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                self.disk_full, self.disk_full_target = exc, job.target
            self._failed(job, exc)
        else:
            self._pending = None
            self._saved(job, result, notes)

    def close(self) -> Optional[KeyboardInterrupt]:
        """Finish and report the pending write, through any further Ctrl-C or SIGTERM: the worker
        thread cannot be stopped half-way (the interpreter would wait for it at exit anyway), so
        waiting is what gets the write reported and its temporary file renamed or removed.
        Returns the last interruption that arrived meanwhile, if any."""
        interrupted = None
        while True:
            try:
                self.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
                if self._pending is not None:
                    self._still_writing(self._pending[0])
        self._pool.shutdown()
        return interrupted


_NO_ALPHA_IN_JPEG = ("it has transparency, which JPEG cannot hold; write PNG or WebP (--format png|webp, or a .png "
                     "or .webp -o)")


def _transparent(path: Path) -> bool:
    """Whether the image at ``path`` has an alpha that is not opaque everywhere (its pixels are
    read only when its header says it has an alpha)."""
    from PIL import Image

    from .images import load_image

    with Image.open(path) as img:
        if img.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in img.info:
            return False
    alpha = load_image(path, metadata=False).alpha
    return alpha is not None and _see_through(alpha)


def _see_through(alpha) -> bool:
    """Whether an alpha ``[1, 1, H, W]`` in [0, 1] is below opaque anywhere."""
    return bool((alpha < 1).any())


def _save_result(target: Path, result, rgb, alpha, quality: int = 95) -> list[str]:
    """Write ``result`` to ``target`` (8 bits unless it is a PNG); return what the save left out
    (collected, not warned: ``warnings`` state is process-wide, and this runs in a thread)."""
    from .images import save_image

    notes: list[str] = []
    save_image(target, rgb, alpha=alpha, bit_depth=result.bit_depth if target.suffix.lower() == ".png" else 8,
               grayscale=result.grayscale, icc_profile=result.icc_profile, exif=result.exif, dpi=result.dpi,
               xmp=result.xmp, text=result.text, quality=quality, warn=notes.append)
    return notes


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fluxsr`` console script. SIGTERM is handled as Ctrl-C while it runs
    (the previous handler is restored on return)."""
    tolerate_unencodable_console()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if refuse_outdated("fluxsr", UPSCALE_NEEDS):
        return 2
    # Signal handlers can only be set from the main thread (a caller running us in another
    # thread keeps the default: SIGTERM then ends the process as before).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "upscale":
            return run_upscale(args)
    except UsageError as exc:
        print(f"fluxsr: {exc}", file=sys.stderr)
        return 2
    except Terminated:  # while the models load (the image loop reports its own)
        print("fluxsr: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fluxsr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        # Model files and settings problems: the message names the file and the fix.
        print(f"fluxsr: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if threading.current_thread() is threading.main_thread():
            # None: the old handler was not set from Python; the default is the best guess
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

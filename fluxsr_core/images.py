"""Reading and writing images of every mode, resizing to the output size, padding and cropping.

Everything FluxSR computes on images works on float32 tensors ``[B, C, H, W]`` in ``[0, 1]``.
This module is the one place where files become such tensors and back:

* :func:`load_image` reads any image Pillow can open (8/16-bit, gray, palette, CMYK, float TIFF,
  animations, EXIF-rotated photos) into a :class:`LoadedImage` that remembers what the file was,
  so :func:`save_image` can write the result in the same kind (gray stays gray, 16 bits stay 16).
  :func:`probe_image` runs the same checks on the header alone (no pixel decoded, except for the
  rare float and 32-bit or signed integer files, whose values decide), so a front end can refuse bad inputs
  before it loads its models.
* :func:`resize` is *the* resize used both by the upscaler (LR -> HR size before encoding) and by
  training (making ``z_L``); one function, so train and test see the same interpolation.
* :func:`target_size`, :func:`pad_to_multiple`, :func:`crop`, :func:`upscale_alpha` and the
  ComfyUI layout helpers complete the path from a file to the model and back.

16-bit RGB(A): Pillow has no 16-bit-per-channel colour mode; it decodes 48/64-bit PNG and TIFF
into 8-bit RGB(A) by keeping the high byte of every sample, and it cannot write 16-bit colour PNG.
Rather than adding a dependency (``imageio`` reads through Pillow and has the same loss; OpenCV is
a large binary; ``pypng`` is pure Python and slow on large photos), we let Pillow's own C decoder do
the work twice: once with the usual raw mode (high bytes) and once with the opposite byte order
(which makes the same unpacker pick the low bytes). Decompression, PNG row filters, interlacing and
TIFF compression are all handled by Pillow both times. Writing 16-bit PNG is a few lines of
``zlib`` + ``numpy`` (:func:`_write_png16`); PNG is a simple, fully specified container.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from . import exif as _exif
from . import xmp as _xmp
from .files import atomic_write
from .settings import DEFAULT_SCALE

# 256 megapixels: a 16384 x 16384 input. Pillow's own guard (about 179 MP) is replaced by this one
# so that the limit is one documented parameter instead of a global.
DEFAULT_MAX_INPUT_PIXELS = 256 * 1024 * 1024
# 64 megapixels (8192 x 8192): a 2048 x 2048 photo at x4 still fits.
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192

RESIZE_KINDS = ("bicubic", "bilinear", "area", "nearest")
PAD_MODES = ("reflect", "replicate", "constant")

# ITU-R BT.601 luma weights: the ones Pillow's convert("L") uses, so a gray input written back
# as gray matches what Pillow would have produced from the same RGB result.
_LUMA = (0.299, 0.587, 0.114)

# Pillow's decompression-bomb limit is a module global; we swap it while we open a file.
_PIL_LIMIT_LOCK = threading.Lock()

# Float images hold 0..1 by convention, and 8-bit data is often stored as float in 0..255.
# Values past either end by up to this fraction of the range are resampling or sharpening
# overshoot and are clipped; further out the file means something else (HDR, signed or
# scientific data), clipping would turn it white or black, so it is refused.
FLOAT_OVERSHOOT = 0.1
# A float image whose maximum is above this cannot be 0..1 with overshoot: it is 0..255 data or
# HDR (0..1 with highlights above 1). (Between 1 + FLOAT_OVERSHOOT and this it is neither, and refused.)
_FLOAT_0_255_ABOVE = 2.0
# What tells 8-bit values stored as float from HDR: they are whole numbers (float32 keeps every
# integer up to 2**24 exactly; the tolerance allows for a k / 255 * 255 round trip), or, once
# resampled, most pixels are well above 1. An HDR or 0..1 picture with highlights has most values
# at most 1 and fractional ones.
_FLOAT_WHOLE_TOLERANCE = 1e-3
_FLOAT_0_255_MEDIAN_ABOVE = 1.1
# Range limits are compared with this relative slack: float32(1.1) is 1.10000002 in float64, and
# "give or take 10%" must accept it.
_FLOAT_LIMIT_SLACK = 1e-6
# A 16-bit image whose brightest value is at most this (of 65535) is nearly black.
_DARK_16BIT_MAX = 255
# One-channel modes of more than 8 bits: integer (16-bit, and Pillow's "I" for 32-bit and signed
# 16-bit samples) and float.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")
# The modes among them whose pixel values, not the header, decide whether load_image accepts the
# file (a float range, negative or above-16-bit integers): probe_image decodes these. They are rare,
# and every other mode (8/16-bit) is judged from its header alone.
_RANGE_CHECKED_MODES = frozenset({"I", "F"})
# Formats whose frames are an animation; other multi-frame files (TIFF, MPO...) are multi-page.
_ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "FLI", "AVIF"})
# Signatures of formats Pillow always identifies when the header is whole: a file starting with
# one that Pillow cannot open is damaged, not of an unknown format.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"))
# Pillow's errno-less OSErrors that mean a header cut short (others mean "not supported").
_TRUNCATION_MESSAGES = re.compile(r"truncated|could not create decoder|not enough data|unexpected end|"
                                  r"premature end|broken data stream", re.IGNORECASE)
# (TIFF is left out: a whole TIFF of a kind Pillow does not read, float colour say, fails the same way.)


# --- errors ----------------------------------------------------------------------------------

class ImageFileError(ValueError):
    """An image file could not be used (unreadable, empty, truncated, too large...)."""


class ImageNotFoundError(FileNotFoundError):
    """The image file does not exist."""


class BrokenLinkError(ImageNotFoundError):
    """The path is a symbolic link to a file that does not exist (or to a loop of links)."""


class EmptyImageFileError(ImageFileError):
    """The file has 0 bytes."""


class NotAnImageError(ImageFileError):
    """Pillow does not recognise the file as an image."""


class TruncatedImageError(ImageFileError):
    """The file ends before the image data does (interrupted download or copy)."""


class UnreadableImageError(ImageFileError):
    """The file is there but cannot be read (no read permission, an I/O error)."""


class ImageTooLargeError(ImageFileError):
    """The input has more pixels than ``max_pixels`` allows."""


class PixelRangeError(ImageFileError):
    """An image's values are outside every range :func:`load_image` reads (float or integer)."""


class FloatRangeError(PixelRangeError):
    """A float image's values are neither 0..1 nor 0..255 (see :func:`load_image`)."""


class IntegerRangeError(PixelRangeError):
    """An integer image's values are outside 0..65535: negative or above 16 bits (see :func:`load_image`)."""


class OutputTooLargeError(ValueError):
    """The requested output size exceeds ``max_output_pixels``.

    ``height``/``width``: the output asked for; ``input_height``/``input_width``: the input;
    ``max_scale``, ``max_long_side``, ``max_megapixels``: the largest factor, long side (pixels)
    and megapixels within the limit, each as the message prints it (front ends word their own advice).
    """

    def __init__(self, message: str, size: tuple[int, int] = (0, 0), input_size: tuple[int, int] = (0, 0),
                 max_scale: float = 0.0, max_long_side: int = 0, max_megapixels: float = 0.0):
        super().__init__(message)
        self.height, self.width = size
        self.input_height, self.input_width = input_size
        self.max_scale = max_scale
        self.max_long_side = max_long_side
        self.max_megapixels = max_megapixels


# --- loading ---------------------------------------------------------------------------------

@dataclass
class LoadedImage:
    """An image read by :func:`load_image`.

    ``rgb``: float32 ``[1, 3, H, W]`` in ``[0, 1]`` (gray inputs have three equal channels);
    ``alpha``: float32 ``[1, 1, H, W]`` or ``None``; ``bit_depth``: 8 or 16 (what the output
    should be written with); ``grayscale``: the source had no colour (L, LA, I;16, F...), so the
    output is written gray again; ``source_mode``: Pillow's mode of the file; ``notes``: things
    the user should know (only the first frame of an animation was used, values were clipped...);
    ``icc_profile``: the embedded colour profile, to be written back with the result;
    ``exif``: the file's descriptive EXIF (camera, dates, exposure, GPS...; see
    :func:`carried_exif`) as bytes, or None; ``dpi``: its resolution in dots per inch, or None;
    ``xmp``: its XMP packet (caption, keywords, rating, rights, edit history; see
    :func:`carried_xmp`), or None; ``text``: a PNG's descriptive text (:data:`PNG_TEXT_KEYS`:
    title, author, copyright...), by keyword.
    """

    rgb: torch.Tensor
    alpha: Optional[torch.Tensor]
    bit_depth: int
    grayscale: bool
    source_mode: str
    path: str
    notes: list[str] = field(default_factory=list)
    icc_profile: Optional[bytes] = None
    exif: Optional[bytes] = None
    dpi: Optional[tuple[float, float]] = None
    xmp: Optional[bytes] = None
    text: dict[str, str] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[-2])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[-1])

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.height, self.width


def load_image(path: str | os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_INPUT_PIXELS,
               check_size: Optional[Callable[[int, int], Any]] = None, metadata: bool = True) -> LoadedImage:
    """Read an image file into a :class:`LoadedImage`.

    Honours EXIF orientation; uses the first frame of animations and multi-page files (and says
    so in ``notes``); palette images with transparency and gray/RGB images with a ``tRNS``
    colour get an alpha channel; CMYK is converted to RGB (through the embedded ICC profile when
    there is one); 16-bit gray and 16-bit RGB(A) PNG/TIFF keep all 16 bits.

    Float TIFFs (Pillow mode ``F``) are read as 0..1, the float convention, or as 0..255 (8-bit
    values stored as float: divided by 255, written back as 8-bit, with a note) when their
    maximum is above 2 and the values say so: all whole numbers, or a median above 1.1. A
    maximum above 2 with mostly fractional values up to 1 is a 0..1 (HDR) picture with
    highlights, and is refused with advice to tone-map it, since reading it as 0..255 would make
    it black. Values past either end of the range by up to ``FLOAT_OVERSHOOT`` (10%) of it are
    clipped, with a note; anything else (negative or -1..1 data, HDR, values far above 255)
    raises :class:`FloatRangeError` saying how to convert it, since clipping would ruin it. NaN
    and -inf become 0, +inf the top of the range.

    Integer images of more than 8 bits (Pillow modes ``I;16*`` and ``I``) are read as 16-bit,
    0..65535, except that a file of 32-bit samples whose maximum is at most 255 is read as 8-bit
    values in a 32-bit container (divided by 255, written back as 8-bit, with a note). 16-bit
    samples are always 16-bit, however dark; one whose maximum is at most 255 gets a note that it
    is nearly black (8-bit data belongs in an 8-bit file). Negative values or values above 65535
    raise :class:`IntegerRangeError` saying how to convert them.

    ``max_pixels`` and ``check_size`` are checked on the header first, as by :func:`probe_image`.
    ``metadata=False`` leaves ``exif``, ``dpi``, ``xmp`` and ``text`` unread (for pixels that are
    only scored or trained on, never written back).
    Raises what :func:`probe_image` raises, and :class:`TruncatedImageError`,
    :class:`FloatRangeError`, :class:`IntegerRangeError` or :class:`ImageFileError` for the
    pixels, each naming the file and what to do.
    """
    pillow_warnings: list[str] = []
    with _own_pixel_limit(pillow_warnings):
        p, img = _open_checked(path, max_pixels, check_size)
        with img:
            loaded = _load(p, img)
            if metadata:  # after decoding: a PNG's eXIf chunk may follow its pixel data
                loaded.exif = carried_exif(p, img, loaded.notes)
                loaded.dpi = _dpi_of(img)
                loaded.xmp = carried_xmp(img, loaded.notes)
                loaded.text = carried_text(img, loaded.notes)
    loaded.notes.extend(pillow_warnings)  # (with a failed load, the error says what matters)
    return loaded


def carried_exif(p: Path, img: Image.Image, notes: Optional[list[str]] = None) -> Optional[bytes]:
    """The EXIF of the picture ``img`` (opened from ``p``) worth keeping with an upscaled copy,
    as bytes for :func:`save_image`, or None when there is none: see :mod:`fluxsr_core.exif`
    (camera, dates, exposure, GPS, copyright, byte-exact; not the orientation, the thumbnail,
    the maker note or what describes the source file's pixels). It comes from the file's EXIF
    block (JPEG, PNG, WebP...; ImageMagick's PNG text chunk too) or a TIFF's own first directory.
    An EXIF that cannot be read is left out with a note, never an error: it is metadata."""
    try:
        if img.format == "TIFF":
            with open(p, "rb") as f:
                return _exif.carried_exif(f, from_tiff_file=True)
        raw = img.info.get("exif") or _imagemagick_profile(img, "exif")
        return _exif.carried_exif(bytes(raw)) if raw else None
    except (_exif.ExifError, ValueError, TypeError, OSError) as e:
        if notes is not None:
            why = str(e) if isinstance(e, _exif.ExifError) else f"{type(e).__name__}: {e}"
            notes.append(f"its EXIF metadata could not be copied ({why}); the result is written without it")
        return None


def carried_xmp(img: Image.Image, notes: Optional[list[str]] = None) -> Optional[bytes]:
    """The XMP packet of ``img`` (JPEG, PNG, WebP, TIFF; ImageMagick's PNG text chunk too) as it
    may travel with an upscaled copy (see :mod:`fluxsr_core.xmp`: its orientation made upright,
    its thumbnail and what describes the source file's coding left out), or None when there is
    none. One that cannot be read is left out with a note, never an error."""
    try:
        raw = _xmp_packet(img)
        return _xmp.carried_xmp(raw) if raw else None
    except _xmp.XmpError as e:
        if notes is not None:
            notes.append(f"its XMP metadata could not be copied ({e}); the result is written without it")
        return None


def _imagemagick_profile(img: Image.Image, kind: str) -> Optional[bytes]:
    """ImageMagick's PNG text chunk "Raw profile type <kind>" (hex after three header lines) as
    bytes, or None; raises ValueError when its hex cannot be read."""
    text = img.info.get(f"Raw profile type {kind}")
    return bytes.fromhex("".join(str(text).split("\n")[3:])) if text else None


def _xmp_packet(img: Image.Image) -> Optional[bytes | str]:
    """The XMP packet as the file holds it (JPEG APP1, PNG iTXt, WebP chunk, TIFF tag 700,
    ImageMagick's hex PNG text), or None; raises :class:`xmp.XmpError` when it is not text."""
    raw = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
    if not raw:
        try:
            raw = _imagemagick_profile(img, "xmp")
        except ValueError as e:
            raise _xmp.XmpError(f"ImageMagick's hex profile cannot be read ({e})") from None
    if isinstance(raw, tuple) and len(raw) == 1:  # a TIFF tag 700 of a type other than BYTE
        raw = raw[0]
    return raw or None


# PNG's predefined text keywords (PNG spec 11.3.4.2): what describes the picture. Others are
# left out: a generator's own chunks (ComfyUI's "prompt" and "workflow", A1111's "parameters")
# describe how the source was made, and ComfyUI would open the source's graph from the result.
PNG_TEXT_KEYS = ("Title", "Author", "Description", "Copyright", "Creation Time", "Software", "Disclaimer",
                 "Warning", "Source", "Comment")
_MAX_TEXT_CHARS = 1 << 20  # per entry: more is a data dump, not a caption
# Text chunks that hold metadata carried on its own (XMP; ImageMagick's raw EXIF/XMP profiles).
_TEXT_CARRIED_APART = ("XML:com.adobe.xmp", "Raw profile type ")


def carried_text(img: Image.Image, notes: Optional[list[str]] = None) -> dict[str, str]:
    """A PNG's descriptive text chunks (:data:`PNG_TEXT_KEYS`), by keyword, or a JPEG's comment
    (its COM segment) as ``Comment``; empty for other formats. An entry over a million
    characters is left out with a note."""
    if img.format == "JPEG":
        raw = img.info.get("comment")
        if not isinstance(raw, (bytes, str)) or not raw:
            return {}
        try:
            comment = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:  # older tools wrote Latin-1
            comment = raw.decode("latin-1")
        comment = comment.rstrip("\0")
        if len(comment) > _MAX_TEXT_CHARS:
            if notes is not None:
                notes.append(f"its JPEG comment ({len(comment):,} characters) is too long to copy; the result is "
                             "written without it")
            return {}
        return {"Comment": comment} if comment else {}
    if img.format != "PNG":
        return {}
    try:
        chunks = img.text
    except (ValueError, OSError, SyntaxError) as e:  # a damaged text chunk costs the text, not the picture
        if notes is not None:
            notes.append(f"its PNG text could not be read ({type(e).__name__}: {e}); the result is written without it")
        return {}
    kept = {}
    for key in PNG_TEXT_KEYS:
        value = chunks.get(key)
        if not isinstance(value, str) or not value:
            continue
        if len(value) > _MAX_TEXT_CHARS:
            if notes is not None:
                notes.append(f"its PNG text '{key}' ({len(value):,} characters) is too long to copy; "
                             "the result is written without it")
            continue
        kept[key] = str(value)
    left = sorted(k for k, v in chunks.items() if k not in PNG_TEXT_KEYS and isinstance(v, str) and v
                  and not k.startswith(_TEXT_CARRIED_APART))
    if left and notes is not None:  # left out on purpose (see PNG_TEXT_KEYS), but said
        shown = ", ".join(repr(k) for k in left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        notes.append(f"its PNG text {shown} is not carried: only the text that describes the picture is (Title, "
                     "Author, Description, Copyright, ...), not a generator's record of how the source was made")
    return kept


def _dpi_of(img: Image.Image) -> Optional[tuple[float, float]]:
    """The file's resolution in dots per inch (kept with the result, as image editors do when they
    resample: the print size grows with the pixels), or None when it has none or a nonsense one."""
    if img.format == "JPEG" and img.info.get("jfif_unit") not in (1, 2):
        # no JFIF resolution: Pillow took the EXIF's, or said 72 when it has none or cannot be read
        try:
            if ExifTags.Base.XResolution not in img.getexif():
                return None
        except Exception:  # noqa: BLE001 - an unreadable EXIF holds no resolution we can trust
            return None
    if img.format == "TIFF" and not all(getattr(img, "tag_v2", {}).get(tag) for tag in (282, 283)):
        return None  # no X/YResolution tag: Pillow says 1 dpi there, which would print 80 px 80 inches wide
    dpi = img.info.get("dpi")
    try:
        x, y = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    return (x, y) if 0 < x < 1e6 and 0 < y < 1e6 else None


def probe_image(path: str | os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_INPUT_PIXELS,
                check_size: Optional[Callable[[int, int], Any]] = None) -> tuple[int, int]:
    """Check that ``path`` is an image :func:`load_image` can start on, from its header (and the
    values of float and 32-bit integer images, see below), and return its ``(height, width)`` as
    stored (before EXIF orientation).

    Cheap whatever the image's size: no pixel of an 8/16-bit image is decoded, so a front end can
    refuse bad inputs before it loads its models. ``max_pixels`` guards against decompression bombs and accidental
    huge inputs (``None`` disables it). ``check_size(height, width)`` runs on the header's size and
    may raise (the CLI refuses an output over its limit there, so a small file claiming a huge size
    costs nothing; EXIF orientation may swap the sides, so check what does not change: area, long
    side). Raises :class:`ImageNotFoundError` (:class:`BrokenLinkError` for a link to nothing),
    :class:`EmptyImageFileError`, :class:`UnreadableImageError` (no read permission, I/O error),
    :class:`NotAnImageError`, :class:`TruncatedImageError` (a header cut short),
    :class:`ImageTooLargeError` or :class:`ImageFileError` (a folder), each naming the file and
    what to do, and whatever ``check_size`` raises.

    Float images and 32-bit or signed integer ones (Pillow modes ``F`` and ``I``) are the exception:
    whether :func:`load_image` accepts them depends on their values, so their pixels are decoded and
    judged by the loader's own rules, raising its :class:`FloatRangeError` or
    :class:`IntegerRangeError` (and :class:`TruncatedImageError` for data cut short). Other
    problems in the pixel data are found only by :func:`load_image`.
    """
    with _own_pixel_limit(pillow_warnings=[]):  # Pillow's warnings: the load reports them, as notes
        p, img = _open_checked(path, max_pixels, check_size)
        with img:
            w, h = img.size
            _refuse_misread_tiff(p, img)
            if img.mode in _RANGE_CHECKED_MODES and not _unsigned_16bit_samples(img):
                _wide_gray_to_unit(p, img, notes=[])
    return h, w


@contextlib.contextmanager
def _own_pixel_limit(pillow_warnings: Optional[list[str]] = None):
    """Pillow's decompression-bomb limit is a module global: swap it out (under a lock) while a
    file is opened and decoded, since our own ``max_pixels`` check replaces it.

    ``pillow_warnings``: a list that receives the text of the warnings Pillow raises meanwhile
    in this thread (about this file: "Corrupt EXIF data"...) instead of their being printed bare
    among progress bars; they then become notes of the file. Every other warning, and Pillow's
    in other threads, is shown as it would have been."""
    with _PIL_LIMIT_LOCK:
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if pillow_warnings is not None:
                    # every one of Pillow's (not once per place), kept when from this thread
                    warnings.filterwarnings("always", module=r"PIL(\.|$)")
                    shown, me = warnings.showwarning, threading.get_ident()

                    def keep(message, category, filename, lineno, file=None, line=None):
                        if threading.get_ident() == me and "PIL" in Path(filename).parts:
                            text = f"Pillow: {str(message).strip()}"
                            if text not in pillow_warnings:
                                pillow_warnings.append(text)
                        else:
                            shown(message, category, filename, lineno, file, line)

                    warnings.showwarning = keep
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


def _open_checked(path: str | os.PathLike, max_pixels: Optional[int],
                  check_size: Optional[Callable[[int, int], Any]]) -> tuple[Path, Image.Image]:
    """The checks of :func:`probe_image`; returns the path and the opened (undecoded) image, which
    the caller closes."""
    p = Path(path)
    try:
        exists = p.exists()
        if not exists:
            broken = broken_link_message(p)
            if broken is not None:
                raise BrokenLinkError(broken)
            raise ImageNotFoundError(missing_file_message(p))
        if p.is_dir():
            raise ImageFileError(f"'{p}' is a folder, not an image file; pass the path of one image.")
        empty = p.stat().st_size == 0
    except PermissionError as e:  # a folder above it that may not be searched
        raise UnreadableImageError(_unreadable_message(p, e)) from e
    if empty:
        raise EmptyImageFileError(f"image file '{p}' is empty (0 bytes): the download or copy "
                                  f"that made it probably failed. Re-download or re-export it.")
    if max_pixels is not None and int(max_pixels) <= 0:
        raise ValueError(f"max_pixels must be positive or None (got {max_pixels})")
    img = _open(p)
    try:
        w, h = img.size
        if max_pixels is not None and w * h > int(max_pixels):
            raise ImageTooLargeError(
                f"'{p}' is {w}x{h} = {w * h / 1e6:.1f} megapixels, more than the limit of "
                f"{int(max_pixels) / 1e6:.1f} MP (a guard against decompression bombs). If the "
                f"file is genuine, downscale it first (from Python: a larger max_pixels for "
                f"load_image, None disables the guard).")
        if check_size is not None:
            check_size(h, w)
    except BaseException:
        img.close()
        raise
    return p, img


def _unreadable_message(p: Path, e: OSError) -> str:
    if isinstance(e, PermissionError):
        return (f"cannot read '{p}': permission denied; check its permissions (reading needs read "
                f"permission on the file and execute permission on its folders: chmod u+r '{p}').")
    return (f"cannot read '{p}' ({e.strerror or e}); check that the disk or network share it is on "
            f"is mounted and readable.")


def missing_file_message(path: str | os.PathLike) -> str:
    """What to say about an input ``path`` that does not exist, with where relative paths start."""
    return (f"image file not found: '{Path(path)}'. Check the path (relative paths are taken from "
            f"the current folder '{os.getcwd()}').")


def broken_link_message(path: str | os.PathLike,
                        advice: str = "Restore the file it points to, or remove the link.") -> Optional[str]:
    """What is wrong with ``path`` if it is a symbolic link to nothing (a missing file or a loop
    of links), naming where it points, then ``advice``; ``None`` for anything else."""
    p = Path(path)
    try:
        if not p.is_symlink():
            return None
    except OSError:  # cannot even look at the entry: not known to be a link; the caller's stat says why
        return None
    try:
        p.stat()
        return None
    except FileNotFoundError:
        why = "which does not exist"
    except OSError as e:  # ELOOP and the like
        why = f"which cannot be reached ({e.strerror or e})"
    return f"'{p}' is a broken symbolic link: it points to '{os.readlink(p)}', {why}. {advice}"


def _open(p: Path) -> Image.Image:
    try:
        _register_optional_openers()
        return Image.open(p)
    except UnidentifiedImageError as e:
        kind = _signature_kind(p)
        unsupported = unsupported_format_message(p, kind) if kind in ("HEIC", "AVIF") else None
        if unsupported is not None:
            raise NotAnImageError(unsupported) from e
        if kind is not None:
            raise TruncatedImageError(
                f"'{p}' starts like {'an' if kind == 'AVIF' else 'a'} {kind} file but its header cannot be "
                f"read: the file is damaged "
                f"or incomplete (an interrupted download or copy?). Re-download or re-export it.") from e
        tiff_hint = ""
        if p.suffix.lower() in (".tif", ".tiff"):
            # Pillow has no float colour mode, nor 32-bit integer colour, so such TIFFs fail here.
            tiff_hint = (" Pillow reads 8-bit TIFFs, 16-bit grey, RGB and RGBA ones, and 32-bit float or "
                         "integer TIFFs with one channel only; a 16-bit grey TIFF with alpha, a colour TIFF "
                         "of 32-bit samples (float or integer), or a TIFF of 16- or 64-bit floats, must be "
                         "re-saved as a 16-bit TIFF or PNG. An ordinary "
                         "TIFF that fails here is damaged or incomplete: re-export it.")
        raise NotAnImageError(
            f"'{p}' is not an image Pillow can read (unknown or unsupported format). "
            f"Use PNG, JPEG, WebP, TIFF, BMP or GIF; for HEIC install 'pillow-heif'.{tiff_hint}"
        ) from e
    except OSError as e:
        if e.errno is None and _TRUNCATION_MESSAGES.search(str(e)) and (
                _signature_kind(p) is not None or _starts_like_tiff(p)):  # Pillow's own, for a header cut short
            raise TruncatedImageError(
                f"could not read the header of '{p}' ({e}); the file is damaged or incomplete. "
                f"Re-download or re-export it.") from e
        if e.errno is None:  # Pillow's own for a whole file it does not support (a BMP compression...)
            raise NotAnImageError(f"'{p}' cannot be read by Pillow ({e}): a format variant it does not "
                                  f"support, or not an image at all. If it is an image, re-save it as PNG, JPEG or "
                                  f"TIFF in another program.") from e
        raise UnreadableImageError(_unreadable_message(p, e)) from e  # no read permission, an I/O error
    except (SyntaxError, EOFError, struct.error, ValueError) as e:
        # Plugins raise these for headers that are cut short or malformed.
        raise TruncatedImageError(
            f"could not read the header of '{p}' ({e}); the file is damaged or incomplete. "
            f"Re-download or re-export it.") from e


def _starts_like_tiff(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*")
    except OSError:
        return False


def _signature_kind(p: Path) -> Optional[str]:
    """The format named by the first bytes of ``p`` (see ``_SIGNATURES``), or ``None``."""
    try:
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":  # "BM", file size, 4 reserved zero bytes
        return "BMP"
    if head[4:8] == b"ftyp":  # ISO media (HEIF's and AVIF's container): the major brand names the codec
        return _FTYP_BRANDS.get(head[8:12])
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", **dict.fromkeys(
    (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"), "HEIC")}
# Formats only some installs read: (name, what makes this one read it), by file name suffix.
_OPTIONAL_FORMATS = {
    **dict.fromkeys((".heic", ".heif"), ("HEIC", "install the pillow-heif plugin (pip install pillow-heif)")),
    ".avif": ("AVIF", "install a Pillow built with AVIF (PyPI's wheels are, from Pillow 11.3)"),
    **dict.fromkeys((".jp2", ".j2k", ".jpx"), ("JPEG 2000", "install a Pillow built with OpenJPEG (PyPI's "
                                                            "wheels are)")),
}


def unsupported_format_message(p: Path, kind: Optional[str] = None) -> Optional[str]:
    """Why ``p`` cannot be read here when it is (by its name, or by ``kind``, its first bytes') a
    HEIC, AVIF or JPEG 2000 file that this install has no reader for, and what to install; None
    when it is none of them or this install reads it."""
    readable = optional_image_suffixes()
    for suffix, (name, advice) in _OPTIONAL_FORMATS.items():
        if (kind == name or (kind is None and Path(p).suffix.lower() == suffix)) and suffix not in readable:
            return f"'{p}' is a {name} file, which this install cannot read: {advice}, or convert it to PNG or JPEG"
    return None


def optional_image_suffixes() -> frozenset[str]:
    """File name suffixes of the formats this install reads beyond PNG, JPEG, WebP, BMP, TIFF and
    GIF: HEIC/HEIF when the ``pillow-heif`` plugin is installed, AVIF and JPEG 2000 when Pillow
    was built with them (folder scans pick these up only where they can be read)."""
    from PIL import features

    found: set[str] = set()
    if _register_optional_openers():
        found |= {".heic", ".heif"}
    for feature, suffixes in (("avif", {".avif"}), ("jpg_2000", {".jp2", ".j2k", ".jpx"})):
        try:
            if features.check(feature):
                found |= suffixes
        except ValueError:  # a Pillow that does not know the feature's name
            pass
    return frozenset(found)


def _register_optional_openers() -> bool:
    """Let Pillow open HEIC/HEIF when the optional ``pillow-heif`` plugin is installed; returns
    whether it is."""
    try:
        import pillow_heif  # type: ignore
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _decode(p: Path, img: Image.Image, step) -> Image.Image:
    """Run ``step(img)`` (which makes Pillow decode pixels) turning decode errors into ours."""
    try:
        return step(img)
    except Image.DecompressionBombError as e:  # pragma: no cover - disabled above; keep safe
        raise ImageTooLargeError(f"'{p}': {e}") from e
    except (OSError, SyntaxError, EOFError, zlib.error, struct.error, ValueError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError):
            raise TruncatedImageError(
                f"image file '{p}' is truncated: it ends before the image data does ({msg}). "
                f"This usually means an interrupted download or copy; re-download or re-export "
                f"the image.") from e
        raise ImageFileError(f"could not decode image file '{p}' ({type(e).__name__}: {msg}). "
                             f"The file is damaged or uses an unsupported variant of its format; "
                             f"re-export it as PNG.") from e


def _rawmode(tile) -> Optional[str]:
    args = tile.args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile, rawmode: str):
    args = tile.args
    if isinstance(args, str):
        return tile._replace(args=rawmode)
    return tile._replace(args=(rawmode,) + tuple(args[1:]))


def _opposite_16(rawmode: str) -> str:
    """``RGB;16B`` -> ``RGB;16L`` etc.: the same unpacker then picks each sample's low byte."""
    order = rawmode[-1]
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    return rawmode[:-1] + ("B" if order == "L" else "L")


def _wide_ppm_maxval(img: Image.Image) -> int:
    """A binary colour PPM's maximum sample value when it is over 255 (16-bit samples), else 0."""
    if img.format != "PPM" or img.mode != "RGB" or len(img.tile) != 1:
        return 0
    tile = img.tile[0]
    args = tile[3] if isinstance(tile[3], tuple) else ()
    if tile[0] != "ppm" or len(args) < 2 or not isinstance(args[1], int) or args[1] <= 255:
        return 0
    return args[1]


def _is_16bit_color(img: Image.Image) -> bool:
    if img.mode not in ("RGB", "RGBA") or not img.tile:
        return False
    modes = [_rawmode(t) for t in img.tile]
    # RGBa: a TIFF's premultiplied (associated) alpha
    return all(m is not None and m.split(";")[-1] in ("16B", "16L", "16N") for m in modes) and \
        all(m.split(";")[0] == img.mode or (img.mode == "RGBA" and m.split(";")[0] == "RGBa") for m in modes)


def _tiff_tag(img: Image.Image, tag: int):
    """A TIFF tag's value (None for other formats, or when absent)."""
    tags = getattr(img, "tag_v2", None)
    return tags.get(tag) if tags is not None else None


def _refuse_misread_tiff(p: Path, img: Image.Image) -> None:
    """Refuse a TIFF of more than 8 bits per sample stored one plane per channel
    (PlanarConfiguration 2): Pillow decodes its planes as 8-bit and gives wrong colours, silently."""
    bits = _tiff_tag(img, 258)
    bits = max(bits) if isinstance(bits, tuple) and bits else bits
    if _tiff_tag(img, 284) == 2 and isinstance(bits, int) and bits > 8:
        raise ImageFileError(f"'{p}' is a {bits}-bit TIFF stored one plane per channel (planar), which "
                             "Pillow decodes into wrong colours; re-save it interleaved (e.g. `magick in.tif "
                             "-interlace none out.tif`, or GIMP's TIFF export) or as a 16-bit PNG")


def _is_16bit_la_png(img: Image.Image) -> bool:
    # PngImagePlugin maps 16-bit gray+alpha to mode RGBA with raw mode "LA;16B" (high bytes only).
    return img.mode == "RGBA" and bool(img.tile) and all(_rawmode(t) == "LA;16B" for t in img.tile)


# EXIF orientation -> the turn that makes the picture upright
_ORIENTATION_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image, notes: list[str]) -> Image.Image:
    """Decode ``img`` and turn it by its orientation: the EXIF's, else the XMP's (the picture's
    ``tiff:Orientation``, found by namespace), the precedence of the Metadata Working Group's
    guidelines. Our own rule, not ``ImageOps.exif_transpose``: Pillow folds a textual match of
    ``tiff:Orientation`` anywhere in the XMP into its EXIF (Pillow 13; Pillow 11 only for PNG),
    so the turn, and whether the XMP carried as upright is true, depended on the Pillow
    installed. An EXIF that cannot be parsed leaves its orientation unapplied, with a note (the
    XMP's still counts): the metadata must never cost the picture."""
    tiff_orientation = None
    if hasattr(img, "tag_v2"):
        # Pillow (11 and 13) turns a TIFF while loading it: by its tag, which it then deletes,
        # or (13) by a textual match in the XMP (in a caption too; a str packet made it raise).
        # Hidden from that load, the XMP is left to the namespace rule below.
        tiff_orientation = img.tag_v2.get(ExifTags.Base.Orientation)
        if tiff_orientation in (5, 6, 7, 8):
            # Pillow maps an uncompressed TIFF of a mappable mode (L, I;16, P, RGBA, CMYK)
            # straight from the file at its size after the quarter turn, not the stored one: the
            # pixels came out scrambled. Without a file name it reads them instead (11 and 13).
            img.filename = ""
        hidden = img.info.pop("xmp", None)
        try:
            img.load()
        finally:
            if hidden is not None:
                img.info["xmp"] = hidden
    else:
        img.load()
    try:
        if hasattr(img, "tag_v2"):
            if tiff_orientation is not None and ExifTags.Base.Orientation not in img.tag_v2:
                return img  # turned already: the tag is gone, and with it any XMP fallback
            orientation = tiff_orientation
        else:
            orientation = _exif_orientation(img)
    except Exception as e:  # noqa: BLE001 - whatever the parser raises
        notes.append(f"its EXIF metadata cannot be parsed ({type(e).__name__}: {e}); an orientation it may "
                     "hold is not applied")
        orientation = None  # the XMP's may still be read
    if orientation is None:
        try:
            packet = _xmp_packet(img)
            orientation = _xmp.orientation(packet) if packet else None
        except _xmp.XmpError:
            pass  # carried_xmp says why the XMP is left out
    turn = _ORIENTATION_TURNS.get(orientation)
    return img.transpose(turn) if turn is not None else img


def _exif_orientation(img: Image.Image) -> Optional[int]:
    """The orientation in the file's EXIF block itself (not Pillow's ``getexif``, which adds a
    textual match in the XMP), or None."""
    raw = img.info.get("exif") or _imagemagick_profile(img, "exif")
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(bytes(raw))
    return exif.get(ExifTags.Base.Orientation)


def _transposed_array(img: Image.Image, notes: list[str]) -> np.ndarray:
    return np.asarray(_upright(img, notes))


def _load(p: Path, img: Image.Image) -> LoadedImage:
    """Decode ``img`` (opened from ``p`` and checked by :func:`_open_checked`)."""
    notes: list[str] = []
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        animated = bool(getattr(img, "is_animated", False)) and img.format in _ANIMATION_FORMATS
        what = "an animation" if animated else "a multi-page file"
        notes.append(f"{p.name} is {what} with {frames} frames; only the first was used")
    source_mode = img.mode
    icc = img.info.get("icc_profile") or None
    trns = img.info.get("transparency")
    tiles = list(img.tile)

    if _is_16bit_la_png(img):
        # Decode with a pass-through raw mode of the same width (32 bits/pixel): bytes come
        # out as (gray hi, gray lo, alpha hi, alpha lo).
        img.tile = [_with_rawmode(t, "RGBA") for t in tiles]
        raw = _decode(p, img, lambda im: _transposed_array(im, notes)).astype(np.uint16)
        gray = raw[..., 0] * 256 + raw[..., 1]
        alpha = raw[..., 2] * 256 + raw[..., 3]
        _note_dark_16bit(p, int(gray.min()), int(gray.max()), notes)
        return _finish(p, gray[..., None] / 65535.0, alpha / 65535.0, 16, True, "LA;16",
                       notes, icc)

    ppm_maxval = _wide_ppm_maxval(img)
    if ppm_maxval:
        # Pillow's PPM decoder scales samples over 255 down to 8 bits; the format is plain
        # big-endian samples after the header, so they are read here whole.
        width, height = img.size
        with open(p, "rb") as f:
            f.seek(tiles[0][2])
            data = f.read(width * height * 3 * 2)
        if len(data) < width * height * 3 * 2:
            raise TruncatedImageError(f"'{p}' is a 16-bit PPM cut short: {len(data):,} of its "
                                      f"{width * height * 6:,} bytes of samples are there. Re-download or re-export it.")
        full = np.frombuffer(data, ">u2").reshape(height, width, 3).astype(np.float64)
        full = np.clip(full, 0, ppm_maxval) / ppm_maxval
        _note_dark_16bit(p, int(full.min() * 65535), int(full.max() * 65535), notes)
        return _finish(p, full, None, 16, False, "RGB;16", notes, icc)

    if _is_16bit_color(img):
        # A premultiplied (RGBa) file is decoded as straight RGBA, so the bytes come out as they
        # are stored; the division by alpha is made below on the 16-bit values (Pillow's unpacker
        # would make it on each byte apart).
        straight = [_with_rawmode(t, _rawmode(t).replace("RGBa", "RGBA")) for t in tiles]
        premultiplied = straight != tiles
        img.tile = straight
        hi = _decode(p, img, lambda im: _transposed_array(im, notes)).astype(np.uint16)
        with _open(p) as low_img:
            low_img.tile = [_with_rawmode(t, _opposite_16(_rawmode(t))) for t in straight]
            lo = _decode(p, low_img, lambda im: _transposed_array(im, [])).astype(np.uint16)
        full = hi * 256 + lo
        alpha = None
        if full.shape[-1] == 4:
            alpha = full[..., 3] / 65535.0
            full = full[..., :3]
            if premultiplied:
                seen = alpha[..., None] > 0
                full = np.where(seen, np.clip(full / np.where(seen, alpha[..., None], 1.0), 0, 65535), 0.0)
        elif isinstance(trns, tuple) and len(trns) == 3:
            alpha = (~np.all(full == np.asarray(trns, np.uint16), axis=-1)).astype(np.float64)
        _note_dark_16bit(p, int(full.min()), int(full.max()), notes)
        return _finish(p, full / 65535.0, alpha, 16, False, f"{source_mode};16", notes, icc)

    mode = img.mode
    if mode in _WIDE_GRAY_MODES:
        unit, alpha, bit_depth = _wide_gray_to_unit(p, img, notes)
        return _finish(p, unit[..., None], alpha, bit_depth, True, source_mode, notes, icc)
    _refuse_misread_tiff(p, img)

    # 8-bit family. Orientation first (the EXIF/TIFF tags live on the file's image object;
    # converted copies may lose them), then let Pillow convert to one of L, LA, RGB, RGBA.
    has_palette_alpha = mode == "PA" or (mode == "P" and "transparency" in img.info)
    img = _decode(p, img, lambda im: _upright(im, notes))
    if mode == "CMYK":
        if any((_rawmode(t) or "").startswith("CMYK;16") for t in tiles):
            notes.append(f"{p.name} is a 16-bit CMYK image: read at 8 bits per channel (colour management converts "
                         "CMYK at 8 bits), so the output is 8-bit; convert it to 16-bit RGB first to keep the "
                         "16 bits")
        img = _cmyk_to_rgb(img, notes)
        icc = None  # the result is sRGB
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if has_palette_alpha else "RGB")
        rgb = np.asarray(img)[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            img = img.convert("LA" if has_palette_alpha else "L")  # a grey palette: a grey image
    elif mode == "1":
        img = img.convert("L")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode in ("L", "RGB") and trns is not None:
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        # RGBX, YCbCr, LAB, HSV...: Pillow knows how to make RGB of them.
        img = img.convert("RGB")
    arr = np.asarray(img).astype(np.float64) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    gray = img.mode in ("L", "LA")
    alpha = None
    if img.mode in ("LA", "RGBA"):
        alpha = arr[..., -1]
        arr = arr[..., :-1]
    return _finish(p, arr, alpha, 8, gray, source_mode, notes, icc)


def _unsigned_16bit_samples(img: Image.Image) -> bool:
    """Whether a mode-``I`` image stores unsigned 16-bit samples (16-bit PGM, some TIFFs: Pillow
    opens them as ``I``), whose values are always in range, so the probe need not decode them."""
    rawmodes = [_rawmode(t) for t in img.tile]
    return bool(rawmodes) and all(r in ("I;16", "I;16B", "I;16L", "I;16N") for r in rawmodes)


def _wide_gray_to_unit(p: Path, img: Image.Image, notes: list[str]
                       ) -> tuple[np.ndarray, Optional[np.ndarray], int]:
    """Decode a one-channel image of integer or float samples (``_WIDE_GRAY_MODES``) and bring it
    to ``[0, 1]`` by the rules :func:`load_image` documents: ``(values [H, W], alpha [H, W] or None,
    bit depth to write)``. The one place those rules are applied, for the loader and for
    :func:`probe_image` alike; raises :class:`FloatRangeError` or :class:`IntegerRangeError`."""
    rawmodes = [_rawmode(t) for t in img.tile]  # read before decoding, which empties img.tile
    trns = img.info.get("transparency")
    # TIFF PhotometricInterpretation 0: 0 is white. Pillow turns 8-bit such files round, not
    # wider ones, which would come out as negatives.
    white_is_zero = _tiff_tag(img, 262) == 0
    if white_is_zero and not all(r in ("I;16", "I;16B", "I;16L", "I;16N") for r in rawmodes):
        raise ImageFileError(f"'{p}' is a grey TIFF with 0 as white (MinIsWhite) in {img.mode} samples, which "
                             "FluxSR reads only with 8 or 16 bits; re-save it as an ordinary (MinIsBlack) TIFF "
                             "or a 16-bit PNG")
    raw = _decode(p, img, lambda im: _transposed_array(im, notes))
    if white_is_zero:
        raw = 65535 - raw.astype(np.int64)
    if img.mode == "F":
        unit, bit_depth = _float_to_unit(p, raw.astype(np.float64), notes)
        return unit, None, bit_depth
    bits32 = img.mode == "I" and bool(rawmodes) and all(
        r is not None and (r == "I" or r.startswith("I;32")) for r in rawmodes)
    if bits32 and raw.dtype == np.int32 and all(r.startswith("I;32") and not r.endswith("S")
                                                 for r in rawmodes):
        raw = raw.view(np.uint32)  # Pillow keeps unsigned 32-bit samples as int32
    arr = raw.astype(np.float64)
    alpha = None
    if isinstance(trns, int):
        alpha = (arr != trns).astype(np.float64)
    unit, bit_depth = _integer_to_unit(p, arr, 32 if bits32 else 16, notes)
    return unit, alpha, bit_depth


def _float_to_unit(p: Path, arr: np.ndarray, notes: list[str]) -> tuple[np.ndarray, int]:
    """A float image in ``[0, 1]`` by the rule :func:`load_image` documents (0..1, or 0..255 when
    the values say so; overshoot clipped; anything else refused), and the bit depth to write it
    with (8 for 8-bit values stored as float, else 16), adding what the user should know to ``notes``."""
    finite = np.isfinite(arr)
    if not finite.any():
        raise FloatRangeError(f"'{p}' holds no finite values (all NaN or infinite): there is no "
                              f"picture to upscale. Re-export it from the program that made it.")
    values = arr[finite]
    lo, hi = float(values.min()), float(values.max())
    top = 1.0
    if hi > _FLOAT_0_255_ABOVE:
        # 8-bit data stored as float is whole numbers (or, resampled, mostly far above 1); a 0..1
        # picture with HDR highlights is mostly fractional values up to 1.
        whole = bool(np.all(np.abs(values - np.round(values)) <= _FLOAT_WHOLE_TOLERANCE))
        if whole or float(np.median(values)) > _FLOAT_0_255_MEDIAN_ABOVE:
            top = 255.0
    slack = 1 + _FLOAT_LIMIT_SLACK
    too_low, too_high = lo < -FLOAT_OVERSHOOT * top * slack, hi > (1 + FLOAT_OVERSHOOT) * top * slack
    if too_low or too_high:
        if too_low and lo >= (-1.0 - FLOAT_OVERSHOOT) * slack and hi <= (1.0 + FLOAT_OVERSHOOT) * slack:
            advice = "It looks like -1..1 data (a network's output): map it to 0..1 with (x + 1) / 2"
        elif too_low:
            advice = ("An image has no negative values: this is signed or scientific data; rescale "
                      "it to 0..1, e.g. (x - min) / (max - min)")
        elif hi > (1 + FLOAT_OVERSHOOT) * 255 * slack:
            advice = ("Values far above 255 are HDR or 16-bit/scientific data: tone-map HDR to 0..1, "
                      "or divide by the largest possible value (65535 for 16-bit data)")
        elif hi > _FLOAT_0_255_ABOVE:
            above = float(np.mean(values > (1 + FLOAT_OVERSHOOT) * slack))
            advice = (f"It looks like a 0..1 (HDR) picture with highlights: {above:.2%} of the values "
                      f"are above {1 + FLOAT_OVERSHOOT:g} and the median is "
                      f"{float(np.median(values)):.3g}, while 8-bit values stored as float are whole "
                      f"numbers (reading it as 0..255 would make it black). Tone-map it to 0..1 "
                      f"(e.g. x / (1 + x), or an HDR editor's tone mapping), or clip it to 0..1 "
                      f"yourself if the highlights do not matter")
        else:
            advice = "Rescale it to 0..1 (or save it as an 8/16-bit PNG or TIFF)"
        raise FloatRangeError(
            f"'{p}' is a float image with values from {lo:.4g} to {hi:.4g}: neither 0..1 (the float "
            f"convention) nor 0..255 (8-bit values stored as float), give or take "
            f"{FLOAT_OVERSHOOT:.0%}. Clipping it would ruin it. {advice}, then run again.")
    if top != 1.0:
        notes.append(f"{p.name}: float values from {lo:.4g} to {hi:.4g}, not the usual 0..1: read as "
                     f"8-bit values stored as float (divided by 255; written as 8-bit). If they mean "
                     f"something else (HDR, where values above 1 are highlights), convert the file "
                     f"to 0..1 first")
    if not finite.all():
        notes.append(f"{p.name}: NaN/inf values were replaced by 0/{top:g}")
        arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0)
    if lo < 0 or hi > top:
        notes.append(f"{p.name}: float values outside [0, {top:g}] "
                     f"(min {lo:.4g}, max {hi:.4g}) were clipped")
    return np.clip(arr / top, 0.0, 1.0), 8 if top == 255.0 else 16


def _integer_to_unit(p: Path, arr: np.ndarray, bits: int, notes: list[str]) -> tuple[np.ndarray, int]:
    """An integer image of ``bits``-bit samples (16 or 32) in ``[0, 1]`` by the rule
    :func:`load_image` documents, and the bit depth to write it with (8 for 8-bit values in a
    32-bit container, else 16), adding what the user should know to ``notes``."""
    lo, hi = int(arr.min()), int(arr.max())
    kind = f"{bits}-bit {'integer' if bits == 32 else 'gray'} image"
    if lo < 0 or hi > 65535:
        if lo < 0:
            advice = ("An image has no negative values: this is signed data (a difference or a "
                      "measurement); rescale it to 0..65535, e.g. (x - min) * 65535 / (max - min)")
        else:
            advice = ("Values above 65535 are more than 16 bits: scale them to 0..65535, e.g. "
                      "x * 65535 / max (x / 65537 for full-range 32-bit data)")
        raise IntegerRangeError(
            f"'{p}' is a {kind} with values from {lo} to {hi}: outside 0..65535, the 16-bit range "
            f"FluxSR reads integer images in. Clipping it would ruin it. {advice}, and save it as "
            f"a 16-bit PNG or TIFF (or a float TIFF in 0..1), then run again.")
    # 8-bit values are often stored in 32-bit containers (by image libraries that widen on
    # export); a real 16-bit picture whose brightest pixel is at most 255 of 65535 would be
    # almost black, so 0..255 is the better reading. 16-bit samples are left as 16-bit.
    if bits == 32 and 0 < hi <= 255:
        notes.append(f"{p.name}: a 32-bit integer image with values from {lo} to {hi}: read as "
                     f"8-bit values in a 32-bit container (divided by 255; written as 8-bit), since "
                     f"a 16-bit picture would be almost black. If they are 16-bit values of a very "
                     f"dark picture, save it as a 16-bit PNG or TIFF, which is always read as 16-bit")
        return arr / 255.0, 8
    _note_dark_16bit(p, lo, hi, notes)
    return arr / 65535.0, 16


def _note_dark_16bit(p: Path, lo: int, hi: int, notes: list[str]) -> None:
    """Tell the user when a 16-bit image is nearly black (its values reach at most 255 of 65535):
    it is upscaled as it is, and usually this is 8-bit data saved as 16-bit."""
    if hi <= _DARK_16BIT_MAX:
        notes.append(f"{p.name}: a 16-bit image with values from {lo} to {hi} of 65535: it is nearly "
                     f"black and will come out nearly black. If these are 8-bit values (0..255), save "
                     f"the file as 8-bit (an 8-bit PNG or TIFF) and run again")


def _cmyk_to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when possible (Pillow's plain conversion
    ignores profiles and gives flat, too-bright colours)."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception as e:  # a broken profile must not make the image unreadable
            notes.append(f"CMYK colour profile could not be applied ({e}); converted without it")
    else:
        notes.append("CMYK image without a colour profile: converted with Pillow's plain formula")
    return img.convert("RGB")


def _finish(p: Path, color: np.ndarray, alpha: Optional[np.ndarray], bit_depth: int,
            grayscale: bool, source_mode: str, notes: list[str], icc) -> LoadedImage:
    t = torch.from_numpy(np.ascontiguousarray(color, dtype=np.float32)).permute(2, 0, 1)[None]
    if t.shape[1] == 1:
        t = t.expand(1, 3, *t.shape[2:])
    rgb = t.contiguous()
    a = None
    if alpha is not None:
        a = torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32))[None, None]
    return LoadedImage(rgb=rgb, alpha=a, bit_depth=bit_depth, grayscale=grayscale,
                       source_mode=source_mode, path=str(p), notes=notes,
                       icc_profile=icc if isinstance(icc, (bytes, bytearray)) else None)


# --- saving ----------------------------------------------------------------------------------

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # as messages spell them


def save_image(path: str | os.PathLike, rgb: torch.Tensor, alpha: Optional[torch.Tensor] = None,
               bit_depth: int = 8, grayscale: bool = False, icc_profile: Optional[bytes] = None,
               exif: Optional[bytes] = None, dpi: Optional[tuple[float, float]] = None,
               xmp: Optional[bytes | str] = None, text: Optional[dict[str, str]] = None, quality: int = 95,
               warn: Optional[Callable[[str], None]] = None) -> Path:
    """Write an image atomically and return its path.

    ``rgb``: ``[1, 3, H, W]`` or ``[3, H, W]`` float in ``[0, 1]`` (values outside are clipped;
    NaN is an error). ``alpha``: ``[1, 1, H, W]``, ``[1, H, W]`` or ``[H, W]``, or ``None``.
    ``grayscale`` writes one luma channel (BT.601 weights, as Pillow's ``convert("L")``).
    Values are rounded to the nearest level, not truncated. The format follows the suffix:
    ``.png`` (8 or 16 bits), ``.jpg``/``.jpeg`` (8 bits, no alpha; quality 95), ``.webp``
    (8 bits; quality 95). The file is written under a temporary name in the same folder and
    renamed over ``path`` only when complete, so a failure never leaves a half-written image.
    Missing parent folders are created. ``icc_profile`` (when its colour space is that of the
    pixels written: grey or RGB), ``exif`` (bytes, e.g. a :class:`LoadedImage`'s: its pixel
    size is set to this image's), ``dpi``, ``xmp`` (an XMP packet, e.g. a :class:`LoadedImage`'s:
    its pixel size is set to this image's, its instance id made new) and ``text`` (PNG text
    chunks by keyword; a JPEG takes ``"Comment"`` as its comment) are written into the file.
    What a format cannot hold is left out with a warning: WebP holds no resolution and no text,
    a JPEG no EXIF over 64 KiB, no XMP over 65,504 bytes, no resolution over 65,535 dpi.
    ``quality`` (1-100) is the JPEG and WebP encoders'. ``warn(message)`` is told what is left out
    (default: a ``UserWarning`` naming the file).
    """
    p = Path(path)
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write '{p}': unsupported file type '{p.suffix}'. "
                         f"Use .png (8 or 16 bits, alpha), .jpg or .webp.")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16 (got {bit_depth})")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be a whole number from 1 to 100 (got {quality!r})")
    left_out: list[str] = []  # what the format cannot hold: told once the file is written
    if bit_depth == 16 and fmt != "PNG":
        raise ValueError(f"cannot write '{p}' with 16 bits: {fmt} holds 8 bits per channel. "
                         f"Save as .png or pass bit_depth=8.")
    color = _as_chw(rgb, "rgb")
    if color.shape[0] not in (1, 3):
        raise ValueError(f"rgb must have 1 or 3 channels (got {color.shape[0]})")
    a = None
    if alpha is not None:
        a = _as_chw(alpha, "alpha")
        if a.shape[0] != 1:
            raise ValueError(f"alpha must have one channel (got {a.shape[0]})")
        if a.shape[-2:] != color.shape[-2:]:
            raise ValueError(f"alpha is {a.shape[1]}x{a.shape[2]} but the image is "
                             f"{color.shape[1]}x{color.shape[2]}; upscale the alpha to the "
                             f"same size (upscale_alpha)")
        if fmt == "JPEG":
            raise ValueError(f"cannot write '{p}': JPEG has no alpha channel. Save as .png or "
                             f".webp, or drop the alpha.")
    q = _quantised(color, a, grayscale, bit_depth)
    exif = _exif_for(exif, width=q.shape[1], height=q.shape[0], fmt=fmt, warn=left_out.append)
    xmp = _xmp_for(xmp, width=q.shape[1], height=q.shape[0], fmt=fmt, warn=left_out.append)
    text = _text_for(text, fmt=fmt, warn=left_out.append)
    stored_gray = q.shape[-1] <= 2 and fmt != "WEBP"  # WebP has no grey mode: Pillow stores RGB
    if icc_profile and _icc_color_space(icc_profile) != (b"GRAY" if stored_gray else b"RGB "):
        # A profile must fit the pixels written (PNG forbids an RGB profile on grey; readers drop
        # it): a grey result of a grey palette PNG with an sRGB profile is written without it.
        if fmt == "WEBP" and _icc_color_space(icc_profile) == b"GRAY":  # the source's own profile
            left_out.append("its grey ICC profile does not fit the RGB pixels WebP stores; written without it")
        icc_profile = None
    if dpi and fmt == "WEBP":
        left_out.append(f"WebP holds no resolution; written without its {max(dpi):,.0f} dpi")
        dpi = None
    if dpi and fmt == "JPEG" and max(dpi) > _JPEG_MAX_DPI:
        left_out.append(f"a resolution of {max(dpi):,.0f} dpi does not fit a JPEG (at most {_JPEG_MAX_DPI:,}); "
                        "written without it (PNG keeps it)")
        dpi = None

    def write(tmp: Path) -> None:
        if bit_depth == 16:
            _write_png16(tmp, q, icc_profile, exif, dpi, _png_text_chunks(xmp, text))
            return
        modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
        im = Image.fromarray(q[..., 0] if q.shape[-1] == 1 else q, mode=modes[q.shape[-1]])
        kw: dict = {}
        if icc_profile:
            kw["icc_profile"] = icc_profile
        if exif:
            kw["exif"] = exif
        if dpi:
            kw["dpi"] = dpi
        if fmt == "PNG" and (xmp or text):
            kw["pnginfo"] = PngImagePlugin.PngInfo()
            for kind, data in _png_text_chunks(xmp, text):
                kw["pnginfo"].add(kind, data)
        elif xmp:
            kw["xmp"] = xmp
        if fmt == "JPEG" and text:
            kw["comment"] = text["Comment"].encode("utf-8")  # (its length checked by _text_for)
        if fmt in ("JPEG", "WEBP"):
            kw["quality"] = quality
        if fmt == "JPEG" and quality >= JPEG_FULL_CHROMA_QUALITY:
            # Pillow's default 4:2:0 halves the colour's resolution, at any quality: the colour
            # detail the upscale just made; 4:4:4 at the high qualities people pick to keep it
            kw["subsampling"] = 0
        im.save(tmp, format=fmt, **kw)

    atomic_write(p, write)
    for message in left_out:
        if warn is not None:
            warn(message)
        else:
            warnings.warn(f"{p.name}: {message}", stacklevel=2)
    return p


# From this JPEG quality up (the CLI's default 95 included) the colour is stored at full
# resolution (4:4:4) rather than Pillow's 4:2:0; below it, where size matters, it is halved.
JPEG_FULL_CHROMA_QUALITY = 90

# Pixels quantised per band of rows: the float64 copies of the whole picture took 5x its own
# float32 size (1.3 GiB extra for a 4096 px RGBA 8-bit save; banded: 0.2 GiB).
_QUANTISE_BAND_PIXELS = 1 << 20


def _quantised(color: torch.Tensor, alpha: Optional[torch.Tensor], grayscale: bool, bit_depth: int) -> np.ndarray:
    """``color`` ``[1 or 3, H, W]`` (and ``alpha`` ``[1, H, W]``) in [0, 1] as the ``[H, W, C]``
    uint8/uint16 levels to write: grey as its luma when ``grayscale``, else RGB; refuses NaN and
    infinities. The arithmetic is torch's (multi-threaded: numpy's clip/multiply/floor took 1.8 s
    of a 4096 px save here, torch 0.3 s), in float64, exact for float32 inputs, a band of rows
    at a time."""
    h, w = color.shape[-2:]
    channels = (1 if grayscale else 3) + (alpha is not None)
    out = np.empty((h, w, channels), np.uint16 if bit_depth == 16 else np.uint8)
    levels = 65535 if bit_depth == 16 else 255
    band = max(1, _QUANTISE_BAND_PIXELS // max(1, w))
    for top in range(0, h, band):
        c = color[:, top:top + band].to(torch.float64)
        if grayscale and c.shape[0] == 3:
            c = luma(c[None])[0]
        elif not grayscale and c.shape[0] == 1:
            c = c.expand(3, -1, -1)
        if alpha is not None:
            c = torch.cat([c, alpha[:, top:top + band].to(torch.float64)])
        if not bool(torch.isfinite(c).all()):
            raise ValueError("the image contains NaN or infinite values; refusing to write a broken image (this "
                             "usually means the model ran in a precision that overflowed: try float32 or bfloat16)")
        # floor(x + 0.5): round half up (round-half-to-even would bias mid levels). clamp makes
        # the copy the in-place steps then work on, so the caller's tensor is never touched.
        q = torch.clamp(c, 0.0, 1.0).mul_(levels).add_(0.5).floor_()
        out[top:top + band] = q.to(torch.int32).permute(1, 2, 0).numpy()
    return out


def _as_chw(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[1, C, H, W]``, ``[C, H, W]`` or ``[H, W]`` (tensor or array) -> CPU ``[C, H, W]`` in its
    own floating dtype (no copy where it is one already)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{name} holds a batch of {x.shape[0]} images; save them one at a "
                             f"time ({name}[i:i+1])")
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [1, C, H, W], [C, H, W] or [H, W] (got {tuple(x.shape)})")
    x = x.detach().to("cpu")
    return x if x.is_floating_point() else x.to(torch.float64)


# A JPEG holds its EXIF in one APP1 segment: 65,535 bytes less its length field and the marker.
_JPEG_MAX_EXIF_BYTES = 65533
# JFIF's density fields are 16 bits (a microscope's 254,000 dpi would wrap around).
_JPEG_MAX_DPI = 65535


def _icc_color_space(icc_profile: bytes) -> bytes:
    """The data colour space an ICC profile's header names (bytes 16-19: ``b"RGB "``, ``b"GRAY"``...)."""
    return bytes(icc_profile[16:20])


def _exif_for(exif: Optional[bytes], width: int, height: int, fmt: str, warn: Callable[[str], None]
              ) -> Optional[bytes]:
    """``exif`` with the pixel size of the image being written (when it records one)."""
    if not exif:
        return None
    try:
        out = _exif.with_pixel_size(exif, width, height)
    except _exif.ExifError as e:
        warn(f"the EXIF given cannot be read ({e}); written without it")
        return None
    if out is None:
        return None
    if fmt == "JPEG" and len(out) > _JPEG_MAX_EXIF_BYTES:
        warn(f"the EXIF metadata ({len(out):,} bytes) does not fit a JPEG (64 KiB); "
             "written without it (PNG and WebP keep it)")
        return None
    return out


# A JPEG holds its XMP in one APP1 segment after the 29-byte namespace header (Adobe XMP part 3),
# its comment in one COM segment.
_JPEG_MAX_XMP_BYTES = 65504
_JPEG_MAX_COMMENT_BYTES = 65533


def _xmp_for(xmp: Optional[bytes | str], width: int, height: int, fmt: str, warn: Callable[[str], None]
             ) -> Optional[bytes]:
    """``xmp`` for the image being written (its pixel size, a new instance id), or None."""
    if not xmp:
        return None
    try:
        out = _xmp.for_written_image(xmp, width, height)  # (a str is taken as UTF-8)
    except _xmp.XmpError as e:
        warn(f"the XMP given cannot be read ({e}); written without it")
        return None
    if out is not None and fmt == "JPEG" and len(out) > _JPEG_MAX_XMP_BYTES:
        warn(f"the XMP metadata ({len(out):,} bytes) does not fit a JPEG (65,504 bytes; "
             "extended XMP is not written); written without it (PNG and WebP keep it)")
        return None
    return out


def _text_for(text: Optional[dict[str, str]], fmt: str, warn: Callable[[str], None]) -> dict[str, str]:
    """The entries of ``text`` that ``fmt`` can hold (PNG: all; JPEG: the comment), warning about
    the others; raises ValueError for a keyword PNG does not allow."""
    if not text:
        return {}
    for key, value in text.items():
        if not (isinstance(key, str) and 1 <= len(key) <= 79 and key == key.strip() and "  " not in key
                and all(32 <= ord(c) <= 126 or 161 <= ord(c) <= 255 for c in key)):
            raise ValueError(f"text keyword {key!r} is not a PNG keyword (1-79 Latin-1 letters, digits, "
                             f"punctuation or single inner spaces)")
        if not isinstance(value, str):
            raise ValueError(f"text[{key!r}] must be a str (got {type(value).__name__})")
    kept = dict(text) if fmt == "PNG" else {k: v for k, v in text.items() if fmt == "JPEG" and k == "Comment"}
    left = [k for k in text if k not in kept]
    if left:
        warn(f"{_FORMAT_NAMES[fmt]} has no place for the text {', '.join(left)}; written without it "
             f"(PNG keeps it)")
    if "Comment" in kept and fmt == "JPEG" and len(kept["Comment"].encode("utf-8")) > _JPEG_MAX_COMMENT_BYTES:
        warn(f"the comment ({len(kept.pop('Comment').encode('utf-8')):,} bytes) does not "
             "fit a JPEG (65,533 bytes); written without it (PNG keeps it)")
    return kept


def _png_text_chunks(xmp: Optional[bytes], text: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """PNG chunks ``(kind, data)`` for the XMP packet (iTXt ``XML:com.adobe.xmp``, uncompressed as
    Adobe's XMP specification asks) and the text: tEXt where Latin-1 holds it, else iTXt
    (UTF-8); long values compressed."""
    chunks = []
    if xmp:
        chunks.append((b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp))
    for key, value in text.items():
        keyword = key.encode("latin-1")
        big = len(value) > 1024
        try:
            latin = value.encode("latin-1")
        except UnicodeEncodeError:
            body = value.encode("utf-8")
            chunks.append((b"iTXt", keyword + (b"\x00\x01\x00" if big else b"\x00\x00\x00") + b"\x00\x00"
                           + (zlib.compress(body) if big else body)))
            continue
        chunks.append((b"zTXt", keyword + b"\x00\x00" + zlib.compress(latin)) if big
                      else (b"tEXt", keyword + b"\x00" + latin))
    return chunks


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _write_png16(path: Path, q: np.ndarray, icc_profile: Optional[bytes] = None, exif: Optional[bytes] = None,
                 dpi: Optional[tuple[float, float]] = None,
                 extra_chunks: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Write ``q`` (uint16 ``[H, W, C]``, C in 1..4) as a 16-bit PNG (PNG spec, ISO 15948), with
    the colour profile, EXIF (``eXIf``: the TIFF-structured data, without JPEG's ``Exif`` prefix),
    resolution (``pHYs``, in pixels per metre) and ``extra_chunks`` (``(kind, data)``) when given.

    Rows use the "Up" filter (byte-wise difference to the row above), which is exact, fully
    vectorised and compresses smooth photos well. They are filtered and compressed a band at a
    time (four whole-picture copies took 3x the picture's float32 size).
    """
    h, w, c = q.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    head = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc_profile:
        head.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    if dpi:
        x, y = (max(1, round(v / 0.0254)) for v in dpi)
        head.append(_png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1)))
    if exif:
        head.append(_png_chunk(b"eXIf", exif.removeprefix(_exif.EXIF_PREFIX)))
    head.extend(_png_chunk(kind, data) for kind, data in extra_chunks)
    band = max(1, _QUANTISE_BAND_PIXELS // max(1, w))
    deflate, above = zlib.compressobj(6), None
    with open(path, "wb") as f:
        for part in head:
            f.write(part)
        for top in range(0, h, band):  # one IDAT chunk per band (PNG allows any number in a row)
            data = np.ascontiguousarray(q[top:top + band].astype(">u2")).view(np.uint8).reshape(-1, w * c * 2)
            rows = np.empty((data.shape[0], 1 + data.shape[1]), np.uint8)
            rows[:, 0] = 2  # the Up filter
            rows[:, 1:] = data
            rows[1:, 1:] -= data[:-1]  # uint8 arithmetic wraps modulo 256, as the PNG filter requires
            if above is not None:
                rows[0, 1:] -= above
            above = data[-1].copy()
            piece = deflate.compress(rows)
            if piece:
                f.write(_png_chunk(b"IDAT", piece))
        f.write(_png_chunk(b"IDAT", deflate.flush()))
        f.write(_png_chunk(b"IEND", b""))


# --- sizes, resize, pad, crop ------------------------------------------------------------------

def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def target_size(h: int, w: int, scale: Optional[float] = None, long_side: Optional[int] = None,
                megapixels: Optional[float] = None,
                max_output_pixels: Optional[int] = DEFAULT_MAX_OUTPUT_PIXELS) -> tuple[int, int]:
    """The output ``(H, W)`` for an ``h x w`` input.

    Give at most one of ``scale`` (factor), ``long_side`` (pixels of the longer side) or
    ``megapixels`` (output area in millions of pixels, aspect kept); with none, ``scale`` is
    FluxSR's default 4. Sides are rounded to the nearest pixel (at least 1). An output above
    ``max_output_pixels`` (``None``: no limit) raises :class:`OutputTooLargeError`, whose advice
    is in the terms the size was asked in: the largest scale, long side or megapixels that fit.
    """
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise ValueError(f"image {name} must be a positive integer (got {v!r})")
    h, w = int(h), int(w)
    given = [n for n, v in (("scale", scale), ("long_side", long_side),
                            ("megapixels", megapixels)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of scale, long_side, megapixels (got {', '.join(given)})")
    if long_side is not None:
        if isinstance(long_side, bool) or int(long_side) != long_side or long_side <= 0:
            raise ValueError(f"long_side must be a positive integer (got {long_side!r})")
    elif megapixels is not None:
        if not (math.isfinite(megapixels) and megapixels > 0):
            raise ValueError(f"megapixels must be a positive number (got {megapixels!r})")
    else:
        scale = DEFAULT_SCALE if scale is None else float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number (got {scale!r})")
    H, W = _size_for(h, w, scale, long_side, megapixels)
    if max_output_pixels is not None and H * W > int(max_output_pixels):
        limit = int(max_output_pixels)
        fit_scale = _largest_scale_within(h, w, limit)
        fit_long_side = _largest_long_side_within(h, w, limit)
        fit_megapixels = _largest_megapixels_within(h, w, limit)
        if long_side is not None:
            lower = f"Lower the long side (at most {fit_long_side} px for this {w}x{h} input)"
        elif megapixels is not None:
            lower = f"Lower the megapixels (at most {fit_megapixels:g} MP for this {w}x{h} input)"
        else:
            lower = f"Lower the scale (at most {fit_scale:g}x for this {w}x{h} input)"
        asked, allowed = _megapixels_text(H * W), _megapixels_text(limit)
        if asked == allowed:  # 67.1 more than 67.1: exact pixel counts instead
            asked, allowed = f"{H * W:,} pixels, {asked}", f"{limit:,} pixels, {allowed}"
        raise OutputTooLargeError(
            f"the output would be {W}x{H} = {asked} megapixels, more than the limit of "
            f"{allowed} MP (max_output_pixels={limit}). {lower} or raise the limit "
            f"(fluxsr upscale --max-output-megapixels) if this machine has the memory.",
            size=(H, W), input_size=(h, w), max_scale=fit_scale, max_long_side=fit_long_side,
            max_megapixels=fit_megapixels)
    return H, W


def _size_for(h: int, w: int, scale: Optional[float] = None, long_side: Optional[int] = None,
              megapixels: Optional[float] = None) -> tuple[int, int]:
    """The output ``(H, W)`` for one (checked) size request, without the limit."""
    if long_side is not None:
        s = int(long_side) / max(h, w)
        return (int(long_side) if h >= w else max(1, _round(h * s)),
                int(long_side) if w >= h else max(1, _round(w * s)))
    s = math.sqrt(megapixels * 1e6 / (h * w)) if megapixels is not None else float(scale)
    return max(1, _round(h * s)), max(1, _round(w * s))


def _fits(size: tuple[int, int], max_pixels: int) -> bool:
    return size[0] * size[1] <= max_pixels


def _megapixels_text(pixels: int) -> str:
    """Megapixels as a size limit is read: one decimal, more digits only where that would say 0.0."""
    return f"{pixels / 1e6:.1f}" if pixels >= 50_000 else f"{pixels / 1e6:.3g}"


def _largest_scale_within(h: int, w: int, max_pixels: int) -> float:
    """The largest scale with two decimals (two significant digits below 0.1) whose output (sides
    rounded as above) fits ``max_pixels``: advice a user can type back in and have accepted."""
    raw = math.sqrt(max_pixels / (h * w))
    decimals = max(2, 1 - math.floor(math.log10(raw)))
    step = 10.0 ** -decimals
    scale = round(math.floor(raw / step) * step, decimals)
    while scale > step and not _fits(_size_for(h, w, scale=scale), max_pixels):
        scale = round(scale - step, decimals)
    while True:  # the sides are rounded: a little more may still fit
        larger = round(scale + step, decimals)
        if larger == scale or not _fits(_size_for(h, w, scale=larger), max_pixels):  # (== : past float precision)
            return scale
        scale = larger


def _largest_long_side_within(h: int, w: int, max_pixels: int) -> int:
    """The largest long side (pixels) whose output fits ``max_pixels`` (the area grows with the
    long side, so a bisection finds it; a 1 px long side always fits)."""
    fits, too_big = 1, max_pixels + 1  # the short side is at least 1 px, so this one cannot fit
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        if _fits(_size_for(h, w, long_side=middle), max_pixels):
            fits = middle
        else:
            too_big = middle
    return fits


def _largest_megapixels_within(h: int, w: int, max_pixels: int) -> float:
    """The largest megapixels with three significant digits whose output (sides rounded) fits
    ``max_pixels``; the next such value does not fit. (Rounding the sides may overshoot or fall
    short of the area asked for, so the threshold is searched for, not computed.)"""
    def fits(megapixels: float) -> bool:
        return _fits(_size_for(h, w, megapixels=megapixels), max_pixels)

    # The output area grows with the megapixels asked for, and a 1x1 output always fits.
    below, above = 0.0, max_pixels / 1e6
    while fits(above):
        below, above = above, above * 2
    for _ in range(80):
        middle = (below + above) / 2
        below, above = (middle, above) if fits(middle) else (below, middle)
    decimals = 2 - math.floor(math.log10(below))

    def typed(value: float) -> float:  # as a user would type it back in
        return float(f"{value:.{max(decimals, 0)}f}")

    step = 10.0 ** -decimals
    best = typed(math.floor(below / step) * step)
    while fits(typed(best + step)):  # the search stopped just short of a value that fits
        best = typed(best + step)
    return best


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` grey by Rec. 601 weights: how a grey input's upscale
    becomes grey again (the model may tint it a little)."""
    return rgb[:, 0:1] * _LUMA[0] + rgb[:, 1:2] * _LUMA[1] + rgb[:, 2:3] * _LUMA[2]


# Channels this close everywhere make a grey picture: a colour-managed grey scan differs by a
# level here and there, which the eye never sees (the model's tint, tens of levels, it does).
GRAY_TOLERANCE = 2 / 255


def is_gray(rgb: torch.Tensor) -> bool:
    """True when the three channels of ``[B, 3, H, W]`` agree everywhere to within
    :data:`GRAY_TOLERANCE`: a grey picture in RGB (ComfyUI's LoadImage makes every picture RGB)."""
    if rgb.shape[1] != 3:
        return False
    limit = GRAY_TOLERANCE + 1e-6  # a level's float rounding
    return bool((rgb.amax(dim=1) - rgb.amin(dim=1)).max() <= limit)


def resize(image: torch.Tensor, size: Sequence[int], kind: str = "bicubic",
           clamp: bool = True) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size = (h, w)``: the one resize FluxSR uses everywhere.

    ``kind``: ``bicubic`` (default), ``bilinear``, ``area`` or ``nearest`` (pixel-centre exact).
    Bicubic and bilinear are antialiased on a side that shrinks (only there), so downscaling
    does not alias (training's LR->HR round trips and the upscaler's inputs go through the same
    kernel).
    ``clamp`` keeps the result in ``[0, 1]`` (bicubic overshoots at edges). Computed in float32;
    returned in the input's dtype. The same size returns the input (clamped).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"resize expects a [B, C, H, W] tensor (got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)})")
    if not image.is_floating_point():
        raise ValueError(f"resize expects a float image in [0, 1] (got {image.dtype}); "
                         f"divide integer images by their maximum first")
    if kind not in RESIZE_KINDS:
        raise ValueError(f"unknown resize kind '{kind}'; choose one of {', '.join(RESIZE_KINDS)}")
    h, w = (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"resize target must be positive (got {h}x{w})")
    H, W = image.shape[-2:]
    if (h, w) == (H, W):
        return image.clamp(0.0, 1.0) if clamp else image
    x = image.float()
    if kind in ("bicubic", "bilinear"):
        def interpolate(t: torch.Tensor, to: tuple[int, int], antialias: bool) -> torch.Tensor:
            return F.interpolate(t, size=to, mode=kind, align_corners=False, antialias=antialias)

        if (h < H and w > W) or (h > H and w < W):
            # One side shrinks, the other grows: each its own kernel. Antialiasing (another
            # bicubic, a = -0.5) would otherwise apply to the growing side too.
            x = interpolate(x, (h, W), True) if h < H else interpolate(x, (H, w), True)
            out = interpolate(x, (h, w), False)
        else:
            out = interpolate(x, (h, w), h < H or w < W)
    elif kind == "nearest":
        out = F.interpolate(x, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(h, w), mode="area")
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(image.dtype)


def pad_to_multiple(image: torch.Tensor, multiple: int = 16, mode: str = "reflect"
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[B, C, H, W]`` at the bottom and right so both sides are multiples of ``multiple``.

    Returns ``(padded, (pad_bottom, pad_right))``; :func:`crop` undoes it. ``mode``: ``reflect``
    (default: mirrors content so the model sees no artificial edge), ``replicate`` or
    ``constant`` (zeros). Reflection needs the pad to be smaller than the side; for tiny images
    that side falls back to ``replicate``.
    """
    if image.ndim != 4:
        raise ValueError(f"pad_to_multiple expects [B, C, H, W] (got {tuple(image.shape)})")
    if int(multiple) <= 0:
        raise ValueError(f"multiple must be positive (got {multiple})")
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode '{mode}'; choose one of {', '.join(PAD_MODES)}")
    H, W = image.shape[-2:]
    pb, pr = (-H) % multiple, (-W) % multiple
    out = image
    for pad, size, spec in ((pb, H, (0, 0, 0, pb)), (pr, W, (0, pr, 0, 0))):
        if pad == 0:
            continue
        m = mode
        if m == "reflect" and pad >= size:
            m = "replicate"
        out = F.pad(out, spec, mode=m) if m != "constant" else F.pad(out, spec, value=0.0)
    return out, (pb, pr)


def crop(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The top-left ``h x w`` of ``[..., H, W]`` (undoes :func:`pad_to_multiple`)."""
    H, W = image.shape[-2:]
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"cannot crop {h}x{w} out of an image of {H}x{W}")
    return image[..., :h, :w]


def fill_transparent(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``rgb`` ``[B, 3, H, W]`` with the colour under fully transparent pixels (``alpha`` ``[B, 1,
    H, W]`` 0) replaced by the visible colours spread out from the edges; pixels with any alpha
    keep theirs. What a file keeps under alpha 0 (black, a palette's key colour) is no picture:
    resized and fed to the model as it is, it bleeds into the edges the upscale makes
    semi-transparent (a red sprite on black got a dark ring, red 0.76 over white).

    Pull-push, ours (no library here does it on tensors): alpha-weighted means over ever coarser
    grids, each cell 3x3 of the finer level's at stride 2 (overlapping, so a hole's coarse cell
    holds the visible pixels next to it), then from the coarsest back down, each level's holes
    filled from the one above (bilinear): near an edge the colour is the nearby visible one's,
    farther out a smooth blend, reaching any hole. Computed in float32 (the weights shrink by 9
    a level: fp16 would lose them), image by image; an image transparent everywhere is returned
    as it is. Returned in ``rgb``'s dtype."""
    out = []
    for one_rgb, one_alpha in zip(rgb.split(1), alpha.split(1)):
        weight = one_alpha.float().clamp(0, 1)
        visible = weight > 0
        if bool(visible.all()) or not bool(visible.any()):
            out.append(one_rgb)
            continue
        levels = [(one_rgb.float() * weight, weight)]
        while max(levels[-1][1].shape[-2:]) > 1:
            colour, w = levels[-1]
            levels.append((F.avg_pool2d(colour, 3, 2, 1), F.avg_pool2d(w, 3, 2, 1)))
        filled = None
        for colour, w in reversed(levels):
            mean = colour / w.clamp_min(1e-30)
            if filled is not None:
                coarse = F.interpolate(filled, size=tuple(w.shape[-2:]), mode="bilinear", align_corners=False)
                mean = torch.where(w > 0, mean, coarse)
            filled = mean
        out.append(torch.where(visible, one_rgb.float(), filled).to(rgb.dtype))
    return torch.cat(out)


def upscale_alpha(alpha: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an alpha channel ``[B, 1, H, W]`` apart from the colour (the model never sees it),
    with the same bicubic kernel as :func:`resize`, clamped to ``[0, 1]``."""
    if alpha.ndim != 4 or alpha.shape[1] != 1:
        raise ValueError(f"alpha must be [B, 1, H, W] (got {tuple(alpha.shape)})")
    return resize(alpha, size, "bicubic", clamp=True)


# --- ComfyUI layout --------------------------------------------------------------------------

def bhwc_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` -> ``[B, C, H, W]`` (contiguous)."""
    if image.ndim != 4:
        raise ValueError(f"expected [B, H, W, C] (got {tuple(image.shape)})")
    return image.permute(0, 3, 1, 2).contiguous()


def bchw_to_bhwc(image: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ComfyUI IMAGE ``[B, H, W, C]`` (contiguous)."""
    if image.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] (got {tuple(image.shape)})")
    return image.permute(0, 2, 3, 1).contiguous()

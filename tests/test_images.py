"""Tests for fluxsr_core.images: every input mode, 16-bit fidelity, errors, atomic saving,
resize/pad/crop and the output-size arithmetic."""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fluxsr_core import images as I
from fluxsr_core.images import (
    EmptyImageFileError, ImageFileError, ImageNotFoundError, ImageTooLargeError, NotAnImageError,
    OutputTooLargeError, TruncatedImageError, bchw_to_bhwc, bhwc_to_bchw, crop, load_image,
    pad_to_multiple, resize, save_image, target_size, upscale_alpha,
)


# --- helpers ---------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _filter_rows(data: np.ndarray, bpp: int) -> bytes:
    """PNG-encode rows with every filter type in turn (None, Sub, Up, Average, Paeth), so the
    decoder is exercised on all of them (libpng's adaptive filtering mixes them per row)."""
    h, n = data.shape
    x = data.astype(np.int32)
    out = []
    for r in range(h):
        row = x[r]
        up = x[r - 1] if r else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        ftype = r % 5
        if ftype == 0:
            f = row
        elif ftype == 1:
            f = row - left
        elif ftype == 2:
            f = row - up
        elif ftype == 3:
            f = row - (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
            f = row - pred
        out.append(bytes([ftype]) + (f % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def write_png16_all_filters(path, arr: np.ndarray, exif: bytes | None = None) -> None:
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    data = arr.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    parts = [b"\x89PNG\r\n\x1a\n",
             _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if exif is not None:
        parts.append(_chunk(b"eXIf", exif))
    parts += [_chunk(b"IDAT", zlib.compress(_filter_rows(data, 2 * c))), _chunk(b"IEND", b"")]
    Path(path).write_bytes(b"".join(parts))


def u16(t: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] float -> uint16 HxWxC by exact rounding."""
    return np.round(t[0].permute(1, 2, 0).double().numpy() * 65535).astype(np.uint16)


def u8(t: torch.Tensor) -> np.ndarray:
    return np.round(t[0].permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)


def exif_with_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- loading: modes --------------------------------------------------------------------------

def test_rgb8_png_exact(tmp_path, rng):
    a = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    li = load_image(tmp_path / "a.png")
    assert li.rgb.shape == (1, 3, 9, 13) and li.rgb.dtype == torch.float32
    assert li.alpha is None and li.bit_depth == 8 and not li.grayscale and li.source_mode == "RGB"
    assert np.array_equal(u8(li.rgb), a)
    assert li.path.endswith("a.png") and li.size == (9, 13)


def test_rgb16_png_keeps_16_bits_all_filters(tmp_path, rng):
    a = rng.integers(0, 65536, (11, 7, 3), dtype=np.uint16)
    write_png16_all_filters(tmp_path / "a.png", a)
    # What plain Pillow gives: high bytes only (why images.py decodes twice).
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), (a >> 8).astype(np.uint8))
    li = load_image(tmp_path / "a.png")
    assert li.bit_depth == 16 and not li.grayscale and li.alpha is None
    assert np.array_equal(u16(li.rgb), a)


def test_rgba16_and_la16_png_keep_16_bits(tmp_path, rng):
    a = rng.integers(0, 65536, (6, 10, 4), dtype=np.uint16)
    write_png16_all_filters(tmp_path / "rgba.png", a)
    li = load_image(tmp_path / "rgba.png")
    assert li.bit_depth == 16 and np.array_equal(u16(li.rgb), a[..., :3])
    assert np.array_equal(u16(li.alpha), a[..., 3:])

    la = rng.integers(0, 65536, (6, 10, 2), dtype=np.uint16)
    write_png16_all_filters(tmp_path / "la.png", la)
    li = load_image(tmp_path / "la.png")
    assert li.bit_depth == 16 and li.grayscale
    assert np.array_equal(u16(li.rgb), np.repeat(la[..., :1], 3, axis=-1))
    assert np.array_equal(u16(li.alpha), la[..., 1:])


def test_gray16_png(tmp_path, rng):
    a = rng.integers(0, 65536, (8, 5), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")  # Pillow writes I;16 as 16-bit gray PNG
    li = load_image(tmp_path / "g.png")
    assert li.grayscale and li.bit_depth == 16 and li.source_mode.startswith("I;16")
    assert np.array_equal(u16(li.rgb)[..., 0], a) and np.array_equal(u16(li.rgb)[..., 2], a)


def test_rgb16_tiff_keeps_16_bits(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    a = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    for comp in (None, "zlib"):
        for order in ("<", ">"):
            f = tmp_path / f"t_{comp}_{order == '<'}.tif"
            tifffile.imwrite(f, a, photometric="rgb", compression=comp, byteorder=order)
            li = load_image(f)
            assert li.bit_depth == 16 and np.array_equal(u16(li.rgb), a), (comp, order)


def test_16bit_tiffs_pillow_misreads_are_read_right_or_refused(tmp_path, rng):
    """Planar 16-bit TIFFs loaded as garbage colours (Pillow decodes their planes as 8-bit);
    16-bit MinIsWhite grey came out as a negative; 16-bit premultiplied alpha fell to 8 bits."""
    tifffile = pytest.importorskip("tifffile")
    a = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate")
    for check in (load_image, I.probe_image):  # the probe refuses it before any model loads
        with pytest.raises(ImageFileError, match=r"planar.tif' is a 16-bit TIFF stored one plane per channel"):
            check(tmp_path / "planar.tif")
    grey = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "white0.tif", grey, photometric="miniswhite")
    li = load_image(tmp_path / "white0.tif")
    assert li.bit_depth == 16 and np.array_equal(u16(li.rgb)[..., 0], 65535 - grey)
    straight = rng.integers(0, 65536, (5, 6, 3)).astype(np.float64)
    alpha = rng.integers(1, 65536, (5, 6)).astype(np.float64)
    alpha[0, 0] = 0
    stored = np.dstack([np.round(straight * alpha[..., None] / 65535), alpha]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "assoc.tif", stored, photometric="rgb", extrasamples=["assocalpha"])
    li = load_image(tmp_path / "assoc.tif")
    assert li.bit_depth == 16 and np.array_equal(u16(li.alpha)[..., 0], alpha.astype(np.uint16))
    rgb = li.rgb[0].permute(1, 2, 0).double().numpy() * 65535
    seen = alpha > 2000  # where the stored premultiplied values keep enough precision to compare
    assert np.abs(rgb - straight)[seen].max() < 65535 / alpha[seen].min() and (rgb[0, 0] == 0).all()


def test_float_tiff_overshoot_clipped(tmp_path):
    """0..1 floats a little past either end (resampling/sharpening overshoot) are clipped, with a note."""
    a = np.array([[-0.05, 0.25], [0.75, 1.08]], np.float32)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    li = load_image(tmp_path / "f.tif")
    assert li.grayscale and li.bit_depth == 16 and li.source_mode == "F"
    assert torch.allclose(li.rgb[0, 1], torch.tensor([[0.0, 0.25], [0.75, 1.0]]))
    assert any("clipped" in n for n in li.notes)
    Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), mode="F").save(tmp_path / "in.tif")
    assert load_image(tmp_path / "in.tif").notes == []  # 0..1 as it should be: nothing to say


def test_float_tiff_holding_0_255_is_read_as_8bit_values(tmp_path):
    """8-bit data saved as float (0..255) is divided by 255 and says so, instead of coming out white."""
    a = np.arange(0, 256, 17, dtype=np.float32).reshape(4, 4)
    Image.fromarray(a, mode="F").save(tmp_path / "f255.tif")
    li = load_image(tmp_path / "f255.tif")
    assert li.bit_depth == 8  # 8-bit values: written back as 8-bit, not 16
    assert torch.allclose(li.rgb[0, 0], torch.from_numpy(a / 255), atol=1e-6)
    assert float(li.rgb.max()) == 1.0 and float(li.rgb.min()) == 0.0
    assert len(li.notes) == 1 and "divided by 255" in li.notes[0] and "f255.tif" in li.notes[0]
    # NaN stays black, +inf is the brightest value of the file's range (not 1/255)
    b = a.copy()
    b[0, 0], b[0, 1] = np.nan, np.inf
    Image.fromarray(b, mode="F").save(tmp_path / "fnan.tif")
    li = load_image(tmp_path / "fnan.tif")
    assert li.rgb[0, 0, 0, :3].tolist() == [0.0, 1.0, pytest.approx(34 / 255)]
    assert any("NaN" in n for n in li.notes) and any("divided by 255" in n for n in li.notes)


def test_float_tiff_of_resampled_8bit_values_is_read_as_0_255(tmp_path, rng):
    """8-bit values that went through float resampling are no longer whole numbers, but most pixels
    are far above 1: still 0..255."""
    a = (rng.random((16, 16)) * 255).astype(np.float32)
    a[0, 0] = 0.4  # a few dark pixels below 1 change nothing
    Image.fromarray(a, mode="F").save(tmp_path / "r.tif")
    li = load_image(tmp_path / "r.tif")
    assert li.bit_depth == 8 and any("divided by 255" in n for n in li.notes)
    assert torch.allclose(li.rgb[0, 0], torch.from_numpy(a / np.float32(255)), atol=1e-6)


def test_float_tiff_with_hdr_highlights_is_refused_not_read_as_0_255(tmp_path, rng):
    """A 0..1 picture with a small patch of highlights at 4.0: the maximum says "above 2", but the
    values are fractional and almost all at most 1, so reading it as 0..255 (a black picture) is
    wrong; it is refused with advice to tone-map."""
    a = rng.random((40, 40)).astype(np.float32) * np.float32(0.9) + np.float32(0.01)
    a[:4, :4] = 4.0
    Image.fromarray(a, mode="F").save(tmp_path / "hdr.tif")
    with pytest.raises(I.FloatRangeError, match=r"hdr.tif.*HDR.*highlights.*1.00% of the values are above 1.1"
                                                r".*whole numbers.*black.*[Tt]one-map it to 0..1") as exc:
        load_image(tmp_path / "hdr.tif")
    assert f"{float(a.min()):.4g} to 4" in str(exc.value)
    # the same picture as whole numbers up to 255 (8-bit values stored as float): 0..255, as documented
    Image.fromarray(np.round(a / 4 * 255), mode="F").save(tmp_path / "whole.tif")
    li = load_image(tmp_path / "whole.tif")
    assert li.bit_depth == 8 and float(li.rgb.max()) == 1.0 and any("divided by 255" in n for n in li.notes)


def test_float32_maximum_of_1_1_is_within_the_10_percent(tmp_path):
    """float32(1.1) is 1.10000002 in float64: "give or take 10%" accepts it (clipped, with a note),
    and float32(-0.1) at the other end too; a little further out is still refused."""
    a = np.array([[-0.1, 0.25], [0.75, 1.1]], np.float32)
    assert float(a.max()) > 1.1
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    li = load_image(tmp_path / "f.tif")
    assert li.rgb[0, 0].tolist() == [[0.0, 0.25], [0.75, 1.0]]
    assert any("clipped" in n for n in li.notes)
    Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.1001]], np.float32), mode="F").save(tmp_path / "g.tif")
    with pytest.raises(I.FloatRangeError, match="neither 0..1"):
        load_image(tmp_path / "g.tif")


@pytest.mark.parametrize("values,hint", [
    ([-1.0, -0.3, 0.4, 1.0], r"\(x \+ 1\) / 2"),   # a -1..1 network output
    ([0.0, 0.2, 40.0, 900.0], "HDR"),                 # far above 255
    ([0.0, 0.3, 0.9, 1.6], "neither 0..1"),           # too far above 1 for overshoot, too low for 0..255
    ([-60.0, 0.0, 100.0, 255.0], "negative"),         # 0..255 with far negative values
])
def test_float_tiff_in_another_range_is_refused(tmp_path, values, hint):
    """Clipping these would ruin them (white, or black); the error names the range and what to do."""
    Image.fromarray(np.array(values, np.float32).reshape(2, 2), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(I.FloatRangeError, match=hint) as exc:
        load_image(tmp_path / "f.tif")
    msg = str(exc.value)
    assert "f.tif" in msg and f"{min(values):.4g} to {max(values):.4g}" in msg
    assert isinstance(exc.value, ImageFileError)


def test_float_tiff_without_finite_values_is_refused(tmp_path):
    Image.fromarray(np.full((2, 2), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(I.FloatRangeError, match="nan.tif.*no finite values"):
        load_image(tmp_path / "nan.tif")


def test_float_colour_tiff_error_says_what_pillow_reads(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "rgb32f.tif", np.zeros((4, 5, 3), np.float32), photometric="rgb")
    with pytest.raises(NotAnImageError, match="rgb32f.tif.*float.*one channel.*16-bit"):
        load_image(tmp_path / "rgb32f.tif")
    # the same hint fits integer colour and half-float TIFFs, which Pillow cannot open either
    tifffile.imwrite(tmp_path / "rgb32i.tif", np.zeros((4, 5, 3), np.int32), photometric="rgb")
    tifffile.imwrite(tmp_path / "half.tif", np.zeros((4, 5), np.float16))
    for name in ("rgb32i.tif", "half.tif"):
        with pytest.raises(NotAnImageError, match="32-bit samples .float or integer.*16- or 64-bit floats"):
            load_image(tmp_path / name)


# 32-bit integer samples (Pillow mode "I"): 8-bit values in a 32-bit container are common, a 16-bit
# image this dark is not; 16-bit samples are always read as 16-bit, however dark.
INT_8BIT_VALUES = np.array([[0, 17, 128, 255]])


def _int32_tiffs(tmp_path, values):
    """The same values as every 32-bit integer TIFF Pillow opens: signed and unsigned, both byte
    orders Pillow reads, uncompressed and compressed (Pillow's libtiff path), and Pillow's own."""
    tifffile = pytest.importorskip("tifffile")
    files = []
    for dtype, order, comp in (("int32", "<", None), ("int32", ">", None), ("uint32", "<", None),
                               ("int32", "<", "zlib")):
        files.append(tmp_path / f"{dtype}_{'le' if order == '<' else 'be'}_{comp}.tif")
        tifffile.imwrite(files[-1], np.asarray(values).astype(dtype), byteorder=order, compression=comp)
    files.append(tmp_path / "pillow_I.tif")
    Image.fromarray(np.asarray(values, np.int32), mode="I").save(files[-1])
    return files


def test_int32_tiff_holding_0_255_is_read_as_8bit_values(tmp_path):
    for f in _int32_tiffs(tmp_path, INT_8BIT_VALUES):
        li = load_image(f)
        assert li.source_mode == "I" and li.grayscale and li.alpha is None, f.name
        assert li.bit_depth == 8, f.name  # written back as 8-bit
        assert li.rgb[0, 0].tolist() == (INT_8BIT_VALUES.astype(np.float32) / np.float32(255)).tolist(), f.name
        assert np.array_equal(u8(li.rgb)[..., 0], INT_8BIT_VALUES), f.name
        assert len(li.notes) == 1, f.name
        assert f.name in li.notes[0] and "divided by 255" in li.notes[0] and "0 to 255" in li.notes[0]
        assert "16-bit" in li.notes[0]  # says what to do if they are 16-bit values after all


def test_int32_tiff_above_255_is_read_as_16bit(tmp_path):
    values = np.array([[0, 256, 40000, 65535]])
    for f in _int32_tiffs(tmp_path, values):
        li = load_image(f)
        assert li.bit_depth == 16 and np.array_equal(u16(li.rgb)[..., 0], values), f.name
        assert li.notes == [], f.name


def test_dark_16bit_images_stay_16bit_with_a_note(tmp_path):
    """16-bit samples with a maximum of 255 are a dark 16-bit image, whatever Pillow's mode: an
    I;16 PNG, a signed 16-bit TIFF (which Pillow opens as mode I), a 16-bit RGB PNG. They are read
    as they are, and the note says the result will be nearly black and that 8-bit data belongs
    in an 8-bit file. One level brighter, nothing is said."""
    tifffile = pytest.importorskip("tifffile")
    Image.fromarray(INT_8BIT_VALUES.astype(np.uint16)).save(tmp_path / "dark16.png")
    tifffile.imwrite(tmp_path / "dark16s.tif", INT_8BIT_VALUES.astype(np.int16))
    rgb = np.stack([INT_8BIT_VALUES] * 3, axis=-1).astype(np.uint16)
    write_png16_all_filters(tmp_path / "dark16rgb.png", rgb)
    for name, mode in (("dark16.png", "I;16"), ("dark16s.tif", "I"), ("dark16rgb.png", "RGB;16")):
        li = load_image(tmp_path / name)
        assert li.source_mode == mode and li.bit_depth == 16, name
        assert np.array_equal(u16(li.rgb)[..., 0], INT_8BIT_VALUES), name
        assert len(li.notes) == 1 and name in li.notes[0], name
        assert "0 to 255 of 65535" in li.notes[0] and "nearly black" in li.notes[0], name
        assert "save the file as 8-bit" in li.notes[0], name
    Image.fromarray(np.array([[0, 256]], np.uint16)).save(tmp_path / "not_dark.png")
    assert load_image(tmp_path / "not_dark.png").notes == []


@pytest.mark.parametrize("dtype,values,shown,hint", [
    ("int32", [-5, 0, 100, 255], "-5 to 255", "negative"),
    ("int16", [-300, 0, 100, 20000], "-300 to 20000", "negative"),
    ("int32", [0, 10, 70000, 255], "0 to 70000", "above 65535"),
    # Pillow reads unsigned 32-bit samples as signed: 2**32 - 1 must be named as such, not as -1
    ("uint32", [0, 2**31 + 5, 2**32 - 1, 255], "0 to 4294967295", "above 65535"),
])
def test_integer_image_outside_0_65535_is_refused(tmp_path, dtype, values, shown, hint):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "i.tif", np.array([values], dtype))
    with pytest.raises(I.IntegerRangeError, match=hint) as exc:
        load_image(tmp_path / "i.tif")
    msg = str(exc.value)
    assert "i.tif" in msg and shown in msg and "0..65535" in msg and "16-bit" in msg
    assert isinstance(exc.value, I.PixelRangeError) and isinstance(exc.value, ImageFileError)
    assert issubclass(I.FloatRangeError, I.PixelRangeError)  # callers catching either range error


def test_gray8_and_bilevel(tmp_path, rng):
    a = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "l.png")
    li = load_image(tmp_path / "l.png")
    assert li.grayscale and li.bit_depth == 8 and np.array_equal(u8(li.rgb)[..., 1], a)
    Image.fromarray(a > 127).save(tmp_path / "b.png")
    li = load_image(tmp_path / "b.png")
    assert li.grayscale and set(np.unique(u8(li.rgb))) <= {0, 255}


def test_gray_alpha_8bit(tmp_path, rng):
    a = rng.integers(0, 256, (4, 6, 2), dtype=np.uint8)
    Image.fromarray(a, mode="LA").save(tmp_path / "la.png")
    li = load_image(tmp_path / "la.png")
    assert li.grayscale and li.bit_depth == 8
    assert np.array_equal(u8(li.alpha)[..., 0], a[..., 1])


def test_palette_with_transparency_gets_alpha(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    im.save(tmp_path / "p.png", transparency=1)
    li = load_image(tmp_path / "p.png")
    assert li.source_mode == "P" and li.alpha is not None
    assert u8(li.alpha)[0, :, 0].tolist() == [255, 0, 255, 0]
    assert u8(li.rgb)[0, 0].tolist() == [255, 0, 0]


def test_rgb_trns_colour_gets_alpha(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 1] = (10, 20, 30)
    Image.fromarray(a).save(tmp_path / "t.png", transparency=(10, 20, 30))
    li = load_image(tmp_path / "t.png")
    assert u8(li.alpha)[..., 0].tolist() == [[255, 0, 255], [255, 255, 255]]


def test_animated_gif_first_frame_with_note(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    li = load_image(tmp_path / "a.gif")
    assert u8(li.rgb)[0, 0].tolist() == [255, 0, 0]
    assert any("first" in n and "3 frames" in n for n in li.notes)


def test_multipage_tiff_is_called_a_multi_page_file(tmp_path):
    """Pillow calls a multi-page TIFF "animated"; the note calls it what it is."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([np.zeros((8, 8), np.uint8), np.full((8, 8), 9, np.uint8)]))
    li = load_image(tmp_path / "pages.tif")
    assert li.notes == ["pages.tif is a multi-page file with 2 frames; only the first was used"]
    assert u8(li.rgb).max() == 0


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    li = load_image(tmp_path / "c.jpg")
    assert li.source_mode == "CMYK" and li.rgb.shape[1] == 3
    r, g, b = li.rgb[0, :, 2, 2].tolist()
    assert r > 0.9 and g < 0.1 and b < 0.1  # cyan-free, magenta+yellow = red


# Expected display transforms for EXIF orientation values (EXIF 2.3, tag 0x0112), written from
# the standard's wording (e.g. 7: stored row 0 is the right side, stored column 0 the bottom).
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", list(range(1, 9)))
def test_exif_orientation_8bit_and_16bit(tmp_path, rng, orientation):
    a8 = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / "o.png", exif=exif_with_orientation(orientation))
    li = load_image(tmp_path / "o.png")
    assert np.array_equal(u8(li.rgb), _ORIENT[orientation](a8))

    a16 = rng.integers(0, 65536, (3, 5, 3), dtype=np.uint16)
    write_png16_all_filters(tmp_path / "o16.png", a16, exif=exif_with_orientation(orientation))
    li = load_image(tmp_path / "o16.png")
    assert np.array_equal(u16(li.rgb), _ORIENT[orientation](a16))


# --- loading: errors -------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")


def test_broken_link_is_named_as_one(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(I.BrokenLinkError, match=r"gone.png.*broken symbolic link.*deleted.png.*does not exist"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")  # a loop: it points nowhere either
    with pytest.raises(I.BrokenLinkError, match=r"a.png.*broken symbolic link.*cannot be reached"):
        load_image(tmp_path / "a.png")
    assert issubclass(I.BrokenLinkError, ImageNotFoundError)  # callers catching "not found" still do
    Image.new("RGB", (3, 2)).save(tmp_path / "real.png")
    (tmp_path / "ok.png").symlink_to("real.png")
    assert I.broken_link_message(tmp_path / "ok.png") is None and load_image(tmp_path / "ok.png").size == (2, 3)
    assert I.broken_link_message(tmp_path / "real.png") is None


def test_folder_and_empty_file(tmp_path):
    with pytest.raises(ImageFileError, match="folder"):
        load_image(tmp_path)
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(EmptyImageFileError, match="empty .0 bytes"):
        load_image(tmp_path / "e.png")


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_text("this is not a picture\n" * 10)
    with pytest.raises(NotAnImageError, match="x.png.*not an image"):
        load_image(tmp_path / "x.png")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated(tmp_path, rng, fmt):
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / f"full.{fmt}")
    data = (tmp_path / f"full.{fmt}").read_bytes()
    (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedImageError, match=f"cut.{fmt}.*truncated.*re-download"):
        load_image(tmp_path / f"cut.{fmt}")


def test_a_png_cut_inside_its_header_is_called_damaged(tmp_path, rng):
    """The first 40 bytes of a real PNG: Pillow cannot identify it, but it starts like a PNG, so it
    is damaged or incomplete, not an unknown format."""
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "head.png").write_bytes((tmp_path / "full.png").read_bytes()[:40])
    for call in (load_image, I.probe_image):
        with pytest.raises(TruncatedImageError, match=r"head.png.*starts like a PNG file.*damaged or incomplete"):
            call(tmp_path / "head.png")


@pytest.mark.parametrize("maxval", [65535, 1023])
def test_a_16bit_ppm_keeps_its_16_bits(tmp_path, rng, maxval):
    """Pillow's PPM decoder scales samples over 255 down to 8 bits: a 16-bit PPM was written 8-bit
    without a word. Its samples (big-endian, after the header) are read whole; a file cut short
    is damaged."""
    samples = rng.integers(0, maxval + 1, (6, 5, 3)).astype(">u2")
    data = f"P6\n5 6\n{maxval}\n".encode() + samples.tobytes()
    (tmp_path / "deep.ppm").write_bytes(data)
    loaded = load_image(tmp_path / "deep.ppm")
    assert loaded.bit_depth == 16 and loaded.rgb.shape == (1, 3, 6, 5)
    expected = torch.from_numpy(samples.astype(np.float64) / maxval).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(loaded.rgb, expected, atol=1e-7, rtol=0)
    (tmp_path / "cut.ppm").write_bytes(data[:-10])
    with pytest.raises(TruncatedImageError, match="cut.ppm' is a 16-bit PPM cut short"):
        load_image(tmp_path / "cut.ppm")


def test_a_16bit_cmyk_tiff_says_it_is_read_at_8_bits(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "press.tif", rng.integers(0, 65536, (8, 8, 4)).astype(np.uint16),
                     photometric="separated")
    loaded = load_image(tmp_path / "press.tif")
    assert loaded.bit_depth == 8 and any("press.tif is a 16-bit CMYK image: read at 8 bits" in n for n in loaded.notes)


def test_heif_containers_are_named_by_their_brand_cut_or_unreadable_here(tmp_path, rng, monkeypatch):
    """An AVIF cut inside its header was called an unknown or unsupported format (AVIF had no
    signature: its ISO-media "ftyp" box names the codec); a HEIC without pillow-heif is named as
    HEIC, with what to install, not called unknown."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow writes no AVIF")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.avif")
    data = (tmp_path / "full.avif").read_bytes()
    for cut in (12, 40, len(data) // 2):
        (tmp_path / "cut.avif").write_bytes(data[:cut])
        with pytest.raises(TruncatedImageError, match=r"cut.avif' starts like an AVIF file.*damaged or incomplete"):
            load_image(tmp_path / "cut.avif")
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    monkeypatch.setattr(I, "_register_optional_openers", lambda: False)  # as without pillow-heif
    with pytest.raises(NotAnImageError, match=r"IMG_0001.HEIC' is a HEIC file, which this install cannot read: "
                                              r"install the pillow-heif plugin \(pip install pillow-heif\)"):
        load_image(heic)
    assert I.unsupported_format_message(tmp_path / "a.png") is None
    assert "AVIF" not in str(I.unsupported_format_message(tmp_path / "a.avif"))  # this Pillow reads AVIF


@pytest.mark.parametrize("fmt, save", [("jpg", {"format": "JPEG", "exif": b"Exif\x00\x00" + b"\x00" * 3000}),
                                       ("png", {"format": "PNG"}), ("bmp", {"format": "BMP"}),
                                       ("tif", {"format": "TIFF"}), ("webp", {"format": "WEBP"})])
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's own notes on the cut TIFF
def test_a_file_cut_anywhere_in_its_header_is_damaged_not_unreadable(tmp_path, rng, fmt, save):
    """Pillow reports some cut-off headers as a plain OSError ("Truncated File Read"): that is a
    damaged file, not a disk or permission problem; and a cut so early that Pillow cannot
    identify it is still named by its signature."""
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"full.{fmt}", **save)
    data = (tmp_path / f"full.{fmt}").read_bytes()
    for cut in (12, 20, 30, 60, 200, 1000, 3000):  # 12: enough bytes to hold every signature
        if cut >= len(data) - 100:
            continue
        (tmp_path / f"cut.{fmt}").write_bytes(data[:cut])
        try:
            I.probe_image(tmp_path / f"cut.{fmt}")
        except I.TruncatedImageError:
            continue
        except I.NotAnImageError as e:  # TIFF: a damaged one and an unsupported one look alike
            assert fmt == "tif" and "damaged or incomplete" in str(e), str(e)
            continue
        except I.ImageFileError as e:
            pytest.fail(f"{fmt} cut at {cut}: {type(e).__name__}: {e}")
        # a header that is whole at this cut: decoding must then call the file damaged
        with pytest.raises(I.TruncatedImageError):
            load_image(tmp_path / f"cut.{fmt}")


def _png_header_only(path, w, h, bit_depth=8, color_type=0):
    """A PNG that claims ``w x h`` pixels (8-bit gray unless told) and holds a few bytes of data."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def test_probe_image_reads_the_header_only(tmp_path):
    """probe_image returns (height, width) without decoding a pixel (this file's data would fail as
    truncated), and passes the size to check_size, whose error comes out as it is."""
    _png_header_only(tmp_path / "claims.png", 6000, 4000)
    seen = []
    assert I.probe_image(tmp_path / "claims.png", max_pixels=None, check_size=lambda h, w: seen.append((h, w))) \
        == (4000, 6000)
    assert seen == [(4000, 6000)]
    with pytest.raises(TruncatedImageError):
        load_image(tmp_path / "claims.png", max_pixels=None)  # the pixels are not there

    def refuse(h, w):
        raise OutputTooLargeError(f"no room for {w}x{h}")

    with pytest.raises(OutputTooLargeError, match="no room for 6000x4000"):
        I.probe_image(tmp_path / "claims.png", max_pixels=None, check_size=refuse)
    with pytest.raises(ImageTooLargeError, match="6000x4000"):
        I.probe_image(tmp_path / "claims.png", max_pixels=1000)
    before = Image.MAX_IMAGE_PIXELS
    (tmp_path / "e.png").write_bytes(b"")
    (tmp_path / "t.png").write_text("not a picture")
    for name, error in (("e.png", EmptyImageFileError), ("t.png", NotAnImageError), ("nope.png", ImageNotFoundError)):
        with pytest.raises(error, match=name):
            I.probe_image(tmp_path / name)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("bit_depth,color_type", [(16, 0), (8, 2), (16, 2), (16, 6)])
def test_probe_image_reads_only_the_header_of_8_and_16_bit_images(tmp_path, bit_depth, color_type):
    """16-bit gray, RGB and RGBA are judged from the header like 8-bit: probing a file whose pixel
    data is missing succeeds (nothing decoded), loading it fails."""
    _png_header_only(tmp_path / "claims.png", 60, 40, bit_depth, color_type)
    assert I.probe_image(tmp_path / "claims.png") == (40, 60)
    with pytest.raises(TruncatedImageError):
        load_image(tmp_path / "claims.png")


def test_probe_image_reads_only_the_header_of_a_16_bit_pgm(tmp_path):
    """Pillow opens a 16-bit PGM as mode I, like 32-bit files, but its unsigned 16-bit samples are
    always in range: the probe judges it from the header (a file cut short probes, loads not)."""
    Image.fromarray(np.arange(60 * 40, dtype=np.uint16).reshape(40, 60) * 20).save(tmp_path / "g16.pgm")
    data = (tmp_path / "g16.pgm").read_bytes()
    (tmp_path / "cut.pgm").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.pgm") as im:
        assert im.mode == "I"
    assert I.probe_image(tmp_path / "cut.pgm") == (40, 60)
    with pytest.raises(TruncatedImageError):
        load_image(tmp_path / "cut.pgm")


def test_probe_image_refuses_float_and_32_bit_values_as_load_image_does(tmp_path, rng):
    """A float image (mode F) and a 32-bit or signed integer one (mode I) are accepted or not for
    their values, so probe_image decodes them and refuses what load_image refuses, with the same
    error and message; those load_image reads pass."""
    tifffile = pytest.importorskip("tifffile")
    hdr = rng.random((40, 30)).astype(np.float32) * np.float32(0.9) + np.float32(0.01)
    hdr[:4, :4] = 4.0  # 0..1 with HDR highlights
    Image.fromarray(hdr, mode="F").save(tmp_path / "hdr.tif")
    Image.fromarray(np.array([[0, 10, 70000, 255]], np.int32), mode="I").save(tmp_path / "int32.tif")
    tifffile.imwrite(tmp_path / "int16s.tif", np.array([[-300, 0, 100, 20000]], np.int16))  # Pillow: mode I
    for name, error in (("hdr.tif", I.FloatRangeError), ("int32.tif", I.IntegerRangeError),
                        ("int16s.tif", I.IntegerRangeError)):
        with pytest.raises(error) as loading:
            load_image(tmp_path / name)
        with pytest.raises(error) as probing:
            I.probe_image(tmp_path / name)
        assert str(probing.value) == str(loading.value), name

    Image.fromarray(np.clip(hdr, 0, 1), mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(np.array([[0, 256, 40000, 65535]], np.int32), mode="I").save(tmp_path / "int32ok.tif")
    assert I.probe_image(tmp_path / "unit.tif") == (40, 30)
    assert I.probe_image(tmp_path / "int32ok.tif") == (1, 4)


def test_a_file_without_read_permission_says_so(tmp_path, monkeypatch):
    """Opening the file is refused (simulated: root may read anything): a clear message naming the
    file and what to check, from probe_image and load_image, not a raw Errno."""
    Image.new("RGB", (3, 2)).save(tmp_path / "locked.png")
    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    for call in (I.probe_image, load_image):
        with pytest.raises(I.UnreadableImageError) as exc:
            call(tmp_path / "locked.png")
        assert str(exc.value).startswith(f"cannot read '{tmp_path / 'locked.png'}': permission denied; check its "
                                         f"permissions")
        assert "Errno" not in str(exc.value) and isinstance(exc.value, ImageFileError)


def test_heic_is_a_scanned_suffix_only_with_pillow_heif(monkeypatch):
    import sys
    import types

    registered = []
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed: importing it fails
    assert ".heic" not in I.optional_image_suffixes()
    monkeypatch.setitem(sys.modules, "pillow_heif",
                        types.SimpleNamespace(register_heif_opener=lambda: registered.append(1)))
    assert {".heic", ".heif"} <= I.optional_image_suffixes() and registered


def test_decompression_bomb_guard(tmp_path):
    Image.new("RGB", (100, 60)).save(tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=r"100x60.*max_pixels"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global is restored
    assert load_image(tmp_path / "big.png", max_pixels=6000).size == (60, 100)
    assert load_image(tmp_path / "big.png", max_pixels=None).size == (60, 100)


# --- saving ----------------------------------------------------------------------------------

def test_save_rounds_half_up_and_clips(tmp_path):
    vals = torch.tensor([(10 + 0.5) / 255, (10 + 0.49) / 255, -0.2, 1.7, 0.0, 1.0])
    rgb = vals.view(1, 1, 1, 6).expand(1, 3, 1, 6).contiguous()
    save_image(tmp_path / "r.png", rgb)
    got = np.asarray(Image.open(tmp_path / "r.png"))[0, :, 0].tolist()
    assert got == [11, 10, 0, 255, 0, 255]
    # a float64 CPU tensor is rounded in a copy, not in place
    rgb64 = rgb.double()
    before = rgb64.clone()
    save_image(tmp_path / "r64.png", rgb64)
    assert torch.equal(rgb64, before)
    assert np.asarray(Image.open(tmp_path / "r64.png"))[0, :, 0].tolist() == got


def test_save_quantises_exactly_as_float64_round_half_up(tmp_path, rng):
    """Every float32 value lands on floor(x * levels + 0.5) computed in float64, 8 and 16 bits."""
    x = torch.from_numpy(rng.random((3, 64, 64), dtype=np.float32))
    # on level edges, where float32 arithmetic would round half of them the other way
    x[0, 0, :32] = torch.tensor([(k + 0.5) / 255 for k in range(32)], dtype=torch.float32)
    x[1, 0, :32] = torch.tensor([(k + 0.5) / 65535 for k in range(0, 32 * 977, 977)], dtype=torch.float32)
    for bits, levels in ((8, 255), (16, 65535)):
        save_image(tmp_path / f"q{bits}.png", x, bit_depth=bits)
        got = np.asarray(Image.open(tmp_path / f"q{bits}.png")) if bits == 8 else u16(load_image(tmp_path / "q16.png").rgb)
        want = np.floor(x.permute(1, 2, 0).double().numpy() * levels + 0.5)
        assert np.array_equal(got.astype(np.float64), want), bits


def test_save_16bit_roundtrip_rgb_rgba_gray(tmp_path, rng):
    a = rng.integers(0, 65536, (7, 9, 4), dtype=np.uint16)
    t = torch.from_numpy(a.astype(np.float64) / 65535).permute(2, 0, 1)[None].float()
    save_image(tmp_path / "c.png", t[:, :3], t[:, 3:], bit_depth=16)
    li = load_image(tmp_path / "c.png")
    assert li.bit_depth == 16 and np.array_equal(u16(li.rgb), a[..., :3])
    assert np.array_equal(u16(li.alpha), a[..., 3:])
    save_image(tmp_path / "g.png", t[:, :3], bit_depth=16, grayscale=True)
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "I;16"  # a standard 16-bit gray PNG that other tools read too
    luma = (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]) / 65535
    assert np.abs(np.asarray(im).astype(np.float64) - np.floor(luma * 65535 + 0.5)).max() <= 1


def test_save_8bit_modes_and_formats(tmp_path, rng):
    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    alpha = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    save_image(tmp_path / "a.png", rgb, alpha)
    assert Image.open(tmp_path / "a.png").mode == "RGBA"
    save_image(tmp_path / "g.png", rgb, alpha, grayscale=True)
    assert Image.open(tmp_path / "g.png").mode == "LA"
    save_image(tmp_path / "j.jpg", rgb)
    assert Image.open(tmp_path / "j.jpg").format == "JPEG"
    save_image(tmp_path / "w.webp", rgb, alpha)
    assert Image.open(tmp_path / "w.webp").mode == "RGBA"


def test_save_icc_profile_kept(tmp_path):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = torch.full((1, 3, 4, 4), 0.5)
    for bd in (8, 16):
        save_image(tmp_path / f"i{bd}.png", rgb, bit_depth=bd, icc_profile=icc)
        assert load_image(tmp_path / f"i{bd}.png").icc_profile == icc


def test_a_grey_profile_leaves_a_webp_which_stores_rgb(tmp_path):
    """WebP has no grey mode (Pillow stores grey as RGB), so a GRAY profile would not fit its
    pixels: left out with a note; PNG and JPEG keep grey pixels and the profile."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray = srgb[:16] + b"GRAY" + srgb[20:]  # the header's colour space is what the writer checks
    grey = torch.full((1, 1, 4, 4), 0.5)
    said = []
    save_image(tmp_path / "g.webp", grey, grayscale=True, icc_profile=gray, warn=said.append)
    assert said == ["its grey ICC profile does not fit the RGB pixels WebP stores; written without it"]
    assert "icc_profile" not in Image.open(tmp_path / "g.webp").info
    for name in ("g.png", "g.jpg"):
        save_image(tmp_path / name, grey, grayscale=True, icc_profile=gray, warn=said.append)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "L" and im.info["icc_profile"] == gray, name


def camera_exif(orientation: int = 1):
    """EXIF as a camera writes it: descriptive tags, exposure, GPS, a maker note, its pixel size."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Canon", "EOS R5"
    exif[ExifTags.Base.Copyright] = "A. Photographer"
    # sub-IFDs as dicts set on the pointer tags: Pillow 11.0 drops edits made through get_ifd
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.DateTimeOriginal: "2024:01:02 03:04:05", ExifTags.Base.FNumber: 2.8,
                               ExifTags.Base.MakerNote: b"vendor blob with offsets into the source file",
                               ExifTags.Base.ExifImageWidth: 64, ExifTags.Base.ExifImageHeight: 48}
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (52.0, 31.0, 12.5)}
    return exif


@pytest.mark.parametrize("name,bit_depth", [("o.png", 8), ("o16.png", 16), ("o.jpg", 8), ("o.webp", 8)])
def test_exif_and_dpi_are_carried_to_the_result(tmp_path, name, bit_depth):
    """A photo's camera, dates, exposure, GPS and resolution reach the upscaled file (photo tools
    keep them; before, every output lost them). The orientation is not carried (the pixels are
    upright already: carried, viewers would turn the result again), nor the maker note (offsets
    into the source file); the EXIF pixel size is the result's."""
    from PIL import ExifTags

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "src.jpg", exif=camera_exif(orientation=6),
                                                   dpi=(300, 300))
    loaded = load_image(tmp_path / "src.jpg")
    assert loaded.size == (64, 48) and loaded.dpi == (300, 300)  # turned upright: 48 wide
    big = torch.nn.functional.interpolate(loaded.rgb, scale_factor=2)
    said = []
    save_image(tmp_path / name, big, bit_depth=bit_depth, exif=loaded.exif, dpi=loaded.dpi, warn=said.append)
    assert said == (["WebP holds no resolution; written without its 300 dpi"] if name.endswith(".webp") else [])
    with Image.open(tmp_path / name) as out:
        out.load()
        exif = out.getexif()
        assert out.size == (96, 128)
        if name.endswith(".webp"):
            assert "dpi" not in out.info  # WebP holds no resolution
        else:
            assert out.info["dpi"] == pytest.approx((300, 300), abs=0.01)  # PNG: pixels per metre
    assert ExifTags.Base.Orientation not in exif
    assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model], exif[ExifTags.Base.Copyright]) == (
        "Canon", "EOS R5", "A. Photographer")
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    assert sub[ExifTags.Base.DateTimeOriginal] == "2024:01:02 03:04:05" and sub[ExifTags.Base.FNumber] == 2.8
    assert ExifTags.Base.MakerNote not in sub
    assert (sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight]) == (96, 128)
    assert dict(exif.get_ifd(ExifTags.IFD.GPSInfo)) == {1: "N", 2: (52.0, 31.0, 12.5)}
    assert load_image(tmp_path / name).size == (128, 96)  # read back upright, not turned again


def test_exif_of_a_tiff_keeps_the_picture_tags_not_the_files_structure(tmp_path):
    """A TIFF's first IFD is also its file structure (strips, size, compression): only the
    descriptive tags travel, so a JPEG result never claims the TIFF's strip offsets or size."""
    from PIL import ExifTags

    Image.new("RGB", (16, 12)).save(tmp_path / "cam.jpg", exif=camera_exif())
    with Image.open(tmp_path / "cam.jpg") as cam:  # a camera JPEG's EXIF, as a converter keeps it
        Image.new("RGB", (16, 12)).save(tmp_path / "src.tif", exif=cam.getexif(), dpi=(72, 72))
    with Image.open(tmp_path / "src.tif") as tif:
        assert ExifTags.Base.StripOffsets in tif.getexif() and tif.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    kept = Image.Exif()
    kept.load(load_image(tmp_path / "src.tif").exif)
    assert kept[ExifTags.Base.Make] == "Canon" and kept.get_ifd(ExifTags.IFD.GPSInfo)
    assert not {ExifTags.Base.StripOffsets, ExifTags.Base.ImageWidth, ExifTags.Base.Compression,
                ExifTags.Base.XResolution} & set(kept)


def test_exif_text_keeps_its_bytes_and_an_adobe_rgb_marker_survives(tmp_path):
    """Text beyond ASCII (Lightroom and phones write UTF-8) comes out byte for byte (Pillow's
    own round trip turns it into '?'), and the interoperability IFD's "R03" (Adobe RGB) stays."""
    from PIL import ExifTags

    exif = camera_exif()
    exif[ExifTags.Base.Copyright] = "© 2024 Jörg".encode()
    sub = exif[ExifTags.IFD.Exif]
    sub[ExifTags.Base.LensModel] = "Objectif Éclair".encode("latin-1")
    sub[ExifTags.Base.ColorSpace] = 0xFFFF  # uncalibrated: DCF's Adobe RGB, with the R03 marker below
    sub[ExifTags.IFD.Interop] = {1: "R03"}
    Image.new("RGB", (16, 12)).save(tmp_path / "src.jpg", exif=exif)
    loaded = load_image(tmp_path / "src.jpg")
    for name in ("o.jpg", "o.png", "o16.png", "o.webp"):
        save_image(tmp_path / name, loaded.rgb, bit_depth=16 if name == "o16.png" else 8, exif=loaded.exif)
        data = (tmp_path / name).read_bytes()
        assert "© 2024 Jörg".encode() in data and "Objectif Éclair".encode("latin-1") in data, name
        with Image.open(tmp_path / name) as out:
            assert dict(out.getexif().get_ifd(ExifTags.IFD.Interop)) == {1: "R03"}, name
            # still text: Pillow reads it as Latin-1, the bytes are the UTF-8 ones
            assert out.getexif()[ExifTags.Base.Copyright].encode("latin-1").decode() == "© 2024 Jörg", name


def test_resolution_rules(tmp_path):
    """No invented 72 dpi for a JPEG with EXIF but no resolution (Pillow's stand-in); a microscope's
    254,000 dpi is kept in a PNG and left out of a JPEG, whose 16-bit field would wrap it."""
    Image.new("RGB", (8, 8)).save(tmp_path / "no_dpi.jpg", exif=camera_exif())
    with Image.open(tmp_path / "no_dpi.jpg") as im:
        assert im.info["dpi"] == (72, 72)  # what Pillow says
    assert load_image(tmp_path / "no_dpi.jpg").dpi is None
    Image.new("RGB", (8, 8)).save(tmp_path / "no_dpi.tif")  # no resolution tags at all
    with Image.open(tmp_path / "no_dpi.tif") as im:
        assert im.info["dpi"] == (1, 1)  # what Pillow says: 8 px would print 8 inches wide
    assert load_image(tmp_path / "no_dpi.tif").dpi is None
    # XResolution alone: Pillow fills in 1 for the other side
    Image.new("RGB", (8, 8)).save(tmp_path / "x_only.tif", tiffinfo={282: 300.0, 296: 2})
    with Image.open(tmp_path / "x_only.tif") as im:
        assert 283 not in im.tag_v2
    assert load_image(tmp_path / "x_only.tif").dpi is None
    Image.new("RGB", (8, 8)).save(tmp_path / "micro.tif", resolution=100000.0, resolution_unit="cm")
    micro = load_image(tmp_path / "micro.tif")
    assert micro.dpi == pytest.approx((254000, 254000))
    save_image(tmp_path / "m.png", micro.rgb, dpi=micro.dpi)
    with Image.open(tmp_path / "m.png") as im:
        assert im.info["dpi"] == pytest.approx((254000, 254000), rel=1e-4)
    with pytest.warns(UserWarning, match="254,000 dpi does not fit a JPEG"):
        save_image(tmp_path / "m.jpg", micro.rgb, dpi=micro.dpi)
    with Image.open(tmp_path / "m.jpg") as im:
        assert im.info.get("jfif_unit") == 0


@pytest.mark.parametrize("blob,why", [(b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0", "a value at offset"),
                                      (b"Exif\x00\x00garbage!", "no TIFF header")])
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_a_damaged_exif_costs_the_metadata_not_the_picture(tmp_path, suffix, blob, why):
    """EXIF that cannot be read is left out with a note and the picture loads: before, a PNG or
    WebP whose EXIF Pillow could not parse was refused as a damaged image (Pillow raises there on
    the orientation lookup; on a JPEG it warns and reads none)."""
    import warnings

    bad = tmp_path / f"bad{suffix}"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(bad, exif=blob)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        loaded = load_image(bad)
    assert not escaped  # Pillow's own warnings are notes of the file, printed with its name
    if suffix == ".jpg" and why == "a value at offset":
        assert any(n.startswith("Pillow: Corrupt EXIF data") for n in loaded.notes), loaded.notes
    assert loaded.exif is None and loaded.rgb.shape == (1, 3, 8, 8)
    assert any(f"EXIF metadata could not be copied ({why}" in n for n in loaded.notes), loaded.notes
    if suffix != ".jpg" and why == "no TIFF header":  # where Pillow raised
        assert any("EXIF metadata cannot be parsed" in n and "orientation" in n for n in loaded.notes)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    plain = load_image(tmp_path / "plain.png")
    assert plain.exif is None and plain.dpi is None and plain.notes == []


def test_exif_entries_are_copied_byte_exact_in_the_sources_byte_order(tmp_path):
    """A little-endian camera EXIF keeps every carried entry's type, count and bytes: a UTF-16LE
    UNICODE UserComment (its bytes depend on the byte order), UTF-8 in an ASCII tag Pillow has no
    type for (it wrote such text as a byte list), rationals. Orientation, maker note, thumbnail and
    the tags measured in source pixels are left out; the size is the result's."""
    from fluxsr_core import exif as E

    le = "<"

    def entry(tag, typ, count, data):
        return E._Entry(tag, typ, count, data)

    comment = b"UNICODE\x00" + "Grüße".encode("utf-16-le")
    owner = "Jürgen".encode() + b"\x00"
    ifd0 = {0x010F: entry(0x010F, 2, 6, b"Canon\x00"), 0x0112: entry(0x0112, 3, 1, struct.pack("<H", 6))}
    sub = {0x9286: entry(0x9286, 7, len(comment), comment), 0xA430: entry(0xA430, 2, len(owner), owner),
           0x829D: entry(0x829D, 5, 1, struct.pack("<II", 28, 10)), 0x927C: entry(0x927C, 7, 4, b"MNOT"),
           0xA20E: entry(0xA20E, 5, 1, struct.pack("<II", 333, 10)), 0x9214: entry(0x9214, 3, 2, struct.pack("<HH", 9, 2)),
           0xA002: entry(0xA002, 4, 1, struct.pack("<I", 16))}
    source = E.Exif(le, {"0": E._Directory(ifd0), "exif": E._Directory(sub)})
    Image.new("RGB", (16, 12)).save(tmp_path / "cam.jpg", exif=E.to_bytes(source))
    loaded = load_image(tmp_path / "cam.jpg")
    assert loaded.size == (16, 12)  # turned upright by its orientation 6: 12 wide, 16 high
    save_image(tmp_path / "out.png", torch.zeros(1, 3, 24, 32), exif=loaded.exif)
    with Image.open(tmp_path / "out.png") as out:
        out.load()
        written = E.parse_exif(out.info["exif"])
    assert written.byte_order == "<"
    first, carried = written.directories["0"].entries, written.directories["exif"].entries
    assert set(first) == {0x010F} and first[0x010F].data == b"Canon\x00"
    for tag in (0x9286, 0xA430, 0x829D):
        assert (carried[tag].type, carried[tag].count, carried[tag].data) == (sub[tag].type, sub[tag].count,
                                                                             sub[tag].data), hex(tag)
    assert not {0x927C, 0xA20E, 0x9214} & set(carried)
    assert (carried[0xA002].type, carried[0xA002].data, carried[0xA003].data) == (3, struct.pack("<H", 32),
                                                                                 struct.pack("<H", 24))


def test_a_tiffs_description_is_its_layout_and_stays_behind(tmp_path):
    """tifffile writes {"shape": [...]} (ImageJ and OME their headers) as the ImageDescription of a
    TIFF: false for the result, so a TIFF's description is not carried; a JPEG's caption is."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((12, 16, 3), np.uint8), metadata={"axes": "YXS"},
                     extratags=[(0x010F, 2, 0, "Nikon", True)])
    from fluxsr_core import exif as E

    kept = E.parse_exif(load_image(tmp_path / "t.tif").exif)
    assert 0x010F in kept.directories["0"].entries and 0x010E not in kept.directories["0"].entries
    cam = camera_exif()
    cam[0x010E] = "Harbour at dawn"
    Image.new("RGB", (8, 8)).save(tmp_path / "c.jpg", exif=cam)
    assert E.parse_exif(load_image(tmp_path / "c.jpg").exif).directories["0"].entries[0x010E].data == b"Harbour at dawn\x00"


def test_a_grey_result_drops_an_rgb_profile(tmp_path):
    """PNG forbids an RGB profile on grey pixels (libpng drops it with a warning): a grey palette
    PNG carrying sRGB comes back grey without it; an RGB result keeps it."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pal = Image.new("P", (8, 8))
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(tmp_path / "grey_palette.png", icc_profile=srgb)
    loaded = load_image(tmp_path / "grey_palette.png")
    assert loaded.grayscale and loaded.icc_profile == srgb
    save_image(tmp_path / "out.png", loaded.rgb, grayscale=True, icc_profile=loaded.icc_profile)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "L" and "icc_profile" not in out.info
    save_image(tmp_path / "rgb.png", loaded.rgb, icc_profile=srgb)
    with Image.open(tmp_path / "rgb.png") as out:
        assert out.info["icc_profile"] == srgb


def test_grey_means_channels_within_two_levels():
    """A colour-managed grey scan (a level off here and there) is grey; three levels is colour."""
    g = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).expand(1, 3, 8, 8).clone()
    assert I.is_gray(g) and not I.is_gray(g[:, :1])
    for levels, grey in ((1, True), (2, True), (3, False)):
        off = g.clone()
        off[:, 2, 3, 4] -= levels / 255
        assert I.is_gray(off) is grey, levels
    spread = g.clone()  # red 2 above green, blue 2 below: red and blue 4 apart
    spread[:, 0, 3, 4] += 2 / 255
    spread[:, 2, 3, 4] -= 2 / 255
    assert not I.is_gray(spread)


def test_exif_structures_that_cannot_be_read_raise_exif_error():
    """Loops, directories past the end, absurd counts, values past the budget: an ExifError, never a
    hang or a huge read (a 1 MiB file could claim 10 GB by pointing 1000 entries of 1 MiB at the
    same bytes). One entry whose value is past the end costs only itself; BigTIFF is not read."""
    from fluxsr_core import exif as E

    def tiff(*entries: bytes, first: int = 8) -> bytes:
        return b"MM\x00*" + struct.pack(">I", first) + struct.pack(">H", len(entries)) + b"".join(entries) + bytes(4)

    def entry(tag, typ, count, value):
        return struct.pack(">HHII", tag, typ, count, value)

    loop = tiff(entry(0x8769, 4, 1, 8))  # its Exif directory is itself
    bomb = tiff(*[entry(0xC000 + i, 7, 1 << 20, 8) for i in range(5)]) + bytes(1 << 20)
    for blob, why in ((loop, "points back"), (tiff(first=4000), "runs past the end"), (b"MM\x00*" + struct.pack(
            ">IH", 8, 0xFFFF), "claims 65535 entries"), (b"Exif\x00\x00not a tiff", "no TIFF header"),
                      (bomb, "more than 4 MiB")):
        with pytest.raises(E.ExifError, match=why):
            E.parse_exif(blob)
    damaged = tiff(entry(0x010F, 2, 4, 0x4E696B00), entry(0xC350, 7, 40, 100_000_000))  # Make "Nik", a private tag
    assert E.parse_exif(damaged).directories["0"].entries[0x010F].data == b"Nik\x00"
    assert E.parse_exif(b"II+\x00\x08\x00\x00\x00" + bytes(16)) is None


def test_exif_drops_what_is_false_for_the_result_and_pointers_it_cannot_follow():
    """The interoperability directory's source format and size go; so does the image's unique id;
    a pointer in an unexpected place (into the source file) is not copied; EXIF 3.0's UTF-8
    type is; raw bytes without JPEG's prefix come back with it."""
    from fluxsr_core import exif as E

    o = ">"
    ifd0 = {0x010F: E._Entry(0x010F, 2, 6, b"Canon\x00"), 0x0131: E._Entry(0x0131, 129, 4, "Ünï".encode()[:4])}
    sub = {0xA420: E._Entry(0xA420, 2, 4, b"abc\x00"), 0x8825: E._Entry(0x8825, 4, 1, struct.pack(">I", 77)),
           0x829A: E._Entry(0x829A, 5, 1, struct.pack(">II", 1, 250))}
    interop = {1: E._Entry(1, 2, 4, b"R03\x00"), 0x1001: E._Entry(0x1001, 3, 1, struct.pack(">H", 64) + b"\0\0")}
    src = E.to_bytes(E.Exif(o, {"0": E._Directory(ifd0), "exif": E._Directory(sub), "interop": E._Directory(interop)}))
    kept = E.parse_exif(E.carried_exif(src))
    assert set(kept.directories["0"].entries) == {0x010F, 0x0131} and kept.directories["0"].entries[0x0131].type == 129
    assert set(kept.directories["exif"].entries) == {0x829A} and set(kept.directories["interop"].entries) == {1}
    raw = src.removeprefix(E.EXIF_PREFIX)  # as a PNG's eXIf chunk holds it
    assert E.with_pixel_size(raw, 10, 20).startswith(E.EXIF_PREFIX + b"MM\x00*")


def test_pillow_warnings_are_notes_of_the_file_in_this_thread_only(tmp_path):
    """Pillow's warnings while a file loads become its notes; a warning from elsewhere passes
    through as it was (shown, and once per place under the default filter), and the probe
    leaves them to the load."""
    import threading
    import warnings

    Image.new("RGB", (8, 8)).save(tmp_path / "bad.jpg", exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        I.probe_image(tmp_path / "bad.jpg")
        loaded = load_image(tmp_path / "bad.jpg")
    assert not shown and any(n.startswith("Pillow: Corrupt EXIF data") for n in loaded.notes)

    started, done = threading.Event(), threading.Event()
    real_open = I._open

    def slow_open(p):  # the other thread warns while this one loads
        started.set()
        done.wait(5)
        return real_open(p)

    def elsewhere():
        started.wait(5)
        warnings.warn("from another thread", UserWarning)
        done.set()

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        I._open = slow_open
        try:
            t = threading.Thread(target=elsewhere)
            t.start()
            clean = load_image(tmp_path / "bad.jpg")
            t.join()
        finally:
            I._open = real_open
    assert [str(w.message) for w in shown] == ["from another thread"]
    assert not any("another thread" in n for n in clean.notes)


def test_a_jpeg_too_small_for_the_exif_is_written_without_it(tmp_path):
    from PIL import ExifTags

    exif = camera_exif()
    exif[ExifTags.IFD.Exif][ExifTags.Base.UserComment] = b"ASCII\x00\x00\x00" + b"x" * 70000
    with pytest.warns(UserWarning, match="does not fit a JPEG"):
        save_image(tmp_path / "o.jpg", torch.zeros(1, 3, 8, 8), exif=exif.tobytes())
    assert not Image.open(tmp_path / "o.jpg").getexif()
    save_image(tmp_path / "o.png", torch.zeros(1, 3, 8, 8), exif=exif.tobytes())  # PNG holds it
    assert Image.open(tmp_path / "o.png").getexif()[ExifTags.Base.Make] == "Canon"


# --- XMP and PNG text ---------------------------------------------------------------------------

def _lightroom_xmp(width: int = 64, height: int = 48) -> bytes:
    return (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            f'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""'
            f' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/"'
            f' xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"'
            f' tiff:Orientation="6" exif:PixelXDimension="{width}" exif:PixelYDimension="{height}" xmp:Rating="4">'
            f'<dc:subject><rdf:Bag><rdf:li>k\u00fcste</rdf:li><rdf:li>dusk</rdf:li></rdf:Bag></dc:subject>'
            f'</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


@pytest.mark.parametrize("source", ["src.jpg", "src.png", "src.webp", "src.tif"])
@pytest.mark.parametrize("name,bit_depth", [("o.png", 8), ("o16.png", 16), ("o.jpg", 8), ("o.webp", 8)])
def test_xmp_is_carried_to_the_result_upright_and_with_its_size(tmp_path, source, name, bit_depth):
    """Keywords, rating and the rest of a photo's XMP reach the upscaled file in every format we
    write, from every format Pillow reads it from; its orientation is upright (as the pixels are,
    else Lightroom would turn the result again) and its pixel size the result's. Before, every
    output lost it."""
    kw = {"tiffinfo": {700: _lightroom_xmp()}} if source.endswith(".tif") else {}
    if source.endswith(".png"):
        from PIL import PngImagePlugin

        kw = {"pnginfo": PngImagePlugin.PngInfo()}
        kw["pnginfo"].add_itxt("XML:com.adobe.xmp", _lightroom_xmp().decode())
    elif not kw:
        kw = {"xmp": _lightroom_xmp()}
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / source, **kw)
    loaded = load_image(tmp_path / source)
    assert loaded.size == (64, 48)  # turned by the XMP's orientation (Pillow reads it without EXIF)
    # upright: 1, or gone where Pillow turned the picture while loading it (TIFF, Pillow 13: it
    # takes the orientation out of the packet it hands over)
    upright = ([b"1"], []) if source.endswith(".tif") else ([b"1"],)
    assert re.findall(rb'Orientation="(\d)"', loaded.xmp) in upright and loaded.notes == []
    big = torch.nn.functional.interpolate(loaded.rgb, scale_factor=2)
    save_image(tmp_path / name, big, bit_depth=bit_depth, xmp=loaded.xmp)
    with Image.open(tmp_path / name) as out:
        written = out.info["xmp"]
    assert 'k\u00fcste'.encode() in written and b'xmp:Rating="4"' in written
    assert b'exif:PixelXDimension="96" exif:PixelYDimension="128"' in written
    again = load_image(tmp_path / name)
    assert again.size == (128, 96) and again.xmp == written  # not turned again, read back as written


def _marked(w: int = 6, h: int = 4) -> np.ndarray:
    """A w x h RGB picture whose every pixel differs, so any turn or flip shows."""
    return (np.arange(w * h * 3).reshape(h, w, 3) * 3 % 256).astype(np.uint8)


def _as_loaded(path) -> np.ndarray:
    return np.rint(load_image(path).rgb[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _packet_with(orientation_markup: str, extra_ns: str = "") -> bytes:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" {extra_ns}>{orientation_markup}</rdf:Description>'
            '</rdf:RDF></x:xmpmeta>').encode()


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_orientation_is_the_exifs_else_the_pictures_xmp_found_by_namespace(tmp_path, suffix):
    """EXIF first, then the XMP's (the MWG's precedence), found by namespace: the same turn with
    every Pillow (Pillow 13 took a textual "tiff:Orientation" anywhere in the XMP, Pillow 11
    none outside PNG). Lossless formats only compare pixels."""
    from PIL import ExifTags, PngImagePlugin

    def save(name, packet=None, exif_orientation=None):
        kw = {}
        if exif_orientation and suffix == ".tif":
            kw["tiffinfo"] = {274: exif_orientation}
        elif exif_orientation:
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = exif_orientation
            kw["exif"] = exif
        if packet and suffix == ".tif":
            kw.setdefault("tiffinfo", {})[700] = packet
        elif packet and suffix == ".png":
            kw["pnginfo"] = PngImagePlugin.PngInfo()
            kw["pnginfo"].add_itxt("XML:com.adobe.xmp", packet.decode())
        elif packet:
            kw["xmp"] = packet
        if suffix in (".jpg", ".webp"):
            kw["quality"] = 100
        Image.fromarray(_marked()).save(tmp_path / (name + suffix), **kw)
        return tmp_path / (name + suffix)

    turned = np.rot90(_marked(), -1)  # orientation 6: turn a quarter clockwise
    other_prefix = save("prefix", _packet_with('<t:Orientation>6</t:Orientation>',
                                               'xmlns:t="http://ns.adobe.com/tiff/1.0/"'))
    wrong_ns = save("wrong_ns", _packet_with('', 'xmlns:tiff="urn:not-tiff" tiff:Orientation="6"'))
    in_a_title = save("title", _packet_with('<dc:title>tiff:Orientation="6"</dc:title>',
                                            'xmlns:dc="http://purl.org/dc/elements/1.1/"'))
    both = save("both", _lightroom_xmp(), exif_orientation=3)  # EXIF 3 (a half turn), XMP 6
    twice = save("twice", _packet_with('<t:Orientation>6</t:Orientation>', 'xmlns:t="http://ns.adobe.com/tiff/1.0/"'),
                 exif_orientation=6)
    assert load_image(other_prefix).size == (6, 4) and load_image(twice).size == (6, 4)  # turned once
    assert load_image(wrong_ns).size == load_image(in_a_title).size == load_image(both).size == (4, 6)
    assert b'<t:Orientation>1</t:Orientation>' in load_image(other_prefix).xmp
    if suffix in (".png", ".tif"):
        assert np.array_equal(_as_loaded(other_prefix), turned) and np.array_equal(_as_loaded(twice), turned)
        assert np.array_equal(_as_loaded(both), np.rot90(_marked(), 2))
        assert np.array_equal(_as_loaded(wrong_ns), _marked())


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "F"])
@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_tiffs_orientation_turns_every_mode_right(tmp_path, mode, compression):
    """All eight orientations of a TIFF, each mode, raw and compressed. Pillow maps an
    uncompressed one-band TIFF (L, I;16) from the file at its turned size, so those with a
    quarter turn (5-8) came out scrambled, neither turned nor as stored."""
    a = _marked(6, 4)[..., 0]
    expected = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.T, 6: np.rot90(a, -1),
                7: np.rot90(a, 2).T, 8: np.rot90(a, 1)}
    source = {"L": (a, 255), "I;16": (a.astype(np.uint16) * 200, 65535 / 200), "RGB": (np.stack([a] * 3, -1), 255),
              "F": (a.astype(np.float32) / 255, 255)}[mode]
    for orientation, want in expected.items():
        kw = {"tiffinfo": {274: orientation}, **({"compression": compression} if compression else {})}
        Image.fromarray(source[0]).save(tmp_path / "o.tif", **kw)
        got = load_image(tmp_path / "o.tif").rgb[0, 0].numpy() * source[1]
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-3), (mode, orientation)


def test_photoshops_pantry_is_another_documents_metadata_and_stays_as_it_is(tmp_path):
    """Only the picture's own properties (right under rdf:RDF's descriptions) change: the size,
    id and orientation of a document placed in it (xmpMM:Pantry) are its own, and its
    orientation does not turn the picture."""
    pantry = ('<xmpMM:Pantry><rdf:Bag><rdf:li><rdf:Description xmpMM:InstanceID="xmp.iid:placed" '
              'tiff:ImageWidth="10" tiff:Orientation="6"><tiff:Compression>1</tiff:Compression>'
              '</rdf:Description></rdf:li></rdf:Bag></xmpMM:Pantry>')
    packet = _packet_with(pantry, 'xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/" '
                                  'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmpMM:InstanceID="xmp.iid:own"')
    Image.fromarray(_marked()).save(tmp_path / "p.png", pnginfo=_png_xmp(packet))
    loaded = load_image(tmp_path / "p.png")
    assert loaded.size == (4, 6) and pantry.encode() in loaded.xmp
    save_image(tmp_path / "o.png", loaded.rgb, xmp=loaded.xmp)
    written = Image.open(tmp_path / "o.png").info["xmp"]
    assert pantry.encode() in written and b'xmpMM:InstanceID="xmp.iid:own"' not in written


def _png_xmp(packet: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet.decode())
    return info


def test_a_tiff_xmp_tag_of_another_type_still_loads(tmp_path):
    """Tag 700 written as ASCII (not BYTE, as the TIFF spec asks): Pillow 11 hands it over as a
    tuple, which cost the whole picture."""
    from PIL import TiffImagePlugin

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[700] = _lightroom_xmp().decode()
    ifd.tagtype[700] = 2
    Image.fromarray(_marked()).save(tmp_path / "a.tif", tiffinfo=ifd)
    loaded = load_image(tmp_path / "a.tif")
    assert loaded.rgb.shape[-2:] == (6, 4) and b'xmp:Rating="4"' in loaded.xmp


def test_png_text_carries_what_describes_the_picture_not_a_generators_graph(tmp_path):
    """Title, author, copyright (any script) reach PNG results, 8 and 16 bit, read back equal from
    both writers; ComfyUI's prompt/workflow and A1111's parameters stay behind (dropped on
    ComfyUI, the result would open the source's graph)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "Sea at dusk")
    info.add_text("Copyright", "\u00a9 J\u00f6rg")      # Latin-1: tEXt
    info.add_itxt("Author", "\u0399\u03c9\u03ac\u03bd\u03bd\u03b7\u03c2")  # Greek: iTXt
    info.add_text("Description", "long " * 400, zip=True)
    for generator in ("prompt", "workflow", "parameters"):
        info.add_text(generator, "{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "src.png", pnginfo=info)
    loaded = load_image(tmp_path / "src.png")
    assert loaded.text == {"Title": "Sea at dusk", "Author": "\u0399\u03c9\u03ac\u03bd\u03bd\u03b7\u03c2",
                           "Description": "long " * 400, "Copyright": "\u00a9 J\u00f6rg"}
    assert [n for n in loaded.notes if "PNG text" in n] == [
        "its PNG text 'parameters', 'prompt', 'workflow' is not carried: only the text that describes the picture is "
        "(Title, Author, Description, Copyright, ...), not a generator's record of how the source was made"]
    for name, bit_depth in (("o.png", 8), ("o16.png", 16)):
        save_image(tmp_path / name, loaded.rgb, bit_depth=bit_depth, text=loaded.text)
        with Image.open(tmp_path / name) as out:
            assert dict(out.text) == loaded.text, name
    assert load_image(tmp_path / "o16.png").text == loaded.text


def test_what_a_format_cannot_hold_is_left_out_with_a_warning(tmp_path):
    """A JPEG keeps the comment as its COM segment and warns about the other text; WebP holds no
    text; a JPEG's XMP over its one segment is left out (a PNG keeps it)."""
    rgb = torch.zeros(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="JPEG has no place for the text Title; written without it"):
        save_image(tmp_path / "o.jpg", rgb, text={"Title": "t", "Comment": "sea \u00e0 l'aube"})
    with Image.open(tmp_path / "o.jpg") as out:
        assert out.info["comment"].decode() == "sea \u00e0 l'aube"
    with pytest.warns(UserWarning, match="WebP has no place for the text Comment"):
        save_image(tmp_path / "o.webp", rgb, text={"Comment": "c"})
    with pytest.warns(UserWarning, match="the comment \\(70,000 bytes\\) does not fit a JPEG"):
        save_image(tmp_path / "long.jpg", rgb, text={"Comment": "c" * 70000})
    assert "comment" not in Image.open(tmp_path / "long.jpg").info
    huge = _lightroom_xmp().replace(b"dusk", b"d" * 70000)
    with pytest.warns(UserWarning, match="does not fit a JPEG"):
        save_image(tmp_path / "x.jpg", rgb, xmp=huge)
    assert "xmp" not in Image.open(tmp_path / "x.jpg").info
    save_image(tmp_path / "x.png", rgb, xmp=huge)
    assert len(Image.open(tmp_path / "x.png").info["xmp"]) > 70000
    with pytest.warns(UserWarning, match="the XMP given cannot be read \\(not well-formed XML"):
        save_image(tmp_path / "b.png", rgb, xmp=b"<x:xmpmeta")
    assert "xmp" not in Image.open(tmp_path / "b.png").info
    with pytest.raises(ValueError, match="not a PNG keyword"):
        save_image(tmp_path / "k.png", rgb, text={"bad\nkey": "v"})
    assert not (tmp_path / "k.png").exists()


@pytest.mark.parametrize("blob,why", [(b"<x:xmpmeta", "not well-formed XML"), (b"\xff\xfe\x00<", "not UTF-8"),
                                      (b'<!DOCTYPE x []><x:xmpmeta xmlns:x="adobe:ns:meta/"/>', "it declares a DTD")])
def test_a_damaged_xmp_costs_the_metadata_not_the_picture(tmp_path, blob, why):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "bad.jpg", xmp=blob)
    loaded = load_image(tmp_path / "bad.jpg")
    assert loaded.xmp is None and loaded.rgb.shape == (1, 3, 8, 8)
    assert any(f"XMP metadata could not be copied ({why}" in n for n in loaded.notes), loaded.notes


def test_a_namespace_slip_in_the_xmp_costs_the_xmp_not_the_picture(tmp_path):
    """An unbound prefix: before the fix ElementTree's ParseError escaped load_image (or became
    "could not decode image file")."""
    slip = _packet_with('', 'dc:format="x"')
    Image.fromarray(_marked()).save(tmp_path / "u.jpg", xmp=slip, quality=100)
    loaded = load_image(tmp_path / "u.jpg")
    assert loaded.size == (4, 6) and loaded.xmp is None
    assert any("XMP metadata could not be copied (not well-formed XML (unbound prefix" in n for n in loaded.notes)
    with pytest.warns(UserWarning, match="the XMP given cannot be read"):
        save_image(tmp_path / "o.png", loaded.rgb, xmp=slip)


def test_an_unreadable_exif_leaves_the_xmps_orientation_to_count(tmp_path):
    Image.fromarray(_marked()).save(tmp_path / "j.png", exif=b"Exif\x00\x00JUNKJUNKJUNK", pnginfo=_png_xmp(
        _packet_with('<t:Orientation>6</t:Orientation>', 'xmlns:t="http://ns.adobe.com/tiff/1.0/"')))
    loaded = load_image(tmp_path / "j.png")
    assert np.array_equal(_as_loaded(tmp_path / "j.png"), np.rot90(_marked(), -1))
    assert any("EXIF metadata cannot be parsed" in n for n in loaded.notes)


def test_imagemagicks_hex_xmp_profile_is_read_and_its_orientation_applied(tmp_path):
    """ImageMagick stores a PNG's XMP as hex in a "Raw profile type xmp" text chunk."""
    from PIL import PngImagePlugin

    packet = _lightroom_xmp()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type xmp", f"\nxmp\n{len(packet):8d}\n{packet.hex()}\n", zip=True)
    Image.fromarray(_marked()).save(tmp_path / "im.png", pnginfo=info)
    loaded = load_image(tmp_path / "im.png")
    assert b'xmp:Rating="4"' in loaded.xmp and b'tiff:Orientation="1"' in loaded.xmp
    assert np.array_equal(_as_loaded(tmp_path / "im.png"), np.rot90(_marked(), -1))


def test_save_quality_and_where_its_notes_go(tmp_path):
    """``quality`` reaches the JPEG/WebP encoders and is checked; ``warn`` takes the notes instead
    of a UserWarning (the CLI's writer thread: warnings' filters are process-wide)."""
    rng = np.random.default_rng(0)
    noisy = torch.from_numpy(rng.random((1, 3, 64, 64)).astype(np.float32))
    for suffix in (".jpg", ".webp"):
        save_image(tmp_path / f"lo{suffix}", noisy, quality=10)
        save_image(tmp_path / f"hi{suffix}", noisy, quality=100)
        assert (tmp_path / f"lo{suffix}").stat().st_size < (tmp_path / f"hi{suffix}").stat().st_size / 2
    for bad in (0, 101, 95.0, True):
        with pytest.raises(ValueError, match="quality must be a whole number from 1 to 100"):
            save_image(tmp_path / "q.jpg", noisy, quality=bad)
    notes = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none may escape as a warning
        save_image(tmp_path / "n.jpg", noisy, text={"Title": "t"}, warn=notes.append)
    assert notes == ["JPEG has no place for the text Title; written without it (PNG keeps it)"]


def test_save_errors(tmp_path):
    rgb = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="JPEG has no alpha"):
        save_image(tmp_path / "a.jpg", rgb, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="16 bits"):
        save_image(tmp_path / "a.jpg", rgb, bit_depth=16)
    with pytest.raises(ValueError, match="unsupported file type"):
        save_image(tmp_path / "a.bmp", rgb)
    with pytest.raises(ValueError, match="batch of 2"):
        save_image(tmp_path / "a.png", torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        save_image(tmp_path / "a.png", torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="upscale_alpha"):
        save_image(tmp_path / "a.png", rgb, torch.ones(1, 1, 2, 2))
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(target, torch.zeros(1, 3, 4, 4))
    old = target.read_bytes()

    def boom(path, q, *metadata):
        Path(path).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(I, "_write_png16", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_image(target, torch.ones(1, 3, 4, 4), bit_depth=16)
    assert target.read_bytes() == old  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp left behind


def test_save_creates_folder_and_respects_umask(tmp_path):
    p = save_image(tmp_path / "new" / "deep" / "x.png", torch.zeros(1, 3, 2, 2))
    assert p.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


# --- sizes, resize, pad, crop ----------------------------------------------------------------

def test_target_size():
    assert target_size(100, 60) == (400, 240)
    assert target_size(100, 60, scale=2.5) == (250, 150)
    assert target_size(100, 60, long_side=1000) == (1000, 600)
    assert target_size(60, 100, long_side=1000) == (600, 1000)
    H, W = target_size(300, 400, megapixels=1.2)
    assert (H, W) == (949, 1265) and abs(H * W - 1.2e6) / 1.2e6 < 0.001
    assert target_size(3, 3, scale=0.5) == (2, 2)  # 1.5 rounds half up


def test_target_size_errors():
    with pytest.raises(ValueError, match="only one"):
        target_size(10, 10, scale=2, long_side=40)
    for bad in (dict(scale=0), dict(scale=-2), dict(scale=float("nan")), dict(long_side=0),
                dict(megapixels=-1)):
        with pytest.raises(ValueError):
            target_size(10, 10, **bad)
    with pytest.raises(ValueError, match="positive integer"):
        target_size(0, 10)
    with pytest.raises(OutputTooLargeError, match=r"16384x16384.*max_output_pixels.*Lower the scale"):
        target_size(4096, 4096, scale=4)
    assert target_size(4096, 4096, scale=4, max_output_pixels=None) == (16384, 16384)
    assert target_size(2048, 2048, scale=4) == (8192, 8192)  # the default limit allows this


@pytest.mark.parametrize("h, w, limit", [(520, 600, 8192 * 8192), (13, 17, 1000), (999, 1001, 4_000_000),
                                         (3000, 3000, 100), (70, 30, 1)])
def test_too_large_advice_is_a_scale_that_is_accepted(h, w, limit):
    """The advised "at most" scale, typed back in as printed, fits; one step more does not (two
    decimals; two significant digits below 0.1, where it said 0.00x)."""
    with pytest.raises(OutputTooLargeError) as info:
        target_size(h, w, scale=100, max_output_pixels=limit)
    advised = info.value.max_scale
    step = 0.01 if advised >= 0.1 else 10.0 ** (math.floor(math.log10(advised)) - 1)
    assert advised > 0 and f"at most {advised:g}x" in str(info.value)
    assert advised == pytest.approx(round(advised / step) * step, abs=step / 100)
    H, W = target_size(h, w, scale=float(f"{advised:g}"), max_output_pixels=limit)
    assert H * W <= limit
    with pytest.raises(OutputTooLargeError):
        target_size(h, w, scale=float(f"{advised + step:.10g}"), max_output_pixels=limit)  # as typed
    # huge limits end too (a step past float precision changed nothing and looped for ever)
    assert I._largest_scale_within(1, 1, 10 ** 30) == pytest.approx(1e15)
    # the sizes are said in digits that are not all zero
    assert " = 0.0 megapixels" not in str(info.value) and "limit of 0.0 MP" not in str(info.value)


@pytest.mark.parametrize("h, w, limit", [(700, 1000, 8192 * 8192), (13, 17, 1000), (999, 1001, 4_000_000),
                                         (3, 5000, 1_000_000)])
def test_too_large_advice_is_in_the_terms_asked(h, w, limit):
    """Asked by long side or megapixels, the advice is the largest long side / megapixels that fit,
    which typed back in as printed is accepted, and one step more is not."""
    with pytest.raises(OutputTooLargeError) as info:
        target_size(h, w, long_side=100 * max(h, w), max_output_pixels=limit)
    side = info.value.max_long_side
    assert f"Lower the long side (at most {side} px for this {w}x{h} input)" in str(info.value)
    assert "Lower the scale" not in str(info.value)
    H, W = target_size(h, w, long_side=side, max_output_pixels=limit)
    assert max(H, W) == side and H * W <= limit
    with pytest.raises(OutputTooLargeError):
        target_size(h, w, long_side=side + 1, max_output_pixels=limit)

    with pytest.raises(OutputTooLargeError) as info:
        target_size(h, w, megapixels=limit / 1e6 * 2, max_output_pixels=limit)
    printed = f"{info.value.max_megapixels:g}"
    assert f"Lower the megapixels (at most {printed} MP for this {w}x{h} input)" in str(info.value)
    H, W = target_size(h, w, megapixels=float(printed), max_output_pixels=limit)
    assert H * W <= limit
    next_value = float(printed) + 10.0 ** (math.floor(math.log10(float(printed))) - 2)  # three digits
    with pytest.raises(OutputTooLargeError):
        target_size(h, w, megapixels=next_value, max_output_pixels=limit)


def test_resize_basic():
    x = torch.full((2, 3, 5, 7), 0.3)
    y = resize(x, (20, 28))
    assert y.shape == (2, 3, 20, 28) and torch.allclose(y, x[:, :, :1, :1].expand_as(y))
    assert resize(x, (5, 7)) is not None and torch.equal(resize(x, (5, 7)), x)
    assert resize(x.half(), (10, 14)).dtype == torch.float16


def test_resize_downscale_is_antialiased():
    # A one-pixel checkerboard: averaging gives 0.5; without antialias bicubic picks samples
    # and would give a strong pattern.
    x = ((torch.arange(30)[:, None] + torch.arange(30)[None]) % 2).float()[None, None]
    y = resize(x, (10, 10))
    assert (y - 0.5).abs().max() < 0.02
    aliased = torch.nn.functional.interpolate(x, size=(10, 10), mode="bicubic", antialias=False)
    assert (aliased - 0.5).abs().max() > 0.3


def test_resize_clamps_bicubic_overshoot():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1.0
    y = resize(x, (32, 32))
    assert y.min() >= 0 and y.max() <= 1
    assert resize(x, (32, 32), clamp=False).min() < 0  # bicubic does overshoot


def test_resize_errors():
    with pytest.raises(ValueError, match="B, C, H, W"):
        resize(torch.zeros(3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="float"):
        resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (8, 8))
    with pytest.raises(ValueError, match="lanczos"):
        resize(torch.zeros(1, 3, 4, 4), (8, 8), kind="lanczos")


def test_pad_reflect_and_crop():
    x = torch.arange(30.0).view(1, 1, 5, 6)
    p, (pb, pr) = pad_to_multiple(x, 4)
    assert p.shape == (1, 1, 8, 8) and (pb, pr) == (3, 2)
    assert torch.equal(p[0, 0, 5, :6], x[0, 0, 3])  # reflection: row 5 mirrors row 3
    assert torch.equal(p[0, 0, :5, 6], x[0, 0, :, 4])
    assert torch.equal(crop(p, 5, 6), x)
    same, pads = pad_to_multiple(torch.zeros(1, 3, 16, 32))
    assert pads == (0, 0) and same.shape == (1, 3, 16, 32)


def test_pad_tiny_image_falls_back_to_replicate():
    x = torch.tensor([[[[0.2, 0.7]]]])  # 1x2: reflection of 15 rows is impossible
    p, (pb, pr) = pad_to_multiple(x, 16)
    assert p.shape == (1, 1, 16, 16) and (pb, pr) == (15, 14)
    assert torch.allclose(p[0, 0, :, 0], torch.full((16,), 0.2))
    assert torch.allclose(p[0, 0, :, 15], torch.full((16,), 0.7))


def test_pad_constant_and_errors():
    p, _ = pad_to_multiple(torch.ones(1, 1, 3, 3), 4, mode="constant")
    assert p[0, 0, 3].sum() == 0 and p[0, 0, :3, :3].sum() == 9
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_multiple(torch.ones(1, 1, 3, 3), 4, mode="wrap")
    with pytest.raises(ValueError, match="cannot crop"):
        crop(torch.ones(1, 1, 3, 3), 4, 3)


def test_resize_antialiases_only_the_side_that_shrinks():
    """One side shrinking and the other growing: the growing side gets the plain bicubic, as in a
    pure upscale (antialiasing switched both sides to another kernel, up to 0.044 apart)."""
    row = torch.rand(1, 1, 1, 9, generator=torch.Generator().manual_seed(0))
    image = row.expand(1, 1, 12, 9).contiguous()          # equal rows: the shrink leaves them as they are
    got = resize(image, (5, 31), clamp=False)
    want = F.interpolate(row, size=(1, 31), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got, want.expand(1, 1, 5, 31), atol=1e-6, rtol=0)


def test_upscale_alpha():
    a = torch.zeros(1, 1, 4, 4)
    a[..., :, 2:] = 1
    up = upscale_alpha(a, (16, 16))
    assert up.shape == (1, 1, 16, 16) and up.min() >= 0 and up.max() <= 1
    assert torch.equal(up, resize(a, (16, 16)))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        upscale_alpha(torch.zeros(1, 3, 4, 4), (8, 8))


def test_fill_transparent_spreads_the_visible_colours_into_the_holes():
    """Pixels with any alpha keep their colour; those under alpha 0 get the visible colours around
    them (the nearest ones most), never what the file kept there; a grey picture stays grey, and a
    picture opaque or transparent everywhere is returned as it is."""
    rgb = torch.zeros(1, 3, 9, 13)               # black under the transparent part, as exporters store it
    rgb[:, 0, 2:5, 2:6] = 1.0                    # a red patch ...
    rgb[:, 2, 5:7, 8:11] = 1.0                   # ... and a blue one, half transparent
    alpha = torch.zeros(1, 1, 9, 13)
    alpha[..., 2:5, 2:6] = 1.0
    alpha[..., 5:7, 8:11] = 0.5
    out = I.fill_transparent(rgb, alpha)
    seen = alpha > 0
    assert torch.equal(out.expand_as(rgb)[seen.expand_as(rgb)], rgb[seen.expand_as(rgb)])
    holes = out.permute(0, 2, 3, 1)[~seen[:, 0]]          # [n, 3] colours filled in
    assert torch.allclose(holes.sum(-1), torch.ones(len(holes)), atol=1e-5)  # mixes of red and blue, no black
    assert holes[:, 1].abs().max() < 1e-6                                     # and no green from anywhere
    assert out[0, 0, 0, 0] > 0.9 and out[0, 2, 8, 12] > 0.9                 # each corner takes its nearer patch
    gray = rgb.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    filled = I.fill_transparent(gray, alpha)
    assert torch.allclose(filled[:, 0], filled[:, 1]) and torch.allclose(filled[:, 1], filled[:, 2])
    for same in (torch.ones_like(alpha), torch.zeros_like(alpha)):
        assert torch.equal(I.fill_transparent(rgb, same), rgb)
    # image by image: one transparent everywhere in a batch stays as it is
    batch = I.fill_transparent(torch.cat([rgb, rgb + 0.5]), torch.cat([alpha, torch.zeros_like(alpha)]))
    assert torch.equal(batch[:1], out) and torch.equal(batch[1:], rgb + 0.5)
    # fp16 in, fp16 out, computed in float32: a faint pixel alone in the dark still gives its colour
    faint = torch.zeros(1, 1, 64, 64)
    faint[..., 0, 0] = 1 / 255
    grey = torch.zeros(1, 3, 64, 64, dtype=torch.float16)
    grey[..., 0, 0] = 0.5
    half = I.fill_transparent(grey, faint.half())
    assert half.dtype == torch.float16 and float((half - 0.5).abs().max()) < 1e-3


def test_layout_helpers():
    x = torch.rand(2, 5, 7, 3)
    y = bhwc_to_bchw(x)
    assert y.shape == (2, 3, 5, 7) and y.is_contiguous() and torch.equal(y[1, 2], x[1, ..., 2])
    assert torch.equal(bchw_to_bhwc(y), x)


def test_unsupported_or_unrelated_files_are_not_called_damaged(tmp_path):
    """A whole BMP of a compression Pillow does not read is unsupported (re-downloading will not
    help), and a text file that happens to start with "BM" is no image at all."""
    import struct as st

    header = st.pack("<2sIHHI", b"BM", 14 + 40 + 4, 0, 0, 14 + 40)
    info = st.pack("<IiiHHIIiiII", 40, 2, 2, 1, 24, 4, 4, 0, 0, 0, 0)  # compression 4: BI_JPEG
    (tmp_path / "jpeg.bmp").write_bytes(header + info + b"\x00" * 4)
    with pytest.raises(I.NotAnImageError, match=r"jpeg\.bmp' cannot be read by Pillow .*variant it does not support.*re-save it"):
        I.probe_image(tmp_path / "jpeg.bmp")
    (tmp_path / "notes.png").write_text("BMW parts list: 4 wheels, 1 steering wheel\n")
    with pytest.raises(I.NotAnImageError, match="not an image"):
        I.probe_image(tmp_path / "notes.png")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_saving_in_bands_of_rows_writes_the_same_levels(tmp_path, monkeypatch, bit_depth):
    """save_image quantises a band of rows at a time (whole-picture float64 copies took 5x the
    picture's memory): every band boundary must give the levels of one pass."""
    gen = torch.Generator().manual_seed(3)
    rgb, alpha = torch.rand(1, 3, 37, 23, generator=gen), torch.rand(1, 1, 37, 23, generator=gen)
    rgb[0, :, 5, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_image(tmp_path / "nan.png", rgb, alpha, bit_depth=bit_depth)
    rgb[0, :, 5, 4] = 0.5
    save_image(tmp_path / "one-pass.png", rgb, alpha, bit_depth=bit_depth)
    save_image(tmp_path / "grey-one-pass.png", rgb, grayscale=True, bit_depth=bit_depth)
    monkeypatch.setattr(I, "_QUANTISE_BAND_PIXELS", 23 * 3 + 5)  # bands of 3 rows, the last of 1
    save_image(tmp_path / "bands.png", rgb, alpha, bit_depth=bit_depth)
    save_image(tmp_path / "grey-bands.png", rgb, grayscale=True, bit_depth=bit_depth)
    for one, banded in (("one-pass.png", "bands.png"), ("grey-one-pass.png", "grey-bands.png")):
        a, b = load_image(tmp_path / one), load_image(tmp_path / banded)
        assert torch.equal(a.rgb, b.rgb) and (a.alpha is None or torch.equal(a.alpha, b.alpha))
    levels = 65535 if bit_depth == 16 else 255
    expected = torch.floor(rgb.double().clamp(0, 1) * levels + 0.5) / levels
    assert torch.equal(load_image(tmp_path / "bands.png").rgb.double(), expected.float().double())


def test_jpeg_outputs_keep_full_colour_resolution_at_high_quality(tmp_path, rng):
    """Pillow's JPEG default subsamples colour 4:2:0 at any quality, halving the colour detail an
    upscale makes; from quality 90 (the CLI's default 95) it is stored 4:4:4, below that 4:2:0."""
    from PIL import JpegImagePlugin

    rgb = torch.from_numpy(rng.random((1, 3, 32, 48))).float()
    for quality, sampling in ((95, 0), (90, 0), (75, 2)):
        out = I.save_image(tmp_path / f"q{quality}.jpg", rgb, quality=quality)
        assert JpegImagePlugin.get_sampling(Image.open(out)) == sampling, quality


def test_a_jpegs_comment_is_carried_as_its_comment(tmp_path, rng):
    """A JPEG's COM segment was lost without a note: it is now the picture's Comment, written
    back as a JPEG comment or a PNG Comment text chunk."""
    arr = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "c.jpg", comment="my caption: café".encode())
    loaded = load_image(tmp_path / "c.jpg")
    assert loaded.text == {"Comment": "my caption: café"}
    I.save_image(tmp_path / "o.jpg", loaded.rgb, text=loaded.text)
    assert Image.open(tmp_path / "o.jpg").info["comment"] == "my caption: café".encode()
    I.save_image(tmp_path / "o.png", loaded.rgb, text=loaded.text)
    assert Image.open(tmp_path / "o.png").text["Comment"] == "my caption: café"
    Image.fromarray(arr).save(tmp_path / "latin.jpg", comment="caf\xe9".encode("latin-1"))
    assert load_image(tmp_path / "latin.jpg").text == {"Comment": "café"}

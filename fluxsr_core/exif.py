"""A photo's EXIF, carried over to its upscaled copy.

EXIF is a small TIFF structure (a byte order, then directories of 12-byte entries: tag, type,
count, value or offset). This module copies it entry by entry without decoding any value, so
types, byte order, text in any encoding and vendor data stay byte-exact. (Pillow's decode and
rewrite turned non-ASCII text into '?', wrote tags it has no type for as bytes, and put
byte-order-dependent payloads under another byte order.)

What is kept is what describes the picture; what describes the source file, or would be false
for the result, is left out:

* the first directory: only :data:`DESCRIPTIVE_TAGS` (camera, software, dates, artist,
  copyright; a TIFF file's description is its layout more often than a caption, so it is left
  out there), no orientation (the pixels are upright already), no thumbnail (IFD1);
* the Exif directory, without :data:`DROPPED_EXIF_TAGS` (the maker note, whose internal offsets
  often point into the source file; sizes and positions in the source's pixels; JPEG
  compression details); its pixel size is written for the result (:func:`with_pixel_size`);
* the GPS directory whole, the interoperability one (its "R03" marks Adobe RGB photos) without
  the source's file format and pixel size;
* no pointer to anything else (it would point into the source file).

Entries of a type this module does not know, entries over 1 MiB and entries whose value cannot
be read are left out; a whole EXIF over :data:`MAX_EXIF_BYTES` (a damaged or hostile file: a
JPEG holds at most 64 KiB) is refused.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

EXIF_PREFIX = b"Exif\x00\x00"  # how JPEG's APP1 (and Pillow's ``exif=``) holds the TIFF structure

# TIFF tags (TIFF 6.0, EXIF 2.32)
ORIENTATION = 0x0112
EXIF_IFD, GPS_IFD, INTEROP_IFD = 0x8769, 0x8825, 0xA005
IMAGE_DESCRIPTION = 0x010E
EXIF_IMAGE_WIDTH, EXIF_IMAGE_HEIGHT = 0xA002, 0xA003
DESCRIPTIVE_TAGS = frozenset({
    IMAGE_DESCRIPTION, 0x010F, 0x0110,  # Make, Model
    0x0131, 0x0132, 0x013B, 0x013C,     # Software, DateTime, Artist, HostComputer
    0x8298,                             # Copyright
})
DROPPED_EXIF_TAGS = frozenset({
    0x927C,                             # MakerNote
    EXIF_IMAGE_WIDTH, EXIF_IMAGE_HEIGHT,  # written anew for the result
    0xA20E, 0xA20F, 0xA210,             # FocalPlaneX/YResolution and unit: per source pixel
    0x9214, 0xA214,                     # SubjectArea, SubjectLocation: source pixel positions
    0x9101, 0x9102,                     # ComponentsConfiguration, CompressedBitsPerPixel: JPEG coding
    0xA420,                             # ImageUniqueID: the result is another image
})
DROPPED_INTEROP_TAGS = frozenset({0x1000, 0x1001, 0x1002})  # RelatedImageFileFormat, -Width, -Length
_POINTER_TAGS = frozenset({EXIF_IFD, GPS_IFD, INTEROP_IFD, 0x014A, 0x0190})  # also SubIFDs, GlobalParametersIFD
# bytes per value of each TIFF type (129: EXIF 3.0's UTF-8 text)
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 129: 1}
_SHORT, _LONG, _IFD = 3, 4, 13
_MAX_ENTRIES = 1000            # per directory: more is a damaged file, not a photo
_MAX_VALUE_BYTES = 1 << 20     # per entry
MAX_EXIF_BYTES = 4 << 20       # all values together (several entries may point at the same bytes)


class ExifError(ValueError):
    """The EXIF structure cannot be read (cut short, offsets out of range, loops)."""


@dataclass
class _Entry:
    tag: int
    type: int
    count: int
    data: bytes  # the value's bytes as stored, in the source's byte order


@dataclass
class _Directory:
    entries: dict[int, _Entry] = field(default_factory=dict)


@dataclass
class Exif:
    """The carried directories (``"0"``, ``"exif"``, ``"gps"``, ``"interop"``) and their byte order."""

    byte_order: str  # "<" (II) or ">" (MM)
    directories: dict[str, _Directory]


# --- reading ---------------------------------------------------------------------------------

class _CutShort(ExifError):
    """A value or directory runs past the end of the data."""


class _BigTiff(Exception):
    """A BigTIFF structure (only TIFF files use it): not read here, and not an error."""


class _Reader:
    def __init__(self, fp: BinaryIO):
        self.fp = fp  # offsets count from the TIFF header at its start
        head = self.fp.read(8)
        if head[:4] in (b"II+\x00", b"MM\x00+"):
            raise _BigTiff()
        if len(head) < 8 or head[:4] not in (b"II*\x00", b"MM\x00*"):
            raise ExifError("no TIFF header")
        self.order = "<" if head[:2] == b"II" else ">"
        self.first = struct.unpack(self.order + "I", head[4:])[0]
        self.seen: set[int] = set()
        self.budget = MAX_EXIF_BYTES

    def read(self, offset: int, size: int) -> bytes:
        self.budget -= size
        if self.budget < 0:
            raise ExifError(f"its values take more than {MAX_EXIF_BYTES >> 20} MiB (a photo's take kilobytes)")
        self.fp.seek(offset)
        data = self.fp.read(size)
        if len(data) < size:
            raise _CutShort(f"a value at offset {offset} runs past the end")
        return data

    def directory(self, offset: int) -> dict[int, _Entry]:
        if offset in self.seen:
            raise ExifError("a directory points back to another")
        self.seen.add(offset)
        (n,) = struct.unpack(self.order + "H", self.read(offset, 2))
        if n > _MAX_ENTRIES:
            raise ExifError(f"a directory claims {n} entries")
        raw = self.read(offset + 2, 12 * n)
        entries: dict[int, _Entry] = {}
        for i in range(n):
            tag, typ, count = struct.unpack(self.order + "HHI", raw[12 * i:12 * i + 8])
            value = raw[12 * i + 8:12 * i + 12]
            if typ not in _TYPE_SIZES or tag in entries:
                continue  # a type of unknown size; a tag given twice (the first counts, as for Pillow)
            size = _TYPE_SIZES[typ] * count
            if size > _MAX_VALUE_BYTES:
                continue
            if size <= 4:
                data = value[:size]
            else:
                try:
                    data = self.read(struct.unpack(self.order + "I", value)[0], size)
                except _CutShort:
                    continue  # one damaged entry (often one that is dropped anyway) costs only itself
            entries[tag] = _Entry(tag, typ, count, data)
        return entries

    def pointed(self, entries: dict[int, _Entry], tag: int) -> Optional[dict[int, _Entry]]:
        """The directory ``entries[tag]`` points to, or None."""
        at = self.pointer(entries.get(tag))
        return None if at is None else self.directory(at)

    def pointer(self, entry: Optional[_Entry]) -> Optional[int]:
        if entry is None or entry.type not in (_LONG, _IFD) or entry.count != 1:
            return None
        return struct.unpack(self.order + "I", entry.data)[0]


def parse_exif(source: bytes | BinaryIO) -> Optional[Exif]:
    """Every entry of the first, Exif, GPS and interoperability directories of an EXIF (raw
    bytes, with or without JPEG's ``Exif\\0\\0``, or a TIFF file opened for reading, whose first
    directory is its own), values undecoded; the pointers between them are left to
    :func:`to_bytes`. None when they hold nothing. Raises :class:`ExifError` for a structure that
    cannot be read (cut short, offsets out of range, loops)."""
    fp = io.BytesIO(source[len(EXIF_PREFIX):] if source.startswith(EXIF_PREFIX) else source) \
        if isinstance(source, (bytes, bytearray)) else source
    try:
        r = _Reader(fp)
        first = r.directory(r.first)
        sub = r.pointed(first, EXIF_IFD)
        dirs = {"0": first, "exif": sub or {}, "gps": r.pointed(first, GPS_IFD) or {},
                "interop": (r.pointed(sub, INTEROP_IFD) if sub else None) or {}}
    except _BigTiff:
        return None
    except (struct.error, OSError) as e:
        raise ExifError(str(e)) from e
    # Pointers are made anew by to_bytes; any other would point into the source file.
    dirs = {k: _Directory({t: e for t, e in d.items() if t not in _POINTER_TAGS and e.type != _IFD})
            for k, d in dirs.items()}
    dirs = {k: d for k, d in dirs.items() if d.entries}
    return Exif(r.order, dirs) if dirs else None


def _carried_part(exif: Exif, from_tiff_file: bool) -> Optional[Exif]:
    """What of ``exif`` describes the picture (see the module doc), or None when nothing does."""
    keep = DESCRIPTIVE_TAGS - ({IMAGE_DESCRIPTION} if from_tiff_file else set())
    dirs = dict(exif.directories)
    dirs["0"] = _Directory({t: e for t, e in dirs.get("0", _Directory()).entries.items() if t in keep})
    for name, dropped in (("exif", DROPPED_EXIF_TAGS), ("interop", DROPPED_INTEROP_TAGS)):
        if name in dirs:
            dirs[name] = _Directory({t: e for t, e in dirs[name].entries.items() if t not in dropped})
    dirs = {k: d for k, d in dirs.items() if d.entries}
    return Exif(exif.byte_order, dirs) if dirs else None


# --- writing ---------------------------------------------------------------------------------

def _short_or_long(order: str, tag: int, value: int) -> _Entry:
    """An entry holding one unsigned integer, as a SHORT when it fits (EXIF's sizes may be either)."""
    if value <= 0xFFFF:
        return _Entry(tag, _SHORT, 1, struct.pack(order + "H", value))
    return _Entry(tag, _LONG, 1, struct.pack(order + "I", value))


def to_bytes(exif: Exif) -> bytes:
    """The TIFF structure of ``exif`` with JPEG's ``Exif\\0\\0`` in front (what Pillow's
    ``exif=`` takes): the source's byte order, each directory followed by its values."""
    o = exif.byte_order
    dirs = {k: dict(d.entries) for k, d in exif.directories.items()}
    # the pointers, as placeholders of the final size (a LONG each), filled in below
    pointer_of = {"exif": ("0", EXIF_IFD), "gps": ("0", GPS_IFD), "interop": ("exif", INTEROP_IFD)}
    if "interop" in dirs and "exif" not in dirs:
        dirs["exif"] = {}
    for child, (parent, tag) in pointer_of.items():
        if child in dirs:
            dirs.setdefault(parent, {})[tag] = _Entry(tag, _LONG, 1, b"\0\0\0\0")
    order = [k for k in ("0", "exif", "interop", "gps") if k in dirs]

    def size(entries: dict[int, _Entry]) -> int:
        out_of_line = sum(len(e.data) + len(e.data) % 2 for e in entries.values() if len(e.data) > 4)
        return 2 + 12 * len(entries) + 4 + out_of_line

    at, offset = {}, 8
    for k in order:
        at[k] = offset
        offset += size(dirs[k])
    for child, (parent, tag) in pointer_of.items():
        if child in at:
            dirs[parent][tag] = _Entry(tag, _LONG, 1, struct.pack(o + "I", at[child]))
    out = bytearray((b"II*\x00" if o == "<" else b"MM\x00*") + struct.pack(o + "I", 8))
    for k in order:
        entries = [dirs[k][t] for t in sorted(dirs[k])]
        data_at = at[k] + 2 + 12 * len(entries) + 4
        head, tail = bytearray(struct.pack(o + "H", len(entries))), bytearray()
        for e in entries:
            head += struct.pack(o + "HHI", e.tag, e.type, e.count)
            if len(e.data) <= 4:
                head += e.data.ljust(4, b"\0")
            else:
                head += struct.pack(o + "I", data_at + len(tail))
                tail += e.data + (b"\0" if len(e.data) % 2 else b"")
        out += head + struct.pack(o + "I", 0) + tail  # no next directory: no thumbnail
    return EXIF_PREFIX + bytes(out)


def with_pixel_size(exif_bytes: bytes, width: int, height: int) -> Optional[bytes]:
    """``exif_bytes`` (with or without ``Exif\\0\\0``) as :func:`to_bytes` writes it, recording
    ``width x height`` as the picture's size when it has an Exif directory (where the size
    lives); None when it holds nothing. Raises :class:`ExifError` as :func:`parse_exif`."""
    exif = parse_exif(exif_bytes)
    if exif is None:
        return None
    if "exif" not in exif.directories:
        return to_bytes(exif)
    entries = exif.directories["exif"].entries
    for tag, value in ((EXIF_IMAGE_WIDTH, width), (EXIF_IMAGE_HEIGHT, height)):
        entries[tag] = _short_or_long(exif.byte_order, tag, value)
    return to_bytes(exif)


def carried_exif(source: bytes | BinaryIO, from_tiff_file: bool = False) -> Optional[bytes]:
    """The EXIF to write with the upscaled copy of ``source`` (see :func:`parse_exif`), as
    :func:`to_bytes` gives it, or None when nothing is worth carrying. ``from_tiff_file``: the
    source is a TIFF file's own first directory (its description is left out)."""
    exif = parse_exif(source)
    kept = None if exif is None else _carried_part(exif, from_tiff_file)
    return None if kept is None else to_bytes(kept)


__all__ = ["Exif", "ExifError", "parse_exif", "to_bytes", "with_pixel_size", "carried_exif", "EXIF_PREFIX",
           "DESCRIPTIVE_TAGS", "DROPPED_EXIF_TAGS"]

"""A photo's XMP packet, carried over to its upscaled copy.

XMP (ISO 16684-1) is RDF/XML: Lightroom, Photoshop, darktable, phones and DAM tools keep the
caption, keywords, rating, creator, rights and edit history there, often nowhere else. This
module edits the packet's text in place, property by property, so everything it does not
touch stays byte-exact: prefixes, order, whitespace, vendor namespaces. (Re-serialising a
parsed tree renames prefixes and drops the packet wrapper.) A property is found by its
namespace and name, in either of RDF's forms: an attribute (``tiff:Orientation="6"``) or an
element (``<tiff:Orientation>6</tiff:Orientation>``).

What is false for the result is changed or left out, as :mod:`fluxsr_core.exif` does for EXIF:

* :func:`carried_xmp` (on load): ``tiff:Orientation`` becomes 1 (the pixels are upright
  already); :data:`DROPPED_PROPERTIES` go (the thumbnail, the source's coding and pixel
  positions, its unique id and digests, the pointer to a JPEG's ExtendedXMP, which is not
  carried);
* :func:`for_written_image` (on save): the pixel size (``tiff:ImageWidth``/``ImageLength``,
  ``exif:PixelXDimension``/``PixelYDimension``) becomes the result's where the packet records
  one, and ``xmpMM:InstanceID`` a new id where it has one (XMP gives every saved file its own;
  ``xmpMM:DocumentID`` and the history stay: it is still that document).

A packet that is not UTF-8, not well-formed XML, declares a DTD (XMP forbids one; it is also
how entity bombs come in), holds no ``x:xmpmeta`` or ``rdf:RDF`` element, or is over
:data:`MAX_XMP_BYTES` raises :class:`XmpError`: callers leave it out, with a note.
"""

from __future__ import annotations

import html
import re
import uuid
import xml.etree.ElementTree as ET
from xml.parsers import expat
from typing import Optional

TIFF_NS = "http://ns.adobe.com/tiff/1.0/"
EXIF_NS = "http://ns.adobe.com/exif/1.0/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
XMP_MM_NS = "http://ns.adobe.com/xap/1.0/mm/"
XMP_NOTE_NS = "http://ns.adobe.com/xmp/note/"
_META_NS = "adobe:ns:meta/"
_RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"

PIXEL_SIZE_PROPERTIES = {  # (namespace, name) -> which side of the written image
    (TIFF_NS, "ImageWidth"): "width", (TIFF_NS, "ImageLength"): "height",
    (EXIF_NS, "PixelXDimension"): "width", (EXIF_NS, "PixelYDimension"): "height",
}
ORIENTATION = (TIFF_NS, "Orientation")
INSTANCE_ID = (XMP_MM_NS, "InstanceID")
DROPPED_PROPERTIES = frozenset({
    (XMP_NS, "Thumbnails"),  # a picture of the source (EXIF's IFD1 is left out too)
    (XMP_NOTE_NS, "HasExtendedXMP"),  # points at a JPEG's ExtendedXMP segments, which are not carried
    # how the source file's pixels were coded, not what they show
    *((TIFF_NS, n) for n in ("Compression", "PhotometricInterpretation", "SamplesPerPixel", "BitsPerSample",
                             "PlanarConfiguration", "YCbCrSubSampling", "YCbCrPositioning", "NativeDigest")),
    # per source pixel, or this very file (as in exif.DROPPED_EXIF_TAGS)
    *((EXIF_NS, n) for n in ("FocalPlaneXResolution", "FocalPlaneYResolution", "FocalPlaneResolutionUnit",
                             "SubjectArea", "SubjectLocation", "ComponentsConfiguration",
                             "CompressedBitsPerPixel", "ImageUniqueID", "NativeDigest")),
})
# A JPEG's XMP lives in one APP1 segment (and ExtendedXMP, which is not written, beyond it);
# far above that is a damaged or hostile file. Photoshop's DocumentAncestors lists can reach
# megabytes, so the bound is generous.
MAX_XMP_BYTES = 16 << 20

# XML markup, each kind as a whole (a start tag's quoted values may hold '>')
_MARKUP = re.compile(r"""<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<![^>]*>|<[^<>"']*(?:(?:"[^"]*"|'[^']*')[^<>"']*)*>""",
                     re.S)
_TAG = re.compile(r"<(/?)([^\s/>]+)(.*?)(/?)>\Z", re.S)
_ATTRIBUTE = re.compile(r"""\s+([^\s=]+)\s*=\s*("[^"]*"|'[^']*')""")


class XmpError(ValueError):
    """The XMP packet cannot be carried (not UTF-8, not well-formed, a DTD, too large...)."""


def carried_xmp(packet: bytes | str) -> Optional[bytes]:
    """``packet`` as it may travel with an upscaled copy (see the module's rules), or None when it
    is empty. Raises :class:`XmpError` when it cannot be read."""
    checked = _checked(packet)
    if checked is None:
        return None
    return _edited(checked[0], {ORIENTATION: "1"}, DROPPED_PROPERTIES).encode("utf-8")


def for_written_image(packet: bytes | str, width: int, height: int) -> Optional[bytes]:
    """``packet`` for a file of ``width x height`` pixels: that pixel size where it records one, a
    new ``xmpMM:InstanceID`` where it has one. None when empty; raises :class:`XmpError`."""
    checked = _checked(packet)
    if checked is None:
        return None
    sides = {"width": str(int(width)), "height": str(int(height))}
    values = {prop: sides[side] for prop, side in PIXEL_SIZE_PROPERTIES.items()}
    values[INSTANCE_ID] = f"xmp.iid:{uuid.uuid4()}"
    return _edited(checked[0], values, frozenset()).encode("utf-8")


def orientation(packet: bytes | str) -> Optional[int]:
    """The picture's ``tiff:Orientation`` (1-8, as EXIF's) in ``packet``, or None when it records
    none or an invalid one. Raises :class:`XmpError` when it cannot be read."""
    checked = _checked(packet)
    if checked is None:
        return None
    name = f"{{{TIFF_NS}}}Orientation"
    for description in _picture_descriptions(checked[1]):
        values = [description.get(name)] + [e.text for e in description.findall(name)]
        for value in values:
            if value is not None and value.strip() in tuple("12345678"):
                return int(value)
    return None


_RDF_ROOT = (_RDF_NS, "RDF")


def _picture_descriptions(root: ET.Element) -> list[ET.Element]:
    """The elements right under ``rdf:RDF`` (``rdf:Description``, or a typed node): the
    properties of the picture itself. Deeper ones describe other resources (Photoshop's
    ``xmpMM:Pantry`` holds whole packets of the documents placed in this one, with their own
    sizes and ids)."""
    rdf = "{%s}%s" % _RDF_ROOT
    roots = [root] if root.tag == rdf else list(root.iter(rdf))
    return [d for r in roots for d in r]


def _checked(packet: bytes | str) -> Optional[tuple[str, ET.Element]]:
    """The packet's text and parsed tree, or None when it is empty; raises :class:`XmpError`."""
    if isinstance(packet, str):
        packet = packet.encode("utf-8")
    if not isinstance(packet, (bytes, bytearray)):
        raise XmpError(f"it is held as {type(packet).__name__}, not as text")
    if len(packet) > MAX_XMP_BYTES:
        raise XmpError(f"{len(packet):,} bytes, more than any photo's XMP ({MAX_XMP_BYTES >> 20} MiB)")
    packet = bytes(packet).rstrip(b"\x00 \t\r\n")  # some writers pad with NULs
    if not packet:
        return None
    try:
        text = packet.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XmpError(f"not UTF-8 text (byte {e.start})") from None
    return text, _parsed(text)


class _Doctype(Exception):
    pass


def _refuse_doctype(*_args) -> None:
    raise _Doctype


def _parsed(text: str) -> ET.Element:
    """The parsed packet; refuses what is not a well-formed XMP packet without a DTD."""
    # expat first, to stop at a DTD before any entity in it is expanded (a DTD in a comment or
    # CDATA is text, not a DTD), with namespaces checked as ElementTree checks them
    guard = expat.ParserCreate(namespace_separator="}")
    guard.StartDoctypeDeclHandler = _refuse_doctype
    try:
        guard.Parse(text, True)
    except _Doctype:
        raise XmpError("it declares a DTD, which XMP forbids") from None
    except expat.ExpatError as e:
        raise XmpError(f"not well-formed XML ({e})") from None
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:  # (expat above found none; kept so no ParseError ever escapes)
        raise XmpError(f"not well-formed XML ({e})") from None
    names = {el.tag for el in root.iter()}
    if f"{{{_META_NS}}}xmpmeta" not in names and "{%s}%s" % _RDF_ROOT not in names:
        raise XmpError("not an XMP packet (no x:xmpmeta or rdf:RDF element)")
    return root


def _edited(text: str, values: dict[tuple[str, str], str], dropped: frozenset) -> str:
    """``text`` with each property of the picture (see :func:`_picture_descriptions`) in
    ``values`` set to its value where present (an attribute, or an element holding only text),
    and each in ``dropped`` removed; everything else byte-exact. One pass over the markup, and
    the result joined once: linear in the packet's size."""
    edits: list[tuple[int, int, str]] = []
    # per open element: (prefix -> namespace in scope, its (namespace, name))
    stack: list[tuple[dict[str, str], Optional[tuple[str, str]]]] = [
        ({"xml": "http://www.w3.org/XML/1998/namespace"}, None)]
    dropping: Optional[tuple[int, int]] = None  # (depth, start) of a dropped element being skipped
    simple_value: Optional[tuple[int, int, str]] = None  # (depth, text start, new value)
    for m in _MARKUP.finditer(text):
        tag = _TAG.match(m.group())
        if tag is None or m.group().startswith(("<!", "<?")):
            continue
        qname, attrs, empty = tag.group(2), tag.group(3), tag.group(4) == "/"
        depth = len(stack) - 1
        if tag.group(1) == "/":  # an end tag closes the innermost open element
            if simple_value is not None and simple_value[0] == depth:
                edits.append((simple_value[1], m.start(), _escaped(simple_value[2])))
            if dropping is not None and dropping[0] == depth:
                edits.append((dropping[1], m.end(), ""))
                dropping = None
            simple_value = None
            stack.pop()
            continue
        simple_value = None  # an element inside: the enclosing one holds no simple value
        names = dict(stack[-1][0])
        found = [(a, a.group(1)) for a in _ATTRIBUTE.finditer(attrs)]
        for a, name in found:
            if name == "xmlns" or name.startswith("xmlns:"):
                names[name[6:]] = html.unescape(a.group(2)[1:-1])
        element = _resolved(qname, names)
        parent, grandparent = stack[-1][1], stack[-2][1] if len(stack) > 1 else None
        if not empty:
            stack.append((names, element))
        if dropping is not None:
            continue
        if grandparent == _RDF_ROOT:  # a property of the picture
            if element in dropped:
                if empty:
                    edits.append((_line_start(text, m.start()), m.end(), ""))
                else:
                    dropping = (depth + 1, _line_start(text, m.start()))
                continue
            if element in values and not empty:
                simple_value = (depth + 1, m.end(), values[element])
        if parent == _RDF_ROOT:  # the picture's description: its properties as attributes
            offset = m.start() + tag.start(3)
            for a, name in found:
                prop = _resolved(name, names) if ":" in name and not name.startswith("xmlns:") else None
                if prop in dropped:
                    edits.append((offset + a.start(), offset + a.end(), ""))
                elif prop in values:
                    quote = a.group(2)[0]
                    edits.append((offset + a.start(2), offset + a.end(2), quote + _escaped(values[prop]) + quote))
    pieces, done = [], 0
    for start, end, new in sorted(edits):
        pieces += [text[done:start], new]
        done = end
    out = "".join(pieces) + text[done:]
    _parsed(out)  # never hand on a packet the edits broke
    return out


def _line_start(text: str, start: int) -> int:
    """``start``, or where its line begins when only spaces come before it there (a dropped
    element takes its own line with it)."""
    k = start
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    return k - 1 if k > 0 and text[k - 1] == "\n" else start


def _resolved(qname: str, names: dict[str, str]) -> Optional[tuple[str, str]]:
    prefix, _, local = qname.rpartition(":")
    uri = names.get(prefix) if prefix else names.get("")
    return (uri, local) if uri is not None else None


def _escaped(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;").replace("'", "&apos;")

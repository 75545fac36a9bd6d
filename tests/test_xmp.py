"""The XMP packet's edits: what is false for an upscaled copy changes, every other byte stays."""

import re

import pytest

from fluxsr_core import xmp

# Lightroom-style: attributes and elements, a tiff prefix that is not "tiff", a thumbnail, a
# title whose text looks like a property, an ExtendedXMP pointer, NUL padding.
SUBJECT_AREA = '\n   <exif:SubjectArea><rdf:Seq><rdf:li>10</rdf:li><rdf:li>20</rdf:li></rdf:Seq></exif:SubjectArea>'
THUMBNAILS = ('\n   <xmp:Thumbnails><rdf:Alt><rdf:li rdf:parseType="Resource">'
              '<xmpGImg:image xmlns:xmpGImg="http://ns.adobe.com/xap/1.0/g/img/">/9j/4AAQ</xmpGImg:image>'
              '</rdf:li></rdf:Alt></xmp:Thumbnails>')
SOURCE_TEXT = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about="" xmlns:t="http://ns.adobe.com/tiff/1.0/"'
    ' xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
    ' xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/" xmlns:xmpNote="http://ns.adobe.com/xmp/note/"'
    ' xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
    "   t:Orientation='6' t:ImageWidth=\"4000\" t:Compression=\"6\" xmp:Rating=\"5\"\n"
    '   xmpMM:InstanceID="xmp.iid:old" xmpMM:DocumentID="xmp.did:doc" xmpNote:HasExtendedXMP="ABC">\n'
    f'   <exif:PixelYDimension>3000</exif:PixelYDimension>{SUBJECT_AREA}{THUMBNAILS}\n'
    '   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">J\u00f6rg &amp; the "t:ImageWidth=5" sea</rdf:li>'
    '</rdf:Alt></dc:title>\n'
    '   <t:ImageLength>3000</t:ImageLength>\n'
    '  </rdf:Description>\n'
    ' </rdf:RDF>\n'
    '</x:xmpmeta>\n'
    '<?xpacket end="w"?>'
)
SOURCE = SOURCE_TEXT.encode() + b"\x00" * 7
# what the rules ask, spelled out edit by edit
CARRIED = (SOURCE_TEXT.replace("t:Orientation='6'", "t:Orientation='1'").replace(' t:Compression="6"', "")
           .replace(' xmpNote:HasExtendedXMP="ABC"', "").replace(SUBJECT_AREA, "").replace(THUMBNAILS, "")).encode()


def test_carried_packet_is_upright_without_the_source_files_properties_and_otherwise_byte_exact():
    """Orientation 1 (the pixels are upright), no thumbnail, coding, pixel positions or ExtendedXMP
    pointer; prefixes, quotes, order, whitespace and the title (whose text looks like a
    property) stay as they were."""
    assert xmp.carried_xmp(SOURCE) == CARRIED


def test_written_packet_records_the_results_size_and_a_new_instance():
    out = xmp.for_written_image(CARRIED, 16000, 12000).decode()
    assert out.count("16000") == 1 and out.count("12000") == 2
    assert 't:ImageWidth="16000"' in out and "<exif:PixelYDimension>12000</exif:PixelYDimension>" in out
    assert "<t:ImageLength>12000</t:ImageLength>" in out
    instance = re.search(r'xmpMM:InstanceID="xmp\.iid:([0-9a-f-]{36})"', out).group(1)
    again = xmp.for_written_image(CARRIED, 16000, 12000).decode()
    assert instance not in again  # each written file its own instance
    assert 'xmpMM:DocumentID="xmp.did:doc"' in out  # still the same document
    # nothing else moved: only the four values differ from the carried packet
    assert re.sub(r"16000|12000|xmp\.iid:[0-9a-f-]{36}", "", out) == re.sub(
        r"4000|3000|xmp\.iid:old", "", CARRIED.decode())


def test_properties_are_found_by_namespace_not_by_prefix():
    """A "tiff:" prefix bound to another namespace is not TIFF's; an unprefixed default namespace
    element is found by its namespace; a packet recording no size gains none."""
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description xmlns:tiff="http://example.com/not-tiff/" tiff:Orientation="6">'
              '<Orientation xmlns="http://ns.adobe.com/tiff/1.0/">8</Orientation>'
              '</rdf:Description></rdf:RDF></x:xmpmeta>').encode()
    out = xmp.carried_xmp(packet).decode()
    assert 'tiff:Orientation="6"' in out and '<Orientation xmlns="http://ns.adobe.com/tiff/1.0/">1</Orientation>' in out
    assert xmp.for_written_image(packet, 10, 20) == packet  # no size, no instance id recorded


def test_an_empty_or_padded_packet_is_none():
    assert xmp.carried_xmp(b"") is None and xmp.carried_xmp(b"\x00\x00 \n") is None
    assert xmp.for_written_image(b"\x00", 1, 1) is None


@pytest.mark.parametrize("packet,why", [
    (b'<x:xmpmeta xmlns:x="adobe:ns:meta/">', "not well-formed XML"),
    ('<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'.encode("utf-16"), "not UTF-8"),
    (b'<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>',
     "declares a DTD"),
    (b"<html><body>not metadata</body></html>", "not an XMP packet"),
    # namespace slips: well-formed to a plain XML parser, not to a namespace-aware one
    (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
     b'<rdf:Description dc:format="x"/></rdf:RDF></x:xmpmeta>', "unbound prefix"),
    (b'<x:xmpmeta xmlns:x="adobe:ns:meta/" xmlns:a="u" xmlns:b="u"><x:y a:n="1" b:n="2"/></x:xmpmeta>',
     "duplicate attribute"),
])
def test_packets_that_cannot_be_carried_raise_xmp_error(packet, why):
    with pytest.raises(xmp.XmpError, match=why):
        xmp.carried_xmp(packet)
    with pytest.raises(xmp.XmpError, match=why):
        xmp.for_written_image(packet, 1, 1)


def test_a_packet_beyond_any_photos_size_is_refused(monkeypatch):
    monkeypatch.setattr(xmp, "MAX_XMP_BYTES", 100)
    with pytest.raises(xmp.XmpError, match="more than any photo's XMP"):
        xmp.carried_xmp(CARRIED)


def test_values_written_into_xml_are_escaped():
    """A value is written as XML text: a hostile caller's size string cannot break the packet."""
    out = xmp._edited(CARRIED.decode(), {(xmp.TIFF_NS, "ImageWidth"): '1" evil="<&'}, frozenset())
    assert 't:ImageWidth="1&quot; evil=&quot;&lt;&amp;"' in out


def test_a_dtd_mentioned_in_a_comment_is_text_and_a_namespace_may_use_character_references():
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><!-- no <!DOCTYPE here --><rdf:RDF '
              'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
              'xmlns:tiff="http:&#47;&#x2F;ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    assert xmp.orientation(packet) == 6  # ElementTree resolves the references, and so must the editor
    assert 'tiff:Orientation="1"' in xmp.carried_xmp(packet).decode()


def test_a_packet_that_is_not_text_raises_xmp_error():
    with pytest.raises(xmp.XmpError, match="held as tuple, not as text"):
        xmp.carried_xmp((1, 2))


def test_only_the_pictures_own_descriptions_are_read_and_edited():
    """A description nested in a property (Photoshop's Pantry: documents placed in this one)
    keeps its orientation, size and id; the picture's own, in a second top-level description,
    are found."""
    nested = ('<xmpMM:Pantry><rdf:Bag><rdf:li><rdf:Description tiff:Orientation="8" xmpMM:InstanceID="a">'
              '<tiff:ImageWidth>7</tiff:ImageWidth></rdf:Description></rdf:li></rdf:Bag></xmpMM:Pantry>')
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
              'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/">'
              f'<rdf:Description>{nested}</rdf:Description>'
              '<rdf:Description><tiff:Orientation>3</tiff:Orientation></rdf:Description></rdf:RDF></x:xmpmeta>')
    assert xmp.orientation(packet) == 3
    carried = xmp.carried_xmp(packet).decode()
    assert nested in carried and "<tiff:Orientation>1</tiff:Orientation>" in carried
    assert nested in xmp.for_written_image(carried, 100, 50).decode()


def test_a_typed_node_is_the_pictures_description_too():
    """RDF lets a description be written as a typed node (``<tiff:Image rdf:about="">``)."""
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
              'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><tiff:Image rdf:about="" tiff:Orientation="6"/>'
              '</rdf:RDF></x:xmpmeta>')
    assert xmp.orientation(packet) == 6 and 'tiff:Orientation="1"' in xmp.carried_xmp(packet).decode()

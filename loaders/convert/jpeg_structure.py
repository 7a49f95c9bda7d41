"""The segment structure of a JPEG file: where its frame header, scans and end of image are.

One parser serves two readers: the DALI shard check (:mod:`loaders.shard_check`: would a decoder
fail on these bytes?) and the conversion's hygiene (:mod:`loaders.convert.hygiene`: the frame's size and
coding, and where the image ends so that a trailer after it is not copied into a shard).

A JPEG is a chain of marker segments. Header segments (APPn, DQT, DHT, SOFn, ...) carry a
two-byte length and may hold any bytes, ``FF`` included (EXIF thumbnails, ICC profiles, a frame
header 255 px wide), so they are skipped by length, never scanned. Only the entropy-coded data
after each SOS header is scanned: there ``FF`` is followed by ``00`` (a stuffed byte), ``D0-D7``
(a restart marker), ``FF`` (fill) or the marker that ends the scan. Marker codes that libjpeg
does not know (``FF 02``-``FF BF``, JPG, DHP, EXP, JPGn) make it fail the whole image; random
bytes in damaged entropy-coded data produce them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOI, EOI, SOS, DHT, DAC = 0xD8, 0xD9, 0xDA, 0xC4, 0xCC
# Frame headers: SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC).
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {DHT, 0xC8, DAC}
ARITHMETIC_FRAMES = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length: TEM and RST0-RST7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Codes libjpeg rejects as unknown (or unsupported): the reserved range, JPG, DHP, EXP, JPGn.
_UNKNOWN = frozenset({*range(0x02, 0xC0), 0xC8, 0xDE, 0xDF, *range(0xF0, 0xFE)})
# After FF inside entropy-coded data: these continue the scan; anything else ends it.
_CONTINUES_SCAN = np.zeros(256, dtype=bool)
_CONTINUES_SCAN[[0x00, 0xFF, *range(0xD0, 0xD8)]] = True

TRUNCATED = "truncated JPEG (no EOI marker at the end)"
NOT_JPEG = "not a JPEG (no SOI marker)"
RESERVED = "corrupt JPEG data (reserved marker code)"


class JpegStructureError(ValueError):
    """The bytes are not a JPEG a decoder can read; ``str(error)`` is the short reason."""


@dataclass(frozen=True)
class Frame:
    """A frame header (SOFn): what the image declares."""

    marker: int  # C0 baseline, C1 extended, C2 progressive, ... (see FRAME_MARKERS)
    width: int
    height: int
    precision: int
    components: tuple[tuple[int, int, int], ...]  # (id, horizontal, vertical sampling factor)

    @property
    def huffman(self) -> bool:
        """Huffman-coded (every block costs at least one bit), as opposed to arithmetic-coded."""
        return self.marker not in ARITHMETIC_FRAMES

    @property
    def progressive(self) -> bool:
        return self.marker in PROGRESSIVE_FRAMES


@dataclass(frozen=True)
class JpegLayout:
    """Where the parts of a JPEG are, by byte offset.

    Attributes:
        frame: the frame header.
        scans: how many scans (SOS segments) the image has.
        entropy_bytes: bytes of entropy-coded data over all scans.
        end: offset just past the EOI marker; bytes from here on are a trailer (zero padding,
            a phone's motion-photo video, a camera's maker data) that no decoder reads.
    """

    frame: Frame
    scans: int
    entropy_bytes: int
    end: int


def _frame(data: bytes, start: int, length: int, marker: int) -> Frame:
    if length < 8:
        raise JpegStructureError(f"corrupt JPEG (frame header of {length} bytes)")
    precision = data[start]
    height = int.from_bytes(data[start + 1:start + 3], "big")
    width = int.from_bytes(data[start + 3:start + 5], "big")
    count = data[start + 5]
    if length < 6 + 3 * count or count == 0:
        raise JpegStructureError(f"corrupt JPEG (frame header lists {count} components in {length} bytes)")
    if width == 0 or height == 0:
        # libjpeg refuses it (JERR_EMPTY_IMAGE); DNL-defined heights are not supported either
        raise JpegStructureError(f"corrupt JPEG (frame size {width}x{height})")
    components = tuple((data[start + 6 + 3 * i], data[start + 7 + 3 * i] >> 4, data[start + 7 + 3 * i] & 15)
                       for i in range(count))
    return Frame(marker=marker, width=width, height=height, precision=precision, components=components)


def jpeg_layout(data: bytes | bytearray | memoryview) -> JpegLayout:
    """Parse a JPEG's segment chain up to its EOI marker.

    Args:
        data: the file's bytes (anything after the EOI is allowed and ignored).

    Returns:
        The :class:`JpegLayout`.

    Raises:
        JpegStructureError: no SOI, truncated (no EOI reached), a marker code libjpeg rejects,
            a zero-sized or duplicate frame, a scan before the frame, or no scan at all.
    """
    data = bytes(data)
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != SOI or data[2] != 0xFF:
        raise JpegStructureError(NOT_JPEG)
    array = np.frombuffer(data, dtype=np.uint8)
    scan_ends: np.ndarray | None = None  # offsets of the FF that ends entropy-coded data, found once
    frame: Frame | None = None
    scans = entropy_bytes = 0
    position = 2
    while True:
        # Like libjpeg's next_marker: stray bytes before a marker are skipped (it only warns),
        # as are fill bytes (FF FF ...).
        position = data.find(b"\xff", position)
        if position < 0:
            raise JpegStructureError(TRUNCATED)
        while position < size and data[position] == 0xFF:
            position += 1
        if position >= size:
            raise JpegStructureError(TRUNCATED)
        code = data[position]
        position += 1
        if code == 0x00:  # FF 00 outside a scan: a stuffed byte in stray data, not a marker
            continue
        if code == EOI:
            if frame is None or scans == 0:
                raise JpegStructureError("corrupt JPEG (no image data before the EOI marker)")
            return JpegLayout(frame=frame, scans=scans, entropy_bytes=entropy_bytes, end=position)
        if code in _STANDALONE:
            continue
        if code in _UNKNOWN:
            raise JpegStructureError(RESERVED)
        if code == SOI:
            raise JpegStructureError("corrupt JPEG (a second SOI marker)")
        if position + 2 > size:
            raise JpegStructureError(TRUNCATED)
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2:
            raise JpegStructureError(f"corrupt JPEG (segment length {length})")
        if position + length > size:
            raise JpegStructureError(TRUNCATED)
        if code in FRAME_MARKERS:
            if frame is not None:
                raise JpegStructureError("corrupt JPEG (a second frame header)")
            frame = _frame(data, position + 2, length, code)
        position += length
        if code != SOS:
            continue
        if frame is None:
            raise JpegStructureError("corrupt JPEG (a scan before the frame header)")
        if scan_ends is None:
            candidates = np.flatnonzero(array[:-1] == 0xFF)
            scan_ends = candidates[~_CONTINUES_SCAN[array[candidates + 1]]]
        following = int(np.searchsorted(scan_ends, position))
        if following == len(scan_ends):
            raise JpegStructureError(TRUNCATED)
        end = int(scan_ends[following])
        while end > position and data[end - 1] == 0xFF:  # fill bytes before the marker
            end -= 1
        scans += 1
        entropy_bytes += end - position
        position = end


def jpeg_problem(data: bytes | bytearray | memoryview) -> str | None:
    """Why these bytes are not a decodable JPEG, or None when the structure looks sound."""
    try:
        jpeg_layout(data)
    except JpegStructureError as error:
        return str(error)
    return None


def too_little_data(frame: Frame, entropy_bytes: int) -> str | None:
    """Why the entropy-coded data cannot hold the frame the header declares, or None.

    A Huffman-coded scan spends at least one bit on every 8x8 block of a full-resolution
    component (its DC difference code), so fewer bytes than ``blocks / 8`` is data missing,
    however flat the image: a decoder pads it out to a grey image without failing.
    """
    if not frame.huffman:
        return None
    blocks = (frame.width // 8) * (frame.height // 8)
    needed = -(-blocks // 8)
    if entropy_bytes >= needed:
        return None
    return (f"too little data for its size: {entropy_bytes} bytes of image data for "
            f"{frame.width}x{frame.height}, which needs at least {needed}")

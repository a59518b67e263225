"""Strip metadata from a small image sent as it came: lossless, structure by structure.

Pure byte walking, no decoder: the JPEG markers, PNG chunks and RIFF chunks are
copied or dropped by their lengths, and anything that cannot be walked safely
returns None (the caller then re-encodes, which drops the metadata too).
"""

from __future__ import annotations

# Metadata. A small image is sent as it came, less what Gemini does not need and the
# owner may not want sent: EXIF (GPS position, camera serial numbers), XMP, IPTC,
# comments, text chunks and ICC profiles. Colour profiles are dropped rather than
# applied: the re-encoded path never kept them either, and a Display P3 photo read
# as sRGB is a few percent less saturated, which changes no caption. Only what
# decoding needs stays: for JPEG the tables, frame, scans, JFIF (APP0) and Adobe
# (APP14, which says whether the channels are YCbCr); for PNG the critical chunks
# and tRNS; for WebP everything but EXIF, XMP and ICCP.
_JPEG_DROPPED = frozenset({*range(0xE1, 0xEE), 0xEF, 0xFE})  # APP1..APP13, APP15, COM
_PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_WEBP_DROPPED = frozenset({b"EXIF", b"XMP ", b"ICCP"})
_VP8X_METADATA_FLAGS = 0x20 | 0x08 | 0x04  # ICC, EXIF, XMP


def strip_metadata(fmt: str, data: bytes) -> bytes | None:
    """``data`` without metadata (the same object when it had none), or None when its
    structure cannot be walked (the caller then re-encodes)."""
    if fmt == "JPEG":
        return _strip_jpeg(data)
    if fmt == "PNG":
        return _strip_png(data)
    if fmt == "WEBP":
        return _strip_webp(data)
    return None


def _strip_jpeg(data: bytes) -> bytes | None:
    size = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    kept, pos, dropped = [data[:2]], 2, False
    while pos + 1 < size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image; anything after it is dropped
            kept.append(data[pos : pos + 2])
            dropped = dropped or pos + 2 < size
            return b"".join(kept) if dropped else data
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            kept.append(data[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > size:
            return None
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size or end < pos + 4:
            return None
        if marker in _JPEG_DROPPED:
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # entropy-coded data up to the next real marker
            scan = pos
            while True:
                scan = data.find(b"\xff", scan)
                if scan < 0 or scan + 1 >= size:
                    return None
                following = data[scan + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    scan += 1
                    continue
                break
            kept.append(data[pos:scan])
            pos = scan
    return None


def _strip_png(data: bytes) -> bytes | None:
    size = len(data)
    kept, pos, dropped = [data[:8]], 8, False
    while pos + 12 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > size:
            return None
        if kind in _PNG_KEPT:
            kept.append(data[pos:end])
        else:
            dropped = True
        pos = end
        if kind == b"IEND":
            dropped = dropped or pos < size
            return b"".join(kept) if dropped else data
    return None


def _strip_webp(data: bytes) -> bytes | None:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    chunks: list[bytes] = []
    pos, dropped = 12, end < len(data)
    while pos + 8 <= end:
        kind = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        stop = pos + 8 + length + (length & 1)
        if pos + 8 + length > end:
            return None
        if kind in _WEBP_DROPPED:
            dropped = True
        else:
            chunks.append(data[pos:stop])
        pos = stop
    if pos != end and pos != end + 1:
        return None
    if not dropped:
        return data
    if chunks and chunks[0][:4] == b"VP8X":
        vp8x = bytearray(chunks[0])
        vp8x[8] &= ~_VP8X_METADATA_FLAGS & 0xFF
        chunks[0] = bytes(vp8x)
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body

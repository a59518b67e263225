"""What decoding an image costs, priced from its header alone (pure: no decoder here).

``decode_estimate`` prices a decode: the one full-size copy in the image's own mode
that PNG, GIF and WebP cannot avoid (plus libwebp's canvases, libjpeg's coefficient
buffers for progressive JPEGs, libtiff's strip or tile buffer and Pillow's per-row
pointers), and the small working set of the band-by-band shrink. ``check_header``
refuses what is priced over the budget, too many pixels, or an extreme shape.

The price is not the wall (issue 22): the decode workers give an image the memory its
price asks for and the kernel holds the decoder to it (captioner.preparing), so a
header that understates its decode is refused, never an instance out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from captioner.errors import PermanentError

# What one decode may cost, by our estimate. The deployed instance has 1 GiB; the
# pipeline lets concurrent decodes sum to this much at most (captioner.budget), next
# to ~70 MB of interpreter and libraries and the downloads it holds. 256 MiB takes
# any PNG or GIF under the 50 MP pixel limit (an RGBA one costs 4 bytes a pixel:
# 200 MB) and JPEGs of any size, but only WebPs up to ~16 MP (libwebp decodes the
# whole canvas, twice, see _WEBP_BYTES_PER_PIXEL) and progressive 4:4:4 JPEGs up
# to ~40 MP.
DECODE_BUDGET = 256 * 1024 * 1024
# Longest side over shortest. A full-page screenshot of a long web page (1280x40000)
# is 31:1; at the default 768 px edge a 50:1 image is 15 px across, too thin to say
# anything about. Beyond it the row count, not the pixel count, drives the cost:
# Pillow keeps an 8-byte pointer per row, so a 1x49,000,000 PNG took 999 MB to
# decode and convert, for a 1x768 result.
MAX_ASPECT = 50

# Bytes per pixel of a Pillow image in memory: 2- and 3-band modes are stored in
# 4 bytes (RGB is RGBX, LA is L__A), 16-bit greyscale in 2.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Pillow's image is an array of row pointers (8 bytes each) into 16 MiB blocks.
_ROW_BYTES = 8
# Measured on Pillow 13 (bench/memory.py): a 7000x7000 lossless WebP peaked at
# 769 MB, 15.7 bytes a pixel: libwebp's animation decoder keeps two RGBA canvases
# (8), hands Pillow a bytes copy (4) that is copied into the image (4).
_WEBP_BYTES_PER_PIXEL = 16
# GIF: the first frame in P mode, and Pillow's copy of it for frame disposal.
_GIF_COPIES = 2
# HEIF and AVIF decode the whole picture in the codec (libheif, libavif), then
# Pillow copies it. Measured on a 4000x3000 photo (bench/memory.py's method, a fresh
# process): HEIF +92 MB (7.7 bytes a pixel), AVIF +112 MB (9.3). So 256 MiB takes
# HEIC photos up to ~33 MP (a 24 MP iPhone photo costs ~190 MB); a 48 MP one is
# refused as too-large-to-decode.
_CODEC_BYTES_PER_PIXEL = {"HEIF": 8, "AVIF": 10}
# TIFF through libtiff (any compression) reads a whole strip or tile into a buffer
# of its declared size before unpacking it: a 64x64 image declaring one 16384x16384
# tile asked for 805 MB. Pillow's own reader (uncompressed TIFFs) reads the file.
# Beyond this many strips or tiles per page of the declared size, the list is not a
# layout but a loop: Pillow wraps extra offsets around as further passes over the
# image, and 640,000 one-byte strips of a 64x64 image took minutes of CPU.
_TIFF_EXTRA_OFFSETS = 1
_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS = 273, 324
_TIFF_ROWS_PER_STRIP, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 278, 322, 323
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLES_PER_PIXEL, _TIFF_PLANAR = 258, 277, 284
# libjpeg keeps every DCT coefficient (64 x 2 bytes per 8x8 block, per component)
# of a progressive or multi-scan JPEG until the last scan, whatever the output scale.
_COEFFICIENT_BYTES_PER_BLOCK = 128
# The shrink converts and reduces this many bytes of RGB rows at a time (at least
# one row group): small enough to vanish next to the decoded image, large enough
# that the per-band overhead (a crop, a paste) is a few percent of the CPU time.
_BAND_BYTES = 4 * 1024 * 1024
# Copies of a band alive at once: the crop, the RGBA and the white background of
# a flatten, the RGB result.
_BAND_COPIES = 4


@dataclass(frozen=True, slots=True)
class Header:
    """What a decode will cost depends on: read from the header, before any pixel."""

    format: str
    mode: str
    width: int
    height: int
    # JPEG only: (horizontal, vertical) sampling factor of each component, and
    # whether the whole image's coefficients are buffered (progressive or multi-scan).
    sampling: tuple[tuple[int, int], ...] = ()
    buffered: bool = False
    # Bytes of the file: Pillow reads chunks it skips (and WebP its whole file) with
    # BytesIO.read, which copies, so up to this much more is allocated while decoding.
    file_bytes: int = 0
    # TIFF only: the largest strip or tile buffer libtiff allocates, of its declared size.
    buffer_bytes: int = 0


def decode_estimate(header: Header, max_edge: int) -> int:
    """Peak bytes that preparing an image with this header allocates (pure).

    The full-size decode in the image's own mode (for JPEG, at the DCT-scaled size),
    the decoder's own buffers, the band working set of the shrink and the small
    result, with its copies.
    """
    width, height = header.width, header.height
    fmt = header.format
    if fmt == "JPEG":
        scale = draft_scale(width, height, max_edge)
        width, height = -(-width // scale), -(-height // scale)
        mode = "L" if header.mode == "L" else "RGB"
        decoded = _image_bytes(mode, width, height)
        # libjpeg's row buffers: one MCU row (up to 16 rows) per component, scaled.
        decoded += header.width * 16 * 4 * 2
        if header.buffered:
            decoded += _coefficient_bytes(header.width, header.height, header.sampling)
    elif fmt == "WEBP":
        decoded = _WEBP_BYTES_PER_PIXEL * width * height + _ROW_BYTES * height
    elif fmt == "GIF":
        decoded = _GIF_COPIES * _image_bytes(header.mode, width, height)
    elif fmt in _CODEC_BYTES_PER_PIXEL:
        deep = 2 if ";16" in header.mode or header.mode.startswith("I") else 1
        decoded = deep * _CODEC_BYTES_PER_PIXEL[fmt] * width * height + _ROW_BYTES * height
    else:
        # PNG: the image, and the decoder's current and previous raw rows (8 bytes a
        # pixel at most, 16-bit RGBA).
        decoded = _image_bytes(header.mode, width, height) + 2 * 8 * width
    extra = header.file_bytes + header.buffer_bytes
    return decoded + extra + _shrink_bytes(width, height, max_edge)


def check_header(
    header: Header, *, max_edge: int, max_pixels: int, max_decode_bytes: int = DECODE_BUDGET
) -> int:
    """The estimated decode cost of an image we accept; PermanentError for one we refuse."""
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise PermanentError("corrupt-image", f"image claims a size of {width}x{height}")
    if width * height > max_pixels:
        raise PermanentError(
            "too-many-pixels",
            f"{width}x{height} is over the limit of {max_pixels} pixels (CAPTION_MAX_PIXELS)",
        )
    long, short = max(width, height), min(width, height)
    if long > MAX_ASPECT * short:
        shrunk = short * min(1.0, max_edge / long)
        raise PermanentError(
            "bad-aspect-ratio",
            f"{width}x{height} is more than {MAX_ASPECT}:1; shrunk to {max_edge} px"
            f" it would be {shrunk:.2g} px across",
        )
    cost = decode_estimate(header, max_edge)
    if cost > max_decode_bytes:
        raise PermanentError(
            "too-large-to-decode",
            f"decoding this {width}x{height} {header.format} ({header.mode}) would take"
            f" ~{cost / 2**20:.0f} MiB, over the {max_decode_bytes / 2**20:.0f} MiB"
            " one image may use",
        )
    return cost


def tiff_buffer(tags: Mapping[int, Any], width: int, height: int) -> int:
    """The largest strip or tile buffer libtiff allocates for a ``width`` x ``height``
    page, by its tags; PermanentError for a strip or tile list longer than the page
    needs."""
    bits = tags.get(_TIFF_BITS_PER_SAMPLE, (8,))
    bits_per_pixel = sum(bits) if isinstance(bits, tuple) else int(bits)
    if _TIFF_TILE_OFFSETS in tags:
        across = int(tags.get(_TIFF_TILE_WIDTH) or width)
        down = int(tags.get(_TIFF_TILE_LENGTH) or height)
        offsets = tags[_TIFF_TILE_OFFSETS]
    else:
        across = width
        down = min(int(tags.get(_TIFF_ROWS_PER_STRIP) or height), height)
        offsets = tags.get(_TIFF_STRIP_OFFSETS, ())
    if across < 1 or down < 1:
        raise PermanentError("corrupt-image", f"TIFF strips or tiles of {across}x{down}")
    planes = 1
    if tags.get(_TIFF_PLANAR) == 2:  # one sample per strip or tile, each plane in turn
        planes = int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1))
        bits_per_pixel = max(bits) if isinstance(bits, tuple) else int(bits)
    needed = -(-width // across) * -(-height // down) * planes
    count = len(offsets) if isinstance(offsets, tuple) else 1
    if count > needed + _TIFF_EXTRA_OFFSETS:
        raise PermanentError(
            "corrupt-image",
            f"the TIFF lists {count} strips or tiles where its {width}x{height} page has {needed}",
        )
    return -(-across * down * bits_per_pixel // 8)


def webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's canvas (VP8X) or frame (VP8, VP8L) size from its first chunk, or None."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    return None


def first_scan_components(data: bytes) -> int:
    """Components in a JPEG's first scan. libjpeg buffers the whole image's
    coefficients when it is progressive or when this is fewer than the frame's
    components (a baseline image sent one component per scan): jdinput.c decides
    at the first SOS. Marker segments are skipped by length, so an EXIF
    thumbnail's own scan is never read, and only the header bytes are touched
    (counting SOS markers over a 14 MB photo held the GIL for 15 ms)."""
    pos, size = 2, len(data)
    while pos + 4 < size:
        if data[pos] != 0xFF:
            return 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return data[pos + 4]
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


def draft_scale(width: int, height: int, max_edge: int) -> int:
    """The DCT scale (1, 2, 4 or 8) ``Image.draft`` picks in ``prepare`` (as Pillow does)."""
    scale = max_edge / max(width, height)
    wanted = (max(1, round(width * scale)), max(1, round(height * scale)))
    ratio = min(width // wanted[0], height // wanted[1])
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _coefficient_bytes(width: int, height: int, sampling: tuple[tuple[int, int], ...]) -> int:
    h_max = max(h for h, _ in sampling)
    v_max = max(v for _, v in sampling)
    blocks = 0
    for h, v in sampling:
        across = -(-math.ceil(width * h / h_max) // 8)
        down = -(-math.ceil(height * v / v_max) // 8)
        blocks += (-(-across // h) * h) * (-(-down // v) * v)
    return blocks * _COEFFICIENT_BYTES_PER_BLOCK


def _image_bytes(mode: str, width: int, height: int) -> int:
    return _PIXEL_BYTES.get(mode, 4) * width * height + _ROW_BYTES * height


def target_size(width: int, height: int, max_edge: int) -> tuple[int, int]:
    """The size ``Image.thumbnail((max_edge, max_edge))`` gives (same rounding)."""
    if width <= max_edge and height <= max_edge:
        return width, height
    aspect = width / height
    if aspect >= 1:
        candidates = (math.floor(max_edge / aspect), math.ceil(max_edge / aspect))
        down = min(candidates, key=lambda n: 0 if n == 0 else abs(aspect - max_edge / n))
        return max_edge, max(down, 1)
    candidates = (math.floor(max_edge * aspect), math.ceil(max_edge * aspect))
    across = min(candidates, key=lambda n: abs(aspect - n / max_edge))
    return max(across, 1), max_edge


def shrink_factors(width: int, height: int, max_edge: int) -> tuple[int, int]:
    target_w, target_h = target_size(width, height, max_edge)
    return max(1, width // target_w), max(1, height // target_h)


def band_rows(width: int, factor_y: int) -> int:
    groups = max(1, _BAND_BYTES // (4 * width * factor_y))
    return groups * factor_y


def _shrink_bytes(width: int, height: int, max_edge: int) -> int:
    factor_x, factor_y = shrink_factors(width, height, max_edge)
    band = _BAND_COPIES * 4 * width * min(height, band_rows(width, factor_y))
    reduced = _image_bytes("RGB", -(-width // factor_x), -(-height // factor_y))
    # The reduced image, the resized one, the turned one, and the JPEG encoder's rows.
    return band + 3 * reduced + 4 * max_edge * 16

"""Pillow adapter: check an image, fix its orientation and make it small enough to send.

JPEGs are decoded at a reduced scale (``Image.draft``: libjpeg's DCT scaling by
1/2, 1/4 or 1/8), which is most of the saving on large photos: a 4000x3000 photo
is decoded straight to 1000x750 and never exists at full size. What is left is
cheap on purpose (see bench/RESULTS.md): a box-filter resample of that small
image, and a plain JPEG save without ``optimize`` (an extra Huffman pass that
saves ~1% of bytes for twice the encoding time).

Memory is bounded before anything is decoded (see "Decode memory" in
bench/RESULTS.md). ``decode_estimate`` prices a decode from the header alone: the
one full-size copy in the image's own mode that PNG, GIF and WebP cannot avoid
(plus libwebp's canvases, libjpeg's coefficient buffers for progressive JPEGs and
Pillow's per-row pointers), and the small working set of the shrink. Anything
priced over ``DECODE_BUDGET`` is refused (``too-large-to-decode``), as is an
aspect ratio over 50:1 (``bad-aspect-ratio``). The shrink then never makes a
second full-size copy: the image is converted to RGB and reduced one band of
rows at a time, so a 49 MP RGBA PNG peaks at its own 196 MB, not at the 640 MB
the whole-image conversions used to take.

The estimate is a price, not a wall: the decode itself runs in a worker process
whose address space and CPU time the kernel limits (captioner.workers,
captioner.preparing), so a header that lies about what its decode needs ends in a
refusal, not in an instance out of memory. Anything a decoder raises on bytes we
did not make is the image's fault: ``decoder_failures`` turns it into a
PermanentError, so ``prepare`` raises nothing else.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pillow_heif
from PIL import AvifImagePlugin, Image, ImageFile, UnidentifiedImageError

from captioner.adapters.stripping import strip_metadata
from captioner.domain import PreparedImage
from captioner.errors import CaptionerError, PermanentError

# HEIC/HEIF (every iPhone photo since 2017) through pillow-heif, the libheif binding
# Pillow's own docs point to: BSD-licensed, wheels for CPython 3.11-3.13 on
# manylinux_2_28 x86_64 (what the python312 Cloud Run runtime, Ubuntu 22.04, runs),
# decode-only use. AVIF, TIFF and BMP are Pillow's own (AVIF since Pillow 11.2).
pillow_heif.register_heif_opener()
# One codec thread per decode. Images are decoded side by side in worker processes,
# one per CPU (captioner.preparing); codec threads would only compete with them for
# the same cores, and each costs an 8 MiB stack inside a worker's address-space limit.
pillow_heif.options.DECODE_THREADS = 1
AvifImagePlugin.DEFAULT_MAX_THREADS = 1

# Formats we accept from a bucket. JPEG, PNG and WebP small enough are sent as they
# are; everything else (a GIF's first frame, HEIC, AVIF, a TIFF's first page, BMP)
# is re-encoded as JPEG, which every Gemini model takes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "HEIF", "AVIF", "TIFF", "BMP")
_SENDABLE_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_SENDABLE_MODES = {
    "JPEG": {"RGB", "L"},
    "PNG": {"RGB", "RGBA", "L", "LA", "P"},
    "WEBP": {"RGB", "RGBA"},
}
_ORIENTATION_TAG = 0x0112
# How to turn an image stored with EXIF orientation 2..8 upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_JPEG_QUALITY = 85
# After DCT scaling (or Image.reduce, below) only a factor under 2 is left, e.g.
# 1000x750 -> 768x576. There a box filter averages the one or two source pixels
# under each output pixel: no aliasing to see, a little sharper than bilinear, and
# the cheapest of Pillow's filters (Lanczos took 12 ms of a 12 MP photo's 40 ms).
_RESAMPLE = Image.Resampling.BOX
# Images that cannot be decoded at reduced scale (PNG, WebP, GIF) are first
# shrunk by the largest integer factor that keeps them at least the target size,
# with ``Image.reduce`` (an exact box average); the resampling pass then covers a
# factor below 2. This halves the resampling time of a 2560x1440 screenshot.
# (The reduce is done band by band, below, with the same factors Image.thumbnail
# would pick for a reducing_gap of 1.0.)
# Above this, even a small-enough image is re-encoded rather than sent as is.
_AS_IS_MAX_BYTES = 400 * 1024

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

ImageFile.LOAD_TRUNCATED_IMAGES = False

# glibc gives each thread that allocates under contention its own malloc arena, and
# keeps what is freed there for that arena's reuse. Pillow's 16 MiB image blocks
# land in those arenas, so each prepare thread held on to the peak of its own
# largest decode: 16 hostile images at once peaked at 565 MB against the 361 MB
# their budgets allow. One arena lets every thread reuse what another freed
# (336 MB, same CPU time; a fixed mmap threshold instead cost 65% more CPU in page
# faults). Set here, at import, before the prepare threads exist.
_M_ARENA_MAX = -8


def _one_malloc_arena() -> None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError, ValueError):  # not glibc: nothing to tune
        pass


_one_malloc_arena()


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
        scale = _draft_scale(width, height, max_edge)
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


def decode_cost(
    data: bytes,
    *,
    max_edge: int = 768,
    max_pixels: int = 50_000_000,
    max_decode_bytes: int = DECODE_BUDGET,
) -> int:
    """Bytes ``prepare(data)`` will allocate at its peak, from the header; never raises.

    Something ``prepare`` refuses before decoding costs next to nothing, and so does
    something that is not an image. Cheap for a photo (0.2-0.3 ms, only the header is
    read), but it parses hostile bytes: the decode workers run it, not the event loop.
    """
    try:
        with decoder_failures():
            precheck(data, max_edge, max_pixels, max_decode_bytes)
            with opened(data) as image:
                return check(image, data, max_edge, max_pixels, max_decode_bytes)
    except PermanentError:
        return 0


def prepare(
    data: bytes,
    *,
    max_edge: int = 768,
    max_pixels: int = 50_000_000,
    max_decode_bytes: int = DECODE_BUDGET,
) -> PreparedImage:
    """Verify ``data`` is an image and return what to send to Gemini.

    Raises PermanentError with a reason slug for anything that will never work, and
    nothing else, whatever the bytes (decoder_failures).
    """
    with decoder_failures():
        precheck(data, max_edge, max_pixels, max_decode_bytes)
        with opened(data) as image:
            check(image, data, max_edge, max_pixels, max_decode_bytes)
            return prepare_opened(image, data, max_edge)


def precheck(data: bytes, max_edge: int, max_pixels: int, max_decode_bytes: int) -> None:
    """Refuse, before Pillow opens it, what Pillow's opening alone would cost too much:
    its WebP plugin makes libwebp's two canvases when it opens a file (8 bytes a
    declared pixel: 392 MB for 7000x7000), so a WebP's size is read here first."""
    size = _webp_size(data)
    if size is not None:
        header = Header("WEBP", "RGBA", *size, file_bytes=len(data))
        check_header(
            header, max_edge=max_edge, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes
        )


@contextmanager
def opened(data: bytes) -> Iterator[ImageFile.ImageFile]:
    """The image Pillow opens from ``data`` (its header read, no pixel decoded)."""
    image = _open(data)
    with image:
        yield image


def check(
    image: ImageFile.ImageFile, data: bytes, max_edge: int, max_pixels: int, max_decode_bytes: int
) -> int:
    """The estimated cost of decoding an opened image; PermanentError if it is refused."""
    return check_header(
        _header(image, data),
        max_edge=max_edge,
        max_pixels=max_pixels,
        max_decode_bytes=max_decode_bytes,
    )


def prepare_opened(image: ImageFile.ImageFile, data: bytes, max_edge: int) -> PreparedImage:
    """Decode an opened and checked image and make what is sent to Gemini."""
    # Hand the decoder all the bytes at once. Pillow feeds it 64 KiB at a time by
    # default and takes the GIL back between blocks; next to another busy thread each
    # retake can wait out the 5 ms switch interval (a 1 MB JPEG took 110 ms, not 20).
    image.decodermaxblock = max(image.decodermaxblock, len(data))
    source_format = image.format or "unknown"
    width, height = image.size
    orientation = _orientation(image)
    if (
        source_format in _SENDABLE_AS_IS
        and image.mode in _SENDABLE_MODES[source_format]
        and max(width, height) <= max_edge
        and orientation in (0, 1)
        and len(data) <= _AS_IS_MAX_BYTES
    ):
        _load(image)  # proves the data decodes before we spend a Gemini call on it
        stripped = strip_metadata(source_format, data)
        if stripped is not None:
            return PreparedImage(
                data=stripped,
                mime_type=_SENDABLE_AS_IS[source_format],
                width=width,
                height=height,
                source_format=source_format,
                source_width=width,
                source_height=height,
                reencoded=False,
            )
        # A structure we cannot walk safely: re-encoding drops the metadata too.
    return _reencoded(image, source_format, orientation, max_edge)


# Pillow's decoders report a failed allocation as error -9 (IMAGING_CODEC_MEMORY), which
# ImageFile names "out of memory error" and the libtiff path "decoder error -9";
# libheif names its own size limits "Security limit exceeded".
_MEMORY_MESSAGES = ("decoder error -9", "out of memory", "security limit exceeded")


@contextmanager
def decoder_failures() -> Iterator[None]:
    """Whatever a decoder raises on bytes we did not make is the image's fault.

    Pillow's plugins and the codecs under them raise what they like on hostile input:
    RuntimeError and ZeroDivisionError (AVIF), RuntimeError (libheif), OverflowError
    (TIFF set-up), and our own header parsing can fail the same way. Each becomes a
    PermanentError (recorded once, answered 2xx), never a 500 that Eventarc
    redelivers for 24 hours. Our own errors pass through as they are.
    """
    try:
        yield
    except CaptionerError:
        raise
    except MemoryError as exc:
        # The failed decode's objects live on in the traceback's frames; let them go
        # first, or even making the error below can fail under a memory limit.
        traceback.clear_frames(exc.__traceback__)
        raise PermanentError(
            "too-large-to-decode", "decoding this image ran out of the memory it may use"
        ) from None
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"[:200]
        if any(marker in text.lower() for marker in _MEMORY_MESSAGES):
            raise PermanentError(
                "too-large-to-decode",
                f"the decoder could not have the memory it asked for ({text})",
            ) from None
        raise PermanentError("corrupt-image", f"cannot decode the image ({text})") from None


def _reencoded(
    image: ImageFile.ImageFile, source_format: str, orientation: int, max_edge: int
) -> PreparedImage:
    """Decode (at reduced scale where the format allows), shrink, turn upright, JPEG."""
    width, height = image.size
    if source_format == "JPEG":
        # Ask libjpeg for the smallest scale that still covers max_edge after rotation.
        scale = max_edge / max(width, height)
        image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
    _load(image)
    frame = _shrink(image, max_edge)
    if orientation in _UPRIGHT:
        # After the resize: the bound is square, and turning fewer pixels is cheaper.
        frame = frame.transpose(_UPRIGHT[orientation])
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=_JPEG_QUALITY)
    return PreparedImage(
        data=out.getvalue(),
        mime_type="image/jpeg",
        width=frame.width,
        height=frame.height,
        source_format=source_format,
        source_width=width,
        source_height=height,
        reencoded=True,
    )


def sniff_format(data: bytes) -> str | None:
    """The format an object's first bytes claim, whatever its content type says."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
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


def _open(data: bytes) -> ImageFile.ImageFile:
    if not data:
        raise PermanentError("empty", "the object has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PermanentError("too-many-pixels", str(exc)) from None
    except Image.DecompressionBombWarning as exc:
        raise PermanentError("too-many-pixels", str(exc)) from None
    except UnidentifiedImageError:
        if (claimed := sniff_format(data)) is not None:
            raise PermanentError(
                "corrupt-image", f"starts like a {claimed} but cannot be read"
            ) from None
        raise PermanentError("not-an-image", f"not a {'/'.join(ACCEPTED_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PermanentError("corrupt-image", f"cannot read the image: {exc}") from None
    assert isinstance(image, ImageFile.ImageFile)
    return image


def _header(image: Image.Image, data: bytes) -> Header:
    fmt = image.format or "unknown"
    width, height = image.size
    if fmt == "TIFF":
        return Header(
            fmt, image.mode, width, height, file_bytes=len(data), buffer_bytes=_tiff_buffer(image)
        )
    if fmt != "JPEG":
        return Header(fmt, image.mode, width, height, file_bytes=len(data))
    layers = getattr(image, "layer", None) or []
    sampling = tuple((int(h), int(v)) for _, h, v, _ in layers) or ((1, 1),)
    if not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in sampling):
        # ITU T.81 B.2.2: sampling factors are 1 to 4 (0 made the estimate divide by zero).
        raise PermanentError("corrupt-image", f"JPEG sampling factors {sampling} are not 1 to 4")
    buffered = bool(image.info.get("progressive")) or _first_scan_components(data) < len(sampling)
    return Header(fmt, image.mode, width, height, sampling, buffered, len(data))


def _tiff_buffer(image: Image.Image) -> int:
    """The largest strip or tile buffer libtiff allocates for this page, by its tags;
    PermanentError for a strip or tile list longer than the page's size needs."""
    tags = getattr(image, "tag_v2", {})
    width, height = image.size
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


def _first_scan_components(data: bytes) -> int:
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


def _draft_scale(width: int, height: int, max_edge: int) -> int:
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


def _target_size(width: int, height: int, max_edge: int) -> tuple[int, int]:
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


def _factors(width: int, height: int, max_edge: int) -> tuple[int, int]:
    target_w, target_h = _target_size(width, height, max_edge)
    return max(1, width // target_w), max(1, height // target_h)


def _band_rows(width: int, factor_y: int) -> int:
    groups = max(1, _BAND_BYTES // (4 * width * factor_y))
    return groups * factor_y


def _shrink_bytes(width: int, height: int, max_edge: int) -> int:
    factor_x, factor_y = _factors(width, height, max_edge)
    band = _BAND_COPIES * 4 * width * min(height, _band_rows(width, factor_y))
    reduced = _image_bytes("RGB", -(-width // factor_x), -(-height // factor_y))
    # The reduced image, the resized one, the turned one, and the JPEG encoder's rows.
    return band + 3 * reduced + 4 * max_edge * 16


def _shrink(image: Image.Image, max_edge: int) -> Image.Image:
    """An RGB image fitting ``max_edge``, made without a second full-size copy.

    Same result as converting the whole image and calling ``thumbnail`` with a
    reducing_gap of 1.0: ``reduce`` by integer factors, then a box resample of the
    rest. The conversion and the reduce go one band of rows at a time (a band is a
    multiple of the vertical factor, so the box averages are the same), and
    flattening on white before averaging equals averaging premultiplied colours.
    """
    width, height = image.size
    target = _target_size(width, height, max_edge)
    factor_x, factor_y = _factors(width, height, max_edge)
    if (factor_x, factor_y) == (1, 1):
        reduced = _to_rgb(image)
    else:
        reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
        rows = _band_rows(width, factor_y)
        for top in range(0, height, rows):
            band = image.crop((0, top, width, min(height, top + rows)))
            if band.mode in ("L", "RGB"):  # averaging commutes with L -> RGB
                small = band.reduce((factor_x, factor_y)).convert("RGB")
            else:
                small = _to_rgb(band).reduce((factor_x, factor_y))
            reduced.paste(small, (0, top // factor_y))
            del band, small
    if reduced.size == target:
        return reduced
    box = (0.0, 0.0, width / factor_x, height / factor_y)
    return reduced.resize(target, _RESAMPLE, box=box)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 0)
    except Exception:  # a broken EXIF block should not sink an otherwise fine image
        return 0
    return value if isinstance(value, int) and 1 <= value <= 8 else 0


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise PermanentError("too-many-pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PermanentError("corrupt-image", f"cannot decode the image: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for JPEG output: flatten transparency on white, scale 16-bit to 8-bit."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # By bit depth, not by the content's peak: a near-black 16-bit image stays
        # near-black (65535 -> 255, 257 -> 1). Pillow would clip, not scale.
        image = image.convert("I").point(lambda value: value / 257).convert("L")
        mode = "L"
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return image
    if mode == "F":  # 32-bit float TIFF: Pillow has no F -> RGB conversion
        image = image.convert("L")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot turn into RGB (e.g. some TIFFs)
        raise PermanentError("unsupported-image", f"cannot read {mode} pixels: {exc}") from None


def warm() -> None:
    """Load Pillow's plugins and run the JPEG and PNG codecs once (a decode worker
    calls this before it measures what it has mapped)."""
    Image.init()
    for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, fmt)
        prepare(out.getvalue(), max_edge=8)

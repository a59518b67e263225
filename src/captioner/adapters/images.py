"""Pillow adapter: check an image, fix its orientation and make it small enough to send.

JPEGs are decoded at a reduced scale (``Image.draft``: libjpeg's DCT scaling by
1/2, 1/4 or 1/8), which is most of the saving on large photos: a 4000x3000 photo
is decoded straight to 1000x750 and never exists at full size. What is left is
cheap on purpose (see bench/RESULTS.md): a box-filter resample of that small
image, and a plain JPEG save without ``optimize`` (an extra Huffman pass that
saves ~1% of bytes for twice the encoding time).

Memory is priced before anything is decoded (adapters/decode_price.py; see "Decode
memory" in bench/RESULTS.md): anything priced over ``DECODE_BUDGET`` is refused
(``too-large-to-decode``), as is an aspect ratio over 50:1 (``bad-aspect-ratio``).
The shrink then never makes a second full-size copy: the image is converted to RGB
and reduced one band of rows at a time, so a 49 MP RGBA PNG peaks at its own
196 MB, not at the 640 MB the whole-image conversions used to take.

The price is not the wall: the decode itself runs in a worker process whose
address space and CPU time the kernel limits (captioner.workers,
captioner.preparing), so a header that lies about what its decode needs ends in a
refusal, not in an instance out of memory. Anything a decoder raises on bytes we
did not make is the image's fault: ``decoder_failures`` turns it into a
PermanentError, so ``prepare`` raises nothing else.
"""

from __future__ import annotations

import ctypes
import io
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import (
    AvifImagePlugin,
    Image,
    ImageFile,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from captioner.adapters.decode_price import (
    DECODE_BUDGET,
    Header,
    band_rows,
    check_header,
    first_scan_components,
    shrink_factors,
    target_size,
    tiff_buffer,
    webp_size,
)
from captioner.adapters.stripping import strip_metadata
from captioner.domain import PreparedImage
from captioner.errors import CaptionerError, PermanentError

# Imported to register their formats with Pillow (see _FORMATS_WITHOUT_HEIF).
_PLUGINS = (AvifImagePlugin, TiffImagePlugin, WebPImagePlugin)
# One codec thread per decode. Images are decoded side by side in worker processes,
# one per CPU (captioner.preparing); codec threads would only compete with them for
# the same cores, and each costs an 8 MiB stack inside a worker's address-space limit.
AvifImagePlugin.DEFAULT_MAX_THREADS = 1


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF (every iPhone photo since 2017) through pillow-heif,
    the libheif binding Pillow's own docs point to: BSD-licensed, wheels for CPython
    3.11-3.13 on manylinux_2_28 x86_64 (what the python312 Cloud Run runtime, Ubuntu
    22.04, runs), decode-only use. AVIF, TIFF and BMP are Pillow's own (AVIF since
    Pillow 11.2). Loaded on the first file that could be one (an ISO-BMFF ``ftyp``
    box): libheif and its codecs are ~8 MB more resident in each decode worker."""
    global _heif_registered
    if not _heif_registered:
        import pillow_heif

        pillow_heif.register_heif_opener()
        pillow_heif.options.DECODE_THREADS = 1  # as for AVIF, above
        _heif_registered = True


_heif_registered = False

# Formats we accept from a bucket. JPEG, PNG and WebP small enough are sent as they
# are; everything else (a GIF's first frame, HEIC, AVIF, a TIFF's first page, BMP)
# is re-encoded as JPEG, which every Gemini model takes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "HEIF", "AVIF", "TIFF", "BMP")
# Until pillow-heif is loaded (register_heif). Naming a format Pillow has not
# registered makes it import all ~40 of its plugins (Image.init): ~40 ms and ~3 MB
# more for each decode worker to start.
_FORMATS_WITHOUT_HEIF = tuple(fmt for fmt in ACCEPTED_FORMATS if fmt != "HEIF")
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
    size = webp_size(data)
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


def _open(data: bytes) -> ImageFile.ImageFile:
    if not data:
        raise PermanentError("empty", "the object has no bytes")
    if data[4:8] == b"ftyp":
        register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            formats = ACCEPTED_FORMATS if _heif_registered else _FORMATS_WITHOUT_HEIF
            image = Image.open(io.BytesIO(data), formats=formats)
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
            fmt,
            image.mode,
            width,
            height,
            file_bytes=len(data),
            buffer_bytes=tiff_buffer(getattr(image, "tag_v2", {}), width, height),
        )
    if fmt != "JPEG":
        return Header(fmt, image.mode, width, height, file_bytes=len(data))
    layers = getattr(image, "layer", None) or []
    sampling = tuple((int(h), int(v)) for _, h, v, _ in layers) or ((1, 1),)
    if not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in sampling):
        # ITU T.81 B.2.2: sampling factors are 1 to 4 (0 made the estimate divide by zero).
        raise PermanentError("corrupt-image", f"JPEG sampling factors {sampling} are not 1 to 4")
    buffered = bool(image.info.get("progressive")) or first_scan_components(data) < len(sampling)
    return Header(fmt, image.mode, width, height, sampling, buffered, len(data))


def _shrink(image: Image.Image, max_edge: int) -> Image.Image:
    """An RGB image fitting ``max_edge``, made without a second full-size copy.

    Same result as converting the whole image and calling ``thumbnail`` with a
    reducing_gap of 1.0: ``reduce`` by integer factors, then a box resample of the
    rest. The conversion and the reduce go one band of rows at a time (a band is a
    multiple of the vertical factor, so the box averages are the same), and
    flattening on white before averaging equals averaging premultiplied colours.
    """
    width, height = image.size
    target = target_size(width, height, max_edge)
    factor_x, factor_y = shrink_factors(width, height, max_edge)
    if (factor_x, factor_y) == (1, 1):
        reduced = _to_rgb(image)
    else:
        reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
        rows = band_rows(width, factor_y)
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
    """Run the JPEG and PNG codecs once (a decode worker calls this before it measures
    what it has mapped)."""
    for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, fmt)
        prepare(out.getvalue(), max_edge=8)

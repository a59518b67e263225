"""Pillow adapter: check an image, fix its orientation and make it small enough to send.

JPEGs are decoded at a reduced scale (``Image.draft``: libjpeg's DCT scaling by
1/2, 1/4 or 1/8), which is most of the saving on large photos: a 4000x3000 photo
is decoded straight to 1000x750 and never exists at full size. What is left is
cheap on purpose (see bench/RESULTS.md): a box-filter resample of that small
image, and a plain JPEG save without ``optimize`` (an extra Huffman pass that
saves ~1% of bytes for twice the encoding time).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

from captioner.domain import PreparedImage
from captioner.errors import PermanentError

# Formats we accept from a bucket. Gemini itself takes JPEG, PNG and WebP; a GIF
# is sent as its first frame, re-encoded.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
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
_REDUCING_GAP = 1.0
# Above this, even a small-enough image is re-encoded rather than sent as is.
_AS_IS_MAX_BYTES = 400 * 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False


def prepare(data: bytes, *, max_edge: int = 768, max_pixels: int = 50_000_000) -> PreparedImage:
    """Verify ``data`` is an image and return what to send to Gemini.

    Raises PermanentError with a reason slug for anything that will never work.
    """
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

    with image:
        # Hand the decoder all the bytes at once. Pillow feeds it 64 KiB at a time by
        # default and takes the GIL back between blocks; in a worker thread next to a
        # busy event loop each retake can wait out the 5 ms switch interval, which made
        # a 1 MB JPEG's decode take 110 ms of wall time instead of 20 and stalled the loop.
        image.decodermaxblock = max(image.decodermaxblock, len(data))
        source_format = image.format or "unknown"
        width, height = image.size
        if width <= 0 or height <= 0:
            raise PermanentError("corrupt-image", f"image claims a size of {width}x{height}")
        if width * height > max_pixels:
            raise PermanentError(
                "too-many-pixels",
                f"{width}x{height} is over the limit of {max_pixels} pixels (CAPTION_MAX_PIXELS)",
            )
        orientation = _orientation(image)
        if (
            source_format in _SENDABLE_AS_IS
            and image.mode in _SENDABLE_MODES[source_format]
            and max(width, height) <= max_edge
            and orientation in (0, 1)
            and len(data) <= _AS_IS_MAX_BYTES
        ):
            _load(image)  # proves the data decodes before we spend a Gemini call on it
            return PreparedImage(
                data=data,
                mime_type=_SENDABLE_AS_IS[source_format],
                width=width,
                height=height,
                source_format=source_format,
                source_width=width,
                source_height=height,
                reencoded=False,
            )
        if source_format == "JPEG":
            # Ask libjpeg for the smallest scale that still covers max_edge after rotation.
            scale = max_edge / max(width, height)
            image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        _load(image)
        frame = _to_rgb(image)
        frame.thumbnail((max_edge, max_edge), _RESAMPLE, reducing_gap=_REDUCING_GAP)
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
    return None


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
        # Pillow clips rather than scales when it converts 16-bit to 8-bit.
        peak = image.getextrema()[1]
        divisor = 256 if isinstance(peak, int) and peak > 255 else 1
        image = image.convert("I").point(lambda value: value / divisor).convert("L")
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
    return image.convert("RGB")

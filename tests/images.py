"""Test images made on the fly: the sample photos, and broken or hostile ones."""

from __future__ import annotations

import functools
import io
import os
import random
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from PIL import Image

from captioner_dev import PHOTOS  # the sample photos, shipped in the repository


def photo(name: str = "chelsea.jpg") -> bytes:
    return (PHOTOS / name).read_bytes()


def photo_path(name: str = "chelsea.jpg") -> Path:
    return PHOTOS / name


def all_photos() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def solid(
    size: tuple[int, int] = (64, 48), color: object = (200, 30, 30), mode: str = "RGB"
) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


def truncated_jpeg() -> bytes:
    data = photo("coffee.jpg")
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    """A JPEG start-of-image marker whose tables and headers are garbage."""
    data = photo("coffee.jpg")
    return data[:4] + random.Random(7).randbytes(2000) + data[2004:]


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG claiming a huge greyscale image: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def jpeg_with_orientation(orientation: int, size: tuple[int, int] = (80, 40)) -> bytes:
    image = solid(size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header claims other dimensions."""
    data = bytearray(photo("chelsea.jpg"))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at != -1:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker")


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(solid((8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP extended header (VP8X) announcing a huge canvas, with no image data."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def animated_gif(frames: int, size: tuple[int, int] = (16, 16)) -> bytes:
    first = solid(size, (255, 0, 0))
    rest = [solid(size, (i % 255, 0, 255)) for i in range(frames - 1)]
    out = io.BytesIO()
    first.save(out, "GIF", save_all=True, append_images=rest, duration=10, loop=0)
    return out.getvalue()


def truncated(fmt: str) -> bytes:
    data = encode(Image.open(io.BytesIO(photo("coffee.jpg"))).convert("RGB"), fmt)
    return data[: len(data) // 2]


def garbage_after_header(fmt: str, keep: int = 16) -> bytes:
    data = encode(Image.open(io.BytesIO(photo("coffee.jpg"))).convert("RGB"), fmt)
    return data[:keep] + random.Random(5).randbytes(len(data) - keep)


# Hostile images for the decode-memory tests: each is small on disk (solid colour
# compresses ~1000:1) and stays under CAPTION_MAX_PIXELS, yet costs hundreds of MB
# to decode naively. Built straight from PNG chunks, so making one needs no more
# memory than one block of rows.


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


# PNG colour types: channels per pixel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def raw_png(
    width: int,
    height: int,
    *,
    color_type: int = 0,
    bit_depth: int = 8,
    pixel: bytes | None = None,
    extra_chunks: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A PNG of one repeated pixel, written row block by row block (fast for 49 MP).

    ``pixel`` is the raw bytes of one pixel (default: all zero, a black image);
    for bit depths under 8 it is ignored and rows are zero.
    """
    bits = _PNG_CHANNELS[color_type] * bit_depth
    row_bytes = (width * bits + 7) // 8
    row = b"\x00" * (1 + row_bytes) if pixel is None or bits < 8 else b"\x00" + pixel * width
    rows_per_block = max(1, (4 << 20) // len(row))
    block = row * rows_per_block
    compressor = zlib.compressobj(6)
    body = []
    left = height
    while left > 0:
        count = min(left, rows_per_block)
        body.append(compressor.compress(block if count == rows_per_block else row * count))
        left -= count
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    chunks += [_png_chunk(kind, content) for kind, content in extra_chunks]
    chunks.append(_png_chunk(b"IDAT", b"".join(body)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def palette_png_with_transparency(width: int, height: int) -> bytes:
    """A palette PNG with a tRNS chunk: Pillow converts these through RGBA."""
    palette = bytes(range(256)) * 3
    transparency = b"\x00\x80"
    return raw_png(
        width,
        height,
        color_type=3,
        pixel=b"\x01",
        extra_chunks=((b"PLTE", palette[: 3 * 256]), (b"tRNS", transparency)),
    )


def solid_webp(size: tuple[int, int], *, frames: int = 1) -> bytes:
    """A lossless WebP of one colour: a few hundred bytes for any size."""
    image = Image.new("RGB", size, (30, 120, 200))
    out = io.BytesIO()
    if frames == 1:
        image.save(out, "WEBP", lossless=True, quality=0, method=0)
    else:
        others = [Image.new("RGB", size, (i * 20 % 255, 40, 90)) for i in range(1, frames)]
        image.save(
            out, "WEBP", lossless=True, quality=0, method=0, save_all=True, append_images=others
        )
    return out.getvalue()


def big_gif(size: tuple[int, int], *, frames: int = 3) -> bytes:
    """An animated GIF whose logical screen is ``size``, every frame full size."""
    images = [Image.new("P", size, i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=10, loop=0)
    return out.getvalue()


def big_jpeg(
    size: tuple[int, int], *, progressive: bool = False, mode: str = "RGB", subsampling: int = 0
) -> bytes:
    """A solid JPEG; ``subsampling`` 0 is 4:4:4 (the costliest to buffer), 2 is 4:2:0."""
    color: object = (0, 255, 255, 0) if mode == "CMYK" else (90, 140, 200)
    image = Image.new(mode, size, color)  # type: ignore[arg-type]
    return encode(image, "JPEG", quality=50, progressive=progressive, subsampling=subsampling)


def other_formats() -> dict[str, tuple[bytes, str]]:
    """A real photo as each format beyond JPEG/PNG/WebP/GIF that captioner takes,
    with its content type: HEIC (as iPhones save), AVIF, TIFF (several pages; CMYK;
    16-bit grey) and BMP."""
    from captioner.adapters.images import register_heif

    register_heif()  # to save HEIC

    picture = Image.open(io.BytesIO(photo("chelsea.jpg"))).convert("RGB")
    second = Image.new("RGB", picture.size, (0, 0, 255))
    grey16 = Image.new("I;16", (640, 480))
    grey16.frombytes(bytes(range(256)) * (640 * 480 * 2 // 256))
    return {
        "heic": (encode(picture, "HEIF", quality=80), "image/heic"),
        "avif": (encode(picture, "AVIF", quality=60), "image/avif"),
        "tiff-two-pages": (
            encode(picture, "TIFF", save_all=True, append_images=[second]),
            "image/tiff",
        ),
        "tiff-cmyk": (
            encode(picture.convert("CMYK"), "TIFF", compression="tiff_lzw"),
            "image/tiff",
        ),
        "tiff-16-bit-grey": (encode(grey16, "TIFF"), "image/tiff"),
        "bmp": (encode(picture, "BMP"), "image/bmp"),
    }


def tiff_claiming(width: int, height: int) -> bytes:
    """A tiny TIFF whose header claims ``width`` x ``height`` (a decompression bomb)."""
    data = bytearray(encode(solid((8, 8)), "TIFF"))
    first_ifd = int.from_bytes(data[4:8], "little")
    entries = int.from_bytes(data[first_ifd : first_ifd + 2], "little")
    for i in range(entries):
        at = first_ifd + 2 + 12 * i
        tag = int.from_bytes(data[at : at + 2], "little")
        if tag in (256, 257):  # ImageWidth, ImageLength, stored as SHORT or LONG
            kind = int.from_bytes(data[at + 2 : at + 4], "little")
            value = width if tag == 256 else height
            size = 2 if kind == 3 else 4
            data[at + 8 : at + 8 + size] = value.to_bytes(size, "little")
    return bytes(data)


# Decoders that could take the instance down (issue 22): TIFFs whose strips or tiles
# say more than their size, AVIF and HEIC whose declared size is not what they code,
# and a JPEG header our own parsing divided by. Built with struct; the large ones are
# cached for the session (deflating 805 MB of zeros takes ~2 s).

# TIFF field types: SHORT and LONG.
_TIFF_TYPES = {3: "H", 4: "I"}
# A field value that means "where the payload starts".
PAYLOAD = -1


def tiff_file(fields: dict[int, tuple[int, list[int]]], payload: bytes = b"") -> bytes:
    """A little-endian TIFF: the ``payload`` right after the 8-byte header, then one IFD
    of ``fields`` (tag: (type, values)); a value of PAYLOAD is the payload's offset."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00" + payload)
    if len(out) % 2:
        out += b"\x00"
    ifd = len(out)
    spill_at = ifd + 2 + 12 * len(fields) + 4
    entries, spill = [], bytearray()
    for tag in sorted(fields):
        kind, values = fields[tag]
        code = _TIFF_TYPES[kind]
        raw = struct.pack(f"<{len(values)}{code}", *(8 if v == PAYLOAD else v for v in values))
        if len(raw) <= 4:
            entries.append(struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\x00"))
        else:
            entries.append(struct.pack("<HHII", tag, kind, len(values), spill_at + len(spill)))
            spill += raw + (b"\x00" if len(raw) % 2 else b"")
    out[4:8] = struct.pack("<I", ifd)
    out += struct.pack("<H", len(fields)) + b"".join(entries) + b"\x00" * 4 + spill
    return bytes(out)


def deflated_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9)
    block = bytes(4 << 20)
    parts = [
        compressor.compress(block[: min(len(block), size - at)])
        for at in range(0, size, len(block))
    ]
    return b"".join(parts) + compressor.flush()


@functools.cache
def tiff_declaring_tile(side: int = 64, tile: int = 16384) -> bytes:
    """A ``side``² RGB TIFF of one declared ``tile``² deflated tile (~780 KB): libtiff
    reads a tile into a buffer of the tile's size, 805 MB for 16384²."""
    body = deflated_zeros(tile * tile * 3)
    return tiff_file(
        {
            256: (4, [side]), 257: (4, [side]), 258: (3, [8, 8, 8]), 259: (3, [8]),
            262: (3, [2]), 277: (3, [3]), 284: (3, [1]),
            322: (4, [tile]), 323: (4, [tile]), 324: (4, [PAYLOAD]), 325: (4, [len(body)]),
        },
        body,
    )  # fmt: skip


def tiff_of_strips(count: int = 640_000, side: int = 64) -> bytes:
    """A ``side``² greyscale uncompressed TIFF listing ``count`` one-byte strips (2.5 MB):
    Pillow wraps the strips past the page around as further passes over the image,
    each a decoder call (minutes of CPU for 640,000)."""
    return tiff_file(
        {
            256: (4, [side]), 257: (4, [side]), 258: (3, [8]), 259: (3, [1]),
            262: (3, [1]), 277: (3, [1]), 278: (4, [1]),
            273: (3, [8] * count), 279: (3, [1] * count),
        },
        b"\x00",
    )  # fmt: skip


@functools.cache
def tiff_rgba16_one_strip(side: int = 7000) -> bytes:
    """A 16-bit RGBA ``side``² TIFF in one deflated strip (~380 KB for 7000²): libtiff's
    strip buffer of 392 MB, then Pillow's 196 MB image."""
    body = deflated_zeros(side * side * 8)
    return tiff_file(
        {
            256: (4, [side]), 257: (4, [side]), 258: (3, [16, 16, 16, 16]), 259: (3, [8]),
            262: (3, [2]), 277: (3, [4]), 278: (4, [side]), 284: (3, [1]), 338: (3, [2]),
            273: (4, [PAYLOAD]), 279: (4, [len(body)]),
        },
        body,
    )  # fmt: skip


def tiff_of_wide_tiles(side: int = 64, tile: int = 0xFFFFFF00) -> bytes:
    """An uncompressed TIFF whose one tile is ``tile`` pixels wide: Pillow's set-up of
    its decoder overflowed (OverflowError)."""
    return tiff_file(
        {
            256: (4, [side]), 257: (4, [side]), 258: (3, [8]), 259: (3, [1]),
            262: (3, [1]), 277: (3, [1]),
            322: (4, [tile]), 323: (4, [16]), 324: (4, [PAYLOAD] * 4), 325: (4, [16] * 4),
        },
        bytes(16),
    )  # fmt: skip


def with_declared_size(data: bytes, width: int, height: int) -> bytes:
    """An AVIF or HEIC whose ``ispe`` box (the size its header declares) says
    ``width`` x ``height``, whatever its coded frame is."""
    at = data.index(b"ispe")
    return data[: at + 8] + struct.pack(">II", width, height) + data[at + 16 :]


def avif_without_image_item() -> bytes:
    """An AVIF whose item is no longer of type av01: Pillow's plugin raised RuntimeError."""
    data = other_formats()["avif"][0]
    return data.replace(b"av01", b"xv01", 1)


def heic_declaring(width: int, height: int) -> bytes:
    """A HEIC photo (451x300 coded) declaring another size: libheif refused it with a
    RuntimeError ("Security limit exceeded")."""
    return with_declared_size(other_formats()["heic"][0], width, height)


# Built in a child process: encoding 10000² takes ~7 s and 2 GB, which the test
# process's own peak (test_bad_inputs checks it) should not carry. Cached on disk.
_CACHE = Path(tempfile.gettempdir()) / "captioner-test-images-v1"


def avif_declaring(width: int = 64, height: int = 48, coded: int = 10000) -> bytes:
    """An AVIF (~1.9 KB) whose ``ispe`` says ``width`` x ``height`` and whose frame is
    ``coded``² (twice CAPTION_MAX_PIXELS for 10000): Pillow's AVIF writer, then a
    byte patch of the declared size."""
    path = _CACHE / f"avif-coded-{coded}.avif"
    if not path.exists():
        _CACHE.mkdir(parents=True, exist_ok=True)
        code = (
            "import io, sys; from PIL import Image; out = io.BytesIO(); "
            f"Image.new('RGB', ({coded}, {coded}), (20, 40, 60)).save("
            "out, 'AVIF', quality=0, speed=10); sys.stdout.buffer.write(out.getvalue())"
        )
        made = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
        part = path.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(made.stdout)
        part.replace(path)
    return with_declared_size(path.read_bytes(), width, height)


def progressive_jpeg_with_sampling(h: int, v: int) -> bytes:
    """A progressive JPEG whose first component's sampling factors are ``h`` x ``v``
    (0 made our own header parsing divide by zero)."""
    data = bytearray(big_jpeg((64, 48), progressive=True, subsampling=2))
    at = data.index(b"\xff\xc2")
    data[at + 11] = (h << 4) | v  # SOF2: marker, length, precision, size, count, then id, hv
    return bytes(data)


def jpeg_of_scans(side: int = 4000, repeats: int = 4000) -> bytes:
    """A progressive greyscale JPEG whose first AC scan is repeated ``repeats`` times
    (~31 bytes each for 4000²): every header check passes, and each scan is a pass over
    every block (4000 repeats of 4000²: ~4 s of CPU; 15000: ~16 s)."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=50)
    scans = []
    pos = 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:  # entropy-coded data runs to the next real marker
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 1)
            scans.append((pos, end))
        pos = end
    start, end = scans[1]
    return data[:end] + data[start:end] * repeats + data[end:]

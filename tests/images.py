"""Test images made on the fly: the sample photos, and broken or hostile ones."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image

from captioner_dev import PHOTOS  # the sample photos, shipped in the repository


def photo(name: str = "chelsea.jpg") -> bytes:
    return (PHOTOS / name).read_bytes()


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

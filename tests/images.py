"""Test images made on the fly: real photos from shared/, and broken or hostile ones."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "images"


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

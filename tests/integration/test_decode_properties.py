"""Generated hostile images through the public entry, the decode workers (issue 22).

Each generated input must end as a prepared image or a PermanentError, never anything
else (no 500, no redelivery), and the worker that decoded it must have stayed within
the memory it was allowed: its peak resident size during the task under its baseline,
its slack and its allowance. Classes: byte mutations of every accepted format;
declared sizes that are not the coded ones (AVIF/HEIC ``ispe``, PNG ``IHDR``, JPEG
``SOF`` and its sampling factors); TIFF layouts (strips, tiles, their counts and
sizes, bits, compressions, planes); nesting (TIFF IFD chains and EXIF IFD pointers
that loop or point anywhere).
"""

from __future__ import annotations

import asyncio
import functools
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.domain import PreparedImage
from captioner.errors import PermanentError
from captioner.preparing import WORKER_SLACK, PreparePool, ProcessDecoder
from captioner.workers import Reply
from tests import images

MiB = 1024 * 1024
WORKER_BASELINE = 40 * MiB
EXAMPLES = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Watched:
    """The decoder every example uses, and the (peak, allowance) of each reply."""

    def __init__(self) -> None:
        self.decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000)
        self.peaks: list[tuple[int, int]] = []
        self.decoder.on_reply = lambda reply, allowance: self._seen(reply, allowance)

    def _seen(self, reply: Reply, allowance: int) -> None:
        self.peaks.append((reply.peak_rss, allowance))

    def check(self, data: bytes) -> None:
        """Prepared, or refused with a PermanentError; and within the worker's limits."""
        self.peaks.clear()
        pool = PreparePool(self.decoder, decode_budget=256 * MiB, held_bytes_budget=128 * MiB)
        result: PreparedImage | PermanentError
        try:
            result = asyncio.run(pool.prepared(data))
        except PermanentError as exc:
            result = exc
        if isinstance(result, PermanentError):
            assert result.reason
            assert len(str(result)) < 500
        else:
            assert result.mime_type in ("image/jpeg", "image/png", "image/webp")
        for peak, allowance in self.peaks:
            assert peak < WORKER_BASELINE + WORKER_SLACK + allowance, (peak, allowance)


@pytest.fixture(scope="module")
def watched() -> Watched:
    return Watched()


@functools.cache
def seeds() -> dict[str, bytes]:
    """A small image of every accepted format (and a few layouts of some)."""
    from captioner.adapters.images import register_heif

    register_heif()  # to save HEIC

    picture = Image.open(images.photo_path("chelsea.jpg")).convert("RGB").resize((64, 48))
    rgba = picture.convert("RGBA")
    return {
        "jpeg": images.encode(picture, "JPEG"),
        "jpeg-progressive": images.encode(picture, "JPEG", progressive=True),
        "png-rgba": images.encode(rgba, "PNG"),
        "png-palette": images.encode(picture.convert("P"), "PNG"),
        "webp-lossy": images.encode(picture, "WEBP"),
        "webp-lossless": images.encode(rgba, "WEBP", lossless=True),
        "gif": images.encode(picture.convert("P"), "GIF"),
        "bmp": images.encode(picture, "BMP"),
        "tiff-raw": images.encode(picture, "TIFF"),
        "tiff-lzw": images.encode(picture, "TIFF", compression="tiff_lzw"),
        "tiff-tiled": images.encode(picture, "TIFF", tiffinfo={322: 16, 323: 16}),
        "heic": images.encode(picture, "HEIF", quality=50),
        "avif": images.encode(picture, "AVIF", quality=50, speed=10),
    }


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes changed, mostly in its header, maybe cut short."""
    data = bytearray(seeds()[draw(st.sampled_from(sorted(seeds())))])
    for _ in range(draw(st.integers(1, 6))):
        near_start = draw(st.booleans())
        end = min(len(data), 256) if near_start else len(data)
        data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


@EXAMPLES
@given(data=mutated())
def test_mutated_bytes_of_every_accepted_format_are_prepared_or_refused(
    watched: Watched, data: bytes
) -> None:
    watched.check(data)


def _png_with_header(width: int, height: int, depth: int, color: int) -> bytes:
    png = seeds()["png-rgba"]
    body = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    chunk = b"IHDR" + body
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:8] + ihdr + png[8 + 25 :]


def _jpeg_with_frame(seed: str, width: int, height: int, sampling: list[int]) -> bytes:
    data = bytearray(seeds()[seed])
    at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    for component, factors in enumerate(sampling[: data[at + 9]]):
        data[at + 11 + 3 * component] = factors
    return bytes(data)


@st.composite
def declared_not_coded(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["ispe", "png", "jpeg"]))
    sizes = st.one_of(st.integers(0, 70_000), st.integers(0, 2**32 - 1))
    if kind == "ispe":
        seed = draw(st.sampled_from(["heic", "avif", "avif-2000"]))
        data = _avif_2000() if seed == "avif-2000" else seeds()[seed]
        return images.with_declared_size(data, draw(sizes), draw(sizes))
    if kind == "png":
        dims = st.integers(0, 2**31 - 1)
        depth, color = (
            draw(st.sampled_from([1, 2, 4, 8, 16])),
            draw(st.sampled_from([0, 2, 3, 4, 6])),
        )
        return _png_with_header(draw(dims), draw(dims), depth, color)
    seed = draw(st.sampled_from(["jpeg", "jpeg-progressive"]))
    sampling = draw(st.lists(st.integers(0, 255), min_size=3, max_size=3))
    return _jpeg_with_frame(
        seed, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), sampling
    )


@functools.cache
def _avif_2000() -> bytes:
    """A 2000x2000 AVIF (~800 bytes), to declare smaller than it codes."""
    return images.encode(Image.new("RGB", (2000, 2000), (9, 99, 199)), "AVIF", quality=0, speed=10)


@EXAMPLES
@given(data=declared_not_coded())
def test_declared_sizes_that_are_not_the_coded_ones_are_prepared_or_refused(
    watched: Watched, data: bytes
) -> None:
    watched.check(data)


@st.composite
def tiff_layouts(draw: st.DrawFn) -> bytes:
    width, height = draw(st.integers(1, 70_000)), draw(st.integers(1, 70_000))
    samples = draw(st.sampled_from([1, 3, 4]))
    bits = draw(st.sampled_from([1, 8, 16, 32]))
    compression = draw(st.sampled_from([1, 5, 8, 32773]))
    fields: dict[int, tuple[int, list[int]]] = {
        256: (4, [width]),
        257: (4, [height]),
        258: (3, [bits] * samples),
        259: (3, [compression]),
        262: (3, [1 if samples == 1 else 2]),
        277: (3, [samples]),
        284: (3, [draw(st.sampled_from([1, 2]))]),
    }
    count = draw(st.one_of(st.integers(0, 64), st.integers(0, 20_000)))
    if draw(st.booleans()):
        fields[322] = (4, [draw(st.integers(0, 2**32 - 1))])
        fields[323] = (4, [draw(st.integers(0, 2**32 - 1))])
        fields[324] = (4, [images.PAYLOAD] * count)
        fields[325] = (4, [draw(st.integers(0, 4096))] * count)
    else:
        fields[278] = (4, [draw(st.integers(0, 2**32 - 1))])
        fields[273] = (4, [images.PAYLOAD] * count)
        fields[279] = (4, [draw(st.integers(0, 4096))] * count)
    payload = draw(st.binary(min_size=0, max_size=512))
    return images.tiff_file(fields, payload)


@EXAMPLES
@given(data=tiff_layouts())
def test_tiff_strip_and_tile_layouts_are_prepared_or_refused(watched: Watched, data: bytes) -> None:
    watched.check(data)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """IFD chains and pointers that loop back or point anywhere."""
    if draw(st.booleans()):
        # A TIFF whose next-IFD pointer (after the one IFD) points somewhere.
        data = bytearray(seeds()[draw(st.sampled_from(["tiff-raw", "tiff-lzw", "tiff-tiled"]))])
        first = int.from_bytes(data[4:8], "little")
        entries = int.from_bytes(data[first : first + 2], "little")
        at = first + 2 + 12 * entries
        target = draw(st.one_of(st.just(first), st.just(8), st.integers(0, len(data) + 100)))
        data[at : at + 4] = target.to_bytes(4, "little")
        return bytes(data)
    # A JPEG whose EXIF has an orientation, and Exif and GPS IFD pointers that point
    # anywhere: at the IFD itself, at the header, past the end.
    pointers = st.one_of(st.just(8), st.just(0), st.integers(0, 2**32 - 1))
    fields = {
        0x0112: (3, [draw(st.integers(0, 10))]),
        0x8769: (4, [draw(pointers)]),
        0x8825: (4, [draw(pointers)]),
    }
    exif = b"Exif\x00\x00" + images.tiff_file(fields)
    return images.encode(seeds()["jpeg"] and _small_picture(), "JPEG", exif=exif)


def _small_picture() -> Image.Image:
    return Image.open(images.photo_path("chelsea.jpg")).convert("RGB").resize((64, 48))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=nested())
def test_nested_directories_that_loop_are_prepared_or_refused(
    watched: Watched, data: bytes
) -> None:
    watched.check(data)

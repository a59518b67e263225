"""Hostile images through the decode workers (issue 22): each ends with a permanent
verdict, within the limits of its own worker, and the next image is prepared.

Everything here goes through ``PreparePool.prepared`` with the real ProcessDecoder:
the allowance a header's price gets from the decode budget, the worker's kernel
limits, and the verdict a worker's death becomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from captioner.domain import PreparedImage
from captioner.errors import PermanentError
from captioner.preparing import WORKER_SLACK, PreparePool, ProcessDecoder
from captioner.workers import Reply, WorkerDied
from tests import images

MiB = 1024 * 1024
# A worker's own resident size when idle: interpreter, Pillow, codecs (~27 MB here).
WORKER_BASELINE = 40 * MiB

BOMBS: list[tuple[str, Callable[[], bytes], str]] = [
    # libtiff's tile buffer of the declared tile: 805 MB for a 64x64 image (was 1,100 MiB).
    ("tiff-64x64-declaring-a-16384-tile", images.tiff_declaring_tile, "too-large-to-decode"),
    # 640,000 one-byte strips: minutes of CPU, a 503 at the deadline, redelivered for 24 h.
    ("tiff-64x64-of-640000-strips", images.tiff_of_strips, "corrupt-image"),
    # One 392 MB strip buffer, then a 196 MB image (was 635 MiB).
    ("tiff-rgba16-7000-in-one-strip", images.tiff_rgba16_one_strip, "too-large-to-decode"),
    # Pillow's decoder set-up raised OverflowError (a 500).
    ("tiff-tile-4-billion-wide", images.tiff_of_wide_tiles, "too-large-to-decode"),
    # Declares 64x48, codes 10000x10000: +357 MiB in the process before. dav1d's failed
    # allocation comes back as "Decoding of color planes failed", which cannot be told
    # from corrupt data.
    ("avif-declaring-64x48-coding-10000", images.avif_declaring, "corrupt-image"),
    # RuntimeError from Pillow's AVIF plugin (a 500).
    ("avif-without-its-image-item", images.avif_without_image_item, "corrupt-image"),
    # libheif's RuntimeError "Security limit exceeded" (a 500).
    ("heic-declaring-1x1", lambda: images.heic_declaring(1, 1), "too-large-to-decode"),
    # ZeroDivisionError in our own header parsing (a 500).
    ("jpeg-sampling-factor-0", lambda: images.progressive_jpeg_with_sampling(0, 1),
     "corrupt-image"),
]  # fmt: skip


def decoder(cpu_seconds: int = 10) -> ProcessDecoder:
    return ProcessDecoder(max_edge=768, max_pixels=50_000_000, cpu_seconds=cpu_seconds)


def pool_of(decoder_: ProcessDecoder) -> PreparePool:
    return PreparePool(decoder_, decode_budget=256 * MiB, held_bytes_budget=128 * MiB)


def prepared(data: bytes, decoder_: ProcessDecoder | None = None) -> PreparedImage:
    return asyncio.run(pool_of(decoder_ or decoder()).prepared(data))


@pytest.mark.parametrize(("build", "reason"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_a_hostile_image_gets_a_permanent_verdict_and_the_next_photo_is_prepared(
    build: Callable[[], bytes], reason: str
) -> None:
    with pytest.raises(PermanentError) as info:
        prepared(build())
    assert info.value.reason == reason, str(info.value)
    assert len(str(info.value)) < 500
    assert prepared(images.photo("chelsea.jpg")).source_width == 451


def test_an_avif_coding_a_larger_frame_than_it_declares_fails_within_its_allowance() -> None:
    # In this process, with no limit, the same decode peaks ~234 MB (bench/RESULTS.md).
    decoding = decoder()
    data = images.avif_declaring()
    allowance = decoding.opening(data)
    task = decoding.task(data, allowance, 256 * MiB)
    reply = decoding.pool.submit(task, lambda r: r, lambda d: d).result(timeout=60)
    assert isinstance(reply, Reply)
    assert reply.header["status"] == "refused"
    assert reply.peak_rss < WORKER_BASELINE + WORKER_SLACK + allowance
    assert allowance < 64 * MiB


def test_a_decode_past_its_cpu_time_is_a_decode_timeout_and_its_worker_is_replaced() -> None:
    # ~4 s of CPU in libjpeg: 4000 passes over a 4000x4000 image, every header check passed.
    quick = decoder(cpu_seconds=1)
    before = quick.pool.replaced
    started = time.monotonic()
    with pytest.raises(PermanentError) as info:
        prepared(images.jpeg_of_scans(4000, 4000), quick)
    assert info.value.reason == "decode-timeout"
    assert "1 s of CPU time" in str(info.value)
    assert time.monotonic() - started < 15
    assert quick.pool.replaced == before + 1
    assert prepared(images.photo("coffee.jpg"), quick).source_width == 600


async def test_photos_in_flight_beside_a_cpu_bomb_are_all_prepared() -> None:
    pool = pool_of(decoder(cpu_seconds=1))
    photo = images.photo("rocket.jpg")
    results = await asyncio.gather(
        pool.prepared(images.jpeg_of_scans(4000, 4000)),
        *(pool.prepared(photo) for _ in range(12)),
        return_exceptions=True,
    )
    bomb, *photos = results
    assert isinstance(bomb, PermanentError)
    assert bomb.reason == "decode-timeout"
    assert all(isinstance(result, PreparedImage) for result in photos), photos


async def test_two_lying_avifs_at_once_stay_within_their_allowances() -> None:
    # Before: +357 MiB each in the function's process, 804 MiB for two at once.
    decoding = decoder()
    data = images.avif_declaring()
    allowance = decoding.opening(data)
    futures = [decoding.pool.submit(decoding.task(data, allowance, 256 * MiB), lambda r: r,
                                    lambda d: d) for _ in range(2)]  # fmt: skip
    replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    for reply in replies:
        assert not isinstance(reply, WorkerDied)
        assert reply.header["status"] == "refused"
        assert reply.peak_rss < WORKER_BASELINE + WORKER_SLACK + allowance


@pytest.mark.parametrize("kind", list(images.other_formats()))
def test_every_accepted_format_is_prepared_in_the_workers(kind: str) -> None:
    data, _ = images.other_formats()[kind]
    assert prepared(data).mime_type == "image/jpeg"


def test_a_large_accepted_image_asks_for_more_and_gets_it() -> None:
    # 7070x7070 RGBA: priced ~214 MiB, far over the opening allowance.
    data = images.raw_png(7070, 7070, color_type=6)
    decoding = decoder()
    assert decoding.opening(data) < 64 * MiB
    out = prepared(data, decoding)
    assert (out.width, out.height) == (768, 768)

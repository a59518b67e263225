"""The whole pipeline with its real adapters: fake-gcs-server, google-genai, the stand-in."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from captioner.domain import Outcome
from captioner.runtime import Runtime
from captioner.settings import Settings
from tests import images
from tests.integration.test_storage_adapter import ODD_NAMES
from tests.objects import metadata, upload


@pytest.fixture
async def runtime(gcs: Any, gemini: Any) -> AsyncIterator[Runtime]:
    rt = Runtime(
        Settings.from_env(
            {
                "CAPTION_GEMINI_ATTEMPTS": "3",
                "CAPTION_RETRY_MAX_WAIT": "0.2",
                "CAPTION_GEMINI_TIMEOUT": "5",
            }
        )
    )
    yield rt
    await rt.aclose()


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_odd_names_are_captioned_in_place(bucket: Any, runtime: Runtime, name: str) -> None:
    ref = upload(bucket, name, images.photo("chelsea.jpg"), metadata={"owner": "alice"})
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED, result.message
    meta = metadata(bucket, name)
    assert meta["owner"] == "alice"
    assert meta["caption-status"] == "ok"
    assert "451x300" in meta["caption"]  # the stand-in described this very photo
    assert meta["caption-generation"] == str(ref.generation)


async def test_each_object_gets_the_caption_of_its_own_image(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    refs = []
    for photo in images.all_photos():
        refs.append(upload(bucket, f"all/{photo.name}", photo.read_bytes()))
    results = [r async for r in runtime.captioner().caption_many(refs)]
    assert {r.outcome for r in results} == {Outcome.CAPTIONED}
    sent = {rec.images[0].sha256[:8] for rec in gemini.requests}
    for ref in refs:
        caption = metadata(bucket, ref.name)["caption"]
        tag = caption.rsplit("[img:", 1)[1][:8]
        assert tag in sent
    assert len({metadata(bucket, r.name)["caption"] for r in refs}) == len(refs)


async def test_large_photo_is_sent_downscaled(bucket: Any, runtime: Runtime, gemini: Any) -> None:
    big = Image.open(io.BytesIO(images.photo("rocket.jpg"))).resize((3000, 2000))
    ref = upload(bucket, "big.jpg", images.encode(big, "JPEG", quality=90))
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED
    assert gemini.calls == 1
    assert "768x512" in (result.caption or "")  # what the stand-in saw


async def test_small_photo_is_sent_byte_for_byte(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    data = images.photo("coffee.jpg")
    await runtime.captioner().caption_object(upload(bucket, "c.jpg", data))
    (record,) = gemini.requests
    assert record.images[0].sha256 == hashlib.sha256(data).hexdigest()


async def test_duplicate_event_makes_no_second_gemini_call(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    ref = upload(bucket, "dup.jpg", images.photo())
    first = await runtime.captioner().caption_object(ref)
    second = await runtime.captioner().caption_object(ref)
    assert (first.outcome, second.outcome) == (Outcome.CAPTIONED, Outcome.SKIPPED)
    assert gemini.calls == 1


async def test_rate_limit_then_success_is_retried_inside_the_invocation(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("429", count=1, retry_delay=0.1)
    gemini.add_fault("503", count=1)
    result = await runtime.captioner().caption_object(upload(bucket, "r.jpg", images.photo()))
    assert result.outcome is Outcome.CAPTIONED
    assert gemini.calls == 3


async def test_persistent_server_errors_end_as_retry_with_nothing_written(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("500")
    ref = upload(bucket, "p.jpg", images.photo(), metadata={"owner": "x"})
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.RETRY
    assert gemini.calls == 3  # CAPTION_GEMINI_ATTEMPTS, then give up for Eventarc to redeliver
    assert metadata(bucket, "p.jpg") == {"owner": "x"}


async def test_hanging_gemini_times_out_as_transient(bucket: Any, gemini: Any) -> None:
    gemini.add_fault("hang")
    rt = Runtime(
        Settings.from_env({"CAPTION_GEMINI_ATTEMPTS": "1", "CAPTION_GEMINI_TIMEOUT": "0.5"})
    )
    try:
        result = await rt.captioner().caption_object(upload(bucket, "h.jpg", images.photo()))
    finally:
        await rt.aclose()
    assert result.outcome is Outcome.RETRY
    assert "0.5" in (result.message or "")


@pytest.mark.parametrize("fault", ["safety_prompt", "safety_candidate"])
async def test_safety_refusals_are_recorded_as_blocked(
    bucket: Any, runtime: Runtime, gemini: Any, fault: str
) -> None:
    gemini.add_fault(fault)
    result = await runtime.captioner().caption_object(upload(bucket, "b.jpg", images.photo()))
    assert result.outcome is Outcome.BLOCKED
    assert metadata(bucket, "b.jpg")["caption-status"] == "blocked"


async def test_an_empty_answer_is_asked_again_once_and_never_recorded_as_blocked(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("empty", count=1)
    result = await runtime.captioner().caption_object(upload(bucket, "e1.jpg", images.photo()))
    assert result.outcome is Outcome.CAPTIONED
    assert gemini.calls == 2
    gemini.add_fault("empty")
    result = await runtime.captioner().caption_object(upload(bucket, "e2.jpg", images.photo()))
    assert result.outcome is Outcome.FAILED
    assert metadata(bucket, "e2.jpg")["caption-status"] == "error:empty-answer"


async def test_gemini_rejecting_the_image_is_a_permanent_error(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("invalid_argument")
    result = await runtime.captioner().caption_object(upload(bucket, "i.jpg", images.photo()))
    assert result.outcome is Outcome.FAILED
    assert metadata(bucket, "i.jpg")["caption-status"] == "error:gemini-400"
    assert gemini.calls == 1  # not retried


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"", "image/jpeg", "error:empty"),
        (b"just text, honest", "image/jpeg", "error:not-an-image"),
        (images.corrupt_jpeg(), "image/jpeg", "error:corrupt-image"),
        (images.png_bomb(), "image/png", "error:too-many-pixels"),
    ],
    ids=["zero-byte", "text-as-jpeg", "corrupt-jpeg", "decompression-bomb"],
)
async def test_bad_objects_are_recorded_without_a_gemini_call(
    bucket: Any, runtime: Runtime, gemini: Any, data: bytes, content_type: str, status: str
) -> None:
    ref = upload(bucket, "bad.jpg", data, content_type, metadata={"owner": "kept"})
    await runtime.captioner().caption_object(ref)
    meta = metadata(bucket, "bad.jpg")
    assert meta["caption-status"] == status
    assert meta["owner"] == "kept"
    assert gemini.calls == 0


async def test_text_file_is_left_untouched(bucket: Any, runtime: Runtime, gemini: Any) -> None:
    ref = upload(bucket, "notes.txt", b"hello", "text/plain", metadata={"a": "b"})
    result = await runtime.captioner().caption_object(ref)
    assert result.reason == "not-an-image"
    assert metadata(bucket, "notes.txt") == {"a": "b"}
    assert gemini.calls == 0


async def test_gemini_calls_in_flight_never_exceed_max_concurrency(
    bucket: Any, gemini: Any
) -> None:
    # More images than that are let in (downloaded and prepared ahead), but the stand-in
    # must never see more than CAPTION_MAX_CONCURRENCY requests at once.
    refs = [
        upload(
            bucket,
            f"many/{i}.png",
            images.encode(images.solid((40, 30), (i, 9, 9)), "PNG"),
            "image/png",
        )
        for i in range(24)
    ]
    gemini.latency = 0.15
    runtime = Runtime(Settings.from_env({"CAPTION_MAX_CONCURRENCY": "4"}))
    try:
        outcomes = [r.outcome async for r in runtime.captioner().caption_many(refs)]
    finally:
        await runtime.aclose()
    assert outcomes.count(Outcome.CAPTIONED) == 24
    events = sorted(
        [(r.received_at, 1) for r in gemini.requests]
        + [(r.answered_at, -1) for r in gemini.requests if r.answered_at is not None]
    )
    peak = current = 0
    for _, step in events:  # at a tie the answer (-1) sorts, and counts, first
        current += step
        peak = max(peak, current)
    assert peak == 4

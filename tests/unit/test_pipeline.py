"""The pipeline's rules, with in-memory storage and a scripted describer."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest

from captioner.adapters.images import prepare
from captioner.concurrency import bounded_as_completed
from captioner.domain import Description, ObjectRef, Outcome
from captioner.errors import PermanentError, TransientError
from captioner.metadata import TOTAL_BUDGET, size_of
from captioner.pipeline import Captioner, PipelineConfig
from tests import images
from tests.fakes import MemoryStorage, ScriptedDescriber

B = "bucket"


def make(
    storage: MemoryStorage,
    describer: ScriptedDescriber | None = None,
    *,
    max_bytes: int = 5_000_000,
    concurrency: int = 4,
) -> Captioner:
    return Captioner(
        storage=storage,
        describer=describer or ScriptedDescriber(),
        prepare=partial(prepare, max_edge=768, max_pixels=50_000_000),
        config=PipelineConfig(max_bytes=max_bytes, max_concurrency=concurrency),
    )


def ref_for(storage: MemoryStorage, name: str) -> ObjectRef:
    info = storage.objects[(B, name)].info
    return ObjectRef(B, name, info.generation, info.metageneration, info.content_type, info.size)


async def test_caption_is_written_with_every_contract_key_and_owner_keys_survive() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo(), metadata={"owner": "alice", "sku": "123"})
    result = await make(storage).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    meta = storage.metadata(B, "cat.jpg")
    assert meta["owner"] == "alice"
    assert meta["sku"] == "123"
    assert meta["caption"].startswith("A tabby cat")
    assert meta["caption-status"] == "ok"
    assert meta["caption-model"] == "fake-model"
    assert meta["caption-generation"] == str(result.generation)
    assert meta["caption-created"].endswith("Z")
    # Only our keys are sent: a merge-PATCH can then never touch the owner's.
    (patch,) = storage.patches
    assert set(patch["metadata"]) == {  # type: ignore[arg-type]
        "caption",
        "caption-status",
        "caption-model",
        "caption-generation",
        "caption-created",
        "caption-rule",
        "caption-prompt",
    }


async def test_patch_carries_generation_and_metageneration_preconditions() -> None:
    storage = MemoryStorage()
    info = storage.put(B, "cat.jpg", images.photo())
    await make(storage).caption_object(ref_for(storage, "cat.jpg"))
    (patch,) = storage.patches
    assert patch["ifGenerationMatch"] == info.generation
    assert patch["ifMetagenerationMatch"] == info.metageneration


async def test_second_event_for_same_generation_makes_no_gemini_call() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber()
    captioner = make(storage, describer)
    first = await captioner.caption_object(ref_for(storage, "cat.jpg"))
    second = await captioner.caption_object(ref_for(storage, "cat.jpg"))
    assert first.outcome is Outcome.CAPTIONED
    assert second.outcome is Outcome.SKIPPED
    assert second.reason == "already-captioned"
    assert describer.calls == 1
    assert len(storage.patches) == 1


async def test_new_generation_of_same_name_is_captioned_again() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber()
    captioner = make(storage, describer)
    await captioner.caption_object(ref_for(storage, "cat.jpg"))
    storage.put(B, "cat.jpg", images.photo("coffee.jpg"))
    result = await captioner.caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    assert describer.calls == 2


async def test_event_for_an_older_generation_is_skipped_without_writing() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    old = ref_for(storage, "cat.jpg")
    storage.put(B, "cat.jpg", images.photo("coffee.jpg"))
    describer = ScriptedDescriber()
    result = await make(storage, describer).caption_object(old)
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "superseded"
    assert describer.calls == 0
    assert storage.patches == []


async def test_non_image_content_type_is_left_untouched() -> None:
    storage = MemoryStorage()
    storage.put(B, "notes.txt", b"hello", content_type="text/plain", metadata={"a": "b"})
    result = await make(storage).caption_object(ref_for(storage, "notes.txt"))
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "not-an-image"
    assert storage.patches == []
    assert storage.downloads == 0
    assert storage.metadata(B, "notes.txt") == {"a": "b"}


async def test_text_file_with_image_extension_and_type_is_recorded_as_not_an_image() -> None:
    storage = MemoryStorage()
    storage.put(B, "fake.jpg", b"this is plain text, not a JPEG", content_type="image/jpeg")
    describer = ScriptedDescriber()
    result = await make(storage, describer).caption_object(ref_for(storage, "fake.jpg"))
    assert result.outcome is Outcome.FAILED
    assert storage.metadata(B, "fake.jpg")["caption-status"] == "error:not-an-image"
    assert describer.calls == 0


async def test_octet_stream_with_image_name_is_sniffed_and_captioned() -> None:
    storage = MemoryStorage()
    storage.put(B, "upload.JPG", images.photo(), content_type="application/octet-stream")
    result = await make(storage).caption_object(ref_for(storage, "upload.JPG"))
    assert result.outcome is Outcome.CAPTIONED


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (images.truncated_jpeg(), "corrupt-image"),
        (images.corrupt_jpeg(), "corrupt-image"),
        (images.png_bomb(), "too-many-pixels"),
    ],
    ids=["zero-bytes", "truncated-jpeg", "corrupt-jpeg", "decompression-bomb"],
)
async def test_bad_image_is_recorded_as_permanent_error_without_gemini_call(
    data: bytes, reason: str
) -> None:
    storage = MemoryStorage()
    storage.put(B, "bad.jpg", data, metadata={"keep": "me"})
    describer = ScriptedDescriber()
    result = await make(storage, describer).caption_object(ref_for(storage, "bad.jpg"))
    assert result.outcome is Outcome.FAILED
    assert result.reason == reason
    assert result.recorded
    meta = storage.metadata(B, "bad.jpg")
    assert meta["caption-status"] == f"error:{reason}"
    assert meta["keep"] == "me"
    assert "caption" not in meta
    assert describer.calls == 0


async def test_object_over_size_limit_is_refused_before_download() -> None:
    storage = MemoryStorage()
    storage.put(B, "big.jpg", images.photo("hubble_deep_field.jpg"))
    result = await make(storage, max_bytes=1000).caption_object(ref_for(storage, "big.jpg"))
    assert result.reason == "too-large"
    assert storage.downloads == 0
    assert storage.metadata(B, "big.jpg")["caption-status"] == "error:too-large"


async def test_transient_gemini_failure_is_not_recorded_and_asks_for_retry() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber(script=[TransientError("Gemini answered 503")])
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.RETRY
    assert storage.patches == []


async def test_transient_storage_failure_on_read_asks_for_retry() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    storage.fail_next.append(TransientError("storage 503"))
    result = await make(storage).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.RETRY


async def test_permanent_gemini_rejection_is_recorded() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber(script=[PermanentError("gemini-400", "bad image")])
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.FAILED
    assert storage.metadata(B, "cat.jpg")["caption-status"] == "error:gemini-400"


@pytest.mark.parametrize("reason", ["SAFETY", "EMPTY"])
async def test_blocked_or_empty_answer_becomes_status_blocked(reason: str) -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber(script=[Description(None, "m", blocked_reason=reason)])
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.BLOCKED
    meta = storage.metadata(B, "cat.jpg")
    assert meta["caption-status"] == "blocked"
    assert "caption" not in meta


async def test_whitespace_only_answer_becomes_blocked_not_an_empty_caption() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    describer = ScriptedDescriber(script=[Description("\n\x00 \t", "m")])
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.BLOCKED


async def test_deleted_before_start_ends_cleanly() -> None:
    storage = MemoryStorage()
    result = await make(storage).caption_object(ObjectRef(B, "gone.jpg", 5))
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "gone"


async def test_owner_metadata_change_during_captioning_survives_the_write() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo(), metadata={"owner": "alice"})

    class EditingDescriber(ScriptedDescriber):
        async def describe(self, image, spec=None):  # type: ignore[no-untyped-def]
            storage.owner_edits(B, "cat.jpg", {"reviewed": "yes"})
            return await super().describe(image, spec)

    result = await make(storage, EditingDescriber()).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    meta = storage.metadata(B, "cat.jpg")
    assert meta["reviewed"] == "yes"
    assert meta["owner"] == "alice"
    assert meta["caption-status"] == "ok"
    assert len(storage.patches) == 2  # the first was refused with 412, then re-read


async def test_overwrite_during_captioning_never_gets_the_old_caption() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())

    class OverwritingDescriber(ScriptedDescriber):
        async def describe(self, image, spec=None):  # type: ignore[no-untyped-def]
            storage.put(B, "cat.jpg", images.photo("coffee.jpg"))
            return await super().describe(image, spec)

    result = await make(storage, OverwritingDescriber()).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "superseded"
    assert "caption" not in storage.metadata(B, "cat.jpg")


async def test_duplicate_events_at_the_same_time_write_once() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())
    captioner = make(storage, ScriptedDescriber(delay=0.01))
    ref = ref_for(storage, "cat.jpg")
    results = await asyncio.gather(*(captioner.caption_object(ref) for _ in range(3)))
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == ["ok", "skipped", "skipped"]
    successful = [p for p in storage.patches if p["metadata"]]
    assert len(successful) == 3  # three attempts, but the preconditions let only one land
    assert storage.objects[(B, "cat.jpg")].info.metageneration == 2


async def test_long_caption_is_cut_at_a_character_boundary_to_fit_the_budget() -> None:
    storage = MemoryStorage()
    owner = {"notes": "x" * 6000}
    storage.put(B, "cat.jpg", images.photo(), metadata=owner)
    describer = ScriptedDescriber(script=[Description("猫 " * 3000, "m")])
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    meta = storage.metadata(B, "cat.jpg")
    assert size_of(meta) <= TOTAL_BUDGET
    assert meta["caption"].endswith("…")
    assert meta["notes"] == owner["notes"]
    meta["caption"].encode("utf-8")  # whole characters only


async def test_owner_metadata_that_leaves_no_room_fails_without_writing() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo(), metadata={"notes": "x" * 8150})
    result = await make(storage).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.FAILED
    assert result.reason == "metadata-full"
    assert storage.patches == []


async def test_owner_key_named_caption_is_never_overwritten() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo(), metadata={"caption": "the owner's own words"})
    describer = ScriptedDescriber()
    result = await make(storage, describer).caption_object(ref_for(storage, "cat.jpg"))
    assert result.outcome is Outcome.FAILED
    assert result.reason == "metadata-conflict"
    assert storage.metadata(B, "cat.jpg") == {"caption": "the owner's own words"}
    assert describer.calls == 0


async def test_many_objects_stream_with_bounded_concurrency() -> None:
    storage = MemoryStorage()
    small = images.encode(images.solid((32, 32)), "PNG")
    for i in range(40):
        storage.put(B, f"img/{i}.png", small, content_type="image/png")
    describer = ScriptedDescriber(delay=0.005)
    captioner = make(storage, describer, concurrency=5)
    refs = [ref_for(storage, f"img/{i}.png") for i in range(40)]
    seen = [r async for r in captioner.caption_many(refs)]
    assert len(seen) == 40
    assert {r.ref.name for r in seen} == {r.name for r in refs}
    assert all(r.outcome is Outcome.CAPTIONED for r in seen)
    # The fake has no limiter, so it sees every image let in: 5 plus 2 prepared ahead.
    # (The real describer's limiter holds Gemini calls to 5; see the local-stack test.)
    assert describer.peak_in_flight == 7


async def test_bounded_as_completed_pulls_lazily_and_yields_before_the_end() -> None:
    pulled: list[int] = []

    async def source():  # type: ignore[no-untyped-def]
        for i in range(1000):
            pulled.append(i)
            yield i

    async def work(i: int) -> int:
        await asyncio.sleep(0.001 if i else 0)
        return i

    stream = bounded_as_completed(source(), work, 3)
    first = await anext(stream)
    assert first == 0
    assert len(pulled) <= 4  # only what fills the window, not the whole source
    await stream.aclose()


async def test_bounded_as_completed_cancels_in_flight_work_when_abandoned() -> None:
    cancelled = 0

    async def work(i: int) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(0 if i == 0 else 10)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return i

    stream = bounded_as_completed(range(10), work, 4)
    assert await anext(stream) == 0
    await stream.aclose()
    assert cancelled == 3


async def test_calls_in_flight_are_bounded_by_memory_and_nothing_is_fetched_ahead_of_its_call() -> (
    None
):
    """At the flex tier a call takes minutes and thousands are in flight: each holds its
    request's bytes, so the calls' memory bounds them, and an image waiting for room is
    neither downloaded nor prepared (just in time)."""
    storage = MemoryStorage()
    for i in range(12):
        storage.put(B, f"{i}.jpg", images.photo())
    describer = ScriptedDescriber(delay=0.05)
    captioner = Captioner(
        storage=storage,
        describer=describer,
        prepare=partial(prepare, max_edge=768, max_pixels=50_000_000),
        config=PipelineConfig(
            max_bytes=5_000_000, max_concurrency=50, calls_bytes_budget=3000, bytes_per_call=1000
        ),
    )
    downloads_at_peak: list[int] = []
    original = describer.describe

    async def describe(image: object, spec: object = None) -> Description:
        downloads_at_peak.append(storage.downloads - describer.calls)
        return await original(image, spec)  # type: ignore[arg-type]

    describer.describe = describe  # type: ignore[method-assign]
    refs = [ref_for(storage, f"{i}.jpg") for i in range(12)]
    results = [r async for r in captioner.caption_many(refs)]
    assert {r.outcome for r in results} == {Outcome.CAPTIONED}
    assert describer.peak_in_flight == 3  # 3,000 bytes / 1,000 per call
    assert captioner.calls_bytes.peak == 3000
    assert max(downloads_at_peak) <= 3  # never downloaded far ahead of its call

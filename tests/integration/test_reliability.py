"""Faults, duplicates and races, injected between the real adapters and the real services.

Cloud Storage is fake-gcs-server behind tests.gcs_proxy (which enforces PATCH
preconditions, records requests and injects faults); Gemini is the stand-in,
reached by the unmodified google-genai client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from captioner.domain import ObjectRef, Outcome
from captioner.runtime import Runtime
from captioner.settings import Settings
from tests import images, objects
from tests.gcs_proxy import GcsProxy


@pytest.fixture(scope="module")
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


@pytest.fixture
async def runtime(
    proxy: GcsProxy, gemini: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Runtime]:
    proxy.reset()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    rt = Runtime(
        Settings.from_env(
            {
                "CAPTION_GEMINI_ATTEMPTS": "3",
                "CAPTION_STORAGE_ATTEMPTS": "3",
                "CAPTION_RETRY_MAX_WAIT": "0.2",
                "CAPTION_GEMINI_TIMEOUT": "1",
                "CAPTION_DEADLINE": "3",
                "CAPTION_MODE": "sentence",
            }
        )
    )
    yield rt
    await rt.aclose()


@pytest.fixture
def bucket(gcs_client: Any, proxy: GcsProxy) -> Any:
    """A bucket seen through the proxy, so the owner's own edits bump metageneration too."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    created = gcs_client.create_bucket(f"rel-{uuid.uuid4().hex[:12]}")
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": proxy.url},
    )
    return client.bucket(created.name)


def upload(bucket: Any, name: str, data: bytes | None = None, **metadata: str) -> ObjectRef:
    return objects.upload(
        bucket, name, data if data is not None else images.photo(), metadata=metadata
    )


meta = objects.metadata


async def test_every_patch_carries_both_preconditions(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "pre.jpg")
    await runtime.captioner().caption_object(ref)
    (patch,) = proxy.recorded("PATCH")
    assert patch.query["ifGenerationMatch"] == str(ref.generation)
    assert patch.query["ifMetagenerationMatch"] == str(ref.metageneration)


async def test_concurrent_duplicate_events_write_once(
    bucket: Any, runtime: Runtime, proxy: GcsProxy, gemini: Any
) -> None:
    ref = upload(bucket, "dup.jpg", owner="alice")
    gemini.latency = 0.2  # all duplicates are in flight together
    results = await asyncio.gather(*(runtime.captioner().caption_object(ref) for _ in range(8)))
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes.count("ok") == 1
    assert outcomes.count("skipped") == 7
    assert all(r.reason == "already-captioned" for r in results if r.outcome is Outcome.SKIPPED)
    won = [p for p in proxy.recorded("PATCH") if p.status == 200]
    assert len(won) == 1
    assert meta(bucket, "dup.jpg")["owner"] == "alice"


async def test_overwrite_while_describing_never_gets_the_old_caption(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "race.jpg")
    proxy.before_next_patch(lambda: upload(bucket, "race.jpg", images.photo("coffee.jpg")))
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "superseded"
    assert "caption" not in meta(bucket, "race.jpg")
    assert [p.status for p in proxy.recorded("PATCH")] == [412]


async def test_delete_while_describing_ends_cleanly(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "gone.jpg")
    proxy.before_next_patch(lambda: bucket.blob("gone.jpg").delete())
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "gone"
    assert bucket.get_blob("gone.jpg") is None


async def test_owner_edit_while_describing_survives(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "edit.jpg", owner="alice")

    def owner_edits() -> None:
        blob = bucket.get_blob("edit.jpg")
        blob.metadata = {**(blob.metadata or {}), "reviewed": "yes"}
        blob.patch()

    proxy.before_next_patch(owner_edits)
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED
    final = meta(bucket, "edit.jpg")
    assert final["reviewed"] == "yes"
    assert final["owner"] == "alice"
    assert final["caption-status"] == "ok"
    ours = [p.status for p in proxy.recorded("PATCH") if "ifGenerationMatch" in p.query]
    assert ours == [412, 200]  # refused, re-read, fitted around the owner's edit


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 503), ("GET", 429), ("GET", None), ("PATCH", 503), ("PATCH", 500), ("PATCH", None)],
    ids=["read-503", "read-429", "read-reset", "write-503", "write-500", "write-reset"],
)
async def test_storage_hiccups_are_retried(
    bucket: Any, runtime: Runtime, proxy: GcsProxy, method: str, status: int | None
) -> None:
    ref = upload(bucket, "hiccup.jpg")
    proxy.add_fault(method, "/o/hiccup.jpg", status, count=2)
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED
    assert meta(bucket, "hiccup.jpg")["caption-status"] == "ok"


async def test_download_reset_is_retried(bucket: Any, runtime: Runtime, proxy: GcsProxy) -> None:
    ref = upload(bucket, "media.jpg")
    proxy.add_fault("GET", "/o/media.jpg", 200, count=0)  # no-op rule keeps ordering simple
    proxy.add_fault("GET", "/o/media.jpg", None, count=1)  # the metadata read
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED


async def test_persistent_storage_failure_is_a_retry_and_records_nothing(
    bucket: Any, runtime: Runtime, proxy: GcsProxy, gemini: Any
) -> None:
    ref = upload(bucket, "down.jpg", owner="x")
    proxy.add_fault("PATCH", "/o/down.jpg", 503, count=100)
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.RETRY
    assert meta(bucket, "down.jpg") == {"owner": "x"}
    assert len(proxy.recorded("PATCH")) == 3  # CAPTION_STORAGE_ATTEMPTS, bounded


async def test_a_transient_failure_is_never_recorded_as_permanent(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    ref = upload(bucket, "t.jpg")
    gemini.add_fault("429", retry_delay=0.05)
    first = await runtime.captioner().caption_object(ref)
    assert first.outcome is Outcome.RETRY
    assert "caption-status" not in meta(bucket, "t.jpg")
    gemini.clear_faults()
    second = await runtime.captioner().caption_object(ref)  # Eventarc's redelivery
    assert second.outcome is Outcome.CAPTIONED


async def test_a_permanent_failure_is_not_repeated_on_redelivery(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    ref = upload(bucket, "p.jpg", images.truncated_jpeg())
    first = await runtime.captioner().caption_object(ref)
    assert first.outcome is Outcome.FAILED
    downloads_before = gemini.calls
    for _ in range(5):  # a day of redeliveries
        again = await runtime.captioner().caption_object(ref)
        assert again.outcome is Outcome.SKIPPED
        assert again.reason == "failed-before"  # said as what it is, not as captioned
    assert gemini.calls == downloads_before == 0


async def test_gemini_timeout_is_retried_then_succeeds(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("hang", count=1)
    result = await runtime.captioner().caption_object(upload(bucket, "slow.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    assert gemini.calls == 2


async def test_gemini_retry_delay_is_honoured(bucket: Any, runtime: Runtime, gemini: Any) -> None:
    gemini.add_fault("429", count=1, retry_delay=0.15)
    started = time.monotonic()
    result = await runtime.captioner().caption_object(upload(bucket, "delay.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    assert time.monotonic() - started >= 0.15


async def test_model_output_with_control_characters_is_cleaned(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("custom_text", text='  "A cat\x00 on\n a\x1b[31m mat\ud800."\n')
    await runtime.captioner().caption_object(upload(bucket, "ctl.jpg"))
    assert meta(bucket, "ctl.jpg")["caption"] == "A cat on a [31m mat."


async def test_enormous_owner_metadata_leaves_it_intact(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    ref = upload(bucket, "full.jpg", notes="n" * 8100)
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "metadata-full"
    assert meta(bucket, "full.jpg") == {"notes": "n" * 8100}


async def test_very_long_caption_is_cut_to_fit_next_to_owner_metadata(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    gemini.add_fault("custom_text", text="Ein sehr langer Satz über Katzen. " * 400)
    ref = upload(bucket, "long.jpg", notes="n" * 5000)
    await runtime.captioner().caption_object(ref)
    final = meta(bucket, "long.jpg")
    assert final["notes"] == "n" * 5000
    assert final["caption"].endswith("…")
    total = sum(len(k.encode()) + len(v.encode()) for k, v in final.items())
    assert total <= 8192


# Bodies that cannot be read: each ends as transient (retried, nothing recorded) or
# permanent (error:<reason> recorded), never as an unhandled exception.


async def test_a_download_cut_off_mid_body_is_retried_then_captioned(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "cut.jpg")
    proxy.add_fault("GET", "/o/cut.jpg", 200, count=1, body="cut", query_contains="alt=media")
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED
    downloads = [r for r in proxy.recorded("GET") if r.query.get("alt") == "media"]
    assert len(downloads) == 2


async def test_a_download_always_cut_off_is_a_retry_and_records_nothing(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "cut2.jpg", owner="x")
    proxy.add_fault("GET", "/o/cut2.jpg", 200, count=100, body="cut", query_contains="alt=media")
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.RETRY
    assert meta(bucket, "cut2.jpg") == {"owner": "x"}


async def test_a_metadata_read_answered_200_with_html_is_retried(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "html.jpg")
    proxy.add_fault("GET", "/o/html.jpg", 200, count=1, body="html", query_contains="fields=")
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED


async def test_a_metadata_read_always_html_is_a_retry_and_records_nothing(
    bucket: Any, runtime: Runtime, proxy: GcsProxy
) -> None:
    ref = upload(bucket, "html2.jpg", owner="x")
    proxy.add_fault("GET", "/o/html2.jpg", 200, count=100, body="html", query_contains="fields=")
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.RETRY
    assert meta(bucket, "html2.jpg") == {"owner": "x"}


async def test_an_object_whose_gzip_encoding_is_not_gzip_is_recorded_as_permanent(
    bucket: Any, runtime: Runtime, proxy: GcsProxy, gemini: Any
) -> None:
    ref = upload(bucket, "gz.jpg", owner="x")
    proxy.add_fault("GET", "/o/gz.jpg", 200, count=100, body="bad-gzip", query_contains="alt=media")
    result = await runtime.captioner().caption_object(ref)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "bad-content-encoding"
    assert meta(bucket, "gz.jpg")["caption-status"] == "error:bad-content-encoding"
    assert meta(bucket, "gz.jpg")["owner"] == "x"
    assert gemini.calls == 0


async def test_a_huge_retry_delay_is_capped_so_the_instance_keeps_captioning(
    bucket: Any, runtime: Runtime, gemini: Any
) -> None:
    # CAPTION_RETRY_MAX_WAIT is 0.2 here; the server asks for more than a day.
    gemini.add_fault("429", count=1, retry_delay=100_000)
    started = time.monotonic()
    first = await runtime.captioner().caption_object(upload(bucket, "huge-delay.jpg"))
    second = await runtime.captioner().caption_object(upload(bucket, "after.jpg"))
    assert (first.outcome, second.outcome) == (Outcome.CAPTIONED, Outcome.CAPTIONED)
    assert time.monotonic() - started < 3

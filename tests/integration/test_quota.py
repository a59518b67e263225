"""Under a requests-per-second quota, the pipeline follows the quota instead of thrashing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from captioner.domain import ObjectRef, Outcome
from captioner.runtime import Runtime
from captioner.settings import Settings
from tests import images

QUOTA = 20.0
IMAGES = 240


@pytest.mark.slow
async def test_follows_the_quota_within_15_percent_refusing_few_calls_after_the_first_burst(
    bucket: Any, gemini: Any
) -> None:
    refs = []
    for i in range(IMAGES):
        blob = bucket.blob(f"q/{i}.png")
        blob.upload_from_string(
            images.encode(images.solid((32, 32), (i % 256, i // 256, 3)), "PNG"),
            content_type="image/png",
        )
        refs.append(ObjectRef(bucket.name, blob.name))
    gemini.latency = 0.3
    gemini.quota_rps = QUOTA
    runtime = Runtime(Settings.from_env({"CAPTION_MAX_CONCURRENCY": "64"}))
    try:
        started = time.monotonic()
        outcomes = [r.outcome async for r in runtime.captioner().caption_many(refs)]
        elapsed = time.monotonic() - started
    finally:
        await runtime.aclose()
    assert outcomes.count(Outcome.CAPTIONED) == IMAGES
    rate = IMAGES / elapsed
    throttled = sum(1 for r in gemini.requests if r.status == 429)
    # The first burst (64 calls against a bucket of 20) is refused in bulk by design:
    # refusals are quick and free, and they are how the limiter learns the quota.
    first = min(r.received_at for r in gemini.requests)
    later = [r for r in gemini.requests if r.received_at > first + 2.0]
    later_throttled = sum(1 for r in later if r.status == 429)
    print(
        f"\nquota {QUOTA}/s: {rate:.2f} images/s, {throttled} answers of 429 for {IMAGES} "
        f"images, {later_throttled} of {len(later)} requests after the first 2 s"
    )
    assert rate >= 0.85 * QUOTA
    # In steady state a 429 comes each time the limiter probes one call over the quota
    # (20/s x 0.32 s is 6.4 calls: 6 is under it, 7 over); 9-14% of calls in trials.
    assert later_throttled <= 0.25 * len(later)

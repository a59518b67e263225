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
async def test_throughput_stays_within_15_percent_of_the_quota_with_few_429s(
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
    print(f"\nquota {QUOTA}/s: {rate:.2f} images/s, {throttled} answers of 429 for {IMAGES} images")
    assert rate >= 0.85 * QUOTA
    assert throttled <= 0.25 * IMAGES

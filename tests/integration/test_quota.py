"""Under a quota of several shapes, the pipeline follows the quota instead of thrashing: the
real google-genai client against the stand-in over HTTP, the real limiter and describer."""

from __future__ import annotations

import time
from typing import Any

import pytest

from captioner.domain import ObjectRef, Outcome
from captioner.runtime import Runtime
from captioner.settings import Settings
from captioner_dev.gemini_server.tokens import text_tokens
from tests import images

QUOTA = 20.0
IMAGES = 240


def _upload(bucket: Any) -> list[ObjectRef]:
    refs = []
    for i in range(IMAGES):
        blob = bucket.blob(f"q/{i}.png")
        blob.upload_from_string(
            images.encode(images.solid((32, 32), (i % 256, i // 256, 3)), "PNG"),
            content_type="image/png",
        )
        refs.append(ObjectRef(bucket.name, blob.name))
    return refs


async def _caption(refs: list[ObjectRef], settings: Settings) -> tuple[list[Outcome], float]:
    runtime = Runtime(settings)
    try:
        started = time.monotonic()
        outcomes = [r.outcome async for r in runtime.captioner().caption_many(refs)]
        return outcomes, time.monotonic() - started
    finally:
        await runtime.aclose()


@pytest.mark.slow
async def test_follows_the_quota_within_15_percent_refusing_few_calls_after_the_first_burst(
    bucket: Any, gemini: Any
) -> None:
    refs = _upload(bucket)
    gemini.latency = 0.3
    gemini.quota_rps = QUOTA
    outcomes, elapsed = await _caption(refs, Settings.from_env({"CAPTION_MAX_CONCURRENCY": "64"}))
    assert outcomes.count(Outcome.CAPTIONED) == IMAGES
    rate = IMAGES / elapsed
    throttled = sum(1 for r in gemini.requests if r.status == 429)
    first = min(r.received_at for r in gemini.requests)
    later = [r for r in gemini.requests if r.received_at > first + 2.0]
    later_throttled = sum(1 for r in later if r.status == 429)
    print(
        f"\nquota {QUOTA}/s: {rate:.2f} images/s, {throttled} answers of 429 for {IMAGES} "
        f"images, {later_throttled} of {len(later)} requests after the first 2 s"
    )
    assert rate >= 0.85 * QUOTA
    # Paced at the rate the quota let through, the calls meet a 429 only when the limiter
    # creeps past it (the limiter before pacing met one on 9-14 % of calls here).
    assert later_throttled <= 0.10 * len(later)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["sliding-second", "vertex"])
async def test_follows_a_quota_counted_per_second_refusing_few_calls(
    bucket: Any, gemini: Any, shape: str
) -> None:
    # A burst of calls that leaves together is refused by these even under the average
    # (Vertex AI's Standard PayGo throttles "second-level spikes"): the calls must be paced.
    refs = _upload(bucket)
    settings = Settings.from_env({"CAPTION_MAX_CONCURRENCY": "64"})
    # A call's input tokens, as the stand-in charges them: the image's tile and the prompt.
    tokens = 258 + text_tokens(settings.rule_book().default.full_prompt())
    gemini.configure(
        latency=0.3,
        quota_shape=shape,
        quota_rps=QUOTA if shape == "sliding-second" else None,
        quota_tpm=QUOTA * 60 * tokens if shape == "vertex" else None,
    )
    outcomes, elapsed = await _caption(refs, settings)
    assert outcomes.count(Outcome.CAPTIONED) == IMAGES
    accepted = [r for r in gemini.requests if r.status == 200]
    assert {r.prompt_tokens for r in accepted} == {tokens}
    throttled = sum(1 for r in gemini.requests if r.status == 429)
    rate = IMAGES / elapsed
    print(f"\n{shape} {QUOTA}/s: {rate:.2f} images/s, {throttled} answers of 429")
    # It follows the quota rather than collapsing under it; how close it gets is measured by
    # bench/fleet.py (RESULTS.md "Pacing"), not here. The limiter before pacing ran at
    # 0.6-0.7 of such a quota with 20-40 % of its calls refused (bench/fleet_sim.py).
    assert rate >= 0.75 * QUOTA
    assert throttled <= 0.10 * len(gemini.requests)

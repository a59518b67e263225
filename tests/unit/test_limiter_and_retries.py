"""Adaptive concurrency and the retry policy, with no services involved."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from captioner.errors import PermanentError, TransientError
from captioner.limiter import AdaptiveLimiter
from captioner.retrying import backoff_hook, with_retries


async def test_limiter_never_exceeds_its_limit() -> None:
    limiter = AdaptiveLimiter(3)
    peak = 0
    current = 0

    async def call() -> None:
        nonlocal peak, current
        async with limiter.slot():
            current += 1
            peak = max(peak, current)
            await asyncio.sleep(0.001)
            current -= 1

    await asyncio.gather(*(call() for _ in range(30)))
    assert peak == 3


async def test_throttling_halves_the_limit_once_per_burst() -> None:
    limiter = AdaptiveLimiter(16, cooldown=10)
    for _ in range(5):  # five 429s from one burst
        async with limiter.slot() as slot:
            slot.throttled()
    assert limiter.stats.limit == 8
    assert limiter.stats.decreases == 1
    assert limiter.stats.throttled == 5


async def test_slow_start_grows_fast_until_the_first_throttle_then_additively() -> None:
    limiter = AdaptiveLimiter(100, initial=2, cooldown=0)
    for _ in range(4):
        async with limiter.slot() as slot:
            slot.succeeded()
    assert limiter.stats.limit == 6  # +1 per success: doubling per round
    async with limiter.slot() as slot:
        slot.throttled()
    assert limiter.stats.limit == 3
    for _ in range(6):
        async with limiter.slot() as slot:
            slot.succeeded()
    assert 4.0 < limiter.stats.limit < 5.0  # now about +1 per round of `limit` calls
    for _ in range(5000):
        async with limiter.slot() as slot:
            slot.succeeded()
    assert limiter.stats.limit == 100


async def test_a_named_retry_delay_pauses_every_new_call() -> None:
    limiter = AdaptiveLimiter(8, cooldown=0)
    async with limiter.slot() as slot:
        slot.throttled(retry_after=0.2)
    started = time.monotonic()
    async with limiter.slot():
        pass
    assert time.monotonic() - started >= 0.19


async def test_limit_never_falls_below_the_minimum() -> None:
    limiter = AdaptiveLimiter(4, cooldown=0)
    for _ in range(20):
        async with limiter.slot() as slot:
            slot.throttled()
    assert limiter.stats.limit == 1


def test_backoff_uses_full_jitter_bounded_exponentially() -> None:
    hook = backoff_hook(1.0, 30.0, random.Random(3))
    waits = [hook(TransientError("x")) for _ in range(8)]
    bounds = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(0 <= w <= b for w, b in zip(waits, bounds, strict=True))  # type: ignore[operator]
    assert len(set(waits)) == len(waits)  # drawn, not fixed


def test_backoff_honours_the_servers_delay_capped() -> None:
    hook = backoff_hook(1.0, 10.0)
    assert hook(TransientError("429", retry_after=7.0)) == 7.0
    assert hook(TransientError("429", retry_after=99.0)) == 10.0


def test_non_transient_errors_are_not_retried() -> None:
    hook = backoff_hook(1.0, 10.0)
    assert hook(PermanentError("x", "y")) is False
    assert hook(ValueError()) is False


async def test_with_retries_stops_at_the_attempt_limit() -> None:
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        raise TransientError("503")

    with pytest.raises(TransientError):
        await with_retries(flaky, attempts=3, deadline=None, wait_initial=0.001, wait_max=0.01)
    assert calls == 3


async def test_with_retries_waits_the_delay_the_server_asked_for() -> None:
    calls = 0

    async def rate_limited_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("429", retry_after=0.3)
        return "ok"

    started = time.monotonic()
    assert await with_retries(rate_limited_once, attempts=3, deadline=None) == "ok"
    assert time.monotonic() - started >= 0.3


async def test_with_retries_respects_the_deadline() -> None:
    async def slow_failure() -> None:
        raise TransientError("503", retry_after=0.2)

    started = time.monotonic()
    with pytest.raises(TransientError):
        await with_retries(slow_failure, attempts=100, deadline=0.5)
    assert time.monotonic() - started < 2

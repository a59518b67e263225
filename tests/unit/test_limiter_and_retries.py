"""Adaptive concurrency and the retry policy, with no services involved."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from captioner.errors import ConfigurationError, PermanentError, TransientError
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


async def _succeed(limiter: AdaptiveLimiter, times: int) -> None:
    for _ in range(times):
        async with limiter.slot() as slot:
            slot.succeeded()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _burst(limiter: AdaptiveLimiter, calls: int, refused: int) -> None:
    """``calls`` calls in flight together; the first ``refused`` are answered 429, the
    rest end undecided (as other errors do), so only the 429s move the limit."""
    gate = asyncio.Event()
    order = iter(range(calls))

    async def call() -> None:
        async with limiter.slot() as slot:
            await gate.wait()
            if next(order) < refused:
                slot.throttled()

    tasks = [asyncio.create_task(call()) for _ in range(calls)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)


async def _steady(limiter: AdaptiveLimiter, clock: Clock, *, rate: float, latency: float) -> None:
    """Three seconds of successes: one ending every 1/rate s, each taking ``latency``."""
    for _ in range(int(3 * rate)):
        async with limiter.slot() as slot:
            clock.now += latency
            slot.succeeded()
        clock.now += 1 / rate - latency


async def test_first_burst_of_429s_lowers_the_limit_once_to_0_7_of_the_calls_let_through() -> None:
    limiter = AdaptiveLimiter(64)
    await _burst(limiter, 30, refused=10)  # the bucket let 20 through
    stats = limiter.stats
    assert stats.decreases == 1
    assert stats.throttled == 10
    assert stats.ceiling == 20
    assert stats.limit == pytest.approx(0.7 * 20)


async def test_a_429_for_a_call_started_after_the_decrease_lowers_it_again() -> None:
    limiter = AdaptiveLimiter(64)
    await _burst(limiter, 30, refused=10)
    await _burst(limiter, 14, refused=4)
    assert limiter.stats.decreases == 2
    assert limiter.stats.ceiling == 10
    assert limiter.stats.limit == pytest.approx(7.0)


async def test_with_successes_seen_the_ceiling_is_their_rate_times_their_latency() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(64, clock=clock)
    await _steady(limiter, clock, rate=8.0, latency=0.5)  # Little: 8/s x 0.5 s = 4 calls
    await _burst(limiter, 20, refused=1)  # 19 were let through in this burst ...
    ceiling = limiter.stats.ceiling
    assert ceiling is not None
    assert 4 <= ceiling <= 5  # ... but the rate says about 4 in flight is what the quota allows
    assert limiter.stats.limit == pytest.approx(0.7 * ceiling)


async def test_a_429_after_a_quiet_spell_is_not_read_as_a_quota_of_one_call() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(64, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)
    clock.now += 30  # everyone waited out a long RetryInfo delay
    await _burst(limiter, 30, refused=5)
    assert limiter.stats.ceiling == 25  # the calls let through, not the idle rate
    assert limiter.stats.limit == pytest.approx(0.7 * 25)


async def test_after_a_measured_429_the_limit_regains_0_9_of_the_ceiling_within_a_round() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(100, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)  # 20 calls in flight
    await _burst(limiter, 30, refused=5)
    assert limiter.stats.ceiling == 20
    assert limiter.stats.decreases == 1
    assert limiter.stats.limit == pytest.approx(14.0)  # 0.7 x 20
    await _succeed(limiter, 4)  # one per success up to 0.9 x 20
    assert limiter.stats.limit == pytest.approx(18.0)
    await _succeed(limiter, 18)  # then one per round of calls
    assert 18.9 < limiter.stats.limit < 19.1


async def test_probing_doubles_each_round_without_a_429_up_to_the_maximum() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(1000, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)
    await _burst(limiter, 30, refused=5)  # ceiling 20: fast up to 18, then probing
    await _succeed(limiter, 4)
    assert limiter.stats.limit == pytest.approx(18.0)
    grown = []
    for _ in range(3):
        before = limiter.stats.limit
        await _succeed(limiter, int(before) + 1)
        grown.append(limiter.stats.limit - before)
    assert grown[0] == pytest.approx(1.0, abs=0.1)
    assert grown[1] > 1.5 * grown[0]  # about 1, 2, 4
    assert grown[2] > 1.5 * grown[1]
    await _succeed(limiter, 20_000)
    assert limiter.stats.limit == 1000


async def test_before_the_first_429_the_limit_doubles_per_round() -> None:
    limiter = AdaptiveLimiter(100, initial=2)
    await _succeed(limiter, 4)
    assert limiter.stats.limit == 6  # +1 per success


async def test_a_named_retry_delay_pauses_every_new_call() -> None:
    limiter = AdaptiveLimiter(8)
    async with limiter.slot() as slot:
        slot.throttled(retry_after=0.2)
    started = time.monotonic()
    async with limiter.slot():
        pass
    assert time.monotonic() - started >= 0.19


async def test_limit_never_falls_below_the_minimum() -> None:
    limiter = AdaptiveLimiter(4)
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


@pytest.mark.parametrize("retry_after", [5.0, 100_000.0, float("inf")])
async def test_a_huge_retry_delay_pauses_new_calls_no_longer_than_max_pause(
    retry_after: float,
) -> None:
    limiter = AdaptiveLimiter(8, max_pause=0.2)
    async with limiter.slot() as slot:
        slot.throttled(retry_after=retry_after)
    started = time.monotonic()
    async with asyncio.timeout(2), limiter.slot():
        pass
    assert 0.15 <= time.monotonic() - started < 1.0


async def test_a_later_short_delay_does_not_keep_an_earlier_long_pause() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(8, max_pause=30.0, clock=clock)
    async with limiter.slot() as slot:
        slot.throttled(retry_after=1e9)
    assert limiter._resume_at == clock.now + 30.0


def test_configuration_errors_are_not_retried_inside_the_invocation() -> None:
    hook = backoff_hook(1.0, 10.0)
    assert hook(ConfigurationError("bad key")) is False

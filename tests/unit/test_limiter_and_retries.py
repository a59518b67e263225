"""Adaptive concurrency and the retry policy, with no services involved."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time

import pytest

from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.limiter import AdaptiveLimiter, slow_start_initial
from captioner.retrying import backoff_hook, with_retries
from captioner_dev.gemini_server.quota import TokenBucket, retry_delay


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
    await _steady(limiter, clock, rate=40.0, latency=0.5)  # Little: 40/s x 0.5 s = 20 calls
    await _burst(limiter, 22, refused=1)  # 21 were let through in this burst ...
    assert limiter.stats.ceiling == 20  # ... but the rate says 20 is what the quota allows
    assert limiter.stats.limit == pytest.approx(0.7 * 20)


async def test_the_ceiling_is_at_least_0_85_of_the_calls_in_flight_at_the_429() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(64, clock=clock)
    # Few events to caption: 4 calls in flight is this instance's demand, not the quota.
    await _steady(limiter, clock, rate=8.0, latency=0.5)
    await _burst(limiter, 20, refused=1)  # then 20 at once, and the quota let 19 through
    assert limiter.stats.ceiling == 17  # 0.85 x 20, not the 4 the rate alone would say
    assert limiter.stats.limit == pytest.approx(0.7 * 17)


async def test_a_429_after_a_quiet_spell_is_not_read_as_a_quota_of_one_call() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(64, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)
    clock.now += 30  # everyone waited out a long RetryInfo delay
    await _burst(limiter, 30, refused=5)
    assert limiter.stats.ceiling == 25  # the calls let through, not the idle rate
    assert limiter.stats.limit == pytest.approx(0.7 * 25)


async def test_after_a_measured_429_the_limit_regains_0_85_of_the_ceiling_within_a_round() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(100, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)  # 20 calls in flight
    await _burst(limiter, 22, refused=1)
    assert limiter.stats.ceiling == 20
    assert limiter.stats.limit == pytest.approx(14.0)  # 0.7 x 20
    await _succeed(limiter, 2)  # one per success (not two: that is slow start's) ...
    assert limiter.stats.limit == pytest.approx(16.0)
    await _succeed(limiter, 1)  # ... up to 0.85 x 20, not past it
    assert limiter.stats.limit == pytest.approx(17.0)
    await _succeed(limiter, 17)  # then a quarter of a call per round
    assert limiter.stats.limit == pytest.approx(17.25, abs=0.01)


async def test_near_a_measured_ceiling_the_limit_creeps_a_quarter_of_a_call_a_round() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(1000, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)
    await _burst(limiter, 22, refused=1)  # ceiling 20: fast up to 17, then creeping
    await _succeed(limiter, 3)
    assert limiter.stats.limit == pytest.approx(17.0)
    for _ in range(3):
        before = limiter.stats.limit
        await _succeed(limiter, int(before))  # one round
        # The same for every instance whatever its share (AIMD's additive increase,
        # which is what evens shares out), and not 1, 2, 4 ...: in a fleet every
        # instance probes at once.
        assert limiter.stats.limit - before == pytest.approx(0.25, abs=0.01)


async def test_a_small_share_creeps_by_a_fraction_of_a_call_per_round() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(32, clock=clock)
    await _steady(limiter, clock, rate=6.0, latency=0.5)  # a share of 3 calls in flight
    await _burst(limiter, 4, refused=1)
    assert limiter.stats.ceiling == 3
    await _succeed(limiter, 1)  # fast back to 0.85 x 3
    assert limiter.stats.limit == pytest.approx(2.55)
    rounds = 0
    while limiter.stats.limit < 4:  # a call beyond the share is what overshoots
        await _succeed(limiter, int(limiter.stats.limit))
        rounds += 1
    assert rounds >= 5  # a quarter of a call a round: from 2.55 to 4 takes 6 rounds


async def test_past_the_ceiling_probing_doubles_each_round_up_to_the_maximum() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(1000, clock=clock)
    await _steady(limiter, clock, rate=40.0, latency=0.5)
    await _burst(limiter, 22, refused=1)  # ceiling 20
    while limiter.stats.limit < 22:  # 1.1 x the ceiling: the quota was raised
        await _succeed(limiter, 1)
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


async def test_with_no_measured_ceiling_a_small_limit_probes_by_an_eighth_of_the_maximum() -> None:
    limiter = AdaptiveLimiter(32, initial=4)
    await _burst(limiter, 4, refused=4)  # the whole first burst refused: limit 1
    assert limiter.stats.limit == 1
    for _ in range(4):
        await _succeed(limiter, int(limiter.stats.limit) + 1)
    # 1, 2, 4, 4 calls a round (not one a round, as a quarter of a limit of 1 would be)
    assert limiter.stats.limit >= 8


def test_a_new_instance_starts_at_a_quarter_of_its_maximum() -> None:
    assert [slow_start_initial(n) for n in (1, 2, 4, 16, 32, 33)] == [1, 1, 1, 4, 8, 9]


async def test_slow_start_triples_per_round_up_to_the_maximum() -> None:
    limiter = AdaptiveLimiter(32, initial=slow_start_initial(32))
    limits = []
    for _ in range(3):
        await _succeed(limiter, int(limiter.stats.limit))  # one round
        limits.append(limiter.stats.limit)
    assert limits == [24, 32, 32]


async def test_a_named_retry_delay_pauses_for_up_to_half_as_long_again_at_random() -> None:
    clock = Clock()
    draws = iter([0.0, 1.0, 0.5])
    limiter = AdaptiveLimiter(8, clock=clock, rng=lambda: next(draws), max_pause=30.0)
    pauses = []
    for _ in range(3):
        async with limiter.slot() as slot:
            slot.throttled(retry_after=2.0)
        pauses.append(limiter.stats.paused_until - clock.now)
        clock.now += 10
    assert pauses == [2.0, 3.0, 2.5]


async def _fleet(
    instances: int, quota: float, *, seconds: float = 120.0, maximum: int = 32, seed: int = 16
) -> tuple[list[int], int, float]:
    """Instances with a backlog that never empties, against one bucket, in simulated time
    (calls take a seeded lognormal latency, median 1.2 s; a 429 comes back at once, with
    RetryInfo). Returns the calls each got accepted, the 429s, and when 90 % of the
    quota was first sustained (over the second before and the five after)."""
    clock = Clock()
    clock.now = 0.0
    rng = random.Random(seed)
    limiters = [
        AdaptiveLimiter(maximum, initial=slow_start_initial(maximum), clock=clock, rng=rng.random)
        for _ in range(instances)
    ]
    bucket = TokenBucket(quota, clock.now)  # the stand-in's quota
    accepted = [0] * instances
    accepted_at: list[float] = []
    refused = 0
    ends: list[tuple[float, int, int, object, object]] = []  # (when, seq, who, slot cm, slot)
    seq = 0
    while clock.now < seconds:
        for who, limiter in enumerate(limiters):
            while (
                limiter.stats.in_flight < limiter.stats.window
                and clock.now >= limiter.stats.paused_until
            ):
                cm = limiter.slot()
                slot = await cm.__aenter__()
                wait = bucket.take(clock.now)
                if wait is not None:
                    wait = retry_delay(wait)
                if wait is None:
                    slot.succeeded()
                    accepted[who] += 1
                    accepted_at.append(clock.now)
                    latency = min(8.0, 1.2 * math.exp(0.6 * rng.gauss(0, 1)))
                else:
                    slot.throttled(wait)
                    refused += 1
                    latency = 0.01
                seq += 1
                heapq.heappush(ends, (clock.now + latency, seq, who, cm, slot))
        pauses = [x.stats.paused_until for x in limiters if x.stats.paused_until > clock.now]
        clock.now = min([ends[0][0], *pauses]) if ends else min(pauses)
        while ends and ends[0][0] <= clock.now:
            _, _, who, cm, _ = heapq.heappop(ends)
            await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
    reached = next(
        (
            t / 10
            for t in range(10, int(seconds * 10) - 50)
            if sum(1 for a in accepted_at if t / 10 - 1 <= a < t / 10) >= 0.9 * quota
            and sum(1 for a in accepted_at if t / 10 <= a < t / 10 + 5) >= 0.9 * quota * 5
        ),
        float("inf"),
    )
    return accepted, refused, reached


@pytest.mark.parametrize(
    ("instances", "quota", "most_429s"),
    # Eight instances sharing 20/s run three or four calls each: a step of one call is
    # a third of a share, and their opening burst alone (64 calls for 20) is 1.7 %.
    [(1, 20.0, 0.05), (4, 20.0, 0.05), (8, 20.0, 0.08), (4, 50.0, 0.05), (8, 50.0, 0.05)],
)
async def test_a_fleet_shares_one_quota_evenly_with_few_429s(
    instances: int, quota: float, most_429s: float
) -> None:
    seconds = 120.0
    accepted, refused, reached = await _fleet(instances, quota, seconds=seconds)
    total = sum(accepted)
    assert total >= 0.9 * quota * seconds
    assert refused <= most_429s * (total + refused)
    fair = total / instances
    assert all(fair / 2 <= share <= 2 * fair for share in accepted), accepted
    assert reached <= 5.0


async def test_before_the_first_429_the_limit_grows_two_calls_per_success() -> None:
    limiter = AdaptiveLimiter(100, initial=2)
    await _succeed(limiter, 4)
    assert limiter.stats.limit == 10  # +2 per success
    await _burst(limiter, 10, refused=2)  # the first 429: slow start is over
    after = limiter.stats.limit
    await _succeed(limiter, 2)
    assert limiter.stats.limit - after < 2 * 2  # no longer two calls per success


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

"""The limiter (pace, window, pauses) on a made-up clock, and the retry policy; no services.

The limiter's policy is ``ready_at`` / ``start`` / ``finish`` on an injected clock, so these
tests drive it in simulated time without sleeping; the few that go through ``slot()`` use
the real clock and short waits. Fleets on every quota shape: test_limiter_shapes.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from itertools import pairwise

import pytest

from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.limiter import AdaptiveLimiter, RateSettings, Slot, slow_start_initial
from captioner.retrying import backoff_hook, with_retries


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _limiter(maximum: int = 64, **kwargs: object) -> tuple[AdaptiveLimiter, Clock]:
    clock = Clock()
    return AdaptiveLimiter(maximum, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def _start_when_ready(limiter: AdaptiveLimiter, clock: Clock) -> Slot:
    """Moves the clock to when the limiter lets the next call go, and starts it."""
    clock.now = max(clock.now, limiter.ready_at())
    return limiter.start()


def _end(limiter: AdaptiveLimiter, slot: Slot, ok: bool = True, retry: float | None = None) -> None:
    if ok:
        slot.succeeded()
    else:
        slot.throttled(retry)
    limiter.finish(slot)


def _steady(limiter: AdaptiveLimiter, clock: Clock, *, rate: float, seconds: float) -> None:
    """Calls offered every 1/rate s, each ending at once, accepted (the service is quick)."""
    end = clock.now + seconds
    while clock.now < end:
        slot = _start_when_ready(limiter, clock)
        _end(limiter, slot)
        clock.now = max(clock.now, slot.started_at + 1 / rate)


def _learnt(rate: float = 25.0, **kwargs: object) -> tuple[AdaptiveLimiter, Clock]:
    """A limiter that saw three seconds at ``rate`` accepted, then one 429: paced."""
    limiter, clock = _limiter(opening=0.0, **kwargs)
    _steady(limiter, clock, rate=rate, seconds=3.0)
    _end(limiter, limiter.start(), ok=False)
    return limiter, clock


# -- the window: slow start -------------------------------------------------------------------


def test_a_new_instance_starts_at_a_quarter_of_its_maximum() -> None:
    assert [slow_start_initial(n) for n in (1, 2, 4, 16, 32, 33)] == [1, 1, 1, 4, 8, 9]


def test_slow_start_triples_the_window_per_round_up_to_the_maximum() -> None:
    limiter, clock = _limiter(32, initial=slow_start_initial(32))
    windows = []
    for _ in range(3):
        slots = []
        while limiter.ready_at() != float("inf"):
            slots.append(_start_when_ready(limiter, clock))
        clock.now += 0.5  # one latency
        for slot in slots:
            _end(limiter, slot)
        windows.append(limiter.stats.window)
    assert windows == [24, 32, 32]


def test_the_opening_window_leaves_over_a_tenth_of_a_second_not_at_once() -> None:
    # Eight instances opening with eight calls each at once are 64 calls in the quota's
    # first milliseconds; spread, the first 429 comes back before most have left. A
    # twentieth of a second of the pace (4 calls) may leave together.
    limiter, clock = _limiter(32, initial=8)
    starts = [_start_when_ready(limiter, clock).started_at for _ in range(8)]
    gaps = [b - a for a, b in pairwise(starts)]
    assert gaps == pytest.approx([0.0] * 3 + [0.1 / 8] * 4)


def test_in_slow_start_a_round_leaves_over_half_a_latency() -> None:
    limiter, clock = _limiter(32, initial=8, opening=0.0)
    slots = [limiter.start() for _ in range(8)]
    clock.now += 0.4
    for slot in slots:
        _end(limiter, slot)  # the window is 24 now, the latency 0.4 s
    assert limiter.stats.window == 24
    starts = [_start_when_ready(limiter, clock).started_at for _ in range(24)]
    pace = 2 * 24 / 0.4  # twice the window per latency: a round over half a latency
    together = int(0.05 * pace)  # a twentieth of a second of the pace may leave at once
    assert starts[-1] - starts[0] == pytest.approx((24 - together) / pace)


def test_once_paced_the_window_is_the_cap() -> None:
    limiter, _ = _learnt(initial=4)
    assert limiter.stats.window == 64


# -- the rate: AIMD -----------------------------------------------------------------------------


def test_a_429_sets_the_rate_to_0_85_of_the_rate_the_service_accepted() -> None:
    limiter, _ = _learnt(25.0)
    stats = limiter.stats
    assert stats.decreases == 1
    assert stats.ceiling == pytest.approx(25.0, rel=0.05)
    assert stats.rate == pytest.approx(0.85 * stats.ceiling)


def test_paced_calls_leave_evenly_spaced_at_the_rate() -> None:
    limiter, clock = _learnt(25.0)
    rate = limiter.stats.rate
    assert rate is not None
    clock.now += 0.001  # the token bucket holds at most one call at this rate (0.05 s worth)
    starts = [_start_when_ready(limiter, clock).started_at for _ in range(20)]
    gaps = [b - a for a, b in pairwise(starts)]
    assert gaps[1:] == pytest.approx([1 / rate] * 18, rel=1e-6)


def test_a_pace_of_more_calls_a_second_keeps_a_burst_of_a_twentieth_of_a_second() -> None:
    limiter, clock = _learnt(400.0)
    rate = limiter.stats.rate
    assert rate is not None
    clock.now += 10  # idle: the bucket fills, but only to 0.05 s of the rate
    starts = [_start_when_ready(limiter, clock).started_at for _ in range(40)]
    together = sum(1 for t in starts if t == starts[0])
    assert together == int(0.05 * rate)


def test_refusals_of_calls_sent_after_the_cut_wait_a_second_before_cutting_again() -> None:
    limiter, clock = _learnt(25.0)
    rate = limiter.stats.rate
    clock.now += 0.5
    _end(limiter, _start_when_ready(limiter, clock), ok=False)  # the quota still counts
    assert limiter.stats.decreases == 1  # the calls sent before the cut: no second cut
    assert limiter.stats.rate == rate
    clock.now += 1.0
    _end(limiter, _start_when_ready(limiter, clock), ok=False)
    assert limiter.stats.decreases == 2


def test_a_refusal_of_a_call_sent_before_the_cut_lowers_the_ceiling_by_that_call() -> None:
    limiter, clock = _limiter(opening=0.0)
    _steady(limiter, clock, rate=25.0, seconds=3.0)
    early = limiter.start()  # sent before the 429 below, answered after it
    _end(limiter, limiter.start(), ok=False)
    ceiling = limiter.stats.ceiling
    assert ceiling is not None
    _end(limiter, early, ok=False)
    assert limiter.stats.decreases == 1
    assert limiter.stats.ceiling == pytest.approx(ceiling - 1 / 3.0)  # one call in 3 s


def test_the_rate_regains_0_95_of_the_ceiling_within_a_second_then_creeps() -> None:
    limiter, clock = _learnt(25.0)
    ceiling = limiter.stats.ceiling
    assert ceiling is not None
    _steady(limiter, clock, rate=1000.0, seconds=1.0)  # plenty to send: paced throughout
    assert limiter.stats.rate == pytest.approx(0.95 * ceiling, rel=0.02)
    before = limiter.stats.rate
    assert before is not None
    _steady(limiter, clock, rate=1000.0, seconds=4.0)
    creep = RateSettings().creep + RateSettings().creep_share * ceiling**2
    assert limiter.stats.rate == pytest.approx(before + 4 * creep, rel=0.02)


def test_a_small_share_creeps_by_about_the_same_step_as_a_larger_one() -> None:
    # AIMD's equal additive step is what evens out the shares of a fleet: the instance
    # sending more meets more 429s and gives up more at each.
    steps = []
    for share in (2.0, 4.0):
        limiter, clock = _learnt(share)
        _steady(limiter, clock, rate=1000.0, seconds=2.0)
        before = limiter.stats.rate
        assert before is not None
        _steady(limiter, clock, rate=1000.0, seconds=5.0)
        rate = limiter.stats.rate
        assert rate is not None
        steps.append(rate - before)
    assert steps[1] < 2 * steps[0]  # not proportional to the share (that would be MIMD)
    assert steps[0] < 0.1  # a small step: eight instances at 2.5/s creep together


def test_calls_that_did_not_leave_at_the_pace_do_not_grow_the_rate() -> None:
    limiter, clock = _learnt(25.0)
    rate = limiter.stats.rate
    clock.now += 1.0
    _steady(limiter, clock, rate=5.0, seconds=10.0)  # little to send: well under the pace
    assert limiter.stats.rate == rate


def test_past_1_1_times_the_ceiling_a_raised_quota_is_found_in_seconds() -> None:
    limiter, clock = _learnt(10.0)
    ceiling = limiter.stats.ceiling
    assert ceiling is not None
    while (limiter.stats.rate or 0) < 1.1 * ceiling:  # creeping: about half a minute
        _steady(limiter, clock, rate=1000.0, seconds=1.0)
    rate = limiter.stats.rate
    assert rate is not None
    _steady(limiter, clock, rate=1000.0, seconds=12.0)  # the quota was raised to 1000
    grown = limiter.stats.rate
    assert grown is not None
    assert grown > 4 * rate


def test_an_instance_whose_opening_calls_were_all_refused_keeps_calling() -> None:
    # Its fleet took the quota's first second; it measured nothing let through, which is
    # no measure of its share.
    limiter, clock = _limiter(32, initial=8, opening=0.0)
    slots = [limiter.start() for _ in range(8)]
    for slot in slots:
        _end(limiter, slot, ok=False)
    rate = limiter.stats.rate
    assert rate is not None
    assert rate >= 0.85 * 0.25 * 8  # held: a quarter of the 8 calls a second it sent
    _steady(limiter, clock, rate=1000.0, seconds=2.0)
    grown = limiter.stats.rate
    assert grown is not None
    assert grown > 1.5 * rate  # and, a guess, it grows away from it


def test_a_fresh_instance_whose_first_call_is_refused_learns_no_rate_from_it() -> None:
    # One call refused would read a quota of a call every four seconds.
    limiter, clock = _limiter(32, initial=8, rng=lambda: 0.0)
    _end(limiter, _start_when_ready(limiter, clock), ok=False, retry=0.2)
    assert limiter.stats.rate is None
    assert limiter.stats.decreases == 0
    assert limiter.ready_at() == pytest.approx(clock.now + 0.2)  # the pause it named


def test_the_rate_never_falls_below_one_call_per_max_pause() -> None:
    limiter, clock = _limiter(4, opening=0.0)
    for _ in range(40):
        _end(limiter, _start_when_ready(limiter, clock), ok=False)
        clock.now += 1.1
    rate = limiter.stats.rate
    assert rate is not None
    assert rate >= 1 / 30


# -- pauses a 429 asks for --------------------------------------------------------------------


def test_a_named_retry_delay_pauses_for_up_to_half_as_long_again_at_random() -> None:
    draws = iter([0.0, 1.0, 0.5])
    limiter, clock = _limiter(8, rng=lambda: next(draws), max_pause=30.0)
    pauses = []
    for _ in range(3):
        slot = _start_when_ready(limiter, clock)
        _end(limiter, slot, ok=False, retry=2.0)
        pauses.append(limiter.stats.paused_until - clock.now)
        clock.now += 10
    assert pauses == [2.0, 3.0, 2.5]


def test_a_capped_delay_is_spread_below_the_cap_not_all_at_it() -> None:
    # A per-minute quota names up to a minute; eight instances capped at 30 s would all
    # come back at once.
    draws = iter([0.0, 0.5, 1.0])
    limiter, clock = _limiter(8, rng=lambda: next(draws), max_pause=30.0)
    pauses = []
    for _ in range(3):
        slot = _start_when_ready(limiter, clock)
        _end(limiter, slot, ok=False, retry=50.0)
        pauses.append(limiter.stats.paused_until - clock.now)
        clock.now += 100
    assert pauses == [30.0, 22.5, 20.0]
    assert max(pauses) <= 30.0


def test_no_call_starts_during_a_pause() -> None:
    limiter, clock = _limiter(8, rng=lambda: 0.0)
    _end(limiter, _start_when_ready(limiter, clock), ok=False, retry=5.0)
    assert limiter.ready_at() == pytest.approx(clock.now + 5.0)


def test_a_later_short_delay_does_not_keep_an_earlier_long_pause() -> None:
    limiter, clock = _limiter(8, max_pause=30.0, rng=lambda: 0.0)
    _end(limiter, limiter.start(), ok=False, retry=1e9)
    assert limiter.stats.paused_until == clock.now + 30.0


def test_the_first_call_after_a_pause_refused_does_not_cut_the_rate() -> None:
    # The Gemini API names whole seconds, rounded down: back a fraction early, refused
    # again. The pause was short, the rate was not too high.
    limiter, clock = _learnt(25.0, rng=lambda: 0.0)
    clock.now += 2.0
    _end(limiter, _start_when_ready(limiter, clock), ok=False, retry=26.0)
    rate, cuts = limiter.stats.rate, limiter.stats.decreases
    slot = _start_when_ready(limiter, clock)
    assert slot.started_at == pytest.approx(clock.now)
    _end(limiter, slot, ok=False, retry=1.0)
    assert (limiter.stats.rate, limiter.stats.decreases) == (rate, cuts)


# -- through slot(), on the real clock ----------------------------------------------------------


async def test_limiter_never_exceeds_its_limit() -> None:
    limiter = AdaptiveLimiter(3, opening=0.0)
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


async def test_slot_waits_for_the_pace() -> None:
    limiter = AdaptiveLimiter(8, opening=0.0)
    for ok in [True] * 19 + [False]:  # 19 let through in no time, then a 429
        slot = limiter.start()
        _end(limiter, slot, ok=ok)
    rate = limiter.stats.rate
    assert rate is not None
    assert rate == pytest.approx(0.85 * 19)  # 19 in a second (the shortest measure)
    started = time.monotonic()
    for _ in range(4):
        async with limiter.slot() as slot:
            slot.succeeded()
    assert time.monotonic() - started >= 3 / rate - 0.01


async def test_a_named_retry_delay_pauses_every_new_call() -> None:
    limiter = AdaptiveLimiter(8)
    async with limiter.slot() as slot:
        slot.throttled(retry_after=0.2)
    started = time.monotonic()
    async with limiter.slot():
        pass
    assert time.monotonic() - started >= 0.19


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
    assert 0.05 <= time.monotonic() - started < 1.0


# -- the retry policy ---------------------------------------------------------------------------


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


def test_configuration_errors_are_not_retried_inside_the_invocation() -> None:
    hook = backoff_hook(1.0, 10.0)
    assert hook(ConfigurationError("bad key")) is False

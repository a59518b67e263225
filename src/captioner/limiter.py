"""Adaptive concurrency for Gemini calls, following a quota without thrashing against it.

A quota caps requests per second, so the calls worth having in flight are the quota
times the model's latency (Little's law). The limiter learns that number from 429s.
Deployed, every instance of the function has its own limiter and all of them draw on
one project quota, so what one instance learns is its *share*:

- It starts at ``initial`` and, until the first 429, adds ``slow_start_gain`` calls
  per success (two: the limit triples per round of calls, where TCP's slow start
  doubles). A new instance should start low (``slow_start_initial``: a quarter of
  the maximum): instances start together, and each opening with its maximum spends
  the quota's first second on 429s (eight instances at 32 calls: 256 calls into a
  quota of 20/s). Tripling runs a lone instance at 8, 24, 32 calls in its first three
  rounds rather than 8, 16, 32, with the same opening burst: on paper an eighth of a
  second less on the first request of a fresh instance at 0.5 s latency, which the
  measured first requests (0.69-0.72 of a full pool, bench/RESULTS.md) do not show
  beyond their spread. Quadrupling was measured too: the first request gained a
  little, and a lone instance under a quota of 20/s met twice as many 429s.
- A 429 marks a *ceiling*: the rate of successes over the last two latencies (at
  least a second; up to six latencies when fewer than five calls ended in two, as
  for an instance that runs a few calls of a fleet's quota) times their latency,
  which is Little's law again and is what the quota let through; but at least
  ``held`` (0.85) of the calls in flight when the 429 came (this one included). A
  small share measured just after a cut reads the cut, not the quota: without that
  floor, eight instances at 20/s measured one or two calls for shares of three or
  four, cut to one, and raced back; and an instance that had few events to caption
  measured its demand, not the quota. (In the simulated fleet, bench/fleet_sim.py,
  the floor raised the quota used at 20/s by one or two hundredths and kept shares
  within 0.6–1.5 of the fair one rather than 0.5–1.9, for half a point more 429s.)
  The limit drops to ``decrease`` times the ceiling (0.7), so the excess drains, and
  then climbs back one call per success up to ``recover`` of the ceiling (0.85):
  within about one round it runs a little under its share again.
- Before a second of successes has been seen (the first burst) the ceiling is the
  calls in flight less those refused with them, and the limit only drops to 0.7
  of that, again with each new burst, until a measured ceiling takes over.
- From there to 1.1 of a measured ceiling (at least two calls past it) it creeps by
  ``creep`` calls per round (a quarter of a call), the same for every instance
  whatever its share. In a fleet every instance probes at once: probing by one,
  two, four calls a round each made eight instances at 20/s overshoot every round
  or two, and a fifth of all calls were answered 429. An equal additive step with
  multiplicative cuts is AIMD, which evens shares out: the instance with more in
  flight is the likelier to meet the next 429 and gives up more when it does.
- Above that (or with no measured ceiling) it probes: one call further in the first
  round, then two, four... (at most a quarter of the limit, or an eighth of the
  maximum, per round), so a quota that was raised, or a ceiling measured low, is
  found again in a few rounds; the next 429 sets a new ceiling.
- Only a 429 for a call started after the last decrease lowers the limit again:
  the others were sent under the old limit and say nothing new (TCP's one cut per
  window), so one burst of 429s counts once.

The constants were chosen on a simulated fleet (instances with a finite backlog of
upload events against one token bucket, as bench/fleet.py runs them for real) and
then measured in bench/fleet.py; bench/RESULTS.md "Fleet" has both.

A 429 that names a delay (RetryInfo) also holds every new call until it is over,
plus up to half as long again at random (``pause_jitter``) so that the instances of
a fleet, told the same delay at the same moment, do not all come back at once; but
never for longer than ``max_pause`` (``CAPTION_RETRY_MAX_WAIT``): one answer with
``retryDelay: "100000s"`` must not stop an instance from ever calling again.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(slots=True)
class LimiterStats:
    limit: float
    in_flight: int
    decreases: int
    throttled: int
    ceiling: int | None
    paused_until: float = 0.0  # on the limiter's clock: no call starts before it
    window: int = 0  # calls that may be in flight now: the limit made a whole number


def slow_start_initial(maximum: int) -> int:
    """Where a new instance starts: a quarter of its maximum (at least one call).

    Eight instances at CAPTION_MAX_CONCURRENCY=32 so open with 64 calls rather than
    256; the limit triples each round while successes come back, so a lone instance
    is at its maximum after two rounds.
    """
    return max(1, math.ceil(maximum / 4))


class AdaptiveLimiter:
    """Bounds calls in flight to a limit that follows the service's answers."""

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int | None = None,
        decrease: float = 0.7,
        recover: float = 0.85,
        held: float = 0.85,
        creep: float = 0.25,
        slow_start_gain: float = 2.0,
        max_pause: float = 30.0,
        pause_jitter: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        if not 0 < decrease <= recover <= 1:
            raise ValueError("need 0 < decrease <= recover <= 1")
        if creep <= 0 or pause_jitter < 0 or slow_start_gain < 1 or not 0 <= held <= 1:
            raise ValueError(
                "need creep > 0, pause_jitter >= 0, slow_start_gain >= 1, 0 <= held <= 1"
            )
        self._held = held
        self._slow_start_gain = slow_start_gain
        self._clock = clock
        self._rng = rng
        self._creep = creep
        self._pause_jitter = pause_jitter
        self._max_pause = max(0.0, max_pause)
        self._min = float(minimum)
        self._max = float(maximum)
        self._limit = float(initial if initial is not None else maximum)
        self._decrease = decrease
        self._recover = recover
        self._in_flight = 0
        self._last_decrease = -float("inf")
        self._decreases = 0
        self._throttled = 0
        self._condition: asyncio.Condition | None = None
        self._resume_at = 0.0
        self._ceiling: int | None = None
        self._measured = False
        # Below this the limit grows by one per success; above it, by ``_probe`` per round.
        self._fast_until = self._max
        self._probe = 1.0
        self._round_successes = 0.0
        # For Little's law: when successes ended, and how long calls take (moving average).
        self._ends: deque[float] = deque()
        self._latency: float | None = None
        self._first_end: float | None = None

    @property
    def stats(self) -> LimiterStats:
        return LimiterStats(
            self._limit,
            self._in_flight,
            self._decreases,
            self._throttled,
            self._ceiling,
            self._resume_at,
            self._calls_allowed(),
        )

    def _calls_allowed(self) -> int:
        return int(self._limit)

    def _allowed(self) -> bool:
        return self._in_flight < self._calls_allowed()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        if self._condition is None:
            self._condition = asyncio.Condition()
        while True:
            # After a 429 that named a delay, nobody starts a call before it is over:
            # the whole herd waits, instead of each call finding out for itself.
            pause = self._resume_at - self._clock()
            if pause > 0:
                await asyncio.sleep(pause)
            async with self._condition:
                await self._condition.wait_for(self._allowed)
                if self._resume_at <= self._clock():
                    self._in_flight += 1
                    break
        slot = Slot(self._clock())
        try:
            yield slot
        finally:
            self._finish(slot)
            async with self._condition:
                self._in_flight -= 1
                self._condition.notify_all()

    def _finish(self, slot: Slot) -> None:
        if slot.outcome == "throttled":
            self._throttled += 1
            now = self._clock()
            if slot.retry_after:
                pause = max(slot.retry_after, 0.0) * (1 + self._pause_jitter * self._rng())
                pause = min(pause, self._max_pause)
                # Bounded from now as well: an earlier, longer pause is not kept either.
                self._resume_at = min(max(self._resume_at, now + pause), now + self._max_pause)
            if slot.started_at > self._last_decrease:
                sustained = self._sustained(now)
                self._measured = sustained is not None
                # In flight: this call is one of them, and was not let through.
                ceiling = max(1, min(self._in_flight - 1, sustained or self._in_flight))
                if sustained is not None:
                    # A small share measured just after a cut reads the cut: hold on to
                    # most of what was in flight (not of the limit, which an instance
                    # with few events to caption may never have used).
                    ceiling = max(ceiling, round(self._held * min(self._limit, self._in_flight)))
                self._ceiling = ceiling
                self._limit = max(self._min, min(self._limit, ceiling) * self._decrease)
                # Climb straight back only to a ceiling measured by the successes; the
                # calls in flight at the first 429 (often the whole initial burst) are
                # no measure of the quota.
                recover = self._recover if self._measured else self._decrease
                self._fast_until = max(self._limit, ceiling * recover)
                self._last_decrease = now
                self._decreases += 1
                self._probe = 1.0
                self._round_successes = 0.0
            elif not self._measured and self._ceiling is not None and self._ceiling > 1:
                # Another refusal from that same burst: one call fewer got through than
                # were in flight. (A measured ceiling already counts only successes.)
                self._ceiling -= 1
                self._limit = max(self._min, min(self._limit, self._ceiling * self._decrease))
                self._fast_until = self._limit
        elif slot.outcome == "ok":
            self._observe(slot)
            if self._limit < self._fast_until:
                # Slow start (no 429 yet) grows faster than the climb back after a cut.
                gain = self._slow_start_gain if self._decreases == 0 else 1.0
                self._limit = min(self._fast_until, self._limit + gain)
                return
            share = self._ceiling
            if self._measured and share is not None and self._limit < max(1.1 * share, share + 2):
                # Near this instance's share of the quota: creep, the same step for all.
                step = self._creep
                self._limit = min(self._max, self._limit + step / self._limit)
                return
            self._limit = min(self._max, self._limit + self._probe / self._limit)
            self._round_successes += 1
            if self._round_successes >= self._limit:
                # A whole round without a 429: probe twice as far in the next one.
                self._round_successes = 0.0
                self._probe = min(self._probe * 2, max(1.0, self._limit / 4, self._max / 8))

    def _observe(self, slot: Slot) -> None:
        now = self._clock()
        took = now - slot.started_at
        self._latency = took if self._latency is None else 0.9 * self._latency + 0.1 * took
        self._ends.append(now)
        if self._first_end is None:
            self._first_end = now
        window = self._long_window()
        while self._ends and self._ends[0] < now - window:
            self._ends.popleft()

    def _window(self) -> float:
        return max(1.0, 2 * (self._latency or 0.0))

    def _long_window(self) -> float:
        """For a small share (an instance of a fleet runs a few calls at a time), two
        latencies hold too few successes to measure a rate: look back up to six."""
        return max(3.0, 6 * (self._latency or 0.0))

    def _sustained(self, now: float) -> int | None:
        """Calls in flight the service has been accepting: its recent rate of successes
        times their latency. The calls in flight at a 429 overstate it when they all
        started together (after a pause), most of them to be refused at once.
        """
        window = self._window()
        if self._latency is None or self._first_end is None or now - self._first_end < window:
            return None  # not enough seen yet
        recent = sum(1 for end in self._ends if now - window <= end <= now)
        if 0 < recent < 5:
            # Calls are going through, but few: measure over a longer look back.
            window = min(self._long_window(), now - self._first_end)
            recent = sum(1 for end in self._ends if now - window <= end <= now)
        if recent < 5:
            # Too few to measure a rate: nothing has run lately (say, everyone waited out
            # a RetryInfo delay of 30 s), which says nothing about the quota.
            return None
        return max(1, round(recent / window * self._latency))


class Slot:
    """What happened during one call; undecided calls (other errors) change nothing."""

    __slots__ = ("outcome", "retry_after", "started_at")

    def __init__(self, started_at: float = 0.0) -> None:
        self.started_at = started_at
        self.outcome: str | None = None
        self.retry_after: float | None = None

    def succeeded(self) -> None:
        self.outcome = "ok"

    def throttled(self, retry_after: float | None = None) -> None:
        self.outcome = "throttled"
        self.retry_after = retry_after

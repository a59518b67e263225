"""The limiter: calls in flight (a cap, opened by slow start), the pace they leave at, and the
pauses a 429 asks for. See the package docstring for the design."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from captioner.limiter.rate import RateControl, RateSettings


@dataclass(slots=True)
class LimiterStats:
    limit: float  # calls that may be in flight (the slow-start window, then the cap)
    in_flight: int
    decreases: int
    throttled: int
    ceiling: float | None  # calls a second the service accepted at the last cut
    paused_until: float = 0.0  # on the limiter's clock: no call starts before it
    window: int = 0  # calls that may be in flight now: the limit made a whole number
    rate: float | None = None  # calls a second they leave at (None: not paced yet)
    next_start: float = 0.0  # on the limiter's clock: the earliest the next call may start


def slow_start_initial(maximum: int) -> int:
    """Where a new instance starts: a quarter of its maximum (at least one call).

    Eight instances at CAPTION_MAX_CONCURRENCY=32 so open with 64 calls rather than
    256; the window triples each round while successes come back, so a lone instance
    is at its maximum after two rounds.
    """
    return max(1, math.ceil(maximum / 4))


class Slot:
    """What happened during one call; undecided calls (other errors) change nothing."""

    __slots__ = ("outcome", "paced", "retry_after", "started_at")

    def __init__(self, started_at: float = 0.0, *, paced: bool = False) -> None:
        self.started_at = started_at
        self.paced = paced  # it left at the rate (the pace held it back), not below it
        self.outcome: str | None = None
        self.retry_after: float | None = None

    def succeeded(self) -> None:
        self.outcome = "ok"

    def throttled(self, retry_after: float | None = None) -> None:
        self.outcome = "throttled"
        self.retry_after = retry_after


class AdaptiveLimiter:
    """Paces Gemini calls at a rate learnt from the service's 429s, at most ``maximum`` in
    flight.

    ``ready_at``, ``start`` and ``finish`` are the whole policy, on the injected clock, for
    simulations; ``slot()`` is what the describer uses: it waits (sleeps) until ``ready_at``.
    """

    def __init__(
        self,
        maximum: int,
        *,
        initial: int | None = None,
        slow_start_gain: float = 2.0,
        slow_start_pace: float = 2.0,
        opening: float = 0.1,
        burst: float = 0.05,
        max_pause: float = 30.0,
        pause_jitter: float = 0.5,
        rate: RateSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if maximum < 1:
            raise ValueError("need maximum >= 1")
        if slow_start_gain < 0 or slow_start_pace <= 0 or burst < 0 or pause_jitter < 0:
            raise ValueError(
                "need slow_start_gain >= 0, slow_start_pace > 0, burst >= 0, pause_jitter >= 0"
            )
        if opening < 0:
            raise ValueError("need opening >= 0")
        self._max = float(maximum)
        self._limit = float(min(maximum, initial if initial is not None else maximum))
        self._gain = slow_start_gain
        self._ss_pace = slow_start_pace
        self._opening = opening
        self._burst = burst
        self._max_pause = max(0.0, max_pause)
        self._jitter = pause_jitter
        self._clock = clock
        self._rng = rng
        self._rate = RateControl(rate)
        self._in_flight = 0
        self._throttled = 0
        self._resume_at = -math.inf
        self._latency: float | None = None  # moving average of successful calls
        # The pacer: a token bucket of ``burst`` seconds of the rate (at least one call).
        self._tokens = 1.0
        self._refilled_at = -math.inf
        self._last_start = -math.inf
        self._gate: asyncio.Lock | None = None
        self._freed: asyncio.Event | None = None

    # -- the policy, on the injected clock ------------------------------------------------

    @property
    def stats(self) -> LimiterStats:
        return LimiterStats(
            self._limit,
            self._in_flight,
            self._rate.cuts,
            self._throttled,
            self._rate.ceiling,
            self._resume_at,
            int(self._limit),
            self._rate.rate,
            self.ready_at(),
        )

    def pace(self) -> float | None:
        """The rate calls leave at: the learnt one; in slow start, ``slow_start_pace`` times
        the window per latency (its round spread over a fraction of a latency, so that a
        429 stops it a few calls past the quota, not a whole round past); None before the
        first answer."""
        if self._rate.rate is not None:
            return self._rate.rate
        if self._latency is None:
            # Before the first answer: the opening window leaves over ``opening`` seconds,
            # so that the 429 of a quota the fleet's first calls overrun stops each
            # instance a few calls in, not a window in.
            return self._limit / self._opening if self._opening > 0 else None
        return self._ss_pace * self._limit / max(self._latency, 1e-3)

    def ready_at(self) -> float:
        """When the next call may start (``inf`` while the window is full)."""
        if self._in_flight >= int(self._limit):
            return math.inf
        at = self._resume_at
        rate = self.pace()
        if rate is not None:
            tokens = self._tokens_at(self._clock(), rate)
            if tokens < 1.0:
                at = max(at, self._clock() + (1.0 - tokens) / rate)
        return at

    def start(self) -> Slot:
        """A call leaves now (the caller waited for ``ready_at``)."""
        now = self._clock()
        rate = self.pace()
        paced = False
        if rate is not None:
            self._tokens = self._tokens_at(now, rate) - 1.0
            self._refilled_at = now
            paced = now - self._last_start <= 1.5 / rate
        self._last_start = now
        self._in_flight += 1
        self._rate.started(now)
        return Slot(now, paced=paced)

    def finish(self, slot: Slot) -> None:
        self._in_flight -= 1
        now = self._clock()
        if slot.outcome == "throttled":
            self._throttled += 1
            # Measured before this pause starts: the rate is what was let through until now.
            if self._rate.refused(slot.started_at, now, slot.paced):
                # Paced from now on: the window no longer needs to hold the calls back.
                self._limit = self._max
            if slot.retry_after is not None:
                self._pause(now, slot.retry_after)
        elif slot.outcome == "ok":
            took = now - slot.started_at
            self._latency = took if self._latency is None else 0.9 * self._latency + 0.1 * took
            if self._rate.rate is None:
                self._limit = min(self._max, self._limit + self._gain)
            self._rate.succeeded(now, slot.started_at, slot.paced)

    def _tokens_at(self, now: float, rate: float) -> float:
        capacity = max(1.0, rate * self._burst)
        return min(capacity, self._tokens + (now - self._refilled_at) * rate)

    def _pause(self, now: float, retry_after: float) -> None:
        """Hold every new call for the named delay, jittered so that the instances of a
        fleet told the same delay do not all come back at once, and never longer than
        ``max_pause``: capped, the jitter spreads them below it instead."""
        base = min(max(retry_after, 0.0), self._max_pause)
        pause = base * (1 + self._jitter * self._rng())
        if pause > self._max_pause:
            pause = max(base / (1 + self._jitter), 2 * self._max_pause - pause)
        # Bounded from now as well: an earlier, longer pause is not kept either.
        self._resume_at = min(max(self._resume_at, now + pause), now + self._max_pause)
        self._rate.paused_until(self._resume_at)

    # -- asyncio --------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        if self._gate is None or self._freed is None:
            self._gate, self._freed = asyncio.Lock(), asyncio.Event()
        freed = self._freed
        # First come, first served: only the head of the queue watches the clock, the rest
        # wait their turn on the lock (no herd waking at every token).
        async with self._gate:
            while True:
                wait = self.ready_at() - self._clock()
                if wait <= 0:
                    slot = self.start()
                    break
                if wait == math.inf:  # the window is full: until a call ends
                    freed.clear()
                    await freed.wait()
                else:  # the pace or a pause: a call ending meanwhile only lengthens it
                    await asyncio.sleep(wait)
        try:
            yield slot
        finally:
            self.finish(slot)
            freed.set()

"""Adaptive concurrency for Gemini calls: additive increase, multiplicative decrease.

When Gemini answers 429 the number of calls allowed in flight halves (at most once
per ``cooldown`` seconds, so one burst of 429s counts once); each success adds
``1/limit``, so the limit grows by about one per round of calls. A backfill then
settles near the quota's rate instead of thrashing against it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(slots=True)
class LimiterStats:
    limit: float
    in_flight: int
    decreases: int
    throttled: int


class AdaptiveLimiter:
    """Bounds calls in flight to a limit that follows the service's answers."""

    def __init__(
        self, maximum: int, *, minimum: int = 1, initial: int | None = None, cooldown: float = 0.25
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self._min = float(minimum)
        self._max = float(maximum)
        self._limit = float(initial if initial is not None else maximum)
        self._cooldown = cooldown
        self._in_flight = 0
        self._last_decrease = -float("inf")
        self._decreases = 0
        self._throttled = 0
        self._condition: asyncio.Condition | None = None
        self._resume_at = 0.0
        # Slow start, as in TCP: +1 per success (doubling per round of calls) until
        # the first 429, then +1 per round.
        self._slow_start = True

    @property
    def stats(self) -> LimiterStats:
        return LimiterStats(self._limit, self._in_flight, self._decreases, self._throttled)

    def _allowed(self) -> bool:
        return self._in_flight < int(self._limit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        if self._condition is None:
            self._condition = asyncio.Condition()
        while True:
            # After a 429 that named a delay, nobody starts a call before it is over:
            # the whole herd waits, instead of each call finding out for itself.
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            async with self._condition:
                await self._condition.wait_for(self._allowed)
                if self._resume_at <= time.monotonic():
                    self._in_flight += 1
                    break
        slot = Slot()
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
            now = time.monotonic()
            if slot.retry_after:
                self._resume_at = max(self._resume_at, now + slot.retry_after)
            self._slow_start = False
            if now - self._last_decrease >= self._cooldown:
                self._limit = max(self._min, self._limit / 2)
                self._last_decrease = now
                self._decreases += 1
        elif slot.outcome == "ok":
            step = 1.0 if self._slow_start else 1 / self._limit
            self._limit = min(self._max, self._limit + step)


class Slot:
    """What happened during one call; undecided calls (other errors) change nothing."""

    __slots__ = ("outcome", "retry_after")

    def __init__(self) -> None:
        self.outcome: str | None = None
        self.retry_after: float | None = None

    def succeeded(self) -> None:
        self.outcome = "ok"

    def throttled(self, retry_after: float | None = None) -> None:
        self.outcome = "throttled"
        self.retry_after = retry_after

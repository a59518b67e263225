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
        self, maximum: int, *, minimum: int = 1, initial: int | None = None, cooldown: float = 1.0
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

    @property
    def stats(self) -> LimiterStats:
        return LimiterStats(self._limit, self._in_flight, self._decreases, self._throttled)

    def _allowed(self) -> bool:
        return self._in_flight < int(self._limit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        if self._condition is None:
            self._condition = asyncio.Condition()
        async with self._condition:
            await self._condition.wait_for(self._allowed)
            self._in_flight += 1
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
            if now - self._last_decrease >= self._cooldown:
                self._limit = max(self._min, self._limit / 2)
                self._last_decrease = now
                self._decreases += 1
        elif slot.outcome == "ok":
            self._limit = min(self._max, self._limit + 1 / self._limit)


class Slot:
    """What happened during one call; undecided calls (other errors) change nothing."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: str | None = None

    def succeeded(self) -> None:
        self.outcome = "ok"

    def throttled(self) -> None:
        self.outcome = "throttled"

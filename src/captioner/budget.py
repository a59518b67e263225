"""A byte-weighted semaphore: what holders take never sums past a capacity.

The pipeline uses two: bytes of downloaded objects held in memory, and the
estimated peak of the decodes running in the prepare threads. Waiters are served
first come, first served, so a large image is not starved by a stream of small
ones; something larger than the whole capacity is clamped to it and so runs alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Budget:
    """Bytes handed out on one event loop; ``take`` waits until an amount fits."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.in_use = 0
        # The most ever held at once (for tests and benchmarks).
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def clamp(self, amount: int) -> int:
        """What an amount actually takes: at least 0, at most the whole capacity."""
        return min(max(amount, 0), self.capacity)

    async def acquire(self, amount: int) -> int:
        """Wait until ``amount`` (clamped) fits, take it, and return what was taken."""
        amount = self.clamp(amount)
        if not self._waiters and self.in_use + amount <= self.capacity:
            self._grant(amount)
            return amount
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(amount)  # granted, then cancelled before it could run
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # the next in line may fit now
            raise
        return amount

    def release(self, amount: int) -> None:
        """Give back what ``acquire`` returned. Synchronous, so it is safe in ``finally``."""
        self.in_use -= amount
        if self.in_use < 0:
            raise RuntimeError("released more than was taken")
        self._wake()

    @asynccontextmanager
    async def take(self, amount: int) -> AsyncIterator[int]:
        taken = await self.acquire(amount)
        try:
            yield taken
        finally:
            self.release(taken)

    def _grant(self, amount: int) -> None:
        self.in_use += amount
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters:
            amount, waiter = self._waiters[0]
            if waiter.done():  # cancelled; its own handler removes it
                self._waiters.popleft()
                continue
            if self.in_use + amount > self.capacity:
                return
            self._waiters.popleft()
            self._grant(amount)
            waiter.set_result(None)

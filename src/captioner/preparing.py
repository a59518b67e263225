"""Prepare images in threads, within a memory budget as well as a CPU one.

Decoding is CPU work that releases the GIL. More threads than CPUs only make
decodes fight each other and the event loop (at 6 threads on 2 CPUs the loop
lagged 92-234 ms at p99, against 26-28 ms with 2; see bench/RESULTS.md). Threads
bound CPU, not memory: a 49 MP PNG costs 200 MB to decode, so a few at once would
exceed the instance; decodes therefore also take their estimated cost from a
byte budget, and downloaded bytes waiting for a decode take theirs from another.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

from captioner.budget import Budget
from captioner.domain import PreparedImage

Preparer = Callable[[bytes], PreparedImage]
# Peak bytes a prepare of these bytes will allocate, from the image's header
# (images.decode_cost); never raises.
DecodeCost = Callable[[bytes], int]


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class PreparePool:
    """Runs ``prepare`` in threads; ``hold`` and the decode budget bound the memory."""

    def __init__(
        self,
        prepare: Preparer,
        *,
        threads: int | None,
        decode_budget: int,
        held_bytes_budget: int,
        decode_cost: DecodeCost | None = None,
    ) -> None:
        self._prepare = prepare
        self._pool = ThreadPoolExecutor(
            threads or usable_cpus(), thread_name_prefix="captioner-prepare"
        )
        # Without a cost function every decode is free (unit tests with fakes).
        self._decode_cost = decode_cost
        self.decode_budget = Budget(decode_budget)
        self.held_bytes = Budget(held_bytes_budget)

    def close(self) -> None:
        """Let the threads go (they would also end with the process)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Room for ``size`` downloaded bytes, from before the download to after the prepare."""
        async with self.held_bytes.take(size):
            yield

    async def prepared(self, data: bytes) -> PreparedImage:
        """Prepare in a thread once the decode's estimated cost fits the decode budget.

        The budget comes back when the thread is done, not when this task is: a
        cancelled caption must not let another decode start next to one still running.
        """
        cost = self._decode_cost(data) if self._decode_cost is not None else 0
        taken = await self.decode_budget.acquire(cost)
        loop = asyncio.get_running_loop()

        def give_back(_: object) -> None:
            # RuntimeError: the loop is closed, and nobody is left to wait.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(self.decode_budget.release, taken)

        try:
            future = self._pool.submit(self._prepare, data)
        except BaseException:
            self.decode_budget.release(taken)
            raise
        future.add_done_callback(give_back)
        return await asyncio.wrap_future(future)

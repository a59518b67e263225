"""Bounded concurrency over a stream of work, for the pipeline, batch runs and the CLI."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def bounded_as_completed(
    items: Iterable[T] | AsyncIterable[T],
    work: Callable[[T], Awaitable[R]],
    limit: int,
) -> AsyncIterator[R]:
    """Like ``asyncio.as_completed`` over ``map(work, items)``, but with at most
    ``limit`` tasks alive, so memory is O(limit) rather than O(len(items)).

    Closing the iterator early cancels the tasks still running and waits for them.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    iterator = _aiter(items)
    pending: set[asyncio.Task[R]] = set()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    exhausted = True
                    break
                pending.add(asyncio.ensure_future(work(item)))
            if not pending:
                return
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def bounded_in_order(
    items: Iterable[T] | AsyncIterable[T],
    work: Callable[[T], Awaitable[R]],
    limit: int,
) -> AsyncIterator[R]:
    """``map(work, items)`` with at most ``limit`` tasks alive, results in the order of
    ``items`` (a finished result waits for those before it, and counts in ``limit``)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    iterator = _aiter(items)
    queue: deque[asyncio.Task[R]] = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(queue) < limit:
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    exhausted = True
                    break
                queue.append(asyncio.ensure_future(work(item)))
            if not queue:
                return
            yield await queue.popleft()
    finally:
        for task in queue:
            task.cancel()
        if queue:
            await asyncio.gather(*queue, return_exceptions=True)


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

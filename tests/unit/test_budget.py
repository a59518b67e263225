"""The byte-weighted semaphore that bounds decode memory and held downloads."""

from __future__ import annotations

import asyncio
import random

import pytest

from captioner.budget import Budget


async def test_amounts_that_fit_are_taken_at_once() -> None:
    budget = Budget(100)
    assert await budget.acquire(60) == 60
    assert await budget.acquire(40) == 40
    assert budget.in_use == 100
    budget.release(60)
    budget.release(40)
    assert budget.in_use == 0


async def test_holders_never_sum_past_the_capacity() -> None:
    budget = Budget(1000)
    rng = random.Random(3)
    holding = 0
    most = 0

    async def worker(amount: int) -> None:
        nonlocal holding, most
        async with budget.take(amount) as taken:
            holding += taken
            most = max(most, holding)
            await asyncio.sleep(rng.random() / 1000)
            holding -= taken

    await asyncio.gather(*(worker(rng.randint(0, 700)) for _ in range(200)))
    assert most <= 1000
    assert budget.peak == most
    assert budget.in_use == 0


async def test_more_than_the_capacity_is_clamped_and_runs_alone() -> None:
    budget = Budget(100)
    small = await budget.acquire(10)
    big = asyncio.ensure_future(budget.acquire(10**9))
    await asyncio.sleep(0)
    assert not big.done()
    budget.release(small)
    assert await big == 100
    assert budget.in_use == 100


async def test_waiters_are_served_in_order_so_a_large_one_is_not_starved() -> None:
    budget = Budget(100)
    first = await budget.acquire(50)
    large = asyncio.ensure_future(budget.acquire(80))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(budget.acquire(10))  # would fit, but waits its turn
    await asyncio.sleep(0)
    assert not large.done()
    assert not small.done()
    budget.release(first)
    await asyncio.sleep(0)
    assert large.done()
    assert small.done()  # 80 + 10 fit together once the 50 is back
    assert budget.in_use == 90


async def test_a_cancelled_waiter_gives_its_place_to_the_next() -> None:
    budget = Budget(100)
    held = await budget.acquire(60)
    large = asyncio.ensure_future(budget.acquire(80))
    small = asyncio.ensure_future(budget.acquire(30))
    await asyncio.sleep(0)
    assert not small.done()
    large.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert small.done()
    assert budget.in_use == 90
    budget.release(held)
    budget.release(await small)
    assert budget.in_use == 0


async def test_a_grant_cancelled_before_it_runs_is_given_back() -> None:
    budget = Budget(100)
    held = await budget.acquire(100)
    waiter = asyncio.ensure_future(budget.acquire(50))
    await asyncio.sleep(0)
    budget.release(held)  # grants the waiter's 50 ...
    waiter.cancel()  # ... which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 0


async def test_releasing_more_than_was_taken_is_a_bug() -> None:
    budget = Budget(10)
    with pytest.raises(RuntimeError):
        budget.release(1)


def test_a_budget_needs_room() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        Budget(0)

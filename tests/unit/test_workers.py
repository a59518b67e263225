"""captioner.workers: tasks run in worker processes under kernel limits; a worker that
dies fails its own task only and its slot gets a new worker. The handler the workers
run here (tests/worker_handlers.py) allocates, spins, sleeps or crashes on request."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from captioner.workers import Reply, Task, WorkerDied, WorkerPool

MiB = 1024 * 1024
HANDLER = "tests.worker_handlers"


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    pool = WorkerPool(HANDLER, workers=2, slack=16 * MiB, wall_seconds=30)
    yield pool
    pool.close()


def submit(
    pool: WorkerPool,
    op: str,
    *,
    data: bytes = b"",
    memory: int = 64 * MiB,
    cpu: int = 5,
    **more: object,
) -> Future[Reply | WorkerDied]:
    task = Task({"op": op, **more}, data, memory=memory, cpu_seconds=cpu)
    return pool.submit(task, lambda reply: reply, lambda died: died)


def run(pool: WorkerPool, op: str, **options: object) -> Reply | WorkerDied:
    return submit(pool, op, **options).result(timeout=60)  # type: ignore[arg-type]


def test_a_task_sends_bytes_in_and_gets_bytes_back(pool: WorkerPool) -> None:
    data = os.urandom(5 * MiB)
    reply = run(pool, "echo", data=data, memory=32 * MiB)
    assert isinstance(reply, Reply)
    assert reply.data == data
    assert reply.header["pid"] in pool.pids()


def test_a_task_mapping_more_than_its_memory_fails_in_its_worker_which_serves_the_next(
    pool: WorkerPool,
) -> None:
    refused = run(pool, "allocate", bytes=300 * MiB, memory=64 * MiB)
    assert isinstance(refused, Reply)
    assert refused.header["status"] == "memory"  # a MemoryError in the worker, not here
    assert refused.peak_rss < 64 * MiB + 16 * MiB + 40 * MiB  # allowance, slack, baseline
    within = run(pool, "allocate", bytes=40 * MiB, memory=64 * MiB)
    assert isinstance(within, Reply)
    assert within.header["status"] == "ok"
    assert within.peak_rss > 40 * MiB
    assert pool.replaced == 0


def test_a_task_over_its_cpu_time_ends_its_worker_and_the_next_task_gets_a_new_one(
    pool: WorkerPool,
) -> None:
    first = run(pool, "echo")
    assert isinstance(first, Reply)
    started = time.monotonic()
    died = run(pool, "spin", cpu=1)
    assert isinstance(died, WorkerDied)
    assert died.signal_number == signal.SIGXCPU
    assert time.monotonic() - started < 10  # 1 s of CPU, rounded up to the second
    after = [run(pool, "echo") for _ in range(4)]
    assert all(isinstance(reply, Reply) for reply in after)
    assert len(pool.pids()) <= 2
    assert pool.replaced == 1


def test_the_cpu_limit_is_each_tasks_own_not_the_workers_whole_life() -> None:
    pool = WorkerPool(HANDLER, workers=1, slack=16 * MiB, wall_seconds=30)
    try:
        replies = [run(pool, "spin", seconds=0.6, cpu=1) for _ in range(4)]  # 2.4 s in all
    finally:
        pool.close()
    assert all(isinstance(reply, Reply) for reply in replies)
    assert len({reply.header["pid"] for reply in replies if isinstance(reply, Reply)}) == 1


def test_a_worker_that_dies_fails_only_its_own_task_while_the_others_finish(
    pool: WorkerPool,
) -> None:
    spinning = submit(pool, "spin", cpu=2)
    crashing = submit(pool, "crash")
    others = [submit(pool, "echo", data=bytes([i]) * 1000) for i in range(20)]
    assert [f.result(timeout=60).data for f in others] == [bytes([i]) * 1000 for i in range(20)]  # type: ignore[union-attr]
    spun, crashed = spinning.result(timeout=60), crashing.result(timeout=60)
    assert isinstance(spun, WorkerDied)
    assert spun.signal_number == signal.SIGXCPU
    assert isinstance(crashed, WorkerDied)
    assert crashed.signal_number == signal.SIGABRT
    assert isinstance(run(pool, "echo"), Reply)


def test_a_worker_still_busy_at_the_wall_clock_limit_is_killed() -> None:
    pool = WorkerPool(HANDLER, workers=1, slack=16 * MiB, wall_seconds=1)
    try:
        started = time.monotonic()
        died = run(pool, "sleep", seconds=60)
        assert time.monotonic() - started < 5
        assert isinstance(died, WorkerDied)
        assert died.timed_out
        assert isinstance(run(pool, "echo"), Reply)
    finally:
        pool.close()


def test_a_worker_killed_while_idle_is_replaced_without_failing_the_next_task(
    pool: WorkerPool,
) -> None:
    for pid in pool.pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    replies = [run(pool, "echo") for _ in range(3)]
    assert all(isinstance(reply, Reply) for reply in replies)


def test_closing_the_pool_ends_its_workers() -> None:
    pool = WorkerPool(HANDLER, workers=2, slack=16 * MiB, wall_seconds=30)
    together = [submit(pool, "spin", seconds=0.3) for _ in range(2)]
    assert all(isinstance(f.result(timeout=60), Reply) for f in together)
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

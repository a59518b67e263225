"""captioner.preparing: the allowance each try takes from the decode budget, and what a
worker's reply or death means for the image (no worker processes here)."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import Future
from pathlib import Path

import pytest

from captioner import preparing
from captioner.domain import PreparedImage
from captioner.errors import PermanentError, TransientError
from captioner.preparing import Attempt, PreparePool, ProcessDecoder
from captioner.workers import EXIT_NO_ROOM, Reply, WorkerDied

MiB = 1024 * 1024
PICTURE = PreparedImage(b"jpeg", "image/jpeg", 8, 6, "PNG", 80, 60, True)


def died(**how: object) -> WorkerDied:
    options: dict[str, object] = {"signal_number": None, "exit_code": None, **how}
    return WorkerDied("ended", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("death", "reason"),
    [
        (died(signal_number=signal.SIGXCPU), "decode-timeout"),
        (died(signal_number=signal.SIGKILL, timed_out=True), "decode-timeout"),
        (died(signal_number=signal.SIGSEGV), "corrupt-image"),
        (died(signal_number=signal.SIGABRT), "corrupt-image"),
        (died(exit_code=EXIT_NO_ROOM), "too-large-to-decode"),
    ],
    ids=["cpu-limit", "wall-clock", "segfault", "abort", "no-room-for-the-bytes"],
)
def test_a_worker_that_the_image_ended_is_a_permanent_verdict(
    death: WorkerDied, reason: str
) -> None:
    decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000, cpu_seconds=7)
    with pytest.raises(PermanentError) as info:
        decoder._verdict(death)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "death",
    [died(signal_number=signal.SIGKILL), died(signal_number=signal.SIGTERM), died(exit_code=1)],
    ids=["killed-from-outside", "terminated", "could-not-start"],
)
def test_a_worker_ended_from_outside_is_transient_and_records_nothing(death: WorkerDied) -> None:
    decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000)
    with pytest.raises(TransientError):
        decoder._verdict(death)


def reply(**header: object) -> Reply:
    return Reply(dict(header), b"", 0.01, 30 * MiB)


def test_replies_become_an_image_a_larger_allowance_or_a_verdict() -> None:
    decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000)
    attempt = decoder._attempt
    fields = {"mime_type": "image/jpeg", "width": 8, "height": 6, "source_format": "PNG",
              "source_width": 80, "source_height": 60, "reencoded": True}  # fmt: skip
    ok = Reply({"status": "ok", **fields}, b"jpeg", 0.01, 0)
    assert attempt(ok, allowance=MiB, largest=256 * MiB) == PICTURE
    assert attempt(reply(status="more", allowance=99), allowance=1, largest=256 * MiB) == 99
    # Out of memory before it could say what it needs: the largest allowance, then a verdict.
    assert attempt(reply(status="memory"), allowance=MiB, largest=256 * MiB) == 256 * MiB
    with pytest.raises(PermanentError) as info:
        attempt(reply(status="memory"), allowance=256 * MiB, largest=256 * MiB)
    assert info.value.reason == "too-large-to-decode"
    with pytest.raises(PermanentError) as refused:
        attempt(
            reply(status="refused", reason="corrupt-image", message="m"), allowance=1, largest=2
        )
    assert refused.value.reason == "corrupt-image"
    with pytest.raises(TransientError):  # the handler itself failed: ours, not the image's
        attempt(reply(status="failed", error="KeyError: x"), allowance=1, largest=2)


class Scripted:
    """A Decoder whose tries answer from a script, each finishing when the test says."""

    def __init__(self, answers: list[Attempt]) -> None:
        self.answers = answers
        self.allowances: list[int] = []
        self.pending: list[Future[Attempt]] = []
        self.tried = asyncio.Event()

    def opening(self, data: bytes) -> int:
        return 10 * MiB

    def start(self, data: bytes, allowance: int, largest: int) -> Future[Attempt]:
        self.allowances.append(allowance)
        future: Future[Attempt] = Future()
        future.set_running_or_notify_cancel()
        self.pending.append(future)
        self.tried.set()  # start is called on the event loop
        return future

    async def next_try(self) -> None:
        await self.tried.wait()
        self.tried.clear()

    def finish(self) -> None:
        self.pending.pop(0).set_result(self.answers.pop(0))

    def close(self) -> None:
        pass


async def test_an_image_whose_header_asks_for_more_is_tried_again_with_that_much() -> None:
    decoder = Scripted([200 * MiB, PICTURE])
    pool = PreparePool(decoder, decode_budget=256 * MiB, held_bytes_budget=MiB)
    task = asyncio.create_task(pool.prepared(b"data"))
    for _ in range(2):
        await decoder.next_try()
        decoder.finish()
    assert await task == PICTURE
    assert decoder.allowances == [10 * MiB, 200 * MiB]
    assert pool.decode_budget.peak == 200 * MiB
    assert pool.decode_budget.in_use == 0


async def test_a_cancelled_caption_keeps_its_allowance_until_its_worker_is_done() -> None:
    decoder = Scripted([PICTURE])
    pool = PreparePool(decoder, decode_budget=256 * MiB, held_bytes_budget=MiB)
    task = asyncio.create_task(pool.prepared(b"data"))
    await decoder.next_try()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.decode_budget.in_use == 10 * MiB  # the worker still decodes
    decoder.finish()
    await asyncio.sleep(0.01)
    assert pool.decode_budget.in_use == 0


async def test_an_answer_that_asks_for_no_more_than_it_had_is_refused_not_looped() -> None:
    decoder = Scripted([5 * MiB])
    pool = PreparePool(decoder, decode_budget=256 * MiB, held_bytes_budget=MiB)
    task = asyncio.create_task(pool.prepared(b"data"))
    await decoder.next_try()
    decoder.finish()
    with pytest.raises(PermanentError) as info:
        await task
    assert info.value.reason == "too-large-to-decode"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "100000 100000\n"}, 1.0),
        ({"cpu.max": "58300 100000\n"}, 0.583),
        ({"cpu.max": "400000 100000\n"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu.max": "0 100000\n"}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1_and_a_missing_or_odd_file_is_no_limit(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert preparing.cgroup_cpu_quota(tmp_path) == quota


def test_a_container_limited_to_one_cpu_gets_one_decode_worker_whatever_its_host_shows(
    tmp_path: Path,
) -> None:
    """Cloud Run's `cpu = "1"` is a cgroup quota; the affinity mask may list every core of
    the host, and a second worker would cost ~21 MB for no throughput."""
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert preparing.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("58300 100000\n")
    assert preparing.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert preparing.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))

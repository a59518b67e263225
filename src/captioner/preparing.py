"""Prepare images in decode worker processes, within a memory budget the kernel enforces.

Decoders parse bytes anyone can upload, and a price read from the header is always
one trick behind the next format. So images are decoded in worker processes
(captioner.workers), each decode under an address-space limit (RLIMIT_AS) of the
allowance it was granted and a CPU-time limit (RLIMIT_CPU). The allowances of the
decodes running at once come from one byte budget (captioner.budget); the header's
price only decides how much of it an image asks for (adapters.decoding), and an
image whose decode needs more than its header said gets a failed allocation in its
own worker: a permanent verdict for the image, never an instance out of memory.

The arithmetic, for the deployed instance (1 GiB) and a target of 600 MB for
everything in it, the function's process and its workers together (resident sizes,
each process counted whole, so shared library pages count twice; measured in
bench/RESULTS.md, "Decode workers"):

    function's process   ~75 MB once ready (interpreter, google-genai, aiohttp;
                         no image adapter: it decodes nothing) + 128 MiB (134 MB)
                         of downloaded objects held (PipelineConfig.held_bytes_budget)
                         + the prepared images in flight (~10 MB)         ~220 MB
    DECODE_WORKERS = 2   each ~21 MB idle (25 once it has met a HEIC), + at most
                         WORKER_SLACK (24 MiB) kept between tasks: a worker over
                         it retires after its task                        ~100 MB
    decodes at once      allowances sum to at most the decode budget, 256 MiB
                         (PipelineConfig.decode_budget); RLIMIT_AS holds each
                         worker to baseline + slack + its own allowance     268 MB
    total                                                                 ~588 MB

Two workers: one per core of a 2-core machine, so that one image stuck at its CPU
limit does not stop the others; a third would cost ~45 MB of the 600 for no more
throughput here. A process that may run on one CPU only (usable_cpus: its affinity
mask within its cgroup's CPU quota, whichever form a `cpu = "1"` limit takes) gets one. A
decode may use DECODE_CPU_SECONDS of CPU: the costliest accepted images take under
2 s here (a 49 MP 16-bit RGBA PNG: 0.8-1.7 s).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

from captioner.budget import Budget
from captioner.domain import PreparedImage
from captioner.errors import PermanentError, TransientError
from captioner.workers import EXIT_NO_ROOM, Reply, Task, WorkerDied, WorkerPool, shared_pool

MiB = 1024 * 1024
DECODE_WORKERS = 2
# Address space a worker may keep beyond what it had when ready (heap glibc keeps,
# codec state made on first use); past it, the worker retires after its task.
WORKER_SLACK = 24 * MiB
# What every image is first sent with, plus twice its size (the worker's copy, and
# Pillow's reads of chunks it skips): enough for the whole decode of a 12 MP JPEG or
# a 1440p screenshot, so most images take one trip; larger ones a second.
OPENING_ALLOWANCE = 48 * MiB
# Added to every allowance for what any decode maps whatever its size.
ALLOWANCE_FLOOR = 16 * MiB
DECODE_CPU_SECONDS = 10
# A backstop for a worker that neither finishes nor uses CPU (a codec deadlocked on
# its own threads): 6x the CPU limit, as a busy instance shares its cores.
DECODE_WALL_SECONDS = 60.0
_DECODING_MODULE = "captioner.adapters.decoding"
# A process that ended itself with one of these was decoding, not being stopped.
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE})

Preparer = Callable[[bytes], PreparedImage]
# Peak bytes a prepare of these bytes will allocate, from the image's header
# (images.decode_cost); never raises. Only for the in-process ThreadDecoder.
DecodeCost = Callable[[bytes], int]
# What one try gives: the prepared image, or the allowance it needs to be tried again.
Attempt = PreparedImage | int


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, and no more than its cgroup's CPU
    quota rounded up: a container whose CPU limit is a cgroup quota may still see every
    core of its host in the mask."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs a second the cgroup may use (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``); None without a limit or where neither can be read."""
    try:
        if (v2 := root / "cpu.max").exists():
            quota, _, period = v2.read_text().strip().partition(" ")
        else:
            v1 = root / "cpu"
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        share = int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return share if share > 0 else None


@runtime_checkable
class Decoder(Protocol):
    def opening(self, data: bytes) -> int:
        """The allowance to try ``data`` with first."""

    def start(self, data: bytes, allowance: int, largest: int) -> Future[Attempt]:
        """Begin a try within ``allowance`` bytes; ``largest`` is the most any image gets."""

    def close(self) -> None: ...


def decode_workers() -> WorkerPool:
    """The process's decode workers, started on first use and reused from then on."""
    return shared_pool(
        _DECODING_MODULE,
        lambda: WorkerPool(
            _DECODING_MODULE,
            workers=min(DECODE_WORKERS, usable_cpus()),
            slack=WORKER_SLACK,
            wall_seconds=DECODE_WALL_SECONDS,
        ),
    )


class ProcessDecoder:
    """Prepares images in decode worker processes, each within its allowance."""

    def __init__(
        self,
        *,
        max_edge: int,
        max_pixels: int,
        pool: WorkerPool | None = None,
        cpu_seconds: int = DECODE_CPU_SECONDS,
    ) -> None:
        self._max_edge = max_edge
        self._max_pixels = max_pixels
        self._pool = pool
        self._cpu_seconds = cpu_seconds
        # Called in a pool thread with each worker's reply and the allowance it was
        # given (tests of the limits, benchmarks of the CPU and memory per image).
        self.on_reply: Callable[[Reply, int], None] | None = None

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = decode_workers()
        return self._pool

    def start_workers(self) -> None:
        """Start the first decode worker now, if none is running yet: its interpreter
        and Pillow (~0.12 s of CPU) load while the first image is being downloaded."""
        _ = self.pool

    def opening(self, data: bytes) -> int:
        return OPENING_ALLOWANCE + 2 * len(data)

    def start(self, data: bytes, allowance: int, largest: int) -> Future[Attempt]:
        return self.pool.submit(
            self.task(data, allowance, largest),
            partial(self._attempt, allowance=allowance, largest=largest),
            self._verdict,
        )

    def task(self, data: bytes, allowance: int, largest: int) -> Task:
        """What a worker is sent to prepare ``data`` within ``allowance`` bytes."""
        request = {
            "max_edge": self._max_edge,
            "max_pixels": self._max_pixels,
            # One image may be priced at most what the largest allowance is.
            "max_decode_bytes": largest,
            "allowance": allowance,
            "largest": largest,
            "floor": ALLOWANCE_FLOOR,
        }
        return Task(request, data, memory=allowance, cpu_seconds=self._cpu_seconds)

    def close(self) -> None:
        """Nothing to do: the workers are the process's, reused by the next decoder."""

    def _attempt(self, reply: Reply, *, allowance: int, largest: int) -> Attempt:
        if self.on_reply is not None:
            self.on_reply(reply, allowance)
        header = reply.header
        status = header.get("status")
        if status == "ok":
            return PreparedImage(
                data=reply.data,
                mime_type=str(header["mime_type"]),
                width=int(header["width"]),
                height=int(header["height"]),
                source_format=str(header["source_format"]),
                source_width=int(header["source_width"]),
                source_height=int(header["source_height"]),
                reencoded=bool(header["reencoded"]),
            )
        if status == "more":
            return int(header["allowance"])
        if status == "refused":
            raise PermanentError(str(header["reason"]), str(header["message"]))
        if status == "memory":
            # It ran out before it could even say what it needed: once more with the
            # largest allowance, then it is the image's size.
            if allowance < largest:
                return largest
            raise PermanentError(
                "too-large-to-decode",
                f"decoding this image needed more than the {largest / MiB:.0f} MiB one"
                " image may use",
            )
        # The worker's own code failed, not the image: nothing to record on it.
        raise TransientError(f"the decode worker failed: {header.get('error', header)}")

    def _verdict(self, died: WorkerDied) -> Attempt:
        """Why a worker ended mid-task decides whose fault it was."""
        if died.timed_out:
            raise PermanentError(
                "decode-timeout",
                f"decoding this image was still running after {self.pool.wall_seconds:g} s",
            )
        if died.signal_number == signal.SIGXCPU:
            raise PermanentError(
                "decode-timeout",
                f"decoding this image used up the {self._cpu_seconds} s of CPU time one"
                " image may use",
            )
        if died.exit_code == EXIT_NO_ROOM:
            raise PermanentError("too-large-to-decode", "no room to receive this image's bytes")
        if died.signal_number in _CRASHES:
            raise PermanentError("corrupt-image", f"the decoder crashed on this image ({died})")
        # Stopped from outside (SIGKILL, SIGTERM: the instance running out of memory
        # or shutting down), or a worker that could not start: not the image's doing.
        raise TransientError(f"the decode worker {died} before judging the image")


class ThreadDecoder:
    """Runs a ``prepare`` callable in this process's threads, with no limits: for unit
    tests with fakes, and to measure the in-process design against the workers."""

    def __init__(self, prepare: Preparer, *, threads: int | None, cost: DecodeCost | None) -> None:
        self._prepare = prepare
        self._cost = cost
        self._pool = ThreadPoolExecutor(
            threads or usable_cpus(), thread_name_prefix="captioner-prepare"
        )

    def opening(self, data: bytes) -> int:
        # Without a cost function every decode is free (unit tests with fakes).
        return self._cost(data) if self._cost is not None else 0

    def start(self, data: bytes, allowance: int, largest: int) -> Future[Attempt]:
        return self._pool.submit(self._prepare, data)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def as_decoder(
    prepare: Preparer | Decoder, *, threads: int | None = None, cost: DecodeCost | None = None
) -> Decoder:
    """A Decoder as given, or a plain ``prepare`` callable run in threads."""
    if isinstance(prepare, Decoder):
        return prepare
    return ThreadDecoder(prepare, threads=threads, cost=cost)


class PreparePool:
    """Prepares images with a Decoder; ``hold`` and the decode budget bound the memory."""

    def __init__(self, decoder: Decoder, *, decode_budget: int, held_bytes_budget: int) -> None:
        self._decoder = decoder
        self.decode_budget = Budget(decode_budget)
        self.held_bytes = Budget(held_bytes_budget)

    def close(self) -> None:
        self._decoder.close()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Room for ``size`` downloaded bytes, from before the download to after the prepare."""
        async with self.held_bytes.take(size):
            yield

    async def prepared(self, data: bytes) -> PreparedImage:
        """Prepare ``data``: first within its opening allowance, then, if the header asks
        for more, again within that once the budget has it."""
        allowance = self._decoder.opening(data)
        for _ in range(3):  # the opening, what the header asks, and a reopening at most
            attempt = await self._attempt(data, allowance)
            if isinstance(attempt, PreparedImage):
                return attempt
            if attempt <= allowance:
                break
            allowance = attempt
        raise PermanentError("too-large-to-decode", "no allowance this image asked for was enough")

    async def _attempt(self, data: bytes, allowance: int) -> Attempt:
        """One try, once its allowance fits the budget. The allowance comes back when the
        try is done, not when this task is: a cancelled caption must not let another
        decode start next to one still running."""
        taken = await self.decode_budget.acquire(allowance)
        loop = asyncio.get_running_loop()

        def give_back(_: object) -> None:
            # RuntimeError: the loop is closed, and nobody is left to wait.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(self.decode_budget.release, taken)

        try:
            future = self._decoder.start(data, taken, self.decode_budget.capacity)
        except BaseException:
            self.decode_budget.release(taken)
            raise
        future.add_done_callback(give_back)
        return await asyncio.wrap_future(future)


def thumbnail_pool(max_edge: int, max_pixels: int) -> PreparePool:
    """A PreparePool for small previews (``export --html``), on the same decode workers
    and with the same budgets as captions (PipelineConfig's defaults)."""
    return PreparePool(
        ProcessDecoder(max_edge=max_edge, max_pixels=max_pixels),
        decode_budget=256 * MiB,
        held_bytes_budget=128 * MiB,
    )

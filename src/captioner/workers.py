"""Worker processes that run one task at a time under limits the kernel enforces.

Image decoders parse bytes anyone can upload. A per-format price read from the
header is always one trick behind the next format, so the bound does not rest on
it: each task runs in a worker process whose address space (RLIMIT_AS) and CPU
time (RLIMIT_CPU) the kernel limits, per task. A decoder that asks for more memory
than the task was allowed gets a failed allocation; one that computes too long gets
SIGXCPU, whose default action ends the worker. Either way the parent lives on, the
task gets a verdict, and the slot gets a fresh worker.

Why not the standard library's pools:

- ``concurrent.futures.ProcessPoolExecutor``: when one worker dies (as the CPU
  limit makes it), the pool is broken and every pending future fails with
  BrokenProcessPool, so one hostile image would fail every image in flight; and it
  has no per-task limits.
- ``multiprocessing.Process``: each child re-runs the parent's ``__main__``
  preparation, the first start adds multiprocessing's resource tracker (a third
  process, ~10 MB), and ``Connection.recv`` unpickles: the parent should not unpickle
  what a process that has just parsed hostile bytes sends back.

So each worker is a fresh interpreter started with ``subprocess`` (fork and exec in
one C call, safe next to a running event loop and its threads, which forking this
interpreter is not), and parent and worker exchange frames over a socket pair: a
JSON header, then raw bytes, both ways. Each slot of the pool has one parent thread
that owns one worker at a time: a worker that dies fails the one task it was
running, and the next task in that slot starts a new worker.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import os
import queue
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeVar

Header = dict[str, Any]
T = TypeVar("T")

# A frame: header length, data length, the JSON header, the data.
_FRAME = struct.Struct("!IQ")
_MAX_HEADER = 1 << 20
_SOCKET_BUFFER = 4 << 20
# A worker that could not even receive its task's bytes within the task's memory.
EXIT_NO_ROOM = 3


@dataclass(frozen=True, slots=True)
class Task:
    """What a worker is asked to do, and the limits it does it under."""

    header: Header  # JSON: what to do, for the worker's handler
    data: bytes
    # Address space the worker may map beyond what it had when it was ready.
    memory: int
    cpu_seconds: int


@dataclass(frozen=True, slots=True)
class Reply:
    header: Header
    data: bytes
    cpu_seconds: float  # what the task used in the worker
    peak_rss: int  # the worker's peak resident bytes during the task


class WorkerDied(Exception):
    """The worker ended during a task (or was ended by us at the wall-clock limit)."""

    def __init__(self, message: str, *, signal_number: int | None, exit_code: int | None,
                 timed_out: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = exit_code
        self.timed_out = timed_out


# The worker's side.


def serve(fd: int, module_name: str, slack: int) -> None:
    """A worker's life: import the handler module, then run tasks until the parent
    closes its end of the socket.

    ``module_name`` names a module with ``handle(header, data) -> (header, data)``
    (and optionally ``warm()``, run before the worker measures what it has mapped,
    so that what the handler maps on first use is not charged to a task). A worker
    whose address space grew by more than ``slack`` over that baseline retires after
    its reply, so each task starts from close to the same place.
    """
    # Ctrl-C is for the parent, which then closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    limits = _settable_limits()
    module = import_module(module_name)
    warm: Callable[[], None] | None = getattr(module, "warm", None)
    if warm is not None:
        warm()
    handle: Callable[[Header, bytes], tuple[Header, bytes]] = module.handle
    sock = socket.socket(fileno=fd)
    baseline = address_space()
    while True:
        request = _read_frame_sizes(sock)
        if request is None:
            return  # the parent is gone or closed us
        header, size = request
        _reset_peak_rss()
        started = _cpu_seconds()
        _limit(
            limits,
            baseline + slack + int(header.pop("memory")),
            started,
            int(header.pop("cpu_seconds")),
        )
        try:
            data = _recv_exact(sock, size)
        except MemoryError:
            os._exit(EXIT_NO_ROOM)  # the rest of the frame is unread: this socket is done
        if data is None:
            return
        outcome: tuple[Header, bytes] | BaseException
        try:
            outcome = handle(header, data)
        except Exception as exc:  # the handler's contract is to reply; say it did not
            outcome = exc
        # The task is over: its reply must not fail for want of memory (an exception
        # raised under the limit still holds the failed decode's objects).
        _unlimit(limits)
        del data
        reply, out = _reply(outcome)
        del outcome
        reply["cpu_seconds"] = _cpu_seconds() - started
        reply["peak_rss"] = _peak_rss()
        reply["retire"] = not _room_left(baseline + slack)
        _send(sock, reply, out)
        if reply["retire"]:
            return


def _reply(outcome: tuple[Header, bytes] | BaseException) -> tuple[Header, bytes]:
    if isinstance(outcome, MemoryError):
        # Even reporting failed under the task's limit: the handler could not judge.
        return {"status": "memory"}, b""
    if isinstance(outcome, BaseException):
        return {"status": "failed", "error": f"{type(outcome).__name__}: {outcome}"[:300]}, b""
    return outcome


def _room_left(most: int) -> bool:
    """Whether the worker is back under ``most`` bytes of address space, after giving
    the heap's free pages back if it was not. glibc keeps freed memory for reuse, and
    its mmap threshold rises after large frees, so a 12 MP PNG's 16 MiB blocks came
    from the heap and stayed: up to 73 MiB more than the baseline. Trimming only
    when over keeps that off the common path (in one trial, trimming after every
    12 MP JPEG took its median CPU time from 21.9 to 25.1 ms)."""
    if address_space() <= most:
        return True
    _trim_heap()
    return address_space() <= most


def _trim_heap() -> None:
    # Not glibc: retiring the worker is the fallback.
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def address_space() -> int:
    """Bytes of address space this process has mapped (what RLIMIT_AS limits)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Start this task's peak resident size from now (Linux 4.0+; else the peak is the
    worker's life's)."""
    with suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_rss() -> int:
    """Peak resident bytes since the task began (VmHWM), 0 if unknown."""
    with suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _settable_limits() -> frozenset[int]:
    """The limits this kernel lets the worker set (all of them on Linux). A sandbox
    that refuses one (not seen here: Cloud Run's gVisor documents which it supports)
    leaves the decodes without it, says so once on stderr, and still serves: the
    header checks and the budget keep working, a worker that cannot start would not."""
    settable = set()
    for limit, name in ((resource.RLIMIT_AS, "RLIMIT_AS"), (resource.RLIMIT_CPU, "RLIMIT_CPU")):
        try:
            resource.setrlimit(limit, resource.getrlimit(limit))
        except (OSError, ValueError) as exc:
            print(f"captioner decode worker: cannot set {name} ({exc})", file=sys.stderr)
        else:
            settable.add(limit)
    with suppress(OSError, ValueError):  # no core file of a worker ended at its CPU limit
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return frozenset(settable)


def _limit(
    limits: frozenset[int], address_space_bytes: int, cpu_used: float, cpu_seconds: int
) -> None:
    # Soft limits only: a process cannot raise its hard limit again, and the next task
    # needs other values. RLIMIT_CPU counts the process's whole life, so this task's
    # limit is what it has used so far plus the task's budget.
    unlimited = resource.RLIM_INFINITY
    if resource.RLIMIT_AS in limits:
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, unlimited))
    if resource.RLIMIT_CPU in limits:
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(cpu_used) + cpu_seconds, unlimited))


_UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def _unlimit(limits: frozenset[int]) -> None:
    # Allocates nothing (no loop, no new tuple): it runs while a failed decode's objects
    # may still hold every byte the task was allowed. The address space first.
    if resource.RLIMIT_AS in limits:
        resource.setrlimit(resource.RLIMIT_AS, _UNLIMITED)
    if resource.RLIMIT_CPU in limits:
        resource.setrlimit(resource.RLIMIT_CPU, _UNLIMITED)


# Frames, both sides.


def _send(sock: socket.socket, header: Header, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(encoded), len(data)) + encoded)
    if data:
        sock.sendall(data)


def _read_frame_sizes(sock: socket.socket) -> tuple[Header, int] | None:
    sizes = _recv_exact(sock, _FRAME.size)
    if sizes is None:
        return None
    header_size, data_size = _FRAME.unpack(sizes)
    if header_size > _MAX_HEADER:
        raise ValueError(f"a frame header of {header_size} bytes")
    encoded = _recv_exact(sock, header_size)
    if encoded is None:
        return None
    header = json.loads(encoded)
    if not isinstance(header, dict):
        raise ValueError("a frame header that is not a JSON object")
    return header, data_size


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None if the other end closed first. One buffer of exactly
    ``size`` bytes is allocated: a task's data is received within its own memory."""
    if size == 0:
        return b""
    if sock.gettimeout() is None:
        data = sock.recv(size, socket.MSG_WAITALL)
        return data if len(data) == size else None
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return bytes(buffer)


# The parent's side.


class Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self, module_name: str, slack: int) -> None:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            # A 12 MP photo (~1-4 MB) in one go rather than ~200 KB per wake-up.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        # The worker sees the parent's import path (main.py puts src/ on it when deployed).
        code = (
            "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            "from captioner.workers import serve; "
            f"serve({theirs.fileno()}, {module_name!r}, {slack})"
        )
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    json.dumps([p for p in sys.path if isinstance(p, str)]),
                ],
                pass_fds=[theirs.fileno()],
                # Nothing to read or say there; holding the parent's stdout open would
                # keep a reader (`captioner … | head`) waiting on a busy worker.
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, task: Task, wall_seconds: float) -> Reply:
        """Send the task and wait for the reply; WorkerDied if the worker ends first
        or is still busy after ``wall_seconds`` (then it is killed)."""
        deadline = time.monotonic() + wall_seconds
        header = {**task.header, "memory": task.memory, "cpu_seconds": task.cpu_seconds}
        try:
            self._sock.settimeout(wall_seconds)
            _send(self._sock, header, task.data)
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            frame = _read_frame_sizes(self._sock)
            data = None if frame is None else _recv_exact(self._sock, frame[1])
        except TimeoutError:
            self.stop()
            raise WorkerDied(
                f"still busy after {wall_seconds:g} s", signal_number=signal.SIGKILL,
                exit_code=None, timed_out=True,
            ) from None  # fmt: skip
        except (OSError, ValueError):
            frame = data = None
        if frame is None or data is None:
            raise self._ended()
        reply, _ = frame
        cpu_seconds = float(reply.pop("cpu_seconds", 0.0))
        return Reply(reply, data, cpu_seconds, int(reply.pop("peak_rss", 0)))

    def _ended(self) -> WorkerDied:
        self._sock.close()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its socket broke but it lives on: end it
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            name = signal.Signals(-code).name
            return WorkerDied(f"ended by {name}", signal_number=-code, exit_code=None)
        return WorkerDied(f"exited with code {code}", signal_number=None, exit_code=code)

    def stop(self) -> None:
        """End the worker now (it also ends by itself when the parent's end closes)."""
        self._sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class WorkerPool:
    """``workers`` worker processes, each serving one task at a time.

    ``submit`` runs a task in one of ``workers`` parent threads; each thread owns at
    most one worker, so a worker that dies affects only its own task.
    """

    def __init__(self, module_name: str, *, workers: int, slack: int, wall_seconds: float) -> None:
        self.module_name = module_name
        self.workers = workers
        self.slack = slack
        self.wall_seconds = wall_seconds
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="captioner-decode")
        self._owned = threading.local()
        self._lock = threading.Lock()
        self._live: set[Worker] = set()
        # One is started as soon as the pool is made, so the first task does not wait
        # for an interpreter to start; the others when a second task is in flight (an
        # instance that sees one upload at a time never starts them, and two starting
        # at once would slow the first image's on a busy core).
        self._spares: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self._spares.put(self._start())
        self.replaced = 0  # workers that ended during or after a task (for tests)

    def submit(
        self, task: Task, then: Callable[[Reply], T], died: Callable[[WorkerDied], T]
    ) -> Future[T]:
        """Run ``task`` in a worker; the future holds ``then(reply)``, or ``died(exc)``
        if the worker ended during the task (either may raise). A task still queued
        can be cancelled; one a worker has started runs to its end or its limits."""

        def run() -> T:
            try:
                reply = self._run(task)
            except WorkerDied as exc:
                return died(exc)
            return then(reply)

        return self._executor.submit(run)

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(worker.pid for worker in self._live)

    def close(self) -> None:
        """End every worker; tasks still queued are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            live, self._live = list(self._live), set()
        for worker in live:
            worker.stop()

    def _run(self, task: Task) -> Reply:
        worker: Worker | None = getattr(self._owned, "worker", None)
        if worker is None or not worker.alive():
            # None yet, or it ended while idle (not this task's doing): a new one.
            if worker is not None:
                self._forget(worker)
            worker = self._take()
            self._owned.worker = worker
        try:
            reply = worker.run(task, self.wall_seconds)
        except WorkerDied:
            self._retire(worker)
            raise
        if reply.header.get("retire"):
            self._retire(worker)
        return reply

    def _retire(self, worker: Worker) -> None:
        self._forget(worker)
        self._owned.worker = None
        with self._lock:
            self.replaced += 1

    def _take(self) -> Worker:
        while True:
            try:
                spare = self._spares.get_nowait()
            except queue.Empty:
                return self._start()
            if spare.alive():
                return spare
            self._forget(spare)

    def _start(self) -> Worker:
        worker = Worker(self.module_name, self.slack)
        with self._lock:
            self._live.add(worker)
        return worker

    def _forget(self, worker: Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.stop()


_shared: dict[str, WorkerPool] = {}
_shared_lock = threading.Lock()


def shared_pool(module_name: str, make: Callable[[], WorkerPool]) -> WorkerPool:
    """The process's one pool for ``module_name``, made on first use and ended at exit:
    workers outlive event loops and requests, so each is started once and reused."""
    with _shared_lock:
        pool = _shared.get(module_name)
        if pool is None:
            pool = _shared[module_name] = make()
            atexit.register(pool.close)
        return pool

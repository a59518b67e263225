"""A process and its descendants (the decode workers): resident memory and CPU, from /proc.

Since issue 22, images are decoded in worker processes: one process's VmHWM is no
longer the instance's peak. ``TreeSampler`` sums the resident size (VmRSS) of the
process and every descendant every few milliseconds and keeps the highest sum. That
counts a page shared between processes (libpython, Pillow's libraries) once per
process, so it errs high; with ``pss=True`` it also keeps the highest sum of their
proportional set sizes (each shared page split between its sharers: closer to what
Cloud Run's memory limit charges, but reading it costs the kernel a page-table walk,
so sample less often). ``tree_cpu_seconds`` adds the descendants' CPU.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.append(int(child))
            found.extend(descendants(int(child)))
    return found


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _process_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident MB of ``pid`` (default: this process) and its descendants, now."""
    root = os.getpid() if pid is None else pid
    return sum(status_kib(p, "VmRSS") for p in [root, *descendants(root)]) / 1024


def tree_cpu_seconds() -> float:
    """CPU seconds of this process, its descendants alive now, and those it has reaped."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    alive = sum(_process_cpu(p) for p in descendants(os.getpid()))
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + alive


class TreeSampler:
    """The highest summed VmRSS of a process tree, sampled every ``period`` seconds."""

    def __init__(self, pid: int | None = None, period: float = 0.005, *, pss: bool = False) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.period = period
        self.pss = pss
        self.peak_mb = 0.0
        self.peak_pss_mb = 0.0
        self.processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> float:
        pids = [self.pid, *descendants(self.pid)]
        self.processes = max(self.processes, len(pids))
        now = sum(status_kib(p, "VmRSS") for p in pids) / 1024
        self.peak_mb = max(self.peak_mb, now)
        if self.pss:
            self.peak_pss_mb = max(self.peak_pss_mb, sum(_pss_kib(p) for p in pids) / 1024)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

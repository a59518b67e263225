"""Turning a worker's report and the stand-in's request log into the figures of the table."""

from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from captioner_dev.gemini_server import LatencyModel


@dataclass(frozen=True, slots=True)
class Run:
    """One measured run: an approach on ``count`` objects of one image set."""

    key: str
    approach: str  # sequential | naive | pipeline
    images: str  # mix | photos
    count: int
    concurrency: int | None  # None: unbounded (the naive approach)
    quota_rps: float | None = None

    @property
    def label(self) -> str:
        name = {
            "sequential": "(a) sequential",
            "naive": "(b) naive as_completed",
            "pipeline": "(c) pipeline",
        }[self.approach]
        if self.quota_rps is not None:
            name += f", quota {self.quota_rps:g}/s"
        return name

    @property
    def slots(self) -> int:
        """Requests in flight at most: the concurrency, or every image for the naive approach."""
        return self.concurrency if self.concurrency is not None else self.count


def perfect_pool(latencies: list[float], slots: int) -> float:
    """Makespan of a zero-overhead pool of ``slots`` that starts each request as one ends.

    The stand-in draws latencies in arrival order, so this is the best any client
    with that many requests in flight could do with the same draws.
    """
    ends = [0.0] * max(1, min(slots, len(latencies)))
    finish = 0.0
    for latency in latencies:
        start = heapq.heappop(ends)
        heapq.heappush(ends, start + latency)
        finish = max(finish, start + latency)
    return finish


def hedged_pool(
    latencies: list[float],
    hedges: list[float],
    slots: int,
    quantile: float,
    step: float = 0.005,
) -> tuple[float, int]:
    """Makespan of the perfect pool that also hedges: once the queue is empty, a free slot
    re-sends the oldest call that has run longer than ``quantile`` of the latencies seen so
    far (once per call; the first answer wins), drawing from ``hedges``. Returns the
    makespan and the number of extra calls. Simulated in steps of ``step`` seconds.
    """
    queue = iter(latencies)
    spare = iter(hedges)
    left = len(latencies)
    waiting = left
    running: list[list[float]] = []  # [start, end, hedge end or inf]
    seen: list[float] = []
    extra = 0
    now = 0.0
    while left:
        busy = sum(1 if math.isinf(c[2]) else 2 for c in running)
        while waiting and busy < slots:
            running.append([now, now + next(queue), math.inf])
            waiting -= 1
            busy += 1
        if not waiting and busy < slots and len(seen) >= 20:
            threshold = sorted(seen)[int(quantile * (len(seen) - 1))]
            for call in sorted(running):
                if busy >= slots:
                    break
                if math.isinf(call[2]) and now - call[0] > threshold:
                    call[2] = now + next(spare)
                    extra += 1
                    busy += 1
        now += step
        still = []
        for call in running:
            end = min(call[1], call[2])
            if end <= now:
                left -= 1
                seen.append(end - call[0])
            else:
                still.append(call)
        running = still
    return now, extra


@dataclass(slots=True)
class Measured:
    run: Run
    worker: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False)

    # -- from the stand-in's log -------------------------------------------------------------

    @property
    def latencies(self) -> list[float]:
        return [float(r["latency"]) for r in self.records if r["status"] == 200]

    @property
    def quota_rejections(self) -> int:
        return sum(1 for r in self.records if r["status"] == 429)

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def sent_bytes_per_image(self) -> float:
        answered = [r for r in self.records if r["status"] == 200]
        sizes = [sum(int(image["size"]) for image in r["images"]) for r in answered]
        return statistics.fmean(sizes) if sizes else 0.0

    # -- from the worker -----------------------------------------------------------------------

    @property
    def wall(self) -> float:
        return float(self.worker["wall"])

    @property
    def captioned(self) -> int:
        return int(self.worker["outcomes"].get("ok", 0))

    @property
    def throughput(self) -> float:
        return self.captioned / self.wall if self.wall > 0 else 0.0

    @property
    def peak_rss_mib(self) -> float:
        return float(self.worker["rss_peak_mib"])

    @property
    def client_cpu_ms_per_image(self) -> float:
        return 1000 * float(self.worker["client_cpu"]) / max(1, self.run.count)

    @property
    def prepare_ms_per_image(self) -> float | None:
        prepared = self.worker.get("prepare")
        if not prepared:
            return None
        total = sum(k["cpu_ms_mean"] * k["count"] for k in prepared.values())
        return float(total / max(1, sum(k["count"] for k in prepared.values())))

    @property
    def photo_prepare_ms(self) -> float | None:
        photo = (self.worker.get("prepare") or {}).get("photo")
        return None if photo is None else float(photo["cpu_ms_median"])

    @property
    def image_tokens(self) -> float | None:
        """Tokens Gemini counted for the image: ``promptTokenCount`` less the text's tokens,
        which the stand-in counts as ceil(characters / 4) of the prompt and system text."""
        prompt_tokens = self.worker.get("prompt_tokens")
        answered = [r for r in self.records if r["status"] == 200]
        if prompt_tokens is None or not answered:
            return None
        text = statistics.fmean(
            math.ceil(len(r["prompt"]) / 4) + math.ceil(len(r["system_instruction"]) / 4)
            for r in answered
        )
        return float(prompt_tokens) - text

    @property
    def machine_busy(self) -> float:
        return float(self.worker["machine_busy"])

    @property
    def cores(self) -> dict[str, float]:
        """Average cores used during the run: this process, the local stack, everything else."""
        wall = self.wall or 1.0
        client = float(self.worker["client_cpu"]) / wall
        stack = sum(self.worker.get("stack_cpu", {}).values()) / wall
        machine = self.machine_busy * int(self.worker.get("machine_cores", 2))
        return {"client": client, "stack": stack, "other": max(0.0, machine - client - stack)}

    # -- against the ideal ----------------------------------------------------------------------

    @property
    def ideal(self) -> float:
        """Lower bound on the wall time: the quota's pace, or max(Σ latency / slots, longest)."""
        if self.run.quota_rps is not None:
            # The stand-in's token bucket starts full, with one second's worth of requests.
            rate = self.run.quota_rps
            return max(0.0, self.run.count - max(1.0, rate)) / rate
        latencies = self.latencies
        if not latencies:
            return 0.0
        return max(sum(latencies) / self.run.slots, max(latencies))

    @property
    def efficiency(self) -> float:
        return self.ideal / self.wall if self.wall > 0 else 0.0

    @property
    def pool(self) -> float | None:
        if self.run.quota_rps is not None:
            return None
        return perfect_pool(self.latencies, self.run.slots)

    @property
    def of_pool(self) -> float | None:
        pool = self.pool
        return None if pool is None or self.wall <= 0 else pool / self.wall

    def summary(self) -> dict[str, Any]:
        return {
            "run": {
                "key": self.run.key,
                "label": self.run.label,
                "approach": self.run.approach,
                "images": self.run.images,
                "count": self.run.count,
                "concurrency": self.run.concurrency,
                "quota_rps": self.run.quota_rps,
            },
            "wall_s": self.wall,
            "captioned": self.captioned,
            "outcomes": self.worker["outcomes"],
            "throughput": self.throughput,
            "second_half_rate": self.worker.get("second_half_rate"),
            "ideal_s": self.ideal,
            "efficiency": self.efficiency,
            "perfect_pool_s": self.pool,
            "of_perfect_pool": self.of_pool,
            "latency_sum_s": sum(self.latencies),
            "requests": self.requests,
            "quota_rejections": self.quota_rejections,
            "peak_rss_mib": self.peak_rss_mib,
            # The process and its decode workers (issue 22): their summed proportional
            # set sizes, and how many processes there were.
            "peak_pss_mib": self.worker.get("pss_peak_mib"),
            "processes": self.worker.get("processes", 1),
            "rss_before_mib": self.worker["rss_before_mib"],
            "client_cpu_ms_per_image": self.client_cpu_ms_per_image,
            "prepare_ms_per_image": self.prepare_ms_per_image,
            "photo_prepare_ms_median": self.photo_prepare_ms,
            "sent_bytes_per_image": self.sent_bytes_per_image,
            "image_tokens_per_image": self.image_tokens,
            "machine_busy": self.machine_busy,
            "cores": self.cores,
            "first_result_s": self.worker.get("first_result"),
            "loop_lag_p99_ms": self.worker.get("loop_lag_p99_ms"),
            "prepare": self.worker.get("prepare"),
        }


def extrapolate_sequential(measured: Measured, count: int, latency: LatencyModel) -> float:
    """Wall time of the sequential loop on ``count`` images: the same latency draws, plus the
    per-image overhead (download, prepare, write) measured on the first images."""
    overhead = (measured.wall - sum(measured.latencies)) / max(1, measured.captioned)
    return sum(latency.samples(count)) + count * overhead

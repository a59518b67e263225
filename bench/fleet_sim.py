"""The fleet of bench/fleet.py in simulated time: many limiters, one token bucket, seconds.

    .venv/bin/python -m bench.fleet_sim                        # today's limiter, 6 seeds
    .venv/bin/python -m bench.fleet_sim --set recover=0.95 held=0 slow_start_gain=1
    .venv/bin/python -m bench.fleet_sim --halve

The real benchmark (bench/fleet.py) takes ten minutes a configuration matrix and moves
by several hundredths from run to run on a shared 2-core machine, too little signal to
choose a limiter's constants by. This runs the real ``AdaptiveLimiter`` (its clock
replaced) in the same fleet: N instances start together, each holds up to 32 upload
events at once (``--concurrency``: Cloud Run's per-instance concurrency, as the feeder
delivers them, and CAPTION_MAX_CONCURRENCY) and takes the next one from a shared
backlog when one is captioned; a call is accepted by the stand-in's own quota
(captioner_dev.gemini_server.quota: ``rate`` a second, a burst of one second's worth,
RetryInfo with the time to the next token) and takes a lognormal latency (median 1.2 s,
sigma 0.6, cap 8 s, as bench/fleet.py's stand-in), a 429 comes back at once and its
event is tried again after the named delay plus up to as much again (as
``GeminiDescriber`` does). Fetching and preparing an image is a fixed 20 ms.

What it leaves out: CPU contention, the HTTP hops and the jitter of real processes.
Figures, as bench/fleet.py reports them: ``of Q`` is images over (quota x time to the
last caption), the drain at the end included; ``while backlog`` is the rate of accepted
calls until the last event was handed out, over the quota; ``429s`` of all calls;
``opening`` the 429s in the first 5 s; ``share`` each instance's accepted calls over the
fair share (min and max over the seeds); ``drain`` from the last event handed out to the
last caption.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bench  # noqa: F401 - puts src/ on the path
from captioner.limiter import AdaptiveLimiter, Slot, slow_start_initial
from captioner_dev.gemini_server.quota import TokenBucket, retry_delay

MAXIMUM = 32  # CAPTION_MAX_CONCURRENCY, and the deliveries one instance holds (default)
PREPARE = 0.02
CONFIGS = ((1, 20.0), (4, 20.0), (8, 20.0), (4, 50.0), (8, 50.0))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Instance:
    limiter: AdaptiveLimiter
    ready: list[float] = field(default_factory=list)  # heap: when each held event may go
    accepted: int = 0


@dataclass(order=True)
class _End:
    at: float
    seq: int
    who: int = field(compare=False)
    manager: Any = field(compare=False)
    accepted: bool = field(compare=False)
    retry_after: float | None = field(compare=False)


def _latency(rng: random.Random) -> float:
    return min(8.0, 1.2 * math.exp(0.6 * rng.gauss(0, 1)))


async def simulate(
    make: Callable[[Callable[[], float], Callable[[], float]], AdaptiveLimiter],
    instances: int,
    quota: float,
    *,
    images: int = 2000,
    seed: int = 1,
    halve: bool = False,
    hold: int = MAXIMUM,
) -> dict[str, float]:
    """One fleet run; ``make(clock, rng)`` builds each instance's limiter."""
    clock = _Clock()
    rng = random.Random(seed)
    fleet = [_Instance(make(clock, rng.random)) for _ in range(instances)]
    bucket = TokenBucket(quota, clock.now)
    backlog = images
    for instance in fleet:
        held = min(hold, backlog)
        backlog -= held
        instance.ready = [PREPARE] * held
    ends: list[_End] = []
    refused_at: list[float] = []
    accepted_at: list[float] = []
    seq = done = 0
    backlog_empty = halved_at = None
    last_sent = 0.0
    while done < images:
        for who, instance in enumerate(fleet):
            stats = instance.limiter.stats
            while (
                instance.ready
                and instance.ready[0] <= clock.now
                and stats.in_flight < stats.window
                and clock.now >= stats.paused_until
            ):
                heapq.heappop(instance.ready)
                manager = instance.limiter.slot()
                slot: Slot = await manager.__aenter__()
                wait = bucket.take(clock.now)
                if wait is not None:
                    wait = retry_delay(wait)  # as the stand-in's RetryInfo says it
                if wait is None:
                    slot.succeeded()
                    last_sent = clock.now
                    took = _latency(rng)
                else:
                    slot.throttled(wait)
                    refused_at.append(clock.now)
                    took = 0.01
                seq += 1
                heapq.heappush(ends, _End(clock.now + took, seq, who, manager, wait is None, wait))
                stats = instance.limiter.stats
        times = [ends[0].at] if ends else []
        for instance in fleet:
            if instance.ready:
                at = max(instance.ready[0], instance.limiter.stats.paused_until)
                if at > clock.now:
                    times.append(at)
        clock.now = min(times)
        while ends and ends[0].at <= clock.now:
            end = heapq.heappop(ends)
            instance = fleet[end.who]
            await end.manager.__aexit__(None, None, None)
            if not end.accepted:
                delay = end.retry_after or 0.1
                heapq.heappush(instance.ready, clock.now + delay + rng.uniform(0, delay))
                continue
            instance.accepted += 1
            accepted_at.append(clock.now)
            done += 1
            if halve and halved_at is None and done >= images // 2:
                halved_at = clock.now
                bucket = TokenBucket(quota / 2, clock.now)  # the stand-in refills too
            if backlog:
                backlog -= 1
                heapq.heappush(instance.ready, clock.now + PREPARE)
                if not backlog:
                    backlog_empty = clock.now
    end_at = clock.now
    emptied = backlog_empty or end_at
    allowed = (
        quota * end_at
        if halved_at is None
        else quota * halved_at + quota / 2 * (end_at - halved_at)
    )
    fair = images / instances
    return {
        "of_q": images / allowed,
        "while_backlog": sum(1 for t in accepted_at if t <= emptied) / (quota * emptied)
        if halved_at is None
        else math.nan,
        "refused": len(refused_at) / (images + len(refused_at)),
        "opening": sum(1 for t in refused_at if t < 5.0),
        "share_min": min(i.accepted for i in fleet) / fair,
        "share_max": max(i.accepted for i in fleet) / fair,
        "drain": end_at - emptied,
        "last_sent": last_sent,
    }


def _parse_settings(pairs: list[str]) -> dict[str, float]:
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = float(value)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="AdaptiveLimiter keyword arguments (recover, held, creep, slow_start_gain, ...)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=MAXIMUM,
        help="CAPTION_MAX_CONCURRENCY, and the deliveries one instance holds",
    )
    parser.add_argument("--initial", type=int, help="default: slow_start_initial(concurrency)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--halve", action="store_true", help="the quota halves mid-run")
    args = parser.parse_args(argv)
    settings = _parse_settings(args.set)
    initial = args.initial or slow_start_initial(args.concurrency)

    def make(clock: Callable[[], float], rng: Callable[[], float]) -> AdaptiveLimiter:
        return AdaptiveLimiter(
            args.concurrency,
            initial=initial,
            clock=clock,
            rng=rng,
            **settings,  # type: ignore[arg-type]
        )

    print(
        f"limiter: maximum={args.concurrency} initial={initial} {settings or 'defaults'}; "
        f"{args.seeds} seeds"
    )
    print(
        "| fleet | of Q (min) | while backlog | 429s (max) | opening 429s | share min–max "
        "| drain (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for instances, quota in CONFIGS:
        runs = [
            asyncio.run(
                simulate(
                    make,
                    instances,
                    quota,
                    images=args.images,
                    seed=seed,
                    halve=args.halve,
                    hold=args.concurrency,
                )
            )
            for seed in range(1, args.seeds + 1)
        ]

        def mean(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.fmean(r[key] for r in runs)

        print(
            f"| {instances} × {quota:g}/s | {mean('of_q'):.3f} "
            f"({min(r['of_q'] for r in runs):.3f}) "
            f"| {mean('while_backlog'):.3f} | {100 * mean('refused'):.1f} % "
            f"({100 * max(r['refused'] for r in runs):.1f} %) | {mean('opening'):.0f} "
            f"| {min(r['share_min'] for r in runs):.2f}–{max(r['share_max'] for r in runs):.2f} "
            f"| {mean('drain'):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

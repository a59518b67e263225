"""The fleet of bench/fleet.py in simulated time: many limiters, one quota of any shape, seconds.

    .venv/bin/python -m bench.fleet_sim                          # every shape, 6 seeds
    .venv/bin/python -m bench.fleet_sim --shapes minute,vertex --seeds 12
    .venv/bin/python -m bench.fleet_sim --set decrease=0.8 creep=0.05 burst=0.2
    .venv/bin/python -m bench.fleet_sim --halve
    .venv/bin/python -m bench.fleet_sim --held-out               # two shapes not tuned on
    .venv/bin/python -m bench.fleet_sim --baseline 2a89276       # the limiter of a commit
    .venv/bin/python -m bench.fleet_sim --bound                  # paced senders, no limiter

The real benchmark (bench/fleet.py) takes minutes a configuration and moves by several
hundredths from run to run on a shared 2-core machine, too little signal to choose a
limiter's constants by. This runs the real ``AdaptiveLimiter`` (its clock replaced) in the
same fleet: N instances start together, each holds up to 32 upload events at once
(``--concurrency``: Cloud Run's per-instance concurrency, as the feeder delivers them, and
CAPTION_MAX_CONCURRENCY) and takes the next one from a shared backlog when one is
captioned. A call is decided on arrival by the stand-in's own quota
(captioner_dev.gemini_server.quota, any shape; a call costs its image's input tokens for the
token shapes, a mix of one- to four-tile images here) and takes a lognormal latency (median
1.2 s, sigma 0.6, cap 8 s, as bench/fleet.py's stand-in); a 429 comes back after 5 ms and
its event is tried again after the named delay plus up to as much again, or 0.5, 1, 2 ...
seconds plus as much again without RetryInfo (as ``GeminiDescriber`` does). Fetching and
preparing an image is a fixed 20 ms.

Besides the fleets: ``--single`` runs the HTTP backfill of issue 23 (one instance, 210
images at once, concurrency 32, a fixed 0.2 s latency, 20/s) on every shape, and the first
request of a fresh instance without a quota (210 images, 0.5 s latency: the efficiency
against a perfect pool of 32, which only the limiter's own opening costs here).

What it leaves out: CPU contention, the HTTP hops and the jitter of real processes.
Figures, as bench/fleet.py reports them: ``of Q`` is what was let through (images, or
tokens for the token shapes) over (quota x time to the last caption), the drain at the end
included; ``while backlog`` the same until the last event was handed out; ``429s`` of all
calls; ``opening`` the 429s in the first 5 s; ``share`` each instance's accepted calls
over the fair share (min and max over the seeds); ``drain`` from the last event handed out
to the last caption; ``gap`` the longest an instance with an event ready went without
starting a call.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import importlib.util
import math
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench  # noqa: F401 - puts src/ on the path
from captioner.limiter import AdaptiveLimiter, RateSettings, slow_start_initial
from captioner_dev.gemini_server.quota import (
    MINUTE,
    QUOTA_SHAPES,
    Quota,
    QuotaShape,
    SlidingWindow,
    TokenBucket,
    make_quota,
)

MAXIMUM = 32  # CAPTION_MAX_CONCURRENCY, and the deliveries one instance holds (default)
PREPARE = 0.02
REFUSED_IN = 0.005  # a 429 is decided on arrival and comes back at once
MAX_WAIT = 30.0  # CAPTION_RETRY_MAX_WAIT
FLEETS = ((1, 20.0), (2, 20.0), (4, 20.0), (8, 20.0), (1, 50.0), (2, 50.0), (4, 50.0), (8, 50.0))
# Input tokens of one call (captioner_dev.gemini_server.tokens): 258 for an image of one tile
# (Gemini 2.x; every image at the default CAPTION_MAX_EDGE=768) and 116 of the default
# rule's prompt, as bench/fleet.py's calls cost; a tenth with a slightly longer prompt (a
# rule per folder). Images of several tiles (a larger CAPTION_MAX_EDGE) would spread the
# cost further; a quota counted over one second then refuses some calls at any even pace.
TOKEN_MIX = ((374, 0.9), (392, 0.1))
MEAN_TOKENS = sum(tokens * share for tokens, share in TOKEN_MIX)
# Shapes the constants were not tuned on, to check that the design follows quotas nobody
# modelled: a rolling minute (the Gemini rate-limits page read literally: "21 requests within
# a minute" refused, with RetryInfo), and Apigee's Spike Arrest, which "smooths" a rate into
# one request per interval ("5ps" = one every 200 ms) and answers 429 with no delay
# (https://docs.apigee.com/api-platform/reference/policies/spike-arrest-policy).
HELD_OUT = ("rolling-minute", "spike-arrest")


def quota_of(shape: str, rate: float, now: float) -> tuple[Quota, bool, bool]:
    """(the quota, whether it counts tokens, whether its 429 names a delay) for ``rate``
    calls a second; the token shapes get the tokens of ``rate`` average calls."""
    if shape == "rolling-minute":
        return SlidingWindow(rate * MINUTE, MINUTE, whole_seconds=True), False, True
    if shape == "spike-arrest":
        return TokenBucket(rate, now, burst=1.0), False, False
    kind = QuotaShape(shape)
    made = make_quota(kind, now, rps=rate, tpm=rate * MINUTE * MEAN_TOKENS)
    assert made is not None
    return made, kind.counts_tokens, kind.sends_retry_info


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Driver:
    """The limiter as the simulation calls it: when a call may start, start it, end it."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter
        self._old = not hasattr(limiter, "ready_at")  # a limiter before issue 23

    def ready_at(self, now: float) -> float:
        if not self._old:
            return float(self.limiter.ready_at())
        stats = self.limiter.stats
        if stats.in_flight >= stats.window:
            return math.inf
        return max(now, stats.paused_until)

    async def start(self) -> Any:
        if not self._old:
            return self.limiter.start()
        manager = self.limiter.slot()
        return (manager, await manager.__aenter__())

    async def end(self, handle: Any, ok: bool, retry_after: float | None) -> None:
        slot = handle[1] if self._old else handle
        if ok:
            slot.succeeded()
        else:
            slot.throttled(retry_after)
        if self._old:
            await handle[0].__aexit__(None, None, None)
        else:
            self.limiter.finish(slot)


@dataclass
class _Event:
    cost: float
    refusals: int = 0


@dataclass
class _Instance:
    driver: Driver
    ready: list[tuple[float, int, _Event]] = field(default_factory=list)  # heap
    accepted: int = 0
    last_start: float = 0.0
    gap: float = 0.0


@dataclass(order=True)
class _End:
    at: float
    seq: int
    who: int = field(compare=False)
    handle: Any = field(compare=False)
    event: _Event = field(compare=False)
    accepted: bool = field(compare=False)
    retry_after: float | None = field(compare=False)


@dataclass(frozen=True)
class Scenario:
    shape: str
    instances: int
    quota: float
    images: int = 2000
    halve: bool = False
    hold: int = MAXIMUM
    latency: float | None = None  # fixed; None: the stand-in's lognormal
    prepare: float = PREPARE
    # Each call reaches the quota up to this much later than it left, at random (the HTTP
    # hops and a busy event loop on either side): even pacing arrives less even.
    jitter: float = 0.0


def _latency(rng: random.Random, fixed: float | None) -> float:
    if fixed is not None:
        return fixed
    return min(8.0, 1.2 * math.exp(0.6 * rng.gauss(0, 1)))


def _throttle_wait(rng: random.Random, retry_after: float | None, refusals: int) -> float:
    """GeminiDescriber._throttle_wait: the delay (or 0.5 s doubling), plus up to as much."""
    base = retry_after if retry_after is not None else 0.5 * 2 ** min(refusals - 1, 10)
    base = min(base, MAX_WAIT)
    return base + rng.uniform(0, base)


async def simulate(
    make: Callable[[Callable[[], float], Callable[[], float]], Any],
    scenario: Scenario,
    *,
    seed: int = 1,
) -> dict[str, float]:
    """One run; ``make(clock, rng)`` builds each instance's limiter."""
    s = scenario
    clock = _Clock()
    rng = random.Random(seed)
    fleet = [_Instance(Driver(make(clock, rng.random))) for _ in range(s.instances)]
    quota, in_tokens, names_delay = quota_of(s.shape, s.quota, clock.now)
    costs, weights = zip(*TOKEN_MIX, strict=True)

    def new_event() -> _Event:
        return _Event(rng.choices(costs, weights)[0] if in_tokens else 1.0)

    backlog = s.images
    seq = 0
    for instance in fleet:
        held = min(s.hold, backlog)
        backlog -= held
        for _ in range(held):
            seq += 1
            instance.ready.append((s.prepare, seq, new_event()))
        heapq.heapify(instance.ready)
    ends: list[_End] = []
    refused_at: list[float] = []
    accepted_at: list[tuple[float, float]] = []  # (when, cost)
    done = 0
    backlog_empty = halved_at = None
    last_arrival = 0.0  # the quota sees calls in the order it receives them
    while done < s.images:
        for who, instance in enumerate(fleet):
            while instance.ready and instance.ready[0][0] <= clock.now:
                if instance.driver.ready_at(clock.now) > clock.now:
                    break
                ready_since, _, event = heapq.heappop(instance.ready)
                waited_from = max(instance.last_start, ready_since)
                instance.gap = max(instance.gap, clock.now - waited_from)
                instance.last_start = clock.now
                handle = await instance.driver.start()
                arrival = clock.now + rng.uniform(0, s.jitter) if s.jitter else clock.now
                wait = quota.take(max(arrival, last_arrival), event.cost)
                last_arrival = max(arrival, last_arrival)
                retry = None
                if wait is None:
                    took = _latency(rng, s.latency)
                    accepted_at.append((clock.now, event.cost))
                else:
                    retry = quota.retry_delay(wait) if names_delay else None
                    refused_at.append(clock.now)
                    took = REFUSED_IN
                seq += 1
                heapq.heappush(
                    ends, _End(clock.now + took, seq, who, handle, event, wait is None, retry)
                )
        times = [ends[0].at] if ends else []
        for instance in fleet:
            if instance.ready:
                at = max(instance.ready[0][0], instance.driver.ready_at(clock.now))
                if clock.now < at < math.inf:
                    times.append(at)
        clock.now = min(times)
        while ends and ends[0].at <= clock.now:
            end = heapq.heappop(ends)
            instance = fleet[end.who]
            await instance.driver.end(end.handle, end.accepted, end.retry_after)
            if not end.accepted:
                end.event.refusals += 1
                wait = _throttle_wait(rng, end.retry_after, end.event.refusals)
                seq += 1
                heapq.heappush(instance.ready, (clock.now + wait, seq, end.event))
                continue
            instance.accepted += 1
            done += 1
            if s.halve and halved_at is None and done >= s.images // 2:
                halved_at = clock.now
                # As bench/fleet.py does through /_stub/config: the quota starts afresh.
                quota, _, _ = quota_of(s.shape, s.quota / 2, clock.now)
            if backlog:
                backlog -= 1
                seq += 1
                heapq.heappush(instance.ready, (clock.now + s.prepare, seq, new_event()))
                if not backlog:
                    backlog_empty = clock.now
    return _figures(s, fleet, clock.now, backlog_empty, halved_at, accepted_at, refused_at)


def _figures(
    s: Scenario,
    fleet: list[_Instance],
    end_at: float,
    backlog_empty: float | None,
    halved_at: float | None,
    accepted_at: list[tuple[float, float]],
    refused_at: list[float],
) -> dict[str, float]:
    emptied = backlog_empty or end_at
    unit = MEAN_TOKENS if _in_tokens(s) else 1.0
    rate = s.quota * unit
    allowed = (
        rate * end_at if halved_at is None else rate * halved_at + rate / 2 * (end_at - halved_at)
    )
    let_through = sum(cost for _, cost in accepted_at)
    fair = s.images / s.instances
    calls = len(accepted_at) + len(refused_at)
    return {
        "of_q": let_through / allowed,
        "while_backlog": sum(c for t, c in accepted_at if t <= emptied) / (rate * emptied)
        if halved_at is None
        else math.nan,
        "refused": len(refused_at) / calls,
        "opening": sum(1 for t in refused_at if t < 5.0),
        "share_min": min(i.accepted for i in fleet) / fair,
        "share_max": max(i.accepted for i in fleet) / fair,
        "drain": end_at - emptied,
        "wall": end_at,
        "gap": max(i.gap for i in fleet),
    }


def _in_tokens(s: Scenario) -> bool:
    return s.shape in QUOTA_SHAPES and QuotaShape(s.shape).counts_tokens


def _parse_settings(pairs: list[str]) -> dict[str, float]:
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = float(value)
    return settings


_LIMITER_KEYS = {
    "initial",
    "slow_start_gain",
    "slow_start_pace",
    "opening",
    "burst",
    "pause_jitter",
}


def limiter_factory(
    settings: dict[str, float], concurrency: int = MAXIMUM, module: Any = None
) -> Callable[[Callable[[], float], Callable[[], float]], Any]:
    """Builds each instance's limiter: ``settings`` are AdaptiveLimiter keywords or
    RateSettings fields; ``module`` a limiter module of another commit (its own keywords)."""
    if module is not None:
        cls = module.AdaptiveLimiter
        initial = module.slow_start_initial(concurrency)

        def make_old(clock: Callable[[], float], rng: Callable[[], float]) -> Any:
            return cls(concurrency, initial=initial, clock=clock, rng=rng, **settings)

        return make_old
    own = {k: v for k, v in settings.items() if k in _LIMITER_KEYS}
    rate = RateSettings(**{k: v for k, v in settings.items() if k not in _LIMITER_KEYS})
    initial = int(own.pop("initial", slow_start_initial(concurrency)))

    def make(clock: Callable[[], float], rng: Callable[[], float]) -> AdaptiveLimiter:
        return AdaptiveLimiter(
            concurrency,
            initial=initial,
            max_pause=MAX_WAIT,
            rate=rate,
            clock=clock,
            rng=rng,
            **own,  # type: ignore[arg-type]
        )

    return make


def load_baseline(commit: str) -> Any:
    """The limiter module of ``commit`` (src/captioner/limiter.py or the package's core)."""
    for path in ("src/captioner/limiter.py", "src/captioner/limiter/core.py"):
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no limiter at {commit}")
    target = Path(tempfile.mkdtemp()) / "baseline_limiter.py"
    target.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("baseline_limiter", target)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_limiter"] = module
    spec.loader.exec_module(module)
    return module


def run_many(make: Any, scenario: Scenario, seeds: int) -> list[dict[str, float]]:
    return [asyncio.run(simulate(make, scenario, seed=seed)) for seed in range(1, seeds + 1)]


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def fleet_row(label: str, runs: list[dict[str, float]]) -> str:
    return (
        f"| {label} | {_mean(runs, 'of_q'):.3f} ({min(r['of_q'] for r in runs):.3f}) "
        f"| {_mean(runs, 'while_backlog'):.3f} ({min(r['while_backlog'] for r in runs):.3f}) "
        f"| {100 * _mean(runs, 'refused'):.1f} % ({100 * max(r['refused'] for r in runs):.1f} %) "
        f"| {_mean(runs, 'opening'):.0f} "
        f"| {min(r['share_min'] for r in runs):.2f}–{max(r['share_max'] for r in runs):.2f} "
        f"| {_mean(runs, 'drain'):.1f} | {max(r['gap'] for r in runs):.1f} |"
    )


FLEET_HEADER = (
    "| fleet | of Q (min) | while backlog (min) | 429s (max) | opening 429s | share min–max "
    "| drain (s) | gap (s) |\n|---|---|---|---|---|---|---|---|"
)


def images_for(shape: str, quota: float, images: int) -> int:
    """A per-minute quota is met over minutes: such runs last 2.5 minutes of quota."""
    if shape in ("minute", "tpm", "rolling-minute"):
        return max(images, int(2.5 * MINUTE * quota))
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="AdaptiveLimiter keywords or RateSettings fields (decrease, recover, creep, ...)",
    )
    parser.add_argument("--shapes", default=",".join(QUOTA_SHAPES))
    parser.add_argument("--held-out", action="store_true", help="the shapes not tuned on")
    parser.add_argument("--fleets", help="e.g. 1x20,8x50 (default: 1, 2, 4, 8 × 20, 50/s)")
    parser.add_argument("--concurrency", type=int, default=MAXIMUM)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--halve", action="store_true", help="the quota halves mid-run")
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="calls reach the quota up to this late (s)"
    )
    parser.add_argument("--single", action="store_true", help="the one-instance HTTP runs")
    parser.add_argument("--baseline", metavar="COMMIT", help="run the limiter of a commit")
    parser.add_argument(
        "--bound",
        action="store_true",
        help="what paced senders get through a sliding second, without any limiter",
    )
    args = parser.parse_args(argv)
    if args.bound:
        print(bound_table())
        return 0
    settings = _parse_settings(args.set)
    module = load_baseline(args.baseline) if args.baseline else None
    make = limiter_factory(settings, args.concurrency, module)
    shapes = list(HELD_OUT) if args.held_out else args.shapes.split(",")
    fleets = FLEETS
    if args.fleets:
        fleets = tuple(
            (int(n), float(q)) for n, q in (item.split("x") for item in args.fleets.split(","))
        )
    print(
        f"limiter: {'baseline ' + args.baseline if module else 'this tree'}, "
        f"maximum={args.concurrency} {settings or 'defaults'}; {args.seeds} seeds"
    )
    if args.single:
        print(single_table(make, shapes, args.seeds))
        return 0
    for shape in shapes:
        print(f"\n{shape}{' (quota halved mid-run)' if args.halve else ''}\n")
        print(FLEET_HEADER)
        for instances, quota in fleets:
            scenario = Scenario(
                shape,
                instances,
                quota,
                images=images_for(shape, quota, args.images),
                halve=args.halve,
                hold=args.concurrency,
                jitter=args.jitter,
            )
            runs = run_many(make, scenario, args.seeds)
            print(fleet_row(f"{instances} × {quota:g}/s", runs))
    return 0


def bound_table(quota: float = 20.0, seconds: float = 300.0) -> str:
    """What evenly paced senders that cannot see each other get through a quota counted
    over one sliding second (no limiter, no feedback): each sends at its own fixed rate, at
    a random phase, the rates a random split of the total."""
    rows = ["| senders | sent a second | let through a second | refused |", "|---|---|---|---|"]
    for senders in (1, 2, 4, 8):
        for total in (0.85 * quota, 0.9 * quota, 0.95 * quota, quota):
            rng = random.Random(3)
            weights = [rng.uniform(0.7, 1.3) for _ in range(senders)]
            rates = [total * w / sum(weights) for w in weights]
            window = SlidingWindow(quota, 1.0)
            due = [(rng.random() / rate, i) for i, rate in enumerate(rates)]
            heapq.heapify(due)
            passed = refused = 0
            while due[0][0] < seconds:
                at, i = heapq.heappop(due)
                if window.take(at) is None:
                    passed += 1
                else:
                    refused += 1
                heapq.heappush(due, (at + 1 / rates[i], i))
            rows.append(
                f"| {senders} | {total:.1f} | {passed / seconds:.2f} "
                f"| {100 * refused / (passed + refused):.1f} % |"
            )
    return "\n".join(rows)


def single_table(make: Any, shapes: list[str], seeds: int) -> str:
    """The HTTP backfill of issue 23 on each shape, and a fresh instance's first request."""
    rows = [
        "| run | of Q (min) | 429s (max) | wall (s) |",
        "|---|---|---|---|",
    ]
    for shape in shapes:
        scenario = Scenario(shape, 1, 20.0, images=210, hold=210, latency=0.2, prepare=0.01)
        runs = run_many(make, scenario, seeds)
        worst_q = min(r["of_q"] for r in runs)
        worst_refused = 100 * max(r["refused"] for r in runs)
        rows.append(
            f"| backfill, {shape} | {_mean(runs, 'of_q'):.3f} ({worst_q:.3f}) "
            f"| {100 * _mean(runs, 'refused'):.1f} % ({worst_refused:.1f} %) "
            f"| {_mean(runs, 'wall'):.2f} |"
        )
    fresh = Scenario("bucket", 1, 1e9, images=210, hold=210, latency=0.5, prepare=0.01)
    runs = run_many(make, fresh, 1)
    ideal = 210 * 0.5 / MAXIMUM
    rows.append(
        f"| first request, no quota: efficiency {ideal / runs[0]['wall']:.3f} "
        f"(perfect pool {ideal:.2f} s) | – | – | {runs[0]['wall']:.2f} |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the captioning pipeline against a sequential loop and the naive as_completed
version, on the local stack, plus prepare's CPU, import time and cold start.

    .venv/bin/python -m bench.run            # full run (~10 min), writes bench/RESULTS.md
    .venv/bin/python -m bench.run --smoke    # tiny and without model latency (< 60 s)
    .venv/bin/python -m bench.run --only pipeline-64,quota   # just those runs, printed

Everything is measured in one invocation; each approach runs in its own process
(bench/worker.py) so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import data, micro, report
from bench.analysis import Measured, Run, extrapolate_sequential, hedged_pool, perfect_pool
from bench.data import BENCH, REPO
from bench.stack import Stack, StubProcess
from captioner_dev.gcs import FakeGcs
from captioner_dev.gemini_server import LatencyModel

BUCKET = "bench-photos"
# Like Gemini Flash describing one image: median 1.2 s, p99 about 4.9 s (capped at 8 s).
LATENCY = LatencyModel(median=1.2, sigma=0.6, seed=2026, cap=8.0)


@dataclass(frozen=True, slots=True)
class Plan:
    smoke: bool
    mix_count: int
    photo_count: int
    runs: tuple[Run, ...]
    latency: LatencyModel | None
    prepare_repeats: int
    cold_starts: int
    import_runs: int
    extrapolate_to: int
    quiet_wait: float  # seconds to wait for a quiet machine before the load-free measurements


def full_plan() -> Plan:
    runs = (
        Run("sequential", "sequential", "mix", 30, 1),
        Run("naive-mix", "naive", "mix", 1000, None),
        Run("pipeline-8", "pipeline", "mix", 250, 8),
        Run("pipeline-16", "pipeline", "mix", 500, 16),
        Run("pipeline-32", "pipeline", "mix", 1000, 32),
        Run("pipeline-64", "pipeline", "mix", 1000, 64),
        Run("pipeline-128", "pipeline", "mix", 1000, 128),
        Run("photos-pipeline-64", "pipeline", "photos", 1000, 64),
        Run("photos-pipeline-64-few", "pipeline", "photos", 250, 64),
        Run("photos-pipeline-16", "pipeline", "photos", 250, 16),
        Run("photos-naive", "naive", "photos", 1000, None),
        Run("quota", "pipeline", "mix", 1000, 64, quota_rps=20.0),
    )
    return Plan(False, 1000, 1000, runs, LATENCY, 9, 5, 5, 1000, 90.0)


def smoke_plan() -> Plan:
    runs = (
        Run("sequential", "sequential", "mix", 4, 1),
        Run("naive-mix", "naive", "mix", 12, None),
        Run("pipeline-4", "pipeline", "mix", 12, 4),
        Run("pipeline-16", "pipeline", "mix", 12, 16),
        Run("photos-pipeline-16", "pipeline", "photos", 8, 16),
        Run("photos-naive", "naive", "photos", 8, None),
        Run("quota", "pipeline", "mix", 30, 16, quota_rps=20.0),
    )
    return Plan(True, 30, 8, runs, None, 1, 1, 1, 1000, 0.0)


def _worker_env(stack: Stack, run: Run) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env.update(stack.env())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env["CAPTION_MAX_CONCURRENCY"] = str(run.concurrency or 16)
    env["CAPTION_LOG_FORMAT"] = "text"
    return env


def measure(stack: Stack, run: Run, names: list[str], latency: LatencyModel | None) -> Measured:
    # Every run starts the stand-in's seeded sequence afresh: the same draws in arrival order.
    stack.stub.configure(
        latency=asdict(latency) if latency is not None else 0, quota_rps=run.quota_rps
    )
    spec = {
        "approach": run.approach,
        "bucket": BUCKET,
        "names": names[: run.count],
        "watch": stack.pids(),
    }
    process = subprocess.run(
        [sys.executable, "-m", "bench.worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_worker_env(stack, run),
        timeout=1800,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker for {run.key} failed ({process.returncode}):\n{process.stderr[-4000:]}"
        )
    return Measured(run, json.loads(lines[-1].removeprefix("RESULT ")), stack.stub.requests())


def drain_ceiling(
    latency: LatencyModel, *, count: int, slots: int, seeds: int = 20
) -> dict[str, Any]:
    """How close a perfect pool gets to Σ latency / slots, over several seeds of the model,
    and, for the run's own seed, whether hedging stragglers would lift it."""
    ceilings = []
    for seed in range(seeds):
        draws = replace(latency, seed=seed).samples(count)
        ideal = max(sum(draws) / slots, max(draws))
        ceilings.append(ideal / perfect_pool(draws, slots))
    draws = latency.samples(count)
    ideal = max(sum(draws) / slots, max(draws))
    spare = replace(latency, seed=(latency.seed or 0) + 1).samples(count)
    hedged = {}
    for quantile in (0.5, 0.75, 0.9):
        makespan, extra = hedged_pool(draws, spare, slots, quantile)
        hedged[str(quantile)] = {"of_ideal": ideal / makespan, "extra_calls": extra}
    return {
        "count": count,
        "slots": slots,
        "seeds": seeds,
        "median": statistics.median(ceilings),
        "min": min(ceilings),
        "max": max(ceilings),
        "this_seed": ideal / perfect_pool(draws, slots),
        "hedged": hedged,
    }


def only(plan: Plan, keys: list[str]) -> int:
    """Just the named runs, for trying a change; nothing is written."""
    known = {run.key: run for run in plan.runs}
    if unknown := [key for key in keys if key not in known]:
        print(f"unknown run keys {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    catalogue = data.build()
    with FakeGcs() as gcs, StubProcess() as stub:
        stack = Stack(gcs, stub)
        stack.create_bucket(BUCKET)
        runs = [known[key] for key in keys]
        sets = {
            "mix": data.plan(catalogue, "mix/", plan.mix_count),
            "photos": data.plan(catalogue, "photos/", plan.photo_count, kinds="photo"),
        }
        needed = {run.images for run in runs}
        stack.upload(BUCKET, [p for kind in needed for p in sets[kind]])
        for run in runs:
            names = [p.name for p in sets[run.images]]
            measured = measure(stack, run, names, plan.latency)
            print(json.dumps(measured.summary()), flush=True)
            _progress(
                f"{run.key}: {measured.wall:.1f} s, {measured.throughput:.1f} images/s, "
                f"efficiency {measured.efficiency:.2f}, peak {measured.peak_rss_mib:.0f} MiB, "
                f"outcomes {measured.worker['outcomes']}"
            )
    return 0


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, no model latency")
    parser.add_argument(
        "--out",
        type=Path,
        help="where RESULTS.md, results.json and the plot go (default: "
        "bench/ for a full run, bench/out/smoke/ for --smoke)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated run keys (e.g. pipeline-64,quota): measure just those and print "
        "their figures, without the other measurements or RESULTS.md",
    )
    args = parser.parse_args(argv)
    plan = smoke_plan() if args.smoke else full_plan()
    if args.only:
        return only(plan, args.only.split(","))
    out: Path = args.out or (BENCH / "out" / "smoke" if plan.smoke else BENCH)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run" + (" --smoke" if plan.smoke else "")
    started = time.monotonic()
    machine = report.machine()

    _progress("images")
    catalogue = data.build()
    _progress("prepare CPU (no load)")
    quiet_prepare = micro.wait_for_quiet(max_wait=plan.quiet_wait)
    prepare_figures = micro.measure_prepare(catalogue, repeats=plan.prepare_repeats)
    convoy_figures = micro.measure_gil_convoy(catalogue, repeats=plan.prepare_repeats)
    micro.write_sample(catalogue, out)
    _progress("import time of main.py")
    import_figures = micro.measure_import(plan.import_runs)

    results: list[Measured] = []
    with FakeGcs() as gcs, StubProcess() as stub:
        stack = Stack(gcs, stub)
        stack.create_bucket(BUCKET)
        mix = data.plan(catalogue, "mix/", plan.mix_count)
        photos = data.plan(catalogue, "photos/", plan.photo_count, kinds="photo")
        cold = data.plan(catalogue, "cold/", plan.cold_starts, kinds="photo")
        _progress(f"uploading {len(mix) + len(photos) + len(cold)} objects to fake-gcs-server")
        stack.upload(BUCKET, mix + photos + cold)

        _progress("cold start to first caption")
        quiet_cold = micro.wait_for_quiet(max_wait=plan.quiet_wait)
        cold_figures = micro.measure_cold_start(stack, BUCKET, [p.name for p in cold])

        names = {"mix": [p.name for p in mix], "photos": [p.name for p in photos]}
        for run in plan.runs:
            _progress(f"{run.key}: {run.label} on {run.count} {run.images} images")
            measured = measure(stack, run, names[run.images], plan.latency)
            results.append(measured)
            _progress(
                f"  {measured.wall:.1f} s, {measured.throughput:.1f} images/s, efficiency "
                f"{measured.efficiency:.2f}, peak {measured.peak_rss_mib:.0f} MiB, "
                f"outcomes {measured.worker['outcomes']} {measured.worker.get('reasons') or ''}"
            )

    sequential = next(m for m in results if m.run.approach == "sequential")
    extrapolated = extrapolate_sequential(sequential, plan.extrapolate_to, plan.latency or LATENCY)
    if plan.latency is None:
        extrapolated = sequential.wall / max(1, sequential.captioned) * plan.extrapolate_to
    document: dict[str, Any] = {
        "drain_ceiling": drain_ceiling(plan.latency or LATENCY, count=1000, slots=64),
        "command": command,
        "smoke": plan.smoke,
        "machine": machine,
        "latency_model": asdict(plan.latency) if plan.latency else None,
        "mix": dict(data.kinds_of(mix)),
        "prepare": asdict(prepare_figures) | {"speedup": prepare_figures.speedup},
        "background_cores": {"prepare": quiet_prepare, "cold_start": quiet_cold},
        "gil_convoy": asdict(convoy_figures),
        "import": asdict(import_figures),
        "cold_start": asdict(cold_figures) | {"median": cold_figures.median},
        "sequential_extrapolated": {"images": plan.extrapolate_to, "wall_s": extrapolated},
        "runs": [m.summary() for m in results],
        "elapsed_s": time.monotonic() - started,
    }
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    plot = report.plot(document, out / "results.png")
    (out / "RESULTS.md").write_text(report.markdown(document, plot))
    _progress(f"done in {document['elapsed_s']:.0f} s: {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

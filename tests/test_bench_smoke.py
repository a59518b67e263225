"""The benchmark's smoke mode runs end to end and produces its table (not a performance test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench.<args>`` from the repository without CAPTION_* settings; it must
    exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    process = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


@pytest.mark.slow
def test_bench_smoke_mode_writes_its_table(tmp_path: Path) -> None:
    run_bench("bench.run", "--smoke", "--out", str(tmp_path), timeout=110)

    results = json.loads((tmp_path / "results.json").read_text())
    approaches = {run["run"]["approach"] for run in results["runs"]}
    assert approaches == {"sequential", "naive", "pipeline"}
    for run in results["runs"]:
        if run["run"]["quota_rps"] is None:
            assert run["captioned"] == run["run"]["count"], run
        assert run["peak_rss_mib"] > 0
    assert results["cold_start"]["statuses"] == ["200/ok"]
    assert results["elapsed_s"] < 60

    table = (tmp_path / "RESULTS.md").read_text()
    assert "| approach | images | n | concurrency | wall (s) | images/s |" in table
    assert "| target | goal | measured | verdict |" in table
    for label in ("(a) sequential", "(b) naive as_completed", "(c) pipeline"):
        assert label in table


@pytest.mark.slow
def test_fleet_benchmark_smoke_mode_feeds_two_instances_against_one_quota(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    process = run_bench("bench.fleet", "--smoke", "--out", str(out), timeout=120)

    (run,) = json.loads(out.read_text())["fleet"]
    assert run["run"]["instances"] == 2
    assert run["images"] == run["run"]["images"] == 20
    assert run["accepted"] == 20  # one Gemini call per image got through the quota
    assert run["calls"] == run["accepted"] + run["refused_429"]
    assert [p["instance"] for p in run["per_instance"]] == [0, 1]
    assert sum(p["accepted"] for p in run["per_instance"]) == 20  # the tags tell them apart
    assert run["of_quota"] > 0
    assert run["wall_s"] > 0
    assert "| instances | quota | images |" in process.stdout
    assert run["of_quota_while_backlog"] is not None
    assert run["drain_s"] is not None
    assert run["drain_s"] >= 0


def test_fleet_simulation_runs_the_real_limiter_and_prints_its_table() -> None:
    process = run_bench(
        "bench.fleet_sim",
        "--seeds",
        "1",
        "--images",
        "300",
        "--shapes",
        "sliding-second,vertex",
        "--fleets",
        "1x20,4x20,8x20,4x50,8x50",
        timeout=120,
    )
    rows = [line for line in process.stdout.splitlines() if line.startswith("| ")]
    assert [row for row in rows if row.startswith("| fleet | of Q (min) |")] == [rows[0]] * 2
    fleets = [row for row in rows if not row.startswith("| fleet")]
    assert len(fleets) == 2 * 5  # for each shape, 1 x 20/s ... 8 x 50/s
    # Every image was captioned: the quota used can neither be zero nor beat the quota
    # (counted per second, it lends nothing ahead).
    for row in fleets:
        of_q = float(row.split("|")[2].split()[0])
        assert 0.3 < of_q <= 1.05, row


@pytest.mark.slow
def test_the_cost_estimate_is_within_ten_percent_of_what_the_stand_in_charges() -> None:
    """bench.estimate exits 1 past 10 %: a change to the token estimates or the stand-in's
    token model that parts them fails here."""
    process = run_bench("bench.estimate", "--images", "3", timeout=120)
    assert "| `gemini-2.5-flash` |" in process.stdout
    assert "worst difference:" in process.stdout


def test_fleet_simulation_runs_the_one_instance_cases_on_every_shape() -> None:
    process = run_bench("bench.fleet_sim", "--seeds", "1", "--single", timeout=120)
    rows = [line for line in process.stdout.splitlines() if line.startswith("| backfill, ")]
    assert [row.split(",")[1].split("|")[0].strip() for row in rows] == [
        "bucket",
        "sliding-second",
        "minute",
        "tpm",
        "vertex",
    ]
    assert "| first request, no quota: efficiency" in process.stdout

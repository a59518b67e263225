"""What the process boundary of the decode workers costs (issue 22).

- prepare per 12 MP photo (the catalogue's 7 distinct photos, bench/data.py): in this
  process as the thread pool ran it (``images.prepare`` in a thread), and through a
  decode worker (``PreparePool.prepared`` with the ProcessDecoder: bytes in, JPEG out),
  taking turns photo by photo; wall time per image, CPU of this process and of the
  worker, and the worker's per-task peak RSS;
- cold start to the first caption (bench/micro.py's measure: functions-framework
  spawned, one finalized event on a 12 MP photo, the 200).

Warm backfills are bench/run.py's runners (``python -m bench.run --only ...``).

    python -m bench.decode_workers [--repeats 9] [--cold 5]

Runs in a checkout from before the workers too (then only the in-process figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import data, micro
from bench.data import REPO
from bench.stack import Stack, StubProcess
from captioner.adapters.images import prepare
from captioner_dev.eventarc import binary_event
from captioner_dev.gcs import FakeGcs, free_port

MiB = 1024 * 1024


def _in_thread(pool: ThreadPoolExecutor, photo: bytes) -> tuple[float, float]:
    """Wall and CPU ms of one prepare in a thread, as the thread pool ran it."""
    started, cpu = time.perf_counter(), time.process_time()
    pool.submit(prepare, photo, max_edge=768, max_pixels=50_000_000).result()
    return 1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu)


def measure_prepare(repeats: int) -> dict[str, Any]:
    photos = [source.path.read_bytes() for source in data.build().photos]
    threads = ThreadPoolExecutor(1)
    samples: dict[str, list[float]] = {"thread_wall": [], "thread_cpu": []}
    try:
        from captioner.preparing import PreparePool, ProcessDecoder
        from captioner.workers import Reply
    except ImportError:  # before the decode workers
        decoder = None
    else:
        decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000)
        replies: list[Reply] = []
        decoder.on_reply = lambda reply, allowance: replies.append(reply)
        for key in ("worker_wall", "parent_cpu", "worker_cpu", "worker_peak_mb"):
            samples[key] = []

    async def through_worker(photo: bytes) -> None:
        assert decoder is not None
        pool = PreparePool(decoder, decode_budget=256 * MiB, held_bytes_budget=128 * MiB)
        replies.clear()
        started, cpu = time.perf_counter(), time.process_time()
        await pool.prepared(photo)
        samples["worker_wall"].append(1000 * (time.perf_counter() - started))
        samples["parent_cpu"].append(1000 * (time.process_time() - cpu))
        samples["worker_cpu"].append(1000 * sum(r.cpu_seconds for r in replies))
        samples["worker_peak_mb"].append(max(r.peak_rss for r in replies) / 1e6)

    # Warm: plugin imports, the workers' start, the allocator.
    _in_thread(threads, photos[0])
    if decoder is not None:
        for photo in photos:
            asyncio.run(through_worker(photo))
        for values in samples.values():
            values.clear()
    for _ in range(repeats):
        for photo in photos:
            wall, cpu = _in_thread(threads, photo)
            samples["thread_wall"].append(wall)
            samples["thread_cpu"].append(cpu)
            if decoder is not None:
                asyncio.run(through_worker(photo))
    threads.shutdown()
    return {
        key: {
            "median": round(statistics.median(values), 2),
            "p10": round(sorted(values)[len(values) // 10], 2),
            "p90": round(sorted(values)[len(values) * 9 // 10], 2),
        }
        for key, values in samples.items()
    } | {"photos": len(photos), "repeats": repeats}


def measure_cold(runs: int) -> dict[str, Any]:
    """bench/micro.py's cold start (spawn functions-framework serving main.py, deliver
    one finalized event on a 12 MP photo, time to the 200), plus the CPU the server's
    process tree (its decode workers included) used by then: on a shared machine the
    CPU varies less with other work than the wall time does."""
    catalogue = data.build()
    with FakeGcs() as gcs, StubProcess() as stub:
        stack = Stack(gcs, stub)
        stack.create_bucket("bench-cold")
        cold = data.plan(catalogue, "cold/", runs, kinds="photo")
        stack.upload("bench-cold", cold)
        stack.stub.configure(latency=0)
        background = micro.wait_for_quiet(max_wait=60)
        env = micro._env_without_pythonpath(
            {**stack.env(), "CAPTION_LOG_FORMAT": "text", "FUNCTION_TARGET": "caption_on_upload"}
        )
        seconds, listening, cpu, statuses = [], [], [], []
        for source in cold:
            headers, body = binary_event(stack.object_resource("bench-cold", source.name))
            port = free_port()
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--target", "caption_on_upload",
                 "--source", str(REPO / "main.py"), "--signature-type", "cloudevent",
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                micro._wait_until_listening(port, started + 60)
                listening.append(time.monotonic() - started)
                url = f"http://127.0.0.1:{port}/"
                status = micro._deliver_as_soon_as_listening(url, headers, body, started + 60)
                seconds.append(time.monotonic() - started)
                cpu.append(_tree_cpu(process.pid))
                statuses.append(status)
            finally:
                process.terminate()
                process.wait(timeout=10)
    return {
        "seconds": [round(value, 3) for value in seconds],
        "median": round(statistics.median(seconds), 3),
        "listening": [round(value, 3) for value in listening],
        "cpu_s": [round(value, 3) for value in cpu],
        "cpu_median_s": round(statistics.median(cpu), 3),
        "statuses": statuses,
        "background_cores": round(background, 2),
    }


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants, from /proc."""
    from captioner_dev.proctree import _process_cpu, descendants

    return sum(_process_cpu(p) for p in [pid, *descendants(pid)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cold", type=int, default=5)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"load_before": os.getloadavg()}
    if args.repeats:
        report["prepare_ms"] = measure_prepare(args.repeats)
    if args.cold:
        report["cold_start_s"] = measure_cold(args.cold)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

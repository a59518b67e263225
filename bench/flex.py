"""A backfill on the flex tier: thousands of calls of minutes each, in the memory of one
instance. Runs ``captioner describe --tier flex`` on copies of the sample photos against the
stand-in with its flex latency scaled down (``--latency`` seconds standing for minutes),
samples the CLI's process tree's resident memory, and prints what it saw.

The budget is the deployed instance's: no input may take the process past 600 MB. The
pipeline admits a call only while the calls in flight fit its calls budget
(``PipelineConfig.calls_bytes_budget``), so a concurrency of thousands is bounded by memory.

    python -m bench.flex [--images 2100] [--latency 20] [--concurrency 2100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from captioner_dev import PHOTOS
from captioner_dev.gcs import free_port
from captioner_dev.process import LoggedProcess
from captioner_dev.proctree import tree_rss_mb

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flex", description=__doc__)
    parser.add_argument("--images", type=int, default=2100)
    parser.add_argument("--latency", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=2100)
    args = parser.parse_args(argv)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    stub = LoggedProcess("flex-stub-")
    stub._spawn([sys.executable, "-m", "captioner_dev.gemini_server", "--port", str(port)], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base)
        request = urllib.request.Request(
            f"{base}/_stub/flex", json.dumps({"latency": args.latency}).encode(), method="POST"
        )
        urllib.request.urlopen(request, timeout=10).close()
        with tempfile.TemporaryDirectory() as folder:
            photos = sorted(PHOTOS.glob("*.jpg"))
            files = []
            for i in range(args.images):
                path = Path(folder) / f"{i:05}-{photos[i % len(photos)].name}"
                shutil.copy(photos[i % len(photos)], path)
                files.append(str(path))
            run = {**env, "GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": base}
            print(json.dumps(_measure(files, run, args.concurrency)))
    finally:
        stub.stop()
    return 0


def _measure(files: list[str], env: dict[str, str], concurrency: int) -> dict[str, object]:
    command = [sys.executable, "-m", "captioner", "describe", "--tier", "flex", "--no-progress",
               "--concurrency", str(concurrency), *files]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.2)
    seconds = time.monotonic() - started
    summary = (process.stderr.read() if process.stderr else "").strip().splitlines()
    return {
        "images": len(files),
        "concurrency": concurrency,
        "returncode": process.returncode,
        "seconds": round(seconds, 1),
        "images_per_second": round(len(files) / seconds, 1),
        "peak_tree_rss_mb": round(peak),
        "summary": summary[0] if summary else "",
    }


def _wait(base: str) -> None:
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base}/_stub/health", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the stand-in did not start")


if __name__ == "__main__":
    sys.exit(main())

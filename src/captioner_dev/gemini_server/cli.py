"""The command line: ``python -m captioner_dev.gemini_server --port N --host H``; a quota with
``--quota-shape S --quota-rps R`` (or ``--quota-tpm T`` for the token shapes)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from captioner_dev.gemini_server.config import (
    DEFAULT_BAD_KEY_PREFIX,
    Latency,
    LatencyModel,
    StubConfigError,
)
from captioner_dev.gemini_server.quota import QUOTA_SHAPES, QuotaShape
from captioner_dev.gemini_server.server import GeminiStub


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioner_dev.gemini_server",
        description="Offline Gemini-compatible server for tests, the demo and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--latency", type=float, help="fixed latency in seconds")
    parser.add_argument("--latency-median", type=float, help="lognormal latency median (s)")
    parser.add_argument("--latency-sigma", type=float, default=0.6)
    parser.add_argument("--latency-cap", type=float, default=8.0)
    parser.add_argument("--seed", type=int, help="seed for the latency distribution")
    parser.add_argument(
        "--quota-rps", type=float, help="requests/second of the request shapes (--quota-shape)"
    )
    parser.add_argument(
        "--quota-tpm",
        type=float,
        help="input tokens/minute of the token shapes (tpm, vertex)",
    )
    parser.add_argument(
        "--quota-shape",
        choices=QUOTA_SHAPES,
        default=QuotaShape.BUCKET.value,
        help="how the quota counts (see captioner_dev/gemini_server/quota.py): a token bucket, "
        "a sliding one-second window, the Gemini API's per-minute requests or input tokens, "
        "or Vertex AI's tokens with second-level spikes throttled and no RetryInfo",
    )
    parser.add_argument(
        "--bad-key-prefix",
        default=DEFAULT_BAD_KEY_PREFIX,
        help='API keys starting with this get the real "API key not valid" 400 ("" for none)',
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    latency: Latency = args.latency
    if args.latency_median is not None:
        latency = LatencyModel(
            median=args.latency_median,
            sigma=args.latency_sigma,
            seed=args.seed,
            cap=args.latency_cap,
        )
    stub = GeminiStub(
        latency=latency,
        quota_rps=args.quota_rps,
        quota_shape=args.quota_shape,
        quota_tpm=args.quota_tpm,
        bad_key_prefix=args.bad_key_prefix or None,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    # Issue 11.10: ``async with stub`` started on the defaults (127.0.0.1, a random port) and
    # ignored --host/--port; start where asked.
    await stub.start(args.host, args.port)
    try:
        # Parents (tests, the demo, benchmarks) wait for this exact line to learn the port.
        print(f"READY {stub.base_url}", flush=True)
        await done.wait()
    finally:
        await stub.stop()


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (OSError, StubConfigError) as exc:
        print(f"gemini_server: {exc}", file=sys.stderr)
        return 1
    return 0

"""One approach, in a process of its own, so that its peak memory is its own.

``python -m bench.worker`` reads a JSON spec on stdin, captions the objects it
names, and prints ``RESULT {json}`` as its last line. The stack is found through
the environment (STORAGE_EMULATOR_HOST, GOOGLE_GEMINI_BASE_URL, GEMINI_API_KEY,
CAPTION_*), as the function itself finds it.

Approaches:

- ``sequential``: the first section of Gemini's async-requests example, one image
  at a time with the async client: download, prepare (this project's
  ``images.prepare``), describe, write the caption.
- ``naive``: the example's second section: one coroutine per image, all started
  at once and collected with ``asyncio.as_completed``; each downloads the whole
  object into memory and sends the original bytes, then writes the caption.
- ``pipeline``: ``Runtime(settings).captioner().caption_many(refs)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import bench  # noqa: F401  (puts src/ on the path)
from captioner.domain import ObjectRef, PreparedImage
from captioner.settings import Settings
from captioner_dev.gemini_server import image_tokens
from captioner_dev.proctree import status_kib


def _cpu_seconds() -> float:
    """This process's CPU and its decode workers' (issue 22), alive or reaped."""
    try:
        from captioner_dev.proctree import tree_cpu_seconds
    except ImportError:  # a checkout from before the decode workers
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    return tree_cpu_seconds()


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass(slots=True)
class Window:
    """Wall time, this process's CPU and the machine's CPU between start() and stop()."""

    started: float = 0.0
    cpu: float = 0.0
    ticks: tuple[int, int] = (0, 0)
    wall: float = 0.0
    first: float | None = None
    rss_before_mib: float = 0.0
    # The local stack's processes (fake-gcs-server, the stand-in), whose CPU is reported apart.
    watch: dict[str, int] = field(default_factory=dict)
    watched: dict[str, float] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.rss_before_mib = status_kib(os.getpid(), "VmRSS") / 1024
        self.watched = {name: _process_cpu(pid) for name, pid in self.watch.items()}
        self.ticks = _machine_ticks()
        self.cpu = _cpu_seconds()
        self.started = time.perf_counter()

    def result_arrived(self) -> None:
        at = time.perf_counter() - self.started
        if self.first is None:
            self.first = at
        self.arrivals.append(at)

    def stop(self) -> dict[str, Any]:
        self.wall = time.perf_counter() - self.started
        cpu = _cpu_seconds() - self.cpu
        busy, total = _machine_ticks()
        busy_share = (busy - self.ticks[0]) / max(1, total - self.ticks[1])
        stack = {name: _process_cpu(pid) - self.watched[name] for name, pid in self.watch.items()}
        second_half = sum(1 for at in self.arrivals if at >= self.wall / 2)
        return {
            "second_half_rate": second_half / (self.wall / 2) if self.wall > 0 else 0.0,
            "stack_cpu": stack,
            "machine_cores": os.cpu_count() or 1,
            "wall": self.wall,
            "first_result": self.first,
            "client_cpu": cpu,
            "machine_busy": busy_share,
            "rss_before_mib": self.rss_before_mib,
        }


class LoopLag:
    """How late a 10 ms timer fires on the event loop: how starved the loop is."""

    def __init__(self, period: float = 0.01) -> None:
        self._period = period
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self._period)
            self._lags.append(time.perf_counter() - started - self._period)

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lags = sorted(self._lags) or [0.0]
        return {
            "loop_lag_p50_ms": 1000 * lags[len(lags) // 2],
            "loop_lag_p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
            "loop_lag_max_ms": 1000 * lags[-1],
        }


def _kind(image: PreparedImage) -> str:
    if image.source_format == "JPEG" and image.source_width * image.source_height >= 8_000_000:
        return "photo"
    if not image.reencoded:
        return "thumbnail"
    if image.source_format == "PNG":
        return "screenshot"
    return "other"


@dataclass(slots=True)
class PrepareLog:
    """CPU time (thread_time, so only the calling thread), bytes and tiles per prepared image."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    sent: dict[str, list[int]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    def wrap(self, prepare: Callable[..., PreparedImage]) -> Callable[..., PreparedImage]:
        def timed(data: bytes, **options: Any) -> PreparedImage:
            started = time.thread_time()
            image = prepare(data, **options)
            self.add(image, time.thread_time() - started)
            return image

        return timed

    def on_reply(self, reply: Any, allowance: int) -> None:
        """A decode worker's reply (issue 22): its image and the worker's CPU for it."""
        header = reply.header
        if header.get("status") != "ok":
            return
        fields = {key: header[key] for key in PreparedImage.__dataclass_fields__ if key != "data"}
        self.add(PreparedImage(data=reply.data, **fields), reply.cpu_seconds)

    def add(self, image: PreparedImage, spent: float) -> None:
        kind = _kind(image)
        self.cpu.setdefault(kind, []).append(spent)
        self.sent.setdefault(kind, []).append(len(image.data))
        self.tokens.setdefault(kind, []).append(image_tokens(image.width, image.height))

    def summary(self) -> dict[str, Any]:
        return {
            kind: {
                "count": len(times),
                "cpu_ms_median": statistics.median(times) * 1000,
                "cpu_ms_mean": statistics.fmean(times) * 1000,
                "sent_bytes_mean": statistics.fmean(self.sent[kind]),
                "sent_bytes_max": max(self.sent[kind]),
                "image_tokens_mean": statistics.fmean(self.tokens[kind]),
            }
            for kind, times in self.cpu.items()
        }


def _mean_prompt_tokens(prompt_tokens: list[int]) -> float | None:
    """Gemini's ``promptTokenCount``, averaged; the parent takes the text's share off it."""
    counted = [tokens for tokens in prompt_tokens if tokens > 0]
    return statistics.fmean(counted) if counted else None


async def run_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    import captioner.adapters.images

    log = PrepareLog()
    # Runtime imports images.prepare when it builds, so this wrapper is what it uses
    # (before the decode workers of issue 22; since, their replies are watched below).
    captioner.adapters.images.prepare = log.wrap(captioner.adapters.images.prepare)
    from captioner.runtime import Runtime

    runtime = Runtime(Settings.from_env(os.environ))
    captioner_ = runtime.captioner()  # clients made (and google-genai imported) before the clock
    decoder = getattr(getattr(captioner_, "_pool", None), "_decoder", None)
    if hasattr(decoder, "on_reply"):
        decoder.on_reply = log.on_reply  # type: ignore[union-attr]
    refs = [ObjectRef(spec["bucket"], name) for name in spec["names"]]
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    prompt_tokens: list[int] = []
    window = Window(watch=spec.get("watch", {}))
    lag = LoopLag()
    lag.start()
    window.start()
    async for result in captioner_.caption_many(refs, overwrite=True):
        window.result_arrived()
        outcomes[result.outcome.value] += 1
        if result.reason:
            reasons[result.reason] += 1
        prompt_tokens.append(result.usage.prompt_tokens)
    measured = window.stop() | await lag.stop()
    await runtime.aclose()
    return {
        **measured,
        "outcomes": dict(outcomes),
        "reasons": dict(reasons),
        "prompt_tokens": _mean_prompt_tokens(prompt_tokens),
        "prepare": log.summary(),
    }


class _Simple:
    """What the example's code does, with the same model, prompt and generation config."""

    def __init__(self) -> None:
        import aiohttp
        from google import genai
        from google.genai import types

        self.types = types
        self.gcs = os.environ["STORAGE_EMULATOR_HOST"].rstrip("/") + "/storage/v1"
        # The example's own session: aiohttp's defaults (at most 100 connections).
        self.session = aiohttp.ClientSession()
        self.client = genai.Client()
        settings = Settings.from_env(os.environ)
        self.model = settings.model
        self.prompt = settings.prompt
        self.config = types.GenerateContentConfig(
            max_output_tokens=settings.max_output_tokens, temperature=settings.temperature
        )

    def url(self, bucket: str, name: str) -> str:
        return f"{self.gcs}/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"

    async def download(self, bucket: str, name: str) -> tuple[bytes, str]:
        async with self.session.get(self.url(bucket, name), params={"alt": "media"}) as response:
            response.raise_for_status()
            return await response.read(), response.content_type

    async def describe(self, data: bytes, mime_type: str) -> Any:
        contents: list[Any] = [
            self.types.Part.from_bytes(data=data, mime_type=mime_type),
            self.prompt,
        ]
        return await self.client.aio.models.generate_content(
            model=self.model, contents=contents, config=self.config
        )

    async def write(self, bucket: str, name: str, caption: str) -> None:
        async with self.session.patch(
            # Not "caption": the pipeline would rightly refuse to touch an owner's key of that
            # name in the runs that follow on the same objects.
            self.url(bucket, name),
            json={"metadata": {"simple-caption": caption}},
        ) as response:
            response.raise_for_status()

    async def close(self) -> None:
        await self.session.close()
        await self.client.aio.aclose()


def _prompt_tokens(response: Any) -> int:
    usage = getattr(response, "usage_metadata", None)
    return int(getattr(usage, "prompt_token_count", 0) or 0)


async def run_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    from captioner.adapters.images import prepare

    simple = _Simple()
    log = PrepareLog()
    timed = log.wrap(prepare)
    settings = Settings.from_env(os.environ)
    bucket = spec["bucket"]
    outcomes: Counter[str] = Counter()
    prompt_tokens: list[int] = []
    window = Window(watch=spec.get("watch", {}))
    lag = LoopLag()
    lag.start()
    window.start()
    for name in spec["names"]:
        try:
            data, _ = await simple.download(bucket, name)
            image = timed(data, max_edge=settings.max_edge, max_pixels=settings.max_pixels)
            del data
            response = await simple.describe(image.data, image.mime_type)
            await simple.write(bucket, name, response.text or "")
        except Exception as exc:  # the example has no error handling; count, do not stop
            outcomes[f"error:{type(exc).__name__}"] += 1
            continue
        window.result_arrived()
        outcomes["ok"] += 1
        prompt_tokens.append(_prompt_tokens(response))
    measured = window.stop() | await lag.stop()
    await simple.close()
    return {
        **measured,
        "outcomes": dict(outcomes),
        "prompt_tokens": _mean_prompt_tokens(prompt_tokens),
        "prepare": log.summary(),
    }


async def run_naive(spec: dict[str, Any]) -> dict[str, Any]:
    simple = _Simple()
    bucket = spec["bucket"]
    sent: Counter[str] = Counter()

    async def download_and_describe(name: str) -> int:
        data, mime_type = await simple.download(bucket, name)
        sent[mime_type] += len(data)
        response = await simple.describe(data, mime_type)
        await simple.write(bucket, name, response.text or "")
        return _prompt_tokens(response)

    outcomes: Counter[str] = Counter()
    prompt_tokens: list[int] = []
    window = Window(watch=spec.get("watch", {}))
    lag = LoopLag()
    lag.start()
    window.start()
    for future in asyncio.as_completed([download_and_describe(n) for n in spec["names"]]):
        try:
            tokens = await future
        except Exception as exc:  # as in the example, nothing is retried
            outcomes[f"error:{type(exc).__name__}"] += 1
            continue
        window.result_arrived()
        outcomes["ok"] += 1
        prompt_tokens.append(tokens)
    measured = window.stop() | await lag.stop()
    await simple.close()
    return {
        **measured,
        "outcomes": dict(outcomes),
        "prompt_tokens": _mean_prompt_tokens(prompt_tokens),
    }


@contextlib.contextmanager
def _tree_sampler() -> Iterator[Any]:
    try:
        from captioner_dev.proctree import TreeSampler
    except ImportError:  # a checkout from before the decode workers: one process
        yield None
        return
    if os.environ.get("BENCH_DECODE_WORKERS"):  # to compare worker counts; not a setting
        import captioner.preparing

        captioner.preparing.DECODE_WORKERS = int(os.environ["BENCH_DECODE_WORKERS"])
    with TreeSampler(period=0.02, pss=True) as sampler:
        yield sampler


_APPROACHES = {"sequential": run_sequential, "naive": run_naive, "pipeline": run_pipeline}


def main() -> int:
    spec = json.load(sys.stdin)
    # The instance's peak: this process and its decode workers (issue 22), their summed
    # resident size sampled every 10 ms; this process's own VmHWM is a floor of it.
    with _tree_sampler() as tree:
        result = asyncio.run(_APPROACHES[spec["approach"]](spec))
    own = status_kib(os.getpid(), "VmHWM") / 1024
    result["rss_peak_main_mib"] = own
    result["rss_peak_mib"] = max(own, tree.peak_mb if tree is not None else 0.0)
    result["processes"] = tree.processes if tree is not None else 1
    result["pss_peak_mib"] = tree.peak_pss_mb if tree is not None else None
    result["process_cpu"] = _cpu_seconds()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

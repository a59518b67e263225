"""Measurements that need no load: prepare's CPU, import time, cold start to first caption."""

from __future__ import annotations

import io
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bench.data import REPO, Catalogue, SourceImage
from bench.stack import Stack
from captioner.adapters.images import prepare
from captioner_dev.eventarc import binary_event
from captioner_dev.gcs import free_port
from captioner_dev.gemini_server import image_tokens


def _busy_cores(seconds: float) -> float:
    """Cores busy, all processes, over the next ``seconds``."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    busy, total = ticks()
    time.sleep(seconds)
    busy_after, total_after = ticks()
    return (os.cpu_count() or 1) * (busy_after - busy) / max(1, total_after - total)


def wait_for_quiet(*, max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait`` s) until other work on this shared machine uses under
    ``threshold`` cores; return the background load measured last, in cores."""
    deadline = time.monotonic() + max_wait
    while True:
        load = _busy_cores(1.0)
        if load < threshold or time.monotonic() >= deadline:
            return load
        time.sleep(2.0)


def cpu_ms(work: Callable[[], object], repeats: int) -> list[float]:
    """CPU milliseconds of each of ``repeats`` calls (process time: every thread counts)."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        work()
        samples.append((time.process_time() - started) * 1000)
    return samples


def _full_decode_and_resize(data: bytes, max_edge: int) -> bytes:
    """The obvious way: decode every pixel, then resize (Lanczos) and save."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS, reducing_gap=None)
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


def _draft_decoded(data: bytes, max_edge: int, block: int | None = None) -> Image.Image:
    """libjpeg's DCT-scaled decode to the smallest scale that covers ``max_edge``; ``block``
    sets how many bytes Pillow hands the decoder at a time (its default: 64 KiB)."""
    image = Image.open(io.BytesIO(data))
    if block is not None:
        image.decodermaxblock = block
    scale = max_edge / max(image.size)
    image.draft("RGB", (round(image.width * scale), round(image.height * scale)))
    image.load()
    return image


def _previous_prepare(data: bytes, max_edge: int) -> bytes:
    """prepare() as it was before issue 6: draft, Lanczos with reducing_gap=2, optimize=True."""
    image = _draft_decoded(data, max_edge)
    image.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def _reduced_decode_only(data: bytes, max_edge: int) -> None:
    """The floor of the reduced-scale approach: libjpeg's DCT-scaled decode alone."""
    _draft_decoded(data, max_edge)


@dataclass(frozen=True, slots=True)
class PrepareFigures:
    repeats: int
    photos: int
    new_ms: float
    previous_ms: float
    full_ms: float
    decode_only_ms: float
    grainy_bytes: int
    grainy_new_ms: float
    grainy_full_ms: float
    grainy_decode_only_ms: float
    screenshot_ms: float
    thumbnail_ms: float
    photo_sent_bytes_mean: float
    photo_sent_bytes_max: int
    photo_source_bytes_mean: float
    photo_sent_sizes: tuple[str, ...]
    photo_tokens: int
    photo_original_tokens: int

    @property
    def speedup(self) -> float:
        return self.full_ms / self.new_ms


def _median_over(
    sources: Sequence[SourceImage], work: Callable[[bytes], object], repeats: int
) -> float:
    samples: list[float] = []
    for source in sources:
        data = source.path.read_bytes()
        work(data)  # warm: first-call costs (plugin imports, allocator) are not the steady state
        samples += cpu_ms(lambda data=data: work(data), repeats)  # type: ignore[misc]
    return statistics.median(samples)


def _interleaved(
    sources: Sequence[SourceImage],
    works: dict[str, tuple[Callable[[bytes], object], int]],
    rounds: int,
) -> dict[str, float]:
    """Median CPU ms of each work over the sources, the works taking turns on each image, so
    that a burst of load from elsewhere falls on all of them alike. ``(work, every)`` runs the
    work only every ``every``-th round (for slow ones)."""
    inputs = [source.path.read_bytes() for source in sources]
    for work, _ in works.values():
        work(inputs[0])  # warm: first-call costs (plugin imports, allocator) are not steady state
    samples: dict[str, list[float]] = {name: [] for name in works}
    for round_ in range(rounds):
        for data in inputs:
            for name, (work, every) in works.items():
                if round_ % every == 0:
                    samples[name] += cpu_ms(lambda work=work, data=data: work(data), 1)  # type: ignore[misc]
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_prepare(catalogue: Catalogue, *, repeats: int, max_edge: int = 768) -> PrepareFigures:
    photos = catalogue.photos

    def now(data: bytes) -> object:
        return prepare(data, max_edge=max_edge)

    def previous(data: bytes) -> object:
        return _previous_prepare(data, max_edge)

    def full(data: bytes) -> object:
        return _full_decode_and_resize(data, max_edge)

    def floor(data: bytes) -> object:
        _reduced_decode_only(data, max_edge)
        return None

    # The full decode is ~8x slower: every third round keeps the run short.
    every_third = max(1, min(3, repeats))
    main = _interleaved(
        photos,
        {
            "new": (now, 1),
            "previous": (previous, 1),
            "full": (full, every_third),
            "floor": (floor, 1),
        },
        repeats,
    )
    grainy = _interleaved(
        (catalogue.grainy,),
        {"new": (now, 1), "full": (full, every_third), "floor": (floor, 1)},
        repeats,
    )
    shots = _median_over(catalogue.screenshots, now, repeats)
    thumbs = _median_over(catalogue.thumbnails, now, repeats)
    prepared = [prepare(p.path.read_bytes(), max_edge=max_edge) for p in photos]
    return PrepareFigures(
        repeats=repeats,
        photos=len(photos),
        new_ms=main["new"],
        previous_ms=main["previous"],
        full_ms=main["full"],
        decode_only_ms=main["floor"],
        grainy_bytes=catalogue.grainy.size,
        grainy_new_ms=grainy["new"],
        grainy_full_ms=grainy["full"],
        grainy_decode_only_ms=grainy["floor"],
        screenshot_ms=shots,
        thumbnail_ms=thumbs,
        photo_sent_bytes_mean=statistics.fmean(len(p.data) for p in prepared),
        photo_sent_bytes_max=max(len(p.data) for p in prepared),
        photo_source_bytes_mean=statistics.fmean(p.size for p in photos),
        photo_sent_sizes=tuple(sorted({f"{p.width}x{p.height}" for p in prepared})),
        photo_tokens=max(image_tokens(p.width, p.height) for p in prepared),
        photo_original_tokens=max(image_tokens(p.source_width, p.source_height) for p in prepared),
    )


@dataclass(frozen=True, slots=True)
class ConvoyFigures:
    """Wall milliseconds per call while another thread runs Python code (as an event loop does)."""

    decode_alone_ms: float
    decode_64k_blocks_ms: float
    decode_one_block_ms: float
    prepare_ms: float


def measure_gil_convoy(catalogue: Catalogue, *, repeats: int, max_edge: int = 768) -> ConvoyFigures:
    """Pillow releases the GIL inside each decoder call; how long it waits to take it back."""
    data = next(p for p in catalogue.photos if "coffee" in p.path.name).path.read_bytes()
    runs = max(3, repeats)

    def wall_ms(work: Callable[[], object]) -> float:
        work()
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            work()
            samples.append((time.perf_counter() - started) * 1000)
        return statistics.median(samples)

    alone = wall_ms(lambda: _draft_decoded(data, max_edge))
    stop = threading.Event()

    def busy() -> None:
        spins = 0
        while not stop.is_set():
            spins += 1

    spinner = threading.Thread(target=busy, daemon=True)
    spinner.start()
    try:
        blocks = wall_ms(lambda: _draft_decoded(data, max_edge))
        one = wall_ms(lambda: _draft_decoded(data, max_edge, block=len(data)))
        prepared = wall_ms(lambda: prepare(data, max_edge=max_edge))
    finally:
        stop.set()
        spinner.join()
    return ConvoyFigures(alone, blocks, one, prepared)


def _env_without_pythonpath(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("PYTHONPATH", None)  # main.py must find src/ by itself, as when deployed
    return env


@dataclass(frozen=True, slots=True)
class ImportFigures:
    runs: int
    import_main_s: float  # wall of `python -c "import main"` less `python -c pass`
    interpreter_s: float
    importtime_main_s: float  # -X importtime's cumulative figure for main
    heaviest: tuple[tuple[str, float], ...]  # top-level imports of main, cumulative seconds


def measure_import(runs: int) -> ImportFigures:
    env = _env_without_pythonpath({})

    def wall(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
        return time.perf_counter() - started

    wall("import main")  # warm the page cache and __pycache__
    bare = statistics.median(wall("pass") for _ in range(runs))
    full = statistics.median(wall("import main") for _ in range(runs))
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import main"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    line = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
    # -X importtime prints a module after its children, indented one step per level:
    # main's own imports are the level-1 lines since the previous top-level line.
    main_us = 0
    pending: list[tuple[str, float]] = []
    children: list[tuple[str, float]] = []
    for match in line.finditer(trace):
        cumulative, indent, name = int(match[2]), len(match[3]), match[4]
        if indent == 1:
            if name == "main":
                main_us, children = cumulative, pending
            pending = []
        elif indent == 3:
            pending.append((name, cumulative / 1e6))
    heaviest = tuple(sorted(children, key=lambda item: -item[1])[:4])
    return ImportFigures(runs, full - bare, bare, main_us / 1e6, heaviest)


@dataclass(frozen=True, slots=True)
class ColdStartFigures:
    runs: int
    seconds: tuple[float, ...]  # spawn → 200 for the first event
    listening: tuple[float, ...]  # spawn → the port accepts connections
    statuses: tuple[str, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _wait_until_listening(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def _deliver_as_soon_as_listening(
    url: str, headers: dict[str, str], body: bytes, deadline: float
) -> int:
    """POST the event, retrying only while nothing listens (so nothing was delivered)."""
    while True:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def measure_cold_start(stack: Stack, bucket: str, names: Sequence[str]) -> ColdStartFigures:
    """Spawn functions-framework serving main.py, deliver one finalized event, time to the 200."""
    stack.stub.configure(latency=0)
    # FUNCTION_TARGET as Cloud Run sets it: main.py then preloads what uploads need only.
    env = _env_without_pythonpath(
        {**stack.env(), "CAPTION_LOG_FORMAT": "text", "FUNCTION_TARGET": "caption_on_upload"}
    )
    seconds: list[float] = []
    listening: list[float] = []
    statuses: list[str] = []
    for name in names:
        headers, body = binary_event(stack.object_resource(bucket, name))
        port = free_port()
        started = time.monotonic()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                "caption_on_upload",
                "--source",
                str(REPO / "main.py"),
                "--signature-type",
                "cloudevent",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_listening(port, started + 60)
            listening.append(time.monotonic() - started)
            status = _deliver_as_soon_as_listening(
                f"http://127.0.0.1:{port}/", headers, body, started + 60
            )
            seconds.append(time.monotonic() - started)
        finally:
            process.terminate()
            process.wait(timeout=10)
        metadata: dict[str, Any] = stack.object_resource(bucket, name).get("metadata") or {}
        statuses.append(f"{status}/{metadata.get('caption-status', 'none')}")
    return ColdStartFigures(len(names), tuple(seconds), tuple(listening), tuple(statuses))


def write_sample(catalogue: Catalogue, out: Path, max_edge: int = 768) -> Path:
    """The exact bytes prepare sends to Gemini for one 12 MP photo, to look at."""
    source = next(p for p in catalogue.photos if "coffee" in p.path.name)
    path = out / "prepared-sample.jpg"
    path.write_bytes(prepare(source.path.read_bytes(), max_edge=max_edge).data)
    return path

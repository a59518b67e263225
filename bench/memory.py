"""Decode memory: the peak RSS of an instance preparing hostile images.

Each case is prepared in a fresh child process through the decode workers (issue 22:
``PreparePool`` with the ``ProcessDecoder``), and the child reports the peak of the
summed resident size of itself and its workers (sampled every 2 ms), their CPU time
and what prepare said. ``--old REV`` runs the same cases in the child's own process
with ``src/captioner/adapters/images.py`` as it was at a git revision (the design
before the workers: its own ``VmHWM`` is the instance's peak), for a before/after
table; ``--together`` also sends 16 cases at once through the real ``Captioner`` (its
budgets and decode workers; threads and ``images.decode_cost`` for ``--old``), as an
instance with CAPTION_MAX_CONCURRENCY=16 would see them.

    python -m bench.memory [--old REV] [--together]

The images are cached under the temp directory (building them takes ~10 s).
tests/integration/test_image_memory.py runs the same children and asserts the
600 MB target.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "captioner-hostile-images-v3"
# Every case stays under CAPTION_MAX_PIXELS (50,000,000): 7070 x 7070 = 49,984,900.
SIDE = 7070
# A private PNG chunk that makes an object as large as CAPTION_MAX_BYTES allows, so
# the 16-at-once run also holds the worst downloads.
PAD_BYTES = 19 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], bytes]
    # What prepare says: "ok", or the PermanentError reason.
    expected: str


def _cases() -> list[Case]:
    from tests import images as i

    s = SIDE

    def padded(data: bytes) -> bytes:
        # An ancillary chunk before IDAT, which Pillow reads (and copies) at open.
        at = data.index(b"IDAT") - 4
        return data[:at] + i._png_chunk(b"pdDn", bytes(PAD_BYTES)) + data[at:]

    return [
        Case("png-L-1x49M", lambda: i.raw_png(1, 49_000_000), "bad-aspect-ratio"),
        Case("png-L-49Mx1", lambda: i.raw_png(49_000_000, 1), "bad-aspect-ratio"),
        Case("png-RGB-2x24M", lambda: i.raw_png(2, 24_500_000, color_type=2), "bad-aspect-ratio"),
        Case("jpeg-763x65500", lambda: i.big_jpeg((763, 65500)), "bad-aspect-ratio"),
        Case("png-RGBA16-7070", lambda: i.raw_png(s, s, color_type=6, bit_depth=16), "ok"),
        Case("png-RGB-7070", lambda: i.raw_png(s, s, color_type=2), "ok"),
        Case("png-LA-7070", lambda: i.raw_png(s, s, color_type=4), "ok"),
        Case("png-I16-7070", lambda: i.raw_png(s, s, bit_depth=16, pixel=b"\x01\x01"), "ok"),
        Case("png-P-tRNS-7070", lambda: i.palette_png_with_transparency(s, s), "ok"),
        Case("png-1bit-7070", lambda: i.raw_png(s, s, bit_depth=1), "ok"),
        Case("png-RGBA-1000x50000", lambda: i.raw_png(1000, 50000, color_type=6), "ok"),
        Case("png-RGBA-7070-19MiB", lambda: padded(i.raw_png(s, s, color_type=6)), "ok"),
        Case("webp-7000", lambda: i.solid_webp((7000, 7000)), "too-large-to-decode"),
        Case("webp-3900", lambda: i.solid_webp((3900, 3900)), "ok"),
        Case("webp-anim-5000", lambda: i.solid_webp((5000, 5000), frames=2), "too-large-to-decode"),
        Case("webp-anim-3000", lambda: i.solid_webp((3000, 3000), frames=3), "ok"),
        Case("gif-anim-7070", lambda: i.big_gif((s, s)), "ok"),
        Case("jpeg-8000x6000", lambda: i.big_jpeg((8000, 6000)), "ok"),
        Case(
            "jpeg-prog-420-8000x6000",
            lambda: i.big_jpeg((8000, 6000), progressive=True, subsampling=2),
            "ok",
        ),
        Case(
            "jpeg-prog-444-8000x6000",
            lambda: i.big_jpeg((8000, 6000), progressive=True),
            "too-large-to-decode",
        ),
        Case(
            "jpeg-prog-cmyk-8000x6000",
            lambda: i.big_jpeg((8000, 6000), progressive=True, mode="CMYK"),
            "too-large-to-decode",
        ),
        # Issue 22: what the per-format model did not price, or could not stop.
        Case("tiff-64-of-one-16384-tile", i.tiff_declaring_tile, "too-large-to-decode"),
        Case("tiff-64-of-640000-strips", i.tiff_of_strips, "corrupt-image"),
        Case("tiff-rgba16-7000-one-strip", i.tiff_rgba16_one_strip, "too-large-to-decode"),
        Case("avif-64x48-coding-10000", i.avif_declaring, "corrupt-image"),
        Case("avif-64x48-coding-2000", _avif_2000_declaring_64x48, "ok"),
        Case("heic-declaring-1x1", lambda: i.heic_declaring(1, 1), "too-large-to-decode"),
        Case("jpeg-4000-of-15000-scans", lambda: i.jpeg_of_scans(4000, 15000), "decode-timeout"),
    ]


def _avif_2000_declaring_64x48() -> bytes:
    """A declared size that lies by less: its 2000x2000 frame fits the opening allowance."""
    from PIL import Image
    from tests import images as i

    frame = i.encode(Image.new("RGB", (2000, 2000), (9, 99, 199)), "AVIF", quality=0, speed=10)
    return i.with_declared_size(frame, 64, 48)


CASES = {case.name: case for case in _cases()}


def build(names: list[str] | None = None) -> dict[str, Path]:
    """The cases' files, built once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names or list(CASES):
        path = CACHE / name
        if not path.exists():
            partial_path = path.with_suffix(".part")
            partial_path.write_bytes(CASES[name].build())
            partial_path.replace(path)
        paths[name] = path
    return paths


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _images_module(path: str | None) -> Any:
    if path is None:
        import captioner.adapters.images

        return captioner.adapters.images
    spec = importlib.util.spec_from_file_location("captioner_images_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _outcome(run: Callable[[], object]) -> str:
    from captioner.errors import PermanentError

    try:
        run()
    except PermanentError as exc:
        return exc.reason
    return "ok"


def _child_one(path: str, images_path: str | None) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if images_path is not None:  # the design before the workers: this process decodes
        images = _images_module(images_path)
        before = _peak_mb()
        started = time.process_time()
        outcome = _outcome(lambda: images.prepare(data))
        return {
            "outcome": outcome,
            "baseline_mb": round(before, 1),
            "peak_mb": round(_peak_mb(), 1),
            "cpu_s": round(time.process_time() - started, 2),
        }
    from captioner.preparing import PreparePool, ProcessDecoder
    from captioner_dev.proctree import TreeSampler, tree_cpu_seconds, tree_rss_mb

    decoder = ProcessDecoder(max_edge=768, max_pixels=50_000_000)

    def prepared(image: bytes) -> object:
        pool = PreparePool(decoder, decode_budget=256 * 2**20, held_bytes_budget=128 * 2**20)
        return asyncio.run(pool.prepared(image))

    prepared(_TINY_PNG)  # the workers started and warm: part of the baseline
    time.sleep(0.2)
    before = tree_rss_mb()
    started = tree_cpu_seconds()
    with TreeSampler(period=0.002) as tree:
        outcome = _outcome(lambda: prepared(data))
    return {
        "outcome": outcome,
        "baseline_mb": round(before, 1),
        "peak_mb": round(tree.peak_mb, 1),
        "cpu_s": round(tree_cpu_seconds() - started, 2),
    }


# An 8x8 PNG, to start the workers before a measurement.
_TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000008000000080800000000e164e1"
    "570000000c49444154789c6360a00e0000004800012eb83c7e0000000049454e44ae426082"
)


class _FileStorage:
    """Objects are files: each download reads one afresh, as a real download allocates."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._paths = paths
        self.metadata: dict[str, Mapping[str, str]] = {}

    def info(self, name: str) -> Any:
        from captioner.domain import ObjectInfo

        size = self._paths[name].stat().st_size
        metadata = self.metadata.get(name, {})
        return ObjectInfo("bench", name, 1, 1 + len(self.metadata), "image/png", size, metadata)

    async def get_object(self, bucket: str, name: str) -> Any:
        return self.info(name)

    async def download(self, bucket: str, name: str, *, generation: int, max_bytes: int) -> bytes:
        return await asyncio.to_thread(self._paths[name].read_bytes)

    async def patch_metadata(self, bucket: str, name: str, metadata: Any, **_: Any) -> Any:
        self.metadata[name] = dict(metadata)
        return self.info(name)


class _Describer:
    model = "bench"

    async def describe(self, image: Any, spec: Any = None) -> Any:
        from captioner.domain import Description

        await asyncio.sleep(0.05)
        return Description("a picture", self.model)


def _child_together(paths: list[str], images_path: str | None = None) -> dict[str, Any]:
    from captioner.domain import ObjectRef
    from captioner.pipeline import Captioner, PipelineConfig
    from captioner_dev.proctree import TreeSampler

    named = {f"{index}-{Path(path).name}": Path(path) for index, path in enumerate(paths)}
    storage = _FileStorage(named)
    if images_path is not None:
        images = _images_module(images_path)
        # Before the workers: prepare in threads; an old images.py without a cost
        # function has its decodes gated by nothing.
        prepare, decode_cost = images.prepare, getattr(images, "decode_cost", None)
    else:
        from captioner.preparing import ProcessDecoder

        prepare, decode_cost = ProcessDecoder(max_edge=768, max_pixels=50_000_000), None
    captioner = Captioner(
        storage=storage,
        describer=_Describer(),
        prepare=prepare,
        decode_cost=decode_cost,
        config=PipelineConfig(max_bytes=20 * 1024 * 1024, max_concurrency=16),
    )
    before = _peak_mb()
    started = time.process_time()

    async def run() -> list[str]:
        refs = [ObjectRef("bench", name, 1) for name in named]
        results = await asyncio.gather(*(captioner.caption_object(ref) for ref in refs))
        return [result.reason or result.outcome.value for result in results]

    with TreeSampler(period=0.002) as tree:
        outcomes = asyncio.run(run())
    captioner.close()
    return {
        "outcomes": outcomes,
        "baseline_mb": round(before, 1),
        "peak_mb": round(max(tree.peak_mb, _peak_mb()), 1),
        "processes": tree.processes,
        "cpu_s": round(time.process_time() - started, 2),
        "decode_budget_peak_mb": round(captioner.decode_budget.peak / 2**20, 1),
        "held_bytes_peak_mb": round(captioner.held_bytes.peak / 2**20, 1),
    }


def run_child(args: list[str], timeout: float = 120) -> dict[str, Any]:
    """Run this module as a child process with ``args``; its JSON report."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def measure_one(name: str, images_path: str | None = None) -> dict[str, Any]:
    path = build([name])[name]
    return run_child(["one", str(path), *([images_path] if images_path else [])])


def measure_together(names: list[str], images_path: str | None = None) -> dict[str, Any]:
    paths = build(names)
    old = [f"--images={images_path}"] if images_path else []
    return run_child(["together", *old, *(str(paths[name]) for name in names)])


# The 16 costliest images that are accepted, at once: what an instance at
# CAPTION_MAX_CONCURRENCY=16 can be sent.
TOGETHER = [
    "png-RGBA16-7070",
    "png-RGB-7070",
    "png-LA-7070",
    "png-I16-7070",
    "png-P-tRNS-7070",
    "png-1bit-7070",
    "png-RGBA-1000x50000",
    "png-RGBA-7070-19MiB",
    "png-RGBA-7070-19MiB",
    "png-RGBA-7070-19MiB",
    "png-RGBA-7070-19MiB",
    "webp-3900",
    "webp-anim-3000",
    "gif-anim-7070",
    "jpeg-prog-420-8000x6000",
    "jpeg-8000x6000",
]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, *rest = argv[1:]
        if kind == "one":
            report = _child_one(rest[0], rest[1] if len(rest) > 1 else None)
        else:
            old = [arg.split("=", 1)[1] for arg in rest if arg.startswith("--images=")]
            files = [arg for arg in rest if not arg.startswith("--images=")]
            report = _child_together(files, old[0] if old else None)
        print(json.dumps(report))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="git revision whose images.py to compare with")
    parser.add_argument("--together", action="store_true", help="also 16 at once")
    args = parser.parse_args(argv)
    old_path = None
    if args.old:
        source = subprocess.run(
            ["git", "show", f"{args.old}:src/captioner/adapters/images.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        old_file = CACHE / "old_images.py"
        CACHE.mkdir(parents=True, exist_ok=True)
        old_file.write_text(source)
        old_path = str(old_file)
    build()
    print("| Case | File | Before: peak MB, CPU s, outcome | After: peak MB, CPU s, outcome |")
    print("|---|---:|---|---|")
    for name in CASES:
        size = (CACHE / name).stat().st_size
        after = measure_one(name)
        before = "-"
        if old_path:
            try:
                earlier = measure_one(name, old_path)
                before = f"{earlier['peak_mb']:.0f}, {earlier['cpu_s']:.2f}, {earlier['outcome']}"
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                before = f"failed: {str(exc)[:60]}"
        now = f"{after['peak_mb']:.0f}, {after['cpu_s']:.2f}, {after['outcome']}"
        print(f"| {name} | {size / 1024:,.0f} KiB | {before} | {now} |", flush=True)
    if args.together:
        print(f"\n16 at once through Captioner, now: {json.dumps(measure_together(TOGETHER))}")
        if old_path:
            try:
                before_report = json.dumps(measure_together(TOGETHER, old_path))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                before_report = f"failed: {str(exc)[:200]}"
            print(f"16 at once through Captioner, before: {before_report}")


if __name__ == "__main__":
    main()

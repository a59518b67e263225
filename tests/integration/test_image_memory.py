"""Decode memory: no image under the limits takes the instance past 600 MB.

The deployed instance has 1 GiB. Each hostile image (small on disk, under
CAPTION_MAX_PIXELS, costly to decode) is prepared in a fresh child process through
its decode workers, and the child reports the peak of the summed resident size of
itself and its workers; then 16 of the costliest accepted ones go at once through
the real Captioner, its budgets and its decode workers, as an instance at
CAPTION_MAX_CONCURRENCY=16 would receive them. The children are bench/memory.py's
(``python -m bench.memory --old <rev>`` prints the before/after table).
"""

from __future__ import annotations

import pytest
from bench import memory

# The target for the whole instance: the function's process and its decode workers.
PEAK_MB = 600
# One decode: the child and its two idle workers (~80 MB; ~100 MB holding a 19 MiB
# file), the largest allowance one image gets (256 MiB = 268 MB, held to it by its
# worker's RLIMIT_AS) and the address space a worker may keep between tasks (24 MiB).
ONE_PEAK_MB = 400
# Refused from the header, before anything is decoded.
HEADER_REFUSALS = {"bad-aspect-ratio", "too-many-pixels", "too-large-to-decode"}


@pytest.mark.parametrize("name", list(memory.CASES))
def test_hostile_image_is_refused_or_prepared_within_one_decode_budget(name: str) -> None:
    report = memory.measure_one(name)
    assert report["outcome"] == memory.CASES[name].expected, report
    assert report["peak_mb"] < ONE_PEAK_MB, report
    if report["outcome"] in HEADER_REFUSALS:
        # Nothing was decoded.
        assert report["peak_mb"] - report["baseline_mb"] < 30, report
        assert report["cpu_s"] < 0.2, report


def test_sixteen_costliest_images_at_once_through_the_captioner_stay_under_600_mb() -> None:
    report = memory.measure_together(memory.TOGETHER)
    assert report["outcomes"] == ["ok"] * len(memory.TOGETHER), report
    assert report["peak_mb"] < PEAK_MB, report
    assert report["processes"] >= 2, report  # decoded in workers
    assert report["decode_budget_peak_mb"] <= 256, report
    assert report["held_bytes_peak_mb"] <= 128, report

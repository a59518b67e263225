"""`captioner export --html` makes a page a browser shows: thumbnails, captions, names.

Headless Chromium (Debian's `chromium` package; .ci/run installs it) renders the
page to a screenshot. Without Chromium the test is skipped locally and fails in CI
(CAPTIONER_REQUIRE_CHROMIUM=1), so a missing browser never passes silently there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captioner_dev.functions import REPO
from captioner_dev.proctree import TreeSampler
from tests import images
from tests.e2e.test_cli import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CAPTIONER_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def screenshot(chromium: str, page: Path, out: Path) -> Image.Image:
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=900,700",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Image.open(out).convert("RGB")


def colours(picture: Image.Image) -> int:
    return len(picture.getcolors(maxcolors=1 << 20) or [])


def test_exported_page_renders_thumbnails_with_their_captions(
    chromium: str, stack_env: dict[str, str], gemini: Any, bucket: Any, tmp_path: Path
) -> None:
    for name in ("chelsea.jpg", "coffee.jpg", "<b>bold</b>.jpg"):
        source = "rocket.jpg" if name.startswith("<") else name
        bucket.blob(f"page/{name}").upload_from_string(
            images.photo(source), content_type="image/jpeg"
        )
    target = f"gs://{bucket.name}/page/"
    assert run_cli(stack_env, "backfill", target).returncode == 0
    page = tmp_path / "page.html"
    exported = run_cli(
        stack_env, "export", target, "-o", str(tmp_path / "x.jsonl"), "--html", str(page)
    )
    assert exported.returncode == 0, exported.stderr

    html = page.read_text()
    # Escaped, with line breaks allowed between the name's parts (<wbr>).
    assert "&lt;b&gt;bold&lt;/b&gt;.jpg" in html.replace("<wbr>", "")
    assert "<b>bold</b>" not in html  # an object name never becomes markup
    shot = screenshot(chromium, page, tmp_path / "page.png")
    # The same page with every thumbnail taken out: text and boxes only.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:[^"]+"', 'src=""', html))
    control = screenshot(chromium, bare, tmp_path / "bare.png")

    assert shot.size == (900, 700)
    # Three photos drawn at 240 px carry tens of thousands of colours; text on a flat
    # background a few hundred (anti-aliasing).
    assert colours(shot) > 10 * colours(control)
    assert colours(shot) > 5000


def test_thumbnails_of_eight_large_pngs_are_made_within_the_decode_budget(
    stack_env: dict[str, str], bucket: Any, tmp_path: Path
) -> None:
    # Each a 7070x7070 RGBA PNG: ~200 MB decoded. Thumbnails skipped the decode budget,
    # so eight at once took the command to 1,258 MiB (issue 22); now they are made in
    # the decode workers, within the same budget as captions.
    data = images.raw_png(7070, 7070, color_type=6)
    for i in range(8):
        bucket.blob(f"big/{i}.png").upload_from_string(data, content_type="image/png")
    page = tmp_path / "page.html"
    command = [sys.executable, "-m", "captioner", "export", f"gs://{bucket.name}/big/"]
    command += ["-o", str(tmp_path / "x.jsonl"), "--html", str(page)]
    env = {**os.environ, **stack_env, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeSampler(process.pid, period=0.01) as command_and_workers:
        _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "exported 8 images" in stderr
    assert page.read_text().count('<img src="data:image/jpeg;base64,') == 8
    assert command_and_workers.peak_mb < 600
    assert command_and_workers.processes >= 2  # the command and at least one worker

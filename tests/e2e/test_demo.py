"""`make demo` as a new user runs it, from the repository alone: the whole local
stack, the sample photos shipped in src/captioner_dev/photos, captions read back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from captioner_dev import PHOTOS
from captioner_dev.functions import REPO


def demo(photos: Path, tmp: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if "API_KEY" not in k}
    return subprocess.Popen(
        [sys.executable, "-m", "captioner_dev.demo", "--photos", str(photos)],
        cwd=REPO,
        # Unbuffered, so that each line arrives as it is printed and the interrupt
        # lands while the stack runs, not after it has finished.
        env={**env, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches
        # With SIGINT as a terminal leaves it. A test run started in the background by a
        # shell without job control (`(make test &)`) inherits SIGINT ignored, Python then
        # keeps it ignored, and the Ctrl-C would reach only fake-gcs-server (which
        # listens for it): the demo then fails on a dead stack, as it would for a user.
        preexec_fn=_sigint_as_a_terminal_leaves_it,
    )


def _sigint_as_a_terminal_leaves_it() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def two_photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, folder)
    return folder


def test_demo_captions_the_sample_photos_and_says_what_to_try_next(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with demo(two_photos(tmp_path), scratch) as process:
        stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert stdout.count("caption-status: ok") == 2
    assert "kept owner key uploaded-by=demo" in stdout
    assert "What next:" in stdout
    assert not list(scratch.glob("*.log"))  # the stack's logs are removed


def test_ctrl_c_in_the_demo_exits_130_without_a_traceback_or_leftovers(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with demo(two_photos(tmp_path), scratch) as process:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # interrupt once the stack is up
            line = process.stdout.readline()
            if line.startswith("uploaded") or not line:
                break
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert not list(scratch.glob("*.log"))

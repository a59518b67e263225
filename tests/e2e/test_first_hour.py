"""A newcomer's first hour, scripted: the README's own commands in its order, from the
demo and the local stack (`make stack`) through the installed command on a bucket, and
the mistakes a new user makes on the way. Each step checks what is printed and the exit
code, and no step may show a traceback."""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from captioner_dev.functions import REPO
from captioner_dev.gcs import free_port
from tests import images

pytestmark = pytest.mark.slow

CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("GOOGLE_", "GEMINI_", "CAPTION_", "STORAGE_")) and k != "PYTHONPATH"
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`make stack`: the module it runs, in the foreground, on free ports; the variables
    it tells the user to export, read from what it prints."""
    gcs_port, gemini_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "captioner_dev.stack",
         "--gcs-port", str(gcs_port), "--gemini-port", str(gemini_port)],
        cwd=REPO,
        env={**CLEAN, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    printed = ""
    deadline = time.monotonic() + 60
    while "Then try:" not in printed:
        assert time.monotonic() < deadline, printed
        line = process.stdout.readline()
        assert line, f"make stack ended: {printed}{process.stderr.read() if process.stderr else ''}"
        printed += line
    exported = dict(re.findall(r"^  export (\w+)=(\S+)$", printed, re.M))
    assert set(exported) == {"STORAGE_EMULATOR_HOST", "GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"}
    assert exported["STORAGE_EMULATOR_HOST"] == f"http://127.0.0.1:{gcs_port}"
    assert "gs://my-photos/ with 7 photos" in printed
    vertex = re.search(r"GOOGLE_APPLICATION_CREDENTIALS=(\S+)", printed)
    assert vertex is not None
    exported["_KEY_FILE"] = vertex.group(1)
    try:
        yield exported
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0
        assert "nothing is left running" in stderr


def run(
    command: Path, env: dict[str, str], *args: str, home: Path
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(command), *args],
        env={**CLEAN, "HOME": str(home), "NO_GCE_CHECK": "True", **env},
        cwd=home, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_the_readme_path_from_the_local_stack_to_a_bucket_of_your_own(
    stack: dict[str, str],
    installed: Path,
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    pictures = home / "Pictures" / "some-folder"
    pictures.mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(images.PHOTOS / name, pictures)
    env = {k: v for k, v in stack.items() if not k.startswith("_")}
    no_key = {k: v for k, v in env.items() if k != "GEMINI_API_KEY"}
    captioner = installed  # step 2 of "Your own photos": the installed command

    described = run(captioner, env, "describe", str(pictures), home=home)
    assert described.returncode == 0, described.stderr
    assert described.stdout.count("Offline stand-in caption") == 2

    dry = run(captioner, no_key, "backfill", "gs://my-photos/", "--dry-run", home=home)
    assert dry.returncode == 0, dry.stderr  # a dry run needs no Gemini key
    assert "would caption 7" in dry.stderr

    done = run(captioner, env, "backfill", "gs://my-photos/", home=home)
    assert done.returncode == 0, done.stderr
    assert "done 7" in done.stderr
    again = run(captioner, env, "backfill", "gs://my-photos/", home=home)
    assert "skipped 7 (7 already-captioned)" in again.stderr

    shown = run(captioner, no_key, "show", "gs://my-photos/photos/chelsea.jpg", home=home)
    assert shown.returncode == 0
    assert "status:  ok" in shown.stdout
    exported = run(captioner, no_key, "export", "gs://my-photos/", "-o", "c.jsonl",
                   "--html", "c.html", home=home)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == ""  # the rows went to the file, not the terminal
    assert (home / "c.jsonl").read_text().count("\n") == 7
    assert (home / "c.html").read_text().count("<figure>") == 7

    # Vertex AI mode with the key file the stack printed: a batch round trip.
    vertex = {**no_key, "GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "local",
              "GOOGLE_CLOUD_LOCATION": "us-central1",
              "GOOGLE_APPLICATION_CREDENTIALS": stack["_KEY_FILE"]}  # fmt: skip
    batch = run(captioner, vertex, "batch", "submit", "gs://my-photos/", "--overwrite", home=home)
    assert batch.returncode == 0, batch.stderr
    assert "submitted 7 images in 1 jobs" in batch.stderr


def test_the_mistakes_of_a_first_hour_each_get_one_line(
    stack: dict[str, str],
    installed: Path,
    tmp_path: Path,
) -> None:
    home = tmp_path
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(images.photo("chelsea.jpg"))
    env = {k: v for k, v in stack.items() if not k.startswith("_")}
    cases = [
        # Vertex AI mode (what the no-key message recommends) without credentials.
        ({"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "p"},
         ["describe", str(photo)], "no Google credentials"),
        ({"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "p",
          "STORAGE_EMULATOR_HOST": env["STORAGE_EMULATOR_HOST"]},
         ["backfill", "gs://my-photos/", "--overwrite"], "no Google credentials"),
        ({"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "p"},
         ["batch", "submit", "--dry-run", "gs://my-photos/"], "no Google credentials"),
        ({}, ["batch", "status", "gs://my-photos/"], "batch jobs need Vertex AI"),
        ({"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{free_port()}"},
         ["describe", str(photo)], "cannot reach Gemini at 127.0.0.1"),
        ({"STORAGE_EMULATOR_HOST": env["STORAGE_EMULATOR_HOST"]},
         ["show", "gs://no-such-bucket/x.jpg"], "no such bucket: gs://no-such-bucket/"),
        ({"STORAGE_EMULATOR_HOST": env["STORAGE_EMULATOR_HOST"]},
         ["show", "gs://my-photos/photos/"], "captioner export gs://my-photos/photos/"),
        ({"STORAGE_EMULATOR_HOST": env["STORAGE_EMULATOR_HOST"], "GEMINI_API_KEY": "k"},
         ["backfill", "gs://no-such-bucket/"], "no such bucket: gs://no-such-bucket/"),
        ({}, ["describe", "--bogus", str(photo)], "usage: captioner describe"),
    ]  # fmt: skip
    for extra, args, message in cases:
        done = run(installed, extra, *args, home=home)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr, done.stderr
        # A line, not a dump; a usage error also shows the command's usage, wrapped.
        assert len(lines) <= (10 if "usage:" in message else 4), done.stderr
    bare = run(installed, {}, home=home)
    assert bare.returncode == 0
    assert "captioner COMMAND --help" in bare.stdout
    helped = run(installed, {}, "backfill", "--help", home=home)
    assert "examples:" in helped.stdout
    assert "exit codes:" in helped.stdout
    assert "--dry-run" in helped.stdout
    assert "STORAGE_EMULATOR_HOST" in helped.stdout


def test_describe_dash_at_a_terminal_says_it_reads_standard_input(
    installed: Path,
    tmp_path: Path,
) -> None:
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [str(installed), "describe", "-"],
            env={**CLEAN, "GEMINI_API_KEY": "k", "HOME": str(tmp_path)},
            stdin=secondary, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(primary)
        os.close(secondary)
    assert done.returncode == 2
    assert "reads one image from standard input" in done.stderr
    assert "captioner describe - < photo.jpg" in done.stderr


def test_make_with_an_old_python_says_which_it_needs_and_installs_nothing(
    tmp_path: Path,
) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "requirements.txt", "requirements-stack.txt"):
        shutil.copy(REPO / name, clone)
    old = tmp_path / "python3.10"
    old.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version) echo "Python 3.10.14";; '
        '-c) case "$2" in *version_info\\ \\<*) exit 1;; *) echo 3.10.14;; esac;; esac\n'
    )
    old.chmod(0o755)
    done = subprocess.run(
        ["make", "demo", f"PYTHON={old}"], cwd=clone, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "captioner needs Python 3.11 or newer; " in done.stderr
    assert "Python 3.10.14" in done.stderr
    assert not (clone / ".venv").exists()
    # A .venv left by another Python is rebuilt, not reused.
    (clone / ".venv").mkdir()
    (clone / ".venv" / "pyvenv.cfg").write_text("home = /x\nversion = 3.10.14\n")
    (clone / ".venv" / ".stack-installed").touch()
    listed = subprocess.run(
        ["make", "-n", "demo"], cwd=clone, capture_output=True, text=True, timeout=60
    )
    assert "was made by Python 3.10.14" in listed.stdout
    assert "-m venv .venv" in listed.stdout


def test_make_stack_says_when_its_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "captioner_dev.stack", "--gcs-port", str(port)],
            cwd=REPO, env={**CLEAN, "PYTHONPATH": str(REPO / "src")},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} is in use" in done.stderr

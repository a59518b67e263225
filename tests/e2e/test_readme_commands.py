"""Every shell command README.md shows is run here against the local stack, or is
named below as needing a real Google Cloud project, so the README cannot go stale.

The commands run as written, through bash, in a scratch directory that holds the
files they name (`cat.jpg`, `photos/`, `~/Pictures/trip/`…). Only what cannot exist
here is stood in for:

- `captioner` on PATH runs this checkout (tests/e2e/test_install.py installs it for real);
- `terraform output -raw http_function_url` prints the local `caption_http` address and
  `gcloud auth print-identity-token` a dummy token (the local function checks none);
- `https://example.com/dog.png` is a photo on a local web server, and `BUCKET` and
  `my-photos` are buckets on fake-gcs-server.

A new command in the README fails `test_every_readme_command_is_run_or_named_cloud_only`
until it is run here or listed in CLOUD_ONLY.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captioner_dev.functions import REPO, FunctionServer
from tests import images
from tests.webserver import ImageSite

README = REPO / "README.md"
# Commands that need a real project, real credentials or a terminal; the deployment
# itself is checked by tests/terraform.
CLOUD_ONLY = (
    "cd terraform",
    "cp terraform.tfvars.example terraform.tfvars",
    "terraform init",
    "terraform apply",
    "terraform destroy",
    'BUCKET="$(terraform output',
    "gcloud storage cp",
    "gcloud storage objects describe",
    "gcloud functions logs read",
    "read -rs GEMINI_API_KEY",
    "printf '%s' \"$GEMINI_API_KEY\"",
    "unset GEMINI_API_KEY",
    "gcloud auth application-default login",
    # Vertex AI batch jobs: tests/e2e/test_batch_backfill.py runs these against the
    # stand-in's batch emulator (this sandbox uses an API key, which has no batch mode).
    "captioner batch submit gs://",
    "captioner batch status",
    "captioner batch apply",
    "captioner batch cancel",  # tests/e2e/test_batch_apply_safety.py
    "captioner batch prune",
)
# Run by other tests: the installed command, the demo, and the test suite itself.
RUN_ELSEWHERE = {
    "pipx install .": "tests/e2e/test_install.py (pip install into a fresh venv)",
    "make demo": "tests/e2e/test_demo.py (the module `make demo` runs)",
    "make test": ".ci/run",
    "make stack": "tests/e2e/test_first_hour.py (the module `make stack` runs)",
    # A server until Ctrl-C: driven in headless Chromium there.
    "captioner review gs://my-photos/2019/": "tests/e2e/test_review_page.py",
}
BUCKETS = ("my-photos", "bucket")


def readme_blocks() -> list[list[str]]:
    """The commands of each ```sh block, continuation lines joined, comments dropped."""
    blocks: list[list[str]] = []
    fence: str | None = None
    pending = ""
    for raw in README.read_text().splitlines():
        line = raw.strip()  # fences inside a numbered list are indented
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            if fence == "sh":
                blocks.append([])
            continue
        if fence != "sh":
            continue
        text = line.split("  #", 1)[0].rstrip()
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        blocks[-1].append((pending + text.strip()).strip())
        pending = ""
    return blocks


def readme_commands() -> list[str]:
    return [command for block in readme_blocks() for command in block]


def runnable(command: str) -> bool:
    return not command.startswith(CLOUD_ONLY) and command not in RUN_ELSEWHERE


def shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def buckets(gcs_client: Any) -> list[Any]:
    made = []
    for name in BUCKETS:
        bucket = gcs_client.lookup_bucket(name) or gcs_client.create_bucket(name)
        for object_name, photo in (
            ("2019/cat #1.jpg", "chelsea.jpg"),
            ("2019/b.jpg", "coffee.jpg"),
            ("photo.jpg", "rocket.jpg"),
        ):
            bucket.blob(object_name).upload_from_string(
                images.photo(photo), content_type="image/jpeg"
            )
        made.append(bucket)
    return made


@pytest.fixture(scope="module")
def function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_ALLOWED_BUCKETS": ",".join(BUCKETS),
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


@pytest.fixture
def sandbox(
    tmp_path: Path,
    stack_env: dict[str, str],
    site: ImageSite,
    function: FunctionServer,
    buckets: list[Any],
) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "home"
    for folder in ("trip", "some-folder"):
        (home / "Pictures" / folder).mkdir(parents=True)
        for name in ("chelsea.jpg", "coffee.jpg"):
            shutil.copy(images.PHOTOS / name, home / "Pictures" / folder / name)
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    shutil.copy(images.PHOTOS / "rocket.jpg", work / "photos")
    for name, photo in (
        ("cat.jpg", "chelsea.jpg"),
        ("shoe.jpg", "camera.jpg"),
        ("photo.jpg", "coffee.jpg"),
    ):
        shutil.copy(images.PHOTOS / photo, work / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(
        bin_dir,
        "captioner",
        f'PYTHONPATH="{REPO / "src"}" exec "{sys.executable}" -m captioner "$@"\n',
    )
    shim(
        bin_dir,
        "terraform",
        'case "$*" in *"output -raw http_function_url") '
        f'echo "{function.url}";; *) echo "not here: terraform $*" >&2; exit 99;; esac\n',
    )
    shim(
        bin_dir,
        "gcloud",
        'case "$*" in "auth print-identity-token") echo local-token;; '
        '*) echo "not here: gcloud $*" >&2; exit 99;; esac\n',
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        **stack_env,
        "HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CAPTION_URL_ALLOWED_HOSTS": f"127.0.0.1:{site.port}",
        "CAPTION_LOG_FORMAT": "json",
    }
    return work, env


def local(command: str, site: ImageSite) -> str:
    return command.replace("https://example.com/dog.png", site.url("/photos/rocket.jpg")).replace(
        "BUCKET", "bucket"
    )


def test_every_readme_command_is_run_or_named_cloud_only() -> None:
    commands = readme_commands()
    assert len(commands) > 20  # the extraction sees the README's blocks
    run_here = [c for c in commands if runnable(c)]
    for command in run_here:
        assert command.startswith(("captioner ", "cat ", "curl ", "URL=")), (
            f"README command neither run by tests/e2e/test_readme_commands.py nor listed "
            f"as cloud-only: {command!r}"
        )
    makefile = (REPO / "Makefile").read_text()
    assert "-m captioner_dev.demo" in makefile  # what `make demo` runs, tested elsewhere


def runnable_blocks() -> list[str]:
    """Blocks whose every command runs here, each as one bash script (variables set in
    one line are used in the next, as a user pasting the block would)."""
    return [
        "\n".join(c for c in block if runnable(c))
        for block in readme_blocks()
        if any(map(runnable, block))
    ]


def test_no_block_mixes_commands_run_here_with_cloud_only_ones() -> None:
    for block in readme_blocks():
        cloud = [c for c in block if c.startswith(CLOUD_ONLY)]
        assert not cloud or not any(map(runnable, block)), block


@pytest.mark.parametrize("script", runnable_blocks(), ids=lambda c: c.split("\n")[0][:50])
def test_readme_block_runs_against_the_local_stack(
    script: str,
    sandbox: tuple[Path, dict[str, str]],
    site: ImageSite,
    gemini: Any,
) -> None:
    work, env = sandbox
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", local(script, site)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, (script, completed.stdout, completed.stderr)
    assert completed.stdout.strip(), completed.stderr
    for written in ("captions.ndjson", "captions.jsonl", "captions.csv", "captions.html"):
        if written in script:
            assert (work / written).stat().st_size > 0, written
    if "curl" in script:
        assert '"status"' in completed.stdout or '"would-caption"' in completed.stdout

"""storage-testbench, Google's Cloud Storage emulator, as a real process for these tests.

It runs from .venv-testbench (tests/testbench/install.sh, which ``make test`` calls)
and comes from ../shared/vendor; where either is absent the tests skip, except under
CAPTIONER_REQUIRE_TESTBENCH=1 (CI with ../shared), where a missing emulator fails.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captioner_dev.gcs import free_port
from captioner_dev.process import LoggedProcess

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / ".." / "shared" / "vendor"
GUNICORN = REPO / ".venv-testbench" / "bin" / "gunicorn"


class StorageTestbench(LoggedProcess):
    """storage-testbench over HTTP on 127.0.0.1, served as its testbench_run.py serves it
    (gunicorn, sync workers, 10 threads), without its --reload file watcher."""

    def __init__(self) -> None:
        super().__init__("storage-testbench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> StorageTestbench:
        self._spawn(
            [
                str(GUNICORN),
                f"--bind=127.0.0.1:{self.port}",
                "--worker-class=sync",
                "--threads=10",
                "testbench:run()",
            ],
            cwd=GUNICORN.parents[2],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise RuntimeError(f"storage-testbench exited: {self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=1) as response:
                    if response.read() == b"OK":
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"storage-testbench was not ready within {timeout:g}s")


@pytest.fixture(scope="session")
def testbench() -> Iterator[StorageTestbench]:
    missing = None
    if not VENDOR.is_dir():
        missing = f"{VENDOR} is absent (storage-testbench comes from there)"
    elif not GUNICORN.exists():
        missing = "no .venv-testbench: run `bash tests/testbench/install.sh` (make test does)"
    if missing is not None:
        if os.environ.get("CAPTIONER_REQUIRE_TESTBENCH") and VENDOR.is_dir():
            pytest.fail(missing)
        pytest.skip(missing)
    with StorageTestbench() as server:
        yield server


@pytest.fixture(scope="session")
def testbench_client(testbench: StorageTestbench) -> Any:
    """google-cloud-storage pointed at the testbench, to set up and inspect objects."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": testbench.url},
    )


@pytest.fixture
def testbench_bucket(testbench_client: Any) -> Any:
    return testbench_client.create_bucket(f"tb-{uuid.uuid4().hex[:12]}")


def retry_test(testbench: StorageTestbench, instructions: dict[str, list[str]]) -> str:
    """A Retry Test resource (``POST /retry_test``); its id goes in ``x-retry-test-id``."""
    import requests

    answer = requests.post(
        f"{testbench.url}/retry_test",
        json={"instructions": instructions, "transport": "HTTP"},
        timeout=10,
    )
    answer.raise_for_status()
    test_id: str = answer.json()["id"]
    return test_id


def retry_test_completed(testbench: StorageTestbench, test_id: str) -> bool:
    """Whether the testbench served every instruction of the Retry Test."""
    import requests

    answer = requests.get(f"{testbench.url}/retry_test/{test_id}", timeout=10)
    answer.raise_for_status()
    return bool(answer.json()["completed"])

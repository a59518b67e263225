"""Serve ``main.py`` with functions-framework in a child process, as Cloud Run would."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from captioner_dev.gcs import free_port
from captioner_dev.process import LoggedProcess
from captioner_dev.proctree import descendants, status_kib

REPO = Path(__file__).resolve().parents[2]


class FunctionServer(LoggedProcess):
    """``functions-framework --target TARGET --source main.py`` on 127.0.0.1."""

    def __init__(
        self,
        target: str,
        *,
        env: Mapping[str, str],
        signature_type: str = "http",
        port: int | None = None,
    ) -> None:
        super().__init__(f"ff-{target}-")
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = dict(env)
        self._signature_type = signature_type
        self.started_at = 0.0

    def start(self, timeout: float = 30.0) -> FunctionServer:
        env = {**os.environ, **self._env}
        env.pop("PYTHONPATH", None)  # main.py must find src/ by itself, as when deployed
        # Set by Cloud Run for every function ("Reserved environment variables for
        # functions" in its environment-variables docs); main.py reads it.
        env["FUNCTION_TARGET"] = self.target
        self.started_at = time.monotonic()
        self._spawn(
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
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
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

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("not running")
        return self._process.pid

    def peak_rss_mib(self) -> float:
        """Peak resident memory so far (VmHWM) of the busiest process of the server, in MiB.

        functions-framework runs gunicorn: the function lives in a worker process,
        a child of the one we started.
        """
        # A process of the tree may end between listing and reading it (a decode worker
        # retiring after a large image): it reads as 0, never as an error.
        pids = [self.pid, *descendants(self.pid)]
        return max(status_kib(pid, "VmHWM") for pid in pids) / 1024

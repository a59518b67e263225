"""A child process of the local stack, with its output kept in a temporary log file."""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self


class LoggedProcess:
    """Starts with ``_spawn``; ``stop`` ends it and removes its log. Subclasses add ``start``."""

    def __init__(self, log_prefix: str) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._log_prefix = log_prefix
        # Made when the child starts, not here: an object made but never started (Ctrl-C
        # between the two) must leave no file behind.
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def _spawn(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        if self._log_path is None:
            # The name is chosen and kept before the file exists, so that stop() removes
            # it even when a Ctrl-C lands while it is being made (a NamedTemporaryFile
            # interrupted after creating its file, before returning, left it behind).
            self._log_path = Path(tempfile.gettempdir()) / (
                f"{self._log_prefix}{secrets.token_hex(6)}.log"
            )
            self._log = self._log_path.open("xb")
        self._process = subprocess.Popen(
            list(args), cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self._process

    def exited(self) -> bool:
        return self._process is None or self._process.poll() is not None

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self._process is not None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
                self._process = None
        finally:
            # Even when a Ctrl-C lands while the child is being stopped.
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._log_path is not None:
                self._log_path.unlink(missing_ok=True)
                self._log_path = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            # Ctrl-C or a failure while waiting for readiness: __exit__ will not run,
            # so end the child and remove its log here.
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

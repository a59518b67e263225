"""`captioner review` as users start it, in its own process, for the tests to talk to."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO
from urllib.parse import parse_qs, urlsplit

from captioner_dev.functions import REPO


@dataclass
class Review:
    url: str  # as printed, with the token
    process: subprocess.Popen[str]

    @property
    def base(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.url).query)["token"][0]

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port


@contextmanager
def review(
    env: dict[str, str], target: str, *flags: str, timeout: float = 30, browser: bool = False
) -> Iterator[Review]:
    """Start ``captioner review target --no-browser`` (``browser``: without it) and wait
    for the URL it prints."""
    opens = [] if browser else ["--no-browser"]
    process = subprocess.Popen(
        [sys.executable, "-m", "captioner", "review", target, *opens, *flags],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)  # ended: the server stopped

    assert process.stdout is not None
    threading.Thread(target=read, args=(process.stdout,), daemon=True).start()
    try:
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            first = None
        if first is None or not first.startswith("captioner review: "):
            process.kill()
            _, errors = process.communicate()
            raise AssertionError(f"no URL printed ({first!r}): {errors}")
        yield Review(first.split(": ", 1)[1].strip(), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""The local stack for the benchmark: fake-gcs-server and the Gemini stand-in, each its own process.

Both run outside the process being measured, so neither their memory nor their
GIL counts against it; they do share the machine's two cores with it, as the
real services would not (see RESULTS.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from bench.data import REPO, Planned
from captioner_dev.gcs import FakeGcs
from captioner_dev.process import LoggedProcess

API_KEY = "bench-offline"


def _http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class StubProcess(LoggedProcess):
    """``python -m captioner_dev.gemini_server --port 0`` and its ``/_stub/*`` controls."""

    def __init__(self) -> None:
        super().__init__("gemini-stand-in-")
        self.base_url = ""

    def start(self, timeout: float = 30.0) -> Self:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self._spawn(
            [sys.executable, "-m", "captioner_dev.gemini_server", "--port", "0"], env=env, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if line.startswith("READY "):
                    self.base_url = line.split(maxsplit=1)[1].strip()
                    return self
            if self.exited():
                break
            time.sleep(0.05)
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"the Gemini stand-in did not start:\n{log[-2000:]}")

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def configure(
        self,
        *,
        latency: Any,
        quota_rps: float | None = None,
        quota_shape: str = "bucket",
        quota_tpm: float | None = None,
    ) -> None:
        """Clear the request log, then set the latency (a LatencyModel dict or seconds) and
        the quota (captioner_dev/gemini_server/quota.py: requests a second for the request
        shapes, input tokens a minute for ``tpm`` and ``vertex``), started afresh."""
        _http_json("POST", f"{self.base_url}/_stub/reset", {})
        config = {
            "latency": latency,
            "quota_rps": quota_rps,
            "quota_shape": quota_shape,
            "quota_tpm": quota_tpm,
        }
        _http_json("POST", f"{self.base_url}/_stub/config", config)

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = _http_json("GET", f"{self.base_url}/_stub/requests")
        return sorted(records, key=lambda record: int(record["seq"]))


@dataclass(slots=True)
class Stack:
    gcs: FakeGcs
    stub: StubProcess

    def env(self) -> dict[str, str]:
        """What a process under test needs to find the stack."""
        return {
            "STORAGE_EMULATOR_HOST": self.gcs.url,
            "GOOGLE_GEMINI_BASE_URL": self.stub.base_url,
            "GEMINI_API_KEY": API_KEY,
        }

    def pids(self) -> dict[str, int]:
        """The stack's process ids, so that runs can report the stack's CPU apart."""
        pids = {}
        for name, process in (("fake-gcs", self.gcs._process), ("stand-in", self.stub.process)):
            if process is not None:
                pids[name] = process.pid
        return pids

    def create_bucket(self, bucket: str) -> None:
        _http_json("POST", f"{self.gcs.url}/storage/v1/b", {"name": bucket})

    def upload(self, bucket: str, planned: Sequence[Planned], concurrency: int = 8) -> None:
        asyncio.run(_upload(self.gcs.url, bucket, planned, concurrency))

    def object_resource(self, bucket: str, name: str) -> dict[str, Any]:
        url = f"{self.gcs.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
        resource: dict[str, Any] = _http_json("GET", url)
        return resource


async def _upload(gcs_url: str, bucket: str, planned: Sequence[Planned], concurrency: int) -> None:
    cache: dict[Path, bytes] = {}
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for item in planned:
        queue.put_nowait(item)
        if item.source.path not in cache:
            cache[item.source.path] = item.source.path.read_bytes()

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            item = queue.get_nowait()
            url = f"{gcs_url}/upload/storage/v1/b/{bucket}/o"
            params = {"uploadType": "media", "name": item.name}
            async with session.post(
                url,
                params=params,
                data=cache[item.source.path],
                headers={"Content-Type": item.source.content_type},
            ) as response:
                if response.status >= 300:
                    raise RuntimeError(f"upload of {item.name}: {response.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))

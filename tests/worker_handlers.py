"""A handler for captioner.workers' tests, run inside the worker processes: it does
what the test asks (echo, allocate, spin, sleep, crash) so the limits can be seen."""

from __future__ import annotations

import os
import time
from typing import Any


def handle(request: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    op = request["op"]
    if op == "echo":
        return {"status": "ok", "pid": os.getpid()}, data
    if op == "allocate":  # touched, so it is resident, not only mapped
        block = bytearray(int(request["bytes"]))
        block[:: 1 << 12] = b"x" * len(range(0, len(block), 1 << 12))
        return {"status": "ok", "pid": os.getpid()}, b""
    if op == "spin":  # CPU for ``seconds`` (forever if absent)
        until = time.process_time() + float(request.get("seconds", 1e9))
        while time.process_time() < until:
            pass
        return {"status": "ok", "pid": os.getpid()}, b""
    if op == "sleep":
        time.sleep(float(request["seconds"]))
        return {"status": "ok"}, b""
    if op == "crash":
        os.abort()
    raise ValueError(f"no such op {op!r}")

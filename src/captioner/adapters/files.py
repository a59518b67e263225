"""Local files and standard input, read with the same size cap as downloads (CLI only)."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from captioner.errors import PermanentError

# `captioner describe -` reads one image from standard input.
STDIN = "-"


async def read_local(source: str, max_bytes: int) -> bytes:
    """The bytes of a local file (or of standard input for ``-``), at most ``max_bytes``."""
    if source != STDIN:
        return await asyncio.to_thread(_read, source, max_bytes)
    # Standard input may never end (a pipe left open): read it in a daemon thread, which
    # Ctrl-C and the interpreter's exit do not wait for, unlike the default executor's.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()

    def read() -> None:
        try:
            data = _read(source, max_bytes)
        except BaseException as exc:  # handed to the loop, raised there
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, data, None)

    threading.Thread(target=read, name="captioner-stdin", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[bytes], data: bytes | None, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile (Ctrl-C)
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert data is not None
        future.set_result(data)


def _read(source: str, max_bytes: int) -> bytes:
    try:
        if source == STDIN:
            data = sys.stdin.buffer.read(max_bytes + 1)
        else:
            with Path(source).open("rb") as handle:
                data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise PermanentError("unreadable", f"cannot read {source}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise PermanentError("too-large", f"over CAPTION_MAX_BYTES={max_bytes} bytes")
    return data

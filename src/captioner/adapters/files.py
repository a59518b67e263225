"""Local files and standard input, read with the same size cap as downloads (CLI only)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from captioner.errors import PermanentError

# `captioner describe -` reads one image from standard input.
STDIN = "-"


async def read_local(source: str, max_bytes: int) -> bytes:
    """The bytes of a local file (or of standard input for ``-``), at most ``max_bytes``."""
    return await asyncio.to_thread(_read, source, max_bytes)


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

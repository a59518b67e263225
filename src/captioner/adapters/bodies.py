"""Reading an aiohttp response body with a size cap, shared by the storage and URL adapters."""

from __future__ import annotations

import aiohttp

from captioner.errors import PermanentError

_CHUNK = 256 * 1024


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, refusing (``too-large``) as soon as it is known to exceed ``max_bytes``:
    from Content-Length when there is one, else while it streams in."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise PermanentError("too-large", f"{declared} bytes is over CAPTION_MAX_BYTES={max_bytes}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        received += len(chunk)
        if received > max_bytes:
            raise PermanentError("too-large", f"more than CAPTION_MAX_BYTES={max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)

"""A media download as Cloud Storage serves it: its CRC32C check and its Content-Encoding.

Google's clients check every download against the CRC32C that Cloud Storage holds (sent
in ``x-goog-hash``); a gzip Content-Encoding is undone here within ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import zlib
from dataclasses import dataclass

import aiohttp
import google_crc32c

from captioner.errors import PermanentError


@dataclass(frozen=True, slots=True)
class Media:
    """A media download as it arrived, before its Content-Encoding is undone."""

    body: bytes
    encoding: str  # the answer's Content-Encoding, lower case; "" for none
    crc32c: str | None  # the stored object's, from x-goog-hash (base64, big-endian)
    # Decompressed by Cloud Storage although we asked for the stored bytes: the
    # checksum describes the compressed bytes, not these, so they cannot be checked.
    transcoded: bool

    @classmethod
    def of(cls, response: aiohttp.ClientResponse, body: bytes) -> Media:
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        stored = response.headers.get("x-goog-stored-content-encoding", "").strip().lower()
        return cls(
            body=body,
            encoding=encoding,
            crc32c=crc32c_header(response.headers.getall("x-goog-hash", [])),
            transcoded=stored == "gzip" and encoding != "gzip",
        )


def crc32c_header(values: list[str]) -> str | None:
    """The ``crc32c=`` value of ``x-goog-hash`` (one header or several, comma-separated)."""
    for value in values:
        for part in value.split(","):
            label, _, digest = part.strip().partition("=")
            if label.lower() == "crc32c" and digest:
                return digest
    return None


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode("ascii")


async def decoded(media: Media, max_bytes: int) -> bytes:
    """The object's bytes with a gzip Content-Encoding undone (the only compression Cloud
    Storage serves); any other label is passed on as it is, for Pillow to judge."""
    if media.encoding not in ("gzip", "x-gzip"):
        return media.body
    return await asyncio.to_thread(_gunzip, media.body, max_bytes)


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
            data = stream.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        # The checksum said these are the stored bytes: they will never decode.
        raise PermanentError(
            "bad-content-encoding",
            f"the object's bytes do not decode as its Content-Encoding (gzip) says: {exc}",
        ) from exc
    if len(data) > max_bytes:
        raise PermanentError(
            "too-large", f"more than CAPTION_MAX_BYTES={max_bytes} bytes once decompressed"
        )
    return data

"""Thumbnails for the review page, made by the app from the object's bytes (the bucket is
never made public and no URL is signed), through the bounded image-preparing path."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from captioner.domain import PreparedImage
from captioner.errors import ObjectGoneError, PermanentError, TransientError
from captioner.preparing import PreparePool, thumbnail_pool
from captioner.settings import Settings

# As `captioner export --html`: sharp in a 240 px grid cell, about 16 KB each.
THUMBNAIL_EDGE = 240
# Thumbnails made at once: each decode may cost up to the decode budget, and a grid asks
# for dozens together.
_AT_ONCE = 3
# Thumbnails kept (about 4 MB): scrolling back, or filtering again, costs nothing.
_KEPT = 256


async def thumbnail(
    storage: Any, pool: PreparePool, bucket: str, name: str, generation: int, settings: Settings
) -> PreparedImage:
    """One thumbnail, exactly as `export --html` makes its cards (stored.py, ``_card``):
    the download held within the pool's budget, then a decode in a worker process."""
    async with pool.hold(settings.max_bytes):
        data = await storage.download(
            bucket, name, generation=generation, max_bytes=settings.max_bytes
        )
        return await pool.prepared(data)


class Thumbnails:
    """Made a few at a time, kept by object generation (its bytes never change)."""

    def __init__(self, storage: Any, settings: Settings) -> None:
        self._storage = storage
        self._settings = settings
        self._at_once = asyncio.Semaphore(_AT_ONCE)
        self._kept: OrderedDict[tuple[str, str, int], PreparedImage | None] = OrderedDict()
        self._pool = thumbnail_pool(THUMBNAIL_EDGE, settings.max_pixels)

    def close(self) -> None:
        """Let the decode workers go."""
        self._pool.close()

    async def get(self, bucket: str, name: str, generation: int) -> PreparedImage | None:
        """The thumbnail, or None when the object cannot be shown (gone, not an image)."""
        key = (bucket, name, generation)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        async with self._at_once:
            try:
                made: PreparedImage | None = await thumbnail(
                    self._storage, self._pool, bucket, name, generation, self._settings
                )
            except (ObjectGoneError, PermanentError):
                made = None
            except TransientError:
                return None  # not kept: it may work on the next look
        self._kept[key] = made
        while len(self._kept) > _KEPT:
            self._kept.popitem(last=False)
        return made

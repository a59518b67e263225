"""``show`` and ``export``: read captions back from Cloud Storage (no Gemini)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from captioner import readback
from captioner.concurrency import bounded_in_order
from captioner.decisions import looks_like_image
from captioner.domain import ObjectInfo
from captioner.edges import html_page
from captioner.edges.cli.common import EXIT_FAILED, EXIT_OK, parse_target
from captioner.errors import (
    BadRequestError,
    NoSuchBucketError,
    ObjectGoneError,
    PermanentError,
    TransientError,
)
from captioner.metadata import MetadataKeys
from captioner.preparing import PreparePool, thumbnail_pool
from captioner.safe_text import for_terminal, json_line
from captioner.settings import Settings


async def run(
    args: argparse.Namespace, settings: Settings, out: TextIO, page: TextIO | None
) -> int:
    """`show` and `export`: read captions back; needs Cloud Storage only, not Gemini."""
    from captioner.adapters.storage import StorageClient

    keys = MetadataKeys(settings.metadata_prefix, settings.languages)
    async with StorageClient.opened(attempts=settings.storage_attempts) as storage:
        if args.command == "show":
            return await _show(storage, keys, args.objects, as_json=args.json)
        return await _export(storage, keys, args, settings, out, page)


async def _show(storage: Any, keys: MetadataKeys, targets: list[str], *, as_json: bool) -> int:
    missing = 0
    for target in targets:
        bucket, name = parse_target(target)
        if not name or name.endswith("/"):
            raise BadRequestError(
                f"{target!r} names a folder, not an object: "
                f"`captioner export {target}` lists what is under it"
            )
        try:
            info = await storage.get_object(bucket, name)
        except ObjectGoneError:
            from captioner.adapters.storage import bucket_exists

            if not await bucket_exists(storage, bucket):
                raise NoSuchBucketError(f"no such bucket: gs://{bucket}/") from None
            print(f"{for_terminal(target)}\tno such object", file=sys.stderr)
            missing += 1
            continue
        record = readback.record_of(info, keys)
        if as_json:
            print(json_line(readback.as_json(record)), flush=True)
        else:
            print(readback.as_text(record), flush=True)
    return EXIT_FAILED if missing else EXIT_OK


async def _export(
    storage: Any,
    keys: MetadataKeys,
    args: argparse.Namespace,
    settings: Settings,
    out: TextIO,
    page: TextIO | None,
) -> int:
    bucket, prefix = parse_target(args.target)
    count = written = 0
    if args.format == "csv":
        out.write(readback.csv_header())
    if page is not None:
        page.write(html_page.page_start(f"Captions of {args.target}"))

    async def listed() -> AsyncIterator[ObjectInfo]:
        nonlocal count
        async for info in storage.list_objects(bucket, prefix):
            if not looks_like_image(info):
                continue
            if args.limit is not None and count >= args.limit:
                return
            count += 1
            record = readback.record_of(info, keys)
            if args.format == "csv":
                out.write(readback.csv_row(record))
            else:
                out.write(json_line(readback.as_json(record)) + "\n")
            yield info

    if page is None:
        async for _ in listed():
            pass
    else:
        folder: str | None = None
        thumbnails = thumbnail_pool(_THUMBNAIL_EDGE, settings.max_pixels)
        try:
            # In the listing's order, as the JSON Lines and CSV are, a heading per folder.
            async for info, card in bounded_in_order(
                listed(), lambda info: _card(storage, keys, info, settings, thumbnails), 8
            ):
                here = info.name.rpartition("/")[0]
                if here != folder:
                    page.write(html_page.folder_heading(here))
                    folder = here
                page.write(card)
                written += len(card)
        finally:
            thumbnails.close()
        page.write(html_page.page_end(count))
    out.flush()
    print(f"exported {count} images", file=sys.stderr)
    if written > _LARGE_PAGE:
        print(
            f"the page holds {count} thumbnails ({written / 1e6:.0f} MB) and opens slowly: "
            "--limit, or a narrower prefix, makes it smaller",
            file=sys.stderr,
        )
    return EXIT_OK


async def _card(
    storage: Any, keys: MetadataKeys, info: ObjectInfo, settings: Settings, pool: PreparePool
) -> tuple[ObjectInfo, str]:
    """One thumbnail and its caption; an image that cannot be shown still gets its card.
    Thumbnails are made as captions are: in the decode workers, within the budgets."""
    record = readback.record_of(info, keys)
    try:
        async with pool.hold(info.size):
            data = await storage.download(
                info.bucket, info.name, generation=info.generation, max_bytes=settings.max_bytes
            )
            thumb = await pool.prepared(data)
    except (ObjectGoneError, PermanentError, TransientError):
        return info, html_page.card(record, None)
    return info, html_page.card(record, thumb.data, thumb.mime_type)


# Thumbnails for the HTML page: 240 px is sharp in a 240 px grid cell and keeps a
# page of a thousand images near 15 MB.
_THUMBNAIL_EDGE = 240
# Past this, a browser takes seconds to open the page (about 16 KB a thumbnail).
_LARGE_PAGE = 16_000_000

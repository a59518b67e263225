"""``captioner review gs://bucket/prefix/``: a local web page to look through and correct
captions (server.py says how it is kept the reviewer's alone).

    listing.py   the prefix, one listing page at a time, filtered as it is read
    actions.py   save, approve, caption again and keep: the pipeline's write code
    thumbs.py    thumbnails through the bounded image-preparing path
    server.py    the aiohttp app: routes, token, CSRF, headers
    page.py      the HTML shell; review.js and review.css build and style the cards
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import webbrowser

from captioner.edges.cli.common import EXIT_OK, parse_target
from captioner.edges.cli.reviewing import who_reviews
from captioner.errors import BadRequestError
from captioner.metadata import MetadataKeys
from captioner.safe_text import for_terminal
from captioner.settings import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until Ctrl-C, which is how a review ends (exit 0)."""
    try:
        asyncio.run(serve(args, settings))
    except KeyboardInterrupt:
        print("review stopped", file=sys.stderr)
    return EXIT_OK


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    from captioner.adapters.storage import StorageClient
    from captioner.edges.review.actions import Actions
    from captioner.edges.review.listing import Listing
    from captioner.edges.review.server import ReviewServer
    from captioner.edges.review.thumbs import Thumbnails

    bucket, prefix = parse_target(args.target)
    by = who_reviews(args.by)
    keys = MetadataKeys(settings.metadata_prefix, settings.languages)
    async with StorageClient.opened(attempts=settings.storage_attempts) as storage:
        # A bucket that is not there (or not ours to list) is said now, not in the page.
        await storage.list_page(bucket, prefix, page_size=1)
        listing = Listing(
            storage, bucket, prefix, keys=keys, rules=settings.rule_book(), model=settings.model
        )
        actions = Actions(storage, settings, keys, listing, by)
        thumbnails = Thumbnails(storage, settings)
        server = ReviewServer(
            listing,
            actions,
            thumbnails,
            read_only=args.read_only,
            config={"model": settings.model, "prompts": listing.prompts(), "by": by},
        )
        try:
            runner = await server.start(args.port)
        except OSError as exc:
            raise BadRequestError(
                f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}"
            ) from None
        try:
            print(f"captioner review: {server.url}", flush=True)
            mode = "read-only; " if args.read_only else f"saving as {for_terminal(by)}; "
            print(f"{mode}Ctrl-C stops it", file=sys.stderr, flush=True)
            if not args.no_browser and not await asyncio.to_thread(webbrowser.open, server.url):
                print("no browser found: open the URL above", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # until Ctrl-C
        finally:
            await runner.cleanup()
            await actions.aclose()
            thumbnails.close()

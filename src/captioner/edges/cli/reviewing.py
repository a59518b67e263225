"""``edit`` and ``review``: a person's word on captions (no Gemini for edit)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from captioner import readback
from captioner.domain import ObjectRef, Outcome
from captioner.edges.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from captioner.edges.http_body import parse_gs_uri
from captioner.errors import BadRequestError, NoSuchBucketError, ObjectGoneError
from captioner.metadata import MetadataKeys
from captioner.recording import Recorder
from captioner.reviewing import Change, human_verdict, reviewer, split_tags
from captioner.safe_text import for_terminal, json_line
from captioner.settings import Settings


async def edit(args: argparse.Namespace, settings: Settings) -> int:
    """Write one person's edit (or approval) under the object's preconditions."""
    from captioner.adapters.storage import StorageClient

    ref = parse_gs_uri(args.object)
    change = Change(
        caption=args.caption,
        alt=args.alt,
        tags=None if args.tags is None else split_tags(args.tags),
        approve=args.approve,
    )
    by = who_reviews(args.by)
    keys = MetadataKeys(settings.metadata_prefix, settings.languages)
    async with StorageClient.opened(attempts=settings.storage_attempts) as storage:
        info = await read_object(storage, ref)
        said = human_verdict(info, keys, change, by)
        recorder = Recorder(storage, keys, settings.model)
        here = ObjectRef(info.bucket, info.name, info.generation)
        result = await recorder.write(here, info, said, refit=False)
        latest = await read_object(storage, ref)
    record = readback.record_of(latest, keys)
    if args.json:
        print(json_line({**readback.as_json(record), "saved": result.recorded}), flush=True)
    else:
        print(readback.as_text(record), flush=True)
    if result.recorded:
        return EXIT_OK
    if result.reason == "changed":
        print(
            f"{for_terminal(ref.uri)}: changed by someone else while it was being edited; "
            "nothing written. It holds what is shown above: run the edit again to replace it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"error: {for_terminal(result.message or str(result.reason))}", file=sys.stderr)
    return EXIT_USAGE if result.outcome is Outcome.FAILED else EXIT_FAILED


async def read_object(storage: Any, ref: ObjectRef) -> Any:
    """The object now; a missing object or bucket is the caller's mistake (exit 2)."""
    try:
        return await storage.get_object(ref.bucket, ref.name)
    except ObjectGoneError:
        from captioner.adapters.storage import bucket_exists

        if not await bucket_exists(storage, ref.bucket):
            raise NoSuchBucketError(f"no such bucket: gs://{ref.bucket}/") from None
        raise BadRequestError(f"{ref.uri}: no such object") from None


def who_reviews(given: str | None) -> str:
    """``--by``, else the account of Application Default Credentials when it names one
    without a network call (a service account), else the login name."""
    if given is not None:
        return reviewer(given)
    account = _credentials_account()
    if account:
        return reviewer(account)
    try:
        return reviewer(getpass.getuser())
    except (OSError, KeyError):  # no USER and no passwd entry (some containers)
        raise BadRequestError("say who reviews: --by NAME") from None


def _credentials_account() -> str | None:
    from captioner.adapters.storage import endpoint_from_env

    if endpoint_from_env()[1]:  # an emulator: no Google account involved
        return None
    try:
        import google.auth

        credentials, _ = google.auth.default()
    except Exception:  # no credentials: the command itself will say so when it reads
        return None
    for name in ("service_account_email", "account"):
        value = getattr(credentials, name, None)
        if isinstance(value, str) and "@" in value:
            return value
    return None

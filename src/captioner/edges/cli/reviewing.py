"""``edit`` and ``review``: a person's word on captions (no Gemini for edit)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from pathlib import Path
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

# An ADC file is a few KB; more is not one.
_MAX_ADC_BYTES = 1 << 20
# ``…/projects/-/serviceAccounts/NAME@PROJECT.iam.gserviceaccount.com:generateAccessToken``
_IMPERSONATES = re.compile(r"/serviceAccounts/([^/:]+@[^/:]+):generateAccessToken$")


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
    """``--by``, else the account that the Application Default Credentials file names
    (a service account's e-mail), else the login name."""
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
    """The e-mail of the account the ADC file names, read from the file alone.

    Not ``google.auth.default()``: with no file it asks the metadata server (seconds of
    waiting off Google Cloud), and the credentials it finds there name no account until
    a token is fetched. Nor ``google.auth.load_credentials_from_file``, deprecated; the
    e-mail is where google-auth reads it from. A file a person's login wrote
    (``authorized_user``) usually names no account: the login name is then used.
    """
    from captioner.adapters.storage import endpoint_from_env

    if endpoint_from_env()[1]:  # an emulator: no Google account involved
        return None
    try:
        path = _adc_file()
        if path is None:
            return None
        with path.open("rb") as file:
            info = json.loads(file.read(_MAX_ADC_BYTES))
    except (OSError, RuntimeError, ValueError):  # no home folder, unreadable, not JSON
        return None
    return _account_in(info)


def _account_in(info: Any) -> str | None:
    """``client_email`` of a service account key, ``account`` of a gcloud login, or the
    service account that ``impersonated_service_account`` and ``external_account``
    credentials act as (the e-mail in their impersonation URL)."""
    if not isinstance(info, dict):
        return None
    kind = info.get("type")
    if kind == "service_account":
        value = info.get("client_email")
    elif kind == "authorized_user":
        value = info.get("account")
    else:
        url = info.get("service_account_impersonation_url")
        found = _IMPERSONATES.search(url) if isinstance(url, str) else None
        value = found.group(1) if found else None
    return value if isinstance(value, str) and "@" in value else None


def _adc_file() -> Path | None:
    """Where Application Default Credentials are read from, as google-auth looks
    (``GOOGLE_APPLICATION_CREDENTIALS``, else gcloud's
    ``application_default_credentials.json``), if the file is there."""
    given = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if given:
        return Path(given) if Path(given).is_file() else None
    config = os.environ.get("CLOUDSDK_CONFIG")
    appdata = os.environ.get("APPDATA")
    if not config and os.name == "nt" and appdata:
        config = str(Path(appdata) / "gcloud")
    folder = Path(config or "~/.config/gcloud").expanduser()
    path = folder / "application_default_credentials.json"
    return path if path.is_file() else None

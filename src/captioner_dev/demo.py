"""The demo: local stack, sample photos uploaded, Eventarc-style events, captions read back.

``python -m captioner_dev.demo`` (``make demo``). With GEMINI_API_KEY set it calls
real Gemini; otherwise the offline Gemini-compatible stand-in answers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from captioner_dev import PHOTOS
from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from captioner_dev.gcs import FakeGcs

BUCKET = "demo-photos"


def _object_resource(gcs_url: str, name: str) -> dict[str, Any]:
    import json

    url = f"{gcs_url}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}"
    with urllib.request.urlopen(url, timeout=10) as response:
        resource: dict[str, Any] = json.load(response)
        return resource


def _deliver(function_url: str, resource: dict[str, Any]) -> tuple[int, float]:
    headers, body = binary_event(resource)
    request = urllib.request.Request(function_url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, time.monotonic()


WHAT_NEXT = """
What next:
  make stack                                     this local stack, left running, with the
                                                 export lines to try every command by hand
  captioner describe ~/Pictures/some-folder/     your own photos (pipx install . first;
                                                 GEMINI_API_KEY for real captions)
  captioner backfill gs://your-bucket/ --dry-run what a backfill of a bucket would do
  README.md, "Your own photos"                   from here to your bucket in five commands
  make test                                      every test against this same local stack
"""


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # The local stack is stopped by the context managers on the way out.
        print("\ninterrupted; nothing is left running", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="folder of images to upload")
    args = parser.parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    if not photos:
        print(f"no photos in {args.photos}", file=sys.stderr)
        return 1
    started = time.monotonic()
    stub_thread = None
    try:
        with FakeGcs() as gcs:
            env = {"STORAGE_EMULATOR_HOST": gcs.url, "CAPTION_LOG_FORMAT": "text"}
            if os.environ.get("GEMINI_API_KEY"):
                print("Gemini: the real API (GEMINI_API_KEY is set)")
            else:
                from captioner_dev.gemini_server import GeminiStub

                stub_thread = GeminiStub().start_in_thread()
                env |= {"GOOGLE_GEMINI_BASE_URL": stub_thread.base_url, "GEMINI_API_KEY": "offline"}
                print(
                    f"Gemini: the offline stand-in at {stub_thread.base_url} (set GEMINI_API_KEY "
                    "to use the real API)"
                )
            print(f"Cloud Storage: fake-gcs-server at {gcs.url}")
            bucket = _bucket(gcs.url)
            names = _upload(bucket, photos)
            cold = _caption(gcs.url, env, names)
            if cold is None:
                return 1
            failures = _show(bucket, names)
            print(f"process start → first caption written: {cold:.2f} s")
            print(f"demo wall time: {time.monotonic() - started:.2f} s")
    finally:
        if stub_thread is not None:
            stub_thread.stop()
    if not failures:
        print(WHAT_NEXT)
    return 1 if failures else 0


def _bucket(gcs_url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="demo",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": gcs_url},
    )
    return client.create_bucket(BUCKET)


def _upload(bucket: Any, photos: list[Path]) -> list[str]:
    names = []
    for path in photos:
        blob = bucket.blob(f"uploads/{path.name}")
        blob.metadata = {"uploaded-by": "demo"}
        blob.upload_from_filename(str(path), content_type="image/jpeg")
        names.append(blob.name)
    print(f"uploaded {len(names)} photos to gs://{BUCKET}/uploads/")
    return names


def _caption(gcs_url: str, env: dict[str, str], names: list[str]) -> float | None:
    """Deliver one upload event per photo to the real function; the seconds from its
    process start to the first caption written, or None if an event failed."""
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        resources = [_object_resource(gcs_url, name) for name in names]
        # The first event alone: how long from the process start to a caption written.
        status, first_done = _deliver(server.url, resources[0])
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            statuses = [status, *pool.map(lambda r: _deliver(server.url, r)[0], resources[1:])]
        if any(s != 200 for s in statuses):
            print(f"some events failed: {statuses}\n{server.log_text()}", file=sys.stderr)
            return None
        return first_done - server.started_at


def _show(bucket: Any, names: list[str]) -> int:
    """Print what each photo now carries; the number that did not end ``ok``."""
    print()
    failures = 0
    for name in names:
        meta = bucket.get_blob(name).metadata or {}
        status = meta.get("caption-status", "(none)")
        failures += status != "ok"
        print(f"gs://{BUCKET}/{name}")
        print(f"  caption-status: {status}   caption-model: {meta.get('caption-model')}")
        print(f"  caption: {meta.get('caption', '(none)')}")
        print(f"  alt text: {meta.get('caption-alt', '(none)')}")
        print(f"  tags: {meta.get('caption-tags', '(none)')}")
        print(f"  kept owner key uploaded-by={meta.get('uploaded-by')}")
    print()
    return failures


if __name__ == "__main__":
    raise SystemExit(main())

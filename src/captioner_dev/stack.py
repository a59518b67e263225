"""The local stack in the foreground, for trying every CLI command by hand (``make stack``).

fake-gcs-server and the Gemini stand-in, on fixed ports so that the ``export`` lines
printed stay true from one start to the next, a bucket with the sample photos in it, and a
service-account key whose tokens come from the stand-in (for Vertex AI mode and batch
jobs). Ctrl-C stops everything; nothing is left running and nothing persists.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from captioner_dev import PHOTOS
from captioner_dev.credentials import write_service_account_key
from captioner_dev.gcs import FakeGcs

GCS_PORT = 4443
GEMINI_PORT = 8089


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make stack",
        description="Run fake-gcs-server and the Gemini stand-in until Ctrl-C, and print the "
        "environment that points captioner at them.",
    )
    parser.add_argument("--gcs-port", type=int, default=GCS_PORT)
    parser.add_argument("--gemini-port", type=int, default=GEMINI_PORT)
    parser.add_argument("--bucket", default="my-photos", help="created, with the photos in it")
    parser.add_argument(
        "--photos", type=Path, default=PHOTOS, help="folder uploaded under photos/ (none: --empty)"
    )
    parser.add_argument("--empty", action="store_true", help="create the bucket, upload nothing")
    return parser


def exports(gcs_url: str, gemini_url: str, key: Path) -> str:
    return f"""\
  export STORAGE_EMULATOR_HOST={gcs_url}
  export GOOGLE_GEMINI_BASE_URL={gemini_url}
  export GEMINI_API_KEY=local

  # Or, instead of the key, Vertex AI mode (what batch jobs need):
  #   unset GEMINI_API_KEY
  #   export GOOGLE_GENAI_USE_VERTEXAI=true GOOGLE_CLOUD_PROJECT=local
  #   export GOOGLE_CLOUD_LOCATION=us-central1 GOOGLE_APPLICATION_CREDENTIALS={key}"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name, port in (("--gcs-port", args.gcs_port), ("--gemini-port", args.gemini_port)):
        if _port_taken(port):
            print(
                f"port {port} is in use (another `make stack`?): stop it, or choose one with "
                f"make stack ARGS='{name} N'",
                file=sys.stderr,
            )
            return 2
    from captioner_dev.gemini_server import GeminiStub

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with (
        tempfile.TemporaryDirectory(prefix="captioner-stack-") as folder,
        FakeGcs(args.gcs_port) as gcs,
    ):
        stub = GeminiStub().start_in_thread(port=args.gemini_port)
        try:
            key = write_service_account_key(Path(folder), stub.base_url + "/token")
            count = _fill(gcs.url, args.bucket, None if args.empty else args.photos)
            print(
                f"Local stack running; Ctrl-C stops it.\n"
                f"  Cloud Storage: fake-gcs-server at {gcs.url}, gs://{args.bucket}/ with "
                f"{count} photos under photos/\n"
                f"  Gemini: the offline stand-in at {stub.base_url}\n\n"
                "In another terminal, in this folder, paste:\n\n"
                f"  source .venv/bin/activate\n{exports(gcs.url, stub.base_url, key)}\n\n"
                "Then try:\n"
                f"  captioner backfill gs://{args.bucket}/ --dry-run\n"
                f"  captioner backfill gs://{args.bucket}/\n"
                f"  captioner show gs://{args.bucket}/photos/chelsea.jpg\n"
                f"  captioner export gs://{args.bucket}/ --html captions.html\n",
                flush=True,
            )
            stop.wait()
        finally:
            stub.stop()
    print("stopped; nothing is left running", file=sys.stderr)
    return 0


def _fill(gcs_url: str, bucket_name: str, photos: Path | None) -> int:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="local",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": gcs_url},
    )
    bucket = client.create_bucket(bucket_name)
    if photos is None:
        return 0
    count = 0
    for path in sorted(photos.iterdir()):
        if path.suffix.lower() in {".jpg", ".jpeg", ".png"}:
            content_type = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
            bucket.blob(f"photos/{path.name}").upload_from_filename(
                str(path), content_type=content_type
            )
            count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())

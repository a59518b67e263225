"""``caption_on_upload`` served by functions-framework, fed CloudEvents as Eventarc sends them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from captioner_dev.eventarc import binary_event, structured_event
from captioner_dev.functions import REPO, FunctionServer
from captioner_dev.proctree import TreeSampler
from tests import images
from tests.integration.test_storage_adapter import ODD_NAMES
from tests.objects import upload

SECRET_KEY = "AIza-secret-that-must-never-be-logged-7d1e"


@pytest.fixture(scope="module")
def upload_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": SECRET_KEY,
        "GOOGLE_CLOUD_PROJECT": "demo-project",
        "CAPTION_GEMINI_ATTEMPTS": "2",
        "CAPTION_RETRY_MAX_WAIT": "0.2",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


def resource(gcs: Any, bucket: str, name: str) -> dict[str, Any]:
    url = f"{gcs.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
    data: dict[str, Any] = requests.get(url, timeout=10).json()
    return data


def deliver(server: FunctionServer, headers: dict[str, str], body: bytes) -> requests.Response:
    return requests.post(server.url, headers=headers, data=body, timeout=60)


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("name", [*ODD_NAMES[:6], "ünïcødé/日本語の写真.jpg"])
def test_finalized_event_captions_the_object(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer, mode: str, name: str
) -> None:
    upload(bucket, name, images.photo("coffee.jpg"), metadata={"owner": "alice"})
    make = binary_event if mode == "binary" else structured_event
    response = deliver(upload_function, *make(resource(gcs, bucket.name, name)))
    assert response.status_code == 200, response.text
    meta = bucket.get_blob(name).metadata
    assert meta["owner"] == "alice"
    assert meta["caption-status"] == "ok"
    assert "600x400" in meta["caption"]
    assert gemini.calls == 1


def test_duplicate_delivery_is_a_no_op(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    upload(bucket, "dup.jpg", images.photo())
    event = resource(gcs, bucket.name, "dup.jpg")
    headers, body = binary_event(event, event_id="same-id")
    assert deliver(upload_function, headers, body).status_code == 200
    first = bucket.get_blob("dup.jpg").metadata
    assert deliver(upload_function, headers, body).status_code == 200
    assert bucket.get_blob("dup.jpg").metadata == first
    assert gemini.calls == 1


@pytest.mark.parametrize(
    ("name", "data", "content_type", "status"),
    [
        ("zero.jpg", b"", "image/jpeg", "error:empty"),
        ("corrupt.jpg", images.corrupt_jpeg(), "image/jpeg", "error:corrupt-image"),
        ("text.jpg", b"I am text in a .jpg", "image/jpeg", "error:not-an-image"),
        ("bomb.png", images.png_bomb(), "image/png", "error:too-many-pixels"),
    ],
)
def test_bad_images_return_200_and_record_the_error(
    gcs: Any,
    bucket: Any,
    gemini: Any,
    upload_function: FunctionServer,
    name: str,
    data: bytes,
    content_type: str,
    status: str,
) -> None:
    upload(bucket, name, data, content_type, metadata={"owner": "kept"})
    response = deliver(upload_function, *binary_event(resource(gcs, bucket.name, name)))
    assert response.status_code == 200  # permanent: no redelivery storm
    meta = bucket.get_blob(name).metadata
    assert meta["caption-status"] == status
    assert meta["owner"] == "kept"
    assert gemini.calls == 0


# Decoders that could take the instance down (issue 22), as uploads. Before: the TIFFs
# and the AVIF were decoded in the function's process (up to 1,100 MiB), the strips
# and scans ran the CPU until the deadline (a 503, redelivered for 24 hours), and the
# rest raised past prepare (a 500, redelivered too).
DECODER_BOMBS: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("tile.tif", images.tiff_declaring_tile, "image/tiff", "too-large-to-decode"),
    ("strips.tif", images.tiff_of_strips, "image/tiff", "corrupt-image"),
    ("rgba16-strip.tif", images.tiff_rgba16_one_strip, "image/tiff", "too-large-to-decode"),
    ("wide-tile.tif", images.tiff_of_wide_tiles, "image/tiff", "too-large-to-decode"),
    ("lying.avif", images.avif_declaring, "image/avif", "corrupt-image"),
    ("no-item.avif", images.avif_without_image_item, "image/avif", "corrupt-image"),
    ("lying.heic", lambda: images.heic_declaring(1, 1), "image/heic", "too-large-to-decode"),
    ("sampling-0.jpg", lambda: images.progressive_jpeg_with_sampling(0, 1), "image/jpeg",
     "corrupt-image"),
    # ~16 s of CPU in libjpeg; a decode may use 10.
    ("scans.jpg", lambda: images.jpeg_of_scans(4000, 15000), "image/jpeg", "decode-timeout"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "build", "content_type", "reason"),
    DECODER_BOMBS,
    ids=[bomb[0] for bomb in DECODER_BOMBS],
)
def test_a_decoder_bomb_is_acknowledged_recorded_and_the_instance_captions_the_next_image(
    gcs: Any,
    bucket: Any,
    gemini: Any,
    upload_function: FunctionServer,
    name: str,
    build: Callable[[], bytes],
    content_type: str,
    reason: str,
) -> None:
    upload(bucket, name, build(), content_type, metadata={"owner": "kept"})
    with TreeSampler(upload_function.pid, period=0.01) as instance:
        response = deliver(upload_function, *binary_event(resource(gcs, bucket.name, name)))
    assert response.status_code == 200, response.text  # acknowledged: no redelivery
    meta = bucket.get_blob(name).metadata
    assert meta["caption-status"] == f"error:{reason}"
    assert meta["owner"] == "kept"
    assert gemini.calls == 0
    # The whole instance (the function's process and its decode workers) stayed small.
    assert instance.peak_mb < 600
    # Still alive, and still captioning.
    upload(bucket, f"after-{name}.jpg", images.photo("coffee.jpg"))
    after = deliver(upload_function, *binary_event(resource(gcs, bucket.name, f"after-{name}.jpg")))
    assert after.status_code == 200
    assert bucket.get_blob(f"after-{name}.jpg").metadata["caption-status"] == "ok"
    assert not upload_function.exited()


def test_non_image_is_untouched(gcs: Any, bucket: Any, upload_function: FunctionServer) -> None:
    upload(bucket, "readme.txt", b"hello", "text/plain", metadata={"a": "b"})
    response = deliver(upload_function, *binary_event(resource(gcs, bucket.name, "readme.txt")))
    assert response.status_code == 200
    assert bucket.get_blob("readme.txt").metadata == {"a": "b"}


def test_transient_gemini_failure_answers_503_so_eventarc_redelivers(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    upload(bucket, "flaky.jpg", images.photo(), metadata={"owner": "x"})
    gemini.add_fault("503")
    event = binary_event(resource(gcs, bucket.name, "flaky.jpg"))
    response = deliver(upload_function, *event)
    assert response.status_code == 503
    assert bucket.get_blob("flaky.jpg").metadata == {"owner": "x"}
    gemini.clear_faults()
    assert deliver(upload_function, *event).status_code == 200  # the redelivery succeeds
    assert bucket.get_blob("flaky.jpg").metadata["caption-status"] == "ok"


def malformed_log_lines(server: FunctionServer) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    return [line for line in lines if line.get("malformed_event")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bucket": "b"}, "missing 'name'"),
        ({"bucket": "b", "name": "n.jpg"}, "missing 'generation'"),
        ({"bucket": "b", "name": "n.jpg", "generation": "x1"}, "'generation' must be"),
        ({"bucket": 5, "name": "n.jpg", "generation": "1"}, "'bucket' must be"),
        ([1, 2, 3], "must be a JSON object"),
    ],
)
def test_malformed_event_is_acknowledged_with_an_error_log_so_eventarc_does_not_redeliver(
    upload_function: FunctionServer, data: object, message: str
) -> None:
    headers, _ = binary_event({"bucket": "b", "name": "n.jpg"})
    headers["ce-id"] = f"malformed-{uuid.uuid4().hex}"
    response = deliver(upload_function, headers, json.dumps(data).encode())
    assert response.status_code == 200  # any other answer is redelivered for 24 hours
    logged = [x for x in malformed_log_lines(upload_function) if x["event_id"] == headers["ce-id"]]
    assert len(logged) == 1
    assert message in logged[0]["message"]
    assert logged[0]["severity"] == "ERROR"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"bucket": "b", "name": "\\ud800.jpg", "generation": "1"}',
        b'{"bucket": "b\\udfff", "name": "n.jpg", "generation": "1"}',
        b'{"bucket": "b", "name": "n.jpg", "generation": "1", "\\ud83d": 1}',
        b'{"bucket": "b", "name": "n.jpg", "generation": ' + b"7" * 5000 + b"}",
        b'{"bucket": "b", "name": "n.jpg", "generation": "1", "size": ' + b"9" * 5000 + b"}",
    ],
    ids=["name-surrogate", "bucket-surrogate", "key-surrogate", "huge-generation", "huge-size"],
)
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_event_with_a_lone_surrogate_or_a_huge_integer_is_acknowledged_not_a_500(
    upload_function: FunctionServer, gemini: Any, raw: bytes, mode: str
) -> None:
    if mode == "binary":
        headers, _ = binary_event({"bucket": "b", "name": "n.jpg"})
        body = raw
    else:
        headers, envelope = structured_event({"bucket": "b", "name": "n.jpg"})
        body = envelope.replace(json.dumps({"bucket": "b", "name": "n.jpg"}).encode(), raw)
        assert body != envelope
    response = deliver(upload_function, headers, body)
    assert response.status_code < 500, response.text
    assert gemini.calls == 0


def test_event_without_cloudevent_headers_gets_400(upload_function: FunctionServer) -> None:
    # Not a CloudEvent at all: functions-framework answers this itself, before our code.
    response = requests.post(
        upload_function.url, data=b"{}", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400


def test_event_with_non_json_body_is_acknowledged(upload_function: FunctionServer) -> None:
    headers, _ = binary_event({"bucket": "b", "name": "n.jpg"})
    response = deliver(upload_function, headers, b"\x00\x01 not json")
    assert response.status_code == 200


def test_other_event_types_are_acknowledged_and_ignored(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    upload(bucket, "meta.jpg", images.photo())
    headers, body = binary_event(resource(gcs, bucket.name, "meta.jpg"))
    headers["ce-type"] = "google.cloud.storage.object.v1.metadataUpdated"
    assert deliver(upload_function, headers, body).status_code == 200
    assert gemini.calls == 0
    assert not (bucket.get_blob("meta.jpg").metadata)
    assert not ({})


def test_bad_setting_stops_the_instance_at_start_naming_the_variable() -> None:
    env = {"CAPTION_MAX_EDGE": "huge", "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode != 0
    assert "CAPTION_MAX_EDGE" in completed.stderr


def test_log_lines_are_cloud_logging_json_with_trace_labels_and_stages(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    upload(bucket, "logged.jpg", images.photo("rocket.jpg"))
    headers, body = binary_event(resource(gcs, bucket.name, "logged.jpg"))
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers["ce-traceparent"] = f"00-{trace}-00f067aa0ba902b7-01"
    assert deliver(upload_function, headers, body).status_code == 200

    lines = [json.loads(line) for line in upload_function.log_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    mine = [e for e in lines if e.get("object") == "logged.jpg"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["severity"] == "INFO"
    assert entry["logging.googleapis.com/trace"] == f"projects/demo-project/traces/{trace}"
    labels = entry["logging.googleapis.com/labels"]
    assert labels["bucket"] == bucket.name
    assert labels["object"] == "logged.jpg"
    assert labels["generation"] == str(bucket.get_blob("logged.jpg").generation)
    assert entry["prompt_tokens"] > 258
    assert set(entry["stages"]) == {"fetch", "prepare", "describe", "write"}
    summaries = [e for e in lines if e.get("summary") and e.get("logging.googleapis.com/trace")]
    assert summaries


def test_logs_never_contain_the_api_key_or_image_bytes(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    upload(bucket, "private.jpg", images.photo("astronaut.jpg"))
    gemini.add_fault("invalid_argument", count=1)  # an error path logs more
    deliver(upload_function, *binary_event(resource(gcs, bucket.name, "private.jpg")))
    text = upload_function.log_text()
    assert SECRET_KEY not in text
    assert not re.search(r"[A-Za-z0-9+/_-]{200,}", text)  # no base64 payloads

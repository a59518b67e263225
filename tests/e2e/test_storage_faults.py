"""Where users meet Cloud Storage faults: ``caption_on_upload`` under functions-framework
(what an Eventarc delivery gets) and the ``captioner`` command, with Cloud Storage
behind the fault proxy, when the bytes arrive damaged or access is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests import images
from tests.e2e.test_cli import run_cli
from tests.e2e.test_upload_function import resource
from tests.gcs_proxy import GcsProxy
from tests.objects import upload


@pytest.fixture(scope="module")
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upload_function(proxy: GcsProxy, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": proxy.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_STORAGE_ATTEMPTS": "3",
        "CAPTION_RETRY_MAX_WAIT": "0.2",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


@pytest.fixture
def faults(proxy: GcsProxy) -> GcsProxy:
    proxy.reset()
    return proxy


def deliver(server: FunctionServer, gcs: Any, bucket: Any, name: str) -> requests.Response:
    headers, body = binary_event(resource(gcs, bucket.name, name))
    return requests.post(server.url, headers=headers, data=body, timeout=60)


def log_lines(server: FunctionServer, needle: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    return [line for line in lines if needle in line.get("message", "")]


def test_an_upload_whose_download_is_corrupted_once_is_captioned_from_the_right_bytes(
    gcs: Any, bucket: Any, gemini: Any, faults: GcsProxy, upload_function: FunctionServer
) -> None:
    upload(bucket, "once.jpg", images.photo("coffee.jpg"), metadata={"owner": "alice"})
    # storage-testbench's return-corrupted-data: a JPEG whose first byte is not 0xFF
    # any more, x-goog-hash unchanged. It was recorded as error:not-an-image for good.
    faults.add_instruction("GET", "/o/once.jpg", "return-corrupted-data", query_contains="alt")
    response = deliver(upload_function, gcs, bucket, "once.jpg")
    assert response.status_code == 200, response.text
    meta = bucket.get_blob("once.jpg").metadata
    assert meta["caption-status"] == "ok"
    assert "600x400" in meta["caption"]
    assert meta["owner"] == "alice"
    assert gemini.calls == 1


def test_an_upload_whose_download_is_always_corrupted_is_redelivered_and_not_stamped(
    gcs: Any, bucket: Any, gemini: Any, faults: GcsProxy, upload_function: FunctionServer
) -> None:
    upload(bucket, "always.jpg", images.photo("coffee.jpg"), metadata={"owner": "bob"})
    for _ in range(20):
        faults.add_instruction(
            "GET", "/o/always.jpg", "return-corrupted-data", query_contains="alt"
        )
    response = deliver(upload_function, gcs, bucket, "always.jpg")
    assert response.status_code == 503  # Eventarc redelivers
    assert bucket.get_blob("always.jpg").metadata == {"owner": "bob"}
    assert faults.recorded("PATCH") == []
    assert gemini.calls == 0


@pytest.mark.parametrize(
    ("method", "query", "permission", "gemini_calls"),
    [
        ("GET", "", "storage.objects.get", 0),  # the first read of the object
        ("PATCH", "", "storage.objects.update", 1),  # writing the caption
    ],
)
def test_a_403_is_redelivered_with_one_log_line_naming_permission_and_bucket(
    gcs: Any,
    bucket: Any,
    gemini: Any,
    faults: GcsProxy,
    upload_function: FunctionServer,
    method: str,
    query: str,
    permission: str,
    gemini_calls: int,
) -> None:
    upload(bucket, "denied.jpg", images.photo("coffee.jpg"), metadata={"owner": "carol"})
    faults.add_fault(method, "/o/denied.jpg", 403, count=20, query_contains=query)
    response = deliver(upload_function, gcs, bucket, "denied.jpg")
    assert response.status_code == 503  # redelivered once IAM is fixed
    assert bucket.get_blob("denied.jpg").metadata == {"owner": "carol"}
    assert len(faults.recorded(method)) == 1, "not retried inside the invocation"
    assert gemini.calls == gemini_calls
    (line,) = log_lines(upload_function, f"{permission} on bucket {bucket.name}")
    assert line["severity"] == "ERROR"
    assert line["message"].startswith("configuration problem, asking for redelivery: ")
    assert "\n" not in line["message"]


@pytest.mark.parametrize(
    ("method", "query", "permission"),
    [
        ("GET", "maxResults", "storage.objects.list"),  # listing the prefix
        ("GET", "alt=media", "storage.objects.get"),  # downloading the first image
    ],
)
def test_a_403_stops_a_backfill_with_one_line_naming_permission_and_bucket_and_exit_2(
    stack_env: dict[str, str],
    bucket: Any,
    gemini: Any,
    faults: GcsProxy,
    method: str,
    query: str,
    permission: str,
) -> None:
    for i in range(3):
        upload(bucket, f"p/{i}.jpg", images.photo("coffee.jpg"))
    faults.add_fault(method, f"/b/{bucket.name}/o", 403, count=50, query_contains=query)
    completed = run_cli(
        {**stack_env, "STORAGE_EMULATOR_HOST": faults.url}, "backfill", f"gs://{bucket.name}/p/"
    )
    assert completed.returncode == 2
    (line,) = completed.stderr.splitlines()
    assert line.startswith(f"error: Cloud Storage refused {permission} on bucket {bucket.name}")
    assert completed.stdout == ""
    assert gemini.calls == 0

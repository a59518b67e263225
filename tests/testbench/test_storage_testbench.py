"""The storage adapter and the real upload function against Google's own Cloud Storage
emulator, storage-testbench, with its fault injection (Retry Tests, emulator
instructions): the conformance scenarios as Google's client libraries run them, and
the faults of issue 22 at the edge a user calls."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import requests

from captioner.adapters.storage import StorageClient
from captioner.errors import CaptionerError, ConfigurationError, TransientError
from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests import images
from tests.integration.test_retry_conformance import MEDIA, Scenario, cases
from tests.testbench.conftest import StorageTestbench, retry_test, retry_test_completed
from tests.testbench.forwarder import Forwarder

OFFICIAL_METHOD = {
    "get": "storage.objects.get",
    "download": "storage.objects.get",
    "list": "storage.objects.list",
    "patch": "storage.objects.patch",
}


def adapter_call(
    storage: StorageClient, blob: Any, call: str, scenario: Scenario
) -> Callable[[], Awaitable[Any]]:
    """``call`` alone: the generation and metageneration it needs are read beforehand,
    so that the Retry Test's instructions meet only the request under test."""
    bucket, name = blob.bucket.name, blob.name

    async def run() -> Any:
        if call == "get":
            return await storage.get_object(bucket, name)
        if call == "download":
            return await storage.download(
                bucket, name, generation=blob.generation, max_bytes=len(MEDIA)
            )
        if call == "list":
            return [o.name async for o in storage.list_objects(bucket)]
        written = await storage.patch_metadata(
            bucket,
            name,
            {"caption": "a test pattern"},
            if_generation_match=blob.generation,
            if_metageneration_match=blob.metageneration if scenario.precondition_provided else None,
        )
        return dict(written.metadata)

    return run


@pytest.mark.parametrize(("scenario", "instructions", "call"), cases())
async def test_official_retry_scenario_against_storage_testbench(
    testbench: StorageTestbench,
    testbench_bucket: Any,
    scenario: Scenario,
    instructions: tuple[str, ...],
    call: str,
) -> None:
    blob = testbench_bucket.blob("object.bin")
    blob.upload_from_string(MEDIA, content_type="image/jpeg")
    test_id = retry_test(testbench, {OFFICIAL_METHOD[call]: list(instructions)})
    async with aiohttp.ClientSession(headers={"x-retry-test-id": test_id}) as session:
        storage = StorageClient(session, endpoint=testbench.url, emulator=True, attempts=3)
        run = adapter_call(storage, blob, call, scenario)
        if scenario.expect_success:
            result = await run()
            if call == "download":
                assert result == MEDIA
            elif call == "patch":
                assert result["caption"] == "a test pattern"
        else:
            with pytest.raises(CaptionerError):
                await run()
    assert retry_test_completed(testbench, test_id), "every instruction was met"


async def test_testbench_corrupted_data_every_time_is_transient_never_a_verdict(
    testbench: StorageTestbench, testbench_bucket: Any
) -> None:
    blob = testbench_bucket.blob("corrupt.jpg")
    blob.upload_from_string(images.photo("coffee.jpg"), content_type="image/jpeg")
    headers = {"x-goog-emulator-instructions": "return-corrupted-data"}
    async with aiohttp.ClientSession(headers=headers) as session:
        storage = StorageClient(session, endpoint=testbench.url, emulator=True, attempts=3)
        with pytest.raises(TransientError, match="checksum") as raised:
            await storage.download(
                testbench_bucket.name, "corrupt.jpg", generation=blob.generation, max_bytes=1 << 24
            )
    assert not isinstance(raised.value, ConfigurationError)


@pytest.fixture(scope="module")
def forwarder(testbench: StorageTestbench) -> Iterator[Forwarder]:
    server = Forwarder(testbench.url).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upload_function(forwarder: Forwarder, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": forwarder.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_STORAGE_ATTEMPTS": "3",
        "CAPTION_RETRY_MAX_WAIT": "0.2",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


@pytest.fixture
def faults(forwarder: Forwarder) -> Iterator[Forwarder]:
    forwarder.reset()
    yield forwarder
    forwarder.reset()


def uploaded(testbench: StorageTestbench, bucket: Any, name: str) -> dict[str, Any]:
    """The object, uploaded to the testbench; its resource is the event's data."""
    bucket.blob(name).upload_from_string(images.photo("coffee.jpg"), content_type="image/jpeg")
    answer = requests.get(f"{testbench.url}/storage/v1/b/{bucket.name}/o/{name}", timeout=10)
    resource: dict[str, Any] = answer.json()
    return resource


def deliver(server: FunctionServer, resource: dict[str, Any]) -> requests.Response:
    headers, body = binary_event(resource)
    return requests.post(server.url, headers=headers, data=body, timeout=60)


def test_testbench_upload_corrupted_once_is_captioned_from_the_right_bytes(
    testbench: StorageTestbench,
    testbench_bucket: Any,
    gemini: Any,
    faults: Forwarder,
    upload_function: FunctionServer,
) -> None:
    resource = uploaded(testbench, testbench_bucket, "once.jpg")
    faults.media_instructions.append("return-corrupted-data")
    response = deliver(upload_function, resource)
    assert response.status_code == 200, response.text
    meta = testbench_bucket.get_blob("once.jpg").metadata
    assert meta["caption-status"] == "ok"
    assert "600x400" in meta["caption"]
    assert gemini.calls == 1


def test_testbench_upload_always_corrupted_is_redelivered_and_not_stamped(
    testbench: StorageTestbench,
    testbench_bucket: Any,
    gemini: Any,
    faults: Forwarder,
    upload_function: FunctionServer,
) -> None:
    resource = uploaded(testbench, testbench_bucket, "always.jpg")
    before = testbench_bucket.get_blob("always.jpg").metadata
    faults.media_instructions.extend(["return-corrupted-data"] * 10)
    response = deliver(upload_function, resource)
    assert response.status_code == 503
    assert testbench_bucket.get_blob("always.jpg").metadata == before
    assert gemini.calls == 0


def test_testbench_403_is_redelivered_with_one_line_naming_permission_and_bucket(
    testbench: StorageTestbench,
    testbench_bucket: Any,
    gemini: Any,
    faults: Forwarder,
    upload_function: FunctionServer,
) -> None:
    resource = uploaded(testbench, testbench_bucket, "denied.jpg")
    before = testbench_bucket.get_blob("denied.jpg").metadata
    faults.retry_test_id = retry_test(testbench, {"storage.objects.get": ["return-403"]})
    response = deliver(upload_function, resource)
    assert response.status_code == 503
    assert retry_test_completed(testbench, faults.retry_test_id)
    assert testbench_bucket.get_blob("denied.jpg").metadata == before
    assert gemini.calls == 0
    needle = f"storage.objects.get on bucket {testbench_bucket.name}"
    lines = [json.loads(x) for x in upload_function.log_text().splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if needle in x.get("message", "")]
    assert line["severity"] == "ERROR"

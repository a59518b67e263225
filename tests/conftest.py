"""Shared fixtures: the real local stack (fake-gcs-server process, Gemini stand-in)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from captioner.adapters.storage import StorageClient
from captioner_dev.gcs import FakeGcs


@pytest.fixture(scope="session")
def gcs() -> Iterator[FakeGcs]:
    """One fake-gcs-server process for the whole run; tests use their own buckets."""
    with FakeGcs() as server:
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        try:
            yield server
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def gcs_client(gcs: FakeGcs):  # type: ignore[no-untyped-def]
    """google-cloud-storage, the library users have, as an independent view of the bucket."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": gcs.url},
    )


@pytest.fixture
def bucket(gcs_client):  # type: ignore[no-untyped-def]
    return gcs_client.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def storage_client(gcs: FakeGcs) -> AsyncIterator[StorageClient]:
    async with aiohttp.ClientSession() as session:
        yield StorageClient(session, endpoint=gcs.url, emulator=True, attempts=2)


@pytest.fixture(scope="session")
def gemini_thread() -> Iterator[Any]:
    """The Gemini-compatible stand-in, reached by the real google-genai client."""
    from captioner_dev.gemini_server import GeminiStub

    thread = GeminiStub().start_in_thread()
    saved = {k: os.environ.get(k) for k in ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY")}
    os.environ["GOOGLE_GEMINI_BASE_URL"] = thread.base_url
    os.environ["GEMINI_API_KEY"] = "test-key"
    try:
        yield thread
    finally:
        thread.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def gemini(gemini_thread: Any) -> Iterator[Any]:
    """The stand-in's state, reset before and after each test."""
    gemini_thread.stub.reset()
    yield gemini_thread.stub
    gemini_thread.stub.reset()


@pytest.fixture(scope="session")
def adc_key(gemini_thread: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Application Default Credentials for the stand-in's Vertex AI: a service-account key
    whose token_uri is the stand-in's token endpoint (captioner_dev.credentials)."""
    from captioner_dev.credentials import write_service_account_key

    folder = tmp_path_factory.mktemp("adc")
    return str(write_service_account_key(folder, gemini_thread.base_url + "/token"))


def vertex_function_env(gcs: FakeGcs, gemini_thread: Any, adc_key: str) -> dict[str, str]:
    """What caption_http needs to run batch jobs on the local stack in Vertex AI mode."""
    return {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": "p",
        "GOOGLE_CLOUD_LOCATION": "us-central1",
        "GOOGLE_APPLICATION_CREDENTIALS": adc_key,
        "GEMINI_API_KEY": "",
    }


@pytest.fixture
def vertex_env(stack_env: dict[str, str], adc_key: str) -> dict[str, str]:
    """The stack in Vertex AI mode (batch jobs exist only there), with credentials got
    the way a deployment gets them: ADC from GOOGLE_APPLICATION_CREDENTIALS."""
    return {
        **stack_env,
        "GEMINI_API_KEY": "",
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": "p",
        "GOOGLE_CLOUD_LOCATION": "us-central1",
        "GOOGLE_APPLICATION_CREDENTIALS": adc_key,
    }


@pytest.fixture
def stack_env(gcs: FakeGcs, gemini_thread: Any) -> dict[str, str]:
    """What a functions-framework process needs to use the local stack."""
    return {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_LOG_FORMAT": "json",
    }


@pytest.fixture
async def stub() -> AsyncIterator[Any]:
    """A fresh Gemini stand-in on the test's own loop (its state is the test's alone)."""
    from captioner_dev.gemini_server import GeminiStub

    async with GeminiStub() as server:
        yield server


@pytest.fixture
async def client(stub: Any) -> AsyncIterator[Any]:
    """The unmodified google-genai client, pointed at ``stub``."""
    from google import genai
    from google.genai import types

    gemini = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=stub.base_url))
    yield gemini
    await gemini.aio.aclose()


@pytest.fixture(scope="module")
def site() -> Iterator[Any]:
    """For URL-mode tests: a local site serving the sample images (tests.webserver)."""
    from tests.webserver import ImageSite

    server = ImageSite().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def internal() -> Iterator[Any]:
    """For URL-mode tests: a service on 127.0.0.1 that is not in the allowed list, which
    counts every request it gets (it must get none)."""
    from tests.webserver import CountingSite

    server = CountingSite().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Any]:
    """For URL-mode tests: a first hop the tests allow by name, which can redirect."""
    from tests.webserver import CountingSite

    server = CountingSite().start()
    yield server
    server.stop()

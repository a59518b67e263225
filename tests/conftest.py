"""Shared fixtures: the real local stack (fake-gcs-server process, Gemini stand-in)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from captioner.storage import StorageClient
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

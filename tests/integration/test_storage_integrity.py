"""What the storage adapter receives is what Cloud Storage holds, and who asks is known.

Downloads are checked against the object's CRC32C (as Google's clients do); a 401 is
answered with one token refresh and one resend. fake-gcs-server behind
tests.gcs_proxy, which corrupts, hides hashes and refuses on demand; credentials are
a real service-account key whose tokens come from a local token endpoint.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from captioner.adapters.storage import StorageClient
from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner_dev.threaded import ThreadedServer
from tests.gcs_proxy import GcsProxy

MEDIA = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


@pytest.fixture
async def storage(proxy: GcsProxy) -> AsyncIterator[StorageClient]:
    proxy.reset()
    async with aiohttp.ClientSession() as session:
        yield StorageClient(session, endpoint=proxy.url, emulator=True, attempts=3)


@pytest.fixture
def bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(f"integ-{uuid.uuid4().hex[:12]}")


def store(bucket: Any, name: str, data: bytes, content_encoding: str | None = None) -> int:
    blob = bucket.blob(name)
    blob.content_encoding = content_encoding
    blob.upload_from_string(data, content_type="image/jpeg")
    return int(blob.generation)


def media_gets(proxy: GcsProxy) -> list[Any]:
    return [r for r in proxy.recorded("GET") if r.query.get("alt") == "media"]


async def test_a_download_corrupted_once_is_fetched_again_and_is_the_stored_bytes(
    bucket: Any, storage: StorageClient, proxy: GcsProxy
) -> None:
    generation = store(bucket, "once.jpg", MEDIA)
    proxy.add_instruction("GET", "/o/once.jpg", "return-corrupted-data", query_contains="alt")
    data = await storage.download(bucket.name, "once.jpg", generation=generation, max_bytes=1 << 20)
    assert data == MEDIA
    assert len(media_gets(proxy)) == 2


async def test_a_download_corrupted_every_time_is_transient_after_a_second_fetch(
    bucket: Any, storage: StorageClient, proxy: GcsProxy
) -> None:
    generation = store(bucket, "always.jpg", MEDIA)
    for _ in range(5):
        proxy.add_instruction("GET", "/o/always.jpg", "return-corrupted-data", query_contains="alt")
    with pytest.raises(TransientError, match="did not match the object's checksum") as raised:
        await storage.download(bucket.name, "always.jpg", generation=generation, max_bytes=1 << 20)
    assert not isinstance(raised.value, ConfigurationError)
    assert len(media_gets(proxy)) == 2


async def test_without_x_goog_hash_the_object_resource_crc32c_is_the_reference(
    bucket: Any, storage: StorageClient, proxy: GcsProxy
) -> None:
    generation = store(bucket, "nohash.jpg", MEDIA)
    proxy.hide_hashes = True
    proxy.add_instruction("GET", "/o/nohash.jpg", "return-corrupted-data", query_contains="alt")
    data = await storage.download(
        bucket.name, "nohash.jpg", generation=generation, max_bytes=1 << 20
    )
    assert data == MEDIA
    lookups = [r for r in proxy.recorded("GET") if r.query.get("fields") == "crc32c"]
    # One look-up per fetch (the corrupted one, then the good one), at that generation.
    assert [r.query["generation"] for r in lookups] == [str(generation)] * 2


async def test_a_gzip_stored_object_is_checked_on_its_stored_bytes_then_decompressed(
    bucket: Any, storage: StorageClient, proxy: GcsProxy
) -> None:
    generation = store(bucket, "z.jpg", gzip.compress(MEDIA), content_encoding="gzip")
    # Corrupted in transit once: without the check this was a permanent
    # error:bad-content-encoding (the damaged gzip does not decode).
    proxy.add_instruction("GET", "/o/z.jpg", "return-corrupted-data", query_contains="alt")
    data = await storage.download(bucket.name, "z.jpg", generation=generation, max_bytes=1 << 20)
    assert data == MEDIA
    assert len(media_gets(proxy)) == 2


async def test_a_stored_object_whose_gzip_is_broken_is_permanent_once_its_checksum_matches(
    bucket: Any, storage: StorageClient
) -> None:
    generation = store(bucket, "badz.jpg", b"not gzip at all" * 10, content_encoding="gzip")
    with pytest.raises(PermanentError) as raised:
        await storage.download(bucket.name, "badz.jpg", generation=generation, max_bytes=1 << 20)
    assert raised.value.reason == "bad-content-encoding"


async def test_a_gzip_object_over_the_limit_once_decompressed_is_too_large(
    bucket: Any, storage: StorageClient
) -> None:
    generation = store(bucket, "bomb.jpg", gzip.compress(b"\0" * 100_000), content_encoding="gzip")
    with pytest.raises(PermanentError) as raised:
        await storage.download(bucket.name, "bomb.jpg", generation=generation, max_bytes=50_000)
    assert raised.value.reason == "too-large"


class TokenEndpoint(ThreadedServer):
    """An OAuth 2.0 token endpoint: every grant gets a new access token."""

    def __init__(self) -> None:
        super().__init__()
        self.issued = 0

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._grant)
        return app

    async def _grant(self, request: web.Request) -> web.Response:
        self.issued += 1
        return web.json_response(
            {"access_token": f"token-{self.issued}", "expires_in": 3600, "token_type": "Bearer"}
        )


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TokenEndpoint]:
    """A service-account key whose ``token_uri`` (honoured by google-auth) is local."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    endpoint = TokenEndpoint().start()
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "private_key_id": "test-key",
                "private_key": pem,
                "client_email": "captioner@test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"http://127.0.0.1:{endpoint.port}/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    yield endpoint
    endpoint.stop()


@pytest.fixture
async def with_credentials(
    proxy: GcsProxy, service_account: TokenEndpoint
) -> AsyncIterator[StorageClient]:
    proxy.reset()
    async with aiohttp.ClientSession() as session:
        yield StorageClient(session, endpoint=proxy.url, emulator=False, attempts=3)


async def test_a_401_gets_one_token_refresh_and_one_resend(
    bucket: Any, with_credentials: StorageClient, proxy: GcsProxy, service_account: TokenEndpoint
) -> None:
    store(bucket, "a.jpg", MEDIA)
    proxy.add_fault("GET", "/o/a.jpg", 401)
    info = await with_credentials.get_object(bucket.name, "a.jpg")
    assert info.name == "a.jpg"
    sent = [r.authorization for r in proxy.recorded("GET")]
    assert sent == ["Bearer token-1", "Bearer token-2"]
    assert service_account.issued == 2


async def test_a_401_after_the_refresh_is_a_configuration_error_naming_permission_and_bucket(
    bucket: Any, with_credentials: StorageClient, proxy: GcsProxy, service_account: TokenEndpoint
) -> None:
    store(bucket, "b.jpg", MEDIA)
    proxy.add_fault("GET", "/o/b.jpg", 401, count=10)
    with pytest.raises(ConfigurationError, match=f"storage.objects.get on bucket {bucket.name}"):
        await with_credentials.get_object(bucket.name, "b.jpg")
    assert len(proxy.recorded("GET")) == 2, "one resend after the refresh, no retries"
    assert service_account.issued == 2

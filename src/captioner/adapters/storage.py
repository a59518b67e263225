"""Cloud Storage adapter: the JSON API over aiohttp.

Honours ``STORAGE_EMULATOR_HOST`` the way google-cloud-storage does (no
credentials against an emulator); otherwise uses Application Default Credentials.
Every request here is idempotent (reads, and PATCHes guarded by generation and
metageneration preconditions), so transient failures are retried.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from captioner.adapters.bodies import read_capped
from captioner.domain import ObjectInfo, first_unencodable
from captioner.errors import (
    ConfigurationError,
    ObjectGoneError,
    PermanentError,
    PreconditionFailedError,
    TransientError,
)
from captioner.retrying import with_retries

PUBLIC_ENDPOINT = "https://storage.googleapis.com"
_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_OBJECT_FIELDS = "bucket,name,generation,metageneration,contentType,size,metadata"


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The API root and whether it is an emulator (``STORAGE_EMULATOR_HOST``)."""
    env = os.environ if environ is None else environ
    host = env.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return PUBLIC_ENDPOINT, False
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/"), True


def object_path(bucket: str, name: str) -> str:
    """``/b/{bucket}/o/{name}`` with the name encoded as one path segment.

    ``safe=""`` matters: ``/``, ``#``, ``?`` and ``%`` in names must all be escaped.
    """
    return f"/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"


class _Credentials:
    """Application Default Credentials, refreshed off the event loop when they expire."""

    def __init__(self) -> None:
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    async def header(self) -> dict[str, str]:
        async with self._lock:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(_default_credentials)
            if not self._credentials.valid:
                await asyncio.to_thread(_refresh, self._credentials)
            return {"Authorization": f"Bearer {self._credentials.token}"}


_NO_CREDENTIALS = (
    "no Google credentials for Cloud Storage: run `gcloud auth application-default login` "
    "(or set GOOGLE_APPLICATION_CREDENTIALS; STORAGE_EMULATOR_HOST for a local emulator)"
)


def _default_credentials() -> Any:
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.default(scopes=[_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigurationError(_NO_CREDENTIALS) from None
    return credentials


def _refresh(credentials: Any) -> None:
    import google.auth.exceptions
    import google.auth.transport.requests

    try:
        credentials.refresh(google.auth.transport.requests.Request())
    except google.auth.exceptions.RefreshError as exc:
        if getattr(exc, "retryable", False):  # google-auth marks 5xx and timeouts so
            raise TransientError(f"refreshing Google credentials failed: {exc}") from None
        # Revoked or expired user credentials, a deleted service account: the same
        # answer until someone logs in again.
        raise ConfigurationError(f"Google credentials cannot be refreshed: {exc}") from None


class StorageClient:
    """Reads, downloads, lists and patches objects. One per event loop."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
        emulator: bool,
        attempts: int = 5,
        request_timeout: float = 60.0,
    ) -> None:
        self._session = session
        self._api = endpoint.rstrip("/") + "/storage/v1"
        self._credentials = None if emulator else _Credentials()
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)

    @classmethod
    def from_env(cls, session: aiohttp.ClientSession, *, attempts: int = 5) -> StorageClient:
        endpoint, emulator = endpoint_from_env()
        return cls(session, endpoint=endpoint, emulator=emulator, attempts=attempts)

    @classmethod
    @asynccontextmanager
    async def opened(cls, *, attempts: int = 5) -> AsyncIterator[StorageClient]:
        """A client with a session of its own, for commands that need only Cloud Storage."""
        async with aiohttp.ClientSession() as session:
            yield cls.from_env(session, attempts=attempts)

    async def _headers(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        return await self._credentials.header()

    async def _retry(self, call: Any) -> Any:
        return await with_retries(call, attempts=self._attempts, deadline=None, wait_max=10.0)

    async def get_object(self, bucket: str, name: str) -> ObjectInfo:
        url = self._api + object_path(bucket, name)

        async def once() -> ObjectInfo:
            async with self._request("GET", url, params={"fields": _OBJECT_FIELDS}) as response:
                await _raise_for_status(response, f"gs://{bucket}/{name}")
                return _object_info(await response.json(content_type=None))

        result: ObjectInfo = await self._retry(once)
        return result

    async def download(self, bucket: str, name: str, *, generation: int, max_bytes: int) -> bytes:
        """The object's bytes at exactly ``generation``; refuses more than ``max_bytes``."""
        url = self._api + object_path(bucket, name)
        params = {"alt": "media", "generation": str(generation)}

        async def once() -> bytes:
            async with self._request("GET", url, params=params) as response:
                await _raise_for_status(response, f"gs://{bucket}/{name}#{generation}")
                return await read_capped(response, max_bytes)

        result: bytes = await self._retry(once)
        return result

    async def patch_metadata(
        self,
        bucket: str,
        name: str,
        metadata: Mapping[str, str],
        *,
        if_generation_match: int,
        if_metageneration_match: int | None,
    ) -> ObjectInfo:
        """Merge ``metadata`` into the object's custom metadata, under preconditions.

        Raises PreconditionFailedError on 412 (newer generation, or metadata changed).
        """
        url = self._api + object_path(bucket, name)
        params = {"ifGenerationMatch": str(if_generation_match), "fields": _OBJECT_FIELDS}
        if if_metageneration_match is not None:
            params["ifMetagenerationMatch"] = str(if_metageneration_match)
        body = json.dumps({"metadata": dict(metadata)})

        async def once() -> ObjectInfo:
            async with self._request(
                "PATCH",
                url,
                params=params,
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                await _raise_for_status(response, f"gs://{bucket}/{name}#{if_generation_match}")
                return _object_info(await response.json(content_type=None))

        result: ObjectInfo = await self._retry(once)
        return result

    async def list_objects(
        self, bucket: str, prefix: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix``, one page at a time (never the whole listing)."""
        if first_unencodable(prefix) is not None:
            # aiohttp would leave the parameter out and so list the whole bucket.
            raise PermanentError("bad-prefix", f"the prefix {prefix!r:.100} is not valid Unicode")
        url = self._api + f"/b/{quote(bucket, safe='')}/o"
        page_token: str | None = None
        while True:
            params = {
                "prefix": prefix,
                "maxResults": str(page_size),
                "fields": f"nextPageToken,items({_OBJECT_FIELDS})",
            }
            if page_token:
                params["pageToken"] = page_token

            async def once(params: dict[str, str] = params) -> dict[str, Any]:
                async with self._request("GET", url, params=params) as response:
                    await _raise_for_status(response, f"gs://{bucket}/{prefix}")
                    page: dict[str, Any] = await response.json(content_type=None)
                    return page

            page: dict[str, Any] = await self._retry(once)
            if not isinstance(page, dict) or not isinstance(page.get("items", []), list):
                raise TransientError(f"Cloud Storage sent an unreadable listing of gs://{bucket}")
            for item in page.get("items", []):
                yield _object_info(item)
            page_token = page.get("nextPageToken")
            if not page_token:
                return

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str],
        data: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Request:
        return _Request(self, method, url, params, data, dict(headers or {}))


class _Request:
    """Async context manager: one HTTP exchange, connection faults turned into TransientError."""

    def __init__(
        self,
        client: StorageClient,
        method: str,
        url: str,
        params: Mapping[str, str],
        data: str | None,
        headers: dict[str, str],
    ) -> None:
        self._client = client
        self._args = (method, url, params, data, headers)
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        method, url, params, data, headers = self._args
        headers = {**headers, **(await self._client._headers())}
        try:
            self._response = await self._client._session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=self._client._timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"Cloud Storage {method} failed: {exc!r}") from exc
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            self._response.release()
        # Every body read happens inside this block, so every way a body can be
        # unreadable is decided here, once: a body whose Content-Encoding does not
        # decode is this generation's bytes and will never read (permanent); a body
        # cut off, timed out, or that is not the JSON the API speaks (a proxy's HTML
        # page) may be fine on the next try (transient).
        method = self._args[0]
        if isinstance(exc, aiohttp.ClientPayloadError) and _bad_encoding(exc):
            raise PermanentError(
                "bad-content-encoding",
                f"the object's bytes do not decode as its Content-Encoding says: {exc}",
            ) from exc
        if isinstance(exc, aiohttp.ClientError | TimeoutError):
            raise TransientError(
                f"Cloud Storage {method}: the answer was cut off: {exc!r}"
            ) from exc
        if isinstance(exc, ValueError | AttributeError):
            raise TransientError(
                f"Cloud Storage {method}: the answer is not the JSON expected: {exc!r:.200}"
            ) from exc


def _bad_encoding(exc: aiohttp.ClientPayloadError) -> bool:
    """aiohttp reports a Content-Encoding that does not decode as a payload error whose
    cause (or text) is ``ContentEncodingError``."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "ContentEncodingError" or "content-encoding" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _raise_for_status(response: aiohttp.ClientResponse, what: str) -> None:
    status = response.status
    if status < 300:
        return
    try:
        detail = (await response.text(errors="replace"))[:300]
    except (aiohttp.ClientError, TimeoutError, ValueError):
        detail = ""
    if status == 404:
        raise ObjectGoneError(f"{what} does not exist (or not at that generation)")
    if status == 412:
        raise PreconditionFailedError(f"{what}: precondition failed")
    if status in _TRANSIENT_STATUS:
        raise TransientError(
            f"Cloud Storage answered {status} for {what}: {detail}",
            retry_after=_retry_after(response),
        )
    if status in (401, 403):
        # A missing IAM binding is fixed by the operator, not by giving up on the image.
        raise TransientError(
            f"Cloud Storage refused access ({status}) to {what}: {detail}. The runtime "
            "service account needs storage.objects.get and storage.objects.update on the bucket."
        )
    raise PermanentError(
        f"storage-{status}", f"Cloud Storage answered {status} for {what}: {detail}"
    )


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _object_info(item: Mapping[str, Any]) -> ObjectInfo:
    try:
        return ObjectInfo(
            bucket=str(item["bucket"]),
            name=str(item["name"]),
            generation=int(item["generation"]),
            metageneration=int(item.get("metageneration", 1)),
            content_type=str(item.get("contentType") or ""),
            size=int(item.get("size") or 0),
            metadata={
                str(k): "" if v is None else str(v) for k, v in (item.get("metadata") or {}).items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TransientError(f"Cloud Storage sent an unreadable object resource: {exc!r}") from exc

"""Cloud Storage adapter: the JSON API over aiohttp.

Honours ``STORAGE_EMULATOR_HOST`` the way google-cloud-storage does (no
credentials against an emulator); otherwise uses Application Default Credentials.

Retries follow Google's own clients (the conformance scenarios of
googleapis/conformance-tests, storage/v1/retry_tests.json): reads are retried on
408, 429, 500, 502, 503, 504 and dropped connections; a PATCH only when
``ifMetagenerationMatch`` makes it safe to repeat; 401 and 403 never (a missing
permission answers the same until someone grants it). Media downloads are checked
against the CRC32C that Cloud Storage holds, as Google's clients do.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from captioner.adapters.bodies import read_capped
from captioner.adapters.storage_media import Media, crc32c, decoded
from captioner.domain import ObjectInfo, first_unencodable
from captioner.errors import (
    ConfigurationError,
    NoSuchBucketError,
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
# The IAM permission each call needs, named in the message when it is refused.
_GET, _LIST, _UPDATE = "storage.objects.get", "storage.objects.list", "storage.objects.update"
_CREATE = "storage.objects.create"
# The stored bytes as they are: without it Cloud Storage decompresses an object stored
# with Content-Encoding: gzip on the way (decompressive transcoding), and sends bytes
# that the checksum it holds does not describe.
_MEDIA_HEADERS = {"Accept-Encoding": "gzip"}


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

    async def header(self, rejected: Mapping[str, str] | None = None) -> dict[str, str]:
        """The Authorization header; a new token if ``rejected`` (a header Cloud Storage
        answered 401 to) still carries the current one."""
        async with self._lock:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(_default_credentials)
            current = {"Authorization": f"Bearer {self._credentials.token}"}
            # Many requests may come back 401 on one token together: refresh it once.
            if not self._credentials.valid or rejected == current:
                await asyncio.to_thread(_refresh, self._credentials)
            return {"Authorization": f"Bearer {self._credentials.token}"}


NO_STORAGE_CREDENTIALS = (
    "no Google credentials for Cloud Storage: run `gcloud auth application-default login` "
    "(or set GOOGLE_APPLICATION_CREDENTIALS; STORAGE_EMULATOR_HOST for a local emulator)"
)


def _default_credentials() -> Any:
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.default(scopes=[_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigurationError(NO_STORAGE_CREDENTIALS) from None
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
        self._upload_api = endpoint.rstrip("/") + "/upload/storage/v1"
        self._credentials = None if emulator else _Credentials()
        self._emulator = emulator
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

    async def _headers(self, rejected: Mapping[str, str] | None = None) -> dict[str, str]:
        if self._credentials is None:
            return {}
        return await self._credentials.header(rejected)

    async def _retry(self, call: Any, *, attempts: int | None = None) -> Any:
        return await with_retries(
            call, attempts=attempts or self._attempts, deadline=None, wait_max=10.0
        )

    async def get_object(self, bucket: str, name: str) -> ObjectInfo:
        url = self._api + object_path(bucket, name)

        async def once() -> ObjectInfo:
            async with self._request("GET", url, params={"fields": _OBJECT_FIELDS}) as response:
                await _raise_for_status(response, f"gs://{bucket}/{name}", _GET, bucket)
                return _object_info(await response.json(content_type=None))

        result: ObjectInfo = await self._retry(once)
        return result

    async def download(self, bucket: str, name: str, *, generation: int, max_bytes: int) -> bytes:
        """The object's bytes at exactly ``generation``; refuses more than ``max_bytes``.

        The bytes are checked against the CRC32C Cloud Storage holds for the object.
        Bytes that do not match were damaged on the way, not stored that way, so they
        are fetched once more and then, if still wrong, a TransientError: never a
        verdict on the image. This always reads the whole object: ``x-goog-hash``
        describes the whole object, so a part (a ranged read, or the rest of a
        download resumed after a cut) could not be checked on its own; only the
        reassembled whole could. A download cut off is therefore fetched again from
        the start.
        """
        url = self._api + object_path(bucket, name)
        params = {"alt": "media", "generation": str(generation)}
        what = f"gs://{bucket}/{name}#{generation}"

        async def once() -> Media:
            async with self._request(
                "GET", url, params=params, headers=_MEDIA_HEADERS, decompress=False
            ) as response:
                await _raise_for_status(response, what, _GET, bucket)
                return Media.of(response, await read_capped(response, max_bytes))

        mismatch = ""
        for _ in range(2):  # damage on the way seldom strikes twice; more would hide a fault
            media: Media = await self._retry(once)
            expected = media.crc32c
            if expected is None and not media.transcoded:
                expected = await self._stored_crc32c(bucket, name, generation)
            actual = crc32c(media.body)
            if expected is None or media.transcoded or actual == expected:
                return await decoded(media, max_bytes)
            mismatch = f"CRC32C {actual} received, {expected} stored"
        raise TransientError(
            f"{what}: the bytes received twice did not match the object's checksum "
            f"({mismatch}): damaged on the way, to be fetched again later"
        )

    async def _stored_crc32c(self, bucket: str, name: str, generation: int) -> str | None:
        """The object resource's CRC32C, for an answer that came without ``x-goog-hash``."""
        url = self._api + object_path(bucket, name)
        params = {"generation": str(generation), "fields": "crc32c"}

        async def once() -> str | None:
            async with self._request("GET", url, params=params) as response:
                await _raise_for_status(
                    response, f"gs://{bucket}/{name}#{generation}", _GET, bucket
                )
                value = (await response.json(content_type=None)).get("crc32c")
                return value if isinstance(value, str) else None

        result: str | None = await self._retry(once)
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
        Without ``if_metageneration_match`` a transient failure is not retried: the
        first PATCH may have been applied, and only that precondition makes a second
        one harmless (Google's clients treat objects.patch as idempotent only then).
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
                what = f"gs://{bucket}/{name}#{if_generation_match}"
                await _raise_for_status(response, what, _UPDATE, bucket)
                return _object_info(await response.json(content_type=None))

        safe_to_repeat = if_metageneration_match is not None
        result: ObjectInfo = await self._retry(once, attempts=None if safe_to_repeat else 1)
        return result

    async def read_small(self, bucket: str, name: str, max_bytes: int) -> tuple[bytes, int] | None:
        """A small object of ours (a budget ledger): its bytes and generation, or None when
        there is none. Read at the generation its metadata names, checksum checked."""
        try:
            info = await self.get_object(bucket, name)
            return await self.download(
                bucket, name, generation=info.generation, max_bytes=max_bytes
            ), info.generation
        except ObjectGoneError:
            return None

    async def write_small(
        self, bucket: str, name: str, data: bytes, *, if_generation_match: int
    ) -> int:
        """Create or replace a small JSON object of ours only if it is still at
        ``if_generation_match`` (0: only if there is none); its new generation.
        PreconditionFailedError when another writer got there first. Sent once: a
        failure whose outcome is unknown is the caller's to treat as not written."""
        url = self._upload_api + f"/b/{quote(bucket, safe='')}/o"
        params = {
            "uploadType": "media",
            "name": name,
            "ifGenerationMatch": str(if_generation_match),
            "fields": "generation",
        }

        async def once() -> int:
            async with self._request(
                "POST",
                url,
                params=params,
                data=data.decode("utf-8"),
                headers={"Content-Type": "application/json"},
            ) as response:
                await _raise_for_status(response, f"gs://{bucket}/{name}", _CREATE, bucket)
                return int((await response.json(content_type=None))["generation"])

        generation: int = await self._retry(once, attempts=1)
        return generation

    async def list_objects(
        self, bucket: str, prefix: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix``, one page at a time (never the whole listing)."""
        page_token: str | None = None
        while True:
            page = await self.list_page(bucket, prefix, page_token, page_size=page_size)
            for item in page.items:
                yield item
            page_token = page.next_token
            if not page_token:
                return

    async def list_page(
        self,
        bucket: str,
        prefix: str = "",
        page_token: str | None = None,
        *,
        page_size: int = 1000,
        delimiter: str | None = None,
    ) -> ListPage:
        """One page of the listing from ``page_token`` on: what a reader that pages
        (``captioner review``) resumes from, without listing what came before it again.
        With ``delimiter``, the "folders" directly under ``prefix`` come as ``prefixes``."""
        if first_unencodable(prefix) is not None:
            # aiohttp would leave the parameter out and so list the whole bucket.
            raise PermanentError("bad-prefix", f"the prefix {prefix!r:.100} is not valid Unicode")
        url = self._api + f"/b/{quote(bucket, safe='')}/o"
        params = {
            "prefix": prefix,
            "maxResults": str(page_size),
            "fields": f"nextPageToken,prefixes,items({_OBJECT_FIELDS})",
        }
        if page_token:
            params["pageToken"] = page_token
        if delimiter:
            params["delimiter"] = delimiter

        async def once() -> dict[str, Any]:
            async with self._request("GET", url, params=params) as response:
                await _raise_for_status(response, f"gs://{bucket}/{prefix}", _LIST, bucket)
                page: dict[str, Any] = await response.json(content_type=None)
                return page

        try:
            page: dict[str, Any] = await self._retry(once)
        except ObjectGoneError:
            # A listing answers 404 only when the bucket is not there.
            raise NoSuchBucketError(_no_such_bucket(bucket, self._emulator)) from None
        return ListPage.of(page, bucket)

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str],
        data: str | None = None,
        headers: Mapping[str, str] | None = None,
        decompress: bool = True,
    ) -> _Request:
        return _Request(self, method, url, params, data, dict(headers or {}), decompress)


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
        decompress: bool,
    ) -> None:
        self._client = client
        self._args = (method, url, params, data, headers)
        self._decompress = decompress
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        auth = await self._client._headers()
        self._response = await self._send(auth)
        if self._response.status == 401 and auth:
            # A token can be revoked or expire early: one refresh and one resend, as
            # google-auth's own transports do. A second 401 is for the operator.
            self._response.release()
            self._response = await self._send(await self._client._headers(rejected=auth))
        return self._response

    async def _send(self, auth: Mapping[str, str]) -> aiohttp.ClientResponse:
        method, url, params, data, headers = self._args
        try:
            return await self._client._session.request(
                method,
                url,
                params=params,
                data=data,
                headers={**headers, **auth},
                timeout=self._client._timeout,
                auto_decompress=self._decompress,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"Cloud Storage {method} failed: {exc!r}") from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            self._response.release()
        # Every body read happens inside this block, so every way a body can be
        # unreadable is decided here, once: a body cut off, timed out, not decoding as
        # its Content-Encoding says, or that is not the JSON the API speaks (a proxy's
        # HTML page) may be fine on the next try (transient). Media bytes arrive
        # undecoded; whether their encoding is broken is decided once their checksum
        # says they are the stored bytes (decoded).
        method = self._args[0]
        if isinstance(exc, aiohttp.ClientError | TimeoutError):
            raise TransientError(
                f"Cloud Storage {method}: the answer was cut off: {exc!r}"
            ) from exc
        if isinstance(exc, ValueError | AttributeError):
            raise TransientError(
                f"Cloud Storage {method}: the answer is not the JSON expected: {exc!r:.200}"
            ) from exc


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a listing, and the token of the next (None: it was the last)."""

    items: tuple[ObjectInfo, ...]
    next_token: str | None
    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, page: Any, bucket: str) -> ListPage:
        if not isinstance(page, dict) or not isinstance(page.get("items", []), list):
            raise TransientError(f"Cloud Storage sent an unreadable listing of gs://{bucket}")
        token = page.get("nextPageToken")
        prefixes = page.get("prefixes", [])
        return cls(
            tuple(_object_info(item) for item in page.get("items", [])),
            token if isinstance(token, str) and token else None,
            tuple(str(p) for p in prefixes) if isinstance(prefixes, list) else (),
        )


def _no_such_bucket(bucket: str, emulator: bool) -> str:
    where = " in the emulator at STORAGE_EMULATOR_HOST" if emulator else ""
    return f"no such bucket: gs://{bucket}/{where} (check its name)"


async def bucket_exists(storage: StorageClient, bucket: str) -> bool:
    """Whether ``bucket`` is there (an object's 404 does not say which is missing)."""
    try:
        async for _ in storage.list_objects(bucket, "", page_size=1):
            break
    except NoSuchBucketError:
        return False
    return True


async def _raise_for_status(
    response: aiohttp.ClientResponse, what: str, permission: str, bucket: str
) -> None:
    """``permission`` on ``bucket`` is what the call needs, named if it is refused."""
    status = response.status
    if status < 300:
        return
    try:
        detail = _one_line(await response.text(errors="replace"))
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
    if status == 401:
        # Fixed by the operator, not by giving up on the image nor by asking again.
        raise ConfigurationError(
            f"Cloud Storage did not accept our credentials (401) for {what}, which needs "
            f"{permission} on bucket {bucket}: check the identity the function runs as "
            f"(GOOGLE_APPLICATION_CREDENTIALS, the runtime service account). {detail}"
        )
    if status == 403:
        raise ConfigurationError(
            f"Cloud Storage refused {permission} on bucket {bucket} (403) for {what}: "
            f"grant it to the identity the function runs as. {detail}"
        )
    raise PermanentError(
        f"storage-{status}", f"Cloud Storage answered {status} for {what}: {detail}"
    )


def _one_line(text: str) -> str:
    """An error body as one short line: the API's ``error.message`` when it is JSON."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        message = text
    return " ".join(str(message).split())[:300]


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

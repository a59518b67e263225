"""Vertex AI batch prediction and the large files around it (google-genai,
google-cloud-storage).

Which Cloud Storage client where, and why:

- Listing, reading one object's metadata and the caption PATCH stay on the async JSON
  client (``adapters/storage.py``): many small requests at high concurrency on the
  event loop, the same code and preconditions as the online path.
- Request shards (up to 1 GB each) and job outputs (a line per image) go through
  google-cloud-storage, here only: it does resumable uploads (``Blob.open("wb")``) and
  ranged, chunked downloads (``Blob.open("rb")``) that we should not write again. It is
  synchronous, so every call runs in a thread (``asyncio.to_thread``), and it is
  imported lazily: it costs about 165 ms to import, which the upload function's cold
  start does not need to pay.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.genai import errors as genai_errors
from google.genai import types

from captioner.adapters.gemini import GeminiDescriber, _description, make_client
from captioner.adapters.gemini_errors import NO_CREDENTIALS, classify
from captioner.adapters.storage import NO_STORAGE_CREDENTIALS, endpoint_from_env
from captioner.batch_jobs import (
    LABEL,
    BatchJobs,
    BatchLimits,
    JobStatus,
    JsonTemplate,
    Manifest,
    StoredFile,
)
from captioner.captions import CaptionSpec
from captioner.domain import Description
from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.metadata import MetadataKeys
from captioner.models import counts_pixels
from captioner.recording import Recorder

if TYPE_CHECKING:
    from google import genai

    from captioner.adapters.storage import StorageClient
    from captioner.settings import Settings

NEEDS_VERTEX = (
    "batch jobs need Vertex AI: set GOOGLE_GENAI_USE_VERTEXAI=true, GOOGLE_CLOUD_PROJECT "
    "and GOOGLE_CLOUD_LOCATION. The Gemini API's own batch mode (an API key) takes its "
    "requests inline or from an uploaded file and cannot read gs:// images, so every image "
    "would have to be downloaded and sent through this machine; use `captioner backfill`"
)
# Shards are uploaded in chunks of this size (a multiple of 256 KiB, as resumable
# uploads require): memory stays at one chunk whatever the shard's size.
_UPLOAD_CHUNK = 8 * 1024 * 1024
_READ_CHUNK = 4 * 1024 * 1024
# Lines are handed to the shard writer's thread in pieces of about this size.
_WRITE_BUFFER = 1024 * 1024
_TRUE = frozenset({"1", "true", "yes", "on"})  # as make_client reads the variable
# A manifest or checkpoint is a few KiB; a "JSON file" larger than this was not ours.
_MAX_JSON_BYTES = 16 * 1024 * 1024


# ---------------------------------------------------------------- requests and answers


def template_for(describer: GeminiDescriber, client: genai.Client) -> Any:
    """``CaptionSpec`` → the generateContent body the online path would send, with the
    image as a gs:// fileData part: built by ``GeminiDescriber.request_for`` (the online
    path's own builder) and turned into the REST body by google-genai's own converter,
    the one ``client.aio.models.generate_content`` uses for Vertex AI."""
    from google.genai import _common
    from google.genai.models import _GenerateContentParameters_to_vertex

    def build(spec: CaptionSpec) -> JsonTemplate:
        placeholder = JsonTemplate("")
        part = types.Part.from_uri(
            file_uri=placeholder.uri_placeholder, mime_type=placeholder.mime_placeholder
        )
        contents, config = describer.request_for(part, spec)
        parameters = types._GenerateContentParameters(
            model=describer.model, contents=contents, config=config
        )
        body = _GenerateContentParameters_to_vertex(
            client._api_client, parameters, None, parameters
        )
        for internal in ("_url", "_query", "config"):
            body.pop(internal, None)
        body = _common.encode_unserializable_types(_common.convert_to_dict(body))
        # The key's digest in the request's own labels, which Vertex AI echoes with the
        # request in each output line (keys.LABEL says why a digest).
        body["labels"] = {LABEL: placeholder.label_placeholder}
        return JsonTemplate(json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    return build


def read_answer(response: Mapping[str, Any], model: str) -> Description:
    """A batch output's ``response`` (a GenerateContentResponse in Vertex AI's JSON), read
    by the online path's own reader: finish reasons, blocks and usage alike."""
    from google.genai.models import _GenerateContentResponse_from_vertex

    try:
        converted = _GenerateContentResponse_from_vertex(dict(response), None, None)
        parsed = types.GenerateContentResponse._from_response(response=converted, kwargs={})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TransientError(f"Gemini's answer could not be read: {str(exc)[:200]}") from exc
    return _description(parsed, model)


def read_status(status: Any) -> Exception:
    """A batch output's error ``status`` as the error the online path would raise for the
    same answer. Vertex AI does not document its form, so each one seen is read: a
    google.rpc.Status object (``{"code": 14, "message": …}``: a gRPC code), an HTTP error
    body (``{"error": {"code": 503, "status": "UNAVAILABLE", …}}``), or either as text
    after a reason (``"Service Unavailable: {…}"``). A status that is none of these is
    left for the next run (transient), never recorded on the image."""
    body: Any = status
    if isinstance(status, str):
        start = status.find("{")
        try:
            body = json.loads(status[start:]) if start >= 0 else {"message": status}
        except (ValueError, RecursionError):
            body = {"message": status}
    inner = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        return TransientError(
            f"Gemini's batch answer is an error of no known form: {status!r:.300}"
        )
    code, name = inner.get("code"), inner.get("status")
    message = inner.get("message")
    message = message if isinstance(message, str) else repr(message)[:300]
    if isinstance(name, str) and name in _HTTP_OF_STATUS:
        http = _HTTP_OF_STATUS[name]
    elif isinstance(code, int) and not isinstance(code, bool) and code in _HTTP_OF_RPC:
        http = _HTTP_OF_RPC[code]  # 0-16: a google.rpc.Code, not an HTTP status
        name = _RPC_NAMES[code]
    elif isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        http = code
    else:
        return TransientError(f"Gemini's batch answer is an error without a code: {status!r:.300}")
    error = {"code": http, "message": message, "status": name if isinstance(name, str) else ""}
    details = inner.get("details")
    if isinstance(details, list):
        error["details"] = details
    return classify(genai_errors.APIError(http, {"error": error}))


# google.rpc.Code → HTTP, as Google's APIs map them (google/rpc/code.proto).
_RPC_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
_HTTP_OF_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}  # fmt: skip
_HTTP_OF_RPC = {number: _HTTP_OF_STATUS[name] for number, name in enumerate(_RPC_NAMES)}


# ---------------------------------------------------------------- jobs


def _state(job: types.BatchJob) -> str:
    name = job.state.name if job.state is not None else "JOB_STATE_UNSPECIFIED"
    return name.removeprefix("JOB_STATE_")


def job_status(job: types.BatchJob) -> JobStatus:
    stats = job.completion_stats
    return JobStatus(
        name=job.name or "",
        state=_state(job),
        source=job.src.gcs_uri[0] if job.src is not None and job.src.gcs_uri else None,
        dest=job.dest.gcs_uri if job.dest is not None else None,
        output_dir=job.output_info.gcs_output_directory if job.output_info else None,
        error=job.error.message if job.error is not None else None,
        succeeded=stats.successful_count if stats else None,
        failed=stats.failed_count if stats else None,
        incomplete=stats.incomplete_count if stats else None,
        created=job.create_time,
        ended_at=job.end_time,
        display_name=job.display_name,
    )


class VertexJobs:
    """``client.aio.batches``: create a job per shard, read one's state, cancel one."""

    def __init__(self, client: genai.Client) -> None:
        if not client.vertexai:
            raise ConfigurationError(NEEDS_VERTEX)
        self._client = client

    async def create(self, *, model: str, source: str, dest: str, display_name: str) -> JobStatus:
        config = types.CreateBatchJobConfig(dest=dest, display_name=display_name)
        with _answered_as_ours():
            job = await self._client.aio.batches.create(model=model, src=source, config=config)
        return job_status(job)

    async def get(self, name: str) -> JobStatus:
        with _answered_as_ours(not_found=f"no batch job {name}"):
            job = await self._client.aio.batches.get(name=name)
        return job_status(job)

    async def cancel(self, name: str) -> None:
        with _answered_as_ours(not_found=f"no batch job {name}"):
            await self._client.aio.batches.cancel(name=name)


@contextmanager
def _answered_as_ours(not_found: str | None = None) -> Iterator[None]:
    """Vertex AI's errors as ours: classified as the online path classifies them, and no
    credentials (found only when the first call needs a token) as one line to fix it."""
    import google.auth.exceptions

    try:
        yield
    except genai_errors.APIError as exc:
        if exc.code == 404 and not_found is not None:
            raise PermanentError("no-such-job", not_found) from exc
        raise classify(exc) from exc
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigurationError(NO_CREDENTIALS) from None
    except google.auth.exceptions.RefreshError as exc:
        raise ConfigurationError(f"Google credentials cannot be refreshed: {exc}") from None


# ---------------------------------------------------------------- large files


def storage_client() -> Any:
    """google-cloud-storage, honouring STORAGE_EMULATOR_HOST like adapters/storage.py."""
    from google.cloud.storage import Client

    endpoint, emulator = endpoint_from_env()
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return Client(
            project="local",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": endpoint},
        )
    import google.auth.exceptions

    try:
        return Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigurationError(NO_STORAGE_CREDENTIALS) from None


class _ShardWriter:
    """A resumable upload fed from the event loop: lines are gathered into about 1 MiB
    and written by a thread, so the loop never waits on the network."""

    def __init__(self, client: Any, bucket: str, name: str, content_type: str) -> None:
        self._blob = client.bucket(bucket).blob(name, chunk_size=_UPLOAD_CHUNK)
        self._content_type = content_type
        self._file: Any = None
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _WRITE_BUFFER:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if self._file is None:
            self._file = await asyncio.to_thread(
                self._blob.open, "wb", content_type=self._content_type, ignore_flush=True
            )
        await asyncio.to_thread(self._file.write, data)

    async def close(self) -> None:
        await self._flush()
        await asyncio.to_thread(self._file.close)


class GcsBlobs:
    """Shards, outputs, manifests and checkpoints, through google-cloud-storage in threads.

    The client is made on first use: a dry run, which never touches these files, then
    needs no more than the listing's own credentials."""

    def __init__(self, client: Any = None) -> None:
        self._made = client

    @property
    def _client(self) -> Any:
        if self._made is None:
            self._made = storage_client()
        return self._made

    def writer(self, bucket: str, name: str, content_type: str) -> _ShardWriter:
        return _ShardWriter(self._client, bucket, name, content_type)

    async def read_json(self, bucket: str, name: str) -> Any:
        """The parsed file, None when there is none; ValueError for one that is not JSON
        or is larger than any file of ours (read no further than that)."""
        from google.cloud import exceptions

        blob = self._client.bucket(bucket).blob(name)
        try:
            data = await asyncio.to_thread(blob.download_as_bytes, end=_MAX_JSON_BYTES)
        except exceptions.NotFound:
            return None
        if len(data) > _MAX_JSON_BYTES:
            raise ValueError(f"over {_MAX_JSON_BYTES} bytes")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(str(exc)[:200]) from None

    async def write_json(self, bucket: str, name: str, data: Mapping[str, Any]) -> None:
        blob = self._client.bucket(bucket).blob(name)
        text = json.dumps(data, ensure_ascii=False, indent=1)
        await asyncio.to_thread(blob.upload_from_string, text, content_type="application/json")

    async def files(self, bucket: str, prefix: str) -> list[StoredFile]:
        def listed() -> list[StoredFile]:
            return [_stored(b) for b in self._client.list_blobs(bucket, prefix=prefix)]

        return await asyncio.to_thread(listed)

    async def stat(self, bucket: str, name: str) -> StoredFile | None:
        blob = await asyncio.to_thread(self._client.bucket(bucket).get_blob, name)
        return None if blob is None else _stored(blob)

    async def delete(self, bucket: str, name: str) -> None:
        from google.cloud import exceptions

        with suppress(exceptions.NotFound):
            await asyncio.to_thread(self._client.bucket(bucket).blob(name).delete)

    async def head(self, bucket: str, name: str, max_bytes: int) -> bytes:
        blob = self._client.bucket(bucket).blob(name)
        data: bytes = await asyncio.to_thread(blob.download_as_bytes, start=0, end=max_bytes - 1)
        return data

    async def lines(
        self, bucket: str, name: str, offset: int, max_line: int
    ) -> AsyncIterator[tuple[int, bytes | None]]:
        """Lines from byte ``offset`` on, read 4 MiB at a time: a file of 200,000 answers
        never sits in memory, nor does a line over ``max_line`` bytes (None instead)."""
        blob = self._client.bucket(bucket).blob(name)
        reader = await asyncio.to_thread(blob.open, "rb", chunk_size=_READ_CHUNK)
        try:
            if offset:
                await asyncio.to_thread(reader.seek, offset)
            splitter = _LineSplitter(offset, max_line)
            while chunk := await asyncio.to_thread(reader.read, _READ_CHUNK):
                for item in splitter.feed(chunk):
                    yield item
            for item in splitter.end():
                yield item
        finally:
            await asyncio.to_thread(reader.close)


def _stored(blob: Any) -> StoredFile:
    # Cloud Storage always sets timeCreated; were it missing, "now" is the safe reading
    # (a file cannot then pass for one written before a job ended).
    created = blob.time_created or datetime.now(UTC)
    return StoredFile(blob.name, created, int(blob.size or 0))


class _LineSplitter:
    """Bytes in, (offset past the line, the line or None when over the cap) out."""

    def __init__(self, offset: int, max_line: int) -> None:
        self._position = offset
        self._max = max_line
        self._rest = b""
        self._skipping = False  # inside a line already over the cap

    def feed(self, chunk: bytes) -> list[tuple[int, bytes | None]]:
        data, start = self._rest + chunk, 0
        found: list[tuple[int, bytes | None]] = []
        while (end := data.find(b"\n", start)) >= 0:
            self._position += end + 1 - start
            if self._skipping or end - start > self._max:
                found.append((self._position, None))
            elif end > start:
                found.append((self._position, data[start:end]))
            self._skipping = False
            start = end + 1
        self._rest = data[start:]
        if len(self._rest) > self._max:  # drop the long line's bytes as they come
            self._position += len(self._rest)
            self._rest, self._skipping = b"", True
        return found

    def end(self) -> list[tuple[int, bytes | None]]:
        if self._skipping:
            return [(self._position + len(self._rest), None)]
        if self._rest.strip():
            return [(self._position + len(self._rest), self._rest)]
        return []


# ---------------------------------------------------------------- wiring


def gemini_client(settings: Settings) -> genai.Client:
    """The Vertex AI client, authenticated exactly as the online path's: Application
    Default Credentials, whatever ``GOOGLE_GEMINI_BASE_URL`` points at."""
    if os.environ.get("GOOGLE_GENAI_USE_VERTEXAI", "").strip().lower() not in _TRUE:
        raise ConfigurationError(NEEDS_VERTEX)  # before asking for an API key it cannot use
    client = make_client(settings.call_timeout)
    if not client.vertexai:
        raise ConfigurationError(NEEDS_VERTEX)
    return client


@asynccontextmanager
async def opened(settings: Settings, *, needs_vertex: bool) -> AsyncIterator[BatchJobs]:
    """BatchJobs on fresh clients; ``needs_vertex`` False for a dry run (no Gemini)."""
    from captioner.adapters.storage import StorageClient
    from captioner.runtime import Runtime

    client = gemini_client(settings) if needs_vertex else None
    try:
        async with StorageClient.opened(attempts=settings.storage_attempts) as storage:
            yield _batch_jobs(settings, storage, client, Runtime(settings))
    finally:
        if client is not None:
            await client.aio.aclose()


def _batch_jobs(
    settings: Settings, storage: StorageClient, client: genai.Client | None, runtime: Any
) -> BatchJobs:
    s = settings
    # Builds the request lines only (request_for): it never calls Gemini itself.
    describer = (
        None if client is None else GeminiDescriber.from_settings(client, s, tier="standard")
    )

    def recorder_for(manifest: Manifest) -> Recorder:
        # The model of the run, as the online path records its configured model.
        return Recorder(storage, manifest.keys, manifest.model)

    return BatchJobs(
        lister=storage,
        recorder_for=recorder_for,
        blobs=GcsBlobs(),
        jobs=None if client is None else VertexJobs(client),
        template_for=None
        if describer is None or client is None
        else template_for(describer, client),
        read_answer=read_answer,
        read_status=read_status,
        model=s.model,
        rules=s.rule_book(),
        keys=MetadataKeys(s.metadata_prefix, s.languages),
        batch_prefix=s.batch_prefix,
        limits=BatchLimits(s.batch_max_requests, s.batch_max_bytes),
        max_bytes=s.max_bytes,
        estimate=runtime.estimated_usage(),
        concurrency=s.batch_apply_concurrency,
        checkpoint_every=s.batch_checkpoint_seconds,
        prices=s.price_book(),
        image_size=image_size,
        pixels_billed=counts_pixels(s.model, s.media_resolution),
    )


def image_size(head: bytes) -> tuple[int, int] | None:
    """An image's size from its first bytes (Pillow reads only the header), or None.
    Only a number for an estimate: nothing is decoded, and bytes Pillow cannot read say
    nothing rather than fail the dry run."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
    except Exception:  # any bytes: an unreadable header only leaves this image out
        return None
    return (width, height) if width > 0 and height > 0 else None

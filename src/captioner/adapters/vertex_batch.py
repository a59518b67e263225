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
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from google.genai import errors as genai_errors
from google.genai import types

from captioner.adapters.gemini import (
    GeminiDescriber,
    _classify,
    _description,
    make_client,
)
from captioner.adapters.storage import endpoint_from_env
from captioner.batch_jobs import BatchJobs, BatchLimits, JobStatus, JsonTemplate, Manifest
from captioner.captions import CaptionSpec
from captioner.domain import Description
from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.metadata import MetadataKeys
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
    same answer: a google.rpc.Status object, or its text (``"Bad Request: {...}"``)."""
    body: Any = status
    if isinstance(status, str):
        start = status.find("{")
        try:
            body = json.loads(status[start:]) if start >= 0 else {"message": status}
        except ValueError:
            body = {"message": status}
    if not isinstance(body, dict):
        body = {"message": str(status)}
    inner = body.get("error", body)
    code = inner.get("code") if isinstance(inner, dict) else None
    if not isinstance(code, int):
        return TransientError(f"Gemini's batch answer is an error without a code: {status!r:.300}")
    return _classify(genai_errors.APIError(code, {"error": inner}))


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
    )


class VertexJobs:
    """``client.aio.batches``: create a job per shard, and read one's state."""

    def __init__(self, client: genai.Client) -> None:
        if not client.vertexai:
            raise ConfigurationError(NEEDS_VERTEX)
        self._client = client

    async def create(self, *, model: str, source: str, dest: str, display_name: str) -> JobStatus:
        config = types.CreateBatchJobConfig(dest=dest, display_name=display_name)
        try:
            job = await self._client.aio.batches.create(model=model, src=source, config=config)
        except genai_errors.APIError as exc:
            raise _classify(exc) from exc
        return job_status(job)

    async def get(self, name: str) -> JobStatus:
        try:
            job = await self._client.aio.batches.get(name=name)
        except genai_errors.APIError as exc:
            if exc.code == 404:
                raise PermanentError("no-such-job", f"no batch job {name}") from exc
            raise _classify(exc) from exc
        return job_status(job)


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
    return Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))


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
    """Shards, outputs, manifests and checkpoints, through google-cloud-storage in threads."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def writer(self, bucket: str, name: str, content_type: str) -> _ShardWriter:
        return _ShardWriter(self._client, bucket, name, content_type)

    async def read_json(self, bucket: str, name: str) -> dict[str, Any] | None:
        from google.cloud import exceptions

        blob = self._client.bucket(bucket).blob(name)
        try:
            data = await asyncio.to_thread(blob.download_as_bytes)
        except exceptions.NotFound:
            return None
        value = json.loads(data)
        return value if isinstance(value, dict) else None

    async def write_json(self, bucket: str, name: str, data: Mapping[str, Any]) -> None:
        blob = self._client.bucket(bucket).blob(name)
        text = json.dumps(data, ensure_ascii=False, indent=1)
        await asyncio.to_thread(blob.upload_from_string, text, content_type="application/json")

    async def names(self, bucket: str, prefix: str) -> list[str]:
        def listed() -> list[str]:
            return [b.name for b in self._client.list_blobs(bucket, prefix=prefix)]

        return await asyncio.to_thread(listed)

    async def lines(self, bucket: str, name: str, offset: int) -> AsyncIterator[tuple[int, bytes]]:
        """Lines from byte ``offset`` on, read 4 MiB at a time: a file of 200,000 answers
        never sits in memory."""
        blob = self._client.bucket(bucket).blob(name)
        reader = await asyncio.to_thread(blob.open, "rb", chunk_size=_READ_CHUNK)
        try:
            if offset:
                await asyncio.to_thread(reader.seek, offset)
            position, rest = offset, b""
            while True:
                chunk = await asyncio.to_thread(reader.read, _READ_CHUNK)
                if not chunk:
                    break
                data = rest + chunk
                start = 0
                while (end := data.find(b"\n", start)) >= 0:
                    position += end + 1 - start
                    if end > start:
                        yield position, data[start:end]
                    start = end + 1
                rest = data[start:]
            if rest.strip():
                yield position + len(rest), rest
        finally:
            await asyncio.to_thread(reader.close)


# ---------------------------------------------------------------- wiring


def _local_base_url(env: Mapping[str, str]) -> bool:
    """A Gemini base URL on this machine (a local stand-in) needs no Google credentials."""
    host = urlsplit(env.get("GOOGLE_GEMINI_BASE_URL") or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def gemini_client(settings: Settings) -> genai.Client:
    env = os.environ
    credentials = None
    if _local_base_url(env):
        from google.oauth2.credentials import Credentials

        credentials = Credentials(token="local")  # type: ignore[no-untyped-call]
    client = make_client(settings.gemini_timeout, env, credentials=credentials)
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
    describer = None if client is None else GeminiDescriber.from_settings(client, s)

    def recorder_for(manifest: Manifest) -> Recorder:
        # The model of the run, as the online path records its configured model.
        return Recorder(storage, manifest.keys, manifest.model)

    return BatchJobs(
        lister=storage,
        recorder_for=recorder_for,
        blobs=GcsBlobs(storage_client()),
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
    )

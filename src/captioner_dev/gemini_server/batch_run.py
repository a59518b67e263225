"""Running one emulated batch prediction job: its stages, its input and output in Cloud Storage
(fake-gcs-server's JSON API, over plain HTTP), and each line answered by the online code path.

Input and output, as Vertex AI documents them for Gemini
(https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-from-cloud-storage):
each input line is ``{"request": <GenerateContentRequest>, …other fields}``, images referenced
as ``{"fileData": {"fileUri": "gs://…", "mimeType": …}}``; the output is a directory
``prediction-model-<job create time, ISO 8601>`` under ``outputUriPrefix`` (the OutputConfig
reference: "prediction-<model-display-name>-<job-create-time>"; ``outputInfo.gcsOutputDirectory``
names it, and BerriAI/litellm reads ``<gcsOutputDirectory>/predictions.jsonl``) holding
``predictions.jsonl``: each line is the input line (``request`` and the other fields) with
``status`` ("" when it succeeded), ``processed_time`` and, for a success, ``response`` (a
GenerateContentResponse). A failed line's ``status`` is the stand-in's rendering of the
online error, ``"<HTTP reason>: <the online error JSON>"`` (the exact text Vertex AI puts
there is not documented; this one keeps the code, status and message readable).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from captioner_dev.gemini_server.answer import Answerer, Outcome
from captioner_dev.gemini_server.batch import (
    RPC_DEADLINE_EXCEEDED,
    RPC_INTERNAL,
    RPC_INVALID_ARGUMENT,
    BatchJob,
    BatchSettings,
)
from captioner_dev.gemini_server.records import RequestRecord
from captioner_dev.gemini_server.tokens import thinking_tokens_for
from captioner_dev.gemini_server.wire import (
    ApiError,
    ParsedRequest,
    dumps,
    get_field,
    parse_generate_request,
)


class GcsError(Exception):
    """A Cloud Storage read or write that did not work."""


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → (``bucket``, ``a/b``)."""
    if not uri.startswith("gs://"):
        raise GcsError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise GcsError(f"no bucket in {uri!r}")
    return bucket, name


class GcsClient:
    """The two calls the emulator needs from fake-gcs-server's JSON API."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str) -> None:
        self._session = session
        self._endpoint = (endpoint if "://" in endpoint else f"http://{endpoint}").rstrip("/")

    async def read(self, uri: str) -> bytes:
        bucket, name = split_gs_uri(uri)
        url = f"{self._endpoint}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        async with self._session.get(url, params={"alt": "media"}) as response:
            if response.status != 200:
                raise GcsError(f"{uri}: HTTP {response.status}")
            return await response.read()

    async def write(self, uri: str, data: bytes, content_type: str) -> None:
        bucket, name = split_gs_uri(uri)
        url = f"{self._endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        params = {"uploadType": "media", "name": name}
        headers = {"Content-Type": content_type}
        async with self._session.post(url, params=params, data=data, headers=headers) as response:
            if response.status != 200:
                raise GcsError(f"{uri}: HTTP {response.status} {(await response.text())[:200]}")


# HTTP status → google.rpc.Code (google/rpc/code.proto's HTTP mapping), for "rpc" statuses.
_RPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 429: 8, 499: 1, 500: 13, 501: 12,
             503: 14, 504: 4}  # fmt: skip


def failed_status(outcome: Outcome, form: str) -> Any:
    """A failed line's ``status`` in the form configured (batch.StatusForm)."""
    if form != "rpc":
        return status_text(outcome)
    error = outcome.body.get("error", {}) if isinstance(outcome.body, dict) else {}
    status: dict[str, Any] = {
        "code": _RPC_CODE.get(outcome.status, 2),  # 2: UNKNOWN
        "message": str(error.get("message", "")),
    }
    if error.get("details"):
        status["details"] = error["details"]
    return status


def status_text(outcome: Outcome) -> str:
    """A failed line's ``status``: the HTTP reason and the online error body."""
    try:
        reason = http.HTTPStatus(outcome.status).phrase
    except ValueError:
        reason = "Client Closed Request" if outcome.status == 499 else "Error"
    return f"{reason}: {json.dumps(outcome.body, ensure_ascii=False)}"


def rpc_error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


class BatchRunner:
    """Moves jobs through their stages and answers their lines."""

    def __init__(
        self,
        settings: BatchSettings,
        answerer: Answerer,
        sleep: Callable[[float], Awaitable[bool]],
        storage_endpoint: Callable[[], str | None],
    ) -> None:
        self._settings = settings
        self._answerer = answerer
        self._sleep = sleep
        self._storage_endpoint = storage_endpoint

    async def run(self, job: BatchJob) -> None:
        try:
            await self._lifecycle(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an emulator bug must not leave a job running forever
            self._finish(job, "JOB_STATE_FAILED", rpc_error(RPC_INTERNAL, repr(exc)))

    async def _lifecycle(self, job: BatchJob) -> None:
        if not await self._advance(job, "JOB_STATE_PENDING"):
            return
        rule = self._settings.take_job_fault([job.display_name, job.model, *job.input_uris])
        with self._settings.lock:
            job.fault = rule.outcome if rule else None
        if rule is not None and rule.outcome == "EXPIRED":
            if not await self._sleep(self._settings.stage_seconds):
                message = rule.message or "The job expired before it could run."
                self._finish(job, "JOB_STATE_EXPIRED", rpc_error(RPC_DEADLINE_EXCEEDED, message))
            return
        if not await self._advance(job, "JOB_STATE_RUNNING"):
            return
        if rule is not None and rule.outcome == "FAILED":
            if not await self._sleep(self._settings.stage_seconds):
                message = rule.message or "Internal error occurred. Please retry the job."
                self._finish(job, "JOB_STATE_FAILED", rpc_error(RPC_INTERNAL, message))
            return
        endpoint = self._storage_endpoint()
        if not endpoint:
            message = "The stand-in cannot reach Cloud Storage: STORAGE_EMULATOR_HOST is not set."
            self._finish(job, "JOB_STATE_FAILED", rpc_error(RPC_INVALID_ARGUMENT, message))
            return
        async with aiohttp.ClientSession() as session:
            await self._process(job, GcsClient(session, endpoint), partial=rule is not None)

    async def _process(self, job: BatchJob, gcs: GcsClient, *, partial: bool) -> None:
        try:
            lines = await self._read_lines(gcs, job)
        except (GcsError, UnicodeDecodeError, aiohttp.ClientError) as exc:
            # The message Vertex AI gives for an unreadable input (googleapis/python-aiplatform
            # #4110: "code: 3 message: Failed to import data…"); the detail is the stand-in's.
            error = rpc_error(RPC_INVALID_ARGUMENT, f"Failed to import data. {exc}")
            self._finish(job, "JOB_STATE_FAILED", error)
            return
        keep = math.ceil(len(lines) / 2) if partial else len(lines)
        images: dict[str, bytes | GcsError] = {}
        output: list[dict[str, Any]] = []
        for index, text in enumerate(lines[:keep]):
            if job.cancel_requested:
                break
            output.append(await self._answer_line(gcs, job, index, text, images))
        if await self._sleep(self._settings.stage_seconds):
            return
        try:
            await self._write_output(gcs, job, output)
        except (GcsError, aiohttp.ClientError) as exc:
            error = rpc_error(RPC_INVALID_ARGUMENT, f"Failed to write the output. {exc}")
            self._finish(job, "JOB_STATE_FAILED", error)
            return
        with self._settings.lock:
            job.incomplete = len(lines) - len(output)
        if job.cancel_requested:
            self._finish(job, "JOB_STATE_CANCELLED")
        else:
            self._finish(job, "JOB_STATE_PARTIALLY_SUCCEEDED" if partial else "JOB_STATE_SUCCEEDED")

    async def _advance(self, job: BatchJob, state: str) -> bool:
        """Waits a stage, then moves to ``state``; False when cancelled or stopping."""
        if await self._sleep(self._settings.stage_seconds):
            return False
        if job.cancel_requested:
            self._finish(job, "JOB_STATE_CANCELLED")
            return False
        with self._settings.lock:
            job.set_state(state)
        return True

    def _finish(self, job: BatchJob, state: str, error: dict[str, Any] | None = None) -> None:
        with self._settings.lock:
            job.error = error
            job.set_state(state)

    async def _read_lines(self, gcs: GcsClient, job: BatchJob) -> list[str]:
        lines: list[str] = []
        for uri in job.input_uris:
            data = await gcs.read(uri)
            lines += [line for line in data.decode("utf-8").splitlines() if line.strip()]
        return lines

    async def _write_output(
        self, gcs: GcsClient, job: BatchJob, output: list[dict[str, Any]]
    ) -> None:
        directory = output_directory(job)
        data = "".join(dumps(line) + "\n" for line in output).encode("utf-8")
        await gcs.write(f"{directory}/predictions.jsonl", data, "application/jsonl")
        with self._settings.lock:
            job.output_directory = directory

    # -- one line -------------------------------------------------------------------------------

    async def _answer_line(
        self,
        gcs: GcsClient,
        job: BatchJob,
        index: int,
        text: str,
        images: dict[str, bytes | GcsError],
    ) -> dict[str, Any]:
        record = RequestRecord(
            seq=index + 1,
            path=job.name,
            api="vertex-batch",
            api_version=job.api_version,
            model=job.model_id,
            action="batchPredict",
            api_key_present=False,
            bearer_present=job.bearer_present,
            bearer_issued=job.bearer_issued,
            received_at=time.time(),
        )
        line: dict[str, Any] = {}
        try:
            line = _line_object(text)
            outcome = await self._answer_request(gcs, job, line["request"], record, text, images)
        except ApiError as error:
            outcome = Outcome(error.code, error.body())
        ok = outcome.status == 200
        with self._settings.lock:
            record.status = outcome.status
            record.finish_reason = outcome.finish_reason
            record.answered_at = time.time()
            usage = outcome.usage
            record.prompt_tokens, record.image_tokens = usage[0], usage[1]
            record.thoughts_tokens, record.output_tokens = usage[2], usage[3]
            job.lines.append(record)
            job.successful += ok
            job.failed += not ok
        result: dict[str, Any] = {
            "status": "" if ok else failed_status(outcome, self._settings.status_form),
            "processed_time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            **line,
        }
        if ok:
            result["response"] = outcome.body
        return result

    async def _answer_request(
        self,
        gcs: GcsClient,
        job: BatchJob,
        request: Any,
        record: RequestRecord,
        text: str,
        images: dict[str, bytes | GcsError],
    ) -> Outcome:
        original = parse_generate_request(request)
        parsed = parse_generate_request(await _inline_gs_images(gcs, request, images))
        parsed.file_uris = original.file_uris
        _fill_record(record, parsed)
        model = job.model_id
        thoughts = thinking_tokens_for(model, parsed.generation_config)
        haystacks = [parsed.prompt, parsed.system_instruction, text, *parsed.file_uris]
        for image in parsed.images:
            haystacks += [image.record.sha256, f"[img:{image.record.fingerprint}]"]
        rule = self._settings.take_line_fault(haystacks)
        record.fault = rule.kind if rule else None
        response_id = f"stub-batch-{job.id[-6:]}-{record.seq:06d}"
        if rule is None:
            return await self._answerer.success(parsed, model, response_id, thoughts)
        if rule.kind == "hang":
            # A batch line cannot hang its client; it runs out of time instead.
            error = ApiError(504, "Deadline expired before operation could complete.")
            return Outcome(error.code, error.body())
        return await self._answerer.fault_outcome(rule, parsed, model, response_id)


def output_directory(job: BatchJob) -> str:
    """``gs://…/<outputUriPrefix>/prediction-model-<create time>``: where the job's answers go
    (known from its creation on, as Vertex AI's naming makes it)."""
    prefix = job.output_prefix if job.output_prefix.endswith("/") else job.output_prefix + "/"
    bucket, folder = split_gs_uri(prefix)
    return f"gs://{bucket}/{folder.lstrip('/')}prediction-model-{_stamp(job)}"


def _stamp(job: BatchJob) -> str:
    return datetime.fromtimestamp(job.create_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line_object(text: str) -> dict[str, Any]:
    try:
        line = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"Invalid JSON payload received. {exc}") from exc
    if not isinstance(line, dict) or not isinstance(line.get("request"), Mapping):
        raise ApiError(400, "Invalid JSON payload received. Each line needs a 'request' object.")
    return line


def _fill_record(record: RequestRecord, parsed: ParsedRequest) -> None:
    record.images = [image.record for image in parsed.images]
    record.file_uris = list(parsed.file_uris)
    record.prompt = parsed.prompt
    record.system_instruction = parsed.system_instruction
    record.generation_config = parsed.generation_config


async def _inline_gs_images(
    gcs: GcsClient, request: Mapping[str, Any], cache: dict[str, bytes | GcsError]
) -> dict[str, Any]:
    """A copy of ``request`` whose ``gs://`` fileData parts carry the object's bytes inline, so
    the online parser and answer see exactly the image an online request would send."""
    body = copy.deepcopy(dict(request))
    for content in get_field(body, "contents") or []:
        parts = get_field(content, "parts") if isinstance(content, Mapping) else None
        for part in parts if isinstance(parts, list) else []:
            file_data = get_field(part, "file_data") if isinstance(part, dict) else None
            uri = get_field(file_data, "file_uri") if isinstance(file_data, Mapping) else None
            if not isinstance(uri, str) or not uri.startswith("gs://"):
                continue
            if uri not in cache:
                try:
                    cache[uri] = await gcs.read(uri)
                except (GcsError, aiohttp.ClientError) as exc:
                    cache[uri] = GcsError(str(exc))
            data = cache[uri]
            if isinstance(data, GcsError):
                raise ApiError(400, f"Unable to read the file at {uri}: {data}")
            mime = (file_data and get_field(file_data, "mime_type")) or "application/octet-stream"
            part.pop("fileData", None)
            part.pop("file_data", None)
            part["inlineData"] = {"mimeType": mime, "data": base64.b64encode(data).decode()}
    return body

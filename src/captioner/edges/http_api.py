"""The HTTP edge of ``caption_http``: raw request → typed request → JSON or NDJSON answer.

Every problem with a request is answered here with a 4xx JSON error that says
what is wrong; only a fault of ours or of a service is a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from captioner.batch import BatchRun, CaptionRequest, ObjectsRequest, PrefixRequest, result_json
from captioner.batch_jobs import (
    BatchFollowRequest,
    BatchPruneRequest,
    BatchRequest,
    BatchSubmitRequest,
)
from captioner.edges.http_body import parse_body
from captioner.edges.logs import log_result
from captioner.errors import (
    BadRequestError,
    ConfigurationError,
    ObjectGoneError,
    PermanentError,
    TransientError,
)
from captioner.runtime import Runtime

MAX_BODY = 1024 * 1024
NDJSON = "application/x-ndjson"
log = logging.getLogger("captioner")


def error(
    status: int, message: str, *, request_id: str | None = None, **headers: str
) -> JSONResponse:
    body: dict[str, Any] = {"code": status, "message": message}
    if request_id:
        body["request_id"] = request_id
    return JSONResponse({"error": body}, status, headers=headers)


async def handle(runtime: Runtime, request: Request) -> Response:
    """The answer to one request; never an unhandled exception (see ``_internal_error``)."""
    request_id = uuid.uuid4().hex[:16]
    try:
        return await _handle(runtime, request, request_id)
    except Exception as exc:
        return _internal_error(exc, request_id)


def _internal_error(exc: Exception, request_id: str) -> JSONResponse:
    """The last line of defence: a fault of ours becomes a 500 that names the request,
    and the log line with the traceback carries the same id."""
    log.exception(
        "caption_http failed unexpectedly (request %s): %r",
        request_id,
        exc,
        extra={"fields": {"request_id": request_id}},
    )
    return error(500, f"internal error; the logs have the details under request_id {request_id}",
                 request_id=request_id)  # fmt: skip


async def _handle(runtime: Runtime, request: Request, request_id: str) -> Response:
    try:
        caption_request = await _parse(runtime, request)
    except BadRequestError as exc:
        from captioner.adapters.urls import redact  # here: loads aiohttp only on a bad request

        log.warning("bad request: %s", redact(str(exc)), extra={"fields": {"status": exc.status}})
        headers = {"Allow": "POST"} if exc.status == 405 else {}
        return error(exc.status, str(exc), **headers)

    if isinstance(caption_request, BatchSubmitRequest | BatchFollowRequest | BatchPruneRequest):
        return await _batch_jobs(runtime, caption_request)
    try:
        run = runtime.batch(caption_request)
    except ConfigurationError as exc:  # a max_cost with no price to count it by
        return error(400, str(exc))
    deadline = runtime.settings.http_deadline
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(run, deadline, request_id), media_type=NDJSON)
    results: list[dict[str, Any]] = []
    answer: dict[str, Any] = {}
    try:
        async with asyncio.timeout(deadline), aclosing(run.results()) as stream:
            async for result in stream:
                log_result(result)
                results.append(result_json(result))
    except TimeoutError:
        answer["incomplete"] = _deadline_message(deadline)
    except (ObjectGoneError, PermanentError, TransientError) as exc:
        return _failed(exc)
    _log_summary(run)
    return JSONResponse({"results": results, "totals": run.totals.as_dict(), **answer})


async def _batch_jobs(runtime: Runtime, request: BatchRequest) -> Response:
    """Submit, or follow and apply, Vertex AI batch jobs (captioner.batch_jobs)."""
    from captioner.adapters.vertex_batch import NEEDS_VERTEX, opened
    from captioner.batch_jobs import needs_vertex

    settings = runtime.settings
    try:
        async with opened(settings, needs_vertex=needs_vertex(request)) as jobs:
            if isinstance(request, BatchSubmitRequest):
                return JSONResponse((await jobs.submit(request)).as_json())
            if isinstance(request, BatchPruneRequest):
                return JSONResponse((await jobs.prune(request)).as_json())
            # Apply stops a little before the deadline with its checkpoint saved: the
            # answer says so, and the same request goes on from there.
            follow = jobs.follow(
                request,
                deadline=max(1.0, settings.http_deadline - 15),
                allowed=lambda bucket: bucket in settings.allowed_buckets,
            )
            reports = [report.as_json() async for report in follow]
    except BadRequestError as exc:
        return error(exc.status, str(exc))
    except ConfigurationError as exc:
        # A deployment with an API key has no batch mode for gs:// images (README).
        return error(501 if str(exc) == NEEDS_VERTEX else 503, str(exc))
    except (ObjectGoneError, PermanentError, TransientError) as exc:
        return _failed(exc)
    return JSONResponse({"jobs": reports})


def _failed(exc: ObjectGoneError | PermanentError | TransientError) -> Response:
    """What a whole request that could not go on answers: a missing bucket 404, a
    permanent problem 400, a transient one 503 (call again)."""
    if isinstance(exc, ObjectGoneError):
        return error(404, str(exc))
    if isinstance(exc, PermanentError):
        return error(400, str(exc))
    return error(503, f"try again later: {exc}")


def _deadline_message(deadline: float) -> str:
    return (
        f"stopped after CAPTION_HTTP_DEADLINE={deadline:g}s; the results above are done, "
        "the rest was not started or not finished: send the request again to go on"
    )


def _log_summary(run: BatchRun) -> None:
    totals = run.totals.as_dict()
    log.info(
        "caption_http done: %s",
        ", ".join(f"{k} {v}" for k, v in totals.items() if v),
        extra={"fields": {"summary": True, "request": type(run.request).__name__, **totals}},
    )


async def _ndjson(run: BatchRun, deadline: float, request_id: str) -> AsyncIterator[bytes]:
    """One JSON line per image as it completes, then one line of totals, always: a
    stream that ends without them was cut, and the client can tell."""
    try:
        async with asyncio.timeout(deadline), aclosing(run.results()) as stream:
            async for result in stream:
                log_result(result)
                yield _line(result_json(result))
    except TimeoutError:
        yield _line({"error": {"message": _deadline_message(deadline), "reason": "deadline"}})
    except (ObjectGoneError, PermanentError, TransientError) as exc:
        yield _line({"error": {"message": str(exc)}})
    except Exception as exc:
        _internal_error(exc, request_id)
        yield _line({"error": {"message": "internal error", "code": 500, "request_id": request_id}})
    _log_summary(run)
    yield _line({"totals": run.totals.as_dict()})


def _line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


async def _parse(runtime: Runtime, request: Request) -> CaptionRequest | BatchRequest:
    if request.method != "POST":
        raise BadRequestError(f"{request.method} is not allowed: POST a JSON body", status=405)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BadRequestError(
            f"Content-Type must be application/json, not {content_type or 'missing'!r}",
            status=415,
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise BadRequestError(f"the body is over {MAX_BODY} bytes", status=413)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise BadRequestError(f"the body is over {MAX_BODY} bytes", status=413)
    except ClientDisconnect:
        raise BadRequestError("the client went away before sending the whole body") from None
    parsed = parse_body(bytes(body))
    _check_allowed(runtime, parsed)
    return parsed


def _check_allowed(runtime: Runtime, parsed: CaptionRequest | BatchRequest) -> None:
    if isinstance(parsed, ObjectsRequest):
        buckets = {ref.bucket for ref in parsed.objects}
    elif isinstance(parsed, PrefixRequest | BatchSubmitRequest | BatchPruneRequest):
        buckets = {parsed.bucket}
    elif isinstance(parsed, BatchFollowRequest) and parsed.bucket is not None:
        buckets = {parsed.bucket}  # a job's bucket is checked once its manifest is read
    else:
        return
    allowed = set(runtime.settings.allowed_buckets)
    refused = sorted(buckets - allowed)
    if refused:
        raise BadRequestError(
            f"bucket(s) {', '.join(refused)} are not in CAPTION_ALLOWED_BUCKETS"
            + (f" ({', '.join(sorted(allowed))})" if allowed else " (which is empty)"),
            status=403,
        )

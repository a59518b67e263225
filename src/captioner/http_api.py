"""The HTTP edge of ``caption_http``: raw request → typed request → JSON or NDJSON answer.

Every problem with a request is answered here with a 4xx JSON error that says
what is wrong; only a fault of ours or of a service is a 5xx.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from captioner.batch import BatchRun, result_json
from captioner.entrypoints import log_result
from captioner.errors import BadRequestError, ObjectGoneError, PermanentError, TransientError
from captioner.http_requests import CaptionRequest, ObjectsRequest, PrefixRequest, parse_body
from captioner.runtime import Runtime

MAX_BODY = 1024 * 1024
NDJSON = "application/x-ndjson"
log = logging.getLogger("captioner")


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status, headers=headers)


async def handle(runtime: Runtime, request: Request) -> Response:
    try:
        caption_request = await _parse(runtime, request)
    except BadRequestError as exc:
        log.warning("bad request: %s", exc, extra={"fields": {"status": exc.status}})
        headers = {"Allow": "POST"} if exc.status == 405 else {}
        return error(exc.status, str(exc), **headers)

    run = runtime.batch(caption_request)
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(run), media_type=NDJSON)
    results: list[dict[str, Any]] = []
    try:
        async for result in run.results():
            log_result(result)
            results.append(result_json(result))
    except ObjectGoneError as exc:
        return error(404, str(exc))
    except PermanentError as exc:
        return error(400, str(exc))
    except TransientError as exc:
        return error(503, f"try again later: {exc}")
    _log_summary(run)
    return JSONResponse({"results": results, "totals": run.totals.as_dict()})


def _log_summary(run: BatchRun) -> None:
    totals = run.totals.as_dict()
    log.info(
        "caption_http done: %s",
        ", ".join(f"{k} {v}" for k, v in totals.items() if v),
        extra={"fields": {"summary": True, "request": type(run.request).__name__, **totals}},
    )


async def _ndjson(run: BatchRun) -> AsyncIterator[bytes]:
    """One JSON line per image as it completes, then one line of totals."""
    try:
        async for result in run.results():
            log_result(result)
            yield _line(result_json(result))
    except (ObjectGoneError, PermanentError, TransientError) as exc:
        yield _line({"error": {"message": str(exc)}})
    _log_summary(run)
    yield _line({"totals": run.totals.as_dict()})


def _line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


async def _parse(runtime: Runtime, request: Request) -> CaptionRequest:
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


def _check_allowed(runtime: Runtime, parsed: CaptionRequest) -> None:
    if isinstance(parsed, ObjectsRequest):
        buckets = {ref.bucket for ref in parsed.objects}
    elif isinstance(parsed, PrefixRequest):
        buckets = {parsed.bucket}
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

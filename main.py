"""Cloud Functions entry points: ``caption_on_upload`` (CloudEvent) and ``caption_http``.

Deployed as is: the runtime installs requirements.txt only, so ``src/`` is put on
the import path here rather than installed as a package.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

import functions_framework.aio  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from captioner.edges.logs import configure_logging, trace_id, traced  # noqa: E402
from captioner.edges.upload import on_upload  # noqa: E402
from captioner.errors import BadRequestError, ConfigurationError, TransientError  # noqa: E402
from captioner.runtime import Runtime  # noqa: E402
from captioner.settings import Settings  # noqa: E402

# Parsed once at start: a bad CAPTION_* value stops the instance with a message
# naming the variable instead of failing every request later.
SETTINGS = Settings.from_env(os.environ)
configure_logging(SETTINGS.log_format)
RUNTIME = Runtime(SETTINGS)
# Imports and the Gemini client before the server listens, not in the first request.
RUNTIME.preload()
if os.environ.get("FUNCTION_TARGET") != "caption_on_upload":
    # Cloud Run names the deployed function in FUNCTION_TARGET. The HTTP edge (its
    # pydantic bodies, batch runs) is 30-50 ms of imports that the first request
    # paid; an upload-only instance does not need it and starts without it.
    import captioner.edges.http_api  # noqa: F401
log = logging.getLogger("captioner")


@functions_framework.aio.cloud_event
async def caption_on_upload(event: Any) -> None:
    """Caption the object named by a ``google.cloud.storage.object.v1.finalized`` event."""
    event_id = event.get("id")
    try:
        with traced(trace_id(event.get("traceparent"))):
            await on_upload(RUNTIME, event.get("type"), event.data)
    except BadRequestError as exc:
        # Acknowledged (2xx): with the trigger's retry policy on, Eventarc redelivers
        # every other answer for up to 24 hours, and this event can never succeed.
        # The log line is the record; count them with a log-based metric on
        # jsonPayload.malformed_event.
        log.error(
            "malformed event, acknowledged and dropped: %s",
            exc,
            extra={"fields": {"event_id": event_id, "malformed_event": True}},
        )
    except ConfigurationError as exc:
        # A missing permission, a refused key: every delivery fails the same way until
        # the operator fixes it, so it is an ERROR for alerting. Redelivered (503), as
        # nothing was recorded on the image.
        log.error("configuration problem, asking for redelivery: %s", exc)
        raise HTTPException(503, detail=f"configuration problem, retry later: {exc}") from None
    except TransientError as exc:
        # Eventarc redelivers on any non-2xx answer; 503 says "try later".
        log.warning("transient failure, asking for redelivery: %s", exc)
        raise HTTPException(503, detail=f"transient failure, retry later: {exc}") from None
    except Exception:
        # A fault of ours. Redelivery may find it gone (it is not recorded on the
        # object, so nothing is lost); the log line carries the event id and trace.
        log.exception(
            "caption_on_upload failed unexpectedly", extra={"fields": {"event_id": event_id}}
        )
        raise HTTPException(500, detail=f"internal error (event {event_id})") from None


@functions_framework.aio.http
async def caption_http(request: Request) -> Response:
    """Caption objects, a prefix or image URLs on request (see README)."""
    from captioner.edges.http_api import handle

    trace = trace_id(
        request.headers.get("traceparent"), request.headers.get("x-cloud-trace-context")
    )
    with traced(trace):
        return await handle(RUNTIME, request)

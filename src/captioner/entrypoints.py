"""What the Cloud Functions entry points do, free of the web framework.

``main.py`` turns these errors into HTTP answers: BadRequestError → 4xx (the
event is malformed and will never work), TransientError → 503 so that Eventarc
redelivers; a return means done, whatever the outcome for the image.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from captioner.domain import CaptionResult, Outcome
from captioner.errors import TransientError
from captioner.events import FINALIZED, object_ref_from_event
from captioner.logs import LABELS_KEY
from captioner.runtime import Runtime

log = logging.getLogger("captioner")


async def on_upload(runtime: Runtime, event_type: str | None, data: Any) -> CaptionResult | None:
    """Caption the object of one ``object.v1.finalized`` event."""
    if event_type != FINALIZED:
        log.warning(
            "ignored an event of type %r: only %s is handled",
            event_type,
            FINALIZED,
            extra={"fields": {"event_type": event_type}},
        )
        return None
    ref = object_ref_from_event(data)
    try:
        # Inside the function's own timeout, so a slow image ends as a retry, not a kill.
        async with asyncio.timeout(runtime.settings.deadline):
            result = await runtime.captioner().caption_object(ref)
    except TimeoutError:
        raise TransientError(
            f"{ref.uri}: not done within CAPTION_DEADLINE={runtime.settings.deadline:g}s"
        ) from None
    log_result(result)
    log.info(
        "caption_on_upload done: %s in %.2fs", result.outcome.value, result.seconds,
        extra={"fields": {"summary": True, "outcome": result.outcome.value,
                          "seconds": round(result.seconds, 3)}},
    )  # fmt: skip
    if result.outcome is Outcome.RETRY:
        raise TransientError(f"{ref.uri}: {result.message}")
    return result


def log_result(result: CaptionResult) -> None:
    level = {
        Outcome.CAPTIONED: logging.INFO,
        Outcome.SKIPPED: logging.INFO,
        Outcome.BLOCKED: logging.WARNING,
        Outcome.FAILED: logging.ERROR,
        Outcome.RETRY: logging.WARNING,
        Outcome.PLANNED: logging.INFO,
    }[result.outcome]
    ref = result.ref
    generation = result.generation or (ref.generation if ref else None)
    labels = {"bucket": ref.bucket, "object": ref.name} if ref else {"source": result.source}
    if generation:
        labels["generation"] = str(generation)
    log.log(
        level,
        "%s %s%s",
        result.source,
        result.outcome.value,
        f" ({result.reason})" if result.reason else "",
        extra={
            "fields": {
                LABELS_KEY: labels,
                "bucket": ref.bucket if ref else None,
                "object": ref.name if ref else result.source,
                "generation": generation,
                "outcome": result.outcome.value,
                "reason": result.reason,
                "detail": result.message,
                "recorded": result.recorded,
                **result.usage.as_fields(),
                "seconds": round(result.seconds, 3),
                "stages": dict(result.stages),
            }
        },
    )

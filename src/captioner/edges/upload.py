"""The upload handler: one ``object.v1.finalized`` event, free of the web framework.

``main.py`` turns its errors into answers to Eventarc: BadRequestError (the event
is malformed and will never work) → 200 with an error log, as anything else is
redelivered for a day; TransientError → 503 so that Eventarc redelivers (its
ConfigurationError kind, a problem for the operator such as a missing IAM
permission, logged as an error); a return means done, whatever the outcome for the
image.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from captioner.domain import CaptionResult, Outcome
from captioner.edges.events import FINALIZED, object_ref_from_event
from captioner.edges.logs import log_result
from captioner.errors import ConfigurationError, TransientError
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
    cost = runtime.rate().cost(result.usage) if result.usage.calls else None
    log.info(
        "caption_on_upload done: %s in %.2fs", result.outcome.value, result.seconds,
        extra={"fields": {"summary": True, "outcome": result.outcome.value,
                          "seconds": round(result.seconds, 3),
                          "cost_usd": None if cost is None else round(cost, 6)}},
    )  # fmt: skip
    if result.outcome is Outcome.RETRY:
        kind = ConfigurationError if result.reason == ConfigurationError.reason else TransientError
        raise kind(f"{ref.uri}: {result.message}")
    return result

"""Log lines Cloud Logging understands: one JSON object per line on stdout.

``severity`` and ``message`` are the keys Cloud Logging reads; anything passed as
``extra={"fields": {...}}`` is merged in. ``CAPTION_LOG_FORMAT=text`` gives plain
lines for local runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from captioner.domain import CaptionResult, Outcome

TRACE_KEY = "logging.googleapis.com/trace"
LABELS_KEY = "logging.googleapis.com/labels"
log = logging.getLogger("captioner")
_TRACE: ContextVar[str | None] = ContextVar("captioner_trace", default=None)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/\d+)?(?:;o=\d)?$")


def trace_id(traceparent: str | None, cloud_trace_context: str | None = None) -> str | None:
    """The trace id from a W3C ``traceparent`` or an ``X-Cloud-Trace-Context`` header."""
    if traceparent and (match := _TRACEPARENT.match(traceparent.strip().lower())):
        return match.group(1)
    if cloud_trace_context and (match := _CLOUD_TRACE.match(cloud_trace_context.strip())):
        return match.group(1).lower()
    return None


@contextmanager
def traced(trace: str | None) -> Iterator[None]:
    """Every log line inside carries this trace, as Cloud Logging links them."""
    token = _TRACE.set(trace)
    try:
        yield
    finally:
        _TRACE.reset(token)


_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        trace = _TRACE.get()
        if trace:
            project = os.environ.get("GOOGLE_CLOUD_PROJECT")
            entry[TRACE_KEY] = f"projects/{project}/traces/{trace}" if project else trace
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname:<7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route the ``captioner`` logger to stdout in the chosen format (idempotent)."""
    logger = logging.getLogger("captioner")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


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

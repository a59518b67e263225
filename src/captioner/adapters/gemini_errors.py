"""What a failed Gemini call means: retry it, stop asking, or record it against the image.

google-genai raises ``errors.APIError`` with the service's JSON error body in ``details``;
below it, aiohttp and google-auth raise their own. ``classify`` and ``transport_error`` turn
each into the error kinds of ``captioner.errors`` that ``captioner.retrying`` acts on.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, tzinfo
from datetime import time as dt_time
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import google.auth.exceptions
from google.genai import errors as genai_errors

from captioner.errors import ConfigurationError, PermanentError, TransientError, UnreachableError

_TRANSIENT_CODES = frozenset({408, 429, 499, 500, 502, 503, 504})
_TRANSIENT_STATUSES = frozenset(
    {"CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"}
)
# Not the image's fault: a bad key, a missing permission, an unknown model or a project
# without credit is fixed by the operator, and the event should come back once it is.
_CONFIGURATION_CODES = frozenset({401, 402, 403, 404})
_CONFIGURATION_STATUSES = frozenset(
    {"FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"}
)
# google.rpc.ErrorInfo reasons of Google APIs that name a credential or project problem.
_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})
_CONFIGURATION_REASONS = frozenset(
    {
        "API_KEY_SERVICE_BLOCKED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "CONSUMER_INVALID",
        "SERVICE_DISABLED",
        "BILLING_DISABLED",
        "ACCESS_TOKEN_EXPIRED",
        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
        "IAM_PERMISSION_DENIED",
    }
)
# Words in a 400 that point at a setting we sent, not at the image.
_SETTING_WORDS = (
    "thinking",
    "generation_config",
    "generationconfig",
    "response_schema",
    "responseschema",
    "response_json_schema",
    "responsejsonschema",
    "media_resolution",
    "mediaresolution",
    "max_output_tokens",
    "maxoutputtokens",
    "temperature",
    "model",
)
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)s\s*$")

NO_CREDENTIALS = (
    "no Google credentials: run `gcloud auth application-default login` "
    "(or set GOOGLE_APPLICATION_CREDENTIALS)"
)


def _why(exc: aiohttp.ClientConnectorError) -> str:
    """ "connection refused", "name or service not known": the socket's own words."""
    error = exc.os_error
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno).lower()
    return (error.strerror or str(error)).lower()


def transport_error(exc: Exception, timeout: float) -> Exception:
    """A failure below the API's own errors, as the error to raise (the same one if it
    is none of these)."""
    if isinstance(exc, TimeoutError):
        return TransientError(f"Gemini did not answer within {timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UnreachableError(f"cannot reach Gemini at {exc.host}:{exc.port} ({_why(exc)})")
    if isinstance(exc, aiohttp.ClientError):
        return TransientError(f"Gemini connection failed: {type(exc).__name__}: {str(exc)[:200]}")
    if isinstance(exc, google.auth.exceptions.DefaultCredentialsError):
        # Vertex AI mode finds out there are no credentials only when it needs a token.
        return ConfigurationError(NO_CREDENTIALS)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        return ConfigurationError(f"Google credentials cannot be refreshed: {str(exc)[:300]}")
    if isinstance(exc, ValueError | TypeError | KeyError | AttributeError):
        # A 200 whose body is not JSON (a proxy's HTML page), or JSON of another
        # shape: the SDK's converters and pydantic raise these.
        return TransientError(f"Gemini's answer could not be read: {str(exc)[:200]}")
    return exc


def classify(exc: genai_errors.APIError, max_wait: float = 30.0) -> Exception:
    """Retry, stop asking, or record: decided by the error's status and reason, not
    only its HTTP code, because Gemini answers a bad API key with a plain 400.

    Shapes, as the services send them (python-genai ``errors.APIError`` keeps the
    JSON body in ``details``; the Gemini API's error reference
    https://ai.google.dev/gemini-api/docs/troubleshooting lists the statuses):

    - 400 INVALID_ARGUMENT + ErrorInfo reason ``API_KEY_INVALID`` (bad or expired key),
      400 FAILED_PRECONDITION (region not supported, billing not enabled),
      401/403/404, 402 (prepaid credit used up): configuration, never the image's fault.
    - 400 INVALID_ARGUMENT that names one of our own request settings (a thinking
      level the model does not take, a schema it refuses): configuration too.
    - 429 whose QuotaFailure names a per-day quota: nothing helps before the next day.
    - 408, 429, 499 CANCELLED (seen under load), 5xx: transient, with the server's
      RetryInfo delay when it names one, capped at ``max_wait``.
    - anything else: the image or its request is refused for good (``gemini-<code>``).
    """
    code = int(exc.code or 0)
    status = str(exc.status or "")
    body = _error_body(exc.details)
    reasons = _error_reasons(body)
    message = f"Gemini answered {code} {status}: {exc.message or ''}".strip()
    if reasons & _KEY_REASONS:
        return ConfigurationError(
            message + " (the API key is not valid: check GEMINI_API_KEY / GOOGLE_API_KEY)"
        )
    if reasons & _CONFIGURATION_REASONS or status in _CONFIGURATION_STATUSES:
        return ConfigurationError(message + " (a problem of the project's set-up)")
    if code in _CONFIGURATION_CODES:
        return ConfigurationError(message + " (check the model name, API key or IAM role)")
    if code == 429 and (quota := _daily_quota(body)):
        return DailyQuotaError(
            message + f" (the per-day quota {quota} is used up: no more calls today)"
        )
    if code in _TRANSIENT_CODES or code >= 500 or status in _TRANSIENT_STATUSES:
        delay = retry_delay(body)
        return TransientError(message, retry_after=None if delay is None else min(delay, max_wait))
    if code == 400 and _names_our_settings(body, exc.message or ""):
        return ConfigurationError(
            message + " (the model refuses a setting of ours: check CAPTION_MODEL and "
            "CAPTION_THINKING / CAPTION_MEDIA_RESOLUTION)"
        )
    return PermanentError(f"gemini-{code}", message)


class DailyQuotaError(ConfigurationError):
    """A per-day quota is used up: every call until it resets would be refused too."""

    reason = "daily-quota"


def next_quota_day(now: datetime | None = None) -> float:
    """The monotonic time of the next midnight in Pacific time, when the Gemini API's
    per-day quotas reset (https://ai.google.dev/gemini-api/docs/rate-limits: "Requests
    per day (RPD) quotas reset at midnight Pacific time")."""
    try:
        zone: tzinfo = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database: an hour, then ask once and see
        return time.monotonic() + 3600.0
    now = now or datetime.now(zone)
    local = now.astimezone(zone)
    midnight = datetime.combine(local.date() + timedelta(days=1), dt_time(), zone)
    return time.monotonic() + max(60.0, (midnight - local).total_seconds())


def _error_body(details: Any) -> Mapping[str, Any]:
    if isinstance(details, Mapping):
        inner = details.get("error", details)
        return inner if isinstance(inner, Mapping) else {}
    return {}


def _detail_items(body: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    items = body.get("details")
    if not isinstance(items, list):
        return []
    return [
        item
        for item in items
        if isinstance(item, Mapping) and str(item.get("@type", "")).endswith(kind)
    ]


def _error_reasons(body: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(str(item.get("reason", "")) for item in _detail_items(body, "ErrorInfo"))


def _daily_quota(body: Mapping[str, Any]) -> str | None:
    """The id of a per-day quota named by a QuotaFailure, e.g.
    ``GenerateRequestsPerDayPerProjectPerModel-FreeTier``."""
    for failure in _detail_items(body, "QuotaFailure"):
        violations = failure.get("violations")
        for violation in violations if isinstance(violations, list) else []:
            if not isinstance(violation, Mapping):
                continue
            quota = str(violation.get("quotaId", "") or violation.get("quotaMetric", ""))
            if "perday" in quota.lower().replace("_", "").replace("-", ""):
                return quota
    return None


def _names_our_settings(body: Mapping[str, Any], message: str) -> bool:
    fields = [
        str(violation.get("field", ""))
        for item in _detail_items(body, "BadRequest")
        for violation in (item.get("fieldViolations") or [])
        if isinstance(violation, Mapping)
    ]
    text = " ".join([message, *fields]).lower()
    return any(word in text for word in _SETTING_WORDS)


def retry_delay(details: Any) -> float | None:
    """The ``retryDelay`` of a google.rpc.RetryInfo detail, e.g. ``"7s"`` → 7.0."""
    body = _error_body(details) if isinstance(details, Mapping) else {"details": details}
    for item in _detail_items(body, "RetryInfo"):
        match = _DURATION.match(str(item.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None

"""Errors, in the shapes the real services send them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from captioner_dev.gemini_server.config import FaultRule, format_duration
from captioner_dev.gemini_server.quota import QuotaShape
from captioner_dev.gemini_server.wire import ApiError, model_version

# The Gemini API's per-minute 429, with QuotaFailure, Help and RetryInfo details in this order
# (RooCodeInc/Roo-Code#3883; googleapis/python-genai#2044 shows the per-day quotaId).
_QUOTA_MESSAGE: Final = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
_QUOTA_HELP: Final = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [
        {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
        }
    ],
}
# Vertex AI's 429 carries no details at all (google-gemini/gemini-cli#14831).
_VERTEX_QUOTA_MESSAGE: Final = (
    "Resource exhausted. Please try again later. Please refer to "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
)
BLOCKED_RATINGS: Final = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
]


_QUOTA_METRIC: Final = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
# The input-tokens-per-minute quota's names (RooCodeInc/Roo-Code#3883).
_TOKEN_QUOTA_METRIC: Final = (
    "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count"
)
_TOKEN_QUOTA_ID: Final = "GenerateContentInputTokensPerModelPerMinute-FreeTier"


def _quota_failure(
    model: str, quota_id: str, value: str, metric: str = _QUOTA_METRIC
) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": metric,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model_version(model)},
                "quotaValue": value,
            }
        ],
    }


def quota_error(
    model: str, retry_delay: float | None, *, per_day: bool = False, value: str | None = None
) -> ApiError:
    """The Gemini API's 429 for a requests quota (per minute, or per day); ``value`` is the
    limit it names (QuotaFailure's ``quotaValue``)."""
    quota_id = (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        if per_day
        else "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    )
    details: list[Mapping[str, Any]] = [
        _quota_failure(model, quota_id, value or ("250" if per_day else "10")),
        _QUOTA_HELP,
    ]
    if retry_delay is not None:
        details.append(retry_info(retry_delay))
    return ApiError(429, _QUOTA_MESSAGE, details)


def token_quota_error(model: str, retry_delay: float, *, value: str) -> ApiError:
    """The Gemini API's 429 for its input-tokens-per-minute quota (RooCodeInc/Roo-Code#3883:
    QuotaFailure, Help, RetryInfo, in this order)."""
    details: list[Mapping[str, Any]] = [
        _quota_failure(model, _TOKEN_QUOTA_ID, value, _TOKEN_QUOTA_METRIC),
        _QUOTA_HELP,
        retry_info(retry_delay),
    ]
    return ApiError(429, _QUOTA_MESSAGE, details)


def vertex_quota_error() -> ApiError:
    """Vertex AI's pay-as-you-go 429: no details, no RetryInfo."""
    return ApiError(429, _VERTEX_QUOTA_MESSAGE)


def quota_refusal(
    shape: QuotaShape, model: str, delay: float, *, rps: float | None, tpm: float | None
) -> ApiError:
    """The 429 a quota of ``shape`` answers with, naming ``delay`` where it names one: the
    request shapes name the Gemini API's per-minute request quota and its value."""
    if shape is QuotaShape.VERTEX:
        return vertex_quota_error()
    if shape is QuotaShape.TPM:
        return token_quota_error(model, delay, value=f"{tpm or 0:.0f}")
    return quota_error(model, delay, value=f"{(rps or 0) * 60:.0f}")


def bad_key_error() -> ApiError:
    # The Gemini API's answer to a wrong or revoked key: a plain 400, told apart only by the
    # ErrorInfo reason (continuedev/continue#8516, google/timesketch#3703).
    message = "API key not valid. Please pass a valid API key."
    return ApiError(
        400,
        message,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ],
    )


def fault_error(rule: FaultRule, model: str) -> ApiError | None:
    """The error a fault rule answers with, or None for the kinds that answer 200 (or hang)."""
    kind = rule.kind
    if kind == "429":
        return quota_error(model, rule.retry_delay)
    if kind == "429_per_day":
        return quota_error(model, rule.retry_delay, per_day=True)
    if kind == "429_vertex":
        return vertex_quota_error()
    if kind == "bad_key":
        return bad_key_error()
    if kind == "failed_precondition":
        # google-gemini/gemini-cli#1614, poenl/gemini-api#4: no details.
        return ApiError(
            400, "User location is not supported for the API use.", status="FAILED_PRECONDITION"
        )
    if kind == "invalid_argument":
        return ApiError(400, "Request contains an invalid argument.")
    if kind == "499":
        # google-gemini/gemini-cli#20309, under heavy load.
        return ApiError(499, "The operation was cancelled.")
    if kind == "500":
        return ApiError(
            500,
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        )
    if kind == "503":
        return ApiError(503, "The model is overloaded. Please try again later.")
    if kind == "504":
        # The status is documented (https://ai.google.dev/gemini-api/docs/troubleshooting);
        # the message is Google APIs' usual one for DEADLINE_EXCEEDED, not seen verbatim here.
        return ApiError(504, "Deadline expired before operation could complete.")
    return None


def retry_info(seconds: float) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": format_duration(seconds),
    }

"""How Gemini's errors and answers map onto retry, record and blocked."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from google.genai import errors, types

from captioner.adapters.gemini import GeminiDescriber, _description
from captioner.adapters.gemini_errors import DailyQuotaError, classify, next_quota_day
from captioner.domain import PreparedImage
from captioner.errors import ConfigurationError, PermanentError, TransientError


def api_error(code: int, status: str, details: list[dict[str, Any]] | None = None) -> Any:
    body = {"error": {"code": code, "message": "m", "status": status, "details": details or []}}
    cls = errors.ClientError if code < 500 else errors.ServerError
    return cls(code, body)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_rate_limits_and_server_errors_are_transient(code: int) -> None:
    assert isinstance(classify(api_error(code, "X")), TransientError)


@pytest.mark.parametrize("code", [401, 403, 404])
def test_configuration_errors_are_transient_so_no_image_is_marked_failed(code: int) -> None:
    assert isinstance(classify(api_error(code, "X")), TransientError)


@pytest.mark.parametrize("code", [400, 413, 422])
def test_other_client_errors_are_permanent(code: int) -> None:
    exc = classify(api_error(code, "INVALID_ARGUMENT"))
    assert isinstance(exc, PermanentError)
    assert exc.reason == f"gemini-{code}"


def test_retry_info_delay_is_read_from_a_429() -> None:
    detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    exc = classify(api_error(429, "RESOURCE_EXHAUSTED", [detail]))
    assert isinstance(exc, TransientError)
    assert exc.retry_after == 7.0


def response(**data: Any) -> types.GenerateContentResponse:
    return types.GenerateContentResponse.model_validate(data)


def test_text_answer_is_a_caption_with_usage() -> None:
    d = _description(
        response(
            candidates=[{"content": {"parts": [{"text": "A cat."}]}, "finish_reason": "STOP"}],
            usage_metadata={
                "prompt_token_count": 260,
                "candidates_token_count": 3,
                "total_token_count": 263,
            },
            model_version="gemini-x",
        ),
        "m",
    )
    assert d.text == "A cat."
    assert d.model == "gemini-x"
    assert d.usage.prompt_tokens == 260


def test_blocked_prompt_is_blocked() -> None:
    d = _description(response(prompt_feedback={"block_reason": "SAFETY"}), "m")
    assert d.text is None
    assert d.blocked_reason == "SAFETY"


def test_safety_finish_without_text_is_blocked() -> None:
    d = _description(response(candidates=[{"finish_reason": "SAFETY"}]), "m")
    assert d.blocked_reason == "SAFETY"


def test_no_candidates_and_no_block_reason_is_transient_not_a_block() -> None:
    with pytest.raises(TransientError):
        _description(response(candidates=[]), "m")


def candidate(finish: str, text: str | None = None) -> dict[str, Any]:
    content = {"parts": [{"text": text}]} if text is not None else None
    return {"content": content, "finish_reason": finish}


@pytest.mark.parametrize(
    "finish",
    [
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    ],
)
def test_safety_type_finishes_are_blocked(finish: str) -> None:
    assert _description(response(candidates=[candidate(finish)]), "m").blocked_reason == finish


def test_max_tokens_is_cut_off_not_blocked() -> None:
    d = _description(response(candidates=[candidate("MAX_TOKENS")]), "m")
    assert d.blocked_reason is None
    assert d.cut_off


@pytest.mark.parametrize(
    "finish",
    [
        "MALFORMED_FUNCTION_CALL",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
        "MISSING_THOUGHT_SIGNATURE",
        "MALFORMED_RESPONSE",
    ],
)
def test_tool_and_format_glitches_are_transient(finish: str) -> None:
    with pytest.raises(TransientError):
        _description(response(candidates=[candidate(finish)]), "m")


def test_an_unsupported_language_is_permanent_and_says_so() -> None:
    with pytest.raises(PermanentError) as caught:
        _description(response(candidates=[candidate("LANGUAGE")]), "m")
    assert caught.value.reason == "unsupported-language"


@pytest.mark.parametrize("finish", ["OTHER", "NO_IMAGE", "IMAGE_OTHER", "ESCALATION"])
def test_other_finishes_without_text_are_permanent_named_after_the_reason(finish: str) -> None:
    with pytest.raises(PermanentError) as caught:
        _description(response(candidates=[candidate(finish)]), "m")
    assert caught.value.reason == "finish-" + finish.lower().replace("_", "-")


def test_every_finish_reason_the_sdk_knows_has_a_deliberate_outcome() -> None:
    for finish in types.FinishReason:
        try:
            d = _description(response(candidates=[candidate(finish.name)]), "m")
        except (TransientError, PermanentError):
            continue
        assert (
            d.blocked_reason
            or d.cut_off
            or finish.name
            in (
                "STOP",
                "FINISH_REASON_UNSPECIFIED",
            )
        ), finish


def test_thinking_and_image_tokens_are_read_from_usage_metadata() -> None:
    d = _description(
        response(
            candidates=[candidate("STOP", "A cat.")],
            usage_metadata={
                "prompt_token_count": 290,
                "candidates_token_count": 12,
                "thoughts_token_count": 40,
                "prompt_tokens_details": [
                    {"modality": "TEXT", "token_count": 10},
                    {"modality": "IMAGE", "token_count": 280},
                ],
            },
        ),
        "m",
    )
    assert (d.usage.image_tokens, d.usage.thoughts_tokens, d.usage.output_tokens) == (280, 40, 12)


# The shapes below are the JSON bodies the services send, as python-genai's
# errors.APIError keeps them in ``details``.
BAD_KEY = [
    {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    },
    {
        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
        "locale": "en-US",
        "message": "API key not valid. Please pass a valid API key.",
    },
]
DAILY_QUOTA = [
    {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": (
                    "generativelanguage.googleapis.com/generate_content_free_tier_requests"
                ),
                "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                "quotaValue": "250",
            }
        ],
    },
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "41s"},
]
MINUTE_QUOTA = [
    {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}],
    },
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"},
]


def test_a_bad_api_key_400_is_a_configuration_error_never_recorded_on_the_image() -> None:
    exc = classify(api_error(400, "INVALID_ARGUMENT", BAD_KEY))
    assert isinstance(exc, ConfigurationError)
    assert isinstance(exc, TransientError)  # nothing is recorded; the event comes back
    assert "GEMINI_API_KEY" in str(exc)


def test_an_expired_api_key_is_a_configuration_error() -> None:
    details = [{**BAD_KEY[0], "reason": "API_KEY_EXPIRED"}]
    assert isinstance(classify(api_error(400, "INVALID_ARGUMENT", details)), ConfigurationError)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (400, "FAILED_PRECONDITION"),  # region not supported, billing not enabled
        (401, "UNAUTHENTICATED"),
        (402, ""),  # prepaid credit used up
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
    ],
)
def test_project_setup_errors_are_configuration_errors(code: int, status: str) -> None:
    assert isinstance(classify(api_error(code, status)), ConfigurationError)


@pytest.mark.parametrize(
    "message",
    [
        # The messages the real API gives for thinking settings a model refuses (the
        # stand-in sends the same; sources in captioner_dev/gemini_server/tokens.py).
        "Budget 0 is invalid. This model only works in thinking mode.",
        "Thinking level is not supported for this model.",
        "Thinking level MINIMAL is not supported for this model. Please retry with other "
        "thinking level.",
        "The thinking budget (40000) is invalid. Please choose a value between 128 and 32768.",
        "Thinking is not enabled for models/gemini-2.0-flash",
    ],
)
def test_a_400_about_a_setting_we_sent_is_a_configuration_error(message: str) -> None:
    body = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
    assert isinstance(classify(errors.ClientError(400, body)), ConfigurationError)


def test_a_400_about_the_image_stays_permanent() -> None:
    body = {
        "error": {
            "code": 400,
            "message": "Unable to process input image. Please retry or report it.",
            "status": "INVALID_ARGUMENT",
        }
    }
    exc = classify(errors.ClientError(400, body))
    assert isinstance(exc, PermanentError)
    assert exc.reason == "gemini-400"


def test_499_cancelled_under_load_is_transient() -> None:
    exc = classify(api_error(499, "CANCELLED"))
    assert type(exc) is TransientError


def test_a_per_day_quota_429_stops_asking_instead_of_waiting() -> None:
    exc = classify(api_error(429, "RESOURCE_EXHAUSTED", DAILY_QUOTA))
    assert isinstance(exc, DailyQuotaError)
    assert "GenerateRequestsPerDayPerProjectPerModel-FreeTier" in str(exc)


def test_a_per_minute_quota_429_is_waited_out_with_its_delay() -> None:
    exc = classify(api_error(429, "RESOURCE_EXHAUSTED", MINUTE_QUOTA))
    assert type(exc) is TransientError
    assert exc.retry_after == 12.0


@pytest.mark.parametrize("delay", ["100000s", "86400s", "3601.5s"])
def test_a_huge_retry_delay_is_capped_at_the_maximum_wait(delay: str) -> None:
    detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
    exc = classify(api_error(429, "RESOURCE_EXHAUSTED", [detail]), max_wait=2.5)
    assert isinstance(exc, TransientError)
    assert exc.retry_after == 2.5


def test_the_next_quota_day_is_the_next_pacific_midnight() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    pacific = ZoneInfo("America/Los_Angeles")
    now = datetime(2026, 11, 25, 23, 0, tzinfo=pacific)
    before = time.monotonic()
    until = next_quota_day(now)
    assert 3590 <= until - before <= 3610  # an hour to midnight


async def test_after_a_daily_quota_429_no_more_calls_are_made_until_it_resets() -> None:
    calls = 0

    class Models:
        async def generate_content(self, **_: Any) -> Any:
            nonlocal calls
            calls += 1
            raise api_error(429, "RESOURCE_EXHAUSTED", DAILY_QUOTA)

    client: Any = SimpleNamespace(aio=SimpleNamespace(models=Models()))
    describer = GeminiDescriber(
        client,
        model="m",
        prompt="p",
        max_output_tokens=64,
        temperature=0.2,
        attempts=4,
        timeout=1.0,
        max_wait=0.01,
    )
    image = PreparedImage(b"x", "image/jpeg", 1, 1, "JPEG", 1, 1, False)
    for _ in range(5):
        with pytest.raises(DailyQuotaError):
            await describer.describe(image)
    assert calls == 1

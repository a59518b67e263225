"""How Gemini's errors and answers map onto retry, record and blocked."""

from __future__ import annotations

from typing import Any

import pytest
from google.genai import errors, types

from captioner.errors import PermanentError, TransientError
from captioner.gemini import _classify, _description


def api_error(code: int, status: str, details: list[dict[str, Any]] | None = None) -> Any:
    body = {"error": {"code": code, "message": "m", "status": status, "details": details or []}}
    cls = errors.ClientError if code < 500 else errors.ServerError
    return cls(code, body)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_rate_limits_and_server_errors_are_transient(code: int) -> None:
    assert isinstance(_classify(api_error(code, "X")), TransientError)


@pytest.mark.parametrize("code", [401, 403, 404])
def test_configuration_errors_are_transient_so_no_image_is_marked_failed(code: int) -> None:
    assert isinstance(_classify(api_error(code, "X")), TransientError)


@pytest.mark.parametrize("code", [400, 413, 422])
def test_other_client_errors_are_permanent(code: int) -> None:
    exc = _classify(api_error(code, "INVALID_ARGUMENT"))
    assert isinstance(exc, PermanentError)
    assert exc.reason == f"gemini-{code}"


def test_retry_info_delay_is_read_from_a_429() -> None:
    detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    exc = _classify(api_error(429, "RESOURCE_EXHAUSTED", [detail]))
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


def test_no_candidates_is_blocked_as_empty() -> None:
    assert _description(response(candidates=[]), "m").blocked_reason == "EMPTY"

"""The stand-in's Flex tier (captioner_dev/gemini_server/flex.py): which requests ask for
it, how slow and how often shed they are, and its control route."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from captioner_dev.gemini_server.flex import tier_of

BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.mark.parametrize(
    ("body", "headers", "tier"),
    [
        ({}, {}, "standard"),
        ({"serviceTier": "flex"}, {}, "flex"),
        ({"service_tier": "FLEX"}, {}, "flex"),
        ({"serviceTier": "SERVICE_TIER_PRIORITY"}, {}, "priority"),
        ({}, {"X-Vertex-AI-LLM-Shared-Request-Type": "flex"}, "flex"),
        ({"serviceTier": 3}, {}, "standard"),
    ],
)
def test_the_tier_is_read_from_the_vertex_header_or_the_body(
    body: Any, headers: dict[str, str], tier: str
) -> None:
    assert tier_of(body, headers) == tier


def _post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_flex_calls_are_slower_and_shed_ones_are_503_at_once(gemini: Any) -> None:
    url = f"{gemini.base_url}/v1beta/models/gemini-2.5-flash:generateContent?key=k"
    status, config = _post(f"{gemini.base_url}/_stub/flex", {"latency": 0.2, "shed": 0.0})
    assert (status, config) == (200, {"latency": 0.2, "shed": 0.0})
    started = time.monotonic()
    assert _post(url, {**BODY, "serviceTier": "flex"})[0] == 200
    assert time.monotonic() - started >= 0.1
    started = time.monotonic()
    assert _post(url, BODY)[0] == 200  # the standard tier is not slowed
    assert time.monotonic() - started < 0.1
    gemini.flex.configure(shed=1.0)
    status, body = _post(url, {**BODY, "serviceTier": "flex"})
    assert status == 503
    assert body["error"]["status"] == "UNAVAILABLE"
    assert gemini.requests[-1].fault == "flex-shed"
    for bad in ({"latency": -1}, {"shed": 2}, {"shed": "half"}, {"speed": 1}):
        assert _post(f"{gemini.base_url}/_stub/flex", bad)[0] == 400
    gemini.reset()
    assert gemini.flex.config_json() == {"latency": 0.0, "shed": 0.0}

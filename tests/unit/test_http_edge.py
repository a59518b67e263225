"""caption_http's last line of defence and its deadline, on a real starlette Request.

The batch run is a stand-in that fails or stalls on cue; everything between the
raw request and the answer is the real ``captioner.edges.http_api``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from captioner.batch import Totals
from captioner.domain import CaptionResult, Outcome
from captioner.edges import http_api
from captioner.errors import TransientError


class Run:
    """Yields one captioned result, then does ``then``: raise, stall, or end."""

    def __init__(self, request: Any, then: str) -> None:
        self.request = request
        self.totals = Totals()
        self._then = then

    async def results(self) -> AsyncGenerator[CaptionResult, None]:
        result = CaptionResult("http://x/a.jpg", Outcome.CAPTIONED, caption="A cat.")
        self.totals.add(result.outcome)
        yield result
        if self._then == "raise":
            raise RuntimeError("a bug of ours")
        if self._then == "transient":
            raise TransientError("storage is down")
        if self._then == "stall":
            await asyncio.sleep(3600)


def runtime(then: str, deadline: float = 5.0) -> Any:
    settings = SimpleNamespace(http_deadline=deadline, allowed_buckets=())
    return SimpleNamespace(settings=settings, batch=lambda request: Run(request, then))


def request(accept: str = "application/json") -> Request:
    body = json.dumps({"urls": ["http://x/a.jpg"]}).encode()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"application/json"), (b"accept", accept.encode())],
        "query_string": b"",
    }
    return Request(scope, receive)


async def lines_of(response: Any) -> list[dict[str, Any]]:
    chunks = [chunk async for chunk in response.body_iterator]
    text = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode()
    assert text.endswith("\n")  # never cut mid-line
    return [json.loads(line) for line in text.splitlines()]


async def test_an_unexpected_exception_is_a_500_naming_a_request_id_that_is_in_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="captioner"):
        response = await http_api.handle(runtime("raise"), request())
    assert response.status_code == 500
    answer = json.loads(bytes(response.body))
    request_id = answer["error"]["request_id"]
    assert request_id in answer["error"]["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None  # the traceback is in the logs, not the answer
    assert "a bug of ours" not in response.body.decode()


async def test_an_ndjson_stream_that_fails_ends_with_an_error_line_and_totals() -> None:
    response = await http_api.handle(runtime("raise"), request("application/x-ndjson"))
    lines = await lines_of(response)
    assert lines[0]["status"] == "ok"
    assert lines[1]["error"]["code"] == 500
    assert lines[1]["error"]["request_id"]
    assert lines[2]["totals"]["ok"] == 1


async def test_a_transient_failure_mid_stream_ends_with_an_error_line_and_totals() -> None:
    response = await http_api.handle(runtime("transient"), request("application/x-ndjson"))
    lines = await lines_of(response)
    assert "storage is down" in lines[1]["error"]["message"]
    assert "totals" in lines[-1]


async def test_a_request_past_its_deadline_answers_what_is_done_so_far() -> None:
    started = asyncio.get_running_loop().time()
    response = await http_api.handle(runtime("stall", deadline=0.3), request())
    assert asyncio.get_running_loop().time() - started < 2
    assert response.status_code == 200
    answer = json.loads(bytes(response.body))
    assert [r["status"] for r in answer["results"]] == ["ok"]
    assert "CAPTION_HTTP_DEADLINE=0.3s" in answer["incomplete"]
    assert answer["totals"]["ok"] == 1


async def test_an_ndjson_stream_past_its_deadline_ends_with_a_deadline_line_and_totals() -> None:
    response = await http_api.handle(
        runtime("stall", deadline=0.3), request("application/x-ndjson")
    )
    lines = await asyncio.wait_for(lines_of(response), 5)
    assert lines[1]["error"]["reason"] == "deadline"
    assert lines[2]["totals"]["ok"] == 1

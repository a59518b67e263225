"""Faults below the Gemini API's own error shapes, met by the real google-genai client:
a 200 whose body is not JSON, and a connection that drops.

A bare aiohttp server stands in for a broken proxy or load balancer, which is what
sends such answers; the stand-in speaks the API itself and is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from captioner.adapters.gemini import GeminiDescriber, make_client
from captioner.domain import PreparedImage
from captioner.errors import TransientError
from tests import images

Handler = Callable[[web.Request], Any]


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Any]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def describer(base_url: str) -> GeminiDescriber:
    client = make_client(5.0, {"GOOGLE_GEMINI_BASE_URL": base_url, "GEMINI_API_KEY": "k"})
    return GeminiDescriber(
        client,
        model="gemini-2.5-flash",
        prompt="Describe.",
        max_output_tokens=64,
        temperature=0.2,
        attempts=2,
        timeout=5.0,
        max_wait=0.05,
    )


def image() -> PreparedImage:
    return PreparedImage(images.photo(), "image/jpeg", 600, 400, "JPEG", 600, 400, False)


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>502 Bad Gateway</body></html>",
        "",
        '{"candidates": 5}',
        '{"candidates": [5]}',
        '{"candidates": [{"content": {"parts": 7}}]}',
        "[1, 2, 3]",
    ],
    ids=["html", "empty", "number", "list-of-number", "parts-number", "array"],
)
async def test_a_200_whose_body_is_not_a_gemini_answer_is_transient(server: Any, body: str) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(text=body, content_type="text/html")

    d = describer(await server(handler))
    with pytest.raises(TransientError):
        await d.describe(image())
    assert calls == 2  # CAPTION_GEMINI_ATTEMPTS, ours, not the SDK's


async def test_a_dropped_connection_is_tried_once_per_attempt_not_again_by_the_sdk(
    server: Any,
) -> None:
    connections = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal connections
        connections += 1
        assert request.transport is not None
        request.transport.close()
        raise web.HTTPInternalServerError

    d = describer(await server(handler))
    with pytest.raises(TransientError):
        await d.describe(image())
    # Without HttpRetryOptions(attempts=1) google-genai retries a dropped connection
    # once by itself, after sleeping 1-10 s: that would be 4 here.
    assert connections == 2


async def test_a_refused_connection_is_tried_once_per_attempt_not_again_by_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    import aiohttp

    with socket.socket() as s:  # a port nothing listens on: every connect is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests = 0
    original = aiohttp.ClientSession.request

    def counting(self: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
        nonlocal requests
        requests += 1
        return original(self, method, url, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "request", counting)
    d = describer(f"http://127.0.0.1:{port}")
    with pytest.raises(TransientError):
        await d.describe(image())
    # google-genai's own fallback on ClientConnectorError sleeps 1-10 s and sends the
    # request again (_api_client.py, "Retrying due to aiohttp error") unless
    # HttpRetryOptions is set: that would be 4 requests here, not 2.
    assert requests == 2

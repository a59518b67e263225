"""A pass-through in front of storage-testbench that adds its fault-injection headers.

The function under test builds its own HTTP session, so the headers that select a
testbench fault (``x-retry-test-id``, ``x-goog-emulator-instructions``) are added
here rather than by the code under test.
"""

from __future__ import annotations

from collections import deque

import aiohttp
from aiohttp import web

from captioner_dev.threaded import ThreadedServer


class Forwarder(ThreadedServer):
    """Every request goes on to ``upstream`` unchanged, except for two headers:
    ``x-retry-test-id`` (when ``retry_test_id`` is set) on all of them, and one
    ``x-goog-emulator-instructions`` from ``media_instructions`` on each of the next
    media downloads."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.retry_test_id: str | None = None
        self.media_instructions: deque[str] = deque()
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.retry_test_id = None
        self.media_instructions.clear()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        if self.retry_test_id is not None:
            headers["x-retry-test-id"] = self.retry_test_id
        if request.query.get("alt") == "media" and self.media_instructions:
            headers["x-goog-emulator-instructions"] = self.media_instructions.popleft()
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.raw_path,
                data=await request.read(),
                headers=headers,
            ) as upstream:
                body = await upstream.read()
                hop = {"content-length", "transfer-encoding", "connection"}
                passed = {k: v for k, v in upstream.headers.items() if k.lower() not in hop}
                return web.Response(body=body, status=upstream.status, headers=passed)
        except aiohttp.ClientError:
            # The testbench dropped the connection on purpose: so do we.
            assert request.transport is not None
            request.transport.close()
            raise

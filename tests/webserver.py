"""A small web server on 127.0.0.1 for URL-mode tests: images, redirects, slow and huge answers."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from captioner_dev.threaded import ThreadedServer
from tests import images


class ImageSite(ThreadedServer):
    """Runs in its own thread and loop; ``url(path)`` builds addresses on it."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/photos/{name}", self._photo)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/loop", self._loop_redirect)
        app.router.add_get("/huge", self._huge)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/missing", self._missing)
        app.router.add_get("/text", self._text)
        return app

    async def _photo(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(
            body=images.photo(request.match_info["name"]), content_type="image/jpeg"
        )

    async def _redirect(self, request: web.Request) -> web.Response:
        self.hits.append(request.path_qs)
        raise web.HTTPFound(request.query["to"])

    async def _loop_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)  # no Content-Length: the cap must hold while reading
        for _ in range(1000):
            await response.write(b"\xff" * 65536)
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(body=b"")

    async def _missing(self, request: web.Request) -> Any:
        raise web.HTTPNotFound()

    async def _text(self, request: web.Request) -> web.Response:
        return web.Response(text="not an image")


class CountingSite(ImageSite):
    """An ImageSite that records every request whatever its path, and can answer a
    redirect with a Location header exactly as given (aiohttp's HTTPFound would
    normalise a non-ASCII host first, hiding the spelling under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def make_app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append(request.path_qs)
            response: web.StreamResponse = await handler(request)
            return response

        app = super().make_app()
        app.middlewares.append(count)
        app.router.add_get("/raw-redirect", self._raw_redirect)
        return app

    async def _raw_redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

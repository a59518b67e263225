"""The review page's local web server (aiohttp), and what keeps it the reviewer's alone.

aiohttp, not Starlette: it is already a runtime dependency (the storage adapter's
client), it serves from the same event loop as that client with no ASGI server
process in between, and its AppRunner binds a port chosen by the system (``--port 0``)
whose number we learn before printing the URL.

Safety, for a server on a laptop next to a browser that visits other sites:

- it listens on 127.0.0.1 only, never on other interfaces;
- every request needs the session's secret: ``?token=`` in the URL printed (as Jupyter
  does), exchanged on first use for a cookie (HttpOnly, SameSite=Strict, named after the
  port) and a redirect that takes the token out of the address bar;
- a ``Host`` other than 127.0.0.1 or localhost at our port is refused, so a DNS
  rebinding page cannot reach the server under its own name;
- writes need, besides the cookie, a CSRF token that only the page itself can read (in
  its HTML, behind the cookie), a JSON body (a cross-site form cannot send one without a
  CORS preflight, which is never granted) and, when the browser sends them, an
  ``Origin`` of this server and ``Sec-Fetch-Site: same-origin``;
- object names, captions and every other text reach the page as JSON and are put in as
  text (``textContent``), never as markup; the page's Content-Security-Policy allows
  scripts and styles from this server only, so even markup that got through would run
  nothing;
- thumbnails are made and served by the app; ``--read-only`` refuses every write.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from captioner.edges.review.actions import Actions, Answer
from captioner.edges.review.listing import Cursor, Listing, Query
from captioner.edges.review.page import page
from captioner.edges.review.thumbs import Thumbnails
from captioner.errors import BadRequestError, ConfigurationError, PermanentError, TransientError

log = logging.getLogger("captioner.review")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_STATIC = {"review.js": "text/javascript", "review.css": "text/css"}
CSRF_HEADER = "X-Captioner-CSRF"
MAX_BODY = 64 * 1024


class ReviewServer:
    """One review session: its secrets, its listing, its actions, its HTTP routes."""

    def __init__(
        self,
        listing: Listing,
        actions: Actions,
        thumbnails: Thumbnails,
        *,
        read_only: bool,
        config: dict[str, Any],
    ) -> None:
        self.token = secrets.token_urlsafe(32)
        self.csrf = secrets.token_urlsafe(32)
        self.port = 0
        self._listing = listing
        self._actions = actions
        self._thumbnails = thumbnails
        self._read_only = read_only
        self._config = {**config, "read_only": read_only}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    @property
    def cookie(self) -> str:
        return f"captioner-review-{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{file}", self._static)
        app.router.add_get("/api/items", self._items)
        app.router.add_get("/api/folders", self._folders)
        app.router.add_get("/api/object", self._object)
        app.router.add_get("/thumb", self._thumb)
        app.router.add_post("/api/save", self._post(self._actions.save))
        app.router.add_post("/api/recaption", self._post(self._actions.recaption))
        app.router.add_post("/api/keep", self._post(self._actions.keep))
        return app

    async def start(self, port: int) -> web.AppRunner:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        # 127.0.0.1, never "" or 0.0.0.0: the page can write on the bucket as its user.
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        self.port = int(runner.addresses[0][1])
        return runner

    # ------------------------------------------------------------ the guard

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            response = exc
        except BadRequestError as exc:
            response = web.json_response({"error": str(exc)}, status=exc.status)
        except (TransientError, ConfigurationError) as exc:
            response = web.json_response({"error": f"Cloud Storage: {exc}"}, status=503)
        except PermanentError as exc:
            response = web.json_response({"error": str(exc)}, status=502)
        response.headers.update(_HEADERS)
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            return _refused("this server answers to 127.0.0.1 only")
        given = request.query.get("token")
        by_url = given is not None and _same(given, self.token)
        if by_url and request.path == "/" and request.method == "GET":
            # The token leaves the address bar (and the history) for a cookie.
            answer = web.HTTPSeeOther("/")
            answer.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
            return answer
        if not by_url and not _same(request.cookies.get(self.cookie, ""), self.token):
            return _refused("open the URL that `captioner review` printed (it has the token)")
        if request.method == "POST":
            if (why := self._forged(request)) is not None:
                log.warning("review: refused a write: %s", why)
                return _refused(why)
            if self._read_only:
                return _refused("read-only: started with --read-only")
        return await handler(request)

    def _forged(self, request: web.Request) -> str | None:
        """Why a write did not come from this server's own page, or None."""
        if not _same(request.headers.get(CSRF_HEADER, ""), self.csrf):
            return "no CSRF token"
        if request.content_type != "application/json":
            return "a write is a JSON body"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return "another origin"
        if request.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
            return "another site"
        return None

    # ------------------------------------------------------------ routes

    async def _page(self, request: web.Request) -> web.StreamResponse:
        html = page(f"gs://{self._listing.bucket}/{self._listing.prefix}", self.csrf, self._config)
        return web.Response(text=html, content_type="text/html", headers=_NO_STORE)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        text = resources.files("captioner.edges.review").joinpath(name).read_text("utf-8")
        return web.Response(text=text, content_type=_STATIC[name], headers=_NO_STORE)

    async def _items(self, request: web.Request) -> web.StreamResponse:
        query = Query.of(request.query)
        found = await self._listing.find(query, Cursor.decode(request.query.get("cursor", "")))
        body = {"items": found.items, "cursor": found.cursor, "scanned": found.scanned}
        return web.json_response(body, headers=_NO_STORE)

    async def _folders(self, request: web.Request) -> web.StreamResponse:
        folder = Query.of({"folder": request.query.get("folder", "")}).folder
        body = {"folders": await self._listing.folders(folder)}
        return web.json_response(body, headers=_NO_STORE)

    async def _object(self, request: web.Request) -> web.StreamResponse:
        status, body = await self._actions.item(request.query.get("name", ""))
        return web.json_response(body, status=status, headers=_NO_STORE)

    async def _thumb(self, request: web.Request) -> web.StreamResponse:
        name = self._actions.name_of(request.query.get("name", ""))
        try:
            generation = int(request.query.get("generation", ""))
        except ValueError:
            raise BadRequestError("generation must be a number") from None
        thumb = await self._thumbnails.get(self._listing.bucket, name, generation)
        if thumb is None:
            raise web.HTTPNotFound(text="no preview")
        # The URL names the generation, whose bytes never change.
        cache = {"Cache-Control": "private, max-age=86400"}
        return web.Response(body=thumb.data, content_type=thumb.mime_type, headers=cache)

    def _post(self, action: Callable[[dict[str, Any]], Awaitable[Answer]]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError):
                raise BadRequestError("the body is not JSON") from None
            if not isinstance(body, dict):
                raise BadRequestError("the body must be a JSON object")
            status, answer = await action(body)
            return web.json_response(answer, status=status, headers=_NO_STORE)

        return handle


_NO_STORE = {"Cache-Control": "no-store"}


def _same(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


def _refused(why: str) -> web.Response:
    return web.json_response({"error": why}, status=403)

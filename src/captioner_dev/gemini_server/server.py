"""The stand-in's HTTP server: the model routes, the ``/_stub/*`` control routes, and a
helper that runs it on a background thread."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

from captioner_dev.gemini_server.answer import Answerer, Outcome
from captioner_dev.gemini_server.batch_http import BatchEmulator
from captioner_dev.gemini_server.config import (
    CLIENT_MAX_SIZE,
    DEFAULT_BAD_KEY_PREFIX,
    FaultRule,
    Latency,
    StubConfigError,
)
from captioner_dev.gemini_server.errors import bad_key_error
from captioner_dev.gemini_server.flex import SHED_MESSAGE, FlexSettings, tier_of
from captioner_dev.gemini_server.oauth import TOKEN_PATH, TokenIssuer, vertex_needs_a_bearer
from captioner_dev.gemini_server.quota import QuotaShape
from captioner_dev.gemini_server.records import RequestRecord
from captioner_dev.gemini_server.state import StubState
from captioner_dev.gemini_server.tokens import thinking_tokens_for
from captioner_dev.gemini_server.wire import (
    MODEL_PATH,
    ApiError,
    ParsedRequest,
    dumps,
    json_error,
    parse_generate_request,
)
from captioner_dev.threaded import ThreadedServer, start_site

_SHUTDOWN_TIMEOUT: Final = 2.0


class GeminiStub(StubState):
    """The server and its state. Every method except start/stop is thread-safe."""

    def __init__(
        self,
        *,
        latency: Latency = None,
        quota_rps: float | None = None,
        quota_shape: QuotaShape | str = QuotaShape.BUCKET,
        quota_tpm: float | None = None,
        faults: Sequence[FaultRule] = (),
        bad_key_prefix: str | None = DEFAULT_BAD_KEY_PREFIX,
    ) -> None:
        super().__init__(
            latency=latency,
            quota_rps=quota_rps,
            quota_shape=quota_shape,
            quota_tpm=quota_tpm,
            faults=faults,
            bad_key_prefix=bad_key_prefix,
        )
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._base_url: str | None = None
        self._answerer = Answerer(self._sleep)
        # Google's token endpoint for service-account keys (oauth.py). Tokens outlive a
        # reset(): a client keeps the token it got for an hour.
        self.tokens = TokenIssuer()
        # The Flex tier's latency and shedding (flex.py).
        self.flex = FlexSettings()
        # Vertex AI batch prediction jobs (batch.py): settings, faults and the jobs it got.
        self.batch = BatchEmulator(self._answerer, self._sleep, issuer=self.tokens)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        if self._runner is not None:
            raise RuntimeError("GeminiStub is already running")
        self._stopping = asyncio.Event()
        runner = await start_site(self.make_app(), host, port, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, bound_host)
        if ":" in shown:
            shown = f"[{shown}]"
        self._base_url = f"http://{shown}:{bound_port}"
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if self._stopping is not None:
            self._stopping.set()
        await self.batch.aclose()
        if runner is not None:
            await runner.cleanup()
        self._base_url = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> GeminiStubThread:
        return GeminiStubThread(self, host=host, port=port).start()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("GeminiStub is not running")
        return self._base_url

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[vertex_needs_a_bearer])
        app.router.add_post(TOKEN_PATH, self.tokens.http_token)
        app.router.add_get("/_stub/health", self._http_health)
        app.router.add_get("/_stub/requests", self._http_requests)
        app.router.add_get("/_stub/config", self._http_get_config)
        app.router.add_post("/_stub/config", self._http_post_config)
        app.router.add_post("/_stub/reset", self._http_reset)
        app.router.add_get("/_stub/flex", self._http_flex)
        app.router.add_post("/_stub/flex", self._http_flex)
        self.batch.add_routes(app)
        # One catch-all instead of aiohttp patterns: a "{model}" variable cannot span the "/"
        # of Vertex resource names, and the ":action" suffix is easier to split with a regex.
        app.router.add_route("*", "/{tail:.*}", self._http_model)
        return app

    def reset(self) -> None:
        """Clears faults, latency, quota, the request log and the batch jobs and settings."""
        super().reset()
        self.batch.reset()
        self.flex.reset()

    # -- state --------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> bool:
        """Sleeps unless the stub is stopping; returns True if it was woken by stop()."""
        if seconds <= 0 or self._stopping is None:
            return False
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _http_model(self, request: web.Request) -> web.StreamResponse:
        route = MODEL_PATH.match(request.path)
        if route is None or request.method != "POST":
            return json_error(ApiError(404, f"Method not found: {request.method} {request.path}"))
        model = route["model"]
        api = "vertex" if route["project"] or route["publisher"] else "gemini"
        authorization = request.headers.get("Authorization", "")
        with self._lock:
            self._seq += 1
            self._calls += 1
            record = RequestRecord(
                seq=self._seq,
                path=request.path,
                api=api,
                api_version=route["version"],
                model=model,
                action=route["action"],
                api_key_present=bool(
                    request.headers.get("x-goog-api-key") or request.query.get("key")
                ),
                bearer_present=authorization.lower().startswith("bearer "),
                bearer_issued=self.tokens.issued_to(authorization) is not None,
                received_at=time.time(),
            )
            self._requests.append(record)
        outcome = await self._answer(request, record, model)
        with self._lock:
            record.status = outcome.status
            record.finish_reason = outcome.finish_reason
            record.answered_at = time.time()
            (
                record.prompt_tokens,
                record.image_tokens,
                record.thoughts_tokens,
                record.output_tokens,
            ) = outcome.usage
        if outcome.status == 200 and record.action == "streamGenerateContent":
            payload = json.dumps(outcome.body, ensure_ascii=False)
            return web.Response(text=f"data: {payload}\r\n\r\n", content_type="text/event-stream")
        return web.json_response(outcome.body, status=outcome.status, dumps=dumps)

    async def _answer(self, request: web.Request, record: RequestRecord, model: str) -> Outcome:
        key = request.headers.get("x-goog-api-key") or request.query.get("key") or ""
        prefix = self.bad_key_prefix
        if prefix and key.startswith(prefix):
            # The key is checked before anything else, as the real front end does.
            with self._lock:
                record.fault = "bad_key"
            return Outcome(400, bad_key_error().body())
        try:
            body = await _read_json(request)
            parsed = parse_generate_request(body)
        except ApiError as error:
            return Outcome(error.code, error.body())
        record.service_tier = tier_of(body, request.headers)
        if record.service_tier == "flex" and (
            shed := await _flex_wait(self.flex, self._sleep, record)
        ):
            return shed
        with self._lock:
            record.images = [image.record for image in parsed.images]
            record.file_uris = list(parsed.file_uris)
            record.prompt = parsed.prompt
            record.system_instruction = parsed.system_instruction
            record.generation_config = parsed.generation_config
        if record.action == "countTokens":
            return await self._answerer.count_tokens(parsed, model)
        try:
            # A thinking setting the model does not take is refused before any work.
            thoughts = thinking_tokens_for(model, parsed.generation_config)
        except ApiError as error:
            return Outcome(error.code, error.body())
        try:
            refused, rule, delay = await self._admit(parsed, model, record)
        except ApiError as error:
            return Outcome(error.code, error.body())
        if refused is not None:
            return Outcome(429, refused.body())
        if await self._sleep(delay):
            return Outcome(503, ApiError(503, "The stub is shutting down.").body())
        response_id = f"stub-{record.seq:08d}"
        try:
            if rule is not None:
                return await self._answerer.fault_outcome(rule, parsed, model, response_id)
            return await self._answerer.success(parsed, model, response_id, thoughts)
        except ApiError as error:
            return Outcome(error.code, error.body())

    async def _admit(
        self, parsed: ParsedRequest, model: str, record: RequestRecord
    ) -> tuple[ApiError | None, FaultRule | None, float]:
        """The quota's 429 (decided on arrival, like the real front end, so refusals are
        fast), else the fault rule that applies and the latency to answer after."""
        haystacks = [parsed.prompt, parsed.system_instruction]
        for image in parsed.images:
            haystacks += [image.record.sha256, f"[img:{image.record.fingerprint}]"]
        tokens = 0
        if self.quota_counts_tokens:
            # A tokens-per-minute quota charges the call its input tokens (the usage the
            # answer would report), so they are counted before it is let through.
            tokens = (await self._answerer.prompt_tokens(parsed, model)).total
        with self._lock:
            refused = self._take_quota(model, tokens)
            rule = None if refused is not None else self._take_fault(haystacks)
            delay = 0.0 if refused is not None else self._sample_latency()
            record.latency = delay
            record.fault = "quota" if refused is not None else (rule.kind if rule else None)
        return refused, rule, delay

    async def _http_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "calls": self.calls})

    async def _http_requests(self, request: web.Request) -> web.Response:
        since = request.query.get("since", "0")
        first = int(since) if since.isdigit() else 0
        records = [r.to_json() for r in self.requests if r.seq >= first]
        return web.json_response(records, dumps=dumps)

    async def _http_get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config_json())

    async def _http_post_config(self, request: web.Request) -> web.Response:
        try:
            self.configure_json(json.loads(await request.read() or b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError, StubConfigError) as exc:
            return json_error(ApiError(400, f"Invalid stub config: {exc}"))
        return web.json_response(self.config_json())

    async def _http_flex(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.flex.configure_json(json.loads(await request.read() or b"{}"))
            except (json.JSONDecodeError, UnicodeDecodeError, StubConfigError) as exc:
                return json_error(ApiError(400, f"Invalid flex config: {exc}"))
        return web.json_response(self.flex.config_json())

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "ok"})


class GeminiStubThread(ThreadedServer):
    """Runs a GeminiStub on its own event loop in a daemon thread, for synchronous code."""

    def __init__(
        self, stub: GeminiStub | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(host=host, port=port, name="GeminiStub")
        self.stub = stub or GeminiStub()

    async def astart(self) -> None:
        await self.stub.start(self.host, self.port)

    async def astop(self) -> None:
        await self.stub.stop()

    @property
    def base_url(self) -> str:
        return self.stub.base_url

    @property
    def requests(self) -> list[RequestRecord]:
        return self.stub.requests

    @property
    def calls(self) -> int:
        return self.stub.calls


async def _read_json(request: web.Request) -> Any:
    """The request's JSON body, or the 400 the real front end gives."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            400, f"Request payload size exceeds the limit: {CLIENT_MAX_SIZE} bytes."
        ) from exc
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ApiError(
            400, f"Invalid JSON payload received. {exc.__class__.__name__}: {exc}"
        ) from exc


async def _flex_wait(
    flex: FlexSettings, sleep: Callable[[float], Awaitable[bool]], record: RequestRecord
) -> Outcome | None:
    """Best effort: a shed request is refused at once; the others wait their minutes."""
    if flex.sheds():
        record.fault = "flex-shed"
        return Outcome(503, ApiError(503, SHED_MESSAGE).body())
    if await sleep(flex.delay()):
        return Outcome(503, ApiError(503, "The stub is shutting down.").body())
    return None

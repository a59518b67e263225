"""A fault-injecting HTTP proxy in front of fake-gcs-server.

fake-gcs-server ignores ``ifGenerationMatch`` / ``ifMetagenerationMatch`` on
PATCH and never bumps an object's metageneration, so this proxy keeps the
metageneration itself (every PATCH through it adds one, and object resources it
passes on carry its count), enforces both preconditions (under a lock, like the
real service's atomic check), records every request so tests can assert what was sent, answers with
chosen statuses or dropped connections on demand, and runs hooks just before a
PATCH to simulate what other writers do meanwhile (overwrite, edit, delete).

``add_instruction`` takes the fault names of Google's storage-testbench and of the
retry conformance scenarios (``return-503``, ``return-reset-connection``,
``return-broken-stream``, ``return-broken-stream-after-256K``,
``return-corrupted-data``...), with the testbench's meaning.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from captioner_dev.threaded import ThreadedServer

_STATUS = re.compile(r"return-(\d{3})$")
_BROKEN_AFTER = re.compile(r"return-broken-stream-after-(\d+)K$")
# storage-testbench's return-broken-stream breaks a download after a few bytes.
_BROKEN_STREAM_BYTES = 4


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    authorization: str = ""


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int | None = None  # None: drop the connection
    count: int = 1
    # Instead of an error status, a 200 whose body is broken: "cut" (the connection
    # drops after part of the declared body), "html" (a proxy's HTML page),
    # "bad-gzip" (an object stored with Content-Encoding: gzip whose bytes are not
    # gzip, with their true checksum); or the real answer, spoilt: "corrupt" (its
    # first byte changed, x-goog-hash kept, as storage-testbench's
    # return-corrupted-data), "broken-after-<n>" (the connection drops after n bytes
    # of the declared body).
    body: str | None = None
    query_contains: str = ""


@dataclass
class ProxyState:
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    before_patch: list[Callable[[], None]] = field(default_factory=list)


class GcsProxy(ThreadedServer):
    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.state = ProxyState()
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._patch_lock: asyncio.Lock | None = None
        self._metagenerations: dict[str, tuple[str, int]] = {}
        # Answer media downloads without x-goog-hash, as some intermediaries do.
        self.hide_hashes = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make_app(self) -> web.Application:
        self._patch_lock = asyncio.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def reset(self) -> None:
        with self._lock:
            self.state = ProxyState()
            self._metagenerations.clear()
            self.hide_hashes = False

    def add_fault(
        self,
        method: str,
        path_contains: str,
        status: int | None,
        count: int = 1,
        *,
        body: str | None = None,
        query_contains: str = "",
    ) -> None:
        with self._lock:
            self.state.faults.append(
                Fault(method, path_contains, status, count, body, query_contains)
            )

    def add_instruction(
        self, method: str, path_contains: str, instruction: str, *, query_contains: str = ""
    ) -> None:
        """Queue one storage-testbench fault for the next matching request."""
        status: int | None = None
        body: str | None = None
        if match := _STATUS.match(instruction):
            status = int(match.group(1))
        elif instruction == "return-reset-connection":
            status = None
        elif instruction == "return-broken-stream":
            body = f"broken-after-{_BROKEN_STREAM_BYTES}"
        elif match := _BROKEN_AFTER.match(instruction):
            body = f"broken-after-{int(match.group(1)) * 1024}"
        elif instruction == "return-corrupted-data":
            body = "corrupt"
        else:
            raise ValueError(f"the proxy cannot inject {instruction!r}")
        self.add_fault(method, path_contains, status, body=body, query_contains=query_contains)

    def before_next_patch(self, action: Callable[[], None]) -> None:
        """Run ``action`` (in a thread) just before the next PATCH is looked at."""
        with self._lock:
            self.state.before_patch.append(action)

    def pending_faults(self) -> int:
        """How many queued faults have not been served yet."""
        with self._lock:
            return sum(fault.count for fault in self.state.faults)

    def recorded(self, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.state.requests if method is None or r.method == method]

    def _take_fault(self, method: str, path: str, query: str = "") -> Fault | None:
        with self._lock:
            for fault in self.state.faults:
                if (
                    fault.method == method
                    and fault.path_contains in path
                    and fault.query_contains in query
                    and fault.count > 0
                ):
                    fault.count -= 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        record = Recorded(
            request.method,
            raw_path,
            dict(request.query),
            authorization=request.headers.get("Authorization", ""),
        )
        with self._lock:
            self.state.requests.append(record)
        fault = self._take_fault(request.method, request.path, request.query_string)
        if fault is not None and fault.body is not None:
            record.status = 200
            return await self._broken_body(request, fault.body)
        if fault is not None:
            if fault.status is None:
                assert request.transport is not None
                request.transport.close()  # a reset: the client sees a dropped connection
                record.status = -1
                raise asyncio.CancelledError
            record.status = fault.status
            return web.json_response(
                {"error": {"code": fault.status, "message": "injected"}}, status=fault.status
            )
        if (
            request.method == "POST"
            and raw_path.startswith("/upload/")
            and ("ifGenerationMatch" in request.query)
        ):
            # An upload under ifGenerationMatch (0: only if absent), which fake-gcs-server
            # does not enforce either: checked and forwarded under the same lock.
            assert self._patch_lock is not None
            async with self._patch_lock:
                refusal = await self._upload_refusal(raw_path, request.query)
                if refusal is not None:
                    record.status = refusal
                    return web.json_response(
                        {"error": {"code": refusal, "message": "precondition"}}, status=refusal
                    )
                response = await self._forward(request, raw_path)
            record.status = response.status
            return response
        if request.method == "PATCH":
            assert self._patch_lock is not None
            with self._lock:
                hooks, self.state.before_patch = self.state.before_patch, []
            for hook in hooks:  # outside the lock: a hook may PATCH through us too
                await asyncio.to_thread(hook)
            async with self._patch_lock:
                refusal = await self._precondition_refusal(raw_path, request.query)
                if refusal is not None:
                    record.status = refusal
                    return web.json_response(
                        {"error": {"code": refusal, "message": "precondition"}}, status=refusal
                    )
                response = await self._forward(request, raw_path, bump=True)
        else:
            response = await self._forward(request, raw_path)
        record.status = response.status
        return response

    async def _broken_body(self, request: web.Request, kind: str) -> web.StreamResponse:
        if kind == "html":
            return web.Response(
                text="<html><body>Service temporarily unavailable</body></html>",
                content_type="text/html",
            )
        if kind == "bad-gzip":
            stored = b"this is not gzip at all" * 10
            return web.Response(
                body=stored,
                headers={
                    "Content-Encoding": "gzip",
                    "Content-Type": "image/jpeg",
                    "x-goog-hash": f"crc32c={crc32c(stored)}",
                },
            )
        if kind == "corrupt" or kind.startswith("broken-after-"):
            return await self._spoilt(request, kind)
        assert kind == "cut", kind
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff" + b"\0" * 997)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _spoilt(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        status, headers, body = await self._upstream(request, raw_path)
        if kind == "corrupt":
            body = (b"B" if body[:1] == b"A" else b"A") + body[1:]
            return web.Response(body=body, status=status, headers=headers)
        cut = int(kind.removeprefix("broken-after-"))
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:cut])
        if cut < len(body):
            assert request.transport is not None
            request.transport.close()
        return response

    async def _upload_refusal(self, raw_path: str, query: Any) -> int | None:
        bucket = raw_path.removeprefix("/upload/storage/v1/b/").split("/", 1)[0]
        object_path = f"/storage/v1/b/{bucket}/o/{quote(query.get('name', ''), safe='')}"
        async with self._client().get(self.upstream + object_path) as current:
            generation = (
                "0"
                if current.status == 404
                else str((await current.json(content_type=None)).get("generation"))
            )
        return None if generation == query["ifGenerationMatch"] else 412

    async def _precondition_refusal(self, raw_path: str, query: Any) -> int | None:
        wanted_gen = query.get("ifGenerationMatch")
        wanted_meta = query.get("ifMetagenerationMatch")
        if wanted_gen is None and wanted_meta is None:
            return None
        session = self._client()
        async with session.get(self.upstream + raw_path) as current:
            if current.status == 404:
                return 404
            body = await current.json(content_type=None)
        if wanted_gen is not None and str(body.get("generation")) != wanted_gen:
            return 412
        if wanted_meta is not None and str(self._metageneration(raw_path, body)) != wanted_meta:
            return 412
        return None

    def _metageneration(self, path: str, resource: dict[str, Any], bump: bool = False) -> int:
        generation = str(resource.get("generation"))
        with self._lock:
            known_generation, count = self._metagenerations.get(path, (generation, 1))
            if known_generation != generation:
                count = 1
            if bump:
                count += 1
            self._metagenerations[path] = (generation, count)
            return count

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    async def _forward(
        self, request: web.Request, raw_path: str, bump: bool = False
    ) -> web.Response:
        status, headers, body = await self._upstream(request, raw_path, bump)
        return web.Response(body=body, status=status, headers=headers)

    async def _upstream(
        self, request: web.Request, raw_path: str, bump: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        """The upstream's answer to ``request``: status, headers to pass on, body."""
        session = self._client()
        query = request.raw_path.split("?", 1)[1] if "?" in request.raw_path else ""
        url = self.upstream + raw_path + (f"?{query}" if query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with session.request(
            request.method, url, data=await request.read(), headers=headers
        ) as upstream:
            body = await upstream.read()
            if upstream.status == 200 and "alt=media" not in query and "/o" in raw_path:
                body = self._with_metagenerations(raw_path, body, bump)
            dropped = {"content-length", "transfer-encoding", "connection"}
            if self.hide_hashes:
                dropped.add("x-goog-hash")
            passed = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            return upstream.status, passed, body

    def _with_metagenerations(self, raw_path: str, body: bytes, bump: bool) -> bytes:
        try:
            resource = json.loads(body)
        except ValueError:
            return body
        if not isinstance(resource, dict):
            return body
        if "generation" in resource and "name" in resource:
            count = self._metageneration(raw_path, resource, bump)
            resource["metageneration"] = str(count)
        for item in resource.get("items", []):
            path = f"/storage/v1/b/{item['bucket']}/o/{quote(item['name'], safe='')}"
            item["metageneration"] = str(self._metageneration(path, item))
        return json.dumps(resource).encode()


def crc32c(data: bytes) -> str:
    """The base64 CRC32C that ``x-goog-hash`` carries."""
    import google_crc32c

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode("ascii")

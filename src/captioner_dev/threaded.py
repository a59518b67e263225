"""An aiohttp server on its own event loop in a daemon thread, for synchronous code.

The Gemini stand-in (``GeminiStub.start_in_thread()``) and the test servers (the image site,
the Cloud Storage proxy) all run this way: next to the code under test, in the same process,
without sharing its event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

__all__ = ["ThreadedServer", "start_site"]

_T = TypeVar("_T")


async def start_site(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float
) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (0: any free port); the runner, once it listens."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class ThreadedServer:
    """Subclasses build their ``web.Application`` in ``make_app`` (on the server's loop) and
    may close their own resources in ``aclose``; or they replace ``astart`` and ``astop``
    altogether when they manage their own runner (as the Gemini stand-in does)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, name: str | None = None) -> None:
        self.host = host
        self.port = port
        self._name = name or type(self).__name__
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None

    # -- what subclasses provide ---------------------------------------------------------------

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def astart(self) -> None:
        """Starts serving on the server's loop; sets ``self.port`` to the bound port."""
        runner = await start_site(self.make_app(), self.host, self.port, shutdown_timeout=0.5)
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def astop(self) -> None:
        """Stops serving, on the server's loop."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.aclose()

    async def aclose(self) -> None:
        """Called on the server's loop when it stops."""

    # -- running -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} is already running")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self._name} did not start within {timeout:g} s")
        if self._error is not None:
            self._thread = None
            raise RuntimeError(f"{self._name} failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.astop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        """Runs ``coroutine`` on the server's loop and returns its result."""
        if self._loop is None:
            coroutine.close()
            raise RuntimeError(f"{self._name} is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.astart())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Wiring: settings → adapters → Captioner, one set per event loop.

aiohttp sessions and google-genai clients are bound to the loop that made them;
reusing one on another loop fails with "Event loop is closed" on warm instances.
So each loop gets its own, made on first use and reused for every later request.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from captioner.batch import BatchRun, CaptionRequest, FilesRequest
from captioner.captions import CaptionSpec
from captioner.domain import Description, PreparedImage, Usage
from captioner.errors import ConfigurationError
from captioner.models import estimated_tokens
from captioner.pipeline import Captioner, Describer, PipelineConfig
from captioner.pricing import Rate, unknown_price
from captioner.settings import Settings
from captioner.spending import CostCap, DailyBudget, Spending

# The estimate of a caption's cost is an average; one caption can cost more (a longer
# answer, a second ask): a cap holds a quarter more per image in flight.
CAP_MARGIN = 1.25

if TYPE_CHECKING:
    from google import genai

    from captioner.adapters.storage import StorageClient
    from captioner.adapters.urls import UrlFetcher


@dataclass(slots=True)
class NoGemini:
    """The describer when Gemini cannot be reached as configured (no key): every
    description is the configuration error, said once per image, never at start."""

    model: str
    error: Exception

    async def describe(self, image: PreparedImage, spec: CaptionSpec | None = None) -> Description:
        raise self.error


@dataclass(slots=True)
class LoopResources:
    """Everything bound to one event loop."""

    captioner: Captioner
    storage: StorageClient
    urls: UrlFetcher
    closers: list[object]


class Runtime:
    """Owns the per-loop clients for one Settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopResources] = (
            weakref.WeakKeyDictionary()
        )
        self._ready_client: genai.Client | None = None

    def preload(self) -> None:
        """Import the adapters and make a Gemini client now, for the first loop to take.

        For servers, called before they listen: Cloud Run routes requests to an
        instance only once it listens, so what is done here (0.6 s of imports,
        google-genai's client with its TLS contexts, 0.1-0.2 s) is not paid inside
        the first request. The google-genai client keeps a connection pool per event
        loop itself, so one made outside any loop serves the first loop that uses it.
        A missing key is left for that first request to report, as before.
        """
        import aiohttp  # noqa: F401

        from captioner.adapters import images, storage, urls  # noqa: F401
        from captioner.adapters.gemini import make_client
        from captioner.errors import ConfigurationError

        try:
            self._ready_client = make_client(
                self.settings.call_timeout, tier=self.settings.service_tier
            )
        except ConfigurationError:
            self._ready_client = None

    def resources(self) -> LoopResources:
        """The clients for the running loop, created on first use."""
        loop = asyncio.get_running_loop()
        resources = self._per_loop.get(loop)
        if resources is None:
            resources = self._build()
            self._per_loop[loop] = resources
        return resources

    def captioner(self) -> Captioner:
        return self.resources().captioner

    def batch(self, request: CaptionRequest) -> BatchRun:
        """A run of one HTTP or command-line request on the running loop's clients."""
        cap = self.cost_cap(request.max_cost) if request.max_cost is not None else None
        resources = self.resources()
        return BatchRun(
            request,
            captioner=resources.captioner,
            lister=resources.storage,
            fetch=resources.urls.fetch,
            concurrency=self.settings.max_concurrency,
            estimate=self.estimated_usage(),
            # Only the command line's describe reads local files; HTTP never does.
            read_local=self._read_local if isinstance(request, FilesRequest) else None,
            rate=self.rate(),
            cap=cap,
        )

    def cost_cap(self, limit: float) -> CostCap:
        """A run's cap (``--max-cost``); ConfigurationError when the price is unknown: a
        cap that cannot count would not hold."""
        each = self.rate().cost(self.estimated_usage())
        if each is None:
            raise ConfigurationError(
                f"a cost cap needs a price: {unknown_price(self.settings.model)}"
            )
        # The estimate is an average; a caption's real cost varies (a longer answer, a
        # second ask): a quarter more is held per image in flight.
        return CostCap(limit, each * CAP_MARGIN)

    def rate(self) -> Rate:
        """What this configuration's tokens cost (its price None: not known)."""
        s = self.settings
        return Rate(s.model, s.service_tier, s.price_book().price(s.model, s.service_tier))

    async def _read_local(self, source: str) -> bytes:
        from captioner.adapters.files import read_local

        return await read_local(source, self.settings.max_bytes)

    def estimated_usage(self) -> Usage:
        """What one caption is expected to cost, for dry runs (captioner.models)."""
        s = self.settings
        prompt, image, thinking, output = estimated_tokens(
            s.model, s.thinking, s.media_resolution, s.rule_book().default.full_prompt()
        )
        return Usage(prompt, output, thinking, image, calls=1)

    def _spending(self, storage: StorageClient) -> Spending:
        """The cost gate: a run's cap (set per run) and, with CAPTION_DAILY_BUDGET_USD, a
        ledger per bucket, shared by every request of this loop."""
        s = self.settings
        budget = s.daily_budget_usd
        budgets: dict[str, DailyBudget] = {}

        def of(bucket: str) -> DailyBudget:
            if bucket not in budgets:
                assert budget is not None
                budgets[bucket] = DailyBudget(storage, bucket, s.budget_prefix, budget)
            return budgets[bucket]

        estimate = self.estimated_usage()
        return Spending(self.rate(), estimate, of if budget is not None else None)

    def _build(self) -> LoopResources:
        # Imported here so a cold start pays for google-genai only when it is used.
        import aiohttp

        from captioner.adapters.gemini import GeminiDescriber, make_client
        from captioner.adapters.images import decode_cost, prepare
        from captioner.adapters.storage import StorageClient
        from captioner.adapters.urls import UrlFetcher
        from captioner.limiter import AdaptiveLimiter, slow_start_initial

        s = self.settings
        client, self._ready_client = self._ready_client, None
        describer: Describer
        try:
            if client is None:
                client = make_client(s.call_timeout, tier=s.service_tier)
        except ConfigurationError as exc:
            # No key: what needs no Gemini (a dry run, reading back) still works; the
            # first image to describe reports it.
            describer = NoGemini(s.model, exc)
        else:
            describer = GeminiDescriber.from_settings(
                client,
                s,
                # A cold instance starts low and triples per round (slow start): the
                # instances of a fleet start together against one quota.
                limiter=AdaptiveLimiter(
                    s.max_concurrency,
                    initial=slow_start_initial(s.max_concurrency),
                    max_pause=s.retry_max_wait,
                ),
            )
        connector = aiohttp.TCPConnector(limit=max(2 * s.max_concurrency, 10))
        session = aiohttp.ClientSession(connector=connector)
        storage = StorageClient.from_env(session, attempts=s.storage_attempts)
        captioner = Captioner(
            storage=storage,
            describer=describer,
            prepare=partial(prepare, max_edge=s.max_edge, max_pixels=s.max_pixels),
            # What each decode costs in memory, so the pipeline's budget can bound it.
            decode_cost=partial(decode_cost, max_edge=s.max_edge, max_pixels=s.max_pixels),
            config=PipelineConfig(
                max_bytes=s.max_bytes,
                max_concurrency=s.max_concurrency,
                metadata_prefix=s.metadata_prefix,
                rules=s.rule_book(),
            ),
            spending=self._spending(storage),
        )
        urls = UrlFetcher.create(
            max_bytes=s.max_bytes,
            allowed_hosts=s.url_allowed_hosts,
            max_redirects=s.url_max_redirects,
            timeout=s.url_timeout,
            limit=s.max_concurrency,
        )
        closers: list[object] = [urls, session] if client is None else [client, urls, session]
        return LoopResources(captioner, storage, urls, closers)

    async def aclose(self) -> None:
        """Close the running loop's clients (for CLIs and tests; servers just exit)."""
        loop = asyncio.get_running_loop()
        resources = self._per_loop.pop(loop, None)
        if resources is None:
            return
        resources.captioner.close()
        for closer in resources.closers:
            aio = getattr(closer, "aio", None)
            if aio is not None:
                await aio.aclose()
            else:
                await closer.close()  # type: ignore[attr-defined]

"""Many images at once, for the HTTP function and the command line.

One request form each: named objects, a bucket prefix (a backfill), or URLs.
Results stream out as they complete; counts are kept as they go, including the
objects a backfill passes over without listing them one by one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from captioner.concurrency import bounded_as_completed
from captioner.decisions import Skip
from captioner.domain import CaptionResult, ObjectInfo, ObjectRef, Outcome, Usage
from captioner.pipeline import Captioner
from captioner.pricing import Rate, dollars
from captioner.spending import CostCap, capped

T = TypeVar("T")


# The three forms of a request, whether they come from the HTTP function or the
# command line (edges/http_body.py parses the HTTP form).
@dataclass(frozen=True, slots=True)
class ObjectsRequest:
    objects: tuple[ObjectRef, ...]
    overwrite: bool = False
    max_cost: float | None = None  # US dollars this run may spend (captioner.spending)
    # Replace captions a person wrote or approved too (with ``overwrite``).
    include_human: bool = False


@dataclass(frozen=True, slots=True)
class PrefixRequest:
    bucket: str
    prefix: str = ""
    limit: int = 1000
    overwrite: bool = False
    dry_run: bool = False
    if_stale: bool = False
    max_cost: float | None = None
    include_human: bool = False


@dataclass(frozen=True, slots=True)
class UrlsRequest:
    urls: tuple[str, ...]
    max_cost: float | None = None


@dataclass(frozen=True, slots=True)
class FilesRequest:
    """Local files, standard input (``-``) and URLs: the command line's ``describe``.
    Never made from an HTTP body: the HTTP function must not read its own disk."""

    sources: tuple[str, ...]
    max_cost: float | None = None


CaptionRequest = ObjectsRequest | PrefixRequest | UrlsRequest | FilesRequest


class Lister(Protocol):
    def list_objects(self, bucket: str, prefix: str = "") -> AsyncIterator[ObjectInfo]: ...


Fetch = Callable[[str], Awaitable[bytes]]


@dataclass
class Totals:
    counts: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    usage: Usage = field(default_factory=Usage)
    # A dry run's estimate of what the planned captions would cost, kept apart.
    estimated: Usage = field(default_factory=Usage)
    # Why objects were skipped: already-captioned, not-an-image, excluded-by-rule, …
    skipped: Counter[str] = field(default_factory=Counter)
    # What the tokens are paid at (captioner.pricing); None: not priced.
    rate: Rate | None = None
    # Why the run stopped taking images before the end (its spending cap), if it did.
    stopped: str | None = None

    def add(
        self, outcome: Outcome, n: int = 1, usage: Usage | None = None, reason: str | None = None
    ) -> None:
        self.counts[outcome.value] += n
        if outcome is Outcome.SKIPPED:
            self.skipped[reason or "unknown"] += n
        if usage is None:
            return
        if outcome is Outcome.PLANNED:
            self.estimated += usage
        else:
            self.usage += usage

    @property
    def failed(self) -> int:
        return self.counts[Outcome.FAILED.value] + self.counts[Outcome.RETRY.value]

    def as_dict(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        described = self.counts[Outcome.CAPTIONED.value] + self.counts[Outcome.BLOCKED.value]
        return {
            **{o.value: self.counts[o.value] for o in Outcome},
            "total": sum(self.counts.values()),
            "seconds": round(seconds, 3),
            "images_per_second": round(described / seconds, 2) if seconds > 0 else 0.0,
            "skipped_by_reason": dict(self.skipped.most_common()),
            "tokens": self.usage.as_fields(),
            "cost_usd": self._dollars(self.usage),
            **({"stopped": self.stopped} if self.stopped else {}),
            **(
                {
                    "estimated_tokens": self.estimated.as_fields(),
                    "estimated_cost_usd": self._dollars(self.estimated),
                }
                if self.estimated.calls
                else {}
            ),
        }

    def _dollars(self, usage: Usage) -> float | None:
        cost = None if self.rate is None else self.rate.cost(usage)
        return None if cost is None else round(cost, 6)


def _stopped_at(cap: CostCap) -> str:
    return (
        f"stopped at the cost cap of {dollars(cap.limit)}: {dollars(cap.spent)} spent; "
        "the images not started are left for the next run"
    )


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def result_json(result: CaptionResult) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": result.source, "status": result.outcome.value}
    if result.caption is not None:
        entry["caption"] = result.caption
    if result.alt:
        entry["alt"] = result.alt
    if result.tags:
        entry["tags"] = list(result.tags)
    if result.translations:
        entry["translations"] = dict(result.translations)
    if result.reason:
        entry["reason"] = result.reason
    if result.message:
        entry["error" if result.outcome in (Outcome.FAILED, Outcome.RETRY) else "detail"] = (
            result.message
        )
    if result.generation is not None:
        entry["generation"] = str(result.generation)
    return entry


class BatchRun:
    """Carries out one request; iterate ``results()`` and read ``totals`` afterwards."""

    def __init__(
        self,
        request: CaptionRequest,
        *,
        captioner: Captioner,
        lister: Lister,
        fetch: Fetch,
        concurrency: int,
        estimate: Usage | None = None,
        read_local: Fetch | None = None,
        rate: Rate | None = None,
        cap: CostCap | None = None,
    ) -> None:
        self.request = request
        self.totals = Totals(rate=rate)
        self._cap = cap
        self._captioner = captioner
        self._lister = lister
        self._fetch = fetch
        self._read_local = read_local
        self._concurrency = concurrency
        self._estimate = estimate or Usage(calls=1)

    async def results(self) -> AsyncGenerator[CaptionResult, None]:
        # The run's cap travels with its images' tasks (they inherit this context).
        with capped(self._cap):
            stream = self._run()
            async with aclosing(stream):  # type: ignore[type-var]
                async for result in stream:
                    self.totals.add(result.outcome, usage=result.usage, reason=result.reason)
                    yield result
                    if result.reason == "budget-exhausted":
                        # The day's budget is spent: every other image would say so too.
                        self.totals.stopped = (
                            f"{result.message}; a backfill after midnight (UTC) goes on"
                        )
                        return
        cap = self._cap
        if cap is not None and (cap.stopped or self.totals.skipped["cost-cap"]):
            self.totals.stopped = _stopped_at(cap)

    def _run(self) -> AsyncIterator[CaptionResult]:
        request = self.request
        if isinstance(request, ObjectsRequest):
            objects = self._until_capped(request.objects)
            return self._captioner.caption_many(
                objects, overwrite=request.overwrite, include_human=request.include_human
            )
        if isinstance(request, UrlsRequest):
            urls = self._until_capped(request.urls)
            return bounded_as_completed(urls, self._describe_url, self._concurrency)
        if isinstance(request, FilesRequest):
            sources = self._until_capped(request.sources)
            return bounded_as_completed(sources, self._describe_local, self._concurrency)
        if request.dry_run:
            return self._plan(request)
        return self._captioner.caption_many(
            self._until_capped(self._candidates(request)),
            overwrite=request.overwrite,
            if_stale=request.if_stale,
            include_human=request.include_human,
        )

    async def _until_capped(self, items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
        """``items`` until the run's cap has no room for one more image: the rest are
        not started (nor listed further), and a second run goes on from there."""
        async for item in _aiter(items):
            if self._cap is not None and self._cap.full():
                return
            yield item

    async def _describe_url(self, url: str) -> CaptionResult:
        from captioner.adapters.urls import redact  # here: aiohttp is loaded in URL mode anyway

        return await self._captioner.describe_source(redact(url), lambda: self._fetch(url))

    async def _describe_local(self, source: str) -> CaptionResult:
        if source.startswith(("http://", "https://")):
            return await self._describe_url(source)
        read = self._read_local
        if read is None:
            raise RuntimeError("this run was not given a reader of local files")
        return await self._captioner.describe_source(source, lambda: read(source))

    async def _candidates(self, request: PrefixRequest) -> AsyncIterator[ObjectInfo]:
        """Listed objects that need a caption, up to ``limit``; the rest are only counted."""
        chosen = 0
        async for info in self._lister.list_objects(request.bucket, request.prefix):
            if chosen >= request.limit:
                return
            decision = self._captioner.decide(
                info,
                overwrite=request.overwrite,
                if_stale=request.if_stale,
                include_human=request.include_human,
            )
            if isinstance(decision, Skip):
                self.totals.add(Outcome.SKIPPED, reason=decision.reason)
            else:
                chosen += 1
                yield info

    async def _plan(self, request: PrefixRequest) -> AsyncIterator[CaptionResult]:
        async for info in self._candidates(request):
            yield CaptionResult(
                f"gs://{info.bucket}/{info.name}",
                Outcome.PLANNED,
                generation=info.generation,
                message=f"{info.content_type}, {info.size} bytes",
                usage=self._estimate,
            )

"""The asyncio core: fetch → prepare → describe → write, bounded and streaming.

Pure of vendor imports: storage, Gemini and Pillow come in through the small
protocols below, so the rules here are tested with in-memory fakes and, in
integration tests, with the real adapters. What to caption is decided in
``decisions``, how an outcome is written in ``recording``, and where images are
decoded in ``preparing``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from captioner import stages
from captioner.budget import Budget
from captioner.captions import DEFAULT_PROMPT, CaptionSpec
from captioner.concurrency import bounded_as_completed
from captioner.decisions import Skip, Wanted, decide
from captioner.domain import (
    CaptionResult,
    Description,
    ObjectInfo,
    ObjectRef,
    Outcome,
    PreparedImage,
    Usage,
)
from captioner.errors import ObjectGoneError, PermanentError, TransientError
from captioner.metadata import MetadataKeys, clean_caption
from captioner.preparing import DecodeCost, Decoder, PreparePool, Preparer, as_decoder
from captioner.recording import MetadataStore, Recorder, result_for, verdict
from captioner.rules import RuleBook
from captioner.spending import Refused, Spending, Ticket

log = logging.getLogger("captioner")


class Storage(MetadataStore, Protocol):
    """Reads and writes metadata (recording.MetadataStore) and downloads bytes."""

    async def download(
        self, bucket: str, name: str, *, generation: int, max_bytes: int
    ) -> bytes: ...


class Describer(Protocol):
    model: str

    async def describe(
        self, image: PreparedImage, spec: CaptionSpec | None = None
    ) -> Description: ...


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    max_bytes: int
    max_concurrency: int
    metadata_prefix: str = "caption"
    rules: RuleBook = RuleBook(CaptionSpec(DEFAULT_PROMPT, structured=False))  # noqa: RUF009 - frozen
    # Threads for a plain ``prepare`` callable (tests); None: one per CPU this process
    # may use. The decode workers (preparing.ProcessDecoder) have their own count.
    prepare_threads: int | None = None
    # Memory, for an instance of 1 GiB and a target peak of 600 MB for the process and
    # its decode workers (the arithmetic is in captioner.preparing). The memory the
    # decodes running at once are allowed sums to this much at most, and it is also
    # the most one image may be allowed (decode_price.DECODE_BUDGET is the same figure).
    decode_budget: int = 256 * 1024 * 1024
    # Downloaded objects held in memory at once, from the start of their download to the
    # end of their prepare. Without it 20 objects in flight of CAPTION_MAX_BYTES (20 MiB)
    # would hold 400 MiB; 128 MiB still lets 6 such objects, or hundreds of photos, wait.
    held_bytes_budget: int = 128 * 1024 * 1024
    # Gemini calls in flight, each with its request as google-genai holds it until the
    # answer: the image, its base64, the JSON body and the connection's buffers, about
    # 400 KB for a 768 px photo (measured: 2,100 flex calls in flight took the CLI to
    # 682 MiB; 1,000 of them at a time, to 505 MiB). A call is admitted, before its
    # download, only while the calls in flight fit here: at the flex tier's minutes per
    # call, memory, not the count, is what bounds them (768 calls at a time).
    calls_bytes_budget: int = 288 * 1024 * 1024
    bytes_per_call: int = 384 * 1024

    @property
    def images_in_flight(self) -> int:
        """Gemini calls are bounded by ``max_concurrency`` (the describer's limiter); a
        quarter more images are let in so that the next ones are downloaded and prepared
        while those calls run, and no Gemini slot waits on a download or a decode."""
        return self.max_concurrency + max(2, self.max_concurrency // 4)


class Captioner:
    """Captions objects in place. Safe to share between concurrent calls on one loop."""

    def __init__(
        self,
        *,
        storage: Storage,
        describer: Describer,
        prepare: Preparer | Decoder,
        config: PipelineConfig,
        decode_cost: DecodeCost | None = None,
        spending: Spending | None = None,
    ) -> None:
        self._storage = storage
        self._spending = spending
        self._describer = describer
        self._config = config
        self._keys = MetadataKeys(config.metadata_prefix, config.rules.default.languages)
        self._rules = config.rules
        self._recorder = Recorder(storage, self._keys, describer.model)
        # Shared by every request on this loop: this bounds the images in flight per
        # instance (and so its memory), however many events arrive at once.
        self._in_flight = asyncio.Semaphore(config.images_in_flight)
        self._pool = PreparePool(
            as_decoder(prepare, threads=config.prepare_threads, cost=decode_cost),
            decode_budget=config.decode_budget,
            held_bytes_budget=config.held_bytes_budget,
        )
        # The two memory budgets, for tests and benchmarks.
        self.decode_budget = self._pool.decode_budget
        self.held_bytes = self._pool.held_bytes
        self.calls_bytes = Budget(config.calls_bytes_budget)

    def close(self) -> None:
        """Let the prepare threads go (decode workers stay, for the process's next use)."""
        self._pool.close()

    async def caption_object(
        self,
        ref: ObjectRef | ObjectInfo,
        *,
        overwrite: bool = False,
        if_stale: bool = False,
        include_human: bool = False,
    ) -> CaptionResult:
        """Caption one object; never raises for a per-object problem (see the Outcome).

        Given an ObjectInfo (from a listing), that is used instead of a fresh read;
        the write's preconditions still catch anything that changed since.
        ``overwrite`` captions again even when this generation already has one;
        ``if_stale`` only when it was made by another model, prompt or rule. Neither
        replaces a caption a person wrote or approved, unless ``include_human``.
        """
        started = time.monotonic()
        with stages.timing() as stopwatch:
            async with self._in_flight:
                result = await self._caption_object(ref, overwrite, if_stale, include_human)
        return replace(result, seconds=time.monotonic() - started, stages=dict(stopwatch.seconds))

    async def caption_many(
        self,
        refs: Iterable[ObjectRef | ObjectInfo] | AsyncIterable[ObjectRef | ObjectInfo],
        **flags: bool,
    ) -> AsyncIterator[CaptionResult]:
        """Results as they complete, with at most ``images_in_flight`` objects in flight.

        ``refs`` is consumed lazily, so a listing of millions never sits in memory.
        ``flags`` are caption_object's: overwrite, if_stale, include_human.
        """

        async def one(ref: ObjectRef | ObjectInfo) -> CaptionResult:
            return await self.caption_object(ref, **flags)

        async for result in bounded_as_completed(refs, one, self._config.images_in_flight):
            yield result

    def decide(self, info: ObjectInfo, **flags: bool) -> Skip | Wanted:
        """Whether ``info`` needs a caption (captioner.decisions), with this instance's
        keys, rules and model; ``flags``: overwrite, if_stale, include_human."""
        return decide(
            info, keys=self._keys, rules=self._rules, model=self._describer.model, **flags
        )

    async def describe_source(
        self,
        source: str,
        load: Callable[[], Awaitable[bytes]],
        *,
        spec: CaptionSpec | None = None,
    ) -> CaptionResult:
        """Describe an image that is not ours to write on (a local file, a URL), or that
        a person will decide about (the review page's caption again): with ``spec``, else
        the default prompt."""
        started = time.monotonic()
        async with self._in_flight:
            result = await self._describe_source(source, load, spec or self._rules.default)
        return replace(result, seconds=time.monotonic() - started)

    async def _describe_source(
        self, source: str, load: Callable[[], Awaitable[bytes]], spec: CaptionSpec
    ) -> CaptionResult:
        try:
            ticket = await self._admit(None)
        except Refused as refused:
            return CaptionResult(
                source, Outcome.SKIPPED, reason=refused.reason, message=str(refused)
            )
        usage: Usage | None = None
        try:
            async with self.calls_bytes.take(self._config.bytes_per_call):
                # The size is not known before the load: hold room for the largest allowed.
                async with self._pool.hold(self._config.max_bytes):
                    data = await load()
                    prepared = await self._pool.prepared(data)
                    del data
                description = await self._describer.describe(prepared, spec)
            usage = description.usage
        except PermanentError as exc:
            return CaptionResult(source, Outcome.FAILED, reason=exc.reason, message=str(exc))
        except TransientError as exc:
            return CaptionResult(source, Outcome.RETRY, reason=exc.reason, message=str(exc))
        finally:
            if ticket is not None:
                ticket.settle(usage)
        caption = clean_caption(description.text) if description.text else ""
        if not caption:
            return CaptionResult(
                source,
                Outcome.BLOCKED,
                reason=description.blocked_reason or "EMPTY",
                usage=description.usage,
            )
        return CaptionResult(
            source,
            Outcome.CAPTIONED,
            caption=caption,
            usage=description.usage,
            alt=description.alt,
            tags=description.tags,
            translations=description.translations,
        )

    async def _caption_object(
        self, item: ObjectRef | ObjectInfo, overwrite: bool, if_stale: bool, include_human: bool
    ) -> CaptionResult:
        if isinstance(item, ObjectInfo):
            ref, info = _ref_of(item), item
        else:
            ref = item
            read = await self._recorder.read(ref)
            if isinstance(read, CaptionResult):
                return read
            info = read
        if ref.generation is not None and info.generation != ref.generation:
            # A newer upload replaced this one; its own event will caption it.
            return result_for(
                ref,
                Outcome.SKIPPED,
                reason="superseded",
                message=f"generation {ref.generation} was replaced by {info.generation}",
                generation=info.generation,
            )
        decision = self.decide(
            info, overwrite=overwrite, if_stale=if_stale, include_human=include_human
        )
        if isinstance(decision, Skip):
            return self._skipped(ref, info, decision)
        spec = decision.spec
        try:
            ticket = await self._admit(info.bucket)
        except Refused as refused:
            return result_for(
                ref, Outcome.SKIPPED, reason=refused.reason, message=str(refused),
                generation=info.generation,
            )  # fmt: skip
        usage: Usage | None = None
        try:
            # Just in time: nothing is downloaded or prepared before its call has room.
            async with self.calls_bytes.take(self._config.bytes_per_call):
                description = await self._describe(info, spec)
            usage = description.usage
        except PermanentError as exc:
            return await self._recorder.write(ref, info, verdict(self._keys, spec, error=exc))
        except ObjectGoneError:
            return result_for(
                ref, Outcome.SKIPPED, reason="gone", message="deleted or replaced while captioning"
            )
        except TransientError as exc:
            return result_for(
                ref, Outcome.RETRY, reason=exc.reason, message=str(exc), generation=info.generation
            )
        finally:
            if ticket is not None:
                ticket.settle(usage)
        return await self._recorder.write(
            ref, info, verdict(self._keys, spec, description=description)
        )

    def _skipped(self, ref: ObjectRef, info: ObjectInfo, skip: Skip) -> CaptionResult:
        # The owner's own `caption` key is a problem they must solve (a setting), so a
        # named object or upload reports it as a failure; a backfill only counts it.
        outcome = Outcome.FAILED if skip.reason == "metadata-conflict" else Outcome.SKIPPED
        caption = (
            info.metadata.get(self._keys.caption) if skip.reason == "already-captioned" else None
        )
        return result_for(
            ref,
            outcome,
            caption=caption,
            reason=skip.reason,
            message=skip.message,
            generation=info.generation,
        )

    async def _admit(self, bucket: str | None) -> Ticket | None:
        """Room in the run's cap and the day's budget for one more image (Refused: none).
        Asked before the download, so an image refused costs nothing at all."""
        if self._spending is None:
            return None
        refusal = self._spending.refusal(bucket)
        if refusal is not None:
            raise refusal
        return await self._spending.admit(bucket)

    async def _describe(self, info: ObjectInfo, spec: CaptionSpec) -> Description:
        if info.size == 0:
            raise PermanentError("empty", "the object has no bytes")
        if info.size > self._config.max_bytes:
            raise PermanentError(
                "too-large",
                f"{info.size} bytes is over CAPTION_MAX_BYTES={self._config.max_bytes}",
            )
        stopwatch = stages.current()
        async with self._pool.hold(info.size):
            with stopwatch.measure("fetch"):
                data = await self._storage.download(
                    info.bucket,
                    info.name,
                    generation=info.generation,
                    max_bytes=self._config.max_bytes,
                )
            # In a decode worker (preparing): the loop keeps serving others meanwhile.
            with stopwatch.measure("prepare"):
                prepared = await self._pool.prepared(data)
            del data
        with stopwatch.measure("describe"):
            return await self._describer.describe(prepared, spec)


def _ref_of(info: ObjectInfo) -> ObjectRef:
    return ObjectRef(
        info.bucket,
        info.name,
        info.generation,
        info.metageneration,
        info.content_type,
        info.size,
    )

"""The asyncio core: fetch → prepare → describe → write, bounded and streaming.

Pure of vendor imports: storage, Gemini and Pillow come in through the small
protocols below, so the rules here are tested with in-memory fakes and, in
integration tests, with the real adapters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from captioner.budget import Budget
from captioner.captions import DEFAULT_PROMPT, CaptionSpec
from captioner.domain import (
    CaptionResult,
    Description,
    ObjectInfo,
    ObjectRef,
    Outcome,
    PreparedImage,
    Usage,
)
from captioner.errors import (
    ObjectGoneError,
    PermanentError,
    PreconditionFailedError,
    TransientError,
)
from captioner.metadata import (
    MetadataKeys,
    NoRoomError,
    caption_updates,
    clean_caption,
    is_done,
    owner_conflict,
)
from captioner.rules import RuleBook

log = logging.getLogger("captioner")

T = TypeVar("T")
R = TypeVar("R")

# Content types that are sniffed rather than trusted, when the name looks like an image.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# Names that say "image" (the formats images.prepare accepts).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
# How often a write is retried after the owner changed metadata under us.
_WRITE_ROUNDS = 4


class Storage(Protocol):
    async def get_object(self, bucket: str, name: str) -> ObjectInfo: ...

    async def download(
        self, bucket: str, name: str, *, generation: int, max_bytes: int
    ) -> bytes: ...

    async def patch_metadata(
        self,
        bucket: str,
        name: str,
        metadata: Mapping[str, str],
        *,
        if_generation_match: int,
        if_metageneration_match: int | None,
    ) -> ObjectInfo: ...


class Describer(Protocol):
    model: str

    async def describe(
        self, image: PreparedImage, spec: CaptionSpec | None = None
    ) -> Description: ...


Preparer = Callable[[bytes], PreparedImage]
# Peak bytes a prepare of these bytes will allocate, from the image's header
# (images.decode_cost); never raises.
DecodeCost = Callable[[bytes], int]


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    max_bytes: int
    max_concurrency: int
    metadata_prefix: str = "caption"
    rules: RuleBook = RuleBook(CaptionSpec(DEFAULT_PROMPT, structured=False))  # noqa: RUF009 - frozen
    # Threads that decode and shrink images; None: one per CPU this process may use.
    prepare_threads: int | None = None
    # Memory, for an instance of 1 GiB and a target peak of 600 MB (~70 MB of it the
    # interpreter and libraries). Decodes running at once may sum to this much by their
    # estimated cost (images.DECODE_BUDGET is the same figure: what one image may cost).
    decode_budget: int = 256 * 1024 * 1024
    # Downloaded objects held in memory at once, from the start of their download to the
    # end of their prepare. Without it 20 objects in flight of CAPTION_MAX_BYTES (20 MiB)
    # would hold 400 MiB; 128 MiB still lets 6 such objects, or hundreds of photos, wait.
    held_bytes_budget: int = 128 * 1024 * 1024

    @property
    def images_in_flight(self) -> int:
        """Gemini calls are bounded by ``max_concurrency`` (the describer's limiter); a
        quarter more images are let in so that the next ones are downloaded and prepared
        while those calls run, and no Gemini slot waits on a download or a decode."""
        return self.max_concurrency + max(2, self.max_concurrency // 4)


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def looks_like_image(info: ObjectInfo) -> bool:
    """Images by content type; generic types only when the name says image."""
    content_type = info.content_type.split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return True
    return content_type in _GENERIC_TYPES and info.name.lower().endswith(IMAGE_SUFFIXES)


class Captioner:
    """Captions objects in place. Safe to share between concurrent calls on one loop."""

    def __init__(
        self,
        *,
        storage: Storage,
        describer: Describer,
        prepare: Preparer,
        config: PipelineConfig,
        decode_cost: DecodeCost | None = None,
    ) -> None:
        self._storage = storage
        self._describer = describer
        self._prepare = prepare
        self._config = config
        self._keys = MetadataKeys(config.metadata_prefix, config.rules.default.languages)
        self._rules = config.rules
        # Shared by every request on this loop: this bounds the images in flight per
        # instance (and so its memory), however many events arrive at once.
        self._in_flight = asyncio.Semaphore(config.images_in_flight)
        # Decoding is CPU work that releases the GIL. More threads than CPUs only make
        # decodes fight each other and the event loop (at 6 threads on 2 CPUs the loop
        # lagged 92-234 ms at p99, against 26-28 ms with 2; see bench/RESULTS.md).
        self._prepare_pool = ThreadPoolExecutor(
            config.prepare_threads or usable_cpus(), thread_name_prefix="captioner-prepare"
        )
        # Threads bound CPU, not memory: a 49 MP PNG costs 200 MB to decode, so a few at
        # once would exceed the instance. Without a cost function every decode is free.
        self._decode_cost = decode_cost
        self.decode_budget = Budget(config.decode_budget)
        self.held_bytes = Budget(config.held_bytes_budget)

    def close(self) -> None:
        """Let the prepare threads go (they would also end with the process)."""
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    async def _prepared(self, data: bytes) -> PreparedImage:
        """Prepare in a thread once the decode's estimated cost fits the decode budget.

        The budget comes back when the thread is done, not when this task is: a
        cancelled caption must not let another decode start next to one still running.
        """
        cost = self._decode_cost(data) if self._decode_cost is not None else 0
        taken = await self.decode_budget.acquire(cost)
        loop = asyncio.get_running_loop()

        def give_back(_: object) -> None:
            # RuntimeError: the loop is closed, and nobody is left to wait.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(self.decode_budget.release, taken)

        try:
            future = self._prepare_pool.submit(self._prepare, data)
        except BaseException:
            self.decode_budget.release(taken)
            raise
        future.add_done_callback(give_back)
        return await asyncio.wrap_future(future)

    async def caption_object(
        self, ref: ObjectRef | ObjectInfo, *, overwrite: bool = False, if_stale: bool = False
    ) -> CaptionResult:
        """Caption one object; never raises for a per-object problem (see the Outcome).

        Given an ObjectInfo (from a listing), that is used instead of a fresh read;
        the write's preconditions still catch anything that changed since.
        ``overwrite`` captions again even when this generation already has one;
        ``if_stale`` only when it was made by another model, prompt or rule.
        """
        started = time.monotonic()
        stages = Stages()
        token = _CURRENT_STAGES.set(stages)
        try:
            async with self._in_flight:
                result = await self._caption_object(ref, overwrite, if_stale)
        finally:
            _CURRENT_STAGES.reset(token)
        return replace(result, seconds=time.monotonic() - started, stages=dict(stages.seconds))

    async def caption_many(
        self,
        refs: Iterable[ObjectRef | ObjectInfo] | AsyncIterable[ObjectRef | ObjectInfo],
        *,
        overwrite: bool = False,
        if_stale: bool = False,
    ) -> AsyncIterator[CaptionResult]:
        """Results as they complete, with at most ``images_in_flight`` objects in flight.

        ``refs`` is consumed lazily, so a listing of millions never sits in memory.
        """

        async def one(ref: ObjectRef | ObjectInfo) -> CaptionResult:
            return await self.caption_object(ref, overwrite=overwrite, if_stale=if_stale)

        async for result in bounded_as_completed(refs, one, self._config.images_in_flight):
            yield result

    async def describe_source(
        self, source: str, load: Callable[[], Awaitable[bytes]]
    ) -> CaptionResult:
        """Describe an image that is not ours to write on (a local file, a URL)."""
        started = time.monotonic()
        async with self._in_flight:
            result = await self._describe_source(source, load)
        return replace(result, seconds=time.monotonic() - started)

    async def _describe_source(
        self, source: str, load: Callable[[], Awaitable[bytes]]
    ) -> CaptionResult:
        try:
            # The size is not known before the load: hold room for the largest allowed.
            async with self.held_bytes.take(self._config.max_bytes):
                data = await load()
                prepared = await self._prepared(data)
                del data
            description = await self._describer.describe(prepared, self._rules.default)
        except PermanentError as exc:
            result = CaptionResult(source, Outcome.FAILED, reason=exc.reason, message=str(exc))
        except TransientError as exc:
            result = CaptionResult(source, Outcome.RETRY, reason=exc.reason, message=str(exc))
        else:
            caption = clean_caption(description.text) if description.text else ""
            if caption:
                result = CaptionResult(
                    source,
                    Outcome.CAPTIONED,
                    caption=caption,
                    usage=description.usage,
                    alt=description.alt,
                    tags=description.tags,
                    translations=description.translations,
                )
            else:
                result = CaptionResult(
                    source,
                    Outcome.BLOCKED,
                    reason=description.blocked_reason or "EMPTY",
                    usage=description.usage,
                )
        return result

    def needs_caption(
        self, info: ObjectInfo, *, overwrite: bool = False, if_stale: bool = False
    ) -> str | None:
        """Why a listed object would be skipped, or None if it needs a caption."""
        if owner_conflict(info.metadata, self._keys) is not None:
            return "metadata-conflict"
        if not looks_like_image(info):
            return "not-an-image"
        spec = self._rules.spec_for(info.name)
        if spec is None:
            return "excluded-by-rule"
        if not overwrite and self._done(info, spec, if_stale):
            return "already-captioned"
        return None

    def _done(self, info: ObjectInfo, spec: CaptionSpec, if_stale: bool) -> bool:
        """Has this generation our final word, and (with ``if_stale``) a current one?"""
        if not is_done(info.metadata, info.generation, self._keys):
            return False
        if not if_stale or info.metadata.get(self._keys.status, "").startswith("error:"):
            return True
        return info.metadata.get(self._keys.model) == self._describer.model and (
            info.metadata.get(self._keys.prompt) == spec.fingerprint
        )

    async def _caption_object(
        self, item: ObjectRef | ObjectInfo, overwrite: bool, if_stale: bool = False
    ) -> CaptionResult:
        if isinstance(item, ObjectInfo):
            ref = ObjectRef(
                item.bucket,
                item.name,
                item.generation,
                item.metageneration,
                item.content_type,
                item.size,
            )
            info = item
        else:
            ref = item
            read = await self._read(ref)
            if isinstance(read, CaptionResult):
                return read
            info = read

        if ref.generation is not None and info.generation != ref.generation:
            # A newer upload replaced this one; its own event will caption it.
            return _result(
                ref,
                Outcome.SKIPPED,
                reason="superseded",
                message=f"generation {ref.generation} was replaced by {info.generation}",
                generation=info.generation,
            )
        if (key := owner_conflict(info.metadata, self._keys)) is not None:
            return _result(
                ref,
                Outcome.FAILED,
                reason="metadata-conflict",
                message=f"the owner already uses the key {key!r}; set CAPTION_METADATA_PREFIX",
                generation=info.generation,
            )
        spec = self._rules.spec_for(info.name)
        if not overwrite and self._done(info, spec or self._rules.default, if_stale):
            return _result(
                ref,
                Outcome.SKIPPED,
                caption=info.metadata.get(self._keys.caption),
                reason="already-captioned",
                generation=info.generation,
            )
        if not looks_like_image(info):
            return _result(
                ref,
                Outcome.SKIPPED,
                reason="not-an-image",
                message=f"content type {info.content_type!r}",
                generation=info.generation,
            )
        if spec is None:
            rule = self._rules.rule_for(info.name)
            return _result(
                ref,
                Outcome.SKIPPED,
                reason="excluded-by-rule",
                message=f"rule {rule.name if rule else '?'!r} excludes it",
                generation=info.generation,
            )

        try:
            description = await self._describe(info, spec)
        except PermanentError as exc:
            return await self._record(ref, info, spec, status=f"error:{exc.reason}", error=exc)
        except ObjectGoneError:
            return _result(
                ref, Outcome.SKIPPED, reason="gone", message="deleted or replaced while captioning"
            )
        except TransientError as exc:
            return _result(
                ref, Outcome.RETRY, reason=exc.reason, message=str(exc), generation=info.generation
            )

        if description.text is None:
            return await self._record(ref, info, spec, status="blocked", description=description)
        return await self._record(ref, info, spec, status="ok", description=description)

    def _texts(self, description: Description, caption: str) -> dict[str, str]:
        keys = self._keys
        texts = {keys.caption: caption}
        if description.alt:
            texts[keys.alt] = description.alt
        if description.tags:
            texts[keys.tags] = ",".join(description.tags)
        for code, translation in description.translations.items():
            if code in keys.languages[1:]:
                texts[keys.language(code)] = translation
        return texts

    def _captioned_since(self, before: ObjectInfo, now: ObjectInfo) -> bool:
        """Did someone else (a duplicate event) record a result after ``before`` was read?"""
        if not is_done(now.metadata, now.generation, self._keys):
            return False
        created = self._keys.created
        return not is_done(before.metadata, before.generation, self._keys) or (
            now.metadata.get(created) != before.metadata.get(created)
        )

    async def _describe(self, info: ObjectInfo, spec: CaptionSpec) -> Description:
        if info.size == 0:
            raise PermanentError("empty", "the object has no bytes")
        if info.size > self._config.max_bytes:
            raise PermanentError(
                "too-large",
                f"{info.size} bytes is over CAPTION_MAX_BYTES={self._config.max_bytes}",
            )
        stages = _stages()
        async with self.held_bytes.take(info.size):
            with stages.measure("fetch"):
                data = await self._storage.download(
                    info.bucket,
                    info.name,
                    generation=info.generation,
                    max_bytes=self._config.max_bytes,
                )
            # Pillow releases the GIL while decoding; a thread keeps the loop serving others.
            with stages.measure("prepare"):
                prepared = await self._prepared(data)
            del data
        with stages.measure("describe"):
            return await self._describer.describe(prepared, spec)

    async def _read(self, ref: ObjectRef) -> ObjectInfo | CaptionResult:
        """The object as it is now, or the result that its read ended in."""
        try:
            return await self._storage.get_object(ref.bucket, ref.name)
        except (ObjectGoneError, TransientError, PermanentError) as exc:
            return _storage_failure(ref, exc)

    async def _record(
        self,
        ref: ObjectRef,
        info: ObjectInfo,
        spec: CaptionSpec,
        *,
        status: str,
        description: Description | None = None,
        error: PermanentError | None = None,
    ) -> CaptionResult:
        """Write the outcome under generation/metageneration preconditions."""
        caption = clean_caption(description.text) if description and description.text else None
        if status == "ok" and not caption:
            status, caption = "blocked", None
        texts = self._texts(description, caption) if caption and description else None
        provenance = {self._keys.rule: spec.rule, self._keys.prompt: spec.fingerprint}
        # The configured model, not the version that answered, so that --if-stale
        # compares like with like.
        model = self._describer.model
        usage = description.usage if description else None
        outcome = {"ok": Outcome.CAPTIONED, "blocked": Outcome.BLOCKED}.get(status, Outcome.FAILED)
        reason = error.reason if error else (description.blocked_reason if description else None)
        message = str(error) if error else None

        current = info
        for _ in range(_WRITE_ROUNDS):
            try:
                updates = caption_updates(
                    existing=current.metadata,
                    keys=self._keys,
                    generation=current.generation,
                    status=status,
                    model=model,
                    texts=texts,
                    provenance=provenance,
                )
            except NoRoomError as exc:
                return _result(
                    ref,
                    Outcome.FAILED,
                    caption=caption,
                    reason="metadata-full",
                    message=str(exc),
                    generation=current.generation,
                )
            try:
                with _stages().measure("write"):
                    written = await self._storage.patch_metadata(
                        ref.bucket,
                        ref.name,
                        updates,
                        if_generation_match=current.generation,
                        if_metageneration_match=current.metageneration,
                    )
            except PreconditionFailedError:
                latest = await self._read(ref)
                if isinstance(latest, CaptionResult):
                    return latest
                if latest.generation != info.generation:
                    return _result(
                        ref,
                        Outcome.SKIPPED,
                        reason="superseded",
                        message="overwritten while it was being captioned",
                        generation=latest.generation,
                    )
                if self._captioned_since(info, latest):
                    return _result(
                        ref,
                        Outcome.SKIPPED,
                        caption=latest.metadata.get(self._keys.caption),
                        reason="already-captioned",
                        generation=latest.generation,
                    )
                current = latest  # the owner changed metadata: fit around it and try again
                continue
            except (ObjectGoneError, TransientError, PermanentError) as exc:
                return _storage_failure(ref, exc)
            return _result(
                ref,
                outcome,
                caption=written.metadata.get(self._keys.caption) if caption else None,
                reason=reason,
                message=message,
                generation=current.generation,
                recorded=True,
                usage=usage or Usage(),
                alt=description.alt if description and caption else None,
                tags=description.tags if description and caption else (),
                translations=description.translations if description and caption else {},
            )
        return _result(
            ref,
            Outcome.RETRY,
            reason="contended",
            message="metadata kept changing while we tried to write",
        )


def _storage_failure(
    ref: ObjectRef, exc: ObjectGoneError | TransientError | PermanentError
) -> CaptionResult:
    """What a failed read or write of the object means for its result."""
    if isinstance(exc, ObjectGoneError):
        return _result(ref, Outcome.SKIPPED, reason="gone", message="object not found")
    if isinstance(exc, TransientError):
        return _result(ref, Outcome.RETRY, reason=exc.reason, message=str(exc))
    return _result(ref, Outcome.FAILED, reason=exc.reason, message=str(exc))


async def bounded_as_completed(
    items: Iterable[T] | AsyncIterable[T],
    work: Callable[[T], Awaitable[R]],
    limit: int,
) -> AsyncIterator[R]:
    """Like ``asyncio.as_completed`` over ``map(work, items)``, but with at most
    ``limit`` tasks alive, so memory is O(limit) rather than O(len(items)).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    iterator = _aiter(items)
    pending: set[asyncio.Task[R]] = set()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    exhausted = True
                    break
                pending.add(asyncio.ensure_future(work(item)))
            if not pending:
                return
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class Stages:
    """Seconds spent in each stage of one object (fetch, prepare, describe, write)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + elapsed, 4)


_CURRENT_STAGES: ContextVar[Stages | None] = ContextVar("captioner_stages", default=None)


def _stages() -> Stages:
    """The stopwatch of the object being captioned in this task (a spare one outside)."""
    return _CURRENT_STAGES.get() or Stages()


def _result(ref: ObjectRef, outcome: Outcome, **fields: Any) -> CaptionResult:
    return CaptionResult(ref.uri, outcome, ref=ref, **fields)

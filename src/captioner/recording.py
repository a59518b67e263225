"""Recording an outcome on the object: first decide what to write, then write it safely.

``verdict`` is pure: from the description (or the permanent error) to the status,
the texts and the result to report. ``Recorder.write`` puts it on the object as a
merge of our own keys under ``ifGenerationMatch`` (the generation described) and
``ifMetagenerationMatch`` (the metadata read). On 412 it re-reads: a newer upload
means the caption is dropped (``superseded``), a duplicate event that got there
first means nothing more to do (``already-captioned``), a person's review that got
there first is never written over (``human``), and an owner's edit means fitting
around their keys and trying again. A person's own save (``refit=False``) is never
fitted around anything: any change since it was read ends it (``changed``), so that
they see the new state and decide again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from captioner import stages
from captioner.captions import CaptionSpec
from captioner.domain import CaptionResult, Description, ObjectInfo, ObjectRef, Outcome, Usage
from captioner.errors import (
    ObjectGoneError,
    PermanentError,
    PreconditionFailedError,
    TransientError,
)
from captioner.metadata import (
    MetadataKeys,
    NoRoomError,
    Review,
    caption_updates,
    clean_caption,
    is_done,
    is_human,
)

# How often a write is retried after the owner changed metadata under us.
_WRITE_ROUNDS = 4


class MetadataStore(Protocol):
    async def get_object(self, bucket: str, name: str) -> ObjectInfo: ...

    async def patch_metadata(
        self,
        bucket: str,
        name: str,
        metadata: Mapping[str, str],
        *,
        if_generation_match: int,
        if_metageneration_match: int | None,
    ) -> ObjectInfo: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to write on the object, and what to report once it is written."""

    status: str  # ok | blocked | error:<reason>
    outcome: Outcome
    caption: str | None = None
    texts: Mapping[str, str] | None = None
    provenance: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None
    description: Description | None = None
    # A person's word (an edit, an approval): recorded with who and when, and protected.
    review: Review | None = None
    # The model to record; None: the recorder's (the configured one). A person's edit
    # keeps the model whose caption they edited ("": none).
    model: str | None = None


def verdict(
    keys: MetadataKeys,
    spec: CaptionSpec,
    *,
    description: Description | None = None,
    error: PermanentError | None = None,
) -> Verdict:
    """The outcome of one description (or permanent error), before anything is written."""
    provenance = {keys.rule: spec.rule, keys.prompt: spec.fingerprint}
    if error is not None:
        return Verdict(
            f"error:{error.reason}",
            Outcome.FAILED,
            provenance=provenance,
            reason=error.reason,
            message=str(error),
        )
    assert description is not None
    caption = clean_caption(description.text) if description.text else None
    if not caption:  # refused, or nothing left once cleaned: never an empty caption
        return Verdict(
            "blocked",
            Outcome.BLOCKED,
            provenance=provenance,
            reason=description.blocked_reason,
            description=description,
        )
    return Verdict(
        "ok",
        Outcome.CAPTIONED,
        caption=caption,
        texts=_texts(keys, description, caption),
        provenance=provenance,
        reason=description.blocked_reason,
        description=description,
    )


def _texts(keys: MetadataKeys, description: Description, caption: str) -> dict[str, str]:
    texts = {keys.caption: caption}
    if description.alt:
        texts[keys.alt] = description.alt
    if description.tags:
        texts[keys.tags] = ",".join(description.tags)
    for code, translation in description.translations.items():
        if code in keys.languages[1:]:
            texts[keys.language(code)] = translation
    return texts


class Recorder:
    """Writes verdicts on objects; ``model`` is the configured one, not the version
    that answered, so that ``if_stale`` compares like with like."""

    def __init__(self, storage: MetadataStore, keys: MetadataKeys, model: str) -> None:
        self._storage = storage
        self._keys = keys
        self._model = model

    async def read(self, ref: ObjectRef) -> ObjectInfo | CaptionResult:
        """The object as it is now, or the result that its read ended in."""
        try:
            return await self._storage.get_object(ref.bucket, ref.name)
        except (ObjectGoneError, TransientError, PermanentError) as exc:
            return storage_failure(ref, exc)

    async def write(
        self, ref: ObjectRef, info: ObjectInfo, verdict: Verdict, *, refit: bool = True
    ) -> CaptionResult:
        """Write under generation/metageneration preconditions; re-read on 412.

        ``refit=False`` (a person's save): a 412 ends it as ``changed``, nothing written.
        """
        current = info
        for _ in range(_WRITE_ROUNDS):
            try:
                updates = self._updates(current, verdict)
            except NoRoomError as exc:
                return result_for(
                    ref,
                    Outcome.FAILED,
                    caption=verdict.caption,
                    reason="metadata-full",
                    message=str(exc),
                    generation=current.generation,
                )
            try:
                with stages.current().measure("write"):
                    written = await self._storage.patch_metadata(
                        ref.bucket,
                        ref.name,
                        updates,
                        if_generation_match=current.generation,
                        if_metageneration_match=current.metageneration,
                    )
            except PreconditionFailedError:
                if not refit:
                    return result_for(
                        ref,
                        Outcome.SKIPPED,
                        reason="changed",
                        message="the object changed since it was read: nothing written",
                        generation=current.generation,
                    )
                latest = await self.read(ref)
                if isinstance(latest, CaptionResult):
                    return latest
                settled = self._settled(ref, info, latest)
                if settled is not None:
                    return settled
                current = latest  # the owner changed metadata: fit around it and try again
                continue
            except (ObjectGoneError, TransientError, PermanentError) as exc:
                return storage_failure(ref, exc)
            return self._written(ref, current.generation, written, verdict)
        return result_for(
            ref,
            Outcome.RETRY,
            reason="contended",
            message="metadata kept changing while we tried to write",
        )

    def _updates(self, current: ObjectInfo, verdict: Verdict) -> dict[str, str]:
        return caption_updates(
            existing=current.metadata,
            keys=self._keys,
            generation=current.generation,
            status=verdict.status,
            model=self._model if verdict.model is None else verdict.model,
            texts=verdict.texts,
            provenance=verdict.provenance,
            review=verdict.review,
        )

    def _settled(
        self, ref: ObjectRef, before: ObjectInfo, latest: ObjectInfo
    ) -> CaptionResult | None:
        """After a 412: a result if there is nothing more to write, else None."""
        if latest.generation != before.generation:
            return result_for(
                ref,
                Outcome.SKIPPED,
                reason="superseded",
                message="overwritten while it was being captioned",
                generation=latest.generation,
            )
        if is_human(latest.metadata, latest.generation, self._keys) and (
            latest.metadata.get(self._keys.reviewed) != before.metadata.get(self._keys.reviewed)
        ):
            # A person saved or approved a caption while this one was being made.
            return result_for(
                ref,
                Outcome.SKIPPED,
                caption=latest.metadata.get(self._keys.caption),
                reason="human",
                message="a person reviewed it meanwhile",
                generation=latest.generation,
            )
        if self._captioned_since(before, latest):
            return result_for(
                ref,
                Outcome.SKIPPED,
                caption=latest.metadata.get(self._keys.caption),
                reason="already-captioned",
                generation=latest.generation,
            )
        return None

    def _captioned_since(self, before: ObjectInfo, now: ObjectInfo) -> bool:
        """Did someone else (a duplicate event) record a result after ``before`` was read?"""
        if not is_done(now.metadata, now.generation, self._keys):
            return False
        created = self._keys.created
        return not is_done(before.metadata, before.generation, self._keys) or (
            now.metadata.get(created) != before.metadata.get(created)
        )

    def _written(
        self, ref: ObjectRef, generation: int, written: ObjectInfo, verdict: Verdict
    ) -> CaptionResult:
        description = verdict.description
        captioned = verdict.caption is not None and description is not None
        return result_for(
            ref,
            verdict.outcome,
            caption=written.metadata.get(self._keys.caption) if verdict.caption else None,
            reason=verdict.reason,
            message=verdict.message,
            generation=generation,
            recorded=True,
            usage=description.usage if description else Usage(),
            alt=description.alt if captioned and description else None,
            tags=description.tags if captioned and description else (),
            translations=description.translations if captioned and description else {},
        )


def storage_failure(
    ref: ObjectRef, exc: ObjectGoneError | TransientError | PermanentError
) -> CaptionResult:
    """What a failed read or write of the object means for its result."""
    if isinstance(exc, ObjectGoneError):
        return result_for(ref, Outcome.SKIPPED, reason="gone", message="object not found")
    if isinstance(exc, TransientError):
        return result_for(ref, Outcome.RETRY, reason=exc.reason, message=str(exc))
    return result_for(ref, Outcome.FAILED, reason=exc.reason, message=str(exc))


def result_for(ref: ObjectRef, outcome: Outcome, **fields: Any) -> CaptionResult:
    return CaptionResult(ref.uri, outcome, ref=ref, **fields)

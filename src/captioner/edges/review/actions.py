"""What a person does on the review page: save, approve, caption again and keep.

Every save is ``reviewing.human_verdict`` (or ``kept_verdict``) written by
``Recorder.write(..., refit=False)``: the pipeline's write code, its merge and owner-key
rules and budget, under ``ifGenerationMatch`` and ``ifMetagenerationMatch`` of the state
the person saw. Anything changed since (another tab, a colleague, an upload) answers 409
with the object as it is now, and nothing is written.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from captioner.captions import CaptionSpec
from captioner.domain import Description, ObjectInfo, ObjectRef, Outcome
from captioner.edges.review.listing import Listing
from captioner.errors import BadRequestError, ObjectGoneError
from captioner.metadata import MetadataKeys
from captioner.recording import Recorder, Verdict
from captioner.reviewing import Change, check_editable, human_verdict, kept_verdict, split_tags
from captioner.runtime import Runtime
from captioner.settings import MAX_PROMPT_CHARS, Settings

Answer = tuple[int, dict[str, Any]]  # HTTP status, JSON body
# New captions kept for "keep" (each a few KB), and models with clients ready.
_ANSWERS_KEPT = 200
_RUNTIMES_KEPT = 4


@dataclass(frozen=True, slots=True)
class _NewCaption:
    name: str
    generation: int
    spec: CaptionSpec
    description: Description
    model: str


class Actions:
    """The writes (and the one Gemini call) of one review session."""

    def __init__(
        self, storage: Any, settings: Settings, keys: MetadataKeys, listing: Listing, by: str
    ) -> None:
        self._storage = storage
        self._settings = settings
        self._keys = keys
        self._listing = listing
        self._by = by
        self._rules = settings.rule_book()
        self._answers: OrderedDict[str, _NewCaption] = OrderedDict()
        self._runtimes: OrderedDict[str, Runtime] = OrderedDict()

    async def aclose(self) -> None:
        for runtime in self._runtimes.values():
            await runtime.aclose()
        self._runtimes.clear()

    async def item(self, name: str) -> Answer:
        return 200, {"item": self._listing.item(await self._read(self.name_of(name)))}

    async def save(self, body: dict[str, Any]) -> Answer:
        """An edit of the texts, or ``"approve": true``."""
        name, seen = self.name_of(body.get("name")), _seen(body)
        tags = _text(body, "tags")
        change = Change(
            caption=_text(body, "caption"),
            alt=_text(body, "alt"),
            tags=None if tags is None else split_tags(tags),
            approve=body.get("approve") is True,
        )
        info = await self._read(name)
        if (info.generation, info.metageneration) != seen:
            return self._changed(info)
        return await self._write(info, human_verdict(info, self._keys, change, self._by))

    async def recaption(self, body: dict[str, Any]) -> Answer:
        """Describe the image again with another model or prompt; nothing is written
        until the person keeps the new caption. With no prompt typed, the image gets the
        prompt the pipeline would give it (its rule of CAPTION_RULES, else the default).
        An answer Gemini blocked is said as such: there is nothing to keep."""
        name, (generation, _) = self.name_of(body.get("name")), _seen(body)
        model = (_text(body, "model") or "").strip() or self._settings.model
        typed = (_text(body, "prompt") or "").strip()
        spec = self._spec(name, typed)
        runtime = await self._runtime(model)

        async def load() -> bytes:
            data: bytes = await self._storage.download(
                self._listing.bucket, name, generation=generation,
                max_bytes=self._settings.max_bytes,
            )  # fmt: skip
            return data

        uri = f"gs://{self._listing.bucket}/{name}"
        result = await runtime.captioner().describe_source(uri, load, spec=spec)
        asked = {"model": model, "rule": spec.rule, "typed": bool(typed)}
        if result.outcome is Outcome.BLOCKED:
            return 200, {**asked, "blocked": result.reason or "blocked"}
        if result.outcome is not Outcome.CAPTIONED or result.caption is None:
            why = result.message or result.reason or result.outcome.value
            return 502, {"error": f"no new caption ({result.outcome.value}): {why}"}
        description = Description(
            result.caption, model, alt=result.alt, tags=result.tags,
            translations=result.translations,
        )  # fmt: skip
        answer = secrets.token_urlsafe(12)
        self._answers[answer] = _NewCaption(name, generation, spec, description, model)
        while len(self._answers) > _ANSWERS_KEPT:
            self._answers.popitem(last=False)
        new = {"caption": result.caption, "alt": result.alt, "tags": list(result.tags)}
        return 200, {**asked, "answer": answer, "new": new}

    def _spec(self, name: str, typed: str) -> CaptionSpec:
        """What a caption again asks: the person's prompt (in the default mode and
        languages, recorded as rule "default"), else what the pipeline asks for this
        object (``RuleBook.spec_for``)."""
        if len(typed) > MAX_PROMPT_CHARS:
            raise BadRequestError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        if typed:
            return replace(self._rules.default, prompt=typed)
        spec = self._rules.spec_for(name)
        if spec is None:
            excluding = self._rules.rule_for(name)
            rule = f"rule {excluding.name!r}" if excluding else "a rule"
            raise BadRequestError(
                f"{rule} of CAPTION_RULES excludes this image from captioning: type a "
                "prompt to caption it anyway"
            )
        return spec

    async def keep(self, body: dict[str, Any]) -> Answer:
        """Write a new caption from ``recaption`` that the person chose over the old one."""
        name, seen = self.name_of(body.get("name")), _seen(body)
        new = self._answers.get(str(body.get("answer")))
        if new is None or new.name != name:
            raise BadRequestError("that new caption is no longer kept here: caption again")
        info = await self._read(name)
        if (info.generation, info.metageneration) != seen or info.generation != new.generation:
            return self._changed(info)
        check_editable(info, self._keys)
        said = kept_verdict(self._keys, new.spec, new.description, new.model, self._by)
        return await self._write(info, said)

    def name_of(self, value: Any) -> str:
        """An object name of this review's prefix; the page can ask about no other."""
        if not isinstance(value, str) or not value.startswith(self._listing.prefix) or not value:
            raise BadRequestError("not an object under the prefix being reviewed")
        return value

    async def _write(self, info: ObjectInfo, said: Verdict) -> Answer:
        recorder = Recorder(self._storage, self._keys, self._settings.model)
        here = ObjectRef(info.bucket, info.name, info.generation)
        result = await recorder.write(here, info, said, refit=False)
        self._listing.forget()
        latest = await self._read(info.name)
        if result.recorded:
            return 200, {"item": self._listing.item(latest)}
        if result.reason == "changed":
            return self._changed(latest)
        status = 400 if result.outcome is Outcome.FAILED else 503
        return status, {
            "error": result.message or result.reason,
            "item": self._listing.item(latest),
        }

    def _changed(self, now: ObjectInfo) -> Answer:
        return 409, {
            "conflict": "changed since you opened it: this is what it holds now. "
            "Nothing was written; save again to replace it.",
            "item": self._listing.item(now),
        }

    async def _read(self, name: str) -> ObjectInfo:
        try:
            info: ObjectInfo = await self._storage.get_object(self._listing.bucket, name)
        except ObjectGoneError:
            raise BadRequestError("the object is gone (deleted meanwhile)", status=404) from None
        return info

    async def _runtime(self, model: str) -> Runtime:
        """Clients for ``model`` (the prompt is given per image, so one per model)."""
        if model in self._runtimes:
            self._runtimes.move_to_end(model)
            return self._runtimes[model]
        try:
            settings = Settings.model_validate({**self._settings.model_dump(), "model": model})
        except ValidationError as exc:
            raise BadRequestError(f"model: {exc.errors()[0]['msg']}") from None
        runtime = self._runtimes[model] = Runtime(settings)
        while len(self._runtimes) > _RUNTIMES_KEPT:
            _, old = self._runtimes.popitem(last=False)
            await old.aclose()
        return runtime


def _seen(body: dict[str, Any]) -> tuple[int, int]:
    """The generation and metageneration the person saw (as the page sent them)."""
    try:
        return int(body["generation"]), int(body["metageneration"])
    except (KeyError, TypeError, ValueError):
        raise BadRequestError("generation and metageneration are needed") from None


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 8192:
        raise BadRequestError(f"{key!r} must be text of at most 8192 characters")
    return value

"""A person's word on a caption: an edit, an approval, or a new caption they chose to keep.

Pure, like ``recording.verdict``: from what the object carries now and what the person
changed to the Verdict that ``Recorder.write`` puts on the object, through the same code,
the same merge and owner-key rules and the same 8 KiB budget as every automatic write.
The verdict carries a ``metadata.Review`` (``human`` or ``approved``, who), which is what
keeps automatic runs off it (``decisions.decide``). ``Recorder.write(..., refit=False)``
writes it: a person's save is never fitted around a change made since they read the
object, it ends as ``changed`` and they decide again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from captioner.captions import CaptionSpec
from captioner.decisions import looks_like_image
from captioner.domain import Description, ObjectInfo, Outcome
from captioner.errors import BadRequestError
from captioner.metadata import (
    APPROVED,
    HUMAN,
    MetadataKeys,
    Review,
    clean_caption,
    is_done,
    owner_conflict,
)
from captioner.recording import Verdict, verdict

# Who a person says they are is shown next to their caption: one short line.
MAX_REVIEWER = 200


@dataclass(frozen=True, slots=True)
class Change:
    """What a person asked for: new texts (None: keep that one as it is; "" for alt or
    no tags: remove it), or the approval of the caption as it stands."""

    caption: str | None = None
    alt: str | None = None
    tags: tuple[str, ...] | None = None
    approve: bool = False

    @property
    def empty(self) -> bool:
        return self.caption is None and self.alt is None and self.tags is None


def reviewer(name: str) -> str:
    """A reviewer's name as it is recorded: one printable line, not empty."""
    cleaned = clean_caption(name)[:MAX_REVIEWER]
    if not cleaned:
        raise BadRequestError("say who reviews: --by NAME (an e-mail address or a name)")
    return cleaned


def split_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags, as the metadata holds them: each one line, none empty."""
    return tuple(tag for part in text.split(",") if (tag := clean_caption(part)))


def check_editable(info: ObjectInfo, keys: MetadataKeys) -> None:
    """BadRequestError unless captioner may write on this object at all."""
    if (key := owner_conflict(info.metadata, keys)) is not None:
        raise BadRequestError(
            f"the owner already uses the key {key!r} on this object; captioner never "
            "changes it (set CAPTION_METADATA_PREFIX to write under other keys)"
        )
    if not looks_like_image(info):
        raise BadRequestError(f"not an image (content type {info.content_type!r})")


def human_verdict(info: ObjectInfo, keys: MetadataKeys, change: Change, by: str) -> Verdict:
    """The verdict of a person's edit or approval of ``info`` as it is now."""
    check_editable(info, keys)
    meta = info.metadata
    current = is_done(meta, info.generation, keys)
    if change.approve:
        if not change.empty:
            raise BadRequestError("approve the caption as it is, or change it: not both")
        if not current or meta.get(keys.status) != "ok" or not meta.get(keys.caption):
            raise BadRequestError("there is no caption of this upload to approve")
        if meta.get(keys.source) == HUMAN:
            who = meta.get(keys.reviewed_by) or "a person"
            raise BadRequestError(
                f"a person wrote this caption ({who}): there is nothing to approve"
            )
        return _person(keys, _kept_texts(meta, keys, keep_languages=True), meta, APPROVED, by)
    if change.empty:
        raise BadRequestError("give a new caption, alt text or tags (or approve)")
    # Texts describing an older upload describe another image: only this upload's are kept.
    texts = _kept_texts(meta, keys, keep_languages=change.caption is None) if current else {}
    if change.caption is not None:
        caption = clean_caption(change.caption)
        if not caption:
            raise BadRequestError("the caption is empty")
        texts[keys.caption] = caption
    for key, value in ((keys.alt, change.alt), (keys.tags, _joined(change.tags))):
        if value is None:
            continue
        if cleaned := clean_caption(value):
            texts[key] = cleaned
        else:
            texts.pop(key, None)
    if not texts.get(keys.caption):
        raise BadRequestError("this upload has no caption yet: give one (--caption)")
    return _person(keys, texts, meta, HUMAN, by)


def kept_verdict(
    keys: MetadataKeys, spec: CaptionSpec, description: Description, model: str, by: str
) -> Verdict:
    """A caption made again with another model or prompt that a person chose to keep:
    written as the pipeline writes that model's answer, and marked approved."""
    said = verdict(keys, spec, description=description)
    if said.outcome is not Outcome.CAPTIONED:
        raise BadRequestError("that answer has no caption to keep")
    return replace(said, review=Review(APPROVED, by), model=model)


def _person(
    keys: MetadataKeys, texts: dict[str, str], meta: Mapping[str, str], source: str, by: str
) -> Verdict:
    return Verdict(
        "ok",
        Outcome.CAPTIONED,
        caption=texts[keys.caption],
        texts=texts,
        review=Review(source, by),
        # A person's words keep the provenance of the caption they started from.
        model=meta.get(keys.model, ""),
    )


def _kept_texts(
    meta: Mapping[str, str], keys: MetadataKeys, *, keep_languages: bool
) -> dict[str, str]:
    """The texts on the object now; other languages only while the caption stays (they
    translate its words)."""
    names = keys.text_keys() if keep_languages else (keys.caption, keys.alt, keys.tags)
    return {key: meta[key] for key in names if meta.get(key)}


def _joined(tags: tuple[str, ...] | None) -> str | None:
    return None if tags is None else ",".join(tags)

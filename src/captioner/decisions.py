"""Does this object need a caption? One pure answer, used wherever it is asked.

A backfill asks it of each listed object (to choose candidates and count the
rest), an upload event or a named object asks it after reading the object. Both
used to run the same checks in different orders, and ``if_stale`` was lost
between them; now there is one function and one order:

1. the owner uses one of our keys (we never touch it),
2. it is not an image,
3. a rule excludes its path,
4. a person wrote or approved the caption of this generation (unless
   ``include_human``): ``overwrite``, ``if_stale`` and a changed rule never replace it,
5. it already carries our final word for this generation (unless ``overwrite``;
   with ``if_stale``, only when that word came from the same model and prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from captioner.captions import CaptionSpec
from captioner.domain import ObjectInfo
from captioner.metadata import MetadataKeys, is_done, is_human, owner_conflict
from captioner.rules import RuleBook

# Content types that are sniffed rather than trusted, when the name looks like an image.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# Names that say "image" (the formats images.prepare accepts).
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".heif", ".avif", ".tif", ".tiff", ".bmp",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Skip:
    """Why an object gets no caption now: a reason slug and a sentence for people."""

    reason: str
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Wanted:
    """The object needs a caption, made with this spec."""

    spec: CaptionSpec


def looks_like_image(info: ObjectInfo) -> bool:
    """Images by content type; generic types only when the name says image."""
    content_type = info.content_type.split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return True
    return content_type in _GENERIC_TYPES and info.name.lower().endswith(IMAGE_SUFFIXES)


def decide(
    info: ObjectInfo,
    *,
    keys: MetadataKeys,
    rules: RuleBook,
    model: str,
    overwrite: bool = False,
    if_stale: bool = False,
    include_human: bool = False,
) -> Skip | Wanted:
    """Skip (with why) or Wanted (with the spec to caption it with)."""
    if (key := owner_conflict(info.metadata, keys)) is not None:
        return Skip(
            "metadata-conflict",
            f"the owner already uses the key {key!r}; set CAPTION_METADATA_PREFIX",
        )
    if not looks_like_image(info):
        return Skip("not-an-image", f"content type {info.content_type!r}")
    spec = rules.spec_for(info.name)
    if spec is None:
        rule = rules.rule_for(info.name)
        return Skip("excluded-by-rule", f"rule {rule.name if rule else '?'!r} excludes it")
    if not include_human and is_human(info.metadata, info.generation, keys):
        return human_skip(info, keys)
    if not overwrite and has_final_word(info, keys, spec=spec, model=model, if_stale=if_stale):
        return final_word_skip(info, keys)
    return Wanted(spec)


def human_skip(info: ObjectInfo, keys: MetadataKeys) -> Skip:
    """A caption a person wrote or approved for this upload: left as it is."""
    who = info.metadata.get(keys.reviewed_by) or "a person"
    verb = "approved" if info.metadata.get(keys.source) == "approved" else "written"
    return Skip("human", f"{verb} by {who}; --include-human replaces it")


def final_word_skip(info: ObjectInfo, keys: MetadataKeys) -> Skip:
    """How an object whose generation has our final word is counted: captioned, or a
    verdict that is not a caption (a failure, a block), said as what it is."""
    status = info.metadata.get(keys.status, "")
    if status.startswith("error:"):
        return Skip("failed-before", f"{status} recorded for this upload; --overwrite tries again")
    if status == "blocked":
        return Skip("blocked-before", "Gemini declined it; --overwrite asks again")
    return Skip("already-captioned")


def has_final_word(
    info: ObjectInfo, keys: MetadataKeys, *, spec: CaptionSpec, model: str, if_stale: bool
) -> bool:
    """Has this generation our final word, and (with ``if_stale``) a current one?

    An ``error:`` status is final even with ``if_stale``: a new model does not make a
    corrupt file readable (``overwrite`` tries again).
    """
    if not is_done(info.metadata, info.generation, keys):
        return False
    if not if_stale or info.metadata.get(keys.status, "").startswith("error:"):
        return True
    return (
        info.metadata.get(keys.model) == model
        and info.metadata.get(keys.prompt) == spec.fingerprint
    )

"""The metadata contract: which keys we write, when an object counts as done, the 8 KiB budget.

Pure functions only, so every rule here is cheap to test.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# Cloud Storage caps custom metadata at 8 KiB in total (keys and values, UTF-8)
# and 4 KiB for any one value.
TOTAL_BUDGET = 8 * 1024
VALUE_BUDGET = 4 * 1024
_ELLIPSIS = "…"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class MetadataKeys:
    """The key names for one prefix (``caption`` by default) and language list."""

    prefix: str = "caption"
    languages: tuple[str, ...] = ("en",)

    @property
    def caption(self) -> str:
        return self.prefix

    @property
    def status(self) -> str:
        return f"{self.prefix}-status"

    @property
    def model(self) -> str:
        return f"{self.prefix}-model"

    @property
    def generation(self) -> str:
        return f"{self.prefix}-generation"

    @property
    def created(self) -> str:
        return f"{self.prefix}-created"

    @property
    def alt(self) -> str:
        return f"{self.prefix}-alt"

    @property
    def tags(self) -> str:
        return f"{self.prefix}-tags"

    @property
    def rule(self) -> str:
        return f"{self.prefix}-rule"

    @property
    def prompt(self) -> str:
        return f"{self.prefix}-prompt"

    @property
    def source(self) -> str:
        """``human`` (a person wrote the caption) or ``approved`` (a person approved the
        model's); absent when the model's word stands unreviewed."""
        return f"{self.prefix}-source"

    @property
    def reviewed_by(self) -> str:
        return f"{self.prefix}-reviewed-by"

    @property
    def reviewed(self) -> str:
        return f"{self.prefix}-reviewed"

    def review_keys(self) -> tuple[str, ...]:
        return (self.source, self.reviewed_by, self.reviewed)

    def language(self, code: str) -> str:
        """The key of the caption in ``code``: the first language is plain ``caption``."""
        return self.caption if code == self.languages[0] else f"{self.prefix}-{code}"

    def text_keys(self) -> tuple[str, ...]:
        return (self.caption, self.alt, self.tags, *(self.language(c) for c in self.languages[1:]))

    def all(self) -> tuple[str, ...]:
        return (
            self.caption, self.status, self.model, self.generation, self.created,
            self.alt, self.tags, self.rule, self.prompt,
            *(self.language(c) for c in self.languages[1:]),
            *self.review_keys(),
        )  # fmt: skip


def is_done(metadata: Mapping[str, str], generation: int, keys: MetadataKeys) -> bool:
    """True when this generation already carries our final word (ok, blocked or error)."""
    return metadata.get(keys.generation) == str(generation) and bool(metadata.get(keys.status))


# The values of ``<prefix>-source`` that mean a person has the last word on the caption.
HUMAN = "human"
APPROVED = "approved"
PERSON_SOURCES = frozenset({HUMAN, APPROVED})


@dataclass(frozen=True, slots=True)
class Review:
    """A person's word on a caption: they wrote it (``human``) or approved the model's
    (``approved``). ``by`` is who, as they gave it (``--by``) or as we found it."""

    source: str
    by: str


def is_human(metadata: Mapping[str, str], generation: int, keys: MetadataKeys) -> bool:
    """True when a person wrote or approved the caption of this very generation: no
    automatic run replaces it (a new upload is a new image, and is captioned as usual)."""
    return is_done(metadata, generation, keys) and metadata.get(keys.source) in PERSON_SOURCES


def owner_conflict(metadata: Mapping[str, str], keys: MetadataKeys) -> str | None:
    """The first of our keys that the owner set themselves, if any.

    We always write ``<prefix>-generation``; without it, a ``caption`` key is the
    owner's, and we must not change it.
    """
    if keys.generation in metadata:
        return None
    for key in keys.all():
        if key in metadata:
            return key
    return None


def clean_caption(text: str) -> str:
    """One line of printable text: models sometimes add newlines, quotes or control codes."""
    # Lone surrogates (a model's broken UTF-8, escaped in JSON) cannot be stored.
    text = text.encode("utf-8", "ignore").decode("utf-8")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def size_of(metadata: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Shorten ``text`` to at most ``max_bytes`` UTF-8 bytes, at a word if one is near.

    Never splits a character; ends with an ellipsis when something was cut.
    """
    if len(text.encode()) <= max_bytes:
        return text
    room = max_bytes - len(_ELLIPSIS.encode())
    if room <= 0:
        return ""
    cut = text.encode()[:room].decode("utf-8", errors="ignore")
    space = cut.rfind(" ")
    if space >= len(cut) * 0.8:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + _ELLIPSIS


class NoRoomError(Exception):
    """The owner's metadata leaves no room even for our status keys."""


def fit_fairly(texts: Mapping[str, str], room: int) -> dict[str, str]:
    """Shorten values so that keys and values fit ``room`` bytes, sharing the cuts fairly.

    Water-filling: short values keep all they have; the long ones share what is
    left equally. No value exceeds VALUE_BUDGET.
    """
    available = room - sum(len(k.encode()) for k in texts)
    sizes = {k: min(len(v.encode()), VALUE_BUDGET) for k, v in texts.items()}
    allowance: dict[str, int] = {}
    remaining = dict(sizes)
    while remaining:
        share = max(available, 0) // len(remaining)
        small = {k: n for k, n in remaining.items() if n <= share}
        if not small:
            allowance.update(dict.fromkeys(remaining, share))
            break
        for k, n in small.items():
            allowance[k] = n
            available -= n
            del remaining[k]
    return {k: truncate_utf8(v, allowance[k]) for k, v in texts.items()}


def caption_updates(
    *,
    existing: Mapping[str, str],
    keys: MetadataKeys,
    generation: int,
    status: str,
    model: str,
    texts: Mapping[str, str] | None,
    provenance: Mapping[str, str] | None = None,
    now: datetime | None = None,
    review: Review | None = None,
) -> dict[str, str]:
    """The keys to PATCH for this outcome, fitted into the metadata budget.

    Only our keys appear, so a merge-PATCH leaves every owner key as it was.
    ``texts`` (caption, alt text, tags, other languages) are shortened fairly, at
    character boundaries, when the owner's keys leave too little room. A person's own
    words (a ``human`` review) are never cut: written whole or not at all.
    Without ``review`` the marks of an earlier review are cleared: they vouched for
    other words. An empty ``model`` (a person's caption of an image no model
    described) writes no model key.
    """
    created = (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")
    updates = {
        keys.status: status,
        **({keys.model: model} if model else {}),
        keys.generation: str(generation),
        keys.created: created,
        **(provenance or {}),
    }
    if review is not None:
        updates.update(
            {keys.source: review.source, keys.reviewed_by: review.by, keys.reviewed: created}
        )
    ours = set(keys.all())
    owners = {k: v for k, v in existing.items() if k not in ours}
    used = size_of(owners) + size_of(updates)
    if used > TOTAL_BUDGET:
        raise NoRoomError(f"owner metadata uses {size_of(owners)} of {TOTAL_BUDGET} bytes")
    if texts is not None:
        fitted = fit_fairly(texts, TOTAL_BUDGET - used)
        if review is not None and review.source == HUMAN and fitted != dict(texts):
            raise NoRoomError(
                f"the caption, alt text and tags take {size_of(texts)} bytes; next to the "
                f"object's other metadata there is room for {TOTAL_BUDGET - used} "
                f"(at most {VALUE_BUDGET} a value): shorten them"
            )
        updates.update(fitted)
    # Text left from an older generation (or another mode) would describe other content,
    # and a review of other words vouches for nothing here.
    stale = keys.text_keys() if review is not None else (*keys.text_keys(), *keys.review_keys())
    for key in stale:
        if key in existing and key not in updates:
            updates[key] = ""
    return updates

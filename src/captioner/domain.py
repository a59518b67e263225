"""Small frozen value objects that flow through the pipeline."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# Cloud Storage's limit on an object name, in UTF-8 bytes.
MAX_OBJECT_NAME_BYTES = 1024


def first_unencodable(value: object, where: str = "") -> str | None:
    """Where in parsed JSON the first string that is not Unicode text is, or None.

    JSON lets ``"\\ud800"`` (a lone surrogate) through and Python keeps it, but no
    UTF-8 encoder will: such a name or prefix is dropped or mangled further down
    (aiohttp left an unencodable ``prefix`` out of the listing query, which widened a
    backfill to the whole bucket). So every string, keys included, is checked once
    at the edge, before anything is listed or fetched.
    """
    if isinstance(value, str):
        return None if _encodable(value) else (where or "the value")
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and not _encodable(key):
                return (where + "." if where else "") + "a key"
            if (found := first_unencodable(item, here)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (found := first_unencodable(item, f"{where}[{index}]")) is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An object we were asked to caption.

    ``generation`` is set when the request names one (an upload event always
    does); ``None`` means "whatever generation is current".
    """

    bucket: str
    name: str
    generation: int | None = None
    metageneration: int | None = None
    content_type: str | None = None
    size: int | None = None

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What Cloud Storage says about an object right now."""

    bucket: str
    name: str
    generation: int
    metageneration: int
    content_type: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """Bytes ready to send to Gemini, and what was done to get them."""

    data: bytes
    mime_type: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    reencoded: bool


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as Gemini reports them (``usage_metadata``). ``thoughts_tokens`` are billed
    as output too; ``image_tokens`` are the part of ``prompt_tokens`` the image cost."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    image_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            self.thoughts_tokens + other.thoughts_tokens,
            self.image_tokens + other.image_tokens,
            self.calls + other.calls,
        )

    def as_fields(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "image_tokens": self.image_tokens,
            "thoughts_tokens": self.thoughts_tokens,
            "output_tokens": self.output_tokens,
            "gemini_calls": self.calls,
        }


@dataclass(frozen=True, slots=True)
class Description:
    """Gemini's answer: a caption, or the reason there is none."""

    text: str | None
    model: str
    blocked_reason: str | None = None
    usage: Usage = Usage()
    cut_off: bool = False  # ended at the output cap (finishReason MAX_TOKENS)
    alt: str | None = None
    tags: tuple[str, ...] = ()
    translations: Mapping[str, str] = field(default_factory=dict)


class Outcome(enum.Enum):
    """How one object ended. The value is what reports show."""

    CAPTIONED = "ok"
    BLOCKED = "blocked"
    FAILED = "error"  # permanent: recorded on the object when possible
    SKIPPED = "skipped"  # nothing to do: done already, not an image, gone, superseded
    RETRY = "retry"  # transient and still failing: nothing recorded, try again later
    PLANNED = "would-caption"  # a dry run's answer: this one needs a caption


@dataclass(frozen=True, slots=True)
class CaptionResult:
    """The outcome for one image; ``reason`` explains skips and failures.

    ``source`` is what the user named: ``gs://bucket/name``, a URL or a file path.
    ``ref`` is set for Cloud Storage objects only.
    """

    source: str
    outcome: Outcome
    caption: str | None = None
    reason: str | None = None
    message: str | None = None
    generation: int | None = None
    recorded: bool = False
    usage: Usage = Usage()
    seconds: float = 0.0
    ref: ObjectRef | None = None
    alt: str | None = None
    tags: tuple[str, ...] = ()
    translations: Mapping[str, str] = field(default_factory=dict)
    stages: Mapping[str, float] = field(default_factory=dict)

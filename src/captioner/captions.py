"""What we ask Gemini for, and how its answer is checked: pure, no SDK types.

Two modes. ``sentence``: one plain sentence. ``structured``: a JSON object,
constrained by a response schema, with a caption, short alt text, a few lowercase
tags and, when several languages are configured, the caption in each of them.
An answer that does not match is an InvalidAnswerError, never metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from captioner.domain import Description
from captioner.metadata import clean_caption

DEFAULT_PROMPT = (
    "Write one factual sentence (at most 30 words) describing this image, usable as "
    "its caption and alt text. Name the main subject, the setting and notable "
    "colours. Answer with the sentence only."
)
MAX_TAGS = 8
_TAG = re.compile(r"[^\w\s&+.-]", re.UNICODE)


class InvalidAnswerError(ValueError):
    """The model's answer does not match what was asked for."""


@dataclass(frozen=True, slots=True)
class Captions:
    caption: str
    alt: str | None = None
    tags: tuple[str, ...] = ()
    translations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CaptionSpec:
    """The request for one image: prompt, mode, languages, and the rule that chose them."""

    prompt: str
    structured: bool = True
    languages: tuple[str, ...] = ("en",)
    rule: str = "default"

    @property
    def fingerprint(self) -> str:
        """Short hash of everything that shapes the answer except the model."""
        basis = json.dumps([self.prompt, self.structured, self.languages, self.rule])
        return hashlib.sha256(basis.encode()).hexdigest()[:12]

    def full_prompt(self) -> str:
        if not self.structured:
            if self.languages[0] != "en":
                return f"{self.prompt}\nWrite it in the language with code {self.languages[0]!r}."
            return self.prompt
        lines = [
            self.prompt,
            "Answer with a JSON object with these fields:",
            f'"caption": that description, in the language with code "{self.languages[0]}";',
            f'"alt_text": alt text for screen readers, at most 125 characters, '
            f'in "{self.languages[0]}";',
            f'"tags": 3 to {MAX_TAGS} lowercase search tags in English, one or two words each.',
        ]
        others = self.languages[1:]
        if others:
            lines.append(
                '"translations": an object with the caption translated into each of '
                + ", ".join(f'"{code}"' for code in others)
                + ", keyed by language code."
            )
        return "\n".join(lines)

    def response_schema(self) -> dict[str, Any] | None:
        """JSON Schema for ``response_json_schema``; None in sentence mode."""
        if not self.structured:
            return None
        properties: dict[str, Any] = {
            "caption": {"type": "string"},
            "alt_text": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_TAGS},
        }
        required = ["caption", "alt_text", "tags"]
        others = self.languages[1:]
        if others:
            properties["translations"] = {
                "type": "object",
                "properties": {code: {"type": "string"} for code in others},
                "required": list(others),
            }
            required.append("translations")
        return {"type": "object", "properties": properties, "required": required}

    def parse(self, text: str) -> Captions:
        """Check and clean an answer; raise InvalidAnswerError if it is not what we asked."""
        if not self.structured:
            caption = clean_caption(text)
            if not caption:
                raise InvalidAnswerError("empty answer")
            return Captions(caption)
        try:
            data = json.loads(text)
        except ValueError:
            raise InvalidAnswerError(f"not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise InvalidAnswerError("not a JSON object")
        caption = _text(data, "caption")
        alt = _text(data, "alt_text")
        tags = data.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidAnswerError("'tags' is not a list of strings")
        clean_tags: list[str] = []
        for tag in tags:
            cleaned = _TAG.sub("", clean_caption(tag).lower()).strip()[:40]
            if cleaned and cleaned not in clean_tags:
                clean_tags.append(cleaned)
        translations: dict[str, str] = {}
        others = self.languages[1:]
        if others:
            given = data.get("translations")
            if not isinstance(given, dict):
                raise InvalidAnswerError("'translations' is missing")
            for code in others:
                translations[code] = _text(given, code)
        return Captions(caption, alt, tuple(clean_tags[:MAX_TAGS]), translations)


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    cleaned = clean_caption(value) if isinstance(value, str) else ""
    if not cleaned:
        raise InvalidAnswerError(f"{key!r} is missing or empty")
    return cleaned


def with_captions(description: Description, captions: Captions) -> Description:
    """The description carrying a parsed structured answer's fields."""
    return replace(
        description,
        text=captions.caption,
        alt=captions.alt,
        tags=captions.tags,
        translations=captions.translations,
    )

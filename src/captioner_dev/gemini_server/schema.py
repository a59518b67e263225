"""Answer text: a caption from the image facts, or JSON that fills the request's schema."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from captioner_dev.gemini_server.images import ImageFacts
from captioner_dev.gemini_server.wire import ParsedRequest, get_field


@dataclass(frozen=True)
class Description:
    caption: str
    alt: str
    tags: list[str]
    width: int | None = None
    height: int | None = None
    orientation: str | None = None
    format: str | None = None
    colours: tuple[str, ...] = ()


def describe(parsed: ParsedRequest, facts: list[ImageFacts]) -> Description:
    prefix = "Offline stand-in caption:"
    if len(facts) == 1:
        only = facts[0]
        return Description(
            caption=f"{prefix} {only.phrase()}. {only.tag}",
            alt=only.alt(),
            tags=only.tags(),
            width=only.width,
            height=only.height,
            orientation=only.orientation,
            format=only.format,
            colours=only.colours,
        )
    if facts:
        pieces = [f"image {i}: {fact.phrase()} {fact.tag}" for i, fact in enumerate(facts, 1)]
        tags = list(dict.fromkeys(tag for fact in facts for tag in fact.tags()))
        return Description(
            caption=f"{prefix} {len(facts)} images; " + "; ".join(pieces) + ".",
            alt=f"{len(facts)} images (offline stand-in) " + " ".join(f.tag for f in facts),
            tags=tags,
        )
    if parsed.file_uris:
        uris = ", ".join(parsed.file_uris)
        return Description(
            caption=f"{prefix} a file reference ({uris}) that this offline stand-in cannot fetch.",
            alt="Unfetched file reference (offline stand-in)",
            tags=["file", "unfetched"],
        )
    return Description(
        caption=(
            f"{prefix} no image was received; the text prompt is "
            f"{len(parsed.prompt)} characters long."
        ),
        alt="No image (offline stand-in)",
        tags=["no image", "text"],
    )


# ISO 639-1 codes likely to appear as keys of a "caption per language" object.
_LANGUAGE_CODE_LIST: Final = (
    "af am ar az be bg bn bs ca cs cy da de el en es et eu fa fi fil fr ga gl gu he hi hr hu hy "
    "id is it ja ka kk km kn ko lo lt lv mk ml mn mr ms my nb ne nl no pa pl pt ro ru si sk sl "
    "sq sr sv sw ta te th tl tr uk ur uz vi zh zu"
)
_LANGUAGE_CODES: Final = frozenset(_LANGUAGE_CODE_LIST.split())
_LANGUAGE_KEY: Final = re.compile(r"^(?P<base>[a-z]{2,3})(?:[-_][A-Za-z0-9]{2,4})?$")
_LOCALISED_NAMES: Final = ("lang", "locale", "translation", "i18n", "caption", "alt", "local")


def _language_of(key: str) -> str | None:
    found = _LANGUAGE_KEY.match(key)
    if found and found["base"] in _LANGUAGE_CODES:
        return found["base"]
    return None


class SchemaFiller:
    """Builds a JSON value that satisfies a Gemini Schema or a JSON Schema, from a description."""

    _MAX_DEPTH: Final = 12

    def __init__(self, root: Mapping[str, Any], description: Description) -> None:
        self._root = root
        self._desc = description

    def fill(self, schema: Any, name: str = "", depth: int = 0, prefix: str = "") -> Any:
        if not isinstance(schema, Mapping) or depth > self._MAX_DEPTH:
            return None
        schema = self._resolve(schema)
        for key in ("any_of", "one_of", "all_of"):
            options = get_field(schema, key)
            if isinstance(options, list) and options:
                usable = [o for o in options if self._type(o) != "null"] or options
                return self.fill(usable[0], name, depth + 1, prefix)
        if "const" in schema:
            return schema["const"]
        enum_values = schema.get("enum")
        if isinstance(enum_values, list) and enum_values:
            return enum_values[0]
        kind = self._type(schema)
        if kind == "object":
            return self._object(schema, name, depth, prefix)
        if kind == "array":
            return self._array(schema, name, depth, prefix)
        if kind == "integer":
            return self._integer(schema, name)
        if kind == "number":
            return self._bounded(schema, 0.5)
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        return self._string(schema, name, prefix)

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        for _ in range(self._MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return schema
            target: Any = self._root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, Mapping) else None
            if not isinstance(target, Mapping):
                return schema
            schema = target
        return schema

    def _type(self, schema: Any) -> str | None:
        if not isinstance(schema, Mapping):
            return None
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if str(k).lower() != "null"), "null")
        if isinstance(kind, str) and kind:
            return kind.lower()
        if get_field(schema, "properties") is not None:
            return "object"
        if schema.get("items") is not None:
            return "array"
        return None

    def _object(self, schema: Mapping[str, Any], name: str, depth: int, prefix: str) -> Any:
        properties = get_field(schema, "properties")
        if not isinstance(properties, Mapping):
            properties = {}
        order = get_field(schema, "property_ordering")
        keys = [k for k in order if k in properties] if isinstance(order, list) else []
        keys += [k for k in properties if k not in keys]
        languages = {key: _language_of(key) for key in keys}
        is_language_map = (
            bool(keys)
            and all(languages.values())
            and (len(keys) >= 2 or any(word in name.lower() for word in _LOCALISED_NAMES))
        )
        result: dict[str, Any] = {}
        for key in keys:
            sub_prefix = prefix
            if is_language_map:
                # English is the source text; other languages are marked, not translated.
                sub_prefix = "" if languages[key] == "en" else f"[{key}] "
            result[key] = self.fill(properties[key], key, depth + 1, sub_prefix)
        return result

    def _array(self, schema: Mapping[str, Any], name: str, depth: int, prefix: str) -> Any:
        items = schema.get("items")
        low = get_field(schema, "min_items")
        high = get_field(schema, "max_items")
        min_items = int(low) if isinstance(low, int | str) and str(low).isdigit() else 0
        max_items = int(high) if isinstance(high, int | str) and str(high).isdigit() else None
        item_schema = self._resolve(items) if isinstance(items, Mapping) else None
        free_strings = item_schema is None or (
            self._type(item_schema) in ("string", None) and not item_schema.get("enum")
        )
        if free_strings:
            values: list[Any] = list(self._desc.tags[:5])
            while len(values) < min_items:
                values.append(f"tag{len(values) + 1}")
        else:
            singular = name[:-1] if name.endswith("s") else name
            values = [
                self.fill(items, singular, depth + 1, prefix) for _ in range(max(1, min_items))
            ]
        return values if max_items is None else values[:max_items]

    def _integer(self, schema: Mapping[str, Any], name: str) -> int:
        lowered = name.lower()
        if "width" in lowered and self._desc.width is not None:
            return self._desc.width
        if "height" in lowered and self._desc.height is not None:
            return self._desc.height
        return int(self._bounded(schema, 1))

    def _bounded(self, schema: Mapping[str, Any], default: float) -> float:
        value = default
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, int | float) and value < low:
            value = float(low)
        if isinstance(high, int | float) and value > high:
            value = float(high)
        return value

    def _string(self, schema: Mapping[str, Any], name: str, prefix: str) -> str:
        lowered = name.lower()
        desc = self._desc
        if "alt" in lowered or "title" in lowered:
            value = desc.alt
        elif lowered in {"lang", "language", "language_code", "languagecode", "locale"}:
            value = "en"
        elif ("colour" in lowered or "color" in lowered) and desc.colours:
            value = desc.colours[0]
        elif "orientation" in lowered and desc.orientation:
            value = desc.orientation
        elif ("format" in lowered or "mime" in lowered) and desc.format:
            value = desc.format
        elif any(word in lowered for word in ("tag", "keyword", "label")) and desc.tags:
            value = desc.tags[0]
        else:
            value = desc.caption
        value = prefix + value
        limit = get_field(schema, "max_length")
        if isinstance(limit, int | str) and str(limit).isdigit():
            value = value[: int(limit)]
        return value


def answer_text(parsed: ParsedRequest, description: Description) -> str:
    config = parsed.generation_config
    mime = str(get_field(config, "response_mime_type") or "text/plain").lower()
    schema = get_field(config, "response_schema")
    if schema is None:
        schema = get_field(config, "response_json_schema")
    if mime == "application/json":
        if isinstance(schema, Mapping):
            value = SchemaFiller(schema, description).fill(schema)
        else:
            value = {"caption": description.caption}
        return json.dumps(value, ensure_ascii=False)
    if mime == "text/x.enum" and isinstance(schema, Mapping):
        options = schema.get("enum")
        if isinstance(options, list) and options:
            return str(options[0])
    return description.caption

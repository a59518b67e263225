"""Per-prefix rules: which prompt and mode an object gets, or that it is left alone.

``CAPTION_RULES`` is a JSON list, first match wins; objects that match no rule get
the default prompt. For example::

    [{"name": "thumbs", "match": "thumbnails/*", "exclude": true},
     {"name": "products", "match": "products/**",
      "prompt": "Describe this product photo for a shop listing."}]

``match`` is a glob over the whole object name (``*`` and ``**`` both cross
``/``); ``prefix`` may be given instead.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from captioner.captions import CaptionSpec


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: str | None = None
    prefix: str | None = None
    exclude: bool = False
    prompt: str | None = None
    mode: str | None = None

    def applies_to(self, object_name: str) -> bool:
        if self.prefix is not None:
            return object_name.startswith(self.prefix)
        assert self.match is not None
        return fnmatch.fnmatchcase(object_name, self.match.replace("**", "*"))


@dataclass(frozen=True, slots=True)
class RuleBook:
    default: CaptionSpec
    rules: tuple[Rule, ...] = ()

    def spec_for(self, object_name: str) -> CaptionSpec | None:
        """The request for this object, or None when a rule excludes it."""
        for rule in self.rules:
            if rule.applies_to(object_name):
                if rule.exclude:
                    return None
                return CaptionSpec(
                    prompt=rule.prompt or self.default.prompt,
                    structured=(rule.mode or _mode(self.default)) == "structured",
                    languages=self.default.languages,
                    rule=rule.name,
                )
        return self.default

    def rule_for(self, object_name: str) -> Rule | None:
        return next((r for r in self.rules if r.applies_to(object_name)), None)


def _mode(spec: CaptionSpec) -> str:
    return "structured" if spec.structured else "sentence"


class _RuleModel(BaseModel):
    """One rule as JSON gives it. Strict: ``"exclude": "yes"`` is an error, not true.
    ``None`` is accepted for every optional field: Terraform's jsonencode writes unset
    optional attributes as null."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=64)]
    match: str | None = None
    prefix: str | None = None
    exclude: bool | None = None
    prompt: str | None = None
    mode: Literal["structured", "sentence"] | None = None


def parse_rules(text: str) -> tuple[Rule, ...]:
    """Rules from JSON text; ValueError with a message saying which rule is wrong."""
    if not text.strip():
        return ()
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError("must be a JSON list of rules")
    return tuple(_rule(index, item) for index, item in enumerate(data))


def _rule(index: int, item: Any) -> Rule:
    where = f"rule {index + 1}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object")
    try:
        model = _RuleModel.model_validate(item)
    except ValidationError as exc:
        raise ValueError(_sentence(where, item, exc)) from None
    if (model.match is None) == (model.prefix is None):
        raise ValueError(f"{where} ({model.name}) needs exactly one of 'match' or 'prefix'")
    return Rule(
        model.name, model.match, model.prefix, bool(model.exclude), model.prompt, model.mode
    )


def _sentence(where: str, item: dict[str, Any], exc: ValidationError) -> str:
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"{where} has unknown field(s) {unknown}"
    field = str(errors[0]["loc"][0])
    if field == "name":
        return f"{where} needs a 'name' (a short string)"
    named = f"{where} ({item.get('name')})"
    if field == "exclude":
        return f"{named}: 'exclude' must be true or false"
    if field == "mode":
        return f"{named}: 'mode' is 'structured' or 'sentence'"
    return f"{named}: {field!r} must be a string"

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
from typing import Any

from captioner.captions import CaptionSpec

_KEYS = frozenset({"name", "match", "prefix", "exclude", "prompt", "mode"})


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
    rules = []
    for index, item in enumerate(data):
        where = f"rule {index + 1}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(item) - _KEYS
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ValueError(f"{where} needs a 'name' (a short string)")
        match, prefix = item.get("match"), item.get("prefix")
        if (match is None) == (prefix is None):
            raise ValueError(f"{where} ({name}) needs exactly one of 'match' or 'prefix'")
        for key in ("match", "prefix", "prompt"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ValueError(f"{where} ({name}): {key!r} must be a string")
        # Terraform's jsonencode writes unset optional attributes as null.
        item = {k: v for k, v in item.items() if v is not None}
        if not isinstance(item.get("exclude", False), bool):
            raise ValueError(f"{where} ({name}): 'exclude' must be true or false")
        if item.get("mode") not in (None, "structured", "sentence"):
            raise ValueError(f"{where} ({name}): 'mode' is 'structured' or 'sentence'")
        rules.append(Rule(name, match, prefix, item.get("exclude", False), item.get("prompt"),
                          item.get("mode")))  # fmt: skip
    return tuple(rules)

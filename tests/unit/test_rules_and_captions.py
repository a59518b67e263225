"""Per-prefix rules and the structured-answer contract, without services."""

from __future__ import annotations

import json

import pytest

from captioner.captions import CaptionSpec, InvalidAnswerError
from captioner.errors import SettingsError
from captioner.rules import parse_rules
from captioner.settings import Settings

RULES = [
    {"name": "thumbs", "prefix": "thumbnails/", "exclude": True},
    {"name": "products", "match": "products/**.jpg", "prompt": "Describe the product."},
    {"name": "plain", "match": "*.png", "mode": "sentence"},
]


def book():  # type: ignore[no-untyped-def]
    return Settings.from_env({"CAPTION_RULES": json.dumps(RULES)}).rule_book()


@pytest.mark.parametrize(
    ("name", "rule", "excluded"),
    [
        ("thumbnails/a.jpg", None, True),
        ("products/mugs/red/1.jpg", "products", False),
        ("products/readme.txt.jpg", "products", False),
        ("a/b/c.png", "plain", False),
        ("photos/x.jpg", "default", False),
    ],
)
def test_first_matching_rule_wins(name: str, rule: str | None, excluded: bool) -> None:
    spec = book().spec_for(name)
    assert (spec is None) is excluded
    if spec is not None:
        assert spec.rule == rule


def test_rule_prompt_and_mode_are_used() -> None:
    products = book().spec_for("products/1.jpg")
    assert products is not None
    assert products.prompt == "Describe the product."
    assert products.structured
    plain = book().spec_for("x.png")
    assert plain is not None
    assert not plain.structured


def test_terraform_style_nulls_are_accepted() -> None:
    rules = parse_rules(json.dumps([{"name": "t", "prefix": "t/", "match": None,
                                     "exclude": None, "prompt": None, "mode": None}]))  # fmt: skip
    assert rules[0].prefix == "t/"
    assert rules[0].exclude is False


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("not json", "not JSON"),
        ('{"name": "x"}', "JSON list"),
        ('[{"prefix": "a/"}]', "needs a 'name'"),
        ('[{"name": "a"}]', "exactly one of 'match' or 'prefix'"),
        ('[{"name": "a", "prefix": "x", "match": "y"}]', "exactly one of"),
        ('[{"name": "a", "prefix": "x", "colour": 1}]', "unknown field"),
        ('[{"name": "a", "prefix": "x", "mode": "poem"}]', "'mode'"),
        ('[{"name": "a", "prefix": "x", "exclude": "yes"}]', "'exclude'"),
    ],
)
def test_bad_rules_fail_at_start_naming_the_variable(rules: str, message: str) -> None:
    with pytest.raises(SettingsError, match="CAPTION_RULES") as info:
        Settings.from_env({"CAPTION_RULES": rules})
    assert message in str(info.value)


def test_fingerprint_changes_with_prompt_languages_mode_and_rule() -> None:
    base = CaptionSpec("p")
    variants = [
        CaptionSpec("q"),
        CaptionSpec("p", languages=("en", "de")),
        CaptionSpec("p", structured=False),
        CaptionSpec("p", rule="r"),
    ]
    assert len({base.fingerprint, *(v.fingerprint for v in variants)}) == 5
    assert CaptionSpec("p").fingerprint == base.fingerprint


def test_structured_answer_is_cleaned() -> None:
    spec = CaptionSpec("p", languages=("en", "de"))
    answer = {
        "caption": " A cat.\n",
        "alt_text": "Cat",
        "tags": ["Cat", "cat", " Pet!", "", "indoor,floor"],
        "translations": {"de": "Eine Katze."},
    }
    captions = spec.parse(json.dumps(answer))
    assert captions.caption == "A cat."
    assert captions.tags == ("cat", "pet", "indoorfloor")
    assert captions.translations == {"de": "Eine Katze."}


@pytest.mark.parametrize(
    "answer",
    [
        "a plain sentence",
        "[]",
        '{"caption": "x", "alt_text": "y"}',
        '{"caption": "", "alt_text": "y", "tags": []}',
        '{"caption": "x", "alt_text": "y", "tags": "a,b"}',
        '{"caption": "x", "alt_text": "y", "tags": [1]}',
        '{"caption": "x", "alt_text": "y", "tags": [], "translations": {"fr": "z"}}',
    ],
)
def test_answers_off_the_schema_are_refused(answer: str) -> None:
    with pytest.raises(InvalidAnswerError):
        CaptionSpec("p", languages=("en", "de")).parse(answer)


def test_schema_lists_every_language_after_the_first() -> None:
    schema = CaptionSpec("p", languages=("en", "de", "ja")).response_schema()
    assert schema is not None
    assert schema["properties"]["translations"]["required"] == ["de", "ja"]
    assert CaptionSpec("p", structured=False).response_schema() is None

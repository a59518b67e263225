from __future__ import annotations

from datetime import UTC, datetime

import pytest

from captioner.metadata import (
    TOTAL_BUDGET,
    VALUE_BUDGET,
    MetadataKeys,
    NoRoomError,
    caption_updates,
    clean_caption,
    fit_fairly,
    is_done,
    owner_conflict,
    size_of,
    truncate_utf8,
)

KEYS = MetadataKeys()


def test_keys_follow_the_prefix_and_languages() -> None:
    keys = MetadataKeys("ai", ("en", "de", "ja"))
    assert keys.all() == (
        "ai", "ai-status", "ai-model", "ai-generation", "ai-created", "ai-alt", "ai-tags",
        "ai-rule", "ai-prompt", "ai-de", "ai-ja", "ai-source", "ai-reviewed-by", "ai-reviewed",
    )  # fmt: skip
    assert keys.language("en") == "ai"
    assert keys.language("de") == "ai-de"


def test_done_only_for_the_same_generation_with_a_status() -> None:
    meta = {"caption-generation": "5", "caption-status": "ok"}
    assert is_done(meta, 5, KEYS)
    assert not is_done(meta, 6, KEYS)
    assert not is_done({"caption-generation": "5"}, 5, KEYS)


def test_owner_caption_key_without_our_generation_key_is_a_conflict() -> None:
    assert owner_conflict({"caption": "mine"}, KEYS) == "caption"
    assert owner_conflict({"caption": "x", "caption-generation": "3"}, KEYS) is None
    assert owner_conflict({"other": "x"}, KEYS) is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('"A cat on a mat."', "A cat on a mat."),
        ("A cat\non a\tmat.\n", "A cat on a mat."),
        ("bell\x07 and\x00 nul", "bell and nul"),
        ("zero\u200bwidth", "zero width"),
        ("  ", ""),
        ("broken \udcff utf-8 \ud800", "broken utf-8"),
        ("\x1b[31mred\x1b[0m", "[31mred [0m"),
    ],
)
def test_clean_caption_makes_one_printable_line(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


@pytest.mark.parametrize("text", ["a" * 5000, "日本語" * 2000, "🐈 " * 3000, "word " * 2000])
@pytest.mark.parametrize("limit", [1, 3, 10, 100, 4096])
def test_truncation_never_splits_a_character_and_respects_the_limit(text: str, limit: int) -> None:
    out = truncate_utf8(text, limit)
    assert len(out.encode()) <= limit
    assert out.encode().decode() == out
    if out:
        assert out.endswith("…")


def test_short_text_is_not_touched() -> None:
    assert truncate_utf8("a cat", 100) == "a cat"


def test_updates_hold_only_our_keys_and_fit_the_budget() -> None:
    owner = {"notes": "n" * 7000}
    updates = caption_updates(
        existing=owner,
        keys=KEYS,
        generation=9,
        status="ok",
        model="m",
        texts={"caption": "c" * 9000},
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert set(updates) == {
        "caption",
        "caption-status",
        "caption-model",
        "caption-generation",
        "caption-created",
    }
    assert updates["caption-created"] == "2026-01-02T03:04:05Z"
    assert size_of({**owner, **updates}) <= TOTAL_BUDGET
    assert len(updates["caption"].encode()) <= VALUE_BUDGET


def test_a_single_value_stays_under_four_kib() -> None:
    updates = caption_updates(
        existing={}, keys=KEYS, generation=1, status="ok", model="m", texts={"caption": "c" * 9000}
    )
    assert len(updates["caption"].encode()) <= VALUE_BUDGET


def test_a_failure_blanks_a_stale_caption_from_an_older_generation() -> None:
    existing = {"caption": "old content", "caption-generation": "1", "caption-status": "ok"}
    updates = caption_updates(
        existing=existing,
        keys=KEYS,
        generation=2,
        status="error:corrupt-image",
        model="m",
        texts=None,
    )
    assert updates["caption"] == ""
    assert updates["caption-status"] == "error:corrupt-image"


def test_no_room_at_all_raises() -> None:
    with pytest.raises(NoRoomError):
        caption_updates(
            existing={"k": "v" * 8180},
            keys=KEYS,
            generation=1,
            status="ok",
            model="m",
            texts={"caption": "x"},
        )


def test_tight_budget_is_shared_fairly_between_languages() -> None:
    keys = MetadataKeys("caption", ("en", "de", "ja"))
    texts = {
        "caption": "e" * 3000,
        "caption-de": "d" * 3000,
        "caption-ja": "日" * 1000,
        "caption-tags": "cat,floor",
    }
    updates = caption_updates(
        existing={"notes": "n" * 3000},
        keys=keys,
        generation=1,
        status="ok",
        model="m",
        texts=texts,
    )
    assert size_of({"notes": "n" * 3000, **updates}) <= TOTAL_BUDGET
    assert updates["caption-tags"] == "cat,floor"  # short values keep everything
    lengths = [len(updates[k].encode()) for k in ("caption", "caption-de", "caption-ja")]
    assert max(lengths) - min(lengths) <= 20  # the long ones share the cut
    assert all(updates[k].endswith("…") for k in ("caption", "caption-de", "caption-ja"))


def test_fit_fairly_leaves_values_that_fit_alone() -> None:
    assert fit_fairly({"a": "x", "b": "y"}, 100) == {"a": "x", "b": "y"}

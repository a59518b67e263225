"""What each model family is sent: thinking, media resolution, temperature."""

from __future__ import annotations

import pytest

from captioner.models import (
    MediaResolution,
    Thinking,
    default_temperature,
    family_of,
    media_resolution,
    thinking_config,
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gemini-2.5-flash", {"thinking_budget": 0}),  # off
        ("gemini-2.5-flash-lite", {"thinking_budget": 0}),
        ("gemini-2.5-pro", {"thinking_budget": 128}),  # Pro cannot turn it off
        ("models/gemini-2.5-flash-preview-09-2025", {"thinking_budget": 0}),
        ("publishers/google/models/gemini-2.5-pro", {"thinking_budget": 128}),
        ("gemini-3-flash-preview", {"thinking_level": "MINIMAL"}),
        ("gemini-3-pro-preview", {"thinking_level": "LOW"}),  # Pro: low or high only
        ("gemini-3.1-flash-lite", {"thinking_level": "MINIMAL"}),
        ("gemini-2.0-flash", None),  # no thinking settings at all
        ("gemini-1.5-pro-002", None),
    ],
)
def test_by_default_each_family_thinks_as_little_as_it_allows(
    model: str, expected: dict[str, object] | None
) -> None:
    assert thinking_config(model, Thinking.MINIMAL) == expected


def test_a_level_and_a_budget_are_never_sent_together() -> None:
    for model in ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-3-flash", "gemini-9-ultra"):
        for thinking in Thinking:
            sent = thinking_config(model, thinking) or {}
            assert len(sent) <= 1


@pytest.mark.parametrize(
    ("model", "thinking", "expected"),
    [
        ("gemini-2.5-flash", Thinking.HIGH, {"thinking_budget": 8192}),
        ("gemini-2.5-flash-lite", Thinking.LOW, {"thinking_budget": 512}),  # Lite's minimum
        ("gemini-3-flash-preview", Thinking.MEDIUM, {"thinking_level": "MEDIUM"}),
        ("gemini-3-pro-preview", Thinking.MEDIUM, {"thinking_level": "HIGH"}),
        ("gemini-2.5-flash", Thinking.MODEL_DEFAULT, None),
    ],
)
def test_caption_thinking_asks_for_more(
    model: str, thinking: Thinking, expected: dict[str, object] | None
) -> None:
    assert thinking_config(model, thinking) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gemini-2.5-flash", None),  # pixels decide: 768 px is one 258-token tile
        ("gemini-2.0-flash", None),
        ("gemini-3-flash-preview", "MEDIA_RESOLUTION_LOW"),  # ~280 instead of ~1120
        ("gemini-3-pro-preview", "MEDIA_RESOLUTION_LOW"),
    ],
)
def test_auto_media_resolution_keeps_an_image_near_one_tile(
    model: str, expected: str | None
) -> None:
    assert media_resolution(model, MediaResolution.AUTO) == expected


def test_an_explicit_media_resolution_is_sent_to_every_family() -> None:
    assert media_resolution("gemini-2.5-flash", MediaResolution.HIGH) == "MEDIA_RESOLUTION_HIGH"
    assert media_resolution("gemini-3-flash", MediaResolution.MODEL_DEFAULT) is None


def test_gemini_3_runs_at_temperature_1_as_google_advises() -> None:
    assert default_temperature("gemini-3-flash-preview") == 1.0
    assert default_temperature("gemini-2.5-flash") == 0.2


def test_a_name_google_has_not_used_yet_is_taken_as_the_newest_family() -> None:
    assert family_of("gemini-4-flash").major == 4
    assert family_of("my-tuned-model").major >= 3

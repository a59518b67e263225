from __future__ import annotations

import pytest

from captioner.errors import SettingsError
from captioner.settings import DEFAULT_PROMPT, Settings


def test_defaults_when_nothing_is_set() -> None:
    s = Settings.from_env({"PATH": "/bin", "GEMINI_API_KEY": "k"})
    assert s.model == "gemini-2.5-flash"
    assert s.prompt == DEFAULT_PROMPT
    assert s.max_edge == 768
    assert s.languages == ("en",)
    assert s.metadata_prefix == "caption"
    assert s.allowed_buckets == ()


def test_every_documented_variable_is_read() -> None:
    s = Settings.from_env(
        {
            "CAPTION_MODEL": "gemini-2.5-flash-lite",
            "CAPTION_PROMPT": "Say what you see.",
            "CAPTION_MAX_CONCURRENCY": "64",
            "CAPTION_MAX_EDGE": "512",
            "CAPTION_MAX_BYTES": "1000000",
            "CAPTION_ALLOWED_BUCKETS": " photos-a, photos-b ,",
            "CAPTION_LANGUAGES": "en,de,ja",
            "CAPTION_METADATA_PREFIX": "ai",
        }
    )
    assert s.model == "gemini-2.5-flash-lite"
    assert s.prompt == "Say what you see."
    assert s.max_concurrency == 64
    assert s.max_edge == 512
    assert s.max_bytes == 1_000_000
    assert s.allowed_buckets == ("photos-a", "photos-b")
    assert s.languages == ("en", "de", "ja")
    assert s.metadata_prefix == "ai"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CAPTION_MAX_CONCURRENCY", "0"),
        ("CAPTION_MAX_CONCURRENCY", "lots"),
        ("CAPTION_MAX_EDGE", "10"),
        ("CAPTION_MAX_BYTES", "-1"),
        ("CAPTION_LANGUAGES", "english!"),
        ("CAPTION_LANGUAGES", ","),
        ("CAPTION_METADATA_PREFIX", "Has Spaces"),
        ("CAPTION_ALLOWED_BUCKETS", "UPPER_case"),
        ("CAPTION_MODEL", ""),
        ("CAPTION_MAX_EDGES", "768"),
    ],
)
def test_bad_value_fails_with_a_message_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(Exception, match="frozen"):
        s.max_edge = 5  # type: ignore[misc]

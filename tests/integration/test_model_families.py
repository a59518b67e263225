"""The real pipeline on each model family, against a stand-in that charges like Gemini.

The stand-in's token model (src/captioner_dev/gemini_server/tokens.py) follows the
documented rules: thinking per family (https://ai.google.dev/gemini-api/docs/thinking), image
tokens per family and media resolution (https://ai.google.dev/gemini-api/docs/tokens,
https://ai.google.dev/gemini-api/docs/media-resolution), thinking sharing maxOutputTokens
(googleapis/python-genai#782). These tests show what the product's per-family settings buy
over the SDK's defaults, which is what the product sent before them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from google import genai
from google.genai import types

from captioner.domain import Outcome
from captioner.runtime import Runtime
from captioner.settings import Settings
from captioner_dev.gemini_server import RequestRecord
from tests import images
from tests.objects import metadata, upload

FAMILIES = [
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
    "gemini-3-flash-preview",
    "gemini-3-pro-preview",
]
# What the product must send each family by default: (thinkingConfig, mediaResolution).
EXPECTED_WIRE: dict[str, tuple[dict[str, Any], str | None]] = {
    "gemini-2.5-flash": ({"thinking_budget": 0}, None),
    "gemini-2.5-flash-lite": ({"thinking_budget": 0}, None),
    "gemini-2.5-pro": ({"thinking_budget": 128}, None),
    "gemini-3-flash-preview": ({"thinking_level": "MINIMAL"}, "MEDIA_RESOLUTION_LOW"),
    "gemini-3-pro-preview": ({"thinking_level": "LOW"}, "MEDIA_RESOLUTION_LOW"),
}
# The bounds the product's settings must hold a caption to.
MAX_IMAGE_TOKENS = 300
MAX_THOUGHTS = {
    "gemini-2.5-flash": 50,
    "gemini-2.5-flash-lite": 50,
    "gemini-2.5-pro": 200,
    "gemini-3-flash-preview": 200,
    "gemini-3-pro-preview": 200,
}


def _get(mapping: Mapping[str, Any], snake: str) -> Any:
    """A key in either spelling: google-genai sends camelCase and snake_case."""
    head, *rest = snake.split("_")
    camel = head + "".join(word.capitalize() for word in rest)
    return mapping.get(snake, mapping.get(camel))


def _wire(record: RequestRecord) -> tuple[dict[str, Any], str | None]:
    config = record.generation_config
    thinking = _get(config, "thinking_config") or {}
    sent = {
        key: _get(thinking, key)
        for key in ("thinking_budget", "thinking_level")
        if _get(thinking, key) is not None
    }
    return sent, _get(config, "media_resolution")


async def _caption_all(bucket: Any, model: str, **settings: str) -> list[Any]:
    refs = [upload(bucket, f"{model}/{p.name}", p.read_bytes()) for p in images.all_photos()]
    runtime = Runtime(
        Settings.from_env(
            {
                "CAPTION_MODEL": model,
                "CAPTION_GEMINI_ATTEMPTS": "2",
                "CAPTION_RETRY_MAX_WAIT": "0.2",
                "CAPTION_GEMINI_TIMEOUT": "10",
                **settings,
            }
        )
    )
    try:
        return [r async for r in runtime.captioner().caption_many(refs)]
    finally:
        await runtime.aclose()


@pytest.mark.parametrize("model", FAMILIES)
async def test_every_family_captions_every_image_within_its_token_bounds(
    bucket: Any, gemini: Any, model: str
) -> None:
    results = await _caption_all(bucket, model)

    assert results, "no sample photos"
    for result in results:
        assert result.outcome is Outcome.CAPTIONED, (result.source, result.message)
        assert result.ref is not None
        assert metadata(bucket, result.ref.name)["caption-status"] == "ok"
        # What the product logs per image (summed over its calls).
        assert result.usage.calls == 1
        assert 0 < result.usage.image_tokens <= MAX_IMAGE_TOKENS
        assert result.usage.thoughts_tokens <= MAX_THOUGHTS[model]
    assert len(gemini.requests) == len(results)
    for record in gemini.requests:
        assert record.model == model
        assert record.status == 200
        assert record.finish_reason == "STOP"
        assert _wire(record) == EXPECTED_WIRE[model]
        assert record.image_tokens <= MAX_IMAGE_TOKENS
        assert record.thoughts_tokens <= MAX_THOUGHTS[model]


@pytest.mark.parametrize("model", ["gemini-2.5-pro", "gemini-3-pro-preview"])
async def test_a_cap_that_thinking_uses_up_is_asked_again_never_blocked(
    bucket: Any, gemini: Any, model: str
) -> None:
    # 2.5 Pro thinks 128 tokens at least and 3 Pro about 180 at level low: a 100-token cap
    # leaves no room for the answer.
    results = await _caption_all(bucket, model, CAPTION_MAX_OUTPUT_TOKENS="100")

    for result in results:
        assert result.ref is not None
        status = metadata(bucket, result.ref.name)["caption-status"]
        assert status in {"ok", "error:max-tokens"}, (result.source, status, result.message)
        assert result.outcome is not Outcome.BLOCKED
        assert result.usage.calls == 2  # asked once more, with four times the room
    first_calls = [
        r for r in gemini.requests if _get(r.generation_config, "max_output_tokens") == 100
    ]
    assert len(first_calls) == len(results)
    assert {r.finish_reason for r in first_calls} == {"MAX_TOKENS"}
    # Thinking ate the whole cap: no text at all, which must not read as a refusal.
    assert {r.output_tokens for r in first_calls} == {0}
    assert {r.thoughts_tokens for r in first_calls} == {100}


@pytest.mark.parametrize("model", FAMILIES)
async def test_sdk_defaults_cost_more_than_the_products_settings(gemini: Any, model: str) -> None:
    """The pre-fix product sent no thinking config and no media resolution: the SDK defaults.

    Raw google-genai calls show what that costs per image, against the bounds above.
    """
    photo = images.photo("chelsea.jpg")
    wire, resolution = EXPECTED_WIRE[model]
    product = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(
            thinking_budget=wire.get("thinking_budget"),
            thinking_level=wire.get("thinking_level"),
        ),
        media_resolution=types.MediaResolution(resolution) if resolution else None,
        max_output_tokens=1024,
    )
    client = genai.Client(
        api_key="test-key", http_options=types.HttpOptions(base_url=gemini.base_url)
    )
    contents = types.Content(
        role="user",
        parts=[
            types.Part.from_bytes(data=photo, mime_type="image/jpeg"),
            types.Part.from_text(text="Caption."),
        ],
    )
    usage = {}
    async with client.aio as aio:
        for name, config in [("default", types.GenerateContentConfig()), ("product", product)]:
            response = await aio.models.generate_content(
                model=model,
                contents=contents,
                config=config,
            )
            meta = response.usage_metadata
            assert meta is not None
            assert response.text
            image = sum(
                d.token_count or 0
                for d in meta.prompt_tokens_details or []
                if d.modality == types.MediaModality.IMAGE
            )
            usage[name] = (image, meta.thoughts_token_count or 0)

    (default_image, default_thoughts), (image, thoughts) = usage["default"], usage["product"]
    assert image <= MAX_IMAGE_TOKENS
    assert thoughts <= MAX_THOUGHTS[model]
    if model == "gemini-2.5-flash-lite":
        # Flash-Lite does not think by default and counts pixels: nothing to save.
        assert (default_image, default_thoughts) == (image, thoughts) == (258, 0)
        return
    # Everything else thinks by default, past the bound the product holds it to.
    assert default_thoughts > MAX_THOUGHTS[model] >= thoughts
    if model.startswith("gemini-3"):
        assert (default_image, image) == (1120, 280)  # HIGH by default, LOW sent
    else:
        assert default_image == image == 258

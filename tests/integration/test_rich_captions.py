"""Structured captions, languages, rules, provenance and Vertex AI, through the real
google-genai client and fake-gcs-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from captioner.adapters.gemini import GeminiDescriber, make_client
from captioner.adapters.images import prepare
from captioner.domain import ObjectRef, Outcome
from captioner.metadata import TOTAL_BUDGET, size_of
from captioner.runtime import Runtime
from captioner.settings import Settings
from tests import images, objects

RuntimeFactory = Callable[..., Runtime]


@pytest.fixture
async def make_runtime(gcs: Any, gemini: Any) -> AsyncIterator[RuntimeFactory]:
    made: list[Runtime] = []

    def factory(**env: str) -> Runtime:
        settings = {f"CAPTION_{k.upper()}": v for k, v in env.items()}
        runtime = Runtime(Settings.from_env({"CAPTION_GEMINI_ATTEMPTS": "2", **settings}))
        made.append(runtime)
        return runtime

    yield factory
    for runtime in made:
        await runtime.aclose()


def upload(bucket: Any, name: str, data: bytes | None = None, **metadata: str) -> ObjectRef:
    return objects.upload(bucket, name, data or images.photo("coffee.jpg"), metadata=metadata)


meta = objects.metadata


async def test_structured_mode_writes_caption_alt_text_and_tags(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    ref = upload(bucket, "coffee.jpg", owner="alice")
    result = await make_runtime().captioner().caption_object(ref)
    assert result.outcome is Outcome.CAPTIONED
    m = meta(bucket, "coffee.jpg")
    assert "600x400" in m["caption"]
    assert m["caption-alt"]
    assert len(m["caption-alt"]) < len(m["caption"])
    tags = m["caption-tags"].split(",")
    assert 1 <= len(tags) <= 8
    assert all(tag == tag.lower().strip() and tag for tag in tags)
    assert m["owner"] == "alice"
    (request,) = gemini.requests
    assert request.generation_config["responseMimeType"] == "application/json"
    assert "responseJsonSchema" in request.generation_config


async def test_sentence_mode_writes_only_the_caption(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    ref = upload(bucket, "plain.jpg")
    await make_runtime(mode="sentence").captioner().caption_object(ref)
    m = meta(bucket, "plain.jpg")
    assert "600x400" in m["caption"]
    assert "caption-alt" not in m
    assert "caption-tags" not in m


async def test_one_call_writes_a_caption_per_language(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    ref = upload(bucket, "multi.jpg")
    await make_runtime(languages="en,de,ja").captioner().caption_object(ref)
    m = meta(bucket, "multi.jpg")
    assert gemini.calls == 1
    assert "600x400" in m["caption"]
    assert m["caption-de"].startswith("[de]")
    assert m["caption-ja"].startswith("[ja]")


async def test_languages_that_do_not_fit_are_shortened_fairly(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    long = "A very detailed description of a cup of coffee on a saucer. " * 60
    answer = {
        "caption": long,
        "alt_text": "Coffee cup.",
        "tags": ["coffee", "cup"],
        "translations": {"de": long, "ja": "コーヒー。" * 600},
    }
    gemini.add_fault("custom_text", text=json.dumps(answer))
    ref = upload(bucket, "tight.jpg", notes="n" * 2500)
    await make_runtime(languages="en,de,ja").captioner().caption_object(ref)
    m = meta(bucket, "tight.jpg")
    assert size_of(m) <= TOTAL_BUDGET
    assert m["notes"] == "n" * 2500
    assert m["caption-alt"] == "Coffee cup."  # short values are kept whole
    sizes = [len(m[k].encode()) for k in ("caption", "caption-de", "caption-ja")]
    assert max(sizes) - min(sizes) <= 20
    assert all(m[k].endswith("…") for k in ("caption", "caption-de", "caption-ja"))


async def test_an_answer_off_the_schema_is_asked_again_then_recorded_as_an_error(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    gemini.add_fault("custom_text", text="Sure! Here is a caption: a cup.", count=2)
    ref = upload(bucket, "offschema.jpg")
    result = await make_runtime().captioner().caption_object(ref)
    assert result.outcome is Outcome.FAILED
    m = meta(bucket, "offschema.jpg")
    assert m["caption-status"] == "error:invalid-answer"
    assert "caption" not in m  # never garbage in metadata
    assert gemini.calls == 2


async def test_an_answer_off_the_schema_once_is_retried_and_captioned(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    gemini.add_fault("custom_text", text='{"caption": 5}', count=1)
    result = await make_runtime().captioner().caption_object(upload(bucket, "once.jpg"))
    assert result.outcome is Outcome.CAPTIONED
    assert gemini.calls == 2


RULES = json.dumps(
    [
        {"name": "thumbs", "prefix": "thumbnails/", "exclude": True},
        {"name": "products", "match": "products/**.jpg", "prompt": "Describe this product."},
    ]
)


async def test_a_rule_excludes_a_prefix(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    ref = upload(bucket, "thumbnails/small.jpg", owner="x")
    result = await make_runtime(rules=RULES).captioner().caption_object(ref)
    assert result.outcome is Outcome.SKIPPED
    assert result.reason == "excluded-by-rule"
    assert meta(bucket, "thumbnails/small.jpg") == {"owner": "x"}
    assert gemini.calls == 0


async def test_a_rule_sets_the_prompt_and_is_recorded(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    runtime = make_runtime(rules=RULES)
    await runtime.captioner().caption_object(upload(bucket, "products/mug/1.jpg"))
    await runtime.captioner().caption_object(upload(bucket, "other/1.jpg"))
    product, other = meta(bucket, "products/mug/1.jpg"), meta(bucket, "other/1.jpg")
    assert product["caption-rule"] == "products"
    assert other["caption-rule"] == "default"
    prompts = [r.prompt for r in gemini.requests]
    assert prompts[0].startswith("Describe this product.")
    assert not prompts[1].startswith("Describe this product.")
    assert product["caption-prompt"] != other["caption-prompt"]


async def test_if_stale_recaptions_only_what_another_prompt_or_model_made(
    bucket: Any, make_runtime: RuntimeFactory, gemini: Any
) -> None:
    ref = upload(bucket, "stale.jpg")
    await make_runtime().captioner().caption_object(ref)
    first = meta(bucket, "stale.jpg")

    same = await make_runtime().captioner().caption_object(ref, if_stale=True)
    assert same.reason == "already-captioned"

    new_prompt = make_runtime(prompt="Describe the mood of this photo in one sentence.")
    changed = await new_prompt.captioner().caption_object(ref, if_stale=True)
    assert changed.outcome is Outcome.CAPTIONED
    assert meta(bucket, "stale.jpg")["caption-prompt"] != first["caption-prompt"]

    new_model = make_runtime(
        prompt="Describe the mood of this photo in one sentence.", model="gemini-3-flash"
    )
    remade = await new_model.captioner().caption_object(ref, if_stale=True)
    assert remade.outcome is Outcome.CAPTIONED
    assert meta(bucket, "stale.jpg")["caption-model"] == "gemini-3-flash"
    assert gemini.calls == 3


async def test_vertex_ai_mode_reaches_the_vertex_path_with_project_and_location(
    gemini_thread: Any, gemini: Any
) -> None:
    from google.oauth2.credentials import Credentials

    env = {
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": "my-project",
        "GOOGLE_CLOUD_LOCATION": "europe-west4",
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
    }
    client = make_client(10, env, credentials=Credentials(token="test-token"))  # type: ignore[no-untyped-call]
    describer = GeminiDescriber(
        client, model="gemini-2.5-flash", prompt="Describe.", max_output_tokens=256,
        temperature=0.2, attempts=1, timeout=10,
    )  # fmt: skip
    description = await describer.describe(prepare(images.photo("chelsea.jpg")))
    await client.aio.aclose()
    assert "451x300" in (description.text or "")
    (request,) = gemini.requests
    assert request.api == "vertex"
    assert "/projects/my-project/locations/europe-west4/publishers/google/models/" in request.path
    assert request.bearer_present
    assert not request.api_key_present


async def test_api_key_mode_reaches_the_gemini_api_path(gemini_thread: Any, gemini: Any) -> None:
    env = {"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url}
    client = make_client(10, env)
    describer = GeminiDescriber(
        client, model="gemini-2.5-flash", prompt="Describe.", max_output_tokens=256,
        temperature=0.2, attempts=1, timeout=10,
    )  # fmt: skip
    await describer.describe(prepare(images.photo("chelsea.jpg")))
    await client.aio.aclose()
    (request,) = gemini.requests
    assert request.api == "gemini"
    assert request.path.startswith("/v1")
    assert "/models/gemini-2.5-flash:generateContent" in request.path
    assert request.api_key_present

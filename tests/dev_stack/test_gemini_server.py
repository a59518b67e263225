"""The offline Gemini stand-in, driven through the real, unmodified google-genai client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import google.oauth2.credentials
import pytest
from google import genai
from google.genai import errors, types

from captioner_dev import PHOTOS
from captioner_dev.gemini_server import (
    FaultRule,
    GeminiStub,
    GeminiStubThread,
    LatencyModel,
    ModelFamily,
    StubConfigError,
    image_tokens,
    image_tokens_for,
)

IMAGES = PHOTOS
CHELSEA = (IMAGES / "chelsea.jpg").read_bytes()
COFFEE = (IMAGES / "coffee.jpg").read_bytes()
MODEL = "gemini-2.5-flash"
PROMPT = "Describe this image in one sentence."
SRC = Path(__file__).resolve().parents[2] / "src"


def fingerprint(data: bytes) -> str:
    return f"[img:{hashlib.sha256(data).hexdigest()[:8]}]"


def image_contents(data: bytes, prompt: str = PROMPT) -> list[Any]:
    return [types.Part.from_bytes(data=data, mime_type="image/jpeg"), prompt]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_describes_a_real_photo(stub: GeminiStub, client: genai.Client) -> None:
    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(CHELSEA)
    )

    text = response.text
    assert text is not None
    assert text.startswith("Offline stand-in caption: a landscape 451x300 JPEG image in colour")
    assert text.endswith(fingerprint(CHELSEA))
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == 258 + math.ceil(len(PROMPT) / 4)
    assert usage.candidates_token_count == math.ceil(len(text) / 4)
    # Sent nothing about thinking, 2.5 Flash thinks at its dynamic default.
    assert usage.thoughts_token_count == 640
    assert usage.total_token_count == (
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    )
    assert [(d.modality, d.token_count) for d in usage.prompt_tokens_details or []] == [
        (types.MediaModality.TEXT, math.ceil(len(PROMPT) / 4)),
        (types.MediaModality.IMAGE, 258),
    ]
    assert response.model_version == MODEL
    [record] = stub.requests
    assert record.path == f"/v1/models/{MODEL}:generateContent"
    assert record.api == "gemini"
    assert record.api_key_present
    assert record.prompt == PROMPT
    assert record.status == 200
    assert [(i.mime_type, i.size, i.sha256) for i in record.images] == [
        ("image/jpeg", len(CHELSEA), hashlib.sha256(CHELSEA).hexdigest())
    ]
    assert stub.calls == 1


def test_image_tokens_follow_gemini_2_tiling() -> None:
    assert image_tokens(384, 384) == 258
    assert image_tokens(385, 10) == 258
    assert image_tokens(1024, 768) == 2 * 258
    assert image_tokens(1600, 1600) == 9 * 258


@pytest.mark.parametrize(
    ("api_version", "model"),
    [("v1", MODEL), ("v1beta", MODEL), ("v1beta", f"models/{MODEL}")],
)
async def test_api_versions_and_model_spellings(
    stub: GeminiStub, api_version: str, model: str
) -> None:
    options = types.HttpOptions(base_url=stub.base_url, api_version=api_version)
    async with genai.Client(api_key="test", http_options=options).aio as aio:
        response = await aio.models.generate_content(model=model, contents="hello")

    assert response.text is not None
    assert "text prompt is 5 characters long" in response.text
    [record] = stub.requests
    assert record.path == f"/{api_version}/models/{MODEL}:generateContent"
    assert record.model == MODEL


async def test_base_url_from_environment(stub: GeminiStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", stub.base_url)
    async with genai.Client(api_key="test").aio as aio:
        response = await aio.models.generate_content(model=MODEL, contents=image_contents(COFFEE))

    assert response.text is not None
    assert response.text.endswith(fingerprint(COFFEE))


async def test_vertex_with_project_and_credentials(stub: GeminiStub) -> None:
    # Offline, Vertex mode works when project and location are passed explicitly (with a
    # custom base_url the SDK then skips ADC discovery) together with ready-made OAuth
    # credentials: a token and no expiry means the SDK never tries to refresh it.
    vertex = genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=google.oauth2.credentials.Credentials(token="fake"),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(base_url=stub.base_url, headers={"x-test": "1"}),
    )
    async with vertex.aio as aio:
        response = await aio.models.generate_content(model=MODEL, contents=image_contents(CHELSEA))

    assert response.text is not None
    assert response.text.endswith(fingerprint(CHELSEA))
    [record] = stub.requests
    assert record.path == (
        f"/v1beta1/projects/p/locations/us-central1/publishers/google/models/{MODEL}"
        ":generateContent"
    )
    assert record.api == "vertex"
    assert record.bearer_present
    assert not record.api_key_present


async def test_vertex_express_mode_with_api_key(stub: GeminiStub) -> None:
    options = types.HttpOptions(base_url=stub.base_url)
    async with genai.Client(vertexai=True, api_key="k", http_options=options).aio as aio:
        response = await aio.models.generate_content(model=MODEL, contents="hi")

    assert response.text is not None
    [record] = stub.requests
    assert record.path == f"/v1beta1/publishers/google/models/{MODEL}:generateContent"
    assert record.api == "vertex"
    assert record.api_key_present


async def test_429_carries_retry_info(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("429", count=1, retry_delay=7)

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")

    error = caught.value
    assert error.code == 429
    assert error.status == "RESOURCE_EXHAUSTED"
    quota, help_, retry = error.details["error"]["details"]
    assert quota["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"
    [violation] = quota["violations"]
    assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    assert violation["quotaDimensions"]["model"] == MODEL
    assert help_["@type"] == "type.googleapis.com/google.rpc.Help"
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    # count=1: the rule is used up and the next call succeeds.
    assert stub.faults == []
    response = await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert response.text is not None
    assert [(r.status, r.fault) for r in stub.requests] == [(429, "429"), (200, None)]


@pytest.mark.parametrize(
    ("kind", "code", "status"), [("500", 500, "INTERNAL"), ("503", 503, "UNAVAILABLE")]
)
async def test_server_errors(
    stub: GeminiStub, client: genai.Client, kind: Any, code: int, status: str
) -> None:
    stub.add_fault(kind)

    for _ in range(2):  # count=None: the fault keeps firing
        with pytest.raises(errors.ServerError) as caught:
            await client.aio.models.generate_content(model=MODEL, contents="hi")
        assert (caught.value.code, caught.value.status) == (code, status)


async def test_blocked_prompt(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("safety_prompt", count=1)

    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(CHELSEA)
    )

    assert response.text is None
    assert response.prompt_feedback is not None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY


async def test_blocked_candidate(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("safety_candidate", count=1)

    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(CHELSEA)
    )

    assert response.text is None
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_empty_candidate(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("empty", count=1)

    response = await client.aio.models.generate_content(model=MODEL, contents="hi")

    assert response.text is None
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.STOP


async def test_custom_text_is_returned_verbatim(stub: GeminiStub, client: genai.Client) -> None:
    odd = "line one\x00\x07\nline two \u202e" + "x" * 5000
    stub.add_fault("custom_text", text=odd, count=1)

    response = await client.aio.models.generate_content(model=MODEL, contents="hi")

    assert response.text == odd


async def test_invalid_argument_fault(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("invalid_argument", count=1)

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")

    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")


async def test_fault_can_target_one_image(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("500", match=fingerprint(COFFEE))

    ok = await client.aio.models.generate_content(model=MODEL, contents=image_contents(CHELSEA))
    with pytest.raises(errors.ServerError):
        await client.aio.models.generate_content(model=MODEL, contents=image_contents(COFFEE))

    assert ok.text is not None
    assert ok.text.endswith(fingerprint(CHELSEA))
    assert [r.status for r in stub.requests] == [200, 500]


async def test_fault_can_target_prompt_text(stub: GeminiStub, client: genai.Client) -> None:
    stub.add_fault("503", match="poison", count=1)

    await client.aio.models.generate_content(model=MODEL, contents="harmless")
    with pytest.raises(errors.ServerError):
        await client.aio.models.generate_content(model=MODEL, contents="a POISON prompt")


async def test_undecodable_image_is_rejected(stub: GeminiStub, client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(
            model=MODEL, contents=image_contents(CHELSEA[: len(CHELSEA) // 3])
        )

    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message is not None
    assert caught.value.message.startswith("Unable to process input image")


async def test_response_schema_gets_matching_json(stub: GeminiStub, client: genai.Client) -> None:
    schema = types.Schema(
        type=types.Type.OBJECT,
        properties={
            "caption": types.Schema(type=types.Type.STRING),
            "alt_text": types.Schema(type=types.Type.STRING),
            "tags": types.Schema(
                type=types.Type.ARRAY, items=types.Schema(type=types.Type.STRING), max_items=4
            ),
            "captions": types.Schema(
                type=types.Type.OBJECT,
                properties={
                    lang: types.Schema(type=types.Type.STRING) for lang in ("en", "de", "ja")
                },
            ),
            "width": types.Schema(type=types.Type.INTEGER),
        },
        required=["caption", "alt_text", "tags", "captions"],
    )
    config = types.GenerateContentConfig(
        response_mime_type="application/json", response_schema=schema
    )

    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(CHELSEA), config=config
    )

    assert response.text is not None
    data = json.loads(response.text)
    assert set(data) == {"caption", "alt_text", "tags", "captions", "width"}
    assert data["caption"].endswith(fingerprint(CHELSEA))
    assert "451x300" in data["caption"]
    assert len(data["alt_text"]) < len(data["caption"])
    assert 1 <= len(data["tags"]) <= 4
    assert all(tag == tag.lower() for tag in data["tags"])
    assert "landscape" in data["tags"]
    assert data["captions"]["en"] == data["caption"]
    assert data["captions"]["de"] == "[de] " + data["caption"]
    assert data["captions"]["ja"] == "[ja] " + data["caption"]
    assert data["width"] == 451
    assert stub.requests[0].generation_config["responseMimeType"] == "application/json"


async def test_response_json_schema_gets_matching_json(client: genai.Client) -> None:
    json_schema = {
        "type": "object",
        "properties": {
            "alt": {"type": "string", "maxLength": 60},
            "labels": {"type": "array", "items": {"$ref": "#/$defs/label"}, "minItems": 2},
            "note": {"type": ["string", "null"]},
        },
        "required": ["alt", "labels"],
        "$defs": {"label": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    config = types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=json_schema
    )

    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(COFFEE), config=config
    )

    assert response.text is not None
    data = json.loads(response.text)
    assert len(data["alt"]) <= 60
    assert len(data["labels"]) == 2
    assert all(isinstance(label["name"], str) for label in data["labels"])
    assert isinstance(data["note"], str)


async def test_max_output_tokens_truncates(client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        max_output_tokens=5, thinking_config=types.ThinkingConfig(thinking_budget=0)
    )

    response = await client.aio.models.generate_content(
        model=MODEL, contents=image_contents(CHELSEA), config=config
    )

    assert response.text is not None
    assert len(response.text) == 20
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


async def test_quota_allows_a_burst_then_429s(stub: GeminiStub, client: genai.Client) -> None:
    stub.configure(quota_rps=3)

    results = await asyncio.gather(
        *(client.aio.models.generate_content(model=MODEL, contents="hi") for _ in range(6)),
        return_exceptions=True,
    )

    assert sum(isinstance(r, types.GenerateContentResponse) for r in results) == 3
    rejected = [r for r in results if isinstance(r, errors.ClientError)]
    assert len(rejected) == 3
    for error in rejected:
        assert error.code == 429
        *_, detail = error.details["error"]["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
        assert re.fullmatch(r"0\.\d00s|1s", detail["retryDelay"])
    assert sorted(r.fault or "" for r in stub.requests) == ["", "", "", "quota", "quota", "quota"]
    await asyncio.sleep(0.4)  # one token refills at 3 rps
    assert (await client.aio.models.generate_content(model=MODEL, contents="hi")).text


def test_latency_model_is_seeded_and_long_tailed() -> None:
    model = LatencyModel(median=1.2, sigma=0.6, seed=1, cap=8.0)
    samples = model.samples(4000)

    assert samples[:50] == LatencyModel(median=1.2, sigma=0.6, seed=1, cap=8.0).samples(50)
    assert samples[:50] != LatencyModel(median=1.2, sigma=0.6, seed=2).samples(50)
    ordered = sorted(samples)
    assert 1.1 < ordered[len(ordered) // 2] < 1.3
    assert ordered[int(len(ordered) * 0.99)] > 4.0
    assert max(samples) <= 8.0


async def test_latency_is_applied_in_arrival_order(stub: GeminiStub, client: genai.Client) -> None:
    model = LatencyModel(median=0.03, sigma=0.5, seed=42, cap=0.1)
    stub.configure(latency=model)

    for _ in range(4):
        started = time.monotonic()
        await client.aio.models.generate_content(model=MODEL, contents="hi")
        elapsed = time.monotonic() - started
        assert elapsed >= stub.requests[-1].latency

    assert [r.latency for r in stub.requests] == model.samples(4)


async def test_fixed_latency(stub: GeminiStub, client: genai.Client) -> None:
    stub.latency = 0.2

    started = time.monotonic()
    await client.aio.models.generate_content(model=MODEL, contents="hi")

    assert time.monotonic() - started >= 0.2


async def test_hang_hits_the_client_timeout_and_stop_is_prompt() -> None:
    stub = await GeminiStub().start()
    stub.add_fault("hang", count=1)
    options = types.HttpOptions(base_url=stub.base_url, timeout=500)
    async with genai.Client(api_key="test", http_options=options).aio as aio:
        # With aiohttp installed the SDK surfaces a timeout as the builtin TimeoutError.
        with pytest.raises(TimeoutError):
            await aio.models.generate_content(model=MODEL, contents="hi")

    started = time.monotonic()
    await stub.stop()
    assert time.monotonic() - started < 2.0
    [record] = stub.requests
    assert record.fault == "hang"


async def test_malformed_requests_get_gemini_errors(
    stub: GeminiStub, http: aiohttp.ClientSession
) -> None:
    url = f"{stub.base_url}/v1beta/models/{MODEL}:generateContent"
    bad_bodies: list[Any] = [
        b"{not json",
        {"nothing": "here"},
        {"contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "@@@"}}]}]},
        {"contents": [{"parts": []}]},
    ]
    for body in bad_bodies:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.post(url, **kwargs) as response:
            assert response.status == 400
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
            assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")

    async with http.get(f"{stub.base_url}/v1/nowhere") as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"


async def test_accepts_snake_case_and_standard_base64(
    stub: GeminiStub, http: aiohttp.ClientSession
) -> None:
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {
                        "inline_data": {
                            "mime_type": "image/jpeg",
                            # Standard alphabet, padding stripped: both must still decode.
                            "data": base64.b64encode(CHELSEA).decode().rstrip("="),
                        }
                    },
                    {"text": "caption"},
                ],
            }
        ],
        "generation_config": {"max_output_tokens": 1000},
    }
    url = f"{stub.base_url}/v1beta/models/{MODEL}:generateContent"
    async with http.post(url, json=body, headers={"x-goog-api-key": "k"}) as response:
        assert response.status == 200
        data = await response.json()

    assert data["candidates"][0]["content"]["parts"][0]["text"].endswith(fingerprint(CHELSEA))
    assert stub.requests[0].images[0].sha256 == hashlib.sha256(CHELSEA).hexdigest()


async def test_http_control_endpoints(
    stub: GeminiStub, client: genai.Client, http: aiohttp.ClientSession
) -> None:
    base = stub.base_url
    async with http.get(f"{base}/_stub/health") as response:
        assert await response.json() == {"status": "ok", "calls": 0}

    config = {
        "latency": {"median": 0.01, "sigma": 0.1, "seed": 3, "cap": 0.05},
        "quota_rps": 100,
        "faults": [{"kind": "429", "count": 1, "retry_delay": 2.5}],
    }
    async with http.post(f"{base}/_stub/config", json=config) as response:
        assert response.status == 200
        applied = await response.json()
    assert applied["faults"] == [
        {"kind": "429", "count": 1, "match": None, "retry_delay": 2.5, "text": None}
    ]
    assert stub.quota_rps == 100
    assert stub.latency == LatencyModel(median=0.01, sigma=0.1, seed=3, cap=0.05)

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert caught.value.details["error"]["details"][-1]["retryDelay"] == "2.500s"
    await client.aio.models.generate_content(model=MODEL, contents=image_contents(CHELSEA))

    async with http.get(f"{base}/_stub/requests") as response:
        records = await response.json()
    assert [r["status"] for r in records] == [429, 200]
    assert records[1]["images"][0]["fingerprint"] == fingerprint(CHELSEA)[5:-1]

    async with http.post(f"{base}/_stub/config", json={"faults": [{"kind": "bogus"}]}) as response:
        assert response.status == 400

    async with http.post(f"{base}/_stub/reset") as response:
        assert response.status == 200
    assert stub.requests == []
    assert stub.config_json() == {
        "latency": None,
        "quota_rps": None,
        "quota_shape": "bucket",
        "quota_tpm": None,
        "faults": [],
        "bad_key_prefix": "bad",
    }


def test_fault_rule_json_round_trip() -> None:
    rule = FaultRule.from_json({"kind": "429", "count": 2, "match": "abc", "retryDelay": "7s"})
    assert rule == FaultRule("429", count=2, match="abc", retry_delay=7.0)
    assert FaultRule.from_json(rule.to_json()) == rule
    with pytest.raises(StubConfigError):
        FaultRule.from_json({"kind": "418"})
    with pytest.raises(StubConfigError):
        FaultRule("custom_text")


@pytest.fixture
def threaded_stub() -> Iterator[GeminiStubThread]:
    with GeminiStub().start_in_thread() as running:
        yield running


def test_thread_helper_serves_the_sync_client(threaded_stub: GeminiStubThread) -> None:
    threaded_stub.stub.add_fault("503", count=1)
    gemini = genai.Client(
        api_key="test", http_options=types.HttpOptions(base_url=threaded_stub.base_url)
    )
    with pytest.raises(errors.ServerError):
        gemini.models.generate_content(model=MODEL, contents="hi")
    response = gemini.models.generate_content(model=MODEL, contents=image_contents(CHELSEA))
    gemini.close()

    assert response.text is not None
    assert response.text.endswith(fingerprint(CHELSEA))
    assert threaded_stub.calls == 2


def test_cli_prints_ready_and_serves() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [
        sys.executable,
        "-m",
        "captioner_dev.gemini_server",
        "--port",
        "0",
        "--latency-median",
        "0.01",
        "--seed",
        "1",
        "--quota-rps",
        "50",
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert re.fullmatch(r"READY http://127\.0\.0\.1:\d+", line), line
            base_url = line.split()[1]
            gemini = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=base_url))
            response = gemini.models.generate_content(model=MODEL, contents=image_contents(COFFEE))
            gemini.close()
            assert response.text is not None
            assert response.text.endswith(fingerprint(COFFEE))
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0


# --- The token model per family (issue 12) --------------------------------------------------


@pytest.mark.parametrize(
    ("model", "thoughts"),
    [
        ("gemini-2.5-flash", 640),  # thinks by default (dynamic budget)
        ("gemini-2.5-flash-lite", None),  # does not think unless asked
        ("gemini-2.5-pro", 960),
        ("gemini-3-flash-preview", 960),  # level HIGH by default
        ("gemini-3-pro-preview", 1400),
        ("gemini-2.0-flash", None),  # takes no thinking at all
    ],
)
async def test_default_thinking_per_family(
    stub: GeminiStub, client: genai.Client, model: str, thoughts: int | None
) -> None:
    response = await client.aio.models.generate_content(
        model=model, contents=image_contents(COFFEE)
    )

    assert response.text is not None
    assert response.usage_metadata is not None
    assert response.usage_metadata.thoughts_token_count == thoughts
    assert stub.requests[0].thoughts_tokens == (thoughts or 0)


@pytest.mark.parametrize(
    ("model", "thinking", "thoughts"),
    [
        ("gemini-2.5-flash", types.ThinkingConfig(thinking_budget=0), 0),
        ("gemini-2.5-flash-lite", types.ThinkingConfig(thinking_budget=0), 0),
        ("gemini-2.5-flash-lite", types.ThinkingConfig(thinking_budget=-1), 384),
        ("gemini-2.5-flash", types.ThinkingConfig(thinking_budget=512), 512),
        ("gemini-2.5-pro", types.ThinkingConfig(thinking_budget=128), 128),
        (
            "gemini-3-flash-preview",
            types.ThinkingConfig(thinking_level=types.ThinkingLevel.MINIMAL),
            0,
        ),
        (
            "gemini-3-flash-preview",
            types.ThinkingConfig(thinking_level=types.ThinkingLevel.LOW),
            160,
        ),
        ("gemini-3-pro-preview", types.ThinkingConfig(thinking_level=types.ThinkingLevel.LOW), 180),
        ("gemini-3-pro-preview", types.ThinkingConfig(thinking_budget=256), 256),
    ],
)
async def test_thinking_settings_are_honoured(
    client: genai.Client, model: str, thinking: types.ThinkingConfig, thoughts: int
) -> None:
    config = types.GenerateContentConfig(thinking_config=thinking)
    response = await client.aio.models.generate_content(
        model=model, contents=image_contents(COFFEE), config=config
    )

    assert response.usage_metadata is not None
    assert (response.usage_metadata.thoughts_token_count or 0) == thoughts


@pytest.mark.parametrize(
    ("model", "thinking", "message"),
    [
        (
            "gemini-2.5-pro",
            types.ThinkingConfig(thinking_budget=0),
            "Budget 0 is invalid. This model only works in thinking mode.",
        ),
        (
            "gemini-2.5-flash",
            types.ThinkingConfig(thinking_level=types.ThinkingLevel.LOW),
            "Thinking level is not supported for this model.",
        ),
        (
            "gemini-3-pro-preview",
            types.ThinkingConfig(thinking_level=types.ThinkingLevel.MINIMAL),
            "Thinking level MINIMAL is not supported for this model. "
            "Please retry with other thinking level.",
        ),
        (
            "gemini-3-flash-preview",
            types.ThinkingConfig(thinking_budget=0, thinking_level=types.ThinkingLevel.LOW),
            "thinking_budget and thinking_level cannot both be set: use one or the other.",
        ),
        (
            "gemini-2.5-flash",
            types.ThinkingConfig(thinking_budget=50_000),
            "The thinking budget (50000) is invalid.",
        ),
        (
            "gemini-2.0-flash",
            types.ThinkingConfig(thinking_budget=1024),
            "Thinking is not enabled for models/gemini-2.0-flash",
        ),
    ],
)
async def test_thinking_settings_a_model_refuses_are_a_400(
    stub: GeminiStub, client: genai.Client, model: str, thinking: types.ThinkingConfig, message: str
) -> None:
    config = types.GenerateContentConfig(thinking_config=thinking)

    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=model, contents="hi", config=config)

    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.message == message
    assert stub.requests[0].status == 400


async def test_thinking_that_uses_up_max_output_tokens_leaves_no_text(
    stub: GeminiStub, client: genai.Client
) -> None:
    # 2.5 Pro cannot stop thinking: at its minimum budget and a cap of 100, nothing is left.
    config = types.GenerateContentConfig(
        max_output_tokens=100, thinking_config=types.ThinkingConfig(thinking_budget=128)
    )

    response = await client.aio.models.generate_content(
        model="gemini-2.5-pro", contents=image_contents(CHELSEA), config=config
    )

    assert response.text is None
    assert response.candidates is not None
    candidate = response.candidates[0]
    assert candidate.finish_reason == types.FinishReason.MAX_TOKENS
    assert candidate.content is not None
    assert candidate.content.role == "model"
    assert candidate.content.parts is None
    usage = response.usage_metadata
    assert usage is not None
    assert usage.thoughts_token_count == 100
    assert usage.candidates_token_count is None
    assert usage.total_token_count == (usage.prompt_token_count or 0) + 100
    [record] = stub.requests
    assert (record.finish_reason, record.thoughts_tokens, record.output_tokens) == (
        "MAX_TOKENS",
        100,
        0,
    )


async def test_thinking_shares_the_cap_with_the_answer(client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        max_output_tokens=140, thinking_config=types.ThinkingConfig(thinking_budget=128)
    )

    response = await client.aio.models.generate_content(
        model="gemini-2.5-pro", contents=image_contents(CHELSEA), config=config
    )

    assert response.text is not None
    assert len(response.text) == (140 - 128) * 4  # what the thoughts left, cut off
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


BIG = Path(IMAGES / "astronaut.jpg").read_bytes()


@pytest.mark.parametrize(
    ("model", "resolution", "tokens"),
    [
        ("gemini-3-flash-preview", None, 1120),  # unspecified: HIGH for images
        ("gemini-3-flash-preview", types.MediaResolution.MEDIA_RESOLUTION_LOW, 280),
        ("gemini-3-pro-preview", types.MediaResolution.MEDIA_RESOLUTION_MEDIUM, 560),
        ("gemini-3-pro-preview", types.MediaResolution.MEDIA_RESOLUTION_HIGH, 1120),
        ("gemini-2.5-flash", types.MediaResolution.MEDIA_RESOLUTION_LOW, 64),
        ("gemini-2.5-flash", None, None),  # pixels decide: 768 px tiles
    ],
)
async def test_image_tokens_per_family_and_media_resolution(
    stub: GeminiStub,
    client: genai.Client,
    model: str,
    resolution: types.MediaResolution | None,
    tokens: int | None,
) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(BIG)) as im:
        width, height = im.size
    expected = tokens if tokens is not None else image_tokens(width, height)
    config = types.GenerateContentConfig(
        media_resolution=resolution, thinking_config=None, max_output_tokens=4000
    )

    for data in (BIG, COFFEE):  # Gemini 3 counts the same whatever the pixels
        response = await client.aio.models.generate_content(
            model=model, contents=image_contents(data), config=config
        )
        usage = response.usage_metadata
        assert usage is not None
        image = {d.modality: d.token_count for d in usage.prompt_tokens_details or []}
        if data is BIG or ModelFamily.of(model).major >= 3 or resolution is not None:
            assert image[types.MediaModality.IMAGE] == expected
    assert stub.requests[0].image_tokens == expected


def test_image_tokens_for_documented_rules() -> None:
    assert image_tokens_for("gemini-2.5-flash", 768, 576) == 258
    assert image_tokens_for("gemini-2.5-flash", 4000, 3000) == 6 * 4 * 258
    assert image_tokens_for("gemini-3-flash-preview", 4000, 3000) == 1120
    assert image_tokens_for("gemini-3-flash-preview", 40, 30, "MEDIA_RESOLUTION_LOW") == 280
    assert (
        image_tokens_for("models/gemini-3-pro-preview", 1, 1, "MEDIA_RESOLUTION_ULTRA_HIGH") == 2240
    )


async def test_count_tokens_uses_the_family_rules(client: genai.Client) -> None:
    counted = await client.aio.models.count_tokens(
        model="gemini-3-flash-preview", contents=image_contents(CHELSEA)
    )
    assert counted.total_tokens == 1120 + math.ceil(len(PROMPT) / 4)


# --- Error shapes (issue 12) ----------------------------------------------------------------


async def test_a_bad_api_key_gets_the_real_400(stub: GeminiStub) -> None:
    options = types.HttpOptions(base_url=stub.base_url)
    async with genai.Client(api_key="bad-key-123", http_options=options).aio as aio:
        with pytest.raises(errors.ClientError) as caught:
            await aio.models.generate_content(model=MODEL, contents=image_contents(COFFEE))

    error = caught.value
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert error.message == "API key not valid. Please pass a valid API key."
    info = error.details["error"]["details"][0]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    assert stub.requests[0].fault == "bad_key"
    stub.configure(bad_key_prefix=None)
    async with genai.Client(api_key="bad-key-123", http_options=options).aio as aio:
        assert (await aio.models.generate_content(model=MODEL, contents="hi")).text


@pytest.mark.parametrize(
    ("kind", "code", "status", "message", "detail_types"),
    [
        (
            "bad_key",
            400,
            "INVALID_ARGUMENT",
            "API key not valid",
            ["ErrorInfo", "LocalizedMessage"],
        ),
        ("failed_precondition", 400, "FAILED_PRECONDITION", "User location is not supported", []),
        (
            "429",
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota",
            ["QuotaFailure", "Help", "RetryInfo"],
        ),
        (
            "429_per_day",
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota",
            ["QuotaFailure", "Help", "RetryInfo"],
        ),
        (
            "429_vertex",
            429,
            "RESOURCE_EXHAUSTED",
            "Resource exhausted. Please try again later.",
            [],
        ),
        ("499", 499, "CANCELLED", "The operation was cancelled.", []),
        ("500", 500, "INTERNAL", "An internal error has occurred.", []),
        ("503", 503, "UNAVAILABLE", "The model is overloaded. Please try again later.", []),
        ("504", 504, "DEADLINE_EXCEEDED", "Deadline expired", []),
    ],
)
async def test_error_faults_have_the_real_shapes(
    stub: GeminiStub,
    http: aiohttp.ClientSession,
    kind: Any,
    code: int,
    status: str,
    message: str,
    detail_types: list[str],
) -> None:
    stub.add_fault(kind, count=1, retry_delay=None if kind == "429_vertex" else 12)
    url = f"{stub.base_url}/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}

    async with http.post(url, json=body, headers={"x-goog-api-key": "k"}) as response:
        assert response.status == code
        assert response.content_type == "application/json"
        error = (await response.json())["error"]

    assert (error["code"], error["status"]) == (code, status)
    assert error["message"].startswith(message)
    kinds = [d["@type"].rsplit(".", 1)[-1] for d in error.get("details", [])]
    assert kinds == detail_types
    if kind == "429_per_day":
        quota = error["details"][0]["violations"][0]["quotaId"]
        assert quota == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_cli_listens_on_the_port_and_host_asked_for() -> None:
    # Issue 11.10: --port and --host were ignored (the server took a random port).
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [
        sys.executable,
        "-m",
        "captioner_dev.gemini_server",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line == f"READY http://127.0.0.1:{port}"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stub/health", timeout=5) as r:
                assert json.loads(r.read()) == {"status": "ok", "calls": 0}
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0

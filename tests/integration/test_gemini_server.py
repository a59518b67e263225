"""The offline Gemini stand-in, driven through the real, unmodified google-genai client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
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
    StubConfigError,
    image_tokens,
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
async def stub() -> AsyncIterator[GeminiStub]:
    async with GeminiStub() as server:
        yield server


@pytest.fixture
async def client(stub: GeminiStub) -> AsyncIterator[genai.Client]:
    gemini = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=stub.base_url))
    yield gemini
    await gemini.aio.aclose()


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
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
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
    assert error.details["error"]["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    ]
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
    config = types.GenerateContentConfig(max_output_tokens=5)

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
        [detail] = error.details["error"]["details"]
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
    assert caught.value.details["error"]["details"][0]["retryDelay"] == "2.500s"
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
    assert stub.config_json() == {"latency": None, "quota_rps": None, "faults": []}


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

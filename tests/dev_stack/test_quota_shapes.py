"""The stand-in's quota shapes against the numbers of the documents they follow (see
captioner_dev/gemini_server/quota.py for the sources), first as pure quotas on a made-up
clock, then through HTTP as the real google-genai client and the describer's classifier see
them, and through the stand-in's command line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from captioner.adapters.gemini_errors import classify
from captioner.errors import TransientError
from captioner_dev import PHOTOS
from captioner_dev.gemini_server import GeminiStub
from captioner_dev.gemini_server.quota import (
    FixedWindow,
    QuotaShape,
    SlidingWindow,
    TokenBucket,
    make_quota,
)

MODEL = "gemini-2.5-flash"
CHELSEA = (PHOTOS / "chelsea.jpg").read_bytes()
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _passed(quota: Any, times: list[float], cost: float = 1.0) -> list[bool]:
    return [quota.take(t, cost) is None for t in times]


# -- the shapes, on a made-up clock -----------------------------------------------------------


def test_a_per_minute_limit_of_20_refuses_the_21st_request_within_the_minute() -> None:
    # https://ai.google.dev/gemini-api/docs/rate-limits: "if your RPM limit is 20, making 21
    # requests within a minute will result in an error".
    quota = make_quota(QuotaShape.MINUTE, now=0.0, rps=20 / 60)
    assert isinstance(quota, FixedWindow)
    assert _passed(quota, [i * 0.5 for i in range(20)]) == [True] * 20
    wait = quota.take(10.0)
    assert wait == pytest.approx(50.0)  # refused until the minute ends ...
    assert quota.retry_delay(wait) == 50.0  # ... and RetryInfo says so in whole seconds
    assert quota.take(59.9) is not None
    assert quota.take(60.0) is None  # the next minute starts with the whole quota


def test_a_minute_reached_at_15_s_refills_at_the_next_synchronized_minute_not_later() -> None:
    # https://docs.cloud.google.com/compute/api-quota: "if a project reaches a quota limit at
    # 10:00:15, the quota refills at the start of the next synchronized interval, such as
    # 10:01:00, rather than refilling immediately".
    start = 36_000.0  # 10:00:00
    quota = FixedWindow(100, start)
    assert _passed(quota, [start + 15.0] * 100) == [True] * 100  # a burst passes in full
    wait = quota.take(start + 15.0)
    assert wait == pytest.approx(45.0)
    assert quota.take(start + 59.0) is not None
    assert quota.take(start + 60.0) is None


def test_a_per_minute_retry_delay_names_whole_seconds_rounded_down() -> None:
    # "Please retry in 26.660853464s." came with retryDelay "26s" (OmniRoute#7961).
    quota = FixedWindow(1, 0.0)
    assert quota.retry_delay(26.660853464) == 26.0
    assert quota.retry_delay(0.3) == 1.0  # never "0s"


def test_tokens_per_minute_count_each_calls_input_tokens() -> None:
    # A TPM of 250,000 (the free tier's, RooCodeInc/Roo-Code#3883): 250,000 tokens pass in a
    # minute however they are split, and one token more does not.
    quota = make_quota(QuotaShape.TPM, now=0.0, tpm=250_000)
    assert quota is not None
    assert _passed(quota, [1.0] * 969, cost=258) == [True] * 968 + [False]  # 250,002 is over
    assert quota.take(1.0, 250_000 - 968 * 258) is None
    assert quota.take(2.0, 1) is not None
    assert quota.take(60.0, 250_000) is None


def test_vertex_throttles_a_second_level_spike_under_the_per_minute_threshold() -> None:
    # Standard PayGo Tier 1, Flash models: 2,000,000 TPM for the organisation
    # (https://docs.cloud.google.com/vertex-ai/generative-ai/docs/standard-paygo). A second
    # may hold a sixtieth of it, 33,333 tokens: 130 calls of 258 tokens at once is a spike,
    # refused although the minute's total would be 33,540, far below the threshold.
    tpm = 2_000_000
    quota = make_quota(QuotaShape.VERTEX, now=0.0, tpm=tpm)
    assert quota is not None
    burst = _passed(quota, [0.0] * 130, cost=258)
    assert burst.count(True) == 33_333 // 258
    assert burst.count(False) == 130 - 33_333 // 258
    # Spread evenly over the minute, 99 % of the threshold passes without a refusal.
    even = make_quota(QuotaShape.VERTEX, now=0.0, tpm=tpm)
    assert even is not None
    calls = int(0.99 * tpm / 258)
    assert all(_passed(even, [i * 60 / calls for i in range(calls)], cost=258))
    assert not QuotaShape.VERTEX.sends_retry_info


def test_a_sliding_second_refuses_the_burst_a_token_bucket_would_let_through() -> None:
    # 20 a second: both let 20 through at once; a second later the bucket holds 20 again
    # and lets a burst of 20 through, the window lets through only what left it.
    window = SlidingWindow(20, 1.0)
    bucket = TokenBucket(20, 0.0)
    for quota in (window, bucket):
        assert _passed(quota, [0.0] * 21) == [True] * 20 + [False]
    assert _passed(bucket, [0.5] * 11) == [True] * 10 + [False]
    assert _passed(window, [0.5] * 11) == [False] * 11
    wait = window.take(0.5)
    assert wait == pytest.approx(0.5)  # when the first of the 20 leaves the window
    assert window.retry_delay(wait) == 0.5
    assert window.take(1.0) is None


def test_every_shape_is_made_from_its_own_number() -> None:
    for shape in QuotaShape:
        rps, tpm = (None, 60_000.0) if shape.counts_tokens else (20.0, None)
        quota = make_quota(shape, now=0.0, rps=rps, tpm=tpm)
        assert quota is not None
        expected = 1_000.0 if shape.counts_tokens else 20.0
        assert quota.rate == pytest.approx(expected), shape
        # Without its number, no quota.
        assert make_quota(shape, now=0.0, rps=tpm, tpm=rps) is None


# -- over HTTP, as the real client sees it ----------------------------------------------------


def _image() -> list[Any]:
    return [types.Part.from_bytes(data=CHELSEA, mime_type="image/jpeg"), "Describe it."]


async def _calls(client: genai.Client, n: int) -> list[Any]:
    return await asyncio.gather(
        *(client.aio.models.generate_content(model=MODEL, contents=_image()) for _ in range(n)),
        return_exceptions=True,
    )


async def test_a_per_minute_quota_answers_the_gemini_apis_429_with_the_rest_of_the_minute(
    stub: GeminiStub, client: genai.Client, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{stub.base_url}/_stub/config", json={"quota_shape": "minute", "quota_rps": 0.05}
    ) as response:
        assert response.status == 200
        assert (await response.json())["quota_shape"] == "minute"
    results = await _calls(client, 4)  # 0.05/s is 3 requests a minute
    refused = [r for r in results if isinstance(r, errors.ClientError)]
    assert len(refused) == 1
    error = refused[0]
    assert error.code == 429
    failure, _help, retry = error.details["error"]["details"]
    assert failure["violations"][0]["quotaId"] == (
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    )
    assert failure["violations"][0]["quotaValue"] == "3"
    assert re.fullmatch(r"5[89]s", retry["retryDelay"])
    # The describer waits what it names, up to CAPTION_RETRY_MAX_WAIT.
    classified = classify(error, 120.0)
    assert isinstance(classified, TransientError)
    assert classified.retry_after in (58.0, 59.0)
    capped = classify(error, 30.0)
    assert isinstance(capped, TransientError)
    assert capped.retry_after == 30.0


async def test_a_tokens_per_minute_quota_charges_each_call_its_prompt_tokens(
    stub: GeminiStub, client: genai.Client
) -> None:
    counted = await client.aio.models.count_tokens(model=MODEL, contents=_image())
    cost = counted.total_tokens
    assert cost is not None
    assert cost > 258  # the image's tile and the prompt
    stub.configure(quota_shape="tpm", quota_tpm=3 * cost)
    results = await _calls(client, 4)
    assert sum(isinstance(r, types.GenerateContentResponse) for r in results) == 3
    (error,) = [r for r in results if isinstance(r, errors.ClientError)]
    failure, _help, retry = error.details["error"]["details"]
    violation = failure["violations"][0]
    assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
    assert violation["quotaMetric"].endswith("input_token_count")
    assert violation["quotaValue"] == str(3 * cost)
    assert retry["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    accepted = [r for r in stub.requests if r.status == 200]
    assert {r.prompt_tokens for r in accepted} == {cost}  # what was charged is what is billed


async def test_vertex_answers_a_spike_with_a_bare_429_the_describer_retries_without_a_delay(
    stub: GeminiStub, client: genai.Client
) -> None:
    counted = await client.aio.models.count_tokens(model=MODEL, contents=_image())
    assert counted.total_tokens is not None
    stub.configure(quota_shape="vertex", quota_tpm=60 * 2 * counted.total_tokens)
    results = await _calls(client, 3)  # two calls' tokens a second
    (error,) = [r for r in results if isinstance(r, errors.ClientError)]
    assert error.code == 429
    assert error.message is not None
    assert error.message.startswith("Resource exhausted. Please try again later.")
    assert not error.details["error"].get("details")  # no RetryInfo, nothing at all
    classified = classify(error)
    assert isinstance(classified, TransientError)
    assert classified.retry_after is None


async def test_a_sliding_second_quota_answers_with_the_time_until_a_call_leaves_the_window(
    stub: GeminiStub, client: genai.Client
) -> None:
    stub.configure(quota_shape="sliding-second", quota_rps=2)
    results = await _calls(client, 3)
    (error,) = [r for r in results if isinstance(r, errors.ClientError)]
    *_, retry = error.details["error"]["details"]
    assert re.fullmatch(r"(0\.\d00|1)s", retry["retryDelay"])
    await asyncio.sleep(1.0)
    assert all(isinstance(r, types.GenerateContentResponse) for r in await _calls(client, 2))


async def test_a_bad_shape_is_refused_with_the_shapes_named(
    stub: GeminiStub, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{stub.base_url}/_stub/config", json={"quota_shape": "hourly"}) as r:
        assert r.status == 400
        text = await r.text()
    for shape in QuotaShape:
        assert shape.value in text


def test_the_command_line_takes_a_quota_shape() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [
        sys.executable,
        "-m",
        "captioner_dev.gemini_server",
        "--port",
        "0",
        "--quota-shape",
        "vertex",
        "--quota-tpm",
        "60",  # one token a second: every image call is a spike
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            base_url = line.split()[1]
            gemini = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=base_url))
            first = gemini.models.generate_content(model=MODEL, contents=_image())
            assert first.text  # the first call of an empty window passes whatever it costs
            with pytest.raises(errors.ClientError) as caught:
                gemini.models.generate_content(model=MODEL, contents=_image())
            gemini.close()
            assert caught.value.code == 429
            assert not caught.value.details["error"].get("details")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0

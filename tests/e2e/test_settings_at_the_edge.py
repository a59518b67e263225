"""Settings and flags added this round, each through the edge a user calls (the CLI or
functions-framework), with a value a careless or hostile caller would pass."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from captioner_dev.functions import FunctionServer
from tests import images
from tests.e2e.test_cli import run_cli


def test_thinking_and_media_resolution_settings_reach_the_wire(
    stack_env: dict[str, str], gemini: Any
) -> None:
    env = {
        **stack_env,
        "CAPTION_MODEL": "gemini-3-flash-preview",
        "CAPTION_THINKING": "low",
        "CAPTION_MEDIA_RESOLUTION": "high",
    }
    completed = run_cli(env, "describe", str(images.PHOTOS / "chelsea.jpg"))
    assert completed.returncode == 0, completed.stderr
    (request,) = gemini.requests
    config = json.dumps(request.generation_config).lower()
    assert '"thinkinglevel": "low"' in config.replace("_", "")
    assert "media_resolution_high" in config


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAPTION_THINKING", "unlimited"),
        ("CAPTION_MEDIA_RESOLUTION", "ultra; rm -rf /"),
        ("CAPTION_HTTP_DEADLINE", "-5"),
        ("CAPTION_BATCH_PREFIX", "no-trailing-slash"),
        ("CAPTION_BATCH_APPLY_CONCURRENCY", "0"),
    ],
)
def test_a_bad_setting_value_is_refused_naming_the_variable(
    stack_env: dict[str, str], gemini: Any, variable: str, value: str
) -> None:
    completed = run_cli({**stack_env, variable: value}, "describe", str(images.PHOTOS))
    assert completed.returncode == 2
    assert variable in completed.stderr
    assert gemini.calls == 0


@pytest.mark.parametrize("limit", ["0", "-3", "ten"])
def test_a_limit_that_is_not_a_positive_number_is_a_usage_error(
    stack_env: dict[str, str], limit: str
) -> None:
    for command in (["backfill"], ["export"]):
        completed = run_cli(stack_env, *command, "gs://bucket/", "--limit", limit)
        assert completed.returncode == 2, completed.stderr
        assert "--limit" in completed.stderr


def test_export_limit_stops_after_that_many_images(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    for i in range(5):
        bucket.blob(f"lim/{i}.png").upload_from_string(
            images.encode(images.solid((20 + i, 20)), "PNG"), content_type="image/png"
        )
    completed = run_cli(stack_env, "export", f"gs://{bucket.name}/lim/", "--limit", "2")
    assert completed.returncode == 0, completed.stderr
    assert len(completed.stdout.splitlines()) == 2
    assert "exported 2 images" in completed.stderr


def test_http_deadline_answers_what_is_done_through_functions_framework(
    gcs: Any, gemini_thread: Any, gemini: Any, gcs_client: Any
) -> None:
    bucket = gcs_client.create_bucket("deadline-edge")
    for i in range(3):
        bucket.blob(f"slow/{i}.png").upload_from_string(
            images.encode(images.solid((30 + i, 20)), "PNG"), content_type="image/png"
        )
    gemini.configure(latency=5.0)  # every Gemini answer takes longer than the deadline
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_ALLOWED_BUCKETS": "deadline-edge",
        "CAPTION_HTTP_DEADLINE": "1",
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        answer = requests.post(
            server.url, json={"bucket": "deadline-edge", "prefix": "slow/"}, timeout=60
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["incomplete"].startswith("stopped after CAPTION_HTTP_DEADLINE=1s")
    assert body["totals"]["ok"] == 0
    # Nothing half-done was recorded on the objects.
    assert all("caption-status" not in (b.metadata or {}) for b in bucket.list_blobs())

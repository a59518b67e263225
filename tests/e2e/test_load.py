"""One instance, 200 upload events at once: every object gets its own caption, memory bounded."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests import images

EVENTS = 200
MEMORY_BOUND_MIB = 400


@pytest.fixture(scope="module")
def busy_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_MAX_CONCURRENCY": "16",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


@pytest.mark.slow
def test_two_hundred_concurrent_events_pair_every_caption_with_its_image(
    gcs: Any, bucket: Any, gemini: Any, busy_function: FunctionServer
) -> None:
    gemini.latency = 0.05
    expected: dict[str, str] = {}
    for i in range(EVENTS):
        # Distinct pixels, so each image has its own fingerprint at the stand-in.
        data = images.encode(images.solid((96, 64), (i, 255 - i, (7 * i) % 256)), "PNG")
        name = f"load/{i:03} é#?.png"
        bucket.blob(name).upload_from_string(data, content_type="image/png")
        expected[name] = hashlib.sha256(data).hexdigest()[:8]

    def deliver(name: str) -> int:
        url = f"{gcs.url}/storage/v1/b/{bucket.name}/o/{quote(name, safe='')}"
        headers, body = binary_event(requests.get(url, timeout=30).json())
        return requests.post(busy_function.url, headers=headers, data=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=EVENTS) as pool:
        statuses = list(pool.map(deliver, expected))

    assert statuses == [200] * EVENTS
    assert gemini.calls == EVENTS
    for name, fingerprint in expected.items():
        caption = bucket.get_blob(name).metadata["caption"]
        (tag,) = re.findall(r"\[img:([0-9a-f]{8})\]", caption)
        assert tag == fingerprint, f"{name} got the caption of another image"
    peak = busy_function.peak_rss_mib()
    print(f"\npeak RSS of the function process under {EVENTS} concurrent events: {peak:.0f} MiB")
    assert peak < MEMORY_BOUND_MIB

"""Issue 11 end to end: ``caption_http`` served by functions-framework never fetches an
internal address in URL mode, whatever the spelling and whichever hop, and never logs
or answers the credentials of a URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from captioner.adapters.urls import redact
from captioner_dev.functions import FunctionServer
from tests.webserver import CountingSite


@pytest.fixture(scope="module")
def http_function(gcs: Any, gemini_thread: Any, gateway: CountingSite) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_URL_ALLOWED_HOSTS": f"localhost:{gateway.port}",
        "CAPTION_URL_TIMEOUT": "3",
        "CAPTION_LOG_FORMAT": "json",
        "CAPTION_GEMINI_ATTEMPTS": "1",
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def hostile_urls(internal: int, gateway: int) -> dict[str, str]:
    """URL → the reason it must be refused with."""
    photo = "/photos/chelsea.jpg"

    def via_gateway(to: str) -> str:
        return f"http://localhost:{gateway}/raw-redirect?{urlencode({'to': to})}"

    return {
        f"http://１２７．０．０．１:{internal}{photo}?fullwidth": "blocked-address",
        f"http://127。0。0。1:{internal}{photo}?ideographic": "blocked-address",
        f"http://127｡0｡0｡1:{internal}{photo}?halfwidth": "blocked-address",
        f"http://①②⑦.⓪.⓪.①:{internal}{photo}?circled": "blocked-address",
        f"http://[::ffff:127.0.0.1]:{internal}{photo}?mapped": "blocked-address",
        f"http://[::127.0.0.1]:{internal}{photo}?compatible": "blocked-address",
        f"http://[64:ff9b::7f00:1]:{internal}{photo}?nat64": "blocked-address",
        f"http://0x7f.1:{internal}{photo}?hex": "blocked-address",
        f"http://user:pass@１２７．０．０．１:{internal}{photo}?creds": "bad-url",
        f"http://user:pass@localhost:{gateway}{photo}?creds-allowed": "bad-url",
        via_gateway(
            f"http://１２７．０．０．１:{internal}{photo}?hop-fullwidth"
        ): "blocked-address",
        via_gateway(f"http://[::ffff:127.0.0.1]:{internal}{photo}?hop-mapped"): "blocked-address",
        via_gateway(f"http://user:pass@localhost:{gateway}{photo}?hop-creds"): "bad-url",
    }


def post(server: FunctionServer, body: Any) -> requests.Response:
    return requests.post(
        server.url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def test_hostile_spellings_are_refused_and_the_internal_service_gets_no_request(
    http_function: FunctionServer, internal: CountingSite, gateway: CountingSite, gemini: Any
) -> None:
    cases = hostile_urls(internal.port, gateway.port)
    answer = post(http_function, {"urls": list(cases)})
    assert answer.status_code == 200
    results = {r["source"]: r for r in answer.json()["results"]}
    assert len(results) == len(cases)
    for url, reason in cases.items():
        result = results[redact(url)]
        assert (result["status"], result["reason"]) == ("error", reason), (url, result)
    assert internal.requests == []
    assert len([r for r in gateway.requests if r.startswith("/raw-redirect")]) == 3
    assert gemini.calls == 0


def test_credentials_in_a_url_appear_neither_in_the_logs_nor_in_the_answer(
    http_function: FunctionServer, internal: CountingSite, gateway: CountingSite
) -> None:
    cases = [u for u, why in hostile_urls(internal.port, gateway.port).items() if why == "bad-url"]
    answer = post(http_function, {"urls": cases})
    assert answer.status_code == 200
    assert "user:pass" not in answer.text
    assert "bad-url" in answer.text
    bad_port = post(http_function, {"urls": ["http://user:pass@example.com:99999/x.jpg"]})
    assert bad_port.status_code == 400  # a bad request is logged, too
    log = http_function.log_text()
    assert "bad-url" in log  # the refusals were logged ...
    assert "user:pass" not in log  # ... without the credentials


def test_the_allowed_first_hop_is_still_fetched_and_captioned(
    http_function: FunctionServer, gateway: CountingSite, gemini: Any
) -> None:
    url = f"http://localhost:{gateway.port}/photos/chelsea.jpg"
    answer = post(http_function, {"urls": [url]})
    (result,) = answer.json()["results"]
    assert result["status"] == "ok", result
    assert gemini.calls == 1

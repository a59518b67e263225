"""The stand-in's token endpoint and Vertex AI's bearer check (captioner_dev.gemini_server
.oauth): google-auth's own service-account flow gets a token from it, and Vertex AI routes
refuse a request without one, as the real service does."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import requests

from captioner_dev.credentials import write_service_account_key

GENERATE = (
    "/v1beta1/projects/p/locations/us-central1/publishers/google/models/"
    "gemini-2.5-flash:generateContent"
)
BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_google_auth_gets_a_token_from_a_key_whose_token_uri_is_the_stand_in(
    gemini: Any, tmp_path: Path
) -> None:
    import google.auth.transport.requests
    from google.oauth2 import service_account

    key = write_service_account_key(tmp_path, gemini.base_url + "/token")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
        str(key), scopes=["https://www.googleapis.com/auth/cloud-platform"]
    )
    credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
    assert credentials.token.startswith("ya29.stand-in-")
    answer = requests.post(
        gemini.base_url + GENERATE,
        json=BODY,
        headers={"Authorization": f"Bearer {credentials.token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    (record,) = gemini.requests
    assert record.bearer_present
    assert record.bearer_issued


def test_vertex_routes_refuse_a_request_without_a_bearer_token_with_401(gemini: Any) -> None:
    answer = requests.post(gemini.base_url + GENERATE, json=BODY, timeout=10)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["status"] == "UNAUTHENTICATED"
    assert "missing required authentication credential" in error["message"]
    jobs = requests.get(
        gemini.base_url + "/v1beta1/projects/p/locations/us-central1/batchPredictionJobs",
        timeout=10,
    )
    assert jobs.status_code == 401
    # The Gemini API takes a key, not a bearer: no 401 there.
    api_key = requests.post(
        gemini.base_url + "/v1beta/models/gemini-2.5-flash:generateContent",
        json=BODY, headers={"x-goog-api-key": "k"}, timeout=10,
    )  # fmt: skip
    assert api_key.status_code == 200
    # Any token is taken (IAM is not emulated), but is not counted as issued.
    placeholder = requests.post(
        gemini.base_url + GENERATE, json=BODY, headers={"Authorization": "Bearer local"},
        timeout=10,
    )  # fmt: skip
    assert placeholder.status_code == 200
    assert not gemini.requests[-1].bearer_issued


def test_the_token_endpoint_refuses_what_google_refuses(gemini: Any) -> None:
    url = gemini.base_url + "/token"
    wrong_grant = requests.post(url, data={"grant_type": "password"}, timeout=10)
    assert wrong_grant.status_code == 400
    assert wrong_grant.json()["error"] == "unsupported_grant_type"
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    for assertion in ("not-a-jwt", _jwt({"iss": "a", "exp": time.time() - 10, "aud": url})):
        refused = requests.post(url, data={"grant_type": grant, "assertion": assertion}, timeout=10)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_grant"
    good = _jwt({"iss": "a@b", "exp": time.time() + 60, "aud": url})
    issued = requests.post(url, data={"grant_type": grant, "assertion": good}, timeout=10)
    assert issued.status_code == 200
    assert issued.json()["token_type"] == "Bearer"

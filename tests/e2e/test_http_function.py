"""``caption_http`` served by functions-framework: each request form, safety, streaming."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner_dev.functions import FunctionServer
from tests import images
from tests.objects import upload
from tests.unit.test_edge_parsing_properties import BODIES, FORMS
from tests.webserver import ImageSite

ALLOWED = f"allowed-{uuid.uuid4().hex[:8]}"
# JSON texts with lone surrogates and huge integers, every form (tests/unit has the class).
HOSTILE_BODIES = st.one_of(FORMS, BODIES)


@pytest.fixture(scope="module")
def allowed_bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(ALLOWED)


@pytest.fixture(scope="module")
def http_function(gcs: Any, gemini_thread: Any, site: ImageSite) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_ALLOWED_BUCKETS": ALLOWED,
        "CAPTION_URL_ALLOWED_HOSTS": f"127.0.0.1:{site.port}",
        "CAPTION_URL_TIMEOUT": "3",
        "CAPTION_GEMINI_ATTEMPTS": "2",
        "CAPTION_RETRY_MAX_WAIT": "0.1",
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def post(server: FunctionServer, body: Any, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        server.url, data=data, headers={"Content-Type": "application/json", **headers}, timeout=60
    )


def test_objects_mode_captions_named_objects(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    upload(allowed_bucket, "o/cat #1.jpg", images.photo("chelsea.jpg"))
    upload(allowed_bucket, "o/notes.txt", b"hi", "text/plain")
    body = {
        "objects": [
            f"gs://{ALLOWED}/o/cat #1.jpg",
            f"gs://{ALLOWED}/o/notes.txt",
            f"gs://{ALLOWED}/o/missing.jpg",
        ]
    }
    answer = post(http_function, body)
    assert answer.status_code == 200, answer.text
    by_source = {r["source"]: r for r in answer.json()["results"]}
    assert by_source[f"gs://{ALLOWED}/o/cat #1.jpg"]["status"] == "ok"
    assert "451x300" in by_source[f"gs://{ALLOWED}/o/cat #1.jpg"]["caption"]
    assert by_source[f"gs://{ALLOWED}/o/notes.txt"]["reason"] == "not-an-image"
    assert by_source[f"gs://{ALLOWED}/o/missing.jpg"]["reason"] == "gone"
    assert answer.json()["totals"]["ok"] == 1
    assert allowed_bucket.get_blob("o/cat #1.jpg").metadata["caption-status"] == "ok"


def test_one_bad_avif_among_good_jpegs_answers_200_with_the_good_ones_captioned(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    # Pillow's AVIF plugin raised RuntimeError on this one, which turned the whole
    # answer into a 500 (issue 22).
    names = [f"mixed/{i}.jpg" for i in range(4)]
    for name, photo in zip(
        names, ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "camera.jpg"], strict=True
    ):
        upload(allowed_bucket, name, images.photo(photo))
    upload(allowed_bucket, "mixed/bad.avif", images.avif_without_image_item(), "image/avif")
    body = {"objects": [f"gs://{ALLOWED}/{name}" for name in [*names, "mixed/bad.avif"]]}
    answer = post(http_function, body)
    assert answer.status_code == 200, answer.text
    by_source = {r["source"]: r for r in answer.json()["results"]}
    assert [by_source[f"gs://{ALLOWED}/{name}"]["status"] for name in names] == ["ok"] * 4
    assert by_source[f"gs://{ALLOWED}/mixed/bad.avif"]["reason"] == "corrupt-image"
    assert allowed_bucket.get_blob("mixed/bad.avif").metadata["caption-status"] == (
        "error:corrupt-image"
    )
    assert gemini.calls == 4


def test_prefix_mode_backfills_then_skips_what_is_done(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    for i in range(5):
        upload(
            allowed_bucket,
            f"backfill/{i}.png",
            images.encode(images.solid((40 + i, 30)), "PNG"),
            "image/png",
        )
    upload(allowed_bucket, "backfill/readme.txt", b"x", "text/plain")

    dry = post(http_function, {"bucket": ALLOWED, "prefix": "backfill/", "dry_run": True})
    assert dry.json()["totals"]["would-caption"] == 5
    assert gemini.calls == 0

    limited = post(http_function, {"bucket": ALLOWED, "prefix": "backfill/", "limit": 2})
    assert limited.json()["totals"]["ok"] == 2

    rest = post(http_function, {"bucket": ALLOWED, "prefix": "backfill/"})
    assert rest.json()["totals"]["ok"] == 3
    assert gemini.calls == 5

    again = post(http_function, {"bucket": ALLOWED, "prefix": "backfill/"})
    assert again.json()["totals"]["ok"] == 0
    assert again.json()["totals"]["skipped"] == 6
    assert again.json()["totals"]["skipped_by_reason"] == {
        "already-captioned": 5,
        "not-an-image": 1,
    }
    assert gemini.calls == 5  # nothing described twice

    redo = post(http_function, {"bucket": ALLOWED, "prefix": "backfill/", "overwrite": True})
    assert redo.json()["totals"]["ok"] == 5


def test_urls_mode_returns_captions_and_writes_nothing(
    http_function: FunctionServer, site: ImageSite, gemini: Any
) -> None:
    urls = [site.url("/photos/coffee.jpg"), site.url("/photos/rocket.jpg"), site.url("/missing")]
    answer = post(http_function, {"urls": urls})
    assert answer.status_code == 200
    results = {r["source"]: r for r in answer.json()["results"]}
    assert "600x400" in results[urls[0]]["caption"]
    assert "640x427" in results[urls[1]]["caption"]
    assert results[urls[2]]["status"] == "error"
    assert results[urls[2]]["reason"] == "url-404"


@pytest.mark.parametrize(
    ("make_url", "reason"),
    [
        (lambda s: "http://127.0.0.1:9/x.jpg", "blocked-address"),
        (lambda s: "http://localhost:9/x.jpg", "blocked-address"),
        (lambda s: "http://[::1]:9/x.jpg", "blocked-address"),
        (lambda s: "http://169.254.169.254/computeMetadata/v1/", "blocked-address"),
        (lambda s: "http://10.0.0.1/x.jpg", "blocked-address"),
        (lambda s: "http://192.168.0.1/x.jpg", "blocked-address"),
        (lambda s: s.url("/redirect?to=http://127.0.0.1:9/secret"), "blocked-address"),
        (lambda s: s.url("/redirect?to=http://localhost:9/secret"), "blocked-address"),
        (lambda s: s.url("/redirect?to=http://169.254.169.254/"), "blocked-address"),
        (lambda s: s.url("/loop"), "too-many-redirects"),
        (lambda s: s.url("/huge"), "too-large"),
        (lambda s: s.url("/text"), "not-an-image"),
    ],
    ids=[
        "loopback-ip",
        "localhost-name",
        "ipv6-loopback",
        "metadata-server",
        "private-10",
        "private-192",
        "redirect-to-127",
        "redirect-to-localhost",
        "redirect-to-metadata",
        "redirect-loop",
        "huge",
        "not-an-image",
    ],
)
def test_url_mode_refuses_internal_and_oversized_targets(
    http_function: FunctionServer, site: ImageSite, gemini: Any, make_url: Any, reason: str
) -> None:
    answer = post(http_function, {"urls": [make_url(site)]})
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    assert result["status"] == "error"
    assert result["reason"] == reason
    assert gemini.calls == 0


def test_url_mode_time_is_capped(http_function: FunctionServer, site: ImageSite) -> None:
    answer = post(http_function, {"urls": [site.url("/slow")]})
    (result,) = answer.json()["results"]
    assert result["status"] == "retry"
    assert "longer than 3s" in result["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"objects": ["gs://someone-elses-bucket/x.jpg"]},
        {"objects": [f"gs://{ALLOWED}/a.jpg", "gs://other/b.jpg"]},
        {"bucket": "someone-elses-bucket", "prefix": ""},
    ],
)
def test_buckets_outside_the_allow_list_are_forbidden(
    http_function: FunctionServer, body: Any
) -> None:
    answer = post(http_function, body)
    assert answer.status_code == 403
    assert "CAPTION_ALLOWED_BUCKETS" in answer.json()["error"]["message"]


def test_results_stream_as_ndjson_when_asked(
    http_function: FunctionServer, allowed_bucket: Any
) -> None:
    for i in range(4):
        upload(allowed_bucket, f"stream/{i}.jpg", images.photo("chelsea.jpg"))
    with requests.post(
        http_function.url,
        data=json.dumps({"bucket": ALLOWED, "prefix": "stream/"}),
        headers={"Content-Type": "application/json", "Accept": "application/x-ndjson"},
        stream=True,
        timeout=60,
    ) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert [line["status"] for line in lines[:-1]] == ["ok"] * 4
    assert lines[-1]["totals"]["ok"] == 4


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[]", 400, "JSON object"),
        (b"null", 400, "JSON object"),
        (b"{}", 400, "exactly one of"),
        (b'{"objects": ["gs://a/b"], "urls": ["http://x"]}', 400, "exactly one of"),
        (b'{"objects": "gs://a/b"}', 400, "list of strings"),
        (b'{"objects": []}', 400, "empty"),
        (b'{"objects": ["s3://a/b"]}', 400, "gs://bucket/name"),
        (b'{"objects": ["gs://bucket-only"]}', 400, "name a bucket and an object"),
        (b'{"objects": ["gs://a/b"], "colour": 1}', 400, "unknown field"),
        (b'{"bucket": "b", "limit": "10"}', 400, "'limit' must be"),
        (b'{"bucket": "b", "limit": 0}', 400, "'limit' must be"),
        (b'{"bucket": "b", "dry_run": "yes"}', 400, "true or false"),
        (b'{"bucket": 7}', 400, "non-empty string"),
        (b'{"urls": ["ftp://x/y.jpg"]}', 400, "only http and https"),
        (b'{"urls": ["http://"]}', 400, "no host"),
        (b'{"urls": ["http://x:99999/"]}', 400, "not a valid URL"),
        (
            json.dumps({"objects": [f"gs://{ALLOWED}/{i}" for i in range(1001)]}).encode(),
            400,
            "at most 1000",
        ),
        (json.dumps({"urls": [f"http://x/{i}" for i in range(101)]}).encode(), 400, "at most 100"),
        (b"[" * 100000, 400, "nested too deeply"),
    ],
)
def test_bad_bodies_get_a_4xx_that_says_what_is_wrong(
    http_function: FunctionServer, body: bytes, status: int, message: str
) -> None:
    answer = post(http_function, body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]


def test_wrong_method_is_405(http_function: FunctionServer) -> None:
    answer = requests.get(http_function.url, timeout=10)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"


def test_wrong_content_type_is_415(http_function: FunctionServer) -> None:
    answer = requests.post(
        http_function.url, data="{}", headers={"Content-Type": "text/plain"}, timeout=10
    )
    assert answer.status_code == 415


def test_oversized_body_is_413(http_function: FunctionServer) -> None:
    answer = post(http_function, b" " * (1024 * 1024 + 1))
    assert answer.status_code == 413


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "objects": st.lists(
            st.text(max_size=40).map(lambda s: f"gs://{ALLOWED}/{s}") | json_values, max_size=3
        )
        | json_values,
        "bucket": st.sampled_from([ALLOWED, "other"]) | json_values,
        "prefix": st.text(max_size=20) | json_values,
        "limit": st.integers(-5, 200_000) | json_values,
        "overwrite": st.booleans() | json_values,
        "dry_run": st.just(True) | json_values,
        "urls": st.lists(
            st.sampled_from(["http://10.0.0.1/a", "ftp://x", "http://[::1]/"])
            | st.text(max_size=30),
            max_size=3,
        )
        | json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_values | request_like)
def test_no_request_body_can_cause_a_5xx(http_function: FunctionServer, body: Any) -> None:
    answer = post(http_function, body)
    assert answer.status_code < 500, (body, answer.text)
    assert answer.headers["content-type"].startswith("application/json")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200))
def test_no_raw_bytes_can_cause_a_5xx(http_function: FunctionServer, raw: bytes) -> None:
    assert post(http_function, raw).status_code < 500


@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson"])
def test_a_prefix_with_a_lone_surrogate_is_a_400_and_never_captions_the_bucket(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any, accept: str
) -> None:
    upload(allowed_bucket, "surrogate/keep.jpg", images.photo())
    raw = f'{{"bucket": "{ALLOWED}", "prefix": "surrogate/\\ud800"}}'.encode()
    answer = post(http_function, raw, Accept=accept)
    assert answer.status_code == 400
    assert "not valid Unicode" in answer.json()["error"]["message"]
    assert gemini.calls == 0
    assert not allowed_bucket.get_blob("surrogate/keep.jpg").metadata


def test_an_integer_of_thousands_of_digits_is_a_400(http_function: FunctionServer) -> None:
    raw = f'{{"bucket": "{ALLOWED}", "limit": {"9" * 5000}}}'.encode()
    answer = post(http_function, raw)
    assert answer.status_code == 400
    assert "cannot be read" in answer.json()["error"]["message"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=HOSTILE_BODIES)
def test_no_hostile_json_text_can_cause_a_5xx(http_function: FunctionServer, raw: str) -> None:
    answer = post(http_function, raw.encode("utf-8"))
    assert answer.status_code < 500, (raw, answer.text)


def test_if_stale_recaptions_what_an_older_model_wrote_and_only_that(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    for i in range(3):
        upload(
            allowed_bucket,
            f"stale/{i}.png",
            images.encode(images.solid((60 + i, 30)), "PNG"),
            "image/png",
        )
    first = post(http_function, {"bucket": ALLOWED, "prefix": "stale/"})
    assert first.json()["totals"]["ok"] == 3
    current_model = allowed_bucket.get_blob("stale/0.png").metadata["caption-model"]
    for name in ("stale/0.png", "stale/1.png"):  # as an older model left them
        blob = allowed_bucket.get_blob(name)
        blob.metadata = {**blob.metadata, "caption-model": "gemini-1.5-flash"}
        blob.patch()
    gemini.reset()

    answer = post(http_function, {"bucket": ALLOWED, "prefix": "stale/", "if_stale": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["totals"]["ok"] == 2
    assert answer.json()["totals"]["skipped"] == 1
    assert answer.json()["totals"]["skipped_by_reason"] == {"already-captioned": 1}
    assert gemini.calls == 2
    for name in ("stale/0.png", "stale/1.png"):
        assert allowed_bucket.get_blob(name).metadata["caption-model"] == current_model

"""Batch backfill (captioner.batch_jobs) with in-memory fakes of Cloud Storage and of
Vertex AI's jobs: what is submitted, how answers are written, and what is not."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from captioner.adapters.vertex_batch import NEEDS_VERTEX, VertexJobs, read_status, template_for
from captioner.batch_jobs import (
    LABEL,
    BatchFollowRequest,
    BatchLimits,
    BatchSubmitRequest,
    Manifest,
    RequestKey,
    ShardPlanner,
    Watermark,
    batch_cost,
    batch_mime_type,
)
from captioner.captions import CaptionSpec
from captioner.domain import ObjectInfo, Usage
from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.rules import RuleBook, parse_rules
from tests.batch_fakes import (
    BUCKET,
    SPEC,
    FakeVertex,
    ListedStorage,
    MemoryBlobs,
    answer,
    apply,
    photos,
    service,
)

# ---------------------------------------------------------------- pure parts


def test_request_key_round_trips_names_with_hashes_and_slashes() -> None:
    key = RequestKey("b", "a/b #1/c#d.jpg", 1764000000123456)
    assert key.text == "gs://b/a/b #1/c#d.jpg#1764000000123456"
    assert RequestKey.parse(key.text) == key
    for bad in ("b/a#1", "gs://b#1", "gs://b/a", "gs://b/a#x"):
        with pytest.raises(ValueError, match="not a request key"):
            RequestKey.parse(bad)


def test_shards_split_at_the_request_limit_and_the_byte_limit() -> None:
    by_count = ShardPlanner(BatchLimits(max_requests=3, max_bytes=10_000))
    starts = [by_count.add(10) for _ in range(7)]
    assert starts == [True, False, False, True, False, False, True]
    by_bytes = ShardPlanner(BatchLimits(max_requests=100, max_bytes=25))
    assert [by_bytes.add(10) for _ in range(5)] == [True, False, True, False, True]
    with pytest.raises(PermanentError):
        by_bytes.add(26)


def test_watermark_only_advances_over_lines_all_finished() -> None:
    mark = Watermark(100)
    for index, end in enumerate((110, 120, 130)):
        mark.started(index, end)
    mark.finished(1)
    assert mark.offset == 100
    mark.finished(0)
    assert mark.offset == 120
    mark.finished(2)
    assert mark.offset == 130


def test_types_gemini_reads_from_a_uri_and_the_rest_left_online() -> None:
    def info(name: str, content_type: str) -> ObjectInfo:
        return ObjectInfo("b", name, 1, 1, content_type, 10)

    assert batch_mime_type(info("a.jpg", "image/jpeg")) == "image/jpeg"
    assert batch_mime_type(info("a.JPG", "application/octet-stream")) == "image/jpeg"
    assert batch_mime_type(info("a.gif", "image/gif")) is None  # converted online only
    assert batch_mime_type(info("a.tiff", "image/tiff")) is None


def test_batch_cost_is_half_the_online_list_price() -> None:
    usage = Usage(prompt_tokens=1_000_000, output_tokens=1_000_000, calls=1)
    assert batch_cost("gemini-2.5-flash", usage) == pytest.approx((0.30 + 2.50) / 2)
    assert batch_cost("gemini-2.5-flash-lite", usage) == pytest.approx((0.10 + 0.40) / 2)
    assert batch_cost("gemini-1.5-flash", usage) is None


# ---------------------------------------------------------------- submit


async def test_submit_writes_a_keyed_request_per_wanted_image_and_a_job_per_shard() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    infos = photos(storage, 5)
    storage.put(BUCKET, "2019/done.jpg", b"x", metadata={})
    done = storage.objects[(BUCKET, "2019/done.jpg")]
    done.info = replace(
        done.info,
        metadata={"caption": "x", "caption-status": "ok",
                  "caption-generation": str(done.info.generation)},
    )  # fmt: skip
    storage.put(BUCKET, "2019/notes.txt", b"hi", "text/plain")
    storage.put(BUCKET, "2019/owner.jpg", b"x", metadata={"caption": "mine"})
    storage.put(BUCKET, "2019/anim.gif", b"x", "image/gif")
    storage.put(BUCKET, "2019/empty.jpg", b"")
    storage.put(BUCKET, "2019/thumbs/t.jpg", b"x")
    rules = RuleBook(
        SPEC, parse_rules('[{"name": "t", "prefix": "2019/thumbs/", "exclude": true}]')
    )
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex, limits=BatchLimits(max_requests=2), rules=rules)

    report = await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))

    assert report.images == 5
    assert report.shards == len(vertex.created) == 3
    assert dict(report.totals.skipped) == {
        "already-captioned": 1, "not-an-image": 1, "metadata-conflict": 1,
        "online-only": 2, "excluded-by-rule": 1,
    }  # fmt: skip
    first = vertex.created[0]
    assert first["model"] == "gemini-2.5-flash"
    assert first["source"] == f"gs://{BUCKET}/captioner-batch/{report.run}/requests-00000.jsonl"
    assert first["dest"] == f"gs://{BUCKET}/captioner-batch/{report.run}/output-00000/"
    lines = blobs.requests(f"captioner-batch/{report.run}/requests-00000.jsonl")
    assert [line["key"] for line in lines] == [
        f"gs://{BUCKET}/{i.name}#{i.generation}" for i in infos[:2]
    ]
    part = lines[0]["request"]["contents"][0]["parts"][0]["fileData"]
    assert part == {"file_uri": f"gs://{BUCKET}/2019/0000.jpg", "mime_type": "image/jpeg"}
    assert lines[0]["spec"] == SPEC.fingerprint
    manifest = Manifest.from_json(json.loads(blobs.data[f"captioner-batch/{report.run}/jobs.json"]))
    assert [j.name for j in manifest.jobs] == [j["name"] for j in vertex.created]
    assert manifest.specs == {SPEC.fingerprint: SPEC}
    assert report.manifest == f"gs://{BUCKET}/captioner-batch/{report.run}/jobs.json"


async def test_dry_run_counts_images_jobs_and_cost_and_writes_nothing() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 5)
    jobs = service(storage, blobs, None, limits=BatchLimits(max_requests=2))
    report = await jobs.submit(BatchSubmitRequest(BUCKET, "2019/", dry_run=True))
    assert (report.images, report.shards, report.run, report.jobs) == (5, 3, None, [])
    assert report.estimate.image_tokens == 5 * 258
    assert report.cost == pytest.approx((5 * 330 * 0.30 + 5 * 80 * 2.50) / 1e6 / 2)
    assert blobs.data == {}


# ---------------------------------------------------------------- apply


async def test_apply_writes_as_the_online_path_and_a_second_apply_writes_nothing() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    infos = photos(storage, 20)
    storage.owner_edits(BUCKET, "2019/0003.jpg", {"uploaded-by": "alice"})
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    vertex.run()

    (report,) = await apply(jobs)
    assert report.applied
    assert report.lines == 20
    assert report.totals.counts["ok"] == 20
    meta = storage.metadata(BUCKET, "2019/0003.jpg")
    assert meta["uploaded-by"] == "alice"  # the owner's key, untouched
    assert meta["caption"] == "A cat on a mat."
    assert meta["caption-alt"] == "Cat."
    assert meta["caption-tags"] == "cat,mat"
    assert meta["caption-model"] == "gemini-2.5-flash"  # as online: the configured model
    assert meta["caption-prompt"] == SPEC.fingerprint
    assert meta["caption-rule"] == "default"
    assert meta["caption-generation"] == str(infos[3].generation)
    patch = next(p for p in storage.patches if p["name"] == "2019/0003.jpg")
    assert patch["ifGenerationMatch"] == infos[3].generation
    assert patch["ifMetagenerationMatch"] == 2  # the owner's edit made it 2
    assert "uploaded-by" not in patch["metadata"]  # a merge of our keys only

    patches = len(storage.patches)
    (again,) = await apply(jobs)
    assert again.applied
    assert len(storage.patches) == patches
    blobs.drop("applied-")
    (forced,) = await apply(jobs)  # even with the checkpoint gone: nothing written
    assert forced.totals.skipped["already-captioned"] == 20
    assert len(storage.patches) == patches


def _keep_only(form: str) -> Any:
    """What an output line keeps of our request line: ``key`` (the top-level fields, as
    the emulator echoes them), ``label`` (only the request, whose labels Vertex AI
    documents echoing) or ``uri`` (only the request's parts, in Google's example output's
    snake_case)."""

    def transform(line: dict[str, Any]) -> dict[str, Any]:
        line = json.loads(json.dumps(line))
        if form in ("label", "uri"):
            del line["key"], line["spec"]
        if form == "uri":
            del line["request"]["labels"]
            part = line["request"]["contents"][0]["parts"][0]
            part["file_data"] = {"file_uri": part.pop("fileData")["file_uri"]}
        return line

    return transform


@pytest.mark.parametrize("form", ["key", "label", "uri"])
async def test_each_form_of_output_line_is_matched_to_its_request_through_the_request_file(
    form: str,
) -> None:
    """Google documents that an output line holds the input ``request`` (labels
    included), not that it keeps our top-level ``key`` and ``spec``: whichever the line
    keeps, apply finds the object, its generation and the spec in the job's request file."""
    storage, blobs = ListedStorage(), MemoryBlobs()
    infos = photos(storage, 4)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    new = storage.put(BUCKET, "2019/0001.jpg", b"a new image")  # replaced since submit
    vertex.run(transform=_keep_only(form))

    (report,) = await apply(jobs)
    assert report.applied
    assert report.totals.counts["ok"] == 3
    assert dict(report.totals.skipped) == {"superseded": 1}
    assert not report.refused
    for info in (infos[0], infos[2], infos[3]):
        meta = storage.metadata(BUCKET, info.name)
        assert meta["caption"] == "A cat on a mat."
        assert meta["caption-prompt"] == SPEC.fingerprint
        assert meta["caption-generation"] == str(info.generation)
    assert storage.metadata(BUCKET, "2019/0001.jpg") == {}  # never the old image's words
    assert storage.objects[(BUCKET, "2019/0001.jpg")].info.generation == new.generation


async def test_objects_replaced_deleted_or_taken_by_the_owner_are_skipped_and_counted() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 4)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    new = storage.put(BUCKET, "2019/0000.jpg", b"a new image")  # a newer generation
    storage.delete(BUCKET, "2019/0001.jpg")
    storage.owner_edits(BUCKET, "2019/0002.jpg", {"caption": "the owner's own"})
    vertex.run()

    (report,) = await apply(jobs)
    # As a prefix backfill does, the owner's own `caption` key is counted as a skip.
    assert dict(report.totals.skipped) == {"superseded": 1, "gone": 1, "metadata-conflict": 1}
    assert report.totals.counts["ok"] == 1
    assert storage.metadata(BUCKET, "2019/0000.jpg") == {}
    assert storage.objects[(BUCKET, "2019/0000.jpg")].info.generation == new.generation
    assert storage.metadata(BUCKET, "2019/0002.jpg") == {"caption": "the owner's own"}
    assert {p["name"] for p in storage.patches} == {"2019/0003.jpg"}


async def test_per_request_errors_are_recorded_or_left_as_the_online_path_would() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 6)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    bad = json.dumps(
        {
            "error": {
                "code": 400,
                "message": "Unable to process the image.",
                "status": "INVALID_ARGUMENT",
            }
        }
    )
    outcomes = {
        "0000": {"status": f"Bad Request: {bad}"},
        "0001": {"status": {"code": 429, "message": "Resource exhausted"}},
        "0002": {"response": {"candidates": [{"finishReason": "SAFETY"}]}},
        "0003": {"response": answer(finish="MAX_TOKENS")},
        "0004": {"response": answer()},
    }  # fmt: skip

    def outcome(key: str) -> dict[str, Any]:
        return outcomes[key.split("/")[-1][:4]]

    vertex.run(state="PARTIALLY_SUCCEEDED", outcome=outcome, keep=lambda k: "0005" not in k)
    (report,) = await apply(jobs)

    assert storage.metadata(BUCKET, "2019/0000.jpg")["caption-status"] == "error:gemini-400"
    assert "caption-status" not in storage.metadata(BUCKET, "2019/0001.jpg")  # 429: left
    assert storage.metadata(BUCKET, "2019/0002.jpg")["caption-status"] == "blocked"
    assert "caption-status" not in storage.metadata(BUCKET, "2019/0003.jpg")  # second chance
    assert storage.metadata(BUCKET, "2019/0004.jpg")["caption-status"] == "ok"
    assert "caption-status" not in storage.metadata(BUCKET, "2019/0005.jpg")  # never answered
    assert report.totals.counts["retry"] == 3  # 429, cut off, and the one never answered
    assert report.lines == 5
    assert "1 requests without an answer" in (report.note or "")
    # The next submit picks up exactly what is left.
    again = await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    assert again.images == 3


async def test_a_job_not_finished_or_failed_without_output_writes_nothing() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 3)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    (running,) = await apply(jobs)
    assert not running.applied
    assert "not finished (QUEUED)" in (running.note or "")
    vertex.run(state="FAILED", keep=lambda key: False)
    (failed,) = await apply(jobs)
    assert failed.status.state == "FAILED"
    assert "left for the next run" in (failed.note or "")
    assert storage.patches == []


async def test_apply_resumes_from_its_checkpoint_after_a_stop() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 50)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex, concurrency=4)
    report = await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    vertex.run()
    request = BatchFollowRequest("apply", (vertex.created[0]["name"],))
    (stopped,) = [r async for r in jobs.follow(request, deadline=0.0)]
    assert not stopped.applied
    assert "apply again" in (stopped.note or "")
    checkpoint = json.loads(blobs.data[f"captioner-batch/{report.run}/applied-1.json"])
    assert not checkpoint.get("done")
    (resumed,) = [r async for r in jobs.follow(request)]
    assert resumed.applied
    assert stopped.lines + resumed.lines == 50  # no line read twice
    assert len(storage.patches) == 50


async def test_overwrite_runs_write_once_even_when_applied_twice() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 3)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    vertex.run()
    await apply(jobs)
    redo = await jobs.submit(BatchSubmitRequest(BUCKET, "2019/", overwrite=True))
    assert redo.images == 3
    vertex.run(1, outcome=lambda key: {"response": answer("A dog.")})
    await apply(jobs, run=redo.run)
    assert storage.metadata(BUCKET, "2019/0001.jpg")["caption"] == "A dog."
    patches = len(storage.patches)
    blobs.drop("applied-")
    await apply(jobs, run=redo.run)
    assert len(storage.patches) == patches


async def test_status_reports_each_stored_job() -> None:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, 3)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex, limits=BatchLimits(max_requests=2))
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    vertex.run(0)
    reports = [r async for r in jobs.follow(BatchFollowRequest("status", bucket=BUCKET))]
    assert [(r.status.state, r.requests, r.applied) for r in reports] == [
        ("SUCCEEDED", 2, False),
        ("QUEUED", 1, False),
    ]
    assert storage.patches == []


# ---------------------------------------------------------------- the Vertex adapter


def _vertex_client() -> Any:
    from google.oauth2.credentials import Credentials

    from captioner.adapters.gemini import make_client

    env = {
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": "p",
        "GOOGLE_CLOUD_LOCATION": "us-central1",
    }
    return make_client(10, env, credentials=Credentials(token="t"))  # type: ignore[no-untyped-call]


def test_the_batch_request_is_the_online_request_with_the_image_as_a_gs_uri() -> None:
    from google.genai import types

    from captioner.adapters.gemini import GeminiDescriber

    client = _vertex_client()
    describer = GeminiDescriber(
        client, model="gemini-3-flash-preview", prompt="Describe it.", max_output_tokens=1024,
        attempts=1, timeout=10,
    )  # fmt: skip
    spec = CaptionSpec("Describe it.", structured=True, languages=("en", "de"))
    key = RequestKey("b", "a.jpg", 7)
    body = json.loads(template_for(describer, client)(spec).render(key, "image/png"))
    assert body["labels"] == {LABEL: key.label}
    image, text = body["contents"][0]["parts"]
    assert image == {"fileData": {"file_uri": "gs://b/a.jpg", "mime_type": "image/png"}}
    assert text == {"text": spec.full_prompt()}
    online = describer._config_for(spec, 1024)
    config = body["generationConfig"]
    assert config["responseJsonSchema"] == spec.response_schema()
    assert config["thinkingConfig"] == {"thinking_level": "MINIMAL"}
    assert config["mediaResolution"] == "MEDIA_RESOLUTION_LOW"
    assert config["temperature"] == online.temperature == 1.0
    assert config["maxOutputTokens"] == 1024
    assert isinstance(online.thinking_config, types.ThinkingConfig)


def test_batch_status_errors_are_classified_as_online() -> None:
    assert isinstance(read_status({"code": 503, "message": "x"}), TransientError)
    assert isinstance(read_status({"code": 403, "message": "denied"}), ConfigurationError)
    error = read_status('Bad Request: {"error": {"code": 400, "message": "bad image"}}')
    assert isinstance(error, PermanentError)
    assert error.reason == "gemini-400"
    assert isinstance(read_status("something odd"), TransientError)


def test_an_api_key_client_is_refused_naming_the_vertex_variables() -> None:
    from captioner.adapters.gemini import make_client

    client = make_client(10, {"GEMINI_API_KEY": "k"})
    with pytest.raises(ConfigurationError, match="GOOGLE_GENAI_USE_VERTEXAI") as caught:
        VertexJobs(client)
    assert str(caught.value) == NEEDS_VERTEX


# ---------------------------------------------------------------- HTTP bodies


def test_http_batch_bodies_parse_into_batch_requests() -> None:
    from captioner.edges.http_body import parse_body

    submit = parse_body(b'{"batch": "submit", "bucket": "b", "prefix": "p/", "if_stale": true}')
    assert submit == BatchSubmitRequest("b", "p/", if_stale=True)
    status = parse_body(
        b'{"batch": "status", "job": "projects/p/locations/l/batchPredictionJobs/1"}'
    )
    assert status == BatchFollowRequest("status", ("projects/p/locations/l/batchPredictionJobs/1",))
    apply_run = parse_body(b'{"batch": "apply", "bucket": "b", "run": "20261130-101500-ab12"}')
    assert apply_run == BatchFollowRequest("apply", (), "b", "", "20261130-101500-ab12")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"batch": "run", "bucket": "b"}', "'batch' must be"),
        (b'{"batch": "submit"}', "'bucket' must be a non-empty string"),
        (b'{"batch": "submit", "bucket": "b", "dry_run": "yes"}', "'dry_run' must be true"),
        (b'{"batch": "apply"}', "give 'job', or 'bucket'"),
        (b'{"batch": "apply", "job": "j", "bucket": "b"}', "give 'job', or 'bucket'"),
        (b'{"batch": "apply", "job": "j", "run": "r"}', "go with 'bucket'"),
        (b'{"batch": "status", "job": "j", "limit": 3}', "unknown field(s) 'limit'"),
    ],
)
def test_http_batch_bodies_that_are_wrong_say_what_is_wrong(body: bytes, message: str) -> None:
    from captioner.edges.http_body import parse_body
    from captioner.errors import BadRequestError

    with pytest.raises(BadRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_body(body)

"""The stand-in's Vertex AI batch prediction emulator, driven by the real google-genai client in
Vertex AI mode, with its input, images and output in fake-gcs-server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import google.oauth2.credentials
import pytest
from google import genai
from google.genai import errors, types

from captioner_dev import PHOTOS
from captioner_dev.gemini_server import GeminiStub

CHELSEA = (PHOTOS / "chelsea.jpg").read_bytes()
COFFEE = (PHOTOS / "coffee.jpg").read_bytes()
MODEL = "gemini-2.5-flash"
PROMPT = "Describe this image in one sentence."
TERMINAL = {
    types.JobState.JOB_STATE_SUCCEEDED,
    types.JobState.JOB_STATE_FAILED,
    types.JobState.JOB_STATE_CANCELLED,
    types.JobState.JOB_STATE_PARTIALLY_SUCCEEDED,
    types.JobState.JOB_STATE_EXPIRED,
}


def tag(data: bytes) -> str:
    return f"[img:{hashlib.sha256(data).hexdigest()[:8]}]"


@pytest.fixture
async def vertex(gemini: GeminiStub, gcs: Any) -> AsyncIterator[genai.Client]:
    """The client as the product makes it for Vertex AI, pointed at the stand-in."""
    client = genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=google.oauth2.credentials.Credentials(token="fake"),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(base_url=gemini.base_url),
    )
    yield client
    await client.aio.aclose()


def request_line(uri: str, key: str, **extra: Any) -> dict[str, Any]:
    part = {"fileData": {"fileUri": uri, "mimeType": "image/jpeg"}}
    request = {
        "contents": [{"role": "user", "parts": [part, {"text": PROMPT}]}],
        "generationConfig": {"maxOutputTokens": 2048, "temperature": 0.2},
    }
    return {"key": key, "request": request, **extra}


def upload_job(bucket: Any, images: dict[str, bytes], lines: list[dict[str, Any]]) -> str:
    for name, data in images.items():
        bucket.blob(name).upload_from_string(data, content_type="image/jpeg")
    text = "".join(json.dumps(line) + "\n" for line in lines)
    bucket.blob("shards/x.jsonl").upload_from_string(text, content_type="application/jsonl")
    return f"gs://{bucket.name}/shards/x.jsonl"


async def create(vertex: genai.Client, src: str, bucket: Any) -> types.BatchJob:
    config = types.CreateBatchJobConfig(dest=f"gs://{bucket.name}/out/", display_name="captions")
    return await vertex.aio.batches.create(model=MODEL, src=src, config=config)


async def wait(
    vertex: genai.Client, job: types.BatchJob, seen: list[Any] | None = None
) -> types.BatchJob:
    deadline = time.monotonic() + 10
    while job.state not in TERMINAL:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.01)
        assert job.name is not None
        job = await vertex.aio.batches.get(name=job.name)
        if seen is not None and (not seen or seen[-1] != job.state):
            seen.append(job.state)
    return job


def predictions(bucket: Any, job: types.BatchJob) -> list[dict[str, Any]]:
    assert job.output_info is not None
    assert job.output_info.gcs_output_directory is not None
    directory = job.output_info.gcs_output_directory
    prefix = f"gs://{bucket.name}/"
    assert directory.startswith(prefix)
    blob = bucket.blob(directory.removeprefix(prefix) + "/predictions.jsonl")
    return [json.loads(line) for line in blob.download_as_text().splitlines()]


async def test_a_job_goes_through_its_stages_and_answers_like_online(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    lines = [
        request_line(f"gs://{bucket.name}/a.jpg", "a#1"),
        request_line(f"gs://{bucket.name}/b.jpg", "b#7", spec="s1"),
    ]
    src = upload_job(bucket, {"a.jpg": CHELSEA, "b.jpg": COFFEE}, lines)

    job = await create(vertex, src, bucket)
    assert job.state == types.JobState.JOB_STATE_QUEUED
    assert job.name is not None
    assert re.fullmatch(r"projects/p/locations/us-central1/batchPredictionJobs/\d{19}", job.name)
    assert job.display_name == "captions"
    assert job.src is not None
    assert job.src.gcs_uri == [src]
    assert job.dest is not None
    assert job.dest.gcs_uri == f"gs://{bucket.name}/out/"
    seen: list[Any] = [job.state]
    job = await wait(vertex, job, seen)

    assert job.state == types.JobState.JOB_STATE_SUCCEEDED, job.error
    assert [s for s in seen if s != types.JobState.JOB_STATE_QUEUED] == [
        types.JobState.JOB_STATE_PENDING,
        types.JobState.JOB_STATE_RUNNING,
        types.JobState.JOB_STATE_SUCCEEDED,
    ][-len(seen) + 1 :]
    assert job.create_time
    assert job.start_time
    assert job.end_time
    assert job.create_time <= job.start_time <= job.end_time
    assert job.completion_stats is not None
    assert (job.completion_stats.successful_count, job.completion_stats.failed_count) == (2, 0)
    assert job.output_info is not None
    assert re.fullmatch(
        rf"gs://{bucket.name}/out/prediction-model-\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{6}}Z",
        job.output_info.gcs_output_directory or "",
    )
    out = predictions(bucket, job)
    assert [line["key"] for line in out] == ["a#1", "b#7"]
    assert out[1]["spec"] == "s1"
    for line, sent, image in zip(out, lines, [CHELSEA, COFFEE], strict=True):
        assert line["status"] == ""
        assert line["request"] == sent["request"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", line["processed_time"])
        # The same answer an online request for the same image gets: caption, tokens, finish.
        online = await vertex.aio.models.generate_content(
            model=MODEL,
            contents=[types.Part.from_bytes(data=image, mime_type="image/jpeg"), PROMPT],
            config=types.GenerateContentConfig(max_output_tokens=2048, temperature=0.2),
        )
        response = line["response"]
        [candidate] = response["candidates"]
        assert candidate["content"]["parts"][0]["text"] == online.text
        assert online.text is not None
        assert online.text.endswith(tag(image))
        assert candidate["finishReason"] == "STOP"
        assert online.usage_metadata is not None
        assert response["usageMetadata"] == online.usage_metadata.model_dump(
            mode="json", by_alias=True, exclude_none=True
        ) | {"promptTokensDetails": response["usageMetadata"]["promptTokensDetails"]}
        assert response["usageMetadata"]["thoughtsTokenCount"] == 640  # 2.5 Flash thinks

    [recorded] = gemini.batch.jobs
    assert recorded.name == job.name
    assert recorded.bearer_present
    assert recorded.input_uris == [src]
    assert [r.file_uris for r in recorded.lines] == [
        [f"gs://{bucket.name}/a.jpg"],
        [f"gs://{bucket.name}/b.jpg"],
    ]
    assert [r.images[0].sha256 for r in recorded.lines] == [
        hashlib.sha256(CHELSEA).hexdigest(),
        hashlib.sha256(COFFEE).hexdigest(),
    ]
    assert all(r.status == 200 and r.finish_reason == "STOP" for r in recorded.lines)
    assert gemini.calls == 2  # the two online requests above; batch lines are logged per job


async def test_failing_lines_carry_a_status_and_the_job_still_succeeds(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    lines = [
        request_line(f"gs://{bucket.name}/a.jpg", "a"),
        request_line(f"gs://{bucket.name}/b.jpg", "b"),
        request_line(f"gs://{bucket.name}/missing.jpg", "gone"),
    ]
    src = upload_job(bucket, {"a.jpg": CHELSEA, "b.jpg": COFFEE}, lines)
    gemini.batch.add_line_fault("invalid_argument", match=tag(COFFEE))
    gemini.batch.add_line_fault("safety_candidate", match='"key": "a"', count=1)

    job = await wait(vertex, await create(vertex, src, bucket))

    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.completion_stats is not None
    assert (job.completion_stats.successful_count, job.completion_stats.failed_count) == (1, 2)
    blocked, bad, gone = predictions(bucket, job)
    assert blocked["status"] == ""
    assert blocked["response"]["candidates"][0]["finishReason"] == ("SAFETY")
    assert "response" not in bad
    assert "response" not in gone
    assert bad["key"] == "b"
    assert bad["request"] == lines[1]["request"]
    assert bad["status"].startswith("Bad Request: ")
    error = json.loads(bad["status"].removeprefix("Bad Request: "))["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert gone["status"].startswith("Bad Request: ")
    assert "missing.jpg" in gone["status"]
    [recorded] = gemini.batch.jobs
    assert [r.fault for r in recorded.lines] == ["safety_candidate", "invalid_argument", None]
    assert [r.status for r in recorded.lines] == [200, 400, 400]


@pytest.mark.parametrize(
    ("outcome", "state", "code"),
    [
        ("FAILED", types.JobState.JOB_STATE_FAILED, 13),
        ("EXPIRED", types.JobState.JOB_STATE_EXPIRED, 4),
    ],
)
async def test_a_job_told_to_fail_or_expire_ends_so_without_output(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any, outcome: Any, state: Any, code: int
) -> None:
    src = upload_job(bucket, {"a.jpg": CHELSEA}, [request_line(f"gs://{bucket.name}/a.jpg", "a")])
    gemini.batch.add_job_fault(outcome, count=1, match="captions")

    job = await wait(vertex, await create(vertex, src, bucket))

    assert job.state == state
    assert job.error is not None
    assert job.error.code == code
    assert job.error.message
    assert job.output_info is None
    assert gemini.batch.jobs[0].lines == []
    assert gemini.batch.config_json()["job_faults"] == []  # the count was used up


async def test_a_job_whose_input_cannot_be_read_fails(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    job = await wait(vertex, await create(vertex, f"gs://{bucket.name}/nope.jsonl", bucket))

    assert job.state == types.JobState.JOB_STATE_FAILED
    assert job.error is not None
    assert job.error.code == 3
    assert (job.error.message or "").startswith("Failed to import data.")


async def test_a_partially_succeeded_job_leaves_lines_incomplete(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    lines = [request_line(f"gs://{bucket.name}/a.jpg", str(i)) for i in range(3)]
    src = upload_job(bucket, {"a.jpg": CHELSEA}, lines)
    gemini.batch.add_job_fault("PARTIALLY_SUCCEEDED", count=1)

    job = await wait(vertex, await create(vertex, src, bucket))

    assert job.state == types.JobState.JOB_STATE_PARTIALLY_SUCCEEDED
    assert job.completion_stats is not None
    stats = job.completion_stats
    assert (stats.successful_count, stats.failed_count, stats.incomplete_count) == (2, 0, 1)
    assert [line["key"] for line in predictions(bucket, job)] == ["0", "1"]


async def test_cancel_list_get_by_id_and_delete(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    src = upload_job(bucket, {"a.jpg": CHELSEA}, [request_line(f"gs://{bucket.name}/a.jpg", "a")])
    gemini.batch.configure(stage_seconds=0.3)
    first = await create(vertex, src, bucket)
    second = await create(vertex, src, bucket)
    assert first.name is not None
    assert second.name is not None

    await vertex.aio.batches.cancel(name=first.name)
    cancelling = await vertex.aio.batches.get(name=first.name.rsplit("/", 1)[-1])
    assert cancelling.state == types.JobState.JOB_STATE_CANCELLING
    cancelled = await wait(vertex, cancelling)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    assert cancelled.output_info is None
    with pytest.raises(errors.ClientError) as caught:
        await vertex.aio.batches.cancel(name=first.name)
    assert (caught.value.code, caught.value.status) == (400, "FAILED_PRECONDITION")

    pager = await vertex.aio.batches.list(config=types.ListBatchJobsConfig(page_size=1))
    listed = [job.name async for job in pager]
    assert listed == [second.name, first.name]  # newest first, one page at a time

    with pytest.raises(errors.ClientError) as caught:
        await vertex.aio.batches.delete(name=second.name)  # still running
    assert caught.value.code == 400
    assert (await wait(vertex, second)).state == types.JobState.JOB_STATE_SUCCEEDED
    deleted = await vertex.aio.batches.delete(name=second.name)
    assert deleted.done
    with pytest.raises(errors.ClientError) as caught:
        await vertex.aio.batches.get(name=second.name)
    assert caught.value.code == 404


async def test_requests_the_real_service_refuses_are_400s(
    vertex: genai.Client, gemini: GeminiStub, bucket: Any
) -> None:
    with pytest.raises(errors.ClientError, match="BigQuery"):
        await vertex.aio.batches.create(
            model=MODEL,
            src="bq://project.dataset.table",
            config=types.CreateBatchJobConfig(dest=f"gs://{bucket.name}/out/"),
        )
    assert gemini.batch.jobs == []


def test_the_control_route_configures_and_shows_jobs(gemini: GeminiStub) -> None:
    def call(method: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{gemini.base_url}/_stub/batch", data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, config = call(
        "POST",
        {
            "stage_seconds": "0.2s",
            "add_line_faults": [{"kind": "500", "match": "x", "count": 1}],
            "add_job_faults": [{"outcome": "FAILED", "message": "boom"}],
        },
    )
    assert status == 200
    assert config["stage_seconds"] == 0.2
    assert config["line_faults"][0]["kind"] == "500"
    assert config["job_faults"] == [
        {"outcome": "FAILED", "count": None, "match": None, "message": "boom"}
    ]
    assert call("GET") == (200, {"config": config, "jobs": []})
    status, body = call("POST", {"add_job_faults": [{"outcome": "LOST"}]})
    assert status == 400
    assert "LOST" in body["error"]["message"]
    assert call("POST", {"stage": 1})[0] == 400
    gemini.reset()
    assert gemini.batch.config_json() == {
        "stage_seconds": 0.05,
        "status_form": "text",
        "line_faults": [],
        "job_faults": [],
    }

"""Batch apply on the local stack, as an attacker would try it: lines and files planted in
a running job's output directory, job names that are not job names, and the work left by
jobs that failed, were cancelled, or whose apply was killed. Through the CLI and through
caption_http served by functions-framework; every case checks the objects afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from captioner_dev.functions import FunctionServer
from captioner_dev.gemini_server.batch_run import output_directory
from tests import images
from tests.conftest import vertex_function_env
from tests.e2e.test_batch_backfill import png, upload_many, wait_for_jobs
from tests.e2e.test_cli import REPO, run_cli
from tests.gcs_proxy import GcsProxy
from tests.objects import metadata, upload

pytestmark = pytest.mark.slow


def _forged(uri: str, key: str | None, caption: str = "MALLORY WAS HERE") -> str:
    answer = json.dumps({"caption": caption, "alt_text": "x", "tags": ["x"]})
    line: dict[str, Any] = {
        "status": "",
        "request": {"contents": [{"role": "user", "parts": [
            {"fileData": {"fileUri": uri, "mimeType": "image/png"}}, {"text": "x"}]}]},
        "response": {"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]},
                                     "finishReason": "STOP"}]},
    }  # fmt: skip
    if key is not None:
        line["key"] = key
    return json.dumps(line)


def _plant_while_running(gemini: Any, gcs_bucket: Any, lines: list[str]) -> None:
    """Once the job runs, put a second answer file in the very directory Vertex AI will
    write its answers to, before the job ends: the hardest plant to tell from the real."""
    deadline = time.monotonic() + 30
    while not any(j.state == "JOB_STATE_RUNNING" for j in gemini.batch.jobs):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (job,) = [j for j in gemini.batch.jobs if j.state == "JOB_STATE_RUNNING"]
    folder = output_directory(job).removeprefix(f"gs://{gcs_bucket.name}/")
    blob = gcs_bucket.blob(f"{folder}/predictions_0002.jsonl")
    blob.upload_from_string("\n".join(lines) + "\n", content_type="application/jsonl")


def _attack(gemini: Any, bucket: Any, victim_bucket: Any, prefix: str) -> list[str]:
    """The battery's four writes: another bucket, outside the prefix, a key naming another
    image than its request, and a forged error status."""
    victim = upload(victim_bucket, "victim.jpg", png(3), "image/png")
    outside = upload(bucket, "private/ceo.png", png(4), "image/png")
    one = bucket.get_blob(f"{prefix}1.png")
    other = f"gs://{victim_bucket.name}/victim.jpg"
    private = f"gs://{bucket.name}/private/ceo.png"
    status = json.loads(_forged(private, None))
    del status["response"]
    status["status"] = 'Bad Request: {"error": {"code": 400, "message": "no", "status": "x"}}'
    return [
        _forged(other, f"{other}#{victim.generation}"),
        _forged(private, f"{private}#{outside.generation}"),
        _forged(f"gs://{bucket.name}/{prefix}0.png", f"gs://{bucket.name}/{one.name}#{one.generation}"),
        json.dumps(status),
    ]  # fmt: skip


def test_cli_apply_writes_only_the_submitted_images_whatever_is_planted(
    vertex_env: dict[str, str], gemini: Any, bucket: Any, gcs_client: Any
) -> None:
    victim_bucket = gcs_client.create_bucket(f"victim-{uuid.uuid4().hex[:8]}")
    upload_many(bucket, [f"s/{i}.png" for i in range(3)])
    gemini.batch.configure(stage_seconds=0.4)
    target = f"gs://{bucket.name}/s/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    lines = _attack(gemini, bucket, victim_bucket, "s/")
    _plant_while_running(gemini, bucket, lines)
    wait_for_jobs(vertex_env, target)
    # After the job ended: a file where no answer file goes (never read), and one in the
    # right place (read, within outputs.CLOCK_SLACK of the end, but its line is refused).
    (job,) = gemini.batch.jobs
    folder = output_directory(job).removeprefix(f"gs://{bucket.name}/")
    bucket.blob(f"{folder}/predictions_0003.jsonl").upload_from_string(lines[0] + "\n")
    bucket.blob(f"{folder}/../planted.jsonl").upload_from_string(lines[0] + "\n")

    applied = run_cli(vertex_env, "batch", "apply", target, "--json")
    assert applied.returncode == 1, applied.stderr  # refused lines are reported as left
    (report,) = [json.loads(line) for line in applied.stdout.splitlines()]
    assert report["results"] == {"ok": 3}
    assert report["refused"] == {
        "not-requested": 4, "key-mismatch": 1, "unexpected-file": 1,
    }  # fmt: skip
    assert "refused 6 lines or files" in applied.stderr
    assert "batch apply refused (not-requested)" in applied.stderr  # named in the log
    assert metadata(victim_bucket, "victim.jpg") == {}
    assert metadata(bucket, "private/ceo.png") == {}
    for i in range(3):
        meta = metadata(bucket, f"s/{i}.png")
        assert meta["caption-status"] == "ok"
        assert "MALLORY" not in meta["caption"]
    again = run_cli(vertex_env, "batch", "apply", target)
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stdout


# ---------------------------------------------------------------- over HTTP

ALLOWED = f"safe-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def allowed_bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(ALLOWED)


@pytest.fixture(scope="module")
def function(gcs: Any, gemini_thread: Any, adc_key: str) -> Iterator[FunctionServer]:
    env = {**vertex_function_env(gcs, gemini_thread, adc_key), "CAPTION_ALLOWED_BUCKETS": ALLOWED}
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def post(server: FunctionServer, body: Any) -> requests.Response:
    return requests.post(server.url, json=body, timeout=60)


def test_http_apply_never_writes_to_a_bucket_outside_the_allowed_list(
    function: FunctionServer, allowed_bucket: Any, gcs_client: Any, gemini: Any
) -> None:
    forbidden = gcs_client.create_bucket(f"forbidden-{uuid.uuid4().hex[:8]}")
    upload_many(allowed_bucket, [f"h/{i}.png" for i in range(3)])
    gemini.batch.configure(stage_seconds=0.4)
    submitted = post(function, {"batch": "submit", "bucket": ALLOWED, "prefix": "h/"})
    assert submitted.status_code == 200, submitted.text
    _plant_while_running(gemini, allowed_bucket, _attack(gemini, allowed_bucket, forbidden, "h/"))
    run = submitted.json()["run"]
    for _ in range(150):
        answer = post(function, {"batch": "apply", "bucket": ALLOWED, "run": run})
        assert answer.status_code == 200, answer.text
        if answer.json()["jobs"][0]["applied"]:
            break
        time.sleep(0.2)
    (job,) = answer.json()["jobs"]
    assert job["results"] == {"ok": 3}
    assert job["refused"] == {"not-requested": 3, "key-mismatch": 1}
    assert metadata(forbidden, "victim.jpg") == {}
    assert metadata(allowed_bucket, "private/ceo.png") == {}


BAD_NAMES = [
    "https://evil.example/projects/p/locations/l/batchPredictionJobs/1",
    "../../etc/passwd",
    "projects/p/locations/us-central1/endpoints/123",
    "projects/p/locations/us-central1/batchPredictionJobs/1\n",
    "projects/p/locations/us-central1/batchPredictionJobs/1\x00",
    "projects/p/locations/us-central1/batchPredictionJobs/١٢٣",
    "batches/123",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_http_a_job_name_that_is_not_one_is_a_400_naming_the_form(
    function: FunctionServer, name: str
) -> None:
    for action in ("status", "apply", "cancel"):
        answer = post(function, {"batch": action, "job": name})
        assert answer.status_code == 400, answer.text
        assert "batchPredictionJobs/ID" in answer.json()["error"]["message"]


def test_cli_a_job_name_that_is_not_one_is_a_usage_error(vertex_env: dict[str, str]) -> None:
    for name in [n for n in BAD_NAMES if "\x00" not in n]:  # argv cannot carry a NUL
        done = run_cli(vertex_env, "batch", "status", name)
        assert done.returncode == 2, (name, done.stderr)
        assert "is not a batch job's name" in done.stderr
        assert "Traceback" not in done.stderr
    bad_run = run_cli(vertex_env, "batch", "apply", "gs://b/", "--run", "../x")
    assert bad_run.returncode == 2
    assert "is not a run id" in bad_run.stderr


# ---------------------------------------------------------------- work left, and auth


def test_a_partly_answered_job_leaves_its_unanswered_images_to_retry_with_exit_1(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"q/{i}.png" for i in range(4)])
    gemini.batch.add_job_fault("PARTIALLY_SUCCEEDED", count=1)
    target = f"gs://{bucket.name}/q/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    assert [j["state"] for j in wait_for_jobs(vertex_env, target)] == ["PARTIALLY_SUCCEEDED"]
    applied = run_cli(vertex_env, "batch", "apply", target)
    assert applied.returncode == 1, applied.stderr
    assert "done 2" in applied.stderr
    assert "to retry 2" in applied.stderr
    assert "2 requests without an answer" in applied.stdout


def test_a_job_cancelled_then_applied_leaves_every_image_for_the_next_run(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"c/{i}.png" for i in range(3)])
    gemini.batch.configure(stage_seconds=1.0)
    target = f"gs://{bucket.name}/c/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    cancelled = run_cli(vertex_env, "batch", "cancel", target, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["cancelled"] is True
    assert [j["state"] for j in wait_for_jobs(vertex_env, target)] == ["CANCELLED"]
    applied = run_cli(vertex_env, "batch", "apply", target)
    assert applied.returncode == 1
    assert "to retry 3" in applied.stderr
    assert all(metadata(bucket, f"c/{i}.png") == {} for i in range(3))
    dry = run_cli(vertex_env, "batch", "submit", target, "--dry-run")
    assert "would submit 3 images" in dry.stdout
    again = run_cli(vertex_env, "batch", "cancel", target)
    assert "already ended (CANCELLED)" in again.stdout


def test_batch_and_online_calls_authenticate_with_the_same_application_default_credentials(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    """No test hook in production: the key file's token comes from the stand-in's token
    endpoint, and both paths send that token."""
    upload(bucket, "auth/a.png", png(1), "image/png")
    online = run_cli(vertex_env, "describe", str(images.PHOTOS / "chelsea.jpg"))
    assert online.returncode == 0, online.stderr
    assert run_cli(vertex_env, "batch", "submit", f"gs://{bucket.name}/auth/").returncode == 0
    (request,) = gemini.requests
    (job,) = gemini.batch.jobs
    assert request.bearer_issued
    assert job.bearer_issued
    no_key = {k: v for k, v in vertex_env.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    no_key["GOOGLE_APPLICATION_CREDENTIALS"] = "/nonexistent/key.json"
    refused = run_cli(no_key, "batch", "status", "123")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr


def test_an_rpc_status_with_a_grpc_code_is_read_as_grpc(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    """14 is UNAVAILABLE (left to retry), not an HTTP 14 recorded as error:gemini-14."""
    upload_many(bucket, [f"r/{i}.png" for i in range(2)])
    gemini.batch.configure(status_form="rpc")
    gemini.batch.add_line_fault("503", match="r/0.png", count=1)
    gemini.batch.add_line_fault("invalid_argument", match="r/1.png", count=1)
    target = f"gs://{bucket.name}/r/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    wait_for_jobs(vertex_env, target)
    applied = run_cli(vertex_env, "batch", "apply", target)
    assert applied.returncode == 1
    assert "caption-status" not in metadata(bucket, "r/0.png")
    assert metadata(bucket, "r/1.png")["caption-status"] == "error:gemini-400"


def test_apply_killed_mid_file_resumes_from_its_checkpoint_writing_each_image_once(
    vertex_env: dict[str, str], gemini: Any, bucket: Any, gcs: Any
) -> None:
    names = [f"k/{i:04}.png" for i in range(400)]
    upload_many(bucket, names)
    target = f"gs://{bucket.name}/k/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    wait_for_jobs(vertex_env, target, timeout=120)
    proxy = GcsProxy(gcs.url).start()  # counts the caption writes (PATCH) that succeed
    env = {
        **vertex_env,
        "STORAGE_EMULATOR_HOST": proxy.url,
        "CAPTION_BATCH_APPLY_CONCURRENCY": "2",
        "CAPTION_BATCH_CHECKPOINT_SECONDS": "0.2",
    }
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "captioner", "batch", "apply", target],
            cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for_a_checkpoint_part_way(bucket, process)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=30)
        written = sum("caption-status" in metadata(bucket, n) for n in names)
        assert 0 < written < len(names)

        resumed = run_cli(env, "batch", "apply", target)
        assert resumed.returncode == 0, resumed.stderr
        patched = Counter(r.path for r in proxy.recorded("PATCH") if r.status == 200)
    finally:
        proxy.stop()
    assert all(metadata(bucket, n)["caption-status"] == "ok" for n in names)
    assert len(patched) == len(names)
    assert set(patched.values()) == {1}  # nothing written twice
    # It went on from the checkpoint: the lines before it were not read again.
    done = int(resumed.stderr.split("done ", 1)[1].split(",", 1)[0])
    assert done < len(names)
    assert "to retry" in resumed.stderr
    assert "to retry 0" in resumed.stderr  # and nothing counted as left unanswered


def _wait_for_a_checkpoint_part_way(bucket: Any, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while True:
        stored = [b for b in bucket.list_blobs(prefix="captioner-batch/") if "applied-" in b.name]
        offsets = [v for b in stored for v in json.loads(b.download_as_bytes())["files"].values()]
        if any(offset > 0 for offset in offsets):
            return
        assert process.poll() is None, "apply ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_heic_image_goes_by_uri_and_is_captioned(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    """Vertex AI's image understanding page lists image/heic and image/heif for gs:// files."""
    heic, content_type = images.other_formats()["heic"]
    upload(bucket, "heic/a.heic", heic, content_type)
    target = f"gs://{bucket.name}/heic/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    wait_for_jobs(vertex_env, target)
    assert run_cli(vertex_env, "batch", "apply", target).returncode == 0
    (line,) = gemini.batch.jobs[0].lines
    assert line.file_uris == [f"gs://{bucket.name}/heic/a.heic"]
    assert metadata(bucket, "heic/a.heic")["caption-status"] == "ok"


# ---------------------------------------------------------------- day two: prune, cancel


def _run_folders(bucket: Any) -> set[str]:
    return {b.name.split("/")[1] for b in bucket.list_blobs(prefix="captioner-batch/")}


def test_prune_deletes_old_applied_runs_and_keeps_unapplied_ones_without_force(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"a/{i}.png" for i in range(2)] + [f"b/{i}.png" for i in range(2)])
    done_target, open_target = f"gs://{bucket.name}/a/", f"gs://{bucket.name}/b/"
    assert run_cli(vertex_env, "batch", "submit", done_target).returncode == 0
    assert run_cli(vertex_env, "batch", "submit", open_target).returncode == 0
    wait_for_jobs(vertex_env, f"gs://{bucket.name}/")
    assert run_cli(vertex_env, "batch", "apply", done_target).returncode == 0
    bucket.blob("captioner-batch/notes.txt").upload_from_string("the owner's, not a run")
    runs = _run_folders(bucket)
    assert len(runs) == 3  # two runs and the owner's file

    young = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", "--older-than", "1d")
    assert young.returncode == 0, young.stderr
    assert "deleted 0 runs" in young.stderr
    dry = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", "--older-than", "0h",
                  "--dry-run")  # fmt: skip
    assert "would delete 1 runs" in dry.stderr
    assert _run_folders(bucket) == runs

    pruned = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", "--older-than", "0h")
    assert pruned.returncode == 1  # a run was kept: its answers are not applied
    assert "answers not yet applied" in pruned.stdout
    assert "captioner batch apply" in pruned.stdout
    assert len(_run_folders(bucket)) == 2
    assert bucket.get_blob("captioner-batch/notes.txt") is not None
    assert metadata(bucket, "a/0.png")["caption-status"] == "ok"  # captions stay

    forced = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", "--older-than", "0h",
                     "--force")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert _run_folders(bucket) == {"notes.txt"}
    for bad in ("30", "-1d", "1w", "ten days"):
        usage = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", f"--older-than={bad}")
        assert usage.returncode == 2, bad
        assert "is not an age" in usage.stderr
    prefix = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/a/", "--older-than", "1d")
    assert prefix.returncode == 2
    assert "takes a bucket" in prefix.stderr


def test_prune_keeps_a_run_whose_job_still_runs(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, ["r/0.png"])
    gemini.batch.configure(stage_seconds=2.0)
    assert run_cli(vertex_env, "batch", "submit", f"gs://{bucket.name}/r/").returncode == 0
    pruned = run_cli(vertex_env, "batch", "prune", f"gs://{bucket.name}/", "--older-than", "0h")
    assert pruned.returncode == 1
    assert "cancel it first" in pruned.stdout
    assert len(_run_folders(bucket)) == 1


def test_http_cancel_and_prune(function: FunctionServer, allowed_bucket: Any, gemini: Any) -> None:
    upload_many(allowed_bucket, [f"p/{i}.png" for i in range(2)])
    gemini.batch.configure(stage_seconds=1.0)
    submitted = post(function, {"batch": "submit", "bucket": ALLOWED, "prefix": "p/"})
    run = submitted.json()["run"]
    cancelled = post(function, {"batch": "cancel", "bucket": ALLOWED, "run": run})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["jobs"][0]["cancelled"] is True
    for _ in range(100):
        state = post(function, {"batch": "status", "bucket": ALLOWED, "run": run})
        if state.json()["jobs"][0]["state"] == "CANCELLED":
            break
        time.sleep(0.1)
    body = {"batch": "prune", "bucket": ALLOWED, "older_than": "0h"}
    kept = post(function, {**body, "dry_run": True})
    assert kept.status_code == 200, kept.text
    assert kept.json()["would_delete"] == [f"gs://{ALLOWED}/captioner-batch/{run}/"]
    pruned = post(function, body)
    assert pruned.json()["deleted"] == [f"gs://{ALLOWED}/captioner-batch/{run}/"]
    assert not list(allowed_bucket.list_blobs(prefix=f"captioner-batch/{run}/"))
    refused = post(function, {**body, "bucket": "elsewhere"})
    assert refused.status_code == 403
    bad = post(function, {**body, "older_than": "soon"})
    assert bad.status_code == 400
    assert "is not an age" in bad.json()["error"]["message"]

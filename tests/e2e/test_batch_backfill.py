"""`captioner batch` and caption_http's batch bodies on the local stack: fake-gcs-server,
and the Gemini stand-in's Vertex AI batch prediction emulator reached by google-genai."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from captioner_dev.functions import FunctionServer
from tests import images
from tests.conftest import vertex_function_env
from tests.e2e.test_cli import run_cli
from tests.objects import metadata, upload

pytestmark = pytest.mark.slow


def png(i: int) -> bytes:
    return images.encode(images.solid((40 + i % 50, 30 + i % 7)), "PNG")


def upload_many(bucket: Any, names: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: upload(bucket, n[1], png(n[0]), "image/png"), enumerate(names)))


def wait_for_jobs(env: dict[str, str], target: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        done = run_cli(env, "batch", "status", target, "--json")
        jobs = [json.loads(line) for line in done.stdout.splitlines()]
        if jobs and all(j["state"] not in ("QUEUED", "PENDING", "RUNNING") for j in jobs):
            return jobs
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.3)


def test_a_prefix_is_submitted_applied_and_applied_again_writing_nothing(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    env = {**vertex_env, "CAPTION_BATCH_MAX_REQUESTS": "120"}
    names = [f"archive/{i:04}.png" for i in range(300)]
    upload_many(bucket, names)
    upload(bucket, "archive/readme.txt", b"hi", "text/plain")
    target = f"gs://{bucket.name}/archive/"

    dry = run_cli(env, "batch", "submit", target, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would submit 300 images in 3 jobs" in dry.stdout
    assert "at the batch price" in dry.stdout
    assert gemini.batch.jobs == []

    submitted = run_cli(env, "batch", "submit", target, "--json")
    assert submitted.returncode == 0, submitted.stderr
    report = json.loads(submitted.stdout)
    assert report["images"] == 300
    assert [j["requests"] for j in report["jobs"]] == [120, 120, 60]
    assert report["skipped_by_reason"] == {"not-an-image": 1}

    # Between submit and apply: a new upload, a deletion, and two edits by the owner.
    replaced = upload(bucket, "archive/0000.png", png(999), "image/png")
    bucket.blob("archive/0001.png").delete()
    blob = bucket.get_blob("archive/0002.png")
    blob.metadata = {"uploaded-by": "alice"}
    blob.patch()
    blob = bucket.get_blob("archive/0003.png")
    blob.metadata = {"caption": "the owner's own words"}
    blob.patch()

    jobs = wait_for_jobs(env, target)
    assert [j["state"] for j in jobs] == ["SUCCEEDED"] * 3

    applied = run_cli(env, "batch", "apply", target)
    assert applied.returncode == 0, applied.stderr
    assert "done 297" in applied.stderr
    assert "1 superseded" in applied.stderr
    assert "1 gone" in applied.stderr
    assert "1 metadata-conflict" in applied.stderr

    assert metadata(bucket, "archive/0000.png") == {}  # the new image: not the old words
    assert bucket.get_blob("archive/0000.png").generation == replaced.generation
    assert metadata(bucket, "archive/0003.png") == {"caption": "the owner's own words"}
    kept = metadata(bucket, "archive/0002.png")
    assert kept["uploaded-by"] == "alice"
    assert kept["caption-status"] == "ok"
    one = metadata(bucket, "archive/0010.png")
    assert one["caption-model"] == "gemini-2.5-flash"
    assert one["caption-generation"] == str(bucket.get_blob("archive/0010.png").generation)
    assert one["caption-rule"] == "default"
    assert one["caption"]
    assert one["caption-alt"]
    assert one["caption-tags"]

    metagenerations = {b.name: b.metageneration for b in bucket.list_blobs(prefix="archive/")}
    again = run_cli(env, "batch", "apply", target, "--json")
    assert again.returncode == 0, again.stderr
    assert all(json.loads(line)["applied"] for line in again.stdout.splitlines())
    after = {b.name: b.metageneration for b in bucket.list_blobs(prefix="archive/")}
    assert after == metagenerations  # nothing written the second time

    # A backfill afterwards finds every image done but the two left to it.
    backfill = run_cli(env, "backfill", target, "--dry-run")
    assert "would caption 1" in backfill.stderr  # 0000.png, the new upload


def test_a_caption_made_in_a_batch_is_the_one_made_online(
    vertex_env: dict[str, str], stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    data = png(7)
    upload(bucket, "batch/a.png", data, "image/png")
    upload(bucket, "online/a.png", data, "image/png")
    online = run_cli(stack_env, "backfill", f"gs://{bucket.name}/online/")
    assert online.returncode == 0, online.stderr
    target = f"gs://{bucket.name}/batch/"
    assert run_cli(vertex_env, "batch", "submit", target).returncode == 0
    wait_for_jobs(vertex_env, target)
    assert run_cli(vertex_env, "batch", "apply", target).returncode == 0
    made_online = metadata(bucket, "online/a.png")
    made_in_batch = metadata(bucket, "batch/a.png")
    for key in ("caption", "caption-alt", "caption-tags", "caption-status", "caption-model",
                "caption-prompt", "caption-rule"):  # fmt: skip
        assert made_in_batch[key] == made_online[key], key
    # The very same request but for the image: prompt and every generation setting.
    (in_batch,) = gemini.batch.jobs[0].lines
    asked_online = next(r for r in gemini.requests if r.action == "generateContent")
    assert in_batch.prompt == asked_online.prompt
    assert in_batch.generation_config == asked_online.generation_config
    assert in_batch.file_uris == [f"gs://{bucket.name}/batch/a.png"]


def test_batch_prefix_setting_places_the_run_and_its_files_are_never_taken_for_images(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    env = {
        **vertex_env,
        "CAPTION_BATCH_PREFIX": "nightly jobs/#1/",  # a space and a '#' in object names
        "CAPTION_BATCH_APPLY_CONCURRENCY": "1",
    }
    upload_many(bucket, ["a.png", "b.png", "c.png"])
    target = f"gs://{bucket.name}/"  # the whole bucket, where the run's files will be
    submitted = run_cli(env, "batch", "submit", target, "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["images"] == 3
    names = [b.name for b in bucket.list_blobs()]
    run_files = [n for n in names if n.startswith("nightly jobs/#1/")]
    assert run_files  # the manifest and the request shard
    assert not [n for n in names if n.startswith("captioner-batch/")]  # not the default

    wait_for_jobs(env, target)
    applied = run_cli(env, "batch", "apply", target)
    assert applied.returncode == 0, applied.stderr
    assert all(metadata(bucket, n)["caption-status"] == "ok" for n in ("a.png", "b.png", "c.png"))
    for name in [b.name for b in bucket.list_blobs()]:
        if name.startswith("nightly jobs/"):
            assert "caption" not in metadata(bucket, name), name  # no run file captioned

    # A second submit of the whole bucket lists the run's files and skips them: they are
    # not counted as images or as anything else, and nothing is left to submit.
    again = run_cli(env, "batch", "submit", target, "--dry-run", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["images"] == 0
    assert report["skipped_by_reason"] == {"already-captioned": 3}


def test_failed_and_partly_answered_jobs_leave_what_has_no_answer_for_the_next_run(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    env = {**vertex_env, "CAPTION_BATCH_MAX_REQUESTS": "4"}
    upload_many(bucket, [f"p/{i}.png" for i in range(12)])
    gemini.batch.add_job_fault("FAILED", count=1, match="-00000")
    gemini.batch.add_job_fault("PARTIALLY_SUCCEEDED", count=1, match="-00001")
    gemini.batch.add_line_fault("invalid_argument", match="p/9.png", count=1)
    gemini.batch.add_line_fault("500", match="p/10.png", count=1)
    target = f"gs://{bucket.name}/p/"
    assert run_cli(env, "batch", "submit", target).returncode == 0
    states = sorted(j["state"] for j in wait_for_jobs(env, target))
    assert states == ["FAILED", "PARTIALLY_SUCCEEDED", "SUCCEEDED"]

    applied = run_cli(env, "batch", "apply", target, "--json")
    assert applied.returncode == 1  # something is left to retry
    statuses = {n: metadata(bucket, f"p/{n}.png").get("caption-status") for n in range(12)}
    assert statuses[9] == "error:gemini-400"  # permanent, recorded as online
    assert statuses[10] is None  # transient: left
    assert sum(s == "ok" for s in statuses.values()) == 3 + 2  # 4 of job 3 less two; half of 2
    left = run_cli(env, "batch", "submit", target, "--dry-run")
    assert f"would submit {12 - 6} images" in left.stdout


def test_shards_split_at_the_byte_limit_and_every_job_is_applied(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    env = {**vertex_env, "CAPTION_BATCH_MAX_BYTES": "5000"}
    upload_many(bucket, [f"s/{i}.png" for i in range(10)])
    target = f"gs://{bucket.name}/s/"
    submitted = run_cli(env, "batch", "submit", target, "--json")
    assert submitted.returncode == 0, submitted.stderr
    report = json.loads(submitted.stdout)
    assert report["job_count"] == len(report["jobs"]) > 1
    assert sum(job["requests"] for job in report["jobs"]) == 10
    for job in report["jobs"]:
        shard = bucket.get_blob(job["shard"].removeprefix(f"gs://{bucket.name}/"))
        assert shard.size <= 5000
    wait_for_jobs(env, target)
    applied = run_cli(env, "batch", "apply", target)
    assert applied.returncode == 0, applied.stderr
    assert "done 10" in applied.stderr
    assert all(metadata(bucket, f"s/{i}.png")["caption-status"] == "ok" for i in range(10))


def test_the_api_key_mode_says_batch_needs_vertex_ai(
    stack_env: dict[str, str], bucket: Any
) -> None:
    upload(bucket, "k/a.png", png(1), "image/png")
    done = run_cli(stack_env, "batch", "submit", f"gs://{bucket.name}/k/")
    assert done.returncode == 2
    assert "GOOGLE_GENAI_USE_VERTEXAI" in done.stderr
    assert "cannot read gs:// images" in done.stderr


def shard_uris(bucket: Any, report: dict[str, Any]) -> list[str]:
    """The image URIs in the request shards a submit wrote (what its jobs will ask)."""
    uris = []
    for job in report["jobs"]:
        shard = bucket.get_blob(job["shard"].removeprefix(f"gs://{bucket.name}/"))
        for line in shard.download_as_bytes().decode().splitlines():
            key = json.loads(line)["key"]
            uris.append(key.rpartition("#")[0])
    return sorted(uris)


def submit_json(env: dict[str, str], target: str, *flags: str) -> dict[str, Any]:
    done = run_cli(env, "batch", "submit", target, "--json", *flags)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_overwrite_submits_captioned_images_again_and_apply_rewrites_them(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    names = [f"o/{i}.png" for i in range(3)]
    upload_many(bucket, names)
    target = f"gs://{bucket.name}/o/"
    first = submit_json(vertex_env, target)
    wait_for_jobs(vertex_env, target)
    assert run_cli(vertex_env, "batch", "apply", target, "--run", first["run"]).returncode == 0
    assert all(metadata(bucket, n)["caption-status"] == "ok" for n in names)
    # Our own final word, with words that the next answer will not repeat.
    for name in names:
        blob = bucket.get_blob(name)
        blob.metadata = {"caption": "words from before"}
        blob.patch()
    time.sleep(1.1)  # a caption made in the second the run is stamped counts as newer

    plain = run_cli(vertex_env, "batch", "submit", target, "--dry-run")
    assert "nothing to submit: 0 images" in plain.stdout  # done: without the flag, nothing
    stale = run_cli(vertex_env, "batch", "submit", target, "--dry-run", "--if-stale")
    assert "nothing to submit: 0 images" in stale.stdout  # same model and prompt: not stale
    second = submit_json(vertex_env, target, "--overwrite")
    assert second["images"] == 3
    assert sum(j["requests"] for j in second["jobs"]) == 3
    assert shard_uris(bucket, second) == [f"gs://{bucket.name}/{n}" for n in names]
    manifest = json.loads(
        bucket.blob(second["manifest"].removeprefix(f"gs://{bucket.name}/")).download_as_bytes()
    )
    assert manifest["overwrite"] is True

    # status and apply of one run, by --run: the first run's job is not in them.
    deadline = time.monotonic() + 60
    while True:
        status = run_cli(vertex_env, "batch", "status", target, "--run", second["run"], "--json")
        assert status.returncode in (0, 1), status.stderr
        jobs = [json.loads(line) for line in status.stdout.splitlines()]
        assert [j["job"] for j in jobs] == [j["name"] for j in second["jobs"]]
        assert {j["run"] for j in jobs} == {second["run"]}
        if all(j["state"] == "SUCCEEDED" for j in jobs):
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.3)
    everything = run_cli(vertex_env, "batch", "status", target, "--json")
    assert len(everything.stdout.splitlines()) == len(first["jobs"]) + len(second["jobs"])

    applied = run_cli(vertex_env, "batch", "apply", target, "--run", second["run"], "--json")
    assert applied.returncode == 0, applied.stderr
    reports = [json.loads(line) for line in applied.stdout.splitlines()]
    assert [r["run"] for r in reports] == [second["run"]] * len(second["jobs"])
    assert sum(r["results"].get("ok", 0) for r in reports) == 3
    for name in names:
        meta = metadata(bucket, name)
        assert meta["caption"] != "words from before", name
        assert meta["caption-status"] == "ok"
    # A run named that does not exist is a usage error, not an empty answer.
    missing = run_cli(vertex_env, "batch", "status", target, "--run", "19990101-000000-0000")
    assert missing.returncode == 2
    assert "no batch run" in missing.stderr


def test_if_stale_submits_only_captions_of_another_prompt_and_apply_rewrites_them(
    vertex_env: dict[str, str], stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"i/{i}.png" for i in range(4)])
    old = {**stack_env, "CAPTION_PROMPT": "Describe this photo in one plain sentence."}
    for n in (0, 1):
        assert run_cli(old, "backfill", f"gs://{bucket.name}/i/{n}.png").returncode == 0
    assert run_cli(stack_env, "backfill", f"gs://{bucket.name}/i/2.png").returncode == 0
    old_fingerprint = metadata(bucket, "i/0.png")["caption-prompt"]
    current = metadata(bucket, "i/2.png")["caption-prompt"]
    assert old_fingerprint != current
    kept = bucket.get_blob("i/2.png").metageneration
    target = f"gs://{bucket.name}/i/"

    plain = run_cli(vertex_env, "batch", "submit", target, "--dry-run")
    assert "would submit 1 images" in plain.stdout  # only the one never captioned
    report = submit_json(vertex_env, target, "--if-stale")
    assert report["images"] == 3
    assert shard_uris(bucket, report) == [f"gs://{bucket.name}/i/{n}.png" for n in (0, 1, 3)]
    wait_for_jobs(vertex_env, target)
    (job,) = gemini.batch.jobs
    assert sorted(u for line in job.lines for u in line.file_uris) == [
        f"gs://{bucket.name}/i/{n}.png" for n in (0, 1, 3)
    ]

    applied = run_cli(vertex_env, "batch", "apply", target, "--run", report["run"])
    assert applied.returncode == 0, applied.stderr
    assert "done 3" in applied.stderr
    for n in (0, 1, 3):
        meta = metadata(bucket, f"i/{n}.png")
        assert (meta["caption-status"], meta["caption-prompt"]) == ("ok", current), n
    assert bucket.get_blob("i/2.png").metageneration == kept  # current: not written


# ---------------------------------------------------------------- over HTTP

ALLOWED = f"batch-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def allowed_bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(ALLOWED)


@pytest.fixture(scope="module")
def batch_function(gcs: Any, gemini_thread: Any, adc_key: str) -> Iterator[FunctionServer]:
    env = {
        **vertex_function_env(gcs, gemini_thread, adc_key),
        "CAPTION_ALLOWED_BUCKETS": ALLOWED,
        "CAPTION_BATCH_MAX_REQUESTS": "5",
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def post(server: FunctionServer, body: Any) -> requests.Response:
    return requests.post(server.url, json=body, timeout=60)


def test_batch_over_http_submit_status_apply(
    batch_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    upload_many(allowed_bucket, [f"h/{i}.png" for i in range(8)])
    body = {"batch": "submit", "bucket": ALLOWED, "prefix": "h/"}
    dry = post(batch_function, {**body, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert (dry.json()["images"], dry.json()["job_count"]) == (8, 2)
    submitted = post(batch_function, body)
    assert submitted.status_code == 200, submitted.text
    names = [j["name"] for j in submitted.json()["jobs"]]
    assert len(names) == 2

    deadline = time.monotonic() + 30
    while True:
        status = post(batch_function, {"batch": "status", "job": names[0]})
        assert status.status_code == 200, status.text
        if status.json()["jobs"][0]["state"] == "SUCCEEDED":
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first = post(batch_function, {"batch": "apply", "job": names[0]})
    assert first.json()["jobs"][0]["results"] == {"ok": 5}
    run = submitted.json()["run"]
    for _ in range(100):
        rest = post(batch_function, {"batch": "apply", "bucket": ALLOWED, "run": run})
        if all(j["applied"] for j in rest.json()["jobs"]):
            break
        time.sleep(0.2)
    assert [j["applied"] for j in rest.json()["jobs"]] == [True, True]
    assert all(metadata(allowed_bucket, f"h/{i}.png")["caption-status"] == "ok" for i in range(8))

    refused = post(batch_function, {"batch": "submit", "bucket": "elsewhere"})
    assert refused.status_code == 403
    bad = post(batch_function, {"batch": "apply", "job": names[0], "run": run})
    assert bad.status_code == 400
    assert "go with 'bucket'" in bad.json()["error"]["message"]


def test_batch_over_http_overwrite_and_if_stale(
    batch_function: FunctionServer, allowed_bucket: Any, stack_env: dict[str, str], gemini: Any
) -> None:
    names = [f"f/{i}.png" for i in range(3)]
    upload_many(allowed_bucket, names)
    old = {**stack_env, "CAPTION_PROMPT": "Describe this photo in one plain sentence."}
    for name in names[:2]:
        assert run_cli(old, "backfill", f"gs://{ALLOWED}/{name}").returncode == 0
    assert run_cli(stack_env, "backfill", f"gs://{ALLOWED}/{names[2]}").returncode == 0
    body = {"batch": "submit", "bucket": ALLOWED, "prefix": "f/", "dry_run": True}
    counts = {
        flags: post(batch_function, {**body, **dict.fromkeys(flags, True)}).json()["images"]
        for flags in ((), ("if_stale",), ("overwrite",))
    }
    assert counts == {(): 0, ("if_stale",): 2, ("overwrite",): 3}
    bad = post(batch_function, {**body, "if_stale": "true"})
    assert bad.status_code == 400
    assert "'if_stale' must be true or false" in bad.json()["error"]["message"]

    stale = post(batch_function, {"batch": "submit", "bucket": ALLOWED, "prefix": "f/",
                                  "if_stale": True})  # fmt: skip
    assert stale.status_code == 200, stale.text
    assert shard_uris(allowed_bucket, stale.json()) == [f"gs://{ALLOWED}/{n}" for n in names[:2]]
    again = post(batch_function, {"batch": "submit", "bucket": ALLOWED, "prefix": "f/",
                                  "overwrite": True})  # fmt: skip
    assert again.status_code == 200, again.text
    assert shard_uris(allowed_bucket, again.json()) == [f"gs://{ALLOWED}/{n}" for n in names]

    run = stale.json()["run"]
    for _ in range(150):
        rest = post(batch_function, {"batch": "apply", "bucket": ALLOWED, "run": run})
        assert rest.status_code == 200, rest.text
        if all(j["applied"] for j in rest.json()["jobs"]):
            break
        time.sleep(0.2)
    assert [j["run"] for j in rest.json()["jobs"]] == [run]
    current = metadata(allowed_bucket, names[2])["caption-prompt"]
    assert [metadata(allowed_bucket, n)["caption-prompt"] for n in names] == [current] * 3


def test_a_dry_run_on_a_2x_model_reads_the_images_sizes_for_their_tiles(
    vertex_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    """Gemini 2.x bills 258 tokens per 768 px tile and a batch sends the original image: a
    2000 x 1500 photo is six tiles, not the one the online path's 768 px copy costs."""
    for i in range(3):
        upload(bucket, f"t/{i}.png", images.encode(images.solid((2000, 1500)), "PNG"), "image/png")
    target = f"gs://{bucket.name}/t/"
    dry = run_cli(vertex_env, "batch", "submit", target, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["image_sizes_read"] == 3
    assert report["estimated_tokens"]["image_tokens"] == 3 * 6 * 258
    three = run_cli({**vertex_env, "CAPTION_MODEL": "gemini-3-flash-preview"},
                    "batch", "submit", target, "--dry-run", "--json")  # fmt: skip
    assert json.loads(three.stdout)["image_sizes_read"] == 0  # Gemini 3 bills by resolution

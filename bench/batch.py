"""Batch backfill: how fast `batch apply` writes captions and `batch submit` writes
requests, and whether their memory depends on how many there are.

    .venv/bin/python -m bench.batch [--apply 2000,8000] [--submit 20000,100000]

Apply runs against a real fake-gcs-server: N objects are created, a predictions.jsonl of
N answers (Vertex AI's shape, as the emulator writes it) is written next to a manifest,
and ``BatchJobs.follow(apply)`` reads it back through google-cloud-storage and GETs and
PATCHes every object through the async JSON client, as in production. Submit lists
through a fake lister (populating fake-gcs with 100,000 objects takes longer than the
run itself) and writes real shards to fake-gcs with resumable uploads. Peak memory is
the process's resident set, sampled every 20 ms, above what it was before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from captioner.adapters.storage import StorageClient
from captioner.adapters.vertex_batch import (
    GcsBlobs,
    read_answer,
    read_status,
    storage_client,
    template_for,
)
from captioner.batch_jobs import (
    BatchFollowRequest,
    BatchJobs,
    BatchLimits,
    BatchSubmitRequest,
    JobStatus,
    Manifest,
    RequestKey,
    RunPaths,
)
from captioner.batch_jobs.templates import request_line
from captioner.domain import ObjectInfo, Usage
from captioner.metadata import MetadataKeys
from captioner.recording import Recorder
from captioner.settings import Settings
from captioner_dev.gcs import FakeGcs, free_port

PAGE = 4096
JOB = "projects/p/locations/us-central1/batchPredictionJobs/1"


class RssPeak:
    """The resident set's peak above its level at the start, sampled in a thread."""

    def __init__(self) -> None:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class DoneJobs:
    """A job that has finished, writing its output where the manifest says."""

    def __init__(self, status: JobStatus) -> None:
        self.status = status
        self.created = 0

    async def create(self, *, model: str, source: str, dest: str, display_name: str) -> JobStatus:
        self.created += 1
        return JobStatus(
            f"projects/p/locations/us-central1/batchPredictionJobs/{self.created}",
            "QUEUED",
            source,
            dest,
        )

    async def get(self, name: str) -> JobStatus:
        return self.status


def service(settings: Settings, storage: StorageClient, jobs: Any, template: Any) -> BatchJobs:
    return BatchJobs(
        lister=storage,
        recorder_for=lambda m: Recorder(storage, m.keys, m.model),
        blobs=GcsBlobs(storage_client()),
        jobs=jobs,
        template_for=template,
        read_answer=read_answer,
        read_status=read_status,
        model=settings.model,
        rules=settings.rule_book(),
        keys=MetadataKeys(),
        batch_prefix=settings.batch_prefix,
        limits=BatchLimits(settings.batch_max_requests, settings.batch_max_bytes),
        max_bytes=settings.max_bytes,
        estimate=Usage(330, 80, 0, 258, 1),
        concurrency=settings.batch_apply_concurrency,
    )


def answer_line(key: RequestKey, spec: str) -> str:
    text = json.dumps({"caption": f"A test image {key.name}.", "alt_text": "Test.", "tags": ["x"]})
    response = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                        "finishReason": "STOP"}],
        "modelVersion": "gemini-2.5-flash-001",
        "usageMetadata": {"promptTokenCount": 330, "candidatesTokenCount": 25},
    }  # fmt: skip
    request = {"contents": [{"role": "user", "parts": [{"fileData": {"file_uri": key.uri}}]}]}
    return json.dumps(
        {"key": key.text, "spec": spec, "request": request, "status": "",
         "processed_time": "2026-11-30T10:00:00Z", "response": response}
    )  # fmt: skip


async def populate(session: aiohttp.ClientSession, url: str, bucket: str, n: int) -> list[int]:
    upload = f"{url}/upload/storage/v1/b/{bucket}/o"
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> int:
        async with sem, session.post(
            upload, params={"uploadType": "media", "name": f"a/{i:06}.png"},
            data=b"\x89PNG fake", headers={"Content-Type": "image/png"},
        ) as response:  # fmt: skip
            return int((await response.json())["generation"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def serve_json_api(port: int) -> None:
    """A minimal Cloud Storage JSON API (GET an object, PATCH its metadata under the
    generation and metageneration preconditions), kept in a dict, in its own process:
    fake-gcs-server's PATCH slows as a bucket fills (562/s at 500 objects, 138/s at 4,000
    here), so it cannot show what one apply process itself can do."""
    from aiohttp import web

    objects: dict[str, dict[str, Any]] = {}

    def current(bucket: str, name: str) -> dict[str, Any]:
        generation = 1_764_000_000_000_000 + int(name.split("/")[-1].split(".")[0])
        return objects.setdefault(
            f"{bucket}/{name}", {"bucket": bucket, "name": name, "generation": str(generation),
                   "metageneration": "1", "contentType": "image/png", "size": "9",
                   "metadata": {}},
        )  # fmt: skip

    async def get(request: web.Request) -> web.Response:
        return web.json_response(current(request.match_info["b"], request.match_info["o"]))

    async def patch(request: web.Request) -> web.Response:
        item = current(request.match_info["b"], request.match_info["o"])
        q = request.query
        if (
            q.get("ifGenerationMatch") != item["generation"]
            or q.get("ifMetagenerationMatch", item["metageneration"]) != item["metageneration"]
        ):
            return web.json_response({"error": {"code": 412}}, status=412)
        item["metadata"] = {**item["metadata"], **(await request.json())["metadata"]}
        item["metageneration"] = str(int(item["metageneration"]) + 1)
        return web.json_response(item)

    app = web.Application()
    app.router.add_get("/storage/v1/b/{b}/o/{o}", get)
    app.router.add_patch("/storage/v1/b/{b}/o/{o}", patch)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def bench_apply(gcs: FakeGcs, n: int, json_api: str | None = None) -> dict[str, Any]:
    settings = Settings()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client = storage_client()
    client.create_bucket(bucket)
    spec = settings.rule_book().default
    if json_api is None:
        async with aiohttp.ClientSession() as session:
            generations = await populate(session, gcs.url, bucket, n)
    else:
        generations = [1_764_000_000_000_000 + i for i in range(n)]
    run = "20261130-090000-beef"
    paths = RunPaths.of(bucket, settings.batch_prefix, run)
    out = f"{paths.root}output-00000/prediction-model-1/predictions.jsonl"
    keys = [RequestKey(bucket, f"a/{i:06}.png", g) for i, g in enumerate(generations)]
    lines = "\n".join(answer_line(key, spec.fingerprint) for key in keys)
    client.bucket(bucket).blob(out).upload_from_string(lines + "\n")
    # The request file apply checks every answer against (what submit would have written).
    requests = b"".join(request_line(key, spec, "{}") for key in keys)
    client.bucket(bucket).blob(paths.shard(0)).upload_from_string(requests)
    manifest = Manifest(run, bucket, "a/", settings.model, "2026-11-30T09:00:00Z", "caption",
                        ("en",), specs={spec.fingerprint: spec})  # fmt: skip
    output_dir = f"gs://{bucket}/{paths.root}output-00000/prediction-model-1"
    status = JobStatus(
        JOB, "SUCCEEDED", f"gs://{bucket}/{paths.shard(0)}", paths.dest(0), output_dir
    )
    from captioner.batch_jobs import JobEntry

    manifest.jobs.append(JobEntry(JOB, status.source or "", status.dest or "", n, 0))
    client.bucket(bucket).blob(paths.manifest).upload_from_string(json.dumps(manifest.as_json()))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        storage = StorageClient(session, endpoint=json_api or gcs.url, emulator=True)
        jobs = service(settings, storage, DoneJobs(status), None)
        request = BatchFollowRequest("apply", (), bucket, "a/", run)
        with RssPeak() as rss:
            started = time.perf_counter()
            (report,) = [r async for r in jobs.follow(request)]
            seconds = time.perf_counter() - started
        again_started = time.perf_counter()
        request_again = BatchFollowRequest("apply", (JOB,))
        client.bucket(bucket).blob(paths.checkpoint(JOB)).delete()
        (again,) = [r async for r in jobs.follow(request_again)]
        again_seconds = time.perf_counter() - again_started
    assert report.totals.counts["ok"] == n, report.totals.as_dict()
    assert again.totals.skipped["already-captioned"] == n
    return {
        "json_api": "minimal" if json_api else "fake-gcs-server",
        "lines": n,
        "seconds": round(seconds, 2),
        "captions_per_second": round(n / seconds),
        "peak_rss_growth_mb": round(rss.growth_mb, 1),
        "second_apply_seconds_no_checkpoint": round(again_seconds, 2),
        "second_apply_writes": 0,
    }


async def bench_submit(gcs: FakeGcs, n: int) -> dict[str, Any]:
    from google.oauth2.credentials import Credentials

    from captioner.adapters.gemini import GeminiDescriber, make_client

    settings = Settings()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    storage_client().create_bucket(bucket)
    env = {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_CLOUD_PROJECT": "p",
           "GOOGLE_CLOUD_LOCATION": "us-central1"}  # fmt: skip
    client = make_client(10, env, credentials=Credentials(token="t"))  # type: ignore[no-untyped-call]
    describer = GeminiDescriber(client, model=settings.model, prompt=settings.prompt,
                                max_output_tokens=1024, attempts=1, timeout=10)  # fmt: skip

    class FakeLister:
        async def list_objects(self, bucket: str, prefix: str = "") -> AsyncIterator[ObjectInfo]:
            for i in range(n):
                if i % 1000 == 0:
                    await asyncio.sleep(0)  # a page
                yield ObjectInfo(bucket, f"{prefix}{i:07}.jpg", 1764000000000000 + i, 1,
                                 "image/jpeg", 250_000)  # fmt: skip

    jobs = DoneJobs(JobStatus("x", "QUEUED"))
    async with StorageClient.opened() as storage:
        batch = service(settings, storage, jobs, template_for(describer, client))
        batch._lister = FakeLister()  # listing without 100,000 objects in fake-gcs
        with RssPeak() as rss:
            started = time.perf_counter()
            report = await batch.submit(BatchSubmitRequest(bucket, "photos/"))
            seconds = time.perf_counter() - started
    await client.aio.aclose()
    sizes = [j.bytes for j in report.jobs]
    return {
        "objects": n,
        "seconds": round(seconds, 2),
        "objects_per_second": round(n / seconds),
        "jobs": len(report.jobs),
        "shard_mb": round(sum(sizes) / 1e6, 1),
        "peak_rss_growth_mb": round(rss.growth_mb, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apply", default="2000,8000")
    parser.add_argument("--submit", default="20000,100000")
    parser.add_argument(
        "--minimal-only", action="store_true", help="apply against the minimal JSON API only"
    )
    args = parser.parse_args()
    with FakeGcs() as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        port = free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=serve_json_api, args=(port,), daemon=True
        )
        server.start()
        await asyncio.sleep(1.5)
        for n in [int(x) for x in args.apply.split(",") if x]:
            if not args.minimal_only:
                print(json.dumps({"apply": await bench_apply(gcs, n)}), flush=True)
            minimal = await bench_apply(gcs, n, f"http://127.0.0.1:{port}")
            print(json.dumps({"apply": minimal}), flush=True)
        server.terminate()
        for n in [int(x) for x in args.submit.split(",") if x]:
            print(json.dumps({"submit": await bench_submit(gcs, n)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())

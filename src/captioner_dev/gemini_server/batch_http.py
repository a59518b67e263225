"""The batch emulator's HTTP side: Vertex AI's ``batchPredictionJobs`` routes (create, get,
list, cancel, delete) and the ``/_stub/batch`` control route. See batch.py for the shapes and
their sources."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from captioner_dev.gemini_server.answer import Answerer
from captioner_dev.gemini_server.batch import BatchJob, BatchSettings
from captioner_dev.gemini_server.batch_run import BatchRunner
from captioner_dev.gemini_server.config import StubConfigError
from captioner_dev.gemini_server.oauth import TokenIssuer
from captioner_dev.gemini_server.wire import ApiError, dumps, get_field, json_error

_JOBS: Final = "/{version:v1|v1beta1}/projects/{project}/locations/{location}/batchPredictionJobs"
_DEFAULT_PAGE_SIZE: Final = 100


class BatchEmulator(BatchSettings):
    """Vertex AI batch prediction jobs over Cloud Storage, answered like online requests.

    ``storage_endpoint`` is fake-gcs-server's URL; None reads ``STORAGE_EMULATOR_HOST`` when a
    job runs."""

    def __init__(
        self,
        answerer: Answerer,
        sleep: Callable[[float], Awaitable[bool]],
        storage_endpoint: str | None = None,
        issuer: TokenIssuer | None = None,
    ) -> None:
        super().__init__()
        self.storage_endpoint = storage_endpoint
        self._issuer = issuer or TokenIssuer()
        self._runner = BatchRunner(self, answerer, sleep, self._endpoint)
        self._tasks: set[asyncio.Task[None]] = set()

    def _endpoint(self) -> str | None:
        return self.storage_endpoint or os.environ.get("STORAGE_EMULATOR_HOST")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_stub/batch", self._http_stub_get)
        app.router.add_post("/_stub/batch", self._http_stub_post)
        app.router.add_post(_JOBS, self._http_create)
        app.router.add_get(_JOBS, self._http_list)
        app.router.add_get(_JOBS + "/{job}", self._http_get)
        app.router.add_delete(_JOBS + "/{job}", self._http_delete)
        # aiohttp's "{job}" takes "ID:cancel" whole; the action is split off in the handler.
        app.router.add_post(_JOBS + "/{job}", self._http_action)

    async def aclose(self) -> None:
        """Stops the jobs still running (on the server's loop, when it stops)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def config_and_jobs_json(self) -> dict[str, Any]:
        with self.lock:
            jobs = [job.to_json() for job in self._jobs.values()]
        return {"config": self.config_json(), "jobs": jobs}

    # -- Vertex AI routes -------------------------------------------------------------------

    async def _http_create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
            job = _job_from_request(body, request, self.new_id())
            job.bearer_issued = (
                self._issuer.issued_to(request.headers.get("Authorization", "")) is not None
            )
        except (ValueError, RecursionError) as exc:
            return json_error(ApiError(400, f"Invalid JSON payload received. {exc}"))
        except ApiError as error:
            return json_error(error)
        self.add_job(job)
        task = asyncio.create_task(self._runner.run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self._job_response(job)

    async def _http_get(self, request: web.Request) -> web.Response:
        try:
            return self._job_response(self._job_of(request, request.match_info["job"]))
        except ApiError as error:
            return json_error(error)

    async def _http_list(self, request: web.Request) -> web.Response:
        # ``filter`` is accepted and ignored: every job of the location is listed, newest first.
        info, query = request.match_info, request.query
        jobs = self.live_jobs(info["project"], info["location"])[::-1]
        size = query.get("pageSize", "")
        token = query.get("pageToken", "")
        page_size = int(size) if size.isdigit() and int(size) > 0 else _DEFAULT_PAGE_SIZE
        start = int(token) if token.isdigit() else 0
        with self.lock:
            page = [job.resource() for job in jobs[start : start + page_size]]
        body: dict[str, Any] = {"batchPredictionJobs": page} if page else {}
        if start + page_size < len(jobs):
            body["nextPageToken"] = str(start + page_size)
        return web.json_response(body, dumps=dumps)

    async def _http_action(self, request: web.Request) -> web.Response:
        job_id, _, action = request.match_info["job"].partition(":")
        try:
            if action != "cancel":
                raise ApiError(404, f"Method not found: POST {request.path}")
            job = self._job_of(request, job_id)
            with self.lock:
                if job.done:
                    raise ApiError(
                        400,
                        f"The BatchPredictionJob {job.name} is in state {job.state} and cannot "
                        "be cancelled.",
                        status="FAILED_PRECONDITION",
                    )
                job.cancel_requested = True
                job.set_state("JOB_STATE_CANCELLING")
        except ApiError as error:
            return json_error(error)
        return web.json_response({})  # google.protobuf.Empty

    async def _http_delete(self, request: web.Request) -> web.Response:
        try:
            job = self._job_of(request, request.match_info["job"])
            if not job.done:
                raise ApiError(
                    400,
                    f"The BatchPredictionJob {job.name} is in state {job.state}: only a "
                    "finished job can be deleted.",
                    status="FAILED_PRECONDITION",
                )
        except ApiError as error:
            return json_error(error)
        self.remove(job.id)
        info = request.match_info
        operation = f"projects/{info['project']}/locations/{info['location']}/operations/{job.id}"
        return web.json_response({"name": operation, "done": True, "response": {}})

    def _job_of(self, request: web.Request, job_id: str) -> BatchJob:
        info = request.match_info
        job = self.find(info["project"], info["location"], job_id)
        if job is None:
            name = f"projects/{info['project']}/locations/{info['location']}"
            raise ApiError(
                404, f"BatchPredictionJob {name}/batchPredictionJobs/{job_id} not found."
            )
        return job

    def _job_response(self, job: BatchJob) -> web.Response:
        with self.lock:
            resource = job.resource()
        return web.json_response(resource, dumps=dumps)

    # -- control route ----------------------------------------------------------------------

    async def _http_stub_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.config_and_jobs_json(), dumps=dumps)

    async def _http_stub_post(self, request: web.Request) -> web.Response:
        try:
            self.configure_json(json.loads(await request.read() or b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError, StubConfigError) as exc:
            return json_error(ApiError(400, f"Invalid batch config: {exc}"))
        return web.json_response(self.config_json())


def _job_from_request(body: Any, request: web.Request, job_id: str) -> BatchJob:
    """A new job from a create request, or the 400 the request deserves."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "Invalid JSON payload received. Expected an object.")
    model = body.get("model")
    display_name = get_field(body, "display_name")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "BatchPredictionJob.model is required.")
    if not isinstance(display_name, str) or not display_name:
        raise ApiError(400, "BatchPredictionJob.display_name is required.")
    input_config = get_field(body, "input_config")
    output_config = get_field(body, "output_config")
    uris = _input_uris(input_config)
    prefix = _output_prefix(output_config)
    labels = body.get("labels")
    info = request.match_info
    authorization = request.headers.get("Authorization", "")
    return BatchJob(
        id=job_id,
        project=info["project"],
        location=info["location"],
        api_version=info["version"],
        display_name=display_name,
        model=model,
        input_uris=uris,
        output_prefix=prefix,
        input_config=dict(input_config),
        output_config=dict(output_config),
        bearer_present=authorization.lower().startswith("bearer "),
        create_time=time.time(),
        labels=dict(labels) if isinstance(labels, Mapping) else None,
    )


def _input_uris(config: Any) -> list[str]:
    if not isinstance(config, Mapping):
        raise ApiError(400, "BatchPredictionJob.input_config is required.")
    if get_field(config, "bigquery_source") is not None:
        raise ApiError(400, "The stand-in emulates Cloud Storage input only, not BigQuery.")
    if get_field(config, "instances_format") != "jsonl":
        raise ApiError(400, "input_config.instances_format must be 'jsonl' for Gemini models.")
    source = get_field(config, "gcs_source")
    uris = source.get("uris") if isinstance(source, Mapping) else None
    if isinstance(uris, str):
        uris = [uris]
    if not isinstance(uris, list) or not uris:
        raise ApiError(400, "input_config.gcs_source.uris is required.")
    for uri in uris:
        if not isinstance(uri, str) or not uri.startswith("gs://") or "*" in uri:
            raise ApiError(400, f"Invalid Cloud Storage input URI {uri!r} (no wildcards here).")
    return list(uris)


def _output_prefix(config: Any) -> str:
    if not isinstance(config, Mapping):
        raise ApiError(400, "BatchPredictionJob.output_config is required.")
    if get_field(config, "bigquery_destination") is not None:
        raise ApiError(400, "The stand-in emulates Cloud Storage output only, not BigQuery.")
    if get_field(config, "predictions_format") != "jsonl":
        raise ApiError(400, "output_config.predictions_format must be 'jsonl' for Gemini models.")
    destination = get_field(config, "gcs_destination")
    prefix = (
        get_field(destination, "output_uri_prefix") if isinstance(destination, Mapping) else None
    )
    if not isinstance(prefix, str) or not prefix.startswith("gs://") or prefix == "gs://":
        raise ApiError(400, "output_config.gcs_destination.output_uri_prefix must be gs://….")
    return prefix

"""Batch backfill with Vertex AI batch prediction: plan, submit, follow and apply jobs.

Pure of vendor imports: Vertex AI and the google-cloud-storage streams come in through
the small protocols below (``captioner.adapters.vertex_batch`` implements them), so the
rules here are tested with in-memory fakes.

- **submit** lists a prefix with the backfill's own rules (``decisions.decide``), writes
  one JSON line per image (``{"key": "gs://bucket/name#generation", "spec": <prompt
  hash>, "request": <the generateContent body the online path sends, with the image as
  a gs:// fileData>}``) into shards that respect the per-job limits, submits one job per
  shard and stores the run's manifest (``jobs.json``) next to the shards, so that any
  machine can follow it.
- **apply** streams a finished job's output and writes each answer exactly as the
  online path does (``recording.verdict`` + ``Recorder.write``): the generation in the
  key is the write's ``ifGenerationMatch``, so an object replaced since the request is
  never captioned with the old image's words. A checkpoint of the output read so far
  makes it resumable; applying twice writes nothing the second time.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from captioner.batch import Lister, Totals
from captioner.captions import CaptionSpec, InvalidAnswerError, with_captions
from captioner.concurrency import bounded_as_completed
from captioner.decisions import Skip, decide, has_final_word
from captioner.domain import CaptionResult, Description, ObjectInfo, ObjectRef, Outcome, Usage
from captioner.errors import BadRequestError, PermanentError, TransientError
from captioner.metadata import MetadataKeys, is_done
from captioner.recording import Recorder, Verdict, result_for, verdict
from captioner.rules import RuleBook

# Vertex AI's documented per-job limits for Gemini batch inference from Cloud Storage
# (https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini,
# "Quotas and limits", read 2026-11-29): "up to 200,000 requests" per job and a 1 GB file
# size limit with Cloud Storage input. 10**9 bytes is within 1 GB and 1 GiB alike.
MAX_REQUESTS_PER_JOB = 200_000
MAX_BYTES_PER_JOB = 1_000_000_000

# Image types Gemini reads from a fileData URI (the online path converts others, such as
# GIF, before sending; a batch request cannot, so those are left to `captioner backfill`).
_GEMINI_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"}
)
_SUFFIX_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".heif": "image/heif",
}

# Job states (google.genai.types.JobState without its JOB_STATE_ prefix).
RUNNING_STATES = frozenset({"QUEUED", "PENDING", "RUNNING", "CANCELLING", "UPDATING", "PAUSED"})
ENDED_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"})

# Answers that the online path asks for a second time (cut at the output cap, empty, off
# the schema). A batch has no second time, so they are left to the next run, where the
# online path gets its second chance, rather than recorded as final.
_SECOND_CHANCE = "left for the next run, which asks again with the online path's second chance"


# ---------------------------------------------------------------- requests and keys


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_requests: int = MAX_REQUESTS_PER_JOB
    max_bytes: int = MAX_BYTES_PER_JOB


@dataclass(frozen=True, slots=True)
class RequestKey:
    """Names the object and the generation a request describes: ``gs://b/name#123``."""

    bucket: str
    name: str
    generation: int

    @property
    def text(self) -> str:
        return f"gs://{self.bucket}/{self.name}#{self.generation}"

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.bucket, self.name, self.generation)

    @classmethod
    def parse(cls, text: str) -> RequestKey:
        """The inverse of ``text``; names may hold ``#``, the generation is the last part."""
        if not text.startswith("gs://"):
            raise ValueError(f"not a request key: {text[:100]!r}")
        where, sep, generation = text[len("gs://") :].rpartition("#")
        bucket, slash, name = where.partition("/")
        if not (sep and slash and bucket and name and generation.isdigit()):
            raise ValueError(f"not a request key: {text[:100]!r}")
        return cls(bucket, name, int(generation))


def batch_mime_type(info: ObjectInfo) -> str | None:
    """The MIME type to send for this object, or None when Gemini cannot read it as is."""
    content_type = info.content_type.split(";")[0].strip().lower()
    if content_type in _GEMINI_IMAGE_TYPES:
        return content_type
    if content_type.startswith("image/"):
        return None
    suffix = "." + info.name.rsplit(".", 1)[-1].lower() if "." in info.name else ""
    return _SUFFIX_TYPES.get(suffix)


def online_only(info: ObjectInfo, max_bytes: int) -> Skip | None:
    """Why an image that needs a caption cannot go in a batch request (the online
    backfill records or converts these), or None when it can."""
    if info.size == 0:
        return Skip("online-only", "empty: `captioner backfill` records it as error:empty")
    if info.size > max_bytes:
        return Skip("online-only", f"{info.size} bytes is over CAPTION_MAX_BYTES")
    if batch_mime_type(info) is None:
        return Skip("online-only", f"Gemini does not read {info.content_type!r} as is")
    return None


class RequestTemplate(Protocol):
    """The generateContent body for one spec, with the image's URI and type to fill in."""

    def render(self, uri: str, mime_type: str) -> str: ...


@dataclass(frozen=True, slots=True)
class JsonTemplate:
    """A request body serialized once, with placeholder strings where the image goes:
    rendering is two string replacements, not a conversion per image."""

    text: str
    uri_placeholder: str = "__captioner_uri__"
    mime_placeholder: str = "__captioner_mime__"

    def render(self, uri: str, mime_type: str) -> str:
        return self.text.replace(
            json.dumps(self.uri_placeholder), json.dumps(uri, ensure_ascii=False)
        ).replace(json.dumps(self.mime_placeholder), json.dumps(mime_type))


def request_line(key: RequestKey, spec: CaptionSpec, body: str) -> bytes:
    """One line of a request shard: the key, the spec's hash and the request body."""
    head = json.dumps({"key": key.text, "spec": spec.fingerprint}, ensure_ascii=False)
    return (head[:-1] + ', "request": ' + body + "}\n").encode("utf-8")


@dataclass
class ShardPlanner:
    """Where one shard ends and the next begins, within the per-job limits."""

    limits: BatchLimits
    shards: int = 0
    requests: int = 0  # in the current shard
    bytes: int = 0
    total: int = 0

    def add(self, size: int) -> bool:
        """Count a line of ``size`` bytes; True when it starts a new shard."""
        if size > self.limits.max_bytes:
            raise PermanentError("request-too-large", f"one request is {size} bytes")
        new = (
            self.shards == 0
            or self.requests >= self.limits.max_requests
            or self.bytes + size > self.limits.max_bytes
        )
        if new:
            self.shards += 1
            self.requests, self.bytes = 0, 0
        self.requests += 1
        self.bytes += size
        self.total += 1
        return new


# ---------------------------------------------------------------- the run's manifest


def new_run_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class JobEntry:
    name: str
    shard: str  # gs:// URI of the request file
    dest: str  # gs:// prefix Vertex AI writes the output under
    requests: int
    bytes: int


@dataclass
class Manifest:
    """``gs://<bucket>/<CAPTION_BATCH_PREFIX><run>/jobs.json``: what a run submitted."""

    run: str
    bucket: str
    prefix: str
    model: str
    created: str  # RFC 3339: an answer is never written over a caption made after it
    metadata_prefix: str
    languages: tuple[str, ...]
    overwrite: bool = False
    if_stale: bool = False
    specs: dict[str, CaptionSpec] = field(default_factory=dict)
    jobs: list[JobEntry] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "model": self.model,
            "created": self.created,
            "metadata_prefix": self.metadata_prefix,
            "languages": list(self.languages),
            "overwrite": self.overwrite,
            "if_stale": self.if_stale,
            "specs": {
                fp: {
                    "prompt": s.prompt,
                    "structured": s.structured,
                    "languages": list(s.languages),
                    "rule": s.rule,
                }
                for fp, s in self.specs.items()
            },
            "jobs": [
                {
                    "name": j.name,
                    "shard": j.shard,
                    "dest": j.dest,
                    "requests": j.requests,
                    "bytes": j.bytes,
                }
                for j in self.jobs
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            specs = {
                str(fp): CaptionSpec(
                    str(s["prompt"]), bool(s["structured"]), tuple(s["languages"]), str(s["rule"])
                )
                for fp, s in data["specs"].items()
            }
            jobs = [
                JobEntry(
                    str(j["name"]),
                    str(j["shard"]),
                    str(j["dest"]),
                    int(j["requests"]),
                    int(j["bytes"]),
                )
                for j in data["jobs"]
            ]
            return cls(
                str(data["run"]),
                str(data["bucket"]),
                str(data["prefix"]),
                str(data["model"]),
                str(data["created"]),
                str(data["metadata_prefix"]),
                tuple(data["languages"]),
                bool(data.get("overwrite")),
                bool(data.get("if_stale")),
                specs,
                jobs,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PermanentError(
                "bad-manifest", f"a batch manifest cannot be read: {exc!r}"
            ) from None

    @property
    def keys(self) -> MetadataKeys:
        return MetadataKeys(self.metadata_prefix, self.languages)

    @property
    def created_at(self) -> datetime:
        return _parse_time(self.created)


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class RunPaths:
    """Where one run keeps its files, under ``gs://<bucket>/<batch prefix><run>/``."""

    bucket: str
    root: str  # e.g. "captioner-batch/20261130-101500-ab12/"

    @classmethod
    def of(cls, bucket: str, batch_prefix: str, run: str) -> RunPaths:
        return cls(bucket, f"{batch_prefix}{run}/")

    @classmethod
    def from_shard(cls, shard_uri: str) -> RunPaths:
        """The run a request shard belongs to (a job names its shard as its source)."""
        bucket, _, name = shard_uri.removeprefix("gs://").partition("/")
        root, slash, _ = name.rpartition("/")
        if not (bucket and slash):
            raise PermanentError("not-ours", f"{shard_uri} is not a captioner request shard")
        return cls(bucket, root + "/")

    @property
    def manifest(self) -> str:
        return self.root + "jobs.json"

    def shard(self, index: int) -> str:
        return f"{self.root}requests-{index:05}.jsonl"

    def dest(self, index: int) -> str:
        return f"gs://{self.bucket}/{self.root}output-{index:05}/"

    def checkpoint(self, job: str) -> str:
        return f"{self.root}applied-{job.rsplit('/', 1)[-1]}.json"


# ---------------------------------------------------------------- the outside world


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A batch prediction job as Vertex AI reports it."""

    name: str
    state: str  # QUEUED ... SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED
    source: str | None = None
    dest: str | None = None
    output_dir: str | None = None
    error: str | None = None
    succeeded: int | None = None
    failed: int | None = None
    incomplete: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


class Jobs(Protocol):
    async def create(
        self, *, model: str, source: str, dest: str, display_name: str
    ) -> JobStatus: ...

    async def get(self, name: str) -> JobStatus: ...


class LineWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class Blobs(Protocol):
    """Large or whole files in Cloud Storage (shards, outputs, manifests, checkpoints)."""

    def writer(self, bucket: str, name: str, content_type: str) -> LineWriter: ...

    async def read_json(self, bucket: str, name: str) -> dict[str, Any] | None: ...

    async def write_json(self, bucket: str, name: str, data: Mapping[str, Any]) -> None: ...

    async def names(self, bucket: str, prefix: str) -> list[str]: ...

    def lines(self, bucket: str, name: str, offset: int) -> AsyncIterator[tuple[int, bytes]]:
        """Lines from byte ``offset`` on, each with the offset just past it."""
        ...


# An answer (the output line's ``response``) as the online path reads one; raises
# TransientError / PermanentError as it would.
ReadAnswer = Callable[[Mapping[str, Any], str], Description]
# A per-request error (the output line's ``status``) as the error the online path would
# raise for the same answer from Gemini.
ReadStatus = Callable[[Any], Exception]
TemplateFor = Callable[[CaptionSpec], RequestTemplate]


# ---------------------------------------------------------------- output lines


@dataclass(frozen=True, slots=True)
class OutputLine:
    key: RequestKey | None  # None: the line lost our key; ``uri`` names the image
    spec: str | None
    response: Mapping[str, Any] | None
    status: Any  # "" or None when the request succeeded
    uri: str | None = None


def parse_output_line(raw: bytes) -> OutputLine:
    """One line of ``predictions.jsonl``: the input line with its ``response`` or an
    error ``status``. Raises ValueError for a line not ours.

    Vertex AI documents that an output line holds the input ``request``; that it also
    copies other top-level fields of a Cloud Storage input line (our ``key`` and
    ``spec``) is what the emulator does, not something Google's pages promise. A line
    without them is read by the image URI in its echoed ``request`` instead, and
    ``_Applier`` finds the key and spec in the job's own request file."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    response = data.get("response")
    response = response if isinstance(response, dict) and response else None
    status = data.get("status") or None
    key_text = data.get("key")
    if not isinstance(key_text, str):
        uri = request_uri(data.get("request"))
        if uri is None:
            raise ValueError("no key, and no gs:// image in the request")
        return OutputLine(None, None, response, status, uri)
    spec = data.get("spec")
    return OutputLine(
        RequestKey.parse(key_text), spec if isinstance(spec, str) else None, response, status
    )


def _field(data: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field of a request as sent (camelCase) or as Google's example output shows it
    echoed (snake_case: ``file_data``, ``file_uri``)."""
    return data.get(camel, data.get(snake))


def request_uri(request: Any) -> str | None:
    """The gs:// URI of the image in a GenerateContentRequest (ours hold exactly one)."""
    if not isinstance(request, dict):
        return None
    for content in request.get("contents") or ():
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            file_data = _field(part, "fileData", "file_data") if isinstance(part, dict) else None
            if isinstance(file_data, dict):
                uri = _field(file_data, "fileUri", "file_uri")
                if isinstance(uri, str) and uri.startswith("gs://"):
                    return uri
    return None


def _request_head(raw: bytes) -> tuple[RequestKey, str] | None:
    """The key and spec of one of our request lines, without parsing its request."""
    head, sep, _ = raw.partition(b', "request": ')
    try:
        data = json.loads(head + b"}") if sep else json.loads(raw)
        return RequestKey.parse(data["key"]), str(data["spec"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- requests of the edges


@dataclass(frozen=True, slots=True)
class BatchSubmitRequest:
    bucket: str
    prefix: str = ""
    overwrite: bool = False
    if_stale: bool = False
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class BatchFollowRequest:
    """``status`` or ``apply``: named jobs, or the runs stored for a bucket and prefix
    (one run with ``run``)."""

    action: str  # "status" | "apply"
    jobs: tuple[str, ...] = ()
    bucket: str | None = None
    prefix: str = ""
    run: str | None = None


BatchRequest = BatchSubmitRequest | BatchFollowRequest


@dataclass
class SubmitReport:
    run: str | None
    images: int
    jobs: list[JobEntry]
    totals: Totals
    estimate: Usage
    cost: float | None  # US dollars at the batch price, when the model's price is known
    manifest: str | None = None
    shards: int = 0  # jobs submitted, or that a dry run would submit

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "images": self.images,
            "job_count": self.shards,
            "jobs": [{"name": j.name, "requests": j.requests, "shard": j.shard} for j in self.jobs],
            "manifest": self.manifest,
            "estimated_tokens": self.estimate.as_fields(),
            "estimated_cost_usd": None if self.cost is None else round(self.cost, 2),
            "skipped_by_reason": dict(self.totals.skipped.most_common()),
        }


@dataclass
class JobReport:
    """One job: its state, and what applying it did (or would do)."""

    status: JobStatus
    run: str
    requests: int
    applied: bool = False
    lines: int = 0
    totals: Totals = field(default_factory=Totals)
    note: str | None = None

    def as_json(self) -> dict[str, Any]:
        s = self.status
        entry: dict[str, Any] = {
            "job": s.name,
            "run": self.run,
            "state": s.state,
            "requests": self.requests,
            "applied": self.applied,
        }
        for name in ("succeeded", "failed", "incomplete", "error", "output_dir"):
            if getattr(s, name) is not None:
                entry[name] = getattr(s, name)
        if self.lines:
            totals = self.totals.as_dict()
            entry["lines"] = self.lines
            entry["results"] = {o.value: totals[o.value] for o in Outcome if totals[o.value]}
            entry["skipped_by_reason"] = totals["skipped_by_reason"]
        if self.note:
            entry["note"] = self.note
        return entry


# ---------------------------------------------------------------- prices


# List prices per 1M tokens (input, output; thinking is billed as output), online, for
# the Gemini API and Vertex AI (https://ai.google.dev/gemini-api/docs/pricing and
# https://cloud.google.com/vertex-ai/generative-ai/pricing, as in README "Models", read
# 2026-11-25). Batch is half of these.
_PRICES = {
    (2, "flash"): (0.30, 2.50),
    (2, "flash-lite"): (0.10, 0.40),
    (2, "pro"): (1.25, 10.00),
    (3, "flash"): (0.50, 3.00),
    (3, "pro"): (2.00, 12.00),
}
BATCH_DISCOUNT = 0.5


def batch_cost(model: str, usage: Usage) -> float | None:
    """US dollars for ``usage`` at half the online list price, or None when unknown."""
    from captioner.models import family_of

    family = family_of(model)
    prices = _PRICES.get((min(family.major, 3), family.tier))
    if family.major < 2 or (family.major, family.minor) == (2, 0) or prices is None:
        return None
    input_price, output_price = prices
    billed_output = usage.output_tokens + usage.thoughts_tokens
    online = (usage.prompt_tokens * input_price + billed_output * output_price) / 1e6
    return online * BATCH_DISCOUNT


# ---------------------------------------------------------------- checkpoints


class Watermark:
    """The byte offset up to which every line is applied, as lines finish out of order."""

    def __init__(self, start: int) -> None:
        self.offset = start
        self._next = 0
        self._ends: dict[int, int] = {}
        self._done: set[int] = set()

    def started(self, index: int, end: int) -> None:
        self._ends[index] = end

    def finished(self, index: int) -> None:
        self._done.add(index)
        while self._next in self._done:
            self._done.discard(self._next)
            self.offset = self._ends.pop(self._next)
            self._next += 1


# ---------------------------------------------------------------- the work


class BatchJobs:
    """Submits, follows and applies batch jobs for one configuration."""

    def __init__(
        self,
        *,
        lister: Lister,
        recorder_for: Callable[[Manifest], Recorder],
        blobs: Blobs,
        jobs: Jobs | None,
        template_for: TemplateFor | None,
        read_answer: ReadAnswer,
        read_status: ReadStatus,
        model: str,
        rules: RuleBook,
        keys: MetadataKeys,
        batch_prefix: str,
        limits: BatchLimits,
        max_bytes: int,
        estimate: Usage,
        concurrency: int = 64,
        checkpoint_every: float = 5.0,
    ) -> None:
        self._lister = lister
        self._recorder_for = recorder_for
        self._blobs = blobs
        self._jobs = jobs
        self._template_for = template_for
        self._read_answer = read_answer
        self._read_status = read_status
        self.model = model
        self._rules = rules
        self._keys = keys
        self._batch_prefix = batch_prefix
        self._limits = limits
        self._max_bytes = max_bytes
        self._estimate = estimate
        self._concurrency = concurrency
        self._checkpoint_every = checkpoint_every

    # ------------------------------------------------------------ submit

    async def submit(self, request: BatchSubmitRequest) -> SubmitReport:
        """List, write shards, submit a job per shard, store the manifest."""
        totals = Totals()
        planner = ShardPlanner(self._limits)
        run = None if request.dry_run else new_run_id()
        manifest = Manifest(
            run or "",
            request.bucket,
            request.prefix,
            self.model,
            datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            self._keys.prefix,
            self._keys.languages,
            request.overwrite,
            request.if_stale,
        )
        paths = RunPaths.of(request.bucket, self._batch_prefix, manifest.run)
        shard = _Shard(self, manifest, paths) if run else None
        templates: dict[str, RequestTemplate] = {}
        try:
            async for info, spec in self._wanted(request, totals):
                if request.dry_run:
                    planner.add(len(_dry_line(info, spec)))
                    continue
                assert shard is not None
                line = self._line(info, spec, templates)
                manifest.specs.setdefault(spec.fingerprint, spec)
                if planner.add(len(line)):
                    await shard.next(planner.shards - 1)
                await shard.write(line)
            if shard is not None:
                await shard.finish()
        except BaseException:
            if shard is not None:
                await shard.abandon()
            raise
        estimate = _times(self._estimate, planner.total)
        return SubmitReport(
            run,
            planner.total,
            manifest.jobs,
            totals,
            estimate,
            batch_cost(self.model, estimate),
            None if run is None else f"gs://{paths.bucket}/{paths.manifest}",
            planner.shards,
        )

    async def _wanted(
        self, request: BatchSubmitRequest, totals: Totals
    ) -> AsyncIterator[tuple[ObjectInfo, CaptionSpec]]:
        async for info in self._lister.list_objects(request.bucket, request.prefix):
            if info.name.startswith(self._batch_prefix):
                continue  # our own shards and outputs
            decision = decide(
                info,
                keys=self._keys,
                rules=self._rules,
                model=self.model,
                overwrite=request.overwrite,
                if_stale=request.if_stale,
            )
            if isinstance(decision, Skip):
                totals.add(Outcome.SKIPPED, reason=decision.reason)
                continue
            if (skip := online_only(info, self._max_bytes)) is not None:
                totals.add(Outcome.SKIPPED, reason=skip.reason)
                continue
            totals.add(Outcome.PLANNED)
            yield info, decision.spec

    def _line(
        self, info: ObjectInfo, spec: CaptionSpec, templates: dict[str, RequestTemplate]
    ) -> bytes:
        template = templates.get(spec.fingerprint)
        if template is None:
            if self._template_for is None:
                raise RuntimeError("submitting needs a request template")
            template = templates[spec.fingerprint] = self._template_for(spec)
        mime = batch_mime_type(info)
        assert mime is not None
        key = RequestKey(info.bucket, info.name, info.generation)
        return request_line(key, spec, template.render(f"gs://{info.bucket}/{info.name}", mime))

    async def _create_job(
        self, manifest: Manifest, paths: RunPaths, index: int, requests: int, size: int
    ) -> None:
        if self._jobs is None:
            raise RuntimeError("submitting needs the Vertex AI jobs client")
        shard = f"gs://{paths.bucket}/{paths.shard(index)}"
        status = await self._jobs.create(
            model=self.model,
            source=shard,
            dest=paths.dest(index),
            display_name=f"captioner-{manifest.run}-{index:05}",
        )
        manifest.jobs.append(JobEntry(status.name, shard, paths.dest(index), requests, size))
        # Stored after every job, so a crash part-way leaves no job unrecorded.
        await self._blobs.write_json(paths.bucket, paths.manifest, manifest.as_json())

    # ------------------------------------------------------------ status and apply

    async def follow(
        self,
        request: BatchFollowRequest,
        *,
        deadline: float | None = None,
        allowed: Callable[[str], bool] | None = None,
    ) -> AsyncIterator[JobReport]:
        """A report per job: its state (``status``) or what applying it did (``apply``).
        ``allowed`` says which buckets a job may write to (the HTTP function's list)."""
        stop_at = None if deadline is None else time.monotonic() + deadline
        async for manifest, entry in self._entries(request):
            if allowed is not None and not allowed(manifest.bucket):
                raise BadRequestError(
                    f"job {entry.name} writes to bucket {manifest.bucket}, which is not in "
                    "CAPTION_ALLOWED_BUCKETS",
                    status=403,
                )
            status = await self._job_status(entry.name)
            report = JobReport(status, manifest.run, entry.requests)
            paths = RunPaths.of(manifest.bucket, self._batch_prefix, manifest.run)
            checkpoint = await self._blobs.read_json(paths.bucket, paths.checkpoint(entry.name))
            report.applied = bool(checkpoint and checkpoint.get("done"))
            if request.action == "apply":
                await self._apply(manifest, paths, report, checkpoint or {}, stop_at)
            yield report

    async def _job_status(self, name: str) -> JobStatus:
        if self._jobs is None:
            raise RuntimeError("following jobs needs the Vertex AI jobs client")
        return await self._jobs.get(name)

    async def _entries(
        self, request: BatchFollowRequest
    ) -> AsyncIterator[tuple[Manifest, JobEntry]]:
        if request.jobs:
            for name in request.jobs:
                status = await self._job_status(name)
                if not status.source:
                    raise BadRequestError(f"job {name} names no request file: not ours?")
                manifest = await read_manifest(self._blobs, RunPaths.from_shard(status.source))
                entry = next((j for j in manifest.jobs if j.name == status.name), None)
                if entry is None:
                    raise BadRequestError(f"job {name} is not in its run's manifest")
                yield manifest, entry
            return
        if request.bucket is None:
            raise BadRequestError("name a job, or a gs://bucket/prefix whose runs to follow")
        found = await find_manifests(
            self._blobs, self._batch_prefix, request.bucket, request.prefix, request.run
        )
        for manifest in found:
            for entry in manifest.jobs:
                yield manifest, entry

    async def _apply(
        self,
        manifest: Manifest,
        paths: RunPaths,
        report: JobReport,
        checkpoint: dict[str, Any],
        stop_at: float | None,
    ) -> None:
        status = report.status
        if report.applied:
            report.note = "already applied"
            return
        if not status.ended:
            report.note = f"not finished ({status.state}); apply again later"
            return
        files = await output_files(self._blobs, paths.bucket, status)
        if not files:
            report.note = f"{status.state} with no output: its images are left for the next run"
            await self._save(paths, status.name, {"done": True, "files": {}})
            return
        applier = _Applier(self, manifest, report)
        offsets: dict[str, int] = dict(checkpoint.get("files") or {})
        for name in files:
            done = await applier.apply_file(paths, name, offsets, stop_at)
            if not done:
                report.note = "stopped at the deadline; apply again to go on from here"
                return
        await self._save(paths, status.name, {"done": True, "files": offsets})
        report.applied = True
        if status.state != "SUCCEEDED":
            report.note = f"{status.state}: requests without an answer are left for the next run"

    async def _save(self, paths: RunPaths, job: str, data: Mapping[str, Any]) -> None:
        await self._blobs.write_json(paths.bucket, paths.checkpoint(job), data)


class _Shard:
    """The request shard being written, and the job made for each one finished."""

    def __init__(self, jobs: BatchJobs, manifest: Manifest, paths: RunPaths) -> None:
        self._jobs = jobs
        self._manifest = manifest
        self._paths = paths
        self._writer: LineWriter | None = None
        self._index = -1
        self._requests = 0
        self._bytes = 0

    async def next(self, index: int) -> None:
        await self._close_current()
        self._index, self._requests, self._bytes = index, 0, 0
        self._writer = self._jobs._blobs.writer(
            self._paths.bucket, self._paths.shard(index), "application/jsonl"
        )

    async def write(self, line: bytes) -> None:
        assert self._writer is not None
        await self._writer.write(line)
        self._requests += 1
        self._bytes += len(line)

    async def _close_current(self) -> None:
        if self._writer is None:
            return
        await self._writer.close()
        self._writer = None
        await self._jobs._create_job(
            self._manifest, self._paths, self._index, self._requests, self._bytes
        )

    async def finish(self) -> None:
        await self._close_current()

    async def abandon(self) -> None:
        """On a failure part-way, leave no half-written shard to be mistaken for a job."""
        self._writer = None


class _Applier:
    """Applies the lines of one job's output with bounded concurrency, checkpointing."""

    def __init__(self, jobs: BatchJobs, manifest: Manifest, report: JobReport) -> None:
        self._jobs = jobs
        self._manifest = manifest
        self._report = report
        self._keys = manifest.keys
        self._recorder = jobs._recorder_for(manifest)
        self._submitted = manifest.created_at
        entry = next((j for j in manifest.jobs if j.name == report.status.name), None)
        self._shard = None if entry is None else entry.shard
        self._by_uri: dict[str, tuple[RequestKey, str]] | None = None
        self._loading = asyncio.Lock()

    async def _resolve(self, uri: str) -> tuple[RequestKey, str] | None:
        """The key and spec a keyless output line was sent with, from the job's request
        file (read once, only when such a line turns up; one request per image)."""
        async with self._loading:
            if self._by_uri is None:
                self._by_uri = {}
                if self._shard is not None:
                    bucket, _, name = self._shard.removeprefix("gs://").partition("/")
                    async for _, raw in self._jobs._blobs.lines(bucket, name, 0):
                        found = _request_head(raw)
                        if found is not None:
                            key = found[0]
                            self._by_uri[f"gs://{key.bucket}/{key.name}"] = found
        return self._by_uri.get(uri)

    async def apply_file(
        self, paths: RunPaths, name: str, offsets: dict[str, int], stop_at: float | None
    ) -> bool:
        """Apply one output file from its checkpoint on; False if the deadline came first."""
        start = int(offsets.get(name, 0))
        if start < 0:
            return True  # finished before
        mark = Watermark(start)
        saved_at = time.monotonic()
        stopped = False

        async def numbered() -> AsyncIterator[tuple[int, bytes]]:
            nonlocal stopped
            index = 0
            async for end, raw in self._jobs._blobs.lines(paths.bucket, name, start):
                if stop_at is not None and time.monotonic() > stop_at:
                    stopped = True
                    return
                mark.started(index, end)
                yield index, raw
                index += 1

        async def one(item: tuple[int, bytes]) -> tuple[int, CaptionResult]:
            return item[0], await self.apply_line(item[1])

        async for index, result in bounded_as_completed(numbered(), one, self._jobs._concurrency):
            mark.finished(index)
            self._report.lines += 1
            self._report.totals.add(result.outcome, reason=result.reason)
            if time.monotonic() - saved_at > self._jobs._checkpoint_every:
                offsets[name] = mark.offset
                await self._jobs._save(paths, self._report.status.name, {"files": offsets})
                saved_at = time.monotonic()
        offsets[name] = mark.offset if stopped else -1
        await self._jobs._save(paths, self._report.status.name, {"files": offsets})
        return not stopped

    async def apply_line(self, raw: bytes) -> CaptionResult:
        """One answer, written as the online path writes it, or why not."""
        try:
            line = parse_output_line(raw)
        except ValueError as exc:
            ref = ObjectRef("?", "?")
            return result_for(ref, Outcome.SKIPPED, reason="not-ours", message=str(exc)[:200])
        if line.key is None:
            assert line.uri is not None
            found = await self._resolve(line.uri)
            if found is None:
                bucket, _, name = line.uri.removeprefix("gs://").partition("/")
                message = "no request for this image in the job's request file"
                return result_for(
                    ObjectRef(bucket, name), Outcome.SKIPPED, reason="not-ours", message=message
                )
            line = replace(line, key=found[0], spec=found[1])
        assert line.key is not None
        ref = line.key.ref
        spec = self._manifest.specs.get(line.spec or "")
        if spec is None:
            return result_for(ref, Outcome.SKIPPED, reason="unknown-spec")
        read = await self._recorder.read(replace(ref, generation=None))
        if isinstance(read, CaptionResult):
            return read
        skip = self._skip(line.key, read, spec)
        if skip is not None:
            return result_for(
                ref,
                Outcome.SKIPPED,
                reason=skip.reason,
                message=skip.message,
                generation=read.generation,
            )
        outcome = self._outcome(line, spec)
        if isinstance(outcome, CaptionResult):
            return outcome
        if self._already_says(read, outcome):
            return result_for(
                ref, Outcome.SKIPPED, reason="already-captioned", generation=read.generation
            )
        return await self._recorder.write(ref, read, outcome)

    def _already_says(self, info: ObjectInfo, said: Verdict) -> bool:
        """Does the object carry this very answer for this generation already (applied
        before, e.g. by an ``overwrite`` run whose checkpoint was lost)?"""
        meta = info.metadata
        return (
            is_done(meta, info.generation, self._keys)
            and meta.get(self._keys.status) == said.status
            and meta.get(self._keys.model) == self._manifest.model
            and all(meta.get(k) == v for k, v in {**said.provenance, **(said.texts or {})}.items())
        )

    def _skip(self, key: RequestKey, info: ObjectInfo, spec: CaptionSpec) -> Skip | None:
        """Why this answer is not written on the object as it is now, or None."""
        if info.generation != key.generation:
            return Skip("superseded", f"generation {key.generation} was replaced since submit")
        decision = decide(
            info,
            keys=self._keys,
            rules=RuleBook(spec),
            model=self._manifest.model,
            overwrite=True,
        )
        if isinstance(decision, Skip):  # the owner's key, no longer an image
            return decision
        m = self._manifest
        if has_final_word(info, self._keys, spec=spec, model=m.model, if_stale=m.if_stale) and (
            not m.overwrite or self._recorded_since_submit(info)
        ):
            return Skip("already-captioned")
        return None

    def _recorded_since_submit(self, info: ObjectInfo) -> bool:
        """With ``overwrite``: a word recorded after the run was submitted is as new as
        this answer (often this very answer, applied before): never written over."""
        if not is_done(info.metadata, info.generation, self._keys):
            return False
        try:
            return _parse_time(info.metadata.get(self._keys.created, "")) > self._submitted
        except ValueError:
            return False

    def _outcome(self, line: OutputLine, spec: CaptionSpec) -> Any:
        """The Verdict to write, or the CaptionResult that ends this line unwritten."""
        assert line.key is not None
        ref = line.key.ref
        if line.response is None:
            error = self._jobs._read_status(line.status) if line.status else None
            if isinstance(error, PermanentError):
                return verdict(self._keys, spec, error=error)
            message = str(error) if error else "no answer for this request"
            reason = getattr(error, "reason", "missing") if error else "missing"
            return result_for(ref, Outcome.RETRY, reason=reason, message=message)
        try:
            description = self._jobs._read_answer(line.response, self._manifest.model)
        except PermanentError as exc:
            return verdict(self._keys, spec, error=exc)
        except TransientError as exc:
            return result_for(ref, Outcome.RETRY, reason=exc.reason, message=str(exc))
        if description.blocked_reason is not None:
            return verdict(self._keys, spec, description=description)
        return self._checked(ref, spec, description)

    def _checked(self, ref: ObjectRef, spec: CaptionSpec, description: Description) -> Any:
        if description.cut_off:
            return result_for(ref, Outcome.RETRY, reason="max-tokens", message=_SECOND_CHANCE)
        if not description.text or not description.text.strip():
            return result_for(ref, Outcome.RETRY, reason="empty-answer", message=_SECOND_CHANCE)
        try:
            captions = spec.parse(description.text)
        except InvalidAnswerError as exc:
            return result_for(
                ref, Outcome.RETRY, reason="invalid-answer", message=f"{exc}; {_SECOND_CHANCE}"
            )
        return verdict(
            self._keys,
            spec,
            description=with_captions(description, captions),
        )


async def read_manifest(blobs: Blobs, paths: RunPaths) -> Manifest:
    data = await blobs.read_json(paths.bucket, paths.manifest)
    if data is None:
        raise BadRequestError(f"no batch run at gs://{paths.bucket}/{paths.root}")
    return Manifest.from_json(data)


async def find_manifests(
    blobs: Blobs, batch_prefix: str, bucket: str, prefix: str, run: str | None
) -> list[Manifest]:
    """The runs stored for ``gs://bucket/prefix`` (every one, or the one named)."""
    if run is not None:
        return [await read_manifest(blobs, RunPaths.of(bucket, batch_prefix, run))]
    found = []
    for name in sorted(await blobs.names(bucket, batch_prefix)):
        if not name.endswith("/jobs.json"):
            continue
        data = await blobs.read_json(bucket, name)
        if data is not None:
            manifest = Manifest.from_json(data)
            if manifest.prefix.startswith(prefix):
                found.append(manifest)
    if not found:
        raise BadRequestError(f"no batch runs for gs://{bucket}/{prefix} under {batch_prefix}")
    return found


async def output_files(blobs: Blobs, bucket: str, status: JobStatus) -> list[str]:
    """The answer files a job wrote (``predictions*.jsonl`` under its output folder)."""
    where = status.output_dir or status.dest
    if not where:
        return []
    out_bucket, _, prefix = where.removeprefix("gs://").partition("/")
    if out_bucket != bucket:
        raise PermanentError("not-ours", f"job output {where} is outside gs://{bucket}")
    names = await blobs.names(bucket, prefix.rstrip("/") + "/")
    return sorted(
        n for n in names if n.rsplit("/", 1)[-1].startswith("predictions") and n.endswith(".jsonl")
    )


def _times(usage: Usage, n: int) -> Usage:
    return Usage(
        usage.prompt_tokens * n,
        usage.output_tokens * n,
        usage.thoughts_tokens * n,
        usage.image_tokens * n,
        usage.calls * n,
    )


def _dry_line(info: ObjectInfo, spec: CaptionSpec) -> bytes:
    """A stand-in for a request line in a dry run, about as long (the prompt dominates)."""
    return (info.name + spec.full_prompt()).encode("utf-8", "replace") + b" " * 600


async def gather_reports(reports: AsyncIterator[JobReport]) -> list[JobReport]:
    return [report async for report in reports]


__all__ = [
    "BatchFollowRequest",
    "BatchJobs",
    "BatchLimits",
    "BatchRequest",
    "BatchSubmitRequest",
    "JobReport",
    "JobStatus",
    "Manifest",
    "RequestKey",
    "SubmitReport",
]

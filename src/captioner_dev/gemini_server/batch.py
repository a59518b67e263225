"""Vertex AI batch prediction, emulated: the job records, the fault controls and the state.

What google-genai sends (google/genai/batches.py and _api_client.py, 3.6.1): with
``genai.Client(vertexai=True, project=P, location=L, http_options=HttpOptions(base_url=B))``,
``client.aio.batches.create(model=M, src="gs://…jsonl", config=CreateBatchJobConfig(dest=…))``
posts to ``B/v1beta1/projects/P/locations/L/batchPredictionJobs`` the body
``{"model": "publishers/google/models/M", "displayName": …, "inputConfig": {"instancesFormat":
"jsonl", "gcsSource": {"uris": [src]}}, "outputConfig": {"predictionsFormat": "jsonl",
"gcsDestination": {"outputUriPrefix": dest}}}`` (``_CreateBatchJobParameters_to_vertex``,
``t_batch_job_source``, ``t_batch_job_destination``; without ``dest`` the SDK makes one,
``_extra_utils.format_destination``). ``get``/``cancel``/``delete``/``list`` use
``…/batchPredictionJobs/{id}``, ``…/{id}:cancel``, DELETE ``…/{id}`` and GET
``…/batchPredictionJobs?pageSize=&pageToken=&filter=``; ``name`` may be the full
``projects/P/locations/L/batchPredictionJobs/ID`` or the bare numeric ID
(``t_batch_job_name``). Answers are read by ``_BatchJob_from_vertex``: ``name``,
``displayName``, ``state`` (``JOB_STATE_*``), ``error``, ``createTime``, ``startTime``,
``endTime``, ``updateTime``, ``model``, ``inputConfig``, ``outputConfig``,
``completionStats`` and ``outputInfo`` (``gcsOutputDirectory``).

The resource and its states follow the Vertex AI REST reference
(https://cloud.google.com/vertex-ai/docs/reference/rest/v1beta1/projects.locations.batchPredictionJobs,
JobState in google.genai.types): a created job is QUEUED, then PENDING, RUNNING, and ends
SUCCEEDED, FAILED (with ``error``, a google.rpc.Status), PARTIALLY_SUCCEEDED ("some results may
be missing due to errors"), CANCELLED (through CANCELLING) or EXPIRED.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast, get_args

from captioner_dev.gemini_server.config import (
    UNSET,
    FaultKind,
    FaultRule,
    StubConfigError,
    Unset,
    parse_duration,
)
from captioner_dev.gemini_server.records import RequestRecord

JobOutcome: TypeAlias = Literal["FAILED", "PARTIALLY_SUCCEEDED", "EXPIRED"]
# How a failed line's ``status`` is written. Vertex AI does not document it; both forms were
# seen from Vertex-compatible services: the HTTP reason and error body as text ("text"), and
# a google.rpc.Status object whose ``code`` is a gRPC code, not an HTTP one ("rpc").
StatusForm: TypeAlias = Literal["text", "rpc"]
STATUS_FORMS: Final[frozenset[str]] = frozenset(get_args(StatusForm))
JOB_OUTCOMES: Final[frozenset[str]] = frozenset(get_args(JobOutcome))
TERMINAL_STATES: Final = frozenset(
    {
        "JOB_STATE_SUCCEEDED",
        "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED",
        "JOB_STATE_PARTIALLY_SUCCEEDED",
        "JOB_STATE_EXPIRED",
    }
)
# Each stage (QUEUED → PENDING → RUNNING → the end) lasts this long by default: tests stay fast.
DEFAULT_STAGE_SECONDS: Final = 0.05
# google.rpc.Code numbers, which a job's ``error`` carries (not HTTP codes).
RPC_INVALID_ARGUMENT: Final = 3
RPC_DEADLINE_EXCEEDED: Final = 4
RPC_INTERNAL: Final = 13

_R = TypeVar("_R", FaultRule, "BatchJobFault")


def rfc3339(seconds: float) -> str:
    """A protobuf Timestamp in JSON: RFC 3339, UTC, microseconds."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class BatchJobFault:
    """How one batch job ends, whatever its lines: ``FAILED`` (state FAILED with ``error`` and
    no output), ``PARTIALLY_SUCCEEDED`` (only the first half of the lines are answered; the
    rest count as incomplete) or ``EXPIRED`` (the job never runs).

    ``count`` is how many more jobs it applies to (None = forever); ``match`` restricts it to
    jobs whose display name, model or source URIs contain the substring; ``message`` replaces
    the default error message."""

    outcome: JobOutcome
    count: int | None = None
    match: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in JOB_OUTCOMES:
            raise StubConfigError(
                f"unknown batch job outcome {self.outcome!r}; use one of {sorted(JOB_OUTCOMES)}"
            )
        if self.count is not None and (isinstance(self.count, bool) or self.count < 0):
            raise StubConfigError("batch job fault count must be >= 0 or None")

    @classmethod
    def from_json(cls, data: Any) -> BatchJobFault:
        if not isinstance(data, Mapping):
            raise StubConfigError(f"a batch job fault must be an object, got {data!r}")
        unknown = set(data) - {"outcome", "count", "match", "message"}
        if unknown:
            raise StubConfigError(f"unknown batch job fault keys: {sorted(unknown)}")
        count, match, message = data.get("count"), data.get("match"), data.get("message")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise StubConfigError(f"batch job fault count must be an integer, got {count!r}")
        for name, value in (("match", match), ("message", message)):
            if value is not None and not isinstance(value, str):
                raise StubConfigError(f"batch job fault {name} must be a string")
        outcome = cast(JobOutcome, str(data.get("outcome")))
        return cls(outcome, count=count, match=match, message=message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, haystacks: Sequence[str]) -> bool:
        return self.match is None or any(self.match.lower() in h.lower() for h in haystacks)


@dataclass
class BatchJob:
    """One job the emulator got, with what it did; ``resource()`` is the Vertex AI JSON."""

    id: str
    project: str
    location: str
    api_version: str
    display_name: str
    model: str
    input_uris: list[str]
    output_prefix: str
    input_config: dict[str, Any]
    output_config: dict[str, Any]
    bearer_present: bool
    create_time: float
    bearer_issued: bool = False
    labels: dict[str, Any] | None = None
    state: str = "JOB_STATE_QUEUED"
    update_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    error: dict[str, Any] | None = None
    output_directory: str | None = None
    successful: int = 0
    failed: int = 0
    incomplete: int = 0
    cancel_requested: bool = False
    fault: str | None = None
    lines: list[RequestRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/batchPredictionJobs/{self.id}"

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def model_id(self) -> str:
        """``gemini-2.5-flash`` from ``publishers/google/models/gemini-2.5-flash``."""
        return self.model.rsplit("/", 1)[-1]

    def resource(self) -> dict[str, Any]:
        job: dict[str, Any] = {
            "name": self.name,
            "displayName": self.display_name,
            "model": self.model,
            "inputConfig": copy.deepcopy(self.input_config),
            "outputConfig": copy.deepcopy(self.output_config),
            "state": self.state,
            "createTime": rfc3339(self.create_time),
            "updateTime": rfc3339(self.update_time or self.create_time),
        }
        if self.labels:
            job["labels"] = dict(self.labels)
        if self.start_time is not None:
            job["startTime"] = rfc3339(self.start_time)
        if self.end_time is not None:
            job["endTime"] = rfc3339(self.end_time)
        if self.error is not None:
            job["error"] = dict(self.error)
        if self.output_directory is not None:
            job["outputInfo"] = {"gcsOutputDirectory": self.output_directory}
        if self.done or self.state == "JOB_STATE_RUNNING":
            # int64 counts are JSON strings in the REST API.
            job["completionStats"] = {
                "successfulCount": str(self.successful),
                "failedCount": str(self.failed),
                "incompleteCount": str(self.incomplete),
            }
        return job

    def to_json(self) -> dict[str, Any]:
        """What ``GET /_stub/batch`` shows of the job: the resource and the stand-in's log."""
        return {
            "resource": self.resource(),
            "bearer_present": self.bearer_present,
            "bearer_issued": self.bearer_issued,
            "cancel_requested": self.cancel_requested,
            "fault": self.fault,
            "lines": [line.to_json() for line in self.lines],
        }

    def set_state(self, state: str) -> None:
        self.state = state
        self.update_time = time.time()
        if state == "JOB_STATE_RUNNING":
            self.start_time = self.update_time
        if state in TERMINAL_STATES:
            self.end_time = self.update_time


class BatchSettings:
    """The emulator's settings and its job log. Every method is thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._stage_seconds = DEFAULT_STAGE_SECONDS
        self._status_form: StatusForm = "text"
        self._line_faults: list[FaultRule] = []
        self._job_faults: list[BatchJobFault] = []
        self._jobs: dict[str, BatchJob] = {}
        self._next_id = 0

    # -- settings -------------------------------------------------------------------------------

    def configure(
        self,
        *,
        stage_seconds: float | Unset = UNSET,
        status_form: StatusForm | Unset = UNSET,
        line_faults: Sequence[FaultRule] | Unset = UNSET,
        add_line_faults: Sequence[FaultRule] = (),
        job_faults: Sequence[BatchJobFault] | Unset = UNSET,
        add_job_faults: Sequence[BatchJobFault] = (),
    ) -> None:
        """Changes only what is passed; ``line_faults``/``job_faults`` replace, ``add_*`` add.

        Line faults are online FaultRules applied to a batch job's lines (matched against the
        prompt, the image sha256 and ``[img:…]`` tag, the ``fileUri`` and the line's own text);
        an error kind becomes that line's ``status``, the others answer as they do online."""
        if not isinstance(stage_seconds, Unset) and stage_seconds < 0:
            raise StubConfigError("stage_seconds must be >= 0")
        if not isinstance(status_form, Unset) and status_form not in STATUS_FORMS:
            raise StubConfigError(f"status_form must be one of {sorted(STATUS_FORMS)}")
        with self.lock:
            if not isinstance(status_form, Unset):
                self._status_form = status_form
            if not isinstance(stage_seconds, Unset):
                self._stage_seconds = float(stage_seconds)
            if not isinstance(line_faults, Unset):
                self._line_faults = list(line_faults)
            self._line_faults.extend(add_line_faults)
            if not isinstance(job_faults, Unset):
                self._job_faults = list(job_faults)
            self._job_faults.extend(add_job_faults)

    def add_line_fault(
        self,
        kind: FaultKind,
        *,
        count: int | None = None,
        match: str | None = None,
        text: str | None = None,
    ) -> FaultRule:
        rule = FaultRule(kind, count=count, match=match, text=text)
        self.configure(add_line_faults=[rule])
        return rule

    def add_job_fault(
        self,
        outcome: JobOutcome,
        *,
        count: int | None = None,
        match: str | None = None,
        message: str | None = None,
    ) -> BatchJobFault:
        rule = BatchJobFault(outcome, count=count, match=match, message=message)
        self.configure(add_job_faults=[rule])
        return rule

    @property
    def status_form(self) -> StatusForm:
        with self.lock:
            return self._status_form

    @property
    def stage_seconds(self) -> float:
        with self.lock:
            return self._stage_seconds

    @property
    def jobs(self) -> list[BatchJob]:
        """Copies of the jobs received, oldest first."""
        with self.lock:
            return [replace(job, lines=list(job.lines)) for job in self._jobs.values()]

    def job(self, name_or_id: str) -> BatchJob:
        with self.lock:
            job = self._jobs[name_or_id.rsplit("/", 1)[-1]]
            return replace(job, lines=list(job.lines))

    def reset(self) -> None:
        """Forgets the jobs and the faults; stages last DEFAULT_STAGE_SECONDS again."""
        with self.lock:
            self._jobs.clear()
        self.configure(
            stage_seconds=DEFAULT_STAGE_SECONDS, status_form="text", line_faults=[], job_faults=[]
        )

    def config_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "stage_seconds": self._stage_seconds,
                "status_form": self._status_form,
                "line_faults": [rule.to_json() for rule in self._line_faults],
                "job_faults": [rule.to_json() for rule in self._job_faults],
            }

    def configure_json(self, data: Any) -> None:
        """Applies a ``POST /_stub/batch`` body (see configure)."""
        if not isinstance(data, Mapping):
            raise StubConfigError("the batch config must be a JSON object")
        keys = {
            "stage_seconds", "status_form", "line_faults", "add_line_faults", "job_faults",
            "add_job_faults",
        }  # fmt: skip
        unknown = set(data) - keys
        if unknown:
            raise StubConfigError(f"unknown batch config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "stage_seconds" in data:
            kwargs["stage_seconds"] = parse_duration(data["stage_seconds"])
        if "status_form" in data:
            kwargs["status_form"] = data["status_form"]
        for key in ("line_faults", "add_line_faults", "job_faults", "add_job_faults"):
            if key in data:
                rules = data[key]
                if not isinstance(rules, list):
                    raise StubConfigError(f"{key} must be a list")
                parse = FaultRule.from_json if "line" in key else BatchJobFault.from_json
                kwargs[key] = [parse(rule) for rule in rules]
        self.configure(**kwargs)

    # -- used by the emulator -------------------------------------------------------------------

    def new_id(self) -> str:
        with self.lock:
            self._next_id += 1
            # Vertex AI's IDs are 19-digit numbers; the SDK accepts a bare ID only if numeric.
            return str(7_000_000_000_000_000_000 + self._next_id)

    def add_job(self, job: BatchJob) -> None:
        with self.lock:
            self._jobs[job.id] = job

    def find(self, project: str, location: str, job_id: str) -> BatchJob | None:
        """The live job (not a copy): callers change it under ``lock``."""
        with self.lock:
            job = self._jobs.get(job_id)
        if job is None or (job.project, job.location) != (project, location):
            return None
        return job

    def remove(self, job_id: str) -> None:
        with self.lock:
            self._jobs.pop(job_id, None)

    def live_jobs(self, project: str, location: str) -> list[BatchJob]:
        with self.lock:
            return [
                j for j in self._jobs.values() if (j.project, j.location) == (project, location)
            ]

    def take_line_fault(self, haystacks: Sequence[str]) -> FaultRule | None:
        with self.lock:
            return _take(self._line_faults, haystacks)

    def take_job_fault(self, haystacks: Sequence[str]) -> BatchJobFault | None:
        with self.lock:
            return _take(self._job_faults, haystacks)


def _take(rules: list[_R], haystacks: Sequence[str]) -> _R | None:
    """The first rule that matches, with its count spent (a used-up rule is removed)."""
    for index, rule in enumerate(rules):
        if rule.count == 0 or not rule.matches(haystacks):
            continue
        if rule.count is not None:
            rule.count -= 1
            if rule.count == 0:
                del rules[index]
        return replace(rule)
    return None

"""What the edges (the CLI, the HTTP function) ask of batch jobs, checked before use."""

from __future__ import annotations

import re
from dataclasses import dataclass

from captioner.errors import BadRequestError

# What google-genai accepts as a Vertex AI batch job's name (``t_batch_job_name``, 3.6.1):
# ``projects/P/locations/L/batchPredictionJobs/ID`` or the bare numeric ID; anything else
# raises ValueError('Invalid batch job name') inside the SDK, whose own pattern (``[^/]+``,
# ``$``, ``str.isdigit``) lets a trailing newline and non-ASCII digits through. Project
# ids are lowercase letters, digits, hyphens (and a legacy ``domain:`` form), locations
# region names such as us-central1 or "global", ids ASCII digits.
_JOB_NAME = re.compile(
    r"(projects/[a-z0-9][a-z0-9.:-]{0,62}/locations/[a-z0-9-]{1,40}/batchPredictionJobs/)?"
    r"[0-9]{1,30}"
)
JOB_NAME_FORM = "projects/PROJECT/locations/LOCATION/batchPredictionJobs/ID, or the ID"


def check_job_name(name: str) -> str:
    """``name`` if it is a batch job's name; BadRequestError naming the form otherwise."""
    if not _JOB_NAME.fullmatch(name):
        raise BadRequestError(
            f"{name[:120]!r} is not a batch job's name: give {JOB_NAME_FORM}, as submit printed it"
        )
    return name


_DURATION = re.compile(r"([0-9]{1,5})([dh])")


def parse_age(text: str) -> float:
    """``30d`` or ``12h`` → seconds; BadRequestError for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise BadRequestError(f"{text[:40]!r} is not an age: give days or hours, e.g. 30d or 12h")
    number, unit = int(match[1]), match[2]
    return number * (86400 if unit == "d" else 3600)


@dataclass(frozen=True, slots=True)
class BatchSubmitRequest:
    bucket: str
    prefix: str = ""
    overwrite: bool = False
    if_stale: bool = False
    dry_run: bool = False
    include_human: bool = False


@dataclass(frozen=True, slots=True)
class BatchFollowRequest:
    """``status``, ``apply`` or ``cancel``: named jobs, or the runs stored for a bucket
    and prefix (one run with ``run``)."""

    action: str  # "status" | "apply" | "cancel"
    jobs: tuple[str, ...] = ()
    bucket: str | None = None
    prefix: str = ""
    run: str | None = None


@dataclass(frozen=True, slots=True)
class BatchPruneRequest:
    """Delete the files of runs older than ``older_than`` seconds under a bucket's batch
    prefix; runs with answers not yet applied, or jobs still running, are kept unless
    ``force``."""

    bucket: str
    older_than: float
    force: bool = False
    dry_run: bool = False


BatchRequest = BatchSubmitRequest | BatchFollowRequest | BatchPruneRequest


def needs_vertex(request: BatchRequest) -> bool:
    """Whether carrying out ``request`` calls Vertex AI: a dry run of submit reads the
    bucket only, and a forced prune deletes files without asking the jobs' states."""
    if isinstance(request, BatchSubmitRequest):
        return not request.dry_run
    if isinstance(request, BatchPruneRequest):
        return not request.force
    return True

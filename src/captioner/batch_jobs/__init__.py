"""Batch backfill with Vertex AI batch prediction (``captioner batch ...``).

One module per concern; ``service`` tells the story of a run:

- ``commands``: what the edges ask (submit, status/apply/cancel, prune), checked;
- ``keys``, ``templates``, ``shards``: one request line per image, in shards within the
  per-job limits;
- ``manifest``, ``checkpoint``: the run's files, read back as untrusted;
- ``ports``: Vertex AI's jobs and Cloud Storage's files, as protocols;
- ``outputs``, ``index``, ``applier``: reading a job's answers, and writing only the
  answers to what the run asked;
- ``reports``, ``prices``: what each command answers, and what a batch costs.
"""

from captioner.batch_jobs.checkpoint import Watermark
from captioner.batch_jobs.commands import (
    BatchFollowRequest,
    BatchPruneRequest,
    BatchRequest,
    BatchSubmitRequest,
    check_job_name,
    needs_vertex,
    parse_age,
)
from captioner.batch_jobs.keys import LABEL, RequestKey, batch_mime_type
from captioner.batch_jobs.manifest import JobEntry, Manifest, RunPaths, check_run_id
from captioner.batch_jobs.ports import JobStatus, StoredFile
from captioner.batch_jobs.prices import batch_cost
from captioner.batch_jobs.reports import JobReport, PruneReport, SubmitReport
from captioner.batch_jobs.service import BatchJobs
from captioner.batch_jobs.shards import BatchLimits, ShardPlanner
from captioner.batch_jobs.templates import JsonTemplate

__all__ = [
    "LABEL",
    "BatchFollowRequest",
    "BatchJobs",
    "BatchLimits",
    "BatchPruneRequest",
    "BatchRequest",
    "BatchSubmitRequest",
    "JobEntry",
    "JobReport",
    "JobStatus",
    "JsonTemplate",
    "Manifest",
    "PruneReport",
    "RequestKey",
    "RunPaths",
    "ShardPlanner",
    "StoredFile",
    "SubmitReport",
    "Watermark",
    "batch_cost",
    "batch_mime_type",
    "check_job_name",
    "check_run_id",
    "needs_vertex",
    "parse_age",
]

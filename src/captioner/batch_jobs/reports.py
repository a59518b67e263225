"""What submit, status, apply, cancel and prune answer, per run and per job."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from captioner.batch import Totals
from captioner.batch_jobs.manifest import JobEntry
from captioner.batch_jobs.ports import JobStatus
from captioner.domain import Outcome, Usage


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
    sized: int = 0  # images whose size the estimate of image tokens was read from

    def as_json(self) -> dict[str, Any]:
        return {
            "image_sizes_read": self.sized,
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
    """One job: its state, and what applying it did (or would do). ``problem`` says why
    a job (or a whole run, whose manifest could not be used) was not followed at all."""

    status: JobStatus
    run: str
    requests: int
    applied: bool = False
    lines: int = 0
    totals: Totals = field(default_factory=Totals)
    # Lines and files that were not written from, by why: planted, torn, not ours.
    refused: Counter[str] = field(default_factory=Counter)
    note: str | None = None
    problem: str | None = None
    cancelled: bool = False

    def refuse(self, reason: str, n: int = 1) -> None:
        self.refused[reason] += n

    @property
    def left(self) -> int:
        """Images this job leaves to another run, and lines or files not applied."""
        return self.totals.failed + sum(self.refused.values()) + (self.problem is not None)

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
        totals = self.totals.as_dict()
        if self.lines or totals["total"]:
            entry["lines"] = self.lines
            entry["results"] = {o.value: totals[o.value] for o in Outcome if totals[o.value]}
            entry["skipped_by_reason"] = totals["skipped_by_reason"]
        if self.refused:
            entry["refused"] = dict(self.refused.most_common())
        if self.cancelled:
            entry["cancelled"] = True
        if self.note:
            entry["note"] = self.note
        if self.problem:
            entry["problem"] = self.problem
        return entry


@dataclass
class PruneReport:
    """``batch prune``: the runs deleted (or that a dry run would delete), and kept."""

    deleted: list[str] = field(default_factory=list)  # run folders, gs://…/
    kept: dict[str, str] = field(default_factory=dict)  # run folder → why
    files: int = 0
    dry_run: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "deleted" if not self.dry_run else "would_delete": self.deleted,
            "kept": self.kept,
            "files": self.files,
        }

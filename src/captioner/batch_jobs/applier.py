"""Applying one finished job: each answer written exactly as the online path writes it
(``recording.verdict`` + ``Recorder.write``), and nothing that was not asked for.

What may be written is decided by what only Vertex AI and this run could have made: the
job's own record (its request file, its output directory, when it was created and when it
ended) and the request file it read. An output line is written only when the image it
names is one the request file asked about, and its key, label and spec agree with that
request (``index.RequestIndex``); a line that does not is refused, counted and logged,
never written, and so is a file that is not the job's answer file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from captioner.batch_jobs.answers import answer_of
from captioner.batch_jobs.checkpoint import FINISHED, Checkpoint, Watermark, load, save
from captioner.batch_jobs.index import Admitted, RequestIndex
from captioner.batch_jobs.keys import split_uri
from captioner.batch_jobs.manifest import JobEntry, Manifest, RunPaths, parse_time
from captioner.batch_jobs.outputs import (
    CLOCK_SLACK,
    MAX_LINE_BYTES,
    LineRefused,
    answer_files,
    parse_output_line,
)
from captioner.batch_jobs.ports import Blobs, ReadAnswer, ReadStatus
from captioner.batch_jobs.reports import JobReport
from captioner.concurrency import bounded_as_completed
from captioner.decisions import Skip, decide, final_word_skip, has_final_word
from captioner.domain import CaptionResult, ObjectInfo, Outcome
from captioner.metadata import is_done
from captioner.recording import Recorder, Verdict, result_for
from captioner.rules import RuleBook

log = logging.getLogger("captioner.batch")

# Refusals logged one by one per job; the rest are counted.
_LOGGED_REFUSALS = 20


@dataclass(frozen=True, slots=True)
class ApplyTools:
    """What applying needs from the service, the same for every job."""

    blobs: Blobs
    read_answer: ReadAnswer
    read_status: ReadStatus
    batch_prefix: str
    concurrency: int
    checkpoint_every: float


class JobApplier:
    """Applies the output of one job with bounded concurrency, checkpointing."""

    def __init__(
        self,
        tools: ApplyTools,
        manifest: Manifest,
        entry: JobEntry,
        recorder: Recorder,
        report: JobReport,
    ) -> None:
        self._tools = tools
        self._manifest = manifest
        self._entry = entry
        self._paths = RunPaths.from_shard(entry.shard, tools.batch_prefix)
        self._recorder = recorder
        self._report = report
        self._keys = manifest.keys
        self._index: RequestIndex | None = None
        self._checkpoint = Checkpoint()
        self._logged = 0

    async def apply(self, stop_at: float | None) -> None:
        report, status = self._report, self._report.status
        self._checkpoint = checkpoint = await load(self._tools.blobs, self._paths, status.name)
        if checkpoint.problem:
            log.warning("batch apply, job %s: %s", status.name, checkpoint.problem)
        if checkpoint.done:
            report.applied = True
            report.note = "already applied"
            return
        if not status.ended:
            report.note = f"not finished ({status.state}); apply again later"
            return
        if (problem := await self._untrusted_job()) is not None:
            report.problem = problem
            log.warning("batch apply refused job %s: %s", status.name, problem)
            return
        answers = await self._answer_files()
        if answers:
            self._index = await RequestIndex.read(
                self._tools.blobs,
                self._entry.shard,
                self._manifest.specs,
                bucket=self._manifest.bucket,
                prefix=self._manifest.prefix,
                batch_prefix=self._tools.batch_prefix,
            )
        for name in answers:
            if not await self._apply_file(name, stop_at):
                report.note = "stopped at the deadline; apply again to go on from here"
                return
        self._finish(total=self._entry.requests if self._index is None else len(self._index))
        await save(self._tools.blobs, self._paths, status.name, self._checkpoint)

    def _finish(self, total: int) -> None:
        checkpoint, report = self._checkpoint, self._report
        checkpoint.unanswered = max(0, total - checkpoint.answered)
        checkpoint.done = True
        report.applied = True
        if checkpoint.unanswered:
            # Work left, as the next dry run will count it: "to retry", and exit 1.
            report.totals.add(Outcome.RETRY, n=checkpoint.unanswered, reason="no-answer")
            report.note = (
                f"{report.status.state}: {checkpoint.unanswered} requests without an answer "
                "are left for the next run"
            )

    async def _untrusted_job(self) -> str | None:
        """Why this job's record or request file cannot be trusted, or None."""
        status, entry, folder = self._report.status, self._entry, self._paths.folder
        if status.source is not None and status.source != entry.shard:
            return f"the job reads {status.source[:300]}, not the run's {entry.shard}"
        if not entry.dest.startswith(folder):
            return f"its output folder {entry.dest[:300]} is outside the run's folder {folder}"
        if status.output_dir is not None and not (status.output_dir.rstrip("/") + "/").startswith(
            entry.dest
        ):
            return f"its output {status.output_dir[:300]} is outside {entry.dest}"
        bucket, name = split_uri(entry.shard)
        shard = await self._tools.blobs.stat(bucket, name)
        if shard is None:
            return f"its request file {entry.shard} is gone: nothing says what it asked"
        if status.created is not None and shard.created > status.created + CLOCK_SLACK:
            return (
                f"its request file {entry.shard} was replaced after the job was created: "
                "it is not what the job read"
            )
        return None

    async def _answer_files(self) -> list[str]:
        """The job's answer files; anything else under its output folder is refused."""
        status = self._report.status
        if status.output_dir is None:
            return []
        bucket, prefix = split_uri(self._entry.dest)
        found = await self._tools.blobs.files(bucket, prefix)
        files = answer_files(bucket, status, found)
        for name, why in files.refused.items():
            self._refused("unexpected-file", f"{name[:300]}: {why}")
        return files.answers

    async def _apply_file(self, name: str, stop_at: float | None) -> bool:
        """Apply one output file from its checkpoint on; False if the deadline came first."""
        start = self._checkpoint.offsets.get(name, 0)
        if start == FINISHED:
            return True
        mark = Watermark(start)
        saved_at = time.monotonic()
        stopped = False
        blobs = self._tools.blobs

        async def numbered() -> AsyncIterator[tuple[int, int, bytes | None]]:
            nonlocal stopped
            index = 0
            async for end, raw in blobs.lines(self._paths.bucket, name, start, MAX_LINE_BYTES):
                if stop_at is not None and time.monotonic() > stop_at:
                    stopped = True
                    return
                mark.started(index, end)
                yield index, end, raw
                index += 1

        async def one(item: tuple[int, int, bytes | None]) -> tuple[int, Any]:
            index, end, raw = item
            return index, await self._apply_line(raw, f"{name}@{end}")

        before = self._checkpoint.answered  # answers below the offsets of every file
        async for index, result in bounded_as_completed(numbered(), one, self._tools.concurrency):
            mark.finished(index, counts=result is not None)
            self._report.lines += 1
            if isinstance(result, CaptionResult):
                self._report.totals.add(result.outcome, reason=result.reason)
            if time.monotonic() - saved_at > self._tools.checkpoint_every:
                await self._save_progress(name, mark.offset, before + mark.counted)
                saved_at = time.monotonic()
        await self._save_progress(name, mark.offset if stopped else FINISHED, before + mark.counted)
        return not stopped

    async def _save_progress(self, name: str, offset: int, answered: int) -> None:
        self._checkpoint.offsets[name] = offset
        self._checkpoint.answered = answered
        await save(self._tools.blobs, self._paths, self._report.status.name, self._checkpoint)

    async def _apply_line(self, raw: bytes | None, where: str) -> CaptionResult | None:
        """One answer, written as the online path writes it, or why not (None: refused)."""
        assert self._index is not None
        try:
            if raw is None:
                raise LineRefused("line-too-long", f"over {MAX_LINE_BYTES} bytes")
            line = parse_output_line(raw)
            admitted = self._index.admit(line)
            outcome = answer_of(
                line,
                admitted,
                self._keys,
                self._manifest.model,
                self._tools.read_answer,
                self._tools.read_status,
            )
        except LineRefused as refused:
            self._refused(refused.reason, f"{where}: {refused}")
            return None
        ref = admitted.key.ref
        if isinstance(outcome, CaptionResult):
            return outcome
        read = await self._recorder.read(replace(ref, generation=None))
        if isinstance(read, CaptionResult):
            return read
        skip = self._skip(admitted, read)
        if skip is not None:
            return result_for(
                ref, Outcome.SKIPPED, reason=skip.reason, message=skip.message,
                generation=read.generation,
            )  # fmt: skip
        if self._already_says(read, outcome):
            return result_for(
                ref, Outcome.SKIPPED, reason="already-captioned", generation=read.generation
            )
        return await self._recorder.write(ref, read, outcome)

    def _refused(self, reason: str, detail: str) -> None:
        self._report.refuse(reason)
        self._logged += 1
        if self._logged <= _LOGGED_REFUSALS:
            log.warning(
                "batch apply refused (%s) in job %s: %s", reason, self._report.status.name, detail
            )

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

    def _skip(self, admitted: Admitted, info: ObjectInfo) -> Skip | None:
        """Why this answer is not written on the object as it is now, or None."""
        key, spec = admitted.key, admitted.spec
        if info.generation != key.generation:
            return Skip("superseded", f"generation {key.generation} was replaced since submit")
        m = self._manifest
        decision = decide(
            info,
            keys=self._keys,
            rules=RuleBook(spec),
            model=m.model,
            overwrite=True,
            include_human=m.include_human,
        )
        if isinstance(decision, Skip):  # the owner's key, no longer an image, a person's
            return decision
        if has_final_word(info, self._keys, spec=spec, model=m.model, if_stale=m.if_stale) and (
            not m.overwrite or self._recorded_since_submit(info)
        ):
            return final_word_skip(info, self._keys)
        return None

    def _recorded_since_submit(self, info: ObjectInfo) -> bool:
        """With ``overwrite``: a word recorded after the run was submitted is as new as
        this answer (often this very answer, applied before): never written over."""
        if not is_done(info.metadata, info.generation, self._keys):
            return False
        try:
            recorded = parse_time(info.metadata.get(self._keys.created, ""))
        except ValueError:
            return False
        return recorded > self._manifest.created_at

"""Batch backfill with Vertex AI batch prediction, as the story of a run.

- **submit** lists a prefix with the backfill's own rules (``decisions.decide``), writes
  one JSON line per image (``keys``, ``templates``) into shards within the per-job limits
  (``shards``), submits one job per shard and stores the run's manifest (``manifest``)
  next to the shards, so that any machine can follow it.
- **status** and **cancel** read or stop each job of a run (or the jobs named).
- **apply** streams a finished job's output and writes each answer exactly as the online
  path does, and only answers to what the run asked (``applier``, ``index``); a
  checkpoint makes it resumable, and applying twice writes nothing the second time.
- **prune** deletes the files of old runs, never a run whose answers are not applied.

Pure of vendor imports: Vertex AI and Cloud Storage come in through ``ports``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from captioner.batch import Lister, Totals
from captioner.batch_jobs.applier import ApplyTools, JobApplier
from captioner.batch_jobs.checkpoint import load
from captioner.batch_jobs.commands import (
    BatchFollowRequest,
    BatchPruneRequest,
    BatchSubmitRequest,
    check_job_name,
)
from captioner.batch_jobs.keys import RequestKey, batch_mime_type, online_only
from captioner.batch_jobs.manifest import (
    RUN_ID,
    BadRun,
    JobEntry,
    Manifest,
    RunPaths,
    find_runs,
    new_run_id,
    read_manifest,
)
from captioner.batch_jobs.ports import (
    Blobs,
    ImageSize,
    Jobs,
    JobStatus,
    ReadAnswer,
    ReadStatus,
    TemplateFor,
)
from captioner.batch_jobs.prices import batch_cost, times
from captioner.batch_jobs.reports import JobReport, PruneReport, SubmitReport
from captioner.batch_jobs.shards import BatchLimits, ShardPlanner, ShardWriter
from captioner.batch_jobs.templates import RequestTemplate, request_line
from captioner.captions import CaptionSpec
from captioner.concurrency import bounded_as_completed
from captioner.decisions import Skip, decide
from captioner.domain import ObjectInfo, Outcome, Usage
from captioner.errors import BadRequestError, PermanentError
from captioner.metadata import MetadataKeys
from captioner.models import image_tokens_2x
from captioner.pricing import PriceBook
from captioner.recording import Recorder
from captioner.rules import RuleBook

# Images whose size a dry run reads (their first SIZE_HEAD_BYTES) to estimate Gemini 2.x's
# image tokens: enough for a stable average, few enough to take a second.
SIZE_SAMPLE = 50
SIZE_HEAD_BYTES = 256 * 1024

# A job's record or a run's file that the run cannot vouch for: reported on the job.
_Followed = tuple[Manifest, JobEntry, JobStatus | PermanentError] | BadRun


class BatchJobs:  # long: one method per step of a run, each short
    """Submits, follows, applies, cancels and prunes batch jobs for one configuration."""

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
        prices: PriceBook | None = None,
        image_size: ImageSize | None = None,
        pixels_billed: bool = False,
    ) -> None:
        self._prices = prices or PriceBook()
        # Gemini 2.x bills an image by its 768 px tiles, and a batch request sends the
        # original: a dry run reads the size of a sample of the images it would send.
        self._image_size = image_size if pixels_billed else None
        self._lister = lister
        self._recorder_for = recorder_for
        self._blobs = blobs
        self._jobs = jobs
        self._template_for = template_for
        self.model = model
        self._rules = rules
        self._keys = keys
        self._batch_prefix = batch_prefix
        self._limits = limits
        self._max_bytes = max_bytes
        self._estimate = estimate
        self._tools = ApplyTools(
            blobs, read_answer, read_status, batch_prefix, concurrency, checkpoint_every
        )

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
            include_human=request.include_human,
        )
        paths = RunPaths(request.bucket, f"{self._batch_prefix}{manifest.run}/")
        shard = None
        if run is not None:

            async def closed(index: int, requests: int, size: int) -> None:
                await self._create_job(manifest, paths, index, requests, size)

            shard = ShardWriter(self._blobs, paths.bucket, paths.shard, closed)
        templates: dict[str, RequestTemplate] = {}
        sample: list[ObjectInfo] = []
        try:
            async for info, spec in self._wanted(request, totals):
                if shard is None:
                    planner.add(len(_dry_line(info, spec)))
                    if len(sample) < SIZE_SAMPLE:
                        sample.append(info)
                    continue
                line = self._line(info, spec, templates)
                manifest.specs.setdefault(spec.fingerprint, spec)
                if planner.add(len(line)):
                    await shard.next(planner.shards - 1)
                await shard.write(line)
            if shard is not None:
                await shard.finish()
        except BaseException:
            if shard is not None:
                shard.abandon()
            raise
        each, sampled = await self._estimate_of(sample)
        estimate = times(each, planner.total)
        if planner.total == 0:
            run = None  # nothing was written: no run to follow
        return SubmitReport(
            run,
            planner.total,
            manifest.jobs,
            totals,
            estimate,
            batch_cost(self.model, estimate, self._prices),
            None if run is None else f"gs://{paths.bucket}/{paths.manifest}",
            planner.shards,
            sampled,
        )

    async def _estimate_of(self, sample: list[ObjectInfo]) -> tuple[Usage, int]:
        """One image's estimated usage, its image tokens from the sizes of ``sample`` where
        the model bills pixels; and how many sizes were read."""
        if self._image_size is None or not sample:
            return self._estimate, 0

        async def tokens_of(info: ObjectInfo) -> int | None:
            head = await self._blobs.head(info.bucket, info.name, SIZE_HEAD_BYTES)
            size = self._image_size(head) if self._image_size else None
            return None if size is None else image_tokens_2x(*size)

        counted = [t async for t in bounded_as_completed(sample, tokens_of, 8) if t is not None]
        if not counted:
            return self._estimate, 0
        image = round(sum(counted) / len(counted))
        e = self._estimate
        prompt = e.prompt_tokens - e.image_tokens + image
        return Usage(prompt, e.output_tokens, e.thoughts_tokens, image, e.calls), len(counted)

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
                include_human=request.include_human,
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
        return request_line(key, spec, template.render(key, mime))

    async def _create_job(
        self, manifest: Manifest, paths: RunPaths, index: int, requests: int, size: int
    ) -> None:
        shard = f"gs://{paths.bucket}/{paths.shard(index)}"
        status = await self._vertex().create(
            model=self.model,
            source=shard,
            dest=paths.dest(index),
            display_name=f"captioner-{manifest.run}-{index:05}",
        )
        manifest.jobs.append(JobEntry(status.name, shard, paths.dest(index), requests, size))
        # Stored after every job, so a crash part-way leaves no job unrecorded.
        await self._blobs.write_json(paths.bucket, paths.manifest, manifest.as_json())

    def _vertex(self) -> Jobs:
        if self._jobs is None:
            raise RuntimeError("this needs the Vertex AI jobs client")
        return self._jobs

    # ------------------------------------------------------------ status, apply, cancel

    async def follow(
        self,
        request: BatchFollowRequest,
        *,
        deadline: float | None = None,
        allowed: Callable[[str], bool] | None = None,
    ) -> AsyncIterator[JobReport]:
        """A report per job: its state (``status``), what applying it did (``apply``) or
        whether it was stopped (``cancel``). ``allowed`` says which buckets a job may
        write to (the HTTP function's list). A job or run that cannot be vouched for is
        reported with its problem; the others go on."""
        stop_at = None if deadline is None else time.monotonic() + deadline
        async for item in self._followed(request):
            if isinstance(item, BadRun):
                yield JobReport(JobStatus("", "UNKNOWN"), item.paths.run, 0, problem=item.problem)
                continue
            manifest, entry, status = item
            if allowed is not None and not allowed(manifest.bucket):
                raise BadRequestError(
                    f"job {entry.name} writes to bucket {manifest.bucket}, which is not in "
                    "CAPTION_ALLOWED_BUCKETS",
                    status=403,
                )
            if isinstance(status, PermanentError):
                unknown = JobStatus(entry.name, "UNKNOWN")
                yield JobReport(unknown, manifest.run, entry.requests, problem=str(status))
                continue
            report = JobReport(status, manifest.run, entry.requests)
            await self._act(request.action, manifest, entry, report, stop_at)
            yield report

    async def _act(
        self,
        action: str,
        manifest: Manifest,
        entry: JobEntry,
        report: JobReport,
        stop_at: float | None,
    ) -> None:
        if action == "apply":
            applier = JobApplier(self._tools, manifest, entry, self._recorder_for(manifest), report)
            await applier.apply(stop_at)
            return
        paths = RunPaths.from_shard(entry.shard, self._batch_prefix)
        report.applied = (await load(self._blobs, paths, entry.name)).done
        if action == "cancel":
            if report.status.ended:
                report.note = f"already ended ({report.status.state})"
                return
            await self._vertex().cancel(entry.name)
            report.status = await self._vertex().get(entry.name)
            report.cancelled = True
            report.note = "cancelled: `captioner batch apply` writes what it answered before"

    async def _followed(self, request: BatchFollowRequest) -> AsyncIterator[_Followed]:
        """Each job to follow, with the run that submitted it and its record."""
        if request.jobs:
            for name in request.jobs:
                status = await self._vertex().get(check_job_name(name))
                if not status.source:
                    raise BadRequestError(f"job {name} names no request file: not ours?")
                try:
                    paths = RunPaths.from_shard(status.source, self._batch_prefix)
                except PermanentError as exc:
                    raise BadRequestError(f"job {name}: {exc}") from None
                manifest = await read_manifest(self._blobs, paths)
                entry = next((j for j in manifest.jobs if j.name == status.name), None)
                if entry is None:
                    raise BadRequestError(f"job {name} is not in its run's manifest")
                yield manifest, entry, self._vouched(manifest, entry, status)
            return
        if request.bucket is None:
            raise BadRequestError("name a job, or a gs://bucket/prefix whose runs to follow")
        runs = await find_runs(
            self._blobs, self._batch_prefix, request.bucket, request.prefix, request.run
        )
        for run in runs:
            if isinstance(run, BadRun):
                yield run
                continue
            for entry in run.jobs:
                yield run, entry, await self._record(run, entry)

    async def _record(self, manifest: Manifest, entry: JobEntry) -> JobStatus | PermanentError:
        """The job's record from Vertex AI, or why the manifest's entry is not one."""
        try:
            check_job_name(entry.name)
            status = await self._vertex().get(entry.name)
        except BadRequestError as exc:
            return PermanentError("bad-manifest", f"the manifest names a job {exc}")
        except PermanentError as exc:
            return exc
        return self._vouched(manifest, entry, status)

    def _vouched(
        self, manifest: Manifest, entry: JobEntry, status: JobStatus
    ) -> JobStatus | PermanentError:
        """``status`` if the job is the one this run submitted for this entry: it reads the
        entry's request file, in the run's own folder, under the name submit gave it."""
        try:
            paths = RunPaths.from_shard(entry.shard, self._batch_prefix)
        except PermanentError as exc:
            return PermanentError("bad-manifest", f"the manifest's entry for {entry.name}: {exc}")
        index = entry.shard.rsplit("-", 1)[-1].removesuffix(".jsonl")
        expected_name = f"captioner-{manifest.run}-{index}"
        if paths.run != manifest.run or paths.bucket != manifest.bucket:
            return PermanentError("not-ours", f"{entry.shard} is not in run {manifest.run}")
        if status.source is not None and status.source != entry.shard:
            return PermanentError(
                "not-ours", f"job {entry.name} reads {status.source[:300]}, not {entry.shard}"
            )
        if status.display_name is not None and status.display_name != expected_name:
            return PermanentError(
                "not-ours",
                f"job {entry.name} is named {status.display_name[:100]!r}, "
                f"not {expected_name!r} as this run named its jobs",
            )
        return status

    # ------------------------------------------------------------ prune

    async def prune(self, request: BatchPruneRequest) -> PruneReport:
        """Delete the files of runs older than the request says (by their newest file),
        keeping any run with a job still running or answers not yet applied."""
        report = PruneReport(dry_run=request.dry_run)
        runs: dict[str, list[str]] = defaultdict(list)
        newest: dict[str, datetime] = {}
        for stored in await self._blobs.files(request.bucket, self._batch_prefix):
            run, slash, _ = stored.name.removeprefix(self._batch_prefix).partition("/")
            if slash and RUN_ID.fullmatch(run):  # anything else under the prefix is not ours
                runs[run].append(stored.name)
                newest[run] = max(newest.get(run, stored.created), stored.created)
        cutoff = datetime.now(UTC) - timedelta(seconds=request.older_than)
        for run in sorted(runs):
            if newest[run] > cutoff:
                continue
            paths = RunPaths.of(request.bucket, self._batch_prefix, run)
            why = None if request.force else await self._unfinished(paths)
            if why is not None:
                report.kept[paths.folder] = why
                continue
            report.deleted.append(paths.folder)
            report.files += len(runs[run])
            if not request.dry_run:
                await self._delete(request.bucket, runs[run])
        return report

    async def _unfinished(self, paths: RunPaths) -> str | None:
        """Why this run must be kept, or None."""
        try:
            manifest = await read_manifest(self._blobs, paths)
        except (PermanentError, BadRequestError) as exc:
            return f"{exc}; --force deletes it anyway"
        for entry in manifest.jobs:
            status = await self._record(manifest, entry)
            if isinstance(status, PermanentError):
                return f"{status}; --force deletes it anyway"
            if not status.ended:
                return f"job {entry.name} is {status.state}: cancel it first, or --force"
            checkpoint = await load(self._blobs, paths, entry.name)
            if status.output_dir is not None and not checkpoint.done:
                return (
                    f"job {entry.name} has answers not yet applied: "
                    f"`captioner batch apply {paths.folder}` first, or --force"
                )
        return None

    async def _delete(self, bucket: str, names: list[str]) -> None:
        async def one(name: str) -> None:
            await self._blobs.delete(bucket, name)

        async for _ in bounded_as_completed(names, one, 16):
            pass


def _dry_line(info: ObjectInfo, spec: CaptionSpec) -> bytes:
    """A stand-in for a request line in a dry run, about as long (the prompt dominates)."""
    return (info.name + spec.full_prompt()).encode("utf-8", "replace") + b" " * 600


async def gather_reports(reports: AsyncIterator[JobReport]) -> list[JobReport]:
    return [report async for report in reports]

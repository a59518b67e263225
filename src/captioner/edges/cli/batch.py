"""``captioner batch submit|status|apply|cancel|prune`` (Vertex AI batch prediction)."""

from __future__ import annotations

import argparse
import sys
import time

from captioner.batch import Totals
from captioner.batch_jobs import (
    BatchFollowRequest,
    BatchPruneRequest,
    BatchRequest,
    BatchSubmitRequest,
    JobReport,
    PruneReport,
    SubmitReport,
    check_job_name,
    check_run_id,
    needs_vertex,
    parse_age,
)
from captioner.edges.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    check_include_human,
    parse_target,
    summary,
    token_line,
)
from captioner.errors import BadRequestError
from captioner.safe_text import for_terminal, json_line
from captioner.settings import Settings


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from captioner.adapters.vertex_batch import opened

    request = batch_request(args)
    started = time.monotonic()
    async with opened(settings, needs_vertex=needs_vertex(request)) as jobs:
        if isinstance(request, BatchSubmitRequest):
            _print_submit(await jobs.submit(request), as_json=args.json)
            return EXIT_OK
        if isinstance(request, BatchPruneRequest):
            pruned = await jobs.prune(request)
            _print_prune(pruned, as_json=args.json)
            return EXIT_FAILED if pruned.kept else EXIT_OK
        reports = [r async for r in jobs.follow(request)]
    for job in reports:
        _print_job(job, as_json=args.json)
    if request.action == "apply":
        totals = Totals(started=started)
        for job in reports:
            totals.counts.update(job.totals.counts)
            totals.skipped.update(job.totals.skipped)
        summary(totals, sys.stderr)
        refused = sum(sum(job.refused.values()) for job in reports)
        if refused:
            print(f"refused {refused} lines or files not of this run (logged)", file=sys.stderr)
    # Work left: a job not applied (or not finished), images it did not answer, lines
    # refused, a job or run that could not be vouched for.
    unfinished = request.action == "apply" and any(not r.applied for r in reports)
    return EXIT_FAILED if unfinished or any(r.left for r in reports) else EXIT_OK


def batch_request(args: argparse.Namespace) -> BatchRequest:
    if args.batch_action == "submit":
        bucket, prefix = parse_target(args.target)
        check_include_human(args)
        return BatchSubmitRequest(
            bucket,
            prefix,
            args.overwrite,
            args.if_stale,
            args.dry_run,
            include_human=args.include_human,
        )
    if args.batch_action == "prune":
        bucket, prefix = parse_target(args.target)
        if prefix:
            raise BadRequestError(f"prune takes a bucket (gs://{bucket}/), not a prefix")
        return BatchPruneRequest(bucket, parse_age(args.older_than), args.force, args.dry_run)
    targets = [item for item in args.items if item.startswith("gs://")]
    names = tuple(check_job_name(item) for item in args.items if not item.startswith("gs://"))
    if len(targets) > 1 or (targets and names):
        raise BadRequestError("give job names, or one gs://bucket/prefix, not both")
    if args.run and not targets:
        raise BadRequestError("--run needs the bucket: captioner batch ... gs://bucket/ --run ID")
    if not targets:
        return BatchFollowRequest(args.batch_action, names)
    bucket, prefix = parse_target(targets[0])
    run = None if args.run is None else check_run_id(args.run)
    return BatchFollowRequest(args.batch_action, (), bucket, prefix, run)


def _print_submit(report: SubmitReport, *, as_json: bool) -> None:
    if as_json:
        print(json_line(report.as_json()), flush=True)
    else:
        for job in report.jobs:
            print(job.name, flush=True)
    why = ", ".join(f"{n} {reason}" for reason, n in report.totals.skipped.most_common())
    cost = "" if report.cost is None else f", about ${report.cost:,.2f} at the batch price"
    if report.run:
        head = (
            f"submitted {report.images} images in {report.shards} jobs "
            f"(run {report.run}, manifest {report.manifest})"
        )
    elif report.images:
        head = f"would submit {report.images} images in {report.shards} jobs"
    else:
        head = "nothing to submit: 0 images"
    print(
        head + (f"; skipped {why}" if why else "") + (cost if report.images else ""),
        # A dry run's count is its answer (standard output); a submit's is the job names.
        file=sys.stdout if report.run is None and not as_json else sys.stderr,
    )
    token_line("estimated tokens", report.estimate.as_fields(), sys.stderr)
    if report.sized:
        print(
            f"image tokens from the sizes of {report.sized} of the images (a batch sends "
            "originals, and this model bills 768 px tiles)",
            file=sys.stderr,
        )


def _print_job(job: JobReport, *, as_json: bool) -> None:
    if as_json:
        print(json_line(job.as_json()), flush=True)
        return
    entry = job.as_json()
    counts = ", ".join(f"{k} {v}" for k, v in entry.get("results", {}).items())
    refused = ", ".join(f"{n} {reason}" for reason, n in job.refused.most_common())
    fields = [
        job.status.name or f"run {job.run}",
        job.status.state,
        f"{job.requests} requests",
        "applied" if job.applied else "not applied",
        *([counts] if counts else []),
        *([f"refused {refused}"] if refused else []),
        *([job.note] if job.note else []),
        *([f"problem: {job.problem}"] if job.problem else []),
        *([f"error: {job.status.error}"] if job.status.error else []),
    ]
    print("\t".join(map(for_terminal, fields)), flush=True)


def _print_prune(report: PruneReport, *, as_json: bool) -> None:
    if as_json:
        print(json_line(report.as_json()), flush=True)
        return
    verb = "would delete" if report.dry_run else "deleted"
    for folder in report.deleted:
        print(f"{for_terminal(folder)}\t{verb}", flush=True)
    for folder, why in report.kept.items():
        print(f"{for_terminal(folder)}\tkept: {for_terminal(why)}", flush=True)
    print(
        f"{verb} {len(report.deleted)} runs ({report.files} files), kept {len(report.kept)}",
        file=sys.stderr,
    )

"""``captioner``: describe local files and URLs, or backfill a bucket in place.

    captioner describe photos/ cat.jpg https://example.com/dog.png
    captioner backfill gs://my-bucket/products/ [--dry-run] [--overwrite]
    captioner batch submit|status|apply ...   (Vertex AI batch prediction)

Captions print as they complete. A progress bar (counts, rate, ETA) shows on a
terminal only. A summary ends every run. Exit codes: 0 all done, 1 some images
failed, 2 usage or configuration (no key, no credentials, no such bucket),
130 interrupted, 141 the output was closed early (``| head``), as a shell reports
a command ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import ExitStack, aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from captioner import __version__, readback
from captioner.adapters.files import STDIN
from captioner.batch import FilesRequest, PrefixRequest, Totals, result_json
from captioner.batch_jobs import BatchFollowRequest, BatchSubmitRequest, JobReport, SubmitReport
from captioner.concurrency import bounded_as_completed
from captioner.decisions import IMAGE_SUFFIXES, looks_like_image
from captioner.domain import CaptionResult, ObjectInfo, Outcome
from captioner.edges import html_page
from captioner.errors import (
    BadRequestError,
    CaptionerError,
    ConfigurationError,
    ObjectGoneError,
    PermanentError,
    SettingsError,
    TransientError,
)
from captioner.metadata import MetadataKeys
from captioner.preparing import PreparePool, thumbnail_pool
from captioner.runtime import Runtime
from captioner.settings import Settings


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--limit 0`` or ``-5`` is a
    usage error, exit 2, not a run that silently does nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Caption images with Gemini. Settings come from CAPTION_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    describe = sub.add_parser(
        "describe", help="print captions for local files, folders and URLs (writes nothing)"
    )
    describe.add_argument(
        "sources", nargs="+", help="image files, folders (searched recursively) or http(s) URLs"
    )

    backfill = sub.add_parser(
        "backfill", help="caption every image under gs://bucket/prefix in place (resumable)"
    )
    backfill.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    backfill.add_argument("--overwrite", action="store_true", help="caption again even if done")
    backfill.add_argument("--dry-run", action="store_true", help="list what would be captioned")
    backfill.add_argument(
        "--if-stale",
        action="store_true",
        help="caption again where the model, prompt or rule has changed since",
    )
    backfill.add_argument(
        "--limit", type=_positive, default=1_000_000, help="at most this many images"
    )

    for command in (describe, backfill):
        command.add_argument("--json", action="store_true", help="one JSON object per line")
        command.add_argument(
            "--concurrency", type=int, help="Gemini calls in flight (CAPTION_MAX_CONCURRENCY)"
        )
        command.add_argument("--model", help="Gemini model for this run (CAPTION_MODEL)")
        command.add_argument("--prompt", help="instruction for this run (CAPTION_PROMPT)")
        command.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    show = sub.add_parser("show", help="print the captions stored on objects")
    show.add_argument("objects", nargs="+", metavar="gs://bucket/name")
    show.add_argument("--json", action="store_true", help="one JSON object per line")

    export = sub.add_parser(
        "export", help="write every image under gs://bucket/prefix with its caption"
    )
    export.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", "-o", help="write to this file instead of standard output")
    export.add_argument(
        "--html", metavar="FILE", help="also write one page of thumbnails with their captions"
    )
    export.add_argument("--limit", type=_positive, help="at most this many images")
    _add_batch(sub)
    return parser


def _add_batch(sub: Any) -> None:
    batch = sub.add_parser(
        "batch", help="backfill with Vertex AI batch prediction: half price, within 24 h"
    )
    actions = batch.add_subparsers(dest="batch_action", required=True, metavar="ACTION")
    submit = actions.add_parser(
        "submit", help="write requests for every image under gs://bucket/prefix, submit jobs"
    )
    submit.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    submit.add_argument("--overwrite", action="store_true", help="caption again even if done")
    submit.add_argument(
        "--if-stale", action="store_true", help="only where the model, prompt or rule changed"
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="count images, jobs and the cost; submit nothing"
    )
    for name, text in (
        ("status", "show the state of batch jobs"),
        ("apply", "write the captions of finished jobs (resumable; twice writes nothing)"),
    ):
        follow = actions.add_parser(name, help=text)
        follow.add_argument(
            "items",
            nargs="+",
            metavar="JOB|gs://bucket/prefix",
            help="job names, or a bucket prefix whose stored runs to follow",
        )
        follow.add_argument("--run", help="only this run of the bucket (its id, from submit)")
    for parser in actions.choices.values():
        parser.add_argument("--json", action="store_true", help="one JSON object per line")


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`captioner … | head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # stamina logs each scheduled retry as a warning; with no logging configured,
    # Python prints it bare ("stamina.retry_scheduled") among the captions. A retry
    # that ends badly shows in the image's own line and the summary.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        overrides = {
            name: value
            for name, value in (
                ("CAPTION_MODEL", getattr(args, "model", None)),
                ("CAPTION_PROMPT", getattr(args, "prompt", None)),
            )
            if value is not None
        }
        settings = Settings.from_env({**os.environ, **overrides})
        if getattr(args, "concurrency", None) is not None:
            if not 1 <= args.concurrency <= 1000:
                raise SettingsError("--concurrency must be from 1 to 1000")
            settings = settings.model_copy(update={"max_concurrency": args.concurrency})
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command in ("show", "export"):
            with ExitStack() as files:
                out, page = sys.stdout, None
                if getattr(args, "output", None):
                    out = files.enter_context(open(args.output, "w", encoding="utf-8", newline=""))
                if getattr(args, "html", None):
                    page = files.enter_context(open(args.html, "w", encoding="utf-8"))
                return asyncio.run(_read_back(args, settings, out, page))
        if args.command == "batch":
            return asyncio.run(_batch(args, settings))
        return asyncio.run(_run(args, settings))
    except KeyboardInterrupt:
        print("interrupted; a second run resumes where this one stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ObjectGoneError as exc:  # listing or reading a bucket that is not there
        print(f"error: {exc} (does the bucket exist?)", file=sys.stderr)
        return EXIT_USAGE
    except (BadRequestError, CaptionerError) as exc:
        # Bad arguments, and what stops a whole run: no key, no credentials, a key
        # Gemini refuses, a bucket we may not read.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise  # main() ends quietly with 141
    except OSError as exc:  # an --output or --html file that cannot be written
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    runtime = Runtime(settings)
    try:
        request, total = await _request(args, runtime)
        run = runtime.batch(request)
        totals = run.totals
        await _report(
            run.results(), totals, total, as_json=args.json, progress=_shows_progress(args)
        )
    finally:
        await runtime.aclose()
    _summary(totals, sys.stderr)
    return EXIT_FAILED if totals.failed else EXIT_OK


async def _batch(args: argparse.Namespace, settings: Settings) -> int:
    """`captioner batch submit|status|apply` (Vertex AI batch prediction)."""
    from captioner.adapters.vertex_batch import opened

    request = _batch_request(args)
    dry_run = isinstance(request, BatchSubmitRequest) and request.dry_run
    async with opened(settings, needs_vertex=not dry_run) as jobs:
        if isinstance(request, BatchSubmitRequest):
            report = await jobs.submit(request)
            _print_submit(report, as_json=args.json)
            return EXIT_OK
        reports = [r async for r in jobs.follow(request)]
    for job in reports:
        _print_job(job, as_json=args.json)
    unfinished = [r for r in reports if not r.applied]
    left = sum(r.totals.failed for r in reports)
    if request.action == "apply":
        totals = Totals()
        for job in reports:
            totals.counts.update(job.totals.counts)
            totals.skipped.update(job.totals.skipped)
        _summary(totals, sys.stderr)
    return EXIT_FAILED if unfinished or left else EXIT_OK


def _batch_request(args: argparse.Namespace) -> BatchSubmitRequest | BatchFollowRequest:
    if args.batch_action == "submit":
        bucket, prefix = _parse_target(args.target)
        return BatchSubmitRequest(bucket, prefix, args.overwrite, args.if_stale, args.dry_run)
    targets = [item for item in args.items if item.startswith("gs://")]
    names = tuple(item for item in args.items if not item.startswith("gs://"))
    if len(targets) > 1 or (targets and names):
        raise BadRequestError("give job names, or one gs://bucket/prefix, not both")
    if args.run and not targets:
        raise BadRequestError("--run needs the bucket: captioner batch ... gs://bucket/ --run ID")
    if not targets:
        return BatchFollowRequest(args.batch_action, names)
    bucket, prefix = _parse_target(targets[0])
    return BatchFollowRequest(args.batch_action, (), bucket, prefix, args.run)


def _print_submit(report: SubmitReport, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_json(), ensure_ascii=False), flush=True)
    else:
        for job in report.jobs:
            print(job.name, flush=True)
    why = ", ".join(f"{n} {reason}" for reason, n in report.totals.skipped.most_common())
    cost = "" if report.cost is None else f", about ${report.cost:,.2f} at the batch price"
    verb = "would submit" if report.run is None else "submitted"
    print(
        f"{verb} {report.images} images in {report.shards} jobs"
        + (f" (run {report.run}, manifest {report.manifest})" if report.run else "")
        + (f"; skipped {why}" if why else "")
        + cost,
        # A dry run's count is its answer (standard output); a submit's is the job names.
        file=sys.stdout if report.run is None and not as_json else sys.stderr,
    )
    _token_line("estimated tokens", report.estimate.as_fields(), sys.stderr)


def _print_job(job: JobReport, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job.as_json(), ensure_ascii=False), flush=True)
        return
    entry = job.as_json()
    counts = ", ".join(f"{k} {v}" for k, v in entry.get("results", {}).items())
    fields = [
        job.status.name,
        job.status.state,
        f"{job.requests} requests",
        "applied" if job.applied else "not applied",
        *([counts] if counts else []),
        *([job.note] if job.note else []),
        *([f"error: {job.status.error}"] if job.status.error else []),
    ]
    print("\t".join(fields), flush=True)


async def _request(
    args: argparse.Namespace, runtime: Runtime
) -> tuple[FilesRequest | PrefixRequest, int | None]:
    """The batch request for ``describe`` or ``backfill``, and how many images it has
    when that is known (for the progress bar's ETA)."""
    if args.command == "describe":
        sources = _sources(args.sources)
        return FilesRequest(sources), len(sources)
    bucket, prefix = _parse_target(args.target)
    request = PrefixRequest(bucket, prefix, args.limit, args.overwrite, args.dry_run, args.if_stale)
    if not _shows_progress(args) or args.dry_run:
        return request, None
    # A listing pass first, so the bar can show an ETA: listing costs milliseconds per
    # thousand objects, captioning seconds per image.
    plan = runtime.batch(replace(request, dry_run=True))
    return request, sum([1 async for _ in plan.results()])


def _sources(arguments: list[str]) -> tuple[str, ...]:
    """Files (folders searched for images), ``-`` for standard input, and URLs."""
    sources: list[str] = []
    for source in arguments:
        if source == STDIN:
            if STDIN in sources:
                raise BadRequestError("standard input (-) can be given once")
            sources.append(source)
        elif source.startswith("gs://"):
            raise BadRequestError(
                f"{source}: describe reads local files and URLs and writes nothing; "
                "to caption objects in a bucket, run `captioner backfill gs://bucket/prefix`"
            )
        elif source.startswith(("http://", "https://")):
            sources.append(source)
        elif (path := Path(source)).is_dir():
            sources.extend(str(p) for p in _images_under(path))
        elif path.is_file():
            sources.append(source)
        else:
            raise BadRequestError(f"{source}: no such file, folder or http(s) URL")
    return tuple(sources)


def _images_under(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield path


async def _read_back(
    args: argparse.Namespace, settings: Settings, out: TextIO, page: TextIO | None
) -> int:
    """`show` and `export`: read captions back; needs Cloud Storage only, not Gemini."""
    from captioner.adapters.storage import StorageClient

    keys = MetadataKeys(settings.metadata_prefix, settings.languages)
    async with StorageClient.opened(attempts=settings.storage_attempts) as storage:
        if args.command == "show":
            return await _show(storage, keys, args.objects, as_json=args.json)
        return await _export(storage, keys, args, settings, out, page)


async def _show(storage: Any, keys: MetadataKeys, targets: list[str], *, as_json: bool) -> int:
    missing = 0
    for target in targets:
        bucket, name = _parse_target(target)
        if not name:
            raise BadRequestError(
                f"{target!r} names no object; `captioner export {target}` lists a prefix"
            )
        try:
            info = await storage.get_object(bucket, name)
        except ObjectGoneError:
            print(f"{target}\tno such object", file=sys.stderr)
            missing += 1
            continue
        record = readback.record_of(info, keys)
        if as_json:
            print(json.dumps(readback.as_json(record), ensure_ascii=False), flush=True)
        else:
            print(readback.as_text(record), flush=True)
    return EXIT_FAILED if missing else EXIT_OK


async def _export(
    storage: Any,
    keys: MetadataKeys,
    args: argparse.Namespace,
    settings: Settings,
    out: TextIO,
    page: TextIO | None,
) -> int:
    bucket, prefix = _parse_target(args.target)
    count = 0
    if args.format == "csv":
        out.write(readback.csv_header())
    if page is not None:
        page.write(html_page.page_start(f"Captions of {args.target}"))

    async def listed() -> AsyncIterator[ObjectInfo]:
        nonlocal count
        async for info in storage.list_objects(bucket, prefix):
            if not looks_like_image(info):
                continue
            if args.limit is not None and count >= args.limit:
                return
            count += 1
            record = readback.record_of(info, keys)
            if args.format == "csv":
                out.write(readback.csv_row(record))
            else:
                out.write(json.dumps(readback.as_json(record), ensure_ascii=False) + "\n")
            yield info

    if page is None:
        async for _ in listed():
            pass
    else:
        thumbnails = thumbnail_pool(_THUMBNAIL_EDGE, settings.max_pixels)
        async for card in bounded_as_completed(
            listed(), lambda info: _card(storage, keys, info, settings, thumbnails), 8
        ):
            page.write(card)
        page.write(html_page.page_end(count))
    out.flush()
    print(f"exported {count} images", file=sys.stderr)
    return EXIT_OK


async def _card(
    storage: Any, keys: MetadataKeys, info: ObjectInfo, settings: Settings, pool: PreparePool
) -> str:
    """One thumbnail and its caption; an image that cannot be shown still gets its card.
    Thumbnails are made as captions are: in the decode workers, within the budgets."""
    record = readback.record_of(info, keys)
    try:
        async with pool.hold(info.size):
            data = await storage.download(
                info.bucket, info.name, generation=info.generation, max_bytes=settings.max_bytes
            )
            thumb = await pool.prepared(data)
    except (ObjectGoneError, PermanentError, TransientError):
        return html_page.card(record, None)
    return html_page.card(record, thumb.data, thumb.mime_type)


# Thumbnails for the HTML page: 240 px is sharp in a 240 px grid cell and keeps a
# page of a thousand images near 15 MB.
_THUMBNAIL_EDGE = 240


def _parse_target(target: str) -> tuple[str, str]:
    if not target.startswith("gs://"):
        raise BadRequestError(f"{target!r}: give gs://bucket or gs://bucket/prefix")
    bucket, _, prefix = target[len("gs://") :].partition("/")
    if not bucket:
        raise BadRequestError(f"{target!r} names no bucket")
    return bucket, prefix


async def _report(
    stream: AsyncGenerator[CaptionResult, None],
    totals: Totals,
    total: int | None,
    *,
    as_json: bool,
    progress: bool,
) -> None:
    bar = _progress_bar(total) if progress else None
    try:
        # aclosing: on an early stop, the images still in flight are cancelled here,
        # before the clients they use are closed.
        async with aclosing(stream):
            async for result in stream:
                if result.outcome is Outcome.RETRY and result.reason in _STOPS_THE_RUN:
                    # A bad key, a missing role, a used-up daily quota: every other image
                    # would get the same answer, so stop here (exit 2) rather than list them.
                    raise ConfigurationError(result.message or result.reason)
                _print_result(result, as_json, bar)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_short(totals), refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        print(json.dumps({"totals": totals.as_dict()}), flush=True)


_STOPS_THE_RUN = frozenset({ConfigurationError.reason, "daily-quota"})


def _shows_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _progress_bar(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _print_result(result: CaptionResult, as_json: bool, bar: Any) -> None:
    if as_json:
        line = json.dumps(result_json(result), ensure_ascii=False)
    elif result.outcome is Outcome.CAPTIONED:
        line = f"{result.source}\t{result.caption}"
    elif result.outcome is Outcome.PLANNED:
        line = f"{result.source}\twould caption ({result.message})"
    elif result.outcome is Outcome.SKIPPED:
        line = f"{result.source}\tskipped: {result.reason}"
    else:
        detail = f": {result.message}" if result.message else ""
        line = f"{result.source}\t{result.outcome.value} ({result.reason}){detail}"
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _short(totals: Totals) -> str:
    c = totals.counts
    return f"ok={c['ok']} skipped={c['skipped']} blocked={c['blocked']} failed={totals.failed}"


def _summary(totals: Totals, out: TextIO) -> None:
    t = totals.as_dict()
    why = ", ".join(f"{n} {reason}" for reason, n in t["skipped_by_reason"].items())
    print(
        f"done {t['ok']}, skipped {t['skipped']}"
        + (f" ({why})" if why else "")
        + f", blocked {t['blocked']}, "
        f"failed {t['error']}, to retry {t['retry']}"
        + (f", would caption {t['would-caption']}" if t["would-caption"] else "")
        + f" in {t['seconds']:.1f} s ({t['images_per_second']:.1f} images/s)",
        file=out,
    )
    for label, key in (("tokens", "tokens"), ("estimated tokens", "estimated_tokens")):
        _token_line(label, t.get(key), out)


def _token_line(label: str, tokens: dict[str, int] | None, out: TextIO) -> None:
    if tokens and tokens["gemini_calls"]:
        print(
            f"{label}: {tokens['prompt_tokens']} prompt ({tokens['image_tokens']} image), "
            f"{tokens['thoughts_tokens']} thinking, {tokens['output_tokens']} output "
            f"in {tokens['gemini_calls']} Gemini calls",
            file=out,
        )

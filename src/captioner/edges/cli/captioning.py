"""``describe`` and ``backfill``: caption images, printing each as it completes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

from captioner.adapters.files import STDIN
from captioner.batch import FilesRequest, PrefixRequest, Totals, result_json
from captioner.decisions import IMAGE_SUFFIXES
from captioner.domain import CaptionResult, Outcome
from captioner.edges.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SPENT,
    check_include_human,
    parse_target,
    summary,
)
from captioner.errors import BadRequestError, ConfigurationError, UnreachableError
from captioner.runtime import Runtime
from captioner.safe_text import for_terminal, json_line
from captioner.settings import Settings


async def run(args: argparse.Namespace, settings: Settings) -> int:
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
    summary(totals, sys.stderr)
    if totals.stopped:
        print(f"stopped: {for_terminal(totals.stopped)}", file=sys.stderr)
        return EXIT_SPENT
    return EXIT_FAILED if totals.failed else EXIT_OK


async def _request(
    args: argparse.Namespace, runtime: Runtime
) -> tuple[FilesRequest | PrefixRequest, int | None]:
    """The batch request for ``describe`` or ``backfill``, and how many images it has
    when that is known (for the progress bar's ETA)."""
    if args.command == "describe":
        sources = _sources(args.sources)
        return FilesRequest(sources, max_cost=args.max_cost), len(sources)
    bucket, prefix = parse_target(args.target)
    check_include_human(args)
    request = PrefixRequest(
        bucket,
        prefix,
        args.limit,
        args.overwrite,
        args.dry_run,
        args.if_stale,
        args.max_cost,
        include_human=args.include_human,
    )
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
            if sys.stdin.isatty():
                raise BadRequestError(
                    "`-` reads one image from standard input, which is a terminal here: "
                    "pipe an image in (captioner describe - < photo.jpg)"
                )
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


async def _report(
    stream: AsyncGenerator[CaptionResult, None],
    totals: Totals,
    total: int | None,
    *,
    as_json: bool,
    progress: bool,
) -> None:
    bar = _progress_bar(total) if progress else None
    unreachable: list[CaptionResult] = []

    def nothing_got_through() -> bool:
        done = totals.counts[Outcome.CAPTIONED.value] + totals.failed
        return bool(unreachable) and len(unreachable) == done

    try:
        # aclosing: on an early stop, the images still in flight are cancelled here,
        # before the clients they use are closed.
        async with aclosing(stream):
            async for result in stream:
                if result.outcome is Outcome.RETRY and result.reason in _STOPS_THE_RUN:
                    # A bad key, a missing role, a used-up daily quota: every other image
                    # would get the same answer, so stop here (exit 2) rather than list them.
                    raise ConfigurationError(result.message or result.reason)
                if result.reason == UnreachableError.reason and result.outcome is Outcome.RETRY:
                    unreachable.append(result)
                    if len(unreachable) >= _UNREACHABLE_STOP and nothing_got_through():
                        # Every call failed the same way: a wrong address or a stack
                        # that is not running, not a bad moment.
                        raise ConfigurationError(f"{result.message}: {_CHECK_ADDRESS}")
                    if len(unreachable) > 1:  # said once
                        result = replace(result, message=None)
                _print_result(result, as_json, bar)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_short(totals), refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if nothing_got_through():
        raise ConfigurationError(f"{unreachable[0].message}: {_CHECK_ADDRESS}")
    if as_json:
        print(json_line({"totals": totals.as_dict()}), flush=True)


_STOPS_THE_RUN = frozenset({ConfigurationError.reason, "daily-quota"})
# Images whose every attempt found Gemini unreachable, with nothing done between them,
# before the run stops (exit 2) rather than listing the rest.
_UNREACHABLE_STOP = 3
_CHECK_ADDRESS = (
    "check GOOGLE_GEMINI_BASE_URL (unset it for Google's own endpoint), or start the "
    "local stack (make stack)"
)


def _shows_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _progress_bar(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _print_result(result: CaptionResult, as_json: bool, bar: Any) -> None:
    # Names, captions and messages come from buckets, files and the model: escaped.
    source = for_terminal(result.source)
    if as_json:
        line = json_line(result_json(result))
    elif result.outcome is Outcome.CAPTIONED:
        line = f"{source}\t{for_terminal(result.caption or '')}"
    elif result.outcome is Outcome.PLANNED:
        line = f"{source}\twould caption ({for_terminal(result.message or '')})"
    elif result.outcome is Outcome.SKIPPED:
        line = f"{source}\tskipped: {result.reason}"
    else:
        detail = f": {for_terminal(result.message)}" if result.message else ""
        line = f"{source}\t{result.outcome.value} ({result.reason}){detail}"
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _short(totals: Totals) -> str:
    c = totals.counts
    return f"ok={c['ok']} skipped={c['skipped']} blocked={c['blocked']} failed={totals.failed}"

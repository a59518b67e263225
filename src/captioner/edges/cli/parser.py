"""The command line's grammar: commands, options and their help."""

from __future__ import annotations

import argparse
from typing import Any

from captioner import __version__


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
        ("cancel", "stop jobs still running (apply writes what they answered before)"),
    ):
        follow = actions.add_parser(name, help=text)
        follow.add_argument(
            "items",
            nargs="+",
            metavar="JOB|gs://bucket/prefix",
            help="job names, or a bucket prefix whose stored runs to follow",
        )
        follow.add_argument("--run", help="only this run of the bucket (its id, from submit)")
    prune = actions.add_parser(
        "prune", help="delete the request and answer files of old runs under gs://bucket/"
    )
    prune.add_argument("target", metavar="gs://bucket/", help="the bucket whose runs to prune")
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="runs whose newest file is older than this, in days or hours (30d, 12h)",
    )
    prune.add_argument(
        "--force",
        action="store_true",
        help="also runs with answers not applied or jobs still running",
    )
    prune.add_argument("--dry-run", action="store_true", help="list the runs; delete nothing")
    for parser in actions.choices.values():
        parser.add_argument("--json", action="store_true", help="one JSON object per line")

"""The command line's grammar: commands, options, and help a person can start from."""

from __future__ import annotations

import argparse
from typing import Any

from captioner import __version__
from captioner.edges.cli.common import positive_dollars

README = "README.md"
EXIT_CODES = """exit codes:
  0    every image done (captioned, skipped or blocked)
  1    some images failed or are left to retry: run again to resume
  2    usage or configuration (bad arguments, no key, no credentials, no such bucket)
  3    stopped at --max-cost or the day's budget: run again (later) to go on
  130  interrupted (Ctrl-C)
  141  the output was closed early (| head)"""
EDIT_EXIT_CODES = """exit codes:
  0    written
  1    not written: the object changed since it was read (what it holds now is shown;
       run the edit again to replace it), or Cloud Storage failed for now
  2    usage or configuration (no such object or bucket, nothing to change, words that
       do not fit the 8 KiB of metadata, the owner's own caption key, no credentials)"""
REVIEW_EXIT_CODES = """exit codes:
  0    stopped (Ctrl-C)
  2    usage or configuration (no such bucket, the port taken, no credentials)"""
GEMINI_ENV = """environment:
  GEMINI_API_KEY            a Gemini API key (https://aistudio.google.com/apikey), or
  GOOGLE_GENAI_USE_VERTEXAI=true with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION
                            for Vertex AI (Application Default Credentials)
  GOOGLE_GEMINI_BASE_URL    another Gemini endpoint (the local stand-in: make stack)
  CAPTION_*                 settings (README, "Configuration")"""
INCLUDE_HUMAN = (
    "with --overwrite or --if-stale: replace captions people wrote or approved too "
    "(without it they are kept, counted as skipped: human)"
)
STORAGE_ENV = """  STORAGE_EMULATOR_HOST     a local Cloud Storage emulator (make stack); otherwise
                            Application Default Credentials (gcloud auth
                            application-default login)"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); defaults shown."""


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


def _port(text: str) -> int:
    """An argparse type: a TCP port number, 0 for any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, not {value}")
    return value


def _command(
    sub: Any,
    name: str,
    help: str,
    description: str,
    examples: str,
    env: str,
    exit_codes: str = EXIT_CODES,
) -> Any:
    return _knows_itself(
        sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=f"examples:\n{examples}\n\n{env}\n\n{exit_codes}\n\nmore: {README}",
            formatter_class=_Formatter,
        )
    )


def _knows_itself(parser: Any) -> Any:
    """The (sub)command's parser, on the arguments it parsed: its usage for its errors."""
    parser.set_defaults(command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description=(
            "Caption images with Gemini: print captions for local files and URLs, or "
            "write them onto images in a Cloud Storage bucket as object metadata."
        ),
        epilog=(
            "start here:\n"
            "  captioner describe photo.jpg            a caption, nothing written\n"
            "  captioner backfill gs://b/ --dry-run    what a backfill would caption\n"
            "  captioner COMMAND --help                a command's options and examples\n\n"
            f"{GEMINI_ENV}\n{STORAGE_ENV}\n\n{EXIT_CODES}\n\nmore: {README}"
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_captioning(sub)
    _add_reading(sub)
    _add_reviewing(sub)
    _add_batch(sub)
    return parser


def _add_captioning(sub: Any) -> None:
    describe = _command(
        sub,
        "describe",
        "print captions for local files, folders and URLs (writes nothing)",
        "Print a caption for each image, as it completes. Folders are searched "
        "recursively; `-` reads one image from standard input. Nothing is written anywhere.",
        "  captioner describe photo.jpg\n"
        "  captioner describe ~/Pictures/holiday/ --json > captions.jsonl\n"
        "  captioner describe https://example.com/dog.png\n"
        "  curl -s https://example.com/dog.png | captioner describe -",
        GEMINI_ENV,
    )
    describe.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image files, folders (searched recursively), http(s) URLs, or - for stdin",
    )
    backfill = _command(
        sub,
        "backfill",
        "caption every image under gs://bucket/prefix in place (resumable)",
        "Caption every image under a bucket prefix and write the captions onto the images "
        "as metadata. Done images are skipped, so a second run resumes where one stopped. "
        "Start with --dry-run: it lists what would be captioned and needs read access to "
        "the bucket only (no Gemini key).",
        "  captioner backfill gs://my-photos/2019/ --dry-run\n"
        "  captioner backfill gs://my-photos/2019/\n"
        "  captioner backfill gs://my-photos/ --if-stale --model gemini-3-flash-preview",
        f"{GEMINI_ENV}\n{STORAGE_ENV}",
    )
    backfill.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    backfill.add_argument("--overwrite", action="store_true", help="caption again even if done")
    backfill.add_argument(
        "--dry-run", action="store_true", help="list what would be captioned; write nothing"
    )
    backfill.add_argument(
        "--if-stale",
        action="store_true",
        help="caption again where the model, prompt or rule has changed since",
    )
    backfill.add_argument(
        "--limit", type=_positive, default=1_000_000, help="at most this many images"
    )
    backfill.add_argument("--include-human", action="store_true", help=INCLUDE_HUMAN)
    for command in (describe, backfill):
        _add_run_options(command)


def _add_run_options(command: Any) -> None:
    """What describe and backfill both take: output, pace, model, prompt, money."""
    command.add_argument("--json", action="store_true", help="one JSON object per line")
    command.add_argument(
        "--concurrency",
        type=int,
        help="Gemini calls in flight (default: CAPTION_MAX_CONCURRENCY)",
    )
    command.add_argument("--model", help="Gemini model (default: CAPTION_MODEL)")
    command.add_argument("--prompt", help="instruction (default: CAPTION_PROMPT)")
    command.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    command.add_argument(
        "--max-cost",
        type=positive_dollars,
        metavar="USD",
        help="stop starting images before this run would spend more (exit 3; resumable)",
    )
    command.add_argument(
        "--tier",
        choices=("standard", "flex", "priority"),
        help="Gemini's service tier, and the price paid (default: CAPTION_SERVICE_TIER)",
    )


def _add_reading(sub: Any) -> None:
    show = _command(
        sub,
        "show",
        "print the captions stored on objects",
        "Print the caption, alt text, tags and status stored on each object (no Gemini).",
        "  captioner show gs://my-photos/2019/cat.jpg\n"
        "  captioner show gs://my-photos/a.jpg gs://my-photos/b.jpg --json",
        STORAGE_ENV.replace("  STORAGE", "environment:\n  STORAGE", 1),
    )
    show.add_argument("objects", nargs="+", metavar="gs://bucket/name")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    export = _command(
        sub,
        "export",
        "write every image under gs://bucket/prefix with its caption",
        "Write one row per image under a prefix with its caption (JSON Lines or CSV), and "
        "optionally one HTML page of thumbnails to look through (no Gemini).",
        "  captioner export gs://my-photos/2019/ -o captions.jsonl\n"
        "  captioner export gs://my-photos/ --format csv -o captions.csv\n"
        "  captioner export gs://my-photos/2019/ --html captions.html --limit 500",
        STORAGE_ENV.replace("  STORAGE", "environment:\n  STORAGE", 1),
    )
    export.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument(
        "--output", "-o", help="write the rows to this file (default: standard output)"
    )
    export.add_argument(
        "--html",
        metavar="FILE",
        help="also write one page of thumbnails with their captions (rows then only with -o)",
    )
    export.add_argument("--limit", type=_positive, help="at most this many images")


def _add_reviewing(sub: Any) -> None:
    storage_env = STORAGE_ENV.replace("  STORAGE", "environment:\n  STORAGE", 1)
    who = (
        "who reviews, recorded with the caption (default: the service account of "
        "Application Default Credentials, else the login name $USER)"
    )
    edit = _command(
        sub,
        "edit",
        "correct the caption, alt text or tags of one object (a person's word is kept)",
        "Write a person's caption, alt text or tags on one object, or approve the caption "
        "it has. What is not given stays as it is. The object is marked as reviewed by a "
        "person (caption-source, caption-reviewed-by, caption-reviewed): no backfill, "
        "event or batch replaces it unless run with --include-human; a new upload is a new "
        "image and is captioned as usual. Written only if the object has not changed since "
        "it was read (exit 1 otherwise, with what it holds now). No Gemini.",
        '  captioner edit gs://my-photos/cat.jpg --caption "Our cat Miso asleep on the sofa"\n'
        '  captioner edit gs://my-photos/cat.jpg --alt "A grey cat asleep" --tags cat,sofa\n'
        "  captioner edit gs://my-photos/cat.jpg --approve --by ana@example.com",
        storage_env,
        EDIT_EXIT_CODES,
    )
    edit.add_argument("object", metavar="gs://bucket/name")
    edit.add_argument("--caption", help="the new caption")
    edit.add_argument("--alt", help='the new alt text ("" removes it)')
    edit.add_argument("--tags", help='the new tags, comma-separated ("" removes them)')
    edit.add_argument(
        "--approve", action="store_true", help="approve the caption as it is (protects it)"
    )
    edit.add_argument("--by", metavar="NAME", help=who)
    edit.add_argument("--json", action="store_true", help="the object afterwards as JSON")
    review = _command(
        sub,
        "review",
        "look through and correct the captions under gs://bucket/prefix in a browser",
        "Start a local web page of the images under a prefix with their captions, alt text, "
        "tags and status, listed as you scroll; filter by status, folder and text; edit, "
        "approve, or caption one image again with another model or prompt and keep either "
        "caption. Keys: j/k next/previous, e edit, Ctrl+Enter save, a approve, Esc cancel. "
        "It listens on 127.0.0.1 only and opens with a secret token in its URL; Ctrl-C "
        "stops it. Saves are the edits of `captioner edit`.",
        "  captioner review gs://my-photos/2019/\n"
        "  captioner review gs://my-photos/ --read-only --no-browser",
        f"{GEMINI_ENV}\n{STORAGE_ENV}\n  BROWSER                   the browser to open "
        "(Python's webbrowser)",
        REVIEW_EXIT_CODES,
    )
    review.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    review.add_argument(
        "--read-only", action="store_true", help="look only: no edit, approve or caption again"
    )
    review.add_argument(
        "--port", type=_port, default=0, help="the port on 127.0.0.1 (0: any free one)"
    )
    review.add_argument(
        "--no-browser", action="store_true", help="print the URL, do not open a browser"
    )
    review.add_argument("--by", metavar="NAME", help=who)


def _add_batch(sub: Any) -> None:
    batch = _command(
        sub,
        "batch",
        "backfill with Vertex AI batch prediction: half price, within 24 h",
        "Caption a large prefix with Vertex AI batch prediction: submit writes the requests "
        "next to the images and submits jobs; status follows them; apply writes the answers "
        "of finished jobs onto the images (only answers to what was asked); cancel stops "
        "jobs; prune deletes the files of old runs. Needs Vertex AI, not an API key.",
        "  captioner batch submit gs://my-photos/ --dry-run\n"
        "  captioner batch submit gs://my-photos/\n"
        "  captioner batch status gs://my-photos/\n"
        "  captioner batch apply gs://my-photos/\n"
        "  captioner batch prune gs://my-photos/ --older-than 30d",
        f"{GEMINI_ENV}\n{STORAGE_ENV}",
    )
    actions = batch.add_subparsers(dest="batch_action", required=True, metavar="ACTION")
    submit = actions.add_parser(
        "submit",
        help="write requests for every image under gs://bucket/prefix, submit jobs",
        formatter_class=_Formatter,
    )
    submit.add_argument("target", help="gs://bucket or gs://bucket/prefix")
    submit.add_argument("--overwrite", action="store_true", help="caption again even if done")
    submit.add_argument(
        "--if-stale", action="store_true", help="only where the model, prompt or rule changed"
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="count images, jobs and the cost; submit nothing"
    )
    submit.add_argument("--include-human", action="store_true", help=INCLUDE_HUMAN)
    _add_batch_following(actions)


def _add_batch_following(actions: Any) -> None:
    for name, text in (
        ("status", "show the state of batch jobs"),
        ("apply", "write the captions of finished jobs (resumable; twice writes nothing)"),
        ("cancel", "stop jobs still running (apply writes what they answered before)"),
    ):
        follow = actions.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        follow.add_argument(
            "items",
            nargs="+",
            metavar="JOB|gs://bucket/prefix",
            help="job names (projects/…/batchPredictionJobs/ID, or the ID), or a bucket "
            "prefix whose stored runs to follow",
        )
        follow.add_argument("--run", help="only this run of the bucket (its id, from submit)")
    _add_prune(actions)
    for parser in actions.choices.values():
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        _knows_itself(parser)


def _add_prune(actions: Any) -> None:
    prune = actions.add_parser(
        "prune",
        help="delete the request and answer files of old runs under gs://bucket/",
        description="Delete the request and answer files of old runs (captions stay). A "
        "run with a job still running or answers not yet applied is kept unless --force.",
        formatter_class=_Formatter,
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


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; a mistake is reported with the usage of the command it was made in
    (argparse would show the top level's for an option it does not know)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args

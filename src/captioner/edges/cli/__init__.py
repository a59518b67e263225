"""``captioner``: describe local files and URLs, or backfill a bucket in place.

    captioner describe photos/ cat.jpg https://example.com/dog.png
    captioner backfill gs://my-bucket/products/ [--dry-run] [--overwrite]
    captioner edit gs://my-bucket/products/cat.jpg --caption "..."   (a person's word)
    captioner review gs://my-bucket/products/      (look through and correct, in a browser)
    captioner batch submit|status|apply|cancel|prune ...   (Vertex AI batch prediction)

Captions print as they complete. A progress bar (counts, rate, ETA) shows on a
terminal only. A summary ends every run. Exit codes: 0 all done, 1 some images
failed, 2 usage or configuration (no key, no credentials, no such bucket),
130 interrupted, 141 the output was closed early (``| head``), as a shell reports
a command ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from contextlib import ExitStack

from captioner.edges.cli import batch, captioning, reviewing, stored
from captioner.edges.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE, EXIT_USAGE
from captioner.edges.cli.parser import build_parser, parse
from captioner.errors import BadRequestError, CaptionerError, ObjectGoneError, SettingsError
from captioner.safe_text import for_terminal
from captioner.settings import Settings

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`captioner … | head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return for_terminal(super().format(record))


def _log_to_the_terminal() -> None:
    """Warnings (e.g. a batch line refused, naming a planted file) on standard error as
    Python would print them unconfigured, but with control characters escaped."""
    logger = logging.getLogger("captioner")
    if not any(isinstance(h.formatter, _TerminalFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_TerminalFormatter("%(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


def _what_a_second_run_does(args: argparse.Namespace) -> str:
    if args.command == "backfill" and args.dry_run:
        return ""
    if args.command == "backfill" and args.overwrite:
        return (
            "; a second run with --overwrite starts over (without it, it captions only "
            "what was never captioned)"
        )
    if args.command == "backfill":
        return "; a second run resumes where this one stopped"
    if args.command == "batch" and args.batch_action == "apply":
        return "; apply again to go on from its checkpoint"
    return ""  # describe writes nothing; show, export and the rest just start again


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """The command, on its own event loop."""
    if args.command in ("show", "export"):
        with ExitStack() as files:
            out, page = sys.stdout, None
            if getattr(args, "output", None):
                out = files.enter_context(open(args.output, "w", encoding="utf-8", newline=""))
            if getattr(args, "html", None):
                page = files.enter_context(open(args.html, "w", encoding="utf-8"))
                if not args.output:  # the page was asked for, not rows on the terminal
                    out = files.enter_context(open(os.devnull, "w", encoding="utf-8"))
            return asyncio.run(stored.run(args, settings, out, page))
    if args.command == "batch":
        return asyncio.run(batch.run(args, settings))
    if args.command == "edit":
        return asyncio.run(reviewing.edit(args, settings))
    if args.command == "review":
        from captioner.edges.review import run

        return run(args, settings)
    return asyncio.run(captioning.run(args, settings))


def _main(argv: list[str] | None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments:  # bare `captioner`: where to start
        build_parser().print_help()
        return EXIT_OK
    args = parse(arguments)
    # stamina logs each scheduled retry as a warning; with no logging configured,
    # Python prints it bare ("stamina.retry_scheduled") among the captions. A retry
    # that ends badly shows in the image's own line and the summary.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    _log_to_the_terminal()
    try:
        overrides = {
            name: value
            for name, value in (
                ("CAPTION_MODEL", getattr(args, "model", None)),
                ("CAPTION_PROMPT", getattr(args, "prompt", None)),
                ("CAPTION_SERVICE_TIER", getattr(args, "tier", None)),
            )
            if value is not None
        }
        settings = Settings.from_env({**os.environ, **overrides})
        if getattr(args, "concurrency", None) is not None:
            if not 1 <= args.concurrency <= 5000:
                raise SettingsError("--concurrency must be from 1 to 5000")
            settings = settings.model_copy(update={"max_concurrency": args.concurrency})
    except SettingsError as exc:
        print(f"error: {for_terminal(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args, settings)
    except KeyboardInterrupt:
        print(f"interrupted{_what_a_second_run_does(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ObjectGoneError as exc:  # listing a bucket that is not there
        print(f"error: {for_terminal(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (BadRequestError, CaptionerError) as exc:
        # Bad arguments, and what stops a whole run: no key, no credentials, a key
        # Gemini refuses, a bucket we may not read.
        print(f"error: {for_terminal(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise  # main() ends quietly with 141
    except OSError as exc:  # an --output or --html file that cannot be written
        print(f"error: {for_terminal(str(exc.filename))}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE

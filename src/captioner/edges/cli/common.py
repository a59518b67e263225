"""What every command shares: exit codes, gs:// targets and the summary lines."""

from __future__ import annotations

import argparse
from typing import TextIO

from captioner.batch import Totals
from captioner.errors import BadRequestError
from captioner.pricing import dollars, unknown_price

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
EXIT_SPENT = 3  # stopped at the run's --max-cost, or the day's budget: run again to go on


def positive_dollars(text: str) -> float:
    """An argparse type: an amount of US dollars above 0 (``--max-cost 5``, ``0.50``)."""
    import argparse
    import math

    try:
        value = float(text.removeprefix("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of dollars") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 dollars, not {text}")
    return value


def parse_target(target: str) -> tuple[str, str]:
    if not target.startswith("gs://"):
        raise BadRequestError(f"{target!r}: give gs://bucket or gs://bucket/prefix")
    bucket, _, prefix = target[len("gs://") :].partition("/")
    if not bucket:
        raise BadRequestError(f"{target!r} names no bucket")
    return bucket, prefix


def check_include_human(args: argparse.Namespace) -> None:
    """--include-human only with what replaces captions: alone it would do nothing."""
    if args.include_human and not (args.overwrite or args.if_stale):
        raise BadRequestError(
            "--include-human replaces the captions people wrote or approved only with "
            "--overwrite or --if-stale: add one of them"
        )


def summary(totals: Totals, out: TextIO) -> None:
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
        token_line(label, t.get(key), out)
    money_line(totals, out)


def money_line(totals: Totals, out: TextIO) -> None:
    """What the run cost (or would cost), in dollars, or why that is not known."""
    t = totals.as_dict()
    rate = totals.rate
    for label, tokens, cost in (
        ("cost", t["tokens"], t["cost_usd"]),
        ("estimated cost", t.get("estimated_tokens"), t.get("estimated_cost_usd")),
    ):
        if not tokens or not tokens["gemini_calls"] or rate is None:
            continue
        if rate.price is None:
            print(f"{label}: unknown ({unknown_price(rate.model)})", file=out)
            return
        prices = "CAPTION_PRICES" if rate.price.source == "CAPTION_PRICES" else "list prices"
        print(f"{label}: {dollars(cost)} at {prices} ({rate.label})", file=out)


def token_line(label: str, tokens: dict[str, int] | None, out: TextIO) -> None:
    if tokens and tokens["gemini_calls"]:
        print(
            f"{label}: {tokens['prompt_tokens']} prompt ({tokens['image_tokens']} image), "
            f"{tokens['thoughts_tokens']} thinking, {tokens['output_tokens']} output "
            f"in {tokens['gemini_calls']} Gemini calls",
            file=out,
        )

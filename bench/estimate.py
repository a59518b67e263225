"""A dry run's dollars against a run's: the estimate captioner prints before spending,
and what the same images then cost, per model family, on the stand-in's token model.

The estimate is ``Runtime.estimated_usage()`` (the one a dry run, ``--max-cost`` and the
daily budget use) times the price of ``captioner.pricing``; the actual is the usage the
stand-in reports for each sample photo, described by the product's own GeminiDescriber
with the product's settings, at the same price. Target: within 10 %.

    python -m bench.estimate [--images N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from google import genai
from google.genai import types

from captioner.adapters.gemini import GeminiDescriber
from captioner.adapters.images import prepare
from captioner.domain import Usage
from captioner.pricing import PriceBook
from captioner.runtime import Runtime
from captioner.settings import Settings
from captioner_dev import PHOTOS
from captioner_dev.gemini_server import GeminiStub

MODELS = (
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
    "gemini-3-flash-preview",
    "gemini-3-pro-preview",
)


async def compare(base_url: str, n_images: int) -> list[tuple[str, float, float]]:
    photos = sorted(PHOTOS.glob("*.jpg"))[:n_images]
    rows = []
    client = genai.Client(
        api_key="bench-key",
        http_options=types.HttpOptions(
            base_url=base_url, retry_options=types.HttpRetryOptions(attempts=1)
        ),
    )
    book = PriceBook()
    async with client.aio:
        for model in MODELS:
            settings = Settings.from_env({"CAPTION_MODEL": model})
            prepared = [prepare(p.read_bytes(), max_edge=settings.max_edge) for p in photos]
            describer = GeminiDescriber.from_settings(client, settings)
            actual = Usage()
            for image in prepared:
                actual += (await describer.describe(image, settings.rule_book().default)).usage
            price = book.price(model, "standard")
            assert price is not None
            estimate = price.cost(Runtime(settings).estimated_usage()) * len(prepared)
            rows.append((model, estimate, price.cost(actual)))
    return rows


def table(rows: list[tuple[str, float, float]]) -> str:
    lines = [
        "| Model | Estimated ($ per 1,000) | Actual ($ per 1,000) | Estimate / actual |",
        "|---|---|---|---|",
    ]
    for model, estimate, actual in rows:
        lines.append(f"| `{model}` | {estimate:.4f} | {actual:.4f} | {estimate / actual:.3f} |")
    return "\n".join(lines)


async def _main(n_images: int) -> list[tuple[str, float, float]]:
    async with GeminiStub() as stub:
        return await compare(stub.base_url, n_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimate", description=__doc__)
    parser.add_argument("--images", type=int, default=7, help="sample photos per family")
    args = parser.parse_args(argv)
    rows = asyncio.run(_main(args.images))
    # Per 1,000 images, from the n described.
    scaled = [(m, e * 1000 / args.images, a * 1000 / args.images) for m, e, a in rows]
    print(table(scaled))
    worst = max(abs(e / a - 1) for _, e, a in rows)
    print(f"\nworst difference: {worst:.1%} (target: within 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())

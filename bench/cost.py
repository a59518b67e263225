"""Tokens and cost per 1,000 images, by model family: the product's settings vs the SDK's defaults.

Captions the sample photos (``captioner_dev.PHOTOS``) through the product's own
``GeminiDescriber`` against the local Gemini stand-in, started in-process, once with the
product's per-family settings (``CAPTION_THINKING=minimal``, ``CAPTION_MEDIA_RESOLUTION=auto``)
and once sending nothing about thinking or media resolution (``model-default``), which is what
the SDK sends by default and what the product sent before issue 12. Prints a Markdown table.

The numbers are the stand-in's token model (src/captioner_dev/gemini_server/tokens.py, "The token
model"), not measurements of Gemini: image tokens follow the documented rules
(https://ai.google.dev/gemini-api/docs/tokens, .../docs/media-resolution); which families think
by default and what a budget or level allows follow https://ai.google.dev/gemini-api/docs/thinking;
how many thinking tokens a caption takes at each level is the stand-in's assumption.

    python -m bench.cost [--images N] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from google import genai
from google.genai import types

from captioner.adapters.gemini import GeminiDescriber
from captioner.adapters.images import prepare
from captioner.domain import Usage
from captioner.models import MediaResolution, Thinking
from captioner.settings import Settings
from captioner_dev import PHOTOS
from captioner_dev.gemini_server import GeminiStub

# List prices per 1M tokens (input, output; thinking is billed as output), from README.md's
# "### Models" (https://ai.google.dev/gemini-api/docs/pricing, read 2026-11-25).
PRICES: dict[str, tuple[float, float]] = {
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-3-flash-preview": (0.50, 3.00),
    "gemini-3-pro-preview": (2.00, 12.00),
}


@dataclass(frozen=True)
class Row:
    model: str
    settings: str
    images: int
    usage: Usage

    def per_image(self, tokens: int) -> float:
        return tokens / self.images

    @property
    def cost_per_1000(self) -> float:
        price_in, price_out = PRICES[self.model]
        per_image = (
            (
                self.usage.prompt_tokens * price_in
                + (self.usage.output_tokens + self.usage.thoughts_tokens) * price_out
            )
            / 1_000_000
            / self.images
        )
        return per_image * 1000


async def measure(base_url: str, n_images: int) -> list[Row]:
    settings = Settings.from_env({})
    photos = sorted(PHOTOS.glob("*.jpg"))[:n_images]
    prepared = [prepare(p.read_bytes(), max_edge=settings.max_edge) for p in photos]
    rows: list[Row] = []
    client = genai.Client(
        api_key="bench-key",
        http_options=types.HttpOptions(
            base_url=base_url, retry_options=types.HttpRetryOptions(attempts=1)
        ),
    )
    async with client.aio:
        for model in PRICES:
            for label, thinking, resolution in (
                ("product", settings.thinking, settings.media_resolution),
                ("SDK defaults", Thinking.MODEL_DEFAULT, MediaResolution.MODEL_DEFAULT),
            ):
                describer = GeminiDescriber(
                    client,
                    model=model,
                    prompt=settings.prompt,
                    max_output_tokens=settings.max_output_tokens,
                    thinking=thinking,
                    media_resolution=resolution,
                    attempts=1,
                    timeout=30.0,
                )
                total = Usage()
                for image in prepared:
                    total += (await describer.describe(image)).usage
                rows.append(Row(model, label, len(prepared), total))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| Model | Sent | Prompt tokens / image (of which image) | Thinking / image "
        "| Output / image | Calls / image | Cost per 1,000 images |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        u = row.usage
        lines.append(
            f"| `{row.model}` | {row.settings} | {row.per_image(u.prompt_tokens):.0f} "
            f"({row.per_image(u.image_tokens):.0f}) | {row.per_image(u.thoughts_tokens):.0f} "
            f"| {row.per_image(u.output_tokens):.0f} | {row.per_image(u.calls):.2f} "
            f"| ${row.cost_per_1000:.3f} |"
        )
    return "\n".join(lines)


async def _main(n_images: int) -> str:
    async with GeminiStub() as stub:
        rows = await measure(stub.base_url, n_images)
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__)
    parser.add_argument("--images", type=int, default=7, help="sample photos per family")
    args = parser.parse_args(argv)
    print(asyncio.run(_main(args.images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a batch costs: the batch tier of captioner.pricing."""

from __future__ import annotations

from captioner.domain import Usage
from captioner.pricing import PriceBook


def batch_cost(model: str, usage: Usage, book: PriceBook | None = None) -> float | None:
    """US dollars for ``usage`` at the batch price (half the online list price), or None
    when the model's price is not known."""
    return (book or PriceBook()).cost(model, "batch", usage)


def times(usage: Usage, n: int) -> Usage:
    return Usage(
        usage.prompt_tokens * n,
        usage.output_tokens * n,
        usage.thoughts_tokens * n,
        usage.image_tokens * n,
        usage.calls * n,
    )

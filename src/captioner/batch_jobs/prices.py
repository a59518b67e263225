"""What a batch costs, at half the online list price."""

from __future__ import annotations

from captioner.domain import Usage

# List prices per 1M tokens (input, output; thinking is billed as output), online, for
# the Gemini API and Vertex AI (https://ai.google.dev/gemini-api/docs/pricing and
# https://cloud.google.com/vertex-ai/generative-ai/pricing, as in README "Models", read
# 2026-11-25). Batch is half of these.
_PRICES = {
    (2, "flash"): (0.30, 2.50),
    (2, "flash-lite"): (0.10, 0.40),
    (2, "pro"): (1.25, 10.00),
    (3, "flash"): (0.50, 3.00),
    (3, "pro"): (2.00, 12.00),
}
BATCH_DISCOUNT = 0.5


def batch_cost(model: str, usage: Usage) -> float | None:
    """US dollars for ``usage`` at half the online list price, or None when unknown."""
    from captioner.models import family_of

    family = family_of(model)
    prices = _PRICES.get((min(family.major, 3), family.tier))
    if family.major < 2 or (family.major, family.minor) == (2, 0) or prices is None:
        return None
    input_price, output_price = prices
    billed_output = usage.output_tokens + usage.thoughts_tokens
    online = (usage.prompt_tokens * input_price + billed_output * output_price) / 1e6
    return online * BATCH_DISCOUNT


def times(usage: Usage, n: int) -> Usage:
    return Usage(
        usage.prompt_tokens * n,
        usage.output_tokens * n,
        usage.thoughts_tokens * n,
        usage.image_tokens * n,
        usage.calls * n,
    )

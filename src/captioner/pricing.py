"""What Gemini charges, as data: a price per model family and service tier, and the
dollars of a run's tokens. Pure: no SDK import.

Sources, per row and per tier factor below. Prices are Google's list prices per 1M tokens
(thinking is billed as output, https://ai.google.dev/gemini-api/docs/thinking); Vertex AI
charges the same for these models. ``CAPTION_PRICES`` replaces any of them, for negotiated
prices or a model this table does not know: an unknown model is never given a guessed
price (``PriceBook.price`` is None and callers say so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from captioner.domain import Usage
from captioner.models import family_of

Tier = Literal["standard", "flex", "priority", "batch"]
TIERS: tuple[Tier, ...] = get_args(Tier)
SYNCHRONOUS_TIERS: tuple[Tier, ...] = ("standard", "flex", "priority")

PRICING_PAGE = "https://ai.google.dev/gemini-api/docs/pricing"


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per 1M tokens."""

    input: float
    output: float  # thinking included
    source: str = PRICING_PAGE
    read: str = "2026-11-25"

    def times(self, factor: float, source: str, read: str) -> Price:
        return Price(self.input * factor, self.output * factor, source, read)

    def cost(self, usage: Usage) -> float:
        billed_output = usage.output_tokens + usage.thoughts_tokens
        return (usage.prompt_tokens * self.input + billed_output * self.output) / 1e6


# Standard-tier list prices per family: (major, tier) → Price. Transcribed from
# https://ai.google.dev/gemini-api/docs/pricing on 2026-09-20, checked there 2026-11-25
# (2.5 Pro: prompts up to 200k tokens; a caption's prompt is a few hundred).
_STANDARD: dict[tuple[int, str], Price] = {
    (2, "flash"): Price(0.30, 2.50),
    (2, "flash-lite"): Price(0.10, 0.40),
    (2, "pro"): Price(1.25, 10.00),
    (3, "flash"): Price(0.50, 3.00),
    (3, "pro"): Price(2.00, 12.00),
}
# Each tier as a factor of the standard price, with its source (read 2026-12-03):
# - flex: "a 50% cost reduction compared to standard rates"
#   (https://ai.google.dev/gemini-api/docs/flex-inference); Vertex AI Flex PayGo "offers a
#   50% discount compared to Standard PayGo"
#   (https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo).
# - batch: 50% (https://ai.google.dev/gemini-api/docs/optimization;
#   https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini).
# - priority: "75% to 100% more than standard" (the optimization page). A range: the upper
#   end is taken, so that an estimate or a spending cap is never too low.
TIER_FACTORS: dict[Tier, tuple[float, str]] = {
    "standard": (1.0, PRICING_PAGE),
    "flex": (0.5, "https://ai.google.dev/gemini-api/docs/flex-inference"),
    "batch": (0.5, "https://ai.google.dev/gemini-api/docs/optimization"),
    "priority": (2.0, "https://ai.google.dev/gemini-api/docs/optimization"),
}


def _model_key(model: str) -> str:
    """``models/gemini-2.5-flash`` or a Vertex AI resource path → ``gemini-2.5-flash``."""
    return model.rsplit("/", 1)[-1].strip().lower()


class PriceBook:
    """The list prices, with ``CAPTION_PRICES`` laid over them."""

    def __init__(self, overrides: Mapping[str, Mapping[Tier, Price]] | None = None) -> None:
        self._overrides = {_model_key(k): dict(v) for k, v in (overrides or {}).items()}

    @classmethod
    def from_json(cls, text: str) -> PriceBook:
        """``CAPTION_PRICES``: ``{"<model>": {"input": USD, "output": USD}}`` per 1M tokens
        at the standard tier, each with optional ``"flex"``, ``"priority"`` and ``"batch"``
        objects of their own (otherwise the tier factors apply). ValueError naming what
        is wrong."""
        if not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"is not JSON: {str(exc)[:100]}") from None
        if not isinstance(data, dict):
            raise ValueError('must be a JSON object such as {"gemini-2.5-flash": {...}}')
        overrides: dict[str, dict[Tier, Price]] = {}
        for model, entry in data.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{model!r} must map to an object with input and output")
            unknown = set(entry) - {"input", "output", *TIERS}
            if unknown:
                raise ValueError(f"{model!r}: unknown key(s) {sorted(unknown)}")
            standard = _price(model, entry)
            tiers: dict[Tier, Price] = {"standard": standard}
            for tier in ("flex", "priority", "batch"):
                if tier in entry:
                    tiers[tier] = _price(f"{model}.{tier}", entry[tier])
            overrides[str(model)] = tiers
        return cls(overrides)

    def price(self, model: str, tier: Tier) -> Price | None:
        """The price of ``model`` at ``tier``, or None when it is not known."""
        own = self._overrides.get(_model_key(model))
        if own is not None:
            if tier in own:
                return own[tier]
            factor, source = TIER_FACTORS[tier]
            return own["standard"].times(factor, source, "CAPTION_PRICES")
        family = family_of(model)
        if family.major < 2 or (family.major, family.minor) == (2, 0):
            return None  # older families: not in the table, not guessed
        standard = _STANDARD.get((min(family.major, 3), family.tier))
        if standard is None:
            return None
        factor, source = TIER_FACTORS[tier]
        return standard if tier == "standard" else standard.times(factor, source, "2026-12-03")

    def cost(self, model: str, tier: Tier, usage: Usage) -> float | None:
        price = self.price(model, tier)
        return None if price is None else price.cost(usage)


@dataclass(frozen=True, slots=True)
class Rate:
    """What one configuration's tokens cost: a model at a tier, and its price if known."""

    model: str
    tier: Tier
    price: Price | None

    def cost(self, usage: Usage) -> float | None:
        return None if self.price is None else self.price.cost(usage)

    @property
    def label(self) -> str:
        return f"{self.model}, {self.tier} tier"


def unknown_price(model: str) -> str:
    return (
        f"no price is known for model {model!r}: set CAPTION_PRICES, e.g. "
        f'{{"{_model_key(model)}": {{"input": 0.30, "output": 2.50}}}} (USD per 1M tokens)'
    )


def _price(where: str, entry: Any) -> Price:
    if not isinstance(entry, dict):
        raise ValueError(f"{where!r} must be an object with input and output")
    values = []
    for key in ("input", "output"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where!r}: {key} must be a number (USD per 1M tokens)")
        if not math.isfinite(value) or value < 0 or value > 10_000:
            raise ValueError(f"{where!r}: {key} must be from 0 to 10000 USD per 1M tokens")
        values.append(float(value))
    return Price(values[0], values[1], "CAPTION_PRICES", "CAPTION_PRICES")


def dollars(amount: float | None) -> str:
    """$0.0123 for small sums (a few captions), $12.35 for large ones; "unknown" for None."""
    if amount is None:
        return "unknown"
    return f"${amount:,.4f}" if amount < 1 else f"${amount:,.2f}"

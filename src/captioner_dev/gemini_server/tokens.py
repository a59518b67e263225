"""The token model: what each model family charges for an image and for thinking."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from captioner_dev.gemini_server.wire import ApiError, get_field, model_version


def image_tokens(width: int, height: int) -> int:
    """Input tokens Gemini 2.x bills for one image."""
    if width <= 384 and height <= 384:
        return 258
    return math.ceil(width / 768) * math.ceil(height / 768) * 258


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


# ---------------------------------------------------------------------------------------------
# The token model: what each model family charges for an image and for thinking
# ---------------------------------------------------------------------------------------------
#
# Documented facts (the sources are named where they are used below):
#
# - Image tokens. Gemini 2.x: 258 for an image with both sides <= 384 px, else 258 per
#   768x768 tile (https://ai.google.dev/gemini-api/docs/tokens); with ``mediaResolution`` set,
#   LOW 64, MEDIUM 256, HIGH 256 "zoomed reframing" (the Vertex AI GenerationConfig reference,
#   field mediaResolution). Gemini 3: by ``mediaResolution`` whatever the pixels, LOW 280,
#   MEDIUM 560, HIGH 1120, ULTRA_HIGH 2240 (per part only); unspecified means HIGH for images
#   (https://ai.google.dev/gemini-api/docs/media-resolution, "Token counts").
# - Thinking (https://ai.google.dev/gemini-api/docs/thinking): 2.5 Flash and Pro think by
#   default (dynamic budget, -1); 2.5 Flash-Lite does not think unless asked. Budget ranges:
#   Pro 128..32768 and cannot be turned off, Flash 0..24576, Flash-Lite 512..24576 (0 = off).
#   Gemini 3 takes ``thinkingLevel`` (Flash: minimal/low/medium/high, Pro: low/high), default
#   high (dynamic). Thinking tokens are billed as output and count against
#   ``maxOutputTokens``; when they use it up the candidate ends MAX_TOKENS with no text parts
#   (googleapis/python-genai#782 and #811; stanford-crfm/helm#3804 "No content parts in
#   candidate"; the candidate then has ``content: {"role": "model"}`` only).
#
# Modelling choices (not published numbers): how many thinking tokens a one-image caption
# takes at each level is an assumption, chosen deterministic and in the documented order
# (off < minimal <= low < medium < high = default dynamic); a numeric budget caps it.

_IMAGE_TOKENS_G3: Final[Mapping[str, int]] = {
    "MEDIA_RESOLUTION_LOW": 280,
    "MEDIA_RESOLUTION_MEDIUM": 560,
    "MEDIA_RESOLUTION_HIGH": 1120,
    "MEDIA_RESOLUTION_ULTRA_HIGH": 2240,
}
_IMAGE_TOKENS_G2_BY_RESOLUTION: Final[Mapping[str, int]] = {
    "MEDIA_RESOLUTION_LOW": 64,
    "MEDIA_RESOLUTION_MEDIUM": 256,
    "MEDIA_RESOLUTION_HIGH": 256,
}
_FAMILY_NAME: Final = re.compile(
    r"gemini-(?P<major>\d+)(?:\.(?P<minor>\d+))?-(?P<tier>[a-z]+(?:-lite)?)"
)


@dataclass(frozen=True)
class ModelFamily:
    """``gemini-<major>[.<minor>]-<tier>``; other names count as the newest family's Flash."""

    major: int
    minor: int
    tier: str

    @classmethod
    def of(cls, model: str) -> ModelFamily:
        name = model.rsplit("/", 1)[-1].lower()
        found = _FAMILY_NAME.search(name)
        if found is None:
            return cls(3, 0, "flash")
        return cls(int(found["major"]), int(found["minor"] or 0), found["tier"])

    @property
    def thinks(self) -> bool:
        return (self.major, self.minor) >= (2, 5)

    @property
    def uses_levels(self) -> bool:
        return self.major >= 3

    @property
    def is_pro(self) -> bool:
        return self.tier == "pro"

    @property
    def is_lite(self) -> bool:
        return self.tier.endswith("-lite")


def image_tokens_for(
    model: str, width: int, height: int, media_resolution: str | None = None
) -> int:
    """Input tokens one image costs on ``model`` at ``media_resolution`` (``MEDIA_RESOLUTION_*``
    or None when the request does not say)."""
    resolution = (media_resolution or "").upper() or None
    if resolution == "MEDIA_RESOLUTION_UNSPECIFIED":
        resolution = None
    if ModelFamily.of(model).major >= 3:
        return _IMAGE_TOKENS_G3.get(resolution or "", _IMAGE_TOKENS_G3["MEDIA_RESOLUTION_HIGH"])
    if resolution is not None and resolution in _IMAGE_TOKENS_G2_BY_RESOLUTION:
        return _IMAGE_TOKENS_G2_BY_RESOLUTION[resolution]
    return image_tokens(width, height)


# Thinking tokens a caption takes when the model decides (dynamic budget, -1 or unset on 2.5,
# level HIGH on Gemini 3), and at each Gemini 3 level. MINIMAL is 0: probing the live API,
# thinkingLevel "minimal" answered with zero thinking tokens (saurabhav88/EnviousWispr#1770).
_DYNAMIC_THOUGHTS: Final[Mapping[str, int]] = {"flash": 640, "flash-lite": 384, "pro": 960}
_LEVEL_THOUGHTS: Final[Mapping[str, Mapping[str, int]]] = {
    "flash": {"MINIMAL": 0, "LOW": 160, "MEDIUM": 480, "HIGH": 960},
    "pro": {"LOW": 180, "HIGH": 1400},
}
# (smallest, largest) thinking budget per 2.5 tier (https://ai.google.dev/gemini-api/docs/thinking).
_BUDGET_RANGE: Final[Mapping[str, tuple[int, int]]] = {
    "flash": (1, 24576),
    "flash-lite": (512, 24576),
    "pro": (128, 32768),
}
# googleapis/python-genai / vercel/ai#8027: 2.5 Pro refuses a zero budget with this message.
_BUDGET_ZERO_MESSAGE: Final = "Budget 0 is invalid. This model only works in thinking mode."


def thinking_tokens_for(model: str, generation_config: Mapping[str, Any]) -> int:
    """Thinking tokens ``model`` spends on a caption with this ``generationConfig``.

    Raises the 400 the real API gives for a thinking setting the model does not take.
    """
    family = ModelFamily.of(model)
    budget, level = _thinking_settings(generation_config)
    if not family.thinks:
        # lobehub/lobehub#7985: "Thinking is not enabled for models/gemini-2.0-flash-...".
        if level is not None or budget:
            raise ApiError(400, f"Thinking is not enabled for models/{model_version(model)}")
        return 0
    if level is not None:
        return _level_thoughts(family, level)
    if family.uses_levels:
        return _gemini3_budget_thoughts(family, budget)
    return _gemini25_budget_thoughts(family, budget)


def _thinking_settings(generation_config: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """The request's (thinking budget, thinking level), checked for type and exclusivity."""
    config = get_field(generation_config, "thinking_config")
    config = config if isinstance(config, Mapping) else {}
    budget = get_field(config, "thinking_budget")
    level = get_field(config, "thinking_level")
    if isinstance(level, str):
        level = level.upper().removeprefix("THINKING_LEVEL_")
        if level == "UNSPECIFIED":
            level = None
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise ApiError(
            400,
            f"Invalid value at 'generation_config.thinking_config.thinking_budget' "
            f"(TYPE_INT32), {json.dumps(budget)}",
        )
    if budget is not None and level is not None:
        # A level and a budget in one request is a 400 (https://ai.google.dev/gemini-api/docs/
        # thinking: "use one or the other"); the wording of the message is the stub's own.
        raise ApiError(
            400, "thinking_budget and thinking_level cannot both be set: use one or the other."
        )
    return budget, level


def _level_thoughts(family: ModelFamily, level: Any) -> int:
    if not family.uses_levels:
        # RooCodeInc/Roo-Code#10700 (2.5 Flash), microsoft/vscode#334581 (2.5 Pro).
        raise ApiError(400, "Thinking level is not supported for this model.")
    levels = _LEVEL_THOUGHTS["pro" if family.is_pro else "flash"]
    if level not in levels:
        # 3 Pro takes low and high only: theJayTea/WritingTools#282 (MINIMAL),
        # egoist/chatwise-releases#1206 (MEDIUM).
        raise ApiError(
            400,
            f"Thinking level {level} is not supported for this model. "
            "Please retry with other thinking level.",
        )
    return levels[level]


def _gemini3_budget_thoughts(family: ModelFamily, budget: int | None) -> int:
    dynamic = _LEVEL_THOUGHTS["pro" if family.is_pro else "flash"]["HIGH"]
    if budget is None or budget == -1:
        return dynamic
    if budget == 0:
        # Gemini 3 takes a budget for backwards compatibility but cannot turn thinking
        # off with one: a zero budget is a 400 (saurabhav88/EnviousWispr#1770).
        raise ApiError(400, _BUDGET_ZERO_MESSAGE)
    if budget < -1 or budget > 32768:
        raise ApiError(400, f"The thinking budget ({budget}) is invalid.")
    return min(budget, dynamic)


def _gemini25_budget_thoughts(family: ModelFamily, budget: int | None) -> int:
    tier = "pro" if family.is_pro else ("flash-lite" if family.is_lite else "flash")
    dynamic = _DYNAMIC_THOUGHTS[tier]
    if budget is None:
        return 0 if family.is_lite else dynamic
    if budget == -1:
        return dynamic
    low, high = _BUDGET_RANGE[tier]
    if budget == 0:
        if family.is_pro:
            raise ApiError(400, _BUDGET_ZERO_MESSAGE)
        return 0
    if budget < -1 or budget > high:
        # RooCodeInc/Roo-Code#4399: "The thinking budget (52428) is invalid."
        raise ApiError(400, f"The thinking budget ({budget}) is invalid.")
    # Below the documented minimum the stub rounds up to it (an assumption).
    return min(max(budget, low), dynamic)

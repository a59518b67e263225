"""What each Gemini model family needs sent, decided from the model's name.

``CAPTION_MODEL`` stays free text: a model released next month is placed in a family
by its name (``gemini-<major>[.<minor>]-<tier>``) and gets that family's settings,
with no code change. Pure: no SDK import; ``captioner.adapters.gemini`` turns the answers
into google-genai types.

Sources (read 2026-11-25):

- Thinking, https://ai.google.dev/gemini-api/docs/thinking: 2.5 models take
  ``thinkingBudget`` (tokens; -1 dynamic, the default); 0 turns thinking off on 2.5
  Flash and Flash-Lite, 2.5 Pro cannot turn it off (128 to 32768); Flash-Lite does
  not think unless asked (its range is 512 to 24576). Gemini 3 takes
  ``thinkingLevel`` (Flash: minimal/low/medium/high; Pro: low/high; default high);
  a level and a budget in one request is a 400.
- Thinking tokens are billed as output and count against ``maxOutputTokens``; when
  they use it up the answer ends ``MAX_TOKENS`` with no text (python-genai issues,
  e.g. googleapis/python-genai#782).
- Image tokens, https://ai.google.dev/gemini-api/docs/media-resolution and
  .../docs/tokens: Gemini 2.x counts pixels (258 tokens for an image of at most
  384 px a side, else 258 per 768 px tile); Gemini 3 counts by ``media_resolution``
  whatever the pixel size: about 280 (low), 560 (medium), 1120 (high, the default
  for images).
- Temperature, https://ai.google.dev/gemini-api/docs/gemini-3: "we strongly
  recommend keeping the temperature parameter at its default value of 1.0";
  lower values "may lead to unexpected behavior, such as looping", which ends at
  the output cap.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_NAME = re.compile(r"gemini-(?P<major>\d+)(?:\.(?P<minor>\d+))?-(?P<tier>[a-z]+(?:-lite)?)")


class Thinking(enum.StrEnum):
    """``CAPTION_THINKING``: how much the model may think before it captions."""

    MINIMAL = "minimal"  # the least the model allows (off where it can be)
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    MODEL_DEFAULT = "model-default"  # send nothing: the model's own default


class MediaResolution(enum.StrEnum):
    """``CAPTION_MEDIA_RESOLUTION``: how many tokens an image may cost."""

    AUTO = "auto"  # low on Gemini 3 (~280 tokens); pixels decide on 2.x (258 at 768 px)
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    MODEL_DEFAULT = "model-default"


@dataclass(frozen=True, slots=True)
class Family:
    """A model family: how it thinks and how it counts image tokens."""

    major: int
    minor: int
    tier: str  # "flash", "flash-lite", "pro", ... ("" when the name says nothing)

    @property
    def uses_levels(self) -> bool:
        """Gemini 3 and later take a thinking level, not a budget."""
        return self.major >= 3

    @property
    def thinks(self) -> bool:
        """2.5 and later think; 2.0 and 1.5 take no thinking settings at all."""
        return (self.major, self.minor) >= (2, 5)


def family_of(model: str) -> Family:
    """The family of ``model``, e.g. ``gemini-2.5-flash-lite`` → (2, flash-lite).

    Accepts the forms users write: ``models/...``, a Vertex AI resource path,
    ``-preview-09-2025`` and ``-001`` suffixes. A name that is not ``gemini-N...``
    (a tuned model's id, say) is taken as the newest family, which is right for
    names Google has not used yet and harmless for the rest: only the settings
    below depend on it.
    """
    name = model.rsplit("/", 1)[-1].lower()
    match = _NAME.search(name)
    if match is None:
        return Family(3, 0, "")
    return Family(int(match.group("major")), int(match.group("minor") or 0), match.group("tier"))


# Budgets for 2.5 models, in tokens. Flash-Lite's smallest nonzero budget is 512.
_BUDGETS = {
    Thinking.LOW: 512,
    Thinking.MEDIUM: 2048,
    Thinking.HIGH: 8192,
}


def thinking_config(model: str, thinking: Thinking) -> dict[str, int | str] | None:
    """The ``thinking_config`` to send, or None to send none.

    ``{"thinking_budget": n}`` for 2.5, ``{"thinking_level": "LOW"}`` for Gemini 3;
    never both.
    """
    family = family_of(model)
    if thinking is Thinking.MODEL_DEFAULT or not family.thinks:
        return None
    if family.uses_levels:
        return {"thinking_level": _level(family, thinking)}
    if thinking is Thinking.MINIMAL:
        return {"thinking_budget": 128 if family.tier == "pro" else 0}
    return {"thinking_budget": _BUDGETS[thinking]}


def _level(family: Family, thinking: Thinking) -> str:
    if family.tier == "pro":
        # Pro takes only low and high.
        return "HIGH" if thinking in (Thinking.MEDIUM, Thinking.HIGH) else "LOW"
    return thinking.value.upper()


def media_resolution(model: str, setting: MediaResolution) -> str | None:
    """The ``media_resolution`` to send (``MEDIA_RESOLUTION_LOW`` ...), or None.

    ``auto`` sends LOW to Gemini 3 and later, whose default (high, ~1120 tokens) is
    four times what a caption needs, and nothing to 2.x, where the 768 px downscale
    already holds an image to one 258-token tile.
    """
    if setting is MediaResolution.MODEL_DEFAULT:
        return None
    if setting is MediaResolution.AUTO:
        return "MEDIA_RESOLUTION_LOW" if family_of(model).major >= 3 else None
    return f"MEDIA_RESOLUTION_{setting.value.upper()}"


def default_temperature(model: str) -> float:
    """1.0 on Gemini 3 and later (Google's advice; lower values can loop), else 0.2:
    a caption wants the likeliest words, and 2.x models do not loop at low values."""
    return 1.0 if family_of(model).major >= 3 else 0.2


# Estimates for a dry run, per image. Thinking at ``minimal``: none on 2.5 Flash and
# Flash-Lite, up to the 128-token budget on 2.5 Pro, a few dozen at Gemini 3's
# ``minimal`` level. A structured answer (caption, alt text, tags) is about 80 tokens.
_ANSWER_TOKENS = 80
_THINKING_ESTIMATE = {
    Thinking.MINIMAL: 0,
    Thinking.LOW: 256,
    Thinking.MEDIUM: 1024,
    Thinking.HIGH: 4096,
    Thinking.MODEL_DEFAULT: 1024,
}
# Thinking tokens a caption takes at each Gemini 3 level. Google publishes no per-caption
# figure: these are the assumptions of the stand-in's token model
# (captioner_dev/gemini_server/tokens.py, _LEVEL_THOUGHTS), so that a dry run's estimate
# and a run on the stand-in agree (bench/estimate.py); "minimal" matches "no thinking"
# for most requests (https://ai.google.dev/gemini-api/docs/thinking).
_LEVEL_ESTIMATE = {
    "flash": {"MINIMAL": 0, "LOW": 160, "MEDIUM": 480, "HIGH": 960},
    "pro": {"LOW": 180, "HIGH": 1400},
}
_IMAGE_TOKENS_3 = {
    "MEDIA_RESOLUTION_LOW": 280,
    "MEDIA_RESOLUTION_MEDIUM": 560,
    "MEDIA_RESOLUTION_HIGH": 1120,
}


def image_tokens_2x(width: int, height: int) -> int:
    """What Gemini 2.x bills for an image sent at this size, with no media resolution set:
    258 for both sides at most 384 px, else 258 per 768 x 768 tile
    (https://ai.google.dev/gemini-api/docs/tokens)."""
    if width <= 384 and height <= 384:
        return 258
    return -(-width // 768) * -(-height // 768) * 258


def counts_pixels(model: str, resolution: MediaResolution) -> bool:
    """Does ``model`` bill an image by its pixels (2.x with no media resolution sent)?"""
    return family_of(model).major < 3 and media_resolution(model, resolution) is None


def estimated_tokens(
    model: str, thinking: Thinking, resolution: MediaResolution, prompt: str
) -> tuple[int, int, int, int]:
    """(prompt, image, thinking, output) tokens one caption is expected to cost: an
    estimate for ``--dry-run``, from the rules above, not a measurement."""
    family = family_of(model)
    sent = media_resolution(model, resolution)
    if family.major >= 3:
        image = _IMAGE_TOKENS_3.get(sent or "MEDIA_RESOLUTION_HIGH", 1120)
    else:
        image = {"MEDIA_RESOLUTION_LOW": 64}.get(sent or "", 258)
    think = _THINKING_ESTIMATE[thinking] if family.thinks else 0
    if family.uses_levels and thinking is not Thinking.MODEL_DEFAULT:
        think = _LEVEL_ESTIMATE["pro" if family.tier == "pro" else "flash"][
            _level(family, thinking)
        ]
    elif thinking is Thinking.MINIMAL and family.thinks:
        think = 128 if family.tier == "pro" else 0  # 2.5 Pro cannot go below 128
    text = len(prompt) // 4 + 1
    return text + image, image, think, _ANSWER_TOKENS

"""A local, offline stand-in for the Gemini ``generateContent`` REST API.

The unmodified google-genai client talks to it through ``GOOGLE_GEMINI_BASE_URL`` or
``HttpOptions(base_url=...)``. It exists so that tests, the demo and benchmarks can run without
network access or billing, while still exercising the real SDK's wire format, error mapping and
timeouts. Captions are honest about being fake: they describe only what Pillow can compute
offline, and end with a fingerprint of the exact image bytes so callers can check that every
object got the caption for its own image.

Python use::

    async with GeminiStub() as stub:
        stub.add_fault("429", count=1, retry_delay=7)
        client = genai.Client(api_key="x", http_options=HttpOptions(base_url=stub.base_url))

Synchronous fixtures use ``GeminiStub().start_in_thread()``; other processes use the CLI
(``python -m captioner_dev.gemini_server --port 0``) and the ``/_stub/*`` control endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import enum
import functools
import hashlib
import io
import json
import math
import random
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeAlias, cast, get_args

from aiohttp import web
from PIL import Image, ImageChops, ImageStat

__all__ = [
    "FAULT_KINDS",
    "FaultKind",
    "FaultRule",
    "GeminiStub",
    "GeminiStubThread",
    "ImageRecord",
    "LatencyModel",
    "ModelFamily",
    "RequestRecord",
    "describe_image_bytes",
    "image_tokens",
    "image_tokens_for",
    "main",
    "thinking_tokens_for",
]

FaultKind: TypeAlias = Literal[
    "429",
    "429_per_day",
    "429_vertex",
    "bad_key",
    "failed_precondition",
    "499",
    "500",
    "503",
    "504",
    "hang",
    "safety_prompt",
    "safety_candidate",
    "empty",
    "invalid_argument",
    "custom_text",
]
FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))

# Real Gemini caps inline requests at 20 MB; twice that still lets tests probe "too big"
# without letting a runaway benchmark make the stub decode gigabytes.
MAX_INLINE_BASE64_CHARS: Final = 40 * 1024 * 1024
# aiohttp refuses bodies over 1 MiB by default, far below what real image requests carry.
CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
# Checked locally (not via Image.MAX_IMAGE_PIXELS) so the process-wide Pillow setting used by
# the code under test is left alone.
MAX_IMAGE_PIXELS: Final = 80_000_000
# API keys starting with this are answered as an invalid key (GeminiStub(bad_key_prefix=...)).
DEFAULT_BAD_KEY_PREFIX: Final = "bad"
# Far longer than any sensible client timeout; stop() wakes these sleepers early.
HANG_SECONDS: Final = 3600.0
_SHUTDOWN_TIMEOUT: Final = 2.0
_DESCRIPTION_CACHE_SIZE: Final = 1024
# Below this size decoding inline is cheaper than the hop to a worker thread.
_INLINE_DECODE_LIMIT: Final = 64 * 1024

_MODEL_PATH: Final = re.compile(
    r"^/(?P<version>v1|v1beta|v1beta1|v1alpha)/"
    r"(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?"
    r"(?:publishers/(?P<publisher>[^/]+)/)?"
    r"models/(?P<model>[^/:]+):(?P<action>generateContent|streamGenerateContent|countTokens)$"
)

# google.rpc.Code names by HTTP code, as the Gemini API pairs them
# (https://ai.google.dev/gemini-api/docs/troubleshooting; 499 CANCELLED as seen under load,
# google-gemini/gemini-cli#20309).
_STATUS_BY_CODE: Final[Mapping[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class StubConfigError(ValueError):
    """Raised for an invalid fault rule, latency or quota setting."""


class _ApiError(Exception):
    """An error to answer in Gemini's JSON error format."""

    def __init__(
        self,
        code: int,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or _STATUS_BY_CODE.get(code, "UNKNOWN")
        self.message = message
        self.details = list(details)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET


def _format_duration(seconds: float) -> str:
    """Formats seconds as a google.protobuf.Duration JSON string ("7s", "0.300s")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def _parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise StubConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value.strip().removesuffix("s"))
    raise StubConfigError(f"not a duration: {value!r}")


@functools.cache
def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _field(obj: Mapping[str, Any], snake: str) -> Any:
    """Reads a key in either spelling: the SDK mixes camelCase and snake_case."""
    if snake in obj:
        return obj[snake]
    return obj.get(_camel(snake))


# ---------------------------------------------------------------------------------------------
# Configuration objects
# ---------------------------------------------------------------------------------------------


@dataclass
class FaultRule:
    """One fault to inject.

    ``count`` is how many more requests it applies to (None = forever); ``match`` restricts it
    to requests whose prompt text, image sha256 or ``[img:xxxxxxxx]`` tag contains the
    substring; ``retry_delay`` (the 429 kinds) becomes a RetryInfo detail; ``text`` is the
    verbatim answer of a ``custom_text`` fault.

    Kinds, each answered in the real service's shape (see ``_fault_outcome``): ``429`` (a
    per-minute quota: QuotaFailure, Help, and RetryInfo when ``retry_delay`` is set),
    ``429_per_day`` (a per-day quota), ``429_vertex`` (Vertex AI's bare 429, no RetryInfo),
    ``bad_key`` (400 API_KEY_INVALID), ``failed_precondition`` (400, unsupported location),
    ``499``, ``500``, ``503``, ``504``, ``invalid_argument``, ``hang``, ``safety_prompt``,
    ``safety_candidate``, ``empty`` and ``custom_text``.
    """

    kind: FaultKind
    count: int | None = None
    match: str | None = None
    retry_delay: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise StubConfigError(f"unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}")
        if self.count is not None and self.count < 0:
            raise StubConfigError("fault count must be >= 0 or None")
        if self.retry_delay is not None and self.retry_delay < 0:
            raise StubConfigError("retry_delay must be >= 0")
        if self.kind == "custom_text" and self.text is None:
            raise StubConfigError("a custom_text fault needs text")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        if not isinstance(data, Mapping):
            raise StubConfigError(f"a fault rule must be an object, got {data!r}")
        unknown = set(data) - {"kind", "count", "match", "retry_delay", "retryDelay", "text"}
        if unknown:
            raise StubConfigError(f"unknown fault rule keys: {sorted(unknown)}")
        kind = str(data.get("kind"))
        count = data.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise StubConfigError(f"fault count must be an integer or null, got {count!r}")
        match = data.get("match")
        if match is not None and not isinstance(match, str):
            raise StubConfigError("fault match must be a string")
        delay = _field(data, "retry_delay")
        text = data.get("text")
        if text is not None and not isinstance(text, str):
            raise StubConfigError("fault text must be a string")
        return cls(
            kind=cast(FaultKind, kind),
            count=count,
            match=match,
            retry_delay=None if delay is None else _parse_duration(delay),
            text=text,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, haystacks: Sequence[str]) -> bool:
        if self.match is None:
            return True
        needle = self.match.lower()
        return any(needle in hay.lower() for hay in haystacks)


@dataclass(frozen=True)
class LatencyModel:
    """Seeded lognormal latency: ``median * exp(sigma * N(0, 1))``, capped at ``cap`` seconds.

    The defaults resemble Gemini Flash captioning an image: a median of ~1.2 s with a tail past
    4 s (p99 is about 4.9 s).
    """

    median: float = 1.2
    sigma: float = 0.6
    seed: int | None = None
    cap: float = 8.0

    def __post_init__(self) -> None:
        if self.median < 0 or self.sigma < 0 or self.cap < 0:
            raise StubConfigError("latency median, sigma and cap must be >= 0")

    def rng(self) -> random.Random:
        return random.Random(self.seed)

    def sample(self, rng: random.Random) -> float:
        return min(self.cap, self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))

    def samples(self, n: int) -> list[float]:
        """The first ``n`` delays a fresh stub with this model applies, in arrival order."""
        rng = self.rng()
        return [self.sample(rng) for _ in range(n)]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyModel:
        unknown = set(data) - {"median", "sigma", "seed", "cap"}
        if unknown:
            raise StubConfigError(f"unknown latency keys: {sorted(unknown)}")
        numbers = {
            key: _parse_duration(data[key]) for key in ("median", "sigma", "cap") if key in data
        }
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StubConfigError(f"latency seed must be an integer or null, got {seed!r}")
        return cls(**numbers, seed=seed)


Latency: TypeAlias = float | LatencyModel | None


def _latency_from_json(value: Any) -> Latency:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return LatencyModel.from_json(value)
    seconds = _parse_duration(value)
    if seconds < 0:
        raise StubConfigError("latency must be >= 0")
    return seconds


def _latency_to_json(value: Latency) -> Any:
    if isinstance(value, LatencyModel):
        return asdict(value)
    return value


# ---------------------------------------------------------------------------------------------
# Request log
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    mime_type: str
    size: int
    sha256: str

    @property
    def fingerprint(self) -> str:
        return self.sha256[:8]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint}


@dataclass
class RequestRecord:
    """What the stub saw of one model request, and how it answered (status 0 = pending)."""

    seq: int
    path: str
    api: str
    api_version: str
    model: str
    action: str
    api_key_present: bool
    bearer_present: bool
    received_at: float
    images: list[ImageRecord] = field(default_factory=list)
    file_uris: list[str] = field(default_factory=list)
    prompt: str = ""
    system_instruction: str = ""
    generation_config: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    fault: str | None = None
    status: int = 0
    finish_reason: str | None = None
    answered_at: float | None = None
    # The usage the stub reported (0 until answered, or when it answered an error).
    prompt_tokens: int = 0
    image_tokens: int = 0
    thoughts_tokens: int = 0
    output_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = [image.to_json() for image in self.images]
        return data


# ---------------------------------------------------------------------------------------------
# Image description
# ---------------------------------------------------------------------------------------------

_PALETTE: Final[tuple[tuple[str, tuple[int, int, int]], ...]] = (
    ("black", (0, 0, 0)),
    ("dark grey", (64, 64, 64)),
    ("grey", (128, 128, 128)),
    ("light grey", (192, 192, 192)),
    ("white", (255, 255, 255)),
    ("dark red", (120, 15, 20)),
    ("red", (205, 35, 35)),
    ("pink", (240, 150, 180)),
    ("orange", (240, 140, 30)),
    ("brown", (125, 80, 45)),
    ("beige", (220, 200, 160)),
    ("yellow", (240, 220, 40)),
    ("olive", (120, 120, 30)),
    ("light green", (150, 220, 120)),
    ("green", (50, 160, 60)),
    ("dark green", (25, 80, 35)),
    ("teal", (0, 128, 128)),
    ("light blue", (150, 200, 240)),
    ("blue", (40, 90, 210)),
    ("dark blue", (20, 30, 100)),
    ("purple", (120, 50, 160)),
)


@functools.cache
def _palette_image() -> Image.Image:
    flat = [channel for _, rgb in _PALETTE for channel in rgb]
    # Unused slots repeat entry 0, so anything mapped there still reads as "black".
    flat += list(_PALETTE[0][1]) * (256 - len(_PALETTE))
    palette = Image.new("P", (1, 1))
    palette.putpalette(flat)
    return palette


@dataclass(frozen=True)
class ImageFacts:
    """What can honestly be said about an image without a model."""

    format: str
    width: int
    height: int
    greyscale: bool
    brightness: float
    colours: tuple[str, ...]
    sha256: str

    @property
    def orientation(self) -> str:
        if self.width == self.height:
            return "square"
        return "landscape" if self.width > self.height else "portrait"

    @property
    def fingerprint(self) -> str:
        return self.sha256[:8]

    @property
    def tag(self) -> str:
        return f"[img:{self.fingerprint}]"

    @property
    def brightness_words(self) -> str:
        if self.brightness < 40:
            return "very dark"
        if self.brightness < 90:
            return "fairly dark"
        if self.brightness < 165:
            return "of medium brightness"
        if self.brightness < 215:
            return "fairly bright"
        return "very bright"

    @property
    def colour_words(self) -> str:
        names = list(self.colours)
        if len(names) == 1:
            return f"almost entirely {names[0]}"
        if len(names) == 2:
            return f"mostly {names[0]} and {names[1]}"
        return f"mostly {', '.join(names[:-1])} and {names[-1]}"

    def phrase(self) -> str:
        tone = "greyscale" if self.greyscale else "colour"
        return (
            f"a {self.orientation} {self.width}x{self.height} {self.format} image in {tone}, "
            f"{self.colour_words}, {self.brightness_words}"
        )

    def alt(self) -> str:
        return (
            f"{self.orientation.capitalize()} {self.format} image, {self.colour_words} "
            f"(offline stand-in) {self.tag}"
        )

    def tags(self) -> list[str]:
        tags = [*self.colours, self.orientation]
        tags.append("greyscale" if self.greyscale else "colour")
        tags.append(self.format.lower())
        return list(dict.fromkeys(tags))


_EXIF_ORIENTATION: Final = 0x0112


def describe_image_bytes(data: bytes) -> ImageFacts:
    """Computes ImageFacts, raising ValueError when the bytes are not a decodable image."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            # Checked before load() so a tiny file cannot make the stub decode a pixel bomb.
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image has {width * height} pixels")
            fmt = im.format or "unknown"
            # Rotated phone photos are stored sideways; describe them as they are displayed.
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            if fmt == "JPEG":
                im.draft("RGB", (256, 256))
            im.thumbnail((64, 64))
            rgb = im.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # Pillow's decoders raise a zoo of types for bad input.
        raise ValueError(str(exc) or type(exc).__name__) from exc
    red, green, blue = rgb.split()
    spread = ImageChops.lighter(
        ImageChops.lighter(ImageChops.difference(red, green), ImageChops.difference(green, blue)),
        ImageChops.difference(red, blue),
    )
    greyscale = ImageStat.Stat(spread).mean[0] < 6.0
    brightness = ImageStat.Stat(rgb.convert("L")).mean[0]
    indexed = rgb.quantize(palette=_palette_image(), dither=Image.Dither.NONE)
    counts = sorted(indexed.getcolors(256) or [], reverse=True)
    total = sum(count for count, _ in counts) or 1
    colours: list[str] = []
    for count, index in counts:
        name = _PALETTE[index][0] if isinstance(index, int) and index < len(_PALETTE) else "black"
        if name in colours:
            continue
        if colours and (count / total < 0.12 or len(colours) == 3):
            break
        colours.append(name)
    return ImageFacts(
        format=fmt,
        width=width,
        height=height,
        greyscale=greyscale,
        brightness=brightness,
        colours=tuple(colours) or ("black",),
        sha256=digest,
    )


def image_tokens(width: int, height: int) -> int:
    """Input tokens Gemini 2.x bills for one image."""
    if width <= 384 and height <= 384:
        return 258
    return math.ceil(width / 768) * math.ceil(height / 768) * 258


def _text_tokens(text: str) -> int:
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
    config = _field(generation_config, "thinking_config")
    config = config if isinstance(config, Mapping) else {}
    budget = _field(config, "thinking_budget")
    level = _field(config, "thinking_level")
    if isinstance(level, str):
        level = level.upper().removeprefix("THINKING_LEVEL_")
        if level == "UNSPECIFIED":
            level = None
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise _ApiError(
            400,
            f"Invalid value at 'generation_config.thinking_config.thinking_budget' "
            f"(TYPE_INT32), {json.dumps(budget)}",
        )
    if budget is not None and level is not None:
        # A level and a budget in one request is a 400 (https://ai.google.dev/gemini-api/docs/
        # thinking: "use one or the other"); the wording of the message is the stub's own.
        raise _ApiError(
            400, "thinking_budget and thinking_level cannot both be set: use one or the other."
        )
    if not family.thinks:
        # lobehub/lobehub#7985: "Thinking is not enabled for models/gemini-2.0-flash-...".
        if level is not None or budget:
            raise _ApiError(400, f"Thinking is not enabled for models/{_model_version(model)}")
        return 0
    tier = "pro" if family.is_pro else ("flash-lite" if family.is_lite else "flash")
    if level is not None:
        if not family.uses_levels:
            # RooCodeInc/Roo-Code#10700 (2.5 Flash), microsoft/vscode#334581 (2.5 Pro).
            raise _ApiError(400, "Thinking level is not supported for this model.")
        levels = _LEVEL_THOUGHTS["pro" if family.is_pro else "flash"]
        if level not in levels:
            # 3 Pro takes low and high only: theJayTea/WritingTools#282 (MINIMAL),
            # egoist/chatwise-releases#1206 (MEDIUM).
            raise _ApiError(
                400,
                f"Thinking level {level} is not supported for this model. "
                "Please retry with other thinking level.",
            )
        return levels[level]
    if family.uses_levels:
        dynamic = _LEVEL_THOUGHTS["pro" if family.is_pro else "flash"]["HIGH"]
        if budget is None or budget == -1:
            return dynamic
        if budget == 0:
            # Gemini 3 takes a budget for backwards compatibility but cannot turn thinking
            # off with one: a zero budget is a 400 (saurabhav88/EnviousWispr#1770).
            raise _ApiError(400, _BUDGET_ZERO_MESSAGE)
        if budget < -1 or budget > 32768:
            raise _ApiError(400, f"The thinking budget ({budget}) is invalid.")
        return min(budget, dynamic)
    dynamic = _DYNAMIC_THOUGHTS[tier]
    if budget is None:
        return 0 if family.is_lite else dynamic
    if budget == -1:
        return dynamic
    low, high = _BUDGET_RANGE[tier]
    if budget == 0:
        if family.is_pro:
            raise _ApiError(400, _BUDGET_ZERO_MESSAGE)
        return 0
    if budget < -1 or budget > high:
        # RooCodeInc/Roo-Code#4399: "The thinking budget (52428) is invalid."
        raise _ApiError(400, f"The thinking budget ({budget}) is invalid.")
    # Below the documented minimum the stub rounds up to it (an assumption).
    return min(max(budget, low), dynamic)


# ---------------------------------------------------------------------------------------------
# Request parsing and answering
# ---------------------------------------------------------------------------------------------


@dataclass
class _InlineImage:
    mime_type: str
    data: bytes
    record: ImageRecord
    # A per-part ``mediaResolution.level`` (Gemini 3), which overrides the request's.
    media_resolution: str | None = None


@dataclass
class _ParsedRequest:
    prompt: str
    system_instruction: str
    images: list[_InlineImage]
    file_uris: list[str]
    generation_config: dict[str, Any]


_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def _decode_base64(value: str, where: str) -> bytes:
    text = "".join(value.split()).translate(_URLSAFE_TO_STANDARD)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _ApiError(
            400, f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed"
        ) from exc


def _texts_of(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Mapping):
        raise _ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
    parts = _field(content, "parts") or []
    if not isinstance(parts, list):
        raise _ApiError(400, f"Invalid JSON payload received. '{where}.parts' must be a list.")
    return [
        part["text"]
        for part in parts
        if isinstance(part, Mapping) and isinstance(part.get("text"), str)
    ]


def _parse_generate_request(body: Any) -> _ParsedRequest:
    if not isinstance(body, Mapping):
        raise _ApiError(400, "Invalid JSON payload received. Expected an object.")
    contents = _field(body, "contents")
    if contents is None:
        raise _ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    if not isinstance(contents, list):
        raise _ApiError(400, "Invalid JSON payload received. 'contents' must be a list.")
    texts: list[str] = []
    images: list[_InlineImage] = []
    file_uris: list[str] = []
    for ci, content in enumerate(contents):
        if not isinstance(content, Mapping):
            raise _ApiError(
                400, f"Invalid JSON payload received. 'contents[{ci}]' must be an object."
            )
        parts = _field(content, "parts")
        if not isinstance(parts, list) or not parts:
            raise _ApiError(
                400,
                f"* GenerateContentRequest.contents[{ci}].parts: contents.parts must not be empty.",
            )
        for pi, part in enumerate(parts):
            where = f"contents[{ci}].parts[{pi}]"
            if not isinstance(part, Mapping):
                raise _ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
            text = part.get("text")
            if isinstance(text, str) and not part.get("thought"):
                texts.append(text)
            inline = _field(part, "inline_data")
            if inline is not None:
                image = _parse_inline(inline, f"{where}.inline_data")
                per_part = _field(part, "media_resolution")
                if isinstance(per_part, Mapping) and isinstance(per_part.get("level"), str):
                    image.media_resolution = per_part["level"]
                images.append(image)
            file_data = _field(part, "file_data")
            if isinstance(file_data, Mapping) and isinstance(_field(file_data, "file_uri"), str):
                file_uris.append(_field(file_data, "file_uri"))
    system = _field(body, "system_instruction")
    system_texts = [] if system is None else _texts_of(system, "system_instruction")
    config = _field(body, "generation_config") or {}
    if not isinstance(config, Mapping):
        raise _ApiError(
            400, "Invalid JSON payload received. 'generation_config' must be an object."
        )
    return _ParsedRequest(
        prompt="\n".join(texts),
        system_instruction="\n".join(system_texts),
        images=images,
        file_uris=file_uris,
        generation_config=dict(config),
    )


def _parse_inline(inline: Any, where: str) -> _InlineImage:
    if not isinstance(inline, Mapping):
        raise _ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
    data = inline.get("data")
    mime = _field(inline, "mime_type")
    if not isinstance(data, str):
        raise _ApiError(400, f"* GenerateContentRequest.{where}.data: required field is not set")
    if not isinstance(mime, str) or not mime:
        raise _ApiError(
            400, f"* GenerateContentRequest.{where}.mime_type: required field is not set"
        )
    if len(data) > MAX_INLINE_BASE64_CHARS:
        raise _ApiError(
            400, f"Request payload size exceeds the limit: {MAX_INLINE_BASE64_CHARS} bytes."
        )
    raw = _decode_base64(data, f"{where}.data")
    record = ImageRecord(mime_type=mime, size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    return _InlineImage(mime_type=mime, data=raw, record=record)


@dataclass(frozen=True)
class _Description:
    caption: str
    alt: str
    tags: list[str]
    width: int | None = None
    height: int | None = None
    orientation: str | None = None
    format: str | None = None
    colours: tuple[str, ...] = ()


def _describe(parsed: _ParsedRequest, facts: list[ImageFacts]) -> _Description:
    prefix = "Offline stand-in caption:"
    if len(facts) == 1:
        only = facts[0]
        return _Description(
            caption=f"{prefix} {only.phrase()}. {only.tag}",
            alt=only.alt(),
            tags=only.tags(),
            width=only.width,
            height=only.height,
            orientation=only.orientation,
            format=only.format,
            colours=only.colours,
        )
    if facts:
        pieces = [f"image {i}: {fact.phrase()} {fact.tag}" for i, fact in enumerate(facts, 1)]
        tags = list(dict.fromkeys(tag for fact in facts for tag in fact.tags()))
        return _Description(
            caption=f"{prefix} {len(facts)} images; " + "; ".join(pieces) + ".",
            alt=f"{len(facts)} images (offline stand-in) " + " ".join(f.tag for f in facts),
            tags=tags,
        )
    if parsed.file_uris:
        uris = ", ".join(parsed.file_uris)
        return _Description(
            caption=f"{prefix} a file reference ({uris}) that this offline stand-in cannot fetch.",
            alt="Unfetched file reference (offline stand-in)",
            tags=["file", "unfetched"],
        )
    return _Description(
        caption=(
            f"{prefix} no image was received; the text prompt is "
            f"{len(parsed.prompt)} characters long."
        ),
        alt="No image (offline stand-in)",
        tags=["no image", "text"],
    )


# ISO 639-1 codes likely to appear as keys of a "caption per language" object.
_LANGUAGE_CODE_LIST: Final = (
    "af am ar az be bg bn bs ca cs cy da de el en es et eu fa fi fil fr ga gl gu he hi hr hu hy "
    "id is it ja ka kk km kn ko lo lt lv mk ml mn mr ms my nb ne nl no pa pl pt ro ru si sk sl "
    "sq sr sv sw ta te th tl tr uk ur uz vi zh zu"
)
_LANGUAGE_CODES: Final = frozenset(_LANGUAGE_CODE_LIST.split())
_LANGUAGE_KEY: Final = re.compile(r"^(?P<base>[a-z]{2,3})(?:[-_][A-Za-z0-9]{2,4})?$")
_LOCALISED_NAMES: Final = ("lang", "locale", "translation", "i18n", "caption", "alt", "local")


def _language_of(key: str) -> str | None:
    found = _LANGUAGE_KEY.match(key)
    if found and found["base"] in _LANGUAGE_CODES:
        return found["base"]
    return None


class _SchemaFiller:
    """Builds a JSON value that satisfies a Gemini Schema or a JSON Schema, from a description."""

    _MAX_DEPTH: Final = 12

    def __init__(self, root: Mapping[str, Any], description: _Description) -> None:
        self._root = root
        self._desc = description

    def fill(self, schema: Any, name: str = "", depth: int = 0, prefix: str = "") -> Any:
        if not isinstance(schema, Mapping) or depth > self._MAX_DEPTH:
            return None
        schema = self._resolve(schema)
        for key in ("any_of", "one_of", "all_of"):
            options = _field(schema, key)
            if isinstance(options, list) and options:
                usable = [o for o in options if self._type(o) != "null"] or options
                return self.fill(usable[0], name, depth + 1, prefix)
        if "const" in schema:
            return schema["const"]
        enum_values = schema.get("enum")
        if isinstance(enum_values, list) and enum_values:
            return enum_values[0]
        kind = self._type(schema)
        if kind == "object":
            return self._object(schema, name, depth, prefix)
        if kind == "array":
            return self._array(schema, name, depth, prefix)
        if kind == "integer":
            return self._integer(schema, name)
        if kind == "number":
            return self._bounded(schema, 0.5)
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        return self._string(schema, name, prefix)

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        for _ in range(self._MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return schema
            target: Any = self._root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, Mapping) else None
            if not isinstance(target, Mapping):
                return schema
            schema = target
        return schema

    def _type(self, schema: Any) -> str | None:
        if not isinstance(schema, Mapping):
            return None
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if str(k).lower() != "null"), "null")
        if isinstance(kind, str) and kind:
            return kind.lower()
        if _field(schema, "properties") is not None:
            return "object"
        if schema.get("items") is not None:
            return "array"
        return None

    def _object(self, schema: Mapping[str, Any], name: str, depth: int, prefix: str) -> Any:
        properties = _field(schema, "properties")
        if not isinstance(properties, Mapping):
            properties = {}
        order = _field(schema, "property_ordering")
        keys = [k for k in order if k in properties] if isinstance(order, list) else []
        keys += [k for k in properties if k not in keys]
        languages = {key: _language_of(key) for key in keys}
        is_language_map = (
            bool(keys)
            and all(languages.values())
            and (len(keys) >= 2 or any(word in name.lower() for word in _LOCALISED_NAMES))
        )
        result: dict[str, Any] = {}
        for key in keys:
            sub_prefix = prefix
            if is_language_map:
                # English is the source text; other languages are marked, not translated.
                sub_prefix = "" if languages[key] == "en" else f"[{key}] "
            result[key] = self.fill(properties[key], key, depth + 1, sub_prefix)
        return result

    def _array(self, schema: Mapping[str, Any], name: str, depth: int, prefix: str) -> Any:
        items = schema.get("items")
        low = _field(schema, "min_items")
        high = _field(schema, "max_items")
        min_items = int(low) if isinstance(low, int | str) and str(low).isdigit() else 0
        max_items = int(high) if isinstance(high, int | str) and str(high).isdigit() else None
        item_schema = self._resolve(items) if isinstance(items, Mapping) else None
        free_strings = item_schema is None or (
            self._type(item_schema) in ("string", None) and not item_schema.get("enum")
        )
        if free_strings:
            values: list[Any] = list(self._desc.tags[:5])
            while len(values) < min_items:
                values.append(f"tag{len(values) + 1}")
        else:
            singular = name[:-1] if name.endswith("s") else name
            values = [
                self.fill(items, singular, depth + 1, prefix) for _ in range(max(1, min_items))
            ]
        return values if max_items is None else values[:max_items]

    def _integer(self, schema: Mapping[str, Any], name: str) -> int:
        lowered = name.lower()
        if "width" in lowered and self._desc.width is not None:
            return self._desc.width
        if "height" in lowered and self._desc.height is not None:
            return self._desc.height
        return int(self._bounded(schema, 1))

    def _bounded(self, schema: Mapping[str, Any], default: float) -> float:
        value = default
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, int | float) and value < low:
            value = float(low)
        if isinstance(high, int | float) and value > high:
            value = float(high)
        return value

    def _string(self, schema: Mapping[str, Any], name: str, prefix: str) -> str:
        lowered = name.lower()
        desc = self._desc
        if "alt" in lowered or "title" in lowered:
            value = desc.alt
        elif lowered in {"lang", "language", "language_code", "languagecode", "locale"}:
            value = "en"
        elif ("colour" in lowered or "color" in lowered) and desc.colours:
            value = desc.colours[0]
        elif "orientation" in lowered and desc.orientation:
            value = desc.orientation
        elif ("format" in lowered or "mime" in lowered) and desc.format:
            value = desc.format
        elif any(word in lowered for word in ("tag", "keyword", "label")) and desc.tags:
            value = desc.tags[0]
        else:
            value = desc.caption
        value = prefix + value
        limit = _field(schema, "max_length")
        if isinstance(limit, int | str) and str(limit).isdigit():
            value = value[: int(limit)]
        return value


def _answer_text(parsed: _ParsedRequest, description: _Description) -> str:
    config = parsed.generation_config
    mime = str(_field(config, "response_mime_type") or "text/plain").lower()
    schema = _field(config, "response_schema")
    if schema is None:
        schema = _field(config, "response_json_schema")
    if mime == "application/json":
        if isinstance(schema, Mapping):
            value = _SchemaFiller(schema, description).fill(schema)
        else:
            value = {"caption": description.caption}
        return json.dumps(value, ensure_ascii=False)
    if mime == "text/x.enum" and isinstance(schema, Mapping):
        options = schema.get("enum")
        if isinstance(options, list) and options:
            return str(options[0])
    return description.caption


def _max_output_tokens(config: Mapping[str, Any]) -> int | None:
    value = _field(config, "max_output_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


@dataclass(frozen=True)
class _PromptTokens:
    text: int
    image: int

    @property
    def total(self) -> int:
        return self.text + self.image


def _usage_json(prompt: _PromptTokens, output: int, thoughts: int) -> dict[str, Any]:
    """``usageMetadata`` as the Gemini API sends it: counts of zero are left out, and
    ``promptTokensDetails`` splits the prompt by modality (GenerateContentResponse.UsageMetadata,
    https://ai.google.dev/api/generate-content#UsageMetadata)."""
    usage: dict[str, Any] = {"promptTokenCount": prompt.total}
    if output:
        usage["candidatesTokenCount"] = output
    usage["totalTokenCount"] = prompt.total + output + thoughts
    details = [{"modality": "TEXT", "tokenCount": prompt.text}]
    if prompt.image:
        details.append({"modality": "IMAGE", "tokenCount": prompt.image})
    usage["promptTokensDetails"] = details
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _candidate_response(
    parts: list[dict[str, Any]] | None,
    finish_reason: str,
    usage: dict[str, Any],
    model: str,
    response_id: str,
    extra_candidate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {"role": "model"}
    if parts is not None:
        content["parts"] = parts
    candidate: dict[str, Any] = {"content": content, "finishReason": finish_reason, "index": 0}
    candidate.update(extra_candidate or {})
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    status: int
    body: dict[str, Any]
    finish_reason: str | None = None
    # (prompt, image, thoughts, output) tokens reported, for the request log.
    usage: tuple[int, int, int, int] = (0, 0, 0, 0)


class GeminiStub:
    """The server and its state. Every method except start/stop is thread-safe."""

    def __init__(
        self,
        *,
        latency: Latency = None,
        quota_rps: float | None = None,
        faults: Sequence[FaultRule] = (),
        bad_key_prefix: str | None = DEFAULT_BAD_KEY_PREFIX,
    ) -> None:
        self._lock = threading.Lock()
        self._bad_key_prefix: str | None = None
        self._latency: Latency = None
        self._rng = random.Random()
        self._quota_rps: float | None = None
        self._tokens = 0.0
        self._refilled_at = 0.0
        self._faults: list[FaultRule] = []
        self._requests: list[RequestRecord] = []
        self._calls = 0
        self._seq = 0
        self._cache: OrderedDict[str, ImageFacts] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._base_url: str | None = None
        self.configure(
            latency=latency, quota_rps=quota_rps, faults=list(faults), bad_key_prefix=bad_key_prefix
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        if self._runner is not None:
            raise RuntimeError("GeminiStub is already running")
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, bound_host)
        if ":" in shown:
            shown = f"[{shown}]"
        self._base_url = f"http://{shown}:{bound_port}"
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if self._stopping is not None:
            self._stopping.set()
        if runner is not None:
            await runner.cleanup()
        self._base_url = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> GeminiStubThread:
        return GeminiStubThread(self, host=host, port=port).start()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("GeminiStub is not running")
        return self._base_url

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=CLIENT_MAX_SIZE)
        app.router.add_get("/_stub/health", self._http_health)
        app.router.add_get("/_stub/requests", self._http_requests)
        app.router.add_get("/_stub/config", self._http_get_config)
        app.router.add_post("/_stub/config", self._http_post_config)
        app.router.add_post("/_stub/reset", self._http_reset)
        # One catch-all instead of aiohttp patterns: a "{model}" variable cannot span the "/"
        # of Vertex resource names, and the ":action" suffix is easier to split with a regex.
        app.router.add_route("*", "/{tail:.*}", self._http_model)
        return app

    # -- state --------------------------------------------------------------------------------

    def configure(
        self,
        *,
        latency: Latency | _Unset = _UNSET,
        quota_rps: float | _Unset | None = _UNSET,
        faults: Sequence[FaultRule] | _Unset = _UNSET,
        add_faults: Sequence[FaultRule] = (),
        bad_key_prefix: str | _Unset | None = _UNSET,
    ) -> None:
        """Changes only the settings passed: ``faults`` replaces the rules, ``add_faults`` adds.

        An API key (``x-goog-api-key`` or ``?key=``) starting with ``bad_key_prefix`` is
        refused as the Gemini API refuses an invalid key (None: every key is good).
        """
        if isinstance(bad_key_prefix, str) and not bad_key_prefix:
            raise StubConfigError("bad_key_prefix must be a non-empty string or null")
        if not isinstance(quota_rps, _Unset) and quota_rps is not None and quota_rps <= 0:
            raise StubConfigError("quota_rps must be > 0 or None")
        if isinstance(latency, int | float) and latency < 0:
            raise StubConfigError("latency must be >= 0")
        with self._lock:
            if not isinstance(latency, _Unset):
                self._latency = latency
                self._rng = latency.rng() if isinstance(latency, LatencyModel) else random.Random()
            if not isinstance(quota_rps, _Unset):
                self._quota_rps = quota_rps
                self._tokens = self._burst()
                self._refilled_at = time.monotonic()
            if not isinstance(faults, _Unset):
                self._faults = list(faults)
            self._faults.extend(add_faults)
            if not isinstance(bad_key_prefix, _Unset):
                self._bad_key_prefix = bad_key_prefix

    def add_fault(
        self,
        kind: FaultKind,
        *,
        count: int | None = None,
        match: str | None = None,
        retry_delay: float | None = None,
        text: str | None = None,
    ) -> FaultRule:
        rule = FaultRule(kind, count=count, match=match, retry_delay=retry_delay, text=text)
        self.configure(add_faults=[rule])
        return rule

    def clear_faults(self) -> None:
        self.configure(faults=[])

    @property
    def latency(self) -> Latency:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, value: Latency) -> None:
        self.configure(latency=value)

    @property
    def quota_rps(self) -> float | None:
        with self._lock:
            return self._quota_rps

    @quota_rps.setter
    def quota_rps(self, value: float | None) -> None:
        self.configure(quota_rps=value)

    @property
    def faults(self) -> list[FaultRule]:
        """Copies of the active rules; a rule disappears once its count is used up."""
        with self._lock:
            return [replace(rule) for rule in self._faults]

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return [replace(record) for record in self._requests]

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def bad_key_prefix(self) -> str | None:
        with self._lock:
            return self._bad_key_prefix

    def reset(self) -> None:
        """Clears faults, latency, quota and the request log; bad keys start with "bad" again."""
        with self._lock:
            self._requests.clear()
            self._calls = 0
            self._seq = 0
        self.configure(
            latency=None, quota_rps=None, faults=[], bad_key_prefix=DEFAULT_BAD_KEY_PREFIX
        )

    def config_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency": _latency_to_json(self._latency),
                "quota_rps": self._quota_rps,
                "faults": [rule.to_json() for rule in self._faults],
                "bad_key_prefix": self._bad_key_prefix,
            }

    def configure_json(self, data: Any) -> None:
        """Applies a ``POST /_stub/config`` body (see configure)."""
        if not isinstance(data, Mapping):
            raise StubConfigError("the config must be a JSON object")
        unknown = set(data) - {"latency", "quota_rps", "faults", "add_faults", "bad_key_prefix"}
        if unknown:
            raise StubConfigError(f"unknown config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "latency" in data:
            kwargs["latency"] = _latency_from_json(data["latency"])
        if "quota_rps" in data:
            quota = data["quota_rps"]
            kwargs["quota_rps"] = None if quota is None else _parse_duration(quota)
        if "bad_key_prefix" in data:
            prefix = data["bad_key_prefix"]
            if prefix is not None and not isinstance(prefix, str):
                raise StubConfigError("bad_key_prefix must be a string or null")
            kwargs["bad_key_prefix"] = prefix
        for key in ("faults", "add_faults"):
            if key in data:
                rules = data[key]
                if not isinstance(rules, list):
                    raise StubConfigError(f"{key} must be a list")
                kwargs[key] = [FaultRule.from_json(rule) for rule in rules]
        self.configure(**kwargs)

    def _burst(self) -> float:
        return 0.0 if self._quota_rps is None else max(1.0, self._quota_rps)

    def _take_quota(self) -> float | None:
        """Spends one token; returns None when allowed, else the seconds until a token is free."""
        rate = self._quota_rps
        if rate is None:
            return None
        now = time.monotonic()
        self._tokens = min(self._burst(), self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / rate

    def _take_fault(self, haystacks: Sequence[str]) -> FaultRule | None:
        for index, rule in enumerate(self._faults):
            if rule.count == 0:
                continue
            if not rule.matches(haystacks):
                continue
            if rule.count is not None:
                rule.count -= 1
                if rule.count == 0:
                    del self._faults[index]
            return replace(rule)
        return None

    def _sample_latency(self) -> float:
        latency = self._latency
        if isinstance(latency, LatencyModel):
            return latency.sample(self._rng)
        return float(latency or 0.0)

    async def _sleep(self, seconds: float) -> bool:
        """Sleeps unless the stub is stopping; returns True if it was woken by stop()."""
        if seconds <= 0 or self._stopping is None:
            return False
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _facts(self, image: _InlineImage) -> ImageFacts:
        key = image.record.sha256
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        try:
            if len(image.data) > _INLINE_DECODE_LIMIT:
                facts = await asyncio.to_thread(describe_image_bytes, image.data)
            else:
                facts = describe_image_bytes(image.data)
        except ValueError as exc:
            raise _ApiError(
                400,
                "Unable to process input image. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            ) from exc
        with self._lock:
            self._cache[key] = facts
            while len(self._cache) > _DESCRIPTION_CACHE_SIZE:
                self._cache.popitem(last=False)
        return facts

    # -- HTTP: model routes -------------------------------------------------------------------

    async def _http_model(self, request: web.Request) -> web.StreamResponse:
        route = _MODEL_PATH.match(request.path)
        if route is None or request.method != "POST":
            return _json_error(_ApiError(404, f"Method not found: {request.method} {request.path}"))
        model = route["model"]
        api = "vertex" if route["project"] or route["publisher"] else "gemini"
        authorization = request.headers.get("Authorization", "")
        with self._lock:
            self._seq += 1
            self._calls += 1
            record = RequestRecord(
                seq=self._seq,
                path=request.path,
                api=api,
                api_version=route["version"],
                model=model,
                action=route["action"],
                api_key_present=bool(
                    request.headers.get("x-goog-api-key") or request.query.get("key")
                ),
                bearer_present=authorization.lower().startswith("bearer "),
                received_at=time.time(),
            )
            self._requests.append(record)
        outcome = await self._answer(request, record, model)
        with self._lock:
            record.status = outcome.status
            record.finish_reason = outcome.finish_reason
            record.answered_at = time.time()
            (
                record.prompt_tokens,
                record.image_tokens,
                record.thoughts_tokens,
                record.output_tokens,
            ) = outcome.usage
        if outcome.status == 200 and record.action == "streamGenerateContent":
            payload = json.dumps(outcome.body, ensure_ascii=False)
            return web.Response(text=f"data: {payload}\r\n\r\n", content_type="text/event-stream")
        return web.json_response(outcome.body, status=outcome.status, dumps=_dumps)

    async def _answer(self, request: web.Request, record: RequestRecord, model: str) -> _Outcome:
        key = request.headers.get("x-goog-api-key") or request.query.get("key") or ""
        prefix = self.bad_key_prefix
        if prefix and key.startswith(prefix):
            # The key is checked before anything else, as the real front end does.
            with self._lock:
                record.fault = "bad_key"
            return _Outcome(400, _bad_key_error().body())
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge as exc:
                raise _ApiError(
                    400, f"Request payload size exceeds the limit: {CLIENT_MAX_SIZE} bytes."
                ) from exc
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
                raise _ApiError(
                    400, f"Invalid JSON payload received. {exc.__class__.__name__}: {exc}"
                ) from exc
            parsed = _parse_generate_request(body)
        except _ApiError as error:
            return _Outcome(error.code, error.body())
        with self._lock:
            record.images = [image.record for image in parsed.images]
            record.file_uris = list(parsed.file_uris)
            record.prompt = parsed.prompt
            record.system_instruction = parsed.system_instruction
            record.generation_config = parsed.generation_config
        if record.action == "countTokens":
            return await self._count_tokens(parsed, model)
        try:
            # A thinking setting the model does not take is refused before any work.
            thoughts = thinking_tokens_for(model, parsed.generation_config)
        except _ApiError as error:
            return _Outcome(error.code, error.body())
        haystacks = [parsed.prompt, parsed.system_instruction]
        for image in parsed.images:
            haystacks += [image.record.sha256, f"[img:{image.record.fingerprint}]"]
        with self._lock:
            # Quota is decided on arrival, like the real front end, so rejections are fast.
            wait = self._take_quota()
            rule = None if wait is not None else self._take_fault(haystacks)
            delay = 0.0 if wait is not None else self._sample_latency()
            record.latency = delay
            record.fault = "quota" if wait is not None else (rule.kind if rule else None)
        if wait is not None:
            rounded = max(0.1, math.ceil(wait * 10 - 1e-9) / 10)
            return _Outcome(429, _quota_error(model, rounded).body())
        if await self._sleep(delay):
            return _Outcome(503, _ApiError(503, "The stub is shutting down.").body())
        response_id = f"stub-{record.seq:08d}"
        try:
            if rule is not None:
                return await self._fault_outcome(rule, parsed, model, response_id)
            return await self._success(parsed, model, response_id, thoughts)
        except _ApiError as error:
            return _Outcome(error.code, error.body())

    async def _prompt_tokens(self, parsed: _ParsedRequest, model: str) -> _PromptTokens:
        text = _text_tokens(parsed.prompt) + _text_tokens(parsed.system_instruction)
        resolution = _field(parsed.generation_config, "media_resolution")
        image = 0
        for part in parsed.images:
            facts = await self._facts(part)
            chosen = part.media_resolution or (resolution if isinstance(resolution, str) else None)
            image += image_tokens_for(model, facts.width, facts.height, chosen)
        return _PromptTokens(text, image)

    async def _count_tokens(self, parsed: _ParsedRequest, model: str) -> _Outcome:
        try:
            tokens = await self._prompt_tokens(parsed, model)
        except _ApiError as error:
            return _Outcome(error.code, error.body())
        return _Outcome(
            200, {"totalTokens": tokens.total}, usage=(tokens.total, tokens.image, 0, 0)
        )

    async def _success(
        self, parsed: _ParsedRequest, model: str, response_id: str, thoughts: int
    ) -> _Outcome:
        facts = [await self._facts(image) for image in parsed.images]
        prompt = await self._prompt_tokens(parsed, model)
        text = _answer_text(parsed, _describe(parsed, facts))
        finish = "STOP"
        parts: list[dict[str, Any]] | None = None
        limit = _max_output_tokens(parsed.generation_config)
        if limit is not None and thoughts >= limit:
            # Thinking used up maxOutputTokens: MAX_TOKENS, a content with a role and no parts.
            thoughts, output, finish = limit, 0, "MAX_TOKENS"
        else:
            room = None if limit is None else limit - thoughts
            if room is not None and _text_tokens(text) > room:
                text = text[: room * 4]
                finish = "MAX_TOKENS"
            output = _text_tokens(text)
            parts = [{"text": text}]
        body = _candidate_response(
            parts,
            finish,
            _usage_json(prompt, output, thoughts),
            _model_version(model),
            response_id,
        )
        return _Outcome(200, body, finish, (prompt.total, prompt.image, thoughts, output))

    async def _fault_outcome(
        self, rule: FaultRule, parsed: _ParsedRequest, model: str, response_id: str
    ) -> _Outcome:
        version = _model_version(model)
        error = _fault_error(rule, model)
        if error is not None:
            return _Outcome(error.code, error.body())
        if rule.kind == "hang":
            await self._sleep(HANG_SECONDS)
            return _Outcome(503, _ApiError(503, "The stub is shutting down.").body())
        prompt = await self._prompt_tokens(parsed, model)
        usage = (prompt.total, prompt.image, 0, 0)
        if rule.kind == "safety_prompt":
            body: dict[str, Any] = {
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": _BLOCKED_RATINGS},
                "usageMetadata": _usage_json(prompt, 0, 0),
                "modelVersion": version,
                "responseId": response_id,
            }
            return _Outcome(200, body, None, usage)
        if rule.kind == "safety_candidate":
            body = _candidate_response(
                None,
                "SAFETY",
                _usage_json(prompt, 0, 0),
                version,
                response_id,
                {"safetyRatings": _BLOCKED_RATINGS},
            )
            return _Outcome(200, body, "SAFETY", usage)
        if rule.kind == "empty":
            body = _candidate_response(
                None, "STOP", _usage_json(prompt, 0, 0), version, response_id
            )
            return _Outcome(200, body, "STOP", usage)
        text = rule.text or ""
        output = _text_tokens(text)
        body = _candidate_response(
            [{"text": text}], "STOP", _usage_json(prompt, output, 0), version, response_id
        )
        return _Outcome(200, body, "STOP", (prompt.total, prompt.image, 0, output))

    # -- HTTP: control routes -----------------------------------------------------------------

    async def _http_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "calls": self.calls})

    async def _http_requests(self, request: web.Request) -> web.Response:
        since = request.query.get("since", "0")
        first = int(since) if since.isdigit() else 0
        records = [r.to_json() for r in self.requests if r.seq >= first]
        return web.json_response(records, dumps=_dumps)

    async def _http_get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config_json())

    async def _http_post_config(self, request: web.Request) -> web.Response:
        try:
            self.configure_json(json.loads(await request.read() or b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError, StubConfigError) as exc:
            return _json_error(_ApiError(400, f"Invalid stub config: {exc}"))
        return web.json_response(self.config_json())

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "ok"})


# ---------------------------------------------------------------------------------------------
# Errors, in the shapes the real services send
# ---------------------------------------------------------------------------------------------

# The Gemini API's per-minute 429, with QuotaFailure, Help and RetryInfo details in this order
# (RooCodeInc/Roo-Code#3883; googleapis/python-genai#2044 shows the per-day quotaId).
_QUOTA_MESSAGE: Final = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
_QUOTA_HELP: Final = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [
        {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
        }
    ],
}
# Vertex AI's 429 carries no details at all (google-gemini/gemini-cli#14831).
_VERTEX_QUOTA_MESSAGE: Final = (
    "Resource exhausted. Please try again later. Please refer to "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
)
_BLOCKED_RATINGS: Final = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
]


_QUOTA_METRIC: Final = "generativelanguage.googleapis.com/generate_content_free_tier_requests"


def _quota_failure(model: str, quota_id: str, value: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": _QUOTA_METRIC,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": _model_version(model)},
                "quotaValue": value,
            }
        ],
    }


def _quota_error(model: str, retry_delay: float | None, *, per_day: bool = False) -> _ApiError:
    quota_id = (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        if per_day
        else "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    )
    details: list[Mapping[str, Any]] = [
        _quota_failure(model, quota_id, "250" if per_day else "10"),
        _QUOTA_HELP,
    ]
    if retry_delay is not None:
        details.append(_retry_info(retry_delay))
    return _ApiError(429, _QUOTA_MESSAGE, details)


def _bad_key_error() -> _ApiError:
    # The Gemini API's answer to a wrong or revoked key: a plain 400, told apart only by the
    # ErrorInfo reason (continuedev/continue#8516, google/timesketch#3703).
    message = "API key not valid. Please pass a valid API key."
    return _ApiError(
        400,
        message,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ],
    )


def _fault_error(rule: FaultRule, model: str) -> _ApiError | None:
    """The error a fault rule answers with, or None for the kinds that answer 200 (or hang)."""
    kind = rule.kind
    if kind == "429":
        return _quota_error(model, rule.retry_delay)
    if kind == "429_per_day":
        return _quota_error(model, rule.retry_delay, per_day=True)
    if kind == "429_vertex":
        return _ApiError(429, _VERTEX_QUOTA_MESSAGE)
    if kind == "bad_key":
        return _bad_key_error()
    if kind == "failed_precondition":
        # google-gemini/gemini-cli#1614, poenl/gemini-api#4: no details.
        return _ApiError(
            400, "User location is not supported for the API use.", status="FAILED_PRECONDITION"
        )
    if kind == "invalid_argument":
        return _ApiError(400, "Request contains an invalid argument.")
    if kind == "499":
        # google-gemini/gemini-cli#20309, under heavy load.
        return _ApiError(499, "The operation was cancelled.")
    if kind == "500":
        return _ApiError(
            500,
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        )
    if kind == "503":
        return _ApiError(503, "The model is overloaded. Please try again later.")
    if kind == "504":
        # The status is documented (https://ai.google.dev/gemini-api/docs/troubleshooting);
        # the message is Google APIs' usual one for DEADLINE_EXCEEDED, not seen verbatim here.
        return _ApiError(504, "Deadline expired before operation could complete.")
    return None


def _retry_info(seconds: float) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": _format_duration(seconds),
    }


def _model_version(model: str) -> str:
    return model.removeprefix("models/")


def _dumps(value: Any) -> str:
    # Non-ASCII captions stay readable in logs and payloads, as Gemini sends them;
    # text that is not valid UTF-8 (lone surrogates, for fault tests) goes out escaped.
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _json_error(error: _ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.code)


# ---------------------------------------------------------------------------------------------
# Running on a background thread
# ---------------------------------------------------------------------------------------------


class GeminiStubThread:
    """Runs a GeminiStub on its own event loop in a daemon thread, for synchronous code."""

    def __init__(
        self, stub: GeminiStub | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.stub = stub or GeminiStub()
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("GeminiStubThread is already running")
        self._thread = threading.Thread(target=self._run, name="gemini-stub", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("GeminiStub did not start in time")
        if self._error is not None:
            raise RuntimeError("GeminiStub failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.stub.start(self._host, self._port))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self.stub.stop(), loop)
        future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    @property
    def base_url(self) -> str:
        return self.stub.base_url

    @property
    def requests(self) -> list[RequestRecord]:
        return self.stub.requests

    @property
    def calls(self) -> int:
        return self.stub.calls

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioner_dev.gemini_server",
        description="Offline Gemini-compatible server for tests, the demo and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--latency", type=float, help="fixed latency in seconds")
    parser.add_argument("--latency-median", type=float, help="lognormal latency median (s)")
    parser.add_argument("--latency-sigma", type=float, default=0.6)
    parser.add_argument("--latency-cap", type=float, default=8.0)
    parser.add_argument("--seed", type=int, help="seed for the latency distribution")
    parser.add_argument("--quota-rps", type=float, help="token-bucket quota, requests/second")
    parser.add_argument(
        "--bad-key-prefix",
        default=DEFAULT_BAD_KEY_PREFIX,
        help='API keys starting with this get the real "API key not valid" 400 ("" for none)',
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    latency: Latency = args.latency
    if args.latency_median is not None:
        latency = LatencyModel(
            median=args.latency_median,
            sigma=args.latency_sigma,
            seed=args.seed,
            cap=args.latency_cap,
        )
    stub = GeminiStub(
        latency=latency, quota_rps=args.quota_rps, bad_key_prefix=args.bad_key_prefix or None
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    # Issue 11.10: ``async with stub`` started on the defaults (127.0.0.1, a random port) and
    # ignored --host/--port; start where asked.
    await stub.start(args.host, args.port)
    try:
        # Parents (tests, the demo, benchmarks) wait for this exact line to learn the port.
        print(f"READY {stub.base_url}", flush=True)
        await done.wait()
    finally:
        await stub.stop()


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (OSError, StubConfigError) as exc:
        print(f"gemini_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The stand-in's settings: fault rules, latency and the limits it enforces."""

from __future__ import annotations

import contextlib
import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, TypeAlias, cast, get_args

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


class StubConfigError(ValueError):
    """Raised for an invalid fault rule, latency or quota setting."""


class Unset(enum.Enum):
    UNSET = enum.auto()


UNSET: Final = Unset.UNSET


def format_duration(seconds: float) -> str:
    """Formats seconds as a google.protobuf.Duration JSON string ("7s", "0.300s")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise StubConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value.strip().removesuffix("s"))
    raise StubConfigError(f"not a duration: {value!r}")


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
        delay = data["retry_delay"] if "retry_delay" in data else data.get("retryDelay")
        text = data.get("text")
        if text is not None and not isinstance(text, str):
            raise StubConfigError("fault text must be a string")
        return cls(
            kind=cast(FaultKind, kind),
            count=count,
            match=match,
            retry_delay=None if delay is None else parse_duration(delay),
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
            key: parse_duration(data[key]) for key in ("median", "sigma", "cap") if key in data
        }
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StubConfigError(f"latency seed must be an integer or null, got {seed!r}")
        return cls(**numbers, seed=seed)


Latency: TypeAlias = float | LatencyModel | None


def latency_from_json(value: Any) -> Latency:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return LatencyModel.from_json(value)
    seconds = parse_duration(value)
    if seconds < 0:
        raise StubConfigError("latency must be >= 0")
    return seconds


def latency_to_json(value: Latency) -> Any:
    if isinstance(value, LatencyModel):
        return asdict(value)
    return value

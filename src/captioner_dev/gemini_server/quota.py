"""The stand-in's quotas, in the shapes Google's services apply them, and the RetryInfo delay
each one answers with.

One definition for the stand-in itself (real time) and for the simulated fleets of
bench/fleet_sim.py and the limiter's unit tests (simulated time), so that what they
simulate is the quota the real benchmark meets. Every quota has ``take(now, cost)``: None
when the call is let through (and counted), else the seconds until it would be.

The shapes (``QuotaShape``), each from the documentation it follows:

- ``bucket``: a token bucket of ``rate`` requests a second holding one second's worth. The
  stand-in's quota before issue 23; no Google document describes this one, it is kept as the
  shape every earlier benchmark ran against.
- ``sliding-second``: at most ``rate`` requests in any one second (a sliding window). Vertex
  AI's Standard PayGo "throttles second-level spikes even if your average per-minute usage is
  below your limit" and asks clients to spread traffic evenly
  (https://docs.cloud.google.com/vertex-ai/generative-ai/docs/standard-paygo); how the spike is
  measured is not published, and a one-second window is the simplest reading. Answered with
  the Gemini API's 429 and a RetryInfo delay, as issue 23's operator saw it.
- ``minute``: requests per minute (RPM) as the Gemini API counts them, per project and model
  (https://ai.google.dev/gemini-api/docs/rate-limits: "if your RPM limit is 20, making 21
  requests within a minute will result in an error"). Google's rate quotas are enforced per
  synchronized 60-second interval: "if a project reaches a quota limit at 10:00:15, the quota
  refills at the start of the next synchronized interval, such as 10:01:00, rather than
  refilling immediately" (https://docs.cloud.google.com/compute/api-quota). So a burst at the
  start of a minute passes in full, then every call is refused until the minute ends, and the
  429's RetryInfo names the rest of the minute (RooCodeInc/Roo-Code#3883 "26s",
  googleapis/python-genai#2044 "47s").
- ``tpm``: input tokens per minute (TPM), the Gemini API's other per-minute limit (the same
  page: "Tokens per minute (input)"), counted over the same synchronized minutes; a call costs
  its prompt's tokens (image and text, as the stand-in reports them in ``usageMetadata``). Its
  429 names ``GenerateContentInputTokensPerModelPerMinute`` (RooCodeInc/Roo-Code#3883).
- ``vertex``: Vertex AI Standard PayGo: an organisation-level TPM threshold
  (https://docs.cloud.google.com/vertex-ai/generative-ai/docs/standard-paygo, "Usage tiers and
  throughput") whose second-level spikes are throttled; modelled as at most a sixtieth of the
  TPM in input tokens in any one second, so that only traffic spread evenly over the minute
  gets the whole threshold. Refused with Vertex AI's bare 429 "Resource exhausted, please try
  again later." and no RetryInfo
  (https://docs.cloud.google.com/vertex-ai/generative-ai/docs/provisioned-throughput/error-code-429,
  google-gemini/gemini-cli#14831). Vertex AI lets traffic burst past the threshold "on a
  best-effort basis" when there is spare capacity; the stand-in never has any, the worst case.

RetryInfo rounding: the Gemini API's per-minute 429s name whole seconds, rounded down ("Please
retry in 26.660853464s." with ``retryDelay: "26s"``, diegosouzapw/OmniRoute#7961), so a client
that waits exactly that long comes back a fraction of a second early; the stand-in does the
same for the minute shapes (at least one second: no answer of "0s" has been seen). The
short-window shapes name tenths of a second, rounded up, as the stand-in always has.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import Final, Protocol


class QuotaShape(enum.StrEnum):
    BUCKET = "bucket"
    SLIDING_SECOND = "sliding-second"
    MINUTE = "minute"
    TPM = "tpm"
    VERTEX = "vertex"

    @property
    def counts_tokens(self) -> bool:
        """Limited in input tokens per minute (``quota_tpm``), not requests a second."""
        return self in (QuotaShape.TPM, QuotaShape.VERTEX)

    @property
    def sends_retry_info(self) -> bool:
        return self is not QuotaShape.VERTEX


QUOTA_SHAPES: Final = tuple(shape.value for shape in QuotaShape)
MINUTE: Final = 60.0


class Quota(Protocol):
    """A limit on what is let through; the stand-in asks it once per model call."""

    @property
    def rate(self) -> float:
        """What it lets through a second, sustained, in its own unit (requests or tokens)."""
        ...

    def take(self, now: float, cost: float = 1.0) -> float | None:
        """Counts a call of ``cost`` if it fits: None, else the seconds until it would."""
        ...

    def retry_delay(self, wait: float) -> float:
        """The RetryInfo delay this quota's 429 names for a ``wait``."""
        ...


def retry_delay(wait: float) -> float:
    """The RetryInfo delay for a wait: rounded up to a tenth of a second, at least 0.1 s."""
    return max(0.1, math.ceil(wait * 10 - 1e-9) / 10)


def whole_seconds(wait: float) -> float:
    """The Gemini API's per-minute RetryInfo: whole seconds, rounded down, at least one."""
    return float(max(1, math.floor(wait)))


class TokenBucket:
    """``rate`` a second, at most ``burst`` held (default one second's worth), full when made."""

    def __init__(self, rate: float, now: float, *, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("a quota's rate must be > 0")
        self.rate = rate
        self._burst = max(1.0, rate) if burst is None else max(1.0, burst)
        self._tokens = self._burst
        self._refilled_at = now

    @property
    def burst(self) -> float:
        return self._burst

    def take(self, now: float, cost: float = 1.0) -> float | None:
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return None
        return (cost - self._tokens) / self.rate

    def retry_delay(self, wait: float) -> float:
        return retry_delay(wait)


class SlidingWindow:
    """At most ``limit`` (requests, or tokens) accepted in any ``window`` seconds."""

    def __init__(self, limit: float, window: float = 1.0, *, whole_seconds: bool = False) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("a quota's limit and window must be > 0")
        self.limit = limit
        self.window = window
        self._whole_seconds = whole_seconds
        self._accepted: deque[tuple[float, float]] = deque()
        self._used = 0.0

    @property
    def rate(self) -> float:
        return self.limit / self.window

    def take(self, now: float, cost: float = 1.0) -> float | None:
        while self._accepted and self._accepted[0][0] <= now - self.window:
            self._used -= self._accepted.popleft()[1]
        if self._used + cost <= self.limit + 1e-9 or not self._accepted:
            self._accepted.append((now, cost))
            self._used += cost
            return None
        # Free once enough of the oldest calls have left the window.
        excess = self._used + cost - self.limit
        for at, spent in self._accepted:
            excess -= spent
            if excess <= 1e-9:
                return max(0.0, at + self.window - now)
        return self.window  # unreachable: the oldest call alone frees enough

    def retry_delay(self, wait: float) -> float:
        return whole_seconds(wait) if self._whole_seconds else retry_delay(wait)


class FixedWindow:
    """At most ``limit`` (requests, or tokens) in each ``window`` seconds counted from
    ``start``: a synchronized interval, as Google's per-minute rate quotas are enforced."""

    def __init__(self, limit: float, start: float, window: float = MINUTE) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("a quota's limit and window must be > 0")
        self.limit = limit
        self.window = window
        self._start = start
        self._index = 0
        self._used = 0.0

    @property
    def rate(self) -> float:
        return self.limit / self.window

    def take(self, now: float, cost: float = 1.0) -> float | None:
        index = math.floor((now - self._start) / self.window)
        if index != self._index:
            self._index, self._used = index, 0.0
        if self._used + cost <= self.limit + 1e-9 or self._used == 0:
            self._used += cost
            return None
        return self._start + (index + 1) * self.window - now

    def retry_delay(self, wait: float) -> float:
        return whole_seconds(wait)


def make_quota(
    shape: QuotaShape | str, now: float, *, rps: float | None = None, tpm: float | None = None
) -> Quota | None:
    """The quota of ``shape``: ``rps`` requests a second for the request shapes, ``tpm`` input
    tokens a minute for the token shapes; None when that number is None (no quota)."""
    shape = QuotaShape(shape)
    limit = tpm if shape.counts_tokens else rps
    if limit is None:
        return None
    if limit <= 0:
        raise ValueError("a quota must be > 0")
    if shape is QuotaShape.BUCKET:
        return TokenBucket(limit, now)
    if shape is QuotaShape.SLIDING_SECOND:
        return SlidingWindow(max(1.0, limit), 1.0)
    if shape is QuotaShape.MINUTE:
        return FixedWindow(max(1.0, limit * MINUTE), now)
    if shape is QuotaShape.TPM:
        return FixedWindow(limit, now)
    return SlidingWindow(limit / MINUTE, 1.0)  # vertex: a second's share of the minute

"""The stand-in's request quota: a token bucket, and the RetryInfo delay it answers with.

One definition for the stand-in itself (real time) and for the simulated fleets of
bench/fleet_sim.py and the limiter's unit tests (simulated time), so that what they
simulate is the quota the real benchmark meets.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens a second, at most ``max(1, rate)`` held (one second's worth), full
    when made."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = self.burst
        self._refilled_at = now

    @property
    def burst(self) -> float:
        return max(1.0, self.rate)

    def take(self, now: float) -> float | None:
        """Spends one token: None when allowed, else the seconds until one is free."""
        self._tokens = min(self.burst, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate


def retry_delay(wait: float) -> float:
    """The RetryInfo delay for a wait: rounded up to a tenth of a second, at least 0.1 s."""
    return max(0.1, math.ceil(wait * 10 - 1e-9) / 10)

"""Retry policy shared by the adapters, built on stamina (tenacity underneath).

Only TransientError is retried, with exponential backoff and full jitter (a wait
drawn uniformly from zero to the exponential bound, so many clients that failed
together do not retry together). When the service named a delay (Gemini's
RetryInfo, an HTTP Retry-After), that delay is used instead.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import stamina

from captioner.errors import ConfigurationError, TransientError

T = TypeVar("T")

# One generator for every retry sequence: seeding a new Random() from os.urandom for
# each call cost 3% of the event loop's time in the benchmark.
_JITTER = random.Random()


def backoff_hook(
    wait_initial: float, wait_max: float, rng: random.Random | None = None
) -> Callable[[Exception], bool | float]:
    """Stamina hook: False for errors not worth retrying, else the seconds to wait."""
    draw = (rng or _JITTER).uniform
    failures = 0

    def hook(exc: Exception) -> bool | float:
        nonlocal failures
        if not isinstance(exc, TransientError) or isinstance(exc, ConfigurationError):
            # A configuration problem answers the same way until someone fixes it.
            return False
        failures += 1
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), wait_max)
        return draw(0.0, min(wait_max, wait_initial * 2 ** (failures - 1)))

    return hook


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    deadline: float | None,
    wait_initial: float = 0.5,
    wait_max: float = 30.0,
) -> T:
    """Await ``call()`` until it succeeds, raises a non-transient error, or attempts run out.

    ``deadline`` (seconds) bounds the whole sequence, waits included.
    """
    async for attempt in stamina.retry_context(
        on=backoff_hook(wait_initial, wait_max),
        attempts=attempts,
        timeout=deadline,
        wait_initial=wait_initial,
        wait_max=wait_max,
        wait_jitter=0.0,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: stamina re-raises the last error")

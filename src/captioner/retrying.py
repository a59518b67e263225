"""Retry policy shared by the adapters, built on stamina (tenacity underneath).

Only TransientError is retried. When the service named a delay (Gemini's
RetryInfo, an HTTP Retry-After), that delay is used instead of the backoff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import stamina

from captioner.errors import TransientError

T = TypeVar("T")


def _retry_hook(max_wait: float) -> Callable[[Exception], bool | float]:
    def hook(exc: Exception) -> bool | float:
        if not isinstance(exc, TransientError):
            return False
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), max_wait)
        return True

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

    Backoff is exponential with jitter; ``deadline`` (seconds) bounds the whole sequence.
    """
    async for attempt in stamina.retry_context(
        on=_retry_hook(wait_max),
        attempts=attempts,
        timeout=deadline,
        wait_initial=wait_initial,
        wait_max=wait_max,
        wait_jitter=wait_initial,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: stamina re-raises the last error")

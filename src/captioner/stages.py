"""A stopwatch per object: seconds spent fetching, preparing, describing and writing.

The stopwatch of the object being captioned travels with its task in a context
variable, so the adapters' callers can time a stage without passing it around.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Stages:
    """Seconds spent in each stage of one object (fetch, prepare, describe, write)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + elapsed, 4)


_CURRENT: ContextVar[Stages | None] = ContextVar("captioner_stages", default=None)


@contextmanager
def timing() -> Iterator[Stages]:
    """A new stopwatch, current for this task (and the tasks it starts) until the end."""
    stages = Stages()
    token = _CURRENT.set(stages)
    try:
        yield stages
    finally:
        _CURRENT.reset(token)


def current() -> Stages:
    """The stopwatch of the object being captioned in this task (a spare one outside)."""
    return _CURRENT.get() or Stages()

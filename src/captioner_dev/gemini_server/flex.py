"""The Flex tier, as the stand-in plays it: a slower, sheddable way to the same model.

What Google documents (read 2026-12-03):

- The Gemini API takes ``service_tier: "flex"`` in the request body (``serviceTier`` as
  google-genai 3.x sends it); the standard tier when it is left out
  (https://ai.google.dev/gemini-api/docs/flex-inference). Vertex AI's Flex PayGo is asked
  for with the header ``X-Vertex-AI-LLM-Shared-Request-Type: flex`` on the global endpoint
  (https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo); ``priority`` the same
  way for Priority PayGo.
- Latency: "Minutes (1-15 min target)"; reliability: "Best-effort (Sheddable)"; 50 % off
  (https://ai.google.dev/gemini-api/docs/optimization). Vertex AI's Flex PayGo times a
  request out after 20 minutes by default.
- Neither page names the error a shed request gets. Google's answer on its forum for
  capacity, not quota (discuss.ai.google.dev, "Gemini 503 issue"): 503 UNAVAILABLE, "our
  services are temporarily at capacity". The stand-in sheds with that 503.

Minutes are scaled down for tests and benchmarks: ``latency`` is the stand-in's flex
latency in seconds (a few seconds stands for a few minutes), ``shed`` the share of flex
requests answered 503 at once. Controls: ``stub.flex.configure(...)`` or
``POST /_stub/flex``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from typing import Any

from captioner_dev.gemini_server.config import StubConfigError

VERTEX_TIER_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"
TIERS = frozenset({"standard", "flex", "priority"})
SHED_MESSAGE = "The service is currently unavailable."


def tier_of(body: Any, headers: Mapping[str, str]) -> str:
    """The service tier a request asks for: the Vertex AI header, else the body's field."""
    header = headers.get(VERTEX_TIER_HEADER, "").strip().lower()
    if header:
        return header
    if isinstance(body, Mapping):
        field = body.get("serviceTier", body.get("service_tier"))
        if isinstance(field, str):
            return field.strip().lower().removeprefix("service_tier_")
    return "standard"


class FlexSettings:
    """How slow and how unreliable the stand-in's flex tier is. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency = 0.0
        self._shed = 0.0
        self._rng = random.Random(0)

    def configure(self, *, latency: float | None = None, shed: float | None = None) -> None:
        if latency is not None and not 0 <= latency <= 3600:
            raise StubConfigError("flex latency must be from 0 to 3600 seconds")
        if shed is not None and not 0 <= shed <= 1:
            raise StubConfigError("flex shed must be a share from 0 to 1")
        with self._lock:
            if latency is not None:
                self._latency = float(latency)
            if shed is not None:
                self._shed = float(shed)

    def configure_json(self, data: Any) -> None:
        if not isinstance(data, Mapping) or set(data) - {"latency", "shed"}:
            raise StubConfigError('the flex config is an object of "latency" and "shed"')
        for name in ("latency", "shed"):
            value = data.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise StubConfigError(f"flex {name} must be a number")
        self.configure(latency=data.get("latency"), shed=data.get("shed"))

    def config_json(self) -> dict[str, float]:
        with self._lock:
            return {"latency": self._latency, "shed": self._shed}

    def reset(self) -> None:
        self.configure(latency=0.0, shed=0.0)

    def delay(self) -> float:
        """The flex latency of one request: around the configured one, half to one and a
        half times it, so calls made together do not all come back together."""
        with self._lock:
            return self._latency * (0.5 + self._rng.random())

    def sheds(self) -> bool:
        with self._lock:
            return self._rng.random() < self._shed

"""The stand-in's mutable state: its settings (faults, latency, quota, bad keys) and the log
of the requests it answered. Every method is thread-safe."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from captioner_dev.gemini_server.config import (
    DEFAULT_BAD_KEY_PREFIX,
    UNSET,
    FaultKind,
    FaultRule,
    Latency,
    LatencyModel,
    StubConfigError,
    Unset,
    latency_from_json,
    latency_to_json,
    parse_duration,
)
from captioner_dev.gemini_server.errors import quota_refusal
from captioner_dev.gemini_server.quota import Quota, QuotaShape, make_quota
from captioner_dev.gemini_server.records import RequestRecord
from captioner_dev.gemini_server.wire import ApiError


class StubState:
    """Settings and request log, shared by the server's handlers and the test's thread."""

    def __init__(
        self,
        *,
        latency: Latency = None,
        quota_rps: float | None = None,
        quota_shape: QuotaShape | str = QuotaShape.BUCKET,
        quota_tpm: float | None = None,
        faults: Sequence[FaultRule] = (),
        bad_key_prefix: str | None = DEFAULT_BAD_KEY_PREFIX,
    ) -> None:
        self._lock = threading.Lock()
        self._bad_key_prefix: str | None = None
        self._latency: Latency = None
        self._rng = random.Random()
        self._quota: Quota | None = None
        self._quota_shape = QuotaShape.BUCKET
        self._quota_rps: float | None = None
        self._quota_tpm: float | None = None
        self._faults: list[FaultRule] = []
        self._requests: list[RequestRecord] = []
        self._calls = 0
        self._seq = 0
        self.configure(
            latency=latency,
            quota_rps=quota_rps,
            quota_shape=quota_shape,
            quota_tpm=quota_tpm,
            faults=list(faults),
            bad_key_prefix=bad_key_prefix,
        )

    def configure(
        self,
        *,
        latency: Latency | Unset = UNSET,
        quota_rps: float | Unset | None = UNSET,
        quota_shape: QuotaShape | str | Unset = UNSET,
        quota_tpm: float | Unset | None = UNSET,
        faults: Sequence[FaultRule] | Unset = UNSET,
        add_faults: Sequence[FaultRule] = (),
        bad_key_prefix: str | Unset | None = UNSET,
    ) -> None:
        """Changes only the settings passed: ``faults`` replaces the rules, ``add_faults`` adds.

        The quota (quota.py) is ``quota_rps`` requests a second for the request shapes
        (``bucket``, ``sliding-second``, ``minute``) or ``quota_tpm`` input tokens a minute for
        the token shapes (``tpm``, ``vertex``); setting any of the three starts it afresh (a
        full bucket, an empty window, the first minute starting now).

        An API key (``x-goog-api-key`` or ``?key=``) starting with ``bad_key_prefix`` is
        refused as the Gemini API refuses an invalid key (None: every key is good).
        """
        if isinstance(bad_key_prefix, str) and not bad_key_prefix:
            raise StubConfigError("bad_key_prefix must be a non-empty string or null")
        for name, value in (("quota_rps", quota_rps), ("quota_tpm", quota_tpm)):
            if isinstance(value, int | float) and value <= 0:
                raise StubConfigError(f"{name} must be > 0 or None")
        if isinstance(quota_shape, str):
            try:
                quota_shape = QuotaShape(quota_shape)
            except ValueError:
                shapes = ", ".join(shape.value for shape in QuotaShape)
                raise StubConfigError(
                    f"unknown quota_shape {quota_shape!r}; use one of {shapes}"
                ) from None
        if isinstance(latency, int | float) and latency < 0:
            raise StubConfigError("latency must be >= 0")
        with self._lock:
            if not isinstance(latency, Unset):
                self._latency = latency
                self._rng = latency.rng() if isinstance(latency, LatencyModel) else random.Random()
            changed = False
            if not isinstance(quota_rps, Unset):
                self._quota_rps, changed = quota_rps, True
            if not isinstance(quota_tpm, Unset):
                self._quota_tpm, changed = quota_tpm, True
            if not isinstance(quota_shape, Unset):
                self._quota_shape, changed = quota_shape, True
            if changed:
                self._quota = make_quota(
                    self._quota_shape, time.monotonic(), rps=self._quota_rps, tpm=self._quota_tpm
                )
            if not isinstance(faults, Unset):
                self._faults = list(faults)
            self._faults.extend(add_faults)
            if not isinstance(bad_key_prefix, Unset):
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
    def quota_shape(self) -> QuotaShape:
        with self._lock:
            return self._quota_shape

    @property
    def quota_tpm(self) -> float | None:
        with self._lock:
            return self._quota_tpm

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
            latency=None,
            quota_rps=None,
            quota_shape=QuotaShape.BUCKET,
            quota_tpm=None,
            faults=[],
            bad_key_prefix=DEFAULT_BAD_KEY_PREFIX,
        )

    def config_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency": latency_to_json(self._latency),
                "quota_rps": self._quota_rps,
                "quota_shape": self._quota_shape.value,
                "quota_tpm": self._quota_tpm,
                "faults": [rule.to_json() for rule in self._faults],
                "bad_key_prefix": self._bad_key_prefix,
            }

    def configure_json(self, data: Any) -> None:
        """Applies a ``POST /_stub/config`` body (see configure)."""
        if not isinstance(data, Mapping):
            raise StubConfigError("the config must be a JSON object")
        known = {"latency", "quota_rps", "quota_shape", "quota_tpm", "faults", "add_faults"}
        unknown = set(data) - known - {"bad_key_prefix"}
        if unknown:
            raise StubConfigError(f"unknown config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "latency" in data:
            kwargs["latency"] = latency_from_json(data["latency"])
        for key in ("quota_rps", "quota_tpm"):
            if key in data:
                quota = data[key]
                kwargs[key] = None if quota is None else parse_duration(quota)
        if "quota_shape" in data:
            if not isinstance(data["quota_shape"], str):
                raise StubConfigError("quota_shape must be a string")
            kwargs["quota_shape"] = data["quota_shape"]
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

    def _take_quota(self, model: str, tokens: int) -> ApiError | None:
        """Counts one call (of ``tokens`` input tokens, for the token shapes): None when it is
        let through, else the 429 its shape answers with. Called under the lock."""
        quota, shape = self._quota, self._quota_shape
        wait = None if quota is None else quota.take(time.monotonic(), tokens or 1)
        if quota is None or wait is None:
            return None
        delay = quota.retry_delay(wait)
        return quota_refusal(shape, model, delay, rps=self._quota_rps, tpm=self._quota_tpm)

    @property
    def quota_counts_tokens(self) -> bool:
        """The quota is in tokens: a call's prompt tokens are needed before it is decided."""
        with self._lock:
            return self._quota is not None and self._quota_shape.counts_tokens

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

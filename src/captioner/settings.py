"""The ``CAPTION_*`` settings, parsed once into one frozen object.

A bad value fails at start with a message that names the variable, so a typo in a
deployment shows up in the first log line rather than as odd behaviour later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from captioner.captions import DEFAULT_PROMPT
from captioner.errors import SettingsError
from captioner.models import MediaResolution, Thinking

if TYPE_CHECKING:
    from captioner.pricing import PriceBook
    from captioner.rules import RuleBook

ENV_PREFIX = "CAPTION_"


_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


# CAPTION_PROMPT's limit, and a prompt typed on the review page's.
MAX_PROMPT_CHARS = 4000


class Settings(BaseModel):
    """Everything the pipeline can be configured with. Field ``x`` is ``CAPTION_X``."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    model: Annotated[str, Field(min_length=1, max_length=200)] = "gemini-2.5-flash"
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = DEFAULT_PROMPT
    max_concurrency: Annotated[int, Field(ge=1, le=5000)] = 16
    max_edge: Annotated[int, Field(ge=64, le=4096)] = 768
    max_bytes: Annotated[int, Field(ge=1, le=1 << 31)] = 20 * 1024 * 1024
    max_pixels: Annotated[int, Field(ge=1, le=1 << 31)] = 50_000_000
    allowed_buckets: tuple[str, ...] = ()
    languages: tuple[str, ...] = ("en",)
    metadata_prefix: str = "caption"
    max_output_tokens: Annotated[int, Field(ge=16, le=65536)] = 1024
    # None: per model family (1.0 on Gemini 3, as Google advises; 0.2 before).
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    thinking: Thinking = Thinking.MINIMAL
    media_resolution: MediaResolution = MediaResolution.AUTO
    # Seconds per Gemini attempt; None: per tier (see call_timeout).
    gemini_timeout: Annotated[float | None, Field(gt=0, le=1800)] = None
    gemini_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    storage_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    retry_max_wait: Annotated[float, Field(ge=0, le=300)] = 30.0
    deadline: Annotated[float, Field(gt=0, le=3600)] = 480.0
    http_deadline: Annotated[float, Field(gt=0, le=3600)] = 480.0
    log_format: Literal["json", "text"] = "json"
    mode: Literal["structured", "sentence"] = "structured"
    rules: str = ""
    url_allowed_hosts: tuple[str, ...] = ()
    url_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    url_max_redirects: Annotated[int, Field(ge=0, le=20)] = 5
    # Vertex AI batch jobs (captioner batch ...): per-job limits, where runs are kept,
    # and answers written at once by `batch apply`. The caps are Vertex AI's own limits,
    # "Quotas and limits" of
    # https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini
    # (read 2026-11-29): up to 200,000 requests per job, and a 1 GB file with Cloud Storage
    # input.
    batch_max_requests: Annotated[int, Field(ge=1, le=200_000)] = 200_000
    batch_max_bytes: Annotated[int, Field(ge=4096, le=1_000_000_000)] = 1_000_000_000
    batch_prefix: str = "captioner-batch/"
    batch_apply_concurrency: Annotated[int, Field(ge=1, le=1000)] = 64
    # How often `batch apply` stores where it got to: the work redone after a crash, against
    # a checkpoint write every so many seconds.
    batch_checkpoint_seconds: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    # What it costs (captioner.pricing): prices over the list prices, the service tier
    # calls are made (and priced) at, and a daily spending cap per bucket, kept in a
    # ledger object under budget_prefix in that bucket (captioner.spending).
    prices: str = ""
    service_tier: Literal["standard", "flex", "priority"] = "standard"
    daily_budget_usd: Annotated[float | None, Field(gt=0, le=1_000_000)] = None
    budget_prefix: str = "captioner-budget/"

    @field_validator("allowed_buckets", "languages", "url_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_buckets")
    @classmethod
    def _bucket_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for bucket in value:
            if not _BUCKET.match(bucket):
                raise ValueError(f"{bucket!r} is not a valid bucket name")
        return value

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one language code, e.g. 'en'")
        for code in value:
            if not _LANGUAGE.match(code):
                raise ValueError(f"{code!r} is not a language code like 'en' or 'pt-BR'")
        if len(set(value)) != len(value):
            raise ValueError("lists a language twice")
        return value

    @field_validator("rules")
    @classmethod
    def _rules(cls, value: str) -> str:
        from captioner.rules import parse_rules

        parse_rules(value)
        return value

    def rule_book(self) -> RuleBook:
        from captioner.captions import CaptionSpec
        from captioner.rules import RuleBook, parse_rules

        default = CaptionSpec(self.prompt, self.mode == "structured", self.languages)
        return RuleBook(default, parse_rules(self.rules))

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: str) -> str:
        from captioner.pricing import PriceBook

        PriceBook.from_json(value)
        return value

    @property
    def call_timeout(self) -> float:
        """Seconds one Gemini attempt may take: ``CAPTION_GEMINI_TIMEOUT``, else 60, and 15
        minutes at the flex tier, whose calls take "minutes (1-15 min target)"
        (https://ai.google.dev/gemini-api/docs/flex-inference; Vertex AI's Flex PayGo
        defaults to 20 and allows 30, https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo)."""
        if self.gemini_timeout is not None:
            return self.gemini_timeout
        return 900.0 if self.service_tier == "flex" else 60.0

    def price_book(self) -> PriceBook:
        from captioner.pricing import PriceBook

        return PriceBook.from_json(self.prices)

    @field_validator("batch_prefix", "budget_prefix")
    @classmethod
    def _batch_prefix(cls, value: str) -> str:
        if not value.endswith("/") or value.startswith("/") or len(value) > 200:
            raise ValueError("must be a folder name ending in '/', such as 'captioner-batch/'")
        return value

    @field_validator("metadata_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (at most 32)")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from ``CAPTION_*`` variables; raise SettingsError naming the culprit."""
        values: dict[str, str] = {}
        for key, value in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            field = key[len(ENV_PREFIX) :].lower()
            if field not in cls.model_fields:
                known = ", ".join(sorted(ENV_PREFIX + name.upper() for name in cls.model_fields))
                raise SettingsError(f"{key} is not a setting of captioner (known: {known})")
            values[field] = value
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                name = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else ENV_PREFIX
                shown = values.get(str(error["loc"][0]), "") if error["loc"] else ""
                problems.append(f"{name}={shown!r}: {error['msg']}")
            raise SettingsError("bad setting: " + "; ".join(problems)) from None

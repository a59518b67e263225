"""google-genai adapter: one image in, one Description out.

The SDK is configured from its own environment variables (GEMINI_API_KEY /
GOOGLE_API_KEY, GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_CLOUD_PROJECT,
GOOGLE_CLOUD_LOCATION, GOOGLE_GEMINI_BASE_URL). The SDK's own retries are off:
they ignore the server's RetryInfo delay and never retry a timeout, so this
module classifies failures and ``captioner.retrying`` retries them.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from captioner.captions import CaptionSpec, InvalidAnswerError
from captioner.domain import Description, PreparedImage, Usage
from captioner.errors import PermanentError, TransientError
from captioner.limiter import AdaptiveLimiter
from captioner.retrying import with_retries

_TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
# Not the image's fault: a bad key, a missing permission or an unknown model is
# fixed by the operator, and the event should come back once it is.
_CONFIGURATION_CODES = frozenset({401, 403, 404})
_BLOCKING_FINISH = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "MODEL_ARMOR",
        "LANGUAGE",
        "OTHER",
    }
)
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)s\s*$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def make_client(
    timeout_seconds: float,
    environ: Mapping[str, str] | None = None,
    *,
    credentials: Any = None,
) -> genai.Client:
    """A client for the current event loop, configured from the SDK's own variables.

    ``environ`` defaults to the process environment; ``credentials`` (Vertex AI
    only) default to Application Default Credentials.
    """
    env = os.environ if environ is None else environ
    base_url = env.get("GOOGLE_GEMINI_BASE_URL") or None
    http_options = types.HttpOptions(timeout=int(timeout_seconds * 1000), base_url=base_url)
    if _truthy(env.get("GOOGLE_GENAI_USE_VERTEXAI")):
        # Passed explicitly: with a custom base URL the SDK does not read project and
        # location from the environment and would post to the bare base URL.
        return genai.Client(
            vertexai=True,
            project=env.get("GOOGLE_CLOUD_PROJECT"),
            location=env.get("GOOGLE_CLOUD_LOCATION") or "global",
            credentials=credentials,
            http_options=http_options,
        )
    api_key = env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY")
    return genai.Client(api_key=api_key, http_options=http_options)


class GeminiDescriber:
    """Describes prepared images with ``client.aio.models.generate_content``."""

    def __init__(
        self,
        client: genai.Client,
        *,
        model: str,
        prompt: str,
        max_output_tokens: int,
        temperature: float,
        attempts: int,
        timeout: float,
        max_wait: float = 30.0,
        deadline: float | None = None,
        limiter: AdaptiveLimiter | None = None,
    ) -> None:
        self._client = client
        self._limiter = limiter or AdaptiveLimiter(1_000_000)
        self._rng = random.Random()
        self._deadline = deadline
        self.model = model
        self._prompt = prompt
        self._attempts = attempts
        self._timeout = timeout
        self._max_wait = max_wait
        self._max_output_tokens = max_output_tokens
        self._temperature = temperature
        self._default_spec = CaptionSpec(prompt, structured=False)

    def _config_for(self, spec: CaptionSpec) -> types.GenerateContentConfig:
        schema = spec.response_schema()
        return types.GenerateContentConfig(
            max_output_tokens=self._max_output_tokens,
            temperature=self._temperature,
            response_mime_type="application/json" if schema else None,
            response_json_schema=schema,
        )

    async def describe(self, image: PreparedImage, spec: CaptionSpec | None = None) -> Description:
        """Caption one image as ``spec`` asks; an answer off the schema is asked for again
        once, then is a permanent ``invalid-answer``."""
        spec = spec or self._default_spec
        for attempt in (1, 2):
            description = await self._describe_once(image, spec)
            if description.text is None:
                return description
            try:
                captions = spec.parse(description.text)
            except InvalidAnswerError as exc:
                if attempt == 2:
                    raise PermanentError("invalid-answer", f"Gemini's answer: {exc}") from None
                continue
            return replace(
                description,
                text=captions.caption,
                alt=captions.alt,
                tags=captions.tags,
                translations=captions.translations,
            )
        raise AssertionError("unreachable")

    async def _describe_once(self, image: PreparedImage, spec: CaptionSpec) -> Description:
        contents = types.Content(
            role="user",
            parts=[
                types.Part.from_bytes(data=image.data, mime_type=image.mime_type),
                types.Part.from_text(text=spec.full_prompt()),
            ],
        )
        config = self._config_for(spec)

        # The whole sequence is bounded, so one image cannot hold an invocation
        # past its deadline.
        deadline = self._deadline or (
            self._timeout * self._attempts + self._max_wait * (self._attempts - 1)
        )
        give_up_at = time.monotonic() + deadline

        async def once() -> Any:
            # Rate limits (429) are waited out here, up to the deadline, without
            # using up the attempts meant for failures; the limiter meanwhile
            # lowers the calls in flight. A slot is held per call, not per wait.
            throttled = 0
            while True:
                async with self._limiter.slot() as slot:
                    try:
                        response = await self._client.aio.models.generate_content(
                            model=self.model, contents=contents, config=config
                        )
                    except genai_errors.APIError as exc:
                        error = _classify(exc)
                        if exc.code != 429 or not isinstance(error, TransientError):
                            raise error from exc
                        slot.throttled(error.retry_after)
                        throttled += 1
                        wait = self._throttle_wait(error.retry_after, throttled)
                        if time.monotonic() + wait > give_up_at:
                            raise error from exc
                    except TimeoutError as exc:
                        raise TransientError(
                            f"Gemini did not answer within {self._timeout:g}s"
                        ) from exc
                    except aiohttp.ClientError as exc:
                        raise TransientError(f"Gemini connection failed: {exc!r}") from exc
                    else:
                        slot.succeeded()
                        return response
                await asyncio.sleep(wait)

        response = await with_retries(
            once,
            attempts=self._attempts,
            deadline=deadline,
            wait_initial=1.0,
            wait_max=self._max_wait,
        )
        return _description(response, self.model)

    def _throttle_wait(self, retry_after: float | None, throttled: int) -> float:
        """The server's delay (or an exponential one), plus up to as much again at random.

        The random part spreads out the many calls that were refused together.
        """
        base = retry_after if retry_after is not None else 0.5 * 2 ** min(throttled - 1, 10)
        base = min(base, self._max_wait)
        return base + self._rng.uniform(0, base)


def _classify(exc: genai_errors.APIError) -> Exception:
    code = int(exc.code or 0)
    message = f"Gemini answered {code} {exc.status or ''}: {exc.message or ''}".strip()
    if code in _TRANSIENT_CODES or code >= 500:
        return TransientError(message, retry_after=_retry_delay(exc.details))
    if code in _CONFIGURATION_CODES:
        return TransientError(message + " (check the model name, API key or IAM role)")
    return PermanentError(f"gemini-{code}", message)


def _retry_delay(details: Any) -> float | None:
    """The ``retryDelay`` of a google.rpc.RetryInfo detail, e.g. ``"7s"`` → 7.0."""
    items: Any = details
    if isinstance(details, Mapping):
        items = details.get("error", {}).get("details", details.get("details", []))
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, Mapping) and str(item.get("@type", "")).endswith("RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _description(response: Any, model: str) -> Description:
    usage_meta = getattr(response, "usage_metadata", None)
    usage = Usage(
        prompt_tokens=int(getattr(usage_meta, "prompt_token_count", 0) or 0),
        output_tokens=int(getattr(usage_meta, "candidates_token_count", 0) or 0),
        total_tokens=int(getattr(usage_meta, "total_token_count", 0) or 0),
    )
    model_version = str(getattr(response, "model_version", None) or model)
    feedback = getattr(response, "prompt_feedback", None)
    block = getattr(feedback, "block_reason", None) if feedback else None
    if block:
        return Description(None, model_version, blocked_reason=_enum_name(block), usage=usage)
    candidates = getattr(response, "candidates", None) or []
    finish = _enum_name(getattr(candidates[0], "finish_reason", None)) if candidates else None
    try:
        text = response.text
    except (ValueError, AttributeError):
        text = None
    if finish in _BLOCKING_FINISH and not text:
        return Description(None, model_version, blocked_reason=finish, usage=usage)
    if not text or not text.strip():
        return Description(None, model_version, blocked_reason="EMPTY", usage=usage)
    return Description(text, model_version, usage=usage)


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", value))

"""google-genai adapter: one image in, one Description out.

The SDK is configured from its own environment variables (GEMINI_API_KEY /
GOOGLE_API_KEY, GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_CLOUD_PROJECT,
GOOGLE_CLOUD_LOCATION, GOOGLE_GEMINI_BASE_URL). The SDK's own retries are off
(``HttpRetryOptions(attempts=1)``, which also stops its hidden connection retry):
they ignore the server's RetryInfo delay and never retry a timeout, so this
module classifies failures and ``captioner.retrying`` retries them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import google.auth.exceptions
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from captioner import models
from captioner.adapters.gemini_errors import (
    NO_CREDENTIALS,
    DailyQuotaError,
    classify,
    next_quota_day,
    transport_error,
)
from captioner.captions import Captions, CaptionSpec, InvalidAnswerError, with_captions
from captioner.domain import Description, PreparedImage, Usage
from captioner.errors import ConfigurationError, PermanentError, TransientError
from captioner.limiter import AdaptiveLimiter
from captioner.models import MediaResolution, Thinking, default_temperature
from captioner.retrying import with_retries
from captioner.settings import Settings

# Finish reasons (google.genai.types.FinishReason; the API reference's
# Candidate.FinishReason) that are a refusal of the content: recorded as ``blocked``.
_BLOCKING_FINISH = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)
# Tool and response-format faults: we send no tools, so these are the model's glitch.
_GLITCH_FINISH = frozenset(
    {
        "MALFORMED_FUNCTION_CALL",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
        "MISSING_THOUGHT_SIGNATURE",
        "MALFORMED_RESPONSE",
    }
)
_NORMAL_FINISH = frozenset({"STOP", "FINISH_REASON_UNSPECIFIED"})
# The most output tokens a re-asked call may have (the 2.5 and 3 models' limit).
_MAX_ROOM = 65536


NO_API_KEY = (
    "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use Vertex AI with "
    "GOOGLE_GENAI_USE_VERTEXAI=true and GOOGLE_CLOUD_PROJECT"
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def make_client(
    timeout_seconds: float,
    environ: Mapping[str, str] | None = None,
    *,
    credentials: Any = None,
    tier: str = "standard",
) -> genai.Client:
    """A client for the current event loop, configured from the SDK's own variables.

    ``environ`` defaults to the process environment; ``credentials`` (Vertex AI
    only) default to Application Default Credentials.
    """
    env = os.environ if environ is None else environ
    base_url = env.get("GOOGLE_GEMINI_BASE_URL") or None
    http_options = types.HttpOptions(
        timeout=int(timeout_seconds * 1000),
        base_url=base_url,
        # attempts=1 turns the SDK's retries off entirely: without retry options it
        # still retries a failed connection once by itself after sleeping 1-10 s
        # (google/genai/_api_client.py, the aiohttp branch of the async request).
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    if _truthy(env.get("GOOGLE_GENAI_USE_VERTEXAI")):
        # Passed explicitly: with a custom base URL the SDK does not read project and
        # location from the environment and would post to the bare base URL.
        # Flex and Priority PayGo are served on the global endpoint only
        # (https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo, .../priority-paygo).
        location = "global" if tier != "standard" else env.get("GOOGLE_CLOUD_LOCATION")
        try:
            return genai.Client(
                vertexai=True,
                project=env.get("GOOGLE_CLOUD_PROJECT"),
                location=location or "global",
                credentials=credentials,
                http_options=http_options,
            )
        except google.auth.exceptions.DefaultCredentialsError:
            raise ConfigurationError(NO_CREDENTIALS) from None
    api_key = env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY")
    if not api_key:
        # google-genai raises a ValueError here; say which variables fix it.
        raise ConfigurationError(NO_API_KEY)
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
        temperature: float | None = None,
        thinking: Thinking = Thinking.MINIMAL,
        media_resolution: MediaResolution = MediaResolution.AUTO,
        attempts: int,
        timeout: float,
        max_wait: float = 30.0,
        deadline: float | None = None,
        limiter: AdaptiveLimiter | None = None,
        service_tier: str = "standard",
    ) -> None:
        self._client = client
        self.service_tier = service_tier
        self._tier_fields = _tier_fields(client, service_tier)
        self._limiter = limiter or AdaptiveLimiter(1_000_000, max_pause=max_wait)
        self._rng = random.Random()
        self._deadline = deadline
        self.model = model
        self._attempts = attempts
        self._timeout = timeout
        self._max_wait = max_wait
        self._max_output_tokens = max_output_tokens
        self._temperature = default_temperature(model) if temperature is None else temperature
        self._thinking = _thinking_config(model, thinking)
        resolution = models.media_resolution(model, media_resolution)
        self._media_resolution = types.MediaResolution(resolution) if resolution else None
        self._default_spec = CaptionSpec(prompt, structured=False)
        # Set by a per-day quota's 429: (monotonic time it resets, the error).
        self._stopped: tuple[float, ConfigurationError] | None = None

    @classmethod
    def from_settings(
        cls,
        client: genai.Client,
        s: Settings,
        *,
        limiter: AdaptiveLimiter | None = None,
        tier: str | None = None,
    ) -> GeminiDescriber:
        """The describer the settings ask for: the online path and batch jobs send the
        same model, prompt, output cap, temperature, thinking and media resolution."""
        return cls(
            client,
            model=s.model,
            prompt=s.prompt,
            max_output_tokens=s.max_output_tokens,
            temperature=s.temperature,
            thinking=s.thinking,
            media_resolution=s.media_resolution,
            attempts=s.gemini_attempts,
            timeout=s.call_timeout,
            max_wait=s.retry_max_wait,
            deadline=s.deadline,
            limiter=limiter,
            service_tier=s.service_tier if tier is None else tier,
        )

    def _config_for(self, spec: CaptionSpec, room: int) -> types.GenerateContentConfig:
        schema = spec.response_schema()
        return types.GenerateContentConfig(
            max_output_tokens=room,
            temperature=self._temperature,
            thinking_config=self._thinking,
            media_resolution=self._media_resolution,
            response_mime_type="application/json" if schema else None,
            response_json_schema=schema,
            **self._tier_fields,
        )

    def request_for(
        self, image: types.Part, spec: CaptionSpec, room: int | None = None
    ) -> tuple[types.Content, types.GenerateContentConfig]:
        """The one generateContent request for an image, sent online (the image's bytes)
        or written into a batch job (its gs:// URI, adapters/vertex_batch.py): the same
        prompt, schema, generation, thinking and media-resolution settings either way, so
        a caption made in a batch is one the online path could have made."""
        contents = types.Content(
            role="user", parts=[image, types.Part.from_text(text=spec.full_prompt())]
        )
        return contents, self._config_for(spec, self._max_output_tokens if room is None else room)

    async def describe(self, image: PreparedImage, spec: CaptionSpec | None = None) -> Description:
        """Caption one image as ``spec`` asks.

        One second chance per image, for whichever comes first: an answer cut at the
        output cap (asked again with four times the room: thinking shares the cap),
        an empty answer, or one off the schema. The second time, each is a permanent
        ``error:max-tokens``, ``error:empty-answer`` or ``error:invalid-answer``. The
        usage of both calls is added up.
        """
        spec = spec or self._default_spec
        room = self._max_output_tokens
        spent = Usage()
        second_chance = True
        while True:
            answer = await self._describe_once(image, spec, room)
            spent += answer.usage
            if answer.blocked_reason is not None:
                return replace(answer, usage=spent)
            problem = self._problem(answer, spec, room)
            if isinstance(problem, PermanentError):
                if not second_chance:
                    raise problem
                second_chance = False
                if problem.reason == "max-tokens":
                    room = min(_MAX_ROOM, max(room * 4, room + 1024))
                continue
            return replace(with_captions(answer, problem), usage=spent)

    def _problem(
        self, answer: Description, spec: CaptionSpec, room: int
    ) -> Captions | PermanentError:
        """The parsed captions, or the PermanentError this answer would be."""
        if answer.cut_off:
            return PermanentError(
                "max-tokens",
                f"Gemini's answer did not fit in {room} output tokens "
                f"({answer.usage.thoughts_tokens} of them spent thinking): raise "
                "CAPTION_MAX_OUTPUT_TOKENS or lower CAPTION_THINKING",
            )
        if not answer.text or not answer.text.strip():
            return PermanentError("empty-answer", "Gemini finished without any text")
        try:
            return spec.parse(answer.text)
        except InvalidAnswerError as exc:
            return PermanentError("invalid-answer", f"Gemini's answer: {exc}")

    def _stop_until(self, until: float, error: ConfigurationError) -> None:
        self._stopped = (until, error)

    def _check_not_stopped(self) -> None:
        if self._stopped is not None:
            until, error = self._stopped
            if time.monotonic() < until:
                raise DailyQuotaError(f"not asking Gemini again before the quota resets: {error}")
            self._stopped = None

    async def _describe_once(
        self, image: PreparedImage, spec: CaptionSpec, room: int
    ) -> Description:
        self._check_not_stopped()
        image_part = types.Part.from_bytes(data=image.data, mime_type=image.mime_type)
        contents, config = self.request_for(image_part, spec, room)
        # The whole sequence is bounded, so one image cannot hold an invocation
        # past its deadline.
        deadline = self._deadline or (
            self._timeout * self._attempts + self._max_wait * (self._attempts - 1)
        )
        give_up_at = time.monotonic() + deadline
        return await with_retries(
            lambda: self._call(contents, config, give_up_at),
            attempts=self._attempts,
            deadline=deadline,
            wait_initial=1.0,
            wait_max=self._max_wait,
        )

    async def _call(
        self, contents: types.Content, config: types.GenerateContentConfig, give_up_at: float
    ) -> Description:
        """One attempt. Rate limits (429) are waited out here, up to ``give_up_at``,
        without using up the attempts meant for failures; the limiter meanwhile lowers
        the calls in flight. A slot is held per call, not per wait."""
        throttled = 0
        while True:
            async with self._limiter.slot() as slot:
                try:
                    response = await self._client.aio.models.generate_content(
                        model=self.model, contents=contents, config=config
                    )
                except genai_errors.APIError as exc:
                    error = classify(exc, self._max_wait)
                    if isinstance(error, DailyQuotaError):
                        self._stop_until(next_quota_day(), error)
                    if exc.code != 429 or type(error) is not TransientError:
                        raise error from exc
                    slot.throttled(error.retry_after)
                    throttled += 1
                    wait = self._throttle_wait(error.retry_after, throttled)
                    if time.monotonic() + wait > give_up_at:
                        raise error from exc
                except Exception as exc:
                    error = transport_error(exc, self._timeout)
                    if error is exc:
                        raise
                    raise error from exc
                else:
                    slot.succeeded()
                    # Read here, so that an answer that is no answer is retried too.
                    return _description(response, self.model)
            await asyncio.sleep(wait)

    def _throttle_wait(self, retry_after: float | None, throttled: int) -> float:
        """The server's delay (or an exponential one), plus up to as much again at random.

        The random part spreads out the many calls that were refused together.
        """
        base = retry_after if retry_after is not None else 0.5 * 2 ** min(throttled - 1, 10)
        base = min(base, self._max_wait)
        return base + self._rng.uniform(0, base)


# Vertex AI picks Flex and Priority PayGo by this header, not by a field of the request
# (https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo, .../priority-paygo).
VERTEX_TIER_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"


def _tier_fields(client: genai.Client, tier: str) -> dict[str, Any]:
    """What the request carries for a service tier: the Gemini API's ``service_tier``
    (https://ai.google.dev/gemini-api/docs/flex-inference), or Vertex AI's header; for
    the standard tier, nothing at all (the request stays as it always was)."""
    if tier == "standard":
        return {}
    if client.vertexai:
        return {"http_options": types.HttpOptions(headers={VERTEX_TIER_HEADER: tier})}
    return {"service_tier": types.ServiceTier(tier)}


def _thinking_config(model: str, thinking: Thinking) -> types.ThinkingConfig | None:
    chosen = models.thinking_config(model, thinking)
    if chosen is None:
        return None
    budget, level = chosen.get("thinking_budget"), chosen.get("thinking_level")
    return types.ThinkingConfig(
        thinking_budget=int(budget) if budget is not None else None,
        thinking_level=types.ThinkingLevel(level) if level is not None else None,
    )


def _usage(meta: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    if meta is None:
        return Usage(calls=1)
    image = sum(
        detail.token_count or 0
        for detail in meta.prompt_tokens_details or []
        if detail.modality == types.MediaModality.IMAGE
    )
    return Usage(
        prompt_tokens=meta.prompt_token_count or 0,
        output_tokens=meta.candidates_token_count or 0,
        thoughts_tokens=meta.thoughts_token_count or 0,
        image_tokens=image,
        calls=1,
    )


def _description(response: types.GenerateContentResponse, model: str) -> Description:
    """One answer, read by its finish reason (every value of ``types.FinishReason``
    is placed deliberately; an empty answer is never taken for a safety block).

    - a block of the prompt, or a safety-type finish: ``blocked`` with that reason;
    - ``MAX_TOKENS``: cut off (thinking may have used the cap), asked again;
    - a tool-call or malformed-response finish (we use no tools): a glitch, transient;
    - ``LANGUAGE``: the model does not take the language: permanent;
    - no candidate at all: not an answer the API gives, transient;
    - any other finish without text: permanent, named after the finish reason.
    """
    usage = _usage(response.usage_metadata)
    model_version = response.model_version or model
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason:
        return Description(
            None, model_version, blocked_reason=_enum_name(feedback.block_reason), usage=usage
        )
    if not response.candidates:
        raise TransientError("Gemini's answer has no candidate and no block reason")
    finish = _enum_name(response.candidates[0].finish_reason) or "FINISH_REASON_UNSPECIFIED"
    text = response.text
    if finish in _BLOCKING_FINISH:
        return Description(None, model_version, blocked_reason=finish, usage=usage)
    if finish == "MAX_TOKENS":
        return Description(text, model_version, usage=usage, cut_off=True)
    if finish in _GLITCH_FINISH:
        raise TransientError(f"Gemini stopped with finishReason {finish}")
    if finish == "LANGUAGE":
        raise PermanentError("unsupported-language", "Gemini does not answer in this language")
    if finish not in _NORMAL_FINISH and not (text and text.strip()):
        slug = finish.lower().replace("_", "-")
        raise PermanentError(
            f"finish-{slug}", f"Gemini stopped with finishReason {finish} and no text"
        )
    return Description(text, model_version, usage=usage)


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", value))

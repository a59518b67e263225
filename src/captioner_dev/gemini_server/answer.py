"""Answering one parsed generateContent request: the caption, the token counts, the finish
reason, or the fault a rule asks for. The online route and the batch emulator share it."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from captioner_dev.gemini_server.config import HANG_SECONDS, FaultRule
from captioner_dev.gemini_server.errors import BLOCKED_RATINGS, fault_error
from captioner_dev.gemini_server.images import ImageFacts, describe_image_bytes
from captioner_dev.gemini_server.schema import answer_text, describe
from captioner_dev.gemini_server.tokens import image_tokens_for, text_tokens
from captioner_dev.gemini_server.wire import (
    ApiError,
    InlineImage,
    ParsedRequest,
    PromptTokens,
    candidate_response,
    get_field,
    max_output_tokens,
    model_version,
    usage_json,
)

_DESCRIPTION_CACHE_SIZE: Final = 1024
# Below this size decoding inline is cheaper than the hop to a worker thread.
_INLINE_DECODE_LIMIT: Final = 64 * 1024


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    finish_reason: str | None = None
    # (prompt, image, thoughts, output) tokens reported, for the request log.
    usage: tuple[int, int, int, int] = (0, 0, 0, 0)


class Answerer:
    """Answers parsed requests; keeps a cache of image facts by sha256. Thread-safe."""

    def __init__(self, sleep: Callable[[float], Awaitable[bool]]) -> None:
        # ``sleep`` returns True when the server is stopping (a hang fault then ends early).
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, ImageFacts] = OrderedDict()

    async def facts(self, image: InlineImage) -> ImageFacts:
        key = image.record.sha256
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        try:
            if len(image.data) > _INLINE_DECODE_LIMIT:
                facts = await asyncio.to_thread(describe_image_bytes, image.data)
            else:
                facts = describe_image_bytes(image.data)
        except ValueError as exc:
            raise ApiError(
                400,
                "Unable to process input image. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            ) from exc
        with self._lock:
            self._cache[key] = facts
            while len(self._cache) > _DESCRIPTION_CACHE_SIZE:
                self._cache.popitem(last=False)
        return facts

    # -- HTTP: model routes -------------------------------------------------------------------

    async def prompt_tokens(self, parsed: ParsedRequest, model: str) -> PromptTokens:
        text = text_tokens(parsed.prompt) + text_tokens(parsed.system_instruction)
        resolution = get_field(parsed.generation_config, "media_resolution")
        image = 0
        for part in parsed.images:
            facts = await self.facts(part)
            chosen = part.media_resolution or (resolution if isinstance(resolution, str) else None)
            image += image_tokens_for(model, facts.width, facts.height, chosen)
        return PromptTokens(text, image)

    async def count_tokens(self, parsed: ParsedRequest, model: str) -> Outcome:
        try:
            tokens = await self.prompt_tokens(parsed, model)
        except ApiError as error:
            return Outcome(error.code, error.body())
        return Outcome(200, {"totalTokens": tokens.total}, usage=(tokens.total, tokens.image, 0, 0))

    async def success(
        self, parsed: ParsedRequest, model: str, response_id: str, thoughts: int
    ) -> Outcome:
        facts = [await self.facts(image) for image in parsed.images]
        prompt = await self.prompt_tokens(parsed, model)
        text = answer_text(parsed, describe(parsed, facts))
        finish = "STOP"
        parts: list[dict[str, Any]] | None = None
        limit = max_output_tokens(parsed.generation_config)
        if limit is not None and thoughts >= limit:
            # Thinking used up maxOutputTokens: MAX_TOKENS, a content with a role and no parts.
            thoughts, output, finish = limit, 0, "MAX_TOKENS"
        else:
            room = None if limit is None else limit - thoughts
            if room is not None and text_tokens(text) > room:
                text = text[: room * 4]
                finish = "MAX_TOKENS"
            output = text_tokens(text)
            parts = [{"text": text}]
        body = candidate_response(
            parts,
            finish,
            usage_json(prompt, output, thoughts),
            model_version(model),
            response_id,
        )
        return Outcome(200, body, finish, (prompt.total, prompt.image, thoughts, output))

    async def fault_outcome(
        self, rule: FaultRule, parsed: ParsedRequest, model: str, response_id: str
    ) -> Outcome:
        version = model_version(model)
        error = fault_error(rule, model)
        if error is not None:
            return Outcome(error.code, error.body())
        if rule.kind == "hang":
            await self._sleep(HANG_SECONDS)
            return Outcome(503, ApiError(503, "The stub is shutting down.").body())
        prompt = await self.prompt_tokens(parsed, model)
        usage = (prompt.total, prompt.image, 0, 0)
        if rule.kind == "safety_prompt":
            body: dict[str, Any] = {
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": BLOCKED_RATINGS},
                "usageMetadata": usage_json(prompt, 0, 0),
                "modelVersion": version,
                "responseId": response_id,
            }
            return Outcome(200, body, None, usage)
        if rule.kind == "safety_candidate":
            body = candidate_response(
                None,
                "SAFETY",
                usage_json(prompt, 0, 0),
                version,
                response_id,
                {"safetyRatings": BLOCKED_RATINGS},
            )
            return Outcome(200, body, "SAFETY", usage)
        if rule.kind == "empty":
            body = candidate_response(None, "STOP", usage_json(prompt, 0, 0), version, response_id)
            return Outcome(200, body, "STOP", usage)
        text = rule.text or ""
        output = text_tokens(text)
        body = candidate_response(
            [{"text": text}], "STOP", usage_json(prompt, output, 0), version, response_id
        )
        return Outcome(200, body, "STOP", (prompt.total, prompt.image, 0, output))

    # -- HTTP: control routes -----------------------------------------------------------------

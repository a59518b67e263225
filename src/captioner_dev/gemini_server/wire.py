"""The Gemini REST wire format: request paths, parsing request bodies in either key spelling,
building responses and errors (see docs/gemini_wire.md)."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from captioner_dev.gemini_server.config import MAX_INLINE_BASE64_CHARS
from captioner_dev.gemini_server.records import ImageRecord

MODEL_PATH: Final = re.compile(
    r"^/(?P<version>v1|v1beta|v1beta1|v1alpha)/"
    r"(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?"
    r"(?:publishers/(?P<publisher>[^/]+)/)?"
    r"models/(?P<model>[^/:]+):(?P<action>generateContent|streamGenerateContent|countTokens)$"
)

# google.rpc.Code names by HTTP code, as the Gemini API pairs them
# (https://ai.google.dev/gemini-api/docs/troubleshooting; 499 CANCELLED as seen under load,
# google-gemini/gemini-cli#20309).
STATUS_BY_CODE: Final[Mapping[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An error to answer in Gemini's JSON error format."""

    def __init__(
        self,
        code: int,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS_BY_CODE.get(code, "UNKNOWN")
        self.message = message
        self.details = list(details)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


@functools.cache
def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.capitalize() for word in rest)


def get_field(obj: Mapping[str, Any], snake: str) -> Any:
    """Reads a key in either spelling: the SDK mixes camelCase and snake_case."""
    if snake in obj:
        return obj[snake]
    return obj.get(camel(snake))


# -- Request parsing --------------------------------------------------------------------------


@dataclass
class InlineImage:
    mime_type: str
    data: bytes
    record: ImageRecord
    # A per-part ``mediaResolution.level`` (Gemini 3), which overrides the request's.
    media_resolution: str | None = None


@dataclass
class ParsedRequest:
    prompt: str
    system_instruction: str
    images: list[InlineImage]
    file_uris: list[str]
    generation_config: dict[str, Any]


_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def decode_base64(value: str, where: str) -> bytes:
    text = "".join(value.split()).translate(_URLSAFE_TO_STANDARD)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            400, f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed"
        ) from exc


def texts_of(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Mapping):
        raise ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
    parts = get_field(content, "parts") or []
    if not isinstance(parts, list):
        raise ApiError(400, f"Invalid JSON payload received. '{where}.parts' must be a list.")
    return [
        part["text"]
        for part in parts
        if isinstance(part, Mapping) and isinstance(part.get("text"), str)
    ]


def parse_generate_request(body: Any) -> ParsedRequest:
    if not isinstance(body, Mapping):
        raise ApiError(400, "Invalid JSON payload received. Expected an object.")
    contents = get_field(body, "contents")
    if contents is None:
        raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    if not isinstance(contents, list):
        raise ApiError(400, "Invalid JSON payload received. 'contents' must be a list.")
    texts: list[str] = []
    images: list[InlineImage] = []
    file_uris: list[str] = []
    for ci, content in enumerate(contents):
        if not isinstance(content, Mapping):
            raise ApiError(
                400, f"Invalid JSON payload received. 'contents[{ci}]' must be an object."
            )
        parts = get_field(content, "parts")
        if not isinstance(parts, list) or not parts:
            raise ApiError(
                400,
                f"* GenerateContentRequest.contents[{ci}].parts: contents.parts must not be empty.",
            )
        for pi, part in enumerate(parts):
            where = f"contents[{ci}].parts[{pi}]"
            if not isinstance(part, Mapping):
                raise ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
            text = part.get("text")
            if isinstance(text, str) and not part.get("thought"):
                texts.append(text)
            inline = get_field(part, "inline_data")
            if inline is not None:
                image = parse_inline(inline, f"{where}.inline_data")
                per_part = get_field(part, "media_resolution")
                if isinstance(per_part, Mapping) and isinstance(per_part.get("level"), str):
                    image.media_resolution = per_part["level"]
                images.append(image)
            file_data = get_field(part, "file_data")
            if isinstance(file_data, Mapping) and isinstance(get_field(file_data, "file_uri"), str):
                file_uris.append(get_field(file_data, "file_uri"))
    system = get_field(body, "system_instruction")
    system_texts = [] if system is None else texts_of(system, "system_instruction")
    config = get_field(body, "generation_config") or {}
    if not isinstance(config, Mapping):
        raise ApiError(400, "Invalid JSON payload received. 'generation_config' must be an object.")
    return ParsedRequest(
        prompt="\n".join(texts),
        system_instruction="\n".join(system_texts),
        images=images,
        file_uris=file_uris,
        generation_config=dict(config),
    )


def parse_inline(inline: Any, where: str) -> InlineImage:
    if not isinstance(inline, Mapping):
        raise ApiError(400, f"Invalid JSON payload received. '{where}' must be an object.")
    data = inline.get("data")
    mime = get_field(inline, "mime_type")
    if not isinstance(data, str):
        raise ApiError(400, f"* GenerateContentRequest.{where}.data: required field is not set")
    if not isinstance(mime, str) or not mime:
        raise ApiError(
            400, f"* GenerateContentRequest.{where}.mime_type: required field is not set"
        )
    if len(data) > MAX_INLINE_BASE64_CHARS:
        raise ApiError(
            400, f"Request payload size exceeds the limit: {MAX_INLINE_BASE64_CHARS} bytes."
        )
    raw = decode_base64(data, f"{where}.data")
    record = ImageRecord(mime_type=mime, size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    return InlineImage(mime_type=mime, data=raw, record=record)


def max_output_tokens(config: Mapping[str, Any]) -> int | None:
    value = get_field(config, "max_output_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


@dataclass(frozen=True)
class PromptTokens:
    text: int
    image: int

    @property
    def total(self) -> int:
        return self.text + self.image


def usage_json(prompt: PromptTokens, output: int, thoughts: int) -> dict[str, Any]:
    """``usageMetadata`` as the Gemini API sends it: counts of zero are left out, and
    ``promptTokensDetails`` splits the prompt by modality (GenerateContentResponse.UsageMetadata,
    https://ai.google.dev/api/generate-content#UsageMetadata)."""
    usage: dict[str, Any] = {"promptTokenCount": prompt.total}
    if output:
        usage["candidatesTokenCount"] = output
    usage["totalTokenCount"] = prompt.total + output + thoughts
    details = [{"modality": "TEXT", "tokenCount": prompt.text}]
    if prompt.image:
        details.append({"modality": "IMAGE", "tokenCount": prompt.image})
    usage["promptTokensDetails"] = details
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def candidate_response(
    parts: list[dict[str, Any]] | None,
    finish_reason: str,
    usage: dict[str, Any],
    model: str,
    response_id: str,
    extra_candidate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {"role": "model"}
    if parts is not None:
        content["parts"] = parts
    candidate: dict[str, Any] = {"content": content, "finishReason": finish_reason, "index": 0}
    candidate.update(extra_candidate or {})
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }


def model_version(model: str) -> str:
    return model.removeprefix("models/")


def dumps(value: Any) -> str:
    # Non-ASCII captions stay readable in logs and payloads, as Gemini sends them;
    # text that is not valid UTF-8 (lone surrogates, for fault tests) goes out escaped.
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def json_error(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.code)

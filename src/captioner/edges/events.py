"""Edge parsing: a Cloud Storage CloudEvent becomes a typed ObjectRef, or a BadRequestError.

Cloud Storage sends int64 fields (generation, metageneration, size) as strings.
Written by hand rather than as a pydantic model (as the HTTP bodies and rules are):
these fields need lax string-to-int conversion, and pydantic's lax mode would then
also take ``true`` as 1 and ``"1e3"``-like floats; a generation is too important to
guess (it decides which bytes a caption belongs to).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from captioner.domain import MAX_OBJECT_NAME_BYTES, ObjectRef, first_unencodable
from captioner.errors import BadRequestError

FINALIZED = "google.cloud.storage.object.v1.finalized"


def parse_event_data(data: Any) -> Mapping[str, Any]:
    """The event's data as a mapping (binary-mode events may hand us bytes or str)."""
    if isinstance(data, bytes | bytearray):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("event data is not UTF-8 JSON") from None
    if isinstance(data, str):
        try:
            data = json.loads(data) if data.strip() else None
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"event data is not JSON: {exc.msg} at {exc.pos}") from None
        except RecursionError:
            raise BadRequestError("event data is nested too deeply") from None
        except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
            raise BadRequestError(f"event data cannot be read: {str(exc)[:120]}") from None
    if data is None:
        raise BadRequestError("event has no data: expected a Cloud Storage object")
    if not isinstance(data, Mapping):
        raise BadRequestError(f"event data must be a JSON object, not {type(data).__name__}")
    if (where := first_unencodable(dict(data))) is not None:
        raise BadRequestError(f"event data: {where} is not valid Unicode text")
    return data


def object_ref_from_event(data: Any) -> ObjectRef:
    """The object named by a ``storage.object.v1.finalized`` event's data."""
    fields = parse_event_data(data)
    bucket = _required_str(fields, "bucket")
    name = _required_str(fields, "name")
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_OBJECT_NAME_BYTES:
        raise BadRequestError(f"'name' is longer than {MAX_OBJECT_NAME_BYTES} bytes")
    generation = _int64(fields, "generation", required=True)
    content_type = fields.get("contentType")
    if content_type is not None and not isinstance(content_type, str):
        raise BadRequestError("'contentType' must be a string")
    return ObjectRef(
        bucket=bucket,
        name=name,
        generation=generation,
        metageneration=_int64(fields, "metageneration", required=False),
        content_type=content_type,
        size=_int64(fields, "size", required=False),
    )


def _required_str(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    if value is None:
        raise BadRequestError(f"event data is missing {key!r}")
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"{key!r} must be a non-empty string, got {value!r:.80}")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise BadRequestError(f"{key!r} contains a control character")
    return value


def _int64(fields: Mapping[str, Any], key: str, *, required: bool) -> int | None:
    value = fields.get(key)
    if value is None:
        if required:
            raise BadRequestError(f"event data is missing {key!r}")
        return None
    # JSON numbers are accepted too, but not booleans, which are ints in Python.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequestError(f"{key!r} must be an int64 as a string, got {value!r:.80}")
    text = str(value).strip()
    if not text.isdigit() or not text.isascii():
        raise BadRequestError(f"{key!r} must be a non-negative integer, got {value!r:.80}")
    number = int(text)
    if number >= 1 << 63:
        raise BadRequestError(f"{key!r} is out of the int64 range")
    return number

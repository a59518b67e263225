"""HTTP request bodies → typed requests, or a BadRequestError that says what is wrong.

Three forms, exactly one per request:
``{"objects": ["gs://bucket/name", ...]}``,
``{"bucket": "b", "prefix": "p/", "limit": 1000, "overwrite": false, "dry_run": false}``,
``{"urls": ["https://...", ...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from captioner.domain import MAX_OBJECT_NAME_BYTES, ObjectRef, first_unencodable
from captioner.errors import BadRequestError

MAX_OBJECTS = 1000
MAX_URLS = 100
MAX_LIMIT = 100_000
_MAX_URL_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class ObjectsRequest:
    objects: tuple[ObjectRef, ...]
    overwrite: bool = False


@dataclass(frozen=True, slots=True)
class PrefixRequest:
    bucket: str
    prefix: str = ""
    limit: int = 1000
    overwrite: bool = False
    dry_run: bool = False
    if_stale: bool = False


@dataclass(frozen=True, slots=True)
class UrlsRequest:
    urls: tuple[str, ...]


CaptionRequest = ObjectsRequest | PrefixRequest | UrlsRequest

_FIELDS: dict[str, frozenset[str]] = {
    "objects": frozenset({"objects", "overwrite"}),
    "bucket": frozenset({"bucket", "prefix", "limit", "overwrite", "dry_run", "if_stale"}),
    "urls": frozenset({"urls"}),
}


def parse_body(raw: bytes) -> CaptionRequest:
    """Parse and check a request body. Every problem is a BadRequestError (400)."""
    try:
        # Decoded here: json.loads on bytes would also accept UTF-16 and UTF-32.
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequestError("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not JSON: {exc.msg} (at character {exc.pos})") from None
    except RecursionError:
        raise BadRequestError("the body is nested too deeply") from None
    except ValueError as exc:
        # Valid JSON that Python still refuses, e.g. an integer of more digits than
        # sys.get_int_max_str_digits() (4300): a ValueError, not a JSONDecodeError.
        raise BadRequestError(f"the body cannot be read: {str(exc)[:120]}") from None
    return parse_request(body)


def parse_request(body: Any) -> CaptionRequest:
    if not isinstance(body, dict):
        raise BadRequestError(
            f"the body must be a JSON object, not {_json_type(body)}; "
            'e.g. {"objects": ["gs://bucket/name.jpg"]}'
        )
    if (where := first_unencodable(body)) is not None:
        raise BadRequestError(
            f"{where} is not valid Unicode text (a lone surrogate such as \\ud800?)"
        )
    forms = [key for key in _FIELDS if key in body]
    if len(forms) != 1:
        raise BadRequestError(
            "give exactly one of 'objects', 'bucket' (with 'prefix') or 'urls'"
            + (f"; got {', '.join(forms)}" if forms else "")
        )
    form = forms[0]
    unknown = sorted(set(body) - _FIELDS[form])
    if unknown:
        allowed = ", ".join(sorted(_FIELDS[form]))
        raise BadRequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"with {form!r} the fields are: {allowed}"
        )
    if form == "objects":
        items = _list_of_strings(body, "objects", MAX_OBJECTS)
        return ObjectsRequest(
            tuple(parse_gs_uri(item) for item in items),
            overwrite=_bool(body, "overwrite"),
        )
    if form == "urls":
        return UrlsRequest(tuple(_check_url(u) for u in _list_of_strings(body, "urls", MAX_URLS)))
    bucket = body["bucket"]
    if not isinstance(bucket, str) or not bucket:
        raise BadRequestError("'bucket' must be a non-empty string")
    prefix = body.get("prefix", "")
    if (
        not isinstance(prefix, str)
        or len(prefix.encode("utf-8", "surrogatepass")) > MAX_OBJECT_NAME_BYTES
    ):
        raise BadRequestError("'prefix' must be a string of at most 1024 bytes")
    limit = body.get("limit", 1000)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadRequestError(f"'limit' must be an integer from 1 to {MAX_LIMIT}")
    return PrefixRequest(
        bucket=bucket,
        prefix=prefix,
        limit=limit,
        overwrite=_bool(body, "overwrite"),
        dry_run=_bool(body, "dry_run"),
        if_stale=_bool(body, "if_stale"),
    )


def parse_gs_uri(value: str) -> ObjectRef:
    """``gs://bucket/name`` → ObjectRef. The name is everything after the first '/'."""
    if first_unencodable(value) is not None:
        # e.g. undecodable bytes on a command line, which Python keeps as surrogates
        raise BadRequestError(f"{value[:100]!r} is not valid Unicode text")
    if not value.startswith("gs://"):
        raise BadRequestError(f"{value[:100]!r} is not a gs://bucket/name URI")
    bucket, sep, name = value[len("gs://") :].partition("/")
    if not bucket or not sep or not name:
        raise BadRequestError(f"{value[:100]!r} must name a bucket and an object: gs://bucket/name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_OBJECT_NAME_BYTES:
        raise BadRequestError(f"the object name in {value[:60]!r}… is longer than 1024 bytes")
    if any(c in name for c in "\x00\r\n"):
        raise BadRequestError(f"the object name in {value[:100]!r} has a control character")
    return ObjectRef(bucket, name)


def _check_url(value: str) -> str:
    if first_unencodable(value) is not None:
        raise BadRequestError(f"{value[:100]!r} is not valid Unicode text")
    if len(value) > _MAX_URL_LENGTH:
        raise BadRequestError(f"a URL is longer than {_MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BadRequestError(f"{value[:100]!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise BadRequestError(f"{value[:100]!r}: only http and https URLs are fetched")
    if not parts.hostname:
        raise BadRequestError(f"{value[:100]!r} has no host")
    return value


def _list_of_strings(body: dict[str, Any], key: str, limit: int) -> list[str]:
    value = body[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequestError(f"{key!r} must be a list of strings")
    if not value:
        raise BadRequestError(f"{key!r} is empty")
    if len(value) > limit:
        raise BadRequestError(f"{key!r} has {len(value)} items; at most {limit} per request")
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{key!r} must be true or false")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"

"""HTTP request bodies → typed requests, or a BadRequestError that says what is wrong.

Three forms of captioning, exactly one per request, and batch jobs (``"batch"``):
``{"objects": ["gs://bucket/name", ...]}``,
``{"bucket": "b", "prefix": "p/", "limit": 1000, "overwrite": false, "dry_run": false}``
(``"include_human": true`` with ``overwrite`` or ``if_stale`` replaces people's captions too),
``{"urls": ["https://...", ...]}``.

Each form is a pydantic model in strict mode (``"true"`` is not true, ``1.0`` is not
an integer) that forbids unknown fields; pydantic's errors are turned into one
sentence naming the field, as a caller reading a 400 needs.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from captioner.batch import CaptionRequest, ObjectsRequest, PrefixRequest, UrlsRequest
from captioner.batch_jobs import (
    BatchFollowRequest,
    BatchPruneRequest,
    BatchRequest,
    BatchSubmitRequest,
    check_job_name,
    check_run_id,
    parse_age,
)
from captioner.domain import MAX_OBJECT_NAME_BYTES, ObjectRef, first_unencodable
from captioner.errors import BadRequestError

MAX_OBJECTS = 1000
MAX_URLS = 100
MAX_LIMIT = 100_000
_MAX_URL_LENGTH = 2048


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# US dollars a request may spend (captioner.spending), strictly more than 0.
MaxCost = Annotated[float | None, Field(gt=0, le=1_000_000, allow_inf_nan=False)]


class _ObjectsBody(_Body):
    objects: Annotated[list[str], Field(min_length=1, max_length=MAX_OBJECTS)]
    overwrite: bool = False
    max_cost: MaxCost = None
    include_human: bool = False


class _PrefixBody(_Body):
    bucket: Annotated[str, Field(min_length=1)]
    prefix: str = ""
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 1000
    overwrite: bool = False
    dry_run: bool = False
    if_stale: bool = False
    max_cost: MaxCost = None
    include_human: bool = False


class _UrlsBody(_Body):
    urls: Annotated[list[str], Field(min_length=1, max_length=MAX_URLS)]
    max_cost: MaxCost = None


class _BatchSubmitBody(_Body):
    batch: Literal["submit"]
    bucket: Annotated[str, Field(min_length=1)]
    prefix: str = ""
    overwrite: bool = False
    dry_run: bool = False
    if_stale: bool = False
    include_human: bool = False


class _BatchFollowBody(_Body):
    batch: Literal["status", "apply", "cancel"]
    job: Annotated[str | None, Field(min_length=1, max_length=300)] = None
    bucket: Annotated[str | None, Field(min_length=1)] = None
    prefix: str = ""
    run: Annotated[str | None, Field(min_length=1, max_length=100)] = None


class _BatchPruneBody(_Body):
    batch: Literal["prune"]
    bucket: Annotated[str, Field(min_length=1)]
    older_than: Annotated[str, Field(min_length=2, max_length=10)]
    force: bool = False
    dry_run: bool = False


# The key that names each form, and its model.
_FORMS: dict[str, type[_Body]] = {
    "objects": _ObjectsBody,
    "bucket": _PrefixBody,
    "urls": _UrlsBody,
}
# What to say about a field whatever pydantic found wrong with it.
_FIELD_RULES = {
    "bucket": "'bucket' must be a non-empty string",
    "prefix": f"'prefix' must be a string of at most {MAX_OBJECT_NAME_BYTES} bytes",
    "limit": f"'limit' must be an integer from 1 to {MAX_LIMIT}",
    "overwrite": "'overwrite' must be true or false",
    "dry_run": "'dry_run' must be true or false",
    "if_stale": "'if_stale' must be true or false",
    "max_cost": "'max_cost' must be a number of US dollars above 0, e.g. 2.50",
    "include_human": "'include_human' must be true or false",
    "batch": '\'batch\' must be "submit", "status", "apply", "cancel" or "prune"',
    "older_than": "'older_than' must be an age in days or hours, such as \"30d\"",
    "force": "'force' must be true or false",
    "job": "'job' must be a batch job's name (projects/…/batchPredictionJobs/ID)",
    "run": "'run' must be a run id, as submit answered it",
}


def parse_body(raw: bytes) -> CaptionRequest | BatchRequest:
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


def parse_request(body: Any) -> CaptionRequest | BatchRequest:
    if not isinstance(body, dict):
        raise BadRequestError(
            f"the body must be a JSON object, not {_json_type(body)}; "
            'e.g. {"objects": ["gs://bucket/name.jpg"]}'
        )
    if (where := first_unencodable(body)) is not None:
        raise BadRequestError(
            f"{where} is not valid Unicode text (a lone surrogate such as \\ud800?)"
        )
    if "batch" in body:
        return parse_batch(body)
    forms = [key for key in _FORMS if key in body]
    if len(forms) != 1:
        raise BadRequestError(
            "give exactly one of 'objects', 'bucket' (with 'prefix') or 'urls'"
            + (f"; got {', '.join(forms)}" if forms else "")
        )
    form = forms[0]
    try:
        parsed = _FORMS[form].model_validate(body)
    except ValidationError as exc:
        raise BadRequestError(_sentence(exc, form)) from None
    _check_include_human(parsed)
    if isinstance(parsed, _ObjectsBody):
        refs = tuple(parse_gs_uri(item) for item in parsed.objects)
        return ObjectsRequest(
            refs,
            overwrite=parsed.overwrite,
            max_cost=parsed.max_cost,
            include_human=parsed.include_human,
        )
    if isinstance(parsed, _UrlsBody):
        return UrlsRequest(tuple(_check_url(url) for url in parsed.urls), parsed.max_cost)
    assert isinstance(parsed, _PrefixBody)
    if len(parsed.prefix.encode("utf-8")) > MAX_OBJECT_NAME_BYTES:
        raise BadRequestError(_FIELD_RULES["prefix"])
    return PrefixRequest(
        bucket=parsed.bucket,
        prefix=parsed.prefix,
        limit=parsed.limit,
        overwrite=parsed.overwrite,
        dry_run=parsed.dry_run,
        if_stale=parsed.if_stale,
        max_cost=parsed.max_cost,
        include_human=parsed.include_human,
    )


def parse_batch(body: dict[str, Any]) -> BatchRequest:
    """``{"batch": "submit", "bucket": …, "prefix": …}`` or ``{"batch": "status"|"apply",
    "job": …}`` (or ``"bucket"``, ``"prefix"`` and ``"run"`` instead of ``"job"``)."""
    models: dict[Any, type[_Body]] = {"submit": _BatchSubmitBody, "prune": _BatchPruneBody}
    model = models.get(body.get("batch"), _BatchFollowBody)
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise BadRequestError(_sentence(exc, "batch", model)) from None
    if isinstance(parsed, _BatchPruneBody):
        return BatchPruneRequest(
            parsed.bucket, parse_age(parsed.older_than), parsed.force, parsed.dry_run
        )
    if len(str(getattr(parsed, "prefix", "")).encode("utf-8")) > MAX_OBJECT_NAME_BYTES:
        raise BadRequestError(_FIELD_RULES["prefix"])
    if isinstance(parsed, _BatchSubmitBody):
        _check_include_human(parsed)
        return BatchSubmitRequest(
            parsed.bucket,
            parsed.prefix,
            parsed.overwrite,
            parsed.if_stale,
            parsed.dry_run,
            include_human=parsed.include_human,
        )
    assert isinstance(parsed, _BatchFollowBody)
    if (parsed.job is None) == (parsed.bucket is None):
        raise BadRequestError("give 'job', or 'bucket' (with 'prefix' or 'run'), not both")
    if parsed.job is not None and (parsed.run or parsed.prefix):
        raise BadRequestError("'run' and 'prefix' go with 'bucket', not with 'job'")
    jobs = () if parsed.job is None else (check_job_name(parsed.job),)
    run = None if parsed.run is None else check_run_id(parsed.run)
    return BatchFollowRequest(parsed.batch, jobs, parsed.bucket, parsed.prefix, run)


def _check_include_human(parsed: _Body) -> None:
    """``include_human`` only with what would replace a caption: alone it would do nothing,
    and a caller who sent it meant something else."""
    replacing = getattr(parsed, "overwrite", False) or getattr(parsed, "if_stale", False)
    if getattr(parsed, "include_human", False) and not replacing:
        raise BadRequestError(
            "'include_human' replaces the captions people wrote or approved only with "
            "'overwrite' or 'if_stale': add one of them"
        )


def _sentence(exc: ValidationError, form: str, model: type[_Body] | None = None) -> str:
    """pydantic's first complaint about a body, as one sentence naming the field."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        allowed = ", ".join(sorted((model or _FORMS[form]).model_fields))
        return (
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"with {form!r} the fields are: {allowed}"
        )
    error = errors[0]
    field = str(error["loc"][0])
    if field in _FIELD_RULES:
        return _FIELD_RULES[field]
    # 'objects' or 'urls': a list of strings, neither empty nor too long.
    if error["type"] == "too_short":
        return f"{field!r} is empty"
    if error["type"] == "too_long":
        limit = MAX_OBJECTS if field == "objects" else MAX_URLS
        count = len(error["input"]) if isinstance(error["input"], list) else "too many"
        return f"{field!r} has {count} items; at most {limit} per request"
    return f"{field!r} must be a list of strings"


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

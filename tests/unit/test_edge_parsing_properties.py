"""The edges that read what an attacker writes: HTTP bodies, event payloads, gs:// URIs.

Generated, not picked: JSON texts with lone surrogates (``"\\ud800"``, which JSON
allows and no UTF-8 encoder does), integers past Python's 4300-digit limit, deep
nesting and every field of every request form. The properties: parsing ends in a
typed request or a BadRequestError (a 400), never in another exception (a 500);
and a request that is accepted never names a string that cannot be sent on, so it
can never widen (an unencodable prefix once became "" and captioned a whole bucket).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.batch import ObjectsRequest, PrefixRequest, UrlsRequest
from captioner.domain import first_unencodable
from captioner.edges.events import object_ref_from_event
from captioner.edges.http_body import parse_body, parse_gs_uri
from captioner.errors import BadRequestError

SURROGATES = st.integers(0xD800, 0xDFFF).map(lambda c: f"\\u{c:04x}")
# JSON string bodies, written as JSON source so that escapes reach the parser as such.
PLAIN = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters='"\\'), max_size=12
)
HOSTILE_STRING = st.builds(
    lambda before, bad, after: f'"{before}{bad}{after}"', PLAIN, SURROGATES, PLAIN
)
FINE_STRING = PLAIN.map(lambda s: json.dumps(s))
HUGE_INT = st.integers(4301, 9000).map(lambda n: "1" * n)
JSON_SCALAR = st.one_of(
    FINE_STRING, HOSTILE_STRING, HUGE_INT, st.sampled_from(["true", "null", "1", "-1", "1e999"])
)


def _obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


FIELD_VALUES = st.one_of(JSON_SCALAR, st.lists(JSON_SCALAR, max_size=3).map(_array))
KEYS = st.sampled_from(
    [
        '"objects"',
        '"bucket"',
        '"prefix"',
        '"limit"',
        '"overwrite"',
        '"dry_run"',
        '"if_stale"',
        '"urls"',
        '"\\ud800"',
    ]
)
BODIES = st.lists(st.tuples(KEYS, FIELD_VALUES), max_size=5).map(_obj)
# Bodies of each form, one field hostile.
FORMS = st.one_of(
    st.builds(lambda s: _obj([('"bucket"', '"b"'), ('"prefix"', s)]), HOSTILE_STRING),
    st.builds(lambda s: _obj([('"bucket"', s)]), HOSTILE_STRING),
    st.builds(lambda s: _obj([('"objects"', _array([f'"gs://b/{s[1:]}']))]), HOSTILE_STRING),
    st.builds(lambda s: _obj([('"urls"', _array([f'"http://x/{s[1:]}']))]), HOSTILE_STRING),
    st.builds(lambda n: _obj([('"bucket"', '"b"'), ('"limit"', n)]), HUGE_INT),
)


def _accepted_strings(request: ObjectsRequest | PrefixRequest | UrlsRequest) -> list[Any]:
    if isinstance(request, ObjectsRequest):
        return [(ref.bucket, ref.name) for ref in request.objects]
    if isinstance(request, PrefixRequest):
        return [request.bucket, request.prefix]
    return list(request.urls)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(BODIES, FORMS))
def test_any_body_is_a_request_or_a_400_and_an_accepted_one_is_all_encodable(raw: str) -> None:
    try:
        request = parse_body(raw.encode("utf-8"))
    except BadRequestError as exc:
        status = exc.status
        assert status == 400
        return
    assert first_unencodable(_accepted_strings(request)) is None


@settings(max_examples=200, deadline=None)
@given(raw=FORMS)
def test_a_body_with_a_lone_surrogate_or_a_huge_integer_is_always_refused(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_body(raw.encode("utf-8"))


@pytest.mark.parametrize("bad", ["\\ud800", "\\udfff", "a\\udc80b", "\\ud83d"])
def test_a_prefix_with_a_lone_surrogate_is_refused_not_widened(bad: str) -> None:
    with pytest.raises(BadRequestError, match="not valid Unicode"):
        parse_body(f'{{"bucket": "b", "prefix": "{bad}"}}'.encode())


@pytest.mark.parametrize("digits", [4301, 10_000, 100_000])
def test_an_integer_of_thousands_of_digits_is_a_400(digits: int) -> None:
    with pytest.raises(BadRequestError, match="cannot be read"):
        parse_body(f'{{"bucket": "b", "limit": {"9" * digits}}}'.encode())


EVENT_BASE = [
    ('"bucket"', '"photos"'),
    ('"name"', '"a.jpg"'),
    ('"generation"', '"17"'),
]


@settings(max_examples=300, deadline=None)
@given(
    replace=st.sampled_from(['"bucket"', '"name"', '"generation"', '"contentType"', '"size"']),
    value=FIELD_VALUES,
    as_bytes=st.booleans(),
)
def test_any_event_payload_is_an_object_or_a_bad_request(
    replace: str, value: str, as_bytes: bool
) -> None:
    raw = _obj([*(p for p in EVENT_BASE if p[0] != replace), (replace, value)])
    try:
        ref = object_ref_from_event(raw.encode() if as_bytes else raw)
    except BadRequestError:
        return
    assert first_unencodable([ref.bucket, ref.name, ref.content_type]) is None


@settings(max_examples=200, deadline=None)
@given(value=HOSTILE_STRING)
def test_an_event_already_parsed_with_a_lone_surrogate_is_a_bad_request(value: str) -> None:
    # functions-framework hands over data it has parsed itself, surrogates and all.
    data = {"bucket": "photos", "name": json.loads(value, strict=False), "generation": "17"}
    with pytest.raises(BadRequestError, match="not valid Unicode"):
        object_ref_from_event(data)


@pytest.mark.parametrize("name", ["\udcff.jpg", "dir/\ud800", "\udc80"])
def test_a_gs_uri_from_a_command_line_with_undecodable_bytes_is_refused(name: str) -> None:
    # Python keeps undecodable argv bytes as lone surrogates (surrogateescape).
    with pytest.raises(BadRequestError, match="not valid Unicode"):
        parse_gs_uri(f"gs://bucket/{name}")

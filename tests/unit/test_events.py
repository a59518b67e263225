from __future__ import annotations

import json

import pytest

from captioner.edges.events import object_ref_from_event
from captioner.errors import BadRequestError

GOOD = {
    "bucket": "photos",
    "name": "a b#c?d%e/ü.jpg",
    "generation": "1700000000000001",
    "metageneration": "1",
    "contentType": "image/jpeg",
    "size": "12345",
}


def test_int64_fields_arrive_as_strings_and_become_ints() -> None:
    ref = object_ref_from_event(GOOD)
    assert ref.bucket == "photos"
    assert ref.name == "a b#c?d%e/ü.jpg"
    assert ref.generation == 1700000000000001
    assert ref.metageneration == 1
    assert ref.size == 12345
    assert ref.content_type == "image/jpeg"


@pytest.mark.parametrize("data", [json.dumps(GOOD), json.dumps(GOOD).encode()])
def test_data_given_as_json_text_or_bytes_is_parsed(data: str | bytes) -> None:
    assert object_ref_from_event(data).generation == 1700000000000001


def test_numbers_instead_of_strings_are_accepted() -> None:
    ref = object_ref_from_event({**GOOD, "generation": 7, "size": 0})
    assert (ref.generation, ref.size) == (7, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "no data"),
        (b"", "no data"),
        (b"\xff\xfe", "UTF-8"),
        ("{not json", "not JSON"),
        ([1, 2], "JSON object"),
        ({**GOOD, "bucket": None}, "missing 'bucket'"),
        ({k: v for k, v in GOOD.items() if k != "name"}, "missing 'name'"),
        ({**GOOD, "name": ""}, "'name' must be a non-empty string"),
        ({**GOOD, "name": 5}, "'name' must be a non-empty string"),
        ({**GOOD, "name": "x" * 1025}, "longer than 1024"),
        ({**GOOD, "name": "a\nb"}, "control character"),
        ({k: v for k, v in GOOD.items() if k != "generation"}, "missing 'generation'"),
        ({**GOOD, "generation": "12abc"}, "'generation' must be a non-negative integer"),
        ({**GOOD, "generation": True}, "'generation' must be an int64"),
        ({**GOOD, "generation": "-5"}, "non-negative"),
        ({**GOOD, "generation": str(1 << 63)}, "int64 range"),
        ({**GOOD, "size": 1.5}, "'size' must be an int64"),
        ({**GOOD, "contentType": ["image/png"]}, "'contentType' must be a string"),
    ],
)
def test_malformed_event_gives_a_clear_bad_request(data: object, message: str) -> None:
    with pytest.raises(BadRequestError, match=message.replace("(", r"\(")):
        object_ref_from_event(data)

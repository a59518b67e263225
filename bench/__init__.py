"""Benchmarks of the captioning pipeline against the simple approaches (issue 6).

Run ``.venv/bin/python -m bench.run`` (full, about 10 minutes) or with ``--smoke``
(under a minute); the full run writes bench/RESULTS.md. See bench/run.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The benchmark runs from the repository root like the tests do: src/ holds the
# packages under test and the local stack, and is not installed.
_SRC = str(Path(__file__).resolve().parent.parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

"""The local stack for tests, the demo and benchmarks (never deployed).

``PHOTOS`` holds the sample photographs, public domain or CC0 (see its SOURCES.md),
shipped here so that a plain clone can run the demo and the tests.
"""

from pathlib import Path

PHOTOS = Path(__file__).resolve().parent / "photos"

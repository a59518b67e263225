"""What a decode worker runs (captioner.workers serves this module): Pillow, within
the memory the parent allowed this one image.

The parent sends each image with an opening allowance. Once the header is read the
image is priced (``images.check``); if the allowance is short of what that price
needs, the worker answers ``more`` with the amount, and the parent sends the image
again once its decode budget has that much. So the estimate decides how much memory
an image gets, and the kernel holds the decoder to it: a header that lies about its
decode gets a failed allocation in its own worker, not an instance out of memory.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any

from captioner.adapters import images
from captioner.errors import PermanentError

# Refusals that, before the header has even been read, may only mean the opening
# allowance was short: Pillow's WebP plugin makes its decoder's canvases when it
# opens a file (8 bytes a declared pixel), a TIFF's tag lists grow with the file,
# and under RLIMIT_AS either surfaces as a MemoryError or as "cannot identify".
_MAYBE_SHORT_OF_MEMORY = frozenset({"corrupt-image", "too-large-to-decode"})


def allowance_for(cost: int, size: int, *, floor: int, largest: int) -> int:
    """The memory a decode priced at ``cost`` gets: the price and a quarter more (the
    estimate was above the measured peak in every accepted case of bench/memory.py,
    by up to 2x), the worker's copy of the ``size`` bytes received, and ``floor`` for
    what any decode maps whatever its size (codec state, Python objects); at most
    ``largest``."""
    return min(largest, cost + cost // 4 + size + floor)


def warm() -> None:
    """Before the worker measures its baseline: run the common codecs once, so what
    they map on first use is not charged to a task."""
    # Pillow warns (to stderr) about odd EXIF and the like in hostile files; what
    # matters is already in the verdict.
    warnings.simplefilter("ignore")
    images.warm()


def handle(request: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """Prepare ``data`` as ``request`` says; never raises (every failure is a reply)."""
    max_edge = int(request["max_edge"])
    limits = (max_edge, int(request["max_pixels"]), int(request["max_decode_bytes"]))
    allowance, largest = int(request["allowance"]), int(request["largest"])
    header_read = False
    try:
        with images.decoder_failures():
            images.precheck(data, *limits)
        with images.decoder_failures(), images.opened(data) as image:
            header_read = True
            cost = images.check(image, data, *limits)
            needed = allowance_for(cost, len(data), floor=int(request["floor"]), largest=largest)
            if needed > allowance:
                return {"status": "more", "allowance": needed}, b""
            prepared = images.prepare_opened(image, data, max_edge)
    except PermanentError as exc:
        if (
            not header_read
            and allowance < largest
            and exc.reason in _MAYBE_SHORT_OF_MEMORY
            and images.sniff_format(data) is not None
        ):
            return {"status": "more", "allowance": largest}, b""
        return {"status": "refused", "reason": exc.reason, "message": str(exc)}, b""
    fields = asdict(prepared)
    out: bytes = fields.pop("data")
    return {"status": "ok", **fields}, out

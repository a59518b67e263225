"""What the review page lists: a prefix read one listing page at a time, filtered as it goes.

A prefix can hold 100,000 objects and Cloud Storage filters by name prefix only, so
nothing is listed up front: each request of the page reads on from a cursor (the listing's
page token and a position in that page), keeps the images that match the filters, and
stops at a page of cards or after looking at ``SCAN_LIMIT`` objects, whichever comes
first, answering with the cursor to go on from. The first cards of any prefix come after
one listing call; a filter that matches little answers with what it found so far and the
page asks again.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from captioner.decisions import has_final_word, looks_like_image
from captioner.domain import ObjectInfo
from captioner.errors import BadRequestError
from captioner.metadata import MetadataKeys, is_done, is_human
from captioner.readback import as_json, record_of, who_wrote
from captioner.rules import RuleBook

# Cards per answer: a screenful or two.
PAGE_SIZE = 48
# Objects looked at per answer at most: with a filter that matches little, the page hears
# back within a second or two and asks again, rather than wait on a long listing.
SCAN_LIMIT = 5000
# Objects per listing call (Cloud Storage's maximum).
LISTING_PAGE = 1000
# How long one listing page read is reused (by the next request, which goes on mid-page).
_REUSE_SECONDS = 30.0
STATUSES = ("all", "ok", "blocked", "error", "stale", "never", "human")


class Page(Protocol):
    @property
    def items(self) -> tuple[ObjectInfo, ...]: ...

    @property
    def next_token(self) -> str | None: ...

    @property
    def prefixes(self) -> tuple[str, ...]: ...


class PageSource(Protocol):
    async def list_page(
        self,
        bucket: str,
        prefix: str = "",
        page_token: str | None = None,
        *,
        page_size: int = 1000,
        delimiter: str | None = None,
    ) -> Page: ...


@dataclass(frozen=True, slots=True)
class Query:
    """The page's filters: a status (``STATUSES``), a folder under the prefix, a text."""

    status: str = "all"
    folder: str = ""
    text: str = ""

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Query:
        status = params.get("status", "all") or "all"
        if status not in STATUSES:
            raise BadRequestError(f"status must be one of {', '.join(STATUSES)}")
        folder = params.get("folder", "")
        if folder and not folder.endswith("/"):
            folder += "/"
        return cls(status, folder[:1024], params.get("text", "").strip()[:200])


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the listing goes on: a page token (None: the first page) and a position."""

    token: str | None = None
    offset: int = 0

    def encode(self) -> str:
        raw = json.dumps([self.token, self.offset]).encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        if not text:
            return cls()
        try:
            token, offset = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        except (ValueError, TypeError, binascii.Error, UnicodeError):
            raise BadRequestError("not a cursor this page gave") from None
        if not (token is None or isinstance(token, str)) or not isinstance(offset, int):
            raise BadRequestError("not a cursor this page gave")
        return cls(token, max(0, offset))


@dataclass(frozen=True, slots=True)
class Found:
    items: list[dict[str, Any]]
    cursor: str | None  # None: the listing is at its end
    scanned: int


class Listing:
    """The images under one prefix, as the review page pages through them."""

    def __init__(
        self,
        source: PageSource,
        bucket: str,
        prefix: str,
        *,
        keys: MetadataKeys,
        rules: RuleBook,
        model: str,
    ) -> None:
        self._source = source
        self.bucket = bucket
        self.prefix = prefix
        self._keys = keys
        self._rules = rules
        self._model = model
        self._last: tuple[tuple[str, str | None], float, Page] | None = None

    def forget(self) -> None:
        """Drop the page kept for reuse (after a save: it holds the metadata before)."""
        self._last = None

    async def find(
        self, query: Query, cursor: Cursor, *, want: int = PAGE_SIZE, scan_limit: int = SCAN_LIMIT
    ) -> Found:
        """Up to ``want`` matching images from ``cursor`` on, and where to go on from."""
        prefix = self.prefix + query.folder
        items: list[dict[str, Any]] = []
        token, offset, scanned = cursor.token, cursor.offset, 0
        while True:
            page = await self._page(prefix, token)
            for index in range(offset, len(page.items)):
                info = page.items[index]
                scanned += 1
                if self.matches(info, query):
                    items.append(self.item(info))
                if len(items) >= want or scanned >= scan_limit:
                    more = index + 1 < len(page.items) or page.next_token is not None
                    return Found(items, Cursor(token, index + 1).encode() if more else None,
                                 scanned)  # fmt: skip
            if page.next_token is None:
                return Found(items, None, scanned)
            token, offset = page.next_token, 0

    async def folders(self, folder: str) -> list[str]:
        """The folders directly under ``folder`` (relative to the prefix), for the filter."""
        page = await self._source.list_page(
            self.bucket, self.prefix + folder, None, page_size=LISTING_PAGE, delimiter="/"
        )
        return [p[len(self.prefix) :] for p in page.prefixes]

    async def _page(self, prefix: str, token: str | None) -> Page:
        key = (prefix, token)
        if self._last is not None:
            kept_key, at, kept = self._last
            if kept_key == key and time.monotonic() - at < _REUSE_SECONDS:
                return kept
        page = await self._source.list_page(self.bucket, prefix, token, page_size=LISTING_PAGE)
        self._last = (key, time.monotonic(), page)
        return page

    def matches(self, info: ObjectInfo, query: Query) -> bool:
        if not looks_like_image(info):
            return False
        if query.status != "all" and query.status not in self.kinds(info):
            return False
        if query.text:
            meta = info.metadata
            keys = self._keys
            words = " ".join(meta.get(k, "") for k in (keys.caption, keys.alt, keys.tags))
            return query.text.casefold() in words.casefold()
        return True

    def kinds(self, info: ObjectInfo) -> tuple[str, ...]:
        """The filters an image answers to: its status for this upload (``never`` if it
        has none), ``human`` if a person wrote or approved it, ``stale`` if a model wrote
        it with another model or prompt than the current ones."""
        meta, keys = info.metadata, self._keys
        if not is_done(meta, info.generation, keys):
            return ("never",)
        status = meta.get(keys.status, "")
        base = "error" if status.startswith("error:") else status
        if is_human(meta, info.generation, keys):
            return (base, "human")
        spec = self._rules.spec_for(info.name)
        if spec is not None and base != "error":
            current = has_final_word(info, keys, spec=spec, model=self._model, if_stale=True)
            if not current:
                return (base, "stale")
        return (base,)

    def item(self, info: ObjectInfo) -> dict[str, Any]:
        """One card's data. The page puts every string in as text, never as markup."""
        record = record_of(info, self._keys)
        spec = self._rules.spec_for(info.name)
        return {
            **as_json(record),
            "name": info.name,
            "generation": str(info.generation),
            "metageneration": str(info.metageneration),
            "kinds": list(self.kinds(info)),
            "by": who_wrote(record),
            # The rule whose prompt a caption again asks when none is typed (None: a
            # rule excludes the image); ``prompts`` gives its text.
            "rule_now": None if spec is None else spec.rule,
        }

    def prompts(self) -> dict[str, str]:
        """The prompt of each rule that captions (and of ``default``), by rule name."""
        default = self._rules.default.prompt
        named = {r.name: r.prompt or default for r in self._rules.rules if not r.exclude}
        return {"default": default, **named}

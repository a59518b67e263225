"""The review page's listing: a prefix of 100,000 objects opens on one listing call and
pages from a cursor; filters read on in bounded steps (a lazy in-memory listing)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from captioner.captions import CaptionSpec
from captioner.domain import ObjectInfo
from captioner.edges.review.listing import PAGE_SIZE, SCAN_LIMIT, Cursor, Listing, Query
from captioner.errors import BadRequestError
from captioner.metadata import MetadataKeys
from captioner.rules import Rule, RuleBook

KEYS = MetadataKeys()
SPEC = CaptionSpec("Describe.", structured=False)


@dataclass(frozen=True)
class FakePage:
    items: tuple[ObjectInfo, ...]
    next_token: str | None
    prefixes: tuple[str, ...] = ()


class LazyBucket:
    """``count`` objects under ``p/``, made page by page as they are asked for."""

    def __init__(self, count: int, special: dict[int, dict[str, str]] | None = None) -> None:
        self.count = count
        self.special = special or {}
        self.calls = 0

    async def list_page(
        self,
        bucket: str,
        prefix: str = "",
        page_token: str | None = None,
        *,
        page_size: int = 1000,
        delimiter: str | None = None,
    ) -> FakePage:
        self.calls += 1
        start = int(page_token or 0)
        end = min(self.count, start + page_size)
        items = tuple(
            ObjectInfo("b", f"p/{i:06}.jpg", 7, 1, "image/jpeg", 10, self.special.get(i, {}))
            for i in range(start, end)
        )
        return FakePage(items, str(end) if end < self.count else None)


def listing(source: LazyBucket) -> Listing:
    return Listing(source, "b", "p/", keys=KEYS, rules=RuleBook(SPEC), model="m")


async def test_a_prefix_of_100000_objects_opens_on_one_listing_call_and_pages_on() -> None:
    source = LazyBucket(100_000)
    view = listing(source)
    first = await view.find(Query(), Cursor())
    assert source.calls == 1
    assert [i["name"] for i in first.items] == [f"p/{i:06}.jpg" for i in range(PAGE_SIZE)]
    assert first.cursor is not None
    second = await view.find(Query(), Cursor.decode(first.cursor))
    assert second.items[0]["name"] == f"p/{PAGE_SIZE:06}.jpg"
    assert source.calls == 1  # the same listing page, kept


async def test_a_filter_that_matches_little_reads_on_in_bounded_steps_to_the_end() -> None:
    person = {"caption": "The needle", "caption-status": "ok", "caption-generation": "7",
              "caption-source": "human"}  # fmt: skip
    source = LazyBucket(12_000, {11_999: person})
    view = listing(source)
    cursor, steps, found = Cursor(), 0, []
    while True:
        answer = await view.find(Query(text="needle"), cursor)
        assert answer.scanned <= SCAN_LIMIT
        found += [i["name"] for i in answer.items]
        steps += 1
        if answer.cursor is None:
            break
        cursor = Cursor.decode(answer.cursor)
    assert found == ["p/011999.jpg"]
    assert steps == 3  # 5,000 + 5,000 + 2,000
    assert source.calls == 12
    humans = await listing(LazyBucket(12_000, {11_999: person})).find(
        Query(status="human"), Cursor(), scan_limit=20_000
    )
    assert [i["kinds"] for i in humans.items] == [["ok", "human"]]


def captioned(**extra: str) -> dict[str, str]:
    return {"caption": "x", "caption-status": "ok", "caption-generation": "7",
            "caption-model": "m", "caption-prompt": SPEC.fingerprint, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("meta", "kinds"),
    [
        ({}, ("never",)),
        (captioned(**{"caption-generation": "6"}), ("never",)),  # an older upload's
        (captioned(), ("ok",)),
        (captioned(**{"caption-model": "older"}), ("ok", "stale")),
        (captioned(**{"caption-prompt": "other"}), ("ok", "stale")),
        (captioned(**{"caption-status": "blocked"}), ("blocked",)),
        (captioned(**{"caption-status": "error:corrupt-image"}), ("error",)),
        (captioned(**{"caption-model": "older", "caption-source": "approved"}), ("ok", "human")),
    ],
)
def test_each_image_answers_to_the_filters_of_its_status(
    meta: dict[str, str], kinds: tuple[str, ...]
) -> None:
    info = ObjectInfo("b", "p/a.jpg", 7, 1, "image/jpeg", 10, meta)
    assert listing(LazyBucket(0)).kinds(info) == kinds


@pytest.mark.parametrize("text", ["garbage", "WyJ4IiwgIngiXQ==", "bnVsbA=="])
def test_a_cursor_the_page_did_not_give_is_a_400(text: str) -> None:
    with pytest.raises(BadRequestError):
        Cursor.decode(text)


def test_filters_are_checked_and_a_folder_is_a_folder() -> None:
    with pytest.raises(BadRequestError):
        Query.of({"status": "<script>"})
    assert Query.of({"folder": "a/b", "text": "  cat "}) == Query("all", "a/b/", "cat")


def test_each_card_names_the_rule_a_caption_again_asks_and_the_page_gets_their_prompts() -> None:
    rules = RuleBook(
        SPEC,
        (
            Rule("thumbs", prefix="p/thumbs/", exclude=True),
            Rule("products", match="p/products/**", prompt="Sell it."),
            Rule("plain", prefix="p/plain/", mode="sentence"),
        ),
    )
    shown = Listing(LazyBucket(0), "b", "p/", keys=KEYS, rules=rules, model="m")

    def rule_now(name: str) -> str | None:
        rule: str | None = shown.item(ObjectInfo("b", name, 7, 1, "image/jpeg", 10, {}))["rule_now"]
        return rule

    assert rule_now("p/products/a/cup.jpg") == "products"
    assert rule_now("p/plain/cup.jpg") == "plain"
    assert rule_now("p/cup.jpg") == "default"
    assert rule_now("p/thumbs/cup.jpg") is None  # excluded: a prompt must be typed
    assert shown.prompts() == {"default": "Describe.", "products": "Sell it.",
                               "plain": "Describe."}  # fmt: skip

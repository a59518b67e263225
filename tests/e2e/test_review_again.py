"""**Caption again** on the review page, in Debian's headless Chromium (Playwright), against
the local stack: keeping the current caption writes nothing, a blocked answer is said as
such and can never be kept, and with no prompt typed the image gets the prompt of its
rule of CAPTION_RULES, as the pipeline would give it. Every test checks what the object
carries in fake-gcs-server afterwards (and, behind the recording proxy, that the page
sent no write at all)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from captioner.captions import DEFAULT_PROMPT, CaptionSpec
from tests import images
from tests.e2e.test_review_page import backfill
from tests.e2e.test_review_page import browser as browser  # the fixtures
from tests.e2e.test_review_page import open_page as open_page
from tests.gcs_proxy import GcsProxy
from tests.objects import metadata, upload
from tests.review_server import review

pytestmark = pytest.mark.slow

ANSWER = {"caption": "A cappuccino with latte art.", "alt_text": "Cappuccino",
          "tags": ["coffee", "latte art"]}  # fmt: skip
PRODUCT_PROMPT = "Describe this product photo for a shop listing, in one sentence."
RULES = json.dumps(
    [
        {"name": "thumbs", "prefix": "ru/thumbs/", "exclude": True},
        {"name": "products", "match": "ru/products/**", "prompt": PRODUCT_PROMPT},
    ]
)


@pytest.fixture
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    """fake-gcs-server behind the recording proxy: every PATCH the page's server sends."""
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


def state(proxy: GcsProxy, bucket: Any, name: str) -> tuple[str, str, dict[str, str]]:
    """The object's generation, metageneration and custom metadata, as stored (read
    through the proxy, which counts the metageneration fake-gcs-server does not)."""
    url = f"{proxy.url}/storage/v1/b/{bucket.name}/o/{quote(name, safe='')}"
    resource = requests.get(url, timeout=10).json()
    return resource["generation"], resource["metageneration"], resource.get("metadata", {})


def run_again(card: Any, prompt: str | None = None, model: str | None = None) -> None:
    card.locator("button.again").click()
    if model is not None:
        card.locator(".again-panel input[name=model]").fill(model)
    if prompt is not None:
        card.locator(".again-panel textarea[name=prompt]").fill(prompt)
    card.locator("button.run").click()


def test_keep_current_after_caption_again_writes_nothing_and_the_metageneration_stays(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any, proxy: GcsProxy
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    upload(bucket, "kc/cup.jpg", images.photo("coffee.jpg"), metadata={"sku": "C-1"})
    backfill(env, f"gs://{bucket.name}/kc/")
    before = state(proxy, bucket, "kc/cup.jpg")
    assert before[1] == "2"  # the upload's and the backfill's
    patches = len(proxy.recorded("PATCH"))
    with review(env, f"gs://{bucket.name}/kc/", "--by", "ana") as server:
        page = open_page(server)
        card = page.card("kc/cup.jpg")
        gemini.add_fault("custom_text", text=json.dumps(ANSWER), count=1)
        run_again(card, prompt="Name the coffee drink.")
        card.locator(".side-by-side").wait_for()
        assert "A cappuccino with latte art." in card.locator(".side-by-side").inner_text()
        card.locator("button.keep-current").click()
        notice = card.locator(".notice")
        notice.wait_for()
        assert notice.inner_text() == "Kept the current caption: nothing was written."
        assert card.locator(".side-by-side, .again-panel").count() == 0
        shown = card.inner_text()
        assert before[2]["caption"] in shown
        assert "A cappuccino" not in shown
        # Asked about the object again, the server holds what was there before.
        again = page.page.evaluate(
            "async n => (await (await fetch('/api/object?name=' + encodeURIComponent(n))).json())",
            "kc/cup.jpg",
        )
        assert again["item"]["caption"] == before[2]["caption"]
        assert again["item"]["metageneration"] == before[1]
    assert gemini.calls == 2  # the backfill's and the caption again's
    assert len(proxy.recorded("PATCH")) == patches  # the page sent no write at all
    assert state(proxy, bucket, "kc/cup.jpg") == before  # same generation, metageneration, metadata


@pytest.mark.parametrize(
    ("blocked_before", "fault"),
    [(False, "safety_prompt"), (False, "safety_candidate"), (True, "safety_candidate")],
    ids=["ok-prompt-blocked", "ok-answer-blocked", "blocked-blocked-again"],
)
def test_caption_again_that_gemini_blocks_says_blocked_offers_nothing_to_keep_writes_nothing(
    stack_env: dict[str, str],
    gemini: Any,
    bucket: Any,
    open_page: Any,
    proxy: GcsProxy,
    blocked_before: bool,
    fault: str,
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    upload(bucket, "bl/cat.jpg", images.photo("chelsea.jpg"))
    if blocked_before:
        gemini.add_fault("safety_prompt", count=1)
    backfill(env, f"gs://{bucket.name}/bl/")
    before = state(proxy, bucket, "bl/cat.jpg")
    assert before[2]["caption-status"] == ("blocked" if blocked_before else "ok")
    patches = len(proxy.recorded("PATCH"))
    with review(env, f"gs://{bucket.name}/bl/", "--by", "ana") as server:
        page = open_page(server)
        card = page.card("bl/cat.jpg")
        gemini.add_fault(fault, count=1)
        run_again(card, model="gemini-2.5-pro")
        notice = card.locator(".notice", has_text="Blocked")
        notice.wait_for()
        said = notice.inner_text()
        assert "gemini-2.5-pro" in said
        assert "SAFETY" in said
        assert "Nothing to keep; nothing was written." in said
        assert notice.get_attribute("role") == "alert"
        assert card.locator(".side-by-side, button.keep-new").count() == 0
        # Nor can a keep be forged for it: the server kept no answer to write.
        status = page.page.evaluate(
            """async ([name, generation, metageneration]) => {
                const csrf = document.querySelector('meta[name="captioner-csrf"]').content;
                const r = await fetch('/api/keep', {method: 'POST', headers: {
                    'Content-Type': 'application/json', 'X-Captioner-CSRF': csrf},
                    body: JSON.stringify({name, generation, metageneration,
                                          answer: 'made-up'})});
                return r.status;
            }""",
            ["bl/cat.jpg", before[0], before[1]],
        )
        assert status == 400
        page.expected.append("status of 400")
    requests = gemini.requests
    assert requests[-1].model.endswith("gemini-2.5-pro")
    assert requests[-1].fault == fault
    assert len(proxy.recorded("PATCH")) == patches
    meta = state(proxy, bucket, "bl/cat.jpg")
    assert meta == before
    assert "caption-source" not in meta[2]
    assert "caption-reviewed-by" not in meta[2]


def test_caption_again_with_no_prompt_typed_asks_the_prompt_of_the_objects_rule_and_keeps_it(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    env = {**stack_env, "CAPTION_RULES": RULES}
    upload(bucket, "ru/products/cup.jpg", images.photo("coffee.jpg"))
    backfill(env, f"gs://{bucket.name}/ru/products/")
    rule_spec = CaptionSpec(PRODUCT_PROMPT, rule="products")
    assert metadata(bucket, "ru/products/cup.jpg")["caption-rule"] == "products"
    with review(env, f"gs://{bucket.name}/ru/", "--by", "ana") as server:
        page = open_page(server)
        card = page.card("ru/products/cup.jpg")
        card.locator("button.again").click()
        field = card.locator(".again-panel textarea[name=prompt]")
        assert field.input_value() == ""
        hint = field.get_attribute("placeholder")
        assert "rule “products”" in hint
        assert PRODUCT_PROMPT in hint
        gemini.add_fault("custom_text", text=json.dumps(ANSWER), count=1)
        card.locator("button.run").click()
        card.locator(".side-by-side").wait_for()
        asked = gemini.requests[-1].prompt
        assert PRODUCT_PROMPT in asked
        assert DEFAULT_PROMPT not in asked
        assert "New (gemini-2.5-flash, rule products)" in card.locator(".side-by-side").inner_text()
        card.locator("button.keep-new").click()
        card.locator(".notice", has_text="Saved.").wait_for()
    meta = metadata(bucket, "ru/products/cup.jpg")
    assert meta["caption"] == "A cappuccino with latte art."
    assert (meta["caption-rule"], meta["caption-prompt"]) == ("products", rule_spec.fingerprint)
    assert (meta["caption-source"], meta["caption-reviewed-by"]) == ("approved", "ana")


def test_caption_again_asks_a_typed_prompt_else_the_default_and_an_excluded_image_needs_one(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    env = {**stack_env, "CAPTION_RULES": RULES}
    upload(bucket, "ru/other/cat.jpg", images.photo("chelsea.jpg"))
    upload(bucket, "ru/thumbs/cat.jpg", images.photo("chelsea.jpg"))
    upload(bucket, "ru/products/mug.jpg", images.photo("coffee.jpg"))
    backfill(env, f"gs://{bucket.name}/ru/")
    names = ("ru/thumbs/cat.jpg", "ru/products/mug.jpg", "ru/other/cat.jpg")
    befores = {name: metadata(bucket, name) for name in names}
    with review(env, f"gs://{bucket.name}/ru/", "--by", "ana") as server:
        page = open_page(server)
        page.expected.append("status of 400")
        other = page.card("ru/other/cat.jpg")
        run_again(other)
        other.locator(".side-by-side").wait_for()
        assert DEFAULT_PROMPT in gemini.requests[-1].prompt
        assert "New (gemini-2.5-flash, the default prompt)" in other.inner_text()
        other.locator("button.keep-current").click()

        # A prompt typed is the person's, whatever rule the folder has.
        product = page.card("ru/products/mug.jpg")
        run_again(product, prompt="  Say what the mug holds.  ")
        product.locator(".side-by-side").wait_for()
        asked = gemini.requests[-1].prompt
        assert "Say what the mug holds." in asked
        assert PRODUCT_PROMPT not in asked
        assert "New (gemini-2.5-flash, your prompt)" in product.inner_text()
        product.locator("button.keep-current").click()

        # An image a rule excludes is not sent with a prompt it was never meant to get.
        thumb = page.card("ru/thumbs/cat.jpg")
        calls = gemini.calls
        thumb.locator("button.again").click()
        hint = thumb.locator(".again-panel textarea[name=prompt]").get_attribute("placeholder")
        assert "excludes this image" in hint
        thumb.locator("button.run").click()
        notice = thumb.locator(".notice", has_text="Not captioned again")
        notice.wait_for()
        assert "rule 'thumbs' of CAPTION_RULES excludes this image" in notice.inner_text()
        assert gemini.calls == calls
        gemini.add_fault("custom_text", text=json.dumps(ANSWER), count=1)
        run_again(thumb, prompt="Describe the cat.")
        thumb.locator(".side-by-side").wait_for()
        assert "Describe the cat." in gemini.requests[-1].prompt
        # A prompt longer than CAPTION_PROMPT may be is refused before Gemini is asked.
        calls = gemini.calls
        too_long = page.page.evaluate(
            """async ([name, generation]) => {
                const csrf = document.querySelector('meta[name="captioner-csrf"]').content;
                const r = await fetch('/api/recaption', {method: 'POST', headers: {
                    'Content-Type': 'application/json', 'X-Captioner-CSRF': csrf},
                    body: JSON.stringify({name, generation, metageneration: '1',
                                          prompt: 'x'.repeat(4001)})});
                return [r.status, (await r.json()).error];
            }""",
            ["ru/other/cat.jpg", str(bucket.get_blob("ru/other/cat.jpg").generation)],
        )
        assert too_long == [400, "the prompt is longer than 4000 characters"]
        assert gemini.calls == calls
    assert {name: metadata(bucket, name) for name in names} == befores  # nothing kept
    assert befores["ru/other/cat.jpg"]["caption-rule"] == "default"
    assert befores["ru/thumbs/cat.jpg"] == {}

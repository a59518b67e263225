"""`captioner review` in a real browser: Debian's headless Chromium driven by Playwright
(no browser download: ``executable_path``), against the local stack. Every test checks
what the object carries in fake-gcs-server afterwards.

One browser for the module, one review process per test (each has its own bucket).
Without Chromium (or Playwright) the tests skip locally and fail in CI
(CAPTIONER_REQUIRE_CHROMIUM=1), as tests/e2e/test_html_export.py does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from captioner.captions import CaptionSpec
from captioner_dev.functions import REPO
from tests import images
from tests.e2e.test_cli import run_cli
from tests.e2e.test_html_export import colours
from tests.gcs_proxy import GcsProxy
from tests.objects import metadata, upload
from tests.review_server import Review, review

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags that work here (a container, no GPU, no network wanted).
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = REPO / "docs" / "review.png"


def _missing(why: str) -> None:
    if os.environ.get("CAPTIONER_REQUIRE_CHROMIUM"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        _missing("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh profile (--user-data-dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser context on a review server, with its script errors collected."""

    def __init__(self, browser: Any, server: Review) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        # Statuses the browser logs as errors that a test expects (404: "no preview").
        self.expected = ["status of 404"]
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )
        self.page.on("dialog", lambda dialog: self.errors.append(f"dialog: {dialog.message}"))
        self.page.goto(server.url)
        self.page.wait_for_selector("#progress:not(:text('Listing…'))")

    def card(self, name: str) -> Any:
        return self.page.locator("article.card").filter(
            has=self.page.locator(".name", has_text=name)
        )

    def names(self) -> list[str]:
        names: list[str] = self.page.locator("article.card .name").all_inner_texts()
        return names

    def wait_until(self, predicate: Any, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, what
            self.page.wait_for_timeout(100)

    def filtered(self, **values: str) -> list[str]:
        for field, value in values.items():
            if field == "status":
                self.page.select_option("#status", value)
            else:
                self.page.fill(f"#{field}", value)
        self.page.wait_for_timeout(400)  # the text fields wait for typing to pause
        self.page.wait_for_selector("#progress:has-text('end of the listing')")
        return sorted(self.names())

    def close(self) -> None:
        faults = [e for e in self.errors if not any(x in e for x in self.expected)]
        self.context.close()
        assert faults == []


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    pages: list[Page] = []

    def opened(server: Review) -> Page:
        pages.append(Page(browser, server))
        return pages[-1]

    yield opened
    for page in pages:
        page.close()


def backfill(env: dict[str, str], target: str, *flags: str) -> None:
    done = run_cli(env, "backfill", target, *flags)
    assert done.returncode in (0, 1), done.stderr


def edit(env: dict[str, str], uri: str, *flags: str) -> None:
    done = run_cli(env, "edit", uri, *flags)
    assert done.returncode == 0, done.stderr


def test_the_page_lists_every_status_and_filters_by_status_folder_and_text(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    b = bucket.name
    for name, photo in (("f/a/one.jpg", "chelsea.jpg"), ("f/a/two.jpg", "coffee.jpg"),
                        ("f/a/person.jpg", "rocket.jpg")):  # fmt: skip
        upload(bucket, name, images.photo(photo))
    upload(bucket, "f/b/old-prompt.png", images.encode(images.solid((40, 30)), "PNG"), "image/png")
    upload(bucket, "f/b/broken.jpg", images.truncated_jpeg())
    backfill(stack_env, f"gs://{b}/f/a/")
    backfill({**stack_env, "CAPTION_PROMPT": "An older instruction."}, f"gs://{b}/f/b/old")
    backfill(stack_env, f"gs://{b}/f/b/broken")
    upload(bucket, "f/b/blocked.jpg", images.photo("chelsea.jpg"))
    gemini.add_fault("safety_prompt", count=1)
    backfill(stack_env, f"gs://{b}/f/b/blocked")
    upload(bucket, "f/b/new.jpg", images.photo("coffee.jpg"))
    upload(bucket, "f/notes.txt", b"not an image", "text/plain")
    edit(stack_env, f"gs://{b}/f/a/person.jpg", "--caption", "A red rocket, by hand", "--by", "ana")

    with review(stack_env, f"gs://{b}/f/") as server:
        page = open_page(server)
        everything = sorted(["f/a/one.jpg", "f/a/two.jpg", "f/a/person.jpg", "f/b/old-prompt.png",
                             "f/b/broken.jpg", "f/b/blocked.jpg", "f/b/new.jpg"])  # fmt: skip
        assert sorted(page.names()) == everything  # the text file is not an image
        person = page.card("f/a/person.jpg")
        assert "by ana (a person" in person.inner_text()
        assert "by a person" in person.locator(".badges").inner_text()
        assert page.page.locator("article.card img").count() >= 5  # thumbnails, lazily

        assert page.filtered(status="ok") == ["f/a/one.jpg", "f/a/person.jpg", "f/a/two.jpg",
                                              "f/b/old-prompt.png"]  # fmt: skip
        assert page.filtered(status="stale") == ["f/b/old-prompt.png"]
        assert page.filtered(status="human") == ["f/a/person.jpg"]
        assert page.filtered(status="blocked") == ["f/b/blocked.jpg"]
        assert page.filtered(status="error") == ["f/b/broken.jpg"]
        assert page.filtered(status="never") == ["f/b/new.jpg"]
        assert page.filtered(status="all", folder="b/") == [
            "f/b/blocked.jpg", "f/b/broken.jpg", "f/b/new.jpg", "f/b/old-prompt.png"
        ]  # fmt: skip
        assert page.filtered(folder="", text="RED ROCKET") == ["f/a/person.jpg"]
        assert page.filtered(text="stand-in caption", folder="a/") == ["f/a/one.jpg",
                                                                       "f/a/two.jpg"]  # fmt: skip
    # Looking wrote nothing.
    assert metadata(bucket, "f/b/new.jpg") == {}
    assert metadata(bucket, "f/a/person.jpg")["caption"] == "A red rocket, by hand"


def test_an_edit_typed_and_saved_with_the_keyboard_is_on_the_object_and_kept_by_backfill(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    upload(bucket, "k/1.jpg", images.photo("chelsea.jpg"), metadata={"sku": "A-1"})
    upload(bucket, "k/2.jpg", images.photo("coffee.jpg"), metadata={"sku": "A-2"})
    backfill(stack_env, f"gs://{bucket.name}/k/")
    before = metadata(bucket, "k/2.jpg")
    with review(stack_env, f"gs://{bucket.name}/k/", "--by", "ana@example.com") as server:
        page = open_page(server)
        keys = page.page.keyboard
        keys.press("j")  # the first card
        keys.press("j")  # the second
        keys.press("k")  # back to the first
        assert page.page.evaluate("document.activeElement.dataset.name") == "k/1.jpg"
        keys.press("j")
        keys.press("e")
        field = page.card("k/2.jpg").locator("textarea")
        field.fill("A flat white in a blue cup, on oak")
        page.card("k/2.jpg").locator("input[name=tags]").fill("coffee, cup ,oak")
        keys.press("Control+Enter")
        page.card("k/2.jpg").locator(".notice", has_text="Saved.").wait_for()
        shown = page.card("k/2.jpg").inner_text()
        assert "A flat white in a blue cup, on oak" in shown
        assert "by ana@example.com (a person" in shown

    meta = metadata(bucket, "k/2.jpg")
    assert meta["caption"] == "A flat white in a blue cup, on oak"
    assert meta["caption-tags"] == "coffee,cup,oak"
    assert meta["caption-alt"] == before["caption-alt"]  # not changed: kept
    assert meta["caption-source"] == "human"
    assert meta["caption-reviewed-by"] == "ana@example.com"
    assert meta["sku"] == "A-2"  # the owner's key
    assert metadata(bucket, "k/1.jpg") == {**metadata(bucket, "k/1.jpg"), "sku": "A-1"}
    assert "caption-source" not in metadata(bucket, "k/1.jpg")
    again = run_cli(stack_env, "backfill", f"gs://{bucket.name}/k/", "--overwrite")
    assert "1 human" in again.stderr
    assert metadata(bucket, "k/2.jpg")["caption"] == "A flat white in a blue cup, on oak"


def test_approve_protects_the_model_caption_as_it_stands(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    upload(bucket, "ap/cat.jpg", images.photo("chelsea.jpg"))
    backfill(stack_env, f"gs://{bucket.name}/ap/")
    before = metadata(bucket, "ap/cat.jpg")
    with review(stack_env, f"gs://{bucket.name}/ap/", "--by", "ana") as server:
        page = open_page(server)
        page.page.keyboard.press("j")
        page.page.keyboard.press("a")
        page.card("ap/cat.jpg").locator(".notice", has_text="Saved.").wait_for()
        assert "approved by ana" in page.card("ap/cat.jpg").inner_text()
        # Approved: no second approve button.
        assert page.card("ap/cat.jpg").locator("button.approve").count() == 0
    meta = metadata(bucket, "ap/cat.jpg")
    assert meta["caption"] == before["caption"]
    assert meta["caption-model"] == before["caption-model"]
    assert (meta["caption-source"], meta["caption-reviewed-by"]) == ("approved", "ana")
    stale = run_cli(
        {**stack_env, "CAPTION_PROMPT": "Something else."},
        "backfill", f"gs://{bucket.name}/ap/", "--if-stale",
    )  # fmt: skip
    assert "1 human" in stale.stderr
    assert metadata(bucket, "ap/cat.jpg")["caption"] == before["caption"]


def test_caption_again_shows_old_and_new_side_by_side_and_keeps_the_new(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    upload(bucket, "ag/cup.jpg", images.photo("coffee.jpg"))
    backfill(stack_env, f"gs://{bucket.name}/ag/")
    old = metadata(bucket, "ag/cup.jpg")
    answer = {"caption": "A cappuccino with latte art.", "alt_text": "Cappuccino",
              "tags": ["coffee", "latte art"]}  # fmt: skip
    with review(stack_env, f"gs://{bucket.name}/ag/", "--by", "ana") as server:
        page = open_page(server)
        card = page.card("ag/cup.jpg")
        card.locator("button.again").click()
        card.locator(".again-panel input[name=model]").fill("gemini-2.5-pro")
        card.locator(".again-panel textarea[name=prompt]").fill("Name the coffee drink.")
        gemini.add_fault("custom_text", text=json.dumps(answer), count=1)
        card.locator("button.run").click()
        card.locator(".side-by-side").wait_for()
        columns = card.locator(".side-by-side .column").all_inner_texts()
        assert old["caption"] in columns[0]
        assert "New (gemini-2.5-pro, your prompt)" in columns[1]
        assert "A cappuccino with latte art." in columns[1]
        assert metadata(bucket, "ag/cup.jpg") == old  # nothing written before keeping
        card.locator("button.keep-new").click()
        card.locator(".notice", has_text="Saved.").wait_for()
    meta = metadata(bucket, "ag/cup.jpg")
    assert meta["caption"] == "A cappuccino with latte art."
    assert (meta["caption-alt"], meta["caption-tags"]) == ("Cappuccino", "coffee,latte art")
    assert meta["caption-model"] == "gemini-2.5-pro"
    assert meta["caption-prompt"] == CaptionSpec("Name the coffee drink.").fingerprint
    assert (meta["caption-source"], meta["caption-reviewed-by"]) == ("approved", "ana")


@pytest.fixture
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    """fake-gcs-server behind the proxy that enforces ifMetagenerationMatch (a real 412)."""
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


def test_a_412_shows_what_changed_keeps_the_typed_text_and_overwrites_nothing(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any, proxy: GcsProxy
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    upload(bucket, "c/cat.jpg", images.photo("chelsea.jpg"))
    backfill(env, f"gs://{bucket.name}/c/")
    with review(env, f"gs://{bucket.name}/c/", "--by", "ana") as server:
        page = open_page(server)
        page.expected.append("status of 409")
        card = page.card("c/cat.jpg")
        card.locator("button.edit").click()
        card.locator("textarea").fill("Ana's words")
        # Meanwhile a colleague saves theirs (through the same enforcing proxy).
        edit(env, f"gs://{bucket.name}/c/cat.jpg", "--caption", "Bo's words", "--by", "bo")
        card.locator("button.save").click()
        notice = card.locator(".notice")
        notice.wait_for()
        assert "changed since you opened it" in notice.inner_text()
        assert "Bo's words" in notice.inner_text()  # the new state is shown
        assert card.locator("textarea").input_value() == "Ana's words"  # and hers is kept
        assert metadata(bucket, "c/cat.jpg")["caption"] == "Bo's words"  # not overwritten
        refused = [r for r in proxy.recorded("PATCH") if r.status == 412]
        assert refused == []  # stopped before any write: the page's state was already old
        # Asked again, she decides to replace it: now against the state she was shown.
        card.locator("button.save").click()
        card.locator(".notice", has_text="Saved.").wait_for()
    meta = metadata(bucket, "c/cat.jpg")
    assert (meta["caption"], meta["caption-reviewed-by"]) == ("Ana's words", "ana")


def test_a_412_from_storage_itself_is_shown_not_retried(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any, proxy: GcsProxy
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    upload(bucket, "r/cat.jpg", images.photo("chelsea.jpg"))
    backfill(env, f"gs://{bucket.name}/r/")
    with review(env, f"gs://{bucket.name}/r/", "--by", "ana") as server:
        page = open_page(server)
        page.expected.append("status of 409")
        card = page.card("r/cat.jpg")
        card.locator("button.edit").click()
        card.locator("textarea").fill("Ana's words")
        # The colleague's write lands between the server's read and its PATCH.
        proxy.before_next_patch(
            lambda: edit(env, f"gs://{bucket.name}/r/cat.jpg", "--caption", "Bo's", "--by", "bo")
        )
        card.locator("button.save").click()
        card.locator(".notice", has_text="changed since you opened it").wait_for()
        assert "Bo's" in card.locator(".notice").inner_text()
    # The backfill's write, Bo's, and the page's: refused once and not sent again.
    assert sorted(r.status for r in proxy.recorded("PATCH")) == [200, 200, 412]
    assert metadata(bucket, "r/cat.jpg")["caption"] == "Bo's"


def test_an_object_named_like_markup_is_shown_as_text_and_runs_nothing(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    name = 'x/<img src=x onerror="window.pwned=1">.jpg'
    upload(bucket, name, images.photo("rocket.jpg"))
    backfill(stack_env, f"gs://{bucket.name}/x/")
    caption = "<script>window.pwned=2</script><b>bold</b>"
    edit(stack_env, f"gs://{bucket.name}/{name}", "--caption", caption, "--tags", "<i>t</i>")
    with review(stack_env, f"gs://{bucket.name}/x/", "--by", '<img src=y onerror="pwned=3">') as s:
        page = open_page(s)
        text = page.page.locator("#grid").inner_text()
        assert name in text
        assert caption in text
        assert "<i>t</i>" in text
        assert page.page.evaluate("window.pwned") is None
        assert page.page.locator("#grid img[src='x'], #grid script, #grid b, #grid i").count() == 0
        # Edited in the page, saved, shown again: still text.
        card = page.card("onerror")
        card.locator("button.edit").click()
        card.locator("textarea").fill('"><svg onload="window.pwned=4">')
        card.locator("button.save").click()
        card.locator(".notice", has_text="Saved.").wait_for()
        assert '"><svg onload="window.pwned=4">' in card.inner_text()
        assert page.page.evaluate("window.pwned") is None
        assert page.page.locator("#grid svg").count() == 0
    meta = metadata(bucket, name)
    assert meta["caption"] == '"><svg onload="window.pwned=4">'
    assert meta["caption-reviewed-by"] == '<img src=y onerror="pwned=3">'


def test_a_prefix_of_thousands_opens_on_one_listing_call_and_pages_as_it_scrolls(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any, proxy: GcsProxy
) -> None:
    count = 2600
    png = images.encode(images.solid((24, 16)), "PNG")
    names = [f"many/{i:05}.png" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: upload(bucket, n, png, "image/png"), names))
    # The last one carries a caption a person wrote: found by text, far down the listing.
    edit(stack_env, f"gs://{bucket.name}/{names[-1]}", "--caption", "The needle", "--by", "ana")
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}  # to count the listing calls

    def listing_calls() -> int:
        return sum(
            1
            for r in proxy.recorded("GET")
            if r.path.endswith("/o") and r.query.get("maxResults") == "1000"
            and "delimiter" not in r.query
        )  # fmt: skip

    with review(env, f"gs://{bucket.name}/many/") as server:
        started = time.monotonic()
        page = open_page(server)
        assert time.monotonic() - started < 10
        assert len(page.names()) == 48  # one page of cards, not the whole prefix
        assert "48 objects listed" in page.page.inner_text("#progress")
        assert listing_calls() == 1
        page.page.locator("#more").scroll_into_view_if_needed()
        page.wait_until(lambda: len(page.names()) >= 96, "the next page on scrolling")
        assert page.names()[:96] == names[:96]  # in listing order, none twice
        assert listing_calls() == 1  # the second page of cards came from the same one
        assert page.filtered(text="needle") == [names[-1]]
        progress = page.page.inner_text("#progress")
        assert f"{count} objects listed" in progress
        # Then the rest of the prefix, a thousand at a time (the first page was kept).
        assert listing_calls() == 3
        card = page.card(names[-1])
        card.locator("button.edit").click()
        card.locator("textarea").fill("The needle, found")
        card.locator("button.save").click()
        card.locator(".notice", has_text="Saved.").wait_for()
    assert metadata(bucket, names[-1])["caption"] == "The needle, found"
    assert metadata(bucket, names[0]) == {}


def test_read_only_shows_no_way_to_write_and_a_forged_write_from_the_page_is_refused(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any
) -> None:
    upload(bucket, "ro/cat.jpg", images.photo("chelsea.jpg"))
    backfill(stack_env, f"gs://{bucket.name}/ro/")
    before = metadata(bucket, "ro/cat.jpg")
    with review(stack_env, f"gs://{bucket.name}/ro/", "--read-only") as server:
        page = open_page(server)
        card = page.card("ro/cat.jpg")
        assert card.locator("button").count() == 0
        page.page.keyboard.press("j")
        page.page.keyboard.press("e")
        page.page.keyboard.press("a")
        assert card.locator("textarea").count() == 0
        status = page.page.evaluate(
            """async () => {
                const csrf = document.querySelector('meta[name="captioner-csrf"]').content;
                const r = await fetch('/api/save', {method: 'POST', headers: {
                    'Content-Type': 'application/json', 'X-Captioner-CSRF': csrf},
                    body: JSON.stringify({name: 'ro/cat.jpg', generation: '1',
                                          metageneration: '1', approve: true})});
                return r.status;
            }"""
        )
        assert status == 403
        page.expected.append("status of 403")
    assert metadata(bucket, "ro/cat.jpg") == before


def test_screenshot_of_the_review_page_shows_thumbnails_and_captions(
    stack_env: dict[str, str], gemini: Any, bucket: Any, open_page: Any, tmp_path: Path
) -> None:
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"):
        upload(bucket, f"shot/{name}", images.photo(name))
    backfill(stack_env, f"gs://{bucket.name}/shot/")
    edit(stack_env, f"gs://{bucket.name}/shot/rocket.jpg", "--caption",
         "A rocket lifting off at dusk", "--tags", "rocket,launch", "--by", "ana")  # fmt: skip
    with review(stack_env, f"gs://{bucket.name}/shot/", "--by", "ana") as server:
        page = open_page(server)
        page.page.set_viewport_size({"width": 1200, "height": 760})
        # (Polled from here: the page's policy refuses the eval wait_for_function uses.)
        drawn = "[...document.querySelectorAll('#grid img')].every(i => i.naturalWidth)"
        page.wait_until(lambda: page.page.evaluate(drawn), "every thumbnail drawn")
        page.page.keyboard.press("j")
        shot = tmp_path / "review.png"
        page.page.screenshot(path=str(shot))
        bare = tmp_path / "bare.png"
        page.page.evaluate(
            "document.querySelectorAll('#grid img').forEach(i => i.style.visibility = 'hidden')"
        )
        page.page.screenshot(path=str(bare))
    picture = Image.open(shot).convert("RGB")
    assert picture.size == (1200, 760)
    assert colours(picture) > 10 * colours(Image.open(bare).convert("RGB"))
    assert shot.stat().st_size < 1_000_000
    if os.environ.get("CAPTIONER_UPDATE_SCREENSHOT"):  # README's picture: make it again
        shutil.copyfile(shot, SCREENSHOT)


def test_the_thumbnails_come_from_the_app_and_nothing_else_is_fetched(
    stack_env: dict[str, str], gemini: Any, bucket: Any, browser: Any
) -> None:
    upload(bucket, "net/cat.jpg", images.photo("chelsea.jpg"))
    with review(stack_env, f"gs://{bucket.name}/net/") as server:
        context = browser.new_context()
        page = context.new_page()
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url))
        page.goto(server.url)
        deadline = time.monotonic() + 20
        while not page.evaluate("!!document.querySelector('#grid img')?.complete"):
            assert time.monotonic() < deadline
            page.wait_for_timeout(100)
        context.close()
        assert requests.get(server.base + "/thumb", timeout=5).status_code == 403  # no token
    assert fetched
    assert all(url.startswith(server.base + "/") for url in fetched), fetched
    assert any(url.startswith(server.base + "/thumb?") for url in fetched)
    # The bucket was never made public: no URL of the storage emulator reached the page.
    assert not any(stack_env["STORAGE_EMULATOR_HOST"] in url for url in fetched)

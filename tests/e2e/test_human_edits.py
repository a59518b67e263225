"""A person's caption wins, through every edge: `captioner edit`, backfill (--overwrite,
--if-stale), the upload function, the HTTP function and batch apply; only
--include-human (``"include_human": true``) replaces it, and a new upload is a new image."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests import images
from tests.e2e.test_batch_backfill import submit_json, wait_for_jobs
from tests.e2e.test_cli import run_cli
from tests.gcs_proxy import GcsProxy
from tests.objects import metadata, upload

ALLOWED = f"human-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    """fake-gcs-server behind the proxy that enforces the preconditions (a real 412)."""
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


def captioned(env: dict[str, str], bucket: Any, *names: str, photo: str = "chelsea.jpg") -> None:
    for name in names:
        upload(bucket, name, images.photo(photo), metadata={"sku": name})
    folder = names[0].rpartition("/")[0]
    done = run_cli(env, "backfill", f"gs://{bucket.name}/{folder}/")
    assert done.returncode == 0, done.stderr


def edit(env: dict[str, str], uri: str, *flags: str) -> Any:
    return run_cli(env, "edit", uri, *flags)


# ------------------------------------------------------------ captioner edit


def test_edit_writes_a_persons_words_under_both_preconditions_and_keeps_the_owners_keys(
    stack_env: dict[str, str], gemini: Any, bucket: Any, proxy: GcsProxy
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    captioned(env, bucket, "e/cat.jpg")
    model = metadata(bucket, "e/cat.jpg")
    done = edit(env, f"gs://{bucket.name}/e/cat.jpg", "--caption", "Miso asleep\non the sofa",
                "--by", "ana@example.com")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "by:      ana@example.com (a person" in done.stdout
    meta = metadata(bucket, "e/cat.jpg")
    assert meta["caption"] == "Miso asleep on the sofa"  # one line, as every caption
    assert (meta["caption-source"], meta["caption-reviewed-by"]) == ("human", "ana@example.com")
    assert meta["caption-reviewed"].endswith("Z")
    assert meta["caption-alt"] == model["caption-alt"]  # not given: kept
    assert meta["caption-model"] == model["caption-model"]  # the caption it started from
    assert meta["sku"] == "e/cat.jpg"
    last = proxy.recorded("PATCH")[-1]
    blob = bucket.get_blob("e/cat.jpg")
    assert last.query["ifGenerationMatch"] == str(blob.generation)
    assert last.query["ifMetagenerationMatch"] == "2"  # the one read: after the backfill's
    assert gemini.calls == 1  # the backfill's; an edit asks no model


def test_edit_alt_and_tags_keeps_the_caption_and_an_empty_value_removes_one(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    captioned(stack_env, bucket, "t/cat.jpg")
    caption = metadata(bucket, "t/cat.jpg")["caption"]
    done = edit(stack_env, f"gs://{bucket.name}/t/cat.jpg", "--alt", "", "--tags",
                "cat, tabby ,, whiskers", "--by", "ana", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["saved"] is True
    assert (shown["written_by"], shown["review"], shown["reviewed_by"]) == ("person", "edited",
                                                                            "ana")  # fmt: skip
    meta = metadata(bucket, "t/cat.jpg")
    assert meta["caption"] == caption
    assert meta["caption-tags"] == "cat,tabby,whiskers"
    assert not meta.get("caption-alt")


def test_edit_approve_protects_the_model_caption_as_it_stands(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    captioned(stack_env, bucket, "a/cat.jpg")
    before = metadata(bucket, "a/cat.jpg")
    done = edit(stack_env, f"gs://{bucket.name}/a/cat.jpg", "--approve", "--by", "ana")
    assert done.returncode == 0, done.stderr
    assert "gemini-2.5-flash (model), approved by ana" in done.stdout
    meta = metadata(bucket, "a/cat.jpg")
    assert {k: meta[k] for k in ("caption", "caption-alt", "caption-tags", "caption-model")} == {
        k: before[k] for k in ("caption", "caption-alt", "caption-tags", "caption-model")
    }
    assert meta["caption-source"] == "approved"


def test_who_reviews_is_the_login_name_when_no_by_is_given_against_an_emulator(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    captioned(stack_env, bucket, "w/cat.jpg")
    done = edit({**stack_env, "USER": "tester", "LOGNAME": "tester"},
                f"gs://{bucket.name}/w/cat.jpg", "--caption", "Mine")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert metadata(bucket, "w/cat.jpg")["caption-reviewed-by"] == "tester"


def test_an_edit_that_does_not_fit_the_8_kib_budget_is_refused_whole(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload(bucket, "big/cat.jpg", images.photo(), metadata={"notes": "n" * 7000})
    done = edit(stack_env, f"gs://{bucket.name}/big/cat.jpg", "--caption", "word " * 400,
                "--by", "ana")  # fmt: skip
    assert done.returncode == 2
    assert "shorten them" in done.stderr
    assert metadata(bucket, "big/cat.jpg") == {"notes": "n" * 7000}


def test_an_edit_of_an_object_changed_meanwhile_exits_1_shows_it_and_writes_nothing(
    stack_env: dict[str, str], gemini: Any, bucket: Any, proxy: GcsProxy
) -> None:
    env = {**stack_env, "STORAGE_EMULATOR_HOST": proxy.url}
    captioned(env, bucket, "m/cat.jpg")
    url = f"{proxy.url}/storage/v1/b/{bucket.name}/o/{quote('m/cat.jpg', safe='')}"

    def colleague() -> None:
        requests.patch(url, json={"metadata": {"caption": "Bo's words"}}, timeout=10)

    proxy.before_next_patch(colleague)
    done = edit(env, f"gs://{bucket.name}/m/cat.jpg", "--caption", "Ana's words", "--by", "ana")
    assert done.returncode == 1
    assert "changed by someone else" in done.stderr
    assert "Bo's words" in done.stdout  # what it holds now
    assert metadata(bucket, "m/cat.jpg")["caption"] == "Bo's words"
    assert [r.status for r in proxy.recorded("PATCH")].count(412) == 1  # not tried again


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("missing.jpg", ("--caption", "x"), "no such object"),
        ("owner.jpg", ("--caption", "x"), "owner already uses the key 'caption'"),
        ("notes.txt", ("--caption", "x"), "not an image"),
        ("fresh.jpg", ("--alt", "x"), "has no caption yet"),
        ("fresh.jpg", (), "give a new caption"),
        ("fresh.jpg", ("--approve",), "no caption of this upload"),
        ("fresh.jpg", ("--approve", "--caption", "x"), "not both"),
        ("", ("--caption", "x"), "must name a bucket and an object"),
        ("gs://no-such-bucket-here/x.jpg", ("--caption", "x"), "no such bucket"),
    ],
)
def test_edit_mistakes_exit_2_with_one_line_and_write_nothing(
    stack_env: dict[str, str], bucket: Any, name: str, flags: tuple[str, ...], message: str
) -> None:
    upload(bucket, "owner.jpg", images.photo(), metadata={"caption": "the owner's"})
    upload(bucket, "notes.txt", b"hello", "text/plain")
    upload(bucket, "fresh.jpg", images.photo())
    uri = name if name.startswith("gs://") else f"gs://{bucket.name}/{name}"
    done = edit(stack_env, uri, *flags, "--by", "ana")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert metadata(bucket, "owner.jpg") == {"caption": "the owner's"}
    assert metadata(bucket, "fresh.jpg") == {}


# ------------------------------------------------------------ backfill


def test_backfill_overwrite_and_if_stale_keep_a_persons_caption_and_count_it_human(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    names = [f"b/{i}.jpg" for i in range(3)]
    captioned(stack_env, bucket, *names)
    assert edit(stack_env, f"gs://{bucket.name}/b/0.jpg", "--caption", "Ana's", "--by",
                "ana").returncode == 0  # fmt: skip
    assert edit(stack_env, f"gs://{bucket.name}/b/1.jpg", "--approve", "--by", "bo").returncode == 0
    kept = {n: metadata(bucket, n) for n in names[:2]}
    target = f"gs://{bucket.name}/b/"

    overwrite = run_cli(stack_env, "backfill", target, "--overwrite", "--json")
    assert overwrite.returncode == 0, overwrite.stderr
    totals = json.loads(overwrite.stdout.splitlines()[-1])["totals"]
    assert (totals["ok"], totals["skipped_by_reason"]) == (1, {"human": 2})
    other_prompt = {**stack_env, "CAPTION_PROMPT": "Say it differently."}
    stale = run_cli(other_prompt, "backfill", target, "--if-stale")
    assert "done 1, skipped 2 (2 human)" in stale.stderr  # the model's own, stale: again
    rules = json.dumps([{"name": "b", "prefix": "b/", "prompt": "A rule's own prompt."}])
    rule_change = run_cli({**stack_env, "CAPTION_RULES": rules}, "backfill", target, "--if-stale")
    assert "done 1, skipped 2 (2 human)" in rule_change.stderr  # a new rule for the folder
    plain = run_cli(stack_env, "backfill", target)
    assert "2 human" in plain.stderr
    assert {n: metadata(bucket, n) for n in names[:2]} == kept

    alone = run_cli(stack_env, "backfill", target, "--include-human")
    assert alone.returncode == 2
    assert "--overwrite or --if-stale" in alone.stderr
    replaced = run_cli(stack_env, "backfill", target, "--overwrite", "--include-human")
    assert "done 3, skipped 0" in replaced.stderr
    for name in names[:2]:
        meta = metadata(bucket, name)
        assert meta["caption"].startswith("Offline stand-in caption")
        assert not meta.get("caption-source")  # the model's word again: no person's mark
        assert not meta.get("caption-reviewed-by")
        assert meta["sku"] == name


# ------------------------------------------------------------ the upload function


@pytest.fixture(scope="module")
def upload_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


def object_resource(gcs: Any, bucket: str, name: str) -> dict[str, Any]:
    url = f"{gcs.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
    data: dict[str, Any] = requests.get(url, timeout=10).json()
    return data


def test_an_upload_event_keeps_a_persons_caption_and_a_new_upload_is_captioned_again(
    gcs: Any, stack_env: dict[str, str], bucket: Any, gemini: Any, upload_function: FunctionServer
) -> None:
    captioned(stack_env, bucket, "u/cat.jpg")
    assert edit(stack_env, f"gs://{bucket.name}/u/cat.jpg", "--caption", "Ana's", "--by",
                "ana").returncode == 0  # fmt: skip
    calls = gemini.calls
    event = object_resource(gcs, bucket.name, "u/cat.jpg")
    delivered = requests.post(upload_function.url, timeout=60,
                              headers=(sent := binary_event(event))[0], data=sent[1])  # fmt: skip
    assert delivered.status_code == 200
    assert metadata(bucket, "u/cat.jpg")["caption"] == "Ana's"
    assert gemini.calls == calls
    logged = [json.loads(x) for x in upload_function.log_text().splitlines() if x.startswith("{")]
    assert any(line.get("reason") == "human" for line in logged), logged[-3:]

    # A new upload that even carries the old keys along (a copy with its metadata) is a
    # new image: the person spoke of the old one.
    replaced = upload(bucket, "u/cat.jpg", images.photo("coffee.jpg"),
                      metadata=metadata(bucket, "u/cat.jpg"))  # fmt: skip
    event = object_resource(gcs, bucket.name, "u/cat.jpg")
    headers, body = binary_event(event)
    assert requests.post(upload_function.url, headers=headers, data=body, timeout=60).ok
    meta = metadata(bucket, "u/cat.jpg")
    assert meta["caption-generation"] == str(replaced.generation)
    assert "600x400" in meta["caption"]
    assert not meta.get("caption-source")


# ------------------------------------------------------------ the HTTP function


@pytest.fixture(scope="module")
def allowed_bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(ALLOWED)


@pytest.fixture(scope="module")
def http_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "test-key",
        "CAPTION_ALLOWED_BUCKETS": ALLOWED,
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def post(server: FunctionServer, body: Any) -> requests.Response:
    return requests.post(server.url, json=body, timeout=60)


def test_http_objects_and_prefix_with_overwrite_keep_it_unless_include_human(
    stack_env: dict[str, str], http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    captioned(stack_env, allowed_bucket, "h/a.jpg", "h/b.jpg")
    assert edit(stack_env, f"gs://{ALLOWED}/h/a.jpg", "--caption", "Ana's", "--by",
                "ana").returncode == 0  # fmt: skip
    uri = f"gs://{ALLOWED}/h/a.jpg"

    named = post(http_function, {"objects": [uri], "overwrite": True})
    assert named.status_code == 200, named.text
    (result,) = named.json()["results"]
    assert (result["status"], result["reason"]) == ("skipped", "human")
    prefix = post(http_function, {"bucket": ALLOWED, "prefix": "h/", "overwrite": True})
    assert prefix.json()["totals"]["skipped_by_reason"] == {"human": 1}
    stale = post(http_function, {"bucket": ALLOWED, "prefix": "h/", "if_stale": True})
    assert stale.json()["totals"]["skipped_by_reason"] == {"human": 1, "already-captioned": 1}
    assert metadata(allowed_bucket, "h/a.jpg")["caption"] == "Ana's"

    alone = post(http_function, {"objects": [uri], "include_human": True})
    assert alone.status_code == 400
    assert "'overwrite'" in alone.json()["error"]["message"]
    wrong = post(http_function, {"bucket": ALLOWED, "overwrite": True, "include_human": "yes"})
    assert wrong.status_code == 400
    assert "'include_human' must be true or false" in wrong.json()["error"]["message"]

    # A batch submit's dry run counts the same way (it reads the bucket only).
    submit = {"batch": "submit", "bucket": ALLOWED, "prefix": "h/", "overwrite": True,
              "dry_run": True}  # fmt: skip
    planned = post(http_function, submit).json()
    assert (planned["images"], planned["skipped_by_reason"]) == (1, {"human": 1})
    assert post(http_function, {**submit, "include_human": True}).json()["images"] == 2
    alone = post(http_function, {**submit, "overwrite": False, "include_human": True})
    assert alone.status_code == 400

    forced = post(http_function, {"objects": [uri], "overwrite": True, "include_human": True})
    assert forced.json()["results"][0]["status"] == "ok"
    meta = metadata(allowed_bucket, "h/a.jpg")
    assert meta["caption"].startswith("Offline stand-in caption")
    assert not meta.get("caption-source")


# ------------------------------------------------------------ batch apply


@pytest.mark.slow
def test_batch_submit_and_apply_keep_a_persons_caption_unless_include_human(
    vertex_env: dict[str, str], stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    names = [f"v/{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        upload(bucket, name, images.encode(images.solid((40 + i, 30)), "PNG"), "image/png")
    target = f"gs://{bucket.name}/v/"
    assert run_cli(stack_env, "backfill", target).returncode == 0
    assert edit(stack_env, f"gs://{bucket.name}/v/0.png", "--caption", "Ana's", "--by",
                "ana").returncode == 0  # fmt: skip
    for name in names[1:]:  # the model's words, but not those the next answer repeats
        blob = bucket.get_blob(name)
        blob.metadata = {"caption": "words from before"}
        blob.patch()
    time.sleep(1.1)  # a caption made in the second the run is stamped counts as newer

    report = submit_json(vertex_env, target, "--overwrite")
    assert report["images"] == 2  # the person's caption is not even asked about
    assert report["skipped_by_reason"] == {"human": 1}
    # Between submit and apply a person approves one of the two asked about.
    assert edit(stack_env, f"gs://{bucket.name}/v/1.png", "--approve", "--by", "bo").returncode == 0
    approved = metadata(bucket, "v/1.png")
    wait_for_jobs(vertex_env, target)
    applied = run_cli(vertex_env, "batch", "apply", target, "--run", report["run"])
    assert applied.returncode == 0, applied.stderr
    assert "done 1, skipped 1 (1 human)" in applied.stderr
    assert metadata(bucket, "v/0.png")["caption"] == "Ana's"
    assert metadata(bucket, "v/1.png") == approved

    alone = run_cli(vertex_env, "batch", "submit", target, "--include-human")
    assert alone.returncode == 2
    time.sleep(1.1)
    forced = submit_json(vertex_env, target, "--overwrite", "--include-human")
    assert forced["images"] == 3
    wait_for_jobs(vertex_env, target)
    again = run_cli(vertex_env, "batch", "apply", target, "--run", forced["run"])
    # The two people's captions replaced; the third already says this very answer.
    assert "done 2, skipped 1 (1 already-captioned)" in again.stderr, again.stderr
    for name in names:
        meta = metadata(bucket, name)
        assert meta["caption"].startswith("Offline stand-in caption"), name
        assert not meta.get("caption-source")


# ------------------------------------------------------------ show and export


def test_show_and_every_export_format_say_who_wrote_each_caption(
    stack_env: dict[str, str], gemini: Any, bucket: Any, tmp_path: Any
) -> None:
    import csv

    captioned(stack_env, bucket, "s/model.jpg", "s/person.jpg", "s/approved.jpg")
    uri = f"gs://{bucket.name}/s/"
    assert edit(stack_env, uri + "person.jpg", "--caption", "Ana's", "--by", "ana").returncode == 0
    assert edit(stack_env, uri + "approved.jpg", "--approve", "--by", "bo").returncode == 0

    shown = run_cli(stack_env, "show", uri + "model.jpg", uri + "person.jpg", uri + "approved.jpg")
    assert shown.returncode == 0, shown.stderr
    assert "by:      gemini-2.5-flash (model)\n" in shown.stdout
    assert "by:      ana (a person, 20" in shown.stdout
    assert "by:      gemini-2.5-flash (model), approved by bo (20" in shown.stdout

    rows = {
        r["source"].rsplit("/", 1)[1]: r
        for r in map(json.loads, run_cli(stack_env, "export", uri).stdout.splitlines())
    }
    model, person, approved = rows["model.jpg"], rows["person.jpg"], rows["approved.jpg"]
    assert (model["written_by"], model["review"], model["reviewed_by"]) == ("captioner", None, None)
    assert (person["written_by"], person["review"], person["reviewed_by"]) == ("person", "edited",
                                                                               "ana")  # fmt: skip
    assert (approved["written_by"], approved["review"], approved["reviewed_by"]) == (
        "captioner", "approved", "bo"
    )  # fmt: skip
    out, page = tmp_path / "c.csv", tmp_path / "p.html"
    both = run_cli(stack_env, "export", uri, "--format", "csv", "-o", str(out), "--html", str(page))
    assert both.returncode == 0, both.stderr
    with out.open(newline="", encoding="utf-8") as handle:
        table = {r["source"].rsplit("/", 1)[1]: r for r in csv.DictReader(handle)}
    assert table["person.jpg"]["written_by"] == "person"
    assert table["person.jpg"]["reviewed_by"] == "ana"
    assert table["approved.jpg"]["review"] == "approved"
    assert table["model.jpg"]["review"] == ""
    html = page.read_text()
    assert "by gemini-2.5-flash (model)</div>" in html
    assert "by ana (a person, 20" in html
    assert "approved by bo (20" in html

"""Never a surprise bill, at the edges a user calls: dollars in dry runs and summaries,
``--max-cost`` and ``"max_cost"``, and a daily budget drawn by two upload-function
instances and a CLI backfill together from one ledger in the bucket. The stand-in counts
every Gemini call's tokens; what was spent is priced from them, not from what captioner
says it spent."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from captioner.pricing import PriceBook
from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests.e2e.test_batch_backfill import png, upload_many
from tests.e2e.test_cli import run_cli
from tests.e2e.test_upload_function import deliver, resource
from tests.gcs_proxy import GcsProxy
from tests.objects import metadata

pytestmark = pytest.mark.slow
PRICE = PriceBook().price("gemini-2.5-flash", "standard")
assert PRICE is not None


def spent(gemini: Any) -> float:
    """Dollars of every answered call, from the stand-in's own token counts."""
    return sum(
        (r.prompt_tokens * PRICE.input + (r.output_tokens + r.thoughts_tokens) * PRICE.output) / 1e6
        for r in gemini.requests
        if r.status == 200
    )


def captioned(bucket: Any, prefix: str) -> int:
    return sum(
        (b.metadata or {}).get("caption-status") == "ok" for b in bucket.list_blobs(prefix=prefix)
    )


def test_dry_runs_say_what_a_run_would_cost_and_a_run_what_it_cost(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"d/{i}.png" for i in range(5)])
    target = f"gs://{bucket.name}/d/"
    dry = run_cli(stack_env, "backfill", target, "--dry-run")
    assert "estimated cost: $0.00" in dry.stderr
    assert "at list prices (gemini-2.5-flash, standard tier)" in dry.stderr
    flex = run_cli(stack_env, "backfill", target, "--dry-run", "--tier", "flex", "--json")
    totals = json.loads(flex.stdout.splitlines()[-1])["totals"]
    standard = json.loads(run_cli(stack_env, "backfill", target, "--dry-run", "--json")
                          .stdout.splitlines()[-1])["totals"]  # fmt: skip
    half = standard["estimated_cost_usd"] / 2  # both rounded to a millionth of a dollar
    assert totals["estimated_cost_usd"] == pytest.approx(half, abs=1e-6)
    done = run_cli(stack_env, "backfill", target)
    assert done.returncode == 0, done.stderr
    assert "cost: $0.00" in done.stderr
    reported = json.loads(
        run_cli(stack_env, "backfill", target, "--overwrite", "--json").stdout.splitlines()[-1]
    )["totals"]["cost_usd"]
    assert reported == pytest.approx(spent(gemini) / 2, rel=0.05)  # the second of two runs
    unknown = run_cli(
        stack_env, "backfill", target, "--dry-run", "--overwrite", "--model", "my-tuned-model"
    )
    assert "estimated cost: unknown (no price is known for model 'my-tuned-model'" in unknown.stderr


def test_max_cost_stops_starting_images_before_the_cap_and_a_second_run_goes_on(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"c/{i:02}.png" for i in range(12)])
    target = f"gs://{bucket.name}/c/"
    capped = run_cli(stack_env, "backfill", target, "--max-cost", "0.001")
    assert capped.returncode == 3, capped.stderr
    assert "stopped: stopped at the cost cap of $0.0010" in capped.stderr
    first = captioned(bucket, "c/")
    assert 0 < first < 12
    assert spent(gemini) <= 0.001
    rest = run_cli(stack_env, "backfill", target)
    assert rest.returncode == 0, rest.stderr
    assert f"done {12 - first}," in rest.stderr
    assert captioned(bucket, "c/") == 12


def test_max_cost_on_describe_and_its_bad_values(
    stack_env: dict[str, str], gemini: Any, tmp_path: Any
) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.png").write_bytes(png(i))
    capped = run_cli(stack_env, "describe", str(folder), "--max-cost", "$0.0005")
    assert capped.returncode == 3, capped.stderr
    assert spent(gemini) <= 0.0005
    for bad in ("0", "-1", "ten", "nan", "inf"):
        done = run_cli(stack_env, "describe", str(folder), f"--max-cost={bad}")
        assert done.returncode == 2, bad
        assert "--max-cost" in done.stderr
    unknown = run_cli(stack_env, "describe", str(folder), "--max-cost", "1", "--model", "x-model")
    assert unknown.returncode == 2
    assert "a cost cap needs a price" in unknown.stderr
    assert "CAPTION_PRICES" in unknown.stderr


ALLOWED = f"spend-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def allowed_bucket(gcs_client: Any) -> Any:
    return gcs_client.create_bucket(ALLOWED)


@pytest.fixture(scope="module")
def http_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "k",
        "CAPTION_ALLOWED_BUCKETS": ALLOWED,
    }
    with FunctionServer("caption_http", env=env, signature_type="http") as server:
        yield server


def test_http_max_cost_and_dry_run_dollars(
    http_function: FunctionServer, allowed_bucket: Any, gemini: Any
) -> None:
    upload_many(allowed_bucket, [f"h/{i:02}.png" for i in range(10)])
    body = {"bucket": ALLOWED, "prefix": "h/"}
    dry = requests.post(http_function.url, json={**body, "dry_run": True}, timeout=60).json()
    assert dry["totals"]["estimated_cost_usd"] > 0
    answer = requests.post(http_function.url, json={**body, "max_cost": 0.0008}, timeout=60)
    assert answer.status_code == 200, answer.text
    totals = answer.json()["totals"]
    assert "stopped at the cost cap of $0.0008" in totals["stopped"]
    assert 0 < totals["cost_usd"] <= 0.0008
    assert spent(gemini) <= 0.0008
    for bad in (0, -1, "ten", None, True):
        refused = requests.post(http_function.url, json={**body, "max_cost": bad}, timeout=60)
        if bad is None:
            continue  # null is "no cap"
        assert refused.status_code == 400, bad
        assert "'max_cost' must be a number of US dollars above 0" in refused.text


# ---------------------------------------------------------------- the daily budget

BUDGET = 0.002  # a block is a fiftieth: $0.00004, about a fifth of a caption here


@pytest.fixture
def ledger_proxy(gcs: Any) -> Iterator[GcsProxy]:
    """Cloud Storage as the ledger needs it: ifGenerationMatch enforced on uploads."""
    proxy = GcsProxy(gcs.url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def budget_env(proxy: GcsProxy, gemini_thread: Any) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": proxy.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "k",
        "CAPTION_DAILY_BUDGET_USD": str(BUDGET),
        "CAPTION_LOG_FORMAT": "json",
    }


def test_two_instances_and_a_cli_run_stop_within_a_block_each_of_the_daily_budget(
    ledger_proxy: GcsProxy, gemini_thread: Any, gemini: Any, gcs: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"u/{i:03}.png" for i in range(60)] + [f"b/{i:03}.png" for i in range(30)])
    env = budget_env(ledger_proxy, gemini_thread)
    kind = {"signature_type": "cloudevent"}
    with (
        FunctionServer("caption_on_upload", env=env, **kind) as one,
        FunctionServer("caption_on_upload", env=env, **kind) as two,
    ):
        events = [binary_event(resource(gcs, bucket.name, f"u/{i:03}.png")) for i in range(60)]
        with ThreadPoolExecutor(8) as pool:
            cli = pool.submit(run_cli, env, "backfill", f"gs://{bucket.name}/b/")
            answers = list(pool.map(
                lambda e: deliver(one if hash(e[1]) % 2 else two, *e), events
            ))  # fmt: skip
            backfill = cli.result()
        logs = one.log_text() + two.log_text()
    assert {a.status_code for a in answers} == {200}  # acknowledged: no redelivery storm
    assert backfill.returncode == 3, backfill.stderr
    assert "daily budget of $0.0020" in backfill.stderr
    cost = spent(gemini)
    block = BUDGET / 50
    assert cost <= BUDGET + 1e-9
    assert cost >= BUDGET - 3 * block - 0.0003  # within a block each (and a caption's cost)
    left = [i for i in range(60) if "caption-status" not in metadata(bucket, f"u/{i:03}.png")]
    assert left, "the budget ran out before the uploads did"
    assert logs.count('"reason": "budget-exhausted"') >= len(left)
    (ledger,) = list(bucket.list_blobs(prefix="captioner-budget/"))
    assert json.loads(ledger.download_as_bytes())["reserved_usd"] <= BUDGET + 1e-9
    writes = [r for r in ledger_proxy.recorded("POST") if "captioner-budget" in str(r.query)]
    assert len(writes) < 90  # blocks, not a write per image


@pytest.mark.parametrize("fault", ["corrupted", "deleted"])
def test_a_ledger_corrupted_or_deleted_fails_safe_as_spent(
    fault: str, ledger_proxy: GcsProxy, gemini_thread: Any, gemini: Any, gcs: Any, bucket: Any
) -> None:
    upload_many(bucket, [f"f/{i}.png" for i in range(3)])
    env = budget_env(ledger_proxy, gemini_thread)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        first = deliver(server, *binary_event(resource(gcs, bucket.name, "f/0.png")))
        assert first.status_code == 200
        assert metadata(bucket, "f/0.png")["caption-status"] == "ok"
        ledger = bucket.blob(f"captioner-budget/{day}.json")
        if fault == "corrupted":
            ledger.upload_from_string("{torn")
        else:
            ledger.delete()
        # Spend this instance's block, so the next image needs the ledger again.
        calls = gemini.calls
        for name in ("f/1.png", "f/2.png"):
            answer = deliver(server, *binary_event(resource(gcs, bucket.name, name)))
            assert answer.status_code == 200
        logs = server.log_text()
    assert "caption-status" not in metadata(bucket, "f/2.png")
    assert gemini.calls <= calls + 1
    assert "budget-ledger-fault" in logs
    assert "taken as spent" in logs


# ---------------------------------------------------------------- the flex tier


def test_a_backfill_on_flex_asks_for_flex_waits_out_shed_calls_and_pays_half(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    """The Gemini API takes service_tier in the body; the stand-in answers flex calls
    slower and sheds some with 503 (captioner_dev/gemini_server/flex.py): each image is
    captioned in the end, at half the standard price."""
    upload_many(bucket, [f"x/{i}.png" for i in range(8)])
    gemini.flex.configure(latency=0.3, shed=0.3)
    env = {**stack_env, "CAPTION_RETRY_MAX_WAIT": "0.2", "CAPTION_GEMINI_ATTEMPTS": "10"}
    done = run_cli(env, "backfill", f"gs://{bucket.name}/x/", "--tier", "flex")
    assert done.returncode == 0, done.stderr
    assert captioned(bucket, "x/") == 8
    assert {r.service_tier for r in gemini.requests} == {"flex"}
    assert any(r.fault == "flex-shed" for r in gemini.requests)
    assert "at list prices (gemini-2.5-flash, flex tier)" in done.stderr
    answered = [r for r in gemini.requests if r.status == 200]
    assert min(r.answered_at - r.received_at for r in answered if r.answered_at) >= 0.14


def test_vertex_flex_goes_to_the_global_endpoint_with_the_shared_request_header(
    vertex_env: dict[str, str], gemini: Any, tmp_path: Any
) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(png(1))
    env = {**vertex_env, "CAPTION_SERVICE_TIER": "flex"}
    done = run_cli(env, "describe", str(photo))
    assert done.returncode == 0, done.stderr
    (request,) = gemini.requests
    assert request.service_tier == "flex"
    assert "/locations/global/" in request.path  # Flex PayGo: the global endpoint only
    standard = run_cli(vertex_env, "describe", str(photo))
    assert standard.returncode == 0
    assert gemini.requests[-1].service_tier == "standard"
    assert "/locations/us-central1/" in gemini.requests[-1].path

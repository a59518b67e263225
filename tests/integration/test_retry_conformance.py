"""Google's retry conformance scenarios for Cloud Storage, run against our adapter.

The scenarios are those its client libraries are tested with (against
storage-testbench); here they run through tests.gcs_proxy, which injects each fault
by its testbench name, in front of fake-gcs-server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from captioner.adapters.storage import StorageClient
from captioner.errors import CaptionerError, ConfigurationError
from tests.gcs_proxy import GcsProxy

# Transcribed from storage/v1/retry_tests.json of github.com/googleapis/conformance-tests
# at commit 998891a8dae0 (Apache-2.0): every scenario that names a method this adapter
# calls (storage.objects.get, for metadata and media; storage.objects.list;
# storage.objects.patch), with its id, description, cases, expectSuccess and
# preconditionProvided, and of its methods only ours. Scenarios 4 (non-idempotent
# ACL, HMAC and notification calls) and 7 (resumable uploads) name none of them.
# test_the_transcription_matches_the_official_file checks this against a copy of the
# file where ../shared/vendor has one.
OFFICIAL_FILE = "retry_tests-998891a8dae0.json"
DOWNLOAD = ("storage.objects.get", "storage.objects.download")  # (name, group)
GET = ("storage.objects.get", None)
LIST = ("storage.objects.list", None)
PATCH = ("storage.objects.patch", None)


@dataclass(frozen=True)
class Scenario:
    id: int
    description: str
    expect_success: bool
    precondition_provided: bool
    cases: tuple[tuple[str, ...], ...]
    methods: tuple[tuple[str, str | None], ...]


SCENARIOS = (
    Scenario(
        1,
        "always_idempotent",
        expect_success=True,
        precondition_provided=False,
        cases=(
            ("return-503", "return-503"),
            ("return-reset-connection", "return-reset-connection"),
            ("return-reset-connection", "return-503"),
        ),
        methods=(GET, LIST),
    ),
    Scenario(
        2,
        "conditionally_idempotent_retries_when_precondition_is_present",
        expect_success=True,
        precondition_provided=True,
        cases=(
            ("return-503", "return-503"),
            ("return-reset-connection", "return-reset-connection"),
            ("return-reset-connection", "return-503"),
        ),
        methods=(PATCH,),
    ),
    Scenario(
        3,
        "conditionally_idempotent_no_retries_when_precondition_is_absent",
        expect_success=False,
        precondition_provided=False,
        cases=(("return-503",), ("return-reset-connection",)),
        methods=(PATCH,),
    ),
    Scenario(
        5,
        "non-retryable errors",
        expect_success=False,
        precondition_provided=False,
        cases=(("return-400",), ("return-401",)),
        methods=(GET, LIST, PATCH),
    ),
    Scenario(
        6,
        "mix_retryable_non_retryable_errors",
        expect_success=False,
        precondition_provided=True,
        cases=(("return-503", "return-400"), ("return-reset-connection", "return-401")),
        methods=(GET, LIST, PATCH),
    ),
    Scenario(
        8,
        "downloads_handle_complex_retries",
        expect_success=True,
        precondition_provided=False,
        cases=(
            ("return-broken-stream", "return-broken-stream"),
            ("return-broken-stream-after-256K",),
        ),
        methods=(DOWNLOAD,),
    ),
)

# Google's runners exercise storage.objects.get with every library call that issues
# it, downloads included; the download group is downloads only.
CALLS = {GET: ("get", "download"), DOWNLOAD: ("download",), LIST: ("list",), PATCH: ("patch",)}
# Larger than 256 KiB, so that return-broken-stream-after-256K breaks a download.
MEDIA = bytes(range(256)) * 2048 + b"tail"


def cases() -> list[Any]:
    return [
        pytest.param(
            scenario, instructions, call, id=f"{scenario.id}-{call}-{'+'.join(instructions)}"
        )
        for scenario in SCENARIOS
        for instructions in scenario.cases
        for method in scenario.methods
        for call in CALLS[method]
    ]


@pytest.fixture(scope="module")
def proxy(gcs: Any) -> Iterator[GcsProxy]:
    server = GcsProxy(gcs.url).start()
    yield server
    server.stop()


@pytest.fixture
async def through_proxy(proxy: GcsProxy) -> AsyncIterator[StorageClient]:
    """The adapter through the proxy, with one attempt more than any case's faults."""
    proxy.reset()
    async with aiohttp.ClientSession() as session:
        yield StorageClient(session, endpoint=proxy.url, emulator=True, attempts=3)


@pytest.fixture
def stored(gcs_client: Any) -> tuple[str, str]:
    bucket = gcs_client.create_bucket(f"conf-{uuid.uuid4().hex[:12]}")
    bucket.blob("object.bin").upload_from_string(MEDIA, content_type="image/jpeg")
    return bucket.name, "object.bin"


def call_of(
    storage: StorageClient, bucket: str, name: str, call: str, scenario: Scenario
) -> tuple[str, str, str, Callable[[], Awaitable[Any]]]:
    """The HTTP method, path and query that ``call`` sends, and the call itself."""
    if call == "get":
        return "GET", f"/o/{name}", "", lambda: storage.get_object(bucket, name)
    if call == "download":

        async def download() -> bytes:
            info = await storage.get_object(bucket, name)
            return await storage.download(
                bucket, name, generation=info.generation, max_bytes=len(MEDIA)
            )

        return "GET", f"/o/{name}", "alt=media", download
    if call == "list":

        async def listing() -> list[str]:
            return [o.name async for o in storage.list_objects(bucket)]

        return "GET", f"/b/{bucket}/o", "", listing
    assert call == "patch"

    async def patch() -> dict[str, str]:
        info = await storage.get_object(bucket, name)
        written = await storage.patch_metadata(
            bucket,
            name,
            {"caption": "a test pattern"},
            if_generation_match=info.generation,
            # The precondition that makes a metadata PATCH safe to repeat.
            if_metageneration_match=info.metageneration if scenario.precondition_provided else None,
        )
        return dict(written.metadata)

    return "PATCH", f"/o/{name}", "", patch


EXPECTED = {"get": None, "download": MEDIA, "list": ["object.bin"]}


@pytest.mark.parametrize(("scenario", "instructions", "call"), cases())
async def test_official_retry_scenario(
    through_proxy: StorageClient,
    proxy: GcsProxy,
    stored: tuple[str, str],
    scenario: Scenario,
    instructions: tuple[str, ...],
    call: str,
) -> None:
    bucket, name = stored
    method, path, query, run = call_of(through_proxy, bucket, name, call, scenario)
    for instruction in instructions:
        proxy.add_instruction(method, path, instruction, query_contains=query)

    if scenario.expect_success:
        result = await run()
        if call == "patch":
            assert result == {"caption": "a test pattern"}
        elif EXPECTED[call] is not None:
            assert result == EXPECTED[call]
    else:
        with pytest.raises(CaptionerError) as raised:
            await run()
        if instructions[-1] == "return-401":
            assert isinstance(raised.value, ConfigurationError)
    assert proxy.pending_faults() == 0, "every injected fault was met"
    sent = [
        r
        for r in proxy.recorded(method)
        if path in r.path and query in "&".join(f"{k}={v}" for k, v in r.query.items())
    ]
    # Retried exactly as far as the scenario allows: one request per fault, and one
    # more (the success) only when the scenario expects success.
    assert len(sent) == len(instructions) + scenario.expect_success


# Beyond the official file: the other statuses storage-testbench can inject, with
# what Google's clients do for them.
@pytest.mark.parametrize("status", ["return-408", "return-429", "return-500", "return-502"])
@pytest.mark.parametrize("call", ["get", "download", "list"])
async def test_other_transient_statuses_are_retried(
    through_proxy: StorageClient,
    proxy: GcsProxy,
    stored: tuple[str, str],
    status: str,
    call: str,
) -> None:
    bucket, name = stored
    method, path, query, run = call_of(through_proxy, bucket, name, call, SCENARIOS[0])
    proxy.add_instruction(method, path, status, query_contains=query)
    await run()
    assert proxy.pending_faults() == 0


@pytest.mark.parametrize(
    ("call", "permission"),
    [
        ("get", "storage.objects.get"),
        ("download", "storage.objects.get"),
        ("list", "storage.objects.list"),
        ("patch", "storage.objects.update"),
    ],
)
async def test_a_403_is_a_configuration_error_naming_permission_and_bucket_tried_once(
    through_proxy: StorageClient,
    proxy: GcsProxy,
    stored: tuple[str, str],
    call: str,
    permission: str,
) -> None:
    bucket, name = stored
    scenario = SCENARIOS[1]  # with the precondition: a PATCH that could be retried
    method, path, query, run = call_of(through_proxy, bucket, name, call, scenario)
    proxy.add_fault(method, path, 403, count=5, query_contains=query)
    with pytest.raises(ConfigurationError) as raised:
        await run()
    assert f"{permission} on bucket {bucket}" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert proxy.pending_faults() == 4, "one request, no retry"


def official_file() -> Path:
    repo = Path(__file__).resolve().parents[2]
    return repo / ".." / "shared" / "vendor" / OFFICIAL_FILE


def test_the_transcription_matches_the_official_file() -> None:
    path = official_file()
    if not path.is_file():
        pytest.skip(f"{path} is absent (only CI and the dev machines have ../shared)")
    official = json.loads(path.read_text())["retryTests"]
    ours = set(CALLS)
    transcribed = []
    for test in official:
        methods = tuple(
            (m["name"], m.get("group"))
            for m in test["methods"]
            if (m["name"], m.get("group")) in ours
        )
        if methods:
            transcribed.append(
                Scenario(
                    test["id"],
                    test["description"],
                    expect_success=test["expectSuccess"],
                    precondition_provided=test["preconditionProvided"],
                    cases=tuple(tuple(c["instructions"]) for c in test["cases"]),
                    methods=methods,
                )
            )
    assert tuple(transcribed) == SCENARIOS
    # And nothing of ours is left out: every method the adapter calls appears.
    assert {m for s in SCENARIOS for m in s.methods} == ours

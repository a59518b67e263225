"""Batch apply writes only what the run asked: a line, a file, a manifest or a checkpoint
planted or torn under the run's folder is refused (counted, logged, never written), and
one bad line, file or run never stops the others."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner.adapters.vertex_batch import read_status
from captioner.batch_jobs import BatchFollowRequest, BatchSubmitRequest, RequestKey
from captioner.errors import ConfigurationError, PermanentError, TransientError
from tests.batch_fakes import (
    BUCKET,
    SPEC,
    FakeVertex,
    ListedStorage,
    MemoryBlobs,
    answer,
    apply,
    photos,
    service,
)


async def _three_submitted(n: int = 3) -> tuple[ListedStorage, MemoryBlobs, FakeVertex, Any]:
    storage, blobs = ListedStorage(), MemoryBlobs()
    photos(storage, n)
    vertex = FakeVertex(blobs)
    jobs = service(storage, blobs, vertex)
    await jobs.submit(BatchSubmitRequest(BUCKET, "2019/"))
    return storage, blobs, vertex, jobs


def _line(uri: str, key: str | None = None, **result: Any) -> str:
    """An output line in the form Vertex AI writes, with ``result`` (response or status)."""
    line: dict[str, Any] = {
        "status": "",
        "request": {"contents": [{"role": "user", "parts": [
            {"fileData": {"fileUri": uri, "mimeType": "image/jpeg"}}, {"text": "x"}]}]},
    }  # fmt: skip
    if key is not None:
        line["key"] = key
    line.update(result or {"response": answer("MALLORY WAS HERE")})
    return json.dumps(line)


def _append(blobs: MemoryBlobs, name: str, *lines: str) -> None:
    blobs.put(name, blobs.data[name] + "".join(f"{line}\n" for line in lines).encode())


def _written(storage: ListedStorage) -> dict[str, str]:
    return {
        name: meta["caption"]
        for (bucket, name), stored in storage.objects.items()
        if "caption" in (meta := stored.info.metadata)
    }


# ---------------------------------------------------------------- the confused deputy


async def test_a_planted_line_for_an_object_of_another_bucket_is_refused_not_written() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    victim = storage.put("other-bucket", "victim.jpg", b"x")
    vertex.run()
    uri = "gs://other-bucket/victim.jpg"
    _append(blobs, vertex.output_file(), _line(uri, f"{uri}#{victim.generation}"))

    (report,) = await apply(jobs)

    assert storage.metadata("other-bucket", "victim.jpg") == {}
    assert report.totals.counts["ok"] == 3  # the 3 submitted, not 4
    assert dict(report.refused) == {"not-requested": 1}
    assert "MALLORY WAS HERE" not in _written(storage).values()


async def test_a_line_keyed_outside_the_submitted_prefix_is_refused() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    outside = storage.put(BUCKET, "private/ceo.jpg", b"x")
    vertex.run()
    uri = f"gs://{BUCKET}/private/ceo.jpg"
    _append(blobs, vertex.output_file(), _line(uri, f"{uri}#{outside.generation}"))
    (report,) = await apply(jobs)
    assert storage.metadata(BUCKET, "private/ceo.jpg") == {}
    assert dict(report.refused) == {"not-requested": 1}


async def test_a_line_whose_key_names_another_image_than_its_request_is_refused() -> None:
    """Keyed to image 1, but the echoed request is image 0: neither gets its words."""
    storage, blobs, vertex, jobs = await _three_submitted()
    one = storage.objects[(BUCKET, "2019/0001.jpg")].info
    lines = [_line(f"gs://{BUCKET}/2019/0000.jpg", f"gs://{BUCKET}/2019/0001.jpg#{one.generation}")]
    blobs.put("", b"")  # the fake's bucket is one dict; this keeps the planted line first
    vertex.run(keep=lambda key: "0001" not in key)
    out = vertex.output_file()
    blobs.put(out, ("\n".join(lines) + "\n").encode() + blobs.data[out])

    (report,) = await apply(jobs)
    assert dict(report.refused) == {"key-mismatch": 1}
    assert storage.metadata(BUCKET, "2019/0001.jpg") == {}
    assert storage.metadata(BUCKET, "2019/0000.jpg")["caption"] == "A cat on a mat."


async def test_a_line_whose_label_names_another_image_than_its_request_is_refused() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    one = storage.objects[(BUCKET, "2019/0001.jpg")].info
    forged = json.loads(_line(f"gs://{BUCKET}/2019/0000.jpg"))
    forged["request"]["labels"] = {
        "captioner-key": RequestKey(BUCKET, "2019/0001.jpg", one.generation).label
    }
    vertex.run(keep=lambda key: "0000" not in key)
    _append(blobs, vertex.output_file(), json.dumps(forged))
    (report,) = await apply(jobs)
    assert dict(report.refused) == {"key-mismatch": 1}
    assert "caption" not in storage.metadata(BUCKET, "2019/0000.jpg")


async def test_a_forged_error_status_for_an_object_not_asked_is_refused_not_stamped() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    victim = storage.put(BUCKET, "2020/keep.jpg", b"x")
    vertex.run()
    bad = {"error": {"code": 400, "message": "bad image", "status": "INVALID_ARGUMENT"}}
    uri = f"gs://{BUCKET}/2020/keep.jpg"
    planted = _line(uri, f"{uri}#{victim.generation}", status=f"Bad Request: {json.dumps(bad)}")
    _append(blobs, vertex.output_file(), planted)
    (report,) = await apply(jobs)
    assert storage.metadata(BUCKET, "2020/keep.jpg") == {}
    assert dict(report.refused) == {"not-requested": 1}


async def test_a_second_answer_for_the_same_request_is_refused() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    zero = storage.objects[(BUCKET, "2019/0000.jpg")].info
    uri = f"gs://{BUCKET}/2019/0000.jpg"
    _append(blobs, vertex.output_file(), _line(uri, f"{uri}#{zero.generation}"))
    (report,) = await apply(jobs)
    assert dict(report.refused) == {"duplicate-answer": 1}
    assert storage.metadata(BUCKET, "2019/0000.jpg")["caption"] == "A cat on a mat."


@pytest.mark.parametrize(
    ("where", "late"),
    [
        ("{out}/predictions-extra.jsonl", False),  # not a name Vertex AI gives its answers
        ("{out}/sub/predictions.jsonl", False),  # not directly in the job's directory
        ("{dest}planted/predictions.jsonl", False),  # not the directory Vertex AI named
        ("{out}/predictions_0002.jsonl", True),  # a name it gives, but after the job ended
    ],
)
async def test_answer_files_vertex_did_not_write_for_the_job_are_not_read(
    where: str, late: bool
) -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run(keep=lambda key: "0000" not in key)
    job = vertex.created[0]
    name = where.format(
        out=vertex.outputs[job["name"]], dest=job["dest"].removeprefix(f"gs://{BUCKET}/")
    )
    zero = storage.objects[(BUCKET, "2019/0000.jpg")].info
    uri = f"gs://{BUCKET}/2019/0000.jpg"
    created = vertex.ended[job["name"]] + timedelta(minutes=5) if late else None
    blobs.put(name, (_line(uri, f"{uri}#{zero.generation}") + "\n").encode(), created)

    (report,) = await apply(jobs)
    assert storage.metadata(BUCKET, "2019/0000.jpg") == {}
    assert dict(report.refused) == {"unexpected-file": 1}
    assert report.totals.counts["ok"] == 2
    assert report.totals.skipped == {}
    assert report.totals.counts["retry"] == 1  # 0000: left for the next run


async def test_a_request_file_replaced_after_the_job_was_created_refuses_the_job() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    shard = vertex.created[0]["source"].removeprefix(f"gs://{BUCKET}/")
    blobs.put(shard, blobs.data[shard], vertex.created[0]["created"] + timedelta(minutes=5))
    (report,) = await apply(jobs)
    assert "replaced after the job was created" in (report.problem or "")
    assert _written(storage) == {}


async def test_a_job_whose_output_lies_outside_the_run_folder_is_refused() -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    name = vertex.created[0]["name"]
    elsewhere = "uploads/prediction-model-1"
    blobs.put(f"{elsewhere}/predictions.jsonl", blobs.data[vertex.output_file()])
    vertex.outputs[name] = elsewhere
    (report,) = await apply(jobs)
    assert "outside" in (report.problem or "")
    assert _written(storage) == {}


async def test_a_manifest_planted_in_another_run_folder_cannot_borrow_a_real_job() -> None:
    _storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    (real,) = [n for n in blobs.data if n.endswith("/jobs.json")]
    manifest = json.loads(blobs.data[real])
    manifest["run"] = "20200101-000000-beef"
    manifest["prefix"] = ""
    blobs.put("captioner-batch/20200101-000000-beef/jobs.json", json.dumps(manifest).encode())
    reports = await apply(jobs, prefix="")
    planted = [r for r in reports if r.run == "20200101-000000-beef"]
    assert planted
    assert all("not in run" in (r.problem or "") for r in planted)
    assert [r.totals.counts["ok"] for r in reports if r.run != "20200101-000000-beef"] == [3]


# ---------------------------------------------------------------- one bad thing, not all


async def test_a_line_nested_too_deeply_an_odd_status_and_a_huge_line_are_skipped() -> None:
    storage, blobs, vertex, jobs = await _three_submitted(5)
    odd_status = {"status": {"code": [14], "message": {"list": [1, 2]}}}
    outcomes = {"0003": odd_status}
    vertex.run(outcome=lambda key: outcomes.get(key.split("/")[-1][:4], {"response": answer()}))
    _append(blobs, vertex.output_file(), "[" * 100_000 + "]" * 100_000, "x" * 2_000_000, "[]")
    (report,) = await apply(jobs)
    assert report.applied
    assert report.totals.counts["ok"] == 4
    assert report.totals.counts["retry"] == 1  # the odd status: left, never recorded
    assert dict(report.refused) == {"unreadable-line": 2, "line-too-long": 1}
    assert "caption-status" not in storage.metadata(BUCKET, "2019/0003.jpg")


@pytest.mark.parametrize(
    "checkpoint",
    [b'{"files": {"x": "ten"}}', b'{"files": [1, 2]}', b"not json", b"[]", b'{"done": "yes"}'],
)
async def test_a_torn_or_planted_checkpoint_means_applying_from_the_start(
    checkpoint: bytes,
) -> None:
    _storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    (manifest,) = [n for n in blobs.data if n.endswith("/jobs.json")]
    blobs.put(manifest.replace("jobs.json", "applied-1.json"), checkpoint)
    blobs_read = blobs.read_json

    async def read_json(bucket: str, name: str) -> Any:
        try:
            return await blobs_read(bucket, name)
        except ValueError as exc:  # as the adapter raises for a file that is not JSON
            raise ValueError(str(exc)) from None

    blobs.read_json = read_json  # type: ignore[method-assign]
    (report,) = await apply(jobs)
    assert report.applied
    assert report.totals.counts["ok"] == 3


async def test_one_manifest_that_is_not_json_spoils_only_its_own_run() -> None:
    _storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    blobs.put("captioner-batch/20200101-000000-dead/jobs.json", b'{"run": ')
    original = blobs.read_json

    async def read_json(bucket: str, name: str) -> Any:
        try:
            return await original(bucket, name)
        except json.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None

    blobs.read_json = read_json  # type: ignore[method-assign]
    reports = await apply(jobs)
    bad = [r for r in reports if r.problem]
    assert len(bad) == 1
    assert "not JSON" in (bad[0].problem or "")
    assert [r.totals.counts["ok"] for r in reports if not r.problem] == [3]
    status = [r async for r in jobs.follow(BatchFollowRequest("status", bucket=BUCKET))]
    assert len(status) == 2


@pytest.mark.parametrize(
    "manifest",
    [
        {"run": "20200101-000000-dead", "specs": {"zzz": {"prompt": "x"}}},
        {"run": "20200101-000000-dead", "jobs": "all of them"},
        [1, 2, 3],
    ],
)
async def test_a_manifest_of_the_wrong_shape_is_named_and_the_other_runs_go_on(
    manifest: Any,
) -> None:
    _storage, blobs, vertex, jobs = await _three_submitted()
    vertex.run()
    blobs.put("captioner-batch/20200101-000000-dead/jobs.json", json.dumps(manifest).encode())
    reports = await apply(jobs)
    assert [r.run for r in reports if r.problem] == ["20200101-000000-dead"]
    assert sum(r.totals.counts["ok"] for r in reports) == 3


# ---------------------------------------------------------------- the class, generated

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _hostile(uris: list[str]) -> st.SearchStrategy[str]:
    """Lines an attacker or a torn write could leave: garbage, odd JSON, and lines that
    name a submitted image (or another) with forged keys, labels, statuses and answers."""
    forged = st.builds(
        lambda uri, key, label, status, response: json.dumps(
            {"request": {"contents": [{"parts": [{"fileData": {"fileUri": uri}}]}],
                         "labels": {"captioner-key": label}},
             "key": key, "status": status, "response": response}
        ),
        st.sampled_from([*uris, f"gs://{BUCKET}/2020/x.jpg", "gs://other/y.jpg"]),
        _json | st.sampled_from([f"{u}#1" for u in uris]),
        _json,
        _json,
        _json | st.just(answer("FORGED")),
    )  # fmt: skip
    return st.one_of(
        st.binary(max_size=200).map(lambda b: b.decode("latin-1").replace("\n", " ")),
        _json.map(json.dumps),
        forged,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_whatever_lines_are_added_apply_ends_and_writes_only_the_real_answers(
    data: st.DataObject,
) -> None:
    storage, blobs, vertex, jobs = await _three_submitted()
    uris = [f"gs://{BUCKET}/2019/{i:04}.jpg" for i in range(3)]
    vertex.run()
    planted = data.draw(st.lists(_hostile(uris), min_size=1, max_size=6))
    out = vertex.output_file()
    real = blobs.data[out].decode().splitlines()
    position = data.draw(st.integers(0, len(real)))
    lines = real[:position] + planted + real[position:]
    blobs.put(out, ("\n".join(lines) + "\n").encode())

    (report,) = await apply(jobs)
    assert report.applied
    assert set(_written(storage)) <= {f"2019/{i:04}.jpg" for i in range(3)}
    assert all(
        stored.info.metadata.get("caption-status", "ok") in ("ok", "blocked")
        or stored.info.metadata["caption-status"].startswith("error:")
        for stored in storage.objects.values()
    )
    # A forged answer may win only where it answers a submitted image first, as the
    # real answer would: never another object, never a second answer.
    assert len(storage.patches) <= 3


# ---------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        ({"code": 14, "message": "The service is unavailable."}, TransientError, None),
        ({"code": 4, "message": "Deadline exceeded."}, TransientError, None),
        ({"code": 8, "message": "Resource exhausted."}, TransientError, None),
        ({"code": 3, "message": "Unable to process the image."}, PermanentError, "gemini-400"),
        ({"code": 7, "message": "Permission denied on the object."}, ConfigurationError, None),
        ({"code": 503, "message": "x"}, TransientError, None),
        ('Service Unavailable: {"error": {"code": 503, "status": "UNAVAILABLE"}}',
         TransientError, None),
        ({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}},
         PermanentError, "gemini-400"),
        ({"code": [14], "message": {"a": [1]}}, TransientError, None),
        ({"code": True}, TransientError, None),
        ([1, 2], TransientError, None),
        ("[" * 5000, TransientError, None),
    ],
)  # fmt: skip
def test_a_status_is_read_by_its_form_grpc_codes_as_grpc_http_as_http(
    status: Any, kind: type[Exception], reason: str | None
) -> None:
    error = read_status(status)
    assert type(error) is kind or isinstance(error, kind)
    if kind is TransientError:
        assert not isinstance(error, ConfigurationError | PermanentError)
    if reason is not None:
        assert isinstance(error, PermanentError)
        assert error.reason == reason


def test_the_spec_of_a_manifest_must_hash_to_its_own_fingerprint() -> None:
    from captioner.batch_jobs import Manifest

    good = {
        "run": "20200101-000000-dead", "bucket": "b", "prefix": "", "model": "m",
        "created": "2020-01-01T00:00:00Z", "metadata_prefix": "caption", "languages": ["en"],
        "specs": {SPEC.fingerprint: {"prompt": SPEC.prompt, "structured": True,
                                     "languages": ["en"], "rule": "default"}},
        "jobs": [],
    }  # fmt: skip
    assert Manifest.from_json(good).specs == {SPEC.fingerprint: SPEC}
    forged = json.loads(json.dumps(good))
    forged["specs"][SPEC.fingerprint]["prompt"] = "Write MALLORY."
    with pytest.raises(PermanentError, match="fingerprint"):
        Manifest.from_json(forged)

"""In-memory Cloud Storage files and Vertex AI jobs for captioner.batch_jobs' unit tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from captioner.adapters.vertex_batch import read_answer, read_status
from captioner.batch_jobs import (
    LABEL,
    BatchFollowRequest,
    BatchJobs,
    BatchLimits,
    JobReport,
    JobStatus,
    JsonTemplate,
    StoredFile,
)
from captioner.captions import CaptionSpec
from captioner.domain import ObjectInfo, Usage
from captioner.metadata import MetadataKeys
from captioner.recording import Recorder
from captioner.rules import RuleBook
from tests.fakes import MemoryStorage

BUCKET = "photos"
KEYS = MetadataKeys()
SPEC = CaptionSpec("Describe it.", structured=True)
TEMPLATE = JsonTemplate(
    json.dumps(
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"fileData": {"file_uri": "__captioner_uri__",
                                      "mime_type": "__captioner_mime__"}},
                        {"text": "Describe it."},
                    ],
                }
            ],
            "generationConfig": {"temperature": 0.2},
            "labels": {LABEL: "__captioner_label__"},
        }
    )
)  # fmt: skip


class ListedStorage(MemoryStorage):
    async def list_objects(self, bucket: str, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        for (b, name), stored in sorted(self.objects.items()):
            if b == bucket and name.startswith(prefix):
                yield stored.info

    def delete(self, bucket: str, name: str) -> None:
        del self.objects[(bucket, name)]


class _Writer:
    def __init__(self, blobs: MemoryBlobs, name: str) -> None:
        self._blobs, self._name, self._data = blobs, name, bytearray()

    async def write(self, data: bytes) -> None:
        self._data += data

    async def close(self) -> None:
        self._blobs.put(self._name, bytes(self._data))


@dataclass
class MemoryBlobs:
    """Files of one bucket, each with the time Cloud Storage would say it was created."""

    data: dict[str, bytes] = field(default_factory=dict)
    created: dict[str, datetime] = field(default_factory=dict)
    json_writes: int = 0
    deleted: list[str] = field(default_factory=list)

    def put(self, name: str, data: bytes, created: datetime | None = None) -> None:
        self.data[name] = data
        self.created[name] = created or datetime.now(UTC)

    def drop(self, match: str) -> None:
        for name in [n for n in self.data if match in n]:
            del self.data[name], self.created[name]

    def writer(self, bucket: str, name: str, content_type: str) -> _Writer:
        return _Writer(self, name)

    async def read_json(self, bucket: str, name: str) -> Any:
        data = self.data.get(name)
        return None if data is None else json.loads(data)

    async def write_json(self, bucket: str, name: str, data: Mapping[str, Any]) -> None:
        self.json_writes += 1
        self.put(name, json.dumps(data).encode())

    async def files(self, bucket: str, prefix: str) -> list[StoredFile]:
        return [
            StoredFile(name, self.created[name], len(data))
            for name, data in self.data.items()
            if name.startswith(prefix)
        ]

    async def stat(self, bucket: str, name: str) -> StoredFile | None:
        data = self.data.get(name)
        return None if data is None else StoredFile(name, self.created[name], len(data))

    async def delete(self, bucket: str, name: str) -> None:
        self.deleted.append(name)
        self.data.pop(name, None)
        self.created.pop(name, None)

    async def head(self, bucket: str, name: str, max_bytes: int) -> bytes:
        return self.data[name][:max_bytes]

    async def lines(
        self, bucket: str, name: str, offset: int, max_line: int
    ) -> AsyncIterator[tuple[int, bytes | None]]:
        position = offset
        for line in self.data[name][offset:].splitlines(keepends=True):
            position += len(line)
            body = line.rstrip(b"\n")
            if body:
                yield position, None if len(body) > max_line else body

    def requests(self, shard: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.data[shard].splitlines()]


def answer(caption: str = "A cat on a mat.", finish: str = "STOP") -> dict[str, Any]:
    text = json.dumps({"caption": caption, "alt_text": "Cat.", "tags": ["cat", "mat"]})
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish}
        ],
        "modelVersion": "gemini-2.5-flash-001",
        "usageMetadata": {"promptTokenCount": 330, "candidatesTokenCount": 25},
    }


@dataclass
class FakeVertex:
    """Jobs that 'run' when told to: each request line becomes an output line, in a
    directory named for the job as Vertex AI names it."""

    blobs: MemoryBlobs
    created: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    ended: dict[str, datetime] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    async def create(self, *, model: str, source: str, dest: str, display_name: str) -> JobStatus:
        name = f"projects/p/locations/us-central1/batchPredictionJobs/{len(self.created) + 1}"
        self.created.append(
            {"name": name, "model": model, "source": source, "dest": dest,
             "display_name": display_name, "created": datetime.now(UTC)}
        )  # fmt: skip
        self.states[name] = "QUEUED"
        return await self.get(name)

    async def get(self, name: str) -> JobStatus:
        job = next(j for j in self.created if j["name"] == name)
        output = self.outputs.get(name)
        return JobStatus(
            name,
            self.states[name],
            job["source"],
            job["dest"],
            output_dir=None if output is None else f"gs://{BUCKET}/{output}",
            created=job["created"],
            ended_at=self.ended.get(name),
            display_name=job["display_name"],
        )

    async def cancel(self, name: str) -> None:
        self.cancelled.append(name)
        self.states[name] = "CANCELLED"
        self.ended[name] = datetime.now(UTC)

    def output_file(self, index: int = 0) -> str:
        return self.outputs[self.created[index]["name"]] + "/predictions.jsonl"

    def run(
        self,
        index: int = 0,
        state: str = "SUCCEEDED",
        outcome: Callable[[str], dict[str, Any]] | None = None,
        keep: Callable[[str], bool] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> list[str]:
        """Finish job ``index``: ``outcome(key)`` gives a line's response or status;
        ``transform`` rewrites each output line (what the service keeps of it)."""
        job = self.created[index]
        shard = job["source"].removeprefix(f"gs://{BUCKET}/")
        lines, keys = [], []
        for request in self.blobs.requests(shard):
            if keep is not None and not keep(request["key"]):
                continue
            result = (outcome or (lambda key: {"response": answer()}))(request["key"])
            line = {**request, "status": "", **result}
            lines.append(json.dumps(transform(line) if transform else line))
            keys.append(request["key"])
        folder = job["dest"].removeprefix(f"gs://{BUCKET}/") + "prediction-model-1"
        if lines:
            self.blobs.put(f"{folder}/predictions.jsonl", ("\n".join(lines) + "\n").encode())
            self.outputs[job["name"]] = folder
        self.states[job["name"]] = state
        self.ended[job["name"]] = datetime.now(UTC) + timedelta(milliseconds=1)
        return keys


def service(
    storage: ListedStorage,
    blobs: MemoryBlobs,
    vertex: FakeVertex | None,
    *,
    limits: BatchLimits | None = None,
    rules: RuleBook | None = None,
    concurrency: int = 8,
) -> BatchJobs:
    return BatchJobs(
        lister=storage,
        recorder_for=lambda m: Recorder(storage, m.keys, m.model),
        blobs=blobs,
        jobs=vertex,
        template_for=lambda spec: TEMPLATE,
        read_answer=read_answer,
        read_status=read_status,
        model="gemini-2.5-flash",
        rules=rules or RuleBook(SPEC),
        keys=KEYS,
        batch_prefix="captioner-batch/",
        limits=limits or BatchLimits(),
        max_bytes=1_000_000,
        estimate=Usage(330, 80, 0, 258, calls=1),
        concurrency=concurrency,
        checkpoint_every=0.0,
    )


def photos(storage: ListedStorage, n: int, prefix: str = "2019/") -> list[ObjectInfo]:
    return [storage.put(BUCKET, f"{prefix}{i:04}.jpg", b"x" * 100) for i in range(n)]


async def apply(jobs: BatchJobs, **kw: Any) -> list[JobReport]:
    request = BatchFollowRequest("apply", bucket=BUCKET, **{"prefix": "2019/", **kw})
    return [report async for report in jobs.follow(request)]

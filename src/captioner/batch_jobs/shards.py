"""Request files (shards) within Vertex AI's per-job limits, and writing them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from captioner.batch_jobs.ports import Blobs, LineWriter
from captioner.errors import PermanentError

# Vertex AI's documented per-job limits for Gemini batch inference from Cloud Storage
# (https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini,
# "Quotas and limits", read 2026-11-29): "up to 200,000 requests" per job and a 1 GB file
# size limit with Cloud Storage input. 10**9 bytes is within 1 GB and 1 GiB alike.
MAX_REQUESTS_PER_JOB = 200_000
MAX_BYTES_PER_JOB = 1_000_000_000


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_requests: int = MAX_REQUESTS_PER_JOB
    max_bytes: int = MAX_BYTES_PER_JOB


@dataclass
class ShardPlanner:
    """Where one shard ends and the next begins, within the per-job limits."""

    limits: BatchLimits
    shards: int = 0
    requests: int = 0  # in the current shard
    bytes: int = 0
    total: int = 0

    def add(self, size: int) -> bool:
        """Count a line of ``size`` bytes; True when it starts a new shard."""
        if size > self.limits.max_bytes:
            raise PermanentError("request-too-large", f"one request is {size} bytes")
        new = (
            self.shards == 0
            or self.requests >= self.limits.max_requests
            or self.bytes + size > self.limits.max_bytes
        )
        if new:
            self.shards += 1
            self.requests, self.bytes = 0, 0
        self.requests += 1
        self.bytes += size
        self.total += 1
        return new


# Called with (shard index, requests, bytes) once a shard is closed: submits its job.
OnShardClosed = Callable[[int, int, int], Awaitable[None]]


class ShardWriter:
    """The request shard being written, and the job made for each one finished."""

    def __init__(
        self, blobs: Blobs, bucket: str, name_of: Callable[[int], str], closed: OnShardClosed
    ) -> None:
        self._blobs = blobs
        self._bucket = bucket
        self._name_of = name_of
        self._closed = closed
        self._writer: LineWriter | None = None
        self._index = -1
        self._requests = 0
        self._bytes = 0

    async def next(self, index: int) -> None:
        await self._close_current()
        self._index, self._requests, self._bytes = index, 0, 0
        self._writer = self._blobs.writer(self._bucket, self._name_of(index), "application/jsonl")

    async def write(self, line: bytes) -> None:
        assert self._writer is not None
        await self._writer.write(line)
        self._requests += 1
        self._bytes += len(line)

    async def _close_current(self) -> None:
        if self._writer is None:
            return
        await self._writer.close()
        self._writer = None
        await self._closed(self._index, self._requests, self._bytes)

    async def finish(self) -> None:
        await self._close_current()

    def abandon(self) -> None:
        """On a failure part-way, leave no half-written shard to be mistaken for a job."""
        self._writer = None

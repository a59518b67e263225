"""The outside world of batch jobs, as small protocols: Vertex AI's jobs and the files in
Cloud Storage (``captioner.adapters.vertex_batch`` implements both; the tests use
in-memory fakes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from captioner.batch_jobs.templates import RequestTemplate
from captioner.captions import CaptionSpec
from captioner.domain import Description

# Job states (google.genai.types.JobState without its JOB_STATE_ prefix).
RUNNING_STATES = frozenset({"QUEUED", "PENDING", "RUNNING", "CANCELLING", "UPDATING", "PAUSED"})
ENDED_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"})


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A batch prediction job as Vertex AI reports it: the one account of a job that
    nobody but Vertex AI can write, so what apply trusts starts here."""

    name: str
    state: str  # QUEUED ... SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED
    source: str | None = None
    dest: str | None = None
    output_dir: str | None = None
    error: str | None = None
    succeeded: int | None = None
    failed: int | None = None
    incomplete: int | None = None
    created: datetime | None = None
    ended_at: datetime | None = None
    display_name: str | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


class Jobs(Protocol):
    async def create(
        self, *, model: str, source: str, dest: str, display_name: str
    ) -> JobStatus: ...

    async def get(self, name: str) -> JobStatus: ...

    async def cancel(self, name: str) -> None: ...


class LineWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file in Cloud Storage; ``created`` is set by Cloud Storage itself (a new
    generation of a name is a new creation), so a file cannot claim to be older."""

    name: str
    created: datetime
    size: int = 0


class Blobs(Protocol):
    """Large or whole files in Cloud Storage (shards, outputs, manifests, checkpoints)."""

    def writer(self, bucket: str, name: str, content_type: str) -> LineWriter: ...

    async def read_json(self, bucket: str, name: str) -> Any:
        """The parsed file, or None when it does not exist. Raises ValueError for a file
        that is not JSON (or is too large to be one of ours)."""
        ...

    async def write_json(self, bucket: str, name: str, data: Mapping[str, Any]) -> None: ...

    async def files(self, bucket: str, prefix: str) -> list[StoredFile]: ...

    async def stat(self, bucket: str, name: str) -> StoredFile | None: ...

    async def delete(self, bucket: str, name: str) -> None:
        """Delete a file; one already gone is not an error."""
        ...

    async def head(self, bucket: str, name: str, max_bytes: int) -> bytes:
        """The first ``max_bytes`` of a file (an image's header, to read its size)."""
        ...

    def lines(
        self, bucket: str, name: str, offset: int, max_line: int
    ) -> AsyncIterator[tuple[int, bytes | None]]:
        """Lines from byte ``offset`` on, each with the offset just past it; a line longer
        than ``max_line`` bytes comes as None (skipped, never held in memory)."""
        ...


# An answer (the output line's ``response``) as the online path reads one; raises
# TransientError / PermanentError as it would.
ReadAnswer = Callable[[Mapping[str, Any], str], Description]
# A per-request error (the output line's ``status``) as the error the online path would
# raise for the same answer from Gemini.
ReadStatus = Callable[[Any], Exception]
TemplateFor = Callable[[CaptionSpec], RequestTemplate]
# An image's (width, height) from its first bytes, or None when they do not say.
ImageSize = Callable[[bytes], tuple[int, int] | None]

"""How far apply got in a job's output: read back as untrusted, written as it goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from captioner.batch_jobs.manifest import RunPaths
from captioner.batch_jobs.ports import Blobs

FINISHED = -1  # a file's offset once every line of it is applied


@dataclass
class Checkpoint:
    """Per answer file, the byte offset up to which every line is applied."""

    offsets: dict[str, int] = field(default_factory=dict)
    answered: int = 0  # answers admitted in earlier passes (for what was left unanswered)
    done: bool = False
    unanswered: int = 0  # requests the finished job never answered
    problem: str | None = None  # why the stored one was not used, if it was not

    def as_json(self) -> dict[str, Any]:
        return {
            "files": dict(self.offsets),
            "answered": self.answered,
            "done": self.done,
            "unanswered": self.unanswered,
        }

    @classmethod
    def from_json(cls, data: Any) -> Checkpoint:
        """A stored checkpoint, or a fresh one (with ``problem`` said) when it is not one
        of ours: applying from the start again writes nothing twice, so a torn or planted
        checkpoint costs time, never a caption."""
        if data is None:
            return cls()
        try:
            offsets = data.get("files") or {}
            checked = {str(name): _offset(offset) for name, offset in dict(offsets).items()}
            return cls(
                checked,
                _offset(data.get("answered", 0), low=0),
                data.get("done") is True,
                _offset(data.get("unanswered", 0), low=0),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            return cls(problem=f"the checkpoint could not be read ({exc}); applying from the start")


def _offset(value: Any, low: int = FINISHED) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{value!r:.40} is not an offset")
    return value


async def load(blobs: Blobs, paths: RunPaths, job: str) -> Checkpoint:
    try:
        data = await blobs.read_json(paths.bucket, paths.checkpoint(job))
    except ValueError as exc:
        return Checkpoint(problem=f"the checkpoint is not JSON ({str(exc)[:100]}); from the start")
    return Checkpoint.from_json(data)


async def save(blobs: Blobs, paths: RunPaths, job: str, checkpoint: Checkpoint) -> None:
    await blobs.write_json(paths.bucket, paths.checkpoint(job), checkpoint.as_json())


class Watermark:
    """The byte offset up to which every line is applied, as lines finish out of order,
    and how many of the lines below it counted (answers admitted): what a checkpoint can
    say without counting a line twice when the lines above it are read again."""

    def __init__(self, start: int) -> None:
        self.offset = start
        self.counted = 0
        self._next = 0
        self._ends: dict[int, int] = {}
        self._done: dict[int, bool] = {}

    def started(self, index: int, end: int) -> None:
        self._ends[index] = end

    def finished(self, index: int, counts: bool = False) -> None:
        self._done[index] = counts
        while self._next in self._done:
            self.counted += self._done.pop(self._next)
            self.offset = self._ends.pop(self._next)
            self._next += 1

"""In-memory stand-ins for the pipeline's protocols: fast unit tests on top of the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from captioner.domain import Description, ObjectInfo, PreparedImage, Usage
from captioner.errors import (
    ObjectGoneError,
    PermanentError,
    PreconditionFailedError,
    TransientError,
)


@dataclass
class StoredObject:
    info: ObjectInfo
    data: bytes


@dataclass
class MemoryStorage:
    """Cloud Storage semantics that matter here: generations, merge-PATCH, preconditions."""

    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    patches: list[dict[str, object]] = field(default_factory=list)
    downloads: int = 0
    fail_next: list[Exception] = field(default_factory=list)
    _generation: int = 1000

    def put(
        self,
        bucket: str,
        name: str,
        data: bytes,
        content_type: str = "image/jpeg",
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        self._generation += 1
        info = ObjectInfo(
            bucket, name, self._generation, 1, content_type, len(data), dict(metadata or {})
        )
        self.objects[(bucket, name)] = StoredObject(info, data)
        return info

    def metadata(self, bucket: str, name: str) -> dict[str, str]:
        return dict(self.objects[(bucket, name)].info.metadata)

    def _take_fault(self) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)

    async def get_object(self, bucket: str, name: str) -> ObjectInfo:
        await asyncio.sleep(0)
        self._take_fault()
        stored = self.objects.get((bucket, name))
        if stored is None:
            raise ObjectGoneError(name)
        return stored.info

    async def download(self, bucket: str, name: str, *, generation: int, max_bytes: int) -> bytes:
        await asyncio.sleep(0)
        self.downloads += 1
        stored = self.objects.get((bucket, name))
        if stored is None or stored.info.generation != generation:
            raise ObjectGoneError(name)
        if len(stored.data) > max_bytes:
            raise PermanentError("too-large", "too large")
        return stored.data

    async def patch_metadata(
        self,
        bucket: str,
        name: str,
        metadata: Mapping[str, str],
        *,
        if_generation_match: int,
        if_metageneration_match: int | None,
    ) -> ObjectInfo:
        await asyncio.sleep(0)
        self.patches.append(
            {
                "name": name,
                "metadata": dict(metadata),
                "ifGenerationMatch": if_generation_match,
                "ifMetagenerationMatch": if_metageneration_match,
            }
        )
        stored = self.objects.get((bucket, name))
        if stored is None:
            raise ObjectGoneError(name)
        info = stored.info
        if info.generation != if_generation_match or (
            if_metageneration_match is not None and info.metageneration != if_metageneration_match
        ):
            raise PreconditionFailedError(name)
        merged = {**info.metadata, **metadata}
        stored.info = replace(info, metadata=merged, metageneration=info.metageneration + 1)
        return stored.info

    def owner_edits(self, bucket: str, name: str, metadata: Mapping[str, str]) -> None:
        stored = self.objects[(bucket, name)]
        info = stored.info
        stored.info = replace(
            info,
            metadata={**info.metadata, **metadata},
            metageneration=info.metageneration + 1,
        )


@dataclass
class ScriptedDescriber:
    """Answers from a script: text by default, or the errors queued in ``script``."""

    model: str = "fake-model"
    text: str = "A tabby cat resting on a wooden floor."
    script: list[Description | Exception] = field(default_factory=list)
    calls: int = 0
    delay: float = 0.0
    in_flight: int = 0
    peak_in_flight: int = 0

    async def describe(self, image: PreparedImage, spec: object = None) -> Description:
        self.calls += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.script:
                step = self.script.pop(0)
                if isinstance(step, Exception):
                    raise step
                return step
            return Description(
                f"{self.text} [{len(image.data)}]", self.model, usage=Usage(258, 12, 270)
            )
        finally:
            self.in_flight -= 1


def transient(message: str = "Gemini answered 503") -> TransientError:
    return TransientError(message)

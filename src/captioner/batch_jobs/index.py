"""The run's own request file as the one list of what apply may write.

An output line names an image; only an image that this job's request file asked about,
at the generation it asked about, with the spec it asked with, may receive the line's
answer. Whatever else the line carries (a key, a label) must agree with that request, or
the line is refused. The index keeps 16 bytes of digest and one integer per request, so a
job of 200,000 requests costs tens of megabytes, not the request file's size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from captioner.batch_jobs.keys import RequestKey, split_uri
from captioner.batch_jobs.outputs import MAX_LINE_BYTES, LineRefused, OutputLine, request_head
from captioner.batch_jobs.ports import Blobs
from captioner.captions import CaptionSpec

_SPECS_PER_RUN = 1 << 16  # an index packs (generation, spec number) into one integer


def _digest(uri: str) -> bytes:
    return hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Admitted:
    """A line that answers one of our requests: write its answer on ``key``."""

    key: RequestKey
    spec: CaptionSpec


class RequestIndex:
    """Every request of one job: image URI → (generation, spec)."""

    def __init__(self, specs: dict[str, CaptionSpec], bucket: str, prefix: str) -> None:
        self._fingerprints = sorted(specs)
        self._numbers = {fp: number for number, fp in enumerate(self._fingerprints)}
        self._specs = specs
        self._bucket = bucket
        self._prefix = prefix
        self._entries: dict[bytes, int] = {}
        self._answered: set[bytes] = set()
        self.unreadable = 0  # request lines not ours or outside the run: never admitted

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    async def read(
        cls,
        blobs: Blobs,
        shard_uri: str,
        specs: dict[str, CaptionSpec],
        *,
        bucket: str,
        prefix: str,
        batch_prefix: str,
    ) -> RequestIndex:
        index = cls(specs, bucket, prefix)
        shard_bucket, name = split_uri(shard_uri)
        async for _, raw in blobs.lines(shard_bucket, name, 0, MAX_LINE_BYTES):
            found = None if raw is None else request_head(raw)
            if found is None or not index._add(*found, batch_prefix=batch_prefix):
                index.unreadable += 1
        return index

    def _add(self, key: RequestKey, fingerprint: str, *, batch_prefix: str) -> bool:
        """Only what submit could have asked: this run's bucket and prefix, a known spec,
        never the run's own files, one request per image."""
        if (
            key.bucket != self._bucket
            or not key.name.startswith(self._prefix)
            or key.name.startswith(batch_prefix)
            or fingerprint not in self._specs
            or len(self._fingerprints) >= _SPECS_PER_RUN
        ):
            return False
        digest = _digest(key.uri)
        if digest in self._entries:
            return False
        number = self._numbers[fingerprint]
        self._entries[digest] = key.generation * _SPECS_PER_RUN + number
        return True

    def admit(self, line: OutputLine) -> Admitted:
        """The request this line answers; LineRefused when it answers none of ours, or
        contradicts the one it names, or one already answered in this pass."""
        digest = _digest(line.uri)
        packed = self._entries.get(digest)
        if packed is None:
            raise LineRefused("not-requested", f"{line.uri[:300]} is not in the job's requests")
        generation, number = divmod(packed, _SPECS_PER_RUN)
        bucket, name = split_uri(line.uri)
        key = RequestKey(bucket, name, generation)
        fingerprint = self._fingerprints[number]
        if line.key is not None and line.key != key.text:
            raise LineRefused("key-mismatch", f"its key {line.key[:300]!r} is not its image's")
        if line.label is not None and line.label != key.label:
            raise LineRefused("key-mismatch", f"its label {line.label[:80]!r} is not its image's")
        if line.spec is not None and line.spec != fingerprint:
            raise LineRefused("spec-mismatch", f"its spec {line.spec[:80]!r} was not asked")
        if digest in self._answered:
            raise LineRefused("duplicate-answer", f"{key.uri[:300]} was answered before")
        self._answered.add(digest)
        return Admitted(key, self._specs[fingerprint])

    @property
    def answered(self) -> int:
        return len(self._answered)

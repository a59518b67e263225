"""Where a run keeps its files, and its manifest (``jobs.json``): what it submitted.

Files under the run's folder can be planted or torn (the Vertex AI service agent, and
uploaders with create rights on the bucket, may write there), so nothing read back is
taken on trust: a manifest must describe the folder it lives in, its specs must hash to
their own fingerprints, and one that cannot be read spoils only its own run.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from captioner.batch_jobs.ports import Blobs
from captioner.captions import CaptionSpec
from captioner.errors import BadRequestError, PermanentError
from captioner.metadata import MetadataKeys

# new_run_id's form: a UTC timestamp and four hex digits.
RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")
_SHARD = re.compile(r"requests-([0-9]{5})\.jsonl")


def new_run_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def check_run_id(run: str) -> str:
    if not RUN_ID.fullmatch(run):
        raise BadRequestError(
            f"{run[:100]!r} is not a run id: submit names its run like 20261130-101500-ab12"
        )
    return run


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class JobEntry:
    name: str
    shard: str  # gs:// URI of the request file
    dest: str  # gs:// prefix Vertex AI writes the output under
    requests: int
    bytes: int


@dataclass
class Manifest:
    """``gs://<bucket>/<CAPTION_BATCH_PREFIX><run>/jobs.json``: what a run submitted."""

    run: str
    bucket: str
    prefix: str
    model: str
    created: str  # RFC 3339: an answer is never written over a caption made after it
    metadata_prefix: str
    languages: tuple[str, ...]
    overwrite: bool = False
    if_stale: bool = False
    specs: dict[str, CaptionSpec] = field(default_factory=dict)
    jobs: list[JobEntry] = field(default_factory=list)
    # Submitted with --include-human: apply may replace captions people wrote or approved.
    include_human: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "model": self.model,
            "created": self.created,
            "metadata_prefix": self.metadata_prefix,
            "languages": list(self.languages),
            "overwrite": self.overwrite,
            "if_stale": self.if_stale,
            "include_human": self.include_human,
            "specs": {
                fp: {
                    "prompt": s.prompt,
                    "structured": s.structured,
                    "languages": list(s.languages),
                    "rule": s.rule,
                }
                for fp, s in self.specs.items()
            },
            "jobs": [
                {
                    "name": j.name,
                    "shard": j.shard,
                    "dest": j.dest,
                    "requests": j.requests,
                    "bytes": j.bytes,
                }
                for j in self.jobs
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """A manifest read back; PermanentError("bad-manifest") for anything else."""
        try:
            manifest = cls._parse(data)
        except PermanentError:
            raise
        except Exception as exc:  # any shape of bad JSON: a wrong type anywhere
            message = f"a batch manifest cannot be read: {exc!r:.200}"
            raise PermanentError("bad-manifest", message) from None
        return manifest

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> Manifest:
        specs = {}
        for fp, s in data["specs"].items():
            spec = CaptionSpec(
                _text(s["prompt"]), _flag(s["structured"]), _texts(s["languages"]), _text(s["rule"])
            )
            if spec.fingerprint != fp:
                raise PermanentError(
                    "bad-manifest", f"spec {str(fp)[:20]!r} does not match its own fingerprint"
                )
            specs[fp] = spec
        jobs = [
            JobEntry(
                _text(j["name"]),
                _text(j["shard"]),
                _text(j["dest"]),
                _count(j["requests"]),
                _count(j["bytes"]),
            )
            for j in data["jobs"]
        ]
        languages = _texts(data["languages"])
        if not languages:
            raise ValueError("no languages")
        parse_time(_text(data["created"]))
        return cls(
            check_run_id(_text(data["run"])),
            _text(data["bucket"]),
            _text(data["prefix"]),
            _text(data["model"]),
            _text(data["created"]),
            _text(data["metadata_prefix"]),
            languages,
            _flag(data.get("overwrite", False)),
            _flag(data.get("if_stale", False)),
            specs,
            jobs,
            include_human=_flag(data.get("include_human", False)),
        )

    @property
    def keys(self) -> MetadataKeys:
        return MetadataKeys(self.metadata_prefix, self.languages)

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return tuple(_text(v) for v in value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count, got {value!r:.40}")
    return value


@dataclass(frozen=True, slots=True)
class RunPaths:
    """Where one run keeps its files, under ``gs://<bucket>/<batch prefix><run>/``."""

    bucket: str
    root: str  # e.g. "captioner-batch/20261130-101500-ab12/"

    @classmethod
    def of(cls, bucket: str, batch_prefix: str, run: str) -> RunPaths:
        return cls(bucket, f"{batch_prefix}{check_run_id(run)}/")

    @classmethod
    def from_shard(cls, shard_uri: str, batch_prefix: str) -> RunPaths:
        """The run a request shard belongs to (a job names its shard as its source): only
        ``gs://<bucket>/<batch prefix><run id>/requests-NNNNN.jsonl`` is one of ours."""
        bucket, _, name = shard_uri.removeprefix("gs://").partition("/")
        run, _, file = name.removeprefix(batch_prefix).partition("/")
        if not (
            shard_uri.startswith("gs://")
            and bucket
            and name.startswith(batch_prefix)
            and RUN_ID.fullmatch(run)
            and _SHARD.fullmatch(file)
        ):
            raise PermanentError("not-ours", f"{shard_uri[:300]} is not a captioner request file")
        return cls(bucket, f"{batch_prefix}{run}/")

    @property
    def run(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return f"gs://{self.bucket}/{self.root}"

    @property
    def manifest(self) -> str:
        return self.root + "jobs.json"

    def shard(self, index: int) -> str:
        return f"{self.root}requests-{index:05}.jsonl"

    def dest(self, index: int) -> str:
        return f"gs://{self.bucket}/{self.root}output-{index:05}/"

    def checkpoint(self, job: str) -> str:
        return f"{self.root}applied-{job.rsplit('/', 1)[-1]}.json"


async def read_manifest(blobs: Blobs, paths: RunPaths) -> Manifest:
    """The run's manifest, checked against the folder it was read from."""
    try:
        data = await blobs.read_json(paths.bucket, paths.manifest)
    except ValueError as exc:
        raise PermanentError(
            "bad-manifest", f"{paths.folder}jobs.json is not JSON: {str(exc)[:200]}"
        ) from None
    if data is None:
        raise BadRequestError(f"no batch run at {paths.folder}", status=404)
    manifest = Manifest.from_json(data)
    if manifest.bucket != paths.bucket or manifest.run != paths.run:
        raise PermanentError(
            "bad-manifest",
            f"{paths.folder}jobs.json describes run {manifest.run} of gs://{manifest.bucket}/, "
            "not the folder it is in",
        )
    return manifest


@dataclass(frozen=True, slots=True)
class BadRun:
    """A run whose manifest cannot be used: named and counted, the other runs go on."""

    paths: RunPaths
    problem: str


async def find_runs(
    blobs: Blobs, batch_prefix: str, bucket: str, prefix: str, run: str | None
) -> list[Manifest | BadRun]:
    """The runs stored for ``gs://bucket/prefix`` (every one, or the one named)."""
    if run is not None:
        folders = [RunPaths.of(bucket, batch_prefix, run)]
    else:
        folders = []
        for stored in sorted(await blobs.files(bucket, batch_prefix), key=lambda f: f.name):
            name, _, file = stored.name.removeprefix(batch_prefix).partition("/")
            if file == "jobs.json" and RUN_ID.fullmatch(name):
                folders.append(RunPaths.of(bucket, batch_prefix, name))
    found: list[Manifest | BadRun] = []
    for paths in folders:
        try:
            manifest = await read_manifest(blobs, paths)
        except PermanentError as exc:
            found.append(BadRun(paths, str(exc)))
            continue
        if run is not None or manifest.prefix.startswith(prefix):
            found.append(manifest)
    if not found:
        raise BadRequestError(
            f"no batch runs for gs://{bucket}/{prefix} under {batch_prefix}", status=404
        )
    return found

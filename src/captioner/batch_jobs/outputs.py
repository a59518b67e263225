"""Reading what a job wrote: which files are its answers, and what one line says.

Vertex AI documents that each output line holds the input ``request`` (echoed whole,
``labels`` included) with a ``response`` or an error ``status``; that it also copies the
other top-level fields of a Cloud Storage input line (our ``key`` and ``spec``) is what
the emulator does, not something Google's pages promise. Nothing here decides whether a
line may be written: ``index.RequestIndex`` does, against the run's own request file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from captioner.batch_jobs.keys import LABEL, RequestKey
from captioner.batch_jobs.ports import JobStatus, StoredFile

# The answer files of a job: ``predictions.jsonl`` (what Vertex AI writes for Gemini, and
# what BerriAI/litellm and Google's own notebooks read under outputInfo.gcsOutputDirectory)
# or ``predictions_0001.jsonl`` … (the OutputConfig reference's naming when the output is
# split), directly inside the directory Vertex AI named for the job.
_ANSWER_FILE = re.compile(r"predictions(_[0-9]{1,10})?\.jsonl")
# A file Vertex AI wrote for a job exists when the job ends. The slack covers the clocks
# of two Google services; a file created later than this was not the job's.
CLOCK_SLACK = timedelta(seconds=60)
# Our lines are a request (the prompt, one image URI) and an answer (a caption of at most
# a few hundred tokens): a few KiB. A longer line is not ours, and is skipped unread.
MAX_LINE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class OutputLine:
    """What one line claims. Every field is untrusted until checked against the index."""

    uri: str  # the gs:// image of the echoed request
    key: str | None  # top-level ``key`` (ours, if the service kept it)
    spec: str | None
    label: str | None  # ``request.labels["captioner-key"]``
    response: Mapping[str, Any] | None
    status: Any  # "" or None when the request succeeded


class LineRefused(ValueError):
    """A line that cannot be read as an answer to one of our requests."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_output_line(raw: bytes) -> OutputLine:
    """One line of ``predictions.jsonl``; LineRefused for anything that is not an
    answer naming one gs:// image (whatever exception the bytes would raise)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LineRefused("unreadable-line", f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise LineRefused("unreadable-line", "not a JSON object")
    request = data.get("request")
    uri = request_uri(request)
    if uri is None:
        raise LineRefused("no-image", "its request names no gs:// image")
    labels = request.get("labels") if isinstance(request, dict) else None
    label = labels.get(LABEL) if isinstance(labels, dict) else None
    response = data.get("response")
    key, spec = data.get("key"), data.get("spec")
    return OutputLine(
        uri=uri,
        key=key if isinstance(key, str) else None if key is None else repr(key),
        spec=spec if isinstance(spec, str) else None if spec is None else repr(spec),
        label=label if isinstance(label, str) else None if label is None else repr(label),
        response=response if isinstance(response, dict) and response else None,
        status=data.get("status") or None,
    )


def _field(data: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field of a request as sent (camelCase) or as Google's example output shows it
    echoed (snake_case: ``file_data``, ``file_uri``)."""
    return data.get(camel, data.get(snake))


def request_uri(request: Any) -> str | None:
    """The gs:// URI of the image in a GenerateContentRequest; None unless there is
    exactly one (ours hold one)."""
    if not isinstance(request, dict):
        return None
    found: list[str] = []
    contents = request.get("contents")
    for content in contents if isinstance(contents, list) else ():
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            file_data = _field(part, "fileData", "file_data") if isinstance(part, dict) else None
            if isinstance(file_data, dict):
                uri = _field(file_data, "fileUri", "file_uri")
                if isinstance(uri, str) and uri.startswith("gs://"):
                    found.append(uri)
    return found[0] if len(found) == 1 else None


def request_head(raw: bytes) -> tuple[RequestKey, str] | None:
    """The key and spec of one of our request lines, without parsing its request."""
    head, sep, _ = raw.partition(b', "request": ')
    try:
        data = json.loads(head + b"}") if sep else json.loads(raw)
        return RequestKey.parse(data["key"]), str(data["spec"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


@dataclass(frozen=True, slots=True)
class OutputFiles:
    """A job's answer files, and the files found beside them that are not (never read)."""

    answers: list[str]
    refused: dict[str, str]  # name → why it is not read


def answer_files(bucket: str, status: JobStatus, found: list[StoredFile]) -> OutputFiles:
    """Of the files under the job's output folder, those Vertex AI wrote as its answers:
    named as it names them, directly in the directory it named, and there before the job
    ended. ``found`` lists everything under the job's ``dest``."""
    directory = (status.output_dir or "").removeprefix(f"gs://{bucket}/").rstrip("/") + "/"
    answers, refused = [], {}
    for stored in sorted(found, key=lambda f: f.name):
        folder, _, file = stored.name.rpartition("/")
        if folder + "/" != directory or not _ANSWER_FILE.fullmatch(file):
            refused[stored.name] = "not an answer file Vertex AI named for the job"
        elif status.ended_at is not None and stored.created > status.ended_at + CLOCK_SLACK:
            refused[stored.name] = (
                f"created {stored.created.isoformat(timespec='seconds')}, after the job "
                f"ended ({status.ended_at.isoformat(timespec='seconds')})"
            )
        else:
            answers.append(stored.name)
    return OutputFiles(answers, refused)

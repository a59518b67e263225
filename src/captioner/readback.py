"""Captions read back from object metadata, for `captioner show` and `captioner export`.

One record per object, whatever wrote it: the caption keys of the configured
prefix and languages, and whether they describe the object's current bytes (the
``<prefix>-generation`` key equals the object's generation).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from captioner.domain import ObjectInfo
from captioner.metadata import APPROVED, HUMAN, MetadataKeys
from captioner.safe_text import csv_cell, for_terminal

CSV_FIELDS = (
    "source",
    "generation",
    "content_type",
    "size",
    "status",
    "current",
    "caption",
    "alt",
    "tags",
    "model",
    "created",
    "rule",
    "translations",
    "written_by",
    "review",
    "reviewed_by",
    "reviewed",
)


@dataclass(frozen=True, slots=True)
class CaptionRecord:
    source: str
    generation: int
    content_type: str
    size: int
    status: str
    current: bool
    caption: str | None = None
    alt: str | None = None
    tags: tuple[str, ...] = ()
    model: str | None = None
    created: str | None = None
    rule: str | None = None
    translations: Mapping[str, str] = field(default_factory=dict)
    # Who wrote ``caption``: "captioner" (the model ``model``; its status key is there
    # too), "person" (``reviewed_by``, through `captioner edit` or `review`), "owner" (the
    # owner's own key, which captioner never touches), None when there is no caption.
    written_by: str | None = None
    # A person's word on it: "edited" (they wrote it) or "approved" (the model's, as it
    # stands), who and when (RFC 3339); None when no person reviewed it.
    review: str | None = None
    reviewed_by: str | None = None
    reviewed: str | None = None


def record_of(info: ObjectInfo, keys: MetadataKeys) -> CaptionRecord:
    meta = info.metadata
    status = meta.get(keys.status) or "none"
    caption = meta.get(keys.caption)
    source = meta.get(keys.source) or None
    review = {HUMAN: "edited", APPROVED: "approved"}.get(source or "")
    written_by = None if caption is None else "owner" if status == "none" else "captioner"
    if written_by == "captioner" and review == "edited":
        written_by = "person"
    written_for = meta.get(keys.generation)
    tags = tuple(t.strip() for t in (meta.get(keys.tags) or "").split(",") if t.strip())
    return CaptionRecord(
        source=f"gs://{info.bucket}/{info.name}",
        generation=info.generation,
        content_type=info.content_type,
        size=info.size,
        status=status,
        current=written_for == str(info.generation),
        caption=caption,
        alt=meta.get(keys.alt),
        tags=tags,
        model=meta.get(keys.model),
        created=meta.get(keys.created),
        rule=meta.get(keys.rule),
        translations={
            code: text
            for code in keys.languages[1:]
            if (text := meta.get(keys.language(code))) is not None
        },
        written_by=written_by,
        review=review,
        reviewed_by=meta.get(keys.reviewed_by) or None if review else None,
        reviewed=meta.get(keys.reviewed) or None if review else None,
    )


def as_json(record: CaptionRecord) -> dict[str, Any]:
    """One JSON object; absent fields are null, so every line has the same columns
    (what BigQuery's JSON loader and pandas expect)."""
    return {
        "source": record.source,
        "generation": str(record.generation),
        "content_type": record.content_type,
        "size": record.size,
        "status": record.status,
        "current": record.current,
        "caption": record.caption,
        "alt": record.alt,
        "tags": list(record.tags),
        "model": record.model,
        "created": record.created,
        "rule": record.rule,
        "translations": dict(record.translations),
        "written_by": record.written_by,
        "review": record.review,
        "reviewed_by": record.reviewed_by,
        "reviewed": record.reviewed,
    }


def csv_header() -> str:
    return csv_line(CSV_FIELDS)


def csv_row(record: CaptionRecord) -> str:
    values = as_json(record)
    values["tags"] = ",".join(record.tags)
    values["current"] = "true" if record.current else "false"
    values["translations"] = ";".join(f"{k}={v}" for k, v in record.translations.items())
    return csv_line(
        "" if values[name] is None else csv_cell(str(values[name])) for name in CSV_FIELDS
    )


def as_text(record: CaptionRecord) -> str:
    """What `captioner show` prints for one object."""
    lines = [f"{record.source}  (generation {record.generation})"]
    if record.status == "none":
        never = "never captioned" if record.written_by is None else "not captioned by captioner"
        lines.append(f"  status:  none ({never})")
    else:
        lines.append(
            f"  status:  {record.status}" + ("" if record.current else " (for an older upload)")
        )
    owners = record.written_by == "owner"
    for label, value in (
        ("caption", f"{record.caption}  (the owner's own key)" if owners else record.caption),
        ("alt", record.alt),
        ("tags", ", ".join(record.tags) or None),
        ("by", who_wrote(record)),
        ("model", record.model if record.written_by != "captioner" else None),
        ("created", record.created),
    ):
        if value:
            lines.append(f"  {label + ':':<8} {value}")
    for code, text in record.translations.items():
        lines.append(f"  {code + ':':<8} {text}")
    return "\n".join(for_terminal(line) for line in lines)


def who_wrote(record: CaptionRecord) -> str | None:
    """Who wrote the caption, for people: the model, a person, or the model approved by one."""
    when = f", {record.reviewed}" if record.reviewed else ""
    person = record.reviewed_by or "a person"
    if record.written_by == "person":
        return f"{person} (a person{when})"
    if record.written_by == "captioner":
        model = f"{record.model or 'the model'} (model)"
        if record.review != "approved":
            return model
        return f"{model}, approved by {person}" + (f" ({record.reviewed})" if when else "")
    return None


def csv_line(values: Iterable[str]) -> str:
    # csv quotes commas, quotes and line breaks in captions; one row per call so the
    # export streams instead of holding the listing. CRLF as RFC 4180 has it: with a
    # "\n" terminator the csv module would leave a lone CR in a cell unquoted, and a
    # caption's CR would split its row in other readers.
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(list(values))
    return out.getvalue()

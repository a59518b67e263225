"""Putting objects into the emulated bucket and reading their metadata back, with the
independent google-cloud-storage client (not the code under test)."""

from __future__ import annotations

from typing import Any

from captioner.domain import ObjectRef


def upload(
    bucket: Any,
    name: str,
    data: bytes,
    content_type: str = "image/jpeg",
    metadata: dict[str, str] | None = None,
) -> ObjectRef:
    blob = bucket.blob(name)
    blob.metadata = metadata or None
    blob.upload_from_string(data, content_type=content_type)
    return ObjectRef(bucket.name, name, blob.generation, blob.metageneration)


def metadata(bucket: Any, name: str) -> dict[str, str]:
    """The object's custom metadata; {} when it has none or is gone."""
    blob = bucket.get_blob(name)
    return dict(blob.metadata or {}) if blob is not None else {}

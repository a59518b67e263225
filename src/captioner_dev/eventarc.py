"""Deliver ``object.v1.finalized`` CloudEvents the way Eventarc does (binary or structured)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

FINALIZED = "google.cloud.storage.object.v1.finalized"


def event_headers(bucket: str, name: str, *, event_id: str | None = None) -> dict[str, str]:
    return {
        "ce-id": event_id or uuid.uuid4().hex,
        "ce-specversion": "1.0",
        "ce-type": FINALIZED,
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-subject": f"objects/{name}",
        "ce-time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "Content-Type": "application/json",
    }


def _header_value(value: str) -> str:
    """CloudEvents HTTP binding: percent-encode space, '"', '%' and anything outside ASCII."""
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in '"%' else quote(c, safe="") for c in value
    )


def binary_event(
    resource: Mapping[str, Any], *, event_id: str | None = None
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode CloudEvent for a Cloud Storage object resource."""
    headers = event_headers(str(resource["bucket"]), str(resource["name"]), event_id=event_id)
    headers = {k: _header_value(v) if k.startswith("ce-") else v for k, v in headers.items()}
    return headers, json.dumps(dict(resource)).encode()


def structured_event(
    resource: Mapping[str, Any], *, event_id: str | None = None
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a structured-mode CloudEvent (``application/cloudevents+json``)."""
    ce = event_headers(str(resource["bucket"]), str(resource["name"]), event_id=event_id)
    envelope: dict[str, Any] = {
        key.removeprefix("ce-"): value for key, value in ce.items() if key.startswith("ce-")
    }
    envelope["datacontenttype"] = "application/json"
    envelope["data"] = dict(resource)
    return {"Content-Type": "application/cloudevents+json"}, json.dumps(envelope).encode()

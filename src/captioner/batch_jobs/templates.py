"""One request line per image: the online path's request body, rendered for a gs:// URI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from captioner.batch_jobs.keys import RequestKey
from captioner.captions import CaptionSpec


class RequestTemplate(Protocol):
    """The generateContent body for one spec, with the image's URI, type and key label
    to fill in."""

    def render(self, key: RequestKey, mime_type: str) -> str: ...


@dataclass(frozen=True, slots=True)
class JsonTemplate:
    """A request body serialized once, with placeholder strings where the image and the
    key's label go: rendering is a few string replacements, not a conversion per image."""

    text: str
    uri_placeholder: str = "__captioner_uri__"
    mime_placeholder: str = "__captioner_mime__"
    label_placeholder: str = "__captioner_label__"

    def render(self, key: RequestKey, mime_type: str) -> str:
        return (
            self.text.replace(
                json.dumps(self.uri_placeholder), json.dumps(key.uri, ensure_ascii=False)
            )
            .replace(json.dumps(self.mime_placeholder), json.dumps(mime_type))
            .replace(json.dumps(self.label_placeholder), json.dumps(key.label))
        )


def request_line(key: RequestKey, spec: CaptionSpec, body: str) -> bytes:
    """One line of a request shard: the key, the spec's hash and the request body."""
    head = json.dumps({"key": key.text, "spec": spec.fingerprint}, ensure_ascii=False)
    return (head[:-1] + ', "request": ' + body + "}\n").encode("utf-8")

"""What the stand-in records of each model request it answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRecord:
    mime_type: str
    size: int
    sha256: str

    @property
    def fingerprint(self) -> str:
        return self.sha256[:8]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint}


@dataclass
class RequestRecord:
    """What the stub saw of one model request, and how it answered (status 0 = pending)."""

    seq: int
    path: str
    api: str
    api_version: str
    model: str
    action: str
    api_key_present: bool
    bearer_present: bool
    received_at: float
    # The bearer token was one the stand-in's token endpoint issued (oauth.py).
    bearer_issued: bool = False
    service_tier: str = "standard"  # as the request asked (flex.py)
    images: list[ImageRecord] = field(default_factory=list)
    file_uris: list[str] = field(default_factory=list)
    prompt: str = ""
    system_instruction: str = ""
    generation_config: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    fault: str | None = None
    status: int = 0
    finish_reason: str | None = None
    answered_at: float | None = None
    # The usage the stub reported (0 until answered, or when it answered an error).
    prompt_tokens: int = 0
    image_tokens: int = 0
    thoughts_tokens: int = 0
    output_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = [image.to_json() for image in self.images]
        return data

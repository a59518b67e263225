"""What names the image a batch request describes, and which images can go in a batch.

A request carries its key three ways, because Google documents only some of what
survives into the output: our own top-level ``key`` (the emulator copies it; Google's
pages do not promise it), a ``labels`` entry inside the ``request`` (a documented field of
a Vertex AI generateContent request, echoed with the whole request in each output line),
and the image's ``gs://`` URI in the request itself. Whichever an output line keeps, it
is only ever checked against the run's own request file (``index.RequestIndex``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from captioner.decisions import Skip
from captioner.domain import ObjectInfo, ObjectRef

# The label that carries a request's key. Vertex AI label values are at most 63
# characters of lowercase letters, digits, '_' and '-' (GenerateContentRequest.labels,
# https://cloud.google.com/vertex-ai/docs/reference/rest/v1/projects.locations.endpoints/generateContent):
# a key (a bucket, an object name of up to 1,024 bytes and a generation) does not fit,
# so the label is a digest of it, mapped back through the request file.
LABEL = "captioner-key"
_LABEL_DIGEST_BYTES = 20  # 40 hex characters

# Image types Gemini reads from a fileData URI, and the largest such file. Vertex AI's
# image understanding page (https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/image-understanding,
# "Supported models", read 2026-12-03) lists image/png, jpeg, webp, heic and heif for every
# Gemini 2.5 and 3 model, and "Maximum file size per file from Google Cloud Storage: 30 MB".
# The online path converts the other types (GIF, BMP, TIFF, AVIF) and shrinks large files
# before sending; a batch request cannot, so those are left to `captioner backfill`.
MAX_URI_FILE_BYTES = 30 * 1000 * 1000
_GEMINI_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"}
)
_SUFFIX_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".heif": "image/heif",
}


@dataclass(frozen=True, slots=True)
class RequestKey:
    """Names the object and the generation a request describes: ``gs://b/name#123``."""

    bucket: str
    name: str
    generation: int

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @property
    def text(self) -> str:
        return f"{self.uri}#{self.generation}"

    @property
    def label(self) -> str:
        """The key as a Vertex AI label value (a digest: see LABEL)."""
        digest = hashlib.blake2b(self.text.encode("utf-8"), digest_size=_LABEL_DIGEST_BYTES)
        return digest.hexdigest()

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.bucket, self.name, self.generation)

    @classmethod
    def parse(cls, text: str) -> RequestKey:
        """The inverse of ``text``; names may hold ``#``, the generation is the last part."""
        if not text.startswith("gs://"):
            raise ValueError(f"not a request key: {text[:100]!r}")
        where, sep, generation = text[len("gs://") :].rpartition("#")
        bucket, slash, name = where.partition("/")
        if not (sep and slash and bucket and name and generation.isdigit()):
            raise ValueError(f"not a request key: {text[:100]!r}")
        return cls(bucket, name, int(generation))


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/name`` → (bucket, name); ValueError for anything else."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri[:100]!r}")
    bucket, slash, name = uri[len("gs://") :].partition("/")
    if not (bucket and slash):
        raise ValueError(f"not a gs://bucket/name URI: {uri[:100]!r}")
    return bucket, name


def batch_mime_type(info: ObjectInfo) -> str | None:
    """The MIME type to send for this object, or None when Gemini cannot read it as is."""
    content_type = info.content_type.split(";")[0].strip().lower()
    if content_type in _GEMINI_IMAGE_TYPES:
        return content_type
    if content_type.startswith("image/"):
        return None
    suffix = "." + info.name.rsplit(".", 1)[-1].lower() if "." in info.name else ""
    return _SUFFIX_TYPES.get(suffix)


def online_only(info: ObjectInfo, max_bytes: int) -> Skip | None:
    """Why an image that needs a caption cannot go in a batch request (the online
    backfill records or converts these), or None when it can."""
    if info.size == 0:
        return Skip("online-only", "empty: `captioner backfill` records it as error:empty")
    if info.size > max_bytes:
        return Skip("online-only", f"{info.size} bytes is over CAPTION_MAX_BYTES")
    if info.size > MAX_URI_FILE_BYTES:
        return Skip("online-only", f"{info.size} bytes is over Vertex AI's 30 MB per gs:// file")
    if batch_mime_type(info) is None:
        return Skip("online-only", f"Gemini does not read {info.content_type!r} as is")
    return None

"""A local, offline stand-in for the Gemini ``generateContent`` REST API.

The unmodified google-genai client talks to it through ``GOOGLE_GEMINI_BASE_URL`` or
``HttpOptions(base_url=...)``. It exists so that tests, the demo and benchmarks can run without
network access or billing, while still exercising the real SDK's wire format, error mapping and
timeouts. Captions are honest about being fake: they describe only what Pillow can compute
offline, and end with a fingerprint of the exact image bytes so callers can check that every
object got the caption for its own image.

Python use::

    async with GeminiStub() as stub:
        stub.add_fault("429", count=1, retry_delay=7)
        client = genai.Client(api_key="x", http_options=HttpOptions(base_url=stub.base_url))

Synchronous fixtures use ``GeminiStub().start_in_thread()``; other processes use the CLI
(``python -m captioner_dev.gemini_server --port 0``) and the ``/_stub/*`` control endpoints.

The package, by concern:

- ``config``: fault rules, the latency model, limits; ``state``: settings and the request log;
- ``wire``: the REST wire format (paths, parsing, responses); ``errors``: the real error shapes;
- ``images``: image facts; ``tokens``: image and thinking tokens per model family;
  ``schema``: answer text and the response-schema filler;
- ``answer``: answering one parsed request (shared by the online route and batch);
- ``server``: the server, its ``/_stub/*`` control routes and the thread helper;
- ``cli``: the command line.
"""

from captioner_dev.gemini_server.cli import main
from captioner_dev.gemini_server.config import (
    FAULT_KINDS,
    FaultKind,
    FaultRule,
    LatencyModel,
    StubConfigError,
)
from captioner_dev.gemini_server.images import ImageFacts, describe_image_bytes
from captioner_dev.gemini_server.records import ImageRecord, RequestRecord
from captioner_dev.gemini_server.server import GeminiStub, GeminiStubThread
from captioner_dev.gemini_server.tokens import (
    ModelFamily,
    image_tokens,
    image_tokens_for,
    thinking_tokens_for,
)

__all__ = [
    "FAULT_KINDS",
    "FaultKind",
    "FaultRule",
    "GeminiStub",
    "GeminiStubThread",
    "ImageFacts",
    "ImageRecord",
    "LatencyModel",
    "ModelFamily",
    "RequestRecord",
    "StubConfigError",
    "describe_image_bytes",
    "image_tokens",
    "image_tokens_for",
    "main",
    "thinking_tokens_for",
]

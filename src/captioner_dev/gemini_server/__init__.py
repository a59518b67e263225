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
- ``batch``, ``batch_run``, ``batch_http``: the Vertex AI batch prediction emulator;
- ``cli``: the command line.

Batch prediction (Vertex AI only, as google-genai's ``client.aio.batches`` calls it with
``vertexai=True``, a project, a location and ``HttpOptions(base_url=stub.base_url)``):

- Emulated: ``create`` (``src="gs://….jsonl"``, ``dest="gs://…/"``), ``get`` (full name or
  numeric ID), ``list`` (pages; ``filter`` ignored), ``cancel`` and ``delete``; the states
  QUEUED → PENDING → RUNNING → SUCCEEDED, each stage ``stub.batch`` ``stage_seconds`` long
  (0.05 s by default), CANCELLING → CANCELLED, FAILED, PARTIALLY_SUCCEEDED and EXPIRED on
  request. A job reads its JSONL and the ``gs://`` images of ``fileData`` parts from
  fake-gcs-server (``STORAGE_EMULATOR_HOST``, or ``stub.batch.storage_endpoint``), answers each
  line exactly as an online ``generateContent`` call (captions, tokens, finish reasons, online
  fault kinds) and writes ``<outputUriPrefix>/prediction-model-<create time>/predictions.jsonl``,
  a line per input line with ``status``, ``processed_time`` and ``response``.
- Controls: ``stub.batch.add_line_fault(kind, match=…)`` (a FaultRule for batch lines only: an
  error kind becomes the line's ``status``), ``stub.batch.add_job_fault("FAILED" |
  "PARTIALLY_SUCCEEDED" | "EXPIRED", match=…)``, ``stub.batch.configure(stage_seconds=…)``;
  ``GET``/``POST /_stub/batch`` over HTTP. ``stub.batch.jobs`` records each job with a
  RequestRecord per line (batch lines are not in ``stub.requests`` nor ``stub.calls``).
- Not emulated: BigQuery input or output, wildcards in input URIs, the Gemini Developer API's
  own batch mode (``batches/…``, inline requests), several output files or ``errors_*`` files,
  quotas, the online latency model, IAM (any bearer token works, though a Vertex AI request
  without one is 401, as the real service answers; ``POST /token`` issues tokens to
  service-account keys whose ``token_uri`` points here, see oauth.py), the 200,000-request and
  1 GB limits, jobs surviving a restart of the stand-in. The exact text of a failed line's
  ``status`` is the stand-in's own (``"<HTTP reason>: <the online error JSON>"``).
"""

from captioner_dev.gemini_server.batch import BatchJob, BatchJobFault
from captioner_dev.gemini_server.batch_http import BatchEmulator
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
    "BatchEmulator",
    "BatchJob",
    "BatchJobFault",
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

"""The product's error classification against each real Gemini error shape, as the
stand-in sends them (the stand-in's own tests are in tests/dev_stack/)."""

from __future__ import annotations

from typing import Any

import pytest
from google import genai
from google.genai import errors

from captioner_dev.gemini_server import GeminiStub

MODEL = "gemini-2.5-flash"


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [
        ("bad_key", "ConfigurationError"),
        ("failed_precondition", "ConfigurationError"),
        ("429", "TransientError"),
        ("429_per_day", "DailyQuotaError"),
        ("429_vertex", "TransientError"),
        ("499", "TransientError"),
        ("504", "TransientError"),
    ],
)
async def test_the_product_classifies_each_real_error_shape(
    stub: GeminiStub, client: genai.Client, kind: Any, outcome: str
) -> None:
    from captioner.adapters.gemini_errors import classify

    stub.add_fault(kind, count=1, retry_delay=3)
    with pytest.raises(errors.APIError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="hi")

    classified = classify(caught.value)
    assert type(classified).__name__ == outcome
    if kind == "429":
        assert getattr(classified, "retry_after", None) == 3.0

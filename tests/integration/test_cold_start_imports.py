"""What main.py loads before functions-framework listens (issue 16: the first request
pays no imports), by the function Cloud Run says it serves (FUNCTION_TARGET). The image
adapter (Pillow's plugins, pillow-heif) is not loaded in the function's process: images are
decoded in worker processes (issue 22), started on the first image. (google-genai
imports PIL.Image itself.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WATCHED = (
    "captioner.edges.http_api",
    "captioner.adapters.gemini",
    "captioner.adapters.images",
    "pillow_heif",
)


def _loaded_after_importing_main(target: str | None) -> dict[str, bool]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CAPTION_", "FUNCTION_")) and k != "PYTHONPATH"
    }
    env["GEMINI_API_KEY"] = "test-key"  # the client is made before listening
    if target is not None:
        env["FUNCTION_TARGET"] = target
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('main', 'main.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"print(json.dumps({{name: name in sys.modules for name in {WATCHED!r}}}))\n"
        "print(json.dumps(module.RUNTIME._ready_client is not None))\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 0, process.stderr[-3000:]
    loaded_line, client_line = process.stdout.strip().splitlines()[-2:]
    loaded: dict[str, bool] = json.loads(loaded_line)
    loaded["client"] = json.loads(client_line)
    return loaded


@pytest.mark.parametrize("target", ["caption_http", None])
def test_an_http_instance_imports_the_http_edge_and_makes_its_client_before_listening(
    target: str | None,
) -> None:
    loaded = _loaded_after_importing_main(target)
    assert loaded == {
        "captioner.edges.http_api": True,
        "captioner.adapters.gemini": True,
        "captioner.adapters.images": False,  # decoding is the workers' job
        "pillow_heif": False,
        "client": True,
    }


def test_an_upload_instance_preloads_its_adapters_but_not_the_http_edge() -> None:
    loaded = _loaded_after_importing_main("caption_on_upload")
    assert loaded == {
        "captioner.edges.http_api": False,  # 30-50 ms it would add to every cold start
        "captioner.adapters.gemini": True,
        "captioner.adapters.images": False,
        "pillow_heif": False,
        "client": True,
    }

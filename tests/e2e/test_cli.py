"""``python -m captioner`` as users run it, against the local stack."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from captioner_dev.functions import REPO
from tests import images


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "captioner", *args],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_describe_prints_a_caption_per_photo_in_a_folder(
    stack_env: dict[str, str], gemini: Any
) -> None:
    completed = run_cli(stack_env, "describe", str(images.PHOTOS))
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 7
    assert any(
        "chelsea.jpg\tOffline stand-in caption: a landscape 451x300" in line for line in lines
    )
    assert "done 7, skipped 0, blocked 0, failed 0" in completed.stderr
    assert "images/s" in completed.stderr
    assert "\r" not in completed.stderr  # no progress bar when not on a terminal


def test_describe_json_output_is_one_object_per_line(
    stack_env: dict[str, str], gemini: Any, tmp_path: Path
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(images.encode(images.solid((30, 20)), "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    completed = run_cli(stack_env, "describe", "--json", str(good), str(bad))
    assert completed.returncode == 1  # something failed
    entries = [json.loads(line) for line in completed.stdout.splitlines()]
    by_source = {e["source"]: e for e in entries[:-1]}
    assert by_source[str(good)]["status"] == "ok"
    assert by_source[str(bad)]["reason"] == "not-an-image"
    assert entries[-1]["totals"]["error"] == 1


def test_backfill_is_resumable_and_a_second_run_calls_gemini_never(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    for i in range(25):
        bucket.blob(f"archive/{i:03}.png").upload_from_string(
            images.encode(images.solid((20 + i, 20)), "PNG"), content_type="image/png"
        )
    target = f"gs://{bucket.name}/archive/"
    dry = run_cli(stack_env, "backfill", target, "--dry-run")
    assert "would caption 25" in dry.stderr
    # 25 x one 258-token tile at the default model, thinking off: an estimate, no call.
    assert "estimated tokens:" in dry.stderr
    assert "(6450 image), 0 thinking" in dry.stderr
    assert gemini.calls == 0

    first = run_cli(stack_env, "backfill", target, "--concurrency", "8")
    assert first.returncode == 0, first.stderr
    assert "done 25, skipped 0" in first.stderr
    assert "in 25 Gemini calls" in first.stderr  # the tokens Gemini reported, added up
    assert gemini.calls == 25

    second = run_cli(stack_env, "backfill", target)
    assert second.returncode == 0
    assert "done 0, skipped 25" in second.stderr
    assert gemini.calls == 25
    assert bucket.get_blob("archive/007.png").metadata["caption-status"] == "ok"


def test_backfill_exits_non_zero_when_an_image_fails(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    bucket.blob("mixed/ok.jpg").upload_from_string(images.photo(), content_type="image/jpeg")
    bucket.blob("mixed/broken.jpg").upload_from_string(
        images.truncated_jpeg(), content_type="image/jpeg"
    )
    completed = run_cli(stack_env, "backfill", f"gs://{bucket.name}/mixed/")
    assert completed.returncode == 1
    assert "done 1, skipped 0, blocked 0, failed 1" in completed.stderr
    assert "broken.jpg\terror (corrupt-image)" in completed.stdout


def test_progress_bar_shows_on_a_terminal(stack_env: dict[str, str], gemini: Any) -> None:
    """Run under a pseudo-terminal and read what a person would see."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the CLI, on a 120-column terminal
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(REPO)
        env = {**os.environ, **stack_env, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "120"}
        os.execve(
            sys.executable, [sys.executable, "-m", "captioner", "describe", str(images.PHOTOS)], env
        )
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "7/7" in text
    assert "img/s" in text
    assert "done 7" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["backfill", "s3://x"], "give gs://bucket"),
        (["describe", "/no/such/file.jpg"], "no such file"),
        (["describe", "x.jpg", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    stack_env: dict[str, str], args: list[str], message: str
) -> None:
    completed = run_cli(stack_env, *args)
    assert completed.returncode == 2
    assert message in completed.stderr


def test_backfill_of_a_missing_bucket_says_so(stack_env: dict[str, str], gcs: Any) -> None:
    completed = run_cli(stack_env, "backfill", "gs://no-such-bucket-here/")
    assert completed.returncode == 2
    assert "no such bucket: gs://no-such-bucket-here/" in completed.stderr


def test_no_api_key_is_one_line_naming_the_variables_and_exit_2(
    stack_env: dict[str, str],
) -> None:
    env = {k: v for k, v in {**os.environ, **stack_env}.items() if "API_KEY" not in k}
    completed = subprocess.run(
        [sys.executable, "-m", "captioner", "describe", str(images.PHOTOS / "chelsea.jpg")],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        "error: no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use Vertex AI "
        "with GOOGLE_GENAI_USE_VERTEXAI=true and GOOGLE_CLOUD_PROJECT"
    ]  # no traceback, no unclosed-session warning


def test_no_google_credentials_names_the_gcloud_command_and_exit_2(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in {**os.environ, **stack_env}.items() if k != "STORAGE_EMULATOR_HOST"}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "missing.json")
    completed = subprocess.run(
        [sys.executable, "-m", "captioner", "backfill", "gs://bucket/", "--dry-run"],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert len(completed.stderr.splitlines()) == 1, completed.stderr
    assert "gcloud auth application-default login" in completed.stderr


def test_describe_of_a_bucket_path_points_to_backfill(stack_env: dict[str, str]) -> None:
    completed = run_cli(stack_env, "describe", "gs://bucket/photo.jpg")
    assert completed.returncode == 2
    assert "captioner backfill gs://" in completed.stderr


def test_output_closed_early_ends_quietly_with_141(
    stack_env: dict[str, str], gemini: Any, tmp_path: Path
) -> None:
    for i in range(40):
        (tmp_path / f"{i:02}.png").write_bytes(images.encode(images.solid((20 + i, 20)), "PNG"))
    command = [sys.executable, "-m", "captioner", "describe", str(tmp_path)]
    with subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **stack_env, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.readline()  # `| head -1`: read one line, then close the pipe
        process.stdout.close()
        stderr = process.stderr.read().decode()
        returncode = process.wait(timeout=120)
    assert returncode == 141
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr


def test_version_prints_the_package_version(stack_env: dict[str, str]) -> None:
    from captioner import __version__

    completed = run_cli(stack_env, "--version")
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"captioner {__version__}"


def test_backfill_if_stale_recaptions_after_the_prompt_changes(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    for i in range(4):
        bucket.blob(f"prompt/{i}.png").upload_from_string(
            images.encode(images.solid((30 + i, 20)), "PNG"), content_type="image/png"
        )
    target = f"gs://{bucket.name}/prompt/"
    assert run_cli(stack_env, "backfill", target).returncode == 0
    assert gemini.calls == 4
    changed = {**stack_env, "CAPTION_PROMPT": "Describe this product photo for a shop."}

    dry = run_cli(changed, "backfill", target, "--if-stale", "--dry-run")
    assert "would caption 4" in dry.stderr
    again = run_cli(changed, "backfill", target, "--if-stale")
    assert again.returncode == 0, again.stderr
    assert "done 4, skipped 0" in again.stderr
    assert gemini.calls == 8
    unchanged = run_cli(changed, "backfill", target, "--if-stale")
    assert "done 0, skipped 4 (4 already-captioned)," in unchanged.stderr
    assert gemini.calls == 8


def test_describe_reads_an_image_from_stdin(stack_env: dict[str, str], gemini: Any) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "captioner", "describe", "-"],
        cwd=REPO,
        env={**os.environ, **stack_env, "PYTHONPATH": str(REPO / "src")},
        input=images.photo("chelsea.jpg"),
        capture_output=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.decode().startswith("-\tOffline stand-in caption: a landscape 451x300")


def test_model_and_prompt_flags_override_the_settings_for_the_run(
    stack_env: dict[str, str], gemini: Any
) -> None:
    completed = run_cli(
        stack_env,
        "describe",
        "--model",
        "gemini-2.5-flash-lite",
        "--prompt",
        "Name the animal.",
        str(images.PHOTOS / "chelsea.jpg"),
    )
    assert completed.returncode == 0, completed.stderr
    (request,) = gemini.requests
    assert request.model == "gemini-2.5-flash-lite"
    assert "Name the animal." in request.prompt


def test_show_prints_the_captions_stored_on_objects(
    stack_env: dict[str, str], gemini: Any, bucket: Any
) -> None:
    bucket.blob("show/cat #1.jpg").upload_from_string(
        images.photo("chelsea.jpg"), content_type="image/jpeg"
    )
    bucket.blob("show/new.png").upload_from_string(
        images.encode(images.solid((20, 20)), "PNG"), content_type="image/png"
    )
    assert run_cli(stack_env, "backfill", f"gs://{bucket.name}/show/cat").returncode == 0
    text = run_cli(stack_env, "show", f"gs://{bucket.name}/show/cat #1.jpg")
    assert text.returncode == 0, text.stderr
    assert "status:  ok" in text.stdout
    assert "caption: Offline stand-in caption: a landscape 451x300" in text.stdout

    as_json = run_cli(
        stack_env,
        "show",
        "--json",
        f"gs://{bucket.name}/show/cat #1.jpg",
        f"gs://{bucket.name}/show/new.png",
        f"gs://{bucket.name}/show/missing.png",
    )
    assert as_json.returncode == 1  # one of them does not exist
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "none"]
    assert records[0]["current"] is True
    assert records[1]["caption"] is None
    assert "missing.png\tno such object" in as_json.stderr


def test_export_streams_jsonl_and_csv_and_an_html_page(
    stack_env: dict[str, str], gemini: Any, bucket: Any, tmp_path: Path
) -> None:
    import csv

    for name in ("a.jpg", 'b, "quoted".png'):
        data = (
            images.photo("chelsea.jpg")
            if name.endswith("jpg")
            else images.encode(images.solid((30, 20)), "PNG")
        )
        bucket.blob(f"exp/{name}").upload_from_string(
            data, content_type="image/jpeg" if name.endswith("jpg") else "image/png"
        )
    bucket.blob("exp/notes.txt").upload_from_string(b"x", content_type="text/plain")
    assert run_cli(stack_env, "backfill", f"gs://{bucket.name}/exp/").returncode == 0
    target = f"gs://{bucket.name}/exp/"

    jsonl = run_cli(stack_env, "export", target)
    assert jsonl.returncode == 0, jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert {r["source"].rsplit("/", 1)[1] for r in rows} == {"a.jpg", 'b, "quoted".png'}
    assert all(r["status"] == "ok" and r["caption"] for r in rows)
    assert "exported 2 images" in jsonl.stderr

    out = tmp_path / "captions.csv"
    page = tmp_path / "page.html"
    both = run_cli(
        stack_env, "export", target, "--format", "csv", "-o", str(out), "--html", str(page)
    )
    assert both.returncode == 0, both.stderr
    with out.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert {row["source"].rsplit("/", 1)[1] for row in table} == {"a.jpg", 'b, "quoted".png'}
    assert all(row["caption"].startswith("Offline stand-in caption") for row in table)
    html = page.read_text()
    assert html.count("<figure>") == 2
    assert html.count('src="data:image/') == 2
    assert "b, &quot;quoted&quot;.png" in html.replace("<wbr>", "")  # names are escaped


def test_a_key_gemini_refuses_stops_the_run_with_one_line_and_exit_2(
    stack_env: dict[str, str], gemini: Any
) -> None:
    completed = run_cli(
        {**stack_env, "GEMINI_API_KEY": "bad-key-123"}, "describe", str(images.PHOTOS)
    )
    assert completed.returncode == 2
    (line,) = completed.stderr.splitlines()
    assert line.startswith("error: ")
    assert "API_KEY_INVALID" in line or "API key not valid" in line
    assert completed.stdout == ""  # no image is reported as failed


def test_a_loopback_url_is_refused_with_the_setting_that_allows_it(
    stack_env: dict[str, str], gemini: Any
) -> None:
    completed = run_cli(stack_env, "describe", "http://127.0.0.1:9/cat.jpg")
    assert completed.returncode == 1
    assert "blocked-address" in completed.stdout
    assert "CAPTION_URL_ALLOWED_HOSTS" in completed.stdout
    assert gemini.calls == 0


def test_describe_a_folder_of_iphone_heic_avif_tiff_and_bmp_files(
    stack_env: dict[str, str], gemini: Any, tmp_path: Path
) -> None:
    suffixes = {"heic": "HEIC", "avif": "avif", "tiff-cmyk": "tif", "bmp": "bmp"}
    for kind, suffix in suffixes.items():
        data, _ = images.other_formats()[kind]
        (tmp_path / f"IMG_{kind}.{suffix}").write_bytes(data)
    completed = run_cli(stack_env, "describe", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("Offline stand-in caption") == 4
    assert gemini.calls == 4

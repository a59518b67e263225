"""`captioner review` keeps its page the reviewer's alone: 127.0.0.1 only, a token in the
URL, CSRF-checked writes, no other Host, nothing written in --read-only (no browser
needed: these are the requests a hostile page or a neighbour would send)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
import requests

from captioner_dev.gcs import free_port
from tests import images
from tests.e2e.test_cli import run_cli
from tests.objects import metadata, upload
from tests.review_server import Review, review


def listening_on(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port`` (Linux's /proc/net)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            pytest.skip("no /proc/net here")
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    packed = bytes.fromhex(address)[::-1] if len(address) == 8 else None
                    found.append(socket.inet_ntoa(packed) if packed else address)
    return found


def session(server: Review) -> requests.Session:
    """A browser-like session: the token exchanged for the cookie, as the page does."""
    client = requests.Session()
    first = client.get(server.url, allow_redirects=False, timeout=10)
    assert first.status_code == 303
    assert first.headers["Location"] == "/"
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    return client


def csrf_of(client: requests.Session, server: Review) -> str:
    html = client.get(server.base + "/", timeout=10).text
    marker = '<meta name="captioner-csrf" content="'
    return html.split(marker, 1)[1].split('"', 1)[0]


def save_body(bucket: Any, name: str, caption: str) -> dict[str, Any]:
    blob = bucket.get_blob(name)
    return {
        "name": name,
        "generation": str(blob.generation),
        "metageneration": str(blob.metageneration),
        "caption": caption,
    }


@pytest.fixture
def captioned(stack_env: dict[str, str], gemini: Any, bucket: Any) -> str:
    upload(bucket, "safe/cat.jpg", images.photo())
    assert run_cli(stack_env, "backfill", f"gs://{bucket.name}/safe/").returncode == 0
    return str(metadata(bucket, "safe/cat.jpg")["caption"])


def test_the_server_listens_on_loopback_only_and_opens_with_its_token_alone(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    port = free_port()
    with review(stack_env, f"gs://{bucket.name}/safe/", "--port", str(port)) as server:
        assert server.base == f"http://127.0.0.1:{port}"  # --port, on loopback
        assert len(server.token) >= 40
        for url in (server.base + "/", server.base + "/?token=guess", server.base + "/api/items"):
            refused = requests.get(url, timeout=10, allow_redirects=False)
            assert refused.status_code == 403, url
            assert captioned not in refused.text
        client = session(server)
        listed = client.get(server.base + "/api/items", timeout=10).json()
        assert [item["name"] for item in listed["items"]] == ["safe/cat.jpg"]
        # What the kernel says is listening on that port: 127.0.0.1, and nothing else.
        assert listening_on(port) == ["127.0.0.1"]


def test_a_host_other_than_loopback_is_refused_as_dns_rebinding(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    with review(stack_env, f"gs://{bucket.name}/safe/") as server:
        # With the token itself: a rebinding page would not have it, but the Host alone
        # must be enough to refuse.
        rebound = requests.get(
            server.base + "/api/items",
            params={"token": server.token},
            headers={"Host": f"evil.example:{server.port}"},
            timeout=10,
        )
        assert rebound.status_code == 403
        assert "127.0.0.1 only" in rebound.json()["error"]
        assert captioned not in rebound.text
        # (A cookie jar matches on the Host header: the token goes in the URL here.)
        same = requests.get(
            server.base + "/api/items",
            params={"token": server.token},
            headers={"Host": f"localhost:{server.port}"},
            timeout=10,
        )
        assert same.status_code == 200
        assert same.json()["items"][0]["caption"] == captioned


def test_writes_need_the_csrf_token_a_json_body_and_this_origin(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    with review(stack_env, f"gs://{bucket.name}/safe/", "--by", "ana") as server:
        client = session(server)
        csrf = csrf_of(client, server)
        body = save_body(bucket, "safe/cat.jpg", "Forged words")
        url = server.base + "/api/save"
        forged = [
            {"json": body},  # no CSRF token: what another site's fetch or form sends
            {"json": body, "headers": {"X-Captioner-CSRF": "guess"}},
            {"data": json.dumps(body), "headers": {"X-Captioner-CSRF": csrf,
                                                   "Content-Type": "text/plain"}},
            {"json": body, "headers": {"X-Captioner-CSRF": csrf,
                                       "Origin": "http://evil.example"}},
            {"json": body, "headers": {"X-Captioner-CSRF": csrf, "Sec-Fetch-Site": "cross-site"}},
        ]  # fmt: skip
        for attempt in forged:
            answer = client.post(url, timeout=10, **attempt)  # type: ignore[arg-type]
            assert answer.status_code == 403, attempt
        assert metadata(bucket, "safe/cat.jpg")["caption"] == captioned
        # Without the cookie, the CSRF token alone is not enough either.
        bare = requests.post(url, json=body, headers={"X-Captioner-CSRF": csrf}, timeout=10)
        assert bare.status_code == 403
        assert metadata(bucket, "safe/cat.jpg")["caption"] == captioned

        real = client.post(
            url,
            json=body,
            headers={"X-Captioner-CSRF": csrf, "Origin": server.base},
            timeout=10,
        )
        assert real.status_code == 200, real.text
        meta = metadata(bucket, "safe/cat.jpg")
        assert (meta["caption"], meta["caption-source"]) == ("Forged words", "human")
        assert meta["caption-reviewed-by"] == "ana"


def test_every_answer_carries_a_policy_that_runs_only_the_servers_own_scripts(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    with review(stack_env, f"gs://{bucket.name}/safe/") as server:
        client = session(server)
        for path in ("/", "/api/items", "/static/review.js"):
            answer = client.get(server.base + path, timeout=10)
            assert answer.status_code == 200, path
            policy = answer.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy
            assert "default-src 'none'" in policy
            assert answer.headers["X-Frame-Options"] == "DENY"
        script = client.get(server.base + "/static/review.js", timeout=10).text
        assert "innerHTML" not in script.replace("no innerHTML anywhere", "")
        assert client.get(server.base + "/static/../server.py", timeout=10).status_code == 404


def test_read_only_refuses_every_write_with_a_valid_token(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    with review(stack_env, f"gs://{bucket.name}/safe/", "--read-only") as server:
        client = session(server)
        csrf = csrf_of(client, server)
        headers = {"X-Captioner-CSRF": csrf, "Origin": server.base}
        for path, body in (
            ("/api/save", save_body(bucket, "safe/cat.jpg", "Not allowed")),
            ("/api/save", {**save_body(bucket, "safe/cat.jpg", ""), "approve": True}),
            ("/api/recaption", save_body(bucket, "safe/cat.jpg", "")),
        ):
            answer = client.post(server.base + path, json=body, headers=headers, timeout=10)
            assert answer.status_code == 403, path
            assert "read-only" in answer.json()["error"]
        meta = metadata(bucket, "safe/cat.jpg")
        assert meta["caption"] == captioned
        assert "caption-source" not in meta
        # Looking still works: the listing and the thumbnails.
        item = client.get(server.base + "/api/items", timeout=10).json()["items"][0]
        thumb = client.get(
            server.base + "/thumb",
            params={"name": item["name"], "generation": item["generation"]},
            timeout=30,
        )
        assert thumb.status_code == 200
        assert thumb.headers["Content-Type"].startswith("image/")


def test_the_page_can_reach_no_object_outside_its_prefix(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    upload(bucket, "private/secret.jpg", images.photo("coffee.jpg"))
    with review(stack_env, f"gs://{bucket.name}/safe/") as server:
        client = session(server)
        csrf = csrf_of(client, server)
        outside = client.get(
            server.base + "/thumb",
            params={"name": "private/secret.jpg", "generation": "1"},
            timeout=10,
        )
        assert outside.status_code == 400
        body = save_body(bucket, "private/secret.jpg", "Mine now")
        written = client.post(
            server.base + "/api/save", json=body, headers={"X-Captioner-CSRF": csrf}, timeout=10
        )
        assert written.status_code == 400
        assert metadata(bucket, "private/secret.jpg") == {}


def test_review_mistakes_exit_2_with_one_line(
    stack_env: dict[str, str], bucket: Any, captioned: str
) -> None:
    missing = run_cli(stack_env, "review", "gs://no-such-bucket-here/", "--no-browser")
    assert missing.returncode == 2
    assert "no such bucket" in missing.stderr
    for port in ("70000", "http"):
        bad = run_cli(stack_env, "review", f"gs://{bucket.name}/", "--port", port)
        assert bad.returncode == 2
        assert "--port" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = run_cli(stack_env, "review", f"gs://{bucket.name}/", "--no-browser", "--port", port)
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr


def test_without_no_browser_the_page_opens_in_the_browser_named_by_browser(
    stack_env: dict[str, str], bucket: Any, captioned: str, tmp_path: Any
) -> None:
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf %s "$1" > "{opened}"\n')
    browser.chmod(0o755)
    env = {**stack_env, "BROWSER": f"{browser} %s"}
    with review(env, f"gs://{bucket.name}/safe/", browser=True) as server:
        deadline = time.monotonic() + 20
        while not opened.exists() or not opened.read_text():
            assert time.monotonic() < deadline, "the browser was never started"
            time.sleep(0.1)
        assert opened.read_text() == server.url  # the page, with its token
        assert session(server).get(server.base + "/", timeout=10).status_code == 200

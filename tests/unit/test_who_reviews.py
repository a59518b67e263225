"""Who a person's edit is recorded as when ``--by`` is not given: the account of the
Application Default Credentials file (a service account's e-mail), else the login name.
Read from disk only: no test here lets a socket connect, so the metadata server google-auth
would ask when there is no file is never asked."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from captioner.edges.cli.reviewing import who_reviews
from captioner.errors import BadRequestError
from captioner_dev.credentials import write_service_account_key

SERVICE_ACCOUNT = "captioner@local.iam.gserviceaccount.com"  # what write_service_account_key names


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connection attempted (each refused): the test asserts there was none."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def no_adc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, connects: list[Any]) -> Path:
    """Real Google Cloud Storage (no emulator), no credentials anywhere, login name
    ``tester``; returns gcloud's (empty) configuration folder."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "gcloud"
    folder.mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(name, "tester")
    return folder


def gcloud_login(folder: Path, account: str) -> None:
    """The file `gcloud auth application-default login` writes (a refresh token, the
    account it was made for; gcloud often leaves the account empty)."""
    info = {"account": account, "client_id": "id", "client_secret": "secret",
            "refresh_token": "token", "type": "authorized_user"}  # fmt: skip
    (folder / "application_default_credentials.json").write_text(json.dumps(info))


def test_who_reviews_is_the_service_account_of_the_adc_key_file_asking_no_server(
    no_adc: Path, tmp_path: Path, connects: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = write_service_account_key(tmp_path / "adc", "http://127.0.0.1:9/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    assert who_reviews(None) == SERVICE_ACCOUNT
    assert connects == []


def test_who_reviews_is_the_service_account_of_gclouds_adc_file(
    no_adc: Path, connects: list[Any]
) -> None:
    key = write_service_account_key(no_adc, "http://127.0.0.1:9/token")
    key.rename(no_adc / "application_default_credentials.json")
    assert who_reviews(None) == SERVICE_ACCOUNT
    assert connects == []


def test_who_reviews_is_the_account_a_gcloud_login_file_names_else_the_login_name(
    no_adc: Path, connects: list[Any]
) -> None:
    gcloud_login(no_adc, "ana@example.com")
    assert who_reviews(None) == "ana@example.com"
    gcloud_login(no_adc, "")
    assert who_reviews(None) == "tester"
    assert connects == []


IMPERSONATES = (
    "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
    "reviewer@p.iam.gserviceaccount.com:generateAccessToken"
)


@pytest.mark.parametrize(
    ("info", "who"),
    [
        ({"type": "impersonated_service_account", "service_account_impersonation_url":
          IMPERSONATES, "source_credentials": {"type": "authorized_user"}},
         "reviewer@p.iam.gserviceaccount.com"),
        ({"type": "external_account", "audience": "//iam.googleapis.com/x",
          "service_account_impersonation_url": IMPERSONATES},
         "reviewer@p.iam.gserviceaccount.com"),
        ({"type": "external_account", "audience": "//iam.googleapis.com/x"}, "tester"),
        ({"type": "service_account", "client_email": "not-an-email"}, "tester"),
    ],
    ids=["impersonated", "federated-impersonating", "federated-directly", "no-email"],
)  # fmt: skip
def test_who_reviews_is_the_service_account_other_adc_kinds_act_as(
    no_adc: Path, connects: list[Any], info: dict[str, Any], who: str
) -> None:
    (no_adc / "application_default_credentials.json").write_text(json.dumps(info))
    assert who_reviews(None) == who
    assert connects == []


def test_who_reviews_without_any_adc_is_the_login_name_and_asks_no_metadata_server(
    no_adc: Path, connects: list[Any]
) -> None:
    assert who_reviews(None) == "tester"
    assert connects == []  # google.auth.default() would have pinged 169.254.169.254


@pytest.mark.parametrize("content", ["not json", "{}", '{"type": "unknown"}'])
def test_who_reviews_with_an_unreadable_adc_file_is_the_login_name(
    no_adc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    assert who_reviews(None) == "tester"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    assert who_reviews(None) == "tester"


def test_who_reviews_against_an_emulator_is_the_login_name_whatever_the_adc(
    no_adc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = write_service_account_key(tmp_path / "adc", "http://127.0.0.1:9/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert who_reviews(None) == "tester"


def test_by_wins_over_adc_and_is_cleaned_to_one_line(
    no_adc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = write_service_account_key(tmp_path / "adc", "http://127.0.0.1:9/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    assert who_reviews("bo@example.com") == "bo@example.com"
    assert who_reviews("Bo\nSmith\x1b[2J") == "Bo Smith [2J"
    with pytest.raises(BadRequestError, match="--by"):
        who_reviews("  ")


def test_who_reviews_with_no_adc_and_no_login_name_asks_for_by(
    no_adc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nobody() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", nobody)
    with pytest.raises(BadRequestError, match="say who reviews: --by NAME"):
        who_reviews(None)

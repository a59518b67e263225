"""Application Default Credentials for the local stack, obtained the honest way: a
service-account key file whose ``token_uri`` is the Gemini stand-in's token endpoint
(captioner_dev.gemini_server.oauth), so google-auth fetches a token exactly as it does
from Google, and the product's code needs no test hook."""

from __future__ import annotations

import json
import os
from pathlib import Path

KEY_FILE_NAME = "stand-in-service-account.json"


def write_service_account_key(folder: Path, token_uri: str) -> Path:
    """A new service-account key (a fresh RSA key pair) in ``folder``, readable by the
    owner only, whose tokens come from ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "local",
        "private_key_id": "stand-in",
        "private_key": pem,
        "client_email": "captioner@local.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(info, out)
    return path

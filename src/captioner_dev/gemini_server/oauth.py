"""Google's OAuth 2.0 token endpoint and Vertex AI's bearer check, as the stand-in plays them.

Tests and the local stack authenticate to the stand-in's Vertex AI the way a deployment
authenticates to Google: Application Default Credentials from a service-account key file
(``GOOGLE_APPLICATION_CREDENTIALS``), whose ``token_uri`` is this endpoint. google-auth
honours a service-account key's ``token_uri`` (``service_account.Credentials``; not an
``authorized_user`` file's, which ``from_authorized_user_info`` replaces with Google's),
and posts an RFC 7523 JWT bearer grant there (``google.oauth2._client.jwt_grant``:
``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and ``assertion=<JWT>``),
expecting ``{"access_token", "expires_in", "token_type"}`` back.

Vertex AI answers a request without a bearer token 401 UNAUTHENTICATED, with the message
below (seen in googleapis/python-aiplatform and google-cloud-go issues quoting it). The
stand-in does not verify the JWT's signature (it does not hold the public key): it checks
the grant's form and claims, and records which tokens it issued, so a test can tell a token
obtained the honest way from a placeholder.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
from typing import Any, Final

from aiohttp import web

from captioner_dev.gemini_server.wire import ApiError, json_error

JWT_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH: Final = "/token"
_VERTEX_API = re.compile(r"^/v1[a-z0-9]*/projects/")
_MISSING = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class TokenIssuer:
    """Issues access tokens for JWT grants, and remembers them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: dict[str, str] = {}  # token → the service account it was issued to

    def issued_to(self, authorization: str) -> str | None:
        """The service account a ``Bearer`` header's token was issued to, if it was."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            return self._issued.get(token.strip())

    def reset(self) -> None:
        with self._lock:
            self._issued.clear()

    async def http_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_GRANT:
            return _oauth_error("unsupported_grant_type", "Only JWT bearer grants are supported.")
        assertion = form.get("assertion")
        claims = _claims(assertion) if isinstance(assertion, str) else None
        if claims is None:
            return _oauth_error("invalid_grant", "Invalid JWT: not a signed JWT.")
        issuer = claims.get("iss")
        expires = claims.get("exp")
        if not isinstance(issuer, str) or not isinstance(expires, int | float):
            return _oauth_error("invalid_grant", "Invalid JWT: iss and exp are required.")
        if expires < time.time():
            return _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token")
        if not str(claims.get("aud", "")).endswith(TOKEN_PATH):
            return _oauth_error("invalid_grant", "Invalid JWT: the audience is not this endpoint.")
        token = "ya29.stand-in-" + secrets.token_urlsafe(24)
        with self._lock:
            self._issued[token] = issuer
        return web.json_response(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
        )


def _claims(assertion: str) -> dict[str, Any] | None:
    parts = assertion.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _oauth_error(error: str, description: str) -> web.Response:
    # RFC 6749 section 5.2, as Google's endpoint answers a bad grant.
    return web.json_response({"error": error, "error_description": description}, status=400)


@web.middleware
async def vertex_needs_a_bearer(request: web.Request, handler: Any) -> web.StreamResponse:
    """Vertex AI's routes refuse a request without ``Authorization: Bearer``."""
    if _VERTEX_API.match(request.path):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return json_error(ApiError(401, _MISSING))
    response: web.StreamResponse = await handler(request)
    return response

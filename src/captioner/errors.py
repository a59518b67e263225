"""One root error; whether a failure is transient or permanent decides retry vs record.

Transient failures are retried inside the invocation and, if they persist, raised
so that Eventarc redelivers the event. Permanent failures are recorded on the
object as ``caption-status: error:<reason>`` and the invocation returns normally.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Root of every error this package raises on purpose."""


class SettingsError(CaptionerError):
    """A ``CAPTION_*`` environment variable has a bad value."""


class BadRequestError(CaptionerError):
    """An event or HTTP request body that cannot be understood (answered with a 4xx)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TransientError(CaptionerError):
    """Worth trying again later: rate limits, timeouts, 5xx, dropped connections.

    ``retry_after`` is the delay the service asked for, in seconds, when it named one.
    """

    reason = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnreachableError(TransientError):
    """The service cannot be reached at all (connection refused, no such host): often a
    wrong address or a local stack that is not running, and every call will say so."""

    reason = "unreachable"


class ConfigurationError(TransientError):
    """Not the image's fault and not worth retrying now: a bad or expired API key, a
    missing role, an unknown model, billing or region, a setting the model refuses.

    Transient as far as the object goes (nothing is recorded on it; the event comes
    back once the operator has fixed the cause), but retrying inside the invocation
    would only repeat the same answer.
    """

    reason = "configuration"


class PermanentError(CaptionerError):
    """Will fail the same way every time for this object generation.

    ``reason`` is a short machine-readable slug recorded as ``error:<reason>``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ObjectGoneError(CaptionerError):
    """The object, or the generation we were asked about, no longer exists."""


class NoSuchBucketError(ObjectGoneError):
    """The bucket itself is not there (a listing answered 404)."""


class PreconditionFailedError(CaptionerError):
    """A write's ``ifGenerationMatch`` / ``ifMetagenerationMatch`` did not hold (HTTP 412)."""

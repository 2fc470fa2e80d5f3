"""The errors the core raises for requests, each with the HTTP status the API answers.

Engines raise these; `functions/` turns them into Vault's error shape
(`{"errors": [message]}`) with `status`. Messages are for the client: they say what
was wrong and what to do, and never contain secret material (values, tokens, keys).
Anything else escaping an engine is a bug and answers 500 without detail.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """Base of every error a client can cause or must be told about."""

    status = 500

    def __init__(
        self, message: str, *, status: int | None = None, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        # Vault answers some errors with a body too (a deleted KV version: 404 with its
        # metadata); `data` is that response's "data".
        self.data = data
        if status is not None:
            self.status = status


class InvalidRequest(RequestError):
    """Malformed input, a failed check-and-set, a bad parameter."""

    status = 400


class PermissionDenied(RequestError):
    """No token, an invalid, expired or revoked token, or a policy that does not allow it."""

    status = 403

    def __init__(self, message: str = "permission denied") -> None:
        super().__init__(message)


class NotFound(RequestError):
    status = 404

    def __init__(self, message: str = "not found", *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, data=data)


class UnsupportedOperation(RequestError):
    """The path exists but not for this operation."""

    status = 405


class RateLimited(RequestError):
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(RequestError):
    """Sealed, uninitialized, or a dependency (HSM, ledger) is down."""

    status = 503

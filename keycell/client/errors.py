"""The errors the client raises: one class per answer a caller handles differently,
each saying what to do about it. Every one is a `KeycellError` carrying the HTTP
status, the server's messages and the path (never a token or a secret value)."""

from __future__ import annotations


class KeycellError(Exception):
    status = 0
    hint = "see the server's message"

    def __init__(self, errors: list[str] | None = None, *, status: int | None = None, path: str = "") -> None:
        self.errors = list(errors or [])
        if status is not None:
            self.status = status
        self.path = path
        detail = "; ".join(self.errors) or "no detail"
        where = f" on {path}" if path else ""
        super().__init__(f"{self.status or 'error'}{where}: {detail} ({self.hint})")


class InvalidRequest(KeycellError):
    status = 400
    hint = "the request is malformed or a check failed: fix the request before retrying"


class PermissionDenied(KeycellError):
    status = 403
    hint = (
        "the token is missing, expired or revoked, or its policy does not allow this path: "
        "log in again, or ask for a policy that grants it"
    )


class NotFound(KeycellError):
    status = 404
    hint = "nothing at this path (or the lease is gone): check the mount and path"


class RateLimited(KeycellError):
    status = 429
    hint = "too many requests: slow down and retry after `retry_after` seconds"

    def __init__(
        self,
        errors: list[str] | None = None,
        *,
        retry_after: float = 1.0,
        status: int | None = None,
        path: str = "",
    ) -> None:
        self.retry_after = retry_after
        super().__init__(errors, status=status, path=path)


class Unavailable(KeycellError):
    status = 503
    hint = "the cell or one of its dependencies is unavailable: retry later (the client retries with backoff)"

    def __init__(
        self,
        errors: list[str] | None = None,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        path: str = "",
    ) -> None:
        self.retry_after = retry_after
        super().__init__(errors, status=status, path=path)


class Sealed(Unavailable):
    hint = "the cell is sealed: an operator must unseal it (sys/unseal); retrying will not help until then"


class ServerError(KeycellError):
    status = 500
    hint = "the server failed unexpectedly: retry once, then report it with the time and path"


class ConnectionFailed(Unavailable):
    status = 0
    hint = "could not reach the server: check the address and the network; the client retries with backoff"


class CredentialRevoked(PermissionDenied):
    """The client dropped its credential because it was revoked (revocation stream)."""

    hint = "the credential was revoked: log in again for a new one"


def error_for(status: int, errors: list[str], *, retry_after: float | None, path: str) -> KeycellError:
    if status == 400:
        return InvalidRequest(errors, path=path)
    if status == 403:
        return PermissionDenied(errors, path=path)
    if status == 404:
        return NotFound(errors, path=path)
    if status == 429:
        return RateLimited(errors, retry_after=retry_after if retry_after is not None else 1.0, path=path)
    if status == 503 and any("sealed" in e.lower() for e in errors):
        return Sealed(errors, retry_after=retry_after, status=status, path=path)
    if status in (502, 503, 504):
        return Unavailable(errors, retry_after=retry_after, status=status, path=path)
    if status >= 500:
        return ServerError(errors, status=status, path=path)
    return KeycellError(errors, status=status, path=path)

"""HTTP to the router and back: the one translation both front doors use (the
Chalice handler on Lambda, and the self-hosted server's ASGI handler)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keycell.control_plane.admission import AdmissionConfig, RateLimits, classify, identity_of
from keycell.control_plane.router import Request, Response, Router

_limits: RateLimits | None = None


def rate_limits() -> RateLimits:
    """This process's admission limits, configured from the environment on first use."""
    global _limits
    if _limits is None:
        _limits = RateLimits(AdmissionConfig.from_env())
    return _limits


def rate_limited(retry_after: float, message: str) -> tuple[int, dict[str, str], bytes]:
    """Vault's 429: `{"errors": [...]}` and `Retry-After` in whole seconds (at least 1)."""
    headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
    return encode(Response(429, {"errors": [message]}, headers))


def token_from(headers: Mapping[str, str]) -> str | None:
    """X-Vault-Token, or `Authorization: Bearer` (lower-case header names)."""
    token = headers.get("x-vault-token")
    if token:
        return token
    authorization = headers.get("authorization") or ""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def handle(
    router: Router,
    method: str,
    path: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    body: bytes | str | None,
    remote_addr: str = "",
    limits: RateLimits | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request (path below /v1/, header names lower-case) to status, headers, body."""
    prepared = to_request(method, path, headers, query, body, remote_addr, limits)
    if isinstance(prepared, Request):
        return encode(router.handle(prepared))
    return prepared


def to_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    body: bytes | str | None,
    remote_addr: str = "",
    limits: RateLimits | None = None,
) -> Request | tuple[int, dict[str, str], bytes]:
    """The router's request, or the reply that answers it first: admission control
    (`limits`, default: this process's, from the environment) runs first, so past a
    rate limit the answer is 429 with `Retry-After`; a body that is not a JSON object
    is a 400."""
    token = token_from(headers)
    refused = (limits or rate_limits()).check(classify(method, path), identity_of(token, remote_addr))
    if refused is not None:
        return rate_limited(refused.retry_after, refused.message)
    data: dict[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return encode(Response(400, {"errors": ["the request body is not valid JSON"]}))
        if not isinstance(parsed, dict):
            return encode(Response(400, {"errors": ["the request body must be a JSON object"]}))
        data = parsed
    return Request(
        method=method,
        path=path,
        data=data,
        query=query,
        headers=headers,
        token=token,
        remote_addr=remote_addr,
    )


def encode(response: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {"Cache-Control": "no-store", **response.headers}
    if response.text is not None:
        return response.status, headers, response.text.encode()
    if response.body is None:
        return response.status, headers, b""
    headers["Content-Type"] = "application/json"
    return response.status, headers, json.dumps(response.body, separators=(",", ":")).encode()

"""HTTP to the router and back: the one translation both front doors use (the
Chalice handler on Lambda, and the self-hosted server's ASGI handler)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keycell.control_plane.admission import AdmissionConfig, RateLimits, classify, identity_of
from keycell.control_plane.router import Request, Response, Router

# Vault's methods; anything else (TRACE, OPTIONS, PROPFIND, ...) is a 405, never a read.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "LIST"})
# Deepest JSON body accepted (Vault's listener `max_json_depth` default): deeper bodies
# would reach Python's recursion limit in the parser or in whatever walks the data.
MAX_JSON_DEPTH = 300

_config: AdmissionConfig | None = None
_limits: RateLimits | None = None


def admission_config() -> AdmissionConfig:
    """This process's admission settings, read from the environment on first use."""
    global _config
    if _config is None:
        _config = AdmissionConfig.from_env()
    return _config


def rate_limits() -> RateLimits:
    """This process's admission limits, configured from the environment on first use."""
    global _limits
    if _limits is None:
        _limits = RateLimits(admission_config())
    return _limits


def error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A reply in Vault's error shape."""
    return encode(Response(status, {"errors": [message]}, headers or {}))


def too_large(limit: int) -> tuple[int, dict[str, str], bytes]:
    """Vault's 413 for a body past `max_request_size`; the connection closes, since the
    rest of the body is not read."""
    message = f"the request body is larger than max_request_size ({limit} bytes)"
    return error(413, message, {"Connection": "close"})


def method_not_allowed(method: str) -> tuple[int, dict[str, str], bytes]:
    shown = method if method.isalpha() and len(method) <= 16 else "(unprintable)"
    return error(405, f"unsupported method {shown}")


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
    """The router's request, or the reply that answers it first: a method Vault does not
    have is a 405; admission control (`limits`, default: this process's, from the
    environment) runs next, so past a rate limit the answer is 429 with `Retry-After`;
    a body past max_request_size is a 413, and one that is not a JSON object (or is
    nested past MAX_JSON_DEPTH) a 400."""
    if method.upper() not in METHODS:
        return method_not_allowed(method)
    token = token_from(headers)
    refused = (limits or rate_limits()).check(classify(method, path), identity_of(token, remote_addr))
    if refused is not None:
        return rate_limited(refused.retry_after, refused.message)
    data: dict[str, Any] = {}
    if body:
        limit = admission_config().max_request_size
        if len(body) > limit:
            return too_large(limit)
        refused_body = parse_body(body)
        if isinstance(refused_body, str):
            return error(400, refused_body)
        data = refused_body
    return Request(
        method=method,
        path=path,
        data=data,
        query=query,
        headers=headers,
        token=token,
        remote_addr=remote_addr,
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes | str) -> dict[str, Any] | str:
    """A request body as a JSON object, or why it is refused (strict JSON: no NaN or
    Infinity; at most MAX_JSON_DEPTH levels deep)."""
    try:
        parsed = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        return f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:  # UnicodeDecodeError and an over-long integer are ValueErrors too
        return "the request body is not valid JSON"
    if parsed is None:
        return {}  # `null`, which Vault's CLI sends for a write with no fields (`bao write -f`)
    if not isinstance(parsed, dict):
        return "the request body must be a JSON object"
    if too_deep(parsed, MAX_JSON_DEPTH):
        return f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"
    return parsed


def too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` levels (a walk without
    recursion, so no depth can exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values() if isinstance(child, (dict, list)))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return False


def encode(response: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {"Cache-Control": "no-store", **response.headers}
    if isinstance(response.text, bytes):
        return response.status, headers, response.text
    if response.text is not None:
        return response.status, headers, response.text.encode()
    if response.body is None:
        return response.status, headers, b""
    headers["Content-Type"] = "application/json"
    return response.status, headers, json.dumps(response.body, separators=(",", ":")).encode()

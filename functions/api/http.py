"""HTTP to the router and back: the one translation both front doors use (the
Chalice handler on Lambda, and the self-hosted server's ASGI handler)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keycell.control_plane.router import Request, Response, Router


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
) -> tuple[int, dict[str, str], bytes]:
    """One request (path below /v1/, header names lower-case) to status, headers, body."""
    data: dict[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return encode(Response(400, {"errors": ["the request body is not valid JSON"]}))
        if not isinstance(parsed, dict):
            return encode(Response(400, {"errors": ["the request body must be a JSON object"]}))
        data = parsed
    request = Request(
        method=method,
        path=path,
        data=data,
        query=query,
        headers=headers,
        token=token_from(headers),
        remote_addr=remote_addr,
    )
    return encode(router.handle(request))


def encode(response: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {"Cache-Control": "no-store", **response.headers}
    if response.text is not None:
        return response.status, headers, response.text.encode()
    if response.body is None:
        return response.status, headers, b""
    headers["Content-Type"] = "application/json"
    return response.status, headers, json.dumps(response.body, separators=(",", ":")).encode()

"""The regional API as a Chalice app: the one route table, whichever way it runs.

- AWS Lambda behind API Gateway (`chalice deploy` / `chalice package` from this folder);
- `chalice local` for quick tries;
- self-hosted: `keycell server` feeds requests to this same app (keycell.server).

Vault's paths are arbitrarily deep (secret/data/team/app/db) and API Gateway has no
greedy parameter that Chalice's local gateway and test client understand, so the
table is one route per depth, /v1/{p0} ... /v1/{p0}/.../{p15}, all to `dispatch`,
which hands the request to the framework-free router. API Gateway does not carry
Vault's LIST method: clients there send GET ?list=true (hvac does for KV when told
to; the self-hosted server rewrites LIST itself).

Configuration comes from the environment (see keycell.functions.wiring): which
ledger, which key backend, which cell.
"""

from __future__ import annotations

import json
from typing import Any

from chalice.app import Chalice, Response

from keycell.control_plane.router import Request, Router
from keycell.functions.wiring import router_from_environment

MAX_DEPTH = 16
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
# Vault reads every body as JSON whatever its Content-Type says; curl's default
# (form-encoded) and a missing type must not be refused with 415.
CONTENT_TYPES = [
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "application/octet-stream",
    "application/merge-patch+json",
]

app = Chalice(app_name="keycell-api")
_router: Router | None = None


def configure(router: Router | None) -> None:
    """Use this router (tests) instead of the environment's; None: back to the environment."""
    global _router
    _router = router


def router() -> Router:
    global _router
    if _router is None:
        _router = router_from_environment()
    return _router


def route_for_depth(depth: int) -> str:
    return "/v1/" + "/".join(f"{{p{i}}}" for i in range(depth))


def _token(headers: Any) -> str | None:
    token = headers.get("x-vault-token")
    if token:
        return str(token)
    authorization = headers.get("authorization") or ""
    if authorization.lower().startswith("bearer "):
        return str(authorization[7:].strip()) or None
    return None


def dispatch(**params: str) -> Response:
    current = app.current_request
    assert current is not None
    path = "/".join(params[f"p{i}"] for i in range(len(params)))
    data: dict[str, Any] = {}
    raw = current.raw_body
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            return _json(400, {"errors": ["the request body is not valid JSON"]})
        if not isinstance(parsed, dict):
            return _json(400, {"errors": ["the request body must be a JSON object"]})
        data = parsed
    query = {k: v for k, v in (current.query_params or {}).items()}
    headers = {k.lower(): v for k, v in current.headers.items()}
    identity = (current.context or {}).get("identity") or {}
    request = Request(
        method=current.method,
        path=path,
        data=data,
        query=query,
        headers=headers,
        token=_token(headers),
        remote_addr=str(identity.get("sourceIp") or ""),
    )
    response = router().handle(request)
    if response.text is not None:
        return Response(body=response.text, status_code=response.status, headers=dict(response.headers))
    return _json(response.status, response.body, response.headers)


def _json(status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> Response:
    out: dict[str, str | list[str]] = {"Cache-Control": "no-store", **(headers or {})}
    if body is None:
        return Response(body="", status_code=status, headers=out)
    out["Content-Type"] = "application/json"
    return Response(body=json.dumps(body, separators=(",", ":")), status_code=status, headers=out)


for _depth in range(1, MAX_DEPTH + 1):
    app.route(
        route_for_depth(_depth), methods=METHODS, name=f"dispatch_{_depth}", content_types=CONTENT_TYPES
    )(dispatch)

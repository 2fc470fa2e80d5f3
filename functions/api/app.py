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

from chalice.app import Chalice, Response

from keycell.control_plane.router import Router
from keycell.functions.api import http
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

# Binary answers (PKI's `ca` and `crl` in DER): API Gateway carries them base64-encoded,
# and Chalice serves them to a request whose Accept matches (curl's and openssl's */* do).
BINARY_TYPES = ["application/pkix-cert", "application/pkix-crl"]

app = Chalice(app_name="keycell-api")
app.api.binary_types.extend(BINARY_TYPES)
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


def dispatch(**params: str) -> Response:
    current = app.current_request
    assert current is not None
    identity = (current.context or {}).get("identity") or {}
    status, headers, body = http.handle(
        router(),
        current.method,
        "/".join(params[f"p{i}"] for i in range(len(params))),
        {k.lower(): v for k, v in current.headers.items()},
        dict(current.query_params or {}),
        current.raw_body,
        str(identity.get("sourceIp") or ""),
    )
    out: dict[str, str | list[str]] = dict(headers)
    binary = headers.get("Content-Type") in BINARY_TYPES
    return Response(body=body if binary else body.decode(), status_code=status, headers=out)


for _depth in range(1, MAX_DEPTH + 1):
    app.route(
        route_for_depth(_depth), methods=METHODS, name=f"dispatch_{_depth}", content_types=CONTENT_TYPES
    )(dispatch)

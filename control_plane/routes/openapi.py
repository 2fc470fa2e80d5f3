"""sys/openapi: an OpenAPI 3.1 document of every route, generated from the route table.

There is no second list of routes: each `router.add(...)` in the route modules carries a
`RouteDoc` (the OpenAPI path template, summaries, request and response schemas per
operation), and `build_spec` walks `router.routes`. The built-in routes' spec is built
once per process, on first request; the routes of the mounts enabled at the time
(sys/mounts, sys/auth) are added to it on each read by a caller whose token may read
sys/mounts. It is served without authentication, like Vault's generic
`sys/internal/specs/openapi`: it describes the API, not anything stored in the cell.

How Vault's HTTP API maps onto OpenAPI:
- Vault's LIST method is `GET ?list=true` (OpenAPI has no LIST; API Gateway cannot carry it).
- POST and PUT are the same "create or update" operation; POST is documented.
- Successful bodies are Vault's envelope (`request_id`, `lease_id`, `renewable`,
  `lease_duration`, `data`, `wrap_info`, `warnings`, `auth`, `mount_type`) unless the
  endpoint answers another shape (sys/health, sys/init, sys/unwrap); 204 has no body.
- Errors are `{"errors": [string]}` with 400/403/404/405/429/503 on every operation.
- The token is the `X-Vault-Token` header (or `Authorization: Bearer`), two security schemes.
- Path parameters that may span segments (a KV path such as `app/db`, a lease ID) are
  documented as one `{path}` parameter with a note; OpenAPI templates cannot say more.

The helpers below (`envelope`, `obj`, ...) are what the route modules use to write schemas.
"""

from __future__ import annotations

import re
from typing import Any

from keycell.control_plane.errors import RequestError
from keycell.control_plane.ledger import LedgerError
from keycell.control_plane.router import (
    Content,
    Context,
    JsonSchema,
    Operation,
    OperationDoc,
    ResponseDoc,
    Result,
    Route,
    RouteDoc,
    Router,
)
from keycell.control_plane.services import VERSION

# --- schema helpers for the route modules -------------------------------------------------

STR: JsonSchema = {"type": "string"}
INT: JsonSchema = {"type": "integer"}
BOOL: JsonSchema = {"type": "boolean"}
ANY_OBJECT: JsonSchema = {"type": "object"}
STR_LIST: JsonSchema = {"type": "array", "items": STR}
# Vault reads durations as seconds or Go duration strings ("90s", "1h30m").
DURATION: JsonSchema = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+(s|m|h)?$"}]
}
# Lists of strings may also be sent as one comma-separated string, as Vault allows.
STR_LIST_OR_CSV: JsonSchema = {"anyOf": [STR_LIST, STR]}
# Vault clients send numbers and booleans as JSON or as strings; the schemas document JSON.
RFC3339: JsonSchema = {"type": "string"}


def nullable(schema: JsonSchema) -> JsonSchema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, JsonSchema], required: tuple[str, ...] = (), **more: Any) -> JsonSchema:
    """An object schema; other properties are allowed unless `additionalProperties` says otherwise."""
    schema: JsonSchema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(more)
    return schema


KEYS: JsonSchema = obj({"keys": STR_LIST}, ("keys",))

AUTH: JsonSchema = obj(
    {
        "client_token": STR,
        "accessor": STR,
        "policies": STR_LIST,
        "token_policies": STR_LIST,
        "metadata": nullable({"type": "object", "additionalProperties": STR}),
        "lease_duration": INT,
        "renewable": BOOL,
        "entity_id": STR,
        "token_type": STR,
        "orphan": BOOL,
        "mfa_requirement": {"type": "null"},
        "num_uses": INT,
        "lease_id": STR,
    },
    ("client_token", "accessor", "policies", "lease_duration", "renewable"),
)

WRAP_INFO: JsonSchema = obj(
    {
        "token": STR,
        "accessor": STR,
        "ttl": INT,
        "creation_time": RFC3339,
        "creation_path": STR,
        "wrapped_accessor": STR,
    },
    ("token", "accessor", "ttl", "creation_time", "creation_path"),
)

ERROR: JsonSchema = obj(
    {
        "errors": STR_LIST,
        # A deleted or destroyed KV version answers 404 with its metadata, as Vault does.
        "request_id": STR,
        "data": nullable(ANY_OBJECT),
    },
    ("errors",),
)

ERROR_STATUSES = {
    400: "Invalid request: a missing or malformed parameter, a failed check-and-set.",
    403: "Permission denied: no token, an invalid or revoked token, or a policy that forbids it.",
    404: "Not found (a deleted KV version answers 404 with its metadata in `data`).",
    405: "The path exists but not for this operation.",
    429: "Too many requests; `Retry-After` says when to retry.",
    503: "Sealed, or a dependency of the cell (ledger, key backend) is unavailable.",
}

_ENVELOPE_KEYS = (
    "request_id",
    "lease_id",
    "renewable",
    "lease_duration",
    "data",
    "wrap_info",
    "warnings",
    "auth",
    "mount_type",
)


def envelope(
    data: JsonSchema | None = None, *, auth: bool = False, wrapped: bool = False, data_null: bool = False
) -> JsonSchema:
    """Vault's response envelope. `data` is the schema of its `data` (any object when None);
    `auth` makes the `auth` block required; `wrapped` is a response-wrapping reply, whose
    `data` is null and `wrap_info` set."""
    if wrapped or data_null or auth:
        data_schema: JsonSchema = nullable(data or ANY_OBJECT) if auth else {"type": "null"}
    else:
        data_schema = data or ANY_OBJECT
    return obj(
        {
            "request_id": STR,
            "lease_id": STR,
            "renewable": BOOL,
            "lease_duration": INT,
            "data": data_schema,
            "wrap_info": WRAP_INFO if wrapped else nullable(WRAP_INFO),
            "warnings": nullable(STR_LIST),
            "auth": AUTH if auth else nullable(AUTH),
            "mount_type": STR,
        },
        _ENVELOPE_KEYS,
    )


def ok(data: JsonSchema | None = None) -> dict[int | str, ResponseDoc]:
    """200 with Vault's envelope around `data`."""
    return {200: envelope(data)}


NO_CONTENT: dict[int | str, ResponseDoc] = {204: None}
AUTH_RESPONSE: dict[int | str, ResponseDoc] = {200: envelope(auth=True)}
WRAPPED_RESPONSE: dict[int | str, ResponseDoc] = {200: envelope(wrapped=True)}

# --- the builder ---------------------------------------------------------------------------

OPENAPI_VERSION = "3.1.0"
_METHOD = {
    Operation.READ: "get",
    Operation.LIST: "get",
    Operation.CREATE: "post",
    Operation.UPDATE: "post",
    Operation.DELETE: "delete",
    Operation.PATCH: "patch",
}
_PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")
_SECURITY: list[dict[str, list[str]]] = [{"VaultToken": []}, {"BearerToken": []}]
_OPTIONAL_SECURITY: list[dict[str, list[str]]] = [{}, {"VaultToken": []}]
# PATCH bodies are JSON merge patches (RFC 7396), as Vault's KV v2 wants.
_BODY_MEDIA = {"patch": "application/merge-patch+json"}

DESCRIPTION = """\
Keycell's regional API speaks Vault's HTTP API. All paths are below `/v1`.

- Authenticate with the `X-Vault-Token` header (or `Authorization: Bearer <token>`).
- Vault's `LIST` method is documented as `GET` with `?list=true`; `LIST` itself is
  accepted by the self-hosted server. `PUT` is accepted wherever `POST` is documented.
- Any read may be response-wrapped by sending `X-Vault-Wrap-TTL` (a duration): the reply
  is then an envelope with `wrap_info` and no `data`.
- Errors are `{"errors": [string]}`; messages never contain secret material.
- A path parameter documented as spanning segments (a KV secret path such as `app/db`)
  may contain `/`; it is sent unescaped.
"""


def build_spec(router: Router, *, version: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `router`'s routes (those with a `RouteDoc`)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Keycell regional API (Vault-compatible)",
            "version": version or "0",
            "description": DESCRIPTION,
        },
        "servers": [{"url": "/v1"}],
        "paths": build_paths(router.routes),
        "components": {
            "securitySchemes": {
                "VaultToken": {"type": "apiKey", "in": "header", "name": "X-Vault-Token"},
                "BearerToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {"Error": ERROR, "Auth": AUTH, "WrapInfo": WRAP_INFO},
            "responses": {
                str(status): {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for status, text in ERROR_STATUSES.items()
            },
        },
    }


def build_paths(routes: list[Route]) -> dict[str, dict[str, Any]]:
    """The OpenAPI `paths` object of `routes` (those with a `RouteDoc`)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        doc = route.doc
        if doc is None:
            continue
        for template in (doc.path, *doc.more_paths):
            item = paths.setdefault(template, {})
            params = _path_parameters(template, doc)
            if params:
                item["parameters"] = params
            if doc.summary:
                item.setdefault("summary", doc.summary)
            if doc.description:
                item.setdefault("description", doc.description)
            for method, operations in _methods(route).items():
                if method in item:
                    raise ValueError(f"{method.upper()} {template} is documented twice")
                item[method] = _operation(route, doc, template, method, operations)
    return paths


def documented_operations(route: Route) -> dict[str, list[Operation]]:
    """The HTTP methods a route is documented under, with the operations behind each."""
    return _methods(route)


def _methods(route: Route) -> dict[str, list[Operation]]:
    out: dict[str, list[Operation]] = {}
    for operation in route.handlers:
        out.setdefault(_METHOD[operation], []).append(operation)
    return out


def _path_parameters(template: str, doc: RouteDoc) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": doc.params.get(name, ""),
            "schema": doc.param_schemas.get(name, {"type": "string", "minLength": 1}),
        }
        for name in _PATH_PARAM.findall(template)
    ]


def _operation(
    route: Route, doc: RouteDoc, template: str, method: str, operations: list[Operation]
) -> dict[str, Any]:
    docs = [doc.operations.get(op, OperationDoc()) for op in operations]
    summary = " / ".join(d.summary for d in docs if d.summary) or doc.summary
    description = "\n\n".join(d.description for d in docs if d.description)
    if route.sudo:
        description = (description + "\n\n" if description else "") + "Requires the `sudo` capability."
    parameters: list[dict[str, Any]] = []
    has_read = Operation.READ in operations
    if Operation.LIST in operations:
        parameters.append(
            {
                "name": "list",
                "in": "query",
                "required": not has_read,
                "description": "Vault's LIST operation." + ("" if has_read else " Required."),
                "schema": {"type": "string", "enum": ["true"]},
            }
        )
    for d in docs:
        for name, schema in d.query.items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
        for name, schema in d.headers.items():
            parameters.append({"name": name, "in": "header", "required": True, "schema": schema})
    operation: dict[str, Any] = {
        "operationId": _operation_id(method if operations != [Operation.LIST] else "list", template),
        "tags": [route.family],
        "summary": summary,
    }
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    bodies = [d for d in docs if d.body is not None]
    if bodies:
        media = _BODY_MEDIA.get(method, "application/json")
        operation["requestBody"] = {
            "required": any(d.body_required for d in bodies),
            "content": {media: {"schema": bodies[0].body}},
        }
    operation["responses"] = _responses(docs)
    if route.authenticated:
        operation["security"] = _SECURITY
    elif doc.token_accepted:
        operation["security"] = _OPTIONAL_SECURITY
    else:
        operation["security"] = []
    return operation


def _responses(docs: list[OperationDoc]) -> dict[str, Any]:
    merged: dict[str, list[ResponseDoc]] = {}
    for d in docs:
        responses = d.responses or {200: envelope(), 204: None}
        for status, body in responses.items():
            merged.setdefault(str(status), []).append(body)
    out: dict[str, Any] = {}
    for status, bodies in merged.items():
        out[status] = _response(status, bodies)
    for status in ERROR_STATUSES:
        out.setdefault(str(status), {"$ref": f"#/components/responses/{status}"})
    return out


def _response(status: str, bodies: list[ResponseDoc]) -> dict[str, Any]:
    description = {
        "200": "Success.",
        "204": "Success, no body.",
        "default": "Any status the client asked for.",
    }
    response: dict[str, Any] = {"description": description.get(status, f"Status {status}.")}
    content: dict[str, Any] = {}
    for body in bodies:
        if body is None:
            continue
        media, schema = (
            (body.media_type, body.schema) if isinstance(body, Content) else ("application/json", body)
        )
        if media in content:
            content[media]["schema"] = {"anyOf": [content[media]["schema"], schema]}
        else:
            content[media] = {"schema": schema}
    if content:
        response["content"] = content
    return response


def _operation_id(method: str, template: str) -> str:
    return method + "-" + re.sub(r"[^A-Za-z0-9]+", "-", template).strip("-")


# --- the route ------------------------------------------------------------------------------


def register(router: Router, services: Any) -> None:
    built: list[dict[str, Any]] = []

    def read(ctx: Context) -> Result:
        """The built-in routes' document (built once: routes are all added before the first
        request), with the routes of the mounts enabled now, as Vault's spec has them."""
        if not built:
            built.append(build_spec(router, version=VERSION))
        mounted = router.mounted_routers() if _may_list_mounts(ctx) and router.mounted_routers else []
        if not mounted:
            return Result(raw=built[0])
        paths = dict(built[0]["paths"])
        for one in mounted:
            paths.update(build_paths(one.routes))  # a mount's paths never overlap a built-in's
        return Result(raw={**built[0], "paths": paths})

    def _may_list_mounts(ctx: Context) -> bool:
        """Mount paths are the cell's own configuration (a path may name a team or a
        system): documented only to a caller whose token may read sys/mounts."""
        token = ctx.request.token
        if not token:
            return False
        try:
            entry = services.tokens.lookup(token)
        except (RequestError, LedgerError):  # a bad token, or the cell is sealed
            return False
        return bool(services.policies.acl_for(entry.policies).allows("sys/mounts", "read"))

    router.add(
        r"sys/openapi",
        {Operation.READ: read},
        authenticated=False,
        wrappable=False,
        family="sys",
        doc=RouteDoc(
            "/sys/openapi",
            "The OpenAPI 3.1 document of this API (unauthenticated, like Vault's generic spec).",
            operations={
                Operation.READ: OperationDoc(
                    "Read the OpenAPI document",
                    responses={
                        200: obj(
                            {"openapi": STR, "info": ANY_OBJECT, "paths": ANY_OBJECT}, ("openapi", "paths")
                        )
                    },
                )
            },
        ),
    )

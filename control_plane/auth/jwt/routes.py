"""The JWT auth method's HTTP routes (Vault's auth/jwt/*: config, role, login)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.freshness import ON_STALE
from keycell.control_plane.router import (
    Context,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
    field_str,
)
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    AUTH_RESPONSE,
    BOOL,
    DURATION,
    INT,
    KEYS,
    NO_CONTENT,
    STR,
    STR_LIST,
    STR_LIST_OR_CSV,
    nullable,
    obj,
    ok,
)


def register(router: Router, services: Any) -> None:
    jwt = services.jwt

    def jwt_login(ctx: Context) -> Result:
        role, token_text = field_str(ctx.data, "role"), field_str(ctx.data, "jwt")
        if not token_text:
            raise InvalidRequest("'jwt' is required")
        token, entry, auth = jwt.login(role or "", token_text)
        lease = services.register_token_lease("auth/jwt/login", token, entry)
        if lease:
            auth["lease_id"] = lease
        return Result(auth=auth)

    def jwt_config_read(ctx: Context) -> dict[str, Any]:
        return jwt.read_config()  # type: ignore[no-any-return]

    def jwt_config_write(ctx: Context) -> None:
        jwt.write_config(ctx.data)

    def role_read(ctx: Context) -> dict[str, Any]:
        return jwt.read_role(ctx.params["name"])  # type: ignore[no-any-return]

    def role_write(ctx: Context) -> None:
        jwt.write_role(ctx.params["name"], ctx.data)

    def role_delete(ctx: Context) -> None:
        jwt.delete_role(ctx.params["name"])

    def role_list(ctx: Context) -> dict[str, Any]:
        return {"keys": jwt.list_roles()}

    router.add(
        r"auth/jwt/login",
        {Operation.UPDATE: jwt_login},
        authenticated=False,
        family="auth",
        doc=RouteDoc(
            "/auth/jwt/login",
            "JWT login: a signed JWT (a JWT-SVID) for a token bound to its subject.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Log in with a JWT",
                    body=obj({"role": STR, "jwt": STR}, ("jwt",)),
                    body_required=True,
                    responses=AUTH_RESPONSE,
                )
            },
        ),
    )
    router.add(
        r"auth/jwt/config",
        {Operation.READ: jwt_config_read, Operation.UPDATE: jwt_config_write},
        family="auth",
        doc=RouteDoc(
            "/auth/jwt/config",
            "The JWT auth method's configuration.",
            operations={
                Operation.READ: OperationDoc("Read the JWT configuration", responses=ok(_JWT_CONFIG)),
                Operation.UPDATE: OperationDoc(
                    "Configure JWT auth", body=_JWT_CONFIG_REQUEST, body_required=True, responses=NO_CONTENT
                ),
            },
        ),
    )
    router.add(
        r"auth/jwt/role/?",
        {Operation.LIST: role_list},
        family="auth",
        doc=RouteDoc(
            "/auth/jwt/role",
            "JWT roles.",
            operations={Operation.LIST: OperationDoc("List JWT roles", responses=ok(KEYS))},
        ),
    )
    router.add(
        r"auth/jwt/role/(?P<name>[^/]+)",
        {Operation.READ: role_read, Operation.UPDATE: role_write, Operation.DELETE: role_delete},
        family="auth",
        doc=RouteDoc(
            "/auth/jwt/role/{name}",
            "A JWT role: which JWTs may log in, and the token they get.",
            params={"name": "The role's name."},
            operations={
                Operation.READ: OperationDoc("Read a JWT role", responses=ok(_JWT_ROLE)),
                Operation.UPDATE: OperationDoc(
                    "Create or update a JWT role",
                    body=_JWT_ROLE_REQUEST,
                    body_required=True,
                    responses=NO_CONTENT,
                ),
                Operation.DELETE: OperationDoc("Delete a JWT role", responses=NO_CONTENT),
            },
        ),
    )


_JWT_CONFIG_REQUEST = obj(
    {
        "jwt_validation_pubkeys": STR_LIST_OR_CSV,
        "jwks": ANY_OBJECT,
        "bound_issuer": STR,
        "jwt_supported_algs": STR_LIST_OR_CSV,
        "default_role": STR,
    }
)


_JWT_CONFIG = obj(
    {
        "bound_issuer": STR,
        "default_role": STR,
        "jwks": nullable(ANY_OBJECT),
        "jwt_supported_algs": STR_LIST,
        "jwt_validation_pubkeys": STR_LIST,
    },
    ("bound_issuer", "default_role", "jwt_supported_algs", "jwt_validation_pubkeys"),
)


_JWT_ROLE_REQUEST = obj(
    {
        "role_type": {"type": "string", "enum": ["jwt"]},
        "bound_audiences": STR_LIST_OR_CSV,
        "user_claim": STR,
        "bound_subject": STR,
        "bound_claims": {"type": "object", "additionalProperties": {"anyOf": [STR, STR_LIST]}},
        "token_policies": STR_LIST_OR_CSV,
        "token_ttl": DURATION,
        "token_max_ttl": DURATION,
        "token_period": DURATION,
        "token_explicit_max_ttl": DURATION,
        "token_no_default_policy": BOOL,
        "bound_spiffe_ids": {
            **STR_LIST_OR_CSV,
            "description": "SPIFFE ID patterns ('*' within one path segment) a JWT-SVID's sub must match",
        },
        "allow_any_spiffe_id": {
            **BOOL,
            "description": "accept a JWT-SVID of any SPIFFE ID of the trust domain; without it a role "
            "that names neither bound_spiffe_ids nor bound_subject refuses JWT-SVIDs (default false)",
        },
        "max_revocation_staleness": nullable({"type": "number"}),
        "on_stale": {"type": "string", "enum": list(ON_STALE)},
    }
)


_JWT_ROLE = obj(
    {
        "role_type": STR,
        "bound_audiences": STR_LIST,
        "user_claim": STR,
        "bound_subject": STR,
        "bound_claims": nullable(ANY_OBJECT),
        "token_policies": STR_LIST,
        "token_ttl": INT,
        "token_max_ttl": INT,
        "token_period": INT,
        "token_explicit_max_ttl": INT,
        "token_no_default_policy": BOOL,
        "bound_spiffe_ids": STR_LIST,
        "allow_any_spiffe_id": BOOL,
    },
    ("role_type", "user_claim", "token_policies"),
)

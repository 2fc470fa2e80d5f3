"""The AppRole auth method's HTTP routes (Vault's auth/approle/*: role, role-id,
secret-id and its lookups, login, tidy)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.auth.token.routes import TOKEN_SETTINGS_SCHEMA
from keycell.control_plane.router import Context, Operation, OperationDoc, Result, RouteDoc, Router
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
    obj,
    ok,
)

_NAME = {"name": "The AppRole role's name."}


def register(router: Router, services: Any, approle: Any) -> None:
    """The routes of one AppRole mount (`approle.mount`, enabled through sys/auth)."""
    base = f"auth/{approle.mount}"
    role_path = base + r"/role/(?P<name>[^/]+)"

    def name(ctx: Context) -> str:
        return ctx.params["name"]

    def login(ctx: Context) -> Result:
        token, entry, auth = approle.login(
            ctx.data.get("role_id"), ctx.data.get("secret_id"), ctx.request.remote_addr
        )
        lease = services.register_token_lease(approle.login_path, token, entry)
        if lease:
            auth["lease_id"] = lease
        return Result(auth=auth)

    def lookup_secret_id(ctx: Context) -> dict[str, Any] | None:
        return approle.lookup_secret_id(name(ctx), ctx.data.get("secret_id"))  # type: ignore[no-any-return]

    def tidy(ctx: Context) -> None:
        approle.tidy()

    def doc(path: str, summary: str, ops: dict[Operation, OperationDoc]) -> RouteDoc:
        return RouteDoc(path, summary, params=_NAME if "{name}" in path else {}, operations=ops)

    router.add(
        base + "/login",
        {Operation.UPDATE: login},
        authenticated=False,
        family="auth",
        doc=doc(
            f"/{base}/login",
            "AppRole login: a role ID and its secret ID for a token.",
            {
                Operation.UPDATE: OperationDoc(
                    "Log in with AppRole",
                    body=obj({"role_id": STR, "secret_id": STR}, ("role_id",)),
                    body_required=True,
                    responses=AUTH_RESPONSE,
                )
            },
        ),
    )
    router.add(
        base + "/role/?",
        {Operation.LIST: lambda ctx: {"keys": approle.list_roles()}},
        family="auth",
        doc=doc(
            f"/{base}/role",
            "AppRole roles.",
            {Operation.LIST: OperationDoc("List AppRole roles", responses=ok(KEYS))},
        ),
    )
    router.add(
        role_path,
        {
            Operation.READ: lambda ctx: approle.read_role(name(ctx)),
            Operation.UPDATE: lambda ctx: approle.write_role(name(ctx), ctx.data),
            Operation.DELETE: lambda ctx: approle.delete_role(name(ctx)),
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}",
            "An AppRole role: its secret ID constraints and the tokens its logins get.",
            {
                Operation.READ: OperationDoc("Read an AppRole role", responses=ok(_ROLE_DATA)),
                Operation.UPDATE: OperationDoc(
                    "Create or update an AppRole role", body=_ROLE_REQUEST, responses=NO_CONTENT
                ),
                Operation.DELETE: OperationDoc("Delete an AppRole role", responses=NO_CONTENT),
            },
        ),
    )
    router.add(
        role_path + r"/role-id",
        {
            Operation.READ: lambda ctx: {"role_id": approle.role_id(name(ctx))},
            Operation.UPDATE: lambda ctx: approle.set_role_id(name(ctx), ctx.data.get("role_id")),
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/role-id",
            "The role's role ID (not a secret: it names the role at login).",
            {
                Operation.READ: OperationDoc("Read the role ID", responses=ok(obj({"role_id": STR}))),
                Operation.UPDATE: OperationDoc(
                    "Set the role ID", body=obj({"role_id": STR}, ("role_id",)), responses=NO_CONTENT
                ),
            },
        ),
    )
    router.add(
        role_path + r"/secret-id/?",
        {
            Operation.UPDATE: lambda ctx: approle.new_secret_id(name(ctx), ctx.data),
            Operation.LIST: lambda ctx: {"keys": approle.list_secret_ids(name(ctx))},
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/secret-id",
            "Issue a secret ID (shown once; wrap it with X-Vault-Wrap-TTL), or list accessors.",
            {
                Operation.UPDATE: OperationDoc(
                    "Generate a secret ID", body=_SECRET_ID_REQUEST, responses=ok(_SECRET_ID)
                ),
                Operation.LIST: OperationDoc("List secret ID accessors", responses=ok(KEYS)),
            },
        ),
    )
    router.add(
        role_path + r"/custom-secret-id",
        {
            Operation.UPDATE: lambda ctx: approle.new_secret_id(
                name(ctx), ctx.data, secret_id=ctx.data.get("secret_id") or ""
            )
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/custom-secret-id",
            "Register a secret ID of the caller's choosing.",
            {
                Operation.UPDATE: OperationDoc(
                    "Register a custom secret ID",
                    body=obj({**_SECRET_ID_REQUEST["properties"], "secret_id": STR}, ("secret_id",)),
                    responses=ok(_SECRET_ID),
                )
            },
        ),
    )
    router.add(
        role_path + r"/secret-id/lookup",
        {Operation.UPDATE: lookup_secret_id},
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/secret-id/lookup",
            "A secret ID's properties (204 when there is no such secret ID).",
            {
                Operation.UPDATE: OperationDoc(
                    "Look up a secret ID",
                    body=obj({"secret_id": STR}, ("secret_id",)),
                    responses={**ok(_SECRET_ID_INFO), **NO_CONTENT},
                )
            },
        ),
    )
    router.add(
        role_path + r"/secret-id/destroy",
        {
            op: (lambda ctx: approle.destroy_secret_id(name(ctx), ctx.data.get("secret_id")))
            for op in (Operation.UPDATE, Operation.DELETE)
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/secret-id/destroy",
            "Destroy a secret ID.",
            {
                op: OperationDoc(
                    "Destroy a secret ID", body=obj({"secret_id": STR}, ("secret_id",)), responses=NO_CONTENT
                )
                for op in (Operation.UPDATE, Operation.DELETE)
            },
        ),
    )
    router.add(
        role_path + r"/secret-id-accessor/lookup",
        {
            Operation.UPDATE: lambda ctx: approle.lookup_accessor(
                name(ctx), ctx.data.get("secret_id_accessor")
            )
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/secret-id-accessor/lookup",
            "A secret ID's properties, by its accessor.",
            {
                Operation.UPDATE: OperationDoc(
                    "Look up a secret ID by accessor",
                    body=obj({"secret_id_accessor": STR}, ("secret_id_accessor",)),
                    responses=ok(_SECRET_ID_INFO),
                )
            },
        ),
    )
    router.add(
        role_path + r"/secret-id-accessor/destroy",
        {
            op: (lambda ctx: approle.destroy_accessor(name(ctx), ctx.data.get("secret_id_accessor")))
            for op in (Operation.UPDATE, Operation.DELETE)
        },
        family="auth",
        doc=doc(
            f"/{base}/role/{{name}}/secret-id-accessor/destroy",
            "Destroy a secret ID by its accessor.",
            {
                op: OperationDoc(
                    "Destroy a secret ID by accessor",
                    body=obj({"secret_id_accessor": STR}, ("secret_id_accessor",)),
                    responses=NO_CONTENT,
                )
                for op in (Operation.UPDATE, Operation.DELETE)
            },
        ),
    )
    router.add(
        base + "/tidy/secret-id",
        {Operation.UPDATE: tidy},
        family="auth",
        doc=doc(
            f"/{base}/tidy/secret-id",
            "Delete expired secret IDs.",
            {Operation.UPDATE: OperationDoc("Tidy secret IDs", responses=NO_CONTENT)},
        ),
    )


_ROLE_REQUEST = obj(
    {
        "bind_secret_id": BOOL,
        "secret_id_bound_cidrs": STR_LIST_OR_CSV,
        "secret_id_num_uses": INT,
        "secret_id_ttl": DURATION,
        "local_secret_ids": BOOL,
        "token_bound_cidrs": STR_LIST_OR_CSV,
        "role_id": STR,
        **TOKEN_SETTINGS_SCHEMA,
    }
)
_ROLE_DATA = obj(
    {
        "bind_secret_id": BOOL,
        "secret_id_bound_cidrs": STR_LIST,
        "secret_id_num_uses": INT,
        "secret_id_ttl": INT,
        "local_secret_ids": BOOL,
        "token_bound_cidrs": STR_LIST,
        **{k: v for k, v in TOKEN_SETTINGS_SCHEMA.items() if k != "policies"},
        "policies": STR_LIST,
        "token_ttl": INT,
        "token_max_ttl": INT,
        "token_period": INT,
        "token_explicit_max_ttl": INT,
    }
)
_SECRET_ID_REQUEST = obj(
    {"metadata": {"anyOf": [STR, ANY_OBJECT]}, "cidr_list": STR_LIST_OR_CSV, "num_uses": INT, "ttl": DURATION}
)
_SECRET_ID = obj(
    {"secret_id": STR, "secret_id_accessor": STR, "secret_id_ttl": INT, "secret_id_num_uses": INT},
    ("secret_id", "secret_id_accessor"),
)
_SECRET_ID_INFO = obj(
    {
        "secret_id_accessor": STR,
        "cidr_list": STR_LIST,
        "token_bound_cidrs": STR_LIST,
        "metadata": {"type": "object", "additionalProperties": STR},
        "secret_id_num_uses": INT,
        "secret_id_ttl": INT,
        "creation_time": STR,
        "last_updated_time": STR,
        "expiration_time": STR,
    }
)

"""The database secrets engine's HTTP routes (Vault's paths: config, roles, creds, static roles, leases)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.freshness import bound_from_record, enforce
from keycell.control_plane.router import (
    Context,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
    add_refusing_bad_input,
)
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    DURATION,
    KEYS,
    NO_CONTENT,
    STR,
    STR_LIST_OR_CSV,
    obj,
    ok,
)

_NAME = {"name": "A connection, role or secret name."}


def _doc(
    path: str, summary: str, ops: dict[Operation, OperationDoc], params: dict[str, str] | None = None
) -> RouteDoc:
    return RouteDoc(path, summary, params=params if params is not None else _NAME, operations=ops)


def register(router: Router, services: Any) -> None:
    db = services.database

    def write_config(ctx: Context) -> None:
        db.write_config(ctx.params["name"], ctx.data)

    def write_role(ctx: Context) -> None:
        db.write_role(ctx.params["name"], ctx.data)

    def creds(ctx: Context) -> Result:
        freshness = getattr(services, "freshness", None)
        if freshness is not None and ctx.entry is not None:  # the role's bound (issue 18)
            role = db.read_role(ctx.params["name"])
            enforce(
                freshness, bound_from_record(role), ctx.entry.cell, f"database/creds/{ctx.params['name']}"
            )
        data, lease = db.creds(ctx.params["name"])
        return Result(
            data=data,
            lease_id=lease.lease_id,
            lease_duration=int(lease.expire_time - lease.issue_time),
            renewable=lease.renewable,
        )

    name = r"(?P<name>[^/]+)"
    config_body = obj(
        {
            "plugin_name": STR,
            "connection_url": STR,
            "username": STR,
            "password": STR,
            "allowed_roles": STR_LIST_OR_CSV,
            "verify_connection": {"type": "boolean"},
        },
        ("plugin_name", "connection_url"),
    )
    role_body = obj(
        {
            "db_name": STR,
            "creation_statements": STR_LIST_OR_CSV,
            "revocation_statements": STR_LIST_OR_CSV,
            "renew_statements": STR_LIST_OR_CSV,
            "default_ttl": DURATION,
            "max_ttl": DURATION,
        },
        ("db_name", "creation_statements"),
    )
    add_refusing_bad_input(
        router,
        rf"database/config/{name}",
        {
            Operation.UPDATE: write_config,
            Operation.READ: lambda ctx: db.read_config(ctx.params["name"]),
            Operation.DELETE: lambda ctx: db.delete_config(ctx.params["name"]),
        },
        family="database",
        doc=_doc(
            "/database/config/{name}",
            "A database connection.",
            {
                Operation.UPDATE: OperationDoc(
                    "Configure a connection", body=config_body, body_required=True, responses=NO_CONTENT
                ),
                Operation.READ: OperationDoc(
                    "Read a connection (without its password)", responses=ok(ANY_OBJECT)
                ),
                Operation.DELETE: OperationDoc("Delete a connection", responses=NO_CONTENT),
            },
        ),
    )
    add_refusing_bad_input(
        router,
        r"database/config/?",
        {Operation.LIST: lambda ctx: db.list("config")},
        family="database",
        doc=RouteDoc(
            "/database/config",
            "Connections.",
            operations={Operation.LIST: OperationDoc("List connections", responses=ok(KEYS))},
        ),
    )
    add_refusing_bad_input(
        router,
        rf"database/roles/{name}",
        {
            Operation.UPDATE: write_role,
            Operation.READ: lambda ctx: db.read_role(ctx.params["name"]),
            Operation.DELETE: lambda ctx: db.delete_role(ctx.params["name"]),
        },
        family="database",
        doc=_doc(
            "/database/roles/{name}",
            "A role: the statements that make and drop a user.",
            {
                Operation.UPDATE: OperationDoc(
                    "Write a role", body=role_body, body_required=True, responses=NO_CONTENT
                ),
                Operation.READ: OperationDoc("Read a role", responses=ok(ANY_OBJECT)),
                Operation.DELETE: OperationDoc("Delete a role", responses=NO_CONTENT),
            },
        ),
    )
    add_refusing_bad_input(
        router,
        r"database/roles/?",
        {Operation.LIST: lambda ctx: db.list("roles")},
        family="database",
        doc=RouteDoc(
            "/database/roles",
            "Roles.",
            operations={Operation.LIST: OperationDoc("List roles", responses=ok(KEYS))},
        ),
    )
    add_refusing_bad_input(
        router,
        rf"database/creds/{name}",
        {Operation.READ: creds},
        family="database",
        wrappable=True,
        doc=_doc(
            "/database/creds/{name}",
            "Dynamic credentials.",
            {
                Operation.READ: OperationDoc(
                    "A new database user with a lease", responses=ok(obj({"username": STR, "password": STR}))
                )
            },
        ),
    )
    add_refusing_bad_input(
        router,
        r"database/status",
        {Operation.READ: lambda ctx: db.status()},
        family="database",
        doc=RouteDoc(
            "/database/status",
            "Revocations being retried.",
            operations={
                Operation.READ: OperationDoc(
                    "Failed revocations and their next attempt", responses=ok(ANY_OBJECT)
                )
            },
        ),
    )

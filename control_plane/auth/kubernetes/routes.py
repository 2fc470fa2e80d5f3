"""The Kubernetes auth method's HTTP routes (Vault's auth/kubernetes/*: config, role,
login), for one mount enabled through sys/auth."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.auth.token.routes import TOKEN_SETTINGS_SCHEMA
from keycell.control_plane.router import Context, Operation, OperationDoc, Result, RouteDoc, Router
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    AUTH_RESPONSE,
    BOOL,
    KEYS,
    NO_CONTENT,
    STR,
    STR_LIST_OR_CSV,
    obj,
    ok,
)


def register(router: Router, services: Any, k8s: Any) -> None:
    base = f"auth/{k8s.mount}"

    def login(ctx: Context) -> Result:
        token, entry, auth = k8s.login(ctx.data.get("role"), ctx.data.get("jwt"))
        lease = services.register_token_lease(k8s.login_path, token, entry)
        if lease:
            auth["lease_id"] = lease
        return Result(auth=auth)

    router.add(
        base + "/login",
        {Operation.UPDATE: login},
        authenticated=False,
        family="auth",
        doc=RouteDoc(
            f"/{base}/login",
            "Kubernetes login: a service account token, reviewed by the cluster, for a token.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Log in with a service account token",
                    body=obj({"role": STR, "jwt": STR}, ("role", "jwt")),
                    body_required=True,
                    responses=AUTH_RESPONSE,
                )
            },
        ),
    )
    router.add(
        base + "/config",
        {
            Operation.READ: lambda ctx: k8s.read_config(),
            Operation.UPDATE: lambda ctx: k8s.write_config(ctx.data),
        },
        family="auth",
        doc=RouteDoc(
            f"/{base}/config",
            "Where the cluster's API is and how to reach it (the reviewer JWT is never shown).",
            operations={
                Operation.READ: OperationDoc("Read the configuration", responses=ok(ANY_OBJECT)),
                Operation.UPDATE: OperationDoc(
                    "Configure Kubernetes auth", body=_CONFIG, body_required=True, responses=NO_CONTENT
                ),
            },
        ),
    )
    router.add(
        base + "/role/?",
        {Operation.LIST: lambda ctx: {"keys": k8s.list_roles()}},
        family="auth",
        doc=RouteDoc(
            f"/{base}/role",
            "Kubernetes roles.",
            operations={Operation.LIST: OperationDoc("List roles", responses=ok(KEYS))},
        ),
    )
    router.add(
        base + r"/role/(?P<name>[^/]+)",
        {
            Operation.READ: lambda ctx: k8s.read_role(ctx.params["name"]),
            Operation.UPDATE: lambda ctx: k8s.write_role(ctx.params["name"], ctx.data),
            Operation.DELETE: lambda ctx: k8s.delete_role(ctx.params["name"]),
        },
        family="auth",
        doc=RouteDoc(
            f"/{base}/role/{{name}}",
            "A role: which service accounts of which namespaces may log in, and their tokens.",
            params={"name": "The role's name."},
            operations={
                Operation.READ: OperationDoc("Read a role", responses=ok(ANY_OBJECT)),
                Operation.UPDATE: OperationDoc(
                    "Create or update a role", body=_ROLE, body_required=True, responses=NO_CONTENT
                ),
                Operation.DELETE: OperationDoc("Delete a role", responses=NO_CONTENT),
            },
        ),
    )


_CONFIG = obj(
    {
        "kubernetes_host": STR,
        "kubernetes_ca_cert": STR,
        "token_reviewer_jwt": STR,
        "issuer": STR,
        "disable_iss_validation": BOOL,
        "disable_local_ca_jwt": BOOL,
    },
    ("kubernetes_host",),
)
_ROLE = obj(
    {
        "bound_service_account_names": STR_LIST_OR_CSV,
        "bound_service_account_namespaces": STR_LIST_OR_CSV,
        "audience": STR,
        "alias_name_source": STR,
        **TOKEN_SETTINGS_SCHEMA,
    }
)

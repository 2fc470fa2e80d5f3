"""The token auth method's HTTP routes (Vault's auth/token/*)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.freshness import parse_bound
from keycell.control_plane.router import (
    Context,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
    field_bool,
    field_int,
    field_str,
)
from keycell.control_plane.routes.openapi import (
    AUTH_RESPONSE,
    BOOL,
    DURATION,
    INT,
    NO_CONTENT,
    RFC3339,
    STR,
    STR_LIST,
    STR_LIST_OR_CSV,
    nullable,
    obj,
    ok,
)


def register(router: Router, services: Any) -> None:
    tokens = services.tokens

    def with_auth(token: str, entry: Any) -> Result:
        auth = tokens.auth_data(token, entry)
        return Result(auth=auth)

    def create(path: str) -> Any:
        def handler(ctx: Context) -> Result:
            data = ctx.data
            meta = data.get("meta") or {}
            if not isinstance(meta, dict):
                raise InvalidRequest("'meta' must be a map of strings")
            token, entry = tokens.create(
                ctx.entry,
                policies=data.get("policies"),
                ttl=data.get("ttl") or 0,
                explicit_max_ttl=data.get("explicit_max_ttl") or 0,
                period=data.get("period") or 0,
                no_parent=field_bool(data, "no_parent"),
                no_default_policy=field_bool(data, "no_default_policy"),
                renewable=data.get("renewable") if isinstance(data.get("renewable"), bool) else None,
                display_name=field_str(data, "display_name", "") or "",
                meta=meta,
                num_uses=field_int(data, "num_uses", 0) or 0,
                path=path,
                sudo=ctx.acl.allows(ctx.request.path, "sudo"),
                stale_bound=parse_bound(data),
            )
            if data.get("id"):
                raise InvalidRequest("custom token IDs are not supported; omit 'id'")
            lease = services.register_token_lease(path, token, entry)
            result = with_auth(token, entry)
            if lease:
                result.auth["lease_id"] = lease  # type: ignore[index]
            return result

        return handler

    def lookup_self(ctx: Context) -> dict[str, Any]:
        return tokens.lookup_data(ctx.entry, ctx.token)  # type: ignore[no-any-return]

    def lookup(ctx: Context) -> dict[str, Any]:
        token = field_str(ctx.data, "token")
        if not token:
            raise InvalidRequest("'token' is required")
        # Vault echoes the token it was given as `id` (a lookup by accessor leaves it "")
        return tokens.lookup_data(tokens.lookup(token), token)  # type: ignore[no-any-return]

    def lookup_accessor(ctx: Context) -> dict[str, Any]:
        accessor = field_str(ctx.data, "accessor")
        if not accessor:
            raise InvalidRequest("'accessor' is required")
        return tokens.lookup_data(tokens.lookup_accessor(accessor))  # type: ignore[no-any-return]

    def renew_self(ctx: Context) -> Result:
        assert ctx.token is not None
        entry = tokens.renew(ctx.token, ctx.data.get("increment"))
        return with_auth(ctx.token, entry)

    def renew(ctx: Context) -> Result:
        token = field_str(ctx.data, "token")
        if not token:
            raise InvalidRequest("'token' is required")
        return with_auth(token, tokens.renew(token, ctx.data.get("increment")))

    def revoke_self(ctx: Context) -> None:
        assert ctx.token is not None
        tokens.revoke(ctx.token)

    def revoke(ctx: Context) -> None:
        token = field_str(ctx.data, "token")
        if not token:
            raise InvalidRequest("'token' is required")
        tokens.revoke(token)

    def revoke_orphan(ctx: Context) -> None:
        token = field_str(ctx.data, "token")
        if not token:
            raise InvalidRequest("'token' is required")
        tokens.revoke_orphan(token)

    def revoke_accessor(ctx: Context) -> None:
        accessor = field_str(ctx.data, "accessor")
        if not accessor:
            raise InvalidRequest("'accessor' is required")
        tokens.revoke_accessor(accessor)

    def token_doc(path: str, summary: str, operation: OperationDoc, *ops: Operation) -> RouteDoc:
        return RouteDoc(path, summary, operations={op: operation for op in ops or (Operation.UPDATE,)})

    create_doc = OperationDoc("Create a token", body=_TOKEN_CREATE, responses=AUTH_RESPONSE)
    router.add(
        r"auth/token/create",
        {Operation.UPDATE: create("auth/token/create")},
        family="auth",
        doc=token_doc("/auth/token/create", "Create a child token (or an orphan, with sudo).", create_doc),
    )
    router.add(
        r"auth/token/create-orphan",
        {Operation.UPDATE: create("auth/token/create-orphan")},
        family="auth",
        doc=token_doc("/auth/token/create-orphan", "Create an orphan token.", create_doc),
    )
    router.add(
        r"auth/token/lookup-self",
        {Operation.READ: lookup_self, Operation.UPDATE: lookup_self},
        family="auth",
        doc=token_doc(
            "/auth/token/lookup-self",
            "The calling token.",
            OperationDoc("Look up the calling token", responses=ok(_TOKEN_LOOKUP)),
            Operation.READ,
            Operation.UPDATE,
        ),
    )
    router.add(
        r"auth/token/lookup",
        {Operation.UPDATE: lookup},
        family="auth",
        doc=token_doc(
            "/auth/token/lookup",
            "Look a token up.",
            OperationDoc(
                "Look a token up", body=_TOKEN_FIELD, body_required=True, responses=ok(_TOKEN_LOOKUP)
            ),
        ),
    )
    router.add(
        r"auth/token/lookup-accessor",
        {Operation.UPDATE: lookup_accessor},
        family="auth",
        doc=token_doc(
            "/auth/token/lookup-accessor",
            "Look a token up by accessor.",
            OperationDoc(
                "Look a token up by accessor",
                body=_ACCESSOR_FIELD,
                body_required=True,
                responses=ok(_TOKEN_LOOKUP),
            ),
        ),
    )
    router.add(
        r"auth/token/renew-self",
        {Operation.UPDATE: renew_self},
        family="auth",
        doc=token_doc(
            "/auth/token/renew-self",
            "Renew the calling token.",
            OperationDoc(
                "Renew the calling token", body=obj({"increment": DURATION}), responses=AUTH_RESPONSE
            ),
        ),
    )
    router.add(
        r"auth/token/renew",
        {Operation.UPDATE: renew},
        family="auth",
        doc=token_doc(
            "/auth/token/renew",
            "Renew a token.",
            OperationDoc(
                "Renew a token",
                body=obj({"token": STR, "increment": DURATION}, ("token",)),
                body_required=True,
                responses=AUTH_RESPONSE,
            ),
        ),
    )
    router.add(
        r"auth/token/revoke-self",
        {Operation.UPDATE: revoke_self},
        family="auth",
        doc=token_doc(
            "/auth/token/revoke-self",
            "Revoke the calling token and its children.",
            OperationDoc("Revoke the calling token", responses=NO_CONTENT),
        ),
    )
    router.add(
        r"auth/token/revoke",
        {Operation.UPDATE: revoke},
        family="auth",
        doc=token_doc(
            "/auth/token/revoke",
            "Revoke a token and its children.",
            OperationDoc("Revoke a token", body=_TOKEN_FIELD, body_required=True, responses=NO_CONTENT),
        ),
    )
    router.add(
        r"auth/token/revoke-orphan",
        {Operation.UPDATE: revoke_orphan},
        sudo=True,
        family="auth",
        doc=token_doc(
            "/auth/token/revoke-orphan",
            "Revoke a token, leaving its children as orphans.",
            OperationDoc("Revoke a token only", body=_TOKEN_FIELD, body_required=True, responses=NO_CONTENT),
        ),
    )
    router.add(
        r"auth/token/revoke-accessor",
        {Operation.UPDATE: revoke_accessor},
        family="auth",
        doc=token_doc(
            "/auth/token/revoke-accessor",
            "Revoke a token by accessor.",
            OperationDoc(
                "Revoke a token by accessor", body=_ACCESSOR_FIELD, body_required=True, responses=NO_CONTENT
            ),
        ),
    )


_TOKEN_FIELD = obj({"token": STR}, ("token",))


_ACCESSOR_FIELD = obj({"accessor": STR}, ("accessor",))


_TOKEN_CREATE = obj(
    {
        "policies": STR_LIST_OR_CSV,
        "meta": {"type": "object", "additionalProperties": STR},
        "no_parent": BOOL,
        "no_default_policy": BOOL,
        "renewable": BOOL,
        "ttl": DURATION,
        "explicit_max_ttl": DURATION,
        "period": DURATION,
        "display_name": STR,
        "num_uses": {"type": "integer", "minimum": 0},
    }
)


_TOKEN_LOOKUP = obj(
    {
        "accessor": STR,
        "creation_time": INT,
        "creation_ttl": INT,
        "display_name": STR,
        "entity_id": STR,
        "expire_time": nullable(RFC3339),
        "explicit_max_ttl": INT,
        "id": STR,
        "issue_time": RFC3339,
        "meta": nullable({"type": "object", "additionalProperties": STR}),
        "num_uses": INT,
        "orphan": BOOL,
        "path": STR,
        "policies": STR_LIST,
        "renewable": BOOL,
        "ttl": INT,
        "type": STR,
        "period": INT,
    },
    ("accessor", "creation_time", "creation_ttl", "id", "policies", "ttl", "type"),
)

# The token settings every auth method's role takes (auth/token/settings.py), for their
# OpenAPI documents.
TOKEN_SETTINGS_SCHEMA = {
    "token_policies": STR_LIST_OR_CSV,
    "policies": STR_LIST_OR_CSV,
    "token_ttl": DURATION,
    "token_max_ttl": DURATION,
    "token_period": DURATION,
    "token_explicit_max_ttl": DURATION,
    "token_no_default_policy": BOOL,
    "token_num_uses": INT,
    "token_type": STR,
    "max_revocation_staleness": {"type": "number"},
    "on_stale": {"type": "string", "enum": ["refuse", "local-only", "serve"]},
}

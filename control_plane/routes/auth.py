"""auth/token/* and auth/jwt/* (Vault's token store and JWT auth method)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.router import Context, Operation, Result, Router, field_bool, field_int, field_str


def register(router: Router, services: Any) -> None:
    tokens = services.tokens
    jwt = services.jwt

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
        return tokens.lookup_data(tokens.lookup(token))  # type: ignore[no-any-return]

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

    router.add(r"auth/token/create", {Operation.UPDATE: create("auth/token/create")}, family="auth")
    router.add(
        r"auth/token/create-orphan", {Operation.UPDATE: create("auth/token/create-orphan")}, family="auth"
    )
    router.add(
        r"auth/token/lookup-self", {Operation.READ: lookup_self, Operation.UPDATE: lookup_self}, family="auth"
    )
    router.add(r"auth/token/lookup", {Operation.UPDATE: lookup}, family="auth")
    router.add(r"auth/token/lookup-accessor", {Operation.UPDATE: lookup_accessor}, family="auth")
    router.add(r"auth/token/renew-self", {Operation.UPDATE: renew_self}, family="auth")
    router.add(r"auth/token/renew", {Operation.UPDATE: renew}, family="auth")
    router.add(r"auth/token/revoke-self", {Operation.UPDATE: revoke_self}, family="auth")
    router.add(r"auth/token/revoke", {Operation.UPDATE: revoke}, family="auth")
    router.add(r"auth/token/revoke-orphan", {Operation.UPDATE: revoke_orphan}, sudo=True, family="auth")
    router.add(r"auth/token/revoke-accessor", {Operation.UPDATE: revoke_accessor}, family="auth")

    # --- auth/jwt ---------------------------------------------------------------------

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

    router.add(r"auth/jwt/login", {Operation.UPDATE: jwt_login}, authenticated=False, family="auth")
    router.add(
        r"auth/jwt/config",
        {Operation.READ: jwt_config_read, Operation.UPDATE: jwt_config_write},
        family="auth",
    )
    router.add(r"auth/jwt/role/?", {Operation.LIST: role_list}, family="auth")
    router.add(
        r"auth/jwt/role/(?P<name>[^/]+)",
        {Operation.READ: role_read, Operation.UPDATE: role_write, Operation.DELETE: role_delete},
        family="auth",
    )

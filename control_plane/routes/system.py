"""sys/ for a running cell: ACL policies, leases, response wrapping, capabilities, metrics."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.router import Context, Operation, Result, Router, field_list, field_str


def register(router: Router, services: Any) -> None:
    policies = services.policies
    leases = services.leases
    wrapping = services.wrapping

    # --- sys/policies/acl -----------------------------------------------------------------

    def policy_read(ctx: Context) -> dict[str, Any]:
        return policies.read(ctx.params["name"])  # type: ignore[no-any-return]

    def policy_write(ctx: Context) -> None:
        text = field_str(ctx.data, "policy")
        if text is None:
            raise InvalidRequest("'policy' (the policy text, HCL or JSON) is required")
        policies.write(ctx.params["name"], text)

    def policy_delete(ctx: Context) -> None:
        policies.delete(ctx.params["name"])

    def policy_list(ctx: Context) -> dict[str, Any]:
        return {"keys": policies.list(), "policies": policies.list()}

    router.add(
        r"sys/policies/acl/?", {Operation.LIST: policy_list, Operation.READ: policy_list}, family="sys"
    )
    router.add(
        r"sys/policies/acl/(?P<name>[^/]+)",
        {Operation.READ: policy_read, Operation.UPDATE: policy_write, Operation.DELETE: policy_delete},
        family="sys",
    )
    # The older sys/policy/:name form, which some clients still use.
    router.add(
        r"sys/policy/(?P<name>[^/]+)",
        {Operation.READ: policy_read, Operation.UPDATE: policy_write, Operation.DELETE: policy_delete},
        family="sys",
    )

    # --- sys/capabilities-self ------------------------------------------------------------------

    def capabilities_self(ctx: Context) -> dict[str, Any]:
        single = field_str(ctx.data, "path")
        paths = field_list(ctx.data, "paths") or ([single] if single else [])
        if not paths:
            raise InvalidRequest("'paths' is required")
        out: dict[str, Any] = {}
        for path in paths:
            out[path] = sorted(ctx.acl.capabilities(path))
        if len(paths) == 1:
            out["capabilities"] = out[paths[0]]
        return out

    router.add(r"sys/capabilities-self", {Operation.UPDATE: capabilities_self}, family="sys")

    # --- sys/leases -------------------------------------------------------------------------

    def lease_id(ctx: Context) -> str:
        value = field_str(ctx.data, "lease_id") or ctx.params.get("lease") or ""
        if not value:
            raise InvalidRequest("'lease_id' is required")
        return value

    def lease_lookup(ctx: Context) -> dict[str, Any]:
        return leases.lookup(lease_id(ctx))  # type: ignore[no-any-return]

    def lease_list(ctx: Context) -> dict[str, Any]:
        found = leases.list(ctx.params.get("prefix", ""))
        if not found.get("keys"):
            raise NotFound()
        return found  # type: ignore[no-any-return]

    def lease_renew(ctx: Context) -> Result:
        lid = lease_id(ctx)
        if lid.startswith("auth/"):
            # An auth lease stands for a token: renewing it renews the token.
            lease = leases.get(lid)
            if lease is None:
                raise InvalidRequest("lease not found or lease is not renewable")
            entry = services.tokens.renew_accessor(lease.revoker_data["accessor"], ctx.data.get("increment"))
            ttl = entry.ttl(services.clock())
            return Result(lease_id=lid, renewable=entry.renewable, lease_duration=ttl, data={})
        renewed = leases.renew(lid, ctx.data.get("increment") or 0)
        return Result(
            lease_id=renewed["lease_id"],
            renewable=renewed["renewable"],
            lease_duration=renewed["lease_duration"],
            warnings=renewed.get("warnings") or None,
            data={},
        )

    def lease_revoke(ctx: Context) -> None:
        leases.revoke(lease_id(ctx))

    def revoke_prefix(ctx: Context) -> None:
        leases.revoke_prefix(ctx.params["prefix"])

    def revoke_force(ctx: Context) -> None:
        leases.revoke_force(ctx.params["prefix"])

    prefix = r"(?P<prefix>.+)"
    router.add(r"sys/leases/lookup", {Operation.UPDATE: lease_lookup}, family="sys")
    router.add(rf"sys/leases/lookup/{prefix}", {Operation.LIST: lease_list}, sudo=True, family="sys")
    router.add(r"sys/leases/renew(?:/(?P<lease>.+))?", {Operation.UPDATE: lease_renew}, family="sys")
    router.add(r"sys/leases/revoke(?:/(?P<lease>.+))?", {Operation.UPDATE: lease_revoke}, family="sys")
    router.add(
        rf"sys/leases/revoke-prefix/{prefix}", {Operation.UPDATE: revoke_prefix}, sudo=True, family="sys"
    )
    router.add(
        rf"sys/leases/revoke-force/{prefix}", {Operation.UPDATE: revoke_force}, sudo=True, family="sys"
    )
    # Vault's older aliases, still used by clients.
    router.add(r"sys/renew(?:/(?P<lease>.+))?", {Operation.UPDATE: lease_renew}, family="sys")
    router.add(r"sys/revoke(?:/(?P<lease>.+))?", {Operation.UPDATE: lease_revoke}, family="sys")
    router.add(rf"sys/revoke-prefix/{prefix}", {Operation.UPDATE: revoke_prefix}, sudo=True, family="sys")

    # --- sys/wrapping -------------------------------------------------------------------------

    def wrapping_token(ctx: Context) -> str:
        token = field_str(ctx.data, "token") or ctx.request.token
        if not token:
            raise InvalidRequest("'token' (the wrapping token) is required")
        return token

    def wrap(ctx: Context) -> Result:
        ttl = ctx.request.headers.get("x-vault-wrap-ttl")
        if not ttl:
            raise InvalidRequest("endpoint requires response wrapping to be used")
        info = wrapping.wrap_data(dict(ctx.data), ttl)
        body = router._envelope("", Result())
        body["wrap_info"] = info
        return Result(raw=body)

    def unwrap(ctx: Context) -> Result:
        inner = wrapping.unwrap(wrapping_token(ctx))
        return Result(raw=inner)

    def wrap_lookup(ctx: Context) -> dict[str, Any]:
        return wrapping.lookup(wrapping_token(ctx))  # type: ignore[no-any-return]

    def rewrap(ctx: Context) -> Result:
        body = router._envelope("", Result())
        body["wrap_info"] = wrapping.rewrap(wrapping_token(ctx))
        return Result(raw=body)

    # A wrapping token is its own credential: unwrap, lookup and rewrap take it as
    # X-Vault-Token or in the body, without another token.
    router.add(r"sys/wrapping/wrap", {Operation.UPDATE: wrap}, wrappable=False, family="sys")
    router.add(
        r"sys/wrapping/unwrap", {Operation.UPDATE: unwrap}, authenticated=False, wrappable=False, family="sys"
    )
    router.add(r"sys/wrapping/lookup", {Operation.UPDATE: wrap_lookup}, authenticated=False, family="sys")
    router.add(
        r"sys/wrapping/rewrap", {Operation.UPDATE: rewrap}, authenticated=False, wrappable=False, family="sys"
    )

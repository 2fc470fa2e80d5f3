"""sys/ for a running cell: ACL policies, leases, response wrapping, capabilities, metrics."""

from __future__ import annotations

import uuid
from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.router import (
    Context,
    JsonSchema,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
    field_bool,
    field_int,
    field_list,
    field_str,
)
from keycell.control_plane.routes import with_top_level
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    AUTH,
    BOOL,
    DURATION,
    INT,
    KEYS,
    NO_CONTENT,
    RFC3339,
    STR,
    STR_LIST,
    STR_LIST_OR_CSV,
    WRAPPED_RESPONSE,
    nullable,
    obj,
    ok,
)


def register(router: Router, services: Any) -> None:
    policies = services.policies
    leases = services.leases
    wrapping = services.wrapping

    # --- sys/policies/acl -----------------------------------------------------------------

    def policy_read(ctx: Context) -> dict[str, Any]:
        return policies.read(ctx.params["name"])  # type: ignore[no-any-return]

    def policy_read_older(ctx: Context) -> Result:
        """sys/policy/:name answers as Vault's older form does: the text is `rules`, and
        the fields are at the top of the body as well as in `data`."""
        found = policies.read(ctx.params["name"])
        data = {"rules" if key == "policy" else key: value for key, value in found.items()}
        return with_top_level(data)

    def policy_write(ctx: Context) -> None:
        text = field_str(ctx.data, "policy")
        if text is None:
            text = field_str(ctx.data, "rules")  # the older sys/policy form's name for it
        if text is None:
            raise InvalidRequest("'policy' (the policy text, HCL or JSON) is required")
        cas = field_int(ctx.data, "cas")
        cas_required = field_bool(ctx.data, "cas_required") if "cas_required" in ctx.data else None
        policies.write(ctx.params["name"], text, cas=cas, cas_required=cas_required)

    def policy_delete(ctx: Context) -> None:
        policies.delete(ctx.params["name"])

    def policy_list(ctx: Context) -> dict[str, Any]:
        return {"keys": policies.list(), "policies": policies.list()}

    def policy_doc(path: str, summary: str, read: JsonSchema) -> RouteDoc:
        return RouteDoc(
            path,
            summary,
            params={"name": "The policy's name."},
            operations={
                Operation.READ: OperationDoc("Read a policy", responses=ok(read)),
                Operation.UPDATE: OperationDoc(
                    "Create or update a policy",
                    body=obj(
                        {"policy": STR, "cas": INT, "cas_required": BOOL},
                        ("policy",),
                        examples=[_POLICY_EXAMPLE],
                    ),
                    body_required=True,
                    responses=NO_CONTENT,
                ),
                Operation.DELETE: OperationDoc("Delete a policy", responses=NO_CONTENT),
            },
        )

    router.add(
        r"sys/policies/acl/?",
        {Operation.LIST: policy_list, Operation.READ: policy_list},
        family="sys",
        doc=RouteDoc(
            "/sys/policies/acl",
            "ACL policies.",
            operations={
                Operation.LIST: OperationDoc("List ACL policies", responses=ok(_POLICY_NAMES)),
                Operation.READ: OperationDoc(responses=ok(_POLICY_NAMES)),
            },
        ),
    )
    router.add(
        r"sys/policies/acl/(?P<name>[^/]+)",
        {Operation.READ: policy_read, Operation.UPDATE: policy_write, Operation.DELETE: policy_delete},
        family="sys",
        doc=policy_doc("/sys/policies/acl/{name}", "An ACL policy (HCL or JSON).", _POLICY),
    )
    # The older sys/policy/:name form, which some clients still use.
    router.add(
        r"sys/policy/(?P<name>[^/]+)",
        {Operation.READ: policy_read_older, Operation.UPDATE: policy_write, Operation.DELETE: policy_delete},
        family="sys",
        doc=policy_doc("/sys/policy/{name}", "An ACL policy (the older sys/policy form).", _POLICY_OLDER),
    )

    # --- sys/capabilities-self ------------------------------------------------------------------

    def capabilities_self(ctx: Context) -> Result:
        single = field_str(ctx.data, "path")
        paths = field_list(ctx.data, "paths") or ([single] if single else [])
        if not paths:
            raise InvalidRequest("'paths' is required")
        out: dict[str, Any] = {}
        for path in paths:
            out[path] = sorted(ctx.acl.capabilities(path))
        if len(paths) == 1:
            out["capabilities"] = out[paths[0]]
        return with_top_level(out)  # Vault's older clients read the paths at the top

    router.add(
        r"sys/capabilities-self",
        {Operation.UPDATE: capabilities_self},
        family="sys",
        doc=RouteDoc(
            "/sys/capabilities-self",
            "The caller's capabilities on paths.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Capabilities of the calling token",
                    body=obj({"path": STR, "paths": STR_LIST_OR_CSV}),
                    body_required=True,
                    responses=ok({"type": "object", "additionalProperties": STR_LIST}),
                )
            },
        ),
    )

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

    def lease_doc(path: str, summary: str, operation: OperationDoc) -> RouteDoc:
        return RouteDoc(
            path,
            summary,
            params={"lease": _SPANS_LEASE, "prefix": _SPANS_PREFIX},
            operations={Operation.UPDATE: operation, Operation.LIST: operation},
            more_paths=(path + "/{lease}",) if "{" not in path else (),
        )

    renew_doc = OperationDoc(
        "Renew a lease",
        "The lease ID is in the body or the path.",
        body=obj({"lease_id": STR, "increment": DURATION}),
        responses=ok({"type": "object", "maxProperties": 0}),
    )
    revoke_doc = OperationDoc(
        "Revoke a lease",
        "The lease ID is in the body or the path.",
        body=obj({"lease_id": STR, "sync": BOOL}),
        responses=NO_CONTENT,
    )
    prefix_doc = OperationDoc("Revoke every lease under a prefix", responses=NO_CONTENT)
    force_doc = OperationDoc(
        "Revoke every lease under a prefix, dropping them even if their revocation fails",
        responses=NO_CONTENT,
    )

    prefix = r"(?P<prefix>.+)"
    router.add(
        r"sys/leases/lookup",
        {Operation.UPDATE: lease_lookup},
        family="sys",
        doc=RouteDoc(
            "/sys/leases/lookup",
            "Lease lookup.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Look a lease up",
                    body=obj({"lease_id": STR}, ("lease_id",)),
                    body_required=True,
                    responses=ok(_LEASE),
                )
            },
        ),
    )
    router.add(
        rf"sys/leases/lookup/{prefix}",
        {Operation.LIST: lease_list},
        sudo=True,
        family="sys",
        doc=lease_doc(
            "/sys/leases/lookup/{prefix}",
            "Leases by prefix.",
            OperationDoc("List leases", responses=ok(KEYS)),
        ),
    )
    router.add(
        r"sys/leases/renew(?:/(?P<lease>.+))?",
        {Operation.UPDATE: lease_renew},
        family="sys",
        doc=lease_doc("/sys/leases/renew", "Lease renewal.", renew_doc),
    )
    router.add(
        r"sys/leases/revoke(?:/(?P<lease>.+))?",
        {Operation.UPDATE: lease_revoke},
        family="sys",
        doc=lease_doc("/sys/leases/revoke", "Lease revocation.", revoke_doc),
    )
    router.add(
        rf"sys/leases/revoke-prefix/{prefix}",
        {Operation.UPDATE: revoke_prefix},
        sudo=True,
        family="sys",
        doc=lease_doc("/sys/leases/revoke-prefix/{prefix}", "Revocation by prefix.", prefix_doc),
    )
    router.add(
        rf"sys/leases/revoke-force/{prefix}",
        {Operation.UPDATE: revoke_force},
        sudo=True,
        family="sys",
        doc=lease_doc("/sys/leases/revoke-force/{prefix}", "Forced revocation by prefix.", force_doc),
    )
    # Vault's older aliases, still used by clients.
    router.add(
        r"sys/renew(?:/(?P<lease>.+))?",
        {Operation.UPDATE: lease_renew},
        family="sys",
        doc=lease_doc("/sys/renew", "Lease renewal (older alias).", renew_doc),
    )
    router.add(
        r"sys/revoke(?:/(?P<lease>.+))?",
        {Operation.UPDATE: lease_revoke},
        family="sys",
        doc=lease_doc("/sys/revoke", "Lease revocation (older alias).", revoke_doc),
    )
    router.add(
        rf"sys/revoke-prefix/{prefix}",
        {Operation.UPDATE: revoke_prefix},
        sudo=True,
        family="sys",
        doc=lease_doc("/sys/revoke-prefix/{prefix}", "Revocation by prefix (older alias).", prefix_doc),
    )

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
        """The wrapped response in Vault's full envelope: a response wrapped by the
        router has every field already; sys/wrapping/wrap's data (and a record from
        before envelopes were stored) gets the ones it lacks, with this request's id."""
        inner = wrapping.unwrap(wrapping_token(ctx))
        return Result(raw={**router._envelope(str(uuid.uuid4()), Result()), **inner})

    def wrap_lookup(ctx: Context) -> dict[str, Any]:
        return wrapping.lookup(wrapping_token(ctx))  # type: ignore[no-any-return]

    def rewrap(ctx: Context) -> Result:
        body = router._envelope("", Result())
        body["wrap_info"] = wrapping.rewrap(wrapping_token(ctx))
        return Result(raw=body)

    # A wrapping token is its own credential: unwrap, lookup and rewrap take it as
    # X-Vault-Token or in the body, without another token.
    token_body = obj({"token": STR})
    router.add(
        r"sys/wrapping/wrap",
        {Operation.UPDATE: wrap},
        wrappable=False,
        family="sys",
        doc=RouteDoc(
            "/sys/wrapping/wrap",
            "Response wrapping: wrap the request body.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Wrap data",
                    body=ANY_OBJECT,
                    body_required=True,
                    headers={"X-Vault-Wrap-TTL": _WRAP_TTL},
                    responses=WRAPPED_RESPONSE,
                )
            },
        ),
    )
    router.add(
        r"sys/wrapping/unwrap",
        {Operation.UPDATE: unwrap},
        authenticated=False,
        wrappable=False,
        family="sys",
        doc=RouteDoc(
            "/sys/wrapping/unwrap",
            "Response wrapping: unwrap, exactly once.",
            description=_UNWRAP_CREDENTIAL,
            token_accepted=True,
            operations={
                Operation.UPDATE: OperationDoc(
                    "Unwrap a wrapped response",
                    body=token_body,
                    responses={200: obj({"data": nullable(ANY_OBJECT), "auth": nullable(AUTH)})},
                )
            },
        ),
    )
    router.add(
        r"sys/wrapping/lookup",
        # GET with the wrapping token as X-Vault-Token is how Vault's Go client (and so
        # Vault Agent, before it unwraps a secret ID) looks one up; POST takes it in the body
        {Operation.READ: wrap_lookup, Operation.UPDATE: wrap_lookup},
        authenticated=False,
        family="sys",
        doc=RouteDoc(
            "/sys/wrapping/lookup",
            "Response wrapping: a wrapping token's properties.",
            description=_UNWRAP_CREDENTIAL,
            token_accepted=True,
            operations={
                Operation.READ: OperationDoc(
                    "Look the X-Vault-Token wrapping token up", responses=ok(_WRAP_LOOKUP)
                ),
                Operation.UPDATE: OperationDoc(
                    "Look a wrapping token up", body=token_body, responses=ok(_WRAP_LOOKUP)
                ),
            },
        ),
    )
    router.add(
        r"sys/wrapping/rewrap",
        {Operation.UPDATE: rewrap},
        authenticated=False,
        wrappable=False,
        family="sys",
        doc=RouteDoc(
            "/sys/wrapping/rewrap",
            "Response wrapping: the same response behind a new token.",
            description=_UNWRAP_CREDENTIAL,
            token_accepted=True,
            operations={
                Operation.UPDATE: OperationDoc("Rewrap", body=token_body, responses=WRAPPED_RESPONSE)
            },
        ),
    )


# --- documentation (sys/openapi) -------------------------------------------------------------

_POLICY_EXAMPLE = {"policy": 'path "secret/data/app/*" { capabilities = ["read", "list"] }'}
_WRAP_LOOKUP = obj(
    {"creation_path": STR, "creation_time": RFC3339, "creation_ttl": INT},
    ("creation_path", "creation_time", "creation_ttl"),
)
_POLICY_FIELDS: dict[str, JsonSchema] = {
    "name": STR,
    "version": INT,
    "modified": RFC3339,  # "" for a built-in policy never written
    "cas_required": BOOL,
    "allow_slashes_in_identity_templates": BOOL,
    "allow_wildcards_in_identity_templates": BOOL,
}
_POLICY = obj({**_POLICY_FIELDS, "policy": STR}, ("name", "policy", "version", "cas_required"))
_POLICY_OLDER = obj({**_POLICY_FIELDS, "rules": STR}, ("name", "rules", "version", "cas_required"))
_POLICY_NAMES = obj({"keys": STR_LIST, "policies": STR_LIST}, ("keys", "policies"))
_LEASE = obj(
    {
        "id": STR,
        "issue_time": RFC3339,
        "expire_time": RFC3339,
        "last_renewal_time": nullable(RFC3339),
        "renewable": BOOL,
        "ttl": INT,
        "token_accessor": STR,  # a token's lease only (Keycell's; keycell breach reads it)
    },
    ("id", "issue_time", "expire_time", "renewable", "ttl"),
)
_SPANS_LEASE = "A lease ID; it spans segments (`auth/token/create/<id>`), sent unescaped."
_SPANS_PREFIX = "A lease prefix; it may span segments (`auth/jwt/`), sent unescaped."
_WRAP_TTL = {"type": "string", "pattern": r"^[1-9][0-9]{0,3}(s|m)?$"}
_UNWRAP_CREDENTIAL = (
    "The wrapping token is the `token` field or the X-Vault-Token header; no other token is needed."
)

"""The token settings every auth method's role carries (Vault's `tokenutil` fields):
which policies the login's token gets, its TTLs, period, use count, and Keycell's
revocation freshness bound (issue 18 §3). One parser, one reader and one issuer, used
by the JWT and AppRole methods alike.

A role record holds them under their `token_*` names; `parse_token_settings` accepts
Vault's legacy aliases too (`policies`, `ttl`, `max_ttl`, `period`, `num_uses`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from keycell.control_plane.auth.token.store import TokenEntry, TokenStore, parse_duration, parse_policies
from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.freshness import bound_from_record, parse_bound

# Every field a role write may give for its tokens (legacy aliases included).
TOKEN_FIELDS = (
    "token_policies",
    "policies",
    "token_ttl",
    "ttl",
    "token_max_ttl",
    "max_ttl",
    "token_period",
    "period",
    "token_explicit_max_ttl",
    "token_no_default_policy",
    "token_num_uses",
    "num_uses",
    "token_type",
    "max_revocation_staleness",
    "on_stale",
)

DEFAULTS: dict[str, Any] = {
    "token_policies": [],
    "token_ttl": 0,
    "token_max_ttl": 0,
    "token_period": 0,
    "token_explicit_max_ttl": 0,
    "token_no_default_policy": False,
    "token_num_uses": 0,
}

_DURATIONS = (
    ("token_ttl", ("token_ttl", "ttl")),
    ("token_max_ttl", ("token_max_ttl", "max_ttl")),
    ("token_period", ("token_period", "period")),
    ("token_explicit_max_ttl", ("token_explicit_max_ttl",)),
)


def parse_token_settings(data: Mapping[str, Any], role: dict[str, Any]) -> None:
    """Update `role` with the token fields `data` gives (the others keep their value, or
    take the defaults). InvalidRequest, before anything is changed, for a bad value."""
    update: dict[str, Any] = {}

    def given(*names: str) -> object:
        return next((data[n] for n in names if n in data), None)

    def has(*names: str) -> bool:
        return any(n in data for n in names)

    if has("token_policies", "policies"):
        update["token_policies"] = parse_policies(given("token_policies", "policies"), "token_policies")
        if "root" in update["token_policies"]:
            raise InvalidRequest("auth methods cannot create root tokens")
    for field, aliases in _DURATIONS:
        if has(*aliases):
            update[field] = parse_duration(given(*aliases) or 0, field)
    if has("token_no_default_policy"):
        if not isinstance(data["token_no_default_policy"], bool):
            raise InvalidRequest("token_no_default_policy must be a boolean")
        update["token_no_default_policy"] = data["token_no_default_policy"]
    if has("token_num_uses", "num_uses"):
        uses = given("token_num_uses", "num_uses") or 0
        if isinstance(uses, bool) or not isinstance(uses, int) or uses < 0:
            raise InvalidRequest("token_num_uses must be a non-negative integer")
        update["token_num_uses"] = uses
    if has("token_type") and data["token_type"] not in (None, "", "default", "service", "default-service"):
        raise InvalidRequest('token_type must be "service" (or "default"); batch tokens are not supported')
    bound = parse_bound(dict(data), bound_from_record(role))
    merged = {**DEFAULTS, **role, **update}
    if 0 < merged["token_max_ttl"] < merged["token_ttl"]:
        raise InvalidRequest("token_ttl cannot be greater than token_max_ttl")
    role.clear()
    role.update(merged)
    role.pop("max_revocation_staleness", None)
    role.pop("on_stale", None)
    if bound is not None:
        role.update(bound.as_json())


# Vault 1.x's deprecated names of token_* fields, answered beside them on role reads.
LEGACY_ALIASES = ("policies", "ttl", "max_ttl", "period", "num_uses")


def token_settings_json(
    role: Mapping[str, Any], *, aliases: Literal["always", "when-set"] = "always"
) -> dict[str, Any]:
    """A role read's token fields, as Vault answers them (the bound only when set).
    `aliases`: the LEGACY_ALIASES "always" (AppRole, JWT: what Vault 1.x clients read),
    or only "when-set" (what Vault's Kubernetes plug-in answers)."""
    bound = bound_from_record(role)
    answer = {
        "token_policies": list(role["token_policies"]),
        "policies": list(role["token_policies"]),
        "token_ttl": role["token_ttl"],
        "ttl": role["token_ttl"],
        "token_max_ttl": role["token_max_ttl"],
        "max_ttl": role["token_max_ttl"],
        "token_period": role["token_period"],
        "period": role["token_period"],
        "token_explicit_max_ttl": role["token_explicit_max_ttl"],
        "token_no_default_policy": role["token_no_default_policy"],
        "token_num_uses": role["token_num_uses"],
        "num_uses": role["token_num_uses"],
        "token_type": "default",
        "token_bound_cidrs": [],
        # tokens are never bound to the login's address (token_bound_cidrs is refused)
        "token_strictly_bind_ip": False,
        **({} if bound is None else bound.as_json()),
    }
    if aliases == "when-set":
        for alias in LEGACY_ALIASES:
            if not answer[alias]:
                del answer[alias]
    return answer


def issue_login_token(
    tokens: TokenStore,
    role: Mapping[str, Any],
    *,
    path: str,
    display_name: str,
    meta: dict[str, str],
    lease_ttls: tuple[int, int] = (0, 0),
) -> tuple[str, TokenEntry]:
    """The login's token: an orphan created at `path`, shaped by the role's settings.

    `lease_ttls`: the auth mount's tuned (default_lease_ttl, max_lease_ttl), 0 where not
    tuned. As in Vault, the mount's default stands in for a role without `token_ttl`,
    and the mount's max caps the role's `token_max_ttl` (the store's own max caps both)."""
    mount_default, mount_max = lease_ttls
    caps = [cap for cap in (role["token_max_ttl"], mount_max) if cap]
    return tokens.create(
        None,
        policies=role["token_policies"],
        ttl=role["token_ttl"] or mount_default,
        max_ttl=min(caps) if caps else 0,
        explicit_max_ttl=role["token_explicit_max_ttl"],
        period=role["token_period"],
        no_default_policy=role["token_no_default_policy"],
        num_uses=role["token_num_uses"],
        display_name=display_name,
        meta=meta,
        path=path,
        stale_bound=bound_from_record(role),
    )

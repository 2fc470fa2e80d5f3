"""The AppRole auth method (Vault's `auth/approle`): a machine logs in with a role ID
(which names its role, and is not a secret) and a secret ID (which is).

Endpoints served (the HTTP routes are in `routes.py`):

- `write_role(name, data)`      POST auth/approle/role/:name (create, or update the
                                fields given): bind_secret_id (default true),
                                secret_id_bound_cidrs, secret_id_num_uses (0: unlimited),
                                secret_id_ttl (0: none), and the token settings
                                (auth/token/settings.py: token_policies, token_ttl, ...).
- `read_role`, `delete_role`, `list_roles`.
- `role_id(name)` / `set_role_id(name, role_id)`   GET / POST .../role-id.
- `new_secret_id(name, data)`   POST .../secret-id {metadata, cidr_list, num_uses, ttl}
                                -> secret_id, secret_id_accessor, secret_id_ttl,
                                secret_id_num_uses (wrap it with X-Vault-Wrap-TTL to
                                deliver it through a single-use wrapping token).
- `list_secret_ids`, `lookup_secret_id`, `destroy_secret_id`, and the same by accessor.
- `tidy()`                      POST auth/approle/tidy/secret-id: expired IDs go.
- `login(role_id, secret_id, remote_addr)`  POST auth/approle/login.

Every item of a mount lives under "approle/<mount>/": roles ("role/<name>"), the
role-ID index ("id/<sha-256 of the role ID>", `Kind.AUTH_ROLE`), secret IDs stored
under the SHA-256 of their text ("secret/<role>/<digest>", `Kind.AUTH_SECRET`, sealed
by the barrier like every item, never as themselves) and their accessors
("accessor/<role>/<accessor>", naming the digest). The
secret ID is shown once, in the answer that created it.

Uses are counted with conditional writes: a login reads the secret ID's item and
writes it back with one use fewer only if nobody changed it meanwhile (the last use
deletes it under the same condition), so a secret ID with `num_uses: n` admits exactly
n logins however many race for it, in every process of every cell sharing the ledger.

Every refusal of a login is a 400 that says which check failed without echoing the IDs
(a CIDR refusal names the source address, as Vault's does), except that an unknown role
ID and an unknown secret ID read alike ("invalid role or secret ID"), as in Vault, so a
caller learns nothing about which half was wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from keycell.control_plane.auth.roles import checked_role_name, names_under, refuse_unknown
from keycell.control_plane.auth.token.settings import (
    TOKEN_FIELDS,
    issue_login_token,
    parse_token_settings,
    token_settings_json,
)
from keycell.control_plane.auth.token.store import TokenEntry, TokenStore, parse_duration
from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, Put, iter_prefix
from keycell.control_plane.storage import delete_current, encode_json, get_json, put_json_if
from keycell.control_plane.timefmt import rfc3339

INVALID = "invalid role or secret ID"
MAX_ID_CHARS = 256
MAX_METADATA_KEYS = 64
_ID = re.compile(r"[\w.@:+=/-]+")
_ROLE_FIELDS = (
    "bind_secret_id",
    "secret_id_bound_cidrs",
    "bound_cidr_list",
    "secret_id_num_uses",
    "secret_id_ttl",
    "local_secret_ids",
    "enable_local_secret_ids",  # hvac's name for local_secret_ids; both ignored (no replication of IDs)
    "token_bound_cidrs",
    "role_id",
    *TOKEN_FIELDS,
)
_ROLE_DEFAULTS: dict[str, Any] = {
    "bind_secret_id": True,
    "secret_id_bound_cidrs": [],
    "secret_id_num_uses": 0,
    "secret_id_ttl": 0,
}


def _cidrs(value: object, name: str) -> list[str]:
    """A list (or comma-separated string) of CIDR blocks, each checked and normalised."""
    if value in (None, "", []):
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 64:
        raise InvalidRequest(f"{name} is a list of CIDR blocks (at most 64)")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise InvalidRequest(f"{name} holds CIDR blocks such as 10.0.0.0/8")
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise InvalidRequest(f"{name}: {item.strip()[:64]!r} is not a CIDR block") from None
    return out


def _count(value: object, name: str) -> int:
    if value in (None, ""):
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest(f"{name} must be a non-negative integer")
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a non-negative integer") from None
    if number < 0:
        raise InvalidRequest(f"{name} must be a non-negative integer")
    return number


def _metadata(value: object) -> dict[str, str]:
    """Vault takes a secret ID's metadata as a JSON string of a string map (hvac sends
    it so); an object is accepted too."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest("metadata must be a JSON object of strings") from None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata must be a JSON object of strings (at most {MAX_METADATA_KEYS})")
    if not all(
        isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 1024 for k, v in value.items()
    ):
        raise InvalidRequest("metadata must be a JSON object of strings")
    return dict(value)


def _digest(secret_id: str) -> str:
    return hashlib.sha256(secret_id.encode()).hexdigest()


def _within(cidr: str, bounds: list[str]) -> bool:
    """Whether the block `cidr` lies inside one of `bounds` (of its own IP version)."""
    block = ipaddress.ip_network(cidr)
    return any(
        block.version == bound.version and block.subnet_of(bound)  # type: ignore[arg-type]
        for bound in map(ipaddress.ip_network, bounds)
    )


def _allowed(remote_addr: str, cidrs: list[str]) -> bool:
    if not cidrs:
        return True
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(c) for c in cidrs)


class AppRoleAuth:
    def __init__(
        self,
        ledger: Ledger,
        tokens: TokenStore,
        *,
        mount: str = "approle",
        clock: Callable[[], float] = time.time,
        lease_ttls: tuple[int, int] = (0, 0),
    ) -> None:
        """`lease_ttls`: the mount's tuned (default_lease_ttl, max_lease_ttl), which shape
        every login's token (settings.issue_login_token)."""
        self.ledger = ledger
        self.tokens = tokens
        self.clock = clock
        self.mount = mount
        self.login_path = f"auth/{mount}/login"
        self.lease_ttls = lease_ttls
        # Every item of this mount lives under "approle/<mount>/" (mounts.py deletes
        # that prefix when the mount is disabled).
        base = f"approle/{mount}/"
        self._roles, self._ids = base + "role/", base + "id/"
        self._secrets, self._accessors = base + "secret/", base + "accessor/"

    # --- roles -------------------------------------------------------------------------

    def write_role(self, name: str, data: Mapping[str, Any]) -> None:
        """POST auth/approle/role/:name: create the role, or update the fields given.
        A new role gets a random role ID (or the one given)."""
        role_name = checked_role_name(name)
        if not isinstance(data, Mapping):
            raise InvalidRequest("the role is a JSON object")
        refuse_unknown(data, _ROLE_FIELDS)
        if _cidrs(data.get("token_bound_cidrs"), "token_bound_cidrs"):
            raise InvalidRequest("token_bound_cidrs is not supported by Keycell; use secret_id_bound_cidrs")
        found = get_json(self.ledger, self._role_key(role_name))
        role = {**_ROLE_DEFAULTS, **(found[0] if found else {})}
        if "bind_secret_id" in data:
            if not isinstance(data["bind_secret_id"], bool):
                raise InvalidRequest("bind_secret_id must be a boolean")
            role["bind_secret_id"] = data["bind_secret_id"]
        if "secret_id_bound_cidrs" in data or "bound_cidr_list" in data:
            role["secret_id_bound_cidrs"] = _cidrs(
                data.get("secret_id_bound_cidrs", data.get("bound_cidr_list")), "secret_id_bound_cidrs"
            )
        if "secret_id_num_uses" in data:
            role["secret_id_num_uses"] = _count(data["secret_id_num_uses"], "secret_id_num_uses")
        if "secret_id_ttl" in data:
            role["secret_id_ttl"] = parse_duration(data["secret_id_ttl"] or 0, "secret_id_ttl")
        parse_token_settings(data, role)
        if not role["bind_secret_id"] and not role["secret_id_bound_cidrs"]:
            raise InvalidRequest("at least one constraint should be enabled on the role")
        if found is None:
            role_id = self._new_role_id(data.get("role_id"))
            role["role_id"] = role_id
            self._claim_role_id(role_id, role_name)
            try:
                put_json_if(self.ledger, self._role_key(role_name), role, 0)
            except ConflictError:
                delete_current(self.ledger, self._role_id_key(role_id))
                raise InvalidRequest("the role was created concurrently; retry") from None
            return
        if "role_id" in data and data["role_id"] != role["role_id"]:
            self.set_role_id(role_name, data["role_id"])
            role["role_id"] = self.role_id(role_name)
        try:
            put_json_if(self.ledger, self._role_key(role_name), role, found[1])
        except ConflictError:
            raise InvalidRequest("the role was written concurrently; retry") from None

    def read_role(self, name: str) -> dict[str, Any]:
        role = self._role(checked_role_name(name))
        return {
            "bind_secret_id": role["bind_secret_id"],
            # null when unset, as OpenBao answers
            "secret_id_bound_cidrs": list(role["secret_id_bound_cidrs"]) or None,
            "secret_id_num_uses": role["secret_id_num_uses"],
            "secret_id_ttl": role["secret_id_ttl"],
            "local_secret_ids": False,
            **token_settings_json(role),
        }

    def delete_role(self, name: str) -> None:
        """DELETE auth/approle/role/:name: the role, its role ID and every secret ID it had
        (deleting an absent role is not an error, as in Vault)."""
        role_name = checked_role_name(name)
        found = get_json(self.ledger, self._role_key(role_name))
        if found is None:
            return
        for item in list(iter_prefix(self.ledger, Kind.AUTH_SECRET, f"{self._secrets}{role_name}/")):
            delete_current(self.ledger, item.key)
        for item in list(iter_prefix(self.ledger, Kind.AUTH_SECRET, f"{self._accessors}{role_name}/")):
            delete_current(self.ledger, item.key)
        delete_current(self.ledger, self._role_key(role_name))
        delete_current(self.ledger, self._role_id_key(found[0]["role_id"]))

    def list_roles(self) -> list[str]:
        return names_under(self.ledger, Kind.AUTH_ROLE, self._roles)

    def role_id(self, name: str) -> str:
        """GET auth/approle/role/:name/role-id."""
        return str(self._role(checked_role_name(name))["role_id"])

    def set_role_id(self, name: str, role_id: object) -> None:
        """POST auth/approle/role/:name/role-id {role_id}: a role ID of the operator's
        choosing (unique across roles); the old one stops working at once."""
        role_name = checked_role_name(name)
        found = get_json(self.ledger, self._role_key(role_name))
        if found is None:
            raise NotFound(f"role {role_name!r} does not exist")
        if not role_id:
            raise InvalidRequest("missing role_id")
        new_id = self._new_role_id(role_id)
        role, version = found
        if new_id == role["role_id"]:
            return
        self._claim_role_id(new_id, role_name)
        old_id, role = role["role_id"], {**role, "role_id": new_id}
        try:
            put_json_if(self.ledger, self._role_key(role_name), role, version)
        except ConflictError:
            delete_current(self.ledger, self._role_id_key(new_id))
            raise InvalidRequest("the role was written concurrently; retry") from None
        delete_current(self.ledger, self._role_id_key(old_id))

    # --- secret IDs --------------------------------------------------------------------

    def new_secret_id(
        self, name: str, data: Mapping[str, Any], secret_id: str | None = None
    ) -> dict[str, Any]:
        """POST auth/approle/role/:name/secret-id (or custom-secret-id with `secret_id`)."""
        role_name = checked_role_name(name)
        role = self._role(role_name)
        if not role["bind_secret_id"]:
            raise InvalidRequest("bind_secret_id is not set on the role")
        cidrs = _cidrs(data.get("cidr_list"), "cidr_list")
        if role["secret_id_bound_cidrs"] and not all(
            _within(c, role["secret_id_bound_cidrs"]) for c in cidrs
        ):
            raise InvalidRequest("cidr_list must lie within the role's secret_id_bound_cidrs")
        if _cidrs(data.get("token_bound_cidrs"), "token_bound_cidrs"):
            raise InvalidRequest("token_bound_cidrs is not supported by Keycell")
        uses = _count(data.get("num_uses"), "num_uses")
        if role["secret_id_num_uses"] and (uses == 0 or uses > role["secret_id_num_uses"]):
            if uses > role["secret_id_num_uses"]:
                raise InvalidRequest("num_uses cannot be higher than the role's secret_id_num_uses")
            uses = role["secret_id_num_uses"]
        ttl = parse_duration(data.get("ttl") or 0, "ttl")
        if role["secret_id_ttl"] and (ttl == 0 or ttl > role["secret_id_ttl"]):
            ttl = role["secret_id_ttl"]
        metadata = _metadata(data.get("metadata"))
        if secret_id is None:
            secret_id = str(uuid.uuid4())
        elif not isinstance(secret_id, str) or not secret_id or len(secret_id) > MAX_ID_CHARS:
            raise InvalidRequest(f"secret_id is a string of at most {MAX_ID_CHARS} characters")
        accessor = str(uuid.uuid4())
        now = self.clock()
        digest = _digest(secret_id)
        record = {
            "accessor": accessor,
            "cidr_list": cidrs,
            "metadata": metadata,
            "num_uses": uses,
            "ttl": ttl,
            "created": now,
            "updated": now,
            "expires": now + ttl if ttl else None,
        }
        expires_at = int(now + ttl) + 1 if ttl else None
        try:
            self.ledger.transact(
                [
                    Put(self._secret_key(role_name, digest), encode_json(record), 0, expires_at),
                    Put(
                        self._accessor_key(role_name, accessor),
                        encode_json({"digest": digest}),
                        0,
                        expires_at,
                    ),
                ]
            )
        except ConflictError:
            raise InvalidRequest("that secret ID is already in use") from None
        return {
            "secret_id": secret_id,
            "secret_id_accessor": accessor,
            "secret_id_ttl": ttl,
            "secret_id_num_uses": uses,
        }

    def list_secret_ids(self, name: str) -> list[str]:
        """LIST auth/approle/role/:name/secret-id -> the accessors."""
        role_name = checked_role_name(name)
        self._role(role_name)
        prefix = f"{self._accessors}{role_name}/"
        return [i.key.path[len(prefix) :] for i in iter_prefix(self.ledger, Kind.AUTH_SECRET, prefix)]

    def lookup_secret_id(self, name: str, secret_id: object) -> dict[str, Any] | None:
        role_name = checked_role_name(name)
        self._role(role_name)
        if not isinstance(secret_id, str) or not secret_id:
            raise InvalidRequest("missing secret_id")
        found = self._live_secret(role_name, _digest(secret_id))
        return None if found is None else self._describe(found[0])

    def lookup_accessor(self, name: str, accessor: object) -> dict[str, Any]:
        role_name = checked_role_name(name)
        digest = self._digest_of(role_name, accessor)
        found = self._live_secret(role_name, digest)
        if found is None:
            raise NotFound("no secret ID has that accessor")
        return self._describe(found[0])

    def destroy_secret_id(self, name: str, secret_id: object) -> None:
        role_name = checked_role_name(name)
        self._role(role_name)
        if not isinstance(secret_id, str) or not secret_id:
            raise InvalidRequest("missing secret_id")
        self._destroy(role_name, _digest(secret_id))

    def destroy_accessor(self, name: str, accessor: object) -> None:
        role_name = checked_role_name(name)
        self._destroy(role_name, self._digest_of(role_name, accessor))

    def tidy(self) -> int:
        """POST auth/approle/tidy/secret-id: delete expired secret IDs; how many went."""
        now, gone = self.clock(), 0
        for item in list(iter_prefix(self.ledger, Kind.AUTH_SECRET, self._secrets)):
            role_name, _, digest = item.key.path[len(self._secrets) :].rpartition("/")
            expires = json.loads(item.value)["expires"]
            if expires is not None and expires <= now:
                self._destroy(role_name, digest)
                gone += 1
        return gone

    # --- login -------------------------------------------------------------------------

    def login(
        self, role_id: object, secret_id: object, remote_addr: str
    ) -> tuple[str, TokenEntry, dict[str, Any]]:
        """POST auth/approle/login {role_id, secret_id} -> (token, entry, `auth` block)."""
        if not isinstance(role_id, str) or not role_id:
            raise InvalidRequest("missing role_id")
        if len(role_id) > MAX_ID_CHARS:
            raise InvalidRequest(INVALID)
        index = get_json(self.ledger, self._role_id_key(role_id))
        if index is None:
            raise InvalidRequest(INVALID)
        role_name = index[0]["role"]
        found = get_json(self.ledger, self._role_key(role_name))
        if found is None or found[0]["role_id"] != role_id:
            raise InvalidRequest(INVALID)
        role = found[0]
        if not _allowed(remote_addr, role["secret_id_bound_cidrs"]):
            raise InvalidRequest(
                f"source address {json.dumps(remote_addr[:64])} unauthorized through CIDR restrictions on the role"
            )
        metadata: dict[str, str] = {}
        if role["bind_secret_id"]:
            if not isinstance(secret_id, str) or not secret_id:
                raise InvalidRequest("missing secret_id")
            if len(secret_id) > MAX_ID_CHARS:
                raise InvalidRequest(INVALID)
            metadata = self._use(role_name, _digest(secret_id), remote_addr)
        token, entry = issue_login_token(
            self.tokens,
            role,
            path=self.login_path,
            display_name="approle",
            meta={**metadata, "role_name": role_name},
            lease_ttls=self.lease_ttls,
        )
        return token, entry, self.tokens.auth_data(token, entry)

    def _use(self, role_name: str, digest: str, remote_addr: str) -> dict[str, str]:
        """Spend one use of the secret ID (conditional write; the last use deletes it);
        its metadata. InvalidRequest when it is unknown, expired or used up."""
        key = self._secret_key(role_name, digest)
        for _ in range(16):
            found = self._live_secret(role_name, digest)
            if found is None:
                raise InvalidRequest(INVALID)
            record, version = found
            if not _allowed(remote_addr, record["cidr_list"]):
                raise InvalidRequest(
                    f"source address {json.dumps(remote_addr[:64])} unauthorized through CIDR restrictions"
                    " on the secret ID"
                )
            if record["num_uses"] == 0:
                return dict(record["metadata"])
            try:
                if record["num_uses"] == 1:
                    self.ledger.delete_if(key, version)
                    delete_current(self.ledger, self._accessor_key(role_name, record["accessor"]))
                else:
                    put_json_if(
                        self.ledger,
                        key,
                        {**record, "num_uses": record["num_uses"] - 1, "updated": self.clock()},
                        version,
                        expires_at=int(record["expires"]) + 1 if record["expires"] else None,
                    )
                return dict(record["metadata"])
            except ConflictError:
                continue  # another login spent a use meanwhile: count again
        raise InvalidRequest("the secret ID is being used concurrently; retry")

    # --- storage -----------------------------------------------------------------------

    def _role(self, role_name: str) -> dict[str, Any]:
        found = get_json(self.ledger, self._role_key(role_name))
        if found is None:
            raise NotFound(f"role {role_name!r} does not exist")
        return {**_ROLE_DEFAULTS, **found[0]}

    def _live_secret(self, role_name: str, digest: str) -> tuple[dict[str, Any], int] | None:
        """The secret ID's record and version, or None when absent or expired (an expired
        one is deleted on the way)."""
        found = get_json(self.ledger, self._secret_key(role_name, digest))
        if found is None:
            return None
        if found[0]["expires"] is not None and found[0]["expires"] <= self.clock():
            self._destroy(role_name, digest)
            return None
        return found

    def _describe(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "secret_id_accessor": record["accessor"],
            "cidr_list": list(record["cidr_list"]),
            "token_bound_cidrs": [],
            "metadata": dict(record["metadata"]),
            "secret_id_num_uses": record["num_uses"],
            "secret_id_ttl": record["ttl"],
            "creation_time": rfc3339(record["created"]),
            "last_updated_time": rfc3339(record["updated"]),
            "expiration_time": rfc3339(record["expires"]) if record["expires"] else "0001-01-01T00:00:00Z",
        }

    def _digest_of(self, role_name: str, accessor: object) -> str:
        if not isinstance(accessor, str) or not accessor or not _ID.fullmatch(accessor) or len(accessor) > 64:
            raise InvalidRequest("missing secret_id_accessor")
        found = get_json(self.ledger, self._accessor_key(role_name, accessor))
        if found is None:
            raise NotFound("no secret ID has that accessor")
        return str(found[0]["digest"])

    def _destroy(self, role_name: str, digest: str) -> None:
        found = get_json(self.ledger, self._secret_key(role_name, digest))
        delete_current(self.ledger, self._secret_key(role_name, digest))
        if found is not None:
            delete_current(self.ledger, self._accessor_key(role_name, found[0]["accessor"]))

    def _new_role_id(self, given: object) -> str:
        if given in (None, ""):
            return str(uuid.uuid4())
        if not isinstance(given, str) or len(given) > MAX_ID_CHARS or not _ID.fullmatch(given):
            raise InvalidRequest(f"role_id is at most {MAX_ID_CHARS} letters, digits and . @ : + = / - _")
        return given

    def _claim_role_id(self, role_id: str, role_name: str) -> None:
        try:
            put_json_if(self.ledger, self._role_id_key(role_id), {"role": role_name}, 0)
        except ConflictError:
            raise InvalidRequest("role_id already in use") from None

    def _role_key(self, name: str) -> Key:
        return Key(Kind.AUTH_ROLE, self._roles + name)

    def _role_id_key(self, role_id: str) -> Key:
        return Key(Kind.AUTH_ROLE, self._ids + _digest(role_id))

    def _secret_key(self, role_name: str, digest: str) -> Key:
        return Key(Kind.AUTH_SECRET, f"{self._secrets}{role_name}/{digest}")

    def _accessor_key(self, role_name: str, accessor: str) -> Key:
        return Key(Kind.AUTH_SECRET, f"{self._accessors}{role_name}/{accessor}")

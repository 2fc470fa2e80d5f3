"""The token store: Vault's service tokens, their lifetimes, their family trees.

A token is "kc." + 32 url-safe random bytes. It is never stored: its record lives
under `token_path(token)` (a SHA-256 digest, see `seal`). Every method below serves
one Vault endpoint; the HTTP layer parses the request, authenticates, checks ACLs
(sudo where Vault needs it) and calls:

- `create(parent, ...)`          POST auth/token/create, create-orphan (and every auth
                                 method's login, with `parent=None`) -> (token, TokenEntry);
                                 `auth_data(token, entry)` is the response's `auth` block.
- `lookup(token)`                GET auth/token/lookup-self, POST auth/token/lookup
                                 -> TokenEntry; `lookup_data(entry, token)` is the `data`.
- `lookup_accessor(accessor)`    POST auth/token/lookup-accessor -> TokenEntry.
- `renew(token, increment)`      POST auth/token/renew-self, renew -> TokenEntry
                                 (answer with `auth_data(token, entry)`).
- `renew_accessor(accessor, increment)`  POST auth/token/renew-accessor -> TokenEntry.
- `revoke(token)`                POST auth/token/revoke-self, revoke: the token and all
                                 its descendants. -> None (204).
- `revoke_orphan(token)`         POST auth/token/revoke-orphan (sudo): the token only;
                                 its children become orphans. -> None (204).
- `revoke_accessor(accessor)`    POST auth/token/revoke-accessor. -> None (204).
- `use(token)`                   every authenticated request: validates the token and
                                 spends one use of a use-limited token -> TokenEntry.
- `create_root()` / `root_token_ops(token, now=...)`: the root token (sys/init).

Storage (all through the barrier):

- `Kind.TOKEN` `<token digest>`: the token's record (JSON); item expiry = token expiry.
- `Kind.TOKEN_ACCESSOR` `<accessor>`: {"token_path", "parent", "expire_time"}; the
  accessor index, and the link a lookup follows to check the token's ancestors.
- `Kind.TOKEN` `children/<parent accessor>/<child accessor>`: {"token_path"}; the
  parent -> children index, scanned by prefix to revoke a subtree. Digests are hex,
  so these paths never collide with records.

A token is valid while its record exists, it has not expired (judged by this store's
clock, not only the ledger's item expiry), it is not in the cell's `RevocationSet`
(`token:<accessor>`), and every ancestor's accessor entry still exists and has not
expired: a child dies with its parent, whether the parent was revoked or ran out of
time, as in Vault. Revoking walks the subtree parent-first: each token is added to the
revocation set, then its records are deleted, then its children are visited. A crash
midway leaves children whose parent is gone, which lookups already refuse; their
records expire on their own (and are marked when the tree is revoked again by accessor).

Durations arrive as Vault sends them: an int of seconds or a string ("90", "30m",
"1h30m", "768h"); policy lists as a list or a comma-separated string.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from keycell.control_plane.errors import InvalidRequest, PermissionDenied, Unavailable
from keycell.control_plane.freshness import StaleBound
from keycell.control_plane.ledger import (
    Check,
    ConflictError,
    Delete,
    Key,
    Kind,
    Ledger,
    Op,
    Put,
    iter_prefix,
)
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.seal import token_path
from keycell.control_plane.storage import encode_json, get_json

# Vault's defaults for the token store: default_lease_ttl and max_lease_ttl are 768h.
DEFAULT_TTL = 768 * 3600
DEFAULT_MAX_TTL = 768 * 3600
TOKEN_PREFIX = "kc."  # noqa: S105  # a prefix, not a secret
TOKEN_RANDOM_BYTES = 32
ACCESSOR_CHARS = 24  # as long as Vault's accessors
_ACCESSOR_ALPHABET = string.ascii_letters + string.digits
# Longer strings cannot be tokens; refusing them early keeps hashing cheap.
MAX_TOKEN_CHARS = 256
MAX_METADATA_ITEMS = 64
# A use-limited token whose last use is being spent (Vault's "revocation pending").
_USES_SPENT = -1
_CHILDREN = "children/"
_RETRIES = 16
# Deeper token trees than this are refused at creation, so a lookup's ancestor walk is bounded.
MAX_TREE_DEPTH = 32
_DISPLAY_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9-]")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DENIED = "permission denied"
# How long this process may answer `use` for an unlimited token from the record it last
# read, without reading it again. Whatever can end a token is still seen at once: the
# revocation set (every revoke adds the token there first) is checked on every use, and
# so are its expiry and its ancestors' (as read). A cut-short TTL (a renewal to a shorter
# increment) or records deleted by another process without a revocation are seen within
# this bound; changes made through this store are seen at once.
TOKEN_CACHE_SECONDS = 1.0
TOKEN_CACHE_ENTRIES = 4096

Duration = int | str


@dataclass(frozen=True)
class TokenEntry:
    """What a token is. Times are unix seconds; TTLs are seconds (0: none)."""

    accessor: str
    policies: list[str]
    display_name: str
    path: str  # the endpoint that created it, e.g. "auth/token/create", "auth/jwt/login"
    creation_time: int
    creation_ttl: int
    expire_time: int | None  # None: never expires (root tokens)
    explicit_max_ttl: int = 0
    period: int = 0
    num_uses: int = 0  # uses left; 0: unlimited
    orphan: bool = False
    parent: str = ""  # the parent's accessor; "" for an orphan
    renewable: bool = True
    meta: dict[str, str] = field(default_factory=dict)
    type: str = "service"
    entity_id: str = ""
    max_ttl: int = 0  # the creating auth method's max TTL (a role's token_max_ttl); 0: the store's
    last_renewal_time: int | None = None
    depth: int = 0  # 0 for an orphan, parent's depth + 1 otherwise
    cell: str = ""  # the issuing cell ("" in records older than issue 18: this cell)
    # the role's revocation freshness bound (freshness.StaleBound as JSON), {} when none
    stale_bound: dict[str, Any] = field(default_factory=dict)

    def ttl(self, now: float) -> int:
        """Seconds left; 0 for a token that never expires."""
        if self.expire_time is None:
            return 0
        return max(0, self.expire_time - math.ceil(now))

    def to_record(self) -> dict[str, Any]:
        return {
            "accessor": self.accessor,
            "policies": list(self.policies),
            "display_name": self.display_name,
            "path": self.path,
            "creation_time": self.creation_time,
            "creation_ttl": self.creation_ttl,
            "expire_time": self.expire_time,
            "explicit_max_ttl": self.explicit_max_ttl,
            "period": self.period,
            "num_uses": self.num_uses,
            "orphan": self.orphan,
            "parent": self.parent,
            "renewable": self.renewable,
            "meta": dict(self.meta),
            "type": self.type,
            "entity_id": self.entity_id,
            "max_ttl": self.max_ttl,
            "last_renewal_time": self.last_renewal_time,
            "depth": self.depth,
            "cell": self.cell,
            "stale_bound": dict(self.stale_bound),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenEntry:
        return cls(
            accessor=str(record["accessor"]),
            policies=[str(p) for p in record["policies"]],
            display_name=str(record["display_name"]),
            path=str(record["path"]),
            creation_time=int(record["creation_time"]),
            creation_ttl=int(record["creation_ttl"]),
            expire_time=None if record.get("expire_time") is None else int(record["expire_time"]),
            explicit_max_ttl=int(record.get("explicit_max_ttl", 0)),
            period=int(record.get("period", 0)),
            num_uses=int(record.get("num_uses", 0)),
            orphan=bool(record.get("orphan", False)),
            parent=str(record.get("parent", "")),
            renewable=bool(record.get("renewable", True)),
            meta={str(k): str(v) for k, v in (record.get("meta") or {}).items()},
            type=str(record.get("type", "service")),
            entity_id=str(record.get("entity_id", "")),
            max_ttl=int(record.get("max_ttl", 0)),
            last_renewal_time=(
                None if record.get("last_renewal_time") is None else int(record["last_renewal_time"])
            ),
            depth=int(record.get("depth", 0)),
            cell=str(record.get("cell", "")),
            stale_bound=dict(record.get("stale_bound") or {}),
        )


# --- input parsing shared with the auth methods ------------------------------------------


def _whole_second(now: float) -> int:
    """The time a token's creation or renewal is counted from: the next whole second, so
    a token granted N seconds lives at least N and less than N + 1 (records keep whole
    seconds; counting from the second before cut up to one off the TTL the client was
    told, and a client renewing at 80% of a 4 s TTL found its token gone). Its
    `creation_time` and `last_renewal_time` may so lie up to a second ahead."""
    return math.ceil(now)


def parse_duration(value: object, name: str) -> int:
    """Seconds from an int or a Vault duration string ("45", "30s", "1h30m", "2d")."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a duration (seconds or a string like '1h'), not a boolean")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float) and value.is_integer():
        seconds = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0
        if text.isdigit():
            seconds = int(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidRequest(
                    f"{name}: {value[:40]!r} is not a duration (use e.g. '90', '30m' or '1h')"
                )
            seconds = int(sum(float(n) * _UNITS[u] for n, u in parts))
    else:
        raise InvalidRequest(f"{name} must be a duration (seconds or a string like '1h')")
    if seconds < 0:
        raise InvalidRequest(f"{name} must not be negative")
    if seconds > 100 * 365 * 86400:
        raise InvalidRequest(f"{name} is longer than a century")
    return seconds


def parse_policies(value: object, name: str = "policies") -> list[str]:
    """Vault's sanitizing of policy names: trimmed, lowercased, deduplicated, sorted."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise InvalidRequest(f"{name} must be a list of policy names or a comma-separated string")
    names: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise InvalidRequest(f"{name} must hold policy names (strings)")
        cleaned = item.strip().lower()
        if cleaned:
            if len(cleaned) > 256 or not cleaned.isprintable():
                raise InvalidRequest(f"{name}: a policy name is printable and at most 256 characters")
            names.add(cleaned)
    return sorted(names)


def parse_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest("meta must be an object of string keys and values")
    if len(value) > MAX_METADATA_ITEMS:
        raise InvalidRequest(f"meta holds at most {MAX_METADATA_ITEMS} entries")
    meta: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidRequest("meta must be an object of string keys and values")
        if len(k) > 128 or len(v) > 512:
            raise InvalidRequest("meta keys are at most 128 characters and values at most 512")
        meta[k] = v
    return meta


def _non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if value < 0:
        raise InvalidRequest(f"{name} cannot be negative")
    return value


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


def new_accessor() -> str:
    """24 letters and digits (about 143 bits), as Vault's accessors are: never a leading
    "-" that a CLI would take for a flag (`bao token lookup -accessor -x...`)."""
    return "".join(secrets.choice(_ACCESSOR_ALPHABET) for _ in range(ACCESSOR_CHARS))


def _token_key(path: str) -> Key:
    return Key(Kind.TOKEN, path)


def _accessor_key(accessor: str) -> Key:
    return Key(Kind.TOKEN_ACCESSOR, accessor)


def _child_key(parent_accessor: str, child_accessor: str) -> Key:
    return Key(Kind.TOKEN, f"{_CHILDREN}{parent_accessor}/{child_accessor}")


def _record_ops(tpath: str, entry: TokenEntry, *, versions: tuple[int, int, int] = (0, 0, 0)) -> list[Put]:
    """The Puts that store `entry`: record, accessor index, and its parent's child link.
    `versions` are the expected versions of those three items."""
    expires = entry.expire_time
    ops = [
        Put(_token_key(tpath), encode_json(entry.to_record()), versions[0], expires),
        Put(
            _accessor_key(entry.accessor),
            encode_json({"token_path": tpath, "parent": entry.parent, "expire_time": expires}),
            versions[1],
            expires,
        ),
    ]
    if entry.parent:
        ops.append(
            Put(
                _child_key(entry.parent, entry.accessor),
                encode_json({"token_path": tpath}),
                versions[2],
                expires,
            )
        )
    return ops


def root_token_entry(*, now: int, display_name: str = "root") -> TokenEntry:
    return TokenEntry(
        accessor=new_accessor(),
        policies=["root"],
        display_name=display_name,
        path="auth/token/root",
        creation_time=now,
        creation_ttl=0,
        expire_time=None,
        orphan=True,
        renewable=False,
    )


def root_token_ops(token: str, *, now: int, display_name: str = "root") -> list[Put]:
    """Plaintext Puts (values are JSON) that create the root token `token`: for the seal's
    init transaction, which encrypts each value itself."""
    return _record_ops(token_path(token), root_token_entry(now=now, display_name=display_name))


def auth_data(token: str, entry: TokenEntry, *, now: float) -> dict[str, Any]:
    """Vault's `auth` response block for a token just created, logged in, or renewed."""
    return {
        "client_token": token,
        "accessor": entry.accessor,
        "policies": list(entry.policies),
        "token_policies": list(entry.policies),
        "metadata": dict(entry.meta) or None,
        "lease_duration": entry.ttl(now),
        "renewable": entry.renewable,
        "entity_id": entry.entity_id,
        "token_type": entry.type,
        "orphan": entry.orphan,
        "mfa_requirement": None,
        "num_uses": entry.num_uses,
    }


class TokenStore:
    """Vault's token store over a cell's ledger (the barrier). See the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        revocations: RevocationSet,
        *,
        clock: Callable[[], float] = time.time,
        default_ttl: int = DEFAULT_TTL,
        max_ttl: int = DEFAULT_MAX_TTL,
    ) -> None:
        if not 0 < default_ttl <= max_ttl:
            raise ValueError("the default TTL must be positive and at most the max TTL")
        self.ledger = ledger
        self.revocations = revocations
        self.clock = clock
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        # token path -> (monotonic time read, entry, version, earliest expiry of it and its
        # ancestors): the records `use` read last, for TOKEN_CACHE_SECONDS.
        self._valid: dict[str, tuple[float, TokenEntry, int, int | None]] = {}

    # --- create ------------------------------------------------------------------------

    def create(
        self,
        parent: TokenEntry | None,
        *,
        policies: object = None,
        ttl: Duration = 0,
        explicit_max_ttl: Duration = 0,
        period: Duration = 0,
        max_ttl: Duration = 0,
        no_parent: bool = False,
        no_default_policy: bool = False,
        renewable: bool | None = None,
        display_name: str = "",
        meta: Mapping[str, str] | None = None,
        num_uses: int = 0,
        path: str = "auth/token/create",
        sudo: bool = False,
        entity_id: str = "",
        stale_bound: StaleBound | None = None,
    ) -> tuple[str, TokenEntry]:
        """POST auth/token/create and create-orphan; auth methods' logins (`parent=None`).

        Vault's rules: without root or `sudo` (the caller's ACL has sudo on the create
        path; the HTTP layer decides) a child's policies must be a subset of its parent's,
        it cannot be an orphan (`no_parent`) or periodic; "default" is added unless
        `no_default_policy` (for a child: when its parent has it); no policies given
        means the parent's. `path="auth/token/create-orphan"` makes an orphan without
        sudo, as that endpoint does. A token with the root policy and no TTL never
        expires. `max_ttl` is the creating auth method's cap (a role's token_max_ttl).
        Returns the token (shown once) and its entry.
        """
        now = _whole_second(self.clock())
        ttl_s = parse_duration(ttl, "ttl")
        explicit_s = parse_duration(explicit_max_ttl, "explicit_max_ttl")
        period_s = parse_duration(period, "period")
        backend_max = parse_duration(max_ttl, "max_ttl")
        uses = _non_negative_int(num_uses, "num_uses")
        requested = parse_policies(policies)
        metadata = parse_metadata(meta)
        for flag, value in (
            ("no_parent", no_parent),
            ("no_default_policy", no_default_policy),
            ("sudo", sudo),
        ):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{flag} must be a boolean")
        if renewable is not None and not isinstance(renewable, bool):
            raise InvalidRequest("renewable must be a boolean")
        if not isinstance(display_name, str) or len(display_name) > 256:
            raise InvalidRequest("display_name must be a string of at most 256 characters")
        if not isinstance(path, str) or not path:
            raise InvalidRequest("the creation path must be a non-empty string")

        parent_root = parent is not None and "root" in parent.policies
        privileged = parent_root or sudo

        # Policies, in Vault's order of cases.
        add_default = False
        if parent is None:
            final = requested
            add_default = not no_default_policy
        elif not requested:
            final = parse_policies(parent.policies)  # "default" only if the parent has it
        else:
            final = requested
            if not privileged:
                held = set(parse_policies(parent.policies))
                if not set(requested) <= held:
                    raise InvalidRequest("child policies must be subset of parent")
                add_default = not no_default_policy and "default" in held
            else:
                add_default = not no_default_policy
        if add_default and "root" not in final:
            final = sorted({*final, "default"})
        if no_default_policy:
            final = [p for p in final if p != "default"]
        if "root" in final and not parent_root:
            raise InvalidRequest("root tokens may not be created without parent token being root")

        # Parentage.
        orphan = parent is None or path == "auth/token/create-orphan"
        if no_parent and parent is not None:
            if not privileged:
                raise InvalidRequest("root or sudo privileges required to create orphan token")
            orphan = True
        if period_s > 0 and parent is not None and not privileged:
            raise InvalidRequest("root or sudo privileges required to create periodic token")
        depth = 0 if orphan or parent is None else parent.depth + 1
        if depth > MAX_TREE_DEPTH:
            raise InvalidRequest(f"token trees are at most {MAX_TREE_DEPTH} deep; create an orphan instead")

        # Lifetime.
        if "root" in final and ttl_s == 0 and period_s == 0:
            granted = explicit_s  # root tokens never expire unless bounded
        else:
            granted = self._calculate_ttl(
                now=now,
                start=now,
                increment=0,
                ttl=ttl_s,
                period=period_s,
                backend_max=backend_max,
                explicit_max=explicit_s,
            )
        if granted == 0 and parent is not None and parent.expire_time is not None:
            raise InvalidRequest("expiring root tokens cannot create non-expiring root tokens")
        can_renew = True if renewable is None else renewable
        if granted == 0:
            can_renew = False  # nothing to renew; Vault does not advertise it

        if path.startswith("auth/token/"):
            # Vault's token store names its tokens "token" or "token-<given name>".
            name = "token"
            if display_name:
                name = _DISPLAY_NAME_UNSAFE.sub("-", "token-" + display_name).removesuffix("-")
        else:
            name = display_name

        entry = TokenEntry(
            accessor=new_accessor(),
            policies=final,
            display_name=name,
            path=path,
            creation_time=now,
            creation_ttl=granted,
            expire_time=now + granted if granted else None,
            explicit_max_ttl=explicit_s,
            period=period_s,
            num_uses=uses,
            orphan=orphan,
            parent="" if orphan or parent is None else parent.accessor,
            renewable=can_renew,
            meta=metadata,
            entity_id=entity_id if orphan or parent is None else parent.entity_id,
            max_ttl=backend_max,
            depth=depth,
            cell=self.revocations.cell,
            # a child keeps its parent's bound unless it states its own
            stale_bound=(
                stale_bound.as_json()
                if stale_bound is not None
                else (dict(parent.stale_bound) if parent is not None else {})
            ),
        )
        token = new_token()
        self._store_new(token, entry)
        return token, entry

    def create_root(self, display_name: str = "root") -> tuple[str, TokenEntry]:
        """A new root token (sys/init, sys/generate-root): root policy, orphan, no expiry."""
        token = new_token()
        entry = root_token_entry(now=int(self.clock()), display_name=display_name)
        self.ledger.transact(_record_ops(token_path(token), entry))
        return token, entry

    def _store_new(self, token: str, entry: TokenEntry) -> None:
        tpath = token_path(token)
        for _ in range(_RETRIES):
            ops: list[Op] = list(_record_ops(tpath, entry))
            if entry.parent:
                # The parent must still exist when the child lands: a revoke that deletes
                # the parent first then lists its children cannot miss this child.
                found = self.ledger.get(_accessor_key(entry.parent), consistent=True)
                if found is None:
                    raise PermissionDenied(_DENIED)
                ops.append(Check(found.key, found.version))
            try:
                self.ledger.transact(ops)
                return
            except ConflictError:
                continue  # the parent was renewed meanwhile; read it again
        raise Unavailable("the parent token is changing too often to create a child; retry")

    # --- lookup ------------------------------------------------------------------------

    def lookup(self, token: str) -> TokenEntry:
        """GET auth/token/lookup-self, POST auth/token/lookup. PermissionDenied for a token
        that is unknown, expired, revoked, used up, or whose parent is gone."""
        return self._load_valid(token)[0]

    def lookup_accessor(self, accessor: str) -> TokenEntry:
        """POST auth/token/lookup-accessor."""
        return self._load_valid_path(self._path_for_accessor(accessor))[0]

    def lookup_data(self, entry: TokenEntry, token: str | None = None) -> dict[str, Any]:
        """The `data` of a lookup response. `token` is echoed as `id` (lookup-self and lookup; a lookup by accessor passes none)."""
        now = self.clock()
        data: dict[str, Any] = {
            "accessor": entry.accessor,
            "creation_time": entry.creation_time,
            "creation_ttl": entry.creation_ttl,
            "display_name": entry.display_name,
            "entity_id": entry.entity_id,
            "expire_time": None if entry.expire_time is None else rfc3339(entry.expire_time),
            "explicit_max_ttl": entry.explicit_max_ttl,
            "id": token or "",
            "issue_time": rfc3339(entry.creation_time),
            "meta": dict(entry.meta) or None,
            "num_uses": entry.num_uses,
            "orphan": entry.orphan,
            "path": entry.path,
            "policies": list(entry.policies),
            "renewable": entry.renewable,
            "ttl": entry.ttl(now),
            "type": entry.type,
        }
        if entry.period:
            data["period"] = entry.period
        if entry.last_renewal_time is not None:
            data["last_renewal_time"] = entry.last_renewal_time
            data["last_renewal"] = rfc3339(entry.last_renewal_time)
        return data

    def auth_data(self, token: str, entry: TokenEntry) -> dict[str, Any]:
        """Vault's `auth` block for `entry` at this store's clock."""
        return auth_data(token, entry, now=self.clock())

    # --- renew -------------------------------------------------------------------------

    def renew(self, token: str, increment: Duration | None = None) -> TokenEntry:
        """POST auth/token/renew-self, auth/token/renew. The new TTL is `increment` (or the
        token's last TTL), capped by the max TTLs counted from creation; a periodic token
        gets its period again, with no overall cap unless it has an explicit max TTL."""
        self._check_token_text(token)
        return self._renew(token_path(token), increment)

    def renew_accessor(self, accessor: str, increment: Duration | None = None) -> TokenEntry:
        """POST auth/token/renew-accessor."""
        return self._renew(self._path_for_accessor(accessor), increment)

    def _renew(self, tpath: str, increment: Duration | None) -> TokenEntry:
        step = 0 if increment is None else parse_duration(increment, "increment")
        for _ in range(_RETRIES):
            entry, version = self._load_valid_path(tpath)
            if not entry.renewable:
                raise InvalidRequest("lease is not renewable")
            now = _whole_second(self.clock())
            last = entry.creation_ttl
            if entry.last_renewal_time is not None and entry.expire_time is not None:
                last = entry.expire_time - entry.last_renewal_time
            granted = self._calculate_ttl(
                now=now,
                start=entry.creation_time,
                increment=step,
                ttl=last,
                period=entry.period,
                backend_max=entry.max_ttl,
                explicit_max=entry.explicit_max_ttl,
            )
            renewed = replace(entry, expire_time=now + granted, last_renewal_time=now)
            versions = self._index_versions(renewed)
            if versions is None:
                raise PermissionDenied(_DENIED)
            try:
                self.ledger.transact(_record_ops(tpath, renewed, versions=(version, *versions)))
            except ConflictError:
                continue
            self._valid.pop(tpath, None)
            return renewed
        raise Unavailable("the token is changing too often to renew; retry")

    def _index_versions(self, entry: TokenEntry) -> tuple[int, int] | None:
        accessor = self.ledger.get(_accessor_key(entry.accessor), consistent=True)
        if accessor is None:
            return None
        child = 0
        if entry.parent:
            link = self.ledger.get(_child_key(entry.parent, entry.accessor), consistent=True)
            child = 0 if link is None else link.version
        return accessor.version, child

    def _calculate_ttl(
        self,
        *,
        now: int,
        start: int,
        increment: int,
        ttl: int,
        period: int,
        backend_max: int,
        explicit_max: int,
    ) -> int:
        """Vault's TTL arithmetic (framework.CalculateTTL), in whole seconds."""
        cap = self.max_ttl
        if 0 < backend_max < cap:
            cap = backend_max
        if 0 < explicit_max < cap:
            cap = explicit_max
        last_valid: int | None
        if period > 0:
            granted = min(period, cap)
            last_valid = start + explicit_max if explicit_max > 0 else None
        else:
            granted = increment or ttl or self.default_ttl
            last_valid = start + cap
        if last_valid is not None:
            left = last_valid - now
            if left <= 0:
                raise InvalidRequest("past the max TTL, cannot renew")
            granted = min(granted, left)
        return granted

    # --- use ---------------------------------------------------------------------------

    def use(self, token: str) -> TokenEntry:
        """Authenticate a request with `token`: validate it and, for a use-limited token,
        spend one use (compare-and-set). The last use succeeds and revokes the token.
        Returns the entry with the uses left (0 after the last, or for unlimited)."""
        self._check_token_text(token)
        tpath = token_path(token)
        cached = self._cached_valid(tpath)
        if cached is not None:
            return cached
        for _ in range(_RETRIES):
            entry, version, until = self._load_valid_until(tpath)
            if entry.num_uses == 0:
                self._remember_valid(tpath, entry, version, until)
                return entry
            last = entry.num_uses == 1
            spent = replace(entry, num_uses=_USES_SPENT if last else entry.num_uses - 1)
            try:
                self.ledger.put_if(
                    _token_key(tpath), encode_json(spent.to_record()), version, expires_at=entry.expire_time
                )
            except ConflictError:
                continue  # a concurrent use or renewal: count again
            if last:
                self._revoke_tree(tpath, reason="use limit reached")
                return replace(entry, num_uses=0)
            return spent
        raise Unavailable("the token is being used too often at once; retry")

    # --- revoke ------------------------------------------------------------------------

    def revoke(self, token: str) -> None:
        """POST auth/token/revoke, revoke-self: the token and all its descendants.
        Idempotent: revoking an unknown or already revoked token does nothing."""
        self._check_token_text(token)
        self._revoke_tree(token_path(token), reason="revoked")

    def revoke_accessor(self, accessor: str) -> None:
        """POST auth/token/revoke-accessor: the token and all its descendants."""
        found = self._accessor_record(accessor)
        if found is not None:
            self._revoke_tree(str(found["token_path"]), reason="revoked by accessor")

    def revoke_orphan(self, token: str) -> None:
        """POST auth/token/revoke-orphan: the token only; its children become orphans."""
        self._check_token_text(token)
        tpath = token_path(token)
        found = get_json(self.ledger, _token_key(tpath))
        if found is None:
            return
        entry = TokenEntry.from_record(found[0])
        self._mark_revoked(entry, reason="revoked (children orphaned)")
        for link in list(iter_prefix(self.ledger, Kind.TOKEN, f"{_CHILDREN}{entry.accessor}/")):
            self._orphan(str(json.loads(link.value)["token_path"]), link.key, link.version)
        self._delete_records(tpath)

    def _orphan(self, tpath: str, link: Key, link_version: int) -> None:
        self._valid.pop(tpath, None)
        for _ in range(_RETRIES):
            found = get_json(self.ledger, _token_key(tpath))
            if found is None:  # gone meanwhile; just drop the link
                self._delete_if_present([link])
                return
            child = TokenEntry.from_record(found[0])
            freed = replace(child, parent="", orphan=True, depth=0)
            versions = self._index_versions(child)
            if versions is None:
                self._delete_if_present([link])
                return
            ops: list[Op] = list(_record_ops(tpath, freed, versions=(found[1], versions[0], 0)))
            ops.append(Delete(link, link_version))
            try:
                self.ledger.transact(ops)
                return
            except ConflictError:
                current = self.ledger.get(link, consistent=True)
                if current is None:
                    return
                link_version = current.version
        raise Unavailable("a child token is changing too often to orphan it; retry")

    def _revoke_tree(self, tpath: str, *, reason: str) -> None:
        # Parent first: once a token's records are gone, every descendant fails its
        # ancestor check, so a crash midway can only leave dead records behind.
        pending = [tpath]
        while pending:
            current = pending.pop()
            found = get_json(self.ledger, _token_key(current))
            if found is None:
                continue
            entry = TokenEntry.from_record(found[0])
            self._mark_revoked(entry, reason=reason)
            self._delete_records(current)
            for link in iter_prefix(self.ledger, Kind.TOKEN, f"{_CHILDREN}{entry.accessor}/"):
                pending.append(str(json.loads(link.value)["token_path"]))
            reason = "parent revoked"

    def _mark_revoked(self, entry: TokenEntry, *, reason: str) -> None:
        self.revocations.revoke(f"token:{entry.accessor}", reason=reason, expires_at=entry.expire_time)

    def _delete_records(self, tpath: str) -> None:
        """Delete a token's record, accessor entry and its parent's link to it, at once."""
        self._valid.pop(tpath, None)
        found = get_json(self.ledger, _token_key(tpath))
        if found is None:
            return
        entry = TokenEntry.from_record(found[0])
        keys = [_token_key(tpath), _accessor_key(entry.accessor)]
        if entry.parent:
            keys.append(_child_key(entry.parent, entry.accessor))
        self._delete_if_present(keys)

    def _delete_if_present(self, keys: Iterable[Key]) -> None:
        wanted = list(keys)
        for _ in range(_RETRIES):
            ops: list[Op] = []
            for key in wanted:
                item = self.ledger.get(key, consistent=True)
                if item is not None:
                    ops.append(Delete(key, item.version))
            if not ops:
                return
            try:
                self.ledger.transact(ops)
                return
            except ConflictError:
                continue
        raise Unavailable("the token is changing too often to delete; retry")

    # --- loading -----------------------------------------------------------------------

    @staticmethod
    def _check_token_text(token: object) -> None:
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise PermissionDenied(_DENIED)

    def _accessor_record(self, accessor: object) -> dict[str, Any] | None:
        if not isinstance(accessor, str) or not 0 < len(accessor) <= 128 or not accessor.isprintable():
            raise InvalidRequest("invalid accessor")
        found = get_json(self.ledger, _accessor_key(accessor))
        return None if found is None else found[0]

    def _path_for_accessor(self, accessor: object) -> str:
        found = self._accessor_record(accessor)
        if found is None:
            raise InvalidRequest("invalid accessor")
        return str(found["token_path"])

    def _load_valid(self, token: str) -> tuple[TokenEntry, int]:
        self._check_token_text(token)
        return self._load_valid_path(token_path(token))

    def _load_valid_path(self, tpath: str) -> tuple[TokenEntry, int]:
        entry, version, _until = self._load_valid_until(tpath)
        return entry, version

    def _load_valid_until(self, tpath: str) -> tuple[TokenEntry, int, int | None]:
        """The valid token's entry, its record's version, and the earliest expiry of it
        and its ancestors (None: none expires), read from the ledger."""
        found = get_json(self.ledger, _token_key(tpath))
        if found is None:
            raise PermissionDenied(_DENIED)
        record, version = found
        entry = TokenEntry.from_record(record)
        now = self.clock()
        if entry.expire_time is not None and now >= entry.expire_time:
            raise PermissionDenied(_DENIED)
        if entry.num_uses == _USES_SPENT:
            raise PermissionDenied(_DENIED)
        if self.revocations.is_revoked(f"token:{entry.accessor}"):
            raise PermissionDenied(_DENIED)
        until = entry.expire_time
        # Every ancestor must still be alive: a child dies with its parent.
        ancestor = entry.parent
        for _ in range(MAX_TREE_DEPTH + 1):
            if not ancestor:
                return entry, version, until
            link = get_json(self.ledger, _accessor_key(ancestor))
            if link is None:
                raise PermissionDenied(_DENIED)
            expires = link[0].get("expire_time")
            if expires is not None:
                if now >= int(expires):
                    raise PermissionDenied(_DENIED)
                until = int(expires) if until is None else min(until, int(expires))
            ancestor = str(link[0].get("parent", ""))
        raise PermissionDenied(_DENIED)

    def _cached_valid(self, tpath: str) -> TokenEntry | None:
        """The entry `use` read for this unlimited token less than TOKEN_CACHE_SECONDS
        ago, if the token is still neither expired nor revoked; else None (read again)."""
        hit = self._valid.get(tpath)
        if hit is None:
            return None
        read_at, entry, _version, until = hit
        if (
            time.monotonic() - read_at >= TOKEN_CACHE_SECONDS
            or (until is not None and self.clock() >= until)
            or self.revocations.is_revoked(f"token:{entry.accessor}")
        ):
            self._valid.pop(tpath, None)
            return None
        return entry

    def _remember_valid(self, tpath: str, entry: TokenEntry, version: int, until: int | None) -> None:
        if len(self._valid) >= TOKEN_CACHE_ENTRIES:
            self._valid.clear()  # bounded; the next uses read their records again
        self._valid[tpath] = (time.monotonic(), entry, version, until)

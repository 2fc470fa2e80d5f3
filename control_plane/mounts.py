"""The mount table (Vault's `sys/mounts` and `sys/auth`): which engine or auth method
answers under which path.

Two tables, each one ledger item sealed by the barrier like every other
(`Kind.CONFIG` "sys/mounts" and "sys/auth"), changed only by compare-and-set, so two
operators enabling the same path at once get one mount and one clear refusal:

- **built-in mounts** are always there and never stored unless tuned: `secret/` (KV
  v2), `transit/`, `database/`, `cubbyhole/`, `identity/`, `sys/`, `rotation/`, and
  the auth methods `token/` and `jwt/`. Their routes are the router's static routes, so
  nothing a user ran before mounts existed changes.
- **enabled mounts** (`POST sys/mounts/kv-apps {"type": "kv-v2"}`, `POST
  sys/auth/approle {"type": "approle"}`) are entries in the table; the router resolves
  a request's path to the longest enabled mount prefix (`resolve`) and dispatches it to
  that mount's own route set, built the first time it is asked for in a process and
  cached by the mount's uuid and lease TTLs (a disabled and re-enabled path is a new
  mount; a tuned one is built again).

Types that can be enabled: `kv` (version 2; `kv-v2` is the CLI's name for it),
`transit` and `pki` for secrets, `approle` and `kubernetes` for auth. Disabling a mount deletes its data: every
item stored under it goes, as Vault's `secrets disable` does, and the key-backend keys
its engine held (transit keys, a PKI CA key) are disabled first (`disable`'s `retire`).

Tune (`sys/mounts/:path/tune`, `sys/auth/:path/tune`): `default_lease_ttl`,
`max_lease_ttl`, `description`, and `options` (KV's `version` only "2"). An enabled
AppRole or Kubernetes mount's TTLs shape its logins' tokens (the default stands in for a
role without `token_ttl`, the max caps the role's `token_max_ttl`); on the built-in
mounts and the secrets engines they are stored and read back but not applied yet. Every
process reads the table from the ledger on the requests that need it, so a mount
enabled through one worker or cell process is served by all at once.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from keycell.control_plane.auth.token.store import parse_duration
from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.storage import delete_current, get_json, put_json_if

SECRETS = "sys/mounts"
AUTH = "sys/auth"
# Vault's system-wide lease TTLs (32 days), what a tune read shows for "0: the default".
SYSTEM_DEFAULT_LEASE_TTL = 32 * 24 * 3600
SYSTEM_MAX_LEASE_TTL = 32 * 24 * 3600
_PATH = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_DESCRIPTIONS = {
    "kv": "key/value secret storage",
    "transit": "encryption as a service",
    "pki": "X.509 certificate authority (CA keys in the key backend)",
    "database": "dynamic database credentials",
    "cubbyhole": "per-token private secret storage",
    "identity": "identity store",
    "system": "system endpoints used for control, policy and debugging",
    "rotation": "credential rotation (Keycell)",
    "token": "token based credentials",
    "jwt": "JWT and JWT-SVID login",
    "approle": "AppRole machine login",
    "kubernetes": "Kubernetes service account login (TokenReview)",
}
BUILTIN_SECRETS: dict[str, tuple[str, dict[str, str] | None]] = {
    "secret/": ("kv", {"version": "2"}),
    "transit/": ("transit", None),
    "database/": ("database", None),
    "cubbyhole/": ("cubbyhole", None),
    "identity/": ("identity", None),
    "sys/": ("system", None),
    "rotation/": ("rotation", None),
}
BUILTIN_AUTH: dict[str, tuple[str, dict[str, str] | None]] = {
    "token/": ("token", None),
    "jwt/": ("jwt", None),
}
# The engines and methods that are part of the core, not plug-ins (Vault lists no
# deprecation status for these, and a core auth method's options are null).
CORE_TYPES = frozenset({"cubbyhole", "identity", "system", "token", "rotation"})
ENABLEABLE = {SECRETS: ("kv", "transit", "pki"), AUTH: ("approle", "kubernetes")}


@dataclass(frozen=True)
class Mount:
    """One row of a table: `path` ends with "/" ("kv-apps/"; an auth row's path is
    under auth/, "approle/")."""

    path: str
    type: str
    uuid: str
    accessor: str
    description: str
    options: dict[str, str] | None
    default_lease_ttl: int
    max_lease_ttl: int
    builtin: bool

    @property
    def name(self) -> str:
        """The path without its trailing slash: what the engine calls its mount."""
        return self.path[:-1]

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "type": self.type,
            "description": self.description,
            "accessor": self.accessor,
            "uuid": self.uuid,
            "config": {
                "default_lease_ttl": self.default_lease_ttl,
                "max_lease_ttl": self.max_lease_ttl,
                "force_no_cache": False,
            },
            "options": self.options,
            "local": False,
            "seal_wrap": False,
            "external_entropy_access": False,
            "plugin_version": "",
            "running_plugin_version": "",
            "running_sha256": "",
        }
        if self.type not in CORE_TYPES:
            row["deprecation_status"] = "supported"  # a plug-in's; none here is deprecated
        return row

    def tune_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "default_lease_ttl": self.default_lease_ttl or SYSTEM_DEFAULT_LEASE_TTL,
            "max_lease_ttl": self.max_lease_ttl or SYSTEM_MAX_LEASE_TTL,
            "force_no_cache": False,
            **({"options": self.options} if self.options is not None else {}),
        }


def normalise_path(path: object) -> str:
    """ "kv-apps", "/kv-apps/" -> "kv-apps/"; InvalidRequest for anything else."""
    if not isinstance(path, str):
        raise InvalidRequest("a mount path is a string")
    trimmed = path.strip("/")
    if not trimmed or len(trimmed) > 128 or not _PATH.fullmatch(trimmed):
        raise InvalidRequest(
            "a mount path is segments of letters, digits, '_' and '-' (at most 128 characters)"
        )
    return trimmed + "/"


class MountTable:
    """The secrets table (`table=SECRETS`) or the auth table (`table=AUTH`) of a cell."""

    def __init__(self, ledger: Ledger, table: str) -> None:
        if table not in (SECRETS, AUTH):
            raise ValueError(f"no mount table {table!r}")
        self.ledger = ledger
        self.table = table
        self.key = Key(Kind.CONFIG, table)
        self.builtin = BUILTIN_SECRETS if table == SECRETS else BUILTIN_AUTH

    # --- reading -------------------------------------------------------------------

    def _stored(self) -> tuple[dict[str, Any], int]:
        found = get_json(self.ledger, self.key)
        return found if found is not None else ({"mounts": {}, "tuned": {}}, 0)

    def all(self) -> dict[str, Mount]:
        """Every mount, built-in and enabled, by path."""
        return self._rows(self._stored()[0])

    def _rows(self, stored: Mapping[str, Any]) -> dict[str, Mount]:
        out = {path: self._builtin(path, stored["tuned"].get(path)) for path in self.builtin}
        out.update({path: _mount(path, row, builtin=False) for path, row in stored["mounts"].items()})
        return dict(sorted(out.items()))

    def get(self, path: object) -> Mount:
        wanted = normalise_path(path)
        found = self.all().get(wanted)
        if found is None:
            raise InvalidRequest(f"no mount at {wanted!r}")
        return found

    def enabled(self) -> Iterator[Mount]:
        """The mounts that are not built in, longest path first (for `resolve`)."""
        stored, _ = self._stored()
        for path in sorted(stored["mounts"], key=len, reverse=True):
            yield _mount(path, stored["mounts"][path], builtin=False)

    def resolve(self, path: str) -> Mount | None:
        """The enabled mount whose path is the longest prefix of `path` (a request path
        relative to the table: "kv-apps/data/x", or "approle/login" for auth/)."""
        for mount in self.enabled():
            if path.startswith(mount.path) or path == mount.name:
                return mount
        return None

    # --- changing ------------------------------------------------------------------

    def enable(self, path: object, data: Mapping[str, Any], *, reserved: set[str] | None = None) -> Mount:
        """POST sys/mounts/:path (or sys/auth/:path) {type, description, config, options}.
        `reserved`: paths the router's built-in routes answer under ("sys/", ...)."""
        where = normalise_path(path)
        if not isinstance(data, Mapping):
            raise InvalidRequest("the mount is a JSON object")
        kind, options = _type_and_options(data.get("type"), data.get("options"), ENABLEABLE[self.table])
        description = _description(data.get("description"), kind)
        default_ttl, max_ttl = _ttls(data.get("config") or {}, 0, 0)
        row = {
            "type": kind,
            "uuid": str(uuid.uuid4()),
            "accessor": f"{'auth_' if self.table == AUTH else ''}{kind}_{secrets.token_hex(4)}",
            "description": description,
            "options": options,
            "default_lease_ttl": default_ttl,
            "max_lease_ttl": max_ttl,
        }
        for _ in range(8):
            stored, version = self._stored()
            taken = set(self.builtin) | set(stored["mounts"]) | (reserved or set())
            for other in taken:
                if where.startswith(other) or other.startswith(where):
                    raise InvalidRequest(f"path is already in use at {other}")
            stored = {**stored, "mounts": {**stored["mounts"], where: row}}
            try:
                put_json_if(self.ledger, self.key, stored, version)
                return _mount(where, row, builtin=False)
            except ConflictError:
                continue
        raise InvalidRequest("the mount table was changed concurrently; retry")

    def tune(self, path: object, data: Mapping[str, Any]) -> None:
        """POST sys/mounts/:path/tune {default_lease_ttl, max_lease_ttl, description, options}."""
        where = normalise_path(path)
        if not isinstance(data, Mapping):
            raise InvalidRequest("the tune is a JSON object")
        for _ in range(8):
            stored, version = self._stored()
            mount = self._rows(stored).get(where)
            if mount is None:
                raise InvalidRequest(f"no mount at {where!r}")
            default_ttl, max_ttl = _ttls(data, mount.default_lease_ttl, mount.max_lease_ttl)
            change: dict[str, Any] = {"default_lease_ttl": default_ttl, "max_lease_ttl": max_ttl}
            if "description" in data:
                change["description"] = _description(data["description"], mount.type)
            if data.get("options"):
                _type_and_options(mount.type, {**(mount.options or {}), **data["options"]}, (mount.type,))
            if mount.builtin:
                tuned = {**stored["tuned"], where: {**stored["tuned"].get(where, {}), **change}}
                stored = {**stored, "tuned": tuned}
            else:
                stored = {
                    **stored,
                    "mounts": {**stored["mounts"], where: {**stored["mounts"][where], **change}},
                }
            try:
                put_json_if(self.ledger, self.key, stored, version)
                return
            except ConflictError:
                continue
        raise InvalidRequest("the mount table was changed concurrently; retry")

    def disable(self, path: object, retire: Callable[[Mount], object] | None = None) -> None:
        """DELETE sys/mounts/:path: the mount and every item stored under it. A path
        with no mount is not an error (as in Vault); a built-in mount cannot go.

        `retire(mount)` disables the key-backend keys the mount's engine holds (transit
        keys, a PKI CA key). It runs while the mount still stands, so a backend outage
        is an error that removes nothing and the disable can be retried, and once more
        after the mount left the table, for a key created in between."""
        where = normalise_path(path)
        if where in self.builtin:
            raise InvalidRequest(f"{where} is built into every Keycell cell and cannot be disabled")
        retired = False
        for _ in range(8):
            stored, version = self._stored()
            row = stored["mounts"].get(where)
            if row is None:
                return
            mount = _mount(where, row, builtin=False)
            if retire is not None and not retired:
                retire(mount)
                retired = True
            rest = {p: r for p, r in stored["mounts"].items() if p != where}
            try:
                put_json_if(self.ledger, self.key, {**stored, "mounts": rest}, version)
            except ConflictError:
                continue
            if retire is not None:
                retire(mount)
            self._delete_data(mount)
            return
        raise InvalidRequest("the mount table was changed concurrently; retry")

    def _delete_data(self, mount: Mount) -> None:
        """Every item the mount's engine kept (the prefixes its engine writes under). The
        mount left the table first, so no request writes under it meanwhile (a
        re-enabled path is a new mount)."""
        name = mount.name
        prefixes = {
            "kv": ((Kind.SECRET_META, f"{name}/"), (Kind.SECRET_VERSION, f"{name}/")),
            "transit": ((Kind.TRANSIT_KEY, f"{name}/"),),
            "pki": ((Kind.CONFIG, f"pki/{name}/"),),
            "approle": ((Kind.AUTH_ROLE, f"approle/{name}/"), (Kind.AUTH_SECRET, f"approle/{name}/")),
            "kubernetes": ((Kind.AUTH_ROLE, f"kubernetes/{name}/"),),
        }.get(mount.type, ())
        for kind, under in prefixes:
            for item in list(iter_prefix(self.ledger, kind, under)):
                delete_current(self.ledger, item.key)
        if mount.type == "kv":
            delete_current(self.ledger, Key(Kind.CONFIG, f"kv/{name}"))

    def _builtin(self, path: str, tuned: Mapping[str, Any] | None) -> Mount:
        kind, options = self.builtin[path]
        tuned = tuned or {}
        return Mount(
            path=path,
            type=kind,
            uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"keycell:{self.table}:{path}")),
            accessor=f"{'auth_' if self.table == AUTH else ''}{kind}_builtin",
            description=tuned.get("description", _DESCRIPTIONS.get(kind, "")),
            options=options,
            default_lease_ttl=int(tuned.get("default_lease_ttl", 0)),
            max_lease_ttl=int(tuned.get("max_lease_ttl", 0)),
            builtin=True,
        )


def _mount(path: str, row: Mapping[str, Any], *, builtin: bool) -> Mount:
    return Mount(
        path=path,
        type=row["type"],
        uuid=row["uuid"],
        accessor=row["accessor"],
        description=row["description"],
        options=row["options"],
        default_lease_ttl=int(row["default_lease_ttl"]),
        max_lease_ttl=int(row["max_lease_ttl"]),
        builtin=builtin,
    )


def _type_and_options(
    kind: object, options: object, allowed: tuple[str, ...]
) -> tuple[str, dict[str, str] | None]:
    if kind == "kv-v2":
        kind, options = "kv", {**(options if isinstance(options, dict) else {}), "version": "2"}
    if not isinstance(kind, str) or kind not in allowed:
        raise InvalidRequest(f"type must be one of {', '.join(allowed)} (got {str(kind)[:40]!r})")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("options is a map of strings")
    if kind == "kv":
        version = str((options or {}).get("version", "2"))
        if version != "2":
            raise InvalidRequest("Keycell serves KV version 2 only (options.version must be 2)")
        return kind, {"version": "2"}
    if options:
        raise InvalidRequest(f"a {kind} mount takes no options")
    return kind, None


def _description(value: object, kind: str) -> str:
    if value in (None, ""):
        return _DESCRIPTIONS.get(kind, "")
    if not isinstance(value, str) or len(value) > 512:
        raise InvalidRequest("description is a string of at most 512 characters")
    return value


def _ttls(data: Mapping[str, Any], default_ttl: int, max_ttl: int) -> tuple[int, int]:
    """`default_lease_ttl` and `max_lease_ttl` (durations; "system" or 0: the default)."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("config is a JSON object")

    def one(name: str, current: int) -> int:
        if name not in data:
            return current
        value = data[name]
        return 0 if value in (None, "", "system") else parse_duration(value, name)

    new_default, new_max = one("default_lease_ttl", default_ttl), one("max_lease_ttl", max_ttl)
    if new_max and new_default > new_max:
        raise InvalidRequest("default_lease_ttl cannot be greater than max_lease_ttl")
    return new_default, new_max

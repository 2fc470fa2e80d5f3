"""Dynamic database credentials: Vault's database secrets engine, mounted at `database/`.

- `database/config/:name`  a connection: plugin_name, connection_url (with {{username}}
  and {{password}} placeholders), username, password, allowed_roles, verify_connection.
  Reads never return the password.
- `database/roles/:name`   db_name, creation_statements, revocation_statements,
  renew_statements, default_ttl, max_ttl. Statements use {{name}} (also {{username}}),
  {{password}} and {{expiration}}, as in Vault.
- `database/creds/:role`   a new database user per call, with a lease
  `database/creds/<role>/<id>`: the user's VALID UNTIL is the lease's expiry. Renewing
  the lease (sys/leases/renew) runs renew_statements (by default ALTER ROLE ... VALID
  UNTIL) with the new expiry; revoking it, or its expiry (the lease tidy), runs the
  revocation statements (by default DROP ROLE) and ends the user's sessions.
- `database/status`        revocations that failed and are being retried.

A revocation that fails (database down) is retried with exponential backoff: the
lease stays, a failure record under the mount says how many attempts were made, the
last error class and when the next attempt is due, and `database/status` lists them.
They never pile up silently. The engine talks to databases through a *plugin*
(`DatabasePlugin`), which adapters provide (adapters/targets/postgres.py); the core
never imports a driver.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from keycell.control_plane.errors import InvalidRequest, NotFound, RequestError, Unavailable
from keycell.control_plane.freshness import parse_bound
from keycell.control_plane.leases import Lease, Leases
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.storage import get_json, put_json_if
from keycell.control_plane.wrapping import parse_duration

REVOKER = "database"
MOUNT = "database"
DEFAULT_TTL = 3600
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
_PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 32
# Backoff of failed revocations: 1 s doubling to at most 5 minutes.
BACKOFF_BASE, BACKOFF_MAX = 1.0, 300.0

DEFAULT_RENEW = ["ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}';"]
DEFAULT_REVOKE = ['DROP ROLE IF EXISTS "{{name}}";']


class DatabasePlugin(Protocol):
    def verify(self) -> None: ...

    def execute(self, statements: Sequence[str]) -> None:
        """Run the statements in one transaction."""
        ...

    def terminate_sessions(self, username: str) -> None:
        """Refuse new logins by `username` and end its sessions (a no-op if it is gone)."""
        ...

    def close(self) -> None: ...


PluginFactory = Callable[[Mapping[str, Any]], DatabasePlugin]


def expiration_text(epoch: float) -> str:
    """{{expiration}}: a timestamp PostgreSQL reads (VALID UNTIL), in UTC."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S+00")


def render(statements: Sequence[str], *, name: str, password: str = "", expiration: str = "") -> list[str]:
    out = []
    for statement in statements:
        text = statement.replace("{{name}}", name).replace("{{username}}", name)
        text = text.replace("{{password}}", password).replace("{{expiration}}", expiration)
        out.append(text)
    return out


def _statements(data: Mapping[str, Any], field: str) -> list[str]:
    value = data.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    raise InvalidRequest(f"{field!r} must be a string or a list of strings")


def _open_connections(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise InvalidRequest("max_open_connections is an integer from 1 to 64")
    return value


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"a {what} name is 1-128 letters, digits, '_', '.' or '-'")
    return name


class DatabaseEngine:
    def __init__(
        self,
        ledger: Ledger,
        leases: Leases,
        *,
        clock: Callable[[], float] = time.time,
        plugins: Mapping[str, PluginFactory] | None = None,
    ) -> None:
        self.ledger = ledger
        self.leases = leases
        self.clock = clock
        self.plugins: dict[str, PluginFactory] = dict(plugins or {})
        self._open: dict[str, tuple[int, DatabasePlugin]] = {}  # config name -> (config version, plugin)
        self._lock = threading.Lock()
        leases.register_revoker(REVOKER, self._revoke_lease)
        leases.register_renewer(REVOKER, self._renew_lease)

    def register_plugin(self, name: str, factory: PluginFactory) -> None:
        self.plugins[name] = factory

    # --- config ------------------------------------------------------------------------

    @staticmethod
    def _config_key(name: str) -> Key:
        return Key(Kind.CONFIG, f"{MOUNT}/config/{name}")

    @staticmethod
    def _role_key(name: str) -> Key:
        return Key(Kind.CONFIG, f"{MOUNT}/roles/{name}")

    @staticmethod
    def _failure_key(lease_id: str) -> Key:
        return Key(Kind.CONFIG, f"{MOUNT}/revocation-failures/{lease_id}")

    def write_config(self, name: str, data: Mapping[str, Any]) -> None:
        name = _check_name(name, "connection")
        plugin_name = data.get("plugin_name")
        if not isinstance(plugin_name, str) or not plugin_name:
            raise InvalidRequest("plugin_name is required")
        if plugin_name not in self.plugins:
            raise InvalidRequest(f"unknown plugin_name {plugin_name!r}; available: {sorted(self.plugins)}")
        url = data.get("connection_url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest("connection_url is required")
        allowed = data.get("allowed_roles", [])
        if isinstance(allowed, str):
            allowed = [r.strip() for r in allowed.split(",") if r.strip()]
        if not isinstance(allowed, list) or not all(isinstance(r, str) for r in allowed):
            raise InvalidRequest("allowed_roles must be a list of role names")
        record = {
            "plugin_name": plugin_name,
            "connection_url": url,
            "username": str(data.get("username", "")),
            "password": str(data.get("password", "")),
            "allowed_roles": allowed,
            "max_open_connections": _open_connections(data.get("max_open_connections", 4)),
        }
        verify = data.get("verify_connection", True)
        if verify is True or verify in ("true", "1"):
            plugin = self.plugins[plugin_name](record)
            try:
                plugin.verify()
            except RequestError as exc:
                raise InvalidRequest(f"error verifying the connection: {exc.message}") from None
            finally:
                plugin.close()
        key = self._config_key(name)
        found = self.ledger.get(key, consistent=True)
        put_json_if(self.ledger, key, record, 0 if found is None else found.version)

    def read_config(self, name: str) -> dict[str, Any]:
        record = self._config(_check_name(name, "connection"))
        return {
            "plugin_name": record["plugin_name"],
            "connection_details": {
                "connection_url": record["connection_url"],
                "username": record["username"],
            },
            "allowed_roles": record["allowed_roles"],
        }

    def delete_config(self, name: str) -> None:
        key = self._config_key(_check_name(name, "connection"))
        found = self.ledger.get(key, consistent=True)
        if found is not None:
            self.ledger.delete_if(key, found.version)
        with self._lock:
            opened = self._open.pop(name, None)
        if opened is not None:
            opened[1].close()

    def list(self, area: str) -> dict[str, Any]:
        prefix = f"{MOUNT}/{area}/"
        return {"keys": [i.key.path[len(prefix) :] for i in iter_prefix(self.ledger, Kind.CONFIG, prefix)]}

    def _config(self, name: str) -> dict[str, Any]:
        found = get_json(self.ledger, self._config_key(name))
        if found is None:
            raise NotFound(f"no database connection named {name!r}")
        return found[0]

    def _plugin(self, name: str) -> DatabasePlugin:
        found = get_json(self.ledger, self._config_key(name))
        if found is None:
            raise NotFound(f"no database connection named {name!r}")
        record, version = found
        with self._lock:
            opened = self._open.get(name)
            if opened is not None and opened[0] == version:
                return opened[1]
            factory = self.plugins.get(str(record["plugin_name"]))
            if factory is None:
                raise Unavailable(f"plugin {record['plugin_name']!r} is not available in this process")
            plugin = factory(record)
            if opened is not None:
                opened[1].close()
            self._open[name] = (version, plugin)
            return plugin

    # --- roles -------------------------------------------------------------------------

    def write_role(self, name: str, data: Mapping[str, Any]) -> None:
        name = _check_name(name, "role")
        db_name = _check_name(data.get("db_name"), "connection")
        creation = _statements(data, "creation_statements")
        if not creation:
            raise InvalidRequest("creation_statements is required")
        default_ttl = parse_duration(data.get("default_ttl", DEFAULT_TTL) or DEFAULT_TTL)
        max_ttl = parse_duration(data.get("max_ttl", 0) or 0) or self.leases.max_ttl
        if default_ttl > max_ttl:
            raise InvalidRequest("default_ttl cannot be greater than max_ttl")
        record = {
            "db_name": db_name,
            "creation_statements": creation,
            "revocation_statements": _statements(data, "revocation_statements"),
            "renew_statements": _statements(data, "renew_statements"),
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
        }
        bound = parse_bound(dict(data))  # issue 18: checked by database/creds before issuing
        if bound is not None:
            record.update(bound.as_json())
        key = self._role_key(name)
        found = self.ledger.get(key, consistent=True)
        put_json_if(self.ledger, key, record, 0 if found is None else found.version)

    def read_role(self, name: str) -> dict[str, Any]:
        found = get_json(self.ledger, self._role_key(_check_name(name, "role")))
        if found is None:
            raise NotFound(f"no database role named {name!r}")
        return found[0]

    def delete_role(self, name: str) -> None:
        key = self._role_key(_check_name(name, "role"))
        found = self.ledger.get(key, consistent=True)
        if found is not None:
            self.ledger.delete_if(key, found.version)

    # --- credentials ---------------------------------------------------------------------

    def creds(self, role_name: str) -> tuple[dict[str, Any], Lease]:
        """A new database user and its lease."""
        role = self.read_role(role_name)
        config = self._config(role["db_name"])
        allowed = config["allowed_roles"]
        if allowed and "*" not in allowed and role_name not in allowed:
            raise InvalidRequest(f"role {role_name!r} is not allowed to use database {role['db_name']!r}")
        username = f"v-{role_name[:16]}-{secrets.token_hex(8)}".lower()
        password = "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))
        ttl = min(int(role["default_ttl"]), int(role["max_ttl"]))
        expires = self.clock() + ttl
        plugin = self._plugin(role["db_name"])
        plugin.execute(
            render(
                role["creation_statements"],
                name=username,
                password=password,
                expiration=expiration_text(expires),
            )
        )
        try:
            lease = self.leases.register(
                f"{MOUNT}/creds/{role_name}",
                ttl=ttl,
                max_ttl=int(role["max_ttl"]),
                revoker=REVOKER,
                revoker_data={"db_name": role["db_name"], "role": role_name, "username": username},
            )
        except Exception:
            self._drop(plugin, role, username)  # no lease, no user
            raise
        return {"username": username, "password": password}, lease

    def _drop(self, plugin: DatabasePlugin, role: Mapping[str, Any], username: str) -> None:
        plugin.terminate_sessions(username)  # first: no new logins, sessions ended
        plugin.execute(render(role.get("revocation_statements") or DEFAULT_REVOKE, name=username))

    def _renew_lease(self, lease: Lease, expire_time: float) -> None:
        data = lease.revoker_data
        role = get_json(self.ledger, self._role_key(str(data["role"])))
        statements = (role[0].get("renew_statements") if role else None) or DEFAULT_RENEW
        self._plugin(str(data["db_name"])).execute(
            render(statements, name=str(data["username"]), expiration=expiration_text(expire_time))
        )

    def _revoke_lease(self, lease: Lease) -> None:
        """The lease's revoker: drop the user and end its sessions; on failure record
        the attempt and back off, so retries (revoke again, or the tidy) are spaced."""
        key = self._failure_key(lease.lease_id)
        failure = get_json(self.ledger, key)
        now = self.clock()
        if failure is not None and float(failure[0]["next_attempt"]) > now:
            raise Unavailable(
                f"revoking lease {lease.lease_id!r} failed {failure[0]['attempts']} time(s); "
                f"next attempt in {int(float(failure[0]['next_attempt']) - now) + 1}s"
            )
        data = lease.revoker_data
        role_found = get_json(self.ledger, self._role_key(str(data["role"])))
        role = role_found[0] if role_found else {}
        try:
            self._drop(self._plugin(str(data["db_name"])), role, str(data["username"]))
        except Exception as exc:
            attempts = 1 + (int(failure[0]["attempts"]) if failure else 0)
            record = {
                "lease_id": lease.lease_id,
                "attempts": attempts,
                "last_error": type(exc).__name__
                + (f": {exc.message}" if isinstance(exc, RequestError) else ""),
                "first_failure": failure[0]["first_failure"] if failure else now,
                "last_attempt": now,
                "next_attempt": now + min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempts - 1)),
            }
            with contextlib.suppress(ConflictError):  # another worker recorded the same failure
                put_json_if(self.ledger, key, record, 0 if failure is None else failure[1])
            raise
        if failure is not None:
            with contextlib.suppress(ConflictError):
                self.ledger.delete_if(key, failure[1])

    def retry_revocations(self, limit: int = 100) -> dict[str, int]:
        """Retry the failed revocations whose backoff has passed (the rotation function's
        schedule runs this): a lease whose revocation failed is revoked for good once
        the database answers, without anyone asking again."""
        now = self.clock()
        done = failed = 0
        for item in iter_prefix(self.ledger, Kind.CONFIG, f"{MOUNT}/revocation-failures/"):
            if done + failed >= limit:
                break
            found = get_json(self.ledger, item.key)
            if found is None or float(found[0]["next_attempt"]) > now:
                continue
            lease_id = str(found[0]["lease_id"])
            if self.leases.get(lease_id) is None:
                continue  # expired: the lease tidy retries it (through the same backoff)
            try:
                self.leases.revoke(lease_id)
                done += 1
            except RequestError:
                failed += 1
        return {"revoked": done, "still_failing": failed}

    def status(self) -> dict[str, Any]:
        failures = [
            get_json(self.ledger, item.key)
            for item in iter_prefix(self.ledger, Kind.CONFIG, f"{MOUNT}/revocation-failures/")
        ]
        listed = [f[0] for f in failures if f is not None]
        return {"pending_revocations": len(listed), "revocation_failures": listed}

    def close(self) -> None:
        with self._lock:
            for _, plugin in self._open.values():
                plugin.close()
            self._open.clear()

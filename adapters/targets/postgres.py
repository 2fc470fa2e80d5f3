"""PostgreSQL: the rotation target (alternating users) and the database engine's plugin.

Alternating users. A secret names a base user, say `app`; rotations alternate between
`app` and `app_clone`. Each rotation gives the *idle* user (the one not CURRENT) a new
password, LOGIN, and the grants the active user holds, then promotes it: connections
and logins with the active user never break, and the PREVIOUS credentials stay valid
until the rotation after next changes that user's password, unless revoked (which
takes LOGIN away and ends the user's sessions at once).

Roles and passwords cannot be bound as query parameters in DDL, so identifiers are
quoted with `psycopg.sql.Identifier` and passwords with `sql.Literal`; passwords are
generated here from an alphabet without quotes anyway. Nothing secret reaches an
exception message or a log line: errors name the user and the PostgreSQL error class.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
from psycopg import sql

from keycell.adapters.targets.generic import generate_password
from keycell.control_plane.rotation import TargetError, TargetParamsError, Value

CLONE_SUFFIX = "_clone"
PASSWORD_POLICY = {"length": 32, "lower": True, "upper": True, "digits": True, "symbols": False}


class ConnectionPool:
    """A few autocommit connections for administrative statements, reused across
    threads (one at a time each); a broken connection is dropped and replaced."""

    def __init__(self, dsn: str, *, size: int = 4, connect_timeout: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout)
            try:
                yield conn
            except BaseException:
                if conn.broken or conn.closed:
                    conn.close()
                else:
                    self._idle.put(conn)
                raise
            if conn.broken or conn.closed:
                conn.close()
            else:
                self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _error(what: str, exc: BaseException) -> TargetError:
    # The class name (and SQLSTATE) only: a driver message may quote a statement.
    state = getattr(getattr(exc, "diag", None), "sqlstate", None)
    return TargetError(f"{what} failed ({type(exc).__name__}{', SQLSTATE ' + state if state else ''})")


def user_dsn(host: str, port: int, dbname: str, user: str, password: str) -> str:
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{dbname}?connect_timeout=10"


class PostgresTarget:
    """`admin_dsn` is a role allowed to CREATE ROLE and ALTER ROLE (and to terminate
    sessions); clients reach the database at `host:port/dbname`."""

    kind = "postgres"

    def __init__(self, admin_dsn: str, *, pool_size: int = 4) -> None:
        parts = urlsplit(admin_dsn)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5432
        self.dbname = (parts.path or "/postgres").lstrip("/") or "postgres"
        self.pool = ConnectionPool(admin_dsn, size=pool_size)

    @staticmethod
    def _users(params: Mapping[str, Any]) -> tuple[str, str]:
        base = params.get("username")
        if not isinstance(base, str) or not base or len(base) > 63 - len(CLONE_SUFFIX):
            raise TargetParamsError("a postgres secret needs params.username, at most 57 characters")
        return base, base + CLONE_SUFFIX

    def generate(self, params: Mapping[str, Any], current: Value | None, previous: Value | None) -> Value:
        base, clone = self._users(params)
        active = None if current is None else current.get("username")
        idle = clone if active == base else base
        return {
            "engine": "postgres",
            "host": self.host,
            "port": self.port,
            "dbname": str(params.get("dbname", self.dbname)),
            "username": idle,
            "password": generate_password(PASSWORD_POLICY),
        }

    def apply(self, params: Mapping[str, Any], pending: Value, current: Value | None) -> None:
        user = str(pending["username"])
        if user not in self._users(params):
            raise TargetError(f"user {user!r} is not one of this secret's alternating users")
        active = None if current is None else str(current.get("username"))
        grants = [str(g) for g in params.get("grants", [])]
        try:
            with self.pool.connection() as conn, conn.transaction():
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
                verb = sql.SQL("ALTER ROLE") if exists else sql.SQL("CREATE ROLE")
                conn.execute(
                    sql.SQL("{} {} WITH LOGIN PASSWORD {}").format(
                        verb, sql.Identifier(user), sql.Literal(str(pending["password"]))
                    )
                )
                if active and active != user:
                    # The idle user gets what the active one holds.
                    rows = conn.execute(
                        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                        "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
                        (active,),
                    ).fetchall()
                    grants += [str(r[0]) for r in rows if r[0] not in grants]
                for role in grants:
                    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(user)))
        except psycopg.Error as exc:
            raise _error(f"setting the password of {user!r}", exc) from None

    def verify(self, params: Mapping[str, Any], pending: Value) -> None:
        user = str(pending["username"])
        try:
            with psycopg.connect(
                user_dsn(
                    self.host,
                    self.port,
                    str(pending.get("dbname", self.dbname)),
                    user,
                    str(pending["password"]),
                )
            ) as conn:
                row = conn.execute("SELECT current_user").fetchone()
        except psycopg.Error as exc:
            raise _error(f"logging in as {user!r}", exc) from None
        if row is None or row[0] != user:
            raise TargetError(f"logged in, but not as {user!r}")

    def retire(self, params: Mapping[str, Any], current: Value, previous: Value | None) -> None:
        return None  # the previous user keeps working until its next turn

    def revoke(self, params: Mapping[str, Any], value: Value) -> None:
        user = str(value["username"])
        try:
            with self.pool.connection() as conn:
                conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN PASSWORD NULL").format(sql.Identifier(user)))
                terminate_sessions(conn, user)
        except psycopg.Error as exc:
            raise _error(f"revoking {user!r}", exc) from None

    def close(self) -> None:
        self.pool.close()


def terminate_sessions(conn: psycopg.Connection[Any], user: str) -> None:
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
        (user,),
    )


class PostgresPlugin:
    """The database engine's `postgresql-database-plugin`: runs creation and revocation
    statements over the configured connection (Vault's `connection_url` with
    {{username}} / {{password}} filled from the config's username and password)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        url = str(config.get("connection_url", ""))
        if not url:
            raise ValueError("connection_url is required")
        url = url.replace("{{username}}", quote(str(config.get("username", "")), safe=""))
        url = url.replace("{{password}}", quote(str(config.get("password", "")), safe=""))
        size = config.get("max_open_connections", 4)
        self.pool = ConnectionPool(
            url, size=size if isinstance(size, int) and 1 <= size <= 64 else 4, connect_timeout=5
        )

    def verify(self) -> None:
        try:
            with self.pool.connection() as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # a malformed URL fails in libpq's parser, not only as psycopg.Error
            raise _error("connecting to the database", exc) from None

    def execute(self, statements: Sequence[str]) -> None:
        try:
            with self.pool.connection() as conn, conn.transaction():
                for statement in statements:
                    conn.execute(statement.encode())  # bytes: psycopg sends it as is, no placeholders
        except psycopg.Error as exc:
            raise _error("running the role's statements", exc) from None

    def terminate_sessions(self, username: str) -> None:
        """No new logins for `username`, and its sessions ended (before it is dropped:
        a dropped role's sessions no longer carry its name)."""
        try:
            with self.pool.connection() as conn:
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
                if exists:
                    conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(sql.Identifier(username)))
                terminate_sessions(conn, username)
        except psycopg.Error as exc:
            raise _error("ending the user's sessions", exc) from None

    def close(self) -> None:
        self.pool.close()

"""Dynamic database credentials on a real PostgreSQL: Vault's database engine shape,
driven in process (fake clock for expiry and backoff) and by hvac over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest

from keycell.adapters.targets.postgres import PostgresPlugin, user_dsn
from keycell.control_plane.engines.database.backend import DatabaseEngine
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.leases import Leases
from keycell.control_plane.revocations import RevocationSet
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock
from keycell.testing.postgres import PostgresServer
from keycell.testing.processes import keycell_server

ROOT = "kc.rotation-tests-root"
CREATE = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"]


def login(pg: PostgresServer, creds: Mapping[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(user_dsn("127.0.0.1", pg.port, "postgres", creds["username"], creds["password"]))


def can_login(pg: PostgresServer, creds: Mapping[str, str]) -> bool:
    try:
        login(pg, creds).close()
        return True
    except psycopg.OperationalError:
        return False


def valid_until(pg: PostgresServer, user: str) -> datetime | None:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
    return None if row is None else row[0]


def role_exists(pg: PostgresServer, user: str) -> bool:
    with psycopg.connect(pg.dsn()) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone() is not None


class FlakyPlugin:
    """The real plugin, failing its next `failures` calls (the database unreachable)."""

    def __init__(self, inner: PostgresPlugin) -> None:
        self.inner = inner
        self.failures = 0
        self.calls = 0

    def verify(self) -> None:
        self.inner.verify()

    def execute(self, statements: Sequence[str]) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("database unreachable")
        self.inner.execute(statements)

    def terminate_sessions(self, username: str) -> None:
        self.inner.terminate_sessions(username)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def engine(
    sqlite_cell: Cell, postgres: PostgresServer
) -> Iterator[tuple[DatabaseEngine, ManualClock, list[FlakyPlugin]]]:
    clock = ManualClock()
    leases = Leases(
        sqlite_cell.barrier, RevocationSet(sqlite_cell.barrier, "local", clock=clock), clock=clock
    )
    made: list[FlakyPlugin] = []

    def factory(config: Mapping[str, Any]) -> FlakyPlugin:
        made.append(FlakyPlugin(PostgresPlugin(config)))
        return made[-1]

    db = DatabaseEngine(
        sqlite_cell.barrier, leases, clock=clock, plugins={"postgresql-database-plugin": factory}
    )
    db.write_config(
        "pg",
        {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{postgres.port}/postgres",
            "username": "postgres",
            "password": postgres.superuser_password,
            "allowed_roles": ["app"],
        },
    )
    db.write_role(
        "app", {"db_name": "pg", "creation_statements": CREATE, "default_ttl": "1h", "max_ttl": "4h"}
    )
    yield db, clock, made
    db.close()


def test_creds_make_a_user_valid_until_the_lease_expires(engine: Any, postgres: PostgresServer) -> None:
    db, _, _ = engine
    creds, lease = db.creds("app")
    assert lease.lease_id.startswith("database/creds/app/")
    assert can_login(postgres, creds)
    until = valid_until(postgres, creds["username"])
    assert until is not None and abs(until.timestamp() - lease.expire_time) < 2


def test_renewing_the_lease_extends_valid_until(engine: Any, postgres: PostgresServer) -> None:
    db, clock, _ = engine
    creds, lease = db.creds("app")
    clock.advance(600)
    renewed = db.leases.renew(lease.lease_id, 7200)
    assert renewed["lease_duration"] == 7200
    until = valid_until(postgres, creds["username"])
    assert until is not None and abs(until.timestamp() - (clock() + 7200)) < 2


def test_revoking_drops_the_user_and_ends_its_sessions(engine: Any, postgres: PostgresServer) -> None:
    db, _, _ = engine
    creds, lease = db.creds("app")
    session = login(postgres, creds)
    db.leases.revoke(lease.lease_id)
    assert not role_exists(postgres, creds["username"])
    assert not can_login(postgres, creds)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")


def test_an_expired_lease_is_dropped_by_the_tidy(engine: Any, postgres: PostgresServer) -> None:
    db, clock, _ = engine
    creds, _ = db.creds("app")
    clock.advance(3601)
    assert db.leases.tidy_expired() == {"revoked": 1, "revoker_errors": 0}
    assert not role_exists(postgres, creds["username"])


def test_failed_revocations_back_off_and_show_in_status(engine: Any, postgres: PostgresServer) -> None:
    db, clock, made = engine
    creds, lease = db.creds("app")
    flaky = made[-1]
    flaky.failures = 1
    with pytest.raises(InvalidRequest):
        db.leases.revoke(lease.lease_id)
    status = db.status()
    assert status["pending_revocations"] == 1
    failure = status["revocation_failures"][0]
    assert failure["lease_id"] == lease.lease_id and failure["attempts"] == 1
    assert failure["last_error"].startswith("ConnectionError") and creds["password"] not in str(status)
    calls = flaky.calls
    with pytest.raises(Unavailable):  # inside the backoff: the database is not even asked
        db.leases.revoke(lease.lease_id)
    assert flaky.calls == calls and role_exists(postgres, creds["username"])
    clock.advance(2)
    db.leases.revoke(lease.lease_id)
    assert not role_exists(postgres, creds["username"])
    assert db.status() == {"pending_revocations": 0, "revocation_failures": []}


def test_the_schedule_retries_failed_revocations_once_their_backoff_passes(
    engine: Any, postgres: PostgresServer
) -> None:
    db, clock, made = engine
    creds, lease = db.creds("app")
    made[-1].failures = 2
    with pytest.raises(InvalidRequest):
        db.leases.revoke(lease.lease_id)
    assert db.retry_revocations() == {"revoked": 0, "still_failing": 0}  # inside the backoff
    clock.advance(1.5)
    assert db.retry_revocations() == {"revoked": 0, "still_failing": 1}  # the database is still down
    assert db.status()["revocation_failures"][0]["attempts"] == 2
    clock.advance(2.5)
    assert db.retry_revocations() == {"revoked": 1, "still_failing": 0}
    assert not role_exists(postgres, creds["username"])
    assert db.leases.get(lease.lease_id) is None and db.status()["pending_revocations"] == 0


def test_bad_roles_and_unknown_names_are_refused_and_write_nothing(engine: Any) -> None:
    db, _, _ = engine
    with pytest.raises(InvalidRequest):
        db.write_role("bad", {"db_name": "pg"})
    with pytest.raises(InvalidRequest):
        db.write_role(
            "bad", {"db_name": "pg", "creation_statements": CREATE, "default_ttl": "5h", "max_ttl": "1h"}
        )
    with pytest.raises(NotFound):
        db.read_role("bad")
    with pytest.raises(NotFound):
        db.creds("nope")
    db.write_role("other", {"db_name": "pg", "creation_statements": CREATE})
    with pytest.raises(InvalidRequest):  # not in the connection's allowed_roles
        db.creds("other")
    with pytest.raises(InvalidRequest):
        db.write_config("x", {"plugin_name": "mysql", "connection_url": "x"})
    with pytest.raises(InvalidRequest):  # verify_connection: a wrong password is refused
        db.write_config(
            "x",
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": "postgresql://{{username}}:{{password}}@127.0.0.1:1/postgres",
                "username": "postgres",
                "password": "wrong",
            },
        )
    assert db.read_config("pg")["connection_details"] == {
        "connection_url": db.read_config("pg")["connection_details"]["connection_url"],
        "username": "postgres",
    }


# --- hvac over HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[str]:
    server = keycell_server(
        tmp_path_factory.mktemp("db-server"),
        dev_root_token=ROOT,
        workers=2,
        env={"KEYCELL_TARGET_POSTGRES": postgres.dsn()},
    )
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_hvac_generates_renews_and_revokes_database_credentials(
    server_url: str, postgres: PostgresServer
) -> None:
    client = hvac.Client(url=server_url, token=ROOT)
    client.secrets.database.configure(
        name="pg",
        plugin_name="postgresql-database-plugin",
        allowed_roles=["readonly"],
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{postgres.port}/postgres",
        username="postgres",
        password=postgres.superuser_password,
    )
    client.secrets.database.create_role(
        name="readonly", db_name="pg", creation_statements=CREATE, default_ttl="1h", max_ttl="24h"
    )
    read = client.secrets.database.read_connection("pg")["data"]
    assert postgres.superuser_password not in str(read)
    reply = client.secrets.database.generate_credentials("readonly")
    creds, lease_id = reply["data"], reply["lease_id"]
    assert lease_id.startswith("database/creds/readonly/") and reply["lease_duration"] == 3600
    with login(postgres, creds) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (creds["username"],)
    renewed = client.sys.renew_lease(lease_id=lease_id, increment=7200)
    assert renewed["lease_duration"] == 7200
    until = valid_until(postgres, creds["username"])
    assert until is not None and until.timestamp() > time.time() + 7000
    session = login(postgres, creds)
    client.sys.revoke_lease(lease_id=lease_id)
    assert not can_login(postgres, creds)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    assert client.read("database/status")["data"]["pending_revocations"] == 0
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.database.generate_credentials("nope")

"""`keycell breach`, driven as an operator drives it, against self-hosted dev cells
(`keycell server --dev`): a dry run changes nothing, a refused confirmation changes
nothing, a run revokes every token under the prefix and then rotates, a second run
resumes from the state file, `--json` reports it, bad input is refused, an unreachable
cell does not hold up the others, and a dynamic database user is dropped by its own
cell before the revocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from keycell.testing.postgres import PostgresServer
from keycell.testing.processes import ServerProcess, free_port, keycell_server

ROOT = "kc.breach-root"
PREFIX = "auth/token/create"


@pytest.fixture
def cells(tmp_path: Path) -> Iterator[dict[str, str]]:
    started: list[ServerProcess] = []
    urls: dict[str, str] = {}
    try:
        for cell in ("a", "b"):
            server = keycell_server(
                tmp_path / cell, dev_root_token=ROOT, workers=1, env={"KEYCELL_CELL": cell}
            )
            urls[cell] = f"http://127.0.0.1:{server.start()}"
            started.append(server)
        yield urls
    finally:
        for server in started:
            server.stop()


def call(
    url: str, method: str, path: str, body: dict[str, object] | None = None, token: str = ROOT
) -> requests.Response:
    return requests.request(
        method, f"{url}/v1/{path}", json=body, headers={"X-Vault-Token": token}, timeout=10
    )


def tokens(url: str, count: int) -> list[str]:
    made = [
        call(url, "POST", "auth/token/create", {"policies": ["default"], "ttl": "1h"}) for _ in range(count)
    ]
    assert all(m.status_code == 200 for m in made)
    return [m.json()["auth"]["client_token"] for m in made]


def alive(url: str, token: str) -> bool:
    return call(url, "GET", "auth/token/lookup-self", token=token).status_code == 200


def breach(
    cells: dict[str, str], *args: str, state: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "keycell", "breach", "--prefix", PREFIX, "--state-file", str(state)]
    for name, url in cells.items():
        command += ["--cell", f"{name}={url}"]
    return subprocess.run(
        [*command, *args],
        input=stdin,
        env={**os.environ, "VAULT_TOKEN": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_dry_run_finds_the_tokens_in_every_cell_and_changes_nothing(
    cells: dict[str, str], tmp_path: Path
) -> None:
    mine = {"a": tokens(cells["a"], 3), "b": tokens(cells["b"], 2)}
    state = tmp_path / "state.json"
    done = breach(cells, "--dry-run", "--json", state=state)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] is True
    assert plan["credentials"] == 5 and plan["tokens"] == 5
    assert plan["credentials_per_cell"] == {"a": 3, "b": 2}
    assert all(alive(cells[c], t) for c, ts in mine.items() for t in ts)
    assert not state.exists()


def test_refusing_the_confirmation_revokes_nothing(cells: dict[str, str], tmp_path: Path) -> None:
    mine = tokens(cells["a"], 2)
    done = breach({"a": cells["a"]}, state=tmp_path / "state.json", stdin="n\n")
    assert done.returncode == 1
    assert "Revoke 2 credentials" in done.stderr and "nothing revoked" in done.stderr
    assert all(alive(cells["a"], t) for t in mine)


def test_a_breach_revokes_every_token_then_rotates_and_reports_json(
    cells: dict[str, str], tmp_path: Path
) -> None:
    url = cells["a"]
    stolen = tokens(url, 4)
    reader = call(url, "POST", "auth/token/create-orphan", {"policies": ["default"], "ttl": "1h"})
    reader_token = reader.json()["auth"]["client_token"]  # another lease prefix: not touched
    for name in ("payments/db-1", "payments/db-2", "other/db"):
        assert call(
            url, "POST", f"rotation/secrets/{name}", {"target": "generic", "params": {}}
        ).status_code in (200, 204)
    before = {
        n: call(url, "GET", f"rotation/creds/{n}").json()["data"] for n in ("payments/db-1", "other/db")
    }

    done = breach(
        {"a": url}, "--yes", "--json", "--rotate-prefix", "payments/", state=tmp_path / "state.json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["revoked_now"] == 4 and report["failed"] == {}
    assert report["rotated_now"] == 2 and report["secrets_to_rotate"] == {"a": 2}
    assert report["exposure"]["a"]["revocations_held"] == report["exposure"]["a"]["of"] == 4
    assert not any(alive(url, t) for t in stolen)
    assert alive(url, reader_token)
    assert call(url, "GET", "rotation/creds/payments/db-1").json()["data"] != before["payments/db-1"]
    assert call(url, "GET", "rotation/creds/other/db").json()["data"] == before["other/db"]


def test_running_it_again_resumes_from_the_state_file(cells: dict[str, str], tmp_path: Path) -> None:
    url = cells["a"]
    state = tmp_path / "state.json"
    tokens(url, 3)
    first = breach({"a": url}, "--yes", "--json", state=state)
    assert first.returncode == 0, first.stderr
    run = json.loads(first.stdout)["run"]
    assert json.loads(state.read_text())["run"] == run
    late = tokens(url, 2)  # issued after the first run, e.g. by a workload the attacker still controls
    second = breach({"a": url}, "--yes", "--json", state=state)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["run"] == run
    assert report["revoked_before"] == 3 and report["revoked_now"] == 2
    assert not any(alive(url, t) for t in late)
    fresh = breach({"a": url}, "--yes", "--json", "--new-run", state=state)
    assert json.loads(fresh.stdout)["run"] != run


@pytest.mark.parametrize("prefix", ["/", "a//b", "has space"])
def test_a_bad_prefix_is_refused_before_anything_is_done(
    cells: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    command = [
        sys.executable,
        "-m",
        "keycell",
        "breach",
        "--prefix",
        prefix,
        "--cell",
        f"a={cells['a']}",
        "--yes",
    ]
    done = subprocess.run(
        command,
        env={**os.environ, "VAULT_TOKEN": ROOT},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--prefix" in done.stderr


def test_a_token_lease_names_its_accessor_and_other_leases_do_not(cells: dict[str, str]) -> None:
    made = call(cells["a"], "POST", "auth/token/create", {"policies": ["default"], "ttl": "1h"}).json()[
        "auth"
    ]
    looked = call(cells["a"], "PUT", "sys/leases/lookup", {"lease_id": made["lease_id"]}).json()["data"]
    assert looked["token_accessor"] == made["accessor"]
    assert made["client_token"] not in json.dumps(looked)  # the accessor, never the token


def test_an_unreachable_cell_is_named_and_every_other_cell_is_still_handled(
    cells: dict[str, str], tmp_path: Path
) -> None:
    stolen = tokens(cells["a"], 3)
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a cell cut off from the operator
    done = breach({"a": cells["a"], "b": gone}, "--yes", "--json", state=tmp_path / "state.json")
    assert done.returncode == 1  # incomplete, and says so
    report = json.loads(done.stdout)
    assert set(report["unreachable"]) == {"b"} and "cannot reach" in report["unreachable"]["b"]
    assert report["revoked_now"] == 3
    assert not any(alive(cells["a"], t) for t in stolen)
    assert "cell b is not reachable" in done.stderr


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


def test_a_database_user_is_dropped_by_its_own_cell_and_revoked_everywhere(
    cells: dict[str, str], tmp_path: Path, postgres: PostgresServer
) -> None:
    url = cells["b"]
    config = {
        "plugin_name": "postgresql-database-plugin",
        "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{postgres.port}/postgres",
        "username": "postgres",
        "password": postgres.superuser_password,
        "allowed_roles": ["app"],
    }
    assert call(url, "POST", "database/config/pg", config).status_code in (200, 204)
    create = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"]
    role = {"db_name": "pg", "creation_statements": create, "default_ttl": "1h"}
    assert call(url, "POST", "database/roles/app", role).status_code in (200, 204)
    made = call(url, "GET", "database/creds/app").json()
    user = made["data"]
    stolen = tokens(url, 1)
    psycopg.connect(postgres.dsn(user["username"], user["password"])).close()

    done = breach(
        cells,
        "--prefix",
        "database/creds/app",
        "--via",
        "b",
        "--yes",
        "--json",
        state=tmp_path / "state.json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["prefixes"] == [PREFIX, "database/creds/app"]
    assert report["other_leases"] == 1 and report["tokens"] == 1 and report["revoked_now"] == 2
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.dsn(user["username"], user["password"]), connect_timeout=5).close()
    assert not alive(url, stolen[0])
    lookup = call(url, "PUT", "sys/leases/lookup", {"lease_id": made["lease_id"]})
    assert lookup.status_code == 400


def test_each_revoke_call_is_timed_and_the_time_precedes_its_commit(cells: dict[str, str]) -> None:
    # What the demo's "usable N s after the revoke call" is measured from: the time each
    # call was sent, never later than the revocation's own stamp in the via cell.
    from keycell.breach import Api, Outcome, State, discover, revoke

    url = cells["a"]
    tokens(url, 3)
    api = Api(ROOT)
    plan = discover(api, {"a": url}, PREFIX)
    state, outcome = State(None, plan.prefix), Outcome()
    revoke(api, plan, state, outcome)
    assert len(outcome.called_at) == 3 and set(outcome.called_at) == set(state.data["revoked"])
    for key, rid in state.data["revoked"].items():
        record = call(url, "GET", f"sys/revocations/{rid}").json()["data"]
        assert outcome.called_at[key] <= record["revoked_at"]


def test_an_answer_that_is_not_json_names_the_call_and_not_the_body() -> None:
    # A proxy's or a crashed worker's page in place of a Vault answer: the runbook says
    # which call got it, with its status, and never echoes the body.
    import http.server
    import threading

    from keycell.breach import Api, BreachError

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            page = b"<html>Bad Gateway s3cr3t-looking</html>"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(BreachError) as raised:
            Api(ROOT, timeout=5).call(url, "GET", "sys/revocations/freshness")
    finally:
        server.shutdown()
        server.server_close()
    message = str(raised.value)
    assert message.startswith(f"GET sys/revocations/freshness at {url}: HTTP 502")
    assert "text/html" in message and "s3cr3t" not in message

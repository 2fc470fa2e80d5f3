"""Two self-hosted cells as an operator runs them: `keycell server --dev` with
KEYCELL_RELAY, and `keycell relay` (which serves the Cells service on every relay).
A secret written in cell a is read in cell b with its replica age, a write in b is
forwarded to a, and sys/cells lists both cells."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from keycell.testing.processes import ServerProcess, free_port, keycell_server

ROOT = "kc.cells-process-root"


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folders = {c: tmp_path_factory.mktemp(f"cells-{c}") for c in "ab"}
    ports = {c: free_port() for c in "ab"}
    started: list[ServerProcess] = []
    urls = {}
    try:
        for c in "ab":
            env = {"KEYCELL_CELL": c, "KEYCELL_RELAY": f"127.0.0.1:{ports[c]}"}
            server = keycell_server(folders[c], dev_root_token=ROOT, workers=1, env=env)
            urls[c] = f"http://127.0.0.1:{server.start()}"
            started.append(server)
        for c in "ab":
            args = [
                "relay",
                "--cell",
                c,
                "--dev-data-dir",
                str(folders[c]),
                "--listen",
                f"127.0.0.1:{ports[c]}",
            ]
            args += ["--profile", "local"] + (["--join", f"127.0.0.1:{ports['a']}"] if c == "b" else [])
            relay = ServerProcess(
                "keycell", args, what=f"keycell relay ({c})", env={"KEYCELL_API_ADDR": urls[c]}
            )
            relay.start()
            started.append(relay)
        yield urls
    finally:
        for process in reversed(started):
            process.stop()


def until(condition, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def call(method: str, url: str, path: str, **kwargs) -> requests.Response:  # type: ignore[no-untyped-def]
    headers = {"X-Vault-Token": ROOT, **kwargs.pop("headers", {})}
    return requests.request(method, f"{url}/v1/{path}", headers=headers, timeout=10, **kwargs)


def test_two_processes_cells_replicate_forward_and_list_each_other(cells: dict[str, str]) -> None:
    def directory_done() -> bool:
        reply = call("GET", cells["b"], "sys/cells")
        return reply.status_code == 200 and set(reply.json()["data"]["cells"]) == {"a", "b"}

    assert until(directory_done)
    listed = call("GET", cells["b"], "sys/cells").json()["data"]["cells"]
    assert listed["a"]["api"] == cells["a"] and listed["a"]["fingerprint"].startswith("sha256:")

    written = call("POST", cells["a"], "secret/data/app/db", json={"data": {"password": "p1"}})
    assert written.status_code == 200, written.text

    def replicated() -> requests.Response | None:
        reply = call("GET", cells["b"], "secret/data/app/db")
        return reply if reply.status_code == 200 else None

    reply = until(replicated)
    assert reply is not None and reply.json()["data"]["data"] == {"password": "p1"}
    assert reply.headers["X-Keycell-Home-Cell"] == "a"
    assert float(reply.headers["X-Keycell-Replica-Age"]) >= 0

    forwarded = call("POST", cells["b"], "secret/data/app/db", json={"data": {"password": "p2"}})
    assert forwarded.status_code == 200, forwarded.text
    assert forwarded.json()["data"]["version"] == 2
    at_home = call("GET", cells["a"], "secret/data/app/db")
    assert at_home.json()["data"]["data"] == {"password": "p2"}
    assert at_home.headers["X-Keycell-Replica-Age"] == "0.000"
    fresh = call("GET", cells["b"], "secret/data/app/db", headers={"X-Keycell-Max-Staleness": "0"})
    assert fresh.status_code == 200 and fresh.json()["data"]["data"] == {"password": "p2"}

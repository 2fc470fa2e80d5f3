"""Two self-hosted cells (`keycell server --dev`), each with its relay process
(`keycell relay`, two relays in one process): a revocation accepted by cell a's API
is committed there, gossiped, applied to cell b's ledger and pushed to cell b's API
process, whose revocation stream tells its subscribers; sys/revocations/:id in cell a
then shows both cells and the exposure window."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from keycell.client import Client, RevocationSubscription
from keycell.testing.processes import ServerProcess, free_port, keycell_server

ROOT = "kc.relay-root"


def relay_process(folder: Path, cell: str, port: int, join: str = "") -> ServerProcess:
    args = ["relay", "--cell", cell, "--dev-data-dir", str(folder), "--listen", f"127.0.0.1:{port}"]
    args += ["--profile", "local", "--count", "2"] + (["--join", join] if join else [])
    return ServerProcess("keycell", args, what=f"keycell relay ({cell})")


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folders = {c: tmp_path_factory.mktemp(f"relay-cell-{c}") for c in "ab"}
    ports = {c: free_port() for c in "ab"}
    started: list[ServerProcess] = []
    urls = {}
    try:
        for c in "ab":
            env = {"KEYCELL_CELL": c, "KEYCELL_RELAY": f"127.0.0.1:{ports[c]}"}
            server = keycell_server(folders[c], dev_root_token=ROOT, workers=1, env=env)
            urls[c] = f"http://127.0.0.1:{server.start()}"
            started.append(server)
        relay_a = relay_process(folders["a"], "a", ports["a"])
        relay_a.start()
        started.append(relay_a)
        relay_b = relay_process(folders["b"], "b", ports["b"], join=f"127.0.0.1:{ports['a']}")
        relay_b.start()
        started.append(relay_b)
        yield urls
    finally:
        for process in reversed(started):
            process.stop()


def post(url: str, path: str, body: dict[str, object]) -> requests.Response:
    return requests.post(f"{url}/v1/{path}", json=body, headers={"X-Vault-Token": ROOT}, timeout=10)


def until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_a_revocation_in_one_cell_is_refused_and_streamed_in_the_other(cells: dict[str, str]) -> None:
    created = post(cells["b"], "auth/token/create", {"policies": ["default"], "ttl": "1h"}).json()["auth"]
    accessor, victim = created["accessor"], created["client_token"]
    watcher = RevocationSubscription(Client(cells["b"], token=ROOT)).start()
    assert watcher.ready.wait(10)
    reply = post(cells["a"], "sys/revocations", {"accessor": accessor, "reason": "breach drill"})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert data["id"].startswith("rv_") and data["subject"] == f"token:{accessor}"
    assert data["relay"] == "handed-over"
    assert until(lambda: f"token:{accessor}" in watcher.heard)
    lookup = requests.get(
        f"{cells['b']}/v1/auth/token/lookup-self", headers={"X-Vault-Token": victim}, timeout=5
    )
    assert lookup.status_code == 403
    watcher.stop()

    def both_cells() -> dict[str, object] | None:
        got = requests.get(
            f"{cells['a']}/v1/sys/revocations/{data['id']}", headers={"X-Vault-Token": ROOT}, timeout=5
        )
        body = got.json().get("data") if got.status_code == 200 else None
        return body if body and set(body["cells"]) == {"a", "b"} else None

    assert until(lambda: both_cells() is not None)
    shown = both_cells()
    assert shown is not None and shown["subject"] == f"token:{accessor}" and shown["origin_cell"] == "a"
    assert shown["exposure_window_seconds"] == max(c["exposure_seconds"] for c in shown["cells"].values())  # type: ignore[union-attr]


def test_keycell_revoke_prints_the_revocation_and_the_other_cell_shows_it(cells: dict[str, str]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "keycell",
            "revoke",
            "--prefix",
            "database/creds/app",
            "--address",
            cells["b"],
        ],
        env={"VAULT_TOKEN": ROOT, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["subject"] == "lease-prefix:database/creds/app/"

    def in_a() -> bool:
        got = requests.get(
            f"{cells['a']}/v1/sys/revocations/{data['id']}", headers={"X-Vault-Token": ROOT}, timeout=5
        )
        return got.status_code == 200 and "a" in got.json()["data"]["cells"]

    assert until(in_a)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"accessor": "x", "lease_id": "y"},
        {"accessor": "has space"},
        {"accessor": ["list"]},
        {"spiffe_id": "https://not-spiffe"},
        {"svid": "not.a-jwt"},
        {"token": "kc.not-a-token"},
        {"prefix": "/"},
    ],
)
def test_bad_revocations_are_refused_with_400_and_a_reason(
    cells: dict[str, str], body: dict[str, object]
) -> None:
    reply = post(cells["a"], "sys/revocations", body)
    assert reply.status_code == 400
    assert reply.json()["errors"]


def test_an_unknown_revocation_id_is_404(cells: dict[str, str]) -> None:
    for rid in ("rv_" + "0" * 24, "nonsense"):
        got = requests.get(
            f"{cells['a']}/v1/sys/revocations/{rid}", headers={"X-Vault-Token": ROOT}, timeout=5
        )
        assert got.status_code == 404

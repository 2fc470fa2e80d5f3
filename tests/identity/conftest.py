"""Workload identity over real processes: a `keycell server --dev` and a `keycell agent`
attested with a join token, serving the Workload API on a unix socket in a temp folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.client import Client
from keycell.testing.cells import Cell, open_cell
from keycell.testing.processes import ServerProcess, keycell_server

ROOT = "kc.identity-root-token"
TRUST_DOMAIN = "example.org"
WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/workload/tests"
# Short enough that a rotation (at half-life, +/- 10%) happens within a test.
X509_TTL = 6


@dataclass
class Deployment:
    url: str
    admin: Client
    socket: str  # unix:///PATH
    agent_id: str
    entry_id: str
    agent: ServerProcess


def this_process_selectors() -> list[str]:
    return [f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(sys.executable)}"]


def start_agent(url: str, socket: str, token: str) -> ServerProcess:
    agent = ServerProcess(
        "keycell",
        ["agent", "--socket", socket, "--address", url, "--join-token", token, "--sync-interval", "0.3"],
        what="keycell agent",
    )
    agent.start()
    return agent


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("identity")
    server = keycell_server(folder / "cell", dev_root_token=ROOT, workers=1)
    port = server.start()
    url = f"http://127.0.0.1:{port}"
    admin = Client(url, token=ROOT)
    try:
        joined = admin.request("POST", "identity/join-token", {"ttl": 120})["data"]
        entry = admin.request(
            "POST",
            "identity/entries",
            {
                "spiffe_id": WORKLOAD_ID,
                "parent_id": joined["agent_id"],
                "selectors": this_process_selectors(),
                "x509_svid_ttl": X509_TTL,
                "jwt_svid_ttl": 300,
            },
        )["data"]
        socket = f"unix://{Path(folder) / 'agent.sock'}"
        agent = start_agent(url, socket, joined["token"])
        try:
            yield Deployment(url, admin, socket, joined["agent_id"], entry["id"], agent)
        finally:
            agent.stop()
    finally:
        admin.close()
        server.stop()


@pytest.fixture
def adapter() -> str:
    """The identity tests exercise signing and validation, not the ledger: sqlite only
    (the ledger conformance suite covers every adapter)."""
    return "sqlite"


@pytest.fixture
def other_cell(tmp_path: Path) -> Iterator[Cell]:
    """A second, unrelated cell (another trust domain's or a stranger's keys)."""
    ledger = SqliteLedger(tmp_path / "other.db")
    yield open_cell(ledger)
    ledger.close()

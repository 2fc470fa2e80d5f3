"""The revocation function on its Lambda path (the Chalice app in functions/api,
configured from the environment): commit in the cell's ledger, hand over to the
cell's relay over gRPC; when the relay cannot be reached, the revocation still
stands and the relay's ledger sweep spreads it. Relays run on an event loop in a
background thread, over real gRPC."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client

from keycell.functions.api import app as api
from keycell.relay.cell import LedgerSink
from keycell.relay.cluster import Cluster, dev_cell_env, open_dev_cell
from keycell.relay.profiles import LOCAL
from keycell.testing.processes import free_port


class Loop:
    """An asyncio loop on a thread, for relays next to synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


def lambda_client(folder: Path, relay: str, monkeypatch: pytest.MonkeyPatch) -> Client:
    for name, value in dev_cell_env(str(folder), "a").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KEYCELL_RELAY", relay)
    api.configure(None)
    return Client(api.app)


def call(client: Client, method: str, path: str, token: str, body: object = None) -> tuple[int, Any]:
    headers = {"content-type": "application/json", "X-Vault-Token": token}
    response = client.http.request(
        method, f"/v1/{path}", headers=headers, body=json.dumps(body) if body else b""
    )
    return response.status_code, json.loads(response.body)


def test_the_revocation_function_commits_then_hands_over_to_the_relay(
    tmp_path: Path, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = open_dev_cell(str(tmp_path), "a")
    root, _ = services.tokens.create_root()
    cluster = Cluster(sinks={"a": LedgerSink(services)})
    relay = loop.run(cluster.add("a-0", "a"))
    try:
        client = lambda_client(tmp_path, relay.addr, monkeypatch)
        status, body = call(client, "POST", "sys/revocations", root, {"spiffe_id": "spiffe://example.org/ci"})
        assert status == 200, body
        data = body["data"]
        assert data["relay"] == "handed-over" and data["subject"] == "spiffe:spiffe://example.org/ci"
        assert data["id"] in relay.revocation_ids()
        status, shown = call(client, "GET", f"sys/revocations/{data['id']}", root)
        assert status == 200 and set(shown["data"]["cells"]) == {"a"}
        # One SVID (a JWT-SVID by its jti), the same path: committed, handed over.
        claims = base64.urlsafe_b64encode(b'{"sub":"spiffe://example.org/ci","jti":"ab12"}').rstrip(b"=")
        status, body = call(client, "POST", "sys/revocations", root, {"svid": f"e30.{claims.decode()}.c2ln"})
        assert status == 200 and body["data"]["subject"] == "svid:ab12", body
        assert body["data"]["id"] in relay.revocation_ids()
        assert services.revocations.is_revoked("svid:ab12")
    finally:
        loop.run(cluster.stop())
        api.configure(None)


def test_a_revocation_the_relay_missed_is_spread_by_its_ledger_sweep(
    tmp_path: Path, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    services = open_dev_cell(str(tmp_path / "a"), "a")
    other = open_dev_cell(str(tmp_path / "b"), "b")
    root, _ = services.tokens.create_root()
    sinks = {"a": LedgerSink(services), "b": LedgerSink(other)}
    cluster = Cluster(profile=LOCAL.with_(sync_interval=0.3), sinks=sinks)
    try:
        relay_a = loop.run(cluster.add("a-0", "a"))
        relay_b = loop.run(cluster.add("b-0", "b", seeds=[relay_a.addr]))
        client = lambda_client(tmp_path / "a", f"127.0.0.1:{free_port()}", monkeypatch)  # no relay there
        status, body = call(client, "POST", "sys/revocations", root, {"lease_id": "database/creds/app/x1"})
        assert status == 200 and body["data"]["relay"] == "unreachable"
        assert services.revocations.is_revoked("lease:database/creds/app/x1")  # committed here regardless
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and body["data"]["id"] not in relay_b.applied:
            time.sleep(0.05)
        assert body["data"]["id"] in relay_b.applied
        assert relay_a.counters["swept"] == 1
        assert "lease:database/creds/app/x1" in sinks["b"].subjects()
    finally:
        loop.run(cluster.stop())
        api.configure(None)

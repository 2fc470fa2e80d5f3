"""Rotation at scale: generic secrets rotated per second on the sqlite ledger, and the
breach scenario on a real PostgreSQL: many roles rotated (alternating users) through a
self-hosted cell's API while client threads keep connecting with whatever the API says
is CURRENT. Failed client
logins must be 0; revoked credentials must stop working at once.

    python -m bench.rotation [--secrets 10000] [--roles 1000] [--clients 32]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import urllib3

from bench.common import machine
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.adapters.targets.generic import GenericTarget
from keycell.adapters.targets.postgres import user_dsn
from keycell.control_plane.envelope import Envelopes
from keycell.control_plane.keys import KeySpec
from keycell.control_plane.rotation import LedgerVersionStore, Rotator
from keycell.testing.cells import open_cell
from keycell.testing.postgres import PostgresServer
from keycell.testing.processes import keycell_server

ROOT = "kc.bench-rotation-root"


def open_store(folder: Path) -> tuple[LedgerVersionStore, SqliteLedger]:
    ledger = SqliteLedger(folder / "cell.db")
    cell = open_cell(ledger)
    backend = SoftwareKeyBackend()
    backend.create_key("cell-kek", KeySpec.AES_256)
    return LedgerVersionStore(cell.barrier, Envelopes("bench", backend, "cell-kek")), ledger


def generic(count: int, max_seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        store, ledger = open_store(Path(folder))
        rotator = Rotator(store, {"generic": GenericTarget()})
        enrol_deadline = time.perf_counter() + max_seconds
        enrolled = 0
        for i in range(count):
            rotator.enroll(store, f"bulk/{i:06d}", target="generic", params={})
            enrolled += 1
            if time.perf_counter() > enrol_deadline:
                break
        count = enrolled
        started = time.perf_counter()
        deadline = started + max_seconds
        done = 0
        for i in range(count):
            rotator.rotate(f"bulk/{i:06d}", f"bench-{i}")
            done += 1
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - started
        ones = sum(1 for s in store.states("bulk/") if s.rotations == 1)
        ledger.close()
    return {
        "secrets": count,
        "rotated": done,
        "rotated_per_s": round(done / elapsed, 1),
        "exactly_once": ones == done,
    }


def login(value: dict[str, Any]) -> None:
    dsn = user_dsn(value["host"], value["port"], value["dbname"], value["username"], value["password"])
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")


class Api:
    """Vault-style JSON calls to the cell, one keep-alive pool shared by every thread."""

    def __init__(self, url: str, token: str, size: int) -> None:
        self.url = url
        self.pool = urllib3.PoolManager(maxsize=size, headers={"X-Vault-Token": token})

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.pool.request(method, f"{self.url}/v1/{path}", json=body, timeout=120, retries=False)
        if reply.status >= 400:
            raise RuntimeError(f"{method} {path}: {reply.status} {reply.data[:200]!r}")
        return json.loads(reply.data) if reply.data else {}


def breach(
    pg: PostgresServer, roles: int, clients: int, rotators: int, max_seconds: float, folder: Path
) -> dict[str, Any]:
    """A self-hosted cell (`keycell server`, two workers) manages `roles` PostgreSQL roles.
    Every role is rotated once over the API (`rotators` requests in flight) while
    `clients` threads keep asking the API for a random role's CURRENT credentials and
    logging in with them. Then PREVIOUS is revoked on a sample: those logins must fail
    at once, and CURRENT must keep working."""
    server = keycell_server(folder, dev_root_token=ROOT, workers=2, env={"KEYCELL_TARGET_POSTGRES": pg.dsn()})
    port = server.start()
    api = Api(f"http://127.0.0.1:{port}", ROOT, clients + rotators + 4)
    try:
        tag = f"b{random.randrange(16**6):06x}"
        names = [f"{tag}_{i:05d}" for i in range(roles)]
        with ThreadPoolExecutor(max_workers=rotators) as pool:
            list(
                pool.map(
                    lambda n: api.call(
                        "POST", f"rotation/secrets/{n}", {"target": "postgres", "params": {"username": n}}
                    ),
                    names,
                )
            )
        stop = threading.Event()
        counts = {"logins": 0, "failed_auths": 0, "other_errors": 0}
        lock = threading.Lock()

        def client() -> None:
            rng = random.Random()
            while not stop.is_set():
                value = api.call("GET", f"rotation/creds/{rng.choice(names)}")["data"]
                try:
                    login(value)
                    outcome = "logins"
                except psycopg.OperationalError as exc:
                    outcome = (
                        "failed_auths" if "password authentication failed" in str(exc) else "other_errors"
                    )
                with lock:
                    counts[outcome] += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # clients running before the first rotation
        started = time.perf_counter()
        deadline = started + max_seconds
        rotated = 0
        with ThreadPoolExecutor(max_workers=rotators) as pool:
            futures = [pool.submit(api.call, "POST", f"rotation/rotate/{n}", {}) for n in names]
            for future in futures:
                if time.perf_counter() > deadline:
                    future.cancel()
                    continue
                future.result()
                rotated += 1
        elapsed = time.perf_counter() - started
        time.sleep(0.5)  # clients keep going after the last rotation
        stop.set()
        for t in threads:
            t.join(timeout=60)
        sample = names[: min(20, rotated)]
        revoked_still_working = current_broken = 0
        for name in sample:
            previous = api.call("GET", f"rotation/creds/{name}?stage=PREVIOUS")["data"]
            api.call("POST", f"rotation/revoke/{name}", {"stage": "PREVIOUS"})
            try:
                login(previous)
                revoked_still_working += 1
            except psycopg.OperationalError:
                pass
            try:
                login(api.call("GET", f"rotation/creds/{name}")["data"])
            except psycopg.OperationalError:
                current_broken += 1
        rotations = sum(
            api.call("GET", f"rotation/secrets/{n}")["data"]["rotations"] for n in names[:rotated]
        )
    finally:
        server.stop()
    return {
        "roles": roles,
        "rotated": rotated,
        "exactly_once": rotations == rotated,
        "roles_rotated_per_s": round(rotated / elapsed, 1),
        "client_threads": clients,
        "rotations_in_flight": rotators,
        "client_logins": counts["logins"],
        "failed_client_auths": counts["failed_auths"],
        "other_client_errors": counts["other_errors"],
        "revoked_sampled": len(sample),
        "revoked_still_working": revoked_still_working,
        "current_broken_by_revocation": current_broken,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=10_000)
    parser.add_argument("--roles", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rotators", type=int, default=4, help="rotation requests in flight")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine()}
    report["generic_sqlite"] = generic(args.secrets, args.max_seconds)
    with (
        PostgresServer(max_connections=max(100, args.clients * 2 + 20)) as pg,
        tempfile.TemporaryDirectory() as folder,
    ):
        report["postgres_breach"] = breach(
            pg, args.roles, args.clients, args.rotators, args.max_seconds, Path(folder)
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

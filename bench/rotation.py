"""Rotation at scale: generic secrets rotated per second on the sqlite ledger, and the
breach scenario on a real PostgreSQL: many roles rotated (alternating users) while
client threads keep connecting with whatever the store says is CURRENT. Failed client
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
from pathlib import Path
from typing import Any

import psycopg

from bench.common import machine
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.adapters.targets.generic import GenericTarget
from keycell.adapters.targets.postgres import PostgresTarget, user_dsn
from keycell.control_plane.envelope import Envelopes
from keycell.control_plane.keys import KeySpec
from keycell.control_plane.rotation import LedgerVersionStore, Rotator, Stage
from keycell.testing.cells import open_cell
from keycell.testing.postgres import PostgresServer


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
        for i in range(count):
            rotator.enroll(store, f"bulk/{i:06d}", target="generic", params={})
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
    with psycopg.connect(
        user_dsn(value["host"], value["port"], value["dbname"], value["username"], value["password"])
    ) as conn:
        conn.execute("SELECT 1")


def breach(pg: PostgresServer, roles: int, clients: int, max_seconds: float, folder: Path) -> dict[str, Any]:
    """Enrol `roles` PostgreSQL roles, then rotate every one of them once while `clients`
    threads keep reading the CURRENT value of a random role from the store and logging
    in with it. Then revoke PREVIOUS on a sample and check those logins fail at once."""
    store, ledger = open_store(folder)
    target = PostgresTarget(pg.dsn(), pool_size=4)
    rotator = Rotator(store, {"postgres": target})
    tag = f"b{random.randrange(16**6):06x}"
    names = [f"{tag}_{i:05d}" for i in range(roles)]
    for name in names:
        rotator.enroll(store, name, target="postgres", params={"username": name})
    stop = threading.Event()
    counts = {"logins": 0, "failed_auths": 0, "other_errors": 0}
    lock = threading.Lock()

    def client() -> None:
        rng = random.Random()
        while not stop.is_set():
            name = rng.choice(names)
            state = store.state(name)
            value = store.value(name, state.current or "")
            try:
                login(value)
                outcome = "logins"
            except psycopg.OperationalError as exc:
                outcome = "failed_auths" if "password authentication failed" in str(exc) else "other_errors"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    deadline = started + max_seconds
    rotated = 0
    for name in names:
        rotator.rotate(name)
        rotated += 1
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(timeout=30)
    # Revocation: PREVIOUS of a sample stops working immediately; CURRENT still works.
    sample = names[: min(20, rotated)]
    revoked_still_working = current_broken = 0
    for name in sample:
        state = store.state(name)
        previous = store.value(name, state.previous or "")
        rotator.revoke(name, Stage.PREVIOUS)
        try:
            login(previous)
            revoked_still_working += 1
        except psycopg.OperationalError:
            pass
        try:
            login(store.value(name, state.current or ""))
        except psycopg.OperationalError:
            current_broken += 1
    target.close()
    ledger.close()
    return {
        "roles": roles,
        "rotated": rotated,
        "roles_rotated_per_s": round(rotated / elapsed, 1),
        "client_threads": clients,
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
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine()}
    report["generic_sqlite"] = generic(args.secrets, args.max_seconds)
    with (
        PostgresServer(max_connections=max(100, args.clients * 2 + 20)) as pg,
        tempfile.TemporaryDirectory() as folder,
    ):
        report["postgres_breach"] = breach(pg, args.roles, args.clients, args.max_seconds, Path(folder))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

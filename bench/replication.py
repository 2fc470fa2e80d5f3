"""Replication between cells: how far behind a replica runs, and how long cells take
to agree again after a partition heals.

    python -m bench.replication [--writes 300] [--interval 0.01] [--rounds 3] [--secrets 30]
        [--digest-secrets 100,1000,5000] [--digest-changed 3] [--digest-reps 3]

Three dev cells in one process (keycell/cells/mesh.py): each a relay with its cell
agent on its own loopback gRPC port, and an API router on its own services over the
cell's SQLite ledger. Every call between cells crosses a real gRPC socket.

Replica lag: secrets homed in cell a are written through a's API (paced by
`--interval`, so the figure is latency, not a queue). For each write, the lag in cell
b or c is the time from a's API acknowledging the write to that cell's agent having
installed the new version in its ledger (sealed data key opened, re-wrapped under its
own KEK, metadata swapped in).

Convergence after a partition: cell c is cut off (the relays' fault injection), both
sides write (a to its secrets, c to its own) and revoke tokens for `--partition`
seconds, the partition heals, and the time until every cell holds every home's latest
version and the same revocation set is measured (polled every 10 ms). Reads in c while
cut off are counted: every one must be served.

Anti-entropy bytes: for each N in `--digest-secrets`, a fresh mesh whose digests run
only when the bench runs a round; N secrets homed in a, replicated. One round of a's
digest to b and c is run in each mode, alternating (`--digest-reps` times each, the
median kept): "full" (every entry listed, as before) and "buckets" (256 bucket hashes,
then the entries of the differing buckets; a full listing when that is smaller, i.e.
for a few dozen secrets): once with every replica in sync, and once
after c missed `--digest-changed` updates (cut off while a wrote them). The figure is
the protobuf bytes of the digest exchange (requests and replies, both cells; gRPC and
HTTP/2 framing not counted); the pushes that then repair c are the same in both modes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import interleaved, machine
from keycell.cells.agent import CellTiming
from keycell.cells.mesh import Mesh
from keycell.control_plane.ledger import Kind, iter_prefix

CELLS = ("a", "b", "c")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"samples": 0}
    return {
        "samples": len(values),
        "p50": round(percentile(values, 0.5) * 1000, 2),
        "p99": round(percentile(values, 0.99) * 1000, 2),
        "max": round(max(values) * 1000, 2),
        "mean": round(statistics.fmean(values) * 1000, 2),
    }


def replica_lag(mesh: Mesh, writes: int, secrets: int, interval: float) -> dict[str, Any]:
    installed: dict[tuple[str, str, int], float] = {}
    lock = threading.Lock()
    for cell in ("b", "c"):
        for agent in mesh.agents[cell]:

            def observe(path: str, meta_seq: int, cell: str = cell) -> None:
                with lock:
                    installed.setdefault((cell, path, meta_seq), time.time())

            agent.observers.append(observe)
    names = [f"lag/s{i}" for i in range(secrets)]
    for name in names:
        assert mesh.write("a", name, {"v": "0"}).status == 200
    meta = mesh.api_services["a"].barrier
    acked: list[tuple[str, int, float]] = []
    for i in range(writes):
        name = names[i % secrets]
        reply = mesh.write("a", name, {"v": str(i)})
        done = time.time()
        if reply.status != 200:
            raise RuntimeError(f"write failed: {reply.status} {reply.body}")
        item = meta.get(_meta_key(name))
        assert item is not None
        acked.append((f"secret/{name}", item.version, done))
        time.sleep(interval)
    deadline = time.monotonic() + 30
    lags: dict[str, list[float]] = {"b": [], "c": []}
    while time.monotonic() < deadline:
        with lock:
            ready = all((c, p, s) in installed for c in ("b", "c") for p, s, _ in acked)
        if ready:
            break
        time.sleep(0.05)
    missing = 0
    for cell in ("b", "c"):
        for path, seq, done in acked:
            at = installed.get((cell, path, seq))
            if at is None:
                missing += 1  # superseded before it was pushed, or repaired by a digest
            else:
                lags[cell].append(max(0.0, at - done))
    return {
        "writes": writes,
        "interval_s": interval,
        "all_cells_ms": summary_ms(lags["b"] + lags["c"]),
        "by_cell_ms": {cell: summary_ms(v) for cell, v in lags.items()},
        "versions_not_seen_by_push": missing,
    }


def _meta_key(name: str) -> Any:
    from keycell.control_plane.ledger import Key

    return Key(Kind.SECRET_META, f"secret/{name}")


def converge_after_heal(mesh: Mesh, round_: int, partition_s: float, writes: int) -> dict[str, Any]:
    for cell in CELLS:
        for i in range(3):
            assert mesh.write(cell, f"heal{round_}/{cell}{i}", {"v": "0"}).status == 200
    tokens = {}
    for cell in CELLS:
        reply = mesh.request(cell, "POST", "auth/token/create", {"policies": ["default"], "ttl": "1h"})
        tokens[cell] = reply.body["auth"]["accessor"]  # type: ignore[index]
    expected = {f"secret/heal{round_}/{c}{i}" for c in CELLS for i in range(3)}
    assert mesh.wait_for(lambda: all(_holds(mesh, cell, expected) for cell in CELLS), 15)
    mesh.partition("c")
    started = time.monotonic()
    reads = served = 0
    i = 0
    while time.monotonic() - started < partition_s:
        for home in ("a", "c"):
            if i < writes:
                reply = mesh.write(home, f"heal{round_}/{home}{i % 3}", {"v": str(i + 1)})
                assert reply.status == 200, reply.body
        i += 1
        reply = mesh.read("c", f"heal{round_}/a{i % 3}")
        reads += 1
        served += reply.status == 200
        time.sleep(0.01)
    for cell, target in (("a", "b"), ("c", "a")):
        reply = mesh.request(cell, "POST", "sys/revocations", {"accessor": tokens[target], "reason": "bench"})
        assert reply.status == 200
    wanted = {f"token:{tokens['b']}", f"token:{tokens['a']}"}
    homes = {cell: _versions(mesh, cell, f"heal{round_}/{cell}") for cell in ("a", "c")}
    healed = time.monotonic()
    mesh.heal()

    def converged() -> bool:
        for cell in CELLS:
            for home, versions in homes.items():
                if _versions(mesh, cell, f"heal{round_}/{home}") != versions:
                    return False
            if not wanted <= _revoked(mesh, cell):
                return False
        return True

    ok = mesh.wait_for(converged, 60, step=0.01)
    return {
        "converge_s": round(time.monotonic() - healed, 3) if ok else None,
        "writes_during_partition": 2 * min(i, writes),
        "reads_in_cut_off_cell": reads,
        "reads_served": served,
    }


def digest_bytes(folder: Path, secrets: int, changed: int, reps: int) -> dict[str, Any]:
    timing = CellTiming(digest_interval=1e6, directory_interval=0.5, call_timeout=5.0, handover_grace=0.5)
    mesh = Mesh(folder, timing=timing).start()
    try:
        if not mesh.wait_for(mesh.directory_complete, 30):
            raise RuntimeError("the cell directory did not converge")
        names = [f"ae/s{i}" for i in range(secrets)]
        started = time.monotonic()
        for name in names:
            assert mesh.write("a", name, {"v": "0"}).status == 200
        write_s = time.monotonic() - started
        every = {f"secret/{n}" for n in names}
        if not mesh.wait_for(lambda: all(_holds(mesh, c, every, "secret/ae/") for c in CELLS), 60):
            raise RuntimeError("the secrets did not reach every cell")
        agent = mesh.agents["a"][0]
        version = [0]

        def one_round() -> int:
            before = agent.counters.get("digest_bytes", 0)
            mesh.run(agent.digest_round(), timeout=120)
            return agent.counters.get("digest_bytes", 0) - before

        def measure(mode: str) -> dict[str, float]:
            agent.digest_mode = mode
            in_sync = one_round()
            version[0] += 1
            missed = [names[(version[0] * 7 + i) % secrets] for i in range(min(changed, secrets))]
            value = {"v": str(version[0])}
            mesh.partition("c")
            for name in missed:
                assert mesh.write("a", name, value).status == 200
            # b has them: the pushes (to b and c at once) are over, c's were dropped
            mesh.wait_for(lambda: all(mesh.value_in("b", n) == value for n in missed), 10)
            mesh.heal()
            behind = one_round()
            if not all(mesh.value_in("c", n) == value for n in missed):
                raise RuntimeError(f"the {mode} digest round did not repair cell c")
            return {"in_sync_bytes": float(in_sync), "changed_bytes": float(behind)}

        figures = interleaved({"full": lambda: measure("full"), "buckets": lambda: measure("buckets")}, reps)
    finally:
        mesh.stop()
    full, buckets = figures["full"], figures["buckets"]
    return {
        "secrets": secrets,
        "missed_by_c": min(changed, secrets),
        "full_listing": full,
        "bucketed": buckets,
        "in_sync_ratio": round(buckets["in_sync_bytes"] / full["in_sync_bytes"], 4),
        "changed_ratio": round(buckets["changed_bytes"] / full["changed_bytes"], 4),
        "setup_writes_per_s": round(secrets / write_s, 1),
    }


def _holds(mesh: Mesh, cell: str, paths: set[str], prefix: str = "secret/heal") -> bool:
    barrier = mesh.api_services[cell].barrier
    return paths <= {item.key.path for item in iter_prefix(barrier, Kind.SECRET_META, prefix)}


def _versions(mesh: Mesh, cell: str, prefix: str) -> dict[str, int]:
    barrier = mesh.api_services[cell].barrier
    out = {}
    for item in iter_prefix(barrier, Kind.SECRET_META, f"secret/{prefix}"):
        out[item.key.path] = json.loads(item.value)["current_version"]
    return out


def _revoked(mesh: Mesh, cell: str) -> set[str]:
    barrier = mesh.api_services[cell].barrier
    return {item.key.path for item in iter_prefix(barrier, Kind.REVOCATION, page_size=500)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--secrets", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partition", type=float, default=2.0, help="seconds cell c stays cut off")
    parser.add_argument("--partition-writes", type=int, default=50)
    parser.add_argument(
        "--digest-secrets", default="100,1000,5000", help="secret counts N for the anti-entropy bytes"
    )
    parser.add_argument("--digest-changed", type=int, default=3, help="updates cell c misses")
    parser.add_argument("--digest-reps", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.digest_secrets.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="keycell-bench-replication-") as folder:
        mesh = Mesh(Path(folder)).start()
        try:
            if not mesh.wait_for(mesh.directory_complete, 30):
                raise RuntimeError("the cell directory did not converge")
            lag = replica_lag(mesh, args.writes, args.secrets, args.interval)
            rounds = [
                converge_after_heal(mesh, r, args.partition, args.partition_writes)
                for r in range(args.rounds)
            ]
        finally:
            mesh.stop()
        digests = [
            digest_bytes(Path(folder) / f"digest-{n}", n, args.digest_changed, args.digest_reps)
            for n in sizes
        ]
    times = [r["converge_s"] for r in rounds if r["converge_s"] is not None]
    report = {
        "benchmark": "replication",
        "machine": machine(),
        "setup": {
            "cells": len(CELLS),
            "relays_per_cell": 1,
            "profile": "local (digest every 0.2 s, directory every 0.5 s)",
            "digest": "256 buckets (blake2b-64 XOR per bucket), then the differing buckets' entries",
            "transport": "gRPC over loopback, one process",
        },
        "replica_lag": lag,
        "partition": {
            "seconds_cut_off": args.partition,
            "rounds": rounds,
            "converge_after_heal_s": {
                "median": round(statistics.median(times), 3) if times else None,
                "max": max(times) if times else None,
                "converged_rounds": len(times),
                "of": len(rounds),
            },
            "reads_in_cut_off_cell_served_pct": round(
                100.0
                * sum(r["reads_served"] for r in rounds)
                / max(1, sum(r["reads_in_cut_off_cell"] for r in rounds)),
                2,
            ),
        },
    }
    report["anti_entropy_bytes_per_round"] = digests
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

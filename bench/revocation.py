"""Revocation fan-out: how long a revoked credential stays usable somewhere.

    python -m bench.revocation [--quick] [--relays-per-cell 10] [--processes-per-cell 1]
                               [--revocations 200] [--loss 0.05] [--profile lan]

    python -m bench.revocation --relays-per-cell 30
    python -m bench.revocation --relays-per-cell 100 --processes-per-cell 2 --interval 0.5

Real relay processes (`keycell relay --profile lan --loss L`) on loopback, 3 cells,
each cell a dev cell (SQLite ledger behind its barrier). Several relays share one
process's event loop (`--count`), each with its own gRPC server and port: every
message between relays crosses a real gRPC stream over a real socket, and the fault
layer drops `--loss` of all of them (probes, pushes, gossip, anti-entropy alike).

Each revocation takes the revocation function's path: it is committed to the origin
cell's ledger (RevocationLog.record, which reads the clock first: the window opens at
the revoke call), then handed to one relay of that cell (`Relay.Submit`). Origins
rotate over the cells; calls are paced (`--interval`) so the figure is latency, not a
queue. Every relay records when its cell's ledger held the revocation (relays push
only after the ledger write or its conflict); the exposure window of a revocation is
the latest of those times minus the call's, so it covers every relay and every cell
ledger. At the end every cell ledger is read back.

How the bench learns those times (`--observe`): by default (`replay`) it asks every
relay once the revocations have spread (`Relay.Subscribe` with replay: each relay
hands over the times it recorded), so nothing but the mesh runs while the clock does;
it knows they have spread from the relays' `revocations_applied` counters, read from
each process's /metrics once a second. With `stream`, every relay streams each
revocation to the bench as it applies it: one more gRPC message per revocation and
relay while the revocations spread, which the bench process reads on the same cores
(and the relays' CPU per revocation counts). Either way the times are the ones each
relay recorded when it applied the revocation.

`relay_idle_cpu_cores`: CPU (user + system, every thread) of all relay processes
together per second of wall time while no revocation moves: probes, anti-entropy,
keepalives, the cells agent's loops. It is read once membership has settled and
every relay has had time to probe every peer of its cell once (`warmup_s`: relays per
cell x probe interval; a relay opens its stream to a peer at its first probe of it,
and opening a gRPC channel and stream costs far more than a probe on one, so a cell
of n relays costs more for its first n probe intervals), in windows of IDLE_WINDOW
seconds until two agree within 15% or IDLE_WAIT_MAX has passed; the last window is
reported, with `idle_windows_cores`.

`relay_cpu_ms_per_revocation`: CPU time the relay processes spent while the
revocations were sent and spread, less the idle rate, per revocation and for all
relays together. Unlike the exposure window it hardly depends on what else the
machine runs, so it is the figure to compare code changes by.

Then the simulator (keycell/relay/simulate.py) for 1,000-10,000 relays: the tree
broadcast as the relays run it (with the same `--profile` and `--loss`), one
revocation per trial: rounds (gossip intervals) and hops until every relay holds it,
median and max over the trials, messages per revocation, and the fraction of relays
first reached by the first push, a resend, a graft or anti-entropy; with every view
of a cell complete (`with_eager_push`) and with each relay's view missing
SIM_VIEW_MISS of its cell (`views_differ`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench.common import machine
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay._pb import relay_pb2_grpc as pb_grpc
from keycell.relay.node import rev_to_pb
from keycell.relay.profiles import PROFILES
from keycell.relay.simulate import report as simulate_report
from keycell.testing.processes import ServerProcess

CELLS = ("a", "b", "c")
TARGET_P99 = 0.100
SIM_VIEW_MISS = 0.02  # the simulator's differing views: each relay's view lacks 2% of its cell
IDLE_WINDOW = 5.0  # seconds per idle CPU reading
IDLE_WAIT_MAX = 180.0  # give up waiting for the idle rate to settle after this long
REPLAY_TIMEOUT = 10.0  # seconds for one relay to hand over the apply times it recorded


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (all their threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def start_relays(
    root: Path, relays_per_cell: int, processes_per_cell: int, loss: float, profile: str = "local"
) -> tuple[list[ServerProcess], dict[str, list[str]], list[str]]:
    from keycell.relay.cluster import open_dev_cell

    processes: list[ServerProcess] = []
    addrs: dict[str, list[str]] = {c: [] for c in CELLS}
    metrics: list[str] = []
    per_process = max(1, relays_per_cell // processes_per_cell)
    join = ""
    for cell in CELLS:
        folder = root / cell
        folder.mkdir()
        open_dev_cell(str(folder), cell).ledger.close()  # initialized once, as `keycell server --dev` does
        for p in range(processes_per_cell):
            count = per_process if p < processes_per_cell - 1 else relays_per_cell - per_process * p
            info = root / f"{cell}-{p}.json"
            args = ["relay", "--cell", cell, "--dev-data-dir", str(folder), "--profile", profile]
            args += ["--count", str(count), "--loss", str(loss), "--addresses-file", str(info)]
            args += ["--metrics-listen", "127.0.0.1:0"]
            if join:
                args += ["--join", join]
            process = ServerProcess("keycell", args, what=f"keycell relay {cell}/{p}", startup_timeout=120)
            process.start()
            processes.append(process)
            addresses = json.loads(info.read_text())
            addrs[cell] += addresses["relays"]
            metrics.append(addresses["metrics"])
            if not join:
                join = ",".join(addrs[cell][:2])
    return processes, addrs, metrics


def metric_total(metrics: list[str], name: str) -> int:
    """The sum of one per-relay counter over every relay of these processes (each
    process's GET /metrics)."""
    total = 0
    for addr in metrics:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + "{"):
                    total += int(line.rpartition(" ")[2])
    return total


def revocation_messages(metrics: list[str]) -> int:
    """Envelopes that carried a revocation (or revocation ids), sent so far by every
    relay of these processes."""
    return metric_total(metrics, "keycell_relay_revocation_messages_total")


async def idle_cpu_rates(pids: list[int]) -> list[float]:
    """Idle CPU (cores) of these processes, one reading per IDLE_WINDOW, until two in a
    row agree within 15% or IDLE_WAIT_MAX has passed."""
    rates: list[float] = []
    give_up = time.monotonic() + IDLE_WAIT_MAX
    while True:
        cpu, wall = cpu_seconds(pids), time.monotonic()
        await asyncio.sleep(IDLE_WINDOW)
        rates.append((cpu_seconds(pids) - cpu) / (time.monotonic() - wall))
        steady = len(rates) >= 2 and abs(rates[-1] - rates[-2]) <= 0.15 * max(rates[-2], 1e-3)
        if steady or time.monotonic() >= give_up:
            return rates


async def measure(
    root: Path,
    addrs: dict[str, list[str]],
    revocations: int,
    interval: float,
    settle: float,
    pids: list[int] | None = None,
    warmup: float = 0.0,
    metrics: list[str] | None = None,
    observe: str = "replay",
) -> dict[str, Any]:
    from keycell.control_plane.revocations import RevocationLog
    from keycell.relay.cluster import open_dev_cell

    every = [a for cell in CELLS for a in addrs[cell]]
    applied: dict[str, dict[str, float]] = {}
    channels = {a: grpc.aio.insecure_channel(a) for a in every}
    stubs = {a: pb_grpc.RelayStub(ch) for a, ch in channels.items()}  # type: ignore[no-untyped-call]
    live = asyncio.Event()
    subscribed = 0

    async def follow(addr: str) -> None:
        """The times `addr` applies revocations at, as they come."""
        nonlocal subscribed
        async for event in stubs[addr].Subscribe(pb.SubscribeRequest(replay=False)):
            if not event.HasField("revocation"):
                subscribed += 1
                if subscribed == len(every):
                    live.set()
                continue
            applied.setdefault(event.revocation.id, {})[addr] = event.applied_at

    async def recorded(addr: str, ids: set[str]) -> None:
        """The times `addr` recorded for the revocations `ids` (a replay: what it holds
        comes right after the "subscribed" event; cut off after REPLAY_TIMEOUT)."""
        call = stubs[addr].Subscribe(pb.SubscribeRequest(replay=True))
        left = set(ids)
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                async for event in call:
                    if event.HasField("revocation") and event.revocation.id in left:
                        applied.setdefault(event.revocation.id, {})[addr] = event.applied_at
                        left.discard(event.revocation.id)
                        if not left:
                            break
        except TimeoutError:
            pass  # some never got there: they count as not reached
        finally:
            call.cancel()

    streamed = observe == "stream"
    followers = [asyncio.create_task(follow(a)) for a in every] if streamed else []
    if streamed:
        await asyncio.wait_for(live.wait(), 60)
    # Membership settles: every relay knows every other before the clock starts. Only
    # relays not yet seen to know every other are asked again, once a second (a Status
    # reply carries the whole member table: 300 relays asked 5 times a second kept a
    # 3 x 100 mesh from ever settling).
    deadline = time.monotonic() + settle
    seen = dict.fromkeys(every, 0)
    while time.monotonic() < deadline:
        waiting = [a for a in every if seen[a] < len(every)]
        if not waiting:
            break
        replies = await asyncio.gather(*(stubs[a].Status(pb.StatusRequest()) for a in waiting))
        for addr, reply in zip(waiting, replies, strict=True):
            seen[addr] = sum(1 for m in reply.members if m.state == pb.ALIVE)
        await asyncio.sleep(1.0)
    settled = time.monotonic() - (deadline - settle)
    members_seen = min(seen.values())
    logs = {cell: RevocationLog(open_dev_cell(str(root / cell), cell).revocations) for cell in CELLS}
    rng = random.Random(1)
    issued = []
    handoffs_failed = 0
    pids = pids or []
    await asyncio.sleep(warmup)
    idle_rates = await idle_cpu_rates(pids) if pids else [0.0]
    idle_rate = idle_rates[-1]
    messages_before = revocation_messages(metrics or [])

    def applied_total() -> int:  # applies every relay counted so far (replay mode's progress)
        return metric_total(metrics or [], "keycell_relay_revocations_applied_total")

    applied_before = 0 if streamed else applied_total()
    busy_cpu, busy_wall = cpu_seconds(pids), time.monotonic()
    for i in range(revocations):
        cell = CELLS[i % len(CELLS)]
        rec = logs[cell].record(f"token:bench-{i}-{rng.getrandbits(32):08x}", reason="bench")
        try:
            await stubs[rng.choice(addrs[cell])].Submit(rev_to_pb(rec), timeout=5)
        except grpc.aio.AioRpcError:  # as the revocation function: it stands, the sweep spreads it
            handoffs_failed += 1
        issued.append(rec)
        await asyncio.sleep(interval)
    wait_until = time.monotonic() + 30
    if streamed:
        while time.monotonic() < wait_until and any(len(applied.get(r.id, {})) < len(every) for r in issued):
            await asyncio.sleep(0.05)
    else:
        while time.monotonic() < wait_until and applied_total() < applied_before + len(issued) * len(every):
            await asyncio.sleep(1.0)
    busy = cpu_seconds(pids) - busy_cpu - idle_rate * (time.monotonic() - busy_wall)
    if not streamed:
        ids = {r.id for r in issued}
        await asyncio.gather(*(recorded(a, ids) for a in every))
    messages = revocation_messages(metrics or []) - messages_before
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for channel in channels.values():
        await channel.close()
    windows = [
        max(applied[r.id].values()) - r.revoked_at for r in issued if len(applied.get(r.id, {})) == len(every)
    ]
    ledgers_hold_all = all(
        all(log.revocations.is_revoked(r.subject) for r in issued) for log in logs.values()
    )
    for log in logs.values():
        log.ledger.close()
    return {
        "revocations": len(issued),
        "handoffs_failed": handoffs_failed,  # relay too busy to answer Submit within 5 s
        "reached_every_relay": len(windows),
        "every_cell_ledger_holds_every_revocation": ledgers_hold_all,
        "exposure_ms": {
            "p50": round(percentile(windows, 0.50) * 1000, 1) if windows else None,
            "p99": round(percentile(windows, 0.99) * 1000, 1) if windows else None,
            "max": round(max(windows) * 1000, 1) if windows else None,
            "mean": round(statistics.fmean(windows) * 1000, 1) if windows else None,
        },
        "p99": round(percentile(windows, 0.99) * 1000, 1) if windows else None,
        "p99_within_target": bool(windows) and percentile(windows, 0.99) <= TARGET_P99,
        "relay_cpu_ms_per_revocation": round(busy / max(1, len(issued)) * 1000, 1) if pids else None,
        # envelopes carrying a revocation or its id, all relays together, per revocation
        # (n - 1 would be a spanning tree with nothing lost; anti-entropy repairs count)
        "messages_per_revocation": round(messages / max(1, len(issued)), 1) if metrics else None,
        "relay_idle_cpu_cores": round(idle_rate, 3) if pids else None,
        "observed_by": observe,
        "idle_windows_cores": [round(r, 3) for r in idle_rates],
        "membership_settled_s": round(settled, 1),
        "warmup_s": round(warmup, 1),
        "fewest_members_seen_alive": members_seen,  # by any relay, out of every relay
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation")
    parser.add_argument("--quick", action="store_true", help="test size: 3 cells x 3 relays, 10 revocations")
    # 3 x 10 is what this shared 2-core machine carries within the p99 target; larger
    # sizes run (up to 200 a cell) and report what they reach.
    parser.add_argument("--relays-per-cell", type=int, default=10)
    parser.add_argument("--processes-per-cell", type=int, default=1)
    parser.add_argument("--revocations", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between revoke calls")
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--sim-sizes", default="1000,3000,10000")
    parser.add_argument(
        "--observe",
        default="replay",
        choices=["replay", "stream"],
        help="how apply times reach the bench: asked once they spread (replay), or streamed as they happen",
    )
    parser.add_argument(
        "--profile",
        default="lan",
        choices=sorted(PROFILES),
        help="relay timings (lan: memberlist's probe pace; local: probes 2/s, tighter timeouts)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.relays_per_cell, args.processes_per_cell, args.revocations, args.sim_sizes = 3, 1, 10, "1000"
    args.relays_per_cell = max(1, min(args.relays_per_cell, 200))
    args.revocations = max(1, min(args.revocations, 5000))
    with tempfile.TemporaryDirectory(prefix="keycell-bench-revocation-") as tmp:
        root = Path(tmp)
        processes, addrs, metrics = start_relays(
            root, args.relays_per_cell, args.processes_per_cell, args.loss, args.profile
        )
        try:
            pids = [p.pid for p in processes if p.pid is not None]
            # Membership (every relay sees every other alive) takes longer in larger cells.
            settle = 30 + args.relays_per_cell * len(CELLS) / 3
            warmup = args.relays_per_cell * PROFILES[args.profile].probe_interval
            figures = asyncio.run(
                measure(
                    root,
                    addrs,
                    args.revocations,
                    args.interval,
                    settle=settle,
                    pids=pids,
                    warmup=warmup,
                    metrics=metrics,
                    observe=args.observe,
                )
            )
        finally:
            died = [p for p in processes if p.exited() is not None]
            for process in died:
                sys.stderr.write(f"{process.what} exited with {process.exited()}:\n{process.log_tail()}\n")
            for process in processes:
                process.stop()
        figures["relay_processes_died"] = len(died)
    sizes = [int(s) for s in args.sim_sizes.split(",") if s]
    trials = 2 if args.quick else 5
    sim_profile = PROFILES[args.profile]
    result = {
        "benchmark": "revocation",
        "machine": machine(),
        "setup": {
            "cells": len(CELLS),
            "relays_per_cell": args.relays_per_cell,
            "relays": args.relays_per_cell * len(CELLS),
            "relay_processes": args.processes_per_cell * len(CELLS),
            "note": "relays of one process share its event loop; each has its own gRPC server and port",
            "profile": args.profile,
            "loss": args.loss,
            "interval_s": args.interval,
            "pid": os.getpid(),
        },
        **figures,
        "target_p99_ms": TARGET_P99 * 1000,
        "simulator": {
            "with_eager_push": simulate_report(sizes, loss=args.loss, trials=trials, profile=sim_profile),
            "views_differ": simulate_report(
                sizes, loss=args.loss, view_miss=SIM_VIEW_MISS, trials=trials, profile=sim_profile
            ),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

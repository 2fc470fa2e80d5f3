"""Exposure under real partitions (issue 18): how long a revoked credential stays
usable in each cell while the network is cut.

    python -m bench.partition [--revocations 1000] [--modes local-only,refuse,serve]
                              [--scenarios relays,isolate] [--bound 1.0] [--concurrency 4]
                              [--rate 50]

Three cells (us-east-1, eu-west-1, ap-southeast-1), each a `keycell server` and a
`keycell relay` process in its own Linux network namespace (keycell/testing/netns.py),
every cell's direct path and freshness heartbeat on (KEYCELL_PEER_TOKEN, every
`--heartbeat` s). Per scenario and `on_stale` mode:

1. N tokens, spread round-robin over the cells, each with the mode and
   `max_revocation_staleness=--bound`; two readers in ap-southeast-1 with their own
   tokens of the same mode read a secret homed there throughout the run.
2. The cut: `relays` takes every relay link down (the APIs stay joined); `isolate`
   takes both of ap-southeast-1's links down. It lasts while the revocations are made,
   and at least `--min-cut` s (default: the bound plus 1 s) so the cut-off cell goes
   stale.
3. Each token is revoked (by accessor) through a reachable cell other than its own
   (the others in turn), paced at `--rate` calls a second, `--concurrency` at most in
   flight, so the figure is the paths' latency rather than a queue of calls. From the moment the revoke call returns, a prober
   per cell asks that token's own cell (auth/token/lookup-self, the only cell that
   knows the token) until it refuses it: 403 (the revocation arrived) or 503 (the
   role's bound: the cell's view is too stale). Exposure = the refusing answer's
   arrival minus the revoke call's return, so it is an upper bound.
4. The heal; probing goes on (bounded) until every token is refused, then every cell
   is asked for its own receipt of every revocation (sys/revocations/:id).

The test process reaches each cell over a control link no cut touches. Goal on this
machine: p99 <= 1,000 ms in every cell in both scenarios, and 0 non-revoked reads
failed under `serve` and `local-only`. By design `local-only` and `serve` keep serving
a cut-off cell's own credentials, revoked or not, until the revocation reaches it: the
cut-off cell's exposure under those modes is the length of the cut (the report says so
rather than hiding it); `refuse` bounds it by `--bound`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine
from keycell.breach import BreachError, percentile
from keycell.testing.netns import PartitionedCells, wait_for

CELLS = ("us-east-1", "eu-west-1", "ap-southeast-1")
CUT = "ap-southeast-1"
SCENARIOS = {"relays": "every relay link cut, APIs joined", "isolate": f"{CUT} fully cut off"}
MODES = ("local-only", "refuse", "serve")
GOAL_P99_MS = 1000.0
READ = "secret/data/bench/readers"
PROBE_PAUSE = 0.005  # seconds between a prober's rounds over its pending tokens


@dataclass
class Credential:
    cell: str
    token: str = field(repr=False)
    accessor: str = ""
    revoked_at: float = 0.0  # monotonic: the revoke call returned
    refused_at: float = 0.0  # monotonic: the first refusing answer arrived
    refused_with: int = 0
    revocation_id: str = ""
    delivered_by: str = ""  # the path that brought the revocation to the credential's cell first


class Prober:
    """One thread per cell: asks that cell, round after round, whether each pending
    credential still works, and notes the first refusal. Bounded by `deadline`."""

    def __init__(self, cells: PartitionedCells, cell: str) -> None:
        self.cells, self.cell = cells, cell
        self.pending: list[Credential] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + 600  # moved to the heal + settle time once healed
        self.errors = 0
        self.answer_ms: list[float] = []  # how long each lookup-self took to answer
        self.thread = threading.Thread(target=self._run, name=f"probe-{cell}", daemon=True)

    def add(self, cred: Credential) -> None:
        with self.lock:
            self.pending.append(cred)

    def left(self) -> int:
        with self.lock:
            return len(self.pending)

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                batch = list(self.pending)
            for cred in batch:
                asked = time.monotonic()
                try:
                    status, _ = self.cells.call(self.cell, "GET", "auth/token/lookup-self", token=cred.token)
                    self.answer_ms.append((time.monotonic() - asked) * 1000)
                except BreachError:
                    self.errors += 1
                    continue
                if status != 200:
                    cred.refused_at, cred.refused_with = time.monotonic(), status
                    with self.lock:
                        self.pending.remove(cred)
            self.stop.wait(PROBE_PAUSE)


class Readers:
    """Reader workloads in one cell: each reads READ with its own (never revoked) token
    every 20 ms until stopped or `limit` s, counting answers by status."""

    def __init__(self, cells: PartitionedCells, cell: str, tokens: list[str], limit: float) -> None:
        self.cells, self.cell, self.limit = cells, cell, limit
        self.served = 0
        self.failed: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in tokens]

    def _run(self, token: str) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, _ = self.cells.call(self.cell, "GET", READ, token=token)
                why = "" if status == 200 else f"HTTP {status}"
            except BreachError:
                why = "unreachable"
            with self.lock:
                if why:
                    self.failed[why] = self.failed.get(why, 0) + 1
                else:
                    self.served += 1
            self.stop.wait(0.02)

    def start(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        return {
            "cell": self.cell,
            "served": self.served,
            "failed": sum(self.failed.values()),
            "why": self.failed,
        }


def _issue(cells: PartitionedCells, count: int, bound: dict[str, Any]) -> list[Credential]:
    def one(i: int) -> Credential:
        cell = CELLS[i % len(CELLS)]
        body = {"policies": ["root"], "ttl": "1h", **bound}
        status, made = cells.call(cell, "POST", "auth/token/create", body)
        if status != 200:
            raise RuntimeError(f"auth/token/create in {cell}: HTTP {status}: {made.get('errors')}")
        return Credential(cell, made["auth"]["client_token"], made["auth"]["accessor"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def _via(cell: str, reachable: list[str], i: int) -> str:
    """The cell the i-th revocation, of `cell`'s credential, goes through: the reachable
    other cells in turn, so the revoke calls (and the deliveries they start) spread
    evenly over the cells."""
    others = [c for c in reachable if c != cell]
    return others[i % len(others)]


def _held_everywhere(cells: PartitionedCells, creds: list[Credential], timeout: float) -> int:
    """How many revocations every cell holds (its own receipt), waiting up to `timeout`."""

    def held(cred: Credential) -> bool:
        for cell in CELLS:
            status, answer = cells.call(cell, "GET", f"sys/revocations/{cred.revocation_id}")
            if status != 200 or cell not in answer["data"]["cells"]:
                return False
            if cell == cred.cell:
                cred.delivered_by = str(answer["data"]["cells"][cell]["path"])
        return True

    todo = [c for c in creds if c.revocation_id]
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=8) as pool:
        while todo and time.monotonic() < deadline:
            todo = [c for c, ok in zip(todo, pool.map(held, todo), strict=True) if not ok]
            if todo:
                time.sleep(0.2)
    return len([c for c in creds if c.revocation_id]) - len(todo)


def _figures(creds: list[Credential], cell: str, prober: Prober) -> dict[str, Any]:
    mine = [c for c in creds if c.cell == cell]
    windows = [(c.refused_at - c.revoked_at) * 1000 for c in mine if c.refused_at]
    answers = prober.answer_ms
    paths: dict[str, int] = {}
    for c in mine:
        paths[c.delivered_by or "unknown"] = paths.get(c.delivered_by or "unknown", 0) + 1
    return {
        "credentials": len(mine),
        "refused": len(windows),
        "refused_403": sum(1 for c in mine if c.refused_with == 403),
        "refused_503": sum(1 for c in mine if c.refused_with == 503),
        "refused_other": sum(1 for c in mine if c.refused_with not in (0, 403, 503)),
        "p50": round(percentile(windows, 0.50), 1) if windows else None,
        "p99": round(percentile(windows, 0.99), 1) if windows else None,
        "max": round(max(windows), 1) if windows else None,
        "delivered_by": paths,  # which path reached this cell first (sys/revocations/:id)
        # the probes' own answer times: a slow cell shows here, not only in the exposure
        "probe_answer_ms": {
            "p50": round(percentile(answers, 0.5), 1) if answers else None,
            "p99": round(percentile(answers, 0.99), 1) if answers else None,
        },
    }


def run_one(
    cells: PartitionedCells,
    scenario: str,
    mode: str,
    *,
    revocations: int,
    bound: float,
    concurrency: int,
    rate: float,
    min_cut: float,
    settle: float = 60.0,
) -> dict[str, Any]:
    """One scenario under one mode; the cells are healed and fresh again afterwards."""
    cells.heal()
    if not wait_for(lambda: all(cells.fresh(c, 0.5) for c in CELLS), 30):
        raise RuntimeError("the cells did not get fresh before the run")
    stale_bound = {"max_revocation_staleness": bound, "on_stale": mode}
    status, _ = cells.call(CUT, "POST", READ, {"data": {"n": scenario + mode}})
    if status != 200:
        raise RuntimeError(f"writing {READ} in {CUT}: HTTP {status}")
    creds = _issue(cells, revocations, stale_bound)
    reader_tokens = [c.token for c in _issue(cells, 2 * len(CELLS), stale_bound) if c.cell == CUT]
    probers = {cell: Prober(cells, cell) for cell in CELLS}
    readers = Readers(cells, CUT, reader_tokens, limit=600)
    try:
        for prober in probers.values():
            prober.thread.start()
        readers.start()
        return _cut_and_revoke(
            cells, scenario, mode, creds, probers, readers, bound, concurrency, rate, min_cut, settle
        )
    finally:
        readers.stop.set()
        for prober in probers.values():
            prober.stop.set()


def _cut_and_revoke(
    cells: PartitionedCells,
    scenario: str,
    mode: str,
    creds: list[Credential],
    probers: dict[str, Prober],
    readers: Readers,
    bound: float,
    concurrency: int,
    rate: float,
    min_cut: float,
    settle: float,
) -> dict[str, Any]:
    revocations = len(creds)
    reachable = list(CELLS) if scenario == "relays" else [c for c in CELLS if c != CUT]
    failed_revokes: list[str] = []

    def revoke(i: int) -> None:
        # paced: revocation i leaves no earlier than i / rate s into the cut, so the
        # figure is the paths' latency, not a queue of revoke calls
        time.sleep(max(0.0, cut_at + i / rate - time.monotonic()))
        cred = creds[i]
        via = _via(cred.cell, reachable, i // len(CELLS))
        body = {"accessor": cred.accessor, "reason": f"bench {scenario} {mode}"}
        try:
            status, answer = cells.call(via, "POST", "sys/revocations", body)
        except BreachError as exc:
            failed_revokes.append(str(exc))
            return
        cred.revoked_at = time.monotonic()
        if status != 200:
            failed_revokes.append(f"HTTP {status}")
            return
        cred.revocation_id = answer["data"]["id"]
        probers[cred.cell].add(cred)

    if scenario == "relays":
        cells.cut_relays()
    else:
        cells.isolate(CUT)
    cut_at = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(revoke, range(len(creds))))
        revoke_seconds = time.monotonic() - cut_at
        # The reachable cells settle while the cut holds; the cut lasts at least min_cut.
        wait_for(lambda: all(probers[c].left() == 0 for c in reachable), 30, step=0.05)
        time.sleep(max(0.0, cut_at + min_cut - time.monotonic()))
        during_cut = readers.finish()
        refused_before_heal = sum(1 for c in creds if c.refused_at)
    finally:
        cells.heal()
    healed_at = time.monotonic()
    for prober in probers.values():
        prober.deadline = healed_at + settle
    wait_for(lambda: all(p.left() == 0 for p in probers.values()), settle, step=0.1)
    for prober in probers.values():
        prober.stop.set()
        prober.thread.join(timeout=30)
    held = _held_everywhere(cells, creds, 30)
    per_cell = {cell: _figures(creds, cell, probers[cell]) for cell in CELLS}
    p99_ok = all(f["p99"] is not None and f["p99"] <= GOAL_P99_MS for f in per_cell.values())
    return {
        "scenario": scenario,
        "cut": SCENARIOS[scenario],
        "mode": mode,
        "bound_seconds": bound,
        "revocations": revocations,
        "revoke_failures": len(failed_revokes),
        "revoke_seconds": round(revoke_seconds, 3),
        "revocations_per_second": round(revocations / revoke_seconds, 1) if revoke_seconds else None,
        "cut_seconds": round(healed_at - cut_at, 3),
        "exposure_ms": per_cell,
        "refused_before_heal": refused_before_heal,
        "every_revocation_refused": all(c.refused_at for c in creds),
        "held_by_every_cell": held,
        "reads_in_cut_cell_during_cut": during_cut,
        "probe_errors": sum(p.errors for p in probers.values()),
        "goal": {
            "p99_le_1000ms_every_cell": p99_ok,
            "no_failed_reads": during_cut["failed"] == 0 if mode in ("serve", "local-only") else None,
        },
    }


def run(
    revocations: int,
    modes: list[str],
    scenarios: list[str],
    *,
    bound: float,
    concurrency: int,
    rate: float,
    heartbeat: float,
    min_cut: float | None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="keycell-bench-partition-") as folder,
        PartitionedCells(Path(folder), CELLS, heartbeat_seconds=heartbeat) as cells,
    ):
        for scenario in scenarios:
            for mode in modes:
                if progress is not None:
                    progress(f"{scenario} / {mode}")
                runs.append(
                    run_one(
                        cells,
                        scenario,
                        mode,
                        revocations=revocations,
                        bound=bound,
                        concurrency=concurrency,
                        rate=rate,
                        min_cut=bound + 1.0 if min_cut is None else min_cut,
                    )
                )
    return {
        "benchmark": "partition",
        "machine": machine(),
        "load": {
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": list(os.getloadavg()),
        },
        "setup": {
            "cells": list(CELLS),
            "cut_cell": CUT,
            "processes": "keycell server (1 worker) + keycell relay per cell, each cell in its own netns",
            "heartbeat_seconds": heartbeat,
            "concurrency": concurrency,
            "revocations_per_second_offered": rate,
            "exposure": "revoke call returns -> first refusal (403 or 503) of the credential in its own cell",
        },
        "goal": {"p99_ms": GOAL_P99_MS, "failed_non_revoked_reads_under": ["serve", "local-only"]},
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.partition", description=__doc__.split("\n")[0])
    parser.add_argument("--revocations", type=int, default=1000)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated on_stale modes")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="relays, isolate")
    parser.add_argument("--bound", type=float, default=1.0, help="max_revocation_staleness, seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="revoke calls in flight")
    parser.add_argument("--rate", type=float, default=50.0, help="revoke calls started per second")
    parser.add_argument("--heartbeat", type=float, default=0.25, help="KEYCELL_HEARTBEAT_S of every cell")
    parser.add_argument("--min-cut", type=float, default=None, help="seconds the cut lasts at least")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    if not scenarios or any(s not in SCENARIOS for s in scenarios):
        parser.error(f"--scenarios takes a comma-separated list of {', '.join(SCENARIOS)}")
    if not 1 <= args.revocations <= 100_000:
        parser.error("--revocations: 1 to 100000")
    if not 1 <= args.concurrency <= 64 or min(args.bound, args.heartbeat, args.rate) <= 0:
        parser.error("--concurrency 1-64; --bound, --heartbeat and --rate > 0")
    report = run(
        args.revocations,
        modes,
        scenarios,
        bound=args.bound,
        concurrency=args.concurrency,
        rate=args.rate,
        heartbeat=args.heartbeat,
        min_cut=args.min_cut,
        progress=lambda what: print(f"bench.partition: {what}", file=sys.stderr, flush=True),
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

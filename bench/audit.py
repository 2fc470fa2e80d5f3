"""Audit trail cost: KV v2 throughput of `keycell server --dev` with auditing on (a
file, each worker's chain head in the ledger) against the same server with auditing
off (KEYCELL_AUDIT=off), in the same run, rounds interleaved; the ratio audited /
unaudited for reads (target >= 0.8) and, reported beside it, for writes.

    python -m bench.audit [--quick] [--load python|wrk] [--workers N]

Load: bench.api's generators (`--load python`, the default here, or wrk when installed).
An audited read writes one entry (with the answer); an audited write two (the request
entry before the engine runs, the response entry after). Each worker group-commits the
entries of its requests in flight into one write to the file; its chain head follows
in the ledger every 50 ms (KEYCELL_AUDIT_ANCHOR=async, what `keycell server` runs). The
same requests against a server that writes the head before each batch's requests go on
(KEYCELL_AUDIT_ANCHOR=sync) are measured beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from bench.api import (
    KEYCELL_TOKEN,
    READ_PATH,
    BenchError,
    ensure_wrk,
    prepare,
    run_python_load,
    run_wrk,
    wrk_version,
)
from bench.common import machine
from keycell.testing.processes import keycell_server

RATIO_TARGET = 0.8


@contextlib.contextmanager
def server(workers: int, *, audited: bool, anchor: str = "async") -> Iterator[tuple[int, str]]:
    with tempfile.TemporaryDirectory(prefix="keycell-bench-audit-") as folder:
        env = (
            {"KEYCELL_AUDIT_FILE": os.path.join(folder, "audit.log"), "KEYCELL_AUDIT_ANCHOR": anchor}
            if audited
            else {"KEYCELL_AUDIT": "off"}
        )
        process = keycell_server(folder, dev_root_token=KEYCELL_TOKEN, workers=workers, env=env)
        port = process.start()
        try:
            yield port, os.path.join(folder, "audit.log")
        except Exception:
            # Say what the server saw: a dropped connection is only explained there.
            print(f"server log (audited={audited}):\n{process.log_tail()}", file=sys.stderr)
            raise
        finally:
            process.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = ensure_wrk() if args.load == "wrk" else ""

    def measure(port: int, method: str = "GET") -> dict[str, Any]:
        if args.load == "wrk":
            return run_wrk(
                wrk,
                port,
                method,
                KEYCELL_TOKEN,
                seconds=args.duration,
                threads=2,
                connections=args.connections,
            )
        return run_python_load(
            port,
            method,
            KEYCELL_TOKEN,
            seconds=args.duration,
            connections=args.connections,
            max_requests=args.max_requests,
        )

    # audited: what `keycell server` runs (heads anchored after the sinks); audited_sync:
    # each batch's head written to the ledger before its requests go on (the default
    # for function instances), for the price of the other.
    names = ("audited", "unaudited", "audited_sync")
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    writes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        on, audit_file = stack.enter_context(server(args.workers, audited=True))
        off, _ = stack.enter_context(server(args.workers, audited=False))
        sync, _ = stack.enter_context(server(args.workers, audited=True, anchor="sync"))
        ports = dict(zip(names, (on, off, sync), strict=True))
        for port in ports.values():
            prepare(port, KEYCELL_TOKEN)
            measure(port)  # warm-up: routers built, caches filled
        for _ in range(args.rounds):
            for name, port in ports.items():
                samples[name].append(measure(port))
            for name, port in ports.items():
                writes[name].append(measure(port, "POST"))
        with open(audit_file, "rb") as handle:
            audit_lines = sum(1 for _ in handle)
    figures = summarize(samples)
    write_figures = summarize(writes)
    ratio = _ratio(figures)
    return {
        "benchmark": "audit",
        "machine": machine(),
        "load": {
            "generator": wrk_version(wrk)
            if args.load == "wrk"
            else "python (http.client keep-alive threads)",
            "connections": args.connections,
            "seconds_per_run": args.duration,
            "rounds": args.rounds,
            "requests": [f"GET {READ_PATH}", "POST (KV v2 writes, rotating keys)"],
            "workers": args.workers,
        },
        "kv_v2_read": figures,
        "kv_v2_write": write_figures,
        "audit_lines_written": audit_lines,
        "ratio_audited_to_unaudited": ratio,
        "write_ratio_audited_to_unaudited": _ratio(write_figures),
        "ratio_audited_sync_to_unaudited": _ratio(figures, "audited_sync"),
        "write_ratio_audited_sync_to_unaudited": _ratio(write_figures, "audited_sync"),
        "target": {"ratio_min": RATIO_TARGET, "met": ratio is not None and ratio >= RATIO_TARGET},
    }


def _ratio(figures: dict[str, dict[str, Any]], audited: str = "audited") -> float | None:
    unaudited = figures["unaudited"]["requests_per_s"]
    return round(figures[audited]["requests_per_s"] / unaudited, 3) if unaudited else None


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "requests_per_s": round(statistics.median(s["requests_per_s"] for s in runs), 1),
            "requests_per_s_rounds": [round(s["requests_per_s"], 1) for s in runs],
            "p50_ms": round(statistics.median(s["p50_ms"] for s in runs), 3),
            "p99_ms": round(statistics.median(s["p99_ms"] for s in runs), 3),
            "requests": sum(s["requests"] for s in runs),
            "errors": sum(s["errors"] for s in runs),
        }
        for name, runs in samples.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="audit trail: audited vs unaudited KV read throughput")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--load", choices=["wrk", "python"], default="python", help="load generator")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=None, help="connections (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="keycell server worker processes")
    parser.add_argument("--max-requests", type=int, default=None, help="python load: requests per run cap")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.connections = args.connections or (8 if args.quick else 16)
    args.max_requests = args.max_requests or (2_000 if args.quick else 500_000)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench.audit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

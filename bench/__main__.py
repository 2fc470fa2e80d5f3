"""`make bench`: run every benchmark in bench/ with its default sizes; each prints JSON."""

from __future__ import annotations

import importlib

BENCHMARKS = [
    "bench.ledger",
    "bench.barrier",
    "bench.keys",
    "bench.api",
    "bench.audit",
    "bench.herd",
    "bench.identity",
    "bench.rotation",
    "bench.revocation",
    "bench.replication",
    "bench.partition",
]


def main() -> None:
    for name in BENCHMARKS:
        importlib.import_module(name).main([])


if __name__ == "__main__":
    main()

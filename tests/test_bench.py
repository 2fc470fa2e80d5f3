"""The benchmarks' code paths, at a size that fits in the test suite: each produces
a complete report (figures are checked by `make bench`, not here)."""

from __future__ import annotations

from bench import barrier, ledger


def test_ledger_benchmark_reports_every_adapter_and_the_raw_ratio(aws_endpoint: str) -> None:
    report = ledger.run(ops=30, dynamo_ops=10)
    assert report["machine"]["cores"] >= 1
    assert set(report["sqlite"]) == {"adapter", "raw_sqlite3"}
    assert all(v > 0 for v in report["sqlite_adapter_to_raw_ratio"].values())
    assert report["dynamodb"]["cas_writes_per_s"] > 0


def test_barrier_benchmark_reports_sealed_and_plain_figures() -> None:
    report = barrier.run(ops=20, value_bytes=64)
    assert report["sealed_storage_pkcs11"]["read_cold_cache_per_s"] > 0
    assert set(report["ratio_to_plain"]) == {"write", "read_hot", "read_cold"}

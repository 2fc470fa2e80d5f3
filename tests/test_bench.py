"""The benchmarks' code paths, at a size that fits in the test suite, run as a user
runs them (`python -m bench.X`, in its own process: SoftHSM2 tokens are per
process). Each must print a complete JSON report; the figures themselves are for
`make bench`, not for assertions here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import run_report

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str) -> dict[str, Any]:
    report = run_report(module, *args)
    assert report["machine"]["cores"] >= 1
    return report


def test_ledger_benchmark_reports_every_adapter_and_the_raw_ratio() -> None:
    report = run_bench("bench.ledger", "--ops", "30", "--dynamo-ops", "10")
    assert set(report["sqlite"]) == {"adapter", "raw_sqlite3"}
    assert all(v > 0 for v in report["sqlite_adapter_to_raw_ratio"].values())
    assert report["dynamodb"]["cas_writes_per_s"] > 0


def test_barrier_benchmark_reports_sealed_and_plain_figures() -> None:
    report = run_bench("bench.barrier", "--ops", "20", "--value-bytes", "64")
    assert report["sealed_storage_pkcs11"]["read_cold_cache_per_s"] > 0
    assert set(report["ratio_to_plain"]) == {"write", "read_hot", "read_cold"}


def test_keys_benchmark_reports_every_backend_and_the_pkcs11_ratio() -> None:
    report = run_bench("bench.keys", "--ops", "5", "--pkcs11-ops", "50")
    assert set(report["backends"]) == {"software", "pkcs11", "cloudhsm", "aws_kms", "azure_mhsm", "gcp_kms"}
    assert all(f > 0 for figures in report["backends"].values() for f in figures.values())
    assert set(report["pkcs11_adapter_to_raw"]["ratio"]) == {"wrap_unwrap_per_s", "ecdsa_sign_per_s"}


def test_identity_benchmark_reports_issuance_per_backend_and_the_renewal_spread() -> None:
    report = run_bench("bench.identity", "--ops", "20", "--workloads", "600", "--periods", "6")
    assert set(report["issuance"]) == {"software", "pkcs11_softhsm2"}
    assert all(f > 0 for figures in report["issuance"].values() for f in figures.values())
    spread = report["renewal_spread"]["peak_to_mean"]
    assert set(spread) == {"staggered", "waves", "cold_start"}
    # Without jitter a cold start never spreads: every renewal lands in one bucket.
    assert spread["cold_start"]["without_jitter"]["last_period"] == 30.0
    assert spread["cold_start"]["with_jitter"]["last_period"] < 30.0

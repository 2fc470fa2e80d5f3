"""bench/replication.py at a size that fits in the test suite, run as a user runs it."""

from __future__ import annotations

from bench.common import run_report


def test_replication_benchmark_reports_lag_and_convergence() -> None:
    report = run_report(
        "bench.replication", "--writes", "20", "--secrets", "5", "--rounds", "1", "--partition", "0.5"
    )
    assert report["machine"]["cores"] >= 1
    lag = report["replica_lag"]["all_cells_ms"]
    assert lag["samples"] + report["replica_lag"]["versions_not_seen_by_push"] == 40
    assert lag["p50"] <= lag["p99"]
    partition = report["partition"]
    assert partition["converge_after_heal_s"]["converged_rounds"] == 1
    assert partition["reads_in_cut_off_cell_served_pct"] == 100.0

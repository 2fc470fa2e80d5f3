"""bench/replication.py at a size that fits in the test suite, run as a user runs it."""

from __future__ import annotations

from bench.common import run_report


def test_replication_benchmark_reports_lag_and_convergence() -> None:
    report = run_report(
        "bench.replication",
        *("--writes", "20", "--secrets", "5", "--rounds", "1", "--partition", "0.5"),
        *("--digest-secrets", "20,150", "--digest-reps", "1"),
    )
    assert report["machine"]["cores"] >= 1
    lag = report["replica_lag"]["all_cells_ms"]
    assert lag["samples"] + report["replica_lag"]["versions_not_seen_by_push"] == 40
    assert lag["p50"] <= lag["p99"]
    partition = report["partition"]
    assert partition["converge_after_heal_s"]["converged_rounds"] == 1
    assert partition["reads_in_cut_off_cell_served_pct"] == 100.0
    small, large = report["anti_entropy_bytes_per_round"]
    assert (small["secrets"], large["secrets"]) == (20, 150)
    # a few secrets: the full listing is smaller, and bucketed digests send it too
    assert small["bucketed"]["in_sync_bytes"] == small["full_listing"]["in_sync_bytes"]
    # more: the bucket hashes (a fixed size) beat listing every secret
    assert large["bucketed"]["in_sync_bytes"] < large["full_listing"]["in_sync_bytes"]
    assert large["bucketed"]["changed_bytes"] < large["full_listing"]["changed_bytes"]

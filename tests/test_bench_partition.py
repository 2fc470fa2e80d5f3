"""bench/partition.py at test size, run as a user runs it (`python -m bench.partition
--revocations 10 --modes local-only,refuse`): three cells in their own network
namespaces, both cuts. The facts, not the timings: every revocation is refused in its
cell and held by every cell after the heal, local-only readers in the cut-off cell
never fail, refuse readers there are refused with 503 only, and every figure is there."""

from __future__ import annotations

from bench.common import run_report

CELLS = {"us-east-1", "eu-west-1", "ap-southeast-1"}


def test_tiny_partition_bench_refuses_every_revocation_and_keeps_local_readers() -> None:
    report = run_report("bench.partition", "--revocations", "10", "--modes", "local-only,refuse", timeout=300)
    assert report["benchmark"] == "partition"
    assert {"cpu", "cores"} <= set(report["machine"]) and len(report["load"]["loadavg_before"]) == 3
    runs = {(r["scenario"], r["mode"]): r for r in report["runs"]}
    assert set(runs) == {(s, m) for s in ("relays", "isolate") for m in ("local-only", "refuse")}
    for run in runs.values():
        assert run["revocations"] == 10 and run["revoke_failures"] == 0 and run["bound_seconds"] == 1.0
        assert run["every_revocation_refused"] is True
        assert run["held_by_every_cell"] == 10
        assert set(run["exposure_ms"]) == CELLS
        assert sum(f["credentials"] for f in run["exposure_ms"].values()) == 10
        for figures in run["exposure_ms"].values():
            assert figures["refused"] == figures["credentials"] > 0
            assert figures["refused_other"] == 0
            assert 0 <= figures["p50"] <= figures["p99"] <= figures["max"]
        reads = run["reads_in_cut_cell_during_cut"]
        assert reads["cell"] == "ap-southeast-1" and reads["served"] > 0
        if run["mode"] == "local-only":
            assert reads["failed"] == 0, reads
            assert run["goal"]["no_failed_reads"] is True
    # ap-southeast-1 cut off under refuse: its revoked tokens and its readers are refused
    # by the bound (503) while no revocation can reach it, never with another error.
    refused = runs[("isolate", "refuse")]
    assert set(refused["reads_in_cut_cell_during_cut"]["why"]) == {"HTTP 503"}
    assert refused["exposure_ms"]["ap-southeast-1"]["refused_503"] >= 1
    # with only the relays cut the direct path refuses every one by revocation (403)
    for mode in ("local-only", "refuse"):
        assert all(
            f["refused_403"] == f["credentials"] for f in runs[("relays", mode)]["exposure_ms"].values()
        )

"""bench/revocation.py at test size, run as a user runs it (`python -m bench.revocation
--quick`): real relay processes for 3 cells, 5% loss; every revocation reaches every
relay and every cell ledger, and the report carries every figure."""

from __future__ import annotations

import pytest

from bench.common import run_report


@pytest.mark.parametrize("observe", ["replay", "stream"])
def test_quick_revocation_bench_reaches_every_relay_and_ledger(observe: str) -> None:
    """Either way the bench learns the apply times (asked once the revocations have
    spread, or streamed as they happen), it sees every relay apply every revocation."""
    report = run_report("bench.revocation", "--quick", "--observe", observe, timeout=180)
    assert report["benchmark"] == "revocation" and report["observed_by"] == observe
    assert report["setup"]["relays"] == 9 and report["setup"]["loss"] == 0.05
    assert report["reached_every_relay"] == report["revocations"] == 10
    assert report["every_cell_ledger_holds_every_revocation"] is True
    assert set(report["exposure_ms"]) == {"p50", "p99", "max", "mean"}
    assert report["exposure_ms"]["p50"] <= report["exposure_ms"]["p99"] <= report["exposure_ms"]["max"]
    assert report["relay_cpu_ms_per_revocation"] is not None  # the relay processes' CPU was read
    sim = report["simulator"]["with_eager_push"][0]
    assert sim["nodes"] == 1000 and sim["rounds_max"] < 1000  # converged, not cut off

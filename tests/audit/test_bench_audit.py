"""bench/audit.py at test size, as a user runs it (`python -m bench.audit --quick`): a
complete JSON report; the figures are for `make bench`, not for assertions here."""

from __future__ import annotations

from pathlib import Path

from bench.common import run_report

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_a_complete_report() -> None:
    report = run_report("bench.audit", "--quick", "--duration", "0.5", "--max-requests", "500", timeout=120)
    assert report["benchmark"] == "audit"
    for operation in ("kv_v2_read", "kv_v2_write"):
        for name in ("audited", "unaudited", "audited_sync"):
            figures = report[operation][name]
            assert figures["requests"] > 0 and figures["errors"] == 0 and figures["requests_per_s"] > 0
    # One entry per read, two per write (before and after the engine), warm-up included.
    written = report["kv_v2_read"]["audited"]["requests"] + 2 * report["kv_v2_write"]["audited"]["requests"]
    assert report["audit_lines_written"] >= written
    assert isinstance(report["ratio_audited_to_unaudited"], float)
    assert isinstance(report["write_ratio_audited_to_unaudited"], float)
    assert isinstance(report["ratio_audited_sync_to_unaudited"], float)
    assert report["target"]["ratio_min"] == 0.8

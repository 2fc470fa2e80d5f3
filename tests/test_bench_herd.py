"""bench/herd.py at test size, run as a user runs it (`python -m bench.herd --quick`):
a complete JSON report, the targets met, no 5xx from the server during the herd."""

from __future__ import annotations

from pathlib import Path

from bench.common import run_report

ROOT = Path(__file__).resolve().parent.parent


def test_quick_herd_prints_a_report_meeting_the_targets() -> None:
    report = run_report("bench.herd", "--quick", timeout=60)
    assert report["benchmark"] == "herd"
    assert report["without_splay"]["peak_to_mean"] > 5
    assert report["with_splay_and_buckets"]["peak_to_mean"] <= 1.25
    assert report["wrapped_token_cache"]["saved_fraction"] >= 0.8
    assert report["server_5xx"] == 0 and report["meets_targets"] is True

"""bench/herd.py at test size, run as a user runs it (`python -m bench.herd --quick`):
a complete JSON report, the targets met, no 5xx from the server during the herd."""

from __future__ import annotations

from pathlib import Path

from bench.common import run_report

ROOT = Path(__file__).resolve().parent.parent


def test_quick_herd_prints_a_report_meeting_the_targets() -> None:
    report = run_report("bench.herd", "--quick", timeout=60)
    assert report["benchmark"] == "herd"
    # The plan is the watcher's own scheduling code: deterministic, so checked here.
    assert report["planned"]["without_splay"]["peak_to_mean"] > 5
    assert report["planned"]["with_splay_and_buckets"]["peak_to_mean"] <= 1.25
    # The measured rates depend on this machine's load: reported, not asserted.
    for name in ("without_splay", "with_splay_and_buckets"):
        real = report["real_requests"][name]
        assert real["requests"] == report["real_requests"]["sent_requests"]
        assert sum(real["statuses"].values()) == real["requests"]
        assert real["sent_peak_to_mean"]["peak_to_mean"] > 0
    assert set(report["peak_to_mean"]) == {"without_splay", "with_splay_and_buckets"}
    assert report["wrapped_token_cache"]["saved_fraction"] >= 0.8
    assert report["server_5xx"] == 0

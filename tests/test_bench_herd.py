"""bench/herd.py at test size, run as a user runs it (`python -m bench.herd --quick`):
a complete JSON report, the targets met, no 5xx from the server during the herd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_herd_prints_a_report_meeting_the_targets() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.herd", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["benchmark"] == "herd"
    assert report["without_splay"]["peak_to_mean"] > 5
    assert report["with_splay_and_buckets"]["peak_to_mean"] <= 1.25
    assert report["wrapped_token_cache"]["saved_fraction"] >= 0.8
    assert report["server_5xx"] == 0 and report["meets_targets"] is True

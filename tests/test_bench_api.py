"""bench/api.py's code path at test size, run as a user runs it: `python -m bench.api
--quick`, in its own process, against `keycell server --dev` only, with the built-in
Python load generator (`make test` installs neither wrk nor OpenBao; `make bench`
drives both). It must print a complete JSON report and stop every server it started;
the figures themselves are for `make bench`, not for assertions here. KV v2 read and
write, AppRole login and PKI issue all run, every answer a 2xx. Both modes run:
`--dev`, and `--data-dir` initialized and unsealed through sys/init and sys/unseal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.api import ISSUE_BODY, ISSUE_PATH, WRITE_KEYS_PER_THREAD, _lua_script, importtime_ms
from bench.common import run_report

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_against_keycell_prints_a_complete_report() -> None:
    report = run_report("bench.api", "--quick", "--targets", "keycell", "--load", "python", timeout=240)
    assert report["benchmark"] == "api"
    assert report["machine"]["cores"] >= 1
    assert report["load"]["generator"].startswith("python")
    assert set(report["servers"]) == {"keycell_dev", "keycell_durable"}
    assert report["load"]["modes"] == ["dev", "durable"]
    assert set(report["kv_v2"]) == {"dev", "durable"}
    for mode in ("dev", "durable"):
        assert set(report["kv_v2"][mode]) == {"keycell"}
        for op in ("read", "write"):
            figures = report["kv_v2"][mode]["keycell"][op]
            assert set(figures) == {
                "requests_per_s",
                "requests_per_s_rounds",
                "p50_ms",
                "p99_ms",
                "requests",
                "non_2xx",
                "errors",
            }
            assert len(figures["requests_per_s_rounds"]) == report["load"]["rounds"]
            assert figures["requests"] > 0 and figures["errors"] == 0 and figures["non_2xx"] == 0
            assert figures["requests_per_s"] > 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert report["goals"][f"keycell_write_non_2xx_{mode}_zero"] is True
        # AppRole login and PKI issue: the same figures, every answer a 2xx
        for op in ("approle_login", "pki_issue"):
            assert set(report[op][mode]) == {"keycell"}
            figures = report[op][mode]["keycell"]
            assert figures["requests"] > 0 and figures["errors"] == 0 and figures["non_2xx"] == 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
            assert report["goals"][f"keycell_{op}_non_2xx_{mode}_zero"] is True
    assert "ratios" not in report  # only when both servers ran
    cold = report["cold_start"]
    assert "keycell.functions.api.app" in cold
    for figures in cold.values():
        assert figures["import_wall_ms_median"] > 0
        assert figures["importtime_cumulative_ms_median"] > 0
        assert figures["target_ms"] == 300.0
        assert isinstance(figures["meets_target"], bool)


def test_unknown_target_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.api", "--quick", "--targets", "vault"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "targets are keycell and/or openbao" in done.stderr


def test_unknown_mode_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.api", "--quick", "--modes", "memory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "modes are dev and/or durable" in done.stderr


# The shape -X importtime prints: children before their importer, nested by indentation;
# a dotted module's parent packages are imported inside its own (nested) line.
IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       900 |        900 | site
import time:       100 |        100 | keycell
import time:       300 |        300 |     json
import time:       200 |        500 |     keycell.functions
import time:        50 |        550 |   keycell.functions.api
import time:       400 |      12000 | keycell.functions.api.app
"""


@pytest.mark.parametrize(
    ("module", "expected_ms"),
    [("keycell.functions.api.app", 12.1), ("keycell", 0.1)],
)
def test_importtime_sums_the_module_and_its_top_level_parents(module: str, expected_ms: float) -> None:
    assert importtime_ms(IMPORTTIME, module) == pytest.approx(expected_ms)


def test_wrk_scripts_carry_the_token_and_the_write_body() -> None:
    read = _lua_script("GET", "kc.token")
    write = _lua_script("POST", "kc.token")
    assert '"kc.token"' in read and '"kc.token"' in write
    assert '"password"' in write and f"local keys = {WRITE_KEYS_PER_THREAD}" in write
    assert 'local fixed_path = ""' in write  # KV writes spread over their paths
    issue = _lua_script("POST", "kc.token", ISSUE_PATH, ISSUE_BODY)
    assert f'local fixed_path = "{ISSUE_PATH}"' in issue and f"local body = '{ISSUE_BODY}'" in issue
    assert not re.search(r"__[A-Z_]+__", read + write + issue)  # every marker filled in

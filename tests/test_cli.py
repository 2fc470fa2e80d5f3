"""The `keycell` console script, driven as a user would drive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.cli import app
from keycell.control_plane.ledger import Key, Kind

runner = CliRunner()


def seeded(tmp_path: Path) -> str:
    path = tmp_path / "cell.db"
    ledger = SqliteLedger(path)
    for n in range(3):
        ledger.put_if(Key(Kind.SECRET_META, f"secret/app/{n}"), b"ciphertext-do-not-print", 0)
    ledger.put_if(Key(Kind.LEASE, "database/creds/app/1"), b"lease", 0)
    ledger.close()
    return f"sqlite://{path}"


def test_ledger_info_counts_live_items_per_kind(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ledger", "info", "--json", "--ledger", seeded(tmp_path)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)["items"]
    assert counts["secret-meta"] == 3 and counts["lease"] == 1 and counts["token"] == 0


def test_ledger_scan_pages_and_never_prints_values(tmp_path: Path) -> None:
    url = seeded(tmp_path)
    first = runner.invoke(
        app, ["ledger", "scan", "secret-meta", "--prefix", "secret/", "--limit", "2", "--ledger", url]
    )
    lines = [json.loads(line) for line in first.output.splitlines()]
    assert [line.get("path") for line in lines[:-1]] == ["secret/app/0", "secret/app/1"]
    cursor = lines[-1]["cursor"]
    second = runner.invoke(
        app, ["ledger", "scan", "secret-meta", "--prefix", "secret/", "--cursor", cursor, "--ledger", url]
    )
    assert json.loads(second.output.splitlines()[0])["path"] == "secret/app/2"
    assert "ciphertext" not in first.output + second.output


def test_ledger_get_reports_a_missing_item_with_exit_code_1(tmp_path: Path) -> None:
    url = seeded(tmp_path)
    found = runner.invoke(app, ["ledger", "get", "secret-meta", "secret/app/0", "--ledger", url])
    assert found.exit_code == 0 and json.loads(found.output)["version"] == 1
    missing = runner.invoke(app, ["ledger", "get", "secret-meta", "secret/none", "--ledger", url])
    assert missing.exit_code == 1
    assert "no live item" in missing.output


def test_bad_ledger_url_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ledger", "info", "--ledger", "postgres://nope"])
    assert result.exit_code == 2
    assert "unknown ledger scheme" in result.output


def test_bad_path_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ledger", "get", "lease", "bad\tpath", "--ledger", seeded(tmp_path)])
    assert result.exit_code == 2
    assert "U+0009" in result.output and "Traceback" not in result.output


def test_demo_keeps_its_promises(tmp_path: Path) -> None:
    # In its own process, as `make demo` runs it, at a reduced size: three cells, a
    # breach under partition, every promise checked by the demo itself.
    report = tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keycell",
            "demo",
            "--workdir",
            str(tmp_path),
            "--credentials",
            "90",
            "--secrets-per-cell",
            "2",
            "--partition-seconds",
            "2",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr  # whole: a traceback is long
    assert "all promises kept" in done.stdout
    assert "SoftHSM2 token per cell" in done.stdout  # make test installs SoftHSM2: real tokens are used
    assert "JWT-SVIDs from the agents" in done.stdout  # workloads attest through keycell agent
    summary = json.loads((tmp_path / "breach-report.json").read_text())
    # make test installs PostgreSQL: half the credentials are dynamic database users
    assert summary["credentials"] == 90 and summary["database_users"] == 45
    assert summary["readers"]["failed"] == 0
    assert summary["breach"]["prefixes"] == ["auth/jwt/login", "database/creds/payments"]
    # 45 phase-a tokens and 3 phase-b payments tokens per cell, each refused in every cell
    assert summary["stolen_tries"] == {"403": (45 + 9) * 3}
    assert summary["breach"]["revoked_now"] == 90 and summary["breach"]["rotated_now"] == 6
    exposure = summary["breach"]["exposure"]
    assert set(exposure) == {"us-east-1", "eu-west-1", "ap-southeast-1"}
    assert all(cell["revocations_held"] == cell["of"] == 90 for cell in exposure.values())
    # The demo cuts the relay mesh only: the breach runbook's direct path (breach.DirectFanout)
    # reaches the cut-off cell's API, so its stolen tokens are refused before the heal too.
    assert all(cell["accepted"] == 0 for cell in summary["during_partition"].values())
    # A database user is dropped by its own cell's lease revoker, partition or not.
    assert all(cell["db_accepted"] == 0 for cell in summary["during_partition"].values())
    _assert_both_phases(done.stdout, summary, stolen_b=9)
    page = report.read_text()
    assert page.count("<svg") == 2 and "<polyline" in page and "<script" not in page
    assert "Phase a:" in page and "Phase b:" in page
    assert page.count("kept") >= 10 and "BROKEN" not in page


def _assert_both_phases(stdout: str, summary: dict[str, object], stolen_b: int) -> None:
    """The two partitions the demo plays, as its JSON summary and promise rows tell them."""
    assert "stolen credentials usable in any cell more than 1 s after the revoke call: 0" in stdout
    assert "reads served in the cut-off cell during the cut" in stdout
    phases = summary["phases"]
    assert isinstance(phases, dict) and set(phases) == {"a", "b"}
    a, b = phases["a"], phases["b"]
    # a: relays cut, APIs reachable: the direct path delivered everything before the heal
    assert all(f["revocations_held"] == f["of"] for f in a["exposure_before_heal"].values())
    assert a["first_path"]["ap-southeast-1"].get("direct", 0) == a["revocations"]
    # b: nothing reaches the cut-off cell until the heal, yet its stale view refuses the
    # stolen payments tokens (503) while its readers keep reading; after the heal every
    # cell holds every revocation
    assert b["on_stale"] == "refuse" and b["bound_seconds"] == 1.0
    assert b["stolen_tokens"] == b["worked_before_cut"] == b["revoked"] == stolen_b
    assert b["exposure_before_heal"]["ap-southeast-1"]["revocations_held"] == 0
    assert set(b["freshness_in_cut_off_cell"]["peers"]) == {"us-east-1", "eu-west-1"}
    assert b["stolen_probe"]["ap-southeast-1"]["answers"].get("503", 0) > 0
    assert b["watched_token"]["refused_from_s"] is not None and b["watched_token"]["late"] == 0
    assert b["held_after_heal"] and all(
        f["revocations_held"] == f["of"] == stolen_b for f in b["exposure"].values()
    )
    assert b["reads_in_cut_off_cell"]["served"] > 0 and b["reads_in_cut_off_cell"]["failed"] == 0
    for phase in (a, b):
        assert all(cell["late"] == 0 and cell["tries"] > 0 for cell in phase["stolen_probe"].values())


def test_the_demo_keeps_its_promises_with_software_keys_and_plain_tokens(tmp_path: Path) -> None:
    # What a machine without SoftHSM2 and PostgreSQL runs: the software backend under
    # its banner, tokens from auth/token/create; the breach and its checks are the same.
    sizes = ["--credentials", "15", "--secrets-per-cell", "1", "--partition-seconds", "1"]
    plain = ["--software-keys", "--no-agents", "--no-databases"]
    done = subprocess.run(
        [sys.executable, "-m", "keycell", "demo", "--workdir", str(tmp_path), *sizes, *plain],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr  # whole: a traceback is long
    assert "NOT FIPS" in done.stdout.upper() and "all promises kept" in done.stdout
    summary = json.loads((tmp_path / "breach-report.json").read_text())
    assert summary["backend"] == "software" and summary["database_users"] == 0
    assert summary["breach"]["prefixes"] == ["auth/token/create"]
    assert summary["stolen_tries"] == {"403": (15 + 6) * 3}
    _assert_both_phases(done.stdout, summary, stolen_b=6)

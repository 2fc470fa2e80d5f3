"""cfn-lint on every synthesized CloudFormation template, and checkov over the AWS,
Azure and GCP stacks in one run: zero errors, zero failed checks, and every
suppression carries its reason.

checkov runs as an isolated tool (`uv tool run`): installed into the project it would
pull boto3 back to an old release. CI reaches PyPI, so the first run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file

from infra.aws.assembly import Assembly

REPO = Path(__file__).resolve().parents[2]
CHECKOV = "checkov==3.3.30"


def uv() -> str:
    found = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    assert Path(found).exists(), "uv is needed to run checkov as a tool (make setup installs it)"
    return found


def test_cfn_lint_finds_no_error_in_any_template(aws_assembly: Assembly) -> None:
    files = aws_assembly.template_files()
    assert len(files) == 1 + len(aws_assembly.cells.on("aws"))
    for path in files:
        regions = [
            next(
                s.region
                for s in [aws_assembly.global_stack, *aws_assembly.stacks]
                if s.stack_name == path.name.removesuffix(".template.json")
            )
        ]
        matches = lint_file(path, config=ManualArgs(regions=regions))
        errors = [f"{m.rule.id} {m.message} ({m.path_string})" for m in matches if m.rule.severity == "error"]
        assert errors == [], path.name


@pytest.fixture(scope="module")
def checkov_reports(
    aws_assembly: Assembly, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """One checkov process per framework, each on its own folder, side by side."""
    folders = {
        "cloudformation": aws_assembly.outdir,
        "arm": REPO / "infra" / "azure",
        "terraform": REPO / "infra" / "gcp",
    }
    workdir = tmp_path_factory.mktemp("checkov")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    # Install the tool once, before three processes race to do it.
    subprocess.run(
        [uv(), "tool", "run", "--from", CHECKOV, "checkov", "--version"],
        env=env,
        check=True,
        capture_output=True,
        timeout=240,
    )
    running = {}
    for framework, folder in folders.items():
        command = [
            uv(), "tool", "run", "--from", CHECKOV, "checkov", "-d", str(folder), "--framework", framework,
            "--skip-download",  # offline: no guideline links from Prisma Cloud
            "--compact", "--output", "json",
        ]  # fmt: skip
        out = (workdir / f"{framework}.json").open("w")
        running[framework] = (
            subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True, env=env),
            out,
        )
    text = ""
    for framework, (process, out) in running.items():
        _, stderr = process.communicate(timeout=280)
        out.close()
        # checkov exits 1 when a check fails; anything else is a crash.
        assert process.returncode in (0, 1), f"checkov ({framework}) crashed: {stderr[-2000:]}"
        text += (workdir / f"{framework}.json").read_text()
    return merge_reports(text)


def merge_reports(text: str) -> dict[str, dict[str, Any]]:
    """checkov prints one JSON document per directory (a report, or a list of them, per
    framework); merged here into one report per framework."""
    merged: dict[str, dict[str, Any]] = {}
    decoder, at = json.JSONDecoder(), 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        document, at = decoder.raw_decode(text, at)
        for report in document if isinstance(document, list) else [document]:
            into = merged.setdefault(
                report["check_type"],
                {"passed": 0, "parsing_errors": 0, "failed_checks": [], "skipped_checks": []},
            )
            into["passed"] += report["summary"]["passed"]
            into["parsing_errors"] += report["summary"]["parsing_errors"]
            into["failed_checks"] += report["results"].get("failed_checks", [])
            into["skipped_checks"] += report["results"].get("skipped_checks", [])
    return merged


@pytest.mark.parametrize("framework", ["cloudformation", "arm", "terraform"])
def test_checkov_finds_no_failed_check(checkov_reports: dict[str, dict[str, Any]], framework: str) -> None:
    report = checkov_reports[framework]
    failed = [f"{c['check_id']} {c['check_name']} on {c['resource']}" for c in report["failed_checks"]]
    assert failed == []
    assert report["parsing_errors"] == 0
    assert report["passed"] > 10  # it really looked at the stacks


def test_every_checkov_suppression_says_why(checkov_reports: dict[str, dict[str, Any]]) -> None:
    skipped = [c for r in checkov_reports.values() for c in r["skipped_checks"]]
    assert skipped, "the stacks carry a few suppressions; none found means checkov did not read them"
    for check in skipped:
        assert len((check.get("check_result", {}).get("suppress_comment") or "").strip()) > 20, check[
            "check_id"
        ]

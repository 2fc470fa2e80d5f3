"""`keycell entry create|list|delete` against a real `keycell server`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from keycell.cli import app
from tests.identity.conftest import ROOT, TRUST_DOMAIN, Deployment

runner = CliRunner()


def entry(deployment: Deployment, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["entry", *args, "--address", deployment.url, "--token", ROOT])
    return result.exit_code, result.output


def test_entries_are_created_listed_and_deleted_from_the_command_line(deployment: Deployment) -> None:
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/cli/made"
    code, out = entry(
        deployment,
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        deployment.agent_id,
        "--selector",
        "unix:uid:4242",
        "-s",
        "unix:gid:4242",
        "--jwt-svid-ttl",
        "120",
        "--json",
    )
    assert code == 0, out
    made = json.loads(out)
    assert made["selectors"] == ["unix:gid:4242", "unix:uid:4242"] and made["jwt_svid_ttl"] == 120

    code, out = entry(deployment, "list", "--json")
    assert code == 0, out
    assert made["id"] in {e["id"] for e in json.loads(out)}

    code, out = entry(deployment, "delete", made["id"])
    assert code == 0, out
    code, out = entry(deployment, "list", "--json")
    assert made["id"] not in {e["id"] for e in json.loads(out)}


def test_a_bad_entry_is_refused_with_a_clear_error(deployment: Deployment) -> None:
    code, out = entry(
        deployment,
        "create",
        "--spiffe-id",
        "https://not-spiffe",
        "--parent-id",
        deployment.agent_id,
        "-s",
        "unix:uid:1",
    )
    assert code == 1
    assert "spiffe_id" in out and "spiffe://" in out


def test_entry_commands_need_a_token_with_the_right_policy(deployment: Deployment) -> None:
    result = runner.invoke(app, ["entry", "list", "--address", deployment.url, "--token", "kc.not-a-token"])
    assert result.exit_code == 1
    assert "permission denied" in result.output.lower()

"""The AWS relay task gets its mTLS material (keycell/relay/tls.py) as ECS secrets from
the Secrets Manager secret named by the cell's `relay_tls_secret`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from infra.aws.assembly import synthesize
from keycell.deployment import RELAY_TLS_FIELDS, load_cell_set


def test_the_relay_task_reads_its_tls_settings_from_the_named_secret(tmp_path: Path) -> None:
    cells = load_cell_set()
    aws = [c for c in cells.cells if c.cloud == "aws"][:1]
    assert aws, "infra/cells.toml has an AWS cell"
    cell = dataclasses.replace(aws[0], relay_tls_secret="keycell/relay-tls")
    assembly = synthesize(dataclasses.replace(cells, cells=(cell,)), tmp_path)
    stack = json.loads((assembly.outdir / f"keycell-{cell.id}.template.json").read_text())
    tasks = [r for r in stack["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"]
    (container,) = tasks[0]["Properties"]["ContainerDefinitions"]
    secrets = {s["Name"]: json.dumps(s["ValueFrom"]) for s in container["Secrets"]}
    assert set(secrets) == set(RELAY_TLS_FIELDS)
    for env, field in RELAY_TLS_FIELDS.items():
        assert "keycell/relay-tls" in secrets[env] and f":{field}::" in secrets[env]
    env_names = {e["Name"] for e in container["Environment"]}
    assert not env_names & set(RELAY_TLS_FIELDS)  # never as plain environment values

"""One cell set drives every cloud: the parameters rendered for an Azure cell fit the
ARM template, those for a GCP cell fit the Terraform module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2 import SerializationOptions
from typer.testing import CliRunner

from keycell.cli import app
from keycell.deployment import CellConfigError, arm_parameters, parse_cell_set, terraform_variables

INFRA = Path(__file__).resolve().parents[2] / "infra"
MIXED = """
[deployment]
name = "kc"
trust_domain = "example.org"
home_region = "eu-west-1"
dns_zone = "kc.example.com"

[defaults]
relays = 4

[[cells]]
id = "eu"
cloud = "aws"
region = "eu-west-1"
cidr = "10.10.0.0/16"

[[cells]]
id = "weu"
cloud = "azure"
region = "westeurope"
cidr = "10.50.0.0/16"
relays = 2

[[cells]]
id = "euw"
cloud = "gcp"
region = "europe-west1"
cidr = "10.60.0.0/16"
"""


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    path = tmp_path / "cells.toml"
    path.write_text(MIXED)
    return path


def arm_declared() -> dict[str, dict[str, Any]]:
    declared: dict[str, dict[str, Any]] = json.loads((INFRA / "azure" / "cell.json").read_text())[
        "parameters"
    ]
    return declared


def tf_declared() -> dict[str, dict[str, Any]]:
    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    with (INFRA / "gcp" / "variables.tf").open() as f:
        parsed = hcl2.load(f, serialization_options=options)
    return {k: v for block in parsed["variable"] for k, v in block.items()}


def test_an_azure_cells_parameters_fit_the_arm_template(mixed: Path) -> None:
    from keycell.deployment import load_cell_set

    cells = load_cell_set(mixed)
    extra = {
        "hsmAdministrators": ["11111111-2222-3333-4444-555555555555"],
        "functionPackageUrl": "https://x/p.zip",
    }
    rendered = arm_parameters(cells, cells.cell("weu"), **extra)["parameters"]
    declared = arm_declared()
    assert set(rendered) <= set(declared)
    assert {k for k, v in declared.items() if "defaultValue" not in v} <= set(rendered)
    for name, given in rendered.items():
        expected = {"int": int, "string": str, "array": list}[declared[name]["type"]]
        assert isinstance(given["value"], expected), name
    assert rendered["relays"]["value"] == 2
    assert rendered["addressSpace"]["value"] == "10.50.0.0/16"
    assert rendered["relayPeers"]["value"] == "relay.eu.kc.example.com:7946,relay.euw.kc.example.com:7946"


def test_a_gcp_cells_variables_fit_the_terraform_module(mixed: Path) -> None:
    from keycell.deployment import load_cell_set

    cells = load_cell_set(mixed)
    rendered = terraform_variables(cells, cells.cell("euw"), project="kc-prod", vpc_connector="projects/p/c")
    declared = tf_declared()
    assert set(rendered) <= set(declared)
    assert {k for k, v in declared.items() if "default" not in v} <= set(rendered)
    assert rendered["relays"] == 4
    assert rendered["relay_peers"] == ["relay.eu.kc.example.com:7946", "relay.weu.kc.example.com:7946"]


def test_parameters_are_refused_for_a_cell_of_another_cloud(mixed: Path) -> None:
    from keycell.deployment import load_cell_set

    cells = load_cell_set(mixed)
    with pytest.raises(CellConfigError, match="runs on aws, not azure"):
        arm_parameters(cells, cells.cell("eu"))
    with pytest.raises(CellConfigError, match="runs on azure, not gcp"):
        terraform_variables(cells, cells.cell("weu"))


def test_keycell_cells_params_prints_them(mixed: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["cells", "params", "euw", "--cells", str(mixed), "--set", "project=kc-prod"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["project"] == "kc-prod"
    result = runner.invoke(app, ["cells", "params", "eu", "--cells", str(mixed)])
    assert result.exit_code == 1
    assert "AWS cell" in result.output
    result = runner.invoke(app, ["cells", "params", "nowhere", "--cells", str(mixed)])
    assert result.exit_code == 1
    assert "no cell 'nowhere'" in result.output


def test_the_mixed_set_parses_with_the_same_rules() -> None:
    import tomllib

    cells = parse_cell_set(tomllib.loads(MIXED))
    assert [c.cloud for c in cells.cells] == ["aws", "azure", "gcp"]

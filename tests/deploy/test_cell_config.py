"""The cell-set file: the repository's parses, and a mistake in one is refused with
the place named, before anything is synthesized or deployed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keycell.cli import app
from keycell.deployment import CellConfigError, load_cell_set, parse_cell_set


def base() -> dict[str, Any]:
    return {
        "deployment": {
            "name": "kc",
            "trust_domain": "t.example",
            "home_region": "eu-west-1",
            "dns_zone": "kc.example",
        },
        "defaults": {
            "relays": 4,
            "rotation_schedules": [{"name": "daily", "expression": "rate(1 day)", "prefix": "db/"}],
        },
        "cells": [
            {"id": "eu", "cloud": "aws", "region": "eu-west-1", "cidr": "10.1.0.0/16"},
            {"id": "us", "cloud": "aws", "region": "us-east-1", "cidr": "10.2.0.0/16", "relays": 2},
        ],
    }


def test_the_repositorys_cell_set_is_three_aws_regions() -> None:
    cells = load_cell_set()
    assert cells.name == "keycell"
    assert [(c.id, c.region) for c in cells.on("aws")] == [
        ("eu", "eu-west-1"),
        ("us", "us-east-1"),
        ("ap", "ap-southeast-2"),
    ]
    assert cells.home_region == "eu-west-1"
    assert all(c.rotation_schedules for c in cells.cells)


def test_defaults_apply_to_every_cell_and_a_cell_overrides_them() -> None:
    cells = parse_cell_set(base())
    assert cells.cell("eu").relays == 4
    assert cells.cell("us").relays == 2
    assert cells.cell("us").rotation_schedules[0].prefix == "db/"
    assert cells.table_name(cells.cell("eu")) == "kc-eu-ledger"
    assert cells.relay_host(cells.cell("us")) == "relay.us.kc.example"


def test_the_path_comes_from_the_argument_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "cells.toml"
    other.write_text(
        '[deployment]\nname="x"\ntrust_domain="t"\nhome_region="us-west-2"\ndns_zone="z.example"\n'
        '[[cells]]\nid="w"\ncloud="aws"\nregion="us-west-2"\ncidr="10.9.0.0/16"\n'
    )
    monkeypatch.setenv("KEYCELL_CELLS", str(other))
    assert load_cell_set().name == "x"
    assert load_cell_set(Path(__file__).resolve().parents[2] / "infra" / "cells.toml").name == "keycell"


def edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    raw = base()
    target: Any = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "names"),
    [
        (("cells", 0, "relay"), 3, "unknown key(s) relay"),
        (("cells", 0, "relays"), "three", "relays: expected int"),
        (("cells", 0, "relays"), 0, "relays: must be positive"),
        (("cells", 0, "relays"), True, "relays: expected int"),
        (("cells", 0, "cloud"), "oracle", "cloud 'oracle'"),
        (("cells", 0, "id"), "EU", "id: use 1-20 lowercase"),
        (("cells", 0, "region"), "Europe", "region 'Europe'"),
        (("cells", 0, "cidr"), "10.0.0.0/8", "a /16 to /20"),
        (("cells", 0, "cidr"), "10.1.0.0/8", "has host bits set"),
        (("cells", 0, "cidr"), "not-a-range", "not an address range"),
        (("cells", 1, "cidr"), "10.1.128.0/17", "overlapping cidr"),
        (("cells", 1, "id"), "eu", "cell ids must differ"),
        (("cells", 0, "rotation_handler"), "rotate", "a dotted path"),
        (("cells", 0, "key_custody"), "vault", "key_custody 'vault'"),
        (("defaults", "rotation_schedules"), [{"name": "x", "expression": "every day"}], "rate(...) or cron"),
        (("deployment", "home_region"), "ap-south-1", "home_region ap-south-1 has no AWS cell"),
        (("deployment", "account"), 123456789012, "12-digit AWS account id as a string"),
        (("cells",), [], "at least one [[cells]]"),
    ],
)
def test_a_mistake_is_refused_naming_where_it_is(path: tuple[Any, ...], value: Any, names: str) -> None:
    with pytest.raises(CellConfigError) as refused:
        parse_cell_set(edit(path, value), source=Path("cells.toml"))
    assert names in str(refused.value)
    assert str(refused.value).startswith("cells.toml")


def test_a_missing_or_broken_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(CellConfigError, match="no such cell set file"):
        load_cell_set(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[deployment\n")
    with pytest.raises(CellConfigError, match="not valid TOML"):
        load_cell_set(broken)


def test_keycell_cells_show_prints_the_parsed_cell_set_as_json() -> None:
    result = CliRunner().invoke(app, ["cells", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [c["id"] for c in shown["cells"]] == ["eu", "us", "ap"]
    assert shown["cells"][0]["rotation_schedules"][0]["expression"] == "rate(1 day)"


def test_keycell_cells_show_exits_1_naming_the_mistake(tmp_path: Path) -> None:
    broken = tmp_path / "cells.toml"
    broken.write_text(
        '[deployment]\nname="x"\ntrust_domain="t"\nhome_region="us-west-2"\ndns_zone="z.example"\n'
        '[[cells]]\nid="w"\ncloud="aws"\nregion="us-west-2"\ncidr="10.9.0.0/16"\nrelais=3\n'
    )
    result = CliRunner().invoke(app, ["cells", "show", str(broken)])
    assert result.exit_code == 1
    assert "unknown key(s) relais" in result.output

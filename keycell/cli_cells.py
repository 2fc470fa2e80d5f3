"""`keycell cells`: read and check the deployment's cell set (infra/cells.toml)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keycell.deployment import CellConfigError, arm_parameters, load_cell_set, terraform_variables

cells_app = typer.Typer(help="Check the deployment's cell set (infra/cells.toml).", no_args_is_help=True)


@cells_app.command("show")
def show(
    path: Annotated[
        Path | None, typer.Argument(help="cell set file (default: $KEYCELL_CELLS, then infra/cells.toml)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the parsed cell set as JSON")] = False,
) -> None:
    """Parse and check the cell set; print its cells (exit 1 naming the mistake if any)."""
    try:
        cells = load_cell_set(path)
    except CellConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        data = asdict(cells)
        data["source"] = str(cells.source)
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"{cells.name} ({cells.source}), home region {cells.home_region}")
    for column in ("cell", "cloud", "region", "cidr", "relays", "API rate/burst", "ledger table"):
        table.add_column(column)
    for c in cells.cells:
        table.add_row(
            c.id,
            c.cloud,
            c.region,
            c.cidr,
            str(c.relays),
            f"{c.api_rate_limit:g}/{c.api_burst}",
            cells.table_name(c),
        )
    Console().print(table)


@cells_app.command("params")
def params(
    cell_id: Annotated[str, typer.Argument(help="the cell (an Azure or GCP cell)")],
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="NAME=VALUE the cell set does not hold (JSON values allowed), repeatable"),
    ] = None,
    path: Annotated[Path | None, typer.Option("--cells", help="cell set file")] = None,
) -> None:
    """Print the deployment parameters of an Azure cell (ARM parameters file) or a GCP
    cell (Terraform .tfvars.json), taken from the cell set."""
    try:
        cells = load_cell_set(path)
        cell = cells.cell(cell_id)
    except (CellConfigError, KeyError) as exc:
        typer.echo(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", err=True)
        raise typer.Exit(1) from None
    extra: dict[str, object] = {}
    for setting in settings or []:
        name, sep, raw = setting.partition("=")
        if not sep or not name:
            typer.echo(f"error: --set {setting!r}: use NAME=VALUE", err=True)
            raise typer.Exit(2)
        try:
            extra[name] = json.loads(raw)
        except json.JSONDecodeError:
            extra[name] = raw
    if cell.cloud == "azure":
        rendered = arm_parameters(cells, cell, **extra)
    elif cell.cloud == "gcp":
        rendered = terraform_variables(cells, cell, **extra)
    else:
        typer.echo(
            f"error: cell {cell.id} is an AWS cell: its parameters are the CDK app's (infra/aws)", err=True
        )
        raise typer.Exit(1)
    typer.echo(json.dumps(rendered, indent=2))

"""`keycell cells`: read and check the deployment's cell set (infra/cells.toml)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keycell.deployment import CellConfigError, load_cell_set

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

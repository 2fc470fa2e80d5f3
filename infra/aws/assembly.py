"""Synthesize the AWS deployment into a folder, for tests and linters (no AWS account,
no network): `python -m infra.aws.assembly OUTDIR [CELLS.toml]`."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.aws.stacks import CellStack, GlobalStack, build_app
from keycell.deployment import CellSet, load_cell_set


@dataclass
class Assembly:
    cells: CellSet
    outdir: Path
    global_stack: GlobalStack
    stacks: list[CellStack]

    def template(self, stack_name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.outdir / f"{stack_name}.template.json").read_text())
        return loaded

    def template_files(self) -> list[Path]:
        return sorted(self.outdir.glob("*.template.json"))


def synthesize(cells: CellSet, workdir: Path) -> Assembly:
    """CloudFormation templates for `cells` under `workdir/cdk.out`. chalice.cdk packages
    the API under the working directory (chalice.out/), so this runs inside `workdir`."""
    import aws_cdk as cdk

    outdir = workdir / "cdk.out"
    with contextlib.chdir(workdir):
        app, global_stack, stacks = build_app(cells, cdk.App(outdir=str(outdir)))
        app.synth()
    return Assembly(cells, outdir, global_stack, stacks)


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True, exist_ok=True)
    built = synthesize(load_cell_set(sys.argv[2] if len(sys.argv) > 2 else None), target)
    print("\n".join(str(p) for p in built.template_files()))

"""The CDK app: `cdk synth` / `cdk deploy --all` from this folder (see cdk.json).

The cell set comes from `$KEYCELL_CELLS` or `infra/cells.toml`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script by the CDK CLI: make the repository importable (infra.aws.stacks).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from infra.aws.stacks import build_app
from keycell.deployment import load_cell_set

app, _, _ = build_app(load_cell_set())
app.synth()

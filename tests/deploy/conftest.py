"""The AWS deployment synthesized once for the session (about 10 s: aws-cdk-lib runs in
Node.js), shared by the assertion tests and the linters."""

from __future__ import annotations

import pytest

from infra.aws.assembly import Assembly, synthesize
from keycell.deployment import load_cell_set


@pytest.fixture(scope="session")
def aws_assembly(tmp_path_factory: pytest.TempPathFactory) -> Assembly:
    return synthesize(load_cell_set(), tmp_path_factory.mktemp("cdk"))

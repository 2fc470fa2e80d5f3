"""Which credential targets and database plugins a cell's processes have, from the
environment (called by keycell.functions.wiring for every cell process).

  KEYCELL_TARGET_POSTGRES   admin DSN of a PostgreSQL whose roles rotate ("postgres" target)
  KEYCELL_TARGET_AWS_IAM    1: rotate IAM access keys ("aws_iam" target; AWS_ENDPOINT_URL honoured)
  The "generic" target is always there; the database engine always has
  `postgresql-database-plugin`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from keycell.adapters.targets.generic import GenericTarget


def install(services: Any, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    from keycell.adapters.targets.postgres import PostgresPlugin, PostgresTarget

    services.database.register_plugin("postgresql-database-plugin", PostgresPlugin)
    services.rotator.targets["generic"] = GenericTarget()
    if env.get("KEYCELL_TARGET_POSTGRES"):
        services.rotator.targets["postgres"] = PostgresTarget(env["KEYCELL_TARGET_POSTGRES"])
    if env.get("KEYCELL_TARGET_AWS_IAM") == "1":
        from keycell.adapters.targets.aws_iam import AwsIamTarget

        services.rotator.targets["aws_iam"] = AwsIamTarget(
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

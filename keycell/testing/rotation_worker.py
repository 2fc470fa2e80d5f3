"""A process that rotates a list of secrets in a cell's sqlite ledger, for the crash
test: killed at random points, restarted, it must finish every rotation exactly once.

    python -m keycell.testing.rotation_worker --db PATH --share HEX --run RUN --names FILE
        [--step-delay-ms N]

Each secret is rotated under the token `RUN-<index>`, so a restart that meets a
rotation in flight finishes it, and one already done is skipped. The software KEK
lives inside the cell's barrier. `--step-delay-ms` sleeps a random time up to N after
each step, so kills land in every step.
"""

from __future__ import annotations

import argparse
import random
import time

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.adapters.targets.generic import GenericTarget
from keycell.adapters.targets.postgres import PostgresTarget
from keycell.control_plane.rotation import CredentialTarget, Rotator, Step
from keycell.control_plane.services import CellServices


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--share", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--names", required=True)
    parser.add_argument("--step-delay-ms", type=float, default=0.0)
    parser.add_argument("--postgres", default="", help="admin DSN: also rotate with the postgres target")
    args = parser.parse_args(argv)
    services = CellServices(SqliteLedger(args.db), lambda barrier: SoftwareKeyBackend(store=barrier))
    services.seal.unseal(args.share)
    services.after_unseal()
    delay = args.step_delay_ms / 1000

    def pause(name: str, token: str, step: Step) -> None:
        if delay:
            time.sleep(random.uniform(0, delay))  # noqa: S311 - timing jitter, not a secret

    targets: dict[str, CredentialTarget] = {"generic": GenericTarget()}
    if args.postgres:
        targets["postgres"] = PostgresTarget(args.postgres, pool_size=1)
    rotator = Rotator(services.rotation_store, targets, on_step=pause)
    print("STARTED", flush=True)  # the crash test times its kill from here
    with open(args.names) as names:
        for index, name in enumerate(line.strip() for line in names):
            rotator.rotate(name, f"{args.run}-{index}")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()

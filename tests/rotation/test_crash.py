"""The crash test: a process rotating 200 secrets is killed (SIGKILL) at random points
and restarted until it finishes. Afterwards no rotation is lost, none is duplicated,
and every secret has exactly one CURRENT version."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.adapters.targets.generic import GenericTarget
from keycell.adapters.targets.postgres import PostgresTarget
from keycell.control_plane.ledger import Kind, iter_prefix
from keycell.control_plane.services import CellServices
from keycell.testing.postgres import PostgresServer
from tests.rotation.conftest import pg_login_works, unique

SECRETS = 200
RUN = "crash1"


def open_cell_services(db: Path) -> tuple[CellServices, str]:
    services = CellServices(SqliteLedger(db), lambda barrier: SoftwareKeyBackend(store=barrier))
    share = services.seal.init(1, 1).shares_hex[0]
    services.seal.unseal(share)
    services.after_unseal()
    return services, share


def run_until_done(
    command: list[str], services: CellServices, prefix: str, seed: int
) -> tuple[int, set[str]]:
    """Start the worker, SIGKILL it after a random time, again and again until it
    finishes. Returns the kills and the step progress found in flight after them."""
    rng = random.Random(seed)
    kills = 0
    caught_in_flight: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert worker.stdout is not None
        # Time the kill from the moment the worker starts rotating, not from its launch:
        # interpreter start-up varies with the machine's load.
        started = worker.stdout.readline()
        try:
            out, err = worker.communicate(timeout=rng.uniform(0.1, 0.9))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            kills += 1
            caught_in_flight |= {
                s.progress or "none" for s in services.rotation_store.states(prefix) if s.in_flight
            }
            continue
        assert worker.returncode == 0, err.decode()[-2000:]
        assert started.strip() == b"STARTED" and out.strip() == b"DONE"
        return kills, caught_in_flight
    raise AssertionError("the worker never finished")


def test_killed_at_random_points_postgres_rotations_finish_exactly_once_on_the_database(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    services, share = open_cell_services(tmp_path / "cell.db")
    services.rotator.targets["postgres"] = PostgresTarget(postgres.dsn(), pool_size=1)
    tag = unique("crashpg")
    names = [f"{tag}_{i:02d}" for i in range(20)]
    for name in names:
        services.rotator.enroll(services.rotation_store, name, target="postgres", params={"username": name})
    (tmp_path / "names").write_text("\n".join(names) + "\n")
    command = [
        sys.executable, "-m", "keycell.testing.rotation_worker", "--db", str(tmp_path / "cell.db"), "--share", share,
        "--run", RUN, "--names", str(tmp_path / "names"), "--step-delay-ms", "20", "--postgres", postgres.dsn(),
    ]  # fmt: skip
    kills, _ = run_until_done(command, services, tag, seed=11)
    assert kills >= 1
    for index, name in enumerate(names):
        state = services.rotation_store.state(name)
        assert state.rotations == 1 and state.current == f"{RUN}-{index}" and state.in_flight is None
        current = services.rotation_store.value(name, state.current)
        previous = services.rotation_store.value(name, state.previous or "")
        # Exactly one rotation on the database too: the clone took over, the base user still works.
        assert current["username"] == f"{name}_clone" and previous["username"] == name
        assert pg_login_works(current) and pg_login_works(previous)


def test_killed_at_random_points_200_rotations_finish_exactly_once(tmp_path: Path) -> None:
    services, share = open_cell_services(tmp_path / "cell.db")
    services.rotator.targets["generic"] = GenericTarget()
    names = [f"crash/{i:03d}" for i in range(SECRETS)]
    initial = {}
    for name in names:
        services.rotator.enroll(services.rotation_store, name, target="generic", params={})
        initial[name] = services.rotation_store.state(name).current
    (tmp_path / "names").write_text("\n".join(names) + "\n")
    command = [
        sys.executable, "-m", "keycell.testing.rotation_worker", "--db", str(tmp_path / "cell.db"), "--share", share,
        "--run", RUN, "--names", str(tmp_path / "names"), "--step-delay-ms", "2",
    ]  # fmt: skip
    kills, caught_in_flight = run_until_done(command, services, "crash/", seed=7)
    assert kills >= 3, "the test must really kill the worker mid-run"
    for index, name in enumerate(names):
        state = services.rotation_store.state(name)
        assert state.rotations == 1, name  # none lost, none duplicated
        assert state.current == f"{RUN}-{index}" and state.previous == initial[name]
        assert state.pending is None and state.in_flight is None
        versions = [
            i.key.path for i in iter_prefix(services.ledger, Kind.SECRET_VERSION, f"rotation/{name}#")
        ]
        assert len(versions) == 2
        assert services.rotation_store.value(name, state.current)["password"]
    # Kills landed inside rotations (between steps), not only between them.
    assert caught_in_flight, "no kill landed inside a rotation"
    print(f"kills={kills} in-flight steps seen={sorted(caught_in_flight)}")

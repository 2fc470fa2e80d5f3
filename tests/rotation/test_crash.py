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
from keycell.control_plane.ledger import Kind, iter_prefix
from keycell.control_plane.services import CellServices

SECRETS = 200
RUN = "crash1"


def test_killed_at_random_points_200_rotations_finish_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "cell.db"
    services = CellServices(SqliteLedger(db), lambda barrier: SoftwareKeyBackend(store=barrier))
    init = services.seal.init(1, 1)
    share = init.shares_hex[0]
    services.seal.unseal(share)
    services.after_unseal()
    services.rotator.targets["generic"] = GenericTarget()
    names = [f"crash/{i:03d}" for i in range(SECRETS)]
    initial = {}
    for name in names:
        services.rotator.enroll(services.rotation_store, name, target="generic", params={})
        initial[name] = services.rotation_store.state(name).current
    (tmp_path / "names").write_text("\n".join(names) + "\n")
    command = [
        sys.executable, "-m", "keycell.testing.rotation_worker", "--db", str(db), "--share", share,
        "--run", RUN, "--names", str(tmp_path / "names"), "--step-delay-ms", "4",
    ]  # fmt: skip
    rng = random.Random(7)
    kills = 0
    caught_in_flight: set[str] = set()  # the step progress found in flight after each kill
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = worker.communicate(timeout=rng.uniform(0.6, 1.6))  # the interpreter starts in ~0.5 s
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            kills += 1
            caught_in_flight |= {
                s.progress or "none" for s in services.rotation_store.states("crash/") if s.in_flight
            }
            continue
        assert worker.returncode == 0, err.decode()[-2000:]
        assert out.strip() == b"DONE"
        break
    else:
        raise AssertionError("the worker never finished")
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

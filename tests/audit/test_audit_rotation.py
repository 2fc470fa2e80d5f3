"""Rotation steps are audit events: a rotation through the API leaves, besides the
HTTP entries, one `rotation-step` event per step (create, set, test, finish) with the
secret's name and the request token, never a value; an auditor that cannot record a
step stops the rotation with a 503, and the same token finishes it later, once."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from keycell.control_plane.audit import Auditor, FileSink, verify_files
from keycell.functions.wiring import audit_rotation_steps
from tests.audit.conftest import CELL, call, open_router


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_each_rotation_step_is_one_event(tmp_path: Path) -> None:
    trail = tmp_path / "audit.log"
    router = open_router(tmp_path, trail)
    assert call(router, "POST", "rotation/secrets/db/app", {"target": "generic"}).status == 200
    rotated = call(router, "POST", "rotation/rotate/db/app", {"token": "t-0001"})
    assert rotated.status == 200, rotated.body
    value = router.services.rotation_store.value("db/app", "t-0001")
    steps = [e["event"] for e in entries(trail) if e["type"] == "event"]
    assert [(s["kind"], s["secret"], s["token"], s["step"]) for s in steps] == [
        ("rotation-step", "db/app", "t-0001", step)
        for step in ("createSecret", "setSecret", "testSecret", "finishSecret")
    ]
    text = trail.read_text()
    assert all(str(v) not in text for v in value.values())
    assert verify_files([str(trail)])[1] == []


class BrokenSink:
    name = "file"

    def lock(self) -> Any:
        return nullcontext()

    def write(self, lines: bytes, entries: Any) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        pass


def test_a_step_that_cannot_be_recorded_stops_the_rotation_until_retried(tmp_path: Path) -> None:
    router = open_router(tmp_path, None)
    services = router.services
    assert call(router, "POST", "rotation/secrets/svc", {"target": "generic"}).status == 200
    audit_rotation_steps(services, Auditor(services.ledger, services.barrier, CELL, [BrokenSink()]))
    stopped = call(router, "POST", "rotation/rotate/svc", {"token": "t-0002"})
    assert stopped.status == 503 and "audit" in stopped.body["errors"][0]  # type: ignore[index]
    assert services.rotation_store.state("svc").current != "t-0002"
    trail = tmp_path / "audit.log"
    services.rotator.on_step = None
    audit_rotation_steps(services, Auditor(services.ledger, services.barrier, CELL, [FileSink(str(trail))]))
    assert call(router, "POST", "rotation/rotate/svc", {"token": "t-0002"}).status == 200
    state = services.rotation_store.state("svc")
    assert state.current == "t-0002" and state.rotations == 1

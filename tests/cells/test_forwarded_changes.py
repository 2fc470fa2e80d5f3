"""Every KV change to a secret homed elsewhere is forwarded to its home (sealed to the
home cell's key, through the relays, over real gRPC), applied there CP with Vault's
check-and-set and version rules, and replicated back; a home that cannot be reached
refuses it with 503 naming the home, and nothing changes anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from keycell.cells.agent import CellTiming
from keycell.cells.mesh import Mesh
from keycell.control_plane.ledger import Key, Kind

CELLS = ("a", "b", "c")
SECRET = "fwd/db"


def metadata(mesh: Mesh, cell: str, secret: str = SECRET) -> dict[str, Any] | None:
    reply = mesh.request(cell, "GET", f"secret/metadata/{secret}")
    return reply.body["data"] if reply.status == 200 else None  # type: ignore[index]


def version_item(mesh: Mesh, cell: str, number: int, secret: str = SECRET) -> object:
    return mesh.api_services[cell].barrier.get(Key(Kind.SECRET_VERSION, f"secret/{secret}#{number:010d}"))


def everywhere(mesh: Mesh, check: Any, timeout: float = 10) -> bool:
    return mesh.wait_for(lambda: all(check(cell) for cell in CELLS), timeout)


def homed_in_a(mesh: Mesh) -> None:
    for value in ("1", "2"):
        assert mesh.write("a", SECRET, {"v": value, "keep": "k"}).status == 200
    assert everywhere(mesh, lambda c: mesh.value_in(c, SECRET) == {"v": "2", "keep": "k"})


def test_every_kind_of_change_from_another_cell_lands_at_the_home_and_comes_back(mesh: Mesh) -> None:
    homed_in_a(mesh)
    forwarded_before = sum(a.counters.get("forwarded", 0) for a in mesh.agents["b"] + mesh.agents["c"])

    # patch (JSON merge patch) from b: version 3 at a, the merged value everywhere
    reply = mesh.request("b", "PATCH", f"secret/data/{SECRET}", {"data": {"v": "3", "keep": None}})
    assert reply.status == 200, reply.body
    assert reply.body["data"]["version"] == 3  # type: ignore[index]
    assert mesh.value_in("a", SECRET) == {"v": "3"}
    assert everywhere(mesh, lambda c: mesh.value_in(c, SECRET) == {"v": "3"})

    # soft delete of the latest from c, then undelete from b
    assert mesh.request("c", "DELETE", f"secret/data/{SECRET}").status == 204
    assert mesh.read("a", SECRET).status == 404
    assert everywhere(mesh, lambda c: mesh.read(c, SECRET).status == 404)
    reply = mesh.request("b", "POST", f"secret/undelete/{SECRET}", {"versions": [3]})
    assert reply.status == 204, reply.body
    assert everywhere(mesh, lambda c: mesh.value_in(c, SECRET) == {"v": "3"})

    # delete versions from b, destroy version 1 from c: metadata and ledgers follow
    assert mesh.request("b", "POST", f"secret/delete/{SECRET}", {"versions": [2]}).status == 204
    assert everywhere(mesh, lambda c: (metadata(mesh, c) or {})["versions"]["2"]["deletion_time"] != "")
    assert mesh.request("c", "POST", f"secret/destroy/{SECRET}", {"versions": "1"}).status == 204
    assert everywhere(mesh, lambda c: version_item(mesh, c, 1) is None)
    assert all((metadata(mesh, c) or {})["versions"]["1"]["destroyed"] for c in CELLS)
    assert all(version_item(mesh, c, 3) is not None for c in CELLS)

    # metadata: settings written from c, patched from b
    reply = mesh.request(
        "c", "POST", f"secret/metadata/{SECRET}", {"max_versions": 7, "custom_metadata": {"owner": "team"}}
    )
    assert reply.status == 204, reply.body
    reply = mesh.request("b", "PATCH", f"secret/metadata/{SECRET}", {"custom_metadata": {"tier": "1"}})
    assert reply.status == 204, reply.body
    want = {"owner": "team", "tier": "1"}
    assert (metadata(mesh, "a") or {})["custom_metadata"] == want
    assert everywhere(
        mesh,
        lambda c: (
            (m := metadata(mesh, c)) is not None and m["custom_metadata"] == want and m["max_versions"] == 7
        ),
    )

    # all of it went through the relays to the home; the home's version numbers rule
    forwarded = sum(a.counters.get("forwarded", 0) for a in mesh.agents["b"] + mesh.agents["c"])
    assert forwarded - forwarded_before == 7
    assert {(metadata(mesh, c) or {})["current_version"] for c in CELLS} == {3}


def test_a_forwarded_metadata_delete_removes_the_secret_everywhere_for_good(mesh: Mesh) -> None:
    homed_in_a(mesh)
    assert mesh.request("b", "DELETE", f"secret/metadata/{SECRET}").status == 204
    assert metadata(mesh, "a") is None
    assert everywhere(mesh, lambda c: metadata(mesh, c) is None and mesh.read(c, SECRET).status == 404)
    # several anti-entropy rounds later (a digest every ~0.2 s) nothing came back
    rounds = {c: mesh.agents[c][0].counters.get("digest_rounds", 0) for c in CELLS}
    assert mesh.wait_for(
        lambda: all(mesh.agents[c][0].counters.get("digest_rounds", 0) >= rounds[c] + 3 for c in CELLS), 10
    )
    for cell in CELLS:
        assert metadata(mesh, cell) is None and mesh.read(cell, SECRET).status == 404
        assert version_item(mesh, cell, 1) is None and version_item(mesh, cell, 2) is None
        barrier = mesh.api_services[cell].barrier
        assert barrier.get(Key(Kind.SECRET_META, f"secret/{SECRET}")) is None


def test_changes_for_a_home_that_cannot_be_reached_are_refused_and_change_nothing(mesh: Mesh) -> None:
    homed_in_a(mesh)
    before = {cell: metadata(mesh, cell) for cell in CELLS}
    mesh.partition("a")
    changes = [
        ("POST", f"secret/data/{SECRET}", {"data": {"v": "lost?"}}),
        ("PATCH", f"secret/data/{SECRET}", {"data": {"v": "lost?"}}),
        ("DELETE", f"secret/data/{SECRET}", {}),
        ("POST", f"secret/delete/{SECRET}", {"versions": [1]}),
        ("POST", f"secret/undelete/{SECRET}", {"versions": [1]}),
        ("POST", f"secret/destroy/{SECRET}", {"versions": [1]}),
        ("POST", f"secret/metadata/{SECRET}", {"max_versions": 3}),
        ("PATCH", f"secret/metadata/{SECRET}", {"custom_metadata": {"x": "y"}}),
        ("DELETE", f"secret/metadata/{SECRET}", {}),
    ]
    for method, path, body in changes:
        reply = mesh.request("b", method, path, body)
        assert reply.status == 503, (method, path, reply.body)
        message = reply.body["errors"][0]  # type: ignore[index]
        assert "homed in cell 'a'" in message and "cannot reach" in message, message
        assert "lost?" not in json.dumps(reply.body)
    # bad input is refused before anything travels: 400, even with the home cut off
    bad = mesh.request("b", "POST", f"secret/destroy/{SECRET}", {})
    assert bad.status == 400 and "version" in bad.body["errors"][0]  # type: ignore[index]
    bad = mesh.request("b", "PATCH", f"secret/data/{SECRET}", {"data": ["not", "a", "map"]})
    assert bad.status == 400
    mesh.heal()
    time.sleep(0.5)  # anti-entropy rounds after the heal: nothing was queued to land later
    assert {cell: metadata(mesh, cell) for cell in CELLS} == before
    assert all(mesh.value_in(c, SECRET) == {"v": "2", "keep": "k"} for c in CELLS)


def test_a_forwarded_check_and_set_mismatch_answers_the_homes_400(mesh: Mesh) -> None:
    homed_in_a(mesh)
    for method in ("POST", "PATCH"):
        reply = mesh.request(
            "b", method, f"secret/data/{SECRET}", {"data": {"v": "x"}, "options": {"cas": 1}}
        )
        assert reply.status == 400, reply.body
        assert "check-and-set parameter did not match the current version" in reply.body["errors"][0]  # type: ignore[index]
    reply = mesh.request("c", "PATCH", f"secret/data/{SECRET}", {"data": {"v": "3"}, "options": {"cas": 2}})
    assert reply.status == 200 and reply.body["data"]["version"] == 3  # type: ignore[index]
    # metadata's cas_required, set through a forwarded change, binds forwarded writes too
    assert mesh.request("c", "POST", f"secret/metadata/{SECRET}", {"cas_required": True}).status == 204
    reply = mesh.write("b", SECRET, {"v": "4"})
    assert reply.status == 400 and "check-and-set" in reply.body["errors"][0]  # type: ignore[index]
    assert mesh.write("b", SECRET, {"v": "4"}, cas=3).status == 200
    # a patch of a deleted version: the home's 404 with the version's metadata, as Vault
    assert mesh.request("a", "DELETE", f"secret/data/{SECRET}").status == 204
    reply = mesh.request("b", "PATCH", f"secret/data/{SECRET}", {"data": {"v": "5"}, "options": {"cas": 4}})
    assert reply.status == 404 and reply.body["data"]["version"] == 4  # type: ignore[index]


def test_a_forwarded_change_that_times_out_says_its_outcome_is_unknown(mesh: Mesh) -> None:
    homed_in_a(mesh)
    front = mesh.fronts["b"]
    try:
        # b's relay holds each cross-cell call 0.6 s before sending; b's API gives up at 0.3 s
        front.timeout, mesh.faults.delay = 0.3, 0.6
        destroy = mesh.request("b", "POST", f"secret/destroy/{SECRET}", {"versions": [1]})
        # the home gets the write after 1 s, and answers after its pushes (1 s more):
        # b's API gives up in between, once the write is on its way
        front.timeout, mesh.faults.delay = 1.5, 1.0
        write = mesh.write("b", SECRET, {"v": "3"})
    finally:
        mesh.faults.delay = 0.0
        front.timeout = 5.0
    message = destroy.body["errors"][0]  # type: ignore[index]
    assert destroy.status == 503 and "may or may not have landed" in message and "'a'" in message
    message = write.body["errors"][0]  # type: ignore[index]
    assert write.status == 503 and "may or may not have landed" in message
    assert "retry with options.cas" in message
    # ... and the write was indeed on its way: it landed at the home, and comes back to b
    assert mesh.wait_for(lambda: (metadata(mesh, "a") or {}).get("current_version") == 3, 10)
    assert mesh.wait_for(lambda: mesh.value_in("b", SECRET) == {"v": "3"}, 10)


class Recording:
    """b's API stub to its relay, keeping every forwarded change as sent."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.sent: list[bytes] = []

    def Forward(self, request: Any, timeout: float) -> Any:
        self.sent.append(request.SerializeToString())
        return self.stub.Forward(request, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


def test_forwarded_values_and_settings_travel_sealed(mesh: Mesh) -> None:
    homed_in_a(mesh)
    front = mesh.fronts["b"]
    recording = front._stub = Recording(front.stub())
    reply = mesh.request("b", "PATCH", f"secret/data/{SECRET}", {"data": {"v": "hunter2-patched"}})
    assert reply.status == 200, reply.body
    reply = mesh.request(
        "b", "POST", f"secret/metadata/{SECRET}", {"custom_metadata": {"owner": "team-confidential"}}
    )
    assert reply.status == 204, reply.body
    assert len(recording.sent) == 2
    for raw in recording.sent:
        assert b"hunter2" not in raw and b"confidential" not in raw and b"keep" not in raw
    assert mesh.value_in("a", SECRET) == {"v": "hunter2-patched", "keep": "k"}


def test_a_change_in_a_cell_that_has_not_heard_of_the_secret_finds_its_home(tmp_path: Path) -> None:
    # no digests (only the test's pushes): b learns of the secret only by asking
    timing = CellTiming(digest_interval=3600, directory_interval=0.5, call_timeout=2.0, handover_grace=0.5)
    mesh = Mesh(tmp_path, timing=timing).start()
    try:
        assert mesh.wait_for(mesh.directory_complete, 15)
        mesh.partition("b")
        assert mesh.write("a", SECRET, {"v": "1"}).status == 200  # homed in a with c's vote
        assert mesh.wait_for(lambda: mesh.value_in("c", SECRET) == {"v": "1"}, 10)
        mesh.heal()
        assert mesh.fronts["b"].replicas.home(f"secret/{SECRET}") is None
        reply = mesh.request("b", "PATCH", f"secret/data/{SECRET}", {"data": {"w": "2"}})
        assert reply.status == 200 and reply.body["data"]["version"] == 2, reply.body  # type: ignore[index]
        assert mesh.value_in("a", SECRET) == {"v": "1", "w": "2"}
        assert mesh.wait_for(lambda: mesh.value_in("b", SECRET) == {"v": "1", "w": "2"}, 10)
        # a secret no cell homes: answered as anywhere (404 / nothing to delete), nothing claimed
        assert mesh.request("b", "PATCH", "secret/data/nowhere", {"data": {"x": "1"}}).status == 404
        assert mesh.request("b", "DELETE", "secret/metadata/nowhere").status == 204
        assert mesh.request("b", "POST", "secret/metadata/nowhere", {}).status == 204
        assert all(mesh.fronts[c].replicas.home("secret/nowhere") is None for c in CELLS)
    finally:
        mesh.stop()

"""Moving a secret's home: fenced and in two steps, so two homes never exist at once.
The old home stops taking writes, copies the secret to the new home, which takes over
at the next epoch; writes then go to the new home from every cell. A handover to a
cell that cannot be reached leaves the secret fenced (no writes anywhere) until it is
retried."""

from __future__ import annotations

from keycell.cells.mesh import Mesh

CELLS = ("a", "b", "c")


def homes(mesh: Mesh, path: str) -> dict[str, tuple[str, str, int]]:
    out = {}
    for cell in CELLS:
        home = mesh.fronts[cell].replicas.home(path)
        assert home is not None
        out[cell] = (home.home, home.state, home.epoch)
    return out


def test_a_home_moves_and_writes_follow_it_from_every_cell(mesh: Mesh) -> None:
    assert mesh.write("a", "move/db", {"v": "1"}).status == 200
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "move/db") == {"v": "1"} for c in CELLS), 10)
    not_home = mesh.request("b", "POST", "sys/homes/secret/move/db", {"to": "c"})
    assert not_home.status == 503 and "homed in cell 'a'" in not_home.body["errors"][0]  # type: ignore[index]
    moved = mesh.request("a", "POST", "sys/homes/secret/move/db", {"to": "b"})
    assert moved.status == 200, moved.body
    assert moved.body["data"] == {"path": "secret/move/db", "home": "b", "epoch": 2, "from": "a"}  # type: ignore[index]
    # writes from every cell land at b, in order, nothing lost: versions 2, 3, 4
    for version, cell in enumerate(("a", "c", "b"), start=2):
        reply = mesh.write(cell, "move/db", {"v": str(version)})
        assert reply.status == 200, (cell, reply.body)
        assert reply.body["data"]["version"] == version  # type: ignore[index]
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "move/db") == {"v": "4"} for c in CELLS), 10)
    assert mesh.wait_for(lambda: set(homes(mesh, "secret/move/db").values()) == {("b", "home", 2)}, 10)
    read = mesh.read("b", "move/db")
    assert read.headers["X-Keycell-Home-Cell"] == "b" and read.headers["X-Keycell-Replica-Age"] == "0.000"
    shown = mesh.request("c", "GET", "sys/homes/secret/move/db")
    assert shown.status == 200 and shown.body["data"]["home"] == "b"  # type: ignore[index]


def test_a_handover_to_an_unreachable_cell_stays_fenced_until_retried(mesh: Mesh) -> None:
    assert mesh.write("a", "fence/db", {"v": "1"}).status == 200
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "fence/db") == {"v": "1"} for c in CELLS), 10)
    mesh.partition("c")
    stuck = mesh.request("a", "POST", "sys/homes/secret/fence/db", {"to": "c"})
    assert stuck.status == 503 and "stays fenced" in stuck.body["errors"][0]  # type: ignore[index]
    # fenced: no cell takes a write, and nobody else is home
    for cell in ("a", "b"):
        refused = mesh.write(cell, "fence/db", {"v": "lost?"})
        assert refused.status == 503 and "moving from cell 'a' to cell 'c'" in refused.body["errors"][0]  # type: ignore[index]
    assert mesh.fronts["a"].replicas.home("secret/fence/db").state == "moving"  # type: ignore[union-attr]
    assert mesh.fronts["c"].replicas.home("secret/fence/db").home == "a"  # type: ignore[union-attr]
    mesh.heal()
    assert mesh.wait_for(
        lambda: mesh.request("a", "POST", "sys/homes/secret/fence/db", {"to": "c"}).status == 200,
        15,
        step=0.2,
    )
    reply = mesh.write("b", "fence/db", {"v": "2"})
    assert reply.status == 200 and reply.body["data"]["version"] == 2  # type: ignore[index]
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "fence/db") == {"v": "2"} for c in CELLS), 10)


def test_bad_handovers_are_refused_with_a_reason(mesh: Mesh) -> None:
    assert mesh.write("a", "bad/db", {"v": "1"}).status == 200
    for body in ({}, {"to": ""}, {"to": 3}):
        assert mesh.request("a", "POST", "sys/homes/secret/bad/db", body).status == 400
    for to in ("a", "nowhere"):
        reply = mesh.request("a", "POST", "sys/homes/secret/bad/db", {"to": to})
        assert reply.status == 400 and "not another cell" in reply.body["errors"][0]  # type: ignore[index]
    assert mesh.request("a", "GET", "sys/homes/secret/never/written").status == 404

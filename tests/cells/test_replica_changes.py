"""What the home does to a secret reaches its replicas, and nothing older comes back:
destroyed versions leave every cell's ledger, deleted metadata deletes the replicas,
and a secret made again after a delete (version 1 once more) replaces the old one."""

from __future__ import annotations

from keycell.cells.mesh import Mesh
from keycell.control_plane.ledger import Key, Kind

CELLS = ("a", "b", "c")


def version_item(mesh: Mesh, cell: str, path: str, number: int) -> object:
    return mesh.api_services[cell].barrier.get(Key(Kind.SECRET_VERSION, f"secret/{path}#{number:010d}"))


def test_destroy_delete_and_recreate_at_the_home_reach_every_replica(mesh: Mesh) -> None:
    for i in (1, 2):
        assert mesh.write("a", "life/db", {"v": str(i)}).status == 200
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "life/db") == {"v": "2"} for c in CELLS), 10)
    assert mesh.request("a", "POST", "secret/destroy/life/db", {"versions": [1]}).status == 204
    assert mesh.wait_for(lambda: all(version_item(mesh, c, "life/db", 1) is None for c in CELLS), 10)
    assert all(version_item(mesh, c, "life/db", 2) is not None for c in CELLS)

    assert mesh.request("a", "DELETE", "secret/metadata/life/db").status == 204
    assert mesh.wait_for(lambda: all(mesh.read(c, "life/db").status == 404 for c in CELLS), 10)
    assert all(version_item(mesh, c, "life/db", 2) is None for c in CELLS)

    assert mesh.write("a", "life/db", {"v": "reborn"}).status == 200  # version 1 again, a new generation
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "life/db") == {"v": "reborn"} for c in CELLS), 10)
    for cell in CELLS:
        meta = mesh.request(cell, "GET", "secret/metadata/life/db")
        assert meta.body["data"]["current_version"] == 1  # type: ignore[index]

"""Issue 18 §3: a role's (or mount's) `max_revocation_staleness` and `on_stale`, against
live cells: `refuse` answers 503 naming the stale peers while the bound is exceeded,
`local-only` keeps serving credentials this cell issued, `serve` keeps serving and
says how stale; bad values are refused with 400."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from keycell.cells.mesh import Mesh
from keycell.control_plane.errors import Unavailable
from keycell.control_plane.freshness import STALENESS_HEADER, StaleBound, enforce

CELLS = ("a", "b", "c")
BOUND = 0.5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started = Mesh(tmp_path_factory.mktemp("bounds"), CELLS, direct=True, heartbeat_every=0.1).start()
    try:
        assert started.wait_for(started.directory_complete, 15), "the cell directory did not converge"
        assert started.write("a", "app/db", {"password": "s3cret"}).status == 200
        yield started
    finally:
        started.stop()


def _fresh(mesh: Mesh, cell: str) -> bool:
    peers = mesh.request(cell, "GET", "sys/revocations/freshness").body["data"]["peers"]  # type: ignore[index]
    return len(peers) == len(CELLS) - 1 and all(
        p["staleness_seconds"] is not None and p["staleness_seconds"] < BOUND / 2 for p in peers.values()
    )


@pytest.fixture
def healed(mesh: Mesh) -> Iterator[Mesh]:
    mesh.heal()
    assert mesh.wait_for(lambda: _fresh(mesh, "a"), 15), "cell a never got fresh"
    yield mesh
    mesh.heal()


def _token(mesh: Mesh, cell: str, **bound: Any) -> str:
    reply = mesh.request(cell, "POST", "auth/token/create", {"policies": ["root"], **bound})
    assert reply.status == 200, reply.body
    return reply.body["auth"]["client_token"]  # type: ignore[index, no-any-return]


def _stale(mesh: Mesh, cell: str) -> None:
    mesh.partition(cell)
    assert mesh.wait_for(lambda: not _fresh(mesh, cell), 5)
    mesh.wait_for(lambda: False, BOUND + 0.3)  # every peer's view is now older than the bound


def test_refuse_answers_503_naming_the_stale_peers_then_serves_after_the_heal(healed: Mesh) -> None:
    token = _token(healed, "a", max_revocation_staleness=BOUND, on_stale="refuse")
    assert healed.request("a", "GET", "secret/data/app/db", token=token).status == 200
    _stale(healed, "a")
    refused = healed.request("a", "GET", "secret/data/app/db", token=token)
    assert refused.status == 503, refused.body
    message = refused.body["errors"][0]  # type: ignore[index]
    assert "b" in message and "c" in message and "on_stale=refuse" in message
    assert "s3cret" not in str(refused.body)
    healed.heal()
    assert healed.wait_for(
        lambda: healed.request("a", "GET", "secret/data/app/db", token=token).status == 200, 15
    )


def test_local_only_keeps_serving_credentials_this_cell_issued_through_a_cut(healed: Mesh) -> None:
    token = _token(healed, "a", max_revocation_staleness=BOUND, on_stale="local-only")
    _stale(healed, "a")
    reply = healed.request("a", "GET", "secret/data/app/db", token=token)
    assert reply.status == 200, reply.body
    assert float(reply.headers[STALENESS_HEADER]) > BOUND


def test_local_only_refuses_credentials_another_cell_issued_while_stale(healed: Mesh) -> None:
    view = healed.api_services["a"].freshness
    _stale(healed, "a")
    bound = StaleBound(BOUND, "local-only")
    enforce(view, bound, "a", "a's own")  # issued here: served
    with pytest.raises(Unavailable, match="on_stale=local-only"):
        enforce(view, bound, "b", "b's")


def test_serve_keeps_serving_with_the_staleness_stated(healed: Mesh) -> None:
    token = _token(healed, "a", max_revocation_staleness=BOUND, on_stale="serve")
    _stale(healed, "a")
    reply = healed.request("a", "GET", "secret/data/app/db", token=token)
    assert reply.status == 200
    assert float(reply.headers[STALENESS_HEADER]) > BOUND


def test_a_kv_mount_bound_refuses_reads_and_writes_without_a_partial_write(healed: Mesh) -> None:
    assert healed.request("a", "POST", "secret/config", {"max_revocation_staleness": BOUND}).status == 204
    try:
        config = healed.request("a", "GET", "secret/config").body["data"]  # type: ignore[index]
        assert config["max_revocation_staleness"] == BOUND and config["on_stale"] == "refuse"
        before = healed.request("a", "GET", "secret/metadata/app/db").body["data"]["current_version"]  # type: ignore[index]
        _stale(healed, "a")
        assert healed.read("a", "app/db").status == 503
        assert healed.write("a", "app/db", {"password": "new"}).status == 503
        healed.heal()
        assert healed.wait_for(lambda: healed.read("a", "app/db").status == 200, 15)
        after = healed.request("a", "GET", "secret/metadata/app/db").body["data"]["current_version"]  # type: ignore[index]
        assert after == before
    finally:
        healed.heal()
        healed.request("a", "POST", "secret/config", {"max_revocation_staleness": None})
    assert healed.request("a", "GET", "secret/config").body["data"].get("max_revocation_staleness") is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("auth/token/create", {"max_revocation_staleness": -1}),
        ("auth/token/create", {"max_revocation_staleness": "soon"}),
        ("auth/token/create", {"max_revocation_staleness": 1, "on_stale": "maybe"}),
        ("auth/token/create", {"on_stale": "refuse"}),
        ("secret/config", {"max_revocation_staleness": 1, "on_stale": "sometimes"}),
        (
            "database/roles/r1",
            {"db_name": "pg", "creation_statements": ["SELECT 1"], "on_stale": "never"},
        ),
    ],
)
def test_invalid_bounds_are_refused_with_400(mesh: Mesh, path: str, body: dict[str, Any]) -> None:
    reply = mesh.request("a", "POST", path, body)
    assert reply.status == 400, reply.body
    assert reply.body is not None and reply.body["errors"]

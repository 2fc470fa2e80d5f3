"""Issue 18: a revocation reaches every cell by each independent path alone (relay mesh,
direct HTTP to the peers' APIs), and each cell knows, per peer, how stale its view is:
watermarks advance, stall under a cut and catch up after the heal."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keycell.cells.mesh import Mesh
from keycell.control_plane.freshness import STALENESS_HEADER

CELLS = ("a", "b", "c")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    started = Mesh(tmp_path, CELLS, direct=True, heartbeat_every=0.1).start()
    try:
        assert started.wait_for(started.directory_complete, 15), "the cell directory did not converge"
        assert started.wait_for(lambda: _api_urls_known(started), 15), "API URLs not in the directory"
        yield started
    finally:
        started.stop()


def _api_urls_known(mesh: Mesh) -> bool:
    return all(len(mesh.direct_paths[c].peers()) == len(CELLS) - 1 for c in CELLS)


def _revoke(mesh: Mesh, cell: str, accessor: str) -> dict[str, Any]:
    reply = mesh.request(cell, "POST", "sys/revocations", {"accessor": accessor, "reason": "test"})
    assert reply.status == 200, reply.body
    assert reply.body is not None
    return reply.body["data"]  # type: ignore[no-any-return]


def _worst_staleness(mesh: Mesh, cell: str, peer: str, samples: int = 20, every: float = 0.1) -> float:
    """The stalest `cell`'s view of `peer` got over `samples` readings `every` s apart."""
    worst = 0.0
    for _ in range(samples):
        worst = max(worst, _freshness(mesh, cell)["peers"][peer]["staleness_seconds"])
        mesh.wait_for(lambda: False, every)
    return worst


def _held_by(mesh: Mesh, cell: str, rid: str) -> dict[str, Any] | None:
    """`cell`'s own receipt of `rid` as it answers sys/revocations/:id, or None."""
    reply = mesh.request(cell, "GET", f"sys/revocations/{rid}")
    if reply.status != 200 or reply.body is None:
        return None
    return reply.body["data"]["cells"].get(cell)  # type: ignore[no-any-return]


def _freshness(mesh: Mesh, cell: str) -> dict[str, Any]:
    reply = mesh.request(cell, "GET", "sys/revocations/freshness")
    assert reply.status == 200, reply.body
    assert reply.body is not None
    return reply.body["data"]  # type: ignore[no-any-return]


def _cut_all_relays(mesh: Mesh) -> None:
    for cell in CELLS:
        mesh.cut_relays(cell)


def test_the_direct_path_alone_delivers_with_every_relay_link_cut(mesh: Mesh) -> None:
    _cut_all_relays(mesh)
    rid = _revoke(mesh, "a", "acc-direct-only")["id"]
    for cell in ("b", "c"):
        assert mesh.wait_for(lambda c=cell: _held_by(mesh, c, rid) is not None, 10), cell
        assert _held_by(mesh, cell, rid)["path"] == "direct"  # type: ignore[index]
        assert mesh.api_services[cell].revocations.is_revoked("token:acc-direct-only")
    # The peers' replies are receipts: the revoking cell names the path for each cell.
    assert mesh.wait_for(
        lambda: len(mesh.request("a", "GET", f"sys/revocations/{rid}").body["data"]["cells"]) == 3, 5
    )  # type: ignore[index]
    cells = mesh.request("a", "GET", f"sys/revocations/{rid}").body["data"]["cells"]  # type: ignore[index]
    assert cells["a"]["path"] == "origin"
    assert cells["b"]["path"] == cells["c"]["path"] == "direct"


def test_a_peer_that_never_answers_delays_neither_deliveries_nor_heartbeats_to_the_others(
    mesh: Mesh,
) -> None:
    """Cell a's directory gains a peer whose API accepts connections and never answers
    (every call to it runs into the 1 s timeout, four times per revocation). b and c
    must still get a's revocations at once and keep a fresh watermark of a."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    path = mesh.direct_paths["a"]
    real_peers = path.peers
    path.peers = lambda: {**real_peers(), "z": f"http://127.0.0.1:{hole.getsockname()[1]}"}
    try:
        _cut_all_relays(mesh)
        rids = [_revoke(mesh, "a", f"acc-beside-a-hole-{i}")["id"] for i in range(12)]
        for cell in ("b", "c"):
            assert mesh.wait_for(lambda c=cell: all(_held_by(mesh, c, r) for r in rids), 3), cell
        worst = _worst_staleness(mesh, "b", "a")
        assert worst < 0.8, f"b's view of a went {worst:.2f} s stale while z was silent"
    finally:
        path.peers = real_peers
        hole.close()


def test_the_relay_mesh_alone_delivers_with_the_direct_path_cut(mesh: Mesh) -> None:
    for cell in CELLS:
        mesh.cut_direct(cell)
    rid = _revoke(mesh, "a", "acc-relay-only")["id"]
    for cell in ("b", "c"):
        assert mesh.wait_for(lambda c=cell: _held_by(mesh, c, rid) is not None, 15), cell
        assert _held_by(mesh, cell, rid)["path"] == "relay"  # type: ignore[index]


def test_delivering_twice_by_two_paths_keeps_one_entry_and_the_first_path(mesh: Mesh) -> None:
    data = _revoke(mesh, "a", "acc-twice")
    rid = data["id"]
    assert mesh.wait_for(lambda: _held_by(mesh, "b", rid) is not None, 10)
    first = _held_by(mesh, "b", rid)
    record = mesh.request("a", "GET", f"sys/revocations/{rid}").body["data"]  # type: ignore[index]
    again = {k: record[k] for k in ("id", "subject", "origin_cell", "revoked_at", "reason")}
    reply = mesh.request(
        "b", "POST", "sys/revocations/apply", {"revocations": [{**again, "seq": data["seq"]}]}
    )
    assert reply.status == 200, reply.body
    assert _held_by(mesh, "b", rid) == first  # the first path and time stay


def test_watermarks_advance_stall_under_a_cut_and_catch_up_after_the_heal(mesh: Mesh) -> None:
    assert mesh.wait_for(
        lambda: all(p["staleness_seconds"] is not None for p in _freshness(mesh, "b")["peers"].values()), 10
    )
    before = _freshness(mesh, "b")["peers"]["a"]["watermark"]
    assert mesh.wait_for(lambda: _freshness(mesh, "b")["peers"]["a"]["watermark"] > before, 5)

    mesh.partition("a")
    rid = _revoke(mesh, "a", "acc-minted-while-cut")["id"]  # minted in the cut-off cell
    mesh.wait_for(lambda: False, 0.5)  # let beats in flight at the cut land
    stalled = _freshness(mesh, "b")["peers"]["a"]
    mesh.wait_for(lambda: False, 1.0)
    later = _freshness(mesh, "b")["peers"]["a"]
    assert later["watermark"] == stalled["watermark"]  # nothing proves anything newer
    assert later["staleness_seconds"] >= stalled["staleness_seconds"] + 0.9
    assert _held_by(mesh, "b", rid) is None
    # b still hears from c: only a is stale
    assert _freshness(mesh, "b")["peers"]["c"]["staleness_seconds"] < 1.0

    mesh.heal()
    for cell in ("b", "c"):
        assert mesh.wait_for(lambda c=cell: _held_by(mesh, c, rid) is not None, 15), cell
        assert mesh.wait_for(lambda c=cell: _freshness(mesh, c)["peers"]["a"]["staleness_seconds"] < 1.0, 10)
        assert _freshness(mesh, cell)["peers"]["a"]["contiguous_seq"] >= 1


def test_every_authenticated_answer_states_the_revocation_staleness(mesh: Mesh) -> None:
    def header() -> float:
        return float(mesh.request("a", "GET", "sys/revocations/freshness").headers[STALENESS_HEADER])

    assert mesh.wait_for(lambda: not math.isinf(header()), 10)
    assert 0.0 <= header() < 5.0
    refused = mesh.request("a", "GET", "sys/revocations/freshness", token="not-a-token-at-all")
    assert refused.status == 403
    assert STALENESS_HEADER not in refused.headers


@pytest.mark.parametrize(
    "body",
    [
        {"revocations": "nope"},
        {"revocations": [{"id": "rv_1"}]},
        {
            "revocations": [
                {"id": "x", "subject": "token:x", "origin_cell": "b", "revoked_at": 1, "reason": ""}
            ]
        },
        {"heartbeat": {"cell": "a"}},
        {"heartbeat": {"cell": "a", "seq": -1, "at": 1.0}},
    ],
)
def test_bad_direct_deliveries_are_refused_with_400_and_write_nothing(
    mesh: Mesh, body: dict[str, Any]
) -> None:
    before = _freshness(mesh, "a")["peers"]
    reply = mesh.request("a", "POST", "sys/revocations/apply", body)
    assert reply.status == 400, reply.body
    assert reply.body is not None and reply.body["errors"]
    assert set(_freshness(mesh, "a")["peers"]) == set(before)

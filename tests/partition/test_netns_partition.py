"""Issue 18 §4 on real partitions: cells in their own network namespaces.

(a) Every relay link down, the APIs still joined: a revocation committed in one cell
is refused in every cell, delivered by the direct path alone.
(b) ap-southeast-1 fully cut off (both its links down): its watermarks of the other
cells stall and their staleness grows (and theirs of it); each `on_stale` mode against
the live cut-off cell; a revocation minted there reaches the others after the heal;
every cell's ledger then holds the same revocations, each once, with no sequence gap.
"""

from __future__ import annotations

import time
from typing import Any

from keycell.control_plane.freshness import STALENESS_HEADER
from keycell.control_plane.ledger import Kind
from keycell.testing.netns import PartitionedCells, wait_for

from .conftest import CELLS, CUT

BOUND = 1.0  # seconds: the roles' max_revocation_staleness
DELIVERY = 10.0  # seconds a test waits for a delivery (the bound itself is measured in bench/)


def _token(cells: PartitionedCells, cell: str, **bound: Any) -> tuple[str, str]:
    status, made = cells.call(cell, "POST", "auth/token/create", {"policies": ["root"], "ttl": "1h", **bound})
    assert status == 200, made
    return made["auth"]["client_token"], made["auth"]["accessor"]


def _works(cells: PartitionedCells, cell: str, token: str) -> bool:
    return cells.call(cell, "GET", "auth/token/lookup-self", token=token)[0] == 200


def _revoke(cells: PartitionedCells, via: str, accessor: str) -> dict[str, Any]:
    status, answer = cells.call(via, "POST", "sys/revocations", {"accessor": accessor, "reason": "test"})
    assert status == 200, answer
    data: dict[str, Any] = answer["data"]
    return data


def _receipt(cells: PartitionedCells, cell: str, rid: str) -> dict[str, Any] | None:
    """`cell`'s own receipt of `rid` (which path brought it first), or None."""
    status, answer = cells.call(cell, "GET", f"sys/revocations/{rid}")
    if status != 200:
        return None
    found: dict[str, Any] | None = answer["data"]["cells"].get(cell)
    return found


def test_relays_cut_the_direct_path_alone_refuses_a_revocation_in_every_cell(
    healed: PartitionedCells,
) -> None:
    cells = healed
    tokens = {c: _token(cells, c) for c in CELLS}
    cells.cut_relays()
    try:
        rids = {c: _revoke(cells, "us-east-1", accessor)["id"] for c, (_t, accessor) in tokens.items()}
        for cell, (token, _accessor) in tokens.items():
            assert wait_for(lambda c=cell, t=token: not _works(cells, c, t), DELIVERY), cell
        for cell in ("eu-west-1", "ap-southeast-1"):
            receipt = _receipt(cells, cell, rids[cell])
            assert receipt is not None and receipt["path"] == "direct", receipt
            # and the revoking cell has every peer's receipt back: the peer's own word
            assert wait_for(lambda c=cell: _receipt(cells, "us-east-1", rids[c]) is not None, DELIVERY)
        status, answer = cells.call("us-east-1", "GET", f"sys/revocations/{rids['ap-southeast-1']}")
        assert status == 200 and answer["data"]["cells"]["us-east-1"]["path"] == "origin"
    finally:
        cells.heal()


def _stale_for(cells: PartitionedCells, seconds: float) -> None:
    """Wait until every peer of CUT looks staler than `seconds` from inside CUT."""
    assert wait_for(
        lambda: all(p["staleness_seconds"] > seconds for p in cells.freshness(CUT).values()), seconds + 10
    ), cells.freshness(CUT)


def test_a_cut_off_cell_stalls_keeps_its_modes_and_catches_up_after_the_heal(
    healed: PartitionedCells,
) -> None:
    cells = healed
    secret = {"data": {"password": "pw-only-in-the-ledger"}}
    assert cells.call(CUT, "POST", "secret/data/partition/readers", secret)[0] == 200
    refuse, _ = _token(cells, CUT, max_revocation_staleness=BOUND, on_stale="refuse")
    local, _ = _token(cells, CUT, max_revocation_staleness=BOUND, on_stale="local-only")
    serve, _ = _token(cells, CUT, max_revocation_staleness=BOUND, on_stale="serve")
    victim, victim_accessor = _token(cells, "us-east-1")  # revoked from inside the cut
    read = "secret/data/partition/readers"
    assert all(cells.call(CUT, "GET", read, token=t)[0] == 200 for t in (refuse, local, serve))

    cells.isolate(CUT)
    try:
        # Watermarks stall: nothing newer can be proved while no path reaches CUT.
        time.sleep(0.5)  # beats in flight at the cut land
        before = cells.freshness(CUT)
        seen_from_east = cells.freshness("us-east-1")[CUT]
        time.sleep(1.5)
        after = cells.freshness(CUT)
        for peer in ("us-east-1", "eu-west-1"):
            assert after[peer]["watermark"] == before[peer]["watermark"], peer
            assert after[peer]["staleness_seconds"] >= before[peer]["staleness_seconds"] + 1.0, peer
        east = cells.freshness("us-east-1")
        assert east[CUT]["watermark"] == seen_from_east["watermark"]
        assert east["eu-west-1"]["staleness_seconds"] < 1.0  # the reachable peers stay fresh

        _stale_for(cells, BOUND)
        # refuse: 503 naming the stale peers, nothing of the secret in it
        status, answer = cells.call(CUT, "GET", read, token=refuse)
        assert status == 503, answer
        message = answer["errors"][0]
        assert "us-east-1" in message and "eu-west-1" in message and "on_stale=refuse" in message
        assert "pw-only-in-the-ledger" not in str(answer)
        # local-only: this cell's own credential keeps reading
        status, answer = cells.call(CUT, "GET", read, token=local)
        assert status == 200 and answer["data"]["data"] == secret["data"]
        # serve: keeps reading, and says how stale (the header, on every authenticated answer)
        reply = cells.api._transport(cells.urls[CUT]).send("GET", read, {"X-Vault-Token": serve}, None)
        assert reply.status == 200
        assert float(reply.headers[STALENESS_HEADER.lower()]) > BOUND

        # a revocation minted in the cut-off cell reaches nobody yet
        minted = _revoke(cells, CUT, victim_accessor)
        assert _works(cells, "us-east-1", victim)
        assert _receipt(cells, "eu-west-1", minted["id"]) is None
    finally:
        cells.heal()

    # ... and everybody after the heal
    assert wait_for(lambda: not _works(cells, "us-east-1", victim), 30)
    for cell in ("us-east-1", "eu-west-1"):
        assert wait_for(lambda c=cell: _receipt(cells, c, minted["id"]) is not None, 30), cell
        assert wait_for(lambda c=cell: cells.fresh(c, 1.0), 20), cells.freshness(cell)
        assert cells.freshness(cell)[CUT]["contiguous_seq"] >= minted["seq"]
    assert wait_for(lambda: cells.call(CUT, "GET", read, token=refuse)[0] == 200, 20)


def test_after_the_cuts_every_ledger_holds_the_same_revocations_once(healed: PartitionedCells) -> None:
    """Run last in this module (after the cuts above): every revocation minted by any
    cell is in every cell's ledger, under one subject, and each origin's sequence
    numbers are 1..n in every cell: nothing lost, nothing doubled."""
    cells = healed
    # One more from each cell, on a healed mesh, so every origin has minted something.
    for cell in CELLS:
        _revoke(cells, cell, f"acc-final-{cell}")

    def same_everywhere() -> bool:
        sets = [sorted(cells.ledger_paths(c, Kind.REVOCATION)) for c in CELLS]
        seqs = [sorted(cells.ledger_paths(c, Kind.REVOCATION_SEQ)) for c in CELLS]
        return all(s == sets[0] for s in sets) and all(s == seqs[0] for s in seqs)

    assert wait_for(same_everywhere, 30)
    subjects = cells.ledger_paths("us-east-1", Kind.REVOCATION)
    assert len(subjects) == len(set(subjects))
    assert {f"token:acc-final-{c}" for c in CELLS} <= set(subjects)
    seqs = cells.ledger_paths("us-east-1", Kind.REVOCATION_SEQ)
    for origin in CELLS:
        numbers = sorted(int(p.rsplit("/", 1)[1]) for p in seqs if p.startswith(origin + "/"))
        assert numbers == list(range(1, len(numbers) + 1)), (origin, numbers)
        assert numbers, origin

"""The revocation inbox's conditional put (issue 18, the ledger path), on every ledger
adapter (the `ledger` fixture runs each test on SQLite and on DynamoDB over a moto
server): one sender's revocation lands once however often it is put, concurrently or
not; nothing secret is readable in the receiver's table; draining applies each once,
and what does not open as the sender's is never applied."""

from __future__ import annotations

import json
import threading
import time

import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.barrier import Barrier
from keycell.control_plane.cellkeys import CellKey
from keycell.control_plane.freshness import Freshness, Heartbeat, Mint
from keycell.control_plane.ledger import Kind, Ledger, iter_prefix
from keycell.control_plane.revocation_inbox import Inbox, InboxWriter, heartbeat_key, revocation_key
from keycell.control_plane.revocations import RevocationLog, RevocationRecord, RevocationSet
from keycell.testing.cells import Cell, open_cell

SUBJECT = "token:accessor-hunter2"


def _own_barrier(tmp_path_factory: pytest.TempPathFactory, name: str) -> Barrier:
    """Another cell's own barrier (a separate SQLite ledger): where its key lives."""
    return open_cell(SqliteLedger(tmp_path_factory.mktemp(name) / "cell.db")).barrier


@pytest.fixture
def sender_barrier(tmp_path_factory: pytest.TempPathFactory) -> Barrier:
    return _own_barrier(tmp_path_factory, "sender")


def _keys(cell: Cell, sender_barrier: Barrier) -> tuple[CellKey, CellKey]:
    return CellKey.load_or_create(sender_barrier), CellKey.load_or_create(cell.barrier)


def _minted(sender_barrier: Barrier, n: int = 1) -> list[RevocationRecord]:
    log = RevocationLog(RevocationSet(sender_barrier, "a"))
    return [log.record(f"{SUBJECT}-{i}", reason="inbox test") for i in range(n)]


def _inbox(cell: Cell, key_b: CellKey, senders: dict[str, str]) -> Inbox:
    log = RevocationLog(RevocationSet(cell.barrier, "b"))
    return Inbox(cell.ledger, log, Freshness(cell.barrier, "b"), key_b, lambda: senders)


def _inbox_items(ledger: Ledger) -> list[str]:
    return [i.key.path for i in iter_prefix(ledger, Kind.REVOCATION_INBOX)]


def test_putting_a_revocation_twice_writes_it_once(cell: Cell, sender_barrier: Barrier) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    (rec,) = _minted(sender_barrier)
    writer = InboxWriter("a", key_a)
    assert writer.put_revocation(cell.ledger, "b", key_b.public_pem, rec) is True
    first = cell.ledger.get(revocation_key("a", rec.id))
    assert writer.put_revocation(cell.ledger, "b", key_b.public_pem, rec) is False
    assert cell.ledger.get(revocation_key("a", rec.id)) == first  # the conditional put lost: untouched
    assert _inbox_items(cell.ledger) == [f"a/{rec.id}"]


def test_concurrent_puts_of_one_revocation_land_exactly_once(cell: Cell, sender_barrier: Barrier) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    (rec,) = _minted(sender_barrier)
    writer = InboxWriter("a", key_a)
    start = threading.Barrier(6)
    won: list[bool] = []

    def put() -> None:
        start.wait()
        won.append(writer.put_revocation(cell.ledger, "b", key_b.public_pem, rec))

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(won) == [False] * 5 + [True]
    assert cell.ledger.get(revocation_key("a", rec.id)).version == 1  # type: ignore[union-attr]


def test_nothing_secret_is_readable_in_the_receivers_table(cell: Cell, sender_barrier: Barrier) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    (rec,) = _minted(sender_barrier)
    InboxWriter("a", key_a).put_revocation(cell.ledger, "b", key_b.public_pem, rec)
    item = cell.ledger.get(revocation_key("a", rec.id))
    assert item is not None
    assert b"hunter2" not in item.value and b"inbox test" not in item.value
    assert set(json.loads(item.value)) == {"v", "from", "sealed"}


def test_draining_applies_each_revocation_once_and_empties_the_inbox(
    cell: Cell, sender_barrier: Barrier
) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    recs = _minted(sender_barrier, 5)
    writer = InboxWriter("a", key_a)
    for rec in recs:
        writer.put_revocation(cell.ledger, "b", key_b.public_pem, rec)
    inbox = _inbox(cell, key_b, {"a": key_a.public_pem})
    result = inbox.drain()
    assert (result.applied, result.repeated, result.rejected) == (5, 0, 0)
    assert _inbox_items(cell.ledger) == []
    revocations = RevocationSet(cell.barrier, "b")
    log = RevocationLog(revocations)
    for rec in recs:
        assert revocations.is_revoked(rec.subject)
        assert log.receipt(rec.id, "b").path == "ledger"  # type: ignore[union-attr]
    # a resend after the drain (a retry from the backlog) re-creates the item: a no-op
    writer.put_revocation(cell.ledger, "b", key_b.public_pem, recs[0])
    again = inbox.drain()
    assert (again.applied, again.repeated) == (0, 1)
    assert sum(1 for _ in log.held()) == 5
    assert Freshness(cell.barrier, "b").watermark("a").contiguous_seq == 5


def test_an_item_not_sealed_by_the_named_sender_is_never_applied(
    cell: Cell, sender_barrier: Barrier, tmp_path_factory: pytest.TempPathFactory
) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    (rec,) = _minted(sender_barrier)
    impostor = CellKey.load_or_create(_own_barrier(tmp_path_factory, "impostor"))
    # the impostor seals a record naming "a" as its origin, with its own key
    InboxWriter("a", impostor).put_revocation(cell.ledger, "b", key_b.public_pem, rec)
    result = _inbox(cell, key_b, {"a": key_a.public_pem}).drain()
    assert (result.applied, result.rejected) == (0, 1)
    assert not RevocationSet(cell.barrier, "b").is_revoked(rec.subject)
    # an unknown sender is refused alike
    InboxWriter("a", key_a).put_revocation(cell.ledger, "b", key_b.public_pem, _minted(sender_barrier)[0])
    assert _inbox(cell, key_b, {}).drain().rejected == 2


def test_a_heartbeat_is_replaced_and_only_a_newer_one_counts(cell: Cell, sender_barrier: Barrier) -> None:
    key_a, key_b = _keys(cell, sender_barrier)
    writer = InboxWriter("a", key_a)
    mint = Mint(sender_barrier, "a")
    first = mint.heartbeat()
    writer.put_heartbeat(cell.ledger, "b", key_b.public_pem, first)
    time.sleep(0.01)
    second = mint.heartbeat()
    writer.put_heartbeat(cell.ledger, "b", key_b.public_pem, second)
    assert cell.ledger.get(heartbeat_key("a")).version == 2  # type: ignore[union-attr]
    inbox = _inbox(cell, key_b, {"a": key_a.public_pem})
    assert inbox.drain().heartbeats == 1
    assert inbox.drain().heartbeats == 0  # the same one again: nothing newer
    mark = Freshness(cell.barrier, "b").watermark("a")
    assert (mark.watermark, mark.path) == (second.at, "ledger")
    # an older heartbeat put back changes nothing
    writer.put_heartbeat(cell.ledger, "b", key_b.public_pem, Heartbeat("a", 0, first.at))
    assert inbox.drain().heartbeats == 0
    assert Freshness(cell.barrier, "b").watermark("a").watermark == second.at

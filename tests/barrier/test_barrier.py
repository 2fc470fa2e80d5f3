"""The barrier: a Ledger in plaintext above, only ciphertext below."""

from __future__ import annotations

import pytest

from keycell.control_plane.barrier import (
    OVERHEAD,
    Barrier,
    BarrierIntegrityError,
    ReservedKindError,
)
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, Put, iter_prefix
from keycell.control_plane.seal import Seal
from keycell.testing.cells import Cell

SECRET = Key(Kind.SECRET_META, "secret/app/db")
VALUE = b"postgres://app:correct-horse@db/app"


def test_barrier_is_a_ledger(cell: Cell) -> None:
    assert isinstance(cell.barrier, Ledger)


def test_values_round_trip_and_are_stored_encrypted(cell: Cell) -> None:
    written = cell.barrier.put_if(SECRET, VALUE, 0)
    assert (written.value, written.version) == (VALUE, 1)
    assert cell.barrier.get(SECRET).value == VALUE  # type: ignore[union-attr]
    raw = cell.ledger.get(SECRET)
    assert raw is not None and VALUE not in raw.value
    assert len(raw.value) == len(VALUE) + OVERHEAD


def test_compare_and_set_passes_through(cell: Cell) -> None:
    cell.barrier.put_if(SECRET, VALUE, 0)
    with pytest.raises(ConflictError):
        cell.barrier.put_if(SECRET, b"other", 0)
    assert cell.barrier.put_if(SECRET, b"v2", 1).version == 2


def test_value_moved_to_another_key_fails_to_decrypt(cell: Cell) -> None:
    cell.barrier.put_if(SECRET, VALUE, 0)
    stolen = cell.ledger.get(SECRET)
    elsewhere = Key(Kind.SECRET_META, "secret/attacker/readable")
    cell.ledger.put_if(elsewhere, stolen.value, 0)  # type: ignore[union-attr]
    with pytest.raises(BarrierIntegrityError, match="moved from another key"):
        cell.barrier.get(elsewhere)


def test_tampered_value_fails_to_decrypt(cell: Cell) -> None:
    cell.barrier.put_if(SECRET, VALUE, 0)
    raw = bytearray(cell.ledger.get(SECRET).value)  # type: ignore[union-attr]
    raw[-3] ^= 0x40
    cell.ledger.put_if(SECRET, bytes(raw), 1)
    with pytest.raises(BarrierIntegrityError):
        cell.barrier.get(SECRET)


def test_truncated_value_fails_to_decrypt(cell: Cell) -> None:
    cell.barrier.put_if(SECRET, VALUE, 0)
    cell.ledger.put_if(SECRET, cell.ledger.get(SECRET).value[:10], 1)  # type: ignore[union-attr]
    with pytest.raises(BarrierIntegrityError, match="truncated"):
        cell.barrier.get(SECRET)


def test_rotation_is_online_and_old_terms_stay_readable(cell: Cell) -> None:
    cell.barrier.put_if(SECRET, VALUE, 0)
    assert cell.barrier.active_term == 1
    assert cell.barrier.rotate() == 2
    newer = Key(Kind.SECRET_META, "secret/app/api")
    cell.barrier.put_if(newer, b"after rotation", 0)
    assert cell.ledger.get(newer).value[1:5] == (2).to_bytes(4, "big")  # type: ignore[union-attr]
    assert cell.ledger.get(SECRET).value[1:5] == (1).to_bytes(4, "big")  # type: ignore[union-attr]
    assert cell.barrier.get(SECRET).value == VALUE  # type: ignore[union-attr]
    assert cell.barrier.get(newer).value == b"after rotation"  # type: ignore[union-attr]


def test_another_process_learns_a_new_term_on_first_sight(cell: Cell) -> None:
    other = Barrier(cell.ledger)
    other_seal = Seal(cell.ledger, other)
    other_seal.unseal(cell.init.shares[1])
    other_seal.unseal(cell.init.shares[2])
    cell.barrier.rotate()
    cell.barrier.put_if(SECRET, VALUE, 0)
    assert other.get(SECRET).value == VALUE  # type: ignore[union-attr]
    assert other.active_term == 2


def test_concurrent_rotations_never_lose_a_term(cell: Cell) -> None:
    other = Barrier(cell.ledger)
    other_seal = Seal(cell.ledger, other)
    other_seal.unseal(cell.init.shares[0])
    other_seal.unseal(cell.init.shares[2])
    assert {cell.barrier.rotate(), other.rotate()} == {2, 3}
    cell.barrier.put_if(SECRET, VALUE, 0)
    assert other.get(SECRET).value == VALUE  # type: ignore[union-attr]


def test_scan_and_transactions_decrypt_and_encrypt(cell: Cell) -> None:
    keys = [Key(Kind.SECRET_VERSION, f"secret/app#{n}") for n in range(3)]
    results = cell.barrier.transact([Put(k, f"v{n}".encode(), 0) for n, k in enumerate(keys)])
    assert [r.value for r in results if r] == [b"v0", b"v1", b"v2"]
    assert [i.value for i in iter_prefix(cell.barrier, Kind.SECRET_VERSION, "secret/app#")] == [
        b"v0",
        b"v1",
        b"v2",
    ]
    assert all(
        i.value != f"v{n}".encode() for n, i in enumerate(iter_prefix(cell.ledger, Kind.SECRET_VERSION))
    )


@pytest.mark.parametrize("kind", [Kind.SEAL, Kind.KEYRING])
def test_items_that_open_the_barrier_cannot_be_written_through_it(cell: Cell, kind: Kind) -> None:
    with pytest.raises(ReservedKindError):
        cell.barrier.put_if(Key(kind, "config"), b"x", 1)
    with pytest.raises(ReservedKindError):
        cell.barrier.get(Key(kind, "config"))
    with pytest.raises(ReservedKindError):
        cell.barrier.transact([Put(Key(kind, "config"), b"x", 1)])

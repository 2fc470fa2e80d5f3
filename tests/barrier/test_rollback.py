"""The barrier binds each item's ledger version into its associated data (issue 20,
item 9): whoever can write the ledger cannot put back an older ciphertext of the same
key (an old root-token record, an old policy). Cells made before the binding keep
reading their items until the migration has rewritten every one of them; from then on
(and in every new cell) a ciphertext without the binding is refused too."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane import shamir
from keycell.control_plane.barrier import (
    KEYRING_KEY,
    BarrierIntegrityError,
    Keyring,
    decrypt_keyring,
    encrypt_keyring,
)
from keycell.control_plane.ledger import Key, Kind, Put
from keycell.control_plane.seal import Seal
from keycell.testing.cells import Cell

POLICY = Key(Kind.POLICY, "ops")
ROOT_TOKEN = Key(Kind.TOKEN, "an-old-root-token-record")


def test_an_older_ciphertext_swapped_in_through_the_ledger_is_refused(cell: Cell) -> None:
    cell.barrier.put_if(POLICY, b'path "*" { capabilities = ["sudo"] }', 0)
    old = cell.ledger.get(POLICY)
    assert old is not None
    cell.barrier.put_if(POLICY, b'path "secret/*" { capabilities = ["read"] }', 1)
    cell.ledger.put_if(POLICY, old.value, 2)  # the attacker writes the ledger directly
    with pytest.raises(BarrierIntegrityError, match="failed authentication"):
        cell.barrier.get(POLICY)


def test_a_swapped_in_ciphertext_is_refused_even_when_its_plaintext_is_remembered(cell: Cell) -> None:
    cell.barrier.put_if(ROOT_TOKEN, b'{"policies": ["root"]}', 0)
    old = cell.ledger.get(ROOT_TOKEN)
    assert old is not None
    assert cell.barrier.get(ROOT_TOKEN) is not None  # decrypted once: the barrier remembers it
    cell.barrier.put_if(ROOT_TOKEN, b'{"revoked": true}', 1)
    cell.ledger.put_if(ROOT_TOKEN, old.value, 2)
    with pytest.raises(BarrierIntegrityError):
        cell.barrier.get(ROOT_TOKEN)


def test_a_swapped_in_ciphertext_is_refused_in_a_transaction_write_too(cell: Cell) -> None:
    cell.barrier.transact([Put(POLICY, b"first", 0)])
    old = cell.ledger.get(POLICY)
    assert old is not None
    cell.barrier.transact([Put(POLICY, b"second", 1)])
    cell.ledger.transact([Put(POLICY, old.value, 2)])
    with pytest.raises(BarrierIntegrityError):
        cell.barrier.get(POLICY)
    with pytest.raises(BarrierIntegrityError):
        cell.barrier.scan(Kind.POLICY)


# --- cells made before the binding -----------------------------------------------------------


def legacy_blob(keyring: Keyring, key: Key, plaintext: bytes) -> bytes:
    """A value as the barrier wrote it before the version binding (format 1: the
    ledger key alone as associated data)."""
    term = keyring.term(keyring.active)
    assert term is not None
    nonce = os.urandom(12)
    sealed = AESGCM(bytes(term.key)).encrypt(nonce, plaintext, str(key).encode())
    return struct.pack(">BI", 1, term.number) + nonce + sealed


def make_legacy(cell: Cell) -> tuple[bytes, Keyring]:
    """Turn `cell` into one made before the binding: its keyring without the mark that
    the migration is done; the barrier sealed. Returns the root key and that keyring."""
    root = shamir.combine(cell.init.shares[:2])
    stored = cell.ledger.get(KEYRING_KEY)
    assert stored is not None
    keyring = decrypt_keyring(root, stored.value)
    keyring.min_format = 1
    cell.ledger.put_if(KEYRING_KEY, encrypt_keyring(root, keyring), stored.version)
    cell.barrier.close_barrier()
    return root, keyring


def test_a_new_cell_refuses_a_ciphertext_without_the_version(cell: Cell) -> None:
    root = shamir.combine(cell.init.shares[:2])
    stored = cell.ledger.get(KEYRING_KEY)
    assert stored is not None
    keyring = decrypt_keyring(root, stored.value)
    cell.ledger.put_if(POLICY, legacy_blob(keyring, POLICY, b"old format"), 0)
    with pytest.raises(BarrierIntegrityError, match="format"):
        cell.barrier.get(POLICY)


def test_unsealing_a_legacy_cell_rewrites_its_items_and_then_refuses_the_old_format(cell: Cell) -> None:
    root, keyring = make_legacy(cell)
    names = [Key(Kind.POLICY, f"p{i}") for i in range(250)]  # more than one scan page
    for key in names:
        cell.ledger.put_if(key, legacy_blob(keyring, key, f"text of {key.path}".encode()), 0)
    old = cell.ledger.get(names[0])
    assert old is not None

    seal = Seal(cell.ledger, cell.barrier)
    seal.unseal(cell.init.shares[0])
    seal.unseal(cell.init.shares[2])  # opens the barrier, which migrates

    for key in names:
        raw = cell.ledger.get(key)
        assert raw is not None and raw.value[0] == 2 and raw.version == 2
        item = cell.barrier.get(key)
        assert item is not None and item.value == f"text of {key.path}".encode()
    stored = cell.ledger.get(KEYRING_KEY)
    assert stored is not None and decrypt_keyring(root, stored.value).min_format == 2
    # The old-format ciphertext put back is refused now.
    cell.ledger.put_if(names[0], old.value, 2)
    with pytest.raises(BarrierIntegrityError, match="format"):
        cell.barrier.get(names[0])


def test_a_legacy_cell_reads_old_items_until_they_are_rewritten(cell: Cell) -> None:
    root, keyring = make_legacy(cell)
    cell.ledger.put_if(POLICY, legacy_blob(keyring, POLICY, b"legacy"), 0)
    cell.barrier.open(root, keyring)  # opened without the seal: no migration yet
    item = cell.barrier.get(POLICY)
    assert item is not None and item.value == b"legacy"
    assert cell.barrier.migrate() == 1
    assert cell.barrier.migrate() == 0
    item = cell.barrier.get(POLICY)
    assert item is not None and item.value == b"legacy" and item.version == 2


def test_an_item_that_does_not_decrypt_does_not_stop_the_migration(cell: Cell) -> None:
    root, keyring = make_legacy(cell)
    broken, fine = Key(Kind.POLICY, "broken"), Key(Kind.POLICY, "fine")
    cell.ledger.put_if(broken, legacy_blob(keyring, Key(Kind.POLICY, "elsewhere"), b"moved"), 0)
    cell.ledger.put_if(fine, legacy_blob(keyring, fine, b"fine"), 0)
    cell.barrier.open(root, keyring)
    assert cell.barrier.migrate() == 1
    item = cell.barrier.get(fine)
    assert item is not None and item.value == b"fine"
    with pytest.raises(BarrierIntegrityError):
        cell.barrier.get(broken)


def test_a_migration_chunk_with_an_item_written_meanwhile_is_retried_item_by_item(cell: Cell) -> None:
    root, keyring = make_legacy(cell)
    keys = [Key(Kind.POLICY, f"q{i}") for i in range(3)]
    for key in keys:
        cell.ledger.put_if(key, legacy_blob(keyring, key, key.path.encode()), 0)
    cell.barrier.open(root, keyring)
    puts = [Put(k, cell.barrier.encrypt(k, k.path.encode(), 2), 1) for k in keys]
    cell.barrier.put_if(keys[1], b"written meanwhile", 1)  # now at version 2, format 2
    assert cell.barrier._rewrite(puts) == 2
    assert [cell.barrier.get(k).value for k in keys] == [b"q0", b"written meanwhile", b"q2"]  # type: ignore[union-attr]

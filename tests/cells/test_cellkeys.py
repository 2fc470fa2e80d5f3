"""A cell's sealing key: what is sealed to one cell opens only there, only with the
same associated data; the private half stays in the cell's barrier."""

from __future__ import annotations

from pathlib import Path

import pytest

from keycell.cells.mesh import open_cell
from keycell.control_plane.cellkeys import CellKey, SealedForCell, SealError, fingerprint, seal_to
from keycell.control_plane.ledger import Key, Kind


def test_sealed_for_one_cell_opens_there_and_nowhere_else(tmp_path: Path) -> None:
    a = open_cell(tmp_path / "a", "a")
    b = open_cell(tmp_path / "b", "b")
    try:
        key_a, key_b = CellKey.load_or_create(a.barrier), CellKey.load_or_create(b.barrier)
        sealed = seal_to(key_a.public_pem, b"data key bytes", b"keycell:kv2:secret/x#1")
        assert key_a.open(sealed, b"keycell:kv2:secret/x#1") == b"data key bytes"
        with pytest.raises(SealError):
            key_b.open(sealed, b"keycell:kv2:secret/x#1")
        with pytest.raises(SealError):
            key_a.open(sealed, b"keycell:kv2:secret/x#2")  # moved to another version
        with pytest.raises(SealError):
            key_a.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"keycell:kv2:secret/x#1")
        assert key_a.fingerprint == fingerprint(key_a.public_pem) != key_b.fingerprint
        # the same key on every load; its private half is barrier ciphertext in the ledger
        assert CellKey.load_or_create(a.barrier).fingerprint == key_a.fingerprint
        raw = a.ledger.get(Key(Kind.CONFIG, "cells/sealing-key"))
        assert raw is not None and b"PRIVATE" not in raw.value
    finally:
        a.ledger.close()
        b.ledger.close()


def test_the_encrypt_only_recipient_cannot_unwrap() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    grant = SealedForCell(pem)
    wrapped = grant.wrap("cell-kek", b"k" * 32, b"aad")
    with pytest.raises(SealError):
        grant.unwrap("cell-kek", wrapped, b"aad")


def test_sealed_by_one_cell_for_another_opens_only_as_from_that_cell(tmp_path: Path) -> None:
    a, b, c = (open_cell(tmp_path / n, n) for n in "abc")
    try:
        key_a, key_b, key_c = (CellKey.load_or_create(s.barrier) for s in (a, b, c))
        aad = b"keycell/v1/revocation-inbox:a/rv_1"
        sealed = key_a.seal_for(key_b.public_pem, b"revocation", aad)
        assert key_b.open_from(key_a.public_pem, sealed, aad) == b"revocation"
        with pytest.raises(SealError):
            key_b.open_from(key_c.public_pem, sealed, aad)  # not c's: the sender is bound
        with pytest.raises(SealError):
            key_b.open(sealed, aad)  # nor an anonymous seal
        with pytest.raises(SealError):
            key_c.open_from(key_a.public_pem, sealed, aad)  # sealed for b only
        with pytest.raises(SealError):
            key_b.open_from(key_a.public_pem, sealed, aad + b"x")
        # an anonymous seal (anyone can make one) never passes as a's
        anonymous = seal_to(key_b.public_pem, b"forged", aad)
        with pytest.raises(SealError):
            key_b.open_from(key_a.public_pem, anonymous, aad)
    finally:
        for services in (a, b, c):
            services.ledger.close()

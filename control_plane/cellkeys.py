"""A cell's sealing key: how values travel between cells without plaintext or key
material ever crossing in the clear (issue 9).

Each cell has one EC P-256 key pair. The public half is published in the cell
directory (PEM, with its SHA-256 fingerprint); the private half lives only in the
cell's own barrier, encrypted under the barrier keyring like every other record. To
send a cell a secret version's data key (replication) or a value (a write forwarded
to the secret's home), the sender seals it to that cell's public key: ECIES with an
ephemeral P-256 key, ECDH, HKDF-SHA256 and AES-256-GCM, the associated data bound in
both the key derivation and the AEAD. Only the receiving cell can open it, and what
it opens it immediately re-wraps under its own KEK in its HSM.

`CellKey.seal_for` / `CellKey.open_from` add sender authentication (the revocation
inbox, issue 18): the key is derived from the ephemeral-static ECDH *and* the
static-static ECDH between the two cells' keys (as HPKE's Auth mode does, RFC 9180
§5.1.3), so only the named sender (or the recipient itself) can make a blob that
opens, and a blob opens only for the recipient.

`SealedForCell` is the encrypt-only half as an envelope `Recipient` backend: the home
cell's `Envelopes.add_recipient` wraps a version's data key for another cell with it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keycell.control_plane.envelope import Recipient
from keycell.control_plane.keys import IntegrityError, KeyBackend
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger

_INFO = b"keycell/v1/cell-seal"
_INFO_AUTH = b"keycell/v1/cell-seal-auth"
_POINT = 65  # an uncompressed P-256 point
_NONCE = 12
_KEY = Key(Kind.CONFIG, "cells/sealing-key")


class SealError(IntegrityError):
    """A sealed blob is malformed, or was sealed for another cell or other data."""


def fingerprint(public_pem: str) -> str:
    der = serialization.load_pem_public_key(public_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _derive(shared: bytes, ephemeral: bytes, aad: bytes, info: bytes = _INFO) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral, info=info + b"\x00" + aad).derive(shared)


def _public(public_pem: str) -> ec.EllipticCurvePublicKey:
    public = serialization.load_pem_public_key(public_pem.encode())  # ValueError: not PEM
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise SealError("a cell's sealing key is an EC P-256 public key")
    return public


def _seal(
    public: ec.EllipticCurvePublicKey,
    plaintext: bytes,
    aad: bytes,
    sender: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    shared = ephemeral.exchange(ec.ECDH(), public)
    if sender is None:
        key = _derive(shared, point, aad)
    else:
        key = _derive(shared + sender.exchange(ec.ECDH(), public), point, aad, _INFO_AUTH)
    nonce = os.urandom(_NONCE)
    return point + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def seal_to(public_pem: str, plaintext: bytes, aad: bytes) -> bytes:
    """Seal `plaintext` so only the holder of `public_pem`'s private key opens it."""
    return _seal(_public(public_pem), plaintext, aad)


class CellKey:
    """This cell's sealing key pair, kept in the cell's barrier."""

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        self._private = private
        self.public_pem = (
            private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self.fingerprint = fingerprint(self.public_pem)

    @classmethod
    def load_or_create(cls, barrier: Ledger) -> CellKey:
        """The cell's key from its barrier, made on first use (two processes racing to
        make it agree on the first one written)."""
        for _ in range(3):
            item = barrier.get(_KEY, consistent=True)
            if item is not None:
                private = serialization.load_der_private_key(base64.b64decode(item.value), None)
                if not isinstance(private, ec.EllipticCurvePrivateKey):
                    raise SealError("the stored sealing key is not an EC key")
                return cls(private)
            fresh = ec.generate_private_key(ec.SECP256R1())
            der = fresh.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:
                barrier.put_if(_KEY, base64.b64encode(der), 0)
            except ConflictError:
                continue
            return cls(fresh)
        raise SealError("could not read or create the cell's sealing key")

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        return self._open(sealed, aad, None)

    def seal_for(self, public_pem: str, plaintext: bytes, aad: bytes) -> bytes:
        """Seal `plaintext` for the cell holding `public_pem`'s private key, provably
        from this cell: it opens only with `open_from(this cell's public key, ...)`."""
        return _seal(_public(public_pem), plaintext, aad, self._private)

    def open_from(self, sender_pem: str, sealed: bytes, aad: bytes) -> bytes:
        """Open what the cell holding `sender_pem`'s private key sealed for this cell
        with `seal_for`; SealError if it was sealed by anyone else, for anyone else, or
        altered."""
        return self._open(sealed, aad, _public(sender_pem))

    def _open(self, sealed: bytes, aad: bytes, sender: ec.EllipticCurvePublicKey | None) -> bytes:
        if len(sealed) < _POINT + _NONCE + 16:
            raise SealError("the sealed value is too short")
        point, nonce, body = sealed[:_POINT], sealed[_POINT : _POINT + _NONCE], sealed[_POINT + _NONCE :]
        try:
            ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            shared = self._private.exchange(ec.ECDH(), ephemeral)
            if sender is None:
                key = _derive(shared, point, aad)
            else:
                key = _derive(shared + self._private.exchange(ec.ECDH(), sender), point, aad, _INFO_AUTH)
            return AESGCM(key).decrypt(nonce, body, aad)
        except (InvalidTag, ValueError):
            raise SealError("the sealed value does not open here (another cell's, or altered)") from None


class SealedForCell:
    """An encrypt-only key "backend" for another cell: `wrap` seals to its public key.
    Anything else is refused: this cell can never unwrap what it sealed for another."""

    def __init__(self, public_pem: str) -> None:
        self.public_pem = public_pem

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        return seal_to(self.public_pem, plaintext, aad)

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        raise SealError("a cell cannot open what it sealed for another cell")


def recipient(cell: str, public_pem: str) -> Recipient:
    # Recipient types its backend as a KeyBackend; an envelope only ever calls `wrap`.
    return Recipient(cell, cast(KeyBackend, SealedForCell(public_pem)))

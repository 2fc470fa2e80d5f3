"""Canary: after many secrets are written through the barrier with envelope
encryption, the raw storage (every byte of the SQLite files, every raw DynamoDB
item) holds no plaintext value, no data key, no term key and no root key."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import boto3

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane import shamir
from keycell.control_plane.barrier import KEYRING_KEY, decrypt_keyring
from keycell.control_plane.envelope import Envelopes
from keycell.control_plane.keys import KeySpec
from keycell.control_plane.ledger import Key, Kind, Ledger
from keycell.testing.cells import open_cell

SECRETS = 200


class RecordingBackend(SoftwareKeyBackend):
    """The software backend, remembering every data key it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.data_keys: list[bytes] = []

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        self.data_keys.append(bytes(plaintext))
        return super().wrap(name, plaintext, aad)


def raw_storage(ledger: Ledger) -> bytes:
    if isinstance(ledger, SqliteLedger):
        files = [ledger.path, Path(f"{ledger.path}-wal"), Path(f"{ledger.path}-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())
    assert isinstance(ledger, DynamoLedger)
    client = boto3.client("dynamodb", endpoint_url=ledger.model.Meta.host, region_name="us-east-1")
    chunks: list[bytes] = []
    for page in client.get_paginator("scan").paginate(TableName=ledger.table, ConsistentRead=True):
        for item in page["Items"]:
            for attribute in item.values():
                for value in attribute.values():
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(chunks)


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could be spelled in storage."""
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret)]


def test_raw_storage_holds_no_plaintext_and_no_key_material(ledger: Ledger) -> None:
    cell = open_cell(ledger)
    backend = RecordingBackend()
    backend.create_key("cell-kek", KeySpec.AES_256)
    envelopes = Envelopes("us-east-1", backend, "cell-kek")
    canaries = [f"CANARY-{uuid.uuid4().hex}".encode() for _ in range(SECRETS)]
    for n, value in enumerate(canaries):
        key = Key(Kind.SECRET_VERSION, f"secret/canary/{n:04d}#1")
        cell.barrier.put_if(key, envelopes.seal(value, str(key).encode()).to_bytes(), 0)
    cell.barrier.rotate()  # a second term, so both are checked
    for n, value in enumerate(canaries[:10]):
        key = Key(Kind.SECRET_VERSION, f"secret/canary/{n:04d}#2")
        cell.barrier.put_if(key, envelopes.seal(value, str(key).encode()).to_bytes(), 0)

    root = shamir.combine(cell.init.shares[:2])
    keyring = decrypt_keyring(root, ledger.get(KEYRING_KEY).value)  # type: ignore[union-attr]
    term_keys = [bytes(keyring.term(t).key) for t in keyring.terms]  # type: ignore[union-attr]
    assert len(term_keys) == 2 and len(backend.data_keys) == SECRETS + 10

    storage = raw_storage(ledger)
    assert len(storage) > SECRETS * 100  # the scan really saw the data
    for value in canaries:
        assert value not in storage
    for secret in [root, *term_keys, *backend.data_keys]:
        for spelling in forms(secret):
            assert spelling not in storage
    assert cell.init.root_token.encode() not in storage
    # and the values are all still there, readable through the barrier
    item = cell.barrier.get(Key(Kind.SECRET_VERSION, "secret/canary/0007#1"))
    assert item is not None

"""JSON records in the ledger: the one way engines store structured state.

Engines hand these helpers the barrier (a `Ledger` whose values are encrypted on the
way down), so a record is plaintext JSON here and ciphertext in storage.
"""

from __future__ import annotations

import json
from typing import Any

from keycell.control_plane.ledger import ConflictError, Key, Ledger

# Writers that keep losing a compare-and-set give up after this many rounds (each
# round lets one writer through, so losing them all means heavy contention).
ATTEMPTS = 8


def get_json(ledger: Ledger, key: Key, *, consistent: bool = True) -> tuple[dict[str, Any], int] | None:
    """The record and its version, or None."""
    item = ledger.get(key, consistent=consistent)
    if item is None:
        return None
    record = json.loads(item.value)
    if not isinstance(record, dict):
        raise ValueError(f"the record at {key} is not a JSON object")
    return record, item.version


def put_json_if(
    ledger: Ledger, key: Key, record: dict[str, Any], expected_version: int, *, expires_at: int | None = None
) -> int:
    """Write `record` if the item is at `expected_version` (0: absent); the new version."""
    return ledger.put_if(key, encode_json(record), expected_version, expires_at=expires_at).version


def encode_json(record: dict[str, Any]) -> bytes:
    """The bytes `put_json_if` stores, for multi-item transactions (`Put(key, encode_json(r), v)`)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def put_json_current(ledger: Ledger, key: Key, record: Any) -> bool:
    """Write `record` over whatever version of `key` is current (or create it); False
    when concurrent writers kept moving it."""
    for _ in range(ATTEMPTS):
        item = ledger.get(key, consistent=True)
        try:
            put_json_if(ledger, key, record, 0 if item is None else item.version)
            return True
        except ConflictError:
            continue
    return False


def delete_current(ledger: Ledger, key: Key) -> bool:
    """Delete whatever version of `key` is current (an absent key is not an error, as
    Vault's deletes are not); False when concurrent writers kept moving it."""
    for _ in range(ATTEMPTS):
        item = ledger.get(key, consistent=True)
        if item is None:
            return True
        try:
            ledger.delete_if(key, item.version)
            return True
        except ConflictError:
            continue
    return False

"""The cell's revocation set: a grow-only set (a CRDT) of revoked identifiers.

A revocation names what it kills: a token accessor (`token:<accessor>`), a lease
(`lease:<lease id>`), later a SPIFFE ID or a credential. Adding is a create-if-absent
write in this cell's ledger, so it is accepted in any cell, even a partitioned one,
and merging two sets is their union: a revocation can never be lost or undone. An
entry carries its origin cell and time (for the exposure window) and expires only
once the thing it revokes could no longer be used anyway (`expires_at`).

Checks are a local ledger lookup: no network on the request path. The relay (issue
8) fans entries out to every cell and keeps an in-memory copy in each process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger
from keycell.control_plane.storage import get_json, put_json_if


@dataclass(frozen=True)
class Revocation:
    subject: str
    origin_cell: str
    revoked_at: float
    reason: str


class RevocationSet:
    def __init__(self, ledger: Ledger, cell: str, *, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.cell = cell
        self.clock = clock

    def revoke(self, subject: str, *, reason: str, expires_at: int | None = None) -> bool:
        """Add `subject`; False if it was already revoked (adding is idempotent)."""
        record = {"origin_cell": self.cell, "revoked_at": self.clock(), "reason": reason}
        try:
            put_json_if(self.ledger, Key(Kind.REVOCATION, subject), record, 0, expires_at=expires_at)
        except ConflictError:
            return False
        return True

    def is_revoked(self, subject: str) -> bool:
        return self.ledger.get(Key(Kind.REVOCATION, subject), consistent=True) is not None

    def get(self, subject: str) -> Revocation | None:
        found = get_json(self.ledger, Key(Kind.REVOCATION, subject))
        if found is None:
            return None
        record, _ = found
        return Revocation(
            subject, str(record["origin_cell"]), float(record["revoked_at"]), str(record["reason"])
        )

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

import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.freshness import Mint, seq_marker
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, Put, iter_prefix
from keycell.control_plane.storage import encode_json, get_json, put_json_if


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
        """`subject` is in the set; a lease also when a prefix revocation (`lease-prefix:`,
        on whole path segments) covers its id."""
        if self.ledger.get(Key(Kind.REVOCATION, subject), consistent=True) is not None:
            return True
        if subject.startswith("lease:"):
            segments = subject[len("lease:") :].split("/")[:-1]
            for i in range(1, len(segments) + 1):
                covering = "lease-prefix:" + "/".join(segments[:i]) + "/"
                if self.ledger.get(Key(Kind.REVOCATION, covering), consistent=True) is not None:
                    return True
        return False

    def get(self, subject: str) -> Revocation | None:
        found = get_json(self.ledger, Key(Kind.REVOCATION, subject))
        if found is None:
            return None
        record, _ = found
        return Revocation(
            subject, str(record["origin_cell"]), float(record["revoked_at"]), str(record["reason"])
        )


# --- revocation records and receipts (the relay's unit of gossip, issue 8) ----------------

# What a revocation may name; anything else is refused before it reaches the ledger.
SUBJECT_KINDS = ("token", "lease", "lease-prefix", "spiffe", "svid")
MAX_SUBJECT_BYTES = 1024
# One SVID: a JWT-SVID's jti or an X.509-SVID's serial, in lower-case hex.
SVID_ID = re.compile(r"[0-9a-f]{1,64}")


def spiffe_subject(spiffe_id: object) -> str:
    """The revocation subject of a SPIFFE ID: every SVID for it, now and later."""
    return f"spiffe:{spiffe_id}"


def svid_subject(svid_id: str) -> str:
    """The revocation subject of one SVID (`SVID_ID`: its jti, or its serial in hex)."""
    return f"svid:{svid_id}"


@dataclass(frozen=True)
class RevocationRecord:
    """One revocation as the relay carries it: `id` is minted once, by the cell that
    accepted the revoke call; `revoked_at` starts the exposure window."""

    id: str
    subject: str
    origin_cell: str
    revoked_at: float
    reason: str
    expires_at: int | None = None
    seq: int = 0  # the origin cell's sequence number (freshness.py); 0: minted without one

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "origin_cell": self.origin_cell,
            "revoked_at": self.revoked_at,
            "reason": self.reason,
            "expires_at": self.expires_at,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RevocationRecord:
        expires = record.get("expires_at")
        return cls(
            str(record["id"]),
            str(record["subject"]),
            str(record["origin_cell"]),
            float(record["revoked_at"]),
            str(record.get("reason", "")),
            int(expires) if expires else None,
            int(record.get("seq") or 0),
        )


@dataclass(frozen=True)
class Receipt:
    """Cell `cell` holds revocation `id` in its ledger since `applied_at`."""

    id: str
    cell: str
    applied_at: float
    path: str = ""  # the delivery path that brought it there first (PATHS), "" when not known


# A revocation id is "rv_" + 11 hex digits of the minting time in milliseconds + 13
# random hex digits: ids (and so receipt paths, "<id>/<cell>") sort by time, and the ids
# minted in one 2**16 ms (~65 s) window share the prefix "rv_" + 7 hex digits, which lets
# the relay's sweep read only recent receipts (RevocationLog.held_since).
ID_BUCKET_BITS = 16


def new_revocation_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    return f"rv_{ms:011x}{secrets.token_hex(7)[:13]}"


def id_bucket_prefixes(since: float, until: float) -> list[str]:
    """Receipt path prefixes covering ids minted in [since, until]."""
    first, last = int(since * 1000) >> ID_BUCKET_BITS, int(until * 1000) >> ID_BUCKET_BITS
    return [f"rv_{b:07x}" for b in range(max(0, first), last + 1)]


def check_subject(subject: str) -> str:
    """`kind:value` with a known kind, or InvalidRequest naming the accepted shapes."""
    kind, sep, value = subject.partition(":")
    if not sep or kind not in SUBJECT_KINDS or not value.strip():
        raise InvalidRequest(
            "a revocation subject is KIND:VALUE with KIND one of " + ", ".join(SUBJECT_KINDS)
        )
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise InvalidRequest(f"a revocation subject is at most {MAX_SUBJECT_BYTES} bytes")
    return subject


# The paths a revocation takes to a cell (issue 18): minted there, the relay mesh, a
# direct call to the cell's API, a write into the cell's ledger by another cell.
PATHS = ("origin", "relay", "direct", "ledger")


def _receipt_key(revocation_id: str, cell: str) -> Key:
    return Key(Kind.REVOCATION_RECEIPT, f"{revocation_id}/{cell}")


class RevocationLog:
    """Revocation records with their per-cell receipts, over the cell's barrier.

    `record` is the revoke call's CP step: the subject enters this cell's revocation
    set and this cell's receipt is written, before anything is gossiped. `apply` is
    what a relay does with a record it heard: the same two conditional writes, each
    a no-op when already there, so applying twice (or in two relays of one cell) is
    harmless. Receipts of other cells arrive by gossip and are kept too, so any cell
    answers `sys/revocations/:id` for every cell it has heard from."""

    def __init__(self, revocations: RevocationSet) -> None:
        self.revocations = revocations
        self.ledger = revocations.ledger
        self.cell = revocations.cell

    def record(self, subject: str, *, reason: str, expires_at: int | None = None) -> RevocationRecord:
        """Mint: number and stamp the revocation with this cell's counter (freshness.Mint)
        in the same commit as the subject, its receipt and its seq marker."""
        check_subject(subject)
        mint = Mint(self.ledger, self.cell, self.revocations.clock)
        while True:
            seq, stamp, counter = mint.next_put()
            rec = RevocationRecord(
                new_revocation_id(stamp), subject, self.cell, stamp, reason, expires_at, seq
            )
            puts = self._apply_puts(rec, "origin", stamp)
            try:
                self.ledger.transact([counter, *puts])
                return rec
            except ConflictError:
                pass
            if mint.read()[2] != counter.expected_version:
                continue  # another mint (or a heartbeat) won the counter: number it again
            try:  # the subject was revoked already: the rest still commits together
                self.ledger.transact([counter, *puts[1:]])
                return rec
            except ConflictError:
                continue

    def _apply_puts(self, rec: RevocationRecord, path: str, applied: float) -> list[Put]:
        """Subject, this cell's receipt, and (for a numbered revocation) its seq marker."""
        subject_record = {
            "origin_cell": rec.origin_cell,
            "revoked_at": rec.revoked_at,
            "reason": rec.reason,
            "id": rec.id,
        }
        receipt = {"cell": self.cell, "applied_at": applied, "path": path, "revocation": rec.as_json()}
        puts = [
            Put(Key(Kind.REVOCATION, rec.subject), encode_json(subject_record), 0, rec.expires_at),
            Put(_receipt_key(rec.id, self.cell), encode_json(receipt), 0, rec.expires_at),
        ]
        if rec.seq > 0:
            puts.append(seq_marker(rec.origin_cell, rec.seq, rec.revoked_at, path))
        return puts

    def apply(self, rec: RevocationRecord, path: str = "relay") -> float:
        """Make this cell's ledger hold `rec`; when it first did (this cell's receipt:
        a repeat finds it through the conflict, not a read before every write). `path`
        names what brought it (PATHS); the receipt keeps the first one's."""
        applied = self.revocations.clock()
        puts = self._apply_puts(rec, path, applied)
        try:  # all in one commit: the common case costs one fsync
            self.ledger.transact(puts)
            return applied
        except ConflictError:
            pass  # the subject was revoked already (maybe by another record), or the receipt is there
        # Subject first, then the seq marker and the receipt: a receipt never claims a
        # subject the set lacks, nor a marker a revocation the set lacks.
        for put in puts[:1] + puts[2:]:
            with contextlib.suppress(ConflictError):
                self.ledger.transact([put])
        try:
            self.ledger.transact([puts[1]])
        except ConflictError:
            again = self.applied_at(rec.id, self.cell)
            return applied if again is None else again
        return applied

    def store_receipt(self, receipt: Receipt, rec: RevocationRecord | None = None) -> bool:
        """Keep another cell's receipt; False if it was already kept."""
        value: dict[str, Any] = {"cell": receipt.cell, "applied_at": receipt.applied_at}
        if receipt.path:
            value["path"] = receipt.path
        if rec is not None:
            value["revocation"] = rec.as_json()
        expires = rec.expires_at if rec is not None else None  # goes when its revocation does
        try:
            put_json_if(self.ledger, _receipt_key(receipt.id, receipt.cell), value, 0, expires_at=expires)
        except ConflictError:
            return False
        return True

    def receipt(self, revocation_id: str, cell: str) -> Receipt | None:
        found = get_json(self.ledger, _receipt_key(revocation_id, cell))
        if found is None:
            return None
        value = found[0]
        return Receipt(revocation_id, cell, float(value["applied_at"]), str(value.get("path", "")))

    def applied_at(self, revocation_id: str, cell: str) -> float | None:
        found = get_json(self.ledger, _receipt_key(revocation_id, cell))
        return None if found is None else float(found[0]["applied_at"])

    def describe(self, revocation_id: str) -> tuple[RevocationRecord, list[Receipt]] | None:
        """The record and every receipt this cell holds for it, or None."""
        rec: RevocationRecord | None = None
        receipts: list[Receipt] = []
        for item in iter_prefix(self.ledger, Kind.REVOCATION_RECEIPT, revocation_id + "/", page_size=100):
            value = json.loads(item.value)
            receipts.append(
                Receipt(
                    revocation_id, str(value["cell"]), float(value["applied_at"]), str(value.get("path", ""))
                )
            )
            if rec is None and isinstance(value.get("revocation"), dict):
                rec = RevocationRecord.from_json(value["revocation"])
        if rec is None:
            return None
        return rec, sorted(receipts, key=lambda r: r.applied_at)

    def held_since(self, since: float) -> Iterator[tuple[RevocationRecord | None, Receipt]]:
        """The receipts of revocations minted since `since` (epoch seconds; ids carry
        their minting time, so this reads a few id buckets, not every receipt)."""
        for prefix in id_bucket_prefixes(since, time.time() + 1):
            yield from self.held(prefix)

    def held(self, prefix: str = "") -> Iterator[tuple[RevocationRecord | None, Receipt]]:
        """Every receipt this cell holds (with its record when it carries one): what a
        restarted relay reloads."""
        for item in iter_prefix(self.ledger, Kind.REVOCATION_RECEIPT, prefix, page_size=500):
            value = json.loads(item.value)
            revocation_id = item.key.path.rsplit("/", 1)[0]
            rec = value.get("revocation")
            yield (
                RevocationRecord.from_json(rec) if isinstance(rec, dict) else None,
                Receipt(revocation_id, str(value["cell"]), float(value["applied_at"])),
            )

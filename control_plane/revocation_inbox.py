"""The revocation inbox (issue 18 §1, the third path): a cell writes each revocation it
mints, and its freshness heartbeat, straight into every peer cell's ledger, where the
peer drains them into its own revocation set.

Why a ledger write reaches a cell the mesh cannot. The relay mesh and the direct path
both need this cell's processes to reach the peer's processes. A peer's ledger is a
managed table (DynamoDB in the peer's region) reached over the cloud provider's own
network, with no Keycell process in between: a partition of the relays, or of the
peer's API endpoints, leaves it reachable. So a revocation committed here lands in
the peer's table while the mesh is cut, and the peer's drain loop, which only reads
its own table, applies it without hearing from anyone. In DESIGN.md's terms this is
one more independent path for the grow-only set: each path alone is enough, and the
watermark (control_plane/freshness.py) advances through whichever path arrives.

Why a conditional put. The revocation set is a grow-only CRDT, so delivering twice
must be free, and the peer's table is shared with the peer's own CP writes, so this
cell must never overwrite anything. Each revocation is one inbox item keyed by
(sender, revocation id), written with `put_if(..., expected_version=0)`: the first
delivery creates it, a repeat (a retry, a second API process of this cell, a resend
after the peer already drained and deleted it) is either a ConflictError, which means
"already there", or re-creates an item whose drain is a no-op (RevocationLog.apply is
idempotent). No read-modify-write, no lock, nothing to reconcile after a partition.

Why sealed and authenticated. The peer's table is the peer's, not this cell's: the
subject (a token accessor, a lease id) is kept from anyone who can read the table by
sealing each item to the peer cell's key (control_plane/cellkeys.py), and the peer
must know the item came from the cell it names, or anyone with write access to its
table could forge a heartbeat and make a stale cell think itself fresh. `seal_for`
binds both (ECDH with the sender's static key as well as an ephemeral one), and the
associated data binds the item's key and both cell ids, so a blob moved to another
key, another sender's name or another peer does not open. The item's plaintext holds
only the sender's id and the revocation id, which say nothing secret.

Heartbeats use one item per sender, overwritten (compare-and-set at the version read);
the receiver keeps the newest it has seen (Freshness.note_heartbeat), so a replayed old
one changes nothing. Items are outside the barrier: the sender cannot use the peer's
barrier keys, which is the point.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keycell.control_plane.cellkeys import CellKey, SealError
from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.freshness import Freshness, Heartbeat
from keycell.control_plane.ledger import ConflictError, Item, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.revocations import RevocationLog, RevocationRecord, check_subject

log = logging.getLogger("keycell.revocation_inbox")

FORMAT = 1
PATH = "ledger"  # the delivery path's name in receipts and watermarks (revocations.PATHS)
_HEARTBEAT = "heartbeat"
MAX_DRAIN = 1000  # inbox items applied per drain call; the next call takes the rest


def revocation_key(sender: str, revocation_id: str) -> Key:
    return Key(Kind.REVOCATION_INBOX, f"{sender}/{revocation_id}")


def heartbeat_key(sender: str) -> Key:
    return Key(Kind.REVOCATION_INBOX, f"{sender}/{_HEARTBEAT}")


def _aad(key: Key, sender: str, recipient: str) -> bytes:
    return f"keycell/v1/revocation-inbox\x00{key}\x00{sender}\x00{recipient}".encode()


def _envelope(sender: str, sealed: bytes) -> bytes:
    return json.dumps(
        {"v": FORMAT, "from": sender, "sealed": base64.b64encode(sealed).decode()}, separators=(",", ":")
    ).encode()


class InboxWriter:
    """This cell's side: put its revocations and heartbeats into peers' ledgers."""

    def __init__(self, cell: str, key: CellKey) -> None:
        self.cell, self.key = cell, key
        self._heartbeat_versions: dict[str, int] = {}  # per peer ledger: the version last written

    def put_revocation(self, ledger: Ledger, peer: str, peer_pem: str, rec: RevocationRecord) -> bool:
        """Write `rec` into `peer`'s inbox (`ledger`: the peer's); False if it was there
        already (nothing written: the conditional put lost, which is the point).
        LedgerUnavailableError when the peer's ledger cannot be reached."""
        if rec.origin_cell != self.cell:
            raise ValueError("the ledger path carries only revocations this cell minted")
        key = revocation_key(self.cell, rec.id)
        plain = json.dumps(rec.as_json(), separators=(",", ":")).encode()
        sealed = self.key.seal_for(peer_pem, plain, _aad(key, self.cell, peer))
        try:
            ledger.put_if(key, _envelope(self.cell, sealed), 0, expires_at=rec.expires_at)
        except ConflictError:
            return False
        return True

    def put_heartbeat(self, ledger: Ledger, peer: str, peer_pem: str, hb: Heartbeat) -> None:
        """Replace this cell's heartbeat item in `peer`'s inbox with `hb`."""
        key = heartbeat_key(self.cell)
        plain = json.dumps(hb.as_json(), separators=(",", ":")).encode()
        value = _envelope(self.cell, self.key.seal_for(peer_pem, plain, _aad(key, self.cell, peer)))
        # Only this cell writes it, so the version it wrote last is usually still current
        # (one request a beat); a conflict means another of its processes (or a restart)
        # wrote since: read the version and go again.
        version = self._heartbeat_versions.get(peer)
        for _ in range(3):
            if version is None:
                found = ledger.get(key, consistent=True)
                version = 0 if found is None else found.version
            try:
                self._heartbeat_versions[peer] = ledger.put_if(key, value, version).version
                return
            except ConflictError:
                version = None


@dataclass
class DrainResult:
    applied: int = 0  # revocations new to this cell's set
    repeated: int = 0  # revocations it held already (another path was first)
    heartbeats: int = 0  # heartbeats newer than the one held
    rejected: int = 0  # items that did not open (unknown sender, forged, altered): left in place

    def add(self, other: DrainResult) -> None:
        self.applied += other.applied
        self.repeated += other.repeated
        self.heartbeats += other.heartbeats
        self.rejected += other.rejected


class Inbox:
    """The receiving side: what peers put into this cell's ledger, applied to its set.

    `ledger` is the raw ledger (inbox items are outside the barrier); `log` and
    `freshness` sit on the barrier as everywhere else; `sender_keys` gives the peers'
    public sealing keys (the cell directory's)."""

    def __init__(
        self,
        ledger: Ledger,
        log: RevocationLog,
        freshness: Freshness,
        key: CellKey,
        sender_keys: Callable[[], Mapping[str, str]],
    ) -> None:
        self.ledger, self.log, self.freshness, self.key = ledger, log, freshness, key
        self.cell = log.cell
        self.sender_keys = sender_keys
        self._heartbeats_taken: dict[str, int] = {}  # heartbeat item -> version last taken

    def drain(self, limit: int = MAX_DRAIN) -> DrainResult:
        """Apply every revocation and heartbeat in the inbox (at most `limit` items),
        removing each revocation item once applied. Safe to run in several processes
        at once: applying is idempotent and each removal is conditional."""
        result = DrainResult()
        keys = self.sender_keys()
        for seen, item in enumerate(iter_prefix(self.ledger, Kind.REVOCATION_INBOX, page_size=100)):
            if seen >= limit:
                break
            result.add(self._take(item, keys))
        return result

    def _take(self, item: Item, keys: Mapping[str, str]) -> DrainResult:
        sender, _, name = item.key.path.partition("/")
        if name == _HEARTBEAT and self._heartbeats_taken.get(item.key.path) == item.version:
            return DrainResult()  # the same beat as at the last drain: nothing to open
        plain = self._open(item, sender, keys.get(sender))
        if plain is None:
            return DrainResult(rejected=1)
        if name == _HEARTBEAT:
            hb = _heartbeat(plain, sender)
            if hb is None:
                return DrainResult(rejected=1)
            newer = self.freshness.note_heartbeat(hb, PATH)
            self._heartbeats_taken[item.key.path] = item.version
            return DrainResult(heartbeats=int(newer))
        rec = _revocation(plain, sender, name)
        if rec is None:
            return DrainResult(rejected=1)
        had = self.log.receipt(rec.id, self.cell) is not None
        self.log.apply(rec, PATH)
        with contextlib.suppress(ConflictError):  # another drainer removed (or a resend re-made) it
            self.ledger.delete_if(item.key, item.version)
        return DrainResult(repeated=1) if had else DrainResult(applied=1)

    def _open(self, item: Item, sender: str, sender_pem: str | None) -> bytes | None:
        if sender_pem is None or sender == self.cell:
            log.warning("revocation inbox: %s names a sender without a known sealing key", item.key)
            return None
        try:
            envelope = json.loads(item.value)
            if envelope.get("v") != FORMAT or envelope.get("from") != sender:
                raise ValueError("not an inbox envelope")
            sealed = base64.b64decode(envelope["sealed"], validate=True)
            return self.key.open_from(sender_pem, sealed, _aad(item.key, sender, self.cell))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, SealError):
            log.warning(
                "revocation inbox: %s does not open as %s's (forged or altered); left", item.key, sender
            )
            return None


def _revocation(plain: bytes, sender: str, name: str) -> RevocationRecord | None:
    """The record, if it is one `sender` minted under the id its key names."""
    try:
        rec = RevocationRecord.from_json(json.loads(plain))
        check_subject(rec.subject)
    except (ValueError, KeyError, TypeError, AttributeError, InvalidRequest):
        return None
    if rec.origin_cell != sender or rec.id != name or rec.seq < 0 or not math.isfinite(rec.revoked_at):
        return None
    return rec


def _heartbeat(plain: bytes, sender: str) -> Heartbeat | None:
    try:
        hb = Heartbeat.from_json(json.loads(plain))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if hb.cell != sender or hb.seq < 0 or not math.isfinite(hb.at):
        return None
    return hb

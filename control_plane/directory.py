"""The cell directory (issue 9): which cells exist, where their API and relays
listen, their sealing-key fingerprints and their health, as a CRDT the relays gossip.

It is a last-writer-wins map keyed by cell id. Every value carries a hybrid logical
clock timestamp (Kulkarni et al., "Logical Physical Clocks", 2014): wall-clock
milliseconds, a logical counter that breaks ties and absorbs clock skew, and the
writing node's name. Merge keeps, per key, the entry with the greatest
(timestamp, removed, record) triple: a total order, so merge is a join of a
semilattice (commutative, associative, idempotent; proven by property tests in
tests/cells/test_directory_crdt.py) and replicas that saw the same updates agree
whatever the order or repetition of gossip. A removal is a tombstone entry, which
wins or loses by the same rule, so a cell removed by an operator does not come back
from an old rumour.

Only a cell writes its own entry in normal operation (its relays refresh it), so
last-writer-wins never throws away a concurrent writer's intent; the operator's
removal is the one cross-writer case, and the HLC orders it after anything the
operator's node had seen.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.storage import encode_json, get_json


@dataclass(frozen=True, order=True)
class Timestamp:
    """A hybrid logical clock reading; ordered by wall, then logical, then node."""

    wall: int  # milliseconds since the epoch
    logical: int
    node: str

    def as_json(self) -> list[Any]:
        return [self.wall, self.logical, self.node]

    @classmethod
    def from_json(cls, value: object) -> Timestamp:
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise ValueError("a timestamp is [wall_ms, logical, node]")
        wall, logical, node = value
        if not isinstance(wall, int) or not isinstance(logical, int) or not isinstance(node, str):
            raise ValueError("a timestamp is [wall_ms, logical, node]")
        return cls(wall, logical, node)


class HybridClock:
    """A hybrid logical clock for one node: `now()` for a local event, `observe(ts)` on
    receiving a remote timestamp. Readings never go backwards, and stay within the
    largest clock skew seen of physical time."""

    def __init__(self, node: str, *, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self._clock = clock
        self._wall = 0
        self._logical = 0
        self._lock = threading.Lock()

    def _physical(self) -> int:
        return int(self._clock() * 1000)

    def now(self) -> Timestamp:
        with self._lock:
            physical = self._physical()
            if physical > self._wall:
                self._wall, self._logical = physical, 0
            else:
                self._logical += 1
            return Timestamp(self._wall, self._logical, self.node)

    def observe(self, remote: Timestamp) -> None:
        with self._lock:
            physical = self._physical()
            top = max(self._wall, remote.wall, physical)
            if top == self._wall and top == remote.wall:
                self._logical = max(self._logical, remote.logical) + 1
            elif top == self._wall:
                self._logical += 1
            elif top == remote.wall:
                self._logical = remote.logical + 1
            else:
                self._logical = 0
            self._wall = top


@dataclass(frozen=True)
class CellRecord:
    """What the directory says about one cell. `public_key` is the cell's sealing key
    (PEM SubjectPublicKeyInfo, control_plane.cellkeys): values sent to the cell are
    sealed to it; `fingerprint` is its SHA-256."""

    cell: str
    api: str = ""  # the regional API's base URL, for clients
    relays: tuple[str, ...] = ()  # HOST:PORT of the cell's relays, for relays joining
    fingerprint: str = ""
    public_key: str = ""
    health: str = "ok"  # ok | degraded | sealed
    updated_at: float = 0.0  # the writer's wall clock, for operators

    def as_json(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "api": self.api,
            "relays": list(self.relays),
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "health": self.health,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CellRecord:
        return cls(
            str(value["cell"]),
            str(value.get("api", "")),
            tuple(str(r) for r in value.get("relays", ())),
            str(value.get("fingerprint", "")),
            str(value.get("public_key", "")),
            str(value.get("health", "ok")),
            float(value.get("updated_at", 0.0)),
        )


@dataclass(frozen=True)
class Entry:
    ts: Timestamp
    record: CellRecord
    removed: bool = False

    def rank(self) -> tuple[Timestamp, bool, str]:
        # The record's canonical JSON breaks the tie of two different entries under
        # one timestamp (impossible from one HLC, possible from a confused operator),
        # so the order is total and merge stays a lattice join.
        return (self.ts, self.removed, json.dumps(self.record.as_json(), sort_keys=True))

    def as_json(self) -> dict[str, Any]:
        return {"ts": self.ts.as_json(), "record": self.record.as_json(), "removed": self.removed}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Entry:
        return cls(
            Timestamp.from_json(value["ts"]), CellRecord.from_json(value["record"]), bool(value["removed"])
        )


def merge(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> dict[str, Entry]:
    """The join of two directory states."""
    out = dict(a)
    for cell, entry in b.items():
        mine = out.get(cell)
        if mine is None or entry.rank() > mine.rank():
            out[cell] = entry
    return out


@dataclass
class Directory:
    """One node's replica of the directory."""

    clock: HybridClock
    entries: dict[str, Entry] = field(default_factory=dict)

    def put(self, record: CellRecord) -> Entry:
        entry = Entry(self.clock.now(), record)
        self.entries = merge(self.entries, {record.cell: entry})
        return entry

    def remove(self, cell: str) -> Entry:
        entry = Entry(self.clock.now(), CellRecord(cell), removed=True)
        self.entries = merge(self.entries, {cell: entry})
        return entry

    def absorb(self, theirs: Mapping[str, Entry]) -> list[str]:
        """Merge a peer's state in; the cells whose entry changed here."""
        for entry in theirs.values():
            self.clock.observe(entry.ts)
        merged = merge(self.entries, theirs)
        changed = [c for c, e in merged.items() if self.entries.get(c) != e]
        self.entries = merged
        return changed

    def cells(self) -> dict[str, CellRecord]:
        """The live cells (tombstones left out)."""
        return {c: e.record for c, e in sorted(self.entries.items()) if not e.removed}


# --- persistence: each cell keeps its replica of the directory in its ledger -----------


def _key(cell: str) -> Key:
    return Key(Kind.CELL, "directory/" + cell)


def save(ledger: Ledger, entries: Iterable[Entry]) -> int:
    """Write entries that are newer than what the ledger holds; how many were written."""
    written = 0
    for entry in entries:
        key = _key(entry.record.cell)
        for _ in range(8):
            found = get_json(ledger, key)
            if found is not None and Entry.from_json(found[0]).rank() >= entry.rank():
                break
            try:
                ledger.put_if(key, encode_json(entry.as_json()), found[1] if found else 0)
            except ConflictError:
                continue
            written += 1
            break
    return written


def get(ledger: Ledger, cell: str) -> Entry | None:
    """One cell's entry (one read, where `load` scans them all)."""
    found = get_json(ledger, _key(cell))
    return None if found is None else Entry.from_json(found[0])


def load(ledger: Ledger) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for item in iter_prefix(ledger, Kind.CELL, "directory/", page_size=200):
        entry = Entry.from_json(json.loads(item.value))
        out[entry.record.cell] = entry
    return out

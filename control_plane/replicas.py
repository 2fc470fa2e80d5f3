"""Home cells and replicas of KV secrets (issue 9: the CAP split of DESIGN.md).

Every secret has a home cell, recorded in a SECRET_HOME item `{home, epoch, state}`
that every cell keeps. A new secret's first write claims its home for the cell that
took it: the path is reserved in a majority of cells (each cell keeps the first claim
it hears, `reserve`), then confirmed (`confirm`, epoch 1), so two cells creating the
same path at once, or on two sides of a partition, cannot both become its home; a cell
cut off from most cells cannot create new secrets. Writes are CP in the home's ledger:
this module refuses a write in any other cell (`NotHome`, naming the home); the cell
layer (keycell/cells) forwards it to the home when it can reach it.

Replication: the home exports a version as its envelope's ciphertext with the data key
sealed to the receiving cell's public key (control_plane.cellkeys), never the home's
own wrapped key, plus the secret's metadata record (versions, times, deletion and
destruction flags; no values). The receiving cell opens the data key, wraps it under
its own KEK in its HSM, stores the version item, then installs the metadata once every
live version it names is stored, so a replica never shows a version it cannot serve.
Metadata is ordered by (epoch, generation, meta_seq): the home's epoch, the secret's
creation time at the home (a secret deleted and made again is a new generation), and the
home's ledger version of the metadata item. An older or repeated batch changes nothing,
so nothing deleted or destroyed at the home comes back. When the home deletes a secret's
metadata, its replicas are deleted too (a tombstone ordered by the home's clock).

Staleness: a replica is "confirmed" at time T when the home said at T that the version
we hold is its latest (an eager push at write time, or the home's periodic digest).
A reply's age is now - confirmed. The home's digests carry its wall clock, so ages
include the clock skew between cells (on one machine, none).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from keycell.control_plane.cellkeys import CellKey, recipient
from keycell.control_plane.engines.kv import changes as kvchange
from keycell.control_plane.engines.kv.backend import KvV2
from keycell.control_plane.envelope import Envelope
from keycell.control_plane.errors import RequestError, Unavailable
from keycell.control_plane.ledger import (
    MAX_TRANSACTION_ITEMS,
    ConflictError,
    Delete,
    Key,
    Kind,
    Ledger,
    Op,
    Put,
    iter_prefix,
)
from keycell.control_plane.storage import encode_json, get_json

_STATE_RANK = {"claim": -1, "home": 0, "moving": 1}
# A claim whose claimer never confirmed it (it died, or lost its majority) may be
# taken over by another claimer after this long.
CLAIM_TIMEOUT = 5.0
_WATERMARK = "@watermark/"


class NoMajority(RequestError):
    """A new secret's home cannot be claimed: too few cells answered."""

    status = 503

    def __init__(self, path: str, votes: int, cells: int) -> None:
        super().__init__(
            f"{path} is a new secret, and its home can only be claimed with a majority of the "
            f"cells; {votes} of {cells} agreed (this cell may be cut off). Create it in another "
            "cell or retry later"
        )


class NotHome(RequestError):
    """A write reached a cell that is not the secret's home."""

    status = 503

    def __init__(self, path: str, home: Home, *, reachable: bool | None = None) -> None:
        if not home.confirmed:
            message = f"{path} has no confirmed home yet; retry"
        elif home.state == "moving":
            message = (
                f"{path} is moving from cell {home.home!r} to cell {home.to!r}; writes resume "
                "there once the handover completes"
            )
        elif reachable is False:
            message = (
                f"{path} is homed in cell {home.home!r}, which this cell cannot reach now; "
                f"write it in cell {home.home!r} or retry later (reads are served here)"
            )
        else:
            message = f"{path} is homed in cell {home.home!r}; send writes there"
        super().__init__(message)
        self.home = home


@dataclass(frozen=True)
class Home:
    home: str
    epoch: int
    state: str = "home"  # claim (reserved, unconfirmed) | home | moving (fenced: no cell takes writes)
    to: str = ""  # while moving: the cell taking over
    since: float = 0.0  # when this state was entered (claims time out)

    def rank(self) -> tuple[int, int, str]:
        # A lower cell id wins a tie of two claims under one epoch (two cells that
        # created the same new secret while cut off from each other): deterministic.
        return (self.epoch, _STATE_RANK.get(self.state, 0), _invert(self.home))

    @property
    def confirmed(self) -> bool:
        return self.state != "claim"

    def as_json(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "epoch": self.epoch,
            "state": self.state,
            "to": self.to,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Home:
        return cls(
            str(value["home"]),
            int(value["epoch"]),
            str(value.get("state", "home")),
            str(value.get("to", "")),
            float(value.get("since", 0.0)),
        )


def _invert(text: str) -> str:
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


@dataclass
class ReplicaBatch:
    """One secret's state as its home sends it to one cell."""

    path: str  # mount/secret
    home: Home
    meta_seq: int
    meta: dict[str, Any] | None
    versions: dict[int, bytes] = field(default_factory=dict)  # number -> Envelope bytes for the receiver
    at: float = 0.0  # the home's clock when it exported this (the replica is current as of then)


@dataclass(frozen=True)
class DigestEntry:
    path: str
    epoch: int
    meta_seq: int  # 0: the home holds no metadata (deleted)
    generation: int = 0


# Anti-entropy digests in buckets: a secret's bucket is one byte of a hash of its path;
# a bucket's hash is the XOR of a 64-bit hash of each (path, epoch, generation,
# meta_seq) in it (0: empty), so that home and replica compute it alike, in any order.
BUCKETS = 256


def bucket_of(path: str) -> int:
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=1).digest()[0]


def entry_hash(entry: DigestEntry) -> int:
    generation = entry.generation if entry.meta_seq else 0  # a deletion is (path, epoch) alone
    raw = f"{entry.path}\0{entry.epoch}\0{generation}\0{entry.meta_seq}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def bucket_hashes(entries: Iterable[DigestEntry]) -> list[int]:
    hashes = [0] * BUCKETS
    for entry in entries:
        hashes[bucket_of(entry.path)] ^= entry_hash(entry)
    return hashes


def _record_entry(path: str, record: dict[str, Any]) -> DigestEntry:
    """What a replica record says of its secret, as the home's digest would list it."""
    if record.get("deleted"):
        return DigestEntry(path, int(record["epoch"]), 0, 0)
    return DigestEntry(path, int(record["epoch"]), int(record["meta_seq"]), int(record["generation"]))


def _order(record: dict[str, Any]) -> tuple[int, float, int]:
    return (int(record["epoch"]), float(record.get("generation", 0)), int(record["meta_seq"]))


def _generation(meta: dict[str, Any] | None) -> int:
    return int(meta.get("created_time") or 0) if meta is not None else 0


class Replicas:
    """One cell's view of homes and replicas, over its barrier and its KV mount."""

    def __init__(
        self,
        barrier: Ledger,
        kv: KvV2,
        cell: str,
        cell_key: Callable[[], CellKey],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.barrier = barrier
        self.kv = kv
        self.cell = cell
        self._cell_key = cell_key
        self.clock = clock

    # --- names ------------------------------------------------------------------------

    def full_path(self, secret: str) -> str:
        return f"{self.kv.mount}/{secret}"

    def _secret(self, path: str) -> str:
        mount, _, secret = path.partition("/")
        if mount != self.kv.mount or not secret:
            raise ValueError(f"{path!r} is not under the {self.kv.mount}/ mount")
        return secret

    # --- homes ------------------------------------------------------------------------

    def home(self, path: str) -> Home | None:
        found = get_json(self.barrier, Key(Kind.SECRET_HOME, path))
        return None if found is None else Home.from_json(found[0])

    def learn_home(self, path: str, home: Home) -> Home:
        """Keep `home` if it outranks what this cell holds; the home now held."""
        key = Key(Kind.SECRET_HOME, path)
        for _ in range(16):
            found = get_json(self.barrier, key)
            if found is not None:
                held = Home.from_json(found[0])
                if held.rank() >= home.rank():
                    return held
            try:
                self.barrier.put_if(key, encode_json(home.as_json()), found[1] if found else 0)
            except ConflictError:
                continue
            return home
        raise Unavailable(f"too many concurrent changes to the home of {path}; retry later")

    def confirmed_home(self, path: str) -> Home | None:
        home = self.home(path)
        return home if home is not None and home.confirmed else None

    def reserve(self, path: str, claimer: str) -> Home:
        """Keep `claimer`'s claim unless this cell already holds a home or a live claim
        by another cell; what this cell holds afterwards."""
        key = Key(Kind.SECRET_HOME, path)
        claim = Home(claimer, 1, "claim", since=self.clock())
        for _ in range(16):
            found = get_json(self.barrier, key)
            if found is not None:
                held = Home.from_json(found[0])
                if held.confirmed or held.home == claimer or self.clock() - held.since < CLAIM_TIMEOUT:
                    return held
            try:
                self.barrier.put_if(key, encode_json(claim.as_json()), found[1] if found else 0)
            except ConflictError:
                continue
            return claim
        raise Unavailable(f"too many concurrent changes to the home of {path}; retry later")

    def confirm(self, path: str) -> Home:
        """This cell won a majority for `path`: it is the home, epoch 1."""
        return self.learn_home(path, Home(self.cell, 1, "home", since=self.clock()))

    def fence(self, path: str, to: str) -> Home:
        """Step one of moving a secret's home to `to`: this cell, its home, stops taking
        writes for it (state moving, same epoch). Repeating it for the same `to` resumes
        an interrupted handover."""
        key = Key(Kind.SECRET_HOME, path)
        for _ in range(16):
            found = get_json(self.barrier, key)
            home = Home.from_json(found[0]) if found is not None else None
            if home is None or not home.confirmed:
                raise NotHome(path, home or Home("", 0, "claim"))
            if home.state == "moving" and home.home == self.cell and home.to == to:
                return home
            if home.home != self.cell or home.state != "home":
                raise NotHome(path, home)
            moving = Home(self.cell, home.epoch, "moving", to, self.clock())
            try:
                self.barrier.put_if(key, encode_json(moving.as_json()), found[1] if found else 0)
            except ConflictError:
                continue
            return moving
        raise Unavailable(f"too many concurrent changes to the home of {path}; retry later")

    def take_over(self, path: str, epoch: int) -> Home:
        """Step two, in the new home: it holds the secret, and becomes its home (its
        replica record goes: the old home's digests no longer list the secret)."""
        home = self.learn_home(path, Home(self.cell, epoch, "home", since=self.clock()))
        found = self.barrier.get(Key(Kind.REPLICA, path), consistent=True)
        if found is not None and home.home == self.cell:
            with contextlib.suppress(ConflictError):
                self.barrier.delete_if(found.key, found.version)
        return home

    def home_for_write(self, path: str) -> Home:
        """The secret's confirmed home, which must be this cell: NotHome otherwise
        (elsewhere, moving, or not claimed yet)."""
        home = self.home(path)
        if home is None or not home.confirmed:
            raise NotHome(path, home or Home("", 0, "claim"))
        if home.home != self.cell or home.state != "home":
            raise NotHome(path, home)
        return home

    def change(self, secret: str, op: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
        """Any KV change (control_plane/engines/kv/changes.py) at this cell, which must be the home."""
        self.home_for_write(self.full_path(secret))
        return kvchange.run(self.kv, secret, op, args)

    # --- the home's side --------------------------------------------------------------

    def homed_here(self) -> Iterator[DigestEntry]:
        """Every secret homed in this cell with its metadata sequence (one scan)."""
        for item in iter_prefix(self.barrier, Kind.SECRET_HOME, self.kv.mount + "/", page_size=500):
            home = Home.from_json(json.loads(item.value))
            if home.home != self.cell or not home.confirmed:
                continue
            meta = self.barrier.get(Key(Kind.SECRET_META, item.key.path), consistent=True)
            if meta is None:
                yield DigestEntry(item.key.path, home.epoch, 0)
            else:
                yield DigestEntry(
                    item.key.path, home.epoch, meta.version, _generation(json.loads(meta.value))
                )

    def export(
        self,
        path: str,
        to_cell: str,
        public_pem: str,
        *,
        only: set[int] | None = None,
        handover: bool = False,
    ) -> ReplicaBatch | None:
        """The secret's metadata and live versions (or only those numbered in `only`),
        each data key sealed for `to_cell`. None when this cell is not its home, or is
        handing it over (only the handover's own copy is made then: once the new home
        takes writes, this cell's copy is no longer the latest)."""
        home = self.home(path)
        if home is None or home.home != self.cell or not home.confirmed:
            return None
        if home.state == "moving" and not handover:
            return None
        secret = self._secret(path)
        at = self.clock()
        meta_item = self.barrier.get(Key(Kind.SECRET_META, path), consistent=True)
        if meta_item is None:
            return ReplicaBatch(path, home, 0, None, {}, at)
        meta = json.loads(meta_item.value)
        to = recipient(to_cell, public_pem)
        versions: dict[int, bytes] = {}
        for number_text, vm in meta["versions"].items():
            number = int(number_text)
            if vm["destroyed"] or (only is not None and number not in only):
                continue
            item = self.barrier.get(self.kv._version_key(secret, number), consistent=True)
            if item is None:
                continue
            aad = self.kv._aad(secret, number)
            mine = Envelope.from_bytes(item.value)
            shared = self.kv.envelopes.add_recipient(mine, aad, to)
            versions[number] = Envelope(
                shared.kek, {to_cell: shared.wrapped_keys[to_cell]}, shared.ciphertext
            ).to_bytes()
        return ReplicaBatch(path, home, meta_item.version, meta, versions, at)

    # --- a replica's side ---------------------------------------------------------------

    def replica_record(self, path: str) -> dict[str, Any] | None:
        found = get_json(self.barrier, Key(Kind.REPLICA, path))
        return None if found is None else found[0]

    def apply(self, batch: ReplicaBatch) -> list[int]:
        """Store what the home sent; the version numbers the metadata names that are
        still missing here (empty: the replica is installed and current as of batch.at).
        New versions, the metadata, the versions it no longer names and the replica
        record go in one ledger transaction: a replica is never half installed."""
        home = self.learn_home(batch.path, batch.home)
        if home.home == self.cell and home.state == "home":
            return []  # this cell is (now) the home: its own ledger is the truth
        secret = self._secret(batch.path)
        record_key = Key(Kind.REPLICA, batch.path)
        found = get_json(self.barrier, record_key)
        record = found[0] if found is not None else None
        if batch.meta is None:
            return self._delete_replica(secret, batch, record, found[1] if found else 0)
        incoming = (batch.home.epoch, float(_generation(batch.meta)), batch.meta_seq)
        if record is not None and _order(record) > incoming:
            return []  # older than what we hold: nothing comes back
        held = {int(item.key.path.rsplit("#", 1)[1]): item for item in self.kv._version_items(secret)}
        ops: list[Op] = []
        arriving: set[int] = set()
        for number, raw in sorted(batch.versions.items()):
            if number in held:
                continue
            local = self._localize(secret, number, raw)
            if local is not None:
                ops.append(Put(self.kv._version_key(secret, number), local, 0))
                arriving.add(number)
        live = {int(n) for n, vm in batch.meta["versions"].items() if not vm["destroyed"]}
        missing = sorted(n for n in live if n not in held and n not in arriving)
        if missing:
            for op in ops:  # keep what arrived: the next batch carries only the rest
                if isinstance(op, Put):
                    with contextlib.suppress(ConflictError):
                        self.barrier.put_if(op.key, op.value, 0)
            return missing
        if record is None or _order(record) < incoming:
            meta_key = Key(Kind.SECRET_META, batch.path)
            current = self.barrier.get(meta_key, consistent=True)
            ops.append(Put(meta_key, encode_json(batch.meta), current.version if current else 0))
            ops += [Delete(item.key, item.version) for n, item in held.items() if n not in live]
        new_record = {
            "home": batch.home.home,
            "epoch": batch.home.epoch,
            "generation": _generation(batch.meta),
            "meta_seq": batch.meta_seq,
            "confirmed_at": max(batch.at, record["confirmed_at"] if record else 0.0),
        }
        ops.append(Put(record_key, encode_json(new_record), found[1] if found else 0))
        if len(ops) <= MAX_TRANSACTION_ITEMS:
            with contextlib.suppress(ConflictError):  # a concurrent apply got there: the digest retries
                self.barrier.transact(ops)
            return []
        for op in ops:  # more than one transaction holds (a huge max_versions): item by item
            with contextlib.suppress(ConflictError):
                if isinstance(op, Put):
                    self.barrier.put_if(op.key, op.value, op.expected_version)
                else:
                    self.barrier.delete_if(op.key, op.expected_version)
        return []

    def _localize(self, secret: str, number: int, raw: bytes) -> bytes | None:
        """A sent version as this cell stores it: the data key opened with this cell's
        sealing key and wrapped by its own KEK. None when not sealed for this cell."""
        aad = self.kv._aad(secret, number)
        sent = Envelope.from_bytes(raw)
        sealed = sent.wrapped_keys.get(self.cell)
        if sealed is None:
            return None  # a misrouted batch changes nothing
        data_key = self._cell_key().open(sealed, aad)
        envelopes = self.kv.envelopes
        wrapped = envelopes.backend.wrap(envelopes.kek, data_key, aad)
        return Envelope(sent.kek, {self.cell: wrapped}, sent.ciphertext).to_bytes()

    def _delete_replica(
        self, secret: str, batch: ReplicaBatch, record: dict[str, Any] | None, record_version: int
    ) -> list[int]:
        """The home holds no metadata for the secret (deleted at `batch.at`, its clock):
        neither does this cell, unless it holds something newer."""
        tombstone = (batch.home.epoch, batch.at * 1_000_000, 0)  # generations are microseconds
        if record is not None and _order(record) >= tombstone:
            return []
        meta_key = Key(Kind.SECRET_META, batch.path)
        current = self.barrier.get(meta_key, consistent=True)
        if current is not None:
            with contextlib.suppress(ConflictError):
                self.barrier.delete_if(meta_key, current.version)
        self._drop_versions_not_in(secret, {"versions": {}})
        new_record = {
            "home": batch.home.home,
            "epoch": batch.home.epoch,
            "generation": tombstone[1],
            "meta_seq": 0,
            "deleted": True,
            "confirmed_at": batch.at,
        }
        with contextlib.suppress(ConflictError):
            self.barrier.put_if(Key(Kind.REPLICA, batch.path), encode_json(new_record), record_version)
        return []

    def _drop_versions_not_in(self, secret: str, meta: dict[str, Any]) -> None:
        keep = {int(n) for n, vm in meta["versions"].items() if not vm["destroyed"]}
        for item in self.kv._version_items(secret):
            number = int(item.key.path.rsplit("#", 1)[1])
            if number not in keep:
                with contextlib.suppress(ConflictError):
                    self.barrier.delete_if(item.key, item.version)

    def _replicas_of(self, home_cell: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(path, replica record) of every secret this cell holds as homed in `home_cell`."""
        for item in iter_prefix(self.barrier, Kind.REPLICA, self.kv.mount + "/", page_size=500):
            record = json.loads(item.value)
            if record["home"] == home_cell:
                yield item.key.path, record

    def differing_buckets(self, home_cell: str, at: float, hashes: list[int]) -> list[int]:
        """First step of a bucketed digest: the buckets whose hash differs from what this
        cell holds of `home_cell`'s secrets. None differing: every replica of that home
        is current as of `at` (the watermark moves); otherwise the home lists those
        buckets next (`on_digest` with `buckets`)."""
        if len(hashes) != BUCKETS:
            raise ValueError(f"a bucketed digest has {BUCKETS} buckets, not {len(hashes)}")
        mine = bucket_hashes(_record_entry(path, record) for path, record in self._replicas_of(home_cell))
        differing = [i for i in range(BUCKETS) if mine[i] != hashes[i]]
        if not differing:
            self._save_watermark(home_cell, {"at": at, "lagging": {}})
        return differing

    def on_digest(
        self,
        home_cell: str,
        at: float,
        entries: list[DigestEntry],
        buckets: set[int] | None = None,
    ) -> list[str]:
        """The home's list of its secrets as of `at` (its clock): moves this cell's
        watermark for that home, and returns the paths this cell must fetch. With
        `buckets`, `entries` covers only those buckets; the replicas in the others
        matched the home's hashes (`differing_buckets`): current as of `at`."""
        listed = {e.path: e for e in entries}
        found = get_json(self.barrier, Key(Kind.REPLICA, _WATERMARK + home_cell))
        previous: dict[str, Any] = found[0] if found is not None else {"at": 0.0, "lagging": {}}
        lagging: dict[str, float] = {}
        wanted: list[str] = []
        seen: set[str] = set()
        for path, record in self._replicas_of(home_cell):
            if buckets is not None and bucket_of(path) not in buckets:
                continue  # its bucket matched: current as of `at`
            seen.add(path)
            entry = listed.get(path)
            if entry is not None:
                if entry.meta_seq == 0:
                    current = bool(record.get("deleted"))
                else:
                    current = _order(record) >= (entry.epoch, float(entry.generation), entry.meta_seq)
                if current:
                    continue  # current as of `at`
            lagging[path] = float(previous["lagging"].get(path, max(previous["at"], record["confirmed_at"])))
            if entry is not None:
                wanted.append(path)
        for path in listed:
            if path not in seen:
                home = self.home(path)
                if home is None or home.home != self.cell:
                    wanted.append(path)
        self._save_watermark(home_cell, {"at": at, "lagging": lagging})
        return wanted

    def _save_watermark(self, home_cell: str, watermark: dict[str, Any]) -> None:
        wm_key = Key(Kind.REPLICA, _WATERMARK + home_cell)
        found = self.barrier.get(wm_key, consistent=True)
        with contextlib.suppress(ConflictError):
            self.barrier.put_if(wm_key, encode_json(watermark), found.version if found else 0)

    def age(self, path: str, home: Home | None = None) -> float | None:
        """How stale this cell's copy may be, in seconds: 0 at the home, None when the
        cell holds no replica. `home`: the home record, when the caller just read it."""
        if home is None:
            home = self.home(path)
        if home is None or not home.confirmed:
            return None
        if home.home == self.cell and home.state == "home":
            return 0.0
        record = self.replica_record(path)
        if record is None:
            return None
        confirmed = float(record["confirmed_at"])
        found = get_json(self.barrier, Key(Kind.REPLICA, _WATERMARK + str(record["home"])))
        if found is not None:
            watermark = found[0]
            # Lagging at the last digest: confirmed when it last was current (or by a
            # push since); otherwise current as of the digest.
            confirmed = max(confirmed, float(watermark["lagging"].get(path, watermark["at"])))
        return max(0.0, self.clock() - confirmed)

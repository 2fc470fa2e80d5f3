"""The audit trail: every request and response as a tamper-evident JSON line.

Entries. A `response` entry once the answer is known, self-contained (request fields,
identity, outcome, latency): one line per request. A request that may change
something is also recorded *before* its handler runs (a `request` entry, after
authentication, so it names the caller): fail-closed must never execute a change it
could not record. Reads on routes that change nothing (`Route.pure_reads`: KV
reads and lists) skip it, since an answer that cannot be recorded is withheld; a
read that issues something (dynamic credentials, a lease) does not. A request
refused before its handler (404, 403, sealed) has only the response entry.
Non-HTTP events (relay-applied revocations, rotation steps) are `event` entries
written through `Auditor.record`. Every entry holds:

    seq, prev, hash      its place in its writer's chain (see below)
    hlc                  [physical ms, logical counter]; with cell, writer the merge order
    time                 RFC 3339 UTC with microseconds, when the entry was made
    cell, writer, type   the cell id; the writing process's chain; request | response | event
    request              id, operation, method, path, remote_addr, data, query, client_token
    auth                 the caller: accessor, display_name, policies, token path
    response             status, errors, body (for response entries); latency_ms

Sensitive values. Every string and number in request data, query values, response
bodies (except Vault's envelope bookkeeping: request_id, lease_id, lease_duration,
renewable, warnings, errors, and an auth block's accessor, policies, token type) and
the client token itself become `hmac-sha256:<hex>` under the cell's audit key (a
random 32-byte key kept in the ledger behind the barrier, Kind.CONFIG
"audit/hmac-key"). Token accessors are kept in plaintext: they identify the caller
for forensics and are not credentials (Vault's `hmac_accessor=false`). While the
cell is sealed the key cannot be read: sensitive values are then written as
`redacted:sealed` (unseal shares sent to sys/unseal are never written in the clear).
`sys/audit-hash/:device` computes the digest of a value an operator knows.

Chains. Each writing process (a server worker, a function instance, a relay) keeps
its own chain in the cell, named by a writer id (`p<pid>-<random>`). Each entry's
`hash` is the SHA-256 of its canonical JSON (sorted keys, no `hash` field) and `prev`
is the previous entry's hash in that chain. The chain's head (seq, hash, HLC) is one
ledger item (Kind.AUDIT_HEAD, path `<cell>/<writer>`, outside the barrier so sealed
requests are chained too), advanced by a conditional write, so two processes that
claim one writer id cannot fork it (a lost race re-reads the head and re-chains).
One chain per process is what lets a cell's workers commit side by side: with one
chain per cell they took turns on its head, and lost most of those races.
Group commit: the entries of concurrent requests in one process go out as one batch,
one `put_if` of the head, one write to each sink (threads: `Chain.append`; an event
loop: `AsyncCommitter`). A shared file is locked for each batch's write only.

Anchoring. By default a batch's head reaches the ledger before its requests go on
(`anchor_interval=None`: what a function instance, frozen between invocations, needs).
A long-lived process (`keycell server`, KEYCELL_AUDIT_ANCHOR=async) instead claims its
writer id once (a conditional create of the head; an id already there is never
joined) and releases a request once its entry is in a sink; a thread writes the head
every `anchor_interval` (50 ms) and once more when the process exits. Nothing can
fork such a chain (only its claimer writes its head), and an audited request no
longer waits on a ledger write: with local sinks the batch is committed on the
event loop itself. The price is a bounded window: entries written in the last
interval before a crash are past the head, so `verify --ledger` names them as a
tail nothing vouches for (a warning; `--strict` fails). A head that cannot reach
the ledger for `max_unanchored` (1 s) makes the writer refuse entries (fail closed),
and a head changed in the ledger by anyone else stops the writer for good.
`verify` checks every chain in the files; with the ledger (`keycell audit verify
--ledger`) it also checks each chain ends at its head (a cut-off tail, a dropped
chain).

Fail closed (default): when no sink accepts a request entry, the request is refused
(503, `Auditor.refuse`) and the handler never runs; a response whose entry no sink took is replaced
by a 503. Fail open logs a warning and serves. The entries a failed batch held stay
in the chain (the head was advanced), so `verify` reports them as a gap: the
record that something happened that no sink kept.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import orjson

from keycell.control_plane.errors import Unavailable
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, LedgerError, iter_prefix
from keycell.control_plane.private_files import open_private, private_dir
from keycell.control_plane.router import Response
from keycell.control_plane.timefmt import rfc3339

log = logging.getLogger("keycell.audit")

HMAC_KEY = Key(Kind.CONFIG, "audit/hmac-key")
HMAC_PREFIX = "hmac-sha256:"
HASH_PREFIX = "sha256:"
GENESIS = HASH_PREFIX + "0" * 64
REDACTED_SEALED = "redacted:sealed"
MAX_BATCH = 256
# Seconds between head writes, for chains anchored after their sinks: the window a crash
# can leave unanchored. Each write is an fsync'd ledger transaction on a thread that must
# take the GIL from the requests: at 5 ms it cost 0.1 of a worker's CPU, at 50 ms 0.03.
ANCHOR_INTERVAL = 0.05
MAX_UNANCHORED = 1.0  # seconds a head may lag its sinks before the writer refuses entries

# Envelope fields that describe the response rather than carry secret material.
_PLAIN_BODY = frozenset(
    {"request_id", "lease_id", "lease_duration", "renewable", "warnings", "errors", "mount_type"}
)
_PLAIN_AUTH = frozenset(
    {
        "accessor",
        "policies",
        "token_policies",
        "identity_policies",
        "lease_duration",
        "renewable",
        "token_type",
        "orphan",
        "entity_id",
        "num_uses",
        "creation_path",
        "ttl",
    }
)


class AuditUnavailable(Exception):
    """No sink accepted an entry (or the chain head could not be advanced)."""


# --- canonical form and hashing ---------------------------------------------------------------


def head_key(cell: str, writer: str) -> Key:
    return Key(Kind.AUDIT_HEAD, f"{cell}/{writer}")


def chain_of(entry: Mapping[str, Any]) -> tuple[str, str]:
    """The chain an entry belongs to: its cell and writer."""
    return str(entry.get("cell")), str(entry.get("writer", ""))


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: sorted keys, compact, UTF-8, without `hash`."""
    return _canonical_json({k: v for k, v in entry.items() if k != "hash"})


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # beyond orjson (an int over 64 bits, a key that is not a string)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return HASH_PREFIX + hashlib.sha256(canonical(entry)).hexdigest()


def encode_line(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def line_with_hash(body: bytes, digest: str) -> bytes:
    """An entry's JSON line from its canonical bytes (`body`, hashed once): the `hash`
    field first, then the canonical fields, so the entry is encoded only once."""
    return b'{"hash":"' + digest.encode() + b'",' + body[1:] + b"\n"


class Hasher:
    """HMAC-SHA256 of sensitive values under the cell's audit key."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key
        # RFC 2104 with the padded key's SHA-256 states computed once: each digest is
        # then two state copies (a third of `hmac.digest`'s cost, per value).
        self._inner: Any = None
        self._outer: Any = None
        if key is not None:
            padded = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
            self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
            self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, value: str) -> str:
        if self._inner is None:
            return REDACTED_SEALED
        inner = self._inner.copy()
        inner.update(value.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return HMAC_PREFIX + str(outer.hexdigest())

    def redact(self, value: Any, plain: frozenset[str] = frozenset()) -> Any:
        """Every string and number below `value` as a digest; keys stay readable;
        at this level, the fields named in `plain` are kept as they are."""
        if isinstance(value, str):  # the common leaf first: this runs for every value
            return self.digest(value)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, (dict, Mapping)):  # dict first: no ABC lookup for the common case
            return {
                str(k): (v if k in plain and not isinstance(v, Mapping) else self.redact(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        if isinstance(value, int):
            return self.digest(str(value))  # what json.dumps writes for an int
        if isinstance(value, float):
            return self.digest(json.dumps(value))
        return self.digest(str(value))

    def redact_body(self, body: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if body is None:
            return None
        out: dict[str, Any] = {}
        for name, value in body.items():
            if name in _PLAIN_BODY:
                out[name] = value
            elif name == "auth" and isinstance(value, Mapping):
                out[name] = self.redact(value, _PLAIN_AUTH)
            elif name == "wrap_info" and isinstance(value, Mapping):
                out[name] = self.redact(
                    value, frozenset({"ttl", "creation_time", "creation_path", "accessor"})
                )
            else:
                out[name] = self.redact(value)
        return out


class AuditKey:
    """The cell's audit HMAC key: created once (conditional write), read through the
    barrier, cached in memory until the barrier seals."""

    def __init__(self, barrier: Any) -> None:
        self.barrier = barrier
        self._key: bytes | None = None
        self._hasher: Hasher | None = None
        self._lock = threading.Lock()
        on_seal = getattr(barrier, "on_seal", None)
        if on_seal is not None:
            on_seal(self.forget)

    def forget(self) -> None:
        self._key = None
        self._hasher = None

    def hasher(self) -> Hasher:
        """A hasher with the key, or one that redacts when the cell is sealed."""
        hasher = self._hasher
        if hasher is None:
            if getattr(self.barrier, "sealed", False):
                return Hasher(None)
            hasher = self._hasher = Hasher(self.load())
        return hasher

    def load(self) -> bytes:
        with self._lock:
            if self._key is not None:
                return self._key
            while True:
                item = self.barrier.get(HMAC_KEY, consistent=True)
                if item is not None:
                    self._key = bytes.fromhex(item.value.decode())
                    return self._key
                with contextlib.suppress(ConflictError):  # another process created it: read theirs
                    self.barrier.put_if(HMAC_KEY, os.urandom(32).hex().encode(), 0)


# --- sinks ---------------------------------------------------------------------------------------


class AuditSink(Protocol):
    name: str
    local: bool  # a write is a local syscall that does not wait on a device or a network

    def write(self, lines: bytes, entries: Sequence[Mapping[str, Any]]) -> None:
        """Store a batch (`lines`: the entries' JSON lines); raise when it could not."""
        ...

    def lock(self) -> contextlib.AbstractContextManager[object]:
        """Held across the write of one batch (processes sharing a file never interleave)."""
        ...

    def close(self) -> None: ...


class FileSink:
    """Appends to a file (O_APPEND, one write per batch); several processes may share
    it: an exclusive flock is held across each batch's write."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.name = "file"
        self.local = not fsync
        self.path = path
        self.fsync = fsync
        private_dir(os.path.dirname(os.path.abspath(path)))
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND)

    @contextlib.contextmanager
    def lock(self) -> Iterator[object]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write(self, lines: bytes, entries: Sequence[Mapping[str, Any]]) -> None:
        view = memoryview(lines)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class StdoutSink:
    """One JSON line per entry on standard output (Lambda: CloudWatch Logs)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.name = "stdout"
        self.local = False  # a pipe: its reader sets the pace
        self._stream = stream

    def lock(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def write(self, lines: bytes, entries: Sequence[Mapping[str, Any]]) -> None:
        stream = self._stream or sys.stdout
        stream.write(lines.decode())
        stream.flush()

    def close(self) -> None:
        pass


# --- the chain, with group commit -------------------------------------------------------------


@dataclass
class Head:
    seq: int = 0
    hash: str = GENESIS
    ms: int = 0
    logical: int = 0
    version: int = 0  # the ledger item's version (0: absent)


@dataclass
class _Slot:
    record: dict[str, Any]
    done: bool = False
    entry: dict[str, Any] | None = None
    error: Exception | None = None


@dataclass
class ChainStats:
    batches: int = 0
    entries: int = 0
    conflicts: int = 0
    largest_batch: int = 0
    anchors: int = 0
    sizes: list[int] = field(default_factory=list)


def new_writer_id() -> str:
    """A chain's writer: this process (pid, for the operator) and a random suffix (pids
    are reused across restarts and hosts)."""
    return f"p{os.getpid()}-{secrets.token_hex(4)}"


class Chain:
    """One writer's hash chain in the cell: `append` blocks until the entry is chained,
    the head advanced and a sink took it; it returns the finished entry."""

    def __init__(
        self,
        ledger: Ledger,
        cell: str,
        sinks: Sequence[AuditSink],
        *,
        writer: str | None = None,
        max_batch: int = MAX_BATCH,
        linger: float = 0.0,
        clock: Callable[[], float] = time.time,
        anchor_interval: float | None = None,
        max_unanchored: float = MAX_UNANCHORED,
    ) -> None:
        self.ledger = ledger
        self.cell = cell
        self.writer = writer or new_writer_id()
        if "/" in self.writer:
            raise ValueError("an audit writer id has no '/'")
        self.sinks = list(sinks)
        self.max_batch = max(1, max_batch)
        self.linger = linger
        self.clock = clock
        self.key = head_key(cell, self.writer)
        self.stats = ChainStats()
        self._head: Head | None = None
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Slot] = []
        self._committing = False
        self._commit_lock = threading.Lock()
        # Anchoring (see the module's docstring): None advances the head in each batch.
        self.anchor_interval = anchor_interval
        self.max_unanchored = max_unanchored
        self._claimed = False  # this writer's head created here: it follows the sinks
        self._anchored = Head()  # what the ledger holds (its item's version included)
        self._unanchored_since: float | None = None  # monotonic, oldest entry past the anchor
        self._broken: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._anchor_lock = threading.Lock()  # one head write at a time
        self._state = threading.Lock()  # the head and how long it has waited, together
        self._anchorer: threading.Thread | None = None

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        slot = _Slot(record)
        with self._cond:
            self._pending.append(slot)
            while not slot.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                if self.linger > 0 and len(self._pending) < self.max_batch:
                    self._cond.wait(self.linger)
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._cond.release()
                try:
                    self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        assert slot.entry is not None
        return slot.entry

    def _commit(self, batch: list[_Slot]) -> None:
        try:
            entries = self.commit_records([s.record for s in batch])
        except AuditUnavailable as exc:
            for s in batch:
                s.error = exc
        else:
            for s, e in zip(batch, entries, strict=True):
                s.entry = e
        finally:
            for s in batch:
                s.done = True

    def commit_records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chain `records` from the head, advance the head (one conditional write;
        with an anchor interval, later, by the anchoring thread) and hand the batch to
        the sinks; the chained entries, or AuditUnavailable. One batch at a time per
        process (the head is cached between batches)."""
        with self._commit_lock:
            new: Head | None = None
            try:
                if self.anchor_interval is not None and not self._claimed:
                    self._claim()
                if self._claimed:
                    self._check_anchoring()
                    entries, lines, new = self._link(self._head or Head(), records)
                else:
                    entries, lines = self._advance(records)
            except (LedgerError, OSError) as exc:
                log.warning("audit chain head could not be advanced: %s", type(exc).__name__)
                raise AuditUnavailable("the audit chain head could not be advanced in the ledger") from None
            accepted = 0
            for sink in self.sinks:
                try:
                    with sink.lock():
                        sink.write(lines, entries)
                    accepted += 1
                except Exception as exc:  # a sink is a dependency: report by type, go on
                    log.warning("audit sink %s refused a batch: %s", sink.name, type(exc).__name__)
            if not accepted:
                raise AuditUnavailable("no audit sink accepted the entry")
            if new is not None:  # anchored later: the entries are in a sink, the head follows
                with self._state:
                    self._head = new
                    if self._unanchored_since is None:
                        self._unanchored_since = time.monotonic()
                if not self._wake.is_set():
                    self._wake.set()
            self.stats.batches += 1
            self.stats.entries += len(entries)
            self.stats.largest_batch = max(self.stats.largest_batch, len(entries))
            return entries

    def _read_head(self) -> Head:
        item = self.ledger.get(self.key, consistent=True)
        if item is None:
            return Head()
        raw = json.loads(item.value)
        return Head(int(raw["seq"]), str(raw["hash"]), int(raw["ms"]), int(raw["logical"]), item.version)

    def _advance(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes]:
        while True:
            head = self._head or self._read_head()
            entries, lines, new = self._link(head, records)
            try:
                stored = self.ledger.put_if(self.key, _head_body(new), head.version)
            except ConflictError:
                self.stats.conflicts += 1
                self._head = None  # another process advanced it: re-read, re-chain
                continue
            except LedgerError:
                self._head = None
                raise
            new.version = stored.version
            self._head = new
            return entries, lines

    def _link(self, head: Head, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes, Head]:
        now_ms = int(self.clock() * 1000)
        seq, prev, ms, logical = head.seq, head.hash, head.ms, head.logical
        entries: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for record in records:
            if now_ms > ms:
                ms, logical = now_ms, 0
            else:
                logical += 1
            seq += 1
            entry = {
                **record,
                "cell": self.cell,
                "writer": self.writer,
                "seq": seq,
                "prev": prev,
                "hlc": [ms, logical],
            }
            body = _canonical_json(entry)  # no `hash` yet
            entry["hash"] = prev = HASH_PREFIX + hashlib.sha256(body).hexdigest()
            lines.append(line_with_hash(body, prev))
            entries.append(entry)
        return entries, b"".join(lines), Head(seq, prev, ms, logical)

    # --- anchoring the head after the sinks (exclusive chains) -------------------------------

    def _claim(self) -> None:
        """Create this writer's head (seq 0) with a conditional write: created here, the
        chain is this process's alone, so its head can follow the sinks (a thread
        anchors it every `anchor_interval`) without any other process forking it. A
        writer id whose head exists already (another process's, or this id reused after
        a restart) is not joined: the chain takes a fresh id."""
        for _ in range(8):
            try:
                stored = self.ledger.put_if(self.key, _head_body(Head()), 0)
            except ConflictError:
                log.info(
                    "audit writer id %s is in use in the ledger; this chain takes a new one", self.writer
                )
                self.writer = new_writer_id()
                self.key = head_key(self.cell, self.writer)
                continue
            break
        else:
            raise AuditUnavailable("no free audit writer id could be claimed in the ledger")
        self._claimed = True
        self._head = Head()
        self._anchored = Head(version=stored.version)
        self._anchorer = threading.Thread(
            target=self._anchor_loop, name=f"keycell-audit-anchor-{self.writer}", daemon=True
        )
        self._anchorer.start()
        atexit.register(self.anchor_now)

    def _check_anchoring(self) -> None:
        if self._broken is not None:
            raise AuditUnavailable(self._broken)
        since = self._unanchored_since
        if since is not None and time.monotonic() - since > self.max_unanchored:
            raise AuditUnavailable(
                f"the audit chain head has not reached the ledger for over {self.max_unanchored:g}s"
            )

    def _anchor_loop(self) -> None:
        assert self.anchor_interval is not None
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            pause = self.anchor_interval - (time.monotonic() - last)
            if pause > 0 and self._stop.wait(pause):
                break
            last = time.monotonic()
            if not self.anchor_now():
                self._wake.set()  # the ledger failed: try again after the interval

    def anchor_now(self) -> bool:
        """Write the head the sinks hold to the ledger (a conditional write on the
        version this process wrote last); True once the ledger has it."""
        with self._anchor_lock:
            head, since = self._head, time.monotonic()
            if not self._claimed or head is None or self._broken is not None:
                return self._broken is None
            if head.seq == self._anchored.seq:
                return True
            try:
                stored = self.ledger.put_if(self.key, _head_body(head), self._anchored.version)
            except ConflictError:
                self._broken = (
                    "the audit chain head was changed outside this process; "
                    "this writer refuses further entries"
                )
                log.error(
                    "audit chain %s/%s: its head was changed in the ledger by someone else",
                    self.cell,
                    self.writer,
                )
                return False
            except (LedgerError, OSError) as exc:
                log.warning("audit chain head could not be anchored: %s", type(exc).__name__)
                return False
            self._anchored = Head(head.seq, head.hash, head.ms, head.logical, stored.version)
            with self._state:
                if self._head is head:
                    self._unanchored_since = None
                else:  # entries committed while this write ran wait for the next one
                    self._unanchored_since = since
            self.stats.anchors += 1
            return True

    @property
    def inline(self) -> bool:
        """Whether a batch may be committed on an event loop: the head follows the
        sinks (no ledger write in the batch) and every sink's write is local."""
        return (
            self._claimed  # claimed (the first batch claims it, on the committer's thread)
            and all(getattr(sink, "local", False) for sink in self.sinks)
        )

    def close(self) -> None:
        if self._anchorer is not None:
            self._stop.set()
            self._wake.set()
            self._anchorer.join(timeout=5)
            self.anchor_now()
            atexit.unregister(self.anchor_now)
        for sink in self.sinks:
            sink.close()


def _head_body(head: Head) -> bytes:
    body = {"seq": head.seq, "hash": head.hash, "ms": head.ms, "logical": head.logical}
    return json.dumps(body, sort_keys=True).encode()


# --- the auditor the router calls ---------------------------------------------------------------


class Auditor:
    """What the router (and later the relay and rotation) hand their events to."""

    def __init__(
        self,
        ledger: Ledger,
        barrier: Any,
        cell: str,
        sinks: Sequence[AuditSink],
        *,
        fail_open: bool = False,
        writer: str | None = None,
        max_batch: int = MAX_BATCH,
        linger: float = 0.0,
        clock: Callable[[], float] = time.time,
        anchor_interval: float | None = None,
    ) -> None:
        if not sinks:
            raise ValueError("an auditor needs at least one sink")
        self.cell = cell
        self.fail_open = fail_open
        self.clock = clock
        self.key = AuditKey(barrier)
        self.chain = Chain(
            ledger,
            cell,
            sinks,
            writer=writer,
            max_batch=max_batch,
            linger=linger,
            clock=clock,
            anchor_interval=anchor_interval,
        )

    @property
    def devices(self) -> list[str]:
        return [s.name for s in self.chain.sinks]

    def audit_hash(self, value: str) -> str:
        return self.key.hasher().digest(value)

    # --- HTTP ---------------------------------------------------------------------------------

    def request_record(self, ctx: Any, request_id: str) -> dict[str, Any]:
        """The request entry, committed before the handler runs."""
        hasher = self.key.hasher()
        return {
            "type": "request",
            "time": rfc3339(self.clock()),
            "request": self._request(hasher, ctx.request, request_id),
            "auth": self._identity(ctx.entry),
        }

    def response_record(
        self, request_id: str, request: Any, ctx: Any, response: Any, elapsed: float
    ) -> dict[str, Any]:
        """The response entry: self-contained (request, identity, outcome, latency)."""
        hasher = self.key.hasher()
        body = response.body if isinstance(response.body, Mapping) else None
        outcome: dict[str, Any] = {"status": response.status}
        if body is not None:
            errors = body.get("errors")
            if errors:
                outcome["errors"] = [str(e) for e in errors]
            rest = {k: v for k, v in body.items() if k != "errors"}
            if rest:
                outcome["body"] = hasher.redact_body(rest)
        return {
            "type": "response",
            "time": rfc3339(self.clock()),
            "request": self._request(hasher, request, request_id),
            "auth": self._identity(ctx.entry if ctx is not None else None),
            "response": outcome,
            "latency_ms": round(elapsed * 1000, 3),
        }

    @staticmethod
    def refuse() -> None:
        """Fail closed before the handler: the request is refused, not executed."""
        raise Unavailable(
            "audit: no audit device accepted the request's entry; the request was refused and not executed"
        )

    @staticmethod
    def withheld() -> Any:
        """Fail closed after the handler: the response is replaced by a 503."""
        return Response(
            503,
            {"errors": ["audit: no audit device accepted the response's entry; the response is withheld"]},
        )

    def commit(self, record: dict[str, Any]) -> bool:
        """Chain one entry on this thread (with the entries of other threads: group
        commit). False when no sink took it and the auditor fails closed."""
        try:
            self.chain.append(record)
        except AuditUnavailable:
            return self._failed()
        return True

    def commit_many(self, records: list[dict[str, Any]]) -> list[bool]:
        """Chain a batch at once (the AsyncCommitter's thread)."""
        try:
            self.chain.commit_records(records)
        except AuditUnavailable:
            return [self._failed()] * len(records)
        return [True] * len(records)

    def _failed(self) -> bool:
        if self.fail_open:
            log.warning("audit: an entry was not recorded; serving anyway (fail-open)")
            return True
        return False

    # --- anything else --------------------------------------------------------------------------

    def record(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """A non-HTTP event (relay-applied revocation, rotation step). Fields named in
        `event["sensitive"]` (a mapping) are HMAC'd; the rest is written as given.
        Returns the chained entry (None when it failed open); raises AuditUnavailable
        when it fails closed."""
        hasher = self.key.hasher()
        plain = {k: v for k, v in event.items() if k != "sensitive"}
        record: dict[str, Any] = {"type": "event", "time": rfc3339(self.clock()), "event": plain}
        sensitive = event.get("sensitive")
        if isinstance(sensitive, Mapping):
            record["event"]["sensitive"] = hasher.redact(sensitive)
        try:
            return self.chain.append(record)
        except AuditUnavailable:
            if self.fail_open:
                log.warning("audit: an event was not recorded (fail-open)")
                return None
            raise

    def close(self) -> None:
        self.chain.close()

    # --- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _request(hasher: Hasher, request: Any, request_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": request_id,
            "operation": request.operation.value,
            "method": request.method,
            "path": request.path,
        }
        if request.remote_addr:
            out["remote_addr"] = request.remote_addr
        if request.data:
            out["data"] = hasher.redact(request.data)
        if request.query:
            out["query"] = {
                k: (v if k == "list" else hasher.digest(str(v))) for k, v in request.query.items()
            }
        if request.token:
            out["client_token"] = hasher.digest(request.token)
        return out

    @staticmethod
    def _identity(entry: Any) -> dict[str, Any] | None:
        if entry is None:
            return None
        return {
            "accessor": entry.accessor,
            "display_name": entry.display_name,
            "policies": list(entry.policies),
            "token_path": entry.path,
            "entity_id": entry.entity_id,
        }


class AsyncCommitter:
    """Audit commits for a server's event loop. Requests run on the loop as they do
    unaudited; each audit record waits on a future while one thread commits. A commit
    starts once the loop has run what was ready when its first record came (so the
    requests that arrived together share it), and every record that arrives while it
    runs goes into the next batch (group commit with no thread per request). Results
    come back to the loop once per batch."""

    def __init__(self, auditor: Auditor, *, max_batch: int = MAX_BATCH) -> None:
        self.auditor = auditor
        self.max_batch = max(1, max_batch)
        self._pending: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._busy = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keycell-audit")

    async def commit(self, record: dict[str, Any]) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((record, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start, loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        if not batch:
            self._busy = False
            return
        records = [r for r, _ in batch]
        if self.auditor.chain.inline:
            # Nothing in this commit waits on a device (the head is anchored by its own
            # thread, the sinks are local files): a thread hop would cost more than it.
            try:
                results = self.auditor.commit_many(records)
            except Exception as exc:
                results = self._crashed(exc, batch)
            self._finish(loop, batch, results)
            return
        work = loop.run_in_executor(self._thread, self.auditor.commit_many, records)
        work.add_done_callback(lambda done: self._finish(loop, batch, self._outcome(done, batch)))

    def _outcome(
        self, done: asyncio.Future[list[bool]], batch: list[tuple[dict[str, Any], asyncio.Future[bool]]]
    ) -> list[bool]:
        try:
            return done.result()
        except Exception as exc:
            return self._crashed(exc, batch)

    def _crashed(self, exc: Exception, batch: list[Any]) -> list[bool]:
        """A bug in a sink or the chain: fail as configured, never hang."""
        log.error("audit commit failed: %s", type(exc).__name__)
        return [self.auditor.fail_open] * len(batch)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[dict[str, Any], asyncio.Future[bool]]],
        results: list[bool],
    ) -> None:
        self._busy = False
        for (_, future), ok in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(ok)
        if self._pending:
            # After the requests these results wake: what they record joins this batch.
            self._busy = True
            loop.call_soon(self._start, loop)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


# --- reading files back: verify and merge -------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Loaded:
    file: str
    line: int
    entry: dict[str, Any]


def read_entries(path: str) -> tuple[list[Loaded], list[Problem]]:
    entries: list[Loaded] = []
    problems: list[Problem] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                problems.append(Problem(path, number, "not a JSON line (modified or truncated)"))
                continue
            if not isinstance(entry, dict):
                problems.append(Problem(path, number, "not a JSON object (modified)"))
                continue
            entries.append(Loaded(path, number, entry))
    return entries, problems


def check_file(path: str) -> tuple[list[Loaded], list[Problem]]:
    """One file in line order: every entry's hash matches its content; no entry appears
    twice; per cell, entries appear in sequence order. Gaps are allowed here (a file
    written by one process among several has them); `check_merged` closes them."""
    entries, problems = read_entries(path)
    good: list[Loaded] = []
    for loaded in entries:
        entry = loaded.entry
        if (
            not isinstance(entry.get("cell"), str)
            or not isinstance(entry.get("seq"), int)
            or entry.get("hash") != entry_hash(entry)
        ):
            problems.append(Problem(path, loaded.line, "hash mismatch: the entry was modified (or forged)"))
        else:
            good.append(loaded)
    # The same sequence number twice: the entry the next one links to is genuine.
    links = {(*chain_of(x.entry), int(x.entry["seq"]) - 1): x.entry.get("prev") for x in good}
    by_seq: dict[tuple[str, str, int], list[Loaded]] = {}
    for loaded in good:
        by_seq.setdefault((*chain_of(loaded.entry), int(loaded.entry["seq"])), []).append(loaded)
    unique: list[Loaded] = []
    for loaded in good:
        ident = (*chain_of(loaded.entry), int(loaded.entry["seq"]))
        group = by_seq[ident]
        if len(group) == 1:
            unique.append(loaded)
            continue
        genuine = next((x for x in group if x.entry["hash"] == links.get(ident)), group[0])
        if loaded is genuine:
            unique.append(loaded)
        else:
            problems.append(
                Problem(path, loaded.line, f"sequence {ident[2]} appears twice: an entry was inserted")
            )
    # Order: the first line whose entry is not where sequence order puts it.
    by_chain: dict[tuple[str, str], list[Loaded]] = {}
    for loaded in unique:
        by_chain.setdefault(chain_of(loaded.entry), []).append(loaded)
    for cell_entries in by_chain.values():
        ordered = sorted(cell_entries, key=lambda x: int(x.entry["seq"]))
        for actual, expected in zip(cell_entries, ordered, strict=True):
            if actual is not expected:
                problems.append(
                    Problem(
                        path,
                        actual.line,
                        f"sequence {actual.entry['seq']} where {expected.entry['seq']} belongs: reordered",
                    )
                )
                break
    problems.sort(key=lambda p: p.line)
    return unique, problems


def check_merged(entries: Iterable[Loaded]) -> list[Problem]:
    """Across files, per chain (cell and writer): sequence numbers complete (no gap),
    the same number never with two contents (a fork), and each entry's `prev` the hash
    of the one before. The first entry of a chain is the anchor (a rotated file need
    not start at 1)."""
    problems: list[Problem] = []
    by_chain: dict[tuple[str, str], list[Loaded]] = {}
    for loaded in entries:
        by_chain.setdefault(chain_of(loaded.entry), []).append(loaded)
    for cell_entries in by_chain.values():
        cell_entries.sort(key=lambda x: int(x.entry["seq"]))
        before: Loaded | None = None
        for after in cell_entries:
            if before is None:
                before = after
                continue
            a, b = before.entry, after.entry
            if b["seq"] == a["seq"]:
                if b["hash"] != a["hash"]:
                    problems.append(
                        Problem(after.file, after.line, f"sequence {b['seq']} forked: two contents")
                    )
                continue  # the same entry from two sinks
            if b["seq"] != a["seq"] + 1:
                missing = f"{a['seq'] + 1}" if b["seq"] == a["seq"] + 2 else f"{a['seq'] + 1}-{b['seq'] - 1}"
                problems.append(
                    Problem(after.file, after.line, f"chain gap: entry {missing} is missing (deleted)")
                )
            elif b.get("prev") != a["hash"]:
                problems.append(
                    Problem(after.file, after.line, "chain break: prev does not match (inserted)")
                )
            before = after
    return problems


def verify_files(paths: Sequence[str]) -> tuple[list[Loaded], list[Problem]]:
    """The entries that passed, and every problem found, sorted by file and line: the
    per-file checks first; the cross-file chain only once every file passed them."""
    everything: list[Loaded] = []
    problems: list[Problem] = []
    for path in paths:
        entries, found = check_file(path)
        problems.extend(found)
        everything.extend(entries)
    if not problems:
        problems.extend(check_merged(everything))
    order = {path: i for i, path in enumerate(paths)}
    problems.sort(key=lambda p: (order.get(p.file, 0), p.line))
    return everything, problems


def check_heads(entries: Iterable[Loaded], ledger: Ledger, cell: str | None = None) -> list[Problem]:
    """Against the cell's ledger: every chain head recorded there (for `cell`, or every
    cell) must be an entry the files hold, and nothing in a chain may end before it.
    This finds what the files alone cannot show: a chain cut short at its end, or a
    writer's whole chain dropped. Entries past a head are not problems here; see
    `heads_and_tails`."""
    return heads_and_tails(entries, ledger, cell)[0]


def heads_and_tails(
    entries: Iterable[Loaded], ledger: Ledger, cell: str | None = None
) -> tuple[list[Problem], list[Problem]]:
    """`check_heads`'s problems, and the chains whose files go on past their head: what
    a writer anchoring after its sinks wrote in its last moments before it stopped (or
    what someone appended since: nothing but the head vouches for those entries)."""
    last: dict[tuple[str, str], Loaded] = {}
    at: dict[tuple[str, str, int], Loaded] = {}
    for loaded in entries:
        ident = chain_of(loaded.entry)
        at[(*ident, int(loaded.entry["seq"]))] = loaded
        if ident not in last or int(loaded.entry["seq"]) > int(last[ident].entry["seq"]):
            last[ident] = loaded
    problems: list[Problem] = []
    tails: list[Problem] = []
    prefix = f"{cell}/" if cell else ""
    for item in iter_prefix(ledger, Kind.AUDIT_HEAD, prefix):
        head_cell, _, writer = item.key.path.rpartition("/")
        head = json.loads(item.value)
        seq = int(head["seq"])
        seen = last.get((head_cell, writer))
        name = f"chain {head_cell}/{writer}"
        if seq == 0:  # claimed, nothing anchored yet
            if seen is not None:
                tails.append(
                    Problem(seen.file, seen.line, f"{name}: entries 1-{seen.entry['seq']} past its head")
                )
        elif seen is None:
            problems.append(Problem("ledger", 0, f"{name}: its entries 1-{seq} are missing (deleted)"))
        elif int(seen.entry["seq"]) < seq:
            missing = f"{int(seen.entry['seq']) + 1}-{seq}"
            problems.append(
                Problem(seen.file, seen.line, f"{name} ends early: entries {missing} are missing (cut off)")
            )
        else:
            anchor = at.get((head_cell, writer, seq))
            if anchor is None or anchor.entry["hash"] != head["hash"]:
                where = anchor or seen
                problems.append(
                    Problem(where.file, where.line, f"{name}: entry {seq} is not the ledger's head")
                )
            elif int(seen.entry["seq"]) > seq:
                tails.append(
                    Problem(
                        seen.file, seen.line, f"{name}: entries {seq + 1}-{seen.entry['seq']} past its head"
                    )
                )
    return problems, tails


def merge_order(entry: Mapping[str, Any]) -> tuple[int, int, str, str, int]:
    """Hybrid logical clock order: physical ms, logical counter, cell, writer, then seq."""
    hlc = entry.get("hlc") or [0, 0]
    cell, writer = chain_of(entry)
    return int(hlc[0]), int(hlc[1]), cell, writer, int(entry.get("seq", 0))


def merge(paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """One timeline across cells (and across a cell's per-process files), by HLC;
    every input chain is verified on the way."""
    loaded, problems = verify_files(paths)
    seen: set[tuple[str, str, int]] = set()
    timeline: list[dict[str, Any]] = []
    for item in loaded:
        ident = (*chain_of(item.entry), int(item.entry["seq"]))
        if ident not in seen:  # the same entry may reach two sinks
            seen.add(ident)
            timeline.append(item.entry)
    timeline.sort(key=merge_order)
    return timeline, problems

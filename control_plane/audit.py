"""The audit trail: every request and response as a tamper-evident JSON line.

Entries. Two per HTTP request, as Vault's audit devices write them: a `request` entry,
committed *before* the handler runs (after authentication, so it names the caller),
and a `response` entry once the answer is known, self-contained (request fields,
identity, outcome, latency). A request refused before its handler (404, 403, sealed)
has only the response entry. Non-HTTP events (relay-applied revocations, rotation
steps) are `event` entries written through `Auditor.record`. Every entry holds:

    seq, prev, hash      its place in the cell's chain (see below)
    hlc                  [physical ms, logical counter]; with `cell` the merge order
    time                 RFC 3339 UTC with microseconds, when the entry was made
    cell, type           the cell id; request | response | event
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

Chain. Each entry's `hash` is the SHA-256 of its canonical JSON (sorted keys, no
`hash` field) and `prev` is the previous entry's hash. The head (seq, hash, HLC) is
one ledger item (Kind.AUDIT_HEAD, path: the cell id, outside the barrier so sealed
requests are chained too), advanced by a conditional write. Group commit: the
entries of concurrent requests in one process queue up; one thread at a time (the
leader) takes up to `max_batch` of them, chains them from the head, advances the
head with one `put_if` and writes the batch to the sinks, while the next batch
gathers; a lost race (another process advanced the head) re-reads the head and
re-chains. A batch's latency is bounded by one commit plus an optional `linger`.
Sinks that can (a file shared by several workers) are locked across the commit and
the write, so a shared file holds the chain in order.

Fail closed (default): when no sink accepts an entry, `before` raises `Unavailable`
(503) and the handler never runs; a response whose entry no sink took is replaced
by a 503. Fail open logs a warning and serves. The entries a failed batch held stay
in the chain (the head was advanced), so `verify` reports them as a gap: the
record that something happened that no sink kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from keycell.control_plane.errors import Unavailable
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, LedgerError

log = logging.getLogger("keycell.audit")

HMAC_KEY = Key(Kind.CONFIG, "audit/hmac-key")
HMAC_PREFIX = "hmac-sha256:"
HASH_PREFIX = "sha256:"
GENESIS = HASH_PREFIX + "0" * 64
REDACTED_SEALED = "redacted:sealed"
MAX_BATCH = 256

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


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: sorted keys, compact, without `hash`."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return HASH_PREFIX + hashlib.sha256(canonical(entry)).hexdigest()


def encode_line(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Hasher:
    """HMAC-SHA256 of sensitive values under the cell's audit key."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    def digest(self, value: str) -> str:
        if self._key is None:
            return REDACTED_SEALED
        return HMAC_PREFIX + hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def redact(self, value: Any, plain: frozenset[str] = frozenset()) -> Any:
        """Every string and number below `value` as a digest; keys stay readable;
        at this level, the fields named in `plain` are kept as they are."""
        if isinstance(value, Mapping):
            return {
                str(k): (v if k in plain and not isinstance(v, Mapping) else self.redact(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return self.digest(value)
        if isinstance(value, int | float):
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
        self._lock = threading.Lock()
        on_seal = getattr(barrier, "on_seal", None)
        if on_seal is not None:
            on_seal(self.forget)

    def forget(self) -> None:
        self._key = None

    def hasher(self) -> Hasher:
        """A hasher with the key, or one that redacts when the cell is sealed."""
        key = self._key
        if key is None:
            if getattr(self.barrier, "sealed", False):
                return Hasher(None)
            key = self.load()
        return Hasher(key)

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

    def write(self, lines: bytes, entries: Sequence[Mapping[str, Any]]) -> None:
        """Store a batch (`lines`: the entries' JSON lines); raise when it could not."""
        ...

    def lock(self) -> contextlib.AbstractContextManager[object]:
        """Held across the head's advance and the write (a shared file stays in order)."""
        ...

    def close(self) -> None: ...


class FileSink:
    """Appends to a file (O_APPEND, one write per batch); several processes may share
    it: an exclusive flock is held across each batch's commit and write."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.name = "file"
        self.path = path
        self.fsync = fsync
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

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
    sizes: list[int] = field(default_factory=list)


class Chain:
    """The cell's hash chain: `append` blocks until the entry is chained, the head
    advanced and a sink took it; it returns the finished entry."""

    def __init__(
        self,
        ledger: Ledger,
        cell: str,
        sinks: Sequence[AuditSink],
        *,
        max_batch: int = MAX_BATCH,
        linger: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.cell = cell
        self.sinks = list(sinks)
        self.max_batch = max(1, max_batch)
        self.linger = linger
        self.clock = clock
        self.key = Key(Kind.AUDIT_HEAD, cell)
        self.stats = ChainStats()
        self._head: Head | None = None
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Slot] = []
        self._committing = False

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
            with contextlib.ExitStack() as locks:
                for sink in self.sinks:
                    locks.enter_context(sink.lock())
                entries = self._advance([s.record for s in batch])
                lines = b"".join(encode_line(e) for e in entries)
                accepted = 0
                for sink in self.sinks:
                    try:
                        sink.write(lines, entries)
                        accepted += 1
                    except Exception as exc:  # a sink is a dependency: report by type, go on
                        log.warning("audit sink %s refused a batch: %s", sink.name, type(exc).__name__)
            if not accepted:
                raise AuditUnavailable("no audit sink accepted the entry")
        except AuditUnavailable as exc:
            for s in batch:
                s.error = exc
        except (LedgerError, OSError) as exc:
            log.warning("audit chain head could not be advanced: %s", type(exc).__name__)
            error = AuditUnavailable("the audit chain head could not be advanced in the ledger")
            for s in batch:
                s.error = error
        else:
            for s, e in zip(batch, entries, strict=True):
                s.entry = e
            self.stats.batches += 1
            self.stats.entries += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        finally:
            for s in batch:
                s.done = True

    def _read_head(self) -> Head:
        item = self.ledger.get(self.key, consistent=True)
        if item is None:
            return Head()
        raw = json.loads(item.value)
        return Head(int(raw["seq"]), str(raw["hash"]), int(raw["ms"]), int(raw["logical"]), item.version)

    def _advance(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        while True:
            head = self._head or self._read_head()
            entries, new = self._link(head, records)
            body = {"seq": new.seq, "hash": new.hash, "ms": new.ms, "logical": new.logical}
            try:
                stored = self.ledger.put_if(self.key, json.dumps(body, sort_keys=True).encode(), head.version)
            except ConflictError:
                self.stats.conflicts += 1
                self._head = None  # another process advanced it: re-read, re-chain
                continue
            except LedgerError:
                self._head = None
                raise
            new.version = stored.version
            self._head = new
            return entries

    def _link(self, head: Head, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Head]:
        now_ms = int(self.clock() * 1000)
        seq, prev, ms, logical = head.seq, head.hash, head.ms, head.logical
        entries: list[dict[str, Any]] = []
        for record in records:
            if now_ms > ms:
                ms, logical = now_ms, 0
            else:
                logical += 1
            seq += 1
            entry = {**record, "cell": self.cell, "seq": seq, "prev": prev, "hlc": [ms, logical]}
            entry["hash"] = prev = entry_hash(entry)
            entries.append(entry)
        return entries, Head(seq, prev, ms, logical)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


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
        max_batch: int = MAX_BATCH,
        linger: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not sinks:
            raise ValueError("an auditor needs at least one sink")
        self.cell = cell
        self.fail_open = fail_open
        self.clock = clock
        self.key = AuditKey(barrier)
        self.chain = Chain(ledger, cell, sinks, max_batch=max_batch, linger=linger, clock=clock)

    @property
    def devices(self) -> list[str]:
        return [s.name for s in self.chain.sinks]

    def audit_hash(self, value: str) -> str:
        return self.key.hasher().digest(value)

    # --- HTTP ---------------------------------------------------------------------------------

    def before(self, ctx: Any, request_id: str) -> None:
        """The request entry, before the handler runs; raises Unavailable (503) when
        no sink took it and the auditor fails closed."""
        hasher = self.key.hasher()
        record = {
            "type": "request",
            "time": rfc3339(self.clock()),
            "request": self._request(hasher, ctx.request, request_id),
            "auth": self._identity(ctx.entry),
        }
        if not self._append(record):
            raise Unavailable(
                "audit: no audit device accepted the request's entry; the request was refused and not executed"
            )

    def after(self, request_id: str, request: Any, ctx: Any, response: Any, elapsed: float) -> Any:
        """The response entry; returns `response`, or a 503 in its place when no sink
        took the entry and the auditor fails closed."""
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
        record = {
            "type": "response",
            "time": rfc3339(self.clock()),
            "request": self._request(hasher, request, request_id),
            "auth": self._identity(ctx.entry if ctx is not None else None),
            "response": outcome,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if self._append(record):
            return response
        return type(response)(
            503,
            {"errors": ["audit: no audit device accepted the response's entry; the response is withheld"]},
        )

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

    def _append(self, record: dict[str, Any]) -> bool:
        try:
            self.chain.append(record)
        except AuditUnavailable:
            if self.fail_open:
                log.warning("audit: an entry was not recorded; serving anyway (fail-open)")
                return True
            return False
        return True

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
    links = {(str(x.entry["cell"]), int(x.entry["seq"]) - 1): x.entry.get("prev") for x in good}
    by_seq: dict[tuple[str, int], list[Loaded]] = {}
    for loaded in good:
        by_seq.setdefault((str(loaded.entry["cell"]), int(loaded.entry["seq"])), []).append(loaded)
    unique: list[Loaded] = []
    for loaded in good:
        ident = (str(loaded.entry["cell"]), int(loaded.entry["seq"]))
        group = by_seq[ident]
        if len(group) == 1:
            unique.append(loaded)
            continue
        genuine = next((x for x in group if x.entry["hash"] == links.get(ident)), group[0])
        if loaded is genuine:
            unique.append(loaded)
        else:
            problems.append(
                Problem(path, loaded.line, f"sequence {ident[1]} appears twice: an entry was inserted")
            )
    # Order: the first line whose entry is not where sequence order puts it.
    by_cell: dict[str, list[Loaded]] = {}
    for loaded in unique:
        by_cell.setdefault(str(loaded.entry["cell"]), []).append(loaded)
    for cell_entries in by_cell.values():
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
    """Across files, per cell: sequence numbers complete (no gap), the same number never
    with two contents (a fork), and each entry's `prev` the hash of the one before.
    The first entry of a cell is the anchor (a rotated file need not start at 1)."""
    problems: list[Problem] = []
    by_cell: dict[str, list[Loaded]] = {}
    for loaded in entries:
        by_cell.setdefault(str(loaded.entry.get("cell")), []).append(loaded)
    for cell_entries in by_cell.values():
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


def merge_order(entry: Mapping[str, Any]) -> tuple[int, int, str, int]:
    """Hybrid logical clock order: physical ms, logical counter, cell id, then seq."""
    hlc = entry.get("hlc") or [0, 0]
    return int(hlc[0]), int(hlc[1]), str(entry.get("cell", "")), int(entry.get("seq", 0))


def merge(paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """One timeline across cells (and across a cell's per-process files), by HLC;
    every input chain is verified on the way."""
    loaded, problems = verify_files(paths)
    seen: set[tuple[str, int]] = set()
    timeline: list[dict[str, Any]] = []
    for item in loaded:
        ident = (str(item.entry["cell"]), int(item.entry["seq"]))
        if ident not in seen:  # the same entry may reach two sinks
            seen.add(ident)
            timeline.append(item.entry)
    timeline.sort(key=merge_order)
    return timeline, problems

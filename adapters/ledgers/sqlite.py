"""The embedded ledger: one SQLite file per cell, WAL mode, safe across processes.

Writes are group-committed. A writer queues its work (the conditional check and the
write, as one function of the connection) and waits; one writer at a time leads: it
takes the write lock, opens one `BEGIN IMMEDIATE` transaction, runs every queued
writer's work in it, each inside its own SAVEPOINT (a conflict rolls back that
writer's part only), commits once (one fsync for the whole batch) and then tells
each writer its own outcome. Nobody is told anything before the COMMIT returns: a
crash mid-batch loses only writes nobody was told about. Checks run under the lock
and see the batch's earlier writes, so compare-and-set is atomic across threads and
processes alike, in batch order, and the version reported with a conflict is the
one that beat us. Readers never block writers (WAL) and see only committed batches.

The lock is an flock of a sidecar file (`<ledger>.writers`) and, for threads of one
process, the queue itself: a waiting writer is woken the moment the lock is free,
where SQLite's own busy handler polls with sleeps of 1 ms growing to 100 ms (two
server workers committing audit heads spent most of their time there). The busy
handler stays as the fallback. Commits are fsynced (`synchronous=FULL`): a secrets
ledger does not trade durability for speed. A development cell may
(`sqlite://PATH?synchronous=off`, what `keycell server --dev` opens): its commits
reach the operating system but are never fsynced, as OpenBao's dev storage lives in
memory.

Paths are compared as SQLite compares TEXT, byte-wise on UTF-8, which is the order
DynamoDB uses for string sort keys, so scans page identically on both adapters.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keycell.control_plane.ledger import (
    Check,
    ConflictError,
    Delete,
    Item,
    Key,
    Kind,
    LedgerUnavailableError,
    Op,
    Page,
    Put,
    TransactionConflictError,
    is_live,
    now,
    validate_key,
    validate_ops,
    validate_put,
    validate_scan,
    validate_version,
)
from keycell.control_plane.private_files import open_private, private_dir, private_file

# One past the largest code point a valid path can hold (ledger paths exclude
# category C, and U+10FFFF is a noncharacter), so `prefix + _AFTER` bounds a range.
_AFTER = "\U0010ffff"
# How long a writer waits for the write lock before reporting the ledger unavailable.
BUSY_TIMEOUT_MS = 30_000
# At most this many writers share one commit; the rest lead or join the next one
# (bounds how long a batch holds the lock, and so the p99 of the process's other writers).
MAX_BATCH = 256
SYNCHRONOUS = ("full", "off")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    kind       TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0),
    value      BLOB    NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (kind, path)
) WITHOUT ROWID;
"""

SELECT_ONE = "SELECT version, value, expires_at FROM items WHERE kind = ? AND path = ?"
UPSERT = (
    "INSERT INTO items (kind, path, version, value, expires_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (kind, path) DO UPDATE SET "
    "version = excluded.version, value = excluded.value, expires_at = excluded.expires_at"
)
DELETE_ONE = "DELETE FROM items WHERE kind = ? AND path = ?"


class _Writer:
    """One queued writer: its work, and once the batch is committed, its outcome."""

    __slots__ = ("done", "error", "lead", "result", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any]) -> None:
        self.work = work
        self.done = threading.Event()
        self.lead = False  # set with `done` when this writer is to lead the next batch
        self.result: Any = None
        self.error: BaseException | None = None


class SqliteLedger:
    """A `Ledger` over one SQLite file. Thread-safe (one connection per thread) and
    safe for several processes opening the same file. `synchronous="off"` is for
    development cells only (see the module's first lines)."""

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous is one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        # Whether a commit waits for the disk (fsync); the server then runs writes on
        # threads, so that their commits are shared (keycell/server.py).
        self.commits_wait_on_device = synchronous == "full"
        private_dir(self.path.parent)
        private_file(self.path)  # SQLite gives its -wal and -shm files this file's mode
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._queue: list[_Writer] = []
        self._queue_lock = threading.Lock()
        self._leading = False  # a writer of this process holds (or is taking) the write lock
        self._writer_mutex = threading.Lock()  # the leader's, so that close() never closes its fd under it
        self.committed_batches = 0  # transactions committed for writers (each one fsync)
        self._writers_fd = self._open_writers()
        self._write(lambda db: db.execute(SCHEMA))

    # --- connections --------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise LedgerUnavailableError(f"the ledger at {self.path} is closed")
        try:
            # isolation_level=None: no implicit transactions; every write below opens
            # its own BEGIN IMMEDIATE.
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,  # used by one thread; closed by whoever closes the ledger
            )
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        except sqlite3.Error as exc:
            raise LedgerUnavailableError(f"cannot open the ledger at {self.path}: {exc}") from exc
        self._local.db = db
        with self._lock:
            self._connections.append(db)
        return db

    def _open_writers(self) -> int:
        # An flock belongs to the open file, which a forked child shares: each process
        # opens its own.
        self._writers_pid = os.getpid()
        return open_private(f"{self.path}.writers")

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `work` (checks and writes on the leader's connection) in the next
        committed batch and return its result, or raise its own error, once the batch
        is durable. LedgerUnavailableError when the batch could not be committed."""
        writer = _Writer(work)
        with self._queue_lock:
            self._queue.append(writer)
            lead = not self._leading
            self._leading = True
        if not lead:
            writer.done.wait()
            lead = writer.lead
        if lead:
            self._lead()
        if writer.error is not None:
            raise writer.error
        return writer.result

    def _lead(self) -> None:
        """Take the lock, commit one batch of the queue, then hand the lead to the
        first writer still queued (or give it up)."""
        batch: list[_Writer] = []
        try:
            db = self._db()
            with self._writer_mutex:
                if self._writers_pid != os.getpid():
                    self._writers_fd = self._open_writers()
                if self._writers_fd < 0:
                    raise LedgerUnavailableError(f"the ledger at {self.path} is closed")
                fcntl.flock(self._writers_fd, fcntl.LOCK_EX)
                try:
                    # Drained under the lock: whoever queued while we waited for it joins.
                    with self._queue_lock:
                        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                    self._commit(db, batch)
                finally:
                    fcntl.flock(self._writers_fd, fcntl.LOCK_UN)
        except BaseException as exc:
            # Nothing of the batch is committed: every writer in it hears so, whatever
            # its own work had found (a conflict seen against a rolled-back batch is moot).
            if not batch:  # failed before draining: the queue's head (us) still waits
                with self._queue_lock:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            failure = (
                exc
                if isinstance(exc, LedgerUnavailableError)
                else LedgerUnavailableError(
                    f"cannot write to the ledger at {self.path}: {type(exc).__name__}"
                )
            )
            for writer in batch:
                writer.result, writer.error = None, failure
        finally:
            with self._queue_lock:
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
            for writer in batch:
                writer.done.set()
            if successor is not None:
                successor.lead = True
                successor.done.set()

    def _commit(self, db: sqlite3.Connection, batch: list[_Writer]) -> None:
        """One transaction for the batch, each writer's work in its own savepoint; its
        outcomes are set on the writers, kept only if the COMMIT succeeds."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LedgerUnavailableError(f"the ledger at {self.path} is busy or unwritable: {exc}") from exc
        # A writer alone needs no savepoint: its failure rolls the whole transaction back.
        alone = len(batch) == 1
        try:
            for writer in batch:
                if not alone:
                    db.execute("SAVEPOINT writer")
                try:
                    writer.result = writer.work(db)
                except sqlite3.Error as exc:
                    writer.error = LedgerUnavailableError(f"write to the ledger at {self.path} failed: {exc}")
                except Exception as exc:  # a conflict, or this writer's own failure; the others go on
                    writer.error = exc
                if alone:
                    if writer.error is not None:
                        db.execute("ROLLBACK")
                        return
                    continue
                if writer.error is not None:
                    db.execute("ROLLBACK TO writer")
                db.execute("RELEASE writer")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise LedgerUnavailableError(f"commit to the ledger at {self.path} failed: {exc}") from exc
        self.committed_batches += 1

    def queued(self) -> int:
        """Writers of this process queued for the next batch (not yet taken by a leader)."""
        with self._queue_lock:
            return len(self._queue)

    @staticmethod
    def _current(db: sqlite3.Connection, key: Key, at: int) -> tuple[int, bool]:
        """(live version or 0, whether a row exists at all, live or expired)."""
        row = db.execute(SELECT_ONE, (key.kind.value, key.path)).fetchone()
        if row is None:
            return 0, False
        version, _value, expires_at = row
        return (version if is_live(expires_at, at) else 0), True

    # --- the Ledger protocol -----------------------------------------------------

    def get(self, key: Key, *, consistent: bool = True) -> Item | None:
        validate_key(key)
        try:
            row = self._db().execute(SELECT_ONE, (key.kind.value, key.path)).fetchone()
        except sqlite3.Error as exc:
            raise LedgerUnavailableError(f"read from the ledger at {self.path} failed: {exc}") from exc
        if row is None or not is_live(row[2], now()):
            return None
        return Item(key, bytes(row[1]), row[0], row[2])

    def put_if(self, key: Key, value: bytes, expected_version: int, *, expires_at: int | None = None) -> Item:
        put = validate_put(key, value, expected_version, expires_at)

        def work(db: sqlite3.Connection) -> Item:
            current, _exists = self._current(db, put.key, now())
            if current != put.expected_version:
                raise ConflictError(put.key, put.expected_version, current)
            return self._apply_put(db, put)

        item: Item = self._write(work)
        return item

    def delete_if(self, key: Key, expected_version: int) -> None:
        validate_key(key)
        version = validate_version(expected_version)

        def work(db: sqlite3.Connection) -> None:
            current, _exists = self._current(db, key, now())
            if current != version or version == 0:
                raise ConflictError(key, version, current)
            db.execute(DELETE_ONE, (key.kind.value, key.path))

        self._write(work)

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        checked = validate_ops(ops)

        def work(db: sqlite3.Connection) -> list[Item | None]:
            at = now()
            for index, op in enumerate(checked):
                current, _exists = self._current(db, op.key, at)
                if current != op.expected_version:
                    raise TransactionConflictError(index, op.key, op.expected_version, current)
            results: list[Item | None] = []
            for op in checked:
                if isinstance(op, Put):
                    results.append(self._apply_put(db, op))
                elif isinstance(op, Delete):
                    db.execute(DELETE_ONE, (op.key.kind.value, op.key.path))
                    results.append(None)
                else:
                    assert isinstance(op, Check)
                    results.append(None)
            return results

        results: list[Item | None] = self._write(work)
        return results

    def scan(
        self,
        kind: Kind,
        prefix: str = "",
        *,
        limit: int = 100,
        cursor: str | None = None,
        consistent: bool = True,
    ) -> Page:
        kind, prefix, limit, cursor = validate_scan(kind, prefix, limit, cursor)
        clauses = ["kind = ?", "(expires_at IS NULL OR expires_at > ?)"]
        params: list[object] = [kind.value, now()]
        if cursor is not None:
            clauses.append("path > ?")
            params.append(cursor)
        elif prefix:
            clauses.append("path >= ?")
            params.append(prefix)
        if prefix:
            clauses.append("path < ?")
            params.append(prefix + _AFTER)
        # Ask for one more than a page to learn whether another page exists.
        sql = (
            "SELECT path, version, value, expires_at FROM items WHERE "  # noqa: S608 - fixed clauses
            + " AND ".join(clauses)
            + " ORDER BY path LIMIT ?"
        )
        params.append(limit + 1)
        try:
            rows = self._db().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LedgerUnavailableError(f"scan of the ledger at {self.path} failed: {exc}") from exc
        items = [
            Item(Key(kind, path), bytes(value), version, exp) for path, version, value, exp in rows[:limit]
        ]
        more = len(rows) > limit
        return Page(items, items[-1].key.path if more else None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
            fd, self._writers_fd = self._writers_fd, -1
        for db in connections:
            db.close()
        if fd >= 0:
            with self._writer_mutex:
                os.close(fd)
        self._local = threading.local()

    # --- maintenance ----------------------------------------------------------------

    def sweep_expired(self, *, batch: int = 500) -> int:
        """Physically remove up to `batch` expired items (DynamoDB's TTL sweeper does
        this on its own; here an operator or a scheduled function calls it)."""

        def work(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM items WHERE (kind, path) IN (SELECT kind, path FROM items "
                "WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
                (now(), batch),
            )
            return cur.rowcount

        removed: int = self._write(work)
        return removed

    # --- helpers --------------------------------------------------------------------

    @staticmethod
    def _apply_put(db: sqlite3.Connection, put: Put) -> Item:
        version = put.expected_version + 1
        db.execute(UPSERT, (put.key.kind.value, put.key.path, version, put.value, put.expires_at))
        return Item(put.key, put.value, version, put.expires_at)

"""The cloud ledger: one DynamoDB table per cell, through PynamoDB models.

Table layout: hash key `kind`, range key `path` (so a prefix scan is one Query with
`begins_with`), a `version` number, a binary `value`, and `expires_at` as the
table's TTL attribute. Conditions are PynamoDB expressions:

- create:  the item does not exist, or it has expired (the TTL sweeper lags);
- update:  `version = expected` and the item has not expired;
- multi-item writes go through TransactWriteItems, all-or-nothing.

Concurrent writers of one process share requests: a writer queues its operations,
and one writer at a time leads, sending the queued writers' operations (on distinct
items, at most 100 in all) as one TransactWriteItems. Should it be cancelled, the
cancellation reasons name the writers whose own conditions failed: each hears of its
own conflict, and the others go again without them, so every writer gets the answer
it would have had alone, and none before DynamoDB has committed its write. (Batch-
WriteItem takes no conditions: every ledger write is conditional.) A writer alone
sends what it always did: a conditional PutItem/DeleteItem, or its own transaction.

A lost single-item race is reported with the version read (strongly consistent)
right after the failed write, which may already be newer than the one that won.
Transactions ask DynamoDB for the conflicting item itself
(ReturnValuesOnConditionCheckFailure=ALL_OLD) and fall back to a read when the
backend does not return it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError
from pynamodb.attributes import BinaryAttribute, NumberAttribute, TTLAttribute, UnicodeAttribute
from pynamodb.connection import Connection
from pynamodb.exceptions import (
    DeleteError,
    GetError,
    PutError,
    PynamoDBException,
    QueryError,
    TableError,
    TransactWriteError,
)
from pynamodb.expressions.condition import Condition
from pynamodb.models import Model
from pynamodb.transactions import TransactWrite

from keycell.control_plane.ledger import (
    ATTR_EXPIRES_AT,
    ATTR_KIND,
    ATTR_PATH,
    ATTR_VALUE,
    ATTR_VERSION,
    MAX_TRANSACTION_ITEMS,
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
    now,
    validate_key,
    validate_ops,
    validate_put,
    validate_scan,
    validate_version,
)

# DynamoDB cancels a transaction that touches an item another transaction holds
# ("TransactionConflict"); nothing was written, so it is retried a few times.
TRANSACTION_CONFLICT_RETRIES = 5


class _Writer:
    """One queued writer: its operations (`single`: a put_if or delete_if, whose
    conflict is a ConflictError) and, once answered, its outcome."""

    __slots__ = ("done", "error", "keys", "lead", "ops", "single")

    def __init__(self, ops: list[Op], single: bool) -> None:
        self.ops = ops
        self.single = single
        self.keys = {(op.key.kind.value, op.key.path) for op in ops}
        self.done = threading.Event()
        self.lead = False
        self.error: BaseException | None = None


class LedgerItem(Model):
    """The one item shape of a cell's table. Subclassed per table by `DynamoLedger`."""

    class Meta:
        table_name = "keycell-ledger"

    kind = UnicodeAttribute(hash_key=True, attr_name=ATTR_KIND)
    path = UnicodeAttribute(range_key=True, attr_name=ATTR_PATH)
    version = NumberAttribute(attr_name=ATTR_VERSION)
    value = BinaryAttribute(attr_name=ATTR_VALUE, legacy_encoding=False)
    expires_at = TTLAttribute(null=True, attr_name=ATTR_EXPIRES_AT)


def _condition_failed(exc: PynamoDBException) -> bool:
    """Did DynamoDB refuse the write because its condition was false? (A timeout or a
    throttle is not a conflict: nothing is known about the item.)"""
    response = getattr(exc.cause, "response", None)
    return (
        isinstance(response, dict)
        and response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
    )


def _epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _moment(epoch: int | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


class DynamoLedger:
    """A `Ledger` over one DynamoDB table (real AWS, a moto server, or LocalStack)."""

    # Every commit is a round trip to DynamoDB: the server runs writes on threads.
    commits_wait_on_device = True

    def __init__(
        self,
        table: str,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        create: bool = False,
        max_retry_attempts: int = 3,
        connect_timeout_seconds: float = 5.0,
        read_timeout_seconds: float = 10.0,
    ) -> None:
        meta = type(
            "Meta",
            (),
            {
                "table_name": table,
                "region": region,
                "host": endpoint_url,
                "max_retry_attempts": max_retry_attempts,
                "connect_timeout_seconds": connect_timeout_seconds,
                "read_timeout_seconds": read_timeout_seconds,
                "billing_mode": "PAY_PER_REQUEST",
            },
        )
        self.table = table
        self.model: type[LedgerItem] = type(f"LedgerItem_{table}", (LedgerItem,), {"Meta": meta})
        self._connection = Connection(
            region=region,
            host=endpoint_url,
            max_retry_attempts=max_retry_attempts,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
        )
        self._queue: list[_Writer] = []
        self._queue_lock = threading.Lock()
        self._leading = False
        self.requests_sent = 0  # write requests sent for queued writers (a batch is one)
        if create:
            self.ensure_table()

    def ensure_table(self) -> None:
        """Create the table (on-demand billing, TTL on `expires_at`) if it is missing.
        Production tables come from the IaC stacks; this is for tests and laptops."""
        try:
            if not self.model.exists():
                self.model.create_table(wait=True, billing_mode="PAY_PER_REQUEST")
                self.model.update_ttl(ignore_update_ttl_errors=False)
        except (TableError, PynamoDBException, BotoCoreError) as exc:
            raise LedgerUnavailableError(f"cannot create DynamoDB table {self.table}: {exc}") from exc

    # --- conditions -------------------------------------------------------------------

    def _live(self, at: int) -> Condition:
        m = self.model
        live: Condition = m.expires_at.does_not_exist() | (m.expires_at > _moment(at))
        return live

    def _at_version(self, expected: int, at: int) -> Condition:
        m = self.model
        condition: Condition
        if expected == 0:
            condition = m.path.does_not_exist() | (m.expires_at <= _moment(at))
        else:
            condition = (m.version == expected) & self._live(at)
        return condition

    # --- the Ledger protocol -----------------------------------------------------

    def get(self, key: Key, *, consistent: bool = True) -> Item | None:
        validate_key(key)
        try:
            row = self.model.get(key.kind.value, key.path, consistent_read=consistent)
        except self.model.DoesNotExist:
            return None
        except (GetError, BotoCoreError) as exc:
            raise LedgerUnavailableError(f"read from DynamoDB table {self.table} failed: {exc}") from exc
        item = self._item(key.kind, row)
        if item.expires_at is not None and item.expires_at <= now():
            return None
        return item

    def put_if(self, key: Key, value: bytes, expected_version: int, *, expires_at: int | None = None) -> Item:
        put = validate_put(key, value, expected_version, expires_at)
        self._write(_Writer([put], single=True))
        return Item(put.key, put.value, put.expected_version + 1, put.expires_at)

    def _put_one(self, put: Put) -> None:
        row = self._row(put)
        try:
            row.save(condition=self._at_version(put.expected_version, now()))
        except PutError as exc:
            if _condition_failed(exc):
                raise ConflictError(put.key, put.expected_version, self._version_of(put.key)) from None
            raise LedgerUnavailableError(f"write to DynamoDB table {self.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise LedgerUnavailableError(f"write to DynamoDB table {self.table} failed: {exc}") from exc

    def delete_if(self, key: Key, expected_version: int) -> None:
        validate_key(key)
        version = validate_version(expected_version)
        if version == 0:
            raise ConflictError(key, version, self._version_of(key))
        self._write(_Writer([Delete(key, version)], single=True))

    def _delete_one(self, key: Key, version: int) -> None:
        row = self.model(key.kind.value, key.path)
        try:
            row.delete(condition=self._at_version(version, now()))
        except DeleteError as exc:
            if _condition_failed(exc):
                raise ConflictError(key, version, self._version_of(key)) from None
            raise LedgerUnavailableError(f"deleting from DynamoDB table {self.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise LedgerUnavailableError(f"deleting from DynamoDB table {self.table} failed: {exc}") from exc

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        checked = validate_ops(ops)
        self._write(_Writer(checked, single=False))
        return [
            Item(op.key, op.value, op.expected_version + 1, op.expires_at) if isinstance(op, Put) else None
            for op in checked
        ]

    def _transact_retrying(self, ops: list[Op]) -> None:
        for attempt in range(TRANSACTION_CONFLICT_RETRIES + 1):
            try:
                self._transact_once(ops)
                return
            except _Contended:
                if attempt == TRANSACTION_CONFLICT_RETRIES:
                    break
                time.sleep(0.01 * 2**attempt)
        raise LedgerUnavailableError(
            f"transaction on DynamoDB table {self.table} kept colliding with concurrent "
            "transactions on the same items; nothing was written, retry later"
        )

    # --- shared requests (group commit) -------------------------------------------------

    def _write(self, writer: _Writer) -> None:
        """Send `writer`'s operations, alone or in one transaction with the writers
        queued beside it; raises its own conflict or failure."""
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

    def _lead(self) -> None:
        batch: list[_Writer] = []
        try:
            with self._queue_lock:
                batch = self._take()
            self._send(batch)
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, LedgerUnavailableError)
                else LedgerUnavailableError(
                    f"write to DynamoDB table {self.table} failed: {type(exc).__name__}"
                )
            )
            for writer in batch:
                if writer.error is None:
                    writer.error = failure
        finally:
            with self._queue_lock:
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
            for writer in batch:
                writer.done.set()
            if successor is not None:
                successor.lead = True
                successor.done.set()

    def _take(self) -> list[_Writer]:
        """The queue's writers (in order) that fit one transaction: items no earlier
        writer of the batch touches, 100 operations at most. Called under the lock."""
        batch: list[_Writer] = []
        touched: set[tuple[str, str]] = set()
        size = 0
        rest: list[_Writer] = []
        for writer in self._queue:
            fits = not (writer.keys & touched) and size + len(writer.ops) <= MAX_TRANSACTION_ITEMS
            if fits and (not rest or not (writer.keys & {k for w in rest for k in w.keys})):
                batch.append(writer)
                touched |= writer.keys
                size += len(writer.ops)
            else:
                rest.append(writer)  # waits for a later batch, after the writers it follows
        self._queue = rest
        return batch

    def _send(self, batch: list[_Writer]) -> None:
        """Until every writer of the batch is answered: one request for those left,
        dropping the writers whose own conditions failed."""
        left = list(batch)
        for attempt in range(len(batch) + TRANSACTION_CONFLICT_RETRIES + 1):
            if not left:
                return
            self.requests_sent += 1
            if len(left) == 1:
                self._send_alone(left[0])
                return
            try:
                self._transact_once([op for writer in left for op in writer.ops])
                return
            except _Contended:
                time.sleep(0.01 * 2 ** min(attempt, TRANSACTION_CONFLICT_RETRIES))
            except _Cancelled as cancelled:
                failed = set()
                offset = 0
                for writer in left:
                    mine = [
                        (i - offset, v) for i, v in cancelled.failed if offset <= i < offset + len(writer.ops)
                    ]
                    if mine:
                        index, current = min(mine)
                        op = writer.ops[index]
                        writer.error = (
                            ConflictError(op.key, op.expected_version, current)
                            if writer.single
                            else TransactionConflictError(index, op.key, op.expected_version, current)
                        )
                        failed.add(id(writer))
                    offset += len(writer.ops)
                left = [w for w in left if id(w) not in failed]
        for writer in left:
            writer.error = LedgerUnavailableError(
                f"writes to DynamoDB table {self.table} kept colliding with concurrent "
                "transactions on the same items; nothing was written, retry later"
            )

    def _send_alone(self, writer: _Writer) -> None:
        op = writer.ops[0]
        try:
            if not writer.single:
                self._transact_retrying(writer.ops)
            elif isinstance(op, Put):
                self._put_one(op)
            else:
                self._delete_one(op.key, op.expected_version)
        except _Cancelled as cancelled:
            index, current = cancelled.failed[0]
            op = writer.ops[index]
            writer.error = TransactionConflictError(index, op.key, op.expected_version, current)
        except (ConflictError, LedgerUnavailableError) as exc:
            writer.error = exc

    def _transact_once(self, ops: list[Op]) -> None:
        at = now()
        # PynamoDB sends condition checks, then deletes, then puts: remember which
        # of our operations each cancellation reason refers to.
        order = [i for i, op in enumerate(ops) if isinstance(op, Check)]
        order += [i for i, op in enumerate(ops) if isinstance(op, Delete)]
        order += [i for i, op in enumerate(ops) if isinstance(op, Put)]
        try:
            with TransactWrite(connection=self._connection) as tx:
                for op in ops:
                    condition = self._at_version(op.expected_version, at)
                    if isinstance(op, Put):
                        tx.save(self._row(op), condition=condition, return_values="ALL_OLD")
                    elif isinstance(op, Delete):
                        tx.delete(self.model(op.key.kind.value, op.key.path), condition=condition)
                    else:
                        tx.condition_check(self.model, op.key.kind.value, op.key.path, condition=condition)
        except TransactWriteError as exc:
            reasons = exc.cancellation_reasons
            failed: list[tuple[int, int]] = []
            for position, reason in enumerate(reasons):
                if reason is None or position >= len(order):
                    continue
                op = ops[order[position]]
                if reason.code == "ConditionalCheckFailed":
                    current = self._version_from_raw(reason.raw_item, at)
                    if current is None:
                        current = self._version_of(op.key)
                    failed.append((order[position], current))
            if failed:
                raise _Cancelled(sorted(failed)) from None
            if any(r is not None and r.code == "TransactionConflict" for r in reasons):
                raise _Contended from None
            raise LedgerUnavailableError(f"transaction on DynamoDB table {self.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise LedgerUnavailableError(f"transaction on DynamoDB table {self.table} failed: {exc}") from exc

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
        m = self.model
        start: dict[str, dict[str, Any]] | None = None
        if cursor is not None:
            start = {ATTR_KIND: {"S": kind.value}, ATTR_PATH: {"S": cursor}}
        try:
            results = m.query(
                kind.value,
                range_key_condition=m.path.startswith(prefix) if prefix else None,
                filter_condition=self._live(now()),
                consistent_read=consistent,
                limit=limit,
                page_size=limit,
                last_evaluated_key=start,
            )
            items = [self._item(kind, row) for row in results]
            last = results.last_evaluated_key
        except (QueryError, BotoCoreError) as exc:
            raise LedgerUnavailableError(f"scan of DynamoDB table {self.table} failed: {exc}") from exc
        next_cursor = last[ATTR_PATH]["S"] if last else None
        return Page(items, next_cursor)

    def close(self) -> None:
        # botocore clients hold pooled HTTP connections; they close with the process.
        pass

    # --- helpers ----------------------------------------------------------------------

    def _row(self, put: Put) -> LedgerItem:
        return self.model(
            put.key.kind.value,
            put.key.path,
            version=put.expected_version + 1,
            value=put.value,
            expires_at=_moment(put.expires_at),
        )

    @staticmethod
    def _item(kind: Kind, row: LedgerItem) -> Item:
        return Item(Key(kind, row.path), bytes(row.value), int(row.version), _epoch(row.expires_at))

    def _version_of(self, key: Key) -> int:
        item = self.get(key, consistent=True)
        return 0 if item is None else item.version

    @staticmethod
    def _version_from_raw(raw: dict[str, dict[str, Any]] | None, at: int) -> int | None:
        if not raw:
            return None  # not returned (or absent): the caller reads it
        expiry = raw.get(ATTR_EXPIRES_AT, {}).get("N")
        if expiry is not None and int(expiry) <= at:
            return 0
        return int(raw[ATTR_VERSION]["N"])


class _Contended(Exception):
    """A transaction met another in flight on the same item; nothing was written."""


class _Cancelled(Exception):
    """A transaction's conditions failed: (index of the operation, its item's version)
    for each failed one; nothing was written."""

    def __init__(self, failed: list[tuple[int, int]]) -> None:
        super().__init__(f"{len(failed)} conditions failed")
        self.failed = failed

"""The cloud ledger: one DynamoDB table per cell, through PynamoDB models.

Table layout: hash key `kind`, range key `path` (so a prefix scan is one Query with
`begins_with`), a `version` number, a binary `value`, and `expires_at` as the
table's TTL attribute. Conditions are PynamoDB expressions:

- create:  the item does not exist, or it has expired (the TTL sweeper lags);
- update:  `version = expected` and the item has not expired;
- multi-item writes go through TransactWriteItems, all-or-nothing.

A lost single-item race is reported with the version read (strongly consistent)
right after the failed write, which may already be newer than the one that won.
Transactions ask DynamoDB for the conflicting item itself
(ReturnValuesOnConditionCheckFailure=ALL_OLD) and fall back to a read when the
backend does not return it.
"""

from __future__ import annotations

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
        row = self._row(put)
        try:
            row.save(condition=self._at_version(put.expected_version, now()))
        except PutError as exc:
            if _condition_failed(exc):
                raise ConflictError(put.key, put.expected_version, self._version_of(put.key)) from None
            raise LedgerUnavailableError(f"write to DynamoDB table {self.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise LedgerUnavailableError(f"write to DynamoDB table {self.table} failed: {exc}") from exc
        return Item(put.key, put.value, put.expected_version + 1, put.expires_at)

    def delete_if(self, key: Key, expected_version: int) -> None:
        validate_key(key)
        version = validate_version(expected_version)
        if version == 0:
            raise ConflictError(key, version, self._version_of(key))
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
        for attempt in range(TRANSACTION_CONFLICT_RETRIES + 1):
            try:
                return self._transact_once(checked)
            except _Contended:
                if attempt == TRANSACTION_CONFLICT_RETRIES:
                    break
                time.sleep(0.01 * 2**attempt)
        raise LedgerUnavailableError(
            f"transaction on DynamoDB table {self.table} kept colliding with concurrent "
            "transactions on the same items; nothing was written, retry later"
        )

    def _transact_once(self, ops: list[Op]) -> list[Item | None]:
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
            for position, reason in enumerate(reasons):
                if reason is None or position >= len(order):
                    continue
                op = ops[order[position]]
                if reason.code == "ConditionalCheckFailed":
                    current = self._version_from_raw(reason.raw_item, at)
                    if current is None:
                        current = self._version_of(op.key)
                    raise TransactionConflictError(
                        order[position], op.key, op.expected_version, current
                    ) from None
            if any(r is not None and r.code == "TransactionConflict" for r in reasons):
                raise _Contended from None
            raise LedgerUnavailableError(f"transaction on DynamoDB table {self.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise LedgerUnavailableError(f"transaction on DynamoDB table {self.table} failed: {exc}") from exc
        return [
            Item(op.key, op.value, op.expected_version + 1, op.expires_at) if isinstance(op, Put) else None
            for op in ops
        ]

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

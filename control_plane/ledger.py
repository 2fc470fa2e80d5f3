"""The conditional-write ledger: the per-cell store every CP path stands on.

One logical table per cell. An item is addressed by a `Key` (an item `Kind` and a
path) and carries an opaque `value` (barrier ciphertext once the barrier exists), a
`version` that grows by one on every write, and an optional expiry.

The contract every adapter honours, proven by `tests/ledger/test_ledger_conformance.py`:

- `put_if(key, value, expected_version)` succeeds exactly once per version: the
  write lands only if the item's current version is `expected_version` (0 means
  "absent"), and the stored version becomes `expected_version + 1`. A lost race
  raises `ConflictError` carrying the version found.
- `transact([...])` is all-or-nothing, including when one condition fails.
- `get(..., consistent=True)` is a strongly consistent read (the CP paths ask for
  it); `consistent=False` may be served from a replica.
- `scan` pages by prefix and never loads the whole table.
- An item whose `expires_at` has passed is absent to every operation, whether or
  not the backend has physically removed it yet (DynamoDB's TTL sweeper lags).

Input is validated here, once, before any adapter touches storage, so every
adapter rejects the same things with the same errors and writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

# DynamoDB's item limit, "400 KB" (attribute names plus values), read as 400,000
# bytes: the service itself accepts up to 400 KiB, so everything allowed here fits
# with room to spare. Applied on every adapter so behaviour is identical.
MAX_ITEM_BYTES = 400_000
# DynamoDB's sort key limit is 1024 bytes; the path is the sort key.
MAX_PATH_BYTES = 1024
# TransactWriteItems accepts at most 100 actions and 4 MB in total.
MAX_TRANSACTION_ITEMS = 100
MAX_TRANSACTION_BYTES = 4 * 1024 * 1024
# Largest page a single scan call returns; callers page for more.
MAX_PAGE_SIZE = 1000

# Attribute names as stored; they count towards the item size as in DynamoDB.
ATTR_KIND = "kind"
ATTR_PATH = "path"
ATTR_VERSION = "version"
ATTR_VALUE = "value"
ATTR_EXPIRES_AT = "expires_at"
# Numbers are sized as DynamoDB sizes them: roughly one byte per two digits plus one.
_NUMBER_BYTES = 21


class Kind(StrEnum):
    """Every kind of item a cell keeps. The table is keyed by (kind, path), so adding
    a kind never reshapes it."""

    SECRET_META = "secret-meta"  # noqa: S105  # path: mount/secret path; value: versions, cas settings
    SECRET_VERSION = "secret-version"  # noqa: S105  # path: mount/secret path + "#" + zero-padded version
    LEASE = "lease"  # path: lease id (mount/role/uuid); expires_at: lease expiry
    TOKEN = "token"  # noqa: S105  # path: token hmac; value: policies, ttl, parent, accessor
    TOKEN_ACCESSOR = "token-accessor"  # noqa: S105  # path: accessor; value: token hmac
    REVOCATION = "revocation"  # grow-only set; path: revoked id; value: origin cell, time
    ROTATION = "rotation"  # path: secret path; value: state machine step, request token
    AUDIT_HEAD = "audit-head"  # path: cell id; value: sequence and hash of the last entry
    KEYRING = "keyring"  # path: "current"; value: barrier keyring (encrypted by root key)
    SEAL = "seal"  # path: "config" / "recovery"; value: seal configuration
    IDENTITY_ENTRY = "identity-entry"  # path: entry id; SPIFFE registration entries
    CELL = "cell"  # path: cell id; the cell directory CRDT state
    POLICY = "policy"  # path: ACL policy name; value: the policy text and its parsed rules
    AUTH_ROLE = "auth-role"  # path: auth method/role name (e.g. jwt/payments)
    AUTH_SECRET = "auth-secret"  # noqa: S105  # path: method/role/digest; AppRole secret IDs, accessors
    CUBBYHOLE = "cubbyhole"  # path: token hmac/key; response-wrapping and per-token storage
    TRANSIT_KEY = "transit-key"  # path: transit key name; value: its config (versions, min decryption)
    CONFIG = "config"  # path: engine/setting; small per-cell configuration
    REVOCATION_RECEIPT = "revocation-receipt"  # path: revocation id/cell; value: when that cell applied it
    SECRET_HOME = "secret-home"  # noqa: S105  # path: mount/secret path; value: home cell, epoch (issue 9)
    REPLICA = "replica"  # path: mount/secret path; value: home, epoch, meta seq, confirmed time (issue 9)
    ROTATION_DUE = "rotation-due"  # path: zero-padded due epoch second/secret; the sweep's index
    REVOCATION_SEQ = "revocation-seq"  # path: origin cell/zero-padded seq; value: its minting time (issue 18)
    REVOCATION_CLOCK = "revocation-clock"  # path: mint|heartbeat|frontier/cell; freshness (issue 18)
    # path: sender cell/revocation id | sender cell/heartbeat; written by *other* cells, sealed
    # to this cell's key, outside the barrier (control_plane/revocation_inbox.py, issue 18)
    REVOCATION_INBOX = "revocation-inbox"


@dataclass(frozen=True, slots=True)
class Key:
    kind: Kind
    path: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.path}"


@dataclass(frozen=True, slots=True)
class Item:
    key: Key
    value: bytes
    version: int
    expires_at: int | None = None  # epoch seconds

    def __repr__(self) -> str:
        # Values may be secret material: never show them.
        return (
            f"Item(key={self.key!s}, version={self.version}, "
            f"value=<{len(self.value)} bytes>, expires_at={self.expires_at})"
        )


@dataclass(frozen=True, slots=True)
class Put:
    """Write `value` if the item is at `expected_version` (0: absent)."""

    key: Key
    value: bytes
    expected_version: int
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove the item if it is at `expected_version`."""

    key: Key
    expected_version: int


@dataclass(frozen=True, slots=True)
class Check:
    """Write nothing; fail the transaction unless the item is at `expected_version`."""

    key: Key
    expected_version: int


Op = Put | Delete | Check


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Item]
    cursor: str | None  # pass back to `scan` for the next page; None: no more


# --- errors -------------------------------------------------------------------------


class LedgerError(Exception):
    """Base of every ledger error."""


class InvalidKeyError(LedgerError, ValueError):
    """The key is empty, too long, of the wrong type, or holds illegal characters."""


class InvalidItemError(LedgerError, ValueError):
    """The value, version, expiry or transaction is malformed or over a size limit."""


class ConflictError(LedgerError):
    """A conditional write lost: the item is not at the expected version.

    `current_version` is the version found (0: absent). Adapters whose backend can
    return the conflicting item atomically report that; otherwise it is read right
    after the failed write and may already be newer.
    """

    def __init__(self, key: Key, expected_version: int, current_version: int) -> None:
        self.key = key
        self.expected_version = expected_version
        self.current_version = current_version
        super().__init__(
            f"conditional write on {key} lost: expected version {expected_version}, "
            f"found {current_version}; re-read the item and retry with its version"
        )


class TransactionConflictError(ConflictError):
    """A transaction was cancelled because the condition of operation `index` failed.
    Nothing in the transaction was written."""

    def __init__(self, index: int, key: Key, expected_version: int, current_version: int) -> None:
        self.index = index
        super().__init__(key, expected_version, current_version)
        self.args = (
            f"transaction cancelled, nothing written: operation {index} on {key} expected "
            f"version {expected_version}, found {current_version}",
        )


class LedgerUnavailableError(LedgerError):
    """The backing store could not be reached or refused the request; nothing is known
    to have been written. Safe to retry with the same expected version."""


# --- the protocol -------------------------------------------------------------------


@runtime_checkable
class Ledger(Protocol):
    """A cell's conditional-write store. See the module docstring for the contract."""

    def get(self, key: Key, *, consistent: bool = True) -> Item | None: ...

    def put_if(
        self, key: Key, value: bytes, expected_version: int, *, expires_at: int | None = None
    ) -> Item: ...

    def delete_if(self, key: Key, expected_version: int) -> None: ...

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        """Apply every op or none. Returns, per op, the written item for a `Put` and
        None for `Delete` and `Check`."""
        ...

    def scan(
        self,
        kind: Kind,
        prefix: str = "",
        *,
        limit: int = 100,
        cursor: str | None = None,
        consistent: bool = True,
    ) -> Page:
        """Live items of `kind` whose path starts with `prefix`, in path order, at most
        `limit` of them. A page may hold fewer (even none) and still carry a cursor."""
        ...

    def close(self) -> None: ...


def iter_prefix(ledger: Ledger, kind: Kind, prefix: str = "", *, page_size: int = 100) -> Iterator[Item]:
    """Every live item of `kind` under `prefix`, in path order, one page in memory at a time."""
    cursor: str | None = None
    while True:
        page = ledger.scan(kind, prefix, limit=page_size, cursor=cursor)
        yield from page.items
        if page.cursor is None:
            return
        cursor = page.cursor


# --- validation, shared by every adapter -------------------------------------------


def now() -> int:
    """Epoch seconds; the clock expiry is judged by."""
    return int(time.time())


def is_live(expires_at: int | None, at: int) -> bool:
    return expires_at is None or expires_at > at


def validate_key(key: object) -> Key:
    if not isinstance(key, Key):
        raise InvalidKeyError(f"a ledger key must be a Key, not {type(key).__name__}")
    if not isinstance(key.kind, Kind):
        raise InvalidKeyError(f"unknown item kind {key.kind!r}; use a member of Kind")
    validate_path(key.path)
    return key


def validate_path(path: object, *, allow_empty: bool = False) -> str:
    if not isinstance(path, str):
        raise InvalidKeyError(f"a ledger path must be a str, not {type(path).__name__}")
    if not path and not allow_empty:
        raise InvalidKeyError("a ledger path must not be empty")
    size = len(path.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise InvalidKeyError(f"a ledger path is at most {MAX_PATH_BYTES} bytes; this one is {size}")
    if not path.isprintable():
        # Printable excludes Unicode categories C (control, format, surrogate, private
        # use, unassigned) and Z other than the ASCII space. Excluding them keeps paths
        # readable, valid UTF-8, and leaves U+10FFFF free to bound a prefix range.
        position, char = next((i, c) for i, c in enumerate(path) if not c.isprintable())
        raise InvalidKeyError(
            f"a ledger path may not contain control, separator or unassigned characters "
            f"(found U+{ord(char):04X} at position {position})"
        )
    return path


def validate_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidItemError(f"an expected version must be an int, not {type(version).__name__}")
    if version < 0:
        raise InvalidItemError(f"an expected version is 0 (absent) or more, not {version}")
    return version


def validate_expiry(expires_at: object) -> int | None:
    if expires_at is None:
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise InvalidItemError(f"expires_at must be epoch seconds as an int, not {type(expires_at).__name__}")
    if expires_at <= 0:
        raise InvalidItemError("expires_at must be a positive epoch time in seconds")
    return expires_at


def item_size(key: Key, value: bytes, expires_at: int | None) -> int:
    """The item's size as DynamoDB counts it: attribute names plus values."""
    size = len(ATTR_KIND) + len(key.kind.value.encode())
    size += len(ATTR_PATH) + len(key.path.encode("utf-8", "surrogatepass"))
    size += len(ATTR_VERSION) + _NUMBER_BYTES
    size += len(ATTR_VALUE) + len(value)
    if expires_at is not None:
        size += len(ATTR_EXPIRES_AT) + _NUMBER_BYTES
    return size


def validate_put(key: object, value: object, expected_version: object, expires_at: object) -> Put:
    checked_key = validate_key(key)
    if not isinstance(value, bytes):
        raise InvalidItemError(f"a ledger value must be bytes, not {type(value).__name__}")
    version = validate_version(expected_version)
    expiry = validate_expiry(expires_at)
    size = item_size(checked_key, value, expiry)
    if size > MAX_ITEM_BYTES:
        raise InvalidItemError(
            f"item {checked_key} would be {size} bytes; the limit is {MAX_ITEM_BYTES} "
            "(store large values in chunks or outside the ledger)"
        )
    return Put(checked_key, value, version, expiry)


def validate_ops(ops: object) -> list[Op]:
    if not isinstance(ops, Sequence) or isinstance(ops, str | bytes):
        raise InvalidItemError("a transaction is a sequence of Put, Delete and Check operations")
    if not ops:
        raise InvalidItemError("a transaction needs at least one operation")
    if len(ops) > MAX_TRANSACTION_ITEMS:
        raise InvalidItemError(
            f"a transaction holds at most {MAX_TRANSACTION_ITEMS} operations, not {len(ops)}"
        )
    checked: list[Op] = []
    seen: set[Key] = set()
    total = 0
    for index, op in enumerate(ops):
        if isinstance(op, Put):
            put = validate_put(op.key, op.value, op.expected_version, op.expires_at)
            total += item_size(put.key, put.value, put.expires_at)
            checked.append(put)
        elif isinstance(op, Delete | Check):
            validate_key(op.key)
            validate_version(op.expected_version)
            if isinstance(op, Delete) and op.expected_version == 0:
                raise InvalidItemError(f"operation {index}: deleting requires the version being deleted")
            checked.append(op)
        else:
            raise InvalidItemError(f"operation {index} is a {type(op).__name__}; use Put, Delete or Check")
        if op.key in seen:
            raise InvalidItemError(f"operation {index}: {op.key} appears twice in one transaction")
        seen.add(op.key)
    if total > MAX_TRANSACTION_BYTES:
        raise InvalidItemError(
            f"a transaction writes at most {MAX_TRANSACTION_BYTES} bytes; this one writes {total}"
        )
    return checked


def validate_scan(
    kind: object, prefix: object, limit: object, cursor: object
) -> tuple[Kind, str, int, str | None]:
    if not isinstance(kind, Kind):
        raise InvalidKeyError(f"unknown item kind {kind!r}; use a member of Kind")
    checked_prefix = validate_path(prefix, allow_empty=True)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidItemError(f"a scan page holds 1 to {MAX_PAGE_SIZE} items")
    if cursor is not None:
        cursor = validate_path(cursor)
        if not cursor.startswith(checked_prefix):
            raise InvalidItemError("this cursor belongs to another scan; start again without one")
    return kind, checked_prefix, limit, cursor

"""The ledger contract. Every test runs against every adapter (see conftest.py)."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

from keycell.control_plane.ledger import (
    MAX_ITEM_BYTES,
    MAX_PATH_BYTES,
    MAX_TRANSACTION_ITEMS,
    Check,
    ConflictError,
    Delete,
    InvalidItemError,
    InvalidKeyError,
    Item,
    Key,
    Kind,
    Ledger,
    Put,
    TransactionConflictError,
    item_size,
    iter_prefix,
    now,
)

SECRET = Key(Kind.SECRET_META, "secret/app/db")


def all_items(ledger: Ledger) -> list[Item]:
    return [item for kind in Kind for item in iter_prefix(ledger, kind)]


# --- compare-and-set --------------------------------------------------------------


def test_adapter_satisfies_the_protocol(ledger: Ledger) -> None:
    assert isinstance(ledger, Ledger)


def test_create_writes_version_one(ledger: Ledger) -> None:
    item = ledger.put_if(SECRET, b"v1", 0)
    assert (item.version, item.value) == (1, b"v1")
    assert ledger.get(SECRET) == Item(SECRET, b"v1", 1, None)


def test_missing_item_reads_as_none(ledger: Ledger) -> None:
    assert ledger.get(SECRET) is None
    assert ledger.get(SECRET, consistent=False) is None


def test_second_create_conflicts_and_reports_the_existing_version(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    with pytest.raises(ConflictError) as caught:
        ledger.put_if(SECRET, b"other", 0)
    assert (caught.value.expected_version, caught.value.current_version) == (0, 1)
    assert ledger.get(SECRET).value == b"v1"  # type: ignore[union-attr]


def test_update_on_the_current_version_increments_it(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    assert ledger.put_if(SECRET, b"v2", 1).version == 2
    assert ledger.get(SECRET) == Item(SECRET, b"v2", 2, None)


def test_stale_update_conflicts_with_the_current_version(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    ledger.put_if(SECRET, b"v2", 1)
    with pytest.raises(ConflictError) as caught:
        ledger.put_if(SECRET, b"stale", 1)
    assert caught.value.current_version == 2
    assert "expected version 1, found 2" in str(caught.value)


def test_update_of_a_missing_item_conflicts_with_version_zero(ledger: Ledger) -> None:
    with pytest.raises(ConflictError) as caught:
        ledger.put_if(SECRET, b"v", 3)
    assert caught.value.current_version == 0


def test_each_version_is_won_exactly_once_under_concurrency(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    wins: list[bytes] = []
    losses: list[int] = []
    start = threading.Barrier(8)

    def race(n: int) -> None:
        start.wait()
        try:
            ledger.put_if(SECRET, f"writer-{n}".encode(), 1)
            wins.append(f"writer-{n}".encode())
        except ConflictError as exc:
            losses.append(exc.current_version)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and losses == [2] * 7
    assert ledger.get(SECRET) == Item(SECRET, wins[0], 2, None)


def test_conflict_message_names_the_key_but_not_the_value(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"hunter2-secret", 0)
    with pytest.raises(ConflictError) as caught:
        ledger.put_if(SECRET, b"hunter2-secret", 0)
    assert "secret/app/db" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(ledger.get(SECRET))


# --- delete -------------------------------------------------------------------------


def test_delete_on_the_current_version_removes_the_item(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    ledger.delete_if(SECRET, 1)
    assert ledger.get(SECRET) is None
    assert ledger.put_if(SECRET, b"again", 0).version == 1


def test_stale_delete_conflicts_and_keeps_the_item(ledger: Ledger) -> None:
    ledger.put_if(SECRET, b"v1", 0)
    ledger.put_if(SECRET, b"v2", 1)
    with pytest.raises(ConflictError) as caught:
        ledger.delete_if(SECRET, 1)
    assert caught.value.current_version == 2
    assert ledger.get(SECRET).version == 2  # type: ignore[union-attr]


def test_delete_of_a_missing_item_conflicts(ledger: Ledger) -> None:
    with pytest.raises(ConflictError):
        ledger.delete_if(SECRET, 1)


# --- transactions ----------------------------------------------------------------------


def test_transaction_writes_every_item(ledger: Ledger) -> None:
    meta = Key(Kind.SECRET_META, "secret/app")
    version = Key(Kind.SECRET_VERSION, "secret/app#0000000001")
    results = ledger.transact([Put(meta, b"meta", 0), Put(version, b"ciphertext", 0)])
    assert [r.version if r else None for r in results] == [1, 1]
    assert ledger.get(meta).value == b"meta"  # type: ignore[union-attr]
    assert ledger.get(version).value == b"ciphertext"  # type: ignore[union-attr]


def test_transaction_with_a_failed_put_condition_writes_nothing(ledger: Ledger) -> None:
    taken = Key(Kind.SECRET_VERSION, "secret/app#0000000001")
    ledger.put_if(taken, b"first", 0)
    fresh = Key(Kind.SECRET_META, "secret/app")
    with pytest.raises(TransactionConflictError) as caught:
        ledger.transact([Put(fresh, b"meta", 0), Put(taken, b"second", 0)])
    assert (caught.value.index, caught.value.key, caught.value.current_version) == (1, taken, 1)
    assert "nothing written" in str(caught.value)
    assert ledger.get(fresh) is None
    assert ledger.get(taken).value == b"first"  # type: ignore[union-attr]


def test_transaction_with_a_failed_check_writes_nothing(ledger: Ledger) -> None:
    guard = Key(Kind.SEAL, "config")
    ledger.put_if(guard, b"sealed", 0)
    ledger.put_if(guard, b"unsealed", 1)
    target = Key(Kind.TOKEN, "t1")
    with pytest.raises(TransactionConflictError) as caught:
        ledger.transact([Put(target, b"token", 0), Check(guard, 1)])
    assert (caught.value.index, caught.value.current_version) == (1, 2)
    assert ledger.get(target) is None


def test_transaction_with_a_failed_delete_writes_nothing(ledger: Ledger) -> None:
    doomed = Key(Kind.LEASE, "database/creds/app/1")
    ledger.put_if(doomed, b"lease", 0)
    other = Key(Kind.REVOCATION, "database/creds/app/1")
    with pytest.raises(TransactionConflictError) as caught:
        ledger.transact([Put(other, b"revoked", 0), Delete(doomed, 5)])
    assert caught.value.index == 1
    assert ledger.get(other) is None
    assert ledger.get(doomed) is not None


def test_transaction_mixes_put_delete_and_check(ledger: Ledger) -> None:
    lease = Key(Kind.LEASE, "database/creds/app/1")
    revocation = Key(Kind.REVOCATION, "database/creds/app/1")
    seal = Key(Kind.SEAL, "config")
    ledger.put_if(lease, b"lease", 0)
    ledger.put_if(seal, b"cfg", 0)
    results = ledger.transact([Delete(lease, 1), Put(revocation, b"revoked", 0), Check(seal, 1)])
    assert results[0] is None and results[2] is None
    assert results[1] == Item(revocation, b"revoked", 1, None)
    assert ledger.get(lease) is None
    assert ledger.get(revocation) is not None


# --- scans ----------------------------------------------------------------------------


def test_scan_pages_through_a_prefix_in_path_order(ledger: Ledger) -> None:
    inside = [f"secret/team-a/{n:03d}" for n in range(23)]
    outside = ["secret/team-", "secret/team-b/001", "secret/team-a", "other/team-a/001"]
    for path in inside + outside:
        ledger.put_if(Key(Kind.SECRET_META, path), b"x", 0)
    ledger.put_if(Key(Kind.LEASE, "secret/team-a/000"), b"not a secret", 0)

    pages = []
    cursor = None
    while True:
        page = ledger.scan(Kind.SECRET_META, "secret/team-a/", limit=10, cursor=cursor)
        assert len(page.items) <= 10
        pages.append([item.key.path for item in page.items])
        if page.cursor is None:
            break
        cursor = page.cursor
    assert [p for page in pages for p in page] == inside
    assert len(pages) >= 3


def test_scan_of_an_empty_prefix_lists_the_whole_kind(ledger: Ledger) -> None:
    for n in range(5):
        ledger.put_if(Key(Kind.TOKEN, f"t{n}"), b"x", 0)
    assert [i.key.path for i in iter_prefix(ledger, Kind.TOKEN, page_size=2)] == [f"t{n}" for n in range(5)]
    assert list(iter_prefix(ledger, Kind.LEASE)) == []


def test_scan_orders_paths_bytewise_on_utf8(ledger: Ledger) -> None:
    paths = ["k/Z", "k/a", "k/é", "k/日本", "k/😀", "k/~"]
    for path in paths:
        ledger.put_if(Key(Kind.SECRET_META, path), b"x", 0)
    found = [i.key.path for i in iter_prefix(ledger, Kind.SECRET_META, "k/", page_size=2)]
    assert found == sorted(paths, key=lambda p: p.encode())


def test_scan_with_a_non_ascii_prefix(ledger: Ledger) -> None:
    for path in ["é/1", "é/2", "éa/1", "e/1"]:
        ledger.put_if(Key(Kind.SECRET_META, path), b"x", 0)
    found = [i.key.path for i in iter_prefix(ledger, Kind.SECRET_META, "é/")]
    assert found == ["é/1", "é/2"]


# --- expiry -------------------------------------------------------------------------------


def test_expired_item_is_absent_everywhere(ledger: Ledger) -> None:
    lease = Key(Kind.LEASE, "database/creds/app/old")
    ledger.put_if(lease, b"lease", 0, expires_at=now() - 5)
    assert ledger.get(lease) is None
    assert list(iter_prefix(ledger, Kind.LEASE)) == []
    with pytest.raises(ConflictError):
        ledger.put_if(lease, b"renewed", 1)
    assert ledger.put_if(lease, b"new lease", 0).version == 1


def test_unexpired_item_carries_its_expiry(ledger: Ledger) -> None:
    lease = Key(Kind.LEASE, "database/creds/app/live")
    expiry = now() + 3600
    ledger.put_if(lease, b"lease", 0, expires_at=expiry)
    assert ledger.get(lease) == Item(lease, b"lease", 1, expiry)
    assert [i.expires_at for i in iter_prefix(ledger, Kind.LEASE)] == [expiry]


# --- bad input: a clear error, and nothing written ------------------------------------------

BAD_PATHS = [
    ("", "must not be empty"),
    ("a" * (MAX_PATH_BYTES + 1), "at most 1024 bytes"),
    ("é" * (MAX_PATH_BYTES // 2 + 1), "at most 1024 bytes"),
    ("secret/\x00nul", "U+0000"),
    ("secret/line\nbreak", "U+000A"),
    ("secret/\x7f", "U+007F"),
    ("secret/\U0010ffff", "U+10FFFF"),
    ("secret/\ud800", "U+D800"),
    ("secret/\u200b", "U+200B"),
]


@pytest.mark.parametrize(("path", "message"), BAD_PATHS, ids=[m for _, m in BAD_PATHS])
def test_bad_path_is_refused_before_anything_is_written(ledger: Ledger, path: str, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=re.escape(message)):
        ledger.put_if(Key(Kind.SECRET_META, path), b"x", 0)
    with pytest.raises(InvalidKeyError):
        ledger.get(Key(Kind.SECRET_META, path))
    with pytest.raises(InvalidKeyError):
        ledger.transact([Put(Key(Kind.TOKEN, "fine"), b"x", 0), Put(Key(Kind.SECRET_META, path), b"x", 0)])
    assert all_items(ledger) == []


def test_longest_allowed_path_is_accepted(ledger: Ledger) -> None:
    key = Key(Kind.SECRET_META, "p" * MAX_PATH_BYTES)
    ledger.put_if(key, b"x", 0)
    assert ledger.get(key) is not None


WRONG_TYPES: list[tuple[Any, Any, Any, Any, type[Exception]]] = [
    ("secret/app", b"x", 0, None, InvalidKeyError),  # a str, not a Key
    (Key("secret-meta", "a"), b"x", 0, None, InvalidKeyError),  # type: ignore[arg-type]
    (Key(Kind.SECRET_META, 42), b"x", 0, None, InvalidKeyError),  # type: ignore[arg-type]
    (SECRET, "text", 0, None, InvalidItemError),
    (SECRET, bytearray(b"x"), 0, None, InvalidItemError),
    (SECRET, b"x", "0", None, InvalidItemError),
    (SECRET, b"x", True, None, InvalidItemError),
    (SECRET, b"x", -1, None, InvalidItemError),
    (SECRET, b"x", 0, "tomorrow", InvalidItemError),
    (SECRET, b"x", 0, 1.5, InvalidItemError),
    (SECRET, b"x", 0, -1, InvalidItemError),
]


@pytest.mark.parametrize(("key", "value", "version", "expires", "error"), WRONG_TYPES)
def test_wrong_types_are_refused(
    ledger: Ledger, key: Any, value: Any, version: Any, expires: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ledger.put_if(key, value, version, expires_at=expires)
    assert all_items(ledger) == []


def test_item_at_the_size_limit_is_accepted_and_one_byte_more_is_refused(ledger: Ledger) -> None:
    overhead = item_size(SECRET, b"", None)
    ledger.put_if(SECRET, b"\xab" * (MAX_ITEM_BYTES - overhead), 0)
    assert len(ledger.get(SECRET).value) == MAX_ITEM_BYTES - overhead  # type: ignore[union-attr]
    with pytest.raises(InvalidItemError, match="the limit is 400000"):
        ledger.put_if(SECRET, b"\xab" * (MAX_ITEM_BYTES - overhead + 1), 1)
    assert ledger.get(SECRET).version == 1  # type: ignore[union-attr]


def test_oversized_put_in_a_transaction_writes_nothing(ledger: Ledger) -> None:
    small = Key(Kind.SECRET_META, "secret/app")
    with pytest.raises(InvalidItemError):
        ledger.transact([Put(small, b"meta", 0), Put(SECRET, b"x" * MAX_ITEM_BYTES, 0)])
    assert all_items(ledger) == []


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([], "at least one"),
        ([Put(SECRET, b"a", 0), Put(SECRET, b"b", 0)], "appears twice"),
        ([Put(Key(Kind.TOKEN, f"t{n}"), b"x", 0) for n in range(MAX_TRANSACTION_ITEMS + 1)], "at most 100"),
        ([Delete(SECRET, 0)], "requires the version"),
        (["put secret"], "use Put, Delete or Check"),
        (b"bytes", "a sequence"),
    ],
    ids=["empty", "duplicate-key", "too-many", "delete-absent", "not-an-op", "not-a-sequence"],
)
def test_malformed_transaction_is_refused_and_writes_nothing(ledger: Ledger, ops: Any, message: str) -> None:
    with pytest.raises(InvalidItemError, match=message):
        ledger.transact(ops)
    assert all_items(ledger) == []


def test_bad_scan_arguments_are_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidKeyError):
        ledger.scan("secret-meta")  # type: ignore[arg-type]
    with pytest.raises(InvalidItemError):
        ledger.scan(Kind.SECRET_META, limit=0)
    with pytest.raises(InvalidItemError):
        ledger.scan(Kind.SECRET_META, limit=100_000)
    with pytest.raises(InvalidItemError, match="another scan"):
        ledger.scan(Kind.SECRET_META, "a/", cursor="b/1")


def test_a_second_handle_sees_committed_writes(make_ledger: Any) -> None:
    first, second = make_ledger(), make_ledger()
    first.put_if(SECRET, b"v1", 0)
    assert second.get(SECRET, consistent=True).value == b"v1"
    with pytest.raises(ConflictError):
        second.put_if(SECRET, b"v1'", 0)

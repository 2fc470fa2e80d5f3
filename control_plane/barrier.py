"""The barrier: every byte a cell stores passes through here, encrypted.

The barrier is itself a `Ledger`: engines read and write plaintext through it and
never see ciphertext, while the ledger underneath only ever holds ciphertext. Each
value is sealed with AES-256-GCM under the keyring's active *term* key, with the
item's ledger key (`kind:path`) and the ledger version it is written at as associated
data: a ciphertext copied to another key fails to decrypt, and so does an older
ciphertext of the same key put back by whoever can write the ledger (the conditional-
write ledger gives every write the version expected + 1, so the barrier knows it before
the write). The blob records its term, so rotating the term (`rotate`) is online: new
writes use the new term, old values stay readable.

Blobs of format 1 (before issue 20) bind the ledger key only. A cell made then keeps
reading them until `migrate` (run by the seal each time it opens the barrier; a no-op
once done) has rewritten every one in format 2, page by page with compare-and-set, and
marked the keyring (`min_format` 2); from then on, as in every cell made since, a
format-1 blob is refused. Every process of a cell must run code that knows format 2.
Not covered by the binding: an item deleted (or expired) and then created again starts
at version 1, so its version-1 ciphertext of before the delete could be put back; and
one who rewrites both the value and the version of a row can roll the pair back.

The keyring (every term key) is stored in the ledger encrypted under the cell's root
key; the root key exists only in memory while the cell is unsealed and is rebuilt
from Shamir shares or unwrapped by the HSM (see `seal`). Two items stay outside the
barrier because they are what opens it: the seal configuration and the encrypted
keyring (kinds SEAL and KEYRING); the barrier refuses to write them.

Another process may rotate the term; a blob under a term this process does not
know triggers one reload of the keyring from the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane.ledger import (
    MAX_TRANSACTION_BYTES,
    MAX_TRANSACTION_ITEMS,
    ConflictError,
    InvalidItemError,
    Item,
    Key,
    Kind,
    Ledger,
    LedgerError,
    Op,
    Page,
    Put,
    item_size,
    validate_key,
    validate_ops,
)

log = logging.getLogger("keycell.barrier")

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# format byte + term (u32) + nonce: what the barrier adds in front of each value.
_HEADER = struct.Struct(">BI")
_FORMAT_KEY_ONLY = 1  # associated data: the ledger key (cells made before issue 20)
_FORMAT = 2  # associated data: the ledger key and the item's ledger version
_VERSION = struct.Struct(">Q")
OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES

KEYRING_KEY = Key(Kind.KEYRING, "current")
# How many recently decrypted items the barrier remembers (see `Barrier.get`).
RECENT_ITEMS = 4096
_KEYRING_AAD = b"keycell:keyring"
# Kinds that open the barrier; they are stored beside it, not through it.
OUTSIDE_BARRIER = frozenset({Kind.SEAL, Kind.KEYRING})


class BarrierError(LedgerError):
    """Base of the barrier's own errors."""


class SealedError(BarrierError):
    """The cell is sealed: nothing can be read or written until it is unsealed."""

    def __init__(self) -> None:
        super().__init__("the cell is sealed; unseal it with a quorum of key shares (or its HSM)")


class BarrierIntegrityError(BarrierError):
    """A stored value failed authentication: altered, truncated, or moved from another key."""


class ReservedKindError(BarrierError, ValueError):
    """SEAL and KEYRING items open the barrier and are written only by the seal."""


def zeroize(buffer: bytearray) -> None:
    """Overwrite a key buffer in place (a best effort in Python: the bytes objects a
    library made from it are beyond reach, which is why keys stay in bytearrays). One
    same-length slice assignment: copied over the buffer's own storage, in C (a loop of
    item assignments took two of them per KV write's data key)."""
    buffer[:] = bytes(len(buffer))


@dataclass
class Term:
    number: int
    key: bytearray
    created_at: int


class Keyring:
    """The barrier's term keys. Serialized only to be encrypted by the root key."""

    def __init__(self, terms: list[Term], *, min_format: int = _FORMAT_KEY_ONLY) -> None:
        if not terms:
            raise ValueError("a keyring has at least one term")
        self._terms = {t.number: t for t in terms}
        self.active = max(self._terms)
        # The oldest blob format the barrier reads: 1 until `Barrier.migrate` is done.
        self.min_format = min_format

    @classmethod
    def generate(cls) -> Keyring:
        return cls([Term(1, bytearray(os.urandom(KEY_BYTES)), int(time.time()))], min_format=_FORMAT)

    def term(self, number: int) -> Term | None:
        return self._terms.get(number)

    @property
    def terms(self) -> list[int]:
        return sorted(self._terms)

    def rotated(self) -> Keyring:
        """A new keyring with one more term, active; this one is unchanged."""
        fresh = Term(self.active + 1, bytearray(os.urandom(KEY_BYTES)), int(time.time()))
        copies = [Term(t.number, bytearray(t.key), t.created_at) for t in self._terms.values()]
        return Keyring([*copies, fresh], min_format=self.min_format)

    def to_bytes(self) -> bytearray:
        body = {
            "active": self.active,
            "min_format": self.min_format,
            "terms": [
                {"term": t.number, "key": t.key.hex(), "created_at": t.created_at}
                for t in sorted(self._terms.values(), key=lambda t: t.number)
            ],
        }
        return bytearray(json.dumps(body).encode())

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray) -> Keyring:
        body = json.loads(bytes(raw))
        keyring = cls(
            [Term(int(t["term"]), bytearray.fromhex(t["key"]), int(t["created_at"])) for t in body["terms"]],
            min_format=int(body.get("min_format", _FORMAT_KEY_ONLY)),
        )
        keyring.active = int(body["active"])
        return keyring

    def zeroize(self) -> None:
        for t in self._terms.values():
            zeroize(t.key)
        self._terms.clear()


def encrypt_keyring(root_key: bytes | bytearray, keyring: Keyring) -> bytes:
    plain = keyring.to_bytes()
    try:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(bytes(root_key)).encrypt(nonce, bytes(plain), _KEYRING_AAD)
    finally:
        zeroize(plain)


def decrypt_keyring(root_key: bytes | bytearray, blob: bytes) -> Keyring:
    """Raises BarrierIntegrityError when `root_key` is not the key that sealed it:
    this is how a wrong combination of unseal shares is detected."""
    try:
        plain = bytearray(
            AESGCM(bytes(root_key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _KEYRING_AAD)
        )
    except (InvalidTag, ValueError):
        raise BarrierIntegrityError("the keyring does not decrypt with this root key") from None
    try:
        return Keyring.from_bytes(plain)
    finally:
        zeroize(plain)


def _aad(key: Key, version: int) -> bytes:
    # Ledger paths are printable, so the NUL cannot occur in the key part.
    return str(key).encode() + b"\x00" + _VERSION.pack(version)


def _next_version(expected_version: int) -> int:
    """The version a write at `expected_version` lands at (the ledger's contract)."""
    if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 0:
        raise InvalidItemError("an expected version is a non-negative integer (0: absent)")
    return expected_version + 1


class Barrier:
    """A `Ledger` that encrypts on the way in and decrypts on the way out."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.RLock()
        self._root: bytearray | None = None
        self._keyring: Keyring | None = None
        self._on_seal: list[Callable[[], None]] = []
        self._recent: dict[Key, tuple[int, bytes, bytes]] = {}  # key -> (version, ciphertext, plaintext)

    def on_seal(self, hook: Callable[[], None]) -> None:
        """Run `hook` whenever the barrier seals (e.g. to zeroize a data key cache)."""
        self._on_seal.append(hook)

    # --- seal state -----------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        return self._keyring is None

    def open(self, root_key: bytes | bytearray, keyring: Keyring) -> None:
        """Called by the seal once the root key is known and the keyring decrypted."""
        with self._lock:
            self.close_barrier()
            self._root = bytearray(root_key)
            self._keyring = keyring

    def replace_root(self, root_key: bytes | bytearray) -> None:
        """After a rekey: the keyring is now stored under `root_key`."""
        with self._lock:
            self._require_keyring()
            if self._root is not None:
                zeroize(self._root)
            self._root = bytearray(root_key)

    def close_barrier(self) -> None:
        """Seal: forget the root key and every term key, overwriting them."""
        with self._lock:
            if self._root is not None:
                zeroize(self._root)
            if self._keyring is not None:
                self._keyring.zeroize()
            self._root = None
            self._keyring = None
            self._recent.clear()
            for hook in self._on_seal:
                hook()

    def _require_keyring(self) -> Keyring:
        keyring = self._keyring
        if keyring is None:
            raise SealedError()
        return keyring

    @property
    def active_term(self) -> int:
        return self._require_keyring().active

    def rotate(self) -> int:
        """Add a new term and make it active, online: old terms stay readable. The
        encrypted keyring is replaced by compare-and-set, so two rotations never lose
        a term."""
        with self._lock:
            self._require_keyring()
            assert self._root is not None
            while True:
                stored = self.ledger.get(KEYRING_KEY, consistent=True)
                if stored is None:
                    raise BarrierError("the keyring is missing from the ledger; the cell is not initialized")
                current = decrypt_keyring(self._root, stored.value)
                rotated = current.rotated()
                current.zeroize()
                try:
                    self.ledger.put_if(KEYRING_KEY, encrypt_keyring(self._root, rotated), stored.version)
                except ConflictError:
                    rotated.zeroize()
                    continue
                if self._keyring is not None:
                    self._keyring.zeroize()
                self._keyring = rotated
                return rotated.active

    def _reload(self) -> Keyring:
        with self._lock:
            self._require_keyring()
            assert self._root is not None
            stored = self.ledger.get(KEYRING_KEY, consistent=True)
            if stored is None:
                raise BarrierError("the keyring is missing from the ledger")
            fresh = decrypt_keyring(self._root, stored.value)
            if self._keyring is not None:
                self._keyring.zeroize()
            self._keyring = fresh
            return fresh

    # --- value encryption ------------------------------------------------------------------

    def encrypt(self, key: Key, plaintext: bytes, version: int) -> bytes:
        """The blob for `key` written at ledger `version` (the write's expected version + 1)."""
        keyring = self._require_keyring()
        term = keyring.term(keyring.active)
        if term is None:  # sealed concurrently
            raise SealedError()
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(bytes(term.key)).encrypt(nonce, plaintext, _aad(key, version))
        return _HEADER.pack(_FORMAT, term.number) + nonce + sealed

    def decrypt(self, key: Key, blob: bytes, version: int, *, recheck: bool = True) -> bytes:
        """The plaintext of `blob`, stored for `key` at ledger `version`. `recheck`: before
        reading a format-1 blob, reload the keyring in case the migration is done."""
        keyring = self._require_keyring()
        if len(blob) < OVERHEAD:
            raise BarrierIntegrityError(f"the stored value of {key} is truncated")
        fmt, number = _HEADER.unpack_from(blob)
        if fmt == _FORMAT_KEY_ONLY and keyring.min_format <= _FORMAT_KEY_ONLY and recheck:
            # Another process may have finished the migration since this one loaded it.
            keyring = self._reload()
        if fmt == _FORMAT_KEY_ONLY and keyring.min_format > _FORMAT_KEY_ONLY:
            raise BarrierIntegrityError(
                f"the stored value of {key} is in the old format without its version, which this "
                "cell no longer reads (put back from before the migration?)"
            )
        if fmt not in (_FORMAT, _FORMAT_KEY_ONLY):
            raise BarrierIntegrityError(f"the stored value of {key} has an unknown format")
        aad = _aad(key, version) if fmt == _FORMAT else str(key).encode()
        term = keyring.term(number)
        if term is None and number > keyring.active:
            term = self._reload().term(number)  # another process rotated
        if term is None:
            raise BarrierIntegrityError(
                f"the stored value of {key} names term {number}, which this keyring lacks"
            )
        body = blob[_HEADER.size :]
        try:
            return AESGCM(bytes(term.key)).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
        except InvalidTag:
            raise BarrierIntegrityError(
                f"the stored value of {key} failed authentication (altered, moved from another key, "
                "or an older value put back)"
            ) from None

    # --- migration from format 1 -------------------------------------------------------------

    def migrate(self, *, page_size: int = 200) -> int:
        """Rewrite every format-1 blob in format 2, then mark the keyring so that format 1
        is refused; how many items were rewritten. A no-op (no ledger read) once done.
        Safe beside other writers and other processes migrating: each rewrite is a
        compare-and-set at the version read, and a lost race means the item was written
        meanwhile, in format 2."""
        if self._require_keyring().min_format >= _FORMAT:
            return 0
        rewritten = 0
        for kind in Kind:
            if kind in OUTSIDE_BARRIER:
                continue
            cursor: str | None = None
            while True:
                page = self.ledger.scan(kind, "", limit=page_size, cursor=cursor)
                batch: list[Put] = []
                for item in page.items:
                    if item.value[:1] != bytes([_FORMAT_KEY_ONLY]):
                        continue
                    try:
                        plain = self.decrypt(item.key, item.value, item.version, recheck=False)
                    except BarrierIntegrityError:
                        # Unreadable before the migration too; left for the operator.
                        log.warning("barrier migration: %s does not decrypt; left as it is", item.key)
                        continue
                    blob = self.encrypt(item.key, plain, item.version + 1)
                    batch.append(Put(item.key, blob, item.version, item.expires_at))
                rewritten += self._rewrite(batch)
                cursor = page.cursor
                if cursor is None:
                    break
        self._mark_migrated()
        return rewritten

    def _rewrite(self, puts: list[Put]) -> int:
        """Write `puts` (each conditional on the version read), one transaction per chunk
        (one commit, not one per item); a chunk with an item written meanwhile (so in
        format 2 already) is retried item by item. How many were written."""
        written = 0
        start = 0
        while start < len(puts):
            chunk: list[Put] = []
            size = 0
            for put in puts[start:]:
                cost = item_size(put.key, put.value, put.expires_at)
                if chunk and (
                    len(chunk) == MAX_TRANSACTION_ITEMS or size + cost > MAX_TRANSACTION_BYTES // 2
                ):
                    break
                chunk.append(put)
                size += cost
            start += len(chunk)
            try:
                self.ledger.transact(chunk)
                written += len(chunk)
            except ConflictError:
                for one in chunk:
                    with contextlib.suppress(ConflictError):
                        self.ledger.put_if(
                            one.key, one.value, one.expected_version, expires_at=one.expires_at
                        )
                        written += 1
        return written

    def _mark_migrated(self) -> None:
        with self._lock:
            self._require_keyring()
            assert self._root is not None
            while True:
                stored = self.ledger.get(KEYRING_KEY, consistent=True)
                if stored is None:
                    raise BarrierError("the keyring is missing from the ledger")
                current = decrypt_keyring(self._root, stored.value)
                if current.min_format < _FORMAT:
                    current.min_format = _FORMAT
                    try:
                        self.ledger.put_if(KEYRING_KEY, encrypt_keyring(self._root, current), stored.version)
                    except ConflictError:
                        current.zeroize()
                        continue  # rotated meanwhile: mark the rotated keyring
                if self._keyring is not None:
                    self._keyring.zeroize()
                self._keyring = current
                return

    # --- the Ledger protocol, in plaintext ------------------------------------------------------

    def get(self, key: Key, *, consistent: bool = True) -> Item | None:
        self._check_kind(key)
        self._require_keyring()
        item = self.ledger.get(key, consistent=consistent)  # validates the key
        if item is None:
            return None
        # Hot items (a token record, a secret's metadata) are read far more often than
        # written: the same stored ciphertext decrypts to the same plaintext, so a
        # small cache keyed by it skips AES-GCM. Cleared on seal.
        cached = self._recent.get(key)
        if cached is not None and cached[0] == item.version and cached[1] == item.value:
            return Item(key, cached[2], item.version, item.expires_at)
        plain = self.decrypt(key, item.value, item.version)
        if len(self._recent) >= RECENT_ITEMS:
            # Drop the oldest; another thread may be doing the same.
            with contextlib.suppress(StopIteration, RuntimeError, KeyError):
                self._recent.pop(next(iter(self._recent)))
        self._recent[key] = (item.version, item.value, plain)
        return Item(key, plain, item.version, item.expires_at)

    def put_if(self, key: Key, value: bytes, expected_version: int, *, expires_at: int | None = None) -> Item:
        self._check_kind(validate_key(key))
        if not isinstance(value, bytes):
            raise InvalidItemError(f"a ledger value must be bytes, not {type(value).__name__}")
        blob = self.encrypt(key, value, _next_version(expected_version))
        stored = self.ledger.put_if(key, blob, expected_version, expires_at=expires_at)
        return Item(key, value, stored.version, stored.expires_at)

    def delete_if(self, key: Key, expected_version: int) -> None:
        self._check_kind(validate_key(key))
        self._require_keyring()
        self.ledger.delete_if(key, expected_version)

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        checked = validate_ops(ops)
        for op in checked:
            self._check_kind(op.key)
        self._require_keyring()
        sealed_ops: list[Op] = [
            Put(
                op.key,
                self.encrypt(op.key, op.value, _next_version(op.expected_version)),
                op.expected_version,
                op.expires_at,
            )
            if isinstance(op, Put)
            else op
            for op in checked
        ]
        results = self.ledger.transact(sealed_ops)
        return [
            Item(r.key, op.value, r.version, r.expires_at) if r is not None and isinstance(op, Put) else None
            for op, r in zip(checked, results, strict=True)
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
        if isinstance(kind, Kind):
            self._check_kind(Key(kind, "-"))
        self._require_keyring()
        page = self.ledger.scan(kind, prefix, limit=limit, cursor=cursor, consistent=consistent)
        return Page(
            [
                Item(i.key, self.decrypt(i.key, i.value, i.version), i.version, i.expires_at)
                for i in page.items
            ],
            page.cursor,
        )

    def close(self) -> None:
        self.close_barrier()

    @staticmethod
    def _check_kind(key: Key) -> None:
        if not isinstance(key, Key):
            validate_key(key)  # raises the ledger's own error for a malformed key
        if key.kind in OUTSIDE_BARRIER:
            raise ReservedKindError(
                f"{key.kind.value} items are written by the seal, not through the barrier"
            )

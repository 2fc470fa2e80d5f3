"""Envelope encryption of secret values.

Each secret version gets its own 256-bit data key. The value is sealed with
AES-256-GCM under that data key; the data key is wrapped by the cell's
key-encryption key inside its `KeyBackend` (the HSM), never stored in the clear.
The same data key can also be wrapped for other cells' KEKs (through an
encrypt-only grant on their backend), so a replica moves between cells as
ciphertext plus per-cell wrapped keys: no plaintext and no key material crosses.

Unwrapping costs an HSM round trip, so `DataKeyCache` keeps recently unwrapped
data keys for a short time, bounded in count; every key leaving it is overwritten.
The cache is cleared (and zeroized) when the barrier seals.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane.barrier import KEY_BYTES, NONCE_BYTES, zeroize
from keycell.control_plane.keys import IntegrityError, KeyBackend

_FORMAT = 1


class EnvelopeError(IntegrityError):
    """An envelope is malformed, or has no data key wrapped for this cell."""


@dataclass(frozen=True)
class Envelope:
    kek: str  # the KEK's name, the same in every cell
    wrapped_keys: dict[str, bytes] = field(repr=False)  # cell id -> wrapped data key
    ciphertext: bytes = field(repr=False)  # nonce + AES-256-GCM(value)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "v": _FORMAT,
                "kek": self.kek,
                "keys": {cell: base64.b64encode(k).decode() for cell, k in sorted(self.wrapped_keys.items())},
                "ct": base64.b64encode(self.ciphertext).decode(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        try:
            body = json.loads(raw)
            if body["v"] != _FORMAT:
                raise EnvelopeError(f"unknown envelope format {body['v']!r}")
            return cls(
                str(body["kek"]),
                {str(cell): base64.b64decode(k, validate=True) for cell, k in body["keys"].items()},
                base64.b64decode(body["ct"], validate=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"malformed envelope: {type(exc).__name__}") from None


class DataKeyCache:
    """A bounded, short-lived map from a wrapped data key to its unwrapped bytes."""

    def __init__(
        self,
        *,
        max_entries: int = 1024,
        ttl_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError("a data key cache holds at least one key for a positive time")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytearray]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _slot(wrapped: bytes) -> bytes:
        return hashlib.sha256(wrapped).digest()

    def get(self, wrapped: bytes) -> bytes | None:
        slot = self._slot(wrapped)
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return None
            expires, key = entry
            if self._clock() >= expires:
                del self._entries[slot]
                zeroize(key)
                return None
            self._entries.move_to_end(slot)
            return bytes(key)

    def put(self, wrapped: bytes, key: bytes | bytearray) -> None:
        slot = self._slot(wrapped)
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                zeroize(old[1])
            self._entries[slot] = (self._clock() + self.ttl_seconds, bytearray(key))
            while len(self._entries) > self.max_entries:
                _, (_, evicted) = self._entries.popitem(last=False)
                zeroize(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            for _, key in self._entries.values():
                zeroize(key)
            self._entries.clear()


@dataclass(frozen=True)
class Recipient:
    """Another cell this envelope should open in: its id and its KEK's backend (an
    encrypt-only grant is enough: only `wrap` is called)."""

    cell: str
    backend: KeyBackend


class Envelopes:
    """Seal and open values for one cell."""

    def __init__(self, cell: str, backend: KeyBackend, kek: str, cache: DataKeyCache | None = None) -> None:
        self.cell = cell
        self.backend = backend
        self.kek = kek
        self.cache = cache if cache is not None else DataKeyCache()

    def seal(self, plaintext: bytes, aad: bytes, *, recipients: tuple[Recipient, ...] = ()) -> Envelope:
        data_key = bytearray(os.urandom(KEY_BYTES))
        try:
            nonce = os.urandom(NONCE_BYTES)
            ciphertext = nonce + AESGCM(bytes(data_key)).encrypt(nonce, plaintext, aad)
            wrapped = {self.cell: self.backend.wrap(self.kek, bytes(data_key), aad)}
            for recipient in recipients:
                wrapped[recipient.cell] = recipient.backend.wrap(self.kek, bytes(data_key), aad)
            self.cache.put(wrapped[self.cell], data_key)
            return Envelope(self.kek, wrapped, ciphertext)
        finally:
            zeroize(data_key)

    def _data_key(self, envelope: Envelope, aad: bytes) -> bytes:
        """This cell's data key for `envelope`: from the cache, or unwrapped by the HSM."""
        wrapped = envelope.wrapped_keys.get(self.cell)
        if wrapped is None:
            raise EnvelopeError(f"this value has no data key wrapped for cell {self.cell!r}")
        key = self.cache.get(wrapped)
        if key is None:
            key = self.backend.unwrap(envelope.kek, wrapped, aad)
            self.cache.put(wrapped, key)
        return key

    def open(self, envelope: Envelope, aad: bytes) -> bytes:
        key = self._data_key(envelope, aad)
        ct = envelope.ciphertext
        try:
            return AESGCM(key).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                "the sealed value failed authentication (altered, or another secret's)"
            ) from None

    def add_recipient(self, envelope: Envelope, aad: bytes, recipient: Recipient) -> Envelope:
        """Wrap this envelope's data key for one more cell, without touching the value."""
        key = self._data_key(envelope, aad)
        keys = dict(envelope.wrapped_keys)
        keys[recipient.cell] = recipient.backend.wrap(envelope.kek, key, aad)
        return Envelope(envelope.kek, keys, envelope.ciphertext)

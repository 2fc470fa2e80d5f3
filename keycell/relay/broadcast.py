"""What a relay spreads: the retransmit-limited rumour queue (memberlist's
TransmitLimitedQueue) and the store of revocation entries with its digest.

Entries are a grow-only map (key -> Entry): `r/<id>` for a revocation, `a/<id>/<cell>`
for a cell's receipt, from which an entry leaves only once it has expired (the relay
drops an expired entry by a rule every relay applies alike, and refuses it after, so
the map stays grow-only among the live entries). The digest for push-pull
anti-entropy is per bucket: each bucket's hash is the XOR of its keys' 64-bit hashes,
so adding or removing an entry updates it in O(1) and two relays find the buckets
they disagree on from 64 numbers.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

BUCKETS = 64


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def bucket_of(key: str) -> int:
    return key_hash(key) % BUCKETS


class EntryStore:
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.digest = [0] * BUCKETS
        self._keys: list[set[str]] = [set() for _ in range(BUCKETS)]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: str, entry: Any) -> bool:
        if key in self.entries:
            return False
        self.entries[key] = entry
        h = key_hash(key)
        self.digest[h % BUCKETS] ^= h
        self._keys[h % BUCKETS].add(key)
        return True

    def remove(self, key: str) -> Any | None:
        """Drop `key` (XOR its hash out of its bucket's digest); the entry, or None."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        h = key_hash(key)
        self.digest[h % BUCKETS] ^= h
        self._keys[h % BUCKETS].discard(key)
        return entry

    def differing(self, theirs: Iterable[int]) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.digest, theirs, strict=False)) if a != b]

    def keys_in(self, buckets: Iterable[int]) -> list[str]:
        out: list[str] = []
        for b in buckets:
            if 0 <= b < BUCKETS:
                out.extend(self._keys[b])
        return out


@dataclass
class _Queued:
    key: str
    rumor: Any
    transmits: int = 0
    lazy: bool = False
    cap: int = 0  # at most this many sends (0: the caller's limit)


class RumorQueue:
    """Rumours waiting to be piggybacked. Each goes out at most `limit` times, least
    sent first; a newer rumour about the same key (a member's name) replaces the
    older one, as memberlist invalidates broadcasts about the same node. A rumour put
    with `sent=k` was already pushed k times (the eager push counts against the
    limit). A `lazy` rumour (a cell's receipt) only rides along: it never makes the
    gossip loop send a message of its own."""

    def __init__(self) -> None:
        self._items: dict[str, _Queued] = {}
        self._hot = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def hot(self) -> bool:
        return self._hot > 0

    def hot_keys(self) -> list[str]:
        return [q.key for q in self._items.values() if not q.lazy] if self._hot else []

    def retire(self, key: str) -> None:
        """Stop sending `key` (every peer it would go to is known to hold it)."""
        self._remove(key)

    def put(self, key: str, rumor: Any, *, sent: int = 0, lazy: bool = False, cap: int = 0) -> None:
        """`cap`: send it at most this many times, below the limit `take` is given."""
        self._remove(key)
        self._items[key] = _Queued(key, rumor, sent, lazy, cap)
        self._hot += not lazy

    def _remove(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None and not old.lazy:
            self._hot -= 1

    def take(
        self,
        count: int,
        limit: int,
        keys: list[str] | None = None,
        held: Callable[[str], bool] | None = None,
    ) -> list[Any]:
        """Up to `count` rumours, least sent first, leaving out those `held(key)` says
        the addressee holds already; `keys` (if given) gets their keys."""
        if not self._items:
            return []
        waiting = (
            self._items.values() if held is None else [q for q in self._items.values() if not held(q.key)]
        )
        # (nsmallest: sorted(...)[:count] without sorting every waiting rumour)
        chosen = heapq.nsmallest(count, waiting, key=lambda q: (q.lazy, q.transmits))
        out = []
        for q in chosen:
            q.transmits += 1
            out.append(q.rumor)
            if keys is not None:
                keys.append(q.key)
            if q.transmits >= limit or (q.cap and q.transmits >= q.cap):
                self._remove(q.key)
        return out

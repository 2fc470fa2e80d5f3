"""Revocation freshness (issue 18): per peer cell, a watermark — the time up to which
this cell provably holds every revocation minted at that peer.

The maths. Each cell numbers the revocations it mints 1, 2, 3, … (`seq`) and stamps
each with a minting time; both come from one counter item in the minting cell's ledger
(`mint/<cell>`), advanced by compare-and-set in the same transaction as the
revocation itself, and the stamp is `max(clock, previous stamp + EPSILON)`. So, per
cell, stamps strictly increase with seq (I1), and there are no holes: a seq exists
iff its revocation was committed (I2).

A receiving cell writes a marker `seq/<origin>/<seq>` (holding the stamp) in the same
transaction as each revocation it applies, whatever path brought it. Let H be the
highest seq such that markers 1..H are all held, and t_H the stamp of H. Every
revocation of that origin with seq <= H is held; every one with seq > H was stamped
after t_H (I1). Hence every revocation minted at or before t_H is held: t_H is a
sound watermark.

A heartbeat `(S, t)` from the origin says "my counter was at S at time t". The origin
makes it by a compare-and-set of the counter that keeps S and raises its stamp to t,
so any later mint is stamped > t (I1 again), and any mint racing the heartbeat loses
its compare-and-set and retries with the new stamp. So everything minted at or before
t has seq <= S. If S <= H, everything minted at or before t is held: the watermark is
max(t_H, t). A heartbeat with S > H proves nothing yet (it waits for the missing
seqs); it is kept and counts once they arrive.

Staleness of a peer is `now - watermark` on this cell's clock: clock skew between the
cells adds to (or hides) at most the skew, which NTP keeps to milliseconds; a peer
never heard from has no watermark and counts as infinitely stale.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keycell.control_plane.errors import InvalidRequest, Unavailable
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, Put
from keycell.control_plane.storage import encode_json, get_json, put_json_if

EPSILON = 1e-6  # stamps strictly increase with seq (I1), even within one clock tick
STALENESS_HEADER = "X-Keycell-Revocation-Staleness"


def mint_key(cell: str) -> Key:
    return Key(Kind.REVOCATION_CLOCK, f"mint/{cell}")


def seq_key(origin: str, seq: int) -> Key:
    return Key(Kind.REVOCATION_SEQ, f"{origin}/{seq:012d}")


def _heartbeat_key(origin: str) -> Key:
    return Key(Kind.REVOCATION_CLOCK, f"heartbeat/{origin}")


def _frontier_key(origin: str) -> Key:
    return Key(Kind.REVOCATION_CLOCK, f"frontier/{origin}")


@dataclass(frozen=True)
class Heartbeat:
    """Cell `cell` had minted exactly `seq` revocations up to time `at`."""

    cell: str
    seq: int
    at: float

    def as_json(self) -> dict[str, Any]:
        return {"cell": self.cell, "seq": self.seq, "at": self.at}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Heartbeat:
        return cls(str(value["cell"]), int(value["seq"]), float(value["at"]))


@dataclass(frozen=True)
class Watermark:
    peer: str
    watermark: float | None  # None: nothing proven yet
    contiguous_seq: int
    staleness: float  # seconds; math.inf without a watermark
    path: str  # the path that brought the latest proof ("" when none)

    def as_json(self) -> dict[str, Any]:
        return {
            "watermark": self.watermark,
            "staleness_seconds": None if math.isinf(self.staleness) else round(self.staleness, 6),
            "contiguous_seq": self.contiguous_seq,
            "path": self.path or None,
        }


class Mint:
    """This cell's side: the counter that numbers and stamps its revocations."""

    def __init__(self, ledger: Ledger, cell: str, clock: Callable[[], float] = time.time) -> None:
        self.ledger, self.cell, self.clock = ledger, cell, clock

    def read(self) -> tuple[int, float, int]:
        found = get_json(self.ledger, mint_key(self.cell))
        if found is None:
            return 0, 0.0, 0
        record, version = found
        return int(record["seq"]), float(record["at"]), version

    def next_put(self) -> tuple[int, float, Put]:
        """The next (seq, stamp) and the counter's compare-and-set, to commit in the
        same transaction as the revocation; a ConflictError means: read again."""
        seq, at, version = self.read()
        stamp = max(self.clock(), at + EPSILON)
        return seq + 1, stamp, Put(mint_key(self.cell), encode_json({"seq": seq + 1, "at": stamp}), version)

    def heartbeat(self) -> Heartbeat:
        """Raise the counter's stamp to now (see the module's maths) and say so."""
        while True:
            seq, at, version = self.read()
            stamp = max(self.clock(), at)
            try:
                put_json_if(self.ledger, mint_key(self.cell), {"seq": seq, "at": stamp}, version)
            except ConflictError:
                continue  # a mint or another heartbeat moved it: read again
            return Heartbeat(self.cell, seq, stamp)


def seq_marker(origin: str, seq: int, at: float, path: str, expires_at: int | None = None) -> Put:
    # Kept at least as long as the freshness frontier may need it; expiring with the
    # revocation would open holes below the frontier only after the frontier passed.
    return Put(seq_key(origin, seq), encode_json({"at": at, "path": path}), 0, expires_at)


class Freshness:
    """The receiving side: heartbeats kept, watermarks computed, per peer."""

    def __init__(self, ledger: Ledger, cell: str, clock: Callable[[], float] = time.time) -> None:
        self.ledger, self.cell, self.clock = ledger, cell, clock

    def note_heartbeat(self, hb: Heartbeat, path: str) -> bool:
        """Keep `hb` if it is newer than the one held; False if it is not (idempotent)."""
        if hb.cell == self.cell:
            return False
        while True:
            found = get_json(self.ledger, _heartbeat_key(hb.cell))
            version = 0 if found is None else found[1]
            if found is not None and float(found[0]["at"]) >= hb.at:
                return False
            try:
                put_json_if(self.ledger, _heartbeat_key(hb.cell), {**hb.as_json(), "path": path}, version)
            except ConflictError:
                continue
            return True

    def watermark(self, peer: str) -> Watermark:
        found = get_json(self.ledger, _frontier_key(peer))
        seq, at, path, version = 0, None, "", 0
        if found is not None:
            record, version = found
            seq, at, path = int(record["seq"]), float(record["at"]), str(record.get("path", ""))
        advanced = False
        while True:  # walk the contiguous prefix forward from the kept frontier
            marker = get_json(self.ledger, seq_key(peer, seq + 1))
            if marker is None:
                break
            seq, at, path, advanced = seq + 1, float(marker[0]["at"]), str(marker[0].get("path", "")), True
        if advanced:  # monotone: a racing writer that got further wins
            with contextlib.suppress(ConflictError):
                put_json_if(self.ledger, _frontier_key(peer), {"seq": seq, "at": at, "path": path}, version)
        heartbeat = get_json(self.ledger, _heartbeat_key(peer))
        if heartbeat is not None:
            hb = heartbeat[0]
            if int(hb["seq"]) <= seq and (at is None or float(hb["at"]) > at):
                at, path = float(hb["at"]), str(hb.get("path", ""))
        staleness = math.inf if at is None else max(0.0, self.clock() - at)
        return Watermark(peer, at, seq, staleness, path)

    def watermarks(self, peers: Iterable[str]) -> dict[str, Watermark]:
        return {p: self.watermark(p) for p in sorted(set(peers)) if p != self.cell}

    def stale_peers(self, peers: Iterable[str], bound: float) -> list[str]:
        return [p for p, w in self.watermarks(peers).items() if w.staleness > bound]


def max_staleness(marks: dict[str, Watermark]) -> float:
    return max((w.staleness for w in marks.values()), default=0.0)


def header_value(staleness: float) -> str:
    """The staleness header's text: seconds with millisecond precision, `inf` for a peer
    never heard from."""
    return "inf" if math.isinf(staleness) else f"{staleness:.3f}"


class FreshnessView:
    """What the request path asks: the peers' watermarks, read from the ledger at most
    every `refresh` seconds. Staleness is always `now - watermark` on the current clock
    and watermarks only grow, so a cached one overstates staleness, never understates."""

    def __init__(
        self,
        freshness: Freshness,
        peers: Callable[[], Iterable[str]],
        *,
        refresh: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.freshness, self.peers, self.refresh, self.clock = freshness, peers, refresh, clock
        self._marks: dict[str, Watermark] = {}
        self._read_at = -math.inf

    def marks(self, *, fresh: bool = False) -> dict[str, Watermark]:
        if fresh or self.clock() - self._read_at >= self.refresh:
            self._marks = self.freshness.watermarks(self.peers())
            self._read_at = self.clock()
        now = self.freshness.clock()
        return {
            p: Watermark(p, w.watermark, w.contiguous_seq, _since(now, w.watermark), w.path)
            for p, w in self._marks.items()
        }

    def staleness(self) -> float:
        return max_staleness(self.marks())

    def stale_peers(self, bound: float) -> list[str]:
        """Peers staler than `bound`; before refusing anything on the cached view's word,
        read the ledger again (refusals are rare, so this costs little)."""
        if not any(w.staleness > bound for w in self.marks().values()):
            return []
        return sorted(p for p, w in self.marks(fresh=True).items() if w.staleness > bound)


def _since(now: float, watermark: float | None) -> float:
    return math.inf if watermark is None else max(0.0, now - watermark)


# --- per-role bounds (issue 18 §3) --------------------------------------------------------

ON_STALE = ("refuse", "local-only", "serve")


@dataclass(frozen=True)
class StaleBound:
    """A role's (or mount's) revocation freshness bound: while any peer's staleness is
    over `max_staleness` seconds, credentials of that role are refused (`refuse`), served
    only when this cell issued them (`local-only`), or served with the header (`serve`)."""

    max_staleness: float
    on_stale: str = "refuse"

    def as_json(self) -> dict[str, Any]:
        return {"max_revocation_staleness": self.max_staleness, "on_stale": self.on_stale}


def parse_bound(data: Any, current: StaleBound | None = None) -> StaleBound | None:
    """`max_revocation_staleness` (seconds > 0; null or 0 clears it) and `on_stale` from a
    role or mount write; `current` when neither is given. InvalidRequest otherwise."""
    if not isinstance(data, dict) or ("max_revocation_staleness" not in data and "on_stale" not in data):
        return current
    raw = data.get("max_revocation_staleness", None if current is None else current.max_staleness)
    mode = data.get("on_stale", "refuse" if current is None else current.on_stale)
    if mode not in ON_STALE:
        raise InvalidRequest("on_stale must be one of " + ", ".join(ON_STALE))
    if raw in (None, "", 0):
        if "on_stale" in data and "max_revocation_staleness" not in data and current is None:
            raise InvalidRequest("on_stale needs max_revocation_staleness (seconds)")
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidRequest("max_revocation_staleness is a number of seconds")
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidRequest("max_revocation_staleness is a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 86400 * 365:
        raise InvalidRequest("max_revocation_staleness is seconds, > 0 and at most a year")
    return StaleBound(seconds, str(mode))


def bound_from_record(record: Any) -> StaleBound | None:
    if not isinstance(record, dict) or not record.get("max_revocation_staleness"):
        return None
    return StaleBound(float(record["max_revocation_staleness"]), str(record.get("on_stale", "refuse")))


def enforce(view: FreshnessView, bound: StaleBound | None, issuing_cell: str, what: str) -> None:
    """Refuse (503, naming the stale peers) what `bound` says a stale cell must not serve.
    `issuing_cell`: the cell that issued the credential ("" when it is this cell)."""
    if bound is None or bound.on_stale == "serve":
        return
    local = view.freshness.cell
    if bound.on_stale == "local-only" and issuing_cell in ("", local):
        return
    stale = view.stale_peers(bound.max_staleness)
    if not stale:
        return
    raise Unavailable(
        f"{what}: this cell's revocation view of {', '.join(stale)} is older than "
        f"{bound.max_staleness:g} s (on_stale={bound.on_stale}); retry when it catches up"
    )

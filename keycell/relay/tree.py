"""How a relay broadcasts a revocation: down a tree over its cell's relays, each push
acknowledged, the gaps pulled by graft.

The tree: every relay of a cell knows the cell's live relays (SWIM), so for a given
root they all compute the same tree without saying a word about it. The relays,
sorted by address, form a ring; counting from the root, the relay at position p
pushes to those at positions fanout*p + 1 .. fanout*p + fanout (a heap laid on the
ring). A revocation submitted to a relay has that relay as root in its own cell; it
also pushes to one relay of every other cell (a cross link), the root there. Each
relay is pushed to once: a broadcast costs n - 1 pushes, and reaches every relay of
a cell of n within ceil(log_fanout n) hops. The envelope names its root; a relay
that does not know it (views differ for a moment after a change) roots its own
subtree at itself: some relays hear it twice, none misses it.

Acks: the receiver of a push answers with the ids it got (IHAVE). A push not
acknowledged in time is resent, up to `resends` times, so a lost push costs one
timeout, not a subtree's miss (to the fault layer each message is a datagram: a
relay sees no more of a lost one than UDP would). The timeout is TCP's (RFC 6298):
smoothed round trip plus four deviations, from acks of first sends only (Karn), never
below `ack_timeout`, and doubled at every timeout until a fresh measure, so a
loaded relay waits longer instead of resending into its own queue. A resend goes as
RESEND_COPIES envelopes: a push already lost once is the tail of the exposure
window, and a second copy makes losing the resend too 1/loss times less likely, for
one message.

Gaps (a relay whose parent died before pushing, or took it for dead): pings and
their acks carry the ids of the revocations heard lately. A relay hearing an id it
lacks waits `graft_timeout` for the push, then asks the announcer for it (GRAFT),
then the next announcer. This is Plumtree's lazy push and graft (Leitao, Pereira,
Rodrigues, "Epidemic Broadcast Trees", 2007) on the messages SWIM sends anyway;
the eager tree is computed instead of pruned into shape, which keeps it shallow.

This module holds the rules and state; the relay (node.py) sends what they return,
from its one scheduler loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


def children(ring: list[str], root: str, me: str, fanout: int) -> list[str]:
    """The relays `me` pushes to in the tree rooted at `root` over `ring` (this cell's
    live relays, `me` among them, sorted). A root not on the ring: `me` is the root."""
    n = len(ring)
    if n < 2 or fanout < 1:
        return []
    index = {addr: i for i, addr in enumerate(ring)}  # (ring is small: hundreds at most)
    mine = index.get(me)
    if mine is None:
        return []
    start = index.get(root, mine)
    pos = (mine - start) % n
    first = fanout * pos + 1
    return [ring[(start + c) % n] for c in range(first, min(n, first + fanout))]


RESEND_COPIES = 2  # envelopes per resend of an unacknowledged push
MAX_RTO = 2.0  # seconds: the longest a push waits for its ack before a resend


@dataclass
class _Unacked:
    """A push not acknowledged yet."""

    sent: float  # first sent at (monotonic seconds)
    deadline: float  # resend at this time
    tries: int = 1


@dataclass
class _Missing:
    """A revocation announced to this relay that it does not hold yet."""

    deadline: float  # graft from the next announcer at this time (monotonic seconds)
    announcers: list[str] = field(default_factory=list)  # addresses, first heard first


class BroadcastTree:
    def __init__(self, *, graft_timeout: float, ack_timeout: float, resends: int) -> None:
        self.graft_timeout = graft_timeout
        self.ack_timeout = ack_timeout
        self.resends = resends
        self.unacked: dict[tuple[str, str], _Unacked] = {}  # (peer, revocation id) -> resend when
        self.missing: dict[str, _Missing] = {}  # revocation id -> who announced it
        self.srtt = 0.0  # smoothed ack round trip (0: none measured yet)
        self.rttvar = 0.0
        self.rto = ack_timeout  # how long a push waits for its ack

    def busy(self) -> bool:
        """Whether the scheduler has something to do: pushes to resend if not
        acknowledged, revocations to graft."""
        return bool(self.missing or self.unacked)

    def next_deadline(self) -> float:
        """When the scheduler next has something to do (monotonic seconds)."""
        times = [u.deadline for u in self.unacked.values()] + [m.deadline for m in self.missing.values()]
        return min(times, default=float("inf"))

    def pushed(self, rid: str, addrs: Iterable[str], now: float) -> None:
        """`rid` was pushed to these peers: resend to each that does not ack it."""
        deadline = now + self.rto
        for addr in addrs:
            self.unacked[(addr, rid)] = _Unacked(now, deadline)

    def acked(self, addr: str, rids: Iterable[str], now: float) -> None:
        """`addr` holds these revocations (its ack, or ids on its ping)."""
        if self.unacked:
            for rid in rids:
                unacked = self.unacked.pop((addr, rid), None)
                if unacked is not None and unacked.tries == 1:  # (Karn: no sample from a resend)
                    self._sample(now - unacked.sent)

    def _sample(self, rtt: float) -> None:
        if not self.srtt:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(MAX_RTO, max(self.ack_timeout, self.srtt + 4 * self.rttvar))

    def forget_peers(self, live: set[str]) -> None:
        """Stop resending to peers no longer live (a dead relay's subtree grafts)."""
        for key in [k for k in self.unacked if k[0] not in live]:
            del self.unacked[key]

    def resends_due(self, now: float) -> dict[str, list[str]]:
        """Pushes to resend now (ids by peer): those not acknowledged in time. A push
        resent `resends` times without an ack is given up (the peer is likely dead;
        SWIM will say so, and its subtree grafts from the ids on pings)."""
        out: dict[str, list[str]] = {}
        due = [(k, u) for k, u in self.unacked.items() if u.deadline <= now]
        if not due:
            return out
        # A timeout backs the timer off (RFC 6298 5.5: double it, up to MAX_RTO) until
        # an ack of a first send measures the round trip again (Karn): a relay whose
        # acks come late (its peers' loops are busy) resends less, not into a storm.
        # (Kept for the relay, not per push: tried per push, with 3 copies a resend, an
        # overloaded 3 x 100 mesh sent 3.6x the messages a revocation, bench.revocation.)
        self.rto = min(MAX_RTO, self.rto * 2)
        for key, unacked in due:
            if unacked.tries > self.resends:
                del self.unacked[key]
                continue
            unacked.tries += 1
            unacked.deadline = now + self.rto
            out.setdefault(key[0], []).append(key[1])
        return out

    def announced(self, rid: str, source: str, now: float) -> bool:
        """`source` holds `rid`, which this relay lacks. True if it is newly missing."""
        missing = self.missing.get(rid)
        if missing is None:
            self.missing[rid] = _Missing(now + self.graft_timeout, [source])
            return True
        if source not in missing.announcers:
            missing.announcers.append(source)
        return False

    def grafts_due(self, now: float, held: Callable[[str], bool]) -> dict[str, list[str]]:
        """Grafts to send now: for each missing revocation whose timer ran out, the
        next announcer, by address. A revocation that arrived meanwhile (`held`) or
        whose announcers were all asked is forgotten; the next announcement, or
        anti-entropy, brings it back."""
        grafts: dict[str, list[str]] = {}
        for rid, missing in list(self.missing.items()):
            if held(rid) or not missing.announcers:
                del self.missing[rid]
                continue
            if missing.deadline > now:
                continue
            grafts.setdefault(missing.announcers.pop(0), []).append(rid)
            missing.deadline = now + self.graft_timeout
        return grafts

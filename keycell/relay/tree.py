"""The revocation broadcast tree of one relay: Plumtree (Leitao, Pereira, Rodrigues,
"Epidemic Broadcast Trees", SRDS 2007) over the relay's links.

Each link to a neighbour is either eager or lazy:
- a revocation heard for the first time is pushed whole along every eager link but
  the one it came from, and only its id (IHAVE) goes to `lazy_fanout` lazy links
  (and, in the relay, on every ping: the messages that are sent anyway);
- the receiver of a push answers with the id (an ack); a push not acknowledged
  in time is resent, up to `resends` times, so a lost push costs one timeout, not a
  subtree's miss (each message is a datagram to the fault layer, and the relay sees
  no more of a lost one than UDP would). The timeout is TCP's (RFC 6298): smoothed
  round trip plus four deviations, from acks of first sends only, never below
  `ack_timeout`, so a loaded relay waits longer instead of resending into its queue;
- a revocation heard again (a second copy: the eager links form a cycle) makes the
  link it came on lazy, and the sender is told (PRUNE) so it does the same; once the
  first broadcasts have pruned the cycles the eager links form a spanning tree, and a
  revocation costs n - 1 pushes;
- an id heard (IHAVE) for a revocation this relay lacks starts a short timer
  (`graft_timeout`): if the revocation has still not come by the eager path, the relay
  asks the announcer for it (GRAFT), which makes that link eager again, so the tree
  heals around a lost push or a dead relay. If that one does not answer either, the
  next announcer is asked after another timeout.

Neighbours: `fanout` relays of this relay's cell chosen at random (topped up when one
dies), the cross links to other cells, and whoever pushes or grafts to this relay (a
link is symmetric once used). All start eager. This class holds only the state and its
rules; the relay (node.py) sends what it returns, from its one scheduler loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


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
    def __init__(
        self,
        rng: random.Random,
        *,
        fanout: int,
        lazy_fanout: int,
        graft_timeout: float,
        ack_timeout: float = 0.05,
        resends: int = 3,
    ) -> None:
        self.rng = rng
        self.fanout = fanout
        self.lazy_fanout = lazy_fanout
        self.graft_timeout = graft_timeout
        self.ack_timeout = ack_timeout
        self.resends = resends
        self.unacked: dict[tuple[str, str], _Unacked] = {}  # (neighbour, revocation id) -> resend when
        self.srtt = 0.0  # smoothed ack round trip (0: none measured yet)
        self.rttvar = 0.0
        self.rto = ack_timeout  # how long a push waits for its ack
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.missing: dict[str, _Missing] = {}  # revocation id -> who announced it
        self._announce: dict[str, list[str]] = {}  # lazy neighbour -> ids to announce to it

    def busy(self) -> bool:
        """Whether the scheduler has something to do: ids to announce, pushes to
        resend if unacknowledged, revocations to graft."""
        return bool(self._announce or self.missing or self.unacked)

    def next_deadline(self) -> float:
        """When the scheduler next has something to do (monotonic seconds; 0: now)."""
        if self._announce:
            return 0.0
        times = [u.deadline for u in self.unacked.values()] + [m.deadline for m in self.missing.values()]
        return min(times, default=float("inf"))

    def pushed(self, rid: str, addrs: Iterable[str], now: float) -> None:
        """`rid` was pushed to these neighbours: resend to each that does not ack it."""
        deadline = now + self.rto
        for addr in addrs:
            self.unacked[(addr, rid)] = _Unacked(now, deadline)

    def acked(self, addr: str, rids: Iterable[str], now: float) -> None:
        """`addr` holds these revocations (its ack, or an announcement)."""
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
        self.rto = min(1.0, max(self.ack_timeout, self.srtt + 4 * self.rttvar))

    def refresh(self, own: Iterable[str], cross: Iterable[str]) -> None:
        """The live relays of this cell (`own`) and the cross links changed: forget the
        neighbours no longer live, top this cell's neighbours up to `fanout` with random
        ones (new links start eager), and take every cross link on as a neighbour."""
        own = list(own)
        cross = list(cross)
        live = set(own) | set(cross)
        self.eager &= live
        self.lazy &= live
        for addr in list(self._announce):
            if addr not in live:
                del self._announce[addr]
        for key in [k for k in self.unacked if k[0] not in live]:
            del self.unacked[key]  # a dead neighbour: its subtree grafts from others
        linked = [a for a in own if a in self.eager or a in self.lazy]
        spare = [a for a in own if a not in self.eager and a not in self.lazy]
        need = self.fanout - len(linked)
        if need > 0 and spare:
            self.eager.update(self.rng.sample(spare, min(need, len(spare))))
        for addr in cross:
            if addr not in self.eager and addr not in self.lazy:
                self.eager.add(addr)

    def first(self, rid: str, source: str) -> list[str]:
        """Revocation `rid` heard for the first time from `source` ("" for one submitted
        here): the link it came on is eager, the id is queued for `lazy_fanout` lazy
        links, and the eager links to push it to are returned."""
        self.missing.pop(rid, None)
        if source:
            self.lazy.discard(source)
            self.eager.add(source)
        lazy = [a for a in self.lazy if a != source]
        for addr in self.rng.sample(lazy, min(self.lazy_fanout, len(lazy))):
            self._announce.setdefault(addr, []).append(rid)
        return [a for a in self.eager if a != source]

    def duplicate(self, source: str) -> None:
        """A second copy came from `source`: make that link lazy (the caller tells the
        sender to prune its end too: it may have this relay as an eager link that this
        relay never had as one, a neighbour it chose at random or a cross link)."""
        self.eager.discard(source)
        self.lazy.add(source)

    def pruned(self, source: str) -> None:
        """`source` got a copy from this relay that it held already: push no more to it."""
        if source in self.eager:
            self.eager.discard(source)
            self.lazy.add(source)

    def grafted(self, source: str) -> None:
        """`source` asked for revocations it lacks: push to it from now on."""
        self.lazy.discard(source)
        self.eager.add(source)

    def announced(self, rid: str, source: str, now: float) -> bool:
        """`source` holds `rid`, which this relay lacks. True if it is newly missing."""
        missing = self.missing.get(rid)
        if missing is None:
            self.missing[rid] = _Missing(now + self.graft_timeout, [source])
            return True
        if source not in missing.announcers:
            missing.announcers.append(source)
        return False

    def take_announcements(self) -> dict[str, list[str]]:
        """The ids queued for each lazy neighbour since the last call (one message each)."""
        out, self._announce = self._announce, {}
        return out

    def resends_due(self, now: float) -> dict[str, list[str]]:
        """Pushes to resend now (ids by neighbour): those not acknowledged in time. A
        push resent `resends` times without an ack is given up (the neighbour is
        likely dead; SWIM will say so, and its subtree grafts from lazy links)."""
        out: dict[str, list[str]] = {}
        for key, unacked in list(self.unacked.items()):
            if unacked.deadline > now:
                continue
            if unacked.tries > self.resends:
                del self.unacked[key]
                continue
            unacked.tries += 1
            unacked.deadline = now + self.rto
            out.setdefault(key[0], []).append(key[1])
        return out

    def due(self, now: float, held: Callable[[str], bool]) -> dict[str, list[str]]:
        """Grafts to send now: for each missing revocation whose timer ran out, the
        next announcer (its link made eager), by address. A revocation that arrived
        meanwhile (`held`) or whose announcers were all asked is forgotten; the next
        announcement, or anti-entropy, brings it back."""
        grafts: dict[str, list[str]] = {}
        for rid, missing in list(self.missing.items()):
            if held(rid) or not missing.announcers:
                del self.missing[rid]
                continue
            if missing.deadline > now:
                continue
            addr = missing.announcers.pop(0)
            self.grafted(addr)
            grafts.setdefault(addr, []).append(rid)
            missing.deadline = now + self.graft_timeout
        return grafts

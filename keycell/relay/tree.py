"""The revocation broadcast tree of one relay: Plumtree (Leitao, Pereira, Rodrigues,
"Epidemic Broadcast Trees", SRDS 2007) over the relay's links.

Each link to a neighbour is either eager or lazy:
- a revocation heard for the first time is pushed whole along every eager link but
  the one it came from, and only its id (IHAVE) goes to `lazy_fanout` lazy links;
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
class _Missing:
    """A revocation announced to this relay that it does not hold yet."""

    deadline: float  # graft from the next announcer at this time (monotonic seconds)
    announcers: list[str] = field(default_factory=list)  # addresses, first heard first


class BroadcastTree:
    def __init__(self, rng: random.Random, *, fanout: int, lazy_fanout: int, graft_timeout: float) -> None:
        self.rng = rng
        self.fanout = fanout
        self.lazy_fanout = lazy_fanout
        self.graft_timeout = graft_timeout
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.missing: dict[str, _Missing] = {}  # revocation id -> who announced it
        self._announce: dict[str, list[str]] = {}  # lazy neighbour -> ids to announce to it

    def busy(self) -> bool:
        """Whether the scheduler has something to do: ids to announce or to graft."""
        return bool(self._announce or self.missing)

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

    def duplicate(self, source: str) -> bool:
        """A second copy came from `source`: make that link lazy. True if it was eager
        (then the sender must be told to prune its end too)."""
        if source in self.eager:
            self.eager.discard(source)
            self.lazy.add(source)
            return True
        return False

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

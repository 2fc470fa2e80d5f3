"""SWIM membership state: the member table with incarnation numbers, suspicion with
Lifeguard's shrinking timeout, and Lifeguard's local health multiplier.

Pure logic with an injected clock; the node turns its verdicts into messages.
The rules (SWIM section 4.2, memberlist state.go):
- `alive(inc)` overrides a member's state only with a higher incarnation (or for a
  member not known yet); only a member itself raises its incarnation, to refute;
- `suspect(inc)` applies to an alive member at inc >= its own; about this relay at
  its current incarnation, it is refuted with alive(inc + 1) (older ones are stale);
- `dead(inc)` applies at inc >= its own; about this relay, it is refuted too, which
  is also how relays on both sides of a healed partition rejoin each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum


class State(IntEnum):  # the same numbers as relay.proto's State
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2


@dataclass
class Member:
    name: str
    addr: str
    cell: str
    incarnation: int = 0
    state: State = State.ALIVE
    since: float = 0.0  # when the state last changed


class Awareness:
    """Lifeguard's local health multiplier: grows when this relay's failed probe also
    missed its helpers' nacks (one per missing nack) or when it has to refute a
    suspicion about itself (it is probably the slow one), shrinks with every
    successful probe; probe interval and timeout are scaled by (score + 1)."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.ceiling - 1, max(0, self.score + delta))

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)


@dataclass
class Suspicion:
    """A suspicion about one member at one incarnation. Its timeout starts at `high`
    and shrinks towards `low` as independent peers confirm it (Lifeguard): after c of
    the k expected confirmations, timeout = high - (high - low) * log(c + 1) / log(k + 1)."""

    incarnation: int
    started: float
    low: float
    high: float
    expected: int
    confirmers: set[str] = field(default_factory=set)

    def confirm(self, source: str) -> bool:
        """True if `source` is a new, independent confirmation."""
        if source in self.confirmers:
            return False
        self.confirmers.add(source)
        return True

    def timeout(self) -> float:
        if self.expected <= 0:
            return self.low
        c = min(len(self.confirmers) - 1, self.expected)  # the first confirmer started it
        frac = math.log(max(0, c) + 1) / math.log(self.expected + 1)
        return max(self.low, self.high - (self.high - self.low) * frac)

    def deadline(self) -> float:
        return self.started + self.timeout()


class Verdict(IntEnum):
    IGNORED = 0  # stale or known: do not rebroadcast
    CHANGED = 1  # a new fact: rebroadcast it
    REFUTE = 2  # about this relay: broadcast alive(self) at the new incarnation


class MemberTable:
    def __init__(
        self,
        me: Member,
        *,
        suspicion_timeouts: Callable[[int], tuple[float, float]],
        confirmations: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self.clock = clock
        self.members: dict[str, Member] = {me.name: me}
        self.suspicions: dict[str, Suspicion] = {}
        self._timeouts = suspicion_timeouts
        self._confirmations = confirmations
        self.suspicions_started = 0
        self.refutations = 0
        self.version = 0  # bumped on every change (callers cache what they build from the table)
        # Bumped only when the roster changes: who is not dead, or a member's address or
        # cell. A suspicion and its refutation change a member's state and incarnation
        # in place and leave it alone, so views of the live members (probe targets,
        # peers, the cell's leader) stay valid through the suspicion churn that loss
        # causes (every relay hears of each one).
        self.roster = 0
        self._views: tuple[int, list[Member], list[Member]] = (-1, [], [])  # (roster, live, dead)
        self._counts: tuple[int, dict[State, int]] = (-1, {})  # (version, members by state)

    # --- queries ---------------------------------------------------------------------

    def get(self, name: str) -> Member | None:
        return self.members.get(name)

    def live(self) -> list[Member]:
        """Every member but this relay that is not dead (a new list each call, copied
        from one rebuilt only when the roster changed: relays and the cells agent ask
        for it many times a second, and a mesh of hundreds changes less often)."""
        return list(self._roster_views()[1])

    def dead(self) -> list[Member]:
        """Every dead member (from the same views as `live`)."""
        return list(self._roster_views()[2])

    def _roster_views(self) -> tuple[int, list[Member], list[Member]]:
        """(roster, live, dead), rebuilt together once the roster changed."""
        if self._views[0] != self.roster:
            me = self.me.name
            live = [m for m in self.members.values() if m.name != me and m.state != State.DEAD]
            dead = [m for m in self.members.values() if m.state == State.DEAD]
            self._views = (self.roster, live, dead)
        return self._views

    def cells(self) -> set[str]:
        return {m.cell for m in self.members.values()}

    def count(self, state: State) -> int:
        """Members in `state`, counted once per table change (each relay's /metrics
        asks for every state, and a process may hold hundreds of relays' tables)."""
        if self._counts[0] != self.version:
            by_state = dict.fromkeys(State, 0)
            for m in self.members.values():
                by_state[m.state] += 1
            self._counts = (self.version, by_state)
        return self._counts[1][state]

    # --- rumours ---------------------------------------------------------------------

    def alive(self, name: str, addr: str, cell: str, incarnation: int) -> Verdict:
        if name == self.me.name:
            if incarnation > self.me.incarnation or (
                addr != self.me.addr and incarnation == self.me.incarnation
            ):
                return self._refute(incarnation)  # someone speaks for us: out-bid them
            return Verdict.IGNORED
        known = self.members.get(name)
        if known is None:
            self.members[name] = Member(name, addr, cell, incarnation, State.ALIVE, self.clock())
            self.version += 1
            self.roster += 1
            return Verdict.CHANGED
        if incarnation <= known.incarnation:
            return Verdict.IGNORED
        if (known.addr, known.cell) != (addr, cell):
            self.roster += 1
        known.incarnation, known.addr, known.cell = incarnation, addr, cell
        self.version += 1
        self._set(known, State.ALIVE)
        self.suspicions.pop(name, None)
        return Verdict.CHANGED

    def suspect(self, name: str, incarnation: int, source: str) -> Verdict:
        if name == self.me.name:
            # Only a rumour about this incarnation (or a later one) needs an answer; an
            # older one was refuted already and dies out on its own.
            return self._refute(incarnation) if incarnation >= self.me.incarnation else Verdict.IGNORED
        known = self.members.get(name)
        if known is None or incarnation < known.incarnation or known.state == State.DEAD:
            return Verdict.IGNORED
        if known.state == State.SUSPECT:
            current = self.suspicions.get(name)
            if current is not None and current.incarnation == incarnation and current.confirm(source):
                return Verdict.CHANGED  # a confirmation: pass it on, it shortens others' timers
            return Verdict.IGNORED
        known.incarnation = incarnation
        self.version += 1
        self._set(known, State.SUSPECT)
        low, high = self._timeouts(len(self.members))
        suspicion = Suspicion(incarnation, self.clock(), low, high, self._confirmations)
        suspicion.confirm(source)
        self.suspicions[name] = suspicion
        self.suspicions_started += 1
        return Verdict.CHANGED

    def dead_(self, name: str, incarnation: int) -> Verdict:
        if name == self.me.name:
            return self._refute(incarnation) if incarnation >= self.me.incarnation else Verdict.IGNORED
        known = self.members.get(name)
        if known is None or incarnation < known.incarnation or known.state == State.DEAD:
            return Verdict.IGNORED
        known.incarnation = incarnation
        self.version += 1
        self._set(known, State.DEAD)
        self.suspicions.pop(name, None)
        return Verdict.CHANGED

    def expired(self) -> list[Member]:
        """Suspects whose timeout passed: declared dead here (the caller broadcasts it)."""
        now = self.clock()
        out: list[Member] = []
        for name, suspicion in list(self.suspicions.items()):
            if now >= suspicion.deadline():
                member = self.members[name]
                del self.suspicions[name]
                if member.state == State.SUSPECT and member.incarnation == suspicion.incarnation:
                    self._set(member, State.DEAD)
                    out.append(member)
        return out

    def _refute(self, incarnation: int) -> Verdict:
        self.me.incarnation = max(self.me.incarnation, incarnation) + 1
        self.refutations += 1
        self.version += 1
        return Verdict.REFUTE

    def _set(self, member: Member, state: State) -> None:
        if member.state != state:
            if State.DEAD in (member.state, state):
                self.roster += 1
            member.state = state
            member.since = self.clock()
            self.version += 1

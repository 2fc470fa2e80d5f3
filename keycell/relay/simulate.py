"""A model of the relay's broadcast of one revocation, for sizes no machine here can
run as processes (1,000-10,000 relays).

It follows what a relay does (keycell/relay/node.py), with the tree's own rules
(keycell/relay/tree.py: `children` for the tree's shape, one `BroadcastTree` per relay
for its resend and graft timers), on a discrete-event clock instead of sockets:
- the relay the revocation is submitted to roots its cell's tree and pushes to one
  relay of every other cell, which roots that cell's tree; every relay that first
  hears a push pushes on to its children (`children` over its own view of the cell);
- every push is acknowledged; a push not acknowledged in time is resent (the tree's
  timers, RFC 6298 with Karn), at most `resends` times;
- every `probe_interval` each relay pings one relay of its view; a ping and its ack
  carry the ids heard in the last RECENT_IDS_S (node.py's window), and a relay that
  sees an id it lacks grafts it from the announcer after `graft_timeout`; the answer
  keeps the tree's root, so the graftee pushes on down its subtree;
- every `push_pull_interval` each relay exchanges its set with one relay of its view
  (anti-entropy: a relay missing the revocation gets it, pushed no further until the
  tree's own push reaches it: then it pushes on to its children, as node.py does);
- each message (push, ack, ping, graft, exchange) is lost with probability `loss`,
  and takes `latency` seconds, jittered by +-50%;
- a sender's view of its cell may lack a fraction `view_miss` of the cell's relays
  (chosen independently for each relay: views differ, as they do for a moment after
  joins or false suspicions); trees computed over differing views overlap and leave
  gaps, which the grafts fill.

Left out: CPU and queueing (a relay answers the moment a message lands), relay
failures, and the cost of pings and exchanges (they run whether or not anything is
revoked, so they are not counted as the revocation's messages).

It reports, for one revocation, the time until every relay holds it (seconds and
gossip intervals, `rounds`), the longest chain of messages that first brought it to a
relay (`hops`), the messages it cost, and how each relay first got it. Deterministic
under `seed`; bounded by `max_seconds` of model time and `max_events`.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keycell.relay.node import RECENT_IDS_S
from keycell.relay.profiles import LOCAL, Profile
from keycell.relay.tree import RESEND_COPIES, BroadcastTree, children

RID = "r"  # the one revocation simulated
HOW = ("first_push", "resend", "graft", "anti_entropy")  # how a relay first got it

# Event kinds on the clock (the heap holds (time, seq, kind, a, b, c, d)).
_PUSH = 0  # a: to, b: from, c: root (-1: the receiver roots its cell's tree; None: a repair), d: how
_ACK = 1  # a: to (the pusher), b: from (the holder)
_TICK = 2  # a: relay whose tree timers fall due
_PROBE = 3  # a: relay that pings now
_PING = 4  # a: to, b: from, c: whether the sender held it when sending, d: 1 for a ping, 0 for its ack
_GRAFT = 5  # a: to (the announcer), b: from (the relay lacking it)
_EXCHANGE = 6  # a: relay that runs anti-entropy now


@dataclass(frozen=True)
class SimResult:
    nodes: int
    cells: int
    covered: bool  # every relay held it within the bounds
    reached: int
    seconds: float  # model time from the revoke call until every relay held it
    rounds: int  # the same in gossip intervals (rounded up)
    hops: int  # the longest chain of messages that first brought it to a relay
    pushes: int  # first sends down the trees and across cells
    resends: int
    acks: int
    grafts: int  # graft requests
    graft_answers: int
    repairs: int  # anti-entropy transfers of the revocation
    reached_by: dict[str, int] = field(default_factory=dict)  # HOW -> relays (the origin excluded)

    @property
    def messages(self) -> int:
        """Messages this revocation cost: pushes, resends, acks, grafts and their
        answers, repairs (not the pings and exchanges, which run anyway)."""
        return self.pushes + self.resends + self.acks + self.grafts + self.graft_answers + self.repairs


def simulate(
    nodes: int,
    cells: int,
    *,
    profile: Profile = LOCAL,
    loss: float = 0.05,
    view_miss: float = 0.0,
    latency: float = 0.0005,
    seed: int = 0,
    max_seconds: float = 60.0,
    max_events: int = 5_000_000,
) -> SimResult:
    """One revocation submitted to relay 0, spread over `nodes` relays in `cells` cells."""
    if nodes < 1 or cells < 1 or cells > nodes:
        raise ValueError("need at least one relay per cell")
    if not 0.0 <= loss < 1.0 or not 0.0 <= view_miss < 1.0:
        raise ValueError("loss and view_miss are fractions in [0, 1)")
    rng = random.Random(seed)  # noqa: S311 - a model, not a secret
    cell_of = [i % cells for i in range(nodes)]
    members = [list(range(c, nodes, cells)) for c in range(cells)]
    # Addresses sort as the relays' numbers do, so a cell's ring is its members in order.
    addr = [f"relay-{i:06d}" for i in range(nodes)]
    number = {a: i for i, a in enumerate(addr)}
    rings = [[addr[i] for i in m] for m in members]
    fanout = profile.eager_fanout

    views_rng = random.Random(seed * 1_000_003 + 7)  # noqa: S311 - views drawn apart from the traffic
    hidden: dict[int, frozenset[int]] = {}  # relay -> relays of its cell missing from its view

    def unseen(i: int) -> frozenset[int]:
        if i not in hidden:
            others = [j for j in members[cell_of[i]] if j != i]
            k = round(view_miss * len(others))
            hidden[i] = frozenset(views_rng.sample(others, k)) if k else frozenset()
        return hidden[i]

    def ring_of(i: int) -> list[str]:
        miss = unseen(i)
        ring = rings[cell_of[i]]
        return [a for a in ring if number[a] not in miss] if miss else ring

    def peer_of(i: int) -> int | None:
        """A random relay of i's view of its cell (not i), as a probe picks one."""
        own, miss = members[cell_of[i]], unseen(i)
        if len(own) - len(miss) < 2:
            return None
        while True:
            j = own[rng.randrange(len(own))]
            if j != i and j not in miss:
                return j

    trees = [
        BroadcastTree(
            graft_timeout=profile.graft_timeout, ack_timeout=profile.ack_timeout, resends=profile.resends
        )
        for _ in range(nodes)
    ]
    held = [False] * nodes
    held_at = [0.0] * nodes
    repaired = [False] * nodes  # first reached by a repair, not yet pushed down a tree
    depth = [0] * nodes
    root_of: list[int | None] = [None] * nodes  # the tree each relay pushed it down (its root)
    tick_at = [math.inf] * nodes
    counts = dict.fromkeys(("pushes", "resends", "acks", "grafts", "graft_answers", "repairs"), 0)
    reached_by = dict.fromkeys(HOW, 0)
    events: list[tuple[float, int, int, int, Any, Any, Any]] = []
    seq = 0

    def at(t: float, kind: int, a: int, b: Any = None, c: Any = None, d: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, a, b, c, d))

    def send(t: float, kind: int, a: int, b: Any = None, c: Any = None, d: Any = None) -> None:
        """A datagram: lost with probability `loss`, else delivered one latency later."""
        if rng.random() >= loss:
            at(t + latency * (0.5 + rng.random()), kind, a, b, c, d)

    def wake(i: int, now: float) -> None:
        """Run i's tree timers when they fall due (as its gossip loop sleeps, at least
        one gossip interval)."""
        if trees[i].busy():
            due = max(now + profile.gossip_interval, trees[i].next_deadline())
            if due < tick_at[i]:
                tick_at[i] = due
                at(due, _TICK, i)

    def push_to(now: float, i: int, j: int, how: str) -> None:
        """i sends j the revocation, with the root j should use."""
        root = root_of[i] if cell_of[i] == cell_of[j] else -1
        send(now, _PUSH, j, i, root, how)

    def learn(now: float, i: int, src: int | None, root: int | None, how: str) -> None:
        """i takes the revocation in; `root` as in node.py's _learn (-1: i roots its
        cell's tree; None: a repair, pushed no further)."""
        if held[i]:
            if root is None or not repaired[i]:
                return
            repaired[i] = False  # first reached by a repair: the tree's push goes on from here
        else:
            held[i], held_at[i] = True, now
            if src is not None:
                depth[i] = depth[src] + 1
                reached_by[how] += 1
            if root is None:
                repaired[i] = True
                return
        root = i if root == -1 else root
        root_of[i] = root
        kids = [number[a] for a in children(ring_of(i), addr[root], addr[i], fanout)]
        kids = [j for j in kids if j != src]
        if src is None:  # submitted here: one relay of every other cell roots that cell's tree
            kids += [members[c][rng.randrange(len(members[c]))] for c in range(cells) if c != cell_of[i]]
        trees[i].pushed(RID, [addr[j] for j in kids], now)
        for j in kids:
            counts["pushes"] += 1
            push_to(now, i, j, "first_push")
        wake(i, now)

    def holds(i: int) -> Callable[[str], bool]:
        return lambda _rid: held[i]

    def heard_of(now: float, i: int, holder: int) -> None:
        """Ids on a ping (or its ack) from `holder` reached i."""
        trees[i].acked(addr[holder], [RID], now)
        if not held[i] and trees[i].announced(RID, addr[holder], now):
            wake(i, now)

    learn(0.0, 0, None, -1, "first_push")
    for i in range(nodes):  # probes and exchanges run at each relay's own phase
        at(rng.random() * profile.probe_interval, _PROBE, i)
        if profile.push_pull_interval > 0:
            at(rng.random() * profile.push_pull_interval, _EXCHANGE, i)
    reached, done_at, handled = 1, math.inf, 0
    while events and handled < max_events:
        now, _, kind, a, b, c, d = heapq.heappop(events)
        if now > max_seconds:
            break
        handled += 1
        if kind == _PUSH:
            was = held[a]
            learn(now, a, b, c, d)
            reached += not was and held[a]
            counts["acks"] += 1
            send(now, _ACK, b, a)  # every push is answered with the ids received
        elif kind == _ACK:
            trees[a].acked(addr[b], [RID], now)
        elif kind == _TICK:
            if now != tick_at[a]:
                continue  # superseded by an earlier wake-up
            tick_at[a] = math.inf
            for peer_addr in trees[a].resends_due(now):
                counts["resends"] += 1
                for _ in range(RESEND_COPIES):  # (as the relay sends them)
                    push_to(now, a, number[peer_addr], "resend")
            for peer_addr in trees[a].grafts_due(now, holds(a)):
                counts["grafts"] += 1
                send(now, _GRAFT, number[peer_addr], a)
            wake(a, now)
        elif kind == _GRAFT:
            if held[a]:
                counts["graft_answers"] += 1
                push_to(now, a, b, "graft")
        elif kind == _PING:
            if c and now - held_at[b] <= RECENT_IDS_S:
                heard_of(now, a, b)
            if d:  # a ping: answered with the ids the target holds now
                send(now, _PING, b, a, held[a], 0)
        elif kind == _PROBE and done_at == math.inf:
            peer = peer_of(a)
            if peer is not None:
                send(now, _PING, peer, a, held[a], 1)
            at(now + profile.probe_interval, _PROBE, a)
        elif kind == _EXCHANGE and done_at == math.inf:
            peer = peer_of(a)
            if peer is not None and held[a] != held[peer] and rng.random() >= loss:
                late, early = (peer, a) if held[a] else (a, peer)
                counts["repairs"] += 1
                learn(now + latency, late, early, None, "anti_entropy")
                reached += 1
            at(now + profile.push_pull_interval, _EXCHANGE, a)
        if reached == nodes and done_at == math.inf:
            done_at = now  # then only the pushes, acks and timers still due run out
    covered = reached == nodes
    seconds = max(held_at) if covered else math.inf
    return SimResult(
        nodes=nodes,
        cells=cells,
        covered=covered,
        reached=reached,
        seconds=seconds,
        rounds=math.ceil(seconds / profile.gossip_interval) if covered else -1,
        hops=max(depth),
        reached_by=reached_by,
        **counts,
    )


def report(
    sizes: list[int],
    *,
    cells: int = 3,
    loss: float = 0.05,
    view_miss: float = 0.0,
    trials: int = 5,
    profile: Profile = LOCAL,
) -> list[dict[str, Any]]:
    """Per size, over `trials` seeds: rounds and hops to full coverage (median, max),
    messages per revocation, and the fraction of relays first reached by each way."""
    out = []
    for n in sizes:
        runs = [
            simulate(n, cells, loss=loss, view_miss=view_miss, seed=s, profile=profile) for s in range(trials)
        ]
        rounds = [r.rounds for r in runs if r.covered]
        ms = [r.seconds * 1000 for r in runs if r.covered]
        hops = [r.hops for r in runs]
        reached_late = sum(r.nodes - 1 for r in runs)
        out.append(
            {
                "nodes": n,
                "cells": cells,
                "profile": profile.name,
                "fanout": profile.eager_fanout,
                "loss": loss,
                "view_miss": view_miss,
                "trials": trials,
                "covered": sum(r.covered for r in runs),
                "rounds_median": statistics.median(rounds) if rounds else None,
                "rounds_max": max(rounds) if len(rounds) == trials else None,  # (None: a trial cut off)
                "coverage_ms_median": round(statistics.median(ms), 1) if ms else None,
                "coverage_ms_max": round(max(ms), 1) if len(ms) == trials else None,
                "log2_n": round(math.log2(n), 2),
                "hops_median": statistics.median(hops),
                "hops_max": max(hops),
                "messages_per_revocation": statistics.median(r.messages for r in runs),
                "messages_per_node": round(statistics.median(r.messages for r in runs) / n, 2),
                "pushes_per_revocation": statistics.median(r.pushes for r in runs),
                "resends_per_revocation": statistics.median(r.resends for r in runs),
                "grafts_per_revocation": statistics.median(r.grafts for r in runs),
                "reached_by": {h: round(sum(r.reached_by[h] for r in runs) / reached_late, 4) for h in HOW},
            }
        )
    return out

"""A round-based model of the relay's broadcast, for sizes no machine here can run
as processes (1,000-10,000 relays).

A round is one gossip interval. Eager pushes travel in hops of network latency,
far shorter than a round, so they cascade within the round in which a relay first
hears the revocation:
- a relay that first hears it pushes it at once to `eager_fanout` random relays of
  its cell; the origin also pushes it to `cross_links` relays of every other cell;
- every round, each relay with sends left gossips it to `gossip_nodes` random relays
  of its cell plus one relay of every other cell; each relay sends it at most
  `retransmit_mult * ceil(log10(n + 1))` times, the eager push included;
- every `push_pull_every` rounds, each relay exchanges with one random relay
  (anti-entropy: afterwards both hold the union);
- each message is lost with probability `loss`.
It reports the rounds (gossip intervals) until every relay holds the revocation and
the eager cascade's depth in hops. With `eager_fanout=0` and no cross push it is
plain gossip, as memberlist spreads a user event: O(log n) rounds.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from keycell.relay.profiles import LOCAL, Profile


@dataclass(frozen=True)
class SimResult:
    nodes: int
    cells: int
    rounds: int  # gossip intervals after the revoke call until every relay holds it
    hops: int  # deepest eager-push chain
    messages: int


def simulate(
    nodes: int,
    cells: int,
    *,
    profile: Profile = LOCAL,
    loss: float = 0.05,
    push_pull_every: int = 10,
    seed: int = 0,
    max_rounds: int = 1000,
) -> SimResult:
    rng = random.Random(seed)  # noqa: S311 - a model, not a secret
    cell_of = [i % cells for i in range(nodes)]
    members: list[list[int]] = [[i for i in range(nodes) if cell_of[i] == c] for c in range(cells)]
    limit = profile.retransmit_limit(nodes)
    has = [False] * nodes
    left = [0] * nodes
    depth = [0] * nodes
    messages = 0

    def own(node: int, fanout: int) -> list[int]:
        peers = members[cell_of[node]]
        return [peers[rng.randrange(len(peers))] for _ in range(fanout)]

    def others(node: int, each: int) -> list[int]:
        out = []
        for c in range(cells):
            if c != cell_of[node]:
                out += [members[c][rng.randrange(len(members[c]))] for _ in range(each)]
        return out

    def cascade(start: list[int], origin: bool = False) -> int:
        """Eager pushes from relays that just heard it, to a fixpoint; new holders."""
        nonlocal messages
        queue, got = deque(start), 0  # breadth first: depth is hops in time order
        while queue:
            node = queue.popleft()
            targets = own(node, profile.eager_fanout)
            if origin and node == start[0]:
                targets += others(node, profile.cross_links if profile.eager_fanout else 0)
            left[node] = limit - len(targets)
            messages += len(targets)
            for dst in targets:
                if rng.random() >= loss and not has[dst]:
                    has[dst], depth[dst] = True, depth[node] + 1
                    queue.append(dst)
                    got += 1
        return got

    has[0] = True
    count = 1 + cascade([0], origin=True)
    rounds = 0
    while count < nodes and rounds < max_rounds:
        rounds += 1
        heard: list[int] = []
        for node in range(nodes):
            if has[node] and left[node] > 0:
                targets = (own(node, profile.gossip_nodes) + others(node, 1))[: left[node]]
                left[node] -= len(targets)
                messages += len(targets)
                for dst in targets:
                    if rng.random() >= loss and not has[dst]:
                        has[dst] = True
                        heard.append(dst)
        count += len(heard) + cascade(heard)
        if push_pull_every and rounds % push_pull_every == 0:
            for node in range(nodes):
                peer = rng.randrange(nodes)
                messages += 2
                if rng.random() >= loss and has[node] != has[peer]:
                    late = peer if has[node] else node
                    has[late], left[late] = True, limit
                    count += 1
    return SimResult(nodes, cells, rounds, max(depth), messages)


def report(
    sizes: list[int], *, cells: int = 3, loss: float = 0.05, trials: int = 5, profile: Profile = LOCAL
) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        runs = [simulate(n, cells, loss=loss, seed=s, profile=profile) for s in range(trials)]
        rounds = [r.rounds for r in runs]
        out.append(
            {
                "nodes": n,
                "cells": cells,
                "loss": loss,
                "trials": trials,
                "rounds_median": statistics.median(rounds),
                "rounds_max": max(rounds),
                "log2_n": round(math.log2(n), 2),
                "rounds_per_log2_n": round(statistics.median(rounds) / math.log2(n), 3),
                "eager_hops_max": max(r.hops for r in runs),
                "messages_per_node": round(statistics.median(r.messages for r in runs) / n, 1),
            }
        )
    return out

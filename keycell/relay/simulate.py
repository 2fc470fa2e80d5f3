"""A round-based model of the relay's broadcast, for sizes no machine here can run
as processes (1,000-10,000 relays).

One round is one network hop. In each round:
- every relay that first heard the revocation in the previous round pushes it to
  `eager_fanout` random relays of its cell and one relay of every other cell (the
  eager push);
- every relay still holding retransmits gossips it to `gossip_nodes` random
  relays of its cell plus one of another cell (the piggyback; a rumour is sent at most
  `retransmit_mult * ceil(log10(n + 1))` times by each relay);
- every `push_pull_every` rounds, each relay exchanges with one random relay
  (anti-entropy: afterwards both hold the union);
- each message is lost with probability `loss`.
It counts rounds until every relay holds it, to compare with log n: epidemic
broadcast converges in O(log n) rounds.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from keycell.relay.profiles import LOCAL, Profile


@dataclass(frozen=True)
class SimResult:
    nodes: int
    cells: int
    rounds: int
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
    origin = 0
    has[origin], left[origin] = True, limit
    fresh = [origin]
    count, messages, rounds = 1, 0, 0

    def targets(node: int, fanout: int) -> list[int]:
        own = members[cell_of[node]]
        out = [own[rng.randrange(len(own))] for _ in range(fanout)]
        for c in range(cells):
            if c != cell_of[node]:
                out.append(members[c][rng.randrange(len(members[c]))])
        return out

    while count < nodes and rounds < max_rounds:
        rounds += 1
        sends: list[int] = []
        for node in fresh:
            sends.extend(targets(node, profile.eager_fanout))
        for node in range(nodes):
            if left[node] > 0:
                left[node] -= 1
                sends.extend(targets(node, profile.gossip_nodes))
        messages += len(sends)
        fresh = []
        for dst in sends:
            if rng.random() >= loss and not has[dst]:
                has[dst], left[dst] = True, limit
                fresh.append(dst)
        count += len(fresh)
        if push_pull_every and rounds % push_pull_every == 0:
            for node in range(nodes):
                peer = rng.randrange(nodes)
                messages += 2
                if rng.random() < loss:
                    continue
                if has[node] != has[peer]:
                    late = peer if has[node] else node
                    has[late], left[late] = True, limit
                    fresh.append(late)
                    count += 1
    return SimResult(nodes, cells, rounds, messages)


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
                "messages_per_node": round(statistics.median(r.messages for r in runs) / n, 1),
            }
        )
    return out

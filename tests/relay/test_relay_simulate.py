"""The round-based broadcast model: every relay ends up holding the revocation, in a
number of rounds that grows no faster than log n, and the eager push needs fewer
gossip rounds than gossip alone."""

from __future__ import annotations

import math

from keycell.relay.profiles import LOCAL
from keycell.relay.simulate import simulate


def test_the_model_converges_in_logarithmic_rounds_even_with_loss() -> None:
    for n in (300, 3000):
        result = simulate(n, 3, loss=0.05, seed=1)
        assert 0 <= result.rounds <= 2 * math.log2(n)
        assert result.hops >= 1


def test_the_eager_push_needs_fewer_gossip_rounds_than_gossip_alone() -> None:
    gossip_only = LOCAL.with_(eager_fanout=0)
    for seed in range(3):
        eager = simulate(2000, 3, loss=0.05, seed=seed)
        plain = simulate(2000, 3, loss=0.05, seed=seed, profile=gossip_only)
        assert eager.rounds < plain.rounds and plain.hops == 0


def test_anti_entropy_alone_converges_without_any_push() -> None:
    nothing_pushed = LOCAL.with_(eager_fanout=0, retransmit_mult=0)
    result = simulate(200, 2, profile=nothing_pushed, loss=0.0, push_pull_every=1, seed=4)
    assert result.rounds < 200

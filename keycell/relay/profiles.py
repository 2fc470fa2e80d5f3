"""Relay timings as named profiles, never scattered constants.

The shapes follow hashicorp/memberlist's DefaultLANConfig / DefaultWANConfig /
DefaultLocalConfig (probe interval and timeout, indirect checks, suspicion and
retransmit multipliers, push-pull interval, awareness ceiling). What differs is the
broadcast: memberlist gossips every 200 ms (LAN) to 3 nodes, which is why it needs
~1.2-1.8 s to reach 99% of 100 nodes; a relay pushes every new revocation at once
along a broadcast tree (keycell/relay/tree.py) and repairs a lost push within a
tick or two, so the broadcast is bounded by hops of network latency rather than by
gossip ticks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Profile:
    name: str
    probe_interval: float  # seconds between probes of one member (scaled by local health)
    probe_timeout: float  # wait for a direct ack before asking `indirect_checks` peers
    indirect_checks: int
    # Direct pings resent (each after another probe_timeout) before `indirect_checks`
    # peers are asked. memberlist sends a TCP ping to the target alongside its
    # indirect probes for the same reason: a lost message is far likelier than a dead
    # member, and a resent ping costs 2 messages where an indirect probe costs 12
    # (3 ping-reqs, 3 pings, 3 acks, 3 acks back). Under 5% loss 1 probe in 10 misses
    # its first ack; with one retry, 1 in 100 goes indirect.
    probe_retries: int
    suspicion_mult: int  # suspicion min timeout = mult * log10(n) * probe_interval (memberlist)
    suspicion_max_mult: int  # max timeout = this * min timeout (Lifeguard)
    # a rumour is sent mult * ceil(log10(n + 1)) times by each relay (memberlist), the eager push included
    retransmit_mult: int
    gossip_interval: float
    gossip_nodes: int  # (the round model's gossip targets per round, keycell/relay/simulate.py)
    eager_fanout: int  # relays of this cell each relay pushes a revocation to (the tree's fanout)
    cross_links: int  # relays of every other cell this relay keeps streams to
    push_pull_interval: float  # anti-entropy of the revocation set (a 64-bucket digest first)
    sync_interval: float  # push-pull of the whole member table (memberlist's PushPullInterval)
    reconnect_interval: float  # try a dead member again (rejoin after a partition)
    awareness_max: int  # Lifeguard local health multiplier ceiling
    backoff_base: float  # stream reconnect backoff: base * 2^failures, capped
    backoff_max: float
    rumors_per_message: int  # piggybacked rumours per envelope
    # The broadcast tree (keycell/relay/tree.py): a push not acknowledged within the
    # ack timeout (measured, never below `ack_timeout`) is resent, at most `resends`
    # times; a relay that hears (on a ping) an id it lacks asks for the revocation
    # (graft) once `graft_timeout` has passed without the push bringing it.
    graft_timeout: float = 0.1
    ack_timeout: float = 0.05
    resends: int = 3
    # An entry whose revocation expired (`expires_at` > 0) is dropped once expires_at +
    # this grace has passed on the relay's clock; the grace covers clock skew between
    # relays, so none refuses an entry another still spreads as live.
    expiry_grace: float = 300.0
    prune_per_tick: int = 1000  # expired entries dropped per push-pull loop tick at most

    def retransmit_limit(self, members: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(members + 1)))

    def sync_every(self, members: int) -> float:
        """How often a relay pushes its whole member table to a peer: `sync_interval`,
        scaled up past 32 members as memberlist's pushPullScale does (x ceil(log2 n -
        log2 32) + 1: x5 at 300), since the table grows with n and so does the number
        of relays sending it, while rumours keep every table current between syncs."""
        if members <= 32:
            return self.sync_interval
        return self.sync_interval * (math.ceil(math.log2(members) - 5) + 1)

    def suspicion_timeouts(self, members: int) -> tuple[float, float]:
        """(min, max) suspicion timeout for a group of `members` (memberlist's
        suspicionTimeout; Lifeguard's max = suspicion_max_mult * min)."""
        node_scale = max(1.0, math.log10(max(1, members)))
        low = self.suspicion_mult * node_scale * self.probe_interval
        return low, low * self.suspicion_max_mult

    def with_(self, **changes: object) -> Profile:
        return replace(self, **changes)  # type: ignore[arg-type]


# One machine (loopback): network latency is well under a millisecond, but many relays
# may share a loaded CPU, so probes allow 100 ms (event-loop lag is not a failure).
LOCAL = Profile(
    name="local",
    probe_interval=0.5,
    probe_timeout=0.1,
    indirect_checks=3,
    probe_retries=0,  # tests time failure detection on this profile: SWIM as written
    suspicion_mult=3,
    suspicion_max_mult=4,
    retransmit_mult=6,
    gossip_interval=0.02,
    gossip_nodes=3,
    eager_fanout=3,
    cross_links=2,
    push_pull_interval=0.5,
    sync_interval=5.0,
    reconnect_interval=0.5,
    awareness_max=8,
    backoff_base=0.05,
    backoff_max=1.0,
    rumors_per_message=32,
)
# One data centre: memberlist LAN probe timings, a faster broadcast.
LAN = Profile(
    name="lan",
    probe_interval=1.0,
    probe_timeout=0.5,
    indirect_checks=3,
    probe_retries=1,
    suspicion_mult=4,
    suspicion_max_mult=6,
    retransmit_mult=4,
    # (the gossip loop ticks only while it has ids to announce or grafts to time, so
    # a short interval costs an idle relay nothing, and it bounds how late a lost
    # push is repaired: an announcement waits up to one tick, a graft a timeout)
    gossip_interval=0.01,
    gossip_nodes=3,
    eager_fanout=5,  # (a tree of depth 3 over 100 relays, 2 over 30)
    cross_links=2,
    push_pull_interval=10.0,
    sync_interval=30.0,
    reconnect_interval=5.0,
    awareness_max=8,
    backoff_base=0.1,
    backoff_max=10.0,
    rumors_per_message=64,
    ack_timeout=0.01,  # (a floor: the timeout follows the measured round trip)
)
# Cells in different regions: memberlist WAN probe timings.
WAN = Profile(
    name="wan",
    probe_interval=5.0,
    probe_timeout=3.0,
    indirect_checks=3,
    probe_retries=1,
    suspicion_mult=6,
    suspicion_max_mult=6,
    retransmit_mult=4,
    gossip_interval=0.2,
    gossip_nodes=4,
    eager_fanout=3,
    cross_links=3,
    push_pull_interval=30.0,
    sync_interval=60.0,
    reconnect_interval=30.0,
    awareness_max=8,
    backoff_base=0.5,
    backoff_max=30.0,
    rumors_per_message=64,
    graft_timeout=1.0,
    ack_timeout=0.5,
)
PROFILES = {p.name: p for p in (LOCAL, LAN, WAN)}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown relay profile {name!r}; use one of {', '.join(PROFILES)}") from None

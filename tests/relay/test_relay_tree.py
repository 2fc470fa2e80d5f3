"""The revocation broadcast (keycell/relay/tree.py): the tree's shape and its rules on
their own, then real relays over real gRPC streams: a revocation costs n - 1 pushes,
a lost push is resent, and a relay cut off from the tree grafts what it missed from
the ids a peer's ping or ack carries."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from keycell.control_plane.revocations import RevocationRecord, new_revocation_id
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay.cluster import Cluster
from keycell.relay.faults import Faults
from keycell.relay.node import rev_to_pb
from keycell.relay.profiles import LOCAL
from keycell.relay.tree import BroadcastTree, children


def revocation(subject: str, cell: str) -> RevocationRecord:
    return RevocationRecord(new_revocation_id(), subject, cell, time.time(), "test")


@contextlib.asynccontextmanager
async def one_cell(sinks, relays: int, seed: int, **options: Any) -> AsyncIterator[Cluster]:
    """`relays` relays of cell a, started and agreed on their members; stopped after."""
    cluster = Cluster(sinks={"a": sinks["a"]}, seed=seed, **options)
    await cluster.start({"a": relays})
    try:
        assert await cluster.wait_for(cluster.converged_members, 10)
        yield cluster
    finally:
        await cluster.stop()


def depth_of(ring: list[str], root: str, fanout: int) -> tuple[int, list[str]]:
    """Walk the tree from `root`: its depth in hops, and every relay reached (in order)."""
    reached, level, depth = [root], [root], 0
    while level:
        level = [c for parent in level for c in children(ring, root, parent, fanout)]
        reached += level
        depth += bool(level)
    return depth, reached


def test_every_relay_is_in_the_tree_once_whatever_the_root_within_log_n_hops() -> None:
    for n, fanout in ((1, 3), (2, 3), (30, 5), (100, 5), (101, 4)):
        ring = sorted(f"127.0.0.1:{10_000 + i}" for i in range(n))
        for root in (ring[0], ring[n // 2], ring[-1]):
            depth, reached = depth_of(ring, root, fanout)
            assert sorted(reached) == ring  # each once: n - 1 pushes
            assert depth <= math.ceil(math.log(max(n, 2), fanout)) + 1


def test_a_root_off_the_ring_makes_the_relay_root_its_own_subtree() -> None:
    ring = ["a", "b", "c", "d", "e"]
    assert children(ring, "gone", "c", 2) == children(ring, "c", "c", 2) == ["d", "e"]
    assert children(ring, "a", "zz", 2) == []  # a relay not on its own ring pushes nothing


def test_a_push_is_resent_until_acked_and_given_up_after_the_limit() -> None:
    tree = BroadcastTree(graft_timeout=0.1, ack_timeout=0.05, resends=2)
    tree.pushed("r1", ["p1", "p2"], now=10.0)
    assert tree.resends_due(10.04) == {}
    tree.acked("p1", ["r1"], now=10.01)
    assert tree.resends_due(10.05) == {"p2": ["r1"]}
    assert tree.rto == 0.1  # a timeout backs the timer off
    assert tree.resends_due(10.1) == {}
    assert tree.resends_due(10.15) == {"p2": ["r1"]}  # second resend
    assert tree.resends_due(10.4) == {} and not tree.busy()  # given up after 2
    tree.pushed("r2", ["p1"], now=11.0)
    tree.acked("p1", ["r2"], now=11.001)  # an ack of a first send: measured again
    assert tree.rto == 0.05


def test_the_ack_timeout_follows_the_measured_round_trip() -> None:
    tree = BroadcastTree(graft_timeout=0.1, ack_timeout=0.01, resends=3)
    for i in range(20):
        tree.pushed(f"r{i}", ["p"], now=float(i))
        tree.acked("p", [f"r{i}"], now=i + 0.1)  # 100 ms round trips: a loaded peer
    assert 0.1 <= tree.rto <= 0.2  # waits past the round trip instead of resending into it
    assert tree.forget_peers({"p"}) is None and not tree.busy()


def test_a_missing_revocation_is_grafted_from_each_announcer_in_turn_until_it_arrives() -> None:
    tree = BroadcastTree(graft_timeout=0.5, ack_timeout=0.05, resends=3)
    assert tree.announced("r1", "p1", now=10.0) is True
    assert tree.announced("r1", "p2", now=10.1) is False  # already missing: a second announcer
    held: set[str] = set()
    assert tree.grafts_due(10.4, held.__contains__) == {}  # the push may still come
    assert tree.grafts_due(10.5, held.__contains__) == {"p1": ["r1"]}
    assert tree.grafts_due(10.9, held.__contains__) == {}
    assert tree.grafts_due(11.0, held.__contains__) == {"p2": ["r1"]}  # p1's answer was lost
    tree.announced("r2", "p1", now=11.0)
    held.add("r2")  # arrived by the tree meanwhile: no graft
    assert tree.grafts_due(12.0, held.__contains__) == {}
    assert not tree.missing


def test_with_no_loss_a_revocation_costs_about_one_push_per_relay(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(sinks=sinks, seed=3)
        await cluster.start({"a": 6, "b": 4, "c": 4})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relays = cluster.live()
            for i, origin in enumerate(("a-0", "b-2", "a-5")):
                rec = revocation(f"token:tree-{i}", origin[0])
                sinks[origin[0]].log.apply(rec)
                before = sum(r.counters["eager_pushes"] for r in relays)
                cluster.relays[origin].submit(rec)
                assert await cluster.wait_for(lambda rid=rec.id: all(rid in r.applied for r in relays), 5)
                assert await cluster.wait_for(lambda: not any(r.tree.busy() for r in relays), 5)  # all acked
                pushes = sum(r.counters["eager_pushes"] for r in relays) - before
                # n - 1 while every relay's view of its cell agrees; where views differ
                # for a moment (a member suspected dead on a loaded machine) a relay
                # roots its own subtree (a few more) or one is left to its graft
                assert pushes <= 2 * (len(relays) - 1)
        finally:
            await cluster.stop()

    asyncio.run(scenario())


@dataclass
class DropFirstPush(Faults):
    """Drops the first envelope from `src` to `dst` once `armed` (a lost datagram)."""

    src: str = ""
    dst: str = ""
    armed: bool = False

    def drop(self, src: str, dst: str) -> bool:
        if self.armed and (src, dst) == (self.src, self.dst):
            self.armed = False
            return True
        return super().drop(src, dst)


def test_a_lost_push_is_resent_and_the_whole_subtree_still_gets_it(sinks) -> None:
    async def scenario() -> None:
        faults = DropFirstPush()
        async with one_cell(sinks, 7, seed=4, faults=faults) as cluster:
            relays = cluster.live()
            root = cluster.relays["a-0"]
            kids = children(root._ring(), root.addr, root.addr, LOCAL.eager_fanout)
            faults.src, faults.dst, faults.armed = root.addr, kids[0], True
            rec = revocation("token:resent", "a")
            sinks["a"].log.apply(rec)
            root.submit(rec)
            assert await cluster.wait_for(lambda: all(rec.id in r.applied for r in relays), 5)
            assert not faults.armed  # the push to that child was dropped
            assert root.counters["resends"] >= 2  # (at least) that push, resent twice

    asyncio.run(scenario())


def test_a_relay_cut_off_from_the_tree_grafts_what_it_missed(sinks) -> None:
    """One relay can reach only one peer, not its parent: every push to it is lost,
    resends included, until a ping or ack from that peer carries the revocation's id
    and the relay grafts it from there, then pushes it on to its own children.
    Anti-entropy is slowed down so that only the graft can bring it in time."""

    async def scenario() -> None:
        profile = LOCAL.with_(push_pull_interval=60.0)
        async with one_cell(sinks, 5, seed=5, profile=profile) as cluster:
            relays = cluster.live()
            root = cluster.relays["a-0"]
            ring = root._ring()
            parent_of = {c: p for p in ring for c in children(ring, root.addr, p, profile.eager_fanout)}
            target = next(r for r in relays if r.addr in parent_of)
            peer = next(r for r in relays if r.addr not in (target.addr, parent_of[target.addr]))
            faults = cluster.faults
            for r in relays:
                faults.groups[r.addr] = "rest"
            faults.groups[target.addr] = "target"
            faults.groups[peer.addr] = "peer"
            faults.partition("target", "rest")
            rec = revocation("token:pulled", "a")
            sinks["a"].log.apply(rec)
            root.submit(rec)
            assert await cluster.wait_for(lambda: rec.id in target.applied, 5)
            assert target.counters["grafts_sent"] >= 1
            assert peer.counters["grafts_received"] >= 1
            faults.heal()
            assert await cluster.wait_for(lambda: all(rec.id in r.applied for r in relays), 5)

    asyncio.run(scenario())


def test_a_relay_first_reached_by_a_repair_pushes_on_when_the_tree_push_comes(sinks) -> None:
    """A repair (anti-entropy, a graft answered without a root) goes no further. A relay
    it reached first used to take the tree's push, arriving later, for a copy and leave
    its children to their own grafts; it now pushes on down its subtree (counted: one
    push to each child, with anti-entropy and grafts slowed down)."""

    async def scenario() -> None:
        profile = LOCAL.with_(push_pull_interval=60.0, graft_timeout=30.0)
        async with one_cell(sinks, 8, seed=6, profile=profile) as cluster:
            relays = cluster.live()
            root = cluster.relays["a-0"]
            ring, fanout = root._ring(), profile.eager_fanout
            inner = next(
                r
                for r in relays
                if r.addr in children(ring, root.addr, root.addr, fanout)
                and children(ring, root.addr, r.addr, fanout)
            )
            below = children(ring, root.addr, inner.addr, fanout)
            peer = next(r for r in relays if r.addr not in (root.addr, inner.addr, *below))
            rec = revocation("token:repaired-first", "a")
            sinks["a"].log.apply(rec)
            inner._learn(pb.Entry(revocation=rev_to_pb(rec)), peer.addr, None)  # the repair
            assert "r/" + rec.id in inner.store.entries and inner.counters["eager_pushes"] == 0
            root.submit(rec)
            assert await cluster.wait_for(lambda: all(rec.id in r.applied for r in relays), 5)
            assert inner.counters["pushed_on_after_repair"] == 1
            assert inner.counters["eager_pushes"] == len(below)

    asyncio.run(scenario())

"""The revocation broadcast tree (keycell/relay/tree.py, Plumtree): its rules on their
own, then real relays over real gRPC streams: a second copy makes its link lazy,
later revocations travel the pruned tree once per relay, and a relay whose eager
links drop the push pulls the revocation by graft from a lazy one."""

from __future__ import annotations

import asyncio
import random
import time

from keycell.control_plane.revocations import RevocationRecord, new_revocation_id
from keycell.relay.cluster import Cluster
from keycell.relay.tree import BroadcastTree


def revocation(subject: str, cell: str) -> RevocationRecord:
    return RevocationRecord(new_revocation_id(), subject, cell, time.time(), "test")


def tree(fanout: int = 2, lazy_fanout: int = 1, graft_timeout: float = 0.5) -> BroadcastTree:
    return BroadcastTree(
        random.Random(1), fanout=fanout, lazy_fanout=lazy_fanout, graft_timeout=graft_timeout
    )


def test_a_second_copy_makes_its_link_lazy_and_a_graft_makes_it_eager_again() -> None:
    t = tree(fanout=3)
    t.refresh(["p1", "p2", "p3", "p4"], ["x1"])
    assert len(t.eager & {"p1", "p2", "p3", "p4"}) == 3 and "x1" in t.eager and not t.lazy
    pushed = t.first("r1", "p1")
    assert "p1" not in pushed and set(pushed) == t.eager - {"p1"}
    t.duplicate("x1")
    assert "x1" in t.lazy and "x1" not in t.eager
    t.duplicate("x2")  # a relay that chose this one: now a lazy neighbour here too
    assert "x2" in t.lazy and "x2" not in t.eager
    t.grafted("x1")
    assert "x1" in t.eager and "x1" not in t.lazy
    t.pruned("x1")
    assert "x1" in t.lazy


def test_a_new_revocation_id_goes_to_lazy_links_only() -> None:
    t = tree(fanout=2, lazy_fanout=2)
    t.refresh(["p1", "p2"], [])
    for peer in ("p1", "p2"):
        t.duplicate(peer)  # both lazy now
    assert t.first("r1", "") == []  # no eager link: nothing pushed whole
    assert t.take_announcements() == {"p1": ["r1"], "p2": ["r1"]}
    assert t.take_announcements() == {} and not t.busy()


def test_a_missing_revocation_is_grafted_from_each_announcer_in_turn_until_it_arrives() -> None:
    t = tree(graft_timeout=0.5)
    assert t.announced("r1", "p1", now=10.0) is True
    assert t.announced("r1", "p2", now=10.1) is False  # already missing: a second announcer
    held: set[str] = set()
    assert t.due(10.4, held.__contains__) == {}  # the eager copy may still come
    assert t.due(10.5, held.__contains__) == {"p1": ["r1"]}
    assert "p1" in t.eager  # the graft made that link eager
    assert t.due(10.9, held.__contains__) == {}
    assert t.due(11.0, held.__contains__) == {"p2": ["r1"]}  # p1's answer was lost: ask p2
    t.announced("r2", "p1", now=11.0)
    held.add("r2")  # arrived by the eager path meanwhile: no graft
    assert t.due(12.0, held.__contains__) == {}
    assert not t.busy()


def test_a_dead_neighbour_is_replaced_by_another_relay_of_the_cell() -> None:
    t = tree(fanout=2)
    t.refresh(["p1", "p2", "p3"], [])
    linked = set(t.eager)
    gone = sorted(linked)[0]
    t.refresh([p for p in ("p1", "p2", "p3") if p != gone], [])
    assert gone not in t.eager and len(t.eager) == 2


def test_later_revocations_travel_the_pruned_tree_once_per_relay(sinks) -> None:
    """No loss: the first broadcasts prune every cycle away, after which a revocation
    is pushed n - 1 times and no relay hears one twice."""

    async def scenario() -> None:
        cluster = Cluster(sinks={"a": sinks["a"]}, seed=3)
        await cluster.start({"a": 6})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relays = cluster.live()
            n = len(relays)
            for i in range(6):
                rec = revocation(f"token:tree-{i}", "a")
                sinks["a"].log.apply(rec)
                relays[i % n].submit(rec)
                assert await cluster.wait_for(lambda rid=rec.id: all(rid in r.applied for r in relays), 5)
                assert await cluster.wait_for(lambda: not any(r.tree.busy() for r in relays), 5)
            assert sum(r.counters["prunes_sent"] for r in relays) >= 1
            assert any(r.tree.lazy for r in relays)
            pushes = sum(r.counters["eager_pushes"] for r in relays)
            copies = sum(r.counters["revocation_copies"] for r in relays)
            rec = revocation("token:tree-last", "a")
            sinks["a"].log.apply(rec)
            relays[0].submit(rec)
            assert await cluster.wait_for(lambda: all(rec.id in r.applied for r in relays), 5)
            await asyncio.sleep(0.2)
            assert sum(r.counters["revocation_copies"] for r in relays) == copies
            assert sum(r.counters["eager_pushes"] for r in relays) - pushes == n - 1
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_a_relay_whose_eager_links_drop_the_push_pulls_it_by_graft(sinks) -> None:
    """After a first revocation has pruned the cycles, every link into one relay that
    is still eager is cut: the next revocation's push to it is lost, an id reaches it
    on a lazy link, and it grafts the revocation from there (that link becomes eager)."""

    async def scenario() -> None:
        cluster = Cluster(sinks={"a": sinks["a"]}, seed=5)
        await cluster.start({"a": 5})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relays = cluster.live()
            for i in range(3):
                first = revocation(f"token:before-{i}", "a")
                sinks["a"].log.apply(first)
                relays[i].submit(first)
                assert await cluster.wait_for(lambda rid=first.id: all(rid in r.applied for r in relays), 5)
            assert await cluster.wait_for(lambda: not any(r.tree.busy() for r in relays), 5)
            # a relay with a lazy link, other than the one the next revocation starts at
            target = next(r for r in relays[1:] if r.tree.lazy)
            by_addr = {r.addr: r for r in relays}
            faults = cluster.faults
            faults.groups[target.addr] = "target"
            cut = [by_addr[a] for a in target.tree.eager if a in by_addr]
            for i, peer in enumerate(cut):
                faults.groups[peer.addr] = f"cut-{i}"
                faults.partition("target", f"cut-{i}")
            lazy_before = set(target.tree.lazy)
            rec = revocation("token:pulled", "a")
            sinks["a"].log.apply(rec)
            relays[0].submit(rec)
            assert await cluster.wait_for(lambda: rec.id in target.applied, 5)
            assert target.counters["grafts_sent"] >= 1
            assert target.tree.eager & lazy_before  # the link it pulled from is eager now
            faults.heal()
        finally:
            await cluster.stop()

    asyncio.run(scenario())

"""The relay end to end: revocations reach every relay and every cell's ledger
through loss, partitions, and relays dying and coming back."""

from __future__ import annotations

import asyncio
import time

from keycell.control_plane.revocations import RevocationRecord, new_revocation_id
from keycell.relay.cluster import Cluster
from keycell.relay.faults import Faults
from keycell.relay.membership import State


def revocation(subject: str, cell: str) -> RevocationRecord:
    return RevocationRecord(new_revocation_id(), subject, cell, time.time(), "test")


def everywhere(cluster: Cluster, rid: str) -> bool:
    return all(rid in relay.applied for relay in cluster.live())


def test_a_revocation_reaches_every_relay_and_every_cell_ledger_despite_loss(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(faults=Faults(loss=0.05), sinks=sinks, seed=7)
        await cluster.start({"a": 3, "b": 3, "c": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            revs = [revocation(f"token:acc{i}", "a") for i in range(10)]
            for rec in revs:
                sinks["a"].log.apply(rec)  # the revoke call's CP step, then the hand-over
                cluster.relays[f"a-{revs.index(rec) % 3}"].submit(rec)
            assert await cluster.wait_for(lambda: all(everywhere(cluster, r.id) for r in revs), 10)
            subjects = {r.subject for r in revs}
            for sink in sinks.values():
                assert subjects <= sink.subjects()
            # every cell's receipt reaches every relay (what sys/revocations/:id reports)
            assert await cluster.wait_for(
                lambda: all(f"a/{r.id}/{c}" in x.store for r in revs for c in "abc" for x in cluster.live()),
                10,
            )
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_after_a_partition_heals_every_relay_and_ledger_holds_the_same_set(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(sinks=sinks, seed=11)
        await cluster.start({"a": 3, "b": 3, "c": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            cluster.faults.partition("c", "a")
            cluster.faults.partition("c", "b")
            inside = revocation("lease:db/creds/one", "a")
            outside = revocation("token:cut-off", "c")
            sinks["a"].log.apply(inside)
            cluster.relays["a-0"].submit(inside)
            sinks["c"].log.apply(outside)
            cluster.relays["c-1"].submit(outside)
            cut = [r for r in cluster.live() if r.cell == "c"]
            rest = [r for r in cluster.live() if r.cell != "c"]
            assert await cluster.wait_for(lambda: all(inside.id in r.applied for r in rest), 5)
            assert await cluster.wait_for(lambda: all(outside.id in r.applied for r in cut), 5)
            assert all(inside.id not in r.applied for r in cut)
            assert all(outside.id not in r.applied for r in rest)
            assert inside.subject not in sinks["c"].subjects()
            # each side comes to see the other as failed
            assert await cluster.wait_for(
                lambda: all(
                    r.table.get(o.name).state == State.DEAD  # type: ignore[union-attr]
                    for r in rest
                    for o in cut
                ),
                15,
            )
            cluster.faults.heal()
            both = {inside.id, outside.id}
            assert await cluster.wait_for(lambda: all(both <= r.revocation_ids() for r in cluster.live()), 15)
            assert await cluster.wait_for(lambda: all(both <= set(r.applied) for r in cluster.live()), 5)
            assert await cluster.wait_for(cluster.converged_members, 15)
            sets = [r.revocation_ids() for r in cluster.live()]
            assert all(s == sets[0] for s in sets)
            ledgers = [s.subjects() for s in sinks.values()]
            assert all(ledger == {inside.subject, outside.subject} for ledger in ledgers)
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_killing_a_fifth_of_the_relays_during_a_broadcast_still_reaches_every_live_one(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(faults=Faults(loss=0.05), sinks=sinks, seed=3)
        await cluster.start({"a": 4, "b": 4, "c": 4})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            rec = revocation("spiffe:spiffe://example.org/payments", "b")
            sinks["b"].log.apply(rec)
            cluster.relays["b-0"].submit(rec)
            victims = ["a-1", "b-2", "c-3"]  # 3 of 12 (20%, rounded up), while the rumour spreads
            await asyncio.gather(*(cluster.kill(v) for v in victims))
            assert await cluster.wait_for(lambda: everywhere(cluster, rec.id), 10)
            for sink in sinks.values():
                assert rec.subject in sink.subjects()
            # the survivors declare the victims dead (SWIM, suspicion timeout)
            assert await cluster.wait_for(
                lambda: all(
                    r.table.get(v).state == State.DEAD  # type: ignore[union-attr]
                    for r in cluster.live()
                    for v in victims
                    if r.table.get(v) is not None
                ),
                15,
            )
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_a_restarted_relay_rejoins_and_catches_up_on_what_it_missed(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(sinks=sinks, seed=5)
        await cluster.start({"a": 3, "b": 3, "c": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            await cluster.kill("b-1")
            missed = revocation("token:while-away", "a")
            sinks["a"].log.apply(missed)
            cluster.relays["a-2"].submit(missed)
            assert await cluster.wait_for(lambda: everywhere(cluster, missed.id), 5)
            back = await cluster.restart("b-1")
            assert await cluster.wait_for(lambda: missed.id in back.revocation_ids(), 10)
            assert await cluster.wait_for(cluster.converged_members, 15)
            others = [r for r in cluster.live() if r is not back]
            assert all(r.table.get("b-1").state == State.ALIVE for r in others)  # type: ignore[union-attr]
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_the_cells_api_processes_get_each_applied_revocation_pushed_over_grpc(sinks) -> None:
    from keycell.relay.subscriber import RelaySubscription

    async def scenario() -> None:
        cluster = Cluster(sinks=sinks, seed=2)
        await cluster.start({"a": 2, "b": 2})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            heard: list[tuple[str, str]] = []
            follow = RelaySubscription(
                cluster.relays["b-1"].addr, lambda ev: heard.append((ev.id, ev.subject))
            )
            follow.start()
            assert await asyncio.to_thread(follow.ready.wait, 5)
            rec = revocation("lease:aws/creds/x/1", "a")
            sinks["a"].log.apply(rec)
            cluster.relays["a-0"].submit(rec)
            assert await cluster.wait_for(lambda: (rec.id, rec.subject) in heard, 5)
            # pushed only once cell b's ledger holds it: a check there already refuses it
            assert rec.subject in sinks["b"].subjects()
            follow.stop()
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_delayed_and_jittered_messages_still_deliver_every_revocation(sinks) -> None:
    async def scenario() -> None:
        cluster = Cluster(faults=Faults(loss=0.05, delay=0.005, jitter=0.02), sinks=sinks, seed=9)
        await cluster.start({"a": 3, "b": 3, "c": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            revs = [revocation(f"lease:pki/issue/web/{i}", "c") for i in range(5)]
            for rec in revs:
                sinks["c"].log.apply(rec)
                cluster.relays["c-0"].submit(rec)
            assert await cluster.wait_for(lambda: all(everywhere(cluster, r.id) for r in revs), 10)
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_relay_metrics_are_served_as_prometheus_text(sinks) -> None:
    from keycell.relay.metrics import serve_metrics

    async def scenario() -> None:
        cluster = Cluster(sinks=sinks, seed=4)
        await cluster.start({"a": 2, "b": 2})
        server = await serve_metrics("127.0.0.1", 0, cluster.live)
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            rec = revocation("token:metrics", "a")
            sinks["a"].log.apply(rec)
            cluster.relays["a-0"].submit(rec)
            assert await cluster.wait_for(lambda: everywhere(cluster, rec.id), 5)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = (await reader.read()).decode()
            writer.close()
            assert reply.startswith("HTTP/1.0 200")
            assert 'keycell_relay_members{relay="a-0",cell="a",state="alive"} 4' in reply
            assert 'keycell_relay_revocations_applied_total{relay="b-1"} 1' in reply
            assert 'keycell_relay_exposure_seconds_count{relay="b-0"} 1' in reply
            assert "keycell_relay_suspicions_total" in reply and "keycell_relay_messages_total" in reply
        finally:
            server.close()
            await cluster.stop()

    asyncio.run(scenario())


def test_a_relay_sends_a_revocation_to_each_peer_at_most_once_and_then_stops(sinks) -> None:
    """A revocation goes along the broadcast tree: nothing goes back to the relay it
    came from or twice to one peer, and once every relay holds it the tree has nothing
    left to announce or graft."""

    async def scenario() -> None:
        cluster = Cluster(sinks={"a": sinks["a"]}, seed=5)
        await cluster.start({"a": 6})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            rec = revocation("token:once", "a")
            sinks["a"].log.apply(rec)
            cluster.relays["a-0"].submit(rec)
            assert await cluster.wait_for(lambda: everywhere(cluster, rec.id), 5)
            assert await cluster.wait_for(lambda: not any(r.tree.busy() for r in cluster.live()), 5)
            n = len(cluster.live())
            copies = sum(r.counters["revocation_copies"] for r in cluster.live())
            assert copies <= n * (n - 1) - (n - 1)  # every ordered pair at most once, first copies aside
            # pushed down the tree: about one push per relay (see test_relay_tree.py)
            assert sum(r.counters["eager_pushes"] for r in cluster.live()) <= 2 * (n - 1)
        finally:
            await cluster.stop()

    asyncio.run(scenario())

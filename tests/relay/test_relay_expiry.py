"""Expiry: a relay drops a revocation (and its receipts) once `expires_at` plus the
profile's grace has passed, refuses it from then on, and the relays' digests agree
again. Relays read a clock hook for expiry; the tests move a ManualClock instead of
waiting minutes (the cells' ledgers keep running on real time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from keycell.control_plane.revocations import RevocationRecord, new_revocation_id
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay._pb import relay_pb2_grpc as pb_grpc
from keycell.relay.broadcast import BUCKETS, EntryStore
from keycell.relay.cluster import Cluster
from keycell.relay.metrics import render
from keycell.relay.node import Relay, rev_to_pb
from keycell.relay.profiles import LOCAL
from keycell.testing.clock import ManualClock

GRACE = LOCAL.expiry_grace
TTL = 120  # seconds a short-lived revocation's subject stays usable


def revocation(subject: str, cell: str, expires_at: int | None = None) -> RevocationRecord:
    return RevocationRecord(new_revocation_id(), subject, cell, time.time(), "test", expires_at)


def keys_of(rec: RevocationRecord, cells: str = "abc") -> list[str]:
    return ["r/" + rec.id] + [f"a/{rec.id}/{c}" for c in cells]


def digests_equal(relays: list[Relay]) -> bool:
    return all(r.store.digest == relays[0].store.digest for r in relays)


def test_removing_an_entry_restores_the_digest_and_the_bucket_keys() -> None:
    store = EntryStore()
    store.add("r/keep", "x")
    before = list(store.digest)
    keys = [f"a/rv_{i}/c" for i in range(200)]
    for k in keys:
        store.add(k, k)
    assert store.digest != before
    for k in keys:
        assert store.remove(k) == k
    assert store.remove(keys[0]) is None  # gone already: nothing changes
    assert store.digest == before and len(store) == 1
    assert store.keys_in(range(BUCKETS)) == ["r/keep"]


def test_pruning_does_bounded_work_per_tick_and_takes_receipts_with_their_revocation() -> None:
    clock = ManualClock()
    relay = Relay("solo", "a", profile=LOCAL.with_(prune_per_tick=2), clock=clock)
    now = int(clock())
    for i in range(5):
        rid = f"rv_{i}"
        relay._store(
            "r/" + rid, pb.Entry(revocation=pb.Revocation(id=rid, subject="token:t", expires_at=now))
        )
        # a receipt from a relay that predates Receipt.expires_at: goes with its revocation
        relay._store(f"a/{rid}/b", pb.Entry(receipt=pb.Receipt(id=rid, cell="b")))
    relay._store("r/never", pb.Entry(revocation=pb.Revocation(id="never", subject="token:n")))
    assert relay.prune() == 0  # not past the grace yet
    clock.advance(GRACE + 1)
    assert relay.prune() == 4  # two revocations (the tick's budget), each with its receipt
    assert relay.prune() == 4
    assert relay.prune() == 2
    assert relay.prune() == 0
    assert set(relay.store.entries) == {"r/never"}
    assert relay.counters["entries_expired"] == 10


def test_expired_revocations_and_receipts_leave_every_relay_and_the_digests_agree(sinks) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        cluster = Cluster(sinks=sinks, seed=21, clock=clock)
        await cluster.start({"a": 2, "b": 2, "c": 2})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            short = [revocation(f"token:short{i}", "abc"[i % 3], int(clock()) + TTL) for i in range(3)]
            lasting = [revocation(f"token:lasting{i}", "abc"[i % 3]) for i in range(2)]
            for i, rec in enumerate(short + lasting):
                sinks[rec.origin_cell].log.apply(rec)
                cluster.relays[f"{rec.origin_cell}-{i % 2}"].submit(rec)
            every_key = [k for rec in short + lasting for k in keys_of(rec)]
            assert await cluster.wait_for(
                lambda: all(k in r.store for k in every_key for r in cluster.live()), 10
            )
            assert await cluster.wait_for(lambda: digests_equal(cluster.live()), 5)

            clock.advance(TTL + GRACE - 30)  # expired, but inside the grace: nothing goes yet
            await asyncio.sleep(3 * LOCAL.push_pull_interval)
            assert all(k in r.store for k in every_key for r in cluster.live())

            clock.advance(32)
            gone = [k for rec in short for k in keys_of(rec)]
            assert await cluster.wait_for(
                lambda: not any(k in r.store for k in gone for r in cluster.live()), 5
            )
            assert await cluster.wait_for(lambda: digests_equal(cluster.live()), 5)
            for relay in cluster.live():
                # every revocation with its three cells' receipts, on every relay
                assert relay.counters["entries_expired"] == len(gone)
                assert relay.revocation_ids() == {rec.id for rec in lasting}
                assert all(k in relay.store for rec in lasting for k in keys_of(rec))
                assert not any(rec.id in relay.heard or rec.id in relay.applied for rec in short)
                assert not any(k in relay.rumors for k in gone)
            for sink in sinks.values():
                assert all(sink.known(rec.id) is None for rec in short)
            text = render(cluster.live())
            assert f'keycell_relay_entries_expired_total{{relay="a-0"}} {len(gone)}' in text
            assert f'keycell_relay_entries{{relay="b-1"}} {len(keys_of(lasting[0])) * len(lasting)}' in text

            # anti-entropy and ledger sweeps keep running: nothing comes back, not even
            # into a relay restarted on a ledger that still holds the expired records
            await cluster.kill("c-1")
            back = await cluster.restart("c-1")
            assert await cluster.wait_for(cluster.converged_members, 15)
            assert await cluster.wait_for(lambda: all(k in back.store for k in keys_of(lasting[0])), 5)
            await asyncio.sleep(4 * LOCAL.push_pull_interval)
            assert not any(k in r.store for k in gone for r in cluster.live())
            assert await cluster.wait_for(lambda: digests_equal(cluster.live()), 5)
            for sink in sinks.values():  # the ledgers are not the relays' to prune (their own TTL)
                assert {rec.subject for rec in short + lasting} <= sink.subjects()
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_a_relay_still_holding_an_expired_entry_after_a_partition_does_not_bring_it_back(sinks) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        cluster = Cluster(sinks=sinks, seed=23, clock=clock)
        await cluster.start({"a": 2, "b": 2, "c": 2})
        lagging = ManualClock(clock())  # cell c's relays run behind by the time the test says
        cut = [r for r in cluster.live() if r.cell == "c"]
        rest = [r for r in cluster.live() if r.cell != "c"]
        for relay in cut:
            relay.clock = lagging
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            rec = revocation("lease:db/creds/short", "a", int(clock()) + TTL)
            sinks["a"].log.apply(rec)
            cluster.relays["a-0"].submit(rec)
            assert await cluster.wait_for(
                lambda: all(k in r.store for k in keys_of(rec) for r in cluster.live()), 10
            )

            cluster.faults.partition("c", "a")
            cluster.faults.partition("c", "b")
            clock.advance(TTL + GRACE + 1)
            assert await cluster.wait_for(
                lambda: not any(k in r.store for k in keys_of(rec) for r in rest), 5
            )
            assert all(k in r.store for k in keys_of(rec) for r in cut)
            assert await cluster.wait_for(lambda: digests_equal(rest), 5)

            cluster.faults.heal()
            # cell c offers what it holds by anti-entropy; the others refuse it each time
            assert await cluster.wait_for(lambda: sum(r.counters["expired_refused"] for r in rest) >= 3, 15)
            assert not any(k in r.store for k in keys_of(rec) for r in rest)
            assert cut[0].store.digest != rest[0].store.digest

            lagging.advance(TTL + GRACE + 1)  # now c's relays drop it too
            assert await cluster.wait_for(lambda: digests_equal(cluster.live()), 5)
            assert not any(k in r.store for k in keys_of(rec) for r in cluster.live())
            assert all(r.counters["entries_expired"] == len(keys_of(rec)) for r in cluster.live())
            await asyncio.sleep(3 * LOCAL.push_pull_interval)
            assert digests_equal(cluster.live())
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_an_expired_revocation_submitted_or_gossiped_is_not_stored_but_one_in_its_grace_is(sinks) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        cluster = Cluster(sinks=sinks, seed=25, clock=clock)
        await cluster.start({"a": 2, "b": 1})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relay = cluster.relays["a-0"]
            channel = grpc.aio.insecure_channel(relay.addr)
            stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]

            # past expires_at but inside the grace: still a revocation; spread and applied
            recent = revocation("token:recent", "a", int(clock()) + TTL)
            clock.advance(TTL + GRACE - 30)
            assert (await stub.Submit(rev_to_pb(recent), timeout=5)).accepted
            assert await cluster.wait_for(lambda: all(recent.id in r.applied for r in cluster.live()), 5)
            assert recent.subject in sinks["a"].subjects() and recent.subject in sinks["b"].subjects()

            # past the grace: refused by Submit and by a gossiped rumour, stored nowhere
            old = revocation("token:old", "a", int(clock()) - int(GRACE) - 1)
            assert not (await stub.Submit(rev_to_pb(old), timeout=5)).accepted
            late_receipt = pb.Receipt(
                id=old.id, cell="c", applied_at=time.time(), expires_at=old.expires_at or 0
            )
            # and a receipt as a relay predating Receipt.expires_at sends it (field absent)
            unaware = pb.Receipt(id=recent.id, cell="c", applied_at=time.time())
            rumors = [
                pb.Rumor(entry=pb.Entry(revocation=rev_to_pb(old))),
                pb.Rumor(entry=pb.Entry(receipt=late_receipt)),
                pb.Rumor(entry=pb.Entry(receipt=unaware)),
            ]

            async def gossip() -> None:
                call = stub.Stream(aiter_of([pb.Envelope(rumors=rumors)]))
                async for _ in call:
                    pass

            await asyncio.wait_for(gossip(), 5)
            assert relay.counters["expired_refused"] >= 3
            await asyncio.sleep(2 * LOCAL.push_pull_interval)
            assert not any(k in r.store for k in keys_of(old) for r in cluster.live())
            assert old.subject not in sinks["a"].subjects()
            # the receipt took its revocation's expiry, and spread with it
            assert relay.store.entries[f"a/{recent.id}/c"].receipt.expires_at == recent.expires_at
            assert await cluster.wait_for(
                lambda: all(f"a/{recent.id}/c" in r.store for r in cluster.live()), 5
            )

            # the one inside its grace goes once the grace is over, and stays gone
            clock.advance(31)
            assert await cluster.wait_for(
                lambda: not any(recent.id in r.revocation_ids() for r in cluster.live()), 5
            )
            assert await cluster.wait_for(
                lambda: not any(k in r.store for k in keys_of(recent) for r in cluster.live()), 5
            )
            assert not (await stub.Submit(rev_to_pb(recent), timeout=5)).accepted
            assert recent.subject in sinks["a"].subjects()  # the ledger is left to its TTL
            await channel.close()
        finally:
            await cluster.stop()

    asyncio.run(scenario())


async def aiter_of(items: list[pb.Envelope]) -> AsyncIterator[pb.Envelope]:
    for item in items:
        yield item

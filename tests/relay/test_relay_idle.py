"""What an idle relay does not spend: one channel per peer however many probes go
to it, a lost ping resent before any helper is asked, and no gossip or suspicion
ticks while nothing is hot. Real relays on loopback gRPC (keycell/relay/cluster.py)."""

from __future__ import annotations

import asyncio

from keycell.control_plane.revocations import RevocationRecord
from keycell.relay.cluster import Cluster
from keycell.relay.faults import Faults
from keycell.relay.profiles import LOCAL


class DropNext(Faults):
    """Drops the next `count` envelopes from one address to another, and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[tuple[str, str], int] = {}

    def drop(self, src: str, dst: str) -> bool:
        left = self.pending.get((src, dst), 0)
        if left:
            self.pending[(src, dst)] = left - 1
            return True
        return super().drop(src, dst)


def test_many_probes_of_one_peer_share_one_channel() -> None:
    async def scenario() -> None:
        cluster = Cluster(seed=5)
        await cluster.start({"a": 2})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            prober = cluster.relays["a-0"]
            assert prober.table is not None
            target = prober.table.get("a-1")
            assert target is not None
            opened = prober.counters["channels_opened"]
            for _ in range(20):
                await prober._probe(target, prober.profile.probe_interval)
            assert prober.counters["probes_failed"] == 0
            assert prober.counters["channels_opened"] - opened <= 1  # the first contact, if any
            assert sum(1 for addr in prober._channels if addr == target.addr) <= 1
            assert target.addr in prober.links  # the stream stays up between probes
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_a_lost_ping_is_resent_before_any_helper_is_asked() -> None:
    async def scenario() -> None:
        faults = DropNext()
        cluster = Cluster(profile=LOCAL.with_(probe_retries=1), faults=faults, seed=6)
        await cluster.start({"a": 4})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            prober = cluster.relays["a-0"]
            assert prober.table is not None
            target = prober.table.get("a-1")
            assert target is not None
            before = dict(prober.counters)
            faults.pending[(prober.addr, target.addr)] = 1  # the first ping is lost
            await prober._probe(target, prober.profile.probe_interval)
            assert prober.counters["probe_retries"] - before.get("probe_retries", 0) == 1
            assert prober.counters["sent_ping_req"] == before.get("sent_ping_req", 0)  # no helper asked
            assert prober.counters["probes_failed"] == before.get("probes_failed", 0)
            assert target.state.name == "ALIVE"
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_without_a_retry_a_lost_ping_asks_the_helpers() -> None:
    async def scenario() -> None:
        faults = DropNext()
        cluster = Cluster(profile=LOCAL.with_(probe_retries=0), faults=faults, seed=6)
        await cluster.start({"a": 2 + LOCAL.indirect_checks})  # the prober, its target, the helpers
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            prober = cluster.relays["a-0"]
            assert prober.table is not None
            target = prober.table.get("a-1")
            assert target is not None
            before = prober.counters["sent_ping_req"]
            faults.pending[(prober.addr, target.addr)] = 1
            await prober._probe(target, prober.profile.probe_interval)
            assert prober.counters["sent_ping_req"] - before == LOCAL.indirect_checks
            assert prober.counters["probes_failed"] == 0  # a helper reached it
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_an_idle_relay_runs_no_gossip_rounds_until_a_revocation_arrives() -> None:
    async def scenario() -> None:
        cluster = Cluster(seed=7)
        await cluster.start({"a": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relays = cluster.live()
            await asyncio.sleep(20 * LOCAL.gossip_interval)  # many gossip intervals, nothing hot
            assert all(r.counters["gossip_rounds"] == 0 for r in relays)
            # (three relays start with every link eager: the first revocation's second
            # copies make some lazy, and the second's id is announced on those)
            for i in (1, 2):
                rec = RevocationRecord(f"rev-idle-{i}", "token:idle", "a", 1.0, "test", None, i)
                relays[0].submit(rec)
                assert await cluster.wait_for(lambda rid=rec.id: all(rid in r.applied for r in relays), 5)
            assert await cluster.wait_for(lambda: any(r.counters["gossip_rounds"] >= 1 for r in relays), 5)
            # once its ids are announced and nothing is missing the loop goes back to sleep
            assert await cluster.wait_for(lambda: not any(r.tree.busy() for r in relays), 5)
            settled = [r.counters["gossip_rounds"] for r in relays]
            await asyncio.sleep(20 * LOCAL.gossip_interval)
            assert [r.counters["gossip_rounds"] for r in relays] == settled
        finally:
            await cluster.stop()

    asyncio.run(scenario())

"""The relay's ledger sweep reads only recent receipts: revocation ids carry their
minting time, so receipts ("<id>/<cell>") of one ~65 s window share a path prefix."""

from __future__ import annotations

import asyncio
import time

from keycell.control_plane.revocations import RevocationRecord, id_bucket_prefixes, new_revocation_id
from keycell.relay.cluster import Cluster
from keycell.relay.profiles import LOCAL


def test_revocation_ids_sort_by_minting_time_and_keep_their_shape() -> None:
    now = time.time()
    ids = [new_revocation_id(now + i * 0.01) for i in range(50)]
    assert ids == sorted(ids)
    assert all(len(i) == 27 and i.startswith("rv_") and int(i[3:], 16) >= 0 for i in ids)
    assert len(set(ids)) == 50
    first, last = ids[0], ids[-1]
    assert any(first.startswith(p) for p in id_bucket_prefixes(now - 1, now + 1))
    assert any(last.startswith(p) for p in id_bucket_prefixes(now - 1, now + 1))
    assert not any(first.startswith(p) for p in id_bucket_prefixes(now + 3600, now + 3700))


def test_held_since_reads_the_recent_receipts_only(sinks) -> None:
    sink = sinks["a"]
    now = time.time()
    old = RevocationRecord(new_revocation_id(now - 7200), "token:old", "a", now - 7200, "test")
    new = RevocationRecord(new_revocation_id(now), "token:new", "a", now, "test")
    for rec in (old, new):
        sink.apply(rec)
    recent = {receipt.id for _, receipt in sink.held_since(now - 60)}
    everything = {receipt.id for _, receipt in sink.held()}
    assert recent == {new.id}
    assert everything == {old.id, new.id}


RELAYS = 4


def test_relays_sharing_a_sink_sweep_it_in_turns_and_all_learn_what_it_held(sinks) -> None:
    """A revocation committed to the ledger without any relay hearing of it (a revoke
    call whose hand-over failed) reaches every relay and the other cell, though the
    relays sharing the sink make one sweep an interval between them, not one each."""
    interval = 0.2

    async def scenario() -> None:
        cluster = Cluster(profile=LOCAL.with_(sync_interval=interval), sinks=sinks, seed=9)
        await cluster.start({"a": RELAYS, "b": 1})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            relays = [cluster.relays[f"a-{i}"] for i in range(RELAYS)]

            def sweeps() -> int:
                return sum(r.counters["sweeps_recent"] + r.counters["sweeps_full"] for r in relays)

            before, started = sweeps(), time.monotonic()
            rec = RevocationRecord(new_revocation_id(), "token:lost-handover", "a", time.time(), "test")
            sinks["a"].log.apply(rec)  # straight to the ledger: no relay was told
            everywhere = [*relays, cluster.relays["b-0"]]
            assert await cluster.wait_for(lambda: all(rec.id in r.applied for r in everywhere), 10)
            await asyncio.sleep(8 * interval)
            made, elapsed = sweeps() - before, time.monotonic() - started
            # One each would make about RELAYS an interval (over 30 in this window).
            assert 1 <= made <= elapsed / interval + 1, made
            assert "token:lost-handover" in sinks["b"].subjects()
        finally:
            await cluster.stop()

    asyncio.run(scenario())

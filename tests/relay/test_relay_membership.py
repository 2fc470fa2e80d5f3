"""SWIM's rules on the member table, Lifeguard's timers, the rumour queue and the
entry digest: pure logic, on a manual clock."""

from __future__ import annotations

from keycell.relay.broadcast import BUCKETS, EntryStore, RumorQueue
from keycell.relay.membership import Awareness, Member, MemberTable, State, Verdict
from keycell.relay.profiles import LAN, LOCAL, PROFILES, profile
from keycell.testing.clock import ManualClock


def table(clock: ManualClock, confirmations: int = 3) -> MemberTable:
    t = MemberTable(
        Member("me", "127.0.0.1:1", "a", incarnation=5),
        suspicion_timeouts=lambda n: (1.0, 4.0),
        confirmations=confirmations,
        clock=clock,
    )
    assert t.alive("peer", "127.0.0.1:2", "a", 1) == Verdict.CHANGED
    return t


def test_only_a_higher_incarnation_overrides_what_is_known_of_a_member() -> None:
    t = table(ManualClock(0))
    assert t.suspect("peer", 1, "other") == Verdict.CHANGED
    assert t.alive("peer", "127.0.0.1:2", "a", 1) == Verdict.IGNORED  # same incarnation: still suspect
    assert t.get("peer").state == State.SUSPECT  # type: ignore[union-attr]
    assert t.alive("peer", "127.0.0.1:2", "a", 2) == Verdict.CHANGED
    assert t.get("peer").state == State.ALIVE  # type: ignore[union-attr]
    assert t.suspect("peer", 1, "other") == Verdict.IGNORED  # stale
    assert t.dead_("peer", 1) == Verdict.IGNORED


def test_a_relay_refutes_suspicion_and_death_of_itself_with_a_higher_incarnation() -> None:
    t = table(ManualClock(0))
    assert t.suspect("me", 5, "peer") == Verdict.REFUTE
    assert t.me.incarnation == 6
    assert t.dead_("me", 9) == Verdict.REFUTE  # a healed partition: others had declared it dead
    assert t.me.incarnation == 10 and t.me.state == State.ALIVE
    assert t.refutations == 2


def test_a_suspect_is_declared_dead_after_the_suspicion_timeout_only() -> None:
    clock = ManualClock(0)
    t = table(clock)
    t.suspect("peer", 1, "me")
    clock.advance(3.9)
    assert t.expired() == []
    clock.advance(0.2)
    assert [m.name for m in t.expired()] == ["peer"]
    assert t.get("peer").state == State.DEAD  # type: ignore[union-attr]
    assert t.dead() and not [m for m in t.live() if m.name == "peer"]


def test_the_live_view_follows_the_roster_through_suspicion_death_and_rejoin() -> None:
    """Suspicion and refutation leave the roster (and so the cached live view) alone;
    a death, a rejoin, a new member or a moved address change it, and the views the
    relay builds from it are rebuilt."""
    clock = ManualClock(0)
    t = table(clock)
    roster, live = t.roster, t.live()
    assert t.suspect("peer", 1, "other") == Verdict.CHANGED
    assert t.alive("peer", "127.0.0.1:2", "a", 2) == Verdict.CHANGED  # refuted
    assert t.roster == roster and t.version > roster
    assert [(m.name, m.state, m.incarnation) for m in t.live()] == [("peer", State.ALIVE, 2)]
    assert live[0] is t.live()[0]  # the same member, changed in place
    t.suspect("peer", 2, "other")
    clock.advance(5)
    assert [m.name for m in t.expired()] == ["peer"]
    assert t.roster > roster and t.live() == [] and [m.name for m in t.dead()] == ["peer"]
    roster = t.roster
    assert t.alive("peer", "127.0.0.1:2", "a", 3) == Verdict.CHANGED  # rejoins
    assert t.roster > roster and [m.name for m in t.live()] == ["peer"] and t.dead() == []
    roster = t.roster
    assert t.alive("peer", "127.0.0.1:9", "a", 4) == Verdict.CHANGED  # a new address
    assert t.roster > roster and t.live()[0].addr == "127.0.0.1:9"
    roster = t.roster
    assert t.alive("new", "127.0.0.1:3", "b", 0) == Verdict.CHANGED
    assert t.roster > roster and {m.name for m in t.live()} == {"peer", "new"}


def test_counts_by_state_follow_every_change_of_the_table() -> None:
    clock = ManualClock(0)
    t = table(clock)

    def counts() -> dict[str, int]:
        return {s.name: t.count(s) for s in State if t.count(s)}

    assert counts() == {"ALIVE": 2}  # this relay and its peer
    t.suspect("peer", 1, "other")
    assert counts() == {"ALIVE": 1, "SUSPECT": 1}
    clock.advance(5)
    t.expired()
    assert counts() == {"ALIVE": 1, "DEAD": 1}
    t.alive("peer", "127.0.0.1:2", "a", 3)
    t.alive("new", "127.0.0.1:3", "b", 0)
    assert counts() == {"ALIVE": 3}


def test_independent_confirmations_shrink_the_suspicion_timeout_to_its_minimum() -> None:
    clock = ManualClock(0)
    t = table(clock, confirmations=2)
    t.suspect("peer", 1, "x")
    first = t.suspicions["peer"].timeout()
    assert first == 4.0
    assert t.suspect("peer", 1, "x") == Verdict.IGNORED  # the same source twice is one confirmation
    assert t.suspect("peer", 1, "y") == Verdict.CHANGED
    second = t.suspicions["peer"].timeout()
    t.suspect("peer", 1, "z")
    third = t.suspicions["peer"].timeout()
    assert first > second > third == 1.0
    clock.advance(1.01)
    assert [m.name for m in t.expired()] == ["peer"]


def test_local_health_scales_probe_timing_and_stays_within_its_ceiling() -> None:
    awareness = Awareness(ceiling=8)
    assert awareness.scale(0.2) == 0.2
    for _ in range(20):
        awareness.apply(+1)
    assert awareness.score == 7 and awareness.scale(0.2) == 0.2 * 8
    for _ in range(20):
        awareness.apply(-1)
    assert awareness.score == 0


def test_rumours_are_sent_a_bounded_number_of_times_least_sent_first() -> None:
    queue = RumorQueue()
    queue.put("r/1", "one", sent=2)
    queue.put("r/2", "two")
    queue.put("a/1/b", "receipt", lazy=True)
    assert queue.hot()
    assert queue.take(1, limit=3) == ["two"]
    assert queue.take(3, limit=3) == ["two", "one", "receipt"]  # "one" hits its limit
    assert queue.take(3, limit=3) == ["two", "receipt"]  # "two" hits its limit
    assert not queue.hot() and len(queue) == 1  # only the lazy receipt is left
    queue.put("m/x", "alive 1")
    queue.put("m/x", "alive 2")  # a newer rumour about the same member replaces the old one
    assert queue.take(5, limit=9) == ["alive 2", "receipt"]


def test_two_entry_stores_find_exactly_the_buckets_they_disagree_on() -> None:
    a, b = EntryStore(), EntryStore()
    for i in range(200):
        a.add(f"r/{i}", i)
        b.add(f"r/{i}", i)
    assert a.differing(b.digest) == []
    assert not a.add("r/5", 5)  # adding is idempotent
    a.add("r/extra", "x")
    differing = a.differing(b.digest)
    assert len(differing) == 1 and 0 <= differing[0] < BUCKETS
    assert "r/extra" in a.keys_in(differing) and "r/extra" not in b.keys_in(differing)


def test_profiles_are_named_and_scale_with_the_group() -> None:
    assert set(PROFILES) == {"local", "lan", "wan"} and profile("lan") is LAN
    assert LOCAL.retransmit_limit(9) < LOCAL.retransmit_limit(1000)
    low, high = LAN.suspicion_timeouts(100)
    assert low == LAN.suspicion_mult * 2 * LAN.probe_interval and high == low * LAN.suspicion_max_mult
    try:
        profile("moon")
    except ValueError as exc:
        assert "local, lan, wan" in str(exc)
    else:
        raise AssertionError("an unknown profile was accepted")


def test_stale_rumours_about_a_relay_itself_are_not_refuted_again() -> None:
    t = table(ManualClock(0))
    assert t.suspect("me", 5, "peer") == Verdict.REFUTE  # incarnation 5 -> 6
    assert t.suspect("me", 5, "other") == Verdict.IGNORED  # the same old rumour, heard again
    assert t.dead_("me", 4) == Verdict.IGNORED
    assert t.me.incarnation == 6 and t.refutations == 1


def test_helpers_nack_an_unreachable_target_and_missing_nacks_raise_local_health() -> None:
    """Lifeguard: a relay asked to probe for another answers with a nack when the target
    stays silent; the asker's local health rises only for the nacks that did not come."""
    import asyncio

    from keycell.relay.cluster import Cluster

    async def scenario() -> None:
        cluster = Cluster(seed=3)
        await cluster.start({"a": 3})
        try:
            assert await cluster.wait_for(cluster.converged_members, 10)
            asker, helper = cluster.relays["a-0"], cluster.relays["a-1"]
            assert asker.table is not None
            target = asker.table.get("a-2")
            assert target is not None
            await cluster.kill("a-2")
            before = asker.awareness.score
            await asker._probe(target, asker.profile.probe_interval)
            assert asker.counters["nacks_received"] >= 1  # the helper could not reach it either
            assert asker.counters["nacks_missed"] == 0
            assert asker.awareness.score <= before  # nothing points at the asker itself

            cluster.faults.groups[helper.addr] = "island"  # now the helper cannot answer
            cluster.faults.partition(asker.cell, "island")
            await asker._probe(target, asker.profile.probe_interval)
            assert asker.counters["nacks_missed"] >= 1
            assert asker.awareness.score >= 1
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_the_member_table_is_pushed_less_often_as_the_mesh_grows() -> None:
    """memberlist's pushPullScale: the whole table grows with n, and so does the number
    of relays sending it; rumours keep tables current in between."""
    assert LAN.sync_every(32) == LAN.sync_interval
    assert LAN.sync_every(64) == 2 * LAN.sync_interval
    assert LAN.sync_every(300) == 5 * LAN.sync_interval

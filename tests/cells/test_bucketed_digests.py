"""Anti-entropy in buckets: the home sends 256 bucket hashes, the replica names the
buckets that differ, and only those buckets' entries travel. Two replicas that differ
in a few secrets exchange only those secrets' buckets; replicas in sync exchange the
hashes alone, whatever the number of secrets."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from keycell.cells.agent import CellTiming
from keycell.cells.mesh import Mesh
from keycell.control_plane.ledger import Key, Kind
from keycell.control_plane.replicas import BUCKETS, DigestEntry, bucket_hashes, bucket_of

CELLS = ("a", "b", "c")

paths = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True)


@settings(max_examples=150, deadline=None)
@given(paths, st.data())
def test_only_the_buckets_of_the_secrets_that_differ_differ(names: list[str], data: st.DataObject) -> None:
    home = {n: DigestEntry(f"secret/{n}", 1, 10 + i, 1_000 + i) for i, n in enumerate(names)}
    replica = dict(home)
    changed = data.draw(st.sets(st.sampled_from(sorted(home)), max_size=5))
    for n in changed:
        how = data.draw(st.sampled_from(["behind", "missing", "older-generation", "deleted", "epoch"]))
        e = home[n]
        if how == "behind":
            replica[n] = DigestEntry(e.path, e.epoch, e.meta_seq - 1, e.generation)
        elif how == "missing":
            del replica[n]
        elif how == "older-generation":
            replica[n] = DigestEntry(e.path, e.epoch, e.meta_seq, e.generation - 1)
        elif how == "deleted":
            replica[n] = DigestEntry(e.path, e.epoch, 0, 0)
        else:
            replica[n] = DigestEntry(e.path, e.epoch + 1, e.meta_seq, e.generation)
    ours, theirs = bucket_hashes(home.values()), bucket_hashes(replica.values())
    assert len(ours) == BUCKETS
    differing = {i for i in range(BUCKETS) if ours[i] != theirs[i]}
    assert differing == {bucket_of(home[n].path) for n in changed}
    # in any order, and a deletion is the same whatever generation either side recorded
    assert bucket_hashes(reversed(list(home.values()))) == ours
    assert bucket_hashes([DigestEntry("secret/x", 2, 0, 7)]) == bucket_hashes(
        [DigestEntry("secret/x", 2, 0, 0)]
    )


def digest_counters(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.agents["a"][0].counters)


def test_replicas_missing_a_few_secrets_get_only_those_buckets_and_converge(tmp_path: Path) -> None:
    # digests only when the test runs a round (pushes at write time still happen)
    timing = CellTiming(digest_interval=3600, directory_interval=0.5, call_timeout=2.0, handover_grace=0.5)
    mesh = Mesh(tmp_path, timing=timing).start()
    try:
        assert mesh.wait_for(mesh.directory_complete, 15)
        names = [f"many/s{i}" for i in range(120)]  # enough that the hashes beat a full listing
        for name in names:
            assert mesh.write("a", name, {"v": "1"}).status == 200
        assert mesh.wait_for(lambda: all(mesh.value_in(c, names[-1]) == {"v": "1"} for c in CELLS), 10)
        agent = mesh.agents["a"][0]

        def round_() -> dict[str, int]:
            before = digest_counters(mesh)
            mesh.run(agent.digest_round())
            after = digest_counters(mesh)
            return {k: after.get(k, 0) - before.get(k, 0) for k in after}

        # every replica current: the hashes alone travel, no entry at all
        steady = round_()
        assert steady.get("digest_entries", 0) == 0 and steady.get("digest_buckets_differing", 0) == 0
        assert steady["digest_bytes"] > 0

        # c misses three changes (cut off while a writes them); b does not
        mesh.partition("c")
        changed = [*names[:2], "many/new"]
        for name in changed:
            assert mesh.write("a", name, {"v": "2"}).status == 200
        assert mesh.wait_for(lambda: all(mesh.value_in("b", n) == {"v": "2"} for n in changed), 10)
        mesh.heal()
        assert all(mesh.value_in("c", n) != {"v": "2"} for n in changed)
        buckets = {bucket_of(f"secret/{n}") for n in changed}
        in_those = [n for n in [*names, "many/new"] if bucket_of(f"secret/{n}") in buckets]
        repair = round_()
        assert repair["digest_buckets_differing"] == len(buckets)  # from c; none from b
        assert repair["digest_entries"] == len(in_those) < len(names) // 2
        for cell in CELLS:
            assert all(mesh.value_in(cell, n) == {"v": "2"} for n in changed), cell
        # and the next round finds nothing to say again
        again = round_()
        assert again.get("digest_entries", 0) == 0
        assert again["digest_bytes"] == steady["digest_bytes"]

        # a deletion at the home: the replicas' tombstones match its digest (nothing to list)
        assert mesh.request("a", "DELETE", "secret/metadata/many/s5").status == 204
        assert mesh.wait_for(lambda: all(mesh.read(c, "many/s5").status == 404 for c in CELLS), 10)
        deleted = round_()
        assert deleted.get("digest_entries", 0) == 0
        record = mesh.api_services["c"].barrier.get(Key(Kind.REPLICA, "secret/many/s5"))
        assert record is not None and json.loads(record.value)["deleted"]
    finally:
        mesh.stop()

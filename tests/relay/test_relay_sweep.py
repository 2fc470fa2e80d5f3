"""The relay's ledger sweep reads only recent receipts: revocation ids carry their
minting time, so receipts ("<id>/<cell>") of one ~65 s window share a path prefix."""

from __future__ import annotations

import time

from keycell.control_plane.revocations import RevocationRecord, id_bucket_prefixes, new_revocation_id


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

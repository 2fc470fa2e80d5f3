"""Relay-applied revocations are audit events: the relay's own chain in the cell's
trail records each revocation it applied to the ledger (once), with the subject as an
HMAC digest; the trail verifies against the cell's ledger heads."""

from __future__ import annotations

import json
import time
from pathlib import Path

from keycell.control_plane.audit import Auditor, FileSink, check_heads, verify_files
from keycell.control_plane.revocations import RevocationRecord
from keycell.relay.cell import LedgerSink
from keycell.relay.cluster import open_dev_cell

SUBJECT = "accessor:canary-accessor-5e1f"


def test_each_applied_revocation_is_one_event_entry(tmp_path: Path) -> None:
    services = open_dev_cell(str(tmp_path), "a")
    trail = tmp_path / "audit.log"
    auditor = Auditor(services.ledger, services.barrier, "a", [FileSink(str(trail))])
    sink = LedgerSink(services, auditor)
    try:
        rec = RevocationRecord("rv_test1", SUBJECT, "b", time.time(), "breach drill")
        applied = sink.apply(rec)
        assert sink.apply(rec) == applied  # heard again from another peer: nothing new
        assert services.revocations.is_revoked(SUBJECT)
        sink.background.submit(lambda: None).result(timeout=10)  # the entry is written off the apply path
        loaded, problems = verify_files([str(trail)])
        assert problems == [] and check_heads(loaded, services.ledger, "a") == []
    finally:
        sink.close()
    entries = [json.loads(line) for line in trail.read_text().splitlines()]
    assert len(entries) == 1
    event = entries[0]["event"]
    assert event["kind"] == "revocation-applied" and event["revocation_id"] == "rv_test1"
    assert event["origin_cell"] == "b" and event["applied_at"] == applied
    assert event["sensitive"]["subject"] == auditor.audit_hash(SUBJECT)
    assert SUBJECT not in trail.read_text()

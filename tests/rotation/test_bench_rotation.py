"""bench/rotation.py at a size that fits the suite, run as a user runs it: the breach
scenario (roles rotated on a real PostgreSQL while client threads log in with
whatever is CURRENT) must show zero failed logins and revocations that bite at once."""

from __future__ import annotations

from bench.common import run_report


def test_breach_scenario_has_no_failed_logins_and_revocation_is_immediate() -> None:
    report = run_report("bench.rotation", "--secrets", "150", "--roles", "30", "--clients", "8")
    assert report["machine"]["cores"] >= 1
    generic = report["generic_sqlite"]
    assert generic["rotated"] == 150 and generic["exactly_once"] is True
    breach = report["postgres_breach"]
    assert breach["rotated"] == 30 and breach["exactly_once"] is True
    assert breach["client_logins"] > 0
    assert breach["failed_client_auths"] == 0 and breach["other_client_errors"] == 0
    assert breach["revoked_sampled"] == 20 and breach["revoked_still_working"] == 0
    assert breach["current_broken_by_revocation"] == 0

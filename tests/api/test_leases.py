"""The lease manager over a real cell (sqlite and DynamoDB-on-moto ledgers).

Time: the engine reads a fake clock that starts at real time and only moves forward, so
tests can jump hours ahead. The ledger hides expired items by *real* time, which the
fake clock cannot move; a jump ahead therefore leaves the lease record visible in the
ledger while the engine already calls it expired (the engine checks both). One test
(`test_tidy_finds_leases_the_ledger_already_hides`) waits in real time, under 2 s, for
the ledger itself to hide a 1-second lease: that is the case the expiry index exists for.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.leases import INDEX_PREFIX, Lease, Leases, validate_lease_id, validate_prefix
from keycell.control_plane.ledger import Key, Kind, iter_prefix, now
from keycell.control_plane.revocations import RevocationSet
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock


class Recorder:
    """A revoker that remembers what it destroyed and can be told to fail."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.fail_for: set[str] = set()

    def __call__(self, lease: Lease) -> None:
        if lease.lease_id in self.fail_for:
            raise RuntimeError("target unreachable: password=hunter2")
        self.revoked.append(lease.lease_id)


@pytest.fixture
def revoker() -> Recorder:
    return Recorder()


@pytest.fixture
def revocations(cell: Cell, clock: ManualClock) -> RevocationSet:
    return RevocationSet(cell.barrier, "cell-a", clock=clock)


@pytest.fixture
def leases(cell: Cell, revocations: RevocationSet, clock: ManualClock, revoker: Recorder) -> Leases:
    manager = Leases(cell.barrier, revocations, clock=clock, max_ttl=24 * 3600)
    manager.register_revoker("token", revoker)
    return manager


def issue(leases: Leases, prefix: str = "auth/jwt/login", *, ttl: int = 3600, **kwargs: object) -> Lease:
    return leases.register(prefix, ttl=ttl, revoker="token", revoker_data={"accessor": "acc"}, **kwargs)  # type: ignore[arg-type]


def index_items(cell: Cell) -> list[str]:
    return [item.key.path for item in iter_prefix(cell.barrier, Kind.LEASE, INDEX_PREFIX)]


# --- validation (pure: no cell needed) -------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a//b", "/a/b", "a/b/", "a/../b", "a/./b", "a/b c", "a/\tb", 7, None])
def test_malformed_lease_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        validate_lease_id(bad)


@pytest.mark.parametrize("bad", ["", "/", "a//", "../a", 3])
def test_malformed_revoke_prefixes_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        validate_prefix(bad)


def test_a_listing_may_name_the_root() -> None:
    assert validate_prefix("", allow_empty=True) == ""
    assert validate_prefix("auth/jwt/") == "auth/jwt/"


# --- register and lookup --------------------------------------------------------------


def test_register_issues_a_lease_under_the_prefix(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases)
    assert lease.lease_id.startswith("auth/jwt/login/")
    assert len(lease.lease_id) > len("auth/jwt/login/") + 16
    assert lease.expire_time == clock.now + 3600
    assert issue(leases).lease_id != lease.lease_id


def test_register_caps_the_ttl_at_the_max_ttl(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=7200, max_ttl=600)
    assert lease.expire_time == clock.now + 600
    assert issue(leases, ttl=10 * 24 * 3600).expire_time == clock.now + 24 * 3600  # manager's cap


def test_lookup_answers_vault_fields(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases)
    found = leases.lookup(lease.lease_id)
    # Vault's fields; a token's lease also names the token's accessor (keycell breach)
    assert set(found) - {"token_accessor"} == {
        "id",
        "issue_time",
        "expire_time",
        "last_renewal_time",
        "renewable",
        "ttl",
    }
    assert found["id"] == lease.lease_id
    assert found["renewable"] is True and found["last_renewal_time"] is None
    assert found["ttl"] == 3600
    issued = datetime.fromisoformat(found["issue_time"])
    expires = datetime.fromisoformat(found["expire_time"])
    assert found["issue_time"].endswith("Z")
    assert (expires - issued).total_seconds() == pytest.approx(3600)
    assert issued.timestamp() == pytest.approx(clock.now)


def test_lookup_of_an_unknown_lease_is_invalid(leases: Leases) -> None:
    with pytest.raises(InvalidRequest, match="invalid lease"):
        leases.lookup("auth/jwt/login/nothing-here")


def test_lookup_of_an_expired_lease_is_invalid(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=60)
    clock.advance(61)
    with pytest.raises(InvalidRequest, match="invalid lease"):
        leases.lookup(lease.lease_id)


def test_list_folds_like_vault(leases: Leases) -> None:
    first = issue(leases, "auth/jwt/login")
    second = issue(leases, "auth/jwt/login")
    issue(leases, "auth/jwt/other")
    issue(leases, "database/creds/app")
    assert leases.list("auth/jwt/") == {"keys": ["login/", "other/"]}
    assert leases.list("auth/jwt") == {"keys": ["login/", "other/"]}
    ids = sorted(lease.lease_id.rsplit("/", 1)[1] for lease in (first, second))
    assert leases.list("auth/jwt/login/") == {"keys": ids}
    assert leases.list("nothing/") == {"keys": []}


def test_list_of_the_root_hides_the_expiry_index(leases: Leases) -> None:
    issue(leases, "auth/jwt/login")
    issue(leases, "database/creds/app")
    assert leases.list("") == {"keys": ["auth/", "database/"]}


def test_list_leaves_out_expired_leases(leases: Leases, clock: ManualClock) -> None:
    issue(leases, "auth/jwt/login", ttl=60)
    live = issue(leases, "auth/jwt/login", ttl=3600)
    clock.advance(120)
    assert leases.list("auth/jwt/login") == {"keys": [live.lease_id.rsplit("/", 1)[1]]}


# --- renew ----------------------------------------------------------------------------


def test_renew_extends_from_now_by_the_increment(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=600)
    clock.advance(300)
    renewed = leases.renew(lease.lease_id, 1800)
    assert renewed == {"lease_id": lease.lease_id, "renewable": True, "lease_duration": 1800, "warnings": []}
    found = leases.lookup(lease.lease_id)
    assert found["ttl"] == 1800
    assert datetime.fromisoformat(found["last_renewal_time"]).timestamp() == pytest.approx(clock.now)


def test_renew_without_an_increment_grants_the_original_ttl(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=600)
    clock.advance(500)
    assert leases.renew(lease.lease_id)["lease_duration"] == 600


def test_renew_is_capped_by_the_max_ttl_with_a_warning(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=600, max_ttl=1000)
    clock.advance(400)
    renewed = leases.renew(lease.lease_id, 3600)
    assert renewed["lease_duration"] == 600  # 1000 s after issue, 400 s have passed
    assert len(renewed["warnings"]) == 1 and "max TTL" in renewed["warnings"][0]
    assert leases.lookup(lease.lease_id)["ttl"] == 600


def test_renew_of_a_non_renewable_lease_is_refused(leases: Leases) -> None:
    lease = issue(leases, renewable=False)
    with pytest.raises(InvalidRequest, match=r"^lease is not renewable$"):
        leases.renew(lease.lease_id, 60)


def test_renew_of_an_expired_lease_is_refused(leases: Leases, clock: ManualClock) -> None:
    lease = issue(leases, ttl=60)
    clock.advance(61)
    with pytest.raises(InvalidRequest, match="lease not found or lease is not renewable"):
        leases.renew(lease.lease_id, 60)


def test_renew_of_an_unknown_lease_is_refused(leases: Leases) -> None:
    with pytest.raises(InvalidRequest, match="lease not found or lease is not renewable"):
        leases.renew("auth/jwt/login/unknown", 60)


def test_renew_moves_the_expiry_index_item(leases: Leases, cell: Cell) -> None:
    lease = issue(leases, ttl=600)
    before = index_items(cell)
    leases.renew(lease.lease_id, 7200)
    after = index_items(cell)
    assert len(before) == len(after) == 1 and before != after


def test_concurrent_renewals_all_land_and_leave_one_index_item(leases: Leases, cell: Cell) -> None:
    lease = issue(leases, ttl=600)
    errors: list[BaseException] = []

    def renew(increment: int) -> None:
        try:
            leases.renew(lease.lease_id, increment)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=renew, args=(1000 + i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(index_items(cell)) == 1
    assert 1000 <= leases.lookup(lease.lease_id)["ttl"] <= 1003


# --- revoke ---------------------------------------------------------------------------


def test_revoke_calls_the_revoker_and_records_the_revocation(
    leases: Leases, revoker: Recorder, revocations: RevocationSet, cell: Cell
) -> None:
    lease = issue(leases)
    assert leases.revoke(lease.lease_id) is None
    assert revoker.revoked == [lease.lease_id]
    assert revocations.is_revoked(f"lease:{lease.lease_id}")
    assert cell.barrier.get(Key(Kind.LEASE, lease.lease_id)) is None
    assert index_items(cell) == []
    with pytest.raises(InvalidRequest):
        leases.lookup(lease.lease_id)


def test_the_revoker_receives_the_lease_and_its_data(leases: Leases) -> None:
    seen: list[Lease] = []
    leases.register_revoker("db", seen.append)
    lease = leases.register("database/creds/app", ttl=60, revoker="db", revoker_data={"username": "v-app-1"})
    leases.revoke(lease.lease_id)
    assert seen[0].lease_id == lease.lease_id and seen[0].revoker_data == {"username": "v-app-1"}


def test_renew_after_revoke_is_refused(leases: Leases) -> None:
    lease = issue(leases)
    leases.revoke(lease.lease_id)
    with pytest.raises(InvalidRequest, match="lease not found"):
        leases.renew(lease.lease_id, 60)


def test_revoke_of_an_unknown_lease_is_a_no_op(leases: Leases, revoker: Recorder) -> None:
    leases.revoke("auth/jwt/login/unknown")
    assert revoker.revoked == []


def test_revoke_with_a_failing_revoker_keeps_the_lease_and_hides_the_cause(
    leases: Leases, revoker: Recorder, revocations: RevocationSet
) -> None:
    lease = issue(leases)
    revoker.fail_for.add(lease.lease_id)
    with pytest.raises(InvalidRequest, match="remains") as raised:
        leases.revoke(lease.lease_id)
    assert "hunter2" not in str(raised.value)
    assert leases.lookup(lease.lease_id)["id"] == lease.lease_id
    assert not revocations.is_revoked(f"lease:{lease.lease_id}")


def test_revoke_prefix_revokes_exactly_the_prefix(leases: Leases, revoker: Recorder) -> None:
    inside = [issue(leases, "auth/jwt/login"), issue(leases, "auth/jwt/role/x")]
    sibling = issue(leases, "auth/jwt2/login")
    assert leases.revoke_prefix("auth/jwt") == {"revoked": 2}
    assert sorted(revoker.revoked) == sorted(lease.lease_id for lease in inside)
    assert leases.lookup(sibling.lease_id)["id"] == sibling.lease_id


def test_revoke_prefix_accepts_one_exact_lease_id(leases: Leases, revoker: Recorder) -> None:
    lease, other = issue(leases), issue(leases)
    assert leases.revoke_prefix(lease.lease_id) == {"revoked": 1}
    assert revoker.revoked == [lease.lease_id]
    assert leases.lookup(other.lease_id)["id"] == other.lease_id


def test_revoke_prefix_stops_at_a_failing_revoker(
    leases: Leases, revoker: Recorder, revocations: RevocationSet
) -> None:
    ordered = sorted((issue(leases) for _ in range(3)), key=lambda lease: lease.lease_id)
    revoker.fail_for.add(ordered[1].lease_id)
    with pytest.raises(InvalidRequest, match="revoked 1 lease") as raised:
        leases.revoke_prefix("auth/jwt/login/")
    assert ordered[1].lease_id in str(raised.value) and "hunter2" not in str(raised.value)
    assert revoker.revoked == [ordered[0].lease_id]
    assert revocations.is_revoked(f"lease:{ordered[0].lease_id}")
    for remaining in ordered[1:]:
        assert leases.lookup(remaining.lease_id)["id"] == remaining.lease_id
        assert not revocations.is_revoked(f"lease:{remaining.lease_id}")


def test_revoke_force_survives_a_failing_revoker(
    leases: Leases, revoker: Recorder, revocations: RevocationSet, cell: Cell
) -> None:
    ordered = sorted((issue(leases) for _ in range(3)), key=lambda lease: lease.lease_id)
    revoker.fail_for.add(ordered[0].lease_id)
    assert leases.revoke_force("auth/jwt/login") == {"revoked": 3, "revoker_errors": 1}
    assert revoker.revoked == [lease.lease_id for lease in ordered[1:]]
    for lease in ordered:
        assert revocations.is_revoked(f"lease:{lease.lease_id}")
        assert cell.barrier.get(Key(Kind.LEASE, lease.lease_id)) is None
    assert index_items(cell) == []


def test_revoke_prefix_pages_through_many_leases(leases: Leases, revoker: Recorder) -> None:
    for _ in range(101):  # more than one scan page (100)
        issue(leases, "auth/jwt/bulk")
    assert leases.revoke_prefix("auth/jwt/bulk/") == {"revoked": 101}
    assert leases.list("auth/jwt/bulk") == {"keys": []}


# --- tidy -----------------------------------------------------------------------------


def test_tidy_revokes_expired_leases_and_leaves_live_ones(
    leases: Leases, clock: ManualClock, revoker: Recorder, cell: Cell
) -> None:
    expired = [issue(leases, ttl=60), issue(leases, ttl=120)]
    live = issue(leases, ttl=3600)
    clock.advance(600)
    assert leases.tidy_expired() == {"revoked": 2, "revoker_errors": 0}
    assert sorted(revoker.revoked) == sorted(lease.lease_id for lease in expired)
    assert leases.lookup(live.lease_id)["id"] == live.lease_id
    assert len(index_items(cell)) == 1
    assert leases.tidy_expired() == {"revoked": 0, "revoker_errors": 0}


def test_tidy_takes_the_oldest_first_up_to_the_limit(
    leases: Leases, clock: ManualClock, revoker: Recorder
) -> None:
    oldest = issue(leases, ttl=60)
    issue(leases, ttl=120)
    clock.advance(600)
    assert leases.tidy_expired(limit=1) == {"revoked": 1, "revoker_errors": 0}
    assert revoker.revoked == [oldest.lease_id]


def test_tidy_does_not_revoke_a_renewed_lease(leases: Leases, clock: ManualClock, revoker: Recorder) -> None:
    lease = issue(leases, ttl=60)
    leases.renew(lease.lease_id, 3600)
    clock.advance(120)
    assert leases.tidy_expired()["revoked"] == 0
    assert revoker.revoked == []


def test_tidy_retries_a_lease_whose_revoker_failed(
    leases: Leases, clock: ManualClock, revoker: Recorder
) -> None:
    lease = issue(leases, ttl=60)
    revoker.fail_for.add(lease.lease_id)
    clock.advance(120)
    assert leases.tidy_expired() == {"revoked": 0, "revoker_errors": 1}
    revoker.fail_for.clear()
    assert leases.tidy_expired() == {"revoked": 1, "revoker_errors": 0}
    assert revoker.revoked == [lease.lease_id]


def test_tidy_finds_leases_the_ledger_already_hides(
    leases: Leases, clock: ManualClock, revoker: Recorder, cell: Cell
) -> None:
    lease = issue(leases, ttl=1)
    expires_at = cell.ledger.get(Key(Kind.LEASE, lease.lease_id)).expires_at  # type: ignore[union-attr]
    assert expires_at is not None
    deadline = time.monotonic() + 3
    while now() < expires_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cell.barrier.get(Key(Kind.LEASE, lease.lease_id)) is None  # the ledger hides it now
    clock.advance(5)
    assert leases.tidy_expired() == {"revoked": 1, "revoker_errors": 0}
    assert revoker.revoked == [lease.lease_id]
    assert index_items(cell) == []

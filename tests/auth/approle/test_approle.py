"""The AppRole auth method on a real cell (each ledger adapter): roles and role IDs,
secret IDs with use counts, TTLs and CIDR bounds, login, and refusals that leave
nothing written. hvac against a live server is in tests/api/test_hvac_approle.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from keycell.control_plane.auth.approle.backend import INVALID, AppRoleAuth
from keycell.control_plane.auth.token.store import TokenStore
from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.ledger import Kind, iter_prefix
from keycell.control_plane.revocations import RevocationSet
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

HERE = "127.0.0.1"


@pytest.fixture
def tokens(cell: Cell, clock: ManualClock) -> TokenStore:
    return TokenStore(cell.barrier, RevocationSet(cell.barrier, "test-cell", clock=clock), clock=clock)


@pytest.fixture
def approle(cell: Cell, tokens: TokenStore, clock: ManualClock) -> AppRoleAuth:
    method = AppRoleAuth(cell.barrier, tokens, clock=clock)
    method.write_role(
        "payments", {"token_policies": "payments-read", "token_ttl": "1h", "token_max_ttl": "2h"}
    )
    return method


def secret_items(cell: Cell) -> list[str]:
    return [i.key.path for i in iter_prefix(cell.barrier, Kind.AUTH_SECRET)]


def test_a_login_with_role_id_and_secret_id_returns_a_token_shaped_by_the_role(
    approle: AppRoleAuth, tokens: TokenStore
) -> None:
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {"metadata": '{"host": "web-1"}'})
    assert set(made) == {"secret_id", "secret_id_accessor", "secret_id_ttl", "secret_id_num_uses"}
    token, entry, block = approle.login(role_id, made["secret_id"], HERE)
    assert tokens.lookup(token).accessor == entry.accessor
    assert entry.path == "auth/approle/login" and entry.orphan and entry.display_name == "approle"
    assert entry.meta == {"host": "web-1", "role_name": "payments"}
    assert block["policies"] == ["default", "payments-read"] and block["lease_duration"] == 3600
    assert approle.read_role("payments")["token_policies"] == ["payments-read"]
    assert approle.list_roles() == ["payments"]


def test_unknown_role_or_secret_ids_are_refused_alike_without_echoing_them(approle: AppRoleAuth) -> None:
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {})
    for rid, sid in ((role_id, "not-the-secret"), ("not-a-role-id", made["secret_id"])):
        with pytest.raises(InvalidRequest) as caught:
            approle.login(rid, sid, HERE)
        assert str(caught.value) == INVALID
    with pytest.raises(InvalidRequest, match="missing secret_id"):
        approle.login(role_id, "", HERE)
    with pytest.raises(InvalidRequest, match="missing role_id"):
        approle.login(None, made["secret_id"], HERE)


def test_a_secret_id_with_num_uses_admits_exactly_that_many_logins(approle: AppRoleAuth, cell: Cell) -> None:
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {"num_uses": 2})
    approle.login(role_id, made["secret_id"], HERE)
    looked = approle.lookup_secret_id("payments", made["secret_id"])
    assert looked is not None and looked["secret_id_num_uses"] == 1
    approle.login(role_id, made["secret_id"], HERE)
    with pytest.raises(InvalidRequest, match=INVALID):
        approle.login(role_id, made["secret_id"], HERE)
    assert approle.lookup_secret_id("payments", made["secret_id"]) is None
    assert secret_items(cell) == [], "the used-up secret ID and its accessor are gone"


def test_racing_logins_spend_a_single_use_secret_id_once(approle: AppRoleAuth) -> None:
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {"num_uses": 1})
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def attempt() -> None:
        start.wait()
        try:
            approle.login(role_id, made["secret_id"], HERE)
            outcomes.append("token")
        except InvalidRequest as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("token") == 1, outcomes
    assert len(outcomes) == 8


def test_a_secret_id_expires_with_its_ttl_capped_by_the_role(
    approle: AppRoleAuth, clock: ManualClock
) -> None:
    approle.write_role("payments", {"secret_id_ttl": "60s"})
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {"ttl": "10m"})
    assert made["secret_id_ttl"] == 60, "a secret ID never outlives the role's secret_id_ttl"
    clock.advance(59)
    approle.login(role_id, made["secret_id"], HERE)
    clock.advance(2)
    with pytest.raises(InvalidRequest, match=INVALID):
        approle.login(role_id, made["secret_id"], HERE)


def test_cidr_bounds_on_the_role_and_on_the_secret_id(approle: AppRoleAuth) -> None:
    approle.write_role("edge", {"secret_id_bound_cidrs": ["10.0.0.0/8", "127.0.0.0/8"]})
    role_id = approle.role_id("edge")
    wide = approle.new_secret_id("edge", {})
    approle.login(role_id, wide["secret_id"], "10.1.2.3")
    with pytest.raises(InvalidRequest, match="CIDR restrictions on the role"):
        approle.login(role_id, wide["secret_id"], "192.0.2.7")
    narrow = approle.new_secret_id("edge", {"cidr_list": "10.9.0.0/16"})
    approle.login(role_id, narrow["secret_id"], "10.9.1.1")
    with pytest.raises(InvalidRequest, match="CIDR restrictions on the secret ID"):
        approle.login(role_id, narrow["secret_id"], "10.1.2.3")
    with pytest.raises(InvalidRequest, match="within the role's secret_id_bound_cidrs"):
        approle.new_secret_id("edge", {"cidr_list": "192.168.0.0/16"})


def test_role_ids_are_unique_and_a_new_one_retires_the_old(approle: AppRoleAuth) -> None:
    old = approle.role_id("payments")
    made = approle.new_secret_id("payments", {})
    approle.set_role_id("payments", "payments-custom-id")
    assert approle.role_id("payments") == "payments-custom-id"
    approle.login("payments-custom-id", made["secret_id"], HERE)
    with pytest.raises(InvalidRequest, match=INVALID):
        approle.login(old, made["secret_id"], HERE)
    approle.write_role("other", {})
    with pytest.raises(InvalidRequest, match="role_id already in use"):
        approle.set_role_id("other", "payments-custom-id")
    with pytest.raises(InvalidRequest, match="role_id already in use"):
        approle.write_role("third", {"role_id": "payments-custom-id"})
    assert "third" not in approle.list_roles(), "a refused create writes nothing"


def test_accessors_list_look_up_and_destroy(approle: AppRoleAuth, cell: Cell) -> None:
    one = approle.new_secret_id("payments", {})
    two = approle.new_secret_id("payments", {})
    assert sorted(approle.list_secret_ids("payments")) == sorted(
        [one["secret_id_accessor"], two["secret_id_accessor"]]
    )
    info = approle.lookup_accessor("payments", one["secret_id_accessor"])
    assert info["secret_id_accessor"] == one["secret_id_accessor"] and "secret_id" not in info
    approle.destroy_accessor("payments", one["secret_id_accessor"])
    approle.destroy_secret_id("payments", two["secret_id"])
    assert approle.list_secret_ids("payments") == [] and secret_items(cell) == []
    with pytest.raises(NotFound):
        approle.lookup_accessor("payments", one["secret_id_accessor"])


def test_deleting_a_role_takes_its_role_id_and_secret_ids(approle: AppRoleAuth, cell: Cell) -> None:
    role_id = approle.role_id("payments")
    made = approle.new_secret_id("payments", {})
    approle.delete_role("payments")
    assert approle.list_roles() == [] and secret_items(cell) == []
    with pytest.raises(InvalidRequest, match=INVALID):
        approle.login(role_id, made["secret_id"], HERE)
    approle.delete_role("payments")  # absent: not an error, as in Vault


def test_tidy_removes_expired_secret_ids(approle: AppRoleAuth, cell: Cell, clock: ManualClock) -> None:
    approle.new_secret_id("payments", {"ttl": 30})
    keep = approle.new_secret_id("payments", {})
    clock.advance(31)
    assert approle.tidy() == 1
    assert approle.list_secret_ids("payments") == [keep["secret_id_accessor"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"bind_secret_id": False}, "at least one constraint"),
        ({"secret_id_bound_cidrs": "not-a-cidr"}, "is not a CIDR block"),
        ({"secret_id_num_uses": -1}, "non-negative integer"),
        ({"token_policies": ["root"]}, "cannot create root tokens"),
        ({"token_ttl": "2h", "token_max_ttl": "1h"}, "token_ttl cannot be greater"),
        ({"token_bound_cidrs": ["10.0.0.0/8"]}, "not supported"),
        ({"bogus": 1}, "unknown role field"),
        ({"max_revocation_staleness": 1, "on_stale": "maybe"}, "on_stale must be one of"),
    ],
)
def test_bad_role_writes_are_refused_and_change_nothing(
    approle: AppRoleAuth, body: dict[str, Any], message: str
) -> None:
    before = approle.read_role("payments")
    with pytest.raises(InvalidRequest, match=message):
        approle.write_role("payments", body)
    assert approle.read_role("payments") == before


def test_a_roles_revocation_bound_is_carried_by_its_logins_tokens(
    approle: AppRoleAuth, tokens: TokenStore
) -> None:
    approle.write_role("payments", {"max_revocation_staleness": 1, "on_stale": "refuse"})
    assert approle.read_role("payments")["on_stale"] == "refuse"
    made = approle.new_secret_id("payments", {})
    token, _, _ = approle.login(approle.role_id("payments"), made["secret_id"], HERE)
    assert tokens.lookup(token).stale_bound == {"max_revocation_staleness": 1.0, "on_stale": "refuse"}


def test_the_secret_id_is_never_stored_as_itself(approle: AppRoleAuth, cell: Cell) -> None:
    made = approle.new_secret_id("payments", {})
    for path in secret_items(cell):
        assert made["secret_id"] not in path
    for item in iter_prefix(cell.ledger, Kind.AUTH_SECRET):
        assert made["secret_id"].encode() not in item.value

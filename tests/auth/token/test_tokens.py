"""The token store over a real cell (sqlite and DynamoDB-on-moto ledgers).

Time: the store reads a fake clock that starts at real time and only moves forward, so
tests can jump past a token's expiry; the store judges expiry by its own clock (the
ledger would hide the records only at real expiry).
"""

from __future__ import annotations

import math
import threading

import pytest

from keycell.control_plane.auth.token.store import DEFAULT_TTL, TokenEntry, TokenStore, new_accessor
from keycell.control_plane.errors import InvalidRequest, PermissionDenied
from keycell.control_plane.ledger import Key, Kind, iter_prefix
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.seal import token_path
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock


@pytest.fixture
def revocations(cell: Cell, clock: ManualClock) -> RevocationSet:
    return RevocationSet(cell.barrier, "test-cell", clock=clock)


@pytest.fixture
def store(cell: Cell, revocations: RevocationSet, clock: ManualClock) -> TokenStore:
    return TokenStore(cell.barrier, revocations, clock=clock, default_ttl=3600, max_ttl=4 * 3600)


@pytest.fixture
def root(cell: Cell, store: TokenStore) -> tuple[str, TokenEntry]:
    token = cell.init.root_token
    return token, store.lookup(token)


def test_the_init_root_token_is_a_full_entry_with_an_accessor(
    cell: Cell, store: TokenStore, root: tuple[str, TokenEntry]
) -> None:
    token, entry = root
    assert entry.policies == ["root"] and entry.orphan and entry.expire_time is None
    assert store.lookup_accessor(entry.accessor).accessor == entry.accessor
    data = store.lookup_data(entry, token)
    assert data["id"] == token and data["ttl"] == 0 and data["expire_time"] is None
    assert data["path"] == "auth/token/root" and data["display_name"] == "root"


def test_created_tokens_are_random_and_stored_only_as_digests(
    cell: Cell, store: TokenStore, root: tuple[str, TokenEntry]
) -> None:
    token, _ = store.create(root[1], policies=["app"])
    assert token.startswith("kc.") and len(token) >= 3 + 32
    assert cell.barrier.get(Key(Kind.TOKEN, token_path(token))) is not None
    for kind in (Kind.TOKEN, Kind.TOKEN_ACCESSOR):
        for item in iter_prefix(cell.barrier, kind):
            assert token.encode() not in item.value and token not in item.key.path


def test_accessors_are_letters_and_digits_as_vaults_are() -> None:
    # never a leading "-", which a CLI would read as a flag (bao token lookup -accessor X)
    drawn = {new_accessor() for _ in range(200)}
    assert len(drawn) == 200 and all(len(a) == 24 and a.isascii() and a.isalnum() for a in drawn)


def test_lookup_data_has_vaults_fields(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    token, entry = store.create(
        root[1], policies=["app"], ttl="1h", display_name="ci job", meta={"team": "a"}
    )
    data = store.lookup_data(store.lookup(token))
    assert data["id"] == ""
    assert data["policies"] == ["app", "default"]
    assert data["display_name"] == "token-ci-job"
    assert data["ttl"] == 3600 and data["creation_ttl"] == 3600
    assert data["expire_time"].endswith("Z") and data["issue_time"].endswith("Z")
    assert data["meta"] == {"team": "a"} and data["orphan"] is False and data["type"] == "service"
    assert data["path"] == "auth/token/create" and data["renewable"] is True
    assert data["accessor"] == entry.accessor and "period" not in data


def test_default_ttl_applies_when_none_is_given(
    cell: Cell, revocations: RevocationSet, clock: ManualClock
) -> None:
    store = TokenStore(cell.barrier, revocations, clock=clock)
    _, entry = store.create(None, policies=["app"])
    assert entry.creation_ttl == DEFAULT_TTL == 768 * 3600


def test_ttl_is_capped_at_the_max_ttl(store: TokenStore) -> None:
    _, entry = store.create(None, policies=["app"], ttl="100h")
    assert entry.creation_ttl == 4 * 3600


def test_child_policies_must_be_a_subset_of_the_parents(store: TokenStore) -> None:
    _, parent = store.create(None, policies=["app"])
    with pytest.raises(InvalidRequest, match="subset of parent"):
        store.create(parent, policies=["admin"])
    _, child = store.create(parent, policies=["app"])
    assert child.policies == ["app", "default"]


def test_a_root_parent_can_give_any_policies(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    _, child = store.create(root[1], policies=["admin", "ops"])
    assert child.policies == ["admin", "default", "ops"]


def test_no_default_policy_leaves_default_out(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    _, child = store.create(root[1], policies=["app"], no_default_policy=True)
    assert child.policies == ["app"]


def test_a_child_without_policies_inherits_its_parents(store: TokenStore) -> None:
    _, parent = store.create(None, policies=["app", "ops"])
    _, child = store.create(parent)
    assert child.policies == ["app", "default", "ops"]


def test_a_child_of_root_without_policies_is_a_root_token_that_never_expires(
    store: TokenStore, root: tuple[str, TokenEntry]
) -> None:
    _, child = store.create(root[1])
    assert child.policies == ["root"] and child.expire_time is None and not child.renewable


def test_only_root_can_create_root_tokens(store: TokenStore) -> None:
    _, parent = store.create(None, policies=["app"])
    with pytest.raises(InvalidRequest):
        store.create(parent, policies=["root"], sudo=True)


def test_orphans_need_root_or_sudo_but_create_orphan_needs_neither(store: TokenStore) -> None:
    _, parent = store.create(None, policies=["app"])
    with pytest.raises(InvalidRequest, match="orphan"):
        store.create(parent, no_parent=True)
    _, sudo_orphan = store.create(parent, no_parent=True, sudo=True)
    _, endpoint_orphan = store.create(parent, path="auth/token/create-orphan")
    assert sudo_orphan.orphan and endpoint_orphan.orphan and endpoint_orphan.parent == ""


def test_expired_tokens_are_refused(store: TokenStore, clock: ManualClock) -> None:
    token, _ = store.create(None, policies=["app"], ttl=60)
    store.lookup(token)
    clock.advance(61)
    with pytest.raises(PermissionDenied):
        store.lookup(token)


def test_a_token_lives_at_least_the_ttl_it_was_granted(store: TokenStore, clock: ManualClock) -> None:
    # records keep whole seconds; counted from the second before, a token made at x.9 s
    # died up to a second early and a renewal at 80% of a 4 s TTL found it gone
    clock.advance((0.9 - clock() % 1) % 1)
    tokens = store
    token, entry = tokens.create(None, policies=["app"], ttl=4)
    assert entry.ttl(clock()) == 4
    clock.advance(3.95)
    renewed = tokens.renew(token)
    assert renewed.ttl(clock()) == 4
    clock.advance(3.95)
    assert tokens.lookup(token).accessor == entry.accessor
    clock.advance(1.2)
    with pytest.raises(PermissionDenied):
        tokens.lookup(token)


def test_unknown_and_malformed_tokens_are_refused(store: TokenStore) -> None:
    for bad in ["kc.nope", "", "x" * 10_000]:
        with pytest.raises(PermissionDenied):
            store.lookup(bad)


def test_revoked_tokens_are_refused_and_appear_in_the_revocation_set(
    store: TokenStore, revocations: RevocationSet, root: tuple[str, TokenEntry]
) -> None:
    token, entry = store.create(root[1], policies=["app"])
    store.revoke(token)
    with pytest.raises(PermissionDenied):
        store.lookup(token)
    assert revocations.is_revoked(f"token:{entry.accessor}")


def test_a_token_in_the_revocation_set_is_refused_even_with_its_record_present(
    store: TokenStore, revocations: RevocationSet
) -> None:
    # A revocation gossiped in from another cell: only the set knows.
    token, entry = store.create(None, policies=["app"])
    revocations.revoke(f"token:{entry.accessor}", reason="elsewhere")
    with pytest.raises(PermissionDenied):
        store.lookup(token)


def test_children_die_with_their_parent(
    store: TokenStore, revocations: RevocationSet, root: tuple[str, TokenEntry]
) -> None:
    parent_token, parent = store.create(root[1], policies=["app"])
    child_token, child = store.create(parent, policies=["app"])
    grandchild_token, grandchild = store.create(child, policies=["app"])
    store.revoke(parent_token)
    for token in (parent_token, child_token, grandchild_token):
        with pytest.raises(PermissionDenied):
            store.lookup(token)
    assert all(revocations.is_revoked(f"token:{e.accessor}") for e in (parent, child, grandchild))
    store.lookup(root[0])  # the root is untouched


def test_children_die_when_their_parent_expires(store: TokenStore, clock: ManualClock) -> None:
    _, parent = store.create(None, policies=["app"], ttl=60)
    child_token, _ = store.create(parent, ttl=3600)
    clock.advance(61)
    with pytest.raises(PermissionDenied):
        store.lookup(child_token)


def test_orphans_survive_their_creators_revocation(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    parent_token, parent = store.create(root[1], policies=["app"])
    orphan_token, _ = store.create(parent, path="auth/token/create-orphan")
    store.revoke(parent_token)
    assert store.lookup(orphan_token).orphan


def test_revoke_orphan_keeps_the_children_alive_as_orphans(
    store: TokenStore, revocations: RevocationSet, root: tuple[str, TokenEntry]
) -> None:
    parent_token, parent = store.create(root[1], policies=["app"])
    child_token, _ = store.create(parent)
    grandchild_token, _ = store.create(store.lookup(child_token))
    store.revoke_orphan(parent_token)
    with pytest.raises(PermissionDenied):
        store.lookup(parent_token)
    assert revocations.is_revoked(f"token:{parent.accessor}")
    child = store.lookup(child_token)
    assert child.orphan and child.parent == ""
    assert store.lookup(grandchild_token).parent == child.accessor


def test_revoke_accessor_revokes_the_tree(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    parent_token, parent = store.create(root[1], policies=["app"])
    child_token, _ = store.create(parent)
    store.revoke_accessor(parent.accessor)
    for token in (parent_token, child_token):
        with pytest.raises(PermissionDenied):
            store.lookup(token)
    with pytest.raises(InvalidRequest):
        store.lookup_accessor(parent.accessor)


def test_revoking_twice_is_harmless(store: TokenStore) -> None:
    token, _ = store.create(None, policies=["app"])
    store.revoke(token)
    store.revoke(token)


def test_a_revoked_parent_cannot_get_new_children(store: TokenStore) -> None:
    token, parent = store.create(None, policies=["app"])
    store.revoke(token)
    with pytest.raises(PermissionDenied):
        store.create(parent)


def test_renew_extends_by_the_increment(store: TokenStore, clock: ManualClock) -> None:
    token, _ = store.create(None, policies=["app"], ttl=600)
    clock.advance(300)
    renewed = store.renew(token, "20m")
    # counted from the next whole second (a token lives at least the TTL it is granted)
    assert renewed.ttl(clock()) == 1200 and renewed.last_renewal_time == math.ceil(clock())
    assert store.lookup_data(store.lookup(token))["last_renewal_time"] == math.ceil(clock())


def test_renew_caps_at_the_max_ttl_counted_from_creation(store: TokenStore, clock: ManualClock) -> None:
    token, _ = store.create(None, policies=["app"], ttl=3600)
    for _ in range(3):
        clock.advance(3000)
        assert store.renew(token, 3600).ttl(clock()) == 3600
    renewed = store.renew(token, 10 * 3600)
    assert renewed.ttl(clock()) == 4 * 3600 - 9000  # the 4h max, counted from creation


def test_renew_caps_at_the_explicit_max_ttl(store: TokenStore, clock: ManualClock) -> None:
    token, _ = store.create(None, policies=["app"], ttl=600, explicit_max_ttl=900)
    clock.advance(500)
    assert store.renew(token, 3600).ttl(clock()) == 400


def test_renew_past_the_max_ttl_is_refused_and_the_token_expires(
    store: TokenStore, clock: ManualClock
) -> None:
    token, _ = store.create(None, policies=["app"], ttl=600, explicit_max_ttl=600)
    clock.advance(601)  # lived its 600 s, counted from the whole second after creation
    with pytest.raises(PermissionDenied):
        store.renew(token)


def test_non_renewable_tokens_cannot_be_renewed(store: TokenStore, root: tuple[str, TokenEntry]) -> None:
    token, _ = store.create(None, policies=["app"], renewable=False)
    with pytest.raises(InvalidRequest, match="not renewable"):
        store.renew(token)
    with pytest.raises(InvalidRequest, match="not renewable"):
        store.renew(root[0])


def test_periodic_tokens_renew_to_their_period_indefinitely(
    store: TokenStore, clock: ManualClock, root: tuple[str, TokenEntry]
) -> None:
    token, entry = store.create(root[1], policies=["app"], period="1h")
    assert entry.creation_ttl == 3600
    assert store.lookup_data(entry)["period"] == 3600
    for _ in range(10):  # 10 hours: well past the 4h max TTL
        clock.advance(3000)
        assert store.renew(token, 60).ttl(clock()) == 3600


def test_periodic_tokens_need_root_or_sudo(store: TokenStore) -> None:
    _, parent = store.create(None, policies=["app"])
    with pytest.raises(InvalidRequest, match="periodic"):
        store.create(parent, period=3600)


def test_use_limited_tokens_are_revoked_after_their_last_use(
    store: TokenStore, revocations: RevocationSet
) -> None:
    token, entry = store.create(None, policies=["app"], num_uses=2)
    assert store.use(token).num_uses == 1
    assert store.lookup(token).num_uses == 1
    assert store.use(token).num_uses == 0
    with pytest.raises(PermissionDenied):
        store.use(token)
    assert revocations.is_revoked(f"token:{entry.accessor}")


def test_unlimited_tokens_are_not_counted(store: TokenStore) -> None:
    token, _ = store.create(None, policies=["app"])
    for _ in range(3):
        assert store.use(token).num_uses == 0
    store.lookup(token)


def test_bad_input_is_an_invalid_request(store: TokenStore) -> None:
    for kwargs in [{"ttl": "soon"}, {"ttl": -5}, {"num_uses": -1}, {"meta": {"a": 1}}, {"policies": 7}]:
        with pytest.raises(InvalidRequest):
            store.create(None, **kwargs)  # type: ignore[arg-type]


def test_concurrent_uses_never_exceed_the_limit(store: TokenStore) -> None:
    token, _ = store.create(None, policies=["app"], num_uses=3)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            store.use(token)
            outcomes.append("used")
        except PermissionDenied:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["used"] * 3

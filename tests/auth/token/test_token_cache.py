"""`TokenStore.use` answers an unlimited token from the record it read last, for at most
TOKEN_CACHE_SECONDS: what ends a token is still seen at once (revocation, expiry, the
end of a parent), whichever process caused it. Two stores over one ledger stand for two
server processes."""

from __future__ import annotations

import pytest

from keycell.control_plane.auth.token import store as token_store
from keycell.control_plane.auth.token.store import TokenStore
from keycell.control_plane.errors import PermissionDenied
from keycell.control_plane.ledger import Delete, Key, Kind
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.seal import token_path
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock


def _store(cell: Cell, clock: ManualClock) -> TokenStore:
    revocations = RevocationSet(cell.barrier, "test-cell", clock=clock)
    return TokenStore(cell.barrier, revocations, clock=clock, default_ttl=3600, max_ttl=4 * 3600)


@pytest.fixture
def here(cell: Cell, clock: ManualClock) -> TokenStore:
    return _store(cell, clock)


@pytest.fixture
def elsewhere(cell: Cell, clock: ManualClock) -> TokenStore:
    return _store(cell, clock)


def test_a_token_revoked_by_another_process_is_refused_at_once(
    cell: Cell, here: TokenStore, elsewhere: TokenStore
) -> None:
    token, _ = here.create(here.lookup(cell.init.root_token), policies=["app"])
    assert here.use(token).policies == ["app", "default"]  # read, and kept
    elsewhere.revoke(token)
    with pytest.raises(PermissionDenied):
        here.use(token)


def test_a_child_is_refused_at_once_when_another_process_revokes_its_parent(
    cell: Cell, here: TokenStore, elsewhere: TokenStore
) -> None:
    parent_token, parent = here.create(here.lookup(cell.init.root_token), policies=["app"])
    child_token, _ = here.create(parent, policies=["app"])
    here.use(child_token)
    elsewhere.revoke(parent_token)
    with pytest.raises(PermissionDenied):
        here.use(child_token)


def test_a_kept_token_is_refused_once_it_or_its_parent_expires(
    cell: Cell, here: TokenStore, clock: ManualClock
) -> None:
    parent_token, parent = here.create(here.lookup(cell.init.root_token), ttl=60)
    child_token, _ = here.create(parent, ttl=600)
    here.use(parent_token)
    here.use(child_token)
    clock.advance(61)
    for token in (parent_token, child_token):
        with pytest.raises(PermissionDenied):
            here.use(token)


def test_records_deleted_by_another_process_are_seen_once_the_bound_has_passed(
    cell: Cell, here: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, entry = here.create(here.lookup(cell.init.root_token))
    here.use(token)
    keys = [Key(Kind.TOKEN, token_path(token)), Key(Kind.TOKEN_ACCESSOR, entry.accessor)]
    cell.barrier.transact([Delete(k, cell.barrier.get(k).version) for k in keys])  # type: ignore[union-attr]
    assert here.use(token).accessor == entry.accessor  # within the bound: the kept record
    monkeypatch.setattr(token_store, "TOKEN_CACHE_SECONDS", 0.0)  # the bound has passed
    with pytest.raises(PermissionDenied):
        here.use(token)


def test_use_limited_tokens_are_counted_on_the_ledger_every_time(
    cell: Cell, here: TokenStore, elsewhere: TokenStore
) -> None:
    token, _ = here.create(here.lookup(cell.init.root_token), num_uses=3)
    assert here.use(token).num_uses == 2
    assert elsewhere.use(token).num_uses == 1
    assert here.use(token).num_uses == 0  # the last use, which revokes it
    with pytest.raises(PermissionDenied):
        elsewhere.use(token)

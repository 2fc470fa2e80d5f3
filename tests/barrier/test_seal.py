"""The seal lifecycle: init once, unseal by quorum, seal, rekey, HSM auto-unseal.
Runs on every ledger adapter."""

from __future__ import annotations

import threading
import uuid

import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.barrier import Barrier, SealedError
from keycell.control_plane.ledger import Item, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.seal import (
    AlreadyInitializedError,
    NonceMismatchError,
    NotInitializedError,
    Seal,
    SealMode,
    SealModeError,
    ShareError,
    UnsealError,
    token_path,
)
from keycell.testing.key_backends import pkcs11_backend
from keycell.testing.softhsm import SoftHsmToken

SECRET = Key(Kind.SECRET_META, "secret/app/db")


def raw_items(ledger: Ledger) -> list[Item]:
    return [item for kind in Kind for item in iter_prefix(ledger, kind)]


def new_cell(ledger: Ledger) -> tuple[Seal, Barrier]:
    barrier = Barrier(ledger)
    return Seal(ledger, barrier), barrier


def test_fresh_cell_is_uninitialized_and_sealed(ledger: Ledger) -> None:
    seal, barrier = new_cell(ledger)
    status = seal.status()
    assert (status.initialized, status.sealed) == (False, True)
    with pytest.raises(NotInitializedError):
        seal.unseal("00" * 33)
    with pytest.raises(SealedError):
        barrier.get(SECRET)


def test_init_hands_out_shares_and_a_root_token_once(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(5, 3)
    assert (result.mode, result.threshold, len(result.shares)) == (SealMode.SHAMIR, 3, 5)
    assert all(len(s) == 33 for s in result.shares) and len(set(result.shares)) == 5
    assert result.root_token.startswith("kc.")
    assert "kc." not in repr(result) and result.shares_hex[0] not in repr(result)
    status = seal.status()
    assert (status.initialized, status.sealed, status.shares, status.threshold) == (True, True, 5, 3)
    with pytest.raises(AlreadyInitializedError):
        seal.init(5, 3)


def test_concurrent_inits_produce_exactly_one_cell(ledger: Ledger) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def init() -> None:
        seal, _ = new_cell(ledger)
        start.wait()
        try:
            seal.init(3, 2)
            outcomes.append("won")
        except AlreadyInitializedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=init) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused", "refused", "refused", "won"]


def test_root_token_is_stored_only_as_a_digest(ledger: Ledger) -> None:
    seal, barrier = new_cell(ledger)
    result = seal.init(3, 2)
    stored = [i.key.path for i in iter_prefix(ledger, Kind.TOKEN)]
    assert stored == [token_path(result.root_token)]
    seal.unseal(result.shares[0])
    seal.unseal(result.shares[1])
    assert b'"root"' in barrier.get(Key(Kind.TOKEN, token_path(result.root_token))).value  # type: ignore[union-attr]


def test_unseal_counts_distinct_shares_up_to_the_threshold(ledger: Ledger) -> None:
    seal, barrier = new_cell(ledger)
    result = seal.init(5, 3)
    first = seal.unseal(result.shares_hex[0])
    assert (first.progress, first.sealed) == (1, True) and first.nonce
    again = seal.unseal(result.shares_base64[0])  # the same share in the other encoding
    assert again.progress == 1 and again.nonce == first.nonce
    assert seal.unseal(result.shares_base64[3], nonce=first.nonce).progress == 2
    done = seal.unseal(result.shares[4])
    assert (done.sealed, done.progress) == (False, 0)
    barrier.put_if(SECRET, b"value", 0)
    assert barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]


def test_a_share_for_another_attempt_is_refused(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(3, 2)
    seal.unseal(result.shares[0])
    with pytest.raises(NonceMismatchError):
        seal.unseal(result.shares[1], nonce="not-the-nonce")
    assert seal.status().progress == 1


def test_wrong_shares_are_refused_and_change_nothing(ledger: Ledger, tmp_path: object) -> None:
    seal, _ = new_cell(ledger)
    seal.init(3, 2)
    before = raw_items(ledger)
    other = SqliteLedger(f"{tmp_path}/other.db")
    foreign = Seal(other, Barrier(other)).init(3, 2)
    seal.unseal(foreign.shares[0])
    with pytest.raises(UnsealError, match="progress was reset"):
        seal.unseal(foreign.shares[1])
    status = seal.status()
    assert (status.sealed, status.progress) == (True, 0)
    assert raw_items(ledger) == before
    other.close()


def test_mixing_right_and_wrong_shares_is_refused(ledger: Ledger, tmp_path: object) -> None:
    seal, _ = new_cell(ledger)
    mine = seal.init(3, 2)
    other = SqliteLedger(f"{tmp_path}/other.db")
    foreign = Seal(other, Barrier(other)).init(3, 2)
    seal.unseal(mine.shares[0])
    with pytest.raises(UnsealError):
        seal.unseal(foreign.shares[1])
    assert seal.status().sealed
    other.close()


@pytest.mark.parametrize("share", ["zz", "00" * 32, "00" * 34, "", "not a share at all"])
def test_malformed_share_is_refused_without_counting(ledger: Ledger, share: str) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(3, 2)
    seal.unseal(result.shares[0])
    with pytest.raises(ShareError) as caught:
        seal.unseal(share)
    assert share not in str(caught.value) or share == ""
    assert seal.status().progress == 1


def test_reset_discards_progress(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(3, 2)
    nonce = seal.unseal(result.shares[0]).nonce
    assert seal.unseal_reset().progress == 0
    assert seal.unseal(result.shares[1]).nonce != nonce


def test_sealing_refuses_every_secret_operation_until_unsealed(ledger: Ledger) -> None:
    seal, barrier = new_cell(ledger)
    result = seal.init(3, 2)
    seal.unseal(result.shares[0])
    seal.unseal(result.shares[1])
    barrier.put_if(SECRET, b"value", 0)
    assert seal.seal().sealed
    for attempt in [
        lambda: barrier.get(SECRET),
        lambda: barrier.put_if(SECRET, b"v2", 1),
        lambda: barrier.delete_if(SECRET, 1),
        lambda: barrier.scan(Kind.SECRET_META),
        lambda: barrier.rotate(),
    ]:
        with pytest.raises(SealedError):
            attempt()
    seal.unseal(result.shares[2])
    seal.unseal(result.shares[0])
    assert barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]


def test_single_share_cell_unseals_with_its_one_key(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(1, 1)
    assert len(result.shares) == 1
    assert not seal.unseal(result.shares_hex[0]).sealed


def test_bad_split_parameters_are_refused_before_anything_is_written(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    for shares, threshold in [(0, 0), (3, 4), (3, 1), (256, 2), (1, 2)]:
        with pytest.raises(ShareError):
            seal.init(shares, threshold)
    assert raw_items(ledger) == []


def test_another_process_sees_the_cell_initialized(ledger: Ledger) -> None:
    seal, _ = new_cell(ledger)
    result = seal.init(3, 2)
    second, barrier = new_cell(ledger)
    assert second.status().initialized
    second.unseal(result.shares[1])
    second.unseal(result.shares[2])
    assert not barrier.sealed


# --- rekey -------------------------------------------------------------------------------


def test_rekey_issues_new_shares_without_reencrypting_data(ledger: Ledger) -> None:
    seal, barrier = new_cell(ledger)
    old = seal.init(5, 3)
    for share in old.shares[:3]:
        seal.unseal(share)
    barrier.put_if(SECRET, b"value", 0)
    stored_before = ledger.get(SECRET)
    new = seal.rekey(old.shares[1:4], 3, 2)
    assert (len(new.shares), new.threshold) == (3, 2)
    assert ledger.get(SECRET) == stored_before  # data untouched
    assert not barrier.sealed and barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]
    seal.seal()
    seal.unseal(old.shares[0])
    with pytest.raises(UnsealError):
        seal.unseal(old.shares[1])  # the new threshold is 2: old shares no longer rebuild the key
    seal.unseal(new.shares[0])
    assert not seal.unseal(new.shares[2]).sealed
    assert seal.status().threshold == 2 and seal.status().shares == 3


def test_rekey_with_wrong_shares_changes_nothing(ledger: Ledger, tmp_path: object) -> None:
    seal, _ = new_cell(ledger)
    seal.init(3, 2)
    before = raw_items(ledger)
    other = SqliteLedger(f"{tmp_path}/other.db")
    foreign = Seal(other, Barrier(other)).init(3, 2)
    with pytest.raises(UnsealError):
        seal.rekey(foreign.shares[:2], 5, 3)
    with pytest.raises(UnsealError, match="needs 2 distinct"):
        seal.rekey([foreign.shares[0], foreign.shares[0]], 5, 3)
    assert raw_items(ledger) == before
    other.close()


# --- HSM mode (auto-unseal, recovery shares) ---------------------------------------------------


def hsm_cell(ledger: Ledger, backend: SoftwareKeyBackend) -> tuple[Seal, Barrier]:
    barrier = Barrier(ledger)
    return Seal(ledger, barrier, key_backend=backend, kek="cell-kek"), barrier


def test_hsm_mode_is_unsealed_after_init_and_unseals_itself(ledger: Ledger) -> None:
    backend = SoftwareKeyBackend()
    seal, barrier = hsm_cell(ledger, backend)
    result = seal.init(5, 3)
    assert result.mode is SealMode.HSM and not barrier.sealed
    barrier.put_if(SECRET, b"value", 0)
    seal.seal()
    with pytest.raises(SealedError):
        barrier.get(SECRET)
    assert not seal.auto_unseal().sealed
    assert barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]
    again, other_barrier = hsm_cell(ledger, backend)  # a restarted process
    again.auto_unseal()
    assert other_barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]


def test_hsm_mode_shares_are_recovery_shares_not_unseal_keys(ledger: Ledger) -> None:
    seal, _ = hsm_cell(ledger, SoftwareKeyBackend())
    result = seal.init(3, 2)
    seal.seal()
    with pytest.raises(SealModeError):
        seal.unseal(result.shares[0])
    new = seal.rekey(result.shares[:2], 5, 3)
    with pytest.raises(UnsealError):
        seal.rekey(result.shares[:2], 3, 2)
    assert len(seal.rekey(new.shares[2:5], 3, 2).shares) == 3


def test_hsm_mode_with_a_disabled_kek_stays_sealed(ledger: Ledger) -> None:
    from keycell.control_plane.keys import KeyDisabledError

    backend = SoftwareKeyBackend()
    seal, barrier = hsm_cell(ledger, backend)
    seal.init(3, 2)
    seal.seal()
    backend.disable("cell-kek")
    with pytest.raises(KeyDisabledError):
        seal.auto_unseal()
    assert barrier.sealed


def test_hsm_mode_with_a_pkcs11_token_holds_the_kek_in_the_token(
    ledger: Ledger, softhsm: SoftHsmToken
) -> None:
    token_backend = pkcs11_backend(softhsm)
    kek = f"cell-kek-{uuid.uuid4().hex[:8]}"
    barrier = Barrier(ledger)
    seal = Seal(ledger, barrier, key_backend=token_backend, kek=kek)
    result = seal.init(5, 3)
    info = token_backend.describe(kek)
    assert (info.provider, info.extractable) == ("pkcs11", False)
    barrier.put_if(SECRET, b"value", 0)
    seal.seal()
    restarted_backend = pkcs11_backend(softhsm)  # a restarted process, same token
    restarted = Seal(ledger, Barrier(ledger), key_backend=restarted_backend, kek=kek)
    assert not restarted.auto_unseal().sealed
    assert restarted.barrier.get(SECRET).value == b"value"  # type: ignore[union-attr]
    assert len(restarted.rekey(result.shares[1:4], 3, 2).shares) == 3
    token_backend.close()
    restarted_backend.close()

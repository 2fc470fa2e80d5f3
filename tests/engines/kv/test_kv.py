"""The KV v2 engine: Vault's versioned-secret semantics (versions, check-and-set,
max_versions, soft delete, undelete, destroy, metadata, listing) over a real cell's
barrier on both ledgers, with each value sealed in its own envelope."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.engines.kv.backend import MAX_SECRET_BYTES, KvV2
from keycell.control_plane.envelope import Envelopes
from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.keys import IntegrityError, KeySpec
from keycell.control_plane.ledger import Item, Key, Kind, Ledger, Op, iter_prefix
from keycell.control_plane.router import Request
from keycell.functions.wiring import router_from_environment
from keycell.testing.cells import Cell, open_cell
from keycell.testing.clock import ManualClock

PLAINTEXT = "correct-horse-battery-staple-7f3a"


def make_kv(cell: Cell, clock: ManualClock) -> KvV2:
    backend = SoftwareKeyBackend()
    backend.create_key("cell-kek", KeySpec.AES_256)
    return KvV2(cell.barrier, Envelopes("us-east-1", backend, "cell-kek"), clock=clock)


@pytest.fixture
def kv(cell: Cell, clock: ManualClock) -> KvV2:
    """The engine over a cell on each ledger."""
    return make_kv(cell, clock)


@pytest.fixture
def cell_ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = SqliteLedger(tmp_path / "cell.db")
    yield ledger
    ledger.close()


@pytest.fixture
def sqlite_kv(cell_ledger: Ledger, clock: ManualClock) -> KvV2:
    """The engine over a sqlite cell only: for input checks that fail before storage is
    touched, and for long histories (the ledgers share their limits and conformance
    suite, so repeating these on DynamoDB would prove nothing more, only slower)."""
    return make_kv(open_cell(cell_ledger), clock)


def version_item(path: str, version: int) -> Key:
    return Key(Kind.SECRET_VERSION, f"secret/{path}#{version:010d}")


def raw_items(ledger: Ledger) -> list[Any]:
    return [item for kind in Kind for item in iter_prefix(ledger, kind)]


def raw_items_of(ledger: Ledger, kind: Kind) -> list[Any]:
    return list(iter_prefix(ledger, kind))


# --- data ----------------------------------------------------------------------------------


def test_written_data_reads_back_with_its_version_metadata(kv: KvV2) -> None:
    written = kv.write("app/db", {"password": PLAINTEXT, "port": 5432})
    assert written["version"] == 1
    assert written["destroyed"] is False
    assert written["deletion_time"] == ""
    assert written["custom_metadata"] is None
    assert written["created_time"].endswith("Z")
    read = kv.read("app/db")
    assert read["data"] == {"password": PLAINTEXT, "port": 5432}
    assert read["metadata"] == written


def test_each_write_makes_the_next_version(kv: KvV2) -> None:
    assert [kv.write("app/db", {"n": n})["version"] for n in range(3)] == [1, 2, 3]
    assert kv.read("app/db")["data"] == {"n": 2}
    assert kv.read_metadata("app/db")["current_version"] == 3


def test_old_versions_stay_readable_by_number(kv: KvV2) -> None:
    for n in range(3):
        kv.write("app/db", {"n": n})
    assert kv.read("app/db", version=1)["data"] == {"n": 0}
    assert kv.read("app/db", version=2)["metadata"]["version"] == 2
    assert kv.read("app/db", version=0)["data"] == {"n": 2}  # 0 means current, as in Vault


def test_reading_a_missing_secret_or_version_is_not_found_without_a_body(kv: KvV2) -> None:
    with pytest.raises(NotFound) as missing:
        kv.read("nope")
    assert missing.value.data is None
    kv.write("app/db", {"a": 1})
    with pytest.raises(NotFound) as never:
        kv.read("app/db", version=7)
    assert never.value.data is None


def test_cas_zero_writes_only_when_the_secret_is_absent(kv: KvV2) -> None:
    assert kv.write("app/db", {"a": 1}, cas=0)["version"] == 1
    with pytest.raises(InvalidRequest, match="did not match the current version"):
        kv.write("app/db", {"a": 2}, cas=0)


def test_cas_writes_when_it_names_the_current_version(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    kv.write("app/db", {"a": 2})
    assert kv.write("app/db", {"a": 3}, cas=2)["version"] == 3


def test_cas_mismatch_is_refused_and_writes_nothing(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    with pytest.raises(InvalidRequest) as refused:
        kv.write("app/db", {"a": 2}, cas=5)
    assert refused.value.message == "check-and-set parameter did not match the current version"
    assert kv.read("app/db")["data"] == {"a": 1}
    assert kv.read_metadata("app/db")["current_version"] == 1


def test_mount_cas_required_refuses_writes_without_cas(kv: KvV2) -> None:
    kv.write_config(cas_required=True)
    with pytest.raises(InvalidRequest) as refused:
        kv.write("app/db", {"a": 1})
    assert refused.value.message == "check-and-set parameter required for this call"
    assert kv.write("app/db", {"a": 1}, cas=0)["version"] == 1


def test_secret_cas_required_refuses_writes_without_cas(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    kv.write_metadata("app/db", cas_required=True)
    with pytest.raises(InvalidRequest, match="check-and-set parameter required"):
        kv.write("app/db", {"a": 2})
    assert kv.write("app/db", {"a": 2}, cas=1)["version"] == 2
    kv.write("other", {"a": 1})  # other secrets are unaffected


def test_patch_merges_into_the_current_version(kv: KvV2) -> None:
    kv.write("app/db", {"user": "app", "password": "old", "opts": {"ssl": True, "timeout": 5}})
    patched = kv.patch("app/db", {"password": "new", "user": None, "opts": {"timeout": 9}})
    assert patched["version"] == 2
    assert kv.read("app/db")["data"] == {"password": "new", "opts": {"ssl": True, "timeout": 9}}
    assert kv.read("app/db", version=1)["data"]["password"] == "old"


def test_patch_honours_cas(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    with pytest.raises(InvalidRequest, match="did not match"):
        kv.patch("app/db", {"b": 2}, cas=0)
    assert kv.patch("app/db", {"b": 2}, cas=1)["version"] == 2


def test_patch_of_a_missing_or_deleted_secret_is_not_found(kv: KvV2) -> None:
    with pytest.raises(NotFound):
        kv.patch("nope", {"a": 1})
    kv.write("app/db", {"a": 1})
    kv.delete_latest("app/db")
    with pytest.raises(NotFound) as deleted:
        kv.patch("app/db", {"a": 2})
    assert deleted.value.data is not None and deleted.value.data["version"] == 1
    assert deleted.value.data["deletion_time"] != ""


def test_data_must_be_an_object(sqlite_kv: KvV2) -> None:
    with pytest.raises(InvalidRequest, match="no data provided"):
        sqlite_kv.write("app/db", None)
    with pytest.raises(InvalidRequest):
        sqlite_kv.write("app/db", ["not", "a", "map"])


@pytest.mark.parametrize("path", ["", "../etc", "a/../b", "./a", "/abs", "a//b", "trailing/", "bad\x00byte"])
def test_bad_paths_are_refused(sqlite_kv: KvV2, path: str) -> None:
    with pytest.raises(InvalidRequest):
        sqlite_kv.write(path, {"a": 1})


# --- max_versions ---------------------------------------------------------------------------


def test_secret_max_versions_trims_the_oldest_versions_and_their_values(kv: KvV2, cell: Cell) -> None:
    kv.write_metadata("app/db", max_versions=2)
    for n in range(4):
        kv.write("app/db", {"n": n})
    meta = kv.read_metadata("app/db")
    assert sorted(meta["versions"]) == ["3", "4"]
    assert meta["oldest_version"] == 3
    assert cell.ledger.get(version_item("app/db", 1)) is None
    assert cell.ledger.get(version_item("app/db", 2)) is None
    with pytest.raises(NotFound):
        kv.read("app/db", version=1)
    assert kv.read("app/db", version=3)["data"] == {"n": 2}


def test_mount_max_versions_applies_to_every_secret(kv: KvV2) -> None:
    kv.write_config(max_versions=3)
    for n in range(5):
        kv.write("app/db", {"n": n})
    assert sorted(kv.read_metadata("app/db")["versions"]) == ["3", "4", "5"]


def test_ten_versions_are_kept_by_default(kv: KvV2) -> None:
    for n in range(11):
        kv.write("app/db", {"n": n})
    meta = kv.read_metadata("app/db")
    assert len(meta["versions"]) == 10 and "1" not in meta["versions"]


def test_lowering_max_versions_far_trims_more_than_one_transaction_holds(
    sqlite_kv: KvV2, cell_ledger: Ledger
) -> None:
    for n in range(105):
        sqlite_kv.write("app/db", {"n": n})
    sqlite_kv.write_metadata("app/db", max_versions=1)
    sqlite_kv.write("app/db", {"n": "last"})
    meta = sqlite_kv.read_metadata("app/db")
    assert list(meta["versions"]) == ["106"] and meta["oldest_version"] == 106
    stored = list(iter_prefix(cell_ledger, Kind.SECRET_VERSION, "secret/app/db#"))
    assert [item.key.path for item in stored] == ["secret/app/db#0000000106"]


def test_delete_metadata_removes_more_versions_than_one_transaction_holds(
    sqlite_kv: KvV2, cell_ledger: Ledger
) -> None:
    sqlite_kv.write_metadata("app/db", max_versions=200)
    for n in range(120):
        sqlite_kv.write("app/db", {"n": n})
    sqlite_kv.delete_metadata("app/db")
    assert raw_items_of(cell_ledger, Kind.SECRET_VERSION) == []
    assert raw_items_of(cell_ledger, Kind.SECRET_META) == []


def test_data_up_to_the_size_limit_is_stored_and_beyond_it_refused(sqlite_kv: KvV2) -> None:
    fits = {"blob": "x" * (MAX_SECRET_BYTES - 20)}
    assert sqlite_kv.write("app/db", fits)["version"] == 1
    assert sqlite_kv.read("app/db")["data"] == fits
    with pytest.raises(InvalidRequest, match="limit"):
        sqlite_kv.write("app/db", {"blob": "x" * MAX_SECRET_BYTES})


# --- delete, undelete, destroy ------------------------------------------------------------


def test_deleted_latest_version_reads_404_with_its_metadata(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    kv.write("app/db", {"a": 2})
    kv.delete_latest("app/db")
    with pytest.raises(NotFound) as gone:
        kv.read("app/db")
    body = gone.value.data
    assert body is not None and body["data"] is None
    assert body["metadata"]["version"] == 2
    assert body["metadata"]["deletion_time"].endswith("Z")
    assert body["metadata"]["destroyed"] is False
    assert kv.read("app/db", version=1)["data"] == {"a": 1}


def test_deleting_named_versions_hides_only_those(kv: KvV2) -> None:
    for n in range(3):
        kv.write("app/db", {"n": n})
    kv.delete_versions("app/db", [1, 3])
    for version in (1, 3):
        with pytest.raises(NotFound):
            kv.read("app/db", version=version)
    assert kv.read("app/db", version=2)["data"] == {"n": 1}


def test_undelete_restores_deleted_versions(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    kv.delete_latest("app/db")
    kv.undelete_versions("app/db", [1])
    read = kv.read("app/db")
    assert read["data"] == {"a": 1}
    assert read["metadata"]["deletion_time"] == ""


def test_versions_must_be_given(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    for call in (kv.delete_versions, kv.undelete_versions, kv.destroy_versions):
        with pytest.raises(InvalidRequest, match=r"(?i)no version number provided"):
            call("app/db", [])


def test_destroy_removes_the_sealed_value_from_storage(kv: KvV2, cell: Cell) -> None:
    kv.write("app/db", {"a": 1})
    kv.write("app/db", {"a": 2})
    assert cell.ledger.get(version_item("app/db", 1)) is not None
    kv.destroy_versions("app/db", [1])
    assert cell.ledger.get(version_item("app/db", 1)) is None
    assert kv.read_metadata("app/db")["versions"]["1"]["destroyed"] is True
    with pytest.raises(NotFound) as gone:
        kv.read("app/db", version=1)
    assert gone.value.data is not None and gone.value.data["metadata"]["destroyed"] is True
    kv.undelete_versions("app/db", [1])  # destroyed is for good
    with pytest.raises(NotFound):
        kv.read("app/db", version=1)
    assert kv.read("app/db")["data"] == {"a": 2}


def test_delete_version_after_makes_versions_read_as_deleted(kv: KvV2, clock: ManualClock) -> None:
    kv.write_config(delete_version_after="1m")
    written = kv.write("app/db", {"a": 1})
    assert written["deletion_time"] != ""
    assert kv.read("app/db")["data"] == {"a": 1}
    clock.advance(61)
    with pytest.raises(NotFound) as expired:
        kv.read("app/db")
    assert expired.value.data is not None and expired.value.data["metadata"]["version"] == 1


def test_the_smaller_delete_version_after_of_mount_and_secret_wins(kv: KvV2, clock: ManualClock) -> None:
    kv.write_config(delete_version_after=3600)
    kv.write_metadata("app/db", delete_version_after="30s")
    kv.write("app/db", {"a": 1})
    clock.advance(31)
    with pytest.raises(NotFound):
        kv.read("app/db")


# --- metadata --------------------------------------------------------------------------------


def test_metadata_check_and_set_once_required(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    assert kv.read_metadata("app/db")["current_metadata_version"] == 0
    kv.write_metadata("app/db", metadata_cas_required=True)
    assert kv.read_metadata("app/db")["metadata_cas_required"] is True
    with pytest.raises(InvalidRequest, match="send metadata_cas"):
        kv.write_metadata("app/db", max_versions=2)
    with pytest.raises(InvalidRequest, match="did not match the current metadata version"):
        kv.patch_metadata("app/db", max_versions=2, metadata_cas=0)
    assert kv.read_metadata("app/db")["max_versions"] == 0  # neither refused write changed it
    kv.patch_metadata("app/db", max_versions=2, metadata_cas=1)
    meta = kv.read_metadata("app/db")
    assert (meta["max_versions"], meta["current_metadata_version"]) == (2, 2)
    with pytest.raises(InvalidRequest, match="metadata_cas must be"):
        kv.write_metadata("app/db", max_versions=3, metadata_cas=-1)


def test_a_mount_can_require_metadata_check_and_set_for_every_key(kv: KvV2) -> None:
    kv.write("app/other", {"a": 1})
    kv.write_config(metadata_cas_required=True)
    assert kv.read_config()["metadata_cas_required"] is True
    with pytest.raises(InvalidRequest, match="send metadata_cas"):
        kv.write_metadata("app/other", max_versions=2)
    kv.write_metadata("app/other", max_versions=2, metadata_cas=0)
    assert kv.read_metadata("app/other")["current_metadata_version"] == 1


def test_metadata_reads_as_vault_shapes_it(kv: KvV2) -> None:
    kv.write("app/db", {"a": 1})
    kv.write_metadata(
        "app/db",
        max_versions=5,
        cas_required=False,
        delete_version_after="1h",
        custom_metadata={"owner": "ops"},
    )
    meta = kv.read_metadata("app/db")
    assert set(meta) == {
        "cas_required",
        "created_time",
        "current_metadata_version",
        "current_version",
        "custom_metadata",
        "delete_version_after",
        "max_versions",
        "metadata_cas_required",
        "oldest_version",
        "updated_time",
        "versions",
    }
    assert meta["current_metadata_version"] == 1 and meta["metadata_cas_required"] is False
    assert meta["max_versions"] == 5
    assert meta["delete_version_after"] == "1h0m0s"
    assert meta["custom_metadata"] == {"owner": "ops"}
    assert meta["versions"]["1"] == {
        "created_time": meta["created_time"],
        "deletion_time": "",
        "destroyed": False,
    }
    assert kv.read("app/db")["metadata"]["custom_metadata"] == {"owner": "ops"}


def test_metadata_written_before_any_data_has_no_readable_version(kv: KvV2) -> None:
    kv.write_metadata("app/db", max_versions=3)
    assert kv.read_metadata("app/db")["current_version"] == 0
    with pytest.raises(NotFound):
        kv.read("app/db")
    assert kv.write("app/db", {"a": 1}, cas=0)["version"] == 1


def test_metadata_patch_merges_custom_metadata(kv: KvV2) -> None:
    kv.write_metadata("app/db", custom_metadata={"owner": "ops", "tier": "1"})
    kv.patch_metadata("app/db", custom_metadata={"tier": None, "team": "db"}, max_versions=4)
    meta = kv.read_metadata("app/db")
    assert meta["custom_metadata"] == {"owner": "ops", "team": "db"}
    assert meta["max_versions"] == 4
    with pytest.raises(NotFound):
        kv.patch_metadata("nope", max_versions=1)


@pytest.mark.parametrize(
    "custom",
    [
        {f"k{n}": "v" for n in range(65)},
        {"k" * 129: "v"},
        {"k": "v" * 513},
        {"k": ""},
        {"k": "line\nbreak"},
    ],
    ids=["65-keys", "long-key", "long-value", "empty-value", "unprintable"],
)
def test_custom_metadata_over_vaults_limits_is_refused(sqlite_kv: KvV2, custom: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest, match="custom_metadata validation failed"):
        sqlite_kv.write_metadata("app/db", custom_metadata=custom)
    with pytest.raises(NotFound):
        sqlite_kv.read_metadata("app/db")


def test_custom_metadata_at_vaults_limits_is_accepted(kv: KvV2) -> None:
    custom = {f"{n:03d}" + "k" * 125: "v" * 512 for n in range(64)}
    kv.write_metadata("app/db", custom_metadata=custom)
    assert kv.read_metadata("app/db")["custom_metadata"] == custom


def test_delete_metadata_removes_every_version_and_the_metadata(kv: KvV2, cell: Cell) -> None:
    for n in range(3):
        kv.write("app/db", {"n": n})
    kv.write("app/dbx", {"n": 1})
    kv.delete_metadata("app/db")
    with pytest.raises(NotFound):
        kv.read_metadata("app/db")
    with pytest.raises(NotFound):
        kv.read("app/db", version=1)
    paths = {item.key.path for item in raw_items(cell.ledger)}
    assert not any(p.startswith("secret/app/db#") or p == "secret/app/db" for p in paths)
    assert kv.read("app/dbx")["data"] == {"n": 1}
    assert kv.write("app/db", {"fresh": True}, cas=0)["version"] == 1


def test_config_reads_back_as_vault_shapes_it(kv: KvV2) -> None:
    assert kv.read_config() == {
        "cas_required": False,
        "delete_version_after": "0s",
        "max_versions": 0,
        "metadata_cas_required": False,
    }
    kv.write_config(max_versions=7, delete_version_after="3h25m19s")
    assert kv.read_config() == {
        "cas_required": False,
        "delete_version_after": "3h25m19s",
        "max_versions": 7,
        "metadata_cas_required": False,
    }
    kv.write_config(delete_version_after=-1)
    assert kv.read_config()["delete_version_after"] == "-1s"
    with pytest.raises(InvalidRequest):
        kv.write_config(max_versions=-1)


class RacedLedger:
    """A ledger whose first transaction lets a rival change go in just before it, so the
    writer using it loses the compare-and-set once."""

    def __init__(self, inner: Ledger, rival: Callable[[], None]) -> None:
        self.inner = inner
        self.rival: Callable[[], None] | None = rival

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        rival, self.rival = self.rival, None
        if rival is not None:
            rival()
        return self.inner.transact(ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_write_that_loses_a_race_reads_the_mount_config_again(
    kv: KvV2, cell: Cell, clock: ManualClock
) -> None:
    """The settings a request read for its guard serve its first attempt only: a rival
    that turned cas_required on and wrote meanwhile makes the retry refuse the write."""
    kv.write("app/db", {"n": 1})
    read_before = kv.mount_config()
    assert read_before["cas_required"] is False

    def rival() -> None:
        kv.write_config(cas_required=True)
        kv.write("app/db", {"n": "rival"}, cas=1)

    raced = KvV2(RacedLedger(cell.barrier, rival), kv.envelopes, clock=clock)
    with pytest.raises(InvalidRequest) as refused:
        raced.write("app/db", {"n": 2}, config=read_before)
    assert refused.value.message == "check-and-set parameter required for this call"
    assert kv.read("app/db")["data"] == {"n": "rival"}
    assert kv.read_metadata("app/db")["current_version"] == 2


def test_a_write_request_reads_the_mount_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the routes, the freshness guard's read of the mount settings is the one
    the write uses (it was read twice per write)."""
    router = router_from_environment(
        {
            "KEYCELL_LEDGER": f"sqlite://{tmp_path / 'cell.db'}",
            "KEYCELL_KEY_BACKEND": "software",
            "KEYCELL_SOFTWARE_KEYS": f"sqlite://{tmp_path / 'keys.db'}",
            "KEYCELL_SEAL": "hsm",
        }
    )
    root = "kc.kv-config-reads-root-token"
    router.services.seal.init(1, 1, root_token=root)
    router.services.after_unseal()
    kv: KvV2 = router.services.kv
    reads: list[int] = []
    config = kv._config

    def counted() -> dict[str, Any]:
        reads.append(1)
        return config()

    monkeypatch.setattr(kv, "_config", counted)
    for n in (1, 2):
        answer = router.handle(Request("POST", "secret/data/app/db", data={"data": {"n": n}}, token=root))
        assert answer.status == 200, answer.body
        assert answer.body["data"]["version"] == n
    assert len(reads) == 2
    reads.clear()
    answer = router.handle(Request("GET", "secret/data/app/db", token=root))
    assert answer.body["data"]["data"] == {"n": 2}
    assert len(reads) == 1  # the read's guard


# --- list ------------------------------------------------------------------------------------


def test_list_folds_folders_as_vault_does(kv: KvV2) -> None:
    for path in ["a", "a/x", "a/y/z", "b", "c/d"]:
        kv.write(path, {"v": 1})
    assert kv.list("") == {"keys": ["a", "a/", "b", "c/"]}
    assert kv.list("a/") == {"keys": ["x", "y/"]}
    assert kv.list("a") == {"keys": ["x", "y/"]}  # LIST adds the trailing slash


def test_list_of_an_empty_folder_is_not_found(kv: KvV2) -> None:
    with pytest.raises(NotFound):
        kv.list("")
    kv.write("a/x", {"v": 1})
    with pytest.raises(NotFound):
        kv.list("b/")
    kv.delete_metadata("a/x")
    with pytest.raises(NotFound):
        kv.list("a/")


# --- concurrency and confidentiality ---------------------------------------------------------


def race(workers: int, work: Any) -> list[Any]:
    start = threading.Barrier(workers)
    results: list[Any] = []

    def run(n: int) -> None:
        start.wait()
        try:
            results.append(work(n))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_writers_without_cas_each_land_a_distinct_version(kv: KvV2) -> None:
    results = race(6, lambda n: kv.write("app/db", {"writer": n}))
    assert sorted(r["version"] for r in results) == [1, 2, 3, 4, 5, 6]
    writers = {kv.read("app/db", version=v)["data"]["writer"] for v in range(1, 7)}
    assert writers == set(range(6))


def test_concurrent_writers_with_the_same_cas_exactly_one_wins(kv: KvV2) -> None:
    kv.write("app/db", {"writer": "first"})
    results = race(6, lambda n: kv.write("app/db", {"writer": n}, cas=1))
    wins = [r for r in results if isinstance(r, dict)]
    losses = [r for r in results if isinstance(r, InvalidRequest)]
    assert len(wins) == 1 and len(losses) == 5
    assert wins[0]["version"] == 2
    assert all(r.message == "check-and-set parameter did not match the current version" for r in losses)
    assert kv.read_metadata("app/db")["current_version"] == 2


def test_the_raw_ledger_never_holds_the_plaintext(kv: KvV2, cell: Cell) -> None:
    kv.write("app/db", {"password": PLAINTEXT})
    kv.patch("app/db", {"note": PLAINTEXT})
    kv.write_metadata("app/db", custom_metadata={"owner": "ops"})
    items = raw_items(cell.ledger)
    assert any(item.key.kind is Kind.SECRET_VERSION for item in items)
    for item in items:
        assert PLAINTEXT.encode() not in item.value
    assert kv.read("app/db")["data"] == {"password": PLAINTEXT, "note": PLAINTEXT}


def test_a_sealed_value_moved_to_another_version_does_not_open(kv: KvV2, cell: Cell) -> None:
    kv.write("app/db", {"a": "one"})
    kv.write("app/db", {"a": "two"})
    # Through the barrier (so only the envelope's own binding is tested): put version
    # 1's envelope where version 2's belongs.
    first = cell.barrier.get(version_item("app/db", 1))
    second = cell.barrier.get(version_item("app/db", 2))
    assert first is not None and second is not None
    cell.barrier.put_if(version_item("app/db", 2), first.value, second.version)
    with pytest.raises(IntegrityError):
        kv.read("app/db", version=2)

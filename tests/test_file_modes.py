"""Files Keycell creates that hold keys, ledger items, audit entries or state are
owner-only: 0600 in a 0700 folder, whatever the umask (issue 20, item 8).

The main check starts a real `keycell server` (dev: ledger, dev-keys.db with the dev KEK
and seal key; and a sealed cell that is then initialized), with an audit file, under
umask 022, and walks everything in its data folder, while it runs and after it stops.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.client import Client
from keycell.control_plane.ledger import Key, Kind
from keycell.control_plane.private_files import open_private, private_dir, write_private
from keycell.testing.processes import keycell_server

ROOT = "kc.file-modes-root-token"


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """Every file and folder under `folder` (itself included) -> its permission bits."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(folder: Path) -> None:
    loose = {
        name: oct(mode)
        for name, mode in modes(folder).items()
        if mode != (0o700 if (folder / name).is_dir() else 0o600)
    }
    assert loose == {}, f"not owner-only (want files 0600, folders 0700): {loose}"


def exercise(url: str, token: str) -> None:
    client = Client(url, token=token)
    try:
        client.request("POST", "secret/data/app/db", {"data": {"password": "correct-horse"}})
        client.request(
            "PUT", "sys/policies/acl/app", {"policy": 'path "secret/*" { capabilities = ["read"] }'}
        )
        assert client.request("GET", "secret/data/app/db")["data"]["data"] == {"password": "correct-horse"}
    finally:
        client.close()


def test_a_dev_servers_data_folder_is_owner_only(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "data"  # made by the server
    server = keycell_server(
        data, dev_root_token=ROOT, workers=1, env={"KEYCELL_AUDIT_FILE": str(data / "audit" / "audit.log")}
    )
    port = server.start()
    try:
        exercise(f"http://127.0.0.1:{port}", ROOT)
        names = set(modes(data))
        assert {"cell.db", "dev-keys.db", "audit/audit.log"} <= names, names
        assert_private(data)
    finally:
        server.stop()
    assert_private(data)


def test_a_sealed_servers_data_folder_is_owner_only(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "var" / "keycell"
    server = keycell_server(data, workers=1)
    port = server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        anonymous = hvac.Client(url=url)
        init = anonymous.sys.initialize(secret_shares=1, secret_threshold=1)
        anonymous.sys.submit_unseal_key(init["keys"][0])
        exercise(url, init["root_token"])
        assert "cell.db" in modes(data)
        assert_private(data)
    finally:
        server.stop()
    assert_private(data)


def test_a_ledger_file_left_world_readable_by_an_older_keycell_is_tightened(
    tmp_path: Path, loose_umask: None
) -> None:
    path = tmp_path / "cell.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    ledger = SqliteLedger(path)
    ledger.put_if(Key(Kind.CONFIG, "x"), b"y", 0)
    ledger.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_helpers_make_owner_only_files_and_folders(tmp_path: Path, loose_umask: None) -> None:
    folder = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    write_private(folder / "state.json", b"{}")
    assert stat.S_IMODE((folder / "state.json").stat().st_mode) == 0o600
    assert (folder / "state.json").read_bytes() == b"{}"
    os.chmod(folder / "state.json", 0o644)
    write_private(folder / "state.json", b"{1}")  # replaced, owner-only again
    assert stat.S_IMODE((folder / "state.json").stat().st_mode) == 0o600
    fd = open_private(folder / "log", os.O_WRONLY | os.O_APPEND)
    os.close(fd)
    assert stat.S_IMODE((folder / "log").stat().st_mode) == 0o600
    assert sorted(p.name for p in Path(folder).iterdir()) == ["log", "state.json"]  # no temporary left

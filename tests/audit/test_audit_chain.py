"""The audit core: entries, HMAC of sensitive values, the hash chain with group
commit, fail-closed, and `keycell audit verify` naming the first tampered line."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keycell.cli import app
from keycell.control_plane.audit import (
    HMAC_PREFIX,
    Auditor,
    AuditUnavailable,
    FileSink,
    Hasher,
    encode_line,
    entry_hash,
    head_key,
    merge,
)
from tests.audit.conftest import CELL, ROOT, call, open_router

CANARY = "canary-value-6b1d0e"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def audited(tmp_path: Path) -> tuple[Any, Path]:
    log = tmp_path / "audit.log"
    return open_router(tmp_path, log), log


def test_request_and_response_entries_carry_who_what_and_hmacs(audited: tuple[Any, Path]) -> None:
    router, log = audited
    write = call(router, "POST", "secret/data/app/db", {"data": {"password": CANARY}})
    assert write.status == 200
    read = call(router, "GET", "secret/data/app/db")
    assert read.status == 200
    entries = lines(log)
    text = log.read_text()
    assert CANARY not in text and ROOT not in text
    # A write is recorded before it runs (request entry) and after (response entry);
    # a KV read changes nothing, so its one self-contained entry comes with the answer.
    request, written, response = entries[-3:]
    assert [request["type"], written["type"], response["type"]] == ["request", "response", "response"]
    assert request["request"]["id"] == written["request"]["id"] == write.body["request_id"]  # type: ignore[index]
    assert response["request"]["id"] == read.body["request_id"]  # type: ignore[index]
    assert sum(e["request"]["id"] == response["request"]["id"] for e in entries) == 1
    assert response["request"]["path"] == "secret/data/app/db"
    assert response["request"]["operation"] == "read"
    assert response["response"]["status"] == 200
    assert response["latency_ms"] >= 0
    assert response["cell"] == CELL and response["time"].endswith("Z") and "." in response["time"]
    assert response["auth"]["accessor"] and response["auth"]["policies"] == ["root"]
    assert response["request"]["client_token"].startswith(HMAC_PREFIX)
    digest = router.auditor.audit_hash(CANARY)
    assert response["response"]["body"]["data"]["data"]["password"] == digest
    assert request["request"]["data"]["data"]["password"] == digest  # the write's request entry
    # The chain: consecutive, linked, each hash over the entry's own content.
    for before, after in itertools.pairwise(entries):
        assert after["seq"] == before["seq"] + 1 and after["prev"] == before["hash"]
        assert after["hlc"] > before["hlc"]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    # The head in the ledger is the last entry.
    assert len({e["writer"] for e in entries}) == 1  # one process: one chain
    head = json.loads(router.services.ledger.get(head_key(CELL, entries[-1]["writer"])).value)
    assert (head["seq"], head["hash"]) == (entries[-1]["seq"], entries[-1]["hash"])


@pytest.mark.parametrize("key_bytes", [1, 32, 64, 65, 200])
def test_the_hasher_is_hmac_sha256(key_bytes: int) -> None:
    key = bytes(range(256))[:key_bytes]
    hasher = Hasher(key)
    for value in ["", CANARY, "é" * 300]:
        expected = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
        assert hasher.digest(value) == HMAC_PREFIX + expected
    assert Hasher(None).digest(CANARY) == "redacted:sealed"


def test_audit_hash_route_matches_the_trail(audited: tuple[Any, Path]) -> None:
    router, _ = audited
    answer = call(router, "POST", "sys/audit-hash/file", {"input": CANARY})
    assert answer.status == 200
    assert answer.body["data"]["hash"] == router.auditor.audit_hash(CANARY)  # type: ignore[index]
    assert call(router, "POST", "sys/audit-hash/nope", {"input": CANARY}).status == 400
    assert call(router, "POST", "sys/audit-hash/file", {}).status == 400


def test_denied_and_unknown_requests_are_audited(audited: tuple[Any, Path]) -> None:
    router, log = audited
    from keycell.control_plane.router import Request

    assert router.handle(Request("GET", "secret/data/x", token="kc.wrong-" + CANARY)).status == 403
    assert router.handle(Request("GET", "nowhere/at/all")).status == 404
    denied, unknown = lines(log)[-2:]
    assert denied["response"]["status"] == 403 and denied["auth"] is None
    assert unknown["response"]["status"] == 404
    assert CANARY not in log.read_text()


def test_record_writes_non_http_events(audited: tuple[Any, Path]) -> None:
    router, log = audited
    entry = router.auditor.record(
        {"kind": "revocation-applied", "origin": "eu-1", "sensitive": {"token": "kc." + CANARY}}
    )
    assert entry is not None and entry["type"] == "event"
    last = lines(log)[-1]
    assert last["event"]["kind"] == "revocation-applied"
    assert last["event"]["sensitive"]["token"].startswith(HMAC_PREFIX)
    assert CANARY not in log.read_text()


class BrokenSink:
    name = "file"

    def lock(self) -> Any:
        return nullcontext()

    def write(self, lines: bytes, entries: Any) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        pass


def test_fail_closed_refuses_before_the_engine_runs(tmp_path: Path) -> None:
    router = open_router(tmp_path, None)
    services = router.services
    router.auditor = Auditor(services.ledger, services.barrier, CELL, [BrokenSink()])
    refused = call(router, "POST", "secret/data/refused", {"data": {"v": CANARY}})
    assert refused.status == 503
    assert "audit" in refused.body["errors"][0] and CANARY not in json.dumps(refused.body)  # type: ignore[index]
    router.auditor = None
    assert call(router, "GET", "secret/data/refused").status == 404  # the write was never applied


def test_fail_open_serves_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    router = open_router(tmp_path, None)
    services = router.services
    router.auditor = Auditor(services.ledger, services.barrier, CELL, [BrokenSink()], fail_open=True)
    with caplog.at_level(logging.WARNING, "keycell.audit"):
        assert call(router, "POST", "secret/data/open", {"data": {"v": CANARY}}).status == 200
    assert "fail-open" in caplog.text and CANARY not in caplog.text
    with pytest.raises(AuditUnavailable):
        Auditor(services.ledger, services.barrier, CELL, [BrokenSink()]).record({"kind": "x"})


# --- tampering ----------------------------------------------------------------------------------


@pytest.fixture
def trail(audited: tuple[Any, Path]) -> Path:
    router, log = audited
    for i in range(5):
        call(router, "POST", f"secret/data/t/{i}", {"data": {"v": str(i)}})
    assert len(lines(log)) == 10
    return log


def rewrite(path: Path, entries: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in entries))


def verify(*args: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", *map(str, args)])
    return result.exit_code, result.output


def first_failure(output: str) -> int:
    return int(output.split("FAIL ", 1)[1].split(":", 2)[1])


def test_an_intact_trail_verifies(trail: Path) -> None:
    code, output = verify(trail)
    assert code == 0 and "OK 10 entries" in output


def test_a_modified_entry_is_named(trail: Path) -> None:
    raw = trail.read_text().splitlines()
    raw[4] = raw[4].replace("secret/data/t/", "secret/data/x/")
    assert raw[4] != trail.read_text().splitlines()[4]
    rewrite(trail, raw)
    code, output = verify(trail)
    assert code == 1 and first_failure(output) == 5 and "modified" in output


def test_a_deleted_entry_is_named(trail: Path) -> None:
    raw = trail.read_text().splitlines()
    del raw[4]
    rewrite(trail, raw)
    code, output = verify(trail)
    assert code == 1 and first_failure(output) == 5 and "deleted" in output


def test_an_inserted_copy_is_named(trail: Path) -> None:
    raw = trail.read_text().splitlines()
    raw.insert(6, raw[2])
    rewrite(trail, raw)
    code, output = verify(trail)
    assert code == 1 and first_failure(output) == 7 and "inserted" in output


def test_a_forged_insert_with_a_valid_hash_is_named(trail: Path) -> None:
    raw = trail.read_text().splitlines()
    forged = json.loads(raw[4])
    forged["request"]["path"] = "secret/data/forged"
    forged["hash"] = entry_hash(forged)  # a self-consistent entry, claiming entry 5's place
    raw.insert(4, encode_line(forged).decode())
    rewrite(trail, raw)
    code, output = verify(trail)
    assert code == 1 and first_failure(output) == 5 and "inserted" in output


def test_reordered_entries_are_named(trail: Path) -> None:
    raw = trail.read_text().splitlines()
    raw[4], raw[5] = raw[5], raw[4]
    rewrite(trail, raw)
    code, output = verify(trail)
    assert code == 1 and first_failure(output) == 5 and "reordered" in output


# --- two writers, one ledger ----------------------------------------------------------------------


def _hammer(routers: list[Any], per_thread: int) -> None:
    def load(router: Any, n: int) -> None:
        for i in range(per_thread):
            assert call(router, "POST", f"secret/data/two/{n}-{i % 4}", {"data": {"v": str(i)}}).status == 200

    threads = [threading.Thread(target=load, args=(r, n)) for n, r in enumerate(routers * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_two_cell_processes_keep_a_chain_each_in_one_file(tmp_path: Path) -> None:
    """Two CellServices on one sqlite ledger (as two server workers) appending to one
    file, four threads each: a chain per writer, each gap-free and linked, each ending
    at its head in the ledger; concurrent requests in one process shared commits."""
    trail = tmp_path / "audit.log"
    first = open_router(tmp_path, trail)
    second = open_router(tmp_path, trail, init=False)
    per_thread = 40
    _hammer([first, second], per_thread)
    timeline, problems = merge([str(trail)])
    assert problems == []
    chains: dict[str, list[int]] = {}
    for entry in timeline:
        chains.setdefault(entry["writer"], []).append(entry["seq"])
    assert set(chains) == {first.auditor.chain.writer, second.auditor.chain.writer}
    for seqs in chains.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert len(timeline) == 8 * per_thread * 2
    stats = [first.auditor.chain.stats, second.auditor.chain.stats]
    assert sum(s.entries for s in stats) == len(timeline)
    assert sum(s.conflicts for s in stats) == 0  # no writer waits for another's head
    assert max(s.largest_batch for s in stats) > 1  # group commit happened
    ledger = f"sqlite://{tmp_path / 'cell.db'}"
    assert verify(trail)[0] == 0
    assert verify(trail, "--ledger", ledger)[0] == 0


def test_the_ledger_heads_find_a_cut_off_tail_and_a_dropped_chain(tmp_path: Path) -> None:
    trail = tmp_path / "audit.log"
    first = open_router(tmp_path, trail)
    second = open_router(tmp_path, trail, init=False)
    _hammer([first, second], 3)
    ledger = f"sqlite://{tmp_path / 'cell.db'}"
    raw = trail.read_text().splitlines()
    rewrite(trail, raw[:-1])  # the last entry cut off: the file alone still verifies
    assert verify(trail)[0] == 0
    code, output = verify(trail, "--ledger", ledger)
    assert code == 1 and "ends early" in output and "cut off" in output
    gone = second.auditor.chain.writer
    rewrite(trail, [line for line in raw if json.loads(line)["writer"] != gone])
    assert verify(trail)[0] == 0
    code, output = verify(trail, "--ledger", ledger)
    assert code == 1 and f"chain {CELL}/{gone}" in output and "missing" in output


def test_two_processes_sharing_one_writer_id_cannot_fork_it(tmp_path: Path) -> None:
    """Two processes that claim the same writer (a misconfiguration, or a function
    instance restarted under its old id) race on one head: the conditional write makes
    them take turns, and their two files merge into one gap-free chain."""
    first = open_router(tmp_path, None)
    second = open_router(tmp_path, None, init=False)
    for router, name in ((first, "a.log"), (second, "b.log")):
        services = router.services
        router.auditor = Auditor(
            services.ledger, services.barrier, CELL, [FileSink(str(tmp_path / name))], writer="shared"
        )
    _hammer([first, second], 20)
    timeline, problems = merge([str(tmp_path / "a.log"), str(tmp_path / "b.log")])
    assert problems == []
    assert [e["seq"] for e in timeline] == list(range(1, len(timeline) + 1))
    assert {e["writer"] for e in timeline} == {"shared"}
    # The CLI agrees; a file alone has gaps, which only the other file fills.
    assert verify(tmp_path / "a.log", tmp_path / "b.log")[0] == 0
    assert verify(tmp_path / "a.log")[0] == 1


def test_merge_orders_cells_by_hybrid_logical_clock(tmp_path: Path) -> None:
    logs = []
    routers = []
    for cell in ("eu-1", "us-1"):
        folder = tmp_path / cell
        folder.mkdir()
        routers.append(open_router(folder, folder / "audit.log", cell=cell))
        logs.append(folder / "audit.log")
    for i in range(3):
        for router in routers:
            call(router, "GET", f"secret/data/m/{i}")
    out = tmp_path / "merged.log"
    result = CliRunner().invoke(app, ["audit", "merge", *map(str, logs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    merged = lines(out)
    assert len(merged) == sum(len(lines(p)) for p in logs)
    keys = [(e["hlc"][0], e["hlc"][1], e["cell"]) for e in merged]
    assert keys == sorted(keys)
    assert {e["cell"] for e in merged} == {"eu-1", "us-1"}
    raw = logs[1].read_text().splitlines()
    assert len(raw) == 3  # one entry per read: a read changes nothing, so no request entry
    del raw[1]
    rewrite(logs[1], raw)
    result = CliRunner().invoke(app, ["audit", "merge", *map(str, logs), "--output", str(out)])
    assert result.exit_code == 1 and "missing" in result.output


def test_file_sink_appends_whole_batches(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path / "sub" / "f.log"))
    with sink.lock():
        sink.write(b'{"a":1}\n{"a":2}\n', [])
    sink.close()
    assert (tmp_path / "sub" / "f.log").read_text() == '{"a":1}\n{"a":2}\n'

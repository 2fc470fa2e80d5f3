"""Chains anchored after their sinks (KEYCELL_AUDIT_ANCHOR=async, what `keycell server`
runs): the head follows the file within the interval, a crash leaves a tail that
`verify --ledger` names, a head that cannot reach the ledger stops the writer after
the bound (fail closed), a head changed by anyone else stops it for good, and a writer
id already in the ledger is never joined."""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keycell.cli import app
from keycell.control_plane.audit import AsyncCommitter, Auditor, AuditUnavailable, FileSink, head_key, merge
from keycell.control_plane.ledger import Kind, LedgerUnavailableError
from keycell.control_plane.router import Request
from keycell.functions.wiring import router_from_environment
from tests.audit.conftest import CELL, ROOT, call, cell_env, open_router


def verify(*args: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", *map(str, args)])
    return result.exit_code, result.output


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def head_of(ledger: Any, writer: str) -> dict[str, Any]:
    item = ledger.get(head_key(CELL, writer), consistent=True)
    assert item is not None
    return dict(json.loads(item.value))


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


class FlakyLedger:
    """The cell's ledger, except that writes of audit heads fail while `down` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = threading.Event()

    def put_if(self, key: Any, value: bytes, expected: int) -> Any:
        if key.kind is Kind.AUDIT_HEAD and self.down.is_set():
            raise LedgerUnavailableError("the ledger is unreachable")
        return self.inner.put_if(key, value, expected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def anchored_auditor(
    router: Any, log: Path, *, ledger: Any = None, interval: float = 0.005, **kw: Any
) -> Auditor:
    services = router.services
    auditor = Auditor(
        ledger or services.ledger,
        services.barrier,
        CELL,
        [FileSink(str(log))],
        anchor_interval=interval,
        **kw,
    )
    router.auditor = auditor
    return auditor


def crash(auditor: Auditor) -> None:
    """Stop the anchoring thread as a killed process would: no last anchor."""
    chain = auditor.chain
    atexit.unregister(chain.anchor_now)
    chain._stop.set()
    chain._wake.set()
    assert chain._anchorer is not None
    chain._anchorer.join(timeout=5)


def test_the_environment_selects_anchoring_and_refuses_nonsense(tmp_path: Path) -> None:
    env = cell_env(tmp_path, tmp_path / "audit.log")
    assert router_from_environment(env).auditor.chain.anchor_interval is None  # type: ignore[union-attr]
    env["KEYCELL_AUDIT_ANCHOR"] = "async"
    env["KEYCELL_AUDIT_ANCHOR_MS"] = "20"
    assert router_from_environment(env).auditor.chain.anchor_interval == 0.02  # type: ignore[union-attr]
    for name, bad in [("KEYCELL_AUDIT_ANCHOR", "sometimes"), ("KEYCELL_AUDIT_ANCHOR_MS", "0")]:
        with pytest.raises(ValueError, match=name):
            router_from_environment({**env, name: bad})


def test_heads_follow_the_sinks_and_the_trail_verifies_against_the_ledger(tmp_path: Path) -> None:
    """Two processes' routers on one cell, four threads each, appending to one file:
    each writer's head reaches the ledger within the interval (far fewer head writes
    than batches), and once caught up the files end exactly at the heads."""
    log = tmp_path / "audit.log"
    routers = [open_router(tmp_path, None), open_router(tmp_path, None, init=False)]
    auditors = [anchored_auditor(r, log) for r in routers]

    failures: list[str] = []

    def load(router: Any, n: int) -> None:
        for i in range(30):
            reply = call(router, "POST", f"secret/data/anchor/{n}-{i % 3}", {"data": {"v": str(i)}})
            if reply.status != 200:
                failures.append(f"{reply.status} {reply.body}")

    threads = [threading.Thread(target=load, args=(r, n)) for n, r in enumerate(routers * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    written = entries(log)
    assert len(written) == 2 * 4 * 30 * 2  # a request and a response entry per write
    last = {e["writer"]: e for e in written}
    assert set(last) == {a.chain.writer for a in auditors}
    ledger = routers[0].services.ledger
    for writer, entry in last.items():
        wait_for(lambda w=writer, e=entry: head_of(ledger, w)["hash"] == e["hash"])
    code, output = verify(log, "--ledger", f"sqlite://{tmp_path / 'cell.db'}")
    assert code == 0 and "WARN" not in output, output
    for auditor in auditors:
        auditor.close()  # joins the anchoring thread: its counts are final
        assert 1 <= auditor.chain.stats.anchors <= auditor.chain.stats.batches


def test_a_crash_leaves_a_tail_past_the_head_which_verify_names(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    router = open_router(tmp_path, None)
    auditor = anchored_auditor(router, log, interval=0.005)
    for i in range(3):
        assert call(router, "POST", f"secret/data/tail/{i}", {"data": {"v": "x"}}).status == 200
    writer = auditor.chain.writer
    wait_for(lambda: head_of(router.services.ledger, writer)["seq"] == 6)
    crash(auditor)
    for i in range(2):  # written to the file after the last anchor, then the process dies
        assert call(router, "GET", f"secret/data/tail/{i}").status == 200
    ledger = f"sqlite://{tmp_path / 'cell.db'}"
    assert head_of(router.services.ledger, writer)["seq"] == 6
    code, output = verify(log, "--ledger", ledger)
    assert code == 0 and "WARN" in output and "entries 7-8 past its head" in output, output
    code, output = verify(log, "--ledger", ledger, "--strict")
    assert code == 1 and "past its head" in output
    # What the head vouches for is still checked: cut into it and verify fails.
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:5]))
    code, output = verify(log, "--ledger", ledger)
    assert code == 1 and "ends early" in output and "entries 6-6 are missing" in output


def test_a_head_that_cannot_reach_the_ledger_stops_the_writer_after_the_bound(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    router = open_router(tmp_path, None)
    flaky = FlakyLedger(router.services.ledger)
    auditor = anchored_auditor(router, log, ledger=flaky, interval=0.005)
    auditor.chain.max_unanchored = 0.3
    assert call(router, "POST", "secret/data/bound/a", {"data": {"v": "1"}}).status == 200  # claims the id
    flaky.down.set()
    assert call(router, "POST", "secret/data/bound/b", {"data": {"v": "2"}}).status == 200  # inside the bound
    time.sleep(0.4)
    refused = call(router, "POST", "secret/data/bound/c", {"data": {"v": "3"}})
    assert refused.status == 503 and "audit" in refused.body["errors"][0]  # type: ignore[index]
    router.auditor = None
    assert call(router, "GET", "secret/data/bound/c").status == 404  # fail closed: never applied
    router.auditor = auditor
    flaky.down.clear()  # the ledger is back: the thread anchors the tail, the writer goes on
    wait_for(lambda: call(router, "POST", "secret/data/bound/c", {"data": {"v": "3"}}).status == 200)
    auditor.close()
    code, output = verify(log, "--ledger", f"sqlite://{tmp_path / 'cell.db'}")
    assert code == 0 and "WARN" not in output, output


def test_a_head_changed_by_anyone_else_stops_the_writer(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    router = open_router(tmp_path, None)
    auditor = anchored_auditor(router, log)
    assert call(router, "POST", "secret/data/fork/a", {"data": {"v": "1"}}).status == 200
    ledger = router.services.ledger
    key = head_key(CELL, auditor.chain.writer)
    wait_for(lambda: head_of(ledger, auditor.chain.writer)["seq"] == 2)
    item = ledger.get(key, consistent=True)
    forged = {"seq": 99, "hash": "sha256:" + "f" * 64, "ms": 0, "logical": 0}
    ledger.put_if(key, json.dumps(forged).encode(), item.version)
    with pytest.raises(AuditUnavailable):  # the next anchor finds it, then every commit is refused
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            auditor.chain.commit_records([{"type": "event", "event": {"kind": "probe"}}])
            time.sleep(0.01)
    refused = call(router, "GET", "secret/data/fork/a")
    assert refused.status == 503
    auditor.close()


def test_a_writer_id_already_in_the_ledger_is_not_joined(tmp_path: Path) -> None:
    """Two processes configured with one writer id: the second claims a fresh id, so
    each chain has one writer and the merged trail has no fork."""
    log = tmp_path / "audit.log"
    first, second = open_router(tmp_path, None), open_router(tmp_path, None, init=False)
    auditors = [anchored_auditor(r, log, writer="shared") for r in (first, second)]
    for i in range(5):
        for router in (first, second):
            assert call(router, "POST", f"secret/data/shared/{i}", {"data": {"v": str(i)}}).status == 200
    writers = {a.chain.writer for a in auditors}
    assert len(writers) == 2 and "shared" in writers
    for auditor in auditors:
        auditor.close()
    timeline, problems = merge([str(log)])
    assert problems == [] and len(timeline) == 20
    code, output = verify(log, "--ledger", f"sqlite://{tmp_path / 'cell.db'}")
    assert code == 0 and "WARN" not in output, output


@pytest.mark.parametrize("fsync", [False, True], ids=["on-the-loop", "on-the-thread"])
def test_an_event_loop_commits_the_requests_in_flight_together(tmp_path: Path, fsync: bool) -> None:
    """The server's path (Router.handle_async with an AsyncCommitter): with a local
    sink the batches are committed on the loop, with an fsync'd one on the committer's
    thread; either way requests in flight share batches and the chain verifies."""
    log = tmp_path / "audit.log"
    router = open_router(tmp_path, None)
    services = router.services
    router.auditor = auditor = Auditor(
        services.ledger, services.barrier, CELL, [FileSink(str(log), fsync=fsync)], anchor_interval=0.005
    )
    committer = AsyncCommitter(auditor)
    assert call(router, "POST", "secret/data/loop", {"data": {"v": "x"}}).status == 200

    async def burst() -> list[int]:
        replies = await asyncio.gather(
            *(
                router.handle_async(Request("GET", "secret/data/loop", token=ROOT), committer.commit)
                for _ in range(40)
            )
        )
        return [r.status for r in replies]

    before = auditor.chain.stats.batches
    assert asyncio.run(burst()) == [200] * 40
    assert auditor.chain.inline is not fsync
    assert auditor.chain.stats.batches - before < 40  # the reads in flight shared commits
    committer.close()
    auditor.close()
    assert len(entries(log)) == 2 + 40
    code, output = verify(log, "--ledger", f"sqlite://{tmp_path / 'cell.db'}")
    assert code == 0 and "WARN" not in output, output

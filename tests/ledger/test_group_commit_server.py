"""Group commit through a real `keycell server --data-dir` (SQLite, fsynced, two
worker processes with writer threads): concurrent conditional writers over HTTP each
get their own answer, and a kill -9 of the server while batches are in flight loses
only the writes that were never acknowledged."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from keycell.testing.processes import ServerProcess, keycell_server

WRITERS = 16


def call(port: int, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Vault-Token"] = token
        conn.request(method, f"/v1/{path}", body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def unseal(port: int, key: str) -> None:
    status, body = call(port, "PUT", "sys/unseal", {"key": key})
    assert status == 200 and body["sealed"] is False, body


def started(folder: Path) -> tuple[ServerProcess, int]:
    server = keycell_server(folder, workers=2, env={"KEYCELL_WRITER_THREADS": "32"})
    return server, server.start()


def test_concurrent_cas_writers_over_http_each_get_their_own_answer(tmp_path: Path) -> None:
    server, port = started(tmp_path)
    try:
        status, init = call(port, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        assert status == 200
        unseal(port, init["keys"][0])
        token = init["root_token"]
        paths = [f"race/{n}" for n in range(4)]
        answers: list[tuple[str, int, int, Any]] = []
        lock = threading.Lock()
        gate = threading.Barrier(WRITERS)

        def writer(n: int) -> None:
            path = paths[n % len(paths)]
            gate.wait(timeout=20)
            status, body = call(
                port, "POST", f"secret/data/{path}", {"options": {"cas": 0}, "data": {"writer": n}}, token
            )
            with lock:
                answers.append((path, n, status, body))

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(answers) == WRITERS
        for path in paths:
            mine = [a for a in answers if a[0] == path]
            won = [a for a in mine if a[2] == 200]
            lost = [a for a in mine if a[2] != 200]
            assert len(won) == 1, f"exactly one cas=0 create of {path} wins: {[a[2] for a in mine]}"
            assert won[0][3]["data"]["version"] == 1
            assert all(a[2] == 400 and "check-and-set" in a[3]["errors"][0] for a in lost)
            status, read = call(port, "GET", f"secret/data/{path}", token=token)
            assert status == 200 and read["data"]["data"] == {"writer": won[0][1]}
    finally:
        server.stop()


def kill_nine(server: ServerProcess) -> None:
    """SIGKILL the server's workers and then the server, as a crash would."""
    assert server.pid is not None
    with open(f"/proc/{server.pid}/task/{server.pid}/children") as children:
        workers = [int(pid) for pid in children.read().split()]
    assert workers, "the server should have worker processes"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.exited() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.exited() is not None


def test_kill_nine_mid_batch_loses_only_unacknowledged_writes(tmp_path: Path) -> None:
    server, port = started(tmp_path)
    acknowledged: dict[str, int] = {}
    failed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        status, init = call(port, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        key, token = init["keys"][0], init["root_token"]
        unseal(port, key)

        def writer(n: int) -> None:
            for i in range(2_000):  # bounded; the kill ends it much sooner
                if stop.is_set():
                    return
                path = f"crash/{n}/{i}"
                try:
                    status, _ = call(port, "POST", f"secret/data/{path}", {"data": {"n": n, "i": i}}, token)
                except (OSError, http.client.HTTPException):
                    with lock:
                        failed.append(path)
                    return
                if status == 200:
                    with lock:
                        acknowledged[path] = i

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        kill_nine(server)  # writers are in flight: some batches are mid-commit
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        stop.set()
        server.stop()
    assert len(acknowledged) >= 200
    assert failed, "some writes were in flight when the server died"

    restarted, port = started(tmp_path)
    try:
        unseal(port, key)
        missing = []
        for path, i in sorted(acknowledged.items()):
            status, read = call(port, "GET", f"secret/data/{path}", token=token)
            if status != 200 or read["data"]["data"]["i"] != i:
                missing.append(path)
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
        # and the cell works on after the crash
        status, _ = call(port, "POST", "secret/data/crash/after", {"data": {"ok": True}}, token)
        assert status == 200
    finally:
        restarted.stop()

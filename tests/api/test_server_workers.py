"""`keycell server --workers N` spreads a burst of keep-alive connections over its
workers (SO_REUSEPORT group with a BPF program, keycell/server.py) instead of letting the
first worker awake take them all. Linux only, like the mechanism."""

from __future__ import annotations

import http.client
import os
import sys
import time
from pathlib import Path

import pytest

from keycell.testing.processes import keycell_server

ROOT = "kc.workers-root-token"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT groups with BPF are Linux's")


def _children(pid: int) -> list[int]:
    """The server's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
                found.append(int(entry))
    return found


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of established TCP connections whose local port is `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # TCP_ESTABLISHED
                inodes.add(fields[9])
    return inodes


def _connections_of(pid: int, inodes: set[str]) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def test_a_burst_of_connections_reaches_every_worker(tmp_path: Path) -> None:
    server = keycell_server(tmp_path, dev_root_token=ROOT, workers=2)
    port = server.start()
    try:
        assert server.pid is not None
        deadline = time.monotonic() + 30
        while len(_children(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # every worker answers before the burst (a worker still starting holds its queue)
        connections = []
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/sys/health")
            assert conn.getresponse().read()
            conn.close()
        for _ in range(32):  # all connected at once, as a load generator's pool opens
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.connect()
            connections.append(conn)
        for conn in connections:  # then used, and kept open (keep-alive)
            conn.request("GET", "/v1/sys/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        inodes = _established_inodes(port)
        per_worker = [_connections_of(child, inodes) for child in _children(server.pid)]
        assert sum(per_worker) == 32
        assert min(per_worker) >= 4, per_worker  # a random half of 32 is below 4 about 3 times in a million
        for conn in connections:
            conn.close()
    finally:
        server.stop()

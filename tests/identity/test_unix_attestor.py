"""Unix workload attestation over a real unix socket: SO_PEERCRED, /proc, and the checks
that refuse a pid that no longer names the process that connected."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from keycell.agent.peercred import PeerCred, PeerRelay, process_start_ticks
from keycell.agent.workload import AttestationError, UnixAttestor


def test_a_caller_is_attested_by_uid_gid_path_and_binary_digest(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        relay = PeerRelay(str(tmp_path / "a.sock"), target.getsockname()[1])
        relay.start()
        try:
            client = socket.socket(socket.AF_UNIX)
            client.connect(relay.socket_path)
            upstream, (_, port) = target.accept()
            deadline = time.monotonic() + 5
            while (peer := relay.peer(f"ipv4:127.0.0.1:{port}")) is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
            selectors = UnixAttestor().attest(peer)
            client.close()
            upstream.close()
        finally:
            relay.stop()
    exe = os.path.realpath(sys.executable)
    with open(exe, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert {
        f"unix:uid:{os.getuid()}",
        f"unix:gid:{os.getgid()}",
        f"unix:path:{exe}",
        f"unix:sha256:{digest}",
    } <= set(selectors)


def test_a_connection_that_did_not_come_through_the_relay_is_unknown(tmp_path: Path) -> None:
    relay = PeerRelay(str(tmp_path / "b.sock"), 1)
    assert relay.peer("ipv4:127.0.0.1:54321") is None
    assert relay.peer("unix:/some/socket") is None


def _me() -> PeerCred:
    return PeerCred(os.getpid(), os.getuid(), os.getgid(), process_start_ticks(os.getpid()), time.time())


def test_a_reused_pid_is_refused() -> None:
    # Same pid, another start time: the process that connected is gone and another has its pid.
    with pytest.raises(AttestationError, match="reused"):
        UnixAttestor().attest(replace(_me(), start_ticks=_me().start_ticks + 1))


def test_a_process_born_after_the_connection_is_refused() -> None:
    with pytest.raises(AttestationError, match="reused"):
        UnixAttestor().attest(replace(_me(), accepted_at=time.time() - 10**7))


def test_a_caller_that_has_exited_is_refused() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    peer = PeerCred(child.pid, os.getuid(), os.getgid(), process_start_ticks(child.pid), time.time())
    child.wait()
    with pytest.raises(AttestationError, match="exited"):
        UnixAttestor().attest(peer)


def test_a_pid_owned_by_another_user_is_refused() -> None:
    with pytest.raises(AttestationError, match="another user"):
        UnixAttestor().attest(replace(_me(), uid=os.getuid() + 12345))

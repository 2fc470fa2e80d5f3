"""Who is calling: the unix socket front door that learns each caller's SO_PEERCRED.

grpcio does not expose a connection's file descriptor to a servicer, so the agent
serves gRPC on a private loopback port and puts this relay in front of it: the relay
accepts on the public unix socket, reads the peer's credentials (pid, uid, gid) and
the start time of that pid at once, opens its own connection to the gRPC port, and
records "connection from local port P = this caller" before relaying a single byte.
The servicer finds the caller by the peer address gRPC reports (`ipv4:127.0.0.1:P`).
A connection to the gRPC port that did not come through the relay has no record and
is refused by the servicer (PermissionDenied).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("keycell.agent")

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    start_ticks: int  # /proc/PID/stat field 22 when the connection was accepted
    accepted_at: float  # time.time() at accept


def process_start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


class PeerRelay:
    """Accepts on `socket_path`, relays each connection to 127.0.0.1:`target_port`."""

    def __init__(self, socket_path: str, target_port: int) -> None:
        self.socket_path = socket_path
        self.target_port = target_port
        self._peers: dict[int, PeerCred] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def peer(self, grpc_peer: str) -> PeerCred | None:
        """The caller behind a gRPC peer string such as `ipv4:127.0.0.1:50123`."""
        if not grpc_peer.startswith("ipv4:127.0.0.1:"):
            return None
        try:
            port = int(grpc_peer.rsplit(":", 1)[1])
        except ValueError:
            return None
        with self._lock:
            return self._peers.get(port)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        # Any local process may ask; workload attestation decides what it gets.
        os.chmod(self.socket_path, 0o777)  # noqa: S103
        listener.listen(128)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="peer-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            accepted_at = time.time()
            try:
                raw = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                pid, uid, gid = _UCRED.unpack(raw)
                start = process_start_ticks(pid)
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            port = upstream.getsockname()[1]
            with self._lock:
                self._peers[port] = PeerCred(pid, uid, gid, start, accepted_at)
            threading.Thread(target=self._pump, args=(client, upstream, port), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, port: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._peers.pop(port, None)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

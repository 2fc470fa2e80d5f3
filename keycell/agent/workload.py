"""Workload attestation: what a calling process is, as selectors.

The unix attestor reads the caller's credentials from SO_PEERCRED (see `peercred`)
and, from /proc, its executable's path and SHA-256. A pid can be reused once its
process exits, so every read is bracketed by checks that the pid still names the
process that connected: its start time (field 22 of /proc/PID/stat) must be the one
seen when the connection was accepted, and no later than the accept itself; its real
uid must be the one the kernel reported. Any mismatch refuses the call.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import threading

from keycell.agent.peercred import PeerCred, process_start_ticks


class AttestationError(Exception):
    """The caller could not be attested; the message says why (no secrets in it)."""


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise AttestationError("cannot read the boot time from /proc/stat")


class UnixAttestor:
    def __init__(self) -> None:
        self._boot = _boot_time()
        self._digests: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def attest(self, peer: PeerCred) -> list[str]:
        self._same_process(peer)
        exe_link = f"/proc/{peer.pid}/exe"
        try:
            path = os.readlink(exe_link)
            digest = self._sha256(exe_link)
            with open(f"/proc/{peer.pid}/status") as f:
                status = f.read()
        except OSError:
            raise AttestationError("the calling process exited during attestation") from None
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if not uid_line or int(uid_line.split()[1]) != peer.uid:
            raise AttestationError("the calling pid now belongs to another user (pid reused)")
        self._same_process(peer)  # the exe read above was still the caller's
        selectors = [
            f"unix:uid:{peer.uid}",
            f"unix:gid:{peer.gid}",
            f"unix:path:{path}",
            f"unix:sha256:{digest}",
        ]
        with contextlib.suppress(KeyError):
            selectors.append(f"unix:user:{pwd.getpwuid(peer.uid).pw_name}")
        with contextlib.suppress(KeyError):
            selectors.append(f"unix:group:{grp.getgrgid(peer.gid).gr_name}")
        return selectors

    def _same_process(self, peer: PeerCred) -> None:
        try:
            start = process_start_ticks(peer.pid)
        except (OSError, ValueError, IndexError):
            raise AttestationError("the calling process has exited") from None
        if start != peer.start_ticks:
            raise AttestationError("the calling pid was reused by another process")
        started_at = self._boot + start / _CLOCK_TICKS
        if started_at > peer.accepted_at + 1.0:  # a process born after the connection cannot own it
            raise AttestationError("the calling pid was reused by another process")

    def _sha256(self, exe_link: str) -> str:
        st = os.stat(exe_link)
        key = (st.st_dev, st.st_ino, int(st.st_mtime_ns), st.st_size)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        h = hashlib.sha256()
        with open(exe_link, "rb") as f:  # opens the executable the process runs, even if renamed
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._digests[key] = digest
        return digest

"""The direct revocation path (issue 18): a revocation minted in this cell goes, besides
the relay mesh, straight to every other cell's regional API (POST
sys/revocations/apply), in parallel, with bounded retries, so a partition of the relays
alone delays nothing. A heartbeat loop sends this cell's freshness heartbeat
(freshness.Mint.heartbeat) the same way, which is what lets a quiet peer's watermark
advance. Every delivery is idempotent (the set is a CRDT); a peer's reply is its
receipt, kept here so sys/revocations/:id names the path that reached it first.

Peers and their API URLs come from the cell directory (`CellRecord.api`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keycell.client.errors import ConnectionFailed
from keycell.client.transport import Transport
from keycell.control_plane import directory
from keycell.control_plane.freshness import Heartbeat, Mint
from keycell.control_plane.revocations import Receipt, RevocationLog, RevocationRecord

log = logging.getLogger("keycell.cells.paths")

FROM_CELL_HEADER = "X-Keycell-From-Cell"  # who is calling, for operators and test faults


class DirectPath:
    def __init__(
        self,
        services: Any,
        token: str,
        *,
        attempts: int = 4,
        backoff: float = 0.05,
        timeout: float = 1.0,
        heartbeat_every: float = 0.25,
        peers: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        """`token`: a token every peer accepts with sudo on sys/revocations/apply.
        `attempts` per peer and revocation, `backoff` doubling between them, so one
        delivery gives up after about backoff * 2**attempts seconds plus timeouts."""
        self.services = services
        self.cell = services.config.cell_id
        self.token = token
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self.heartbeat_every = heartbeat_every
        self.peers = peers or self._directory_peers
        self.log = RevocationLog(services.revocations)
        self.mint = Mint(services.barrier, self.cell, services.revocations.clock)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"direct-{self.cell}")
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def _directory_peers(self) -> dict[str, str]:
        entries = directory.load(self.services.barrier)
        return {
            c: e.record.api for c, e in entries.items() if c != self.cell and not e.removed and e.record.api
        }

    def _transport(self, url: str) -> Transport:
        with self._lock:
            found = self._transports.get(url)
            if found is None:
                found = self._transports[url] = Transport(url, timeout=self.timeout)
            return found

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any] | None:
        headers = {"X-Vault-Token": self.token, FROM_CELL_HEADER: self.cell}
        answer = self._transport(url).send("POST", "sys/revocations/apply", headers, body)
        if answer.status != 200:
            log.warning("direct path: %s answered %d", url, answer.status)
            return None
        data = json.loads(answer.body).get("data")
        return data if isinstance(data, dict) else None

    # --- revocations ----------------------------------------------------------------------

    def deliver(self, rec: RevocationRecord) -> None:
        """Send `rec` to every peer, in the background; returns at once."""
        for cell, url in self.peers().items():
            self._pool.submit(self.deliver_to, cell, url, [rec])

    def deliver_to(self, cell: str, url: str, recs: list[RevocationRecord]) -> bool:
        body = {"revocations": [r.as_json() for r in recs]}
        delay = self.backoff
        for attempt in range(self.attempts):
            if self._stop.is_set():
                return False
            try:
                data = self._post(url, body)
            except ConnectionFailed:
                data = None
            if data is not None:
                for rid, held in dict(data.get("applied", {})).items():
                    receipt = Receipt(rid, cell, float(held["applied_at"]), str(held.get("path", "direct")))
                    rec = next((r for r in recs if r.id == rid), None)
                    self.log.store_receipt(receipt, rec)
                self.delivered += 1
                return True
            if attempt + 1 < self.attempts:
                self._stop.wait(delay)
                delay *= 2
        self.failed += 1  # the relay mesh (and anti-entropy) still carries it
        return False

    # --- heartbeats -------------------------------------------------------------------------

    def heartbeat_once(self) -> Heartbeat:
        hb = self.mint.heartbeat()
        peers = self.peers()
        futures = [self._pool.submit(self._beat, url, hb) for url in peers.values()]
        for f in futures:
            f.result()
        return hb

    def _beat(self, url: str, hb: Heartbeat) -> None:
        # A failed beat is not retried: the next one supersedes it (until then that
        # peer's watermark of this cell stalls, as it should).
        with contextlib.suppress(ConnectionFailed):
            self._post(url, {"heartbeat": hb.as_json()})

    def start(self) -> DirectPath:
        def loop() -> None:
            while not self._stop.wait(self.heartbeat_every):
                try:
                    self.heartbeat_once()
                except Exception:  # the loop outlives a sealed or busy moment
                    log.exception("direct path heartbeat")

        self._thread = threading.Thread(target=loop, name=f"heartbeat-{self.cell}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for transport in self._transports.values():
                transport.close()

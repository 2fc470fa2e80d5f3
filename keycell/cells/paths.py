"""The revocation paths besides the relay mesh (issue 18), each of which alone gets a
revocation minted here to every other cell, and carries this cell's freshness
heartbeat (freshness.Mint.heartbeat), which is what lets a quiet peer's watermark
advance. Every delivery is idempotent (the set is a CRDT), so all run at once.

- `DirectPath`: straight to every other cell's regional API (POST
  sys/revocations/apply), in parallel, with bounded retries, so a partition of the
  relays alone delays nothing. A peer's reply is its receipt, kept here so
  sys/revocations/:id names the path that reached it first. Peers and their API URLs
  come from the cell directory (`CellRecord.api`).
- `LedgerPath`: into every configured peer's ledger (KEYCELL_PEER_LEDGERS), a sealed
  inbox item written with a conditional put, which the peer drains into its own set
  (control_plane/revocation_inbox.py says why this survives a partition of the mesh).
  Its loop also drains this cell's own inbox.

`Paths` is what sys/revocations hands each new revocation to (`services.revocation_paths`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from keycell.client.errors import ConnectionFailed
from keycell.client.transport import Transport
from keycell.control_plane import directory
from keycell.control_plane.cellkeys import CellKey
from keycell.control_plane.freshness import Heartbeat, Mint
from keycell.control_plane.ledger import Ledger, LedgerError
from keycell.control_plane.revocation_inbox import DrainResult, Inbox, InboxWriter
from keycell.control_plane.revocations import Receipt, RevocationLog, RevocationRecord

log = logging.getLogger("keycell.cells.paths")

FROM_CELL_HEADER = "X-Keycell-From-Cell"  # who is calling, for operators and test faults
KEYS_REFRESH = 2.0  # seconds between reads of the peers' sealing keys (LedgerPath)
LANE_THREADS = 4  # concurrent deliveries to one peer, per path


def _every(stop: threading.Event, seconds: float, tick: Callable[[], object], name: str) -> threading.Thread:
    """Run `tick` every `seconds` until `stop` is set, in a daemon thread."""

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                tick()
            except Exception:  # the loop outlives a sealed or busy moment
                log.exception("%s", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


class Lanes:
    """One small thread pool (a lane) per peer, so a peer that does not answer ties up
    only its own lane, never the deliveries and heartbeats to the others. Both paths
    send through it: `submit` queues work on the peer's lane; `submit_unless_busy` is
    for heartbeats, skipped for a peer whose previous one is still in flight, so a
    silent peer neither piles beats up in its lane nor delays a fresh beat."""

    def __init__(self, name: str, threads: int = LANE_THREADS) -> None:
        self.name, self.threads = name, threads
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def _lane(self, peer: str) -> ThreadPoolExecutor:
        with self._lock:
            lane = self._lanes.get(peer)
            if lane is None:
                lane = self._lanes[peer] = ThreadPoolExecutor(
                    max_workers=self.threads, thread_name_prefix=f"{self.name}-{peer}"
                )
            return lane

    def submit(self, peer: str, work: Callable[..., object], *args: Any) -> None:
        self._lane(peer).submit(work, *args)

    def submit_unless_busy(self, peer: str, work: Callable[..., object], *args: Any) -> bool:
        """Queue `work` unless the last work queued this way for `peer` is still running;
        True when queued."""
        with self._lock:
            if peer in self._busy:
                return False
            self._busy.add(peer)

        def run() -> None:
            try:
                work(*args)
            finally:
                with self._lock:
                    self._busy.discard(peer)

        try:
            self._lane(peer).submit(run)
        except RuntimeError:  # shut down: nothing runs any more
            with self._lock:
                self._busy.discard(peer)
            return False
        return True

    def close(self) -> None:
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.shutdown(wait=True, cancel_futures=True)


class RevocationPath(Protocol):
    def deliver(self, rec: RevocationRecord) -> None: ...

    def close(self) -> None: ...


class Paths:
    """Every path besides the relay, as one: `deliver` hands a new revocation to each."""

    def __init__(self, *paths: RevocationPath) -> None:
        self.paths = paths

    def deliver(self, rec: RevocationRecord) -> None:
        for path in self.paths:
            path.deliver(rec)

    def close(self) -> None:
        for path in self.paths:
            path.close()


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
        self._lanes = Lanes(f"direct-{self.cell}")
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
            self._lanes.submit(cell, self.deliver_to, cell, url, [rec])

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
        """Mint a heartbeat and send it to every peer on that peer's lane, without waiting
        (a peer whose previous beat is still in flight is skipped this time)."""
        hb = self.mint.heartbeat()
        for cell, url in self.peers().items():
            self._lanes.submit_unless_busy(cell, self._beat, url, hb)
        return hb

    def _beat(self, url: str, hb: Heartbeat) -> None:
        # A failed beat is not retried: the next one supersedes it (until then that
        # peer's watermark of this cell stalls, as it should).
        with contextlib.suppress(ConnectionFailed):
            self._post(url, {"heartbeat": hb.as_json()})

    def start(self) -> DirectPath:
        self._thread = _every(self._stop, self.heartbeat_every, self.heartbeat_once, f"heartbeat-{self.cell}")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._lanes.close()
        with self._lock:
            for transport in self._transports.values():
                transport.close()


class LedgerPath:
    """The ledger path: this cell's revocations and heartbeats into its peers' ledgers,
    and its own inbox drained into its revocation set.

    `ledgers`: peer cell -> that cell's ledger (opened from KEYCELL_PEER_LEDGERS by
    functions/wiring.py). A peer's sealing key comes from the cell directory; a peer
    the directory has no key for yet is skipped until it has one. A delivery that
    finds the peer's ledger unreachable is retried `attempts` times, then kept in a
    bounded backlog that every tick tries again (before the heartbeat, so the peer's
    watermark waits for nothing longer than it must); what overflows the backlog is
    left to the relay mesh's anti-entropy."""

    def __init__(
        self,
        services: Any,
        ledgers: Mapping[str, Ledger],
        *,
        every: float = 0.25,
        attempts: int = 3,
        backoff: float = 0.05,
        backlog_limit: int = 10_000,
    ) -> None:
        self.services = services
        self.cell = services.config.cell_id
        self.ledgers = {peer: ledger for peer, ledger in ledgers.items() if peer != self.cell}
        self.every, self.attempts, self.backoff = every, attempts, backoff
        self.backlog_limit = backlog_limit
        self.log = RevocationLog(services.revocations)
        self.mint = Mint(services.barrier, self.cell, services.revocations.clock)
        self._key: CellKey | None = None
        self._keys: tuple[float, dict[str, str]] | None = None
        self._writer: InboxWriter | None = None
        self._inbox: Inbox | None = None
        self._backlog: dict[str, dict[str, RevocationRecord]] = {peer: {} for peer in self.ledgers}
        self._lanes = Lanes(f"ledger-{self.cell}")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0  # backlog overflow: left to the relay mesh

    def cell_key(self) -> CellKey:
        with self._lock:  # the barrier holds it; read once the cell is unsealed
            if self._key is None:
                self._key = CellKey.load_or_create(self.services.barrier)
            return self._key

    def writer(self) -> InboxWriter:
        key = self.cell_key()
        with self._lock:
            if self._writer is None:
                self._writer = InboxWriter(self.cell, key)
            return self._writer

    def _public_keys(self) -> dict[str, str]:
        """The cells' sealing keys from the directory, read at most every KEYS_REFRESH
        seconds (keys change only when a cell is rebuilt; every tick needs them)."""
        with self._lock:
            if self._keys is not None and time.monotonic() - self._keys[0] < KEYS_REFRESH:
                return self._keys[1]
        entries = directory.load(self.services.barrier)
        keys = {c: e.record.public_key for c, e in entries.items() if not e.removed and e.record.public_key}
        with self._lock:
            self._keys = (time.monotonic(), keys)
        return keys

    def inbox(self) -> Inbox:
        key = self.cell_key()
        with self._lock:
            if self._inbox is None:
                freshness = self.services.freshness.freshness
                self._inbox = Inbox(self.services.ledger, self.log, freshness, key, self._public_keys)
            return self._inbox

    # --- revocations ----------------------------------------------------------------------

    def deliver(self, rec: RevocationRecord) -> None:
        """Put `rec` into every peer's ledger, in the background; returns at once."""
        for peer in self.ledgers:
            self._lanes.submit(peer, self.deliver_to, peer, [rec])

    def deliver_to(self, peer: str, recs: list[RevocationRecord]) -> bool:
        """Put `recs` into `peer`'s inbox, with bounded retries; True when every one is
        there (written now or before). What could not be written goes to the backlog."""
        keys = self._public_keys()
        pending = list(recs)
        delay = self.backoff
        for attempt in range(self.attempts):
            pending = self._put_all(peer, keys.get(peer), pending)
            if not pending or self._stop.is_set():
                break
            if attempt + 1 < self.attempts:
                self._stop.wait(delay)
                delay *= 2
        with self._lock:
            backlog = self._backlog[peer]
            for rec in recs:
                backlog.pop(rec.id, None)
            for rec in pending:
                if len(backlog) >= self.backlog_limit:
                    self.dropped += 1
                    continue
                backlog[rec.id] = rec
        if pending:
            self.failed += 1
            return False
        self.delivered += 1
        return True

    def _put_all(
        self, peer: str, peer_pem: str | None, recs: list[RevocationRecord]
    ) -> list[RevocationRecord]:
        """Those of `recs` not written (the peer's ledger or key unavailable)."""
        if peer_pem is None:
            return recs
        writer = self.writer()
        for i, rec in enumerate(recs):
            try:
                writer.put_revocation(self.ledgers[peer], peer, peer_pem, rec)  # False: there already
            except (LedgerError, OSError):
                return recs[i:]
        return []

    def backlog(self, peer: str) -> list[RevocationRecord]:
        with self._lock:
            return list(self._backlog[peer].values())

    # --- heartbeats and the inbox -------------------------------------------------------------

    def heartbeat_once(self) -> Heartbeat:
        """Mint a heartbeat and put it into every peer's inbox on that peer's lane, without
        waiting (a peer whose previous beat is still in flight is skipped this time), so
        a peer table that does not answer delays neither the beats nor the deliveries to
        the others."""
        hb = self.mint.heartbeat()
        keys = self._public_keys()
        for peer in self.ledgers:
            pem = keys.get(peer)
            if pem is not None:
                self._lanes.submit_unless_busy(peer, self._beat, peer, pem, hb)
        return hb

    def _beat(self, peer: str, pem: str, hb: Heartbeat) -> None:
        """Retry `peer`'s backlog, then put the heartbeat. A failed put is not retried:
        the next beat supersedes it."""
        backlog = self.backlog(peer)
        if backlog and not self.deliver_to(peer, backlog):
            return  # still cut off: a heartbeat now would only wait for those seqs
        try:
            self.writer().put_heartbeat(self.ledgers[peer], peer, pem, hb)
        except (LedgerError, OSError):
            log.debug("ledger path: %s's ledger unreachable for a heartbeat", peer)

    def drain(self) -> DrainResult:
        """Apply what peers put into this cell's inbox (also on demand, e.g. by tests)."""
        return self.inbox().drain()

    def tick(self) -> None:
        self.drain()
        self.heartbeat_once()

    def start(self) -> LedgerPath:
        self._thread = _every(self._stop, self.every, self.tick, f"ledger-path-{self.cell}")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._lanes.close()

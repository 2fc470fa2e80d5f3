"""The relay's cell agent: replication, anti-entropy, the directory's gossip and
forwarded writes, as a second gRPC service (`keycell.cells.v1.Cells`) on every relay's
server, using the relay's member table to find the other cells' relays.

What travels where:
- a write at a secret's home (an API process tells its local relay, `Written`; or a
  forwarded write the home's relay ran itself) is pushed at once to one relay of every
  other cell, as a `ReplicaBatch` sealed for that cell (`Push`);
- every `digest_interval` the home cell's leader relay sends each other cell a digest
  of the secrets it homes: 256 bucket hashes over (path, epoch, generation, metadata
  sequence) (`DigestBuckets`), then the entries of only the buckets that differ from
  the receiver's (`Digest`); the receiver moves its watermark (replica ages) and names
  what it lacks, which the home then pushes: this repairs lost pushes and partitions,
  at a cost per round that does not grow with the number of secrets in sync;
- every `directory_interval` each leader refreshes its own cell's directory entry, and
  the relays of a cell in one process, which share its directory, exchange the whole
  directory with a relay of another cell once (`Directory`);
- a change (write, patch, delete, undelete, destroy, metadata) for a secret homed
  elsewhere goes API process -> local relay -> a relay of the home cell (`Forward`),
  its arguments sealed to the home's public key all the way;
- a read that needs a fresher replica than the cell has asks the local relay to fetch
  it from the home now (`Refresh` -> `Fetch`).

Cross-cell calls honour the relay's fault injection (keycell/relay/faults.py) at the
sender, exactly as the relay's own envelopes do, so a partition cuts both.

The leader of a cell is its live relay with the smallest name: several relays of one
cell do not push or digest the same thing several times. Ledger work runs on one
thread per cell, off the event loop and apart from the relay's revocation applies.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from keycell.cells._pb import cells_pb2 as pb
from keycell.cells._pb import cells_pb2_grpc as pb_grpc
from keycell.control_plane import directory as directory_mod
from keycell.control_plane.cellkeys import CellKey, SealError, seal_to
from keycell.control_plane.directory import CellRecord, Directory, Entry, HybridClock
from keycell.control_plane.errors import RequestError
from keycell.control_plane.replicas import (
    DigestEntry,
    Home,
    NotHome,
    ReplicaBatch,
    Replicas,
    bucket_hashes,
    bucket_of,
)
from keycell.relay.membership import State
from keycell.relay.node import Relay
from keycell.relay.tls import aio_channel as relay_channel

log = logging.getLogger("keycell.cells")
T = TypeVar("T")


@dataclass(frozen=True)
class CellTiming:
    digest_interval: float  # the home's digest to every other cell (replica age's resolution)
    directory_interval: float  # the directory's refresh and gossip
    call_timeout: float  # one cross-cell call
    # After fencing a secret for a handover, how long writes that passed the home check
    # before the fence may still take to commit (well above a write's check-to-commit time).
    handover_grace: float


CELL_TIMINGS = {
    "local": CellTiming(digest_interval=0.2, directory_interval=0.5, call_timeout=2.0, handover_grace=0.5),
    "lan": CellTiming(digest_interval=1.0, directory_interval=5.0, call_timeout=2.0, handover_grace=1.0),
    "wan": CellTiming(digest_interval=2.0, directory_interval=15.0, call_timeout=5.0, handover_grace=2.0),
}


# A failed connection is retried soon (gRPC's default backoff grows to two minutes,
# which would keep a cell "unreachable" long after a partition healed).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class Unreachable(Exception):
    """No relay of that cell answered (partition, loss, none alive). `maybe_delivered`:
    the call timed out, so the other cell may have acted on it."""

    def __init__(self, target: str, *, maybe_delivered: bool = False) -> None:
        super().__init__(target)
        self.maybe_delivered = maybe_delivered


UNKNOWN_OUTCOME = (
    "{path}: the home cell {home!r} did not answer in time; the write may or may not have "
    "landed. Read it back with X-Keycell-Max-Staleness: 0, or retry with options.cas"
)
_UNKNOWN_CHANGE = (
    "{path}: the home cell {home!r} did not answer in time; the change may or may not have "
    "landed. Read it back with X-Keycell-Max-Staleness: 0 before retrying (repeating a delete, "
    "undelete, destroy or metadata change is harmless)"
)


def unknown_outcome(path: str, home: str, op: str) -> str:
    """What a client is told when a forwarded change timed out after it was sent."""
    template = UNKNOWN_OUTCOME if op in ("write", "patch") else _UNKNOWN_CHANGE
    return template.format(path=path, home=home)


def forward_aad(path: str, op: str) -> bytes:
    """Binds a forwarded change's sealed arguments to its path and operation."""
    return f"keycell:forward:{op}:{path}".encode()


class CellState:
    """What the relays of one cell in one process share: the replicas, the directory,
    the ledger thread."""

    def __init__(self, services: Any, *, api_url: str = "") -> None:
        self.services = services
        self.cell: str = services.config.cell_id
        self.api_url = api_url
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cells-{self.cell}")
        self._key: CellKey | None = None
        self.replicas = Replicas(
            services.barrier, services.kv, self.cell, self.cell_key, clock=services.clock
        )
        self.directory = Directory(HybridClock(self.cell))
        self.loaded = False
        # When one of these relays last exchanged the directory with another cell
        # (monotonic): they share it, so one exchange an interval serves them all.
        self.exchanged_at = float("-inf")

    def close(self) -> None:
        """Wait for ledger work in flight (before the cell's ledger closes)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        _STATES.pop(id(self.services), None)

    def cell_key(self) -> CellKey:
        if self._key is None:
            self.services.ensure_unsealed()
            self._key = CellKey.load_or_create(self.services.barrier)
        return self._key

    def public_key(self, cell: str) -> str | None:
        record = self.directory.cells().get(cell)
        return record.public_key if record is not None and record.public_key else None

    # --- blocking work, on `pool` ---------------------------------------------------

    def refresh_own(self, relays: tuple[str, ...], heartbeat: float = 30.0) -> bool:
        """Put this cell's entry when what it says changed, or every `heartbeat` seconds
        (its `updated_at` tells readers the cell is still there); True if it did."""
        if not self.loaded:
            self.directory.absorb(directory_mod.load(self.services.barrier))
            self.loaded = True
        key = self.cell_key()
        health = "sealed" if self.services.barrier.sealed else "ok"
        held = self.directory.entries.get(self.cell)
        record = CellRecord(
            self.cell, self.api_url, relays, key.fingerprint, key.public_pem, health, time.time()
        )
        fresh = held is not None and record.updated_at - held.record.updated_at < heartbeat
        if held is not None and not held.removed and fresh and _same(held.record, record):
            return False
        entry = self.directory.put(record)
        directory_mod.save(self.services.barrier, [entry])
        return True

    def absorb(self, entries: dict[str, Entry]) -> None:
        changed = self.directory.absorb(entries)
        if changed:
            directory_mod.save(self.services.barrier, [self.directory.entries[c] for c in changed])


def _same(a: CellRecord, b: CellRecord) -> bool:
    return (a.api, a.relays, a.fingerprint, a.health) == (b.api, b.relays, b.fingerprint, b.health)


_STATES: dict[int, CellState] = {}


def cell_state(services: Any, *, api_url: str = "") -> CellState:
    state = _STATES.get(id(services))
    if state is None:
        state = _STATES[id(services)] = CellState(services, api_url=api_url)
    return state


def _home_pb(home: Home) -> pb.Home:
    return pb.Home(home=home.home, epoch=home.epoch, state=home.state, to=home.to)


def _home_from_pb(msg: pb.Home) -> Home:
    return Home(msg.home, msg.epoch, msg.state or "home", msg.to)


def batch_to_pb(batch: ReplicaBatch, from_cell: str) -> pb.ReplicaBatch:
    return pb.ReplicaBatch(
        path=batch.path,
        home=_home_pb(batch.home),
        meta_seq=batch.meta_seq,
        meta=json.dumps(batch.meta).encode() if batch.meta is not None else b"",
        versions=[pb.Version(number=n, envelope=e) for n, e in sorted(batch.versions.items())],
        at=batch.at,
        from_cell=from_cell,
        found=True,
    )


def batch_from_pb(msg: pb.ReplicaBatch) -> ReplicaBatch:
    return ReplicaBatch(
        msg.path,
        _home_from_pb(msg.home),
        msg.meta_seq,
        json.loads(msg.meta) if msg.meta else None,
        {v.number: v.envelope for v in msg.versions},
        msg.at,
    )


def _listing(
    home: str, at: float, entries: list[DigestEntry], buckets: list[int] | None = None
) -> pb.HomeDigest:
    return pb.HomeDigest(
        home=home,
        at=at,
        entries=[
            pb.DigestEntry(path=e.path, epoch=e.epoch, meta_seq=e.meta_seq, generation=e.generation)
            for e in entries
        ],
        buckets=buckets or [],
    )


def _reply(status: int, message: str) -> pb.HandoverReply:
    return pb.HandoverReply(status=status, body=json.dumps({"errors": [message]}).encode())


def _error_body(message: str, data: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"errors": [message]}
    if data is not None:
        body["data"] = data  # e.g. a patch of a deleted version: 404 with the version's metadata
    return json.dumps(body).encode()


class CellAgent(pb_grpc.CellsServicer):
    def __init__(
        self, relay: Relay, services: Any, *, api_url: str = "", timing: CellTiming | None = None
    ) -> None:
        self.relay = relay
        self.state = cell_state(services, api_url=api_url)
        self.cell = self.state.cell
        self.timing = timing or CELL_TIMINGS.get(relay.profile.name, CELL_TIMINGS["lan"])
        self.rng = random.Random()  # noqa: S311 - peer choice, not a secret
        self.counters: dict[str, int] = {}
        self.observers: list[
            Callable[[str, int], None]
        ] = []  # (path, meta_seq) once a pushed replica is installed
        self._peers: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # address -> (channel, CellsStub on it)
        self._tasks: list[asyncio.Task[Any]] = []
        self._seen_running = False
        self._leader = (-1, False)  # (member table roster, whether this relay leads its cell)
        self._others: tuple[int, list[str]] = (-1, [])  # (member table roster, the other cells)
        self.digest_mode = "buckets"  # or "full": see _digest_to
        relay.extra_services.append(self._add_to)

    def _add_to(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_CellsServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        # Called inside Relay.start: the loops begin once the relay runs.
        asyncio.get_running_loop().call_soon(self._start_loops)

    def _start_loops(self) -> None:
        self._tasks = [
            asyncio.create_task(self._digest_loop(), name=f"{self.relay.name}-cells-digest"),
            asyncio.create_task(self._directory_loop(), name=f"{self.relay.name}-cells-directory"),
        ]

    def _alive(self) -> bool:
        """False once the relay has stopped (it may not have started yet)."""
        if self.relay.running:
            self._seen_running = True
            return True
        return not self._seen_running

    def count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.state.pool, call)

    # --- peers ------------------------------------------------------------------------

    def leader(self) -> bool:
        table = self.relay.table
        if table is None:
            return False
        if self._leader[0] != table.roster:  # (both loops ask every round: once a roster change)
            own = [m.name for m in table.live() if m.cell == self.cell] + [self.relay.name]
            self._leader = (table.roster, min(own) == self.relay.name)
        return self._leader[1]

    def other_cells(self) -> list[str]:
        table = self.relay.table
        if table is None:
            return []
        if self._others[0] != table.roster:  # (a member joins or changes cell: a roster change)
            self._others = (
                table.roster,
                sorted({m.cell for m in table.members.values() if m.cell != self.cell}),
            )
        return list(self._others[1])

    def relay_of(self, cell: str) -> str:
        table = self.relay.table
        if table is None:
            raise Unreachable(cell)
        live = [m for m in table.live() if m.cell == cell and m.name != self.relay.name]
        alive = [m.addr for m in live if m.state == State.ALIVE] or [m.addr for m in live]
        if not alive:
            # None believed alive (a partition just healed, and membership has not
            # caught up): try the relays the member table or the directory knows of.
            known = [m.addr for m in table.members.values() if m.cell == cell]
            record = self.state.directory.cells().get(cell)
            alive = sorted({*known, *(record.relays if record is not None else ())})
        if not alive:
            raise Unreachable(cell)
        return self.rng.choice(alive)

    async def call(self, addr: str, method: str, request: Any) -> Any:
        """One unary call to another relay, through the relay's fault injection."""
        faults = self.relay.faults
        if faults is not None:
            if faults.drop(self.relay.addr, addr):
                self.count("calls_dropped")
                raise Unreachable(addr)
            delay = faults.latency()
            if delay > 0:
                await asyncio.sleep(delay)
        peer = self._peers.get(addr)
        if peer is None:
            try:
                channel = relay_channel(addr, self.relay.tls, CHANNEL_OPTIONS)
            except ValueError:  # a relay off loopback while this one has no TLS
                raise Unreachable(addr) from None
            peer = self._peers[addr] = (channel, pb_grpc.CellsStub(channel))  # type: ignore[no-untyped-call]
        stub = peer[1]
        try:
            return await getattr(stub, method)(request, timeout=self.timing.call_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unreachable(addr) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Unreachable(addr, maybe_delivered=True) from None
            raise

    async def call_cell(self, cell: str, method: str, request: Any) -> Any:
        return await self.call(self.relay_of(cell), method, request)

    # --- replication ------------------------------------------------------------------

    async def push(self, path: str, cells: list[str] | None = None, *, latest: bool = True) -> None:
        """Send `path` to every other cell (or `cells`) at once, then what each says it lacks."""
        targets = cells if cells is not None else self.other_cells()
        await asyncio.gather(*(self._push_one(path, cell, latest) for cell in targets))

    async def _push_one(self, path: str, cell: str, latest: bool) -> None:
        pem = self.state.public_key(cell)
        if pem is None:
            return  # not in the directory yet: the digest brings it later
        try:
            batch = await self._blocking(self._export, path, cell, pem, latest)
            for _ in range(3):
                if batch is None:
                    break
                reply = await self.call_cell(cell, "Push", batch_to_pb(batch, self.cell))
                self.count("pushed")
                if not reply.missing:
                    break
                batch = await self._blocking(self._export, path, cell, pem, False, set(reply.missing))
        except Unreachable:
            self.count("push_unreachable")
        except (grpc.aio.AioRpcError, RequestError, SealError) as exc:
            log.warning("%s: push of %s to cell %s failed: %s", self.relay.name, path, cell, exc)

    def _export(
        self, path: str, cell: str, pem: str, latest: bool, only: set[int] | None = None
    ) -> ReplicaBatch | None:
        if latest and only is None:
            meta = self.state.replicas.kv._meta(self.state.replicas._secret(path))
            if meta is not None:
                only = {int(meta[0]["current_version"])}
        return self.state.replicas.export(path, cell, pem, only=only)

    async def Push(self, request: pb.ReplicaBatch, context: grpc.aio.ServicerContext) -> pb.PushReply:
        batch = batch_from_pb(request)
        try:
            missing = await self._blocking(self.state.replicas.apply, batch)
        except (SealError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replica refused: {exc}")
        self.count("applied")
        if not missing:
            for observe in self.observers:
                observe(batch.path, batch.meta_seq)
        return pb.PushReply(missing=missing)

    async def _digest_loop(self) -> None:
        while self._alive():
            await asyncio.sleep(self.timing.digest_interval * (0.75 + self.rng.random() / 2))
            if not self.relay.running or not self.leader():
                continue
            try:
                await self.digest_round()
            except Exception:  # one round's failure must not stop replication
                log.exception("%s: digest round failed", self.relay.name)

    async def digest_round(self) -> None:
        at = time.time()
        entries = await self._blocking(lambda: list(self.state.replicas.homed_here()))
        built: list[pb.HomeDigest] = []

        def listing() -> pb.HomeDigest:  # every entry: built only when it is sent or compared
            if not built:
                built.append(_listing(self.cell, at, entries))
            return built[0]

        first: pb.BucketDigest | None = None
        if self.digest_mode == "buckets":
            first = pb.BucketDigest(home=self.cell, at=at, hashes=bucket_hashes(entries))
            # An entry takes 2 bytes at the least: past that many, listing is larger.
            if 2 * len(entries) <= first.ByteSize() and listing().ByteSize() <= first.ByteSize():
                first = None  # so few secrets that listing them all is smaller (and one trip)
        by_bucket: dict[int, list[DigestEntry]] = {}
        if first is not None:
            for entry in entries:
                by_bucket.setdefault(bucket_of(entry.path), []).append(entry)
        for cell in self.other_cells():
            try:
                wanted = await self._digest_to(cell, listing, first, by_bucket)
            except Unreachable:
                self.count("digest_unreachable")
                continue
            for path in wanted:
                await self.push(path, [cell], latest=False)
        self.count("digest_rounds")

    async def _digest_to(
        self,
        cell: str,
        listing: Callable[[], pb.HomeDigest],
        first: pb.BucketDigest | None,
        by_bucket: dict[int, list[DigestEntry]],
    ) -> list[str]:
        """One anti-entropy exchange with `cell`: the paths it lacks. Bucketed (`first`):
        the 256 bucket hashes, then the entries of only the buckets that differ, if
        any. Otherwise (`digest_mode = "full"`, a few secrets only, or a relay from
        before bucketed digests) every entry at once."""
        digest: pb.HomeDigest | None = None
        if first is not None:
            try:
                answer = await self.call_cell(cell, "DigestBuckets", first)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                answer = None  # a relay from before bucketed digests: list everything
            if answer is not None:
                self.count("digest_bytes", first.ByteSize() + answer.ByteSize())
                differing = sorted(set(answer.differing))
                self.count("digest_buckets_differing", len(differing))
                if not differing:
                    return []
                some = [e for b in differing for e in by_bucket.get(b, [])]
                digest = _listing(self.cell, first.at, some, differing)
        if digest is None:
            digest = listing()
        reply = await self.call_cell(cell, "Digest", digest)
        self.count("digest_bytes", digest.ByteSize() + reply.ByteSize())
        self.count("digest_entries", len(digest.entries))
        return list(reply.wanted)

    async def DigestBuckets(
        self, request: pb.BucketDigest, context: grpc.aio.ServicerContext
    ) -> pb.BucketReply:
        try:
            differing = await self._blocking(
                self.state.replicas.differing_buckets, request.home, request.at, list(request.hashes)
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.BucketReply(cell=self.cell, differing=differing)

    async def Digest(self, request: pb.HomeDigest, context: grpc.aio.ServicerContext) -> pb.DigestReply:
        entries = [DigestEntry(e.path, e.epoch, e.meta_seq, e.generation) for e in request.entries]
        buckets = set(request.buckets) or None
        wanted = await self._blocking(
            self.state.replicas.on_digest, request.home, request.at, entries, buckets
        )
        return pb.DigestReply(cell=self.cell, wanted=wanted)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaBatch:
        pem = self.state.public_key(request.cell)
        if pem is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cell {request.cell!r} is not in the directory"
            )
        only = set(request.only) or None
        batch = await self._blocking(self.state.replicas.export, request.path, request.cell, pem, only=only)
        if batch is None:  # not (or no longer) the home: say which home this cell knows
            held = await self._blocking(self.state.replicas.confirmed_home, request.path)
            if held is None:
                return pb.ReplicaBatch(path=request.path, found=False)
            return pb.ReplicaBatch(path=request.path, found=False, home=_home_pb(held))
        return batch_to_pb(batch, self.cell)

    async def Refresh(self, request: pb.RefreshRequest, context: grpc.aio.ServicerContext) -> pb.RefreshReply:
        """Bring this cell's replica of `path` up to date from its home now."""
        replicas = self.state.replicas
        home = await self._blocking(replicas.confirmed_home, request.path)
        if home is None:
            # Never heard of it here: ask every other cell; its home answers.
            reached = 0
            for cell in self.other_cells():
                try:
                    reply = await self.call_cell(
                        cell, "Fetch", pb.FetchRequest(path=request.path, cell=self.cell)
                    )
                except Unreachable:
                    continue
                reached += 1
                if reply.found:
                    await self._blocking(replicas.apply, batch_from_pb(reply))
                    home = await self._blocking(replicas.confirmed_home, request.path)
                    break
            if home is None:
                if reached < len(self.other_cells()):
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "not every cell could be asked for that secret"
                    )
                await context.abort(grpc.StatusCode.NOT_FOUND, "no cell homes that secret")
        assert home is not None
        target = home.home
        if target != self.cell or home.state != "home":
            try:
                if not await self._fetch_from_home(request.path, target):
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "the secret's home is moving or unknown; retry"
                    )
            except Unreachable:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"cell {target!r} is unreachable")
        age = await self._blocking(replicas.age, request.path)
        return pb.RefreshReply(age=age if age is not None else -1.0)

    async def _fetch_from_home(self, path: str, target: str) -> bool:
        """Install the home's current state of `path` here, following a handover if the
        cell asked says the home is elsewhere now. False when no home served it."""
        replicas = self.state.replicas
        only: list[int] = []
        for _ in range(4):
            if target == self.cell:
                home = await self._blocking(replicas.confirmed_home, path)
                return home is not None and home.home == self.cell and home.state == "home"
            reply = await self.call_cell(
                target, "Fetch", pb.FetchRequest(path=path, cell=self.cell, only=only)
            )
            if reply.found:
                missing = await self._blocking(replicas.apply, batch_from_pb(reply))
                if not missing:
                    return True
                only = missing
                continue
            told = _home_from_pb(reply.home) if reply.HasField("home") else None
            if told is None or told.home == target or told.state != "home":
                return False  # moving (fenced) or unknown there: nothing newer can be had now
            await self._blocking(replicas.learn_home, path, told)
            target, only = told.home, []
        return False

    # --- homes of new secrets ------------------------------------------------------------

    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.Home:
        held = await self._blocking(self.state.replicas.reserve, request.path, request.claimer)
        return _home_pb(held)

    async def Claim(self, request: pb.ClaimRequest, context: grpc.aio.ServicerContext) -> pb.ClaimReply:
        """Find the home of `path`, or claim it for this cell with a majority of cells."""
        replicas = self.state.replicas
        held = await self._blocking(replicas.reserve, request.path, self.cell)
        cells = self.other_cells()
        if held.confirmed:
            return pb.ClaimReply(home=_home_pb(held), votes=0, cells=len(cells) + 1)
        votes = int(held.home == self.cell)
        for cell in cells:
            try:
                theirs = _home_from_pb(
                    await self.call_cell(
                        cell, "Reserve", pb.ReserveRequest(path=request.path, claimer=self.cell)
                    )
                )
            except Unreachable:
                continue
            if theirs.confirmed:
                known = await self._blocking(replicas.learn_home, request.path, theirs)
                return pb.ClaimReply(home=_home_pb(known), votes=votes, cells=len(cells) + 1)
            votes += theirs.home == self.cell
        if votes * 2 > len(cells) + 1:
            home = await self._blocking(replicas.confirm, request.path)
            self.count("claimed")
            return pb.ClaimReply(home=_home_pb(home), votes=votes, cells=len(cells) + 1)
        self.count("claims_lost")
        return pb.ClaimReply(votes=votes, cells=len(cells) + 1)

    # --- moving a home ------------------------------------------------------------------

    async def Handover(
        self, request: pb.HandoverRequest, context: grpc.aio.ServicerContext
    ) -> pb.HandoverReply:
        """Move `path`'s home from this cell to `request.to`: fence, wait out writes in
        flight, copy, let the new home take over, record it."""
        replicas = self.state.replicas
        if request.to == self.cell or request.to not in self.other_cells():
            return _reply(400, f"cell {request.to!r} is not another cell of this deployment")
        pem = self.state.public_key(request.to)
        if pem is None:
            return _reply(503, f"cell {request.to!r} is not in the cell directory yet; retry")
        try:
            moving = await self._blocking(replicas.fence, request.path, request.to)
        except RequestError as exc:
            return _reply(exc.status, exc.message)
        # Writes that passed the home check before the fence commit within a request's
        # time; after this grace none can still land here.
        await asyncio.sleep(self.timing.handover_grace)
        batch = await self._blocking(replicas.export, request.path, request.to, pem, handover=True)
        if batch is None:
            return _reply(409, f"{request.path} is no longer homed here")
        try:
            for _ in range(3):
                reply = await self.call_cell(
                    request.to,
                    "Accept",
                    pb.AcceptRequest(batch=batch_to_pb(batch, self.cell), epoch=moving.epoch + 1),
                )
                if not reply.missing:
                    break
                batch = await self._blocking(
                    replicas.export, request.path, request.to, pem, only=set(reply.missing), handover=True
                )
                if batch is None:
                    return _reply(409, f"{request.path} is no longer homed here")
            else:
                return _reply(503, f"cell {request.to!r} did not take every version; retry the handover")
        except Unreachable:
            return _reply(
                503,
                f"cell {request.to!r} cannot be reached; {request.path} stays fenced (no writes) until "
                "the handover is retried",
            )
        new_home = Home(request.to, moving.epoch + 1, "home")
        await self._blocking(replicas.learn_home, request.path, new_home)
        self.count("handovers")
        body = {
            "data": {"path": request.path, "home": request.to, "epoch": moving.epoch + 1, "from": self.cell}
        }
        return pb.HandoverReply(status=200, body=json.dumps(body).encode())

    async def Accept(self, request: pb.AcceptRequest, context: grpc.aio.ServicerContext) -> pb.PushReply:
        batch = batch_from_pb(request.batch)
        if (
            batch.home.state != "moving"
            or batch.home.to != self.cell
            or request.epoch != batch.home.epoch + 1
        ):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not a handover to this cell")
        missing = await self._blocking(self.state.replicas.apply, batch)
        if missing:
            return pb.PushReply(missing=missing)
        await self._blocking(self.state.replicas.take_over, batch.path, request.epoch)
        self.count("took_over")
        return pb.PushReply()

    # --- writes -----------------------------------------------------------------------

    async def Written(self, request: pb.WrittenRequest, context: grpc.aio.ServicerContext) -> pb.WrittenReply:
        task = asyncio.create_task(self.push(request.path))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
        return pb.WrittenReply()

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardReply:
        """A KV change for a secret homed elsewhere: carried on by the origin cell's
        relay, applied by a relay of the home (then pushed to every other cell)."""
        if request.home != self.cell:
            # The origin cell's relay: carry it to a relay of the home cell.
            try:
                reply: pb.ForwardReply = await self.call_cell(request.home, "Forward", request)
            except Unreachable as exc:
                self.count("forward_unreachable")
                if exc.maybe_delivered:
                    message = unknown_outcome(request.path, request.home, request.op)
                    return pb.ForwardReply(status=503, body=_error_body(message))
                home = Home(request.home, 0)
                message = NotHome(request.path, home, reachable=False).message
                return pb.ForwardReply(status=503, body=_error_body(message))
            self.count("forwarded")
            return reply
        moved = await self._blocking(self.state.replicas.confirmed_home, request.path)
        if (
            moved is not None
            and moved.home != self.cell
            and moved.state == "home"
            and not request.origin_cell.startswith("~")
        ):
            # Homed elsewhere since the sender last heard (a handover): one more hop.
            pem = self.state.public_key(moved.home)
            if pem is None:
                return pb.ForwardReply(
                    status=503, body=_error_body(NotHome(request.path, moved, reachable=False).message)
                )
            onward = pb.ForwardRequest()
            onward.CopyFrom(request)
            onward.home, onward.origin_cell = moved.home, "~" + request.origin_cell
            try:
                onward.sealed_args = await self._blocking(
                    self._reseal, request.sealed_args, forward_aad(request.path, request.op), pem
                )
            except SealError:
                return pb.ForwardReply(
                    status=400, body=_error_body("the forwarded change does not open in this cell")
                )
            try:
                return await self.call_cell(moved.home, "Forward", onward)  # type: ignore[no-any-return]
            except Unreachable as exc:
                if exc.maybe_delivered:
                    message = unknown_outcome(request.path, moved.home, request.op)
                else:
                    message = NotHome(request.path, moved, reachable=False).message
                return pb.ForwardReply(status=503, body=_error_body(message))
        status, body = await self._blocking(self._change_here, request)
        if status == 200:
            await self.push(request.path)
        return pb.ForwardReply(status=status, body=body)

    def _reseal(self, sealed: bytes, aad: bytes, pem: str) -> bytes:
        return seal_to(pem, self.state.cell_key().open(sealed, aad), aad)

    def _change_here(self, request: pb.ForwardRequest) -> tuple[int, bytes]:
        replicas = self.state.replicas
        try:
            secret = replicas._secret(request.path)
            args = json.loads(
                self.state.cell_key().open(request.sealed_args, forward_aad(request.path, request.op))
            )
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            out = replicas.change(secret, request.op, args)
        except RequestError as exc:
            return exc.status, _error_body(exc.message, exc.data)
        except (SealError, ValueError):
            return 400, _error_body("the forwarded change does not open in its home cell")
        self.count("changes_at_home")
        return 200, json.dumps({"data": out}).encode()

    # --- the directory ------------------------------------------------------------------

    async def _directory_loop(self) -> None:
        wait = 0.05  # the first rounds come quickly: a new cell is discoverable at once
        while self._alive():
            await asyncio.sleep(wait)
            wait = min(self.timing.directory_interval * (0.75 + self.rng.random() / 2), wait * 2)
            if not self.relay.running:
                continue
            try:
                await self.directory_round()
            except Exception:
                log.exception("%s: directory round failed", self.relay.name)

    async def directory_round(self) -> None:
        if self.leader():
            table = self.relay.table
            own = [m.addr for m in table.live() if m.cell == self.cell] if table else []
            relays = tuple(sorted({*own, self.relay.addr}))
            await self._blocking(self.state.refresh_own, relays)
        others = self.other_cells()
        if not others:
            return
        # The relays of this cell in this process share one directory: one exchange an
        # interval serves them all (at 100 relays a cell, one each cost the cell 20
        # exchanges a second at the LAN pace), and whichever relay's round comes first
        # makes it, so a relay cut off does not hold it up for more than one round. While
        # the directory lacks a cell the member table knows, every round exchanges.
        now = time.monotonic()
        known = self.state.directory.cells()
        complete = all(cell in known for cell in others)
        if complete and now - self.state.exchanged_at < self.timing.directory_interval / 2:
            self.count("directory_shared")
            return
        self.state.exchanged_at = now
        self.count("directory_exchanges")
        cell = self.rng.choice(others)
        try:
            reply = await self.call_cell(cell, "Directory", self._directory_msg())
        except Unreachable:
            self.count("directory_unreachable")
            return
        await self._blocking(self.state.absorb, _entries(reply))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel, _ in self._peers.values():
            await channel.close()
        self._peers.clear()

    def _directory_msg(self) -> pb.DirectoryState:
        return pb.DirectoryState(
            entries=[json.dumps(e.as_json()).encode() for e in self.state.directory.entries.values()]
        )

    async def Directory(
        self, request: pb.DirectoryState, context: grpc.aio.ServicerContext
    ) -> pb.DirectoryState:
        try:
            theirs = _entries(request)
        except (ValueError, KeyError, TypeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed directory entries")
        await self._blocking(self.state.absorb, theirs)
        return self._directory_msg()


def _entries(msg: pb.DirectoryState) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for raw in msg.entries:
        entry = Entry.from_json(json.loads(raw))
        out = directory_mod.merge(out, {entry.record.cell: entry})
    return out


def attach(relay: Relay, services: Any, *, api_url: str = "", timing: CellTiming | None = None) -> CellAgent:
    """Serve `Cells` on `relay` (call before relay.start()); its loops start with it."""
    return CellAgent(relay, services, api_url=api_url, timing=timing)

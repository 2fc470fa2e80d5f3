"""One relay: a gRPC server, long-lived bidirectional streams to the peers it talks
to, and the SWIM loops (probe, gossip, suspicion, push-pull, rejoin).

Who talks to whom: a relay probes and gossips with every live relay of its own cell
(one SWIM group per cell) and with `cross_links` relays of every other cell, re-chosen
when one dies. The member table itself is global (membership rumours reach every
relay), so a relay can pick new cross links and rejoin anyone after a partition.

A stream is one `Relay.Stream` call. Either end sends on it: a message that answers
another (ack, digest reply, key list, sync reply) goes back on the stream it came in
on; anything else goes on whichever live stream to that peer exists, opening one if
none does. A failed stream is dropped and that peer is retried after an exponential
backoff; a new outbound stream starts with a push-pull (digest and member table),
which repairs whatever was missed while apart.

Membership rumours and cells' receipts ride on probes, acks and the broadcast's
messages (SWIM's piggyback); they never make a message of their own.

Revocations: a new one is applied to the cell (LedgerSink, off the event loop) and
pushed at once down the broadcast tree (keycell/relay/tree.py): each relay pushes
to `eager_fanout` relays of its cell, computed from the root and the member table,
and the root also to one relay of every other cell; each push is acknowledged or
resent. Pings and their acks carry the ids of the revocations heard in the last
RECENT_IDS_S seconds, so a relay cut off from the tree (its parent died, or took it
for dead) grafts what it missed within a probe interval. A relay first reached by a
repair (anti-entropy, a graft answered without a root), which goes no further, pushes
on down the tree when the tree's own push reaches it later. Once the cell's
ledger holds it, the relay pushes it to its subscribers (the cell's API processes)
and spreads this cell's receipt lazily, by piggyback and anti-entropy.

Expiry: a revocation whose `expires_at` (> 0) plus the profile's `expiry_grace` has
passed on the relay's clock revokes nothing that could still be used, so the relay
drops it with its receipts (which carry the same `expires_at`) from its entry store
and every table kept about it, a bounded number per push-pull tick, and refuses such
an entry from then on, whether submitted, gossiped or offered by anti-entropy. Every
relay applies that one rule, so a relay that still holds an entry (a lagging clock, a
partition) cannot bring it back into those that dropped it, and the digests agree
again once it drops it too. A receipt without `expires_at` (from a relay that
predates the field) takes its revocation's when this relay holds it, else it never
expires. The cell's ledger is not touched: its items expire by their own TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from keycell.control_plane.revocations import Receipt, RevocationRecord
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay._pb import relay_pb2_grpc as pb_grpc
from keycell.relay.broadcast import EntryStore, RumorQueue
from keycell.relay.cell import CellSink
from keycell.relay.faults import Faults
from keycell.relay.membership import Awareness, Member, MemberTable, State, Verdict
from keycell.relay.profiles import LOCAL, Profile
from keycell.relay.tls import RELAY, Authorizer, RelayTLS, TLSConfigError, is_loopback, peer_identity
from keycell.relay.tls import aio_channel as relay_channel
from keycell.relay.tree import RESEND_COPIES, BroadcastTree, children

log = logging.getLogger("keycell.relay")
# sink -> revocation id -> its ledger write in flight (relays of one process share both)
_INFLIGHT: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[float]]] = weakref.WeakKeyDictionary()
RECEIPT_SENDS = 2  # piggybacked sends of a cell's receipt by each relay that learns it
_RECEIPTS: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()  # sink -> receipts kept
# The ledger sweep reads the receipts of revocations minted since the last sweep, less
# this grace (a revoke call's commit may land a little after its id was minted), and
# every FULL_SWEEP_EVERY sweeps reads them all.
SWEEP_GRACE = 60.0
FULL_SWEEP_EVERY = 60
_SWEEPS: weakref.WeakKeyDictionary[Any, _Sweeps] = weakref.WeakKeyDictionary()  # sink -> its sweeps
LINK_QUEUE = 10_000  # envelopes waiting on one stream; beyond, new ones are dropped (as UDP would)
ENTRIES_PER_ENVELOPE = 256  # anti-entropy sends missing entries in chunks
RECENT_IDS_S = 3.0  # a ping carries the ids of the revocations heard this recently...
RECENT_IDS_MAX = 32  # ...at most this many, the newest
EXPOSURE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Streams stay up for hours: clients ping every 60 s so a dead peer's stream fails
# within 65 s even with nothing to send (SWIM finds a dead relay long before: this is
# only for the stream), and servers accept pings that often (gRPC's server default
# would answer them with GOAWAY "too_many_pings", killing the stream). Every relay
# keeps a stream to every relay of its cell, so keepalives grow with n^2: at 3 x 100
# some 30,000 streams, which at 10 s would be about 3,000 pings a second each way.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A relay stream carries small envelopes for hours: no BDP probing (a PING frame
    # after data read, to size windows for bulk transfers) and no retry buffering of
    # what was sent (relays resend by their own rules: retries, gossip, anti-entropy).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.enable_retries", 0),
]
_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.bdp_probe", 0),
]


class _Sweeps:
    """The ledger sweep of one sink, taken in turns by the relays of a process that
    share it: at most one sweep per sync interval between them (the relay that sweeps
    learns what it finds and gossip carries it to the rest), each reading from where
    the previous one, whichever relay made it, began."""

    def __init__(self) -> None:
        self.next_at = 0.0  # monotonic time the next sweep is due
        self.count = 0
        self.read_at: float | None = None  # wall time the last complete ledger read began

    def claim(self, interval: float) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False  # another relay of this process swept within the interval
        self.next_at = now + interval
        self.count += 1
        return True

    def since(self) -> float | None:
        """Where this sweep reads from: None for all of it."""
        if self.read_at is None or self.count % FULL_SWEEP_EVERY == 0:
            return None
        return self.read_at - SWEEP_GRACE


def rev_to_pb(rec: RevocationRecord) -> pb.Revocation:
    return pb.Revocation(
        id=rec.id,
        subject=rec.subject,
        origin_cell=rec.origin_cell,
        revoked_at=rec.revoked_at,
        reason=rec.reason,
        expires_at=rec.expires_at or 0,
        seq=rec.seq,
    )


def rev_from_pb(msg: pb.Revocation) -> RevocationRecord:
    return RevocationRecord(
        msg.id, msg.subject, msg.origin_cell, msg.revoked_at, msg.reason, msg.expires_at or None, msg.seq
    )


def entry_expiry(entry: pb.Entry) -> int:
    """The entry's revocation's expires_at (epoch seconds; 0: never, or not known)."""
    if entry.HasField("revocation"):
        return int(entry.revocation.expires_at)
    return int(entry.receipt.expires_at)


def _about_revocations(env: pb.Envelope, kind: str | None) -> bool:
    """Whether an envelope (whose body is `kind`) was sent for the broadcast: it carries
    a revocation, or is a tree message of its own (an ack, a graft; not the ids a ping
    carries anyway). What `revocation_messages` counts, the broadcast's cost per
    revocation."""
    if kind is None and (env.ihave or env.graft):
        return True
    for rumor in env.rumors:
        if rumor.WhichOneof("kind") == "entry" and rumor.entry.WhichOneof("kind") == "revocation":
            return True
    return False


# The counter each kind of envelope sent adds to (no body: a push, ids, or a graft).
_SENT = {f.name: "sent_" + f.name for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields}
_SENT_GOSSIP = "sent_gossip"


def entry_key(entry: pb.Entry) -> str:
    if entry.HasField("revocation"):
        return "r/" + entry.revocation.id
    return f"a/{entry.receipt.id}/{entry.receipt.cell}"


class Histogram:
    """Counts per bucket bound, sum and count: a Prometheus histogram's figures in
    fixed memory, however many revocations a long-lived relay sees."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # observations <= each bound (cumulative)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


class Link:
    """One stream to a peer, either end's; `queue` feeds its sending side."""

    def __init__(self, addr: str, outbound: bool) -> None:
        self.addr = addr
        self.outbound = outbound
        self.queue: asyncio.Queue[pb.Envelope | None] = asyncio.Queue(LINK_QUEUE)
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def send(self, env: pb.Envelope) -> bool:
        if self.closed:
            return False
        try:
            self.queue.put_nowait(env)
        except asyncio.QueueFull:
            return False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)


@dataclass(slots=True, eq=False)
class _Probe:
    """One SWIM probe in flight (Relay._start_probe)."""

    target: Member
    seq: int
    then: Callable[[float], object]  # called at its end with when the next probe may start
    started: float  # monotonic
    interval: float
    timeout: float  # for each direct ping
    attempt: int = 0  # direct pings resent so far
    helpers: list[Member] | None = None  # asked to ping the target (the indirect phase)
    timer: asyncio.TimerHandle | None = None  # this phase's deadline


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


class Relay(pb_grpc.RelayServicer):
    def __init__(
        self,
        name: str,
        cell: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: Profile = LOCAL,
        sink: CellSink | None = None,
        faults: Faults | None = None,
        seeds: Iterable[str] = (),
        rng: random.Random | None = None,
        tls: RelayTLS | None = None,
        advertise: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`advertise`: the host other relays dial (its certificate must name it); by
        default the listening host, which must then be reachable as it is (not 0.0.0.0).
        `clock`: epoch seconds, read for entry expiry only (tests move it by hand)."""
        if tls is None and not is_loopback(host):
            raise TLSConfigError(
                f"relay {name or cell}: listening on {host} needs mutual TLS (keycell relay --tls-cert/"
                "--tls-key/--tls-ca, or KEYCELL_RELAY_TLS_CERT/_KEY/_CA); plaintext is for loopback only"
            )
        if tls is not None and (tls.identity.role != RELAY or tls.identity.cell != cell):
            raise TLSConfigError(
                f"relay of cell {cell}: its certificate names {tls.identity.uri}, not a relay of cell {cell}"
            )
        self.tls = tls
        self.name = name
        self.cell = cell
        self.host = host
        self.advertise = advertise
        self.port = port
        self.addr = ""
        self.profile = profile
        self.sink = sink
        self.faults = faults
        self.seeds = [s for s in seeds if s]
        self.rng = rng or random.Random()  # noqa: S311 - peer choice, not a secret
        self.store = EntryStore()
        self.clock = clock
        self._expiring: list[tuple[int, str]] = []  # heap of (expires_at, key): entries that expire
        self._cells: set[str] = {cell}  # cells whose receipts this relay has held
        self.rumors = RumorQueue()
        self.awareness = Awareness(profile.awareness_max)
        self.links: dict[str, Link] = {}
        self.applied: dict[str, float] = {}  # revocation id -> when this relay's cell ledger held it
        self.heard: dict[str, float] = {}  # revocation id -> when this relay first heard of it
        self.cross: dict[str, list[str]] = {}  # other cell -> member names this relay links to
        self.counters: Counter[str] = Counter()
        self.exposure = Histogram(EXPOSURE_BUCKETS)  # seconds from revoke call to applied here
        self.table: MemberTable | None = None
        self._server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._acks: dict[int, Callable[[], None]] = {}  # probe seq -> what its ack does
        self._nacks: dict[int, int] = {}  # probe seq -> nacks heard from its indirect helpers
        self._seq = 0
        self._probe_timer: asyncio.TimerHandle | None = None  # when the next probe starts
        self._tasks: list[asyncio.Task[Any]] = []
        self._subscribers: set[asyncio.Queue[pb.Applied | None]] = set()
        self._probe_order: list[str] = []
        self._helping: set[asyncio.Task[None]] = set()
        self._members_cache: tuple[int, list[pb.Member]] = (-1, [])
        self._member_pbs: dict[str, tuple[tuple[str, str, int, State], pb.Member]] = {}
        self._pending: set[str] = set()  # revocation ids waiting for the sink (sealed cell, ledger down)
        self.tree = BroadcastTree(
            graft_timeout=profile.graft_timeout, ack_timeout=profile.ack_timeout, resends=profile.resends
        )
        self._ring_view: tuple[int, list[str]] = (-1, [])  # (table roster, this cell's relays sorted)
        self._recent: list[tuple[float, str]] = []  # (monotonic time, id) of revocations heard lately
        self._root_of: dict[str, str] = {}  # revocation id (heard lately) -> its tree's root in this cell
        # ids first heard by a repair (pushed no further) and not yet down a tree: the
        # tree's own push, arriving later, goes on from here (insertion-ordered, bounded)
        self._repaired: dict[str, None] = {}
        self._peer_view: tuple[int, list[str], dict[str, str]] = (-1, [], {})
        self._targets_view: tuple[int, int, list[Member]] = (
            -1,
            -1,
            [],
        )  # (table roster, cross version, targets)
        self._cross_version = 0  # bumped whenever `cross` changes
        self._cross_at = -1  # the member table's roster `cross` was last refreshed at
        # The gossip and suspicion loops sleep on these while they have nothing to do
        # (no push waiting for its ack, nothing to graft, no suspicion), so an idle relay
        # wakes only to probe and for anti-entropy: a revocation or a suspicion sets them.
        self._gossip_wake = asyncio.Event()
        self._suspicion_wake = asyncio.Event()
        self.running = False
        # More gRPC services on this relay's server (keycell/cells adds replication), each
        # added before the server starts.
        self.extra_services: list[Callable[[grpc.aio.Server], None]] = []

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        interceptors = [Authorizer(self.tls.identity)] if self.tls is not None else []
        self._server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=interceptors)
        pb_grpc.add_RelayServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        for add_service in self.extra_services:
            add_service(self._server)
        bind = f"{self.host}:{self.port}"
        if self.tls is not None:
            self.port = self._server.add_secure_port(bind, self.tls.server_credentials())
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"relay {self.name} could not listen on {self.host}")
        await self._server.start()
        self.addr = f"{self.advertise or self.host}:{self.port}"
        if not self.name:  # named by address: a relay restarted on its port is the same member
            self.name = f"{self.cell}@{self.addr}"
        me = Member(self.name, self.addr, self.cell, incarnation=int(time.time() * 1000) % 1_000_000_000)
        # The starting incarnation is a clock reading, so a restarted relay out-bids
        # whatever its previous life left in others' tables.
        self.table = MemberTable(
            me,
            suspicion_timeouts=self.profile.suspicion_timeouts,
            confirmations=max(0, self.profile.suspicion_mult - 2),
            clock=time.monotonic,
        )
        self.running = True
        if self.sink is not None:
            await self._reload()
        self._queue_member(me)
        for seed in self.seeds:
            if seed != self.addr:
                self._push_pull(seed)
        self._probe_at(time.monotonic())
        loops = (self._gossip_loop, self._suspicion_loop, self._push_pull_loop)
        self._tasks = [asyncio.create_task(loop(), name=f"{self.name}-{loop.__name__}") for loop in loops]

    async def stop(self) -> None:
        """Stop at once, as a killed relay would (no leave message)."""
        self.running = False
        self._gossip_wake.set()
        self._suspicion_wake.set()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        for task in self._tasks:
            task.cancel()
        for link in list(self.links.values()):
            link.close()
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        if self._server is not None:
            await self._server.stop(0)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in list(self.links.values()):
            if link.task is not None:
                link.task.cancel()
        self.links.clear()

    @property
    def me(self) -> Member:
        assert self.table is not None
        return self.table.me

    def revocation_ids(self) -> set[str]:
        return {key[2:] for key in self.store.entries if key.startswith("r/")}

    # --- sending ----------------------------------------------------------------------

    def _envelope(self, **body: Any) -> pb.Envelope:
        return pb.Envelope(sender=self.name, sender_addr=self.addr, sender_cell=self.cell, **body)

    def _send(self, addr: str, env: pb.Envelope, link: Link | None = None, *, piggyback: bool = True) -> None:
        if addr == self.addr or not addr or not self.running:
            return
        if piggyback and self.table is not None and len(self.rumors):
            room = self.profile.rumors_per_message - len(env.rumors)
            if room > 0:
                limit = self.profile.retransmit_limit(len(self.table.members))
                env.rumors.extend(self.rumors.take(room, limit))
        kind = env.WhichOneof("body")
        self.counters[_SENT[kind] if kind is not None else _SENT_GOSSIP] += 1
        if _about_revocations(env, kind):
            self.counters["revocation_messages"] += 1
        if self.faults is not None:
            if self.faults.drop(self.addr, addr):
                self.counters["dropped"] += 1
                return
            delay = self.faults.latency()
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, self._deliver, addr, env, link)
                return
        self._deliver(addr, env, link)

    def _deliver(self, addr: str, env: pb.Envelope, link: Link | None) -> None:
        if not self.running:
            return
        if link is None or link.closed:
            link = self._link(addr)
        if link is None or not link.send(env):
            self.counters["unsent"] += 1

    def _link(self, addr: str) -> Link | None:
        link = self.links.get(addr)
        if link is not None and not link.closed:
            return link
        backoff = self._backoff.get(addr)
        if backoff is not None and backoff.until > time.monotonic():
            return None
        link = Link(addr, outbound=True)
        self.links[addr] = link
        link.task = asyncio.create_task(self._run_outbound(link))
        # A new stream opens with a push-pull: it repairs what was missed while apart.
        # The member table goes only to a peer this relay may have been apart from (not
        # a live member, or its last stream failed): on first contact with a member
        # learned by gossip, the table would tell it nothing the rumours do not, and in
        # a cell of n relays the n^2/2 first contacts would each carry it both ways.
        link.send(self._envelope(digest=pb.Digest(buckets=self.store.digest)))
        _, cell_of = self._peers()
        if addr not in cell_of or addr in self._backoff:
            link.send(self._envelope(sync=pb.Sync(members=self._member_msgs())))
        return link

    async def _run_outbound(self, link: Link) -> None:
        channel = self._channels.get(link.addr)
        if channel is None:
            try:
                channel = relay_channel(link.addr, self.tls, _CHANNEL_OPTIONS)
                self.counters["channels_opened"] += 1
            except TLSConfigError as exc:  # a peer off loopback while this relay has no TLS
                log.warning("%s: %s", self.name, exc)
                channel = None
            if channel is not None:
                self._channels[link.addr] = channel
        if channel is None:
            link.close()
            if self.links.get(link.addr) is link:
                del self.links[link.addr]
            self._backoff.setdefault(link.addr, _Backoff()).until = (
                time.monotonic() + self.profile.backoff_max
            )
            return
        stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]

        async def outgoing() -> AsyncIterator[pb.Envelope]:
            while True:
                env = await link.queue.get()
                if env is None:
                    return
                yield env

        heard = False
        try:
            call = stub.Stream(outgoing())
            async for env in call:
                if not heard:
                    heard = True
                    self._backoff.pop(link.addr, None)
                self._receive(env, link)
        except grpc.aio.AioRpcError as exc:
            self.counters["stream_failures"] += 1
            self.counters[f"stream_failures_{exc.code().name.lower()}"] += 1
            log.debug("%s: stream to %s failed: %s", self.name, link.addr, exc.code())
        except asyncio.CancelledError:
            pass
        finally:
            link.close()
            if self.links.get(link.addr) is link:
                del self.links[link.addr]
            if not heard and self.running:
                backoff = self._backoff.setdefault(link.addr, _Backoff())
                backoff.failures += 1
                wait = min(self.profile.backoff_max, self.profile.backoff_base * 2 ** (backoff.failures - 1))
                backoff.until = time.monotonic() + wait * (0.5 + self.rng.random() / 2)
                channel = self._channels.pop(link.addr, None)
                if channel is not None:
                    await channel.close()

    # --- the gRPC service -------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Envelope], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Envelope]:
        link = Link("", outbound=False)
        # With mTLS (the Authorizer let only relays of this trust domain in), a peer
        # speaks for the cell its certificate names and no other.
        peer_cell = peer.cell if self.tls is not None and (peer := peer_identity(context)) else None

        async def read() -> None:
            try:
                async for env in request_iterator:
                    if peer_cell is not None and env.sender_cell != peer_cell:
                        self.counters["refused_impostor"] += 1
                        log.warning(
                            "%s: a relay of cell %s sent as cell %r; stream closed",
                            self.name,
                            peer_cell,
                            env.sender_cell,
                        )
                        return
                    if not link.addr and env.sender_addr:
                        link.addr = env.sender_addr
                        current = self.links.get(link.addr)
                        if current is None or current.closed:
                            self.links[link.addr] = link
                    self._receive(env, link)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                link.close()

        reader = asyncio.create_task(read())
        try:
            while True:
                env = await link.queue.get()
                if env is None:
                    return
                yield env
        finally:
            reader.cancel()
            link.close()
            if link.addr and self.links.get(link.addr) is link:
                del self.links[link.addr]

    async def Submit(self, request: pb.Revocation, context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        if not request.id or not request.subject:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a revocation needs an id and a subject")
        new = self.submit(rev_from_pb(request))
        return pb.SubmitReply(accepted=new)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Applied]:
        queue: asyncio.Queue[pb.Applied | None] = asyncio.Queue(LINK_QUEUE)
        if request.replay:
            for rid, at in list(self.applied.items()):
                entry = self.store.entries.get("r/" + rid)
                if entry is not None:
                    queue.put_nowait(pb.Applied(revocation=entry.revocation, relay=self.name, applied_at=at))
        self._subscribers.add(queue)
        try:
            yield pb.Applied(relay=self.name)  # no revocation: "subscribed", so the client knows it is live
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._subscribers.discard(queue)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(
            name=self.name,
            cell=self.cell,
            members=self._member_msgs(),
            revocation_ids=sorted(self.revocation_ids()),
            health=self.awareness.score,
        )

    # --- receiving --------------------------------------------------------------------

    def _receive(self, env: pb.Envelope, link: Link) -> None:
        if not self.running or self.table is None:
            return
        self.counters["received"] += 1
        if env.sender and self.table.get(env.sender) is None and env.sender_addr:
            self._on_alive(pb.Member(name=env.sender, addr=env.sender_addr, cell=env.sender_cell), link.addr)
        rids = [
            r.entry.revocation.id
            for r in env.rumors
            if r.WhichOneof("kind") == "entry" and r.entry.WhichOneof("kind") == "revocation"
        ]
        # A revocation pushed down this cell's tree keeps its root; one pushed from
        # another cell makes this relay the root of its cell's tree (""); one from
        # this cell with no root (anti-entropy, a graft answered without one) is a
        # repair and goes no further (None): the relays it missed too pull it the
        # same way, or graft it on seeing its id on this relay's pings.
        root = (env.root or None) if env.sender_cell == self.cell else ""
        if rids and env.sender_addr:  # the answer to a push: its ids (an ack: no resend)
            # (queued before this relay's own pushes: the sender's timer runs meanwhile)
            self._send(env.sender_addr, self._envelope(ihave=rids), link, piggyback=False)
        for rumor in env.rumors:
            self._on_rumor(rumor, env.sender_addr, root)
        if env.graft:
            self._on_graft(env, link)
        if env.ihave:
            self._on_ihave(env)
        body = env.WhichOneof("body")
        if body == "ping":
            ack = self._envelope(ack=pb.Ack(seq=env.ping.seq), ihave=self._recent_ids())
            self._send(env.sender_addr, ack, link)
        elif body == "ack":
            if env.ack.nack:  # a helper could not reach the target: our link to it works
                if env.ack.seq in self._nacks:
                    self._nacks[env.ack.seq] += 1
                    self.counters["nacks_received"] += 1
                return
            acked = self._acks.pop(env.ack.seq, None)
            if acked is not None:
                acked()
        elif body == "ping_req":
            task = asyncio.create_task(self._relay_probe(env.ping_req, env.sender_addr, link))
            self._helping.add(task)
            task.add_done_callback(self._helping.discard)
        elif body == "digest":
            self._on_digest(env, link)
        elif body == "keys":
            self._on_keys(env, link)
        elif body == "sync":
            for member in env.sync.members:
                self._on_member(member, env.sender)
            if not env.sync.reply:
                self._send(
                    env.sender_addr,
                    self._envelope(sync=pb.Sync(members=self._member_msgs(), reply=True)),
                    link,
                )

    def _on_rumor(self, rumor: pb.Rumor, source_addr: str, root: str | None = "") -> None:
        kind = rumor.WhichOneof("kind")
        if kind == "entry":
            self._learn(rumor.entry, source_addr, root)
        elif kind == "alive":
            self._on_alive(rumor.alive.member, source_addr)
        elif kind == "suspect":
            self._on_suspect(rumor.suspect.name, rumor.suspect.incarnation, rumor.suspect.source)
        elif kind == "dead":
            self._on_dead(rumor.dead.name, rumor.dead.incarnation)

    def _on_member(self, member: pb.Member, source: str) -> None:
        if member.state == pb.ALIVE:
            self._on_alive(member, "")
        elif member.state == pb.SUSPECT:
            self._on_alive(member, "")  # learn of it first if unknown
            self._on_suspect(member.name, member.incarnation, source)
        else:
            if self.table is not None and self.table.get(member.name) is None and member.name != self.name:
                self.table.alive(member.name, member.addr, member.cell, member.incarnation)
            self._on_dead(member.name, member.incarnation)

    def _on_alive(self, member: pb.Member, source_addr: str) -> None:
        assert self.table is not None
        verdict = self.table.alive(member.name, member.addr, member.cell, member.incarnation)
        if verdict == Verdict.REFUTE:
            self._refute()
        elif verdict == Verdict.CHANGED:
            known = self.table.get(member.name)
            if known is not None:
                self._queue_member(known)

    def _on_suspect(self, name: str, incarnation: int, source: str) -> None:
        assert self.table is not None
        verdict = self.table.suspect(name, incarnation, source)
        if verdict == Verdict.REFUTE:
            self._refute()
        elif verdict == Verdict.CHANGED:
            self._suspicion_wake.set()
            self.rumors.put(
                "m/" + name,
                pb.Rumor(suspect=pb.Suspect(name=name, incarnation=incarnation, source=source)),
                lazy=True,
            )

    def _on_dead(self, name: str, incarnation: int) -> None:
        assert self.table is not None
        verdict = self.table.dead_(name, incarnation)
        if verdict == Verdict.REFUTE:
            self._refute()
        elif verdict == Verdict.CHANGED:
            self.rumors.put(
                "m/" + name,
                pb.Rumor(dead=pb.Dead(name=name, incarnation=incarnation, source=self.name)),
                lazy=True,
            )
            self._drop_cross(name)

    def _refute(self) -> None:
        self.awareness.apply(+1)  # Lifeguard: being suspected hints that we are the slow one
        self.counters["refutations"] += 1
        self._queue_member(self.me)

    def _queue_member(self, member: Member) -> None:
        self.rumors.put(
            "m/" + member.name, pb.Rumor(alive=pb.Alive(member=self._member_msg(member))), lazy=True
        )

    def _member_msg(self, m: Member) -> pb.Member:
        """A member as sent, kept per member until its address, incarnation or state
        changes (a Sync of n members otherwise builds n messages whenever any one changed)."""
        key = (m.addr, m.cell, m.incarnation, m.state)
        cached = self._member_pbs.get(m.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        msg = pb.Member(
            name=m.name,
            addr=m.addr,
            cell=m.cell,
            incarnation=m.incarnation,
            state=pb.State.Name(int(m.state)),
        )
        self._member_pbs[m.name] = (key, msg)
        return msg

    def _member_msgs(self) -> list[pb.Member]:
        """The member table as sent in a Sync, rebuilt only when the table changed."""
        assert self.table is not None
        if self._members_cache[0] != self.table.version:
            self._members_cache = (
                self.table.version,
                [self._member_msg(m) for m in self.table.members.values()],
            )
        return self._members_cache[1]

    # --- entries: revocations and receipts ---------------------------------------------

    def submit(self, rec: RevocationRecord) -> bool:
        """A revocation from the local revocation function: spread it now."""
        self.counters["submitted"] += 1
        return self._learn(pb.Entry(revocation=rev_to_pb(rec)), "")

    def expired(self, expires_at: int) -> bool:
        """Whether an entry with this expires_at is past it by more than the grace."""
        return expires_at > 0 and expires_at + self.profile.expiry_grace < self.clock()

    def _with_expiry(self, entry: pb.Entry) -> pb.Entry:
        """A receipt without expires_at takes its revocation's, if this relay holds it."""
        if entry.HasField("receipt") and not entry.receipt.expires_at:
            rev = self.store.entries.get("r/" + entry.receipt.id)
            if rev is not None and rev.revocation.expires_at:
                r = entry.receipt
                receipt = pb.Receipt(
                    id=r.id, cell=r.cell, applied_at=r.applied_at, expires_at=rev.revocation.expires_at
                )
                return pb.Entry(receipt=receipt)
        return entry

    def _store(self, key: str, entry: pb.Entry) -> bool:
        """Add to the entry store, noting when the entry expires."""
        if not self.store.add(key, entry):
            return False
        expires = entry_expiry(entry)
        if expires > 0:
            heapq.heappush(self._expiring, (expires, key))
        if entry.HasField("receipt"):
            self._cells.add(entry.receipt.cell)
        return True

    def _learn(self, entry: pb.Entry, source_addr: str, root: str | None = "") -> bool:
        """Take an entry in; `root`: the tree a revocation came down ("": this relay
        is the root in its cell; None: a repair, pushed no further)."""
        key = entry_key(entry)
        entry = self._with_expiry(entry)
        if self.expired(entry_expiry(entry)):
            self.counters["expired_refused"] += 1  # dropped everywhere by now, or soon
            return False
        if not self._store(key, entry):
            if source_addr and key[0] == "r":
                self.counters["revocation_copies"] += 1  # heard again
                if root is not None and entry.revocation.id in self._repaired:
                    del self._repaired[entry.revocation.id]
                    # First reached by a repair, which goes no further: the tree's push,
                    # come later, goes on to this relay's children, who would otherwise
                    # wait for their own grafts at the probe pace.
                    self.counters["pushed_on_after_repair"] += 1
                    self._push(self.store.entries.get(key, entry), source_addr, root, again=True)
            return False
        if entry.HasField("revocation"):
            self.counters["revocations_heard"] += 1
            self.heard[entry.revocation.id] = time.time()
            if root is None and source_addr:
                self._repaired[entry.revocation.id] = None
                if len(self._repaired) > 2 * RECENT_IDS_MAX:
                    for old in list(self._repaired)[:RECENT_IDS_MAX]:
                        del self._repaired[old]
            self._push(entry, source_addr, root)
            self._apply(entry.revocation)
            return True
        # A receipt is evidence for sys/revocations/:id, not on the exposure path: it
        # rides along a couple of times, and anti-entropy brings it everywhere else.
        self.rumors.put(key, pb.Rumor(entry=entry), lazy=True, cap=RECEIPT_SENDS)
        stored = _RECEIPTS.setdefault(self.sink, set()) if self.sink is not None else set()
        if self.sink is not None and entry.receipt.cell != self.cell and key not in stored:
            stored.add(key)  # relays of one process share the sink: one write per receipt
            rev = self.store.entries.get("r/" + entry.receipt.id)
            receipt = Receipt(entry.receipt.id, entry.receipt.cell, entry.receipt.applied_at)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self.sink.background,
                self.sink.store_receipt,
                receipt,
                rev_from_pb(rev.revocation) if rev is not None else None,
            )
            future.add_done_callback(self._log_failure)

            def forget_on_failure(f: asyncio.Future[None]) -> None:
                if not f.cancelled() and f.exception() is not None:
                    stored.discard(key)  # the next copy heard tries again

            future.add_done_callback(forget_on_failure)
        return True

    @staticmethod
    def _log_failure(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("relay ledger write failed: %s", future.exception())

    def _push(self, entry: pb.Entry, source_addr: str, root: str | None, *, again: bool = False) -> None:
        """A revocation heard for the first time: push it to this relay's children in
        the tree rooted at `root` (this relay if ""; none if None), and, if it was
        submitted here (no source), to one relay of every other cell, the root of
        that cell's tree. Each push waits for its ack. The id is kept among the ones
        pings carry (`again`: a revocation first heard by a repair, already kept)."""
        assert self.table is not None
        rid = entry.revocation.id
        now = time.monotonic()
        kids: list[str] = []
        if root is not None:
            root = root or self.addr
            self._root_of[rid] = root
            ring = self._ring()
            kids = [a for a in children(ring, root, self.addr, self.profile.eager_fanout) if a != source_addr]
        if kids:
            env = self._envelope(rumors=[pb.Rumor(entry=entry)], root=root)
            for addr in kids:
                self._send(addr, env, piggyback=False)
        cross: list[str] = []
        if not source_addr:
            if not self.cross:
                self._refresh_cross()
            for names in self.cross.values():
                member = next((m for n in names if (m := self.table.get(n)) is not None), None)
                if member is not None:
                    cross.append(member.addr)
            if cross:
                env = self._envelope(rumors=[pb.Rumor(entry=entry)])
                for addr in cross:
                    self._send(addr, env, piggyback=False)
        self.counters["eager_pushes"] += len(kids) + len(cross)
        self.tree.pushed(rid, kids + cross, now)
        if not again:
            self._recent.append((now, rid))
            if len(self._recent) > 2 * RECENT_IDS_MAX:
                for _, old in self._recent[:RECENT_IDS_MAX]:
                    self._root_of.pop(old, None)
                del self._recent[:RECENT_IDS_MAX]
        if self.tree.busy():
            self._gossip_wake.set()

    def _ring(self) -> list[str]:
        """This cell's live relays, this one among them, sorted by address: what the
        tree is laid on (rebuilt only when the member table's roster changed)."""
        assert self.table is not None
        if self._ring_view[0] != self.table.roster:
            own, cell_of = self._peers()
            self._ring_view = (self.table.roster, sorted({*own, self.addr}))
            self.tree.forget_peers(set(cell_of))
        return self._ring_view[1]

    def _send_entries(
        self, addr: str, rids: Iterable[str], link: Link | None = None, *, resent: bool = False
    ) -> int:
        """Send the revocations held under these ids to `addr`, one envelope per tree
        root (a relay of another cell gets none: it roots its own cell's tree)."""
        _, cell_of = self._peers()
        same_cell = cell_of.get(addr) == self.cell
        by_root: dict[str, list[pb.Rumor]] = {}
        for rid in rids:
            entry = self.store.entries.get("r/" + rid)
            if entry is not None:
                root = self._root_of.get(rid, "") if same_cell else ""
                by_root.setdefault(root, []).append(pb.Rumor(entry=entry))
        for root, rumors in by_root.items():
            self._send(addr, self._envelope(rumors=rumors, root=root, resent=resent), link, piggyback=False)
        return sum(len(r) for r in by_root.values())

    def _recent_ids(self) -> list[str]:
        """Ids of the revocations heard in the last RECENT_IDS_S seconds (the newest
        RECENT_IDS_MAX): what a ping announces, whichever links are lazy."""
        if not self._recent:
            return []
        since = time.monotonic() - RECENT_IDS_S
        if self._recent[0][0] < since:
            self._recent = [(t, rid) for t, rid in self._recent if t >= since]
        return [rid for _, rid in self._recent[-RECENT_IDS_MAX:]]

    def _on_ihave(self, env: pb.Envelope) -> None:
        """Ids the sender holds: start a graft timer for each revocation this relay lacks."""
        now = time.monotonic()
        self.tree.acked(env.sender_addr, env.ihave, now)
        fresh = False
        for rid in env.ihave:
            if "r/" + rid not in self.store and self.tree.announced(rid, env.sender_addr, now):
                fresh = True
        if fresh:
            self._gossip_wake.set()

    def _on_graft(self, env: pb.Envelope, link: Link) -> None:
        """The sender lacks these revocations: send those this relay holds (with their
        tree's root, so the sender pushes them on down its subtree)."""
        self.counters["grafts_received"] += 1
        self._send_entries(env.sender_addr, env.graft, link)

    def _peers(self) -> tuple[list[str], dict[str, str]]:
        """Addresses of this cell's live relays, and every live relay's cell by
        address, rebuilt only when the member table's roster changed."""
        assert self.table is not None
        if self._peer_view[0] != self.table.roster:
            live = self.table.live()
            self._peer_view = (
                self.table.roster,
                [m.addr for m in live if m.cell == self.cell],
                {m.addr: m.cell for m in live},
            )
        return self._peer_view[1], self._peer_view[2]

    def _apply(self, msg: pb.Revocation) -> None:
        rid = msg.id
        if self.sink is None:
            self._applied(msg, time.time())
            return
        held = self.sink.known(rid)
        if held is not None:  # another relay of this process saw the ledger take it
            self._applied(msg, time.time(), ledger_at=held)
            return
        self._pending.add(rid)
        # Relays of one process share the sink: one ledger write per revocation, whose
        # outcome every relay of the process waits on (no thread hop each).
        inflight = _INFLIGHT.setdefault(self.sink, {})
        future = inflight.get(rid)
        loop = asyncio.get_running_loop()
        if future is None or future.get_loop() is not loop:
            future = loop.run_in_executor(self.sink.executor, self.sink.apply, rev_from_pb(msg))
            inflight[rid] = future
            future.add_done_callback(lambda _: inflight.pop(rid, None))

        def done(f: asyncio.Future[float]) -> None:
            if f.cancelled() or not self.running:
                return
            if f.exception() is not None:
                log.warning(
                    "%s: could not apply %s to cell %s yet: %s", self.name, rid, self.cell, f.exception()
                )
                return  # stays pending; the push-pull loop retries it
            self._pending.discard(rid)
            self._applied(msg, time.time(), ledger_at=f.result())

        future.add_done_callback(done)

    def _applied(self, msg: pb.Revocation, at: float, ledger_at: float | None = None) -> None:
        if msg.id in self.applied or "r/" + msg.id not in self.store:  # (dropped as expired meanwhile)
            return
        self.applied[msg.id] = at
        self.exposure.observe(max(0.0, at - msg.revoked_at))
        self.counters["revocations_applied"] += 1
        event = pb.Applied(revocation=msg, relay=self.name, applied_at=at)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)  # too far behind: it reconnects with replay
        if ledger_at is not None:
            receipt = pb.Receipt(id=msg.id, cell=self.cell, applied_at=ledger_at, expires_at=msg.expires_at)
            self._learn(pb.Entry(receipt=receipt), "")

    async def _reload(self, *, spread: bool = False) -> None:
        """What this cell's ledger holds: a restarted relay starts from it, and every
        `sync_interval` a sweep spreads whatever the ledger has that this relay never
        heard of (a revoke call whose hand-over to the relay failed). The relays sharing
        the sink take the sweep in turns (_Sweeps). A sweep reads only the receipts of
        revocations minted since the previous one (ids carry their minting time), and
        every FULL_SWEEP_EVERY-th sweep reads them all."""
        assert self.sink is not None
        sink = self.sink
        loop = asyncio.get_running_loop()
        started = time.time()
        sweeps = _SWEEPS.get(sink)
        if sweeps is None:
            sweeps = _SWEEPS[sink] = _Sweeps()
        since: float | None = None
        if spread:
            if not sweeps.claim(self.profile.sync_interval):
                return
            since = sweeps.since()

        def read() -> list[tuple[RevocationRecord | None, Receipt]]:
            return list(sink.held() if since is None else sink.held_since(since))

        try:
            held = await loop.run_in_executor(sink.background, read)  # not ahead of applies
        except Exception as exc:
            log.warning("%s: could not read cell %s's revocations: %s", self.name, self.cell, exc)
            return
        sweeps.read_at = started
        self.counters["sweeps_full" if since is None else "sweeps_recent"] += 1
        # A receipt kept without its record takes the expiry of one that has it (this
        # cell's own receipt of that revocation carries the record).
        expiry_of = {rec.id: rec.expires_at or 0 for rec, _ in held if rec is not None}
        for rec, receipt in held:
            expires = expiry_of.get(receipt.id, 0)
            if self.expired(expires):
                continue  # the ledger drops it by its own TTL; the relay has no more use for it
            if rec is not None and "r/" + rec.id not in self.store:
                entry = pb.Entry(revocation=rev_to_pb(rec))
                if spread:
                    self.counters["swept"] += 1
                    self._learn(entry, "")
                else:
                    self._store("r/" + rec.id, entry)
                    if receipt.cell == self.cell:
                        self.applied.setdefault(rec.id, receipt.applied_at)
                    else:
                        self._apply(entry.revocation)
            key = f"a/{receipt.id}/{receipt.cell}"
            if key not in self.store:
                found = self._with_expiry(
                    pb.Entry(
                        receipt=pb.Receipt(
                            id=receipt.id,
                            cell=receipt.cell,
                            applied_at=receipt.applied_at,
                            expires_at=expires,
                        )
                    )
                )
                if spread:
                    self._learn(found, "")
                else:
                    self._store(key, found)

    # --- anti-entropy -------------------------------------------------------------------

    def _push_pull(self, addr: str, *, members: bool = True) -> None:
        """Anti-entropy with one peer: the entry digest (the peer answers with the keys
        of buckets that differ, then each side sends what the other lacks) and, with
        `members`, the whole member table (answered with the peer's)."""
        self.counters["push_pulls"] += 1
        self._send(addr, self._envelope(digest=pb.Digest(buckets=self.store.digest)))
        if members:
            self._send(addr, self._envelope(sync=pb.Sync(members=self._member_msgs())))

    def _on_digest(self, env: pb.Envelope, link: Link) -> None:
        differing = self.store.differing(env.digest.buckets)
        if differing:
            keys = pb.KeyList(buckets=differing, keys=self.store.keys_in(differing))
            self._send(env.sender_addr, self._envelope(keys=keys), link)

    def _on_keys(self, env: pb.Envelope, link: Link) -> None:
        theirs = set(env.keys.keys)
        mine = self.store.keys_in(env.keys.buckets)
        entries = self.store.entries
        # (an expired entry not dropped yet is not offered: the peer would refuse it)
        missing = [e for k in mine if k not in theirs and not self.expired(entry_expiry(e := entries[k]))]
        for start in range(0, len(missing), ENTRIES_PER_ENVELOPE):
            chunk = [pb.Rumor(entry=e) for e in missing[start : start + ENTRIES_PER_ENVELOPE]]
            self._send(env.sender_addr, self._envelope(rumors=chunk), link, piggyback=False)
        if not env.keys.reply and any(k not in self.store for k in theirs):
            keys = pb.KeyList(buckets=env.keys.buckets, keys=mine, reply=True)
            self._send(env.sender_addr, self._envelope(keys=keys), link)

    # --- peers ---------------------------------------------------------------------------

    def _refresh_cross(self) -> None:
        """Keep `cross_links` live relays of every other cell; a no-op while the member
        table's roster has not changed since the last refresh (the probe loop asks every
        probe)."""
        assert self.table is not None
        if self._cross_at == self.table.roster:
            return
        self._cross_at = self.table.roster
        self._cross_version += 1
        live = self.table.live()
        by_cell: dict[str, list[Member]] = {}
        for m in live:
            if m.cell != self.cell:
                by_cell.setdefault(m.cell, []).append(m)
        alive_names = {m.name for m in live}
        for cell, members in by_cell.items():
            chosen = [n for n in self.cross.get(cell, []) if n in alive_names]
            spare = [m.name for m in members if m.name not in chosen]
            self.rng.shuffle(spare)
            chosen += spare[: max(0, self.profile.cross_links - len(chosen))]
            self.cross[cell] = chosen
        for cell in list(self.cross):
            if cell not in by_cell:
                del self.cross[cell]

    def _drop_cross(self, name: str) -> None:
        for cell, names in self.cross.items():
            if name in names:
                self.cross[cell] = [n for n in names if n != name]
                self._cross_version += 1
                self._cross_at = -1  # pick a replacement at the next refresh

    def _probe_targets(self) -> list[Member]:
        """This cell's live relays and the cross links, rebuilt only when the member
        table's roster or the cross links changed."""
        assert self.table is not None
        table_version, cross_version, targets = self._targets_view
        if table_version != self.table.roster or cross_version != self._cross_version:
            linked = {n for names in self.cross.values() for n in names}
            targets = [m for m in self.table.live() if m.cell == self.cell or m.name in linked]
            self._targets_view = (self.table.roster, self._cross_version, targets)
        return targets

    # --- loops -----------------------------------------------------------------------------

    def _probe_tick(self) -> None:
        """Start the next SWIM probe: one per probe interval (scaled by local health),
        each begun when the last one ended and not before its interval had passed."""
        self._probe_timer = None
        if not self.running:
            return
        interval = self.awareness.scale(self.profile.probe_interval)
        try:
            self._refresh_cross()
            target = self._next_probe_target()
            if target is not None:
                self._start_probe(target, interval, self._probe_at)
                return
        except Exception:  # one probe's failure must not stop the relay
            log.exception("%s: probe failed to start", self.name)
        self._probe_at(time.monotonic() + interval)

    def _probe_at(self, at: float) -> None:
        if self.running:
            delay = max(0.0, at - time.monotonic())
            self._probe_timer = asyncio.get_running_loop().call_later(delay, self._probe_tick)

    def _next_probe_target(self) -> Member | None:
        assert self.table is not None
        while self._probe_order:
            member = self.table.get(self._probe_order.pop())
            if member is not None and member.state != State.DEAD:
                return member
        targets = list(self._probe_targets())  # (a copy: the view is cached)
        self.rng.shuffle(targets)
        self._probe_order = [m.name for m in targets]
        if not self._probe_order:
            return None
        member = self.table.get(self._probe_order.pop())
        return member

    def _new_seq(self) -> tuple[int, asyncio.Future[None]]:
        self._seq += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def acked() -> None:
            if not future.done():
                future.set_result(None)

        self._acks[self._seq] = acked
        return self._seq, future

    async def _probe(self, target: Member, interval: float) -> None:
        """One probe outside the probe loop, awaited to its end (tests, diagnostics)."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def then(_at: float) -> None:
            if not ended.done():  # (the waiter may have been cancelled)
                ended.set_result(None)

        self._start_probe(target, interval, then)
        await ended

    def _start_probe(self, target: Member, interval: float, then: Callable[[float], object]) -> None:
        """SWIM probe: ping; on no ack within the timeout, ping again `probe_retries`
        times (one probe_timeout each), then ask `indirect_checks` peers to ping it for
        us; on no ack by the end of the interval (or of the last timeout, if later),
        suspect it. Every ping of one probe carries its seq: any ack ends it.

        Local health (Lifeguard): a probe answered lowers it by one; a failed probe
        raises it by one for every helper whose nack ("I could not reach it either")
        did not come back, as missing nacks point at this relay's own links or CPU,
        or by one when there was no helper to ask.

        A probe is driven by its ack and by one timer at a time (no task, future or
        timeout context each): probing is most of what an idle relay does. At its end
        it calls `then` with the time the next probe may start."""
        self._seq += 1
        timeout = self.awareness.scale(self.profile.probe_timeout)
        probe = _Probe(target, self._seq, then, time.monotonic(), interval, timeout)
        self._acks[probe.seq] = lambda: self._probe_acked(probe)
        self._probe_ping(probe)

    def _probe_ping(self, probe: _Probe) -> None:
        # (a new envelope each time: _send piggybacks rumours onto the one it is given)
        ping = pb.Ping(seq=probe.seq, target=probe.target.name)
        self._send(probe.target.addr, self._envelope(ping=ping, ihave=self._recent_ids()))
        probe.timer = asyncio.get_running_loop().call_later(probe.timeout, self._probe_expired, probe)

    def _probe_acked(self, probe: _Probe) -> None:
        if probe.timer is not None:
            probe.timer.cancel()
        if probe.helpers is None:
            if not probe.attempt:  # an ack only after a resend says nothing of our health
                self.awareness.apply(-1)
        else:
            self._nacks.pop(probe.seq, None)
        probe.then(probe.started + probe.interval)

    def _probe_expired(self, probe: _Probe) -> None:
        """The probe's timer ran out with no ack: ping again, go indirect, or give up."""
        if not self.running:  # (its end is still told: a waiter on Relay._probe returns)
            probe.then(time.monotonic())
            return
        try:
            if probe.attempt < self.profile.probe_retries:
                probe.attempt += 1
                self.counters["probe_retries"] += 1
                self._probe_ping(probe)
                return
            if probe.helpers is None:
                target = probe.target
                helpers = [
                    m for m in self._probe_targets() if m.name != target.name and m.state == State.ALIVE
                ]
                probe.helpers = self.rng.sample(helpers, min(self.profile.indirect_checks, len(helpers)))
                self._nacks[probe.seq] = 0
                for helper in probe.helpers:
                    req = pb.PingReq(seq=probe.seq, target=target.name, target_addr=target.addr)
                    self._send(helper.addr, self._envelope(ping_req=req))
                wait = max(probe.timeout, probe.interval - (time.monotonic() - probe.started))
                probe.timer = asyncio.get_running_loop().call_later(wait, self._probe_expired, probe)
                return
            self._acks.pop(probe.seq, None)
            nacks = self._nacks.pop(probe.seq, 0)
            chosen = len(probe.helpers)
            self.counters["nacks_missed"] += chosen - nacks if chosen else 0
            self.awareness.apply(chosen - nacks if chosen else 1)
            self.counters["probes_failed"] += 1
            if probe.target.state == State.ALIVE:
                self._on_suspect(probe.target.name, probe.target.incarnation, self.name)
        except Exception:  # one probe's failure must not stop the relay
            log.exception("%s: probe of %s failed", self.name, probe.target.name)
        probe.then(time.monotonic())

    async def _relay_probe(self, req: pb.PingReq, requester: str, link: Link) -> None:
        seq, future = self._new_seq()
        self._send(req.target_addr, self._envelope(ping=pb.Ping(seq=seq, target=req.target)))
        try:
            async with asyncio.timeout(self.awareness.scale(self.profile.probe_timeout)):
                await future
        except TimeoutError:
            self._acks.pop(seq, None)
            self._send(requester, self._envelope(ack=pb.Ack(seq=req.seq, nack=True)), link)
            return
        self._send(requester, self._envelope(ack=pb.Ack(seq=req.seq)), link)

    async def _gossip_loop(self) -> None:
        """The broadcast's scheduler: while some push waits for its ack or some
        revocation is missing, a round whenever the earliest resend or graft falls
        due; with neither, the loop sleeps until a push or an announcement gives it
        work (no idle ticks, and no task or timer per message)."""
        while self.running:
            if not self.tree.busy():
                self._gossip_wake.clear()
                await self._gossip_wake.wait()
                continue
            # Sleep until the earliest resend or graft is due, at least one
            # gossip_interval (so what falls due together goes out together); new
            # work with an earlier deadline wakes the loop.
            delay = max(self.profile.gossip_interval, self.tree.next_deadline() - time.monotonic())
            self._gossip_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._gossip_wake.wait()
            if self.table is None or not self.tree.busy():  # (acks came meanwhile)
                continue
            self.counters["gossip_rounds"] += 1
            try:
                self._gossip_round()
            except Exception:  # one round's failure must not stop the relay
                log.exception("%s: gossip round failed", self.name)

    def _gossip_round(self) -> None:
        """Resend each push whose ack is overdue, and send a graft for each missing
        revocation whose timer ran out."""
        self._ring()  # (forgets pushes to relays no longer live)
        store = self.store
        now = time.monotonic()
        for addr, ids in self.tree.resends_due(now).items():
            for _ in range(RESEND_COPIES):
                self.counters["resends"] += self._send_entries(addr, ids, resent=True)
        grafts = self.tree.grafts_due(now, lambda rid: "r/" + rid in store)
        for addr, ids in grafts.items():
            self.counters["grafts_sent"] += 1
            self._send(addr, self._envelope(graft=ids), piggyback=False)

    async def _suspicion_loop(self) -> None:
        """Declare suspects dead once their timeout passes, looking every `tick` while
        any suspicion runs (confirmations shorten timeouts, so a fixed deadline would
        not do); with none, sleep until `_on_suspect` starts one."""
        # (a quarter probe interval: suspicion timeouts are several probe intervals at
        # the least, so a dead member is declared within a few % of its deadline)
        tick = self.profile.probe_interval / 4
        while self.running:
            assert self.table is not None
            if not self.table.suspicions:
                self._suspicion_wake.clear()
                await self._suspicion_wake.wait()
                continue
            await asyncio.sleep(tick)
            for member in self.table.expired():
                self.counters["declared_dead"] += 1
                self.rumors.put(
                    "m/" + member.name,
                    pb.Rumor(
                        dead=pb.Dead(name=member.name, incarnation=member.incarnation, source=self.name)
                    ),
                    lazy=True,
                )
                self._drop_cross(member.name)

    async def _push_pull_loop(self) -> None:
        """Anti-entropy with one random peer per interval, a try at one dead member per
        reconnect interval (rejoin after a partition), a sweep of the cell's ledger per
        sync interval, and a retry of revocations the cell's ledger has not taken yet."""
        last_push = last_rejoin = last_sweep = time.monotonic()
        # The whole member table goes out once per sync_every(n), each time at a random
        # point of the half to one and a half of it: relays started together (a cell
        # deployed or restarted at once) would otherwise all push their tables in the
        # same few seconds, every round (at 300 members, ~30 syncs a second 150 s in).
        next_sync = last_push + self.profile.sync_interval * (0.5 + self.rng.random())
        while self.running:
            await asyncio.sleep(min(self.profile.push_pull_interval, self.profile.reconnect_interval) / 2)
            assert self.table is not None
            now = time.monotonic()
            if now - last_push >= self.profile.push_pull_interval * (0.5 + self.rng.random()):
                last_push = now
                members = now >= next_sync
                if members:
                    next_sync = now + self.profile.sync_every(len(self.table.members)) * (
                        0.5 + self.rng.random()
                    )
                peers = self._probe_targets()
                if peers:
                    self._push_pull(self.rng.choice(peers).addr, members=members)
                elif self.seeds:
                    self._push_pull(self.rng.choice(self.seeds))
            if now - last_rejoin >= self.profile.reconnect_interval:
                last_rejoin = now
                dead = [m for m in self.table.dead() if m.name != self.name]
                if dead:
                    self._push_pull(self.rng.choice(dead).addr)
            if self.sink is not None and now - last_sweep >= self.profile.sync_interval:
                last_sweep = now
                await self._reload(spread=True)
            for rid in list(self._pending):
                entry = self.store.entries.get("r/" + rid)
                if entry is not None:
                    self._apply(entry.revocation)
            self.prune()

    # --- expiry ------------------------------------------------------------------------------

    def prune(self) -> int:
        """Drop expired entries (at most `prune_per_tick` expiring keys looked at, each
        revocation with its receipts); how many entries went."""
        grace = self.profile.expiry_grace
        now = self.clock()
        heap = self._expiring
        dropped = 0
        for _ in range(self.profile.prune_per_tick):
            if not heap or heap[0][0] + grace >= now:
                break
            _, key = heapq.heappop(heap)
            dropped += self._drop(key)
            if key.startswith("r/"):
                rid = key[2:]
                for cell in self._cells:  # its receipts, whichever expires_at they carry
                    dropped += self._drop(f"a/{rid}/{cell}")
        return dropped

    def _drop(self, key: str) -> int:
        """Forget one entry everywhere this relay (and its process's sink) keeps it."""
        if self.store.remove(key) is None:
            return 0
        self.counters["entries_expired"] += 1
        self.rumors.retire(key)
        if key.startswith("r/"):
            rid = key[2:]
            self.heard.pop(rid, None)
            self.applied.pop(rid, None)
            self._pending.discard(rid)
            if self.sink is not None:
                self.sink.forget(rid)
        elif self.sink is not None:
            stored = _RECEIPTS.get(self.sink)
            if stored is not None:
                stored.discard(key)
        return 1

"""How a cell's API process follows its local relay: a server-streaming gRPC call,
`Relay.Subscribe`, that the relay answers with one `Applied` message per revocation
once the cell's ledger holds it. No polling.

The interface (relay.proto):
    rpc Subscribe(SubscribeRequest{replay: bool}) returns (stream Applied)
    Applied{revocation: Revocation{id, subject, origin_cell, revoked_at, reason,
            expires_at}, relay, applied_at}
The first message of every stream has no revocation: it says the subscription is
live. `replay=true` first sends everything the relay applied, then new ones.

`RelaySubscription` runs that call on a daemon thread, reconnecting with
exponential backoff (50 ms doubling to 2 s), and hands each revocation to a
callback. `connected` says whether the stream is up now: a process that has not
heard from its relay falls back to reading the ledger (DESIGN: revocation checks
never wait on the network).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from keycell.relay import tls as relay_tls
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay._pb import relay_pb2_grpc as pb_grpc

log = logging.getLogger("keycell.relay")


@dataclass(frozen=True)
class RevocationEvent:
    id: str
    subject: str
    origin_cell: str
    revoked_at: float
    applied_at: float
    relay: str


class RelaySubscription:
    def __init__(
        self,
        addr: str,
        on_revocation: Callable[[RevocationEvent], None],
        *,
        replay: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
        tls: relay_tls.RelayTLS | None = None,
    ) -> None:
        if tls is None:
            relay_tls.require_loopback(addr, "KEYCELL_RELAY")
        self.tls = tls
        self.addr = addr
        self.on_revocation = on_revocation
        self.replay = replay
        self.backoff = backoff
        self.ready = threading.Event()  # set once the first stream is live
        self.connected = False
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RelaySubscription:
        self._thread = threading.Thread(target=self._run, name="keycell-relay-subscription", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        wait = self.backoff[0]
        while not self._stop.is_set():
            try:
                with relay_tls.channel(self.addr, self.tls) as channel:
                    stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]
                    call = stub.Subscribe(pb.SubscribeRequest(replay=self.replay))
                    self._call = call
                    for applied in call:
                        if not applied.HasField("revocation"):
                            self.connected = True
                            self.ready.set()
                            wait = self.backoff[0]
                            continue
                        rev = applied.revocation
                        event = RevocationEvent(
                            rev.id,
                            rev.subject,
                            rev.origin_cell,
                            rev.revoked_at,
                            applied.applied_at,
                            applied.relay,
                        )
                        try:
                            self.on_revocation(event)
                        except Exception:
                            log.exception("a revocation subscriber's callback failed")
            except grpc.RpcError as exc:
                if not self._stop.is_set():
                    log.debug("relay subscription to %s dropped: %s", self.addr, exc)
            finally:
                self.connected = False
                self._call = None
            if self._stop.wait(wait):
                return
            wait = min(self.backoff[1], wait * 2)

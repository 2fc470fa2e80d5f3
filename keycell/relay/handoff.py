"""The revocation function's hand-over to its cell's local relay: one unary gRPC call,
`Relay.Submit(Revocation)`, after the revocation is committed to the cell's ledger.
A failure is not the caller's failure: the revocation already stands in this cell,
and the relay finds it in the ledger at its next anti-entropy round."""

from __future__ import annotations

from keycell.control_plane.revocations import RevocationRecord
from keycell.relay import tls as relay_tls
from keycell.relay._pb import relay_pb2_grpc as pb_grpc
from keycell.relay.node import rev_to_pb


class RelayHandoff:
    def __init__(self, addr: str, *, timeout: float = 1.0, tls: relay_tls.RelayTLS | None = None) -> None:
        """`tls`: this process's certificate (an API identity of its cell) for a relay with mTLS."""
        self.addr = addr
        self.tls = tls
        self.timeout = timeout
        self._channel = relay_tls.channel(addr, tls)
        self._stub = pb_grpc.RelayStub(self._channel)  # type: ignore[no-untyped-call]

    def __call__(self, rec: RevocationRecord) -> None:
        self._stub.Submit(rev_to_pb(rec), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

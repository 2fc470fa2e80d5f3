"""The SPIFFE Workload API (`SpiffeWorkloadAPI`) served over gRPC on a unix socket.

The message and service definitions are the generated stubs the `spiffe` package
ships (`spiffe._proto`), so the server speaks exactly what that client expects.
Every call must carry the `workload.spiffe.io: true` metadata (InvalidArgument
otherwise), comes from an attested caller (see `peercred`, `workload`), and is
answered only with identities whose registration entries match the caller's
selectors (PermissionDenied when none does). Streams send the full state first and
again on every change.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keycell.agent.agent import Agent
from keycell.agent.k8s import K8sAttestor
from keycell.agent.peercred import PeerCred, PeerRelay
from keycell.agent.workload import AttestationError, UnixAttestor
from keycell.client.errors import KeycellError
from keycell.control_plane.svid import JwtSvidError
from keycell.testing.processes import announce_ready

log = logging.getLogger("keycell.agent")

HEADER = ("workload.spiffe.io", "true")
STREAM_POLL = 1.0  # seconds between checks that a streaming caller is still there


def socket_path(address: str) -> str:
    """`unix:///run/agent.sock`, `unix:/run/agent.sock` or a bare path -> the path."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    elif "://" in address:
        raise ValueError("the agent serves the Workload API on a unix socket: unix:///PATH")
    else:
        path = address
    if not path.startswith("/"):
        raise ValueError("the socket path must be absolute: unix:///PATH")
    return path


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, agent: Agent, relay: PeerRelay, attestor: UnixAttestor, k8s: K8sAttestor | None = None
    ) -> None:
        self.agent = agent
        self.relay = relay
        self.attestor = attestor
        self.k8s = k8s

    # --- who is calling ------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    def _caller(self, context: grpc.ServicerContext) -> tuple[PeerCred, list[str]]:
        metadata = context.invocation_metadata() or ()
        if not any((m.key, m.value) == HEADER for m in metadata):
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        peer = self.relay.peer(context.peer())
        if peer is None:
            self._abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "the caller did not connect through the agent socket",
            )
        try:
            selectors = self.attestor.attest(peer)
            if self.k8s is not None:
                selectors += self.k8s.attest(peer.pid)
                self.attestor._same_process(peer)  # the cgroup read was still the caller's
        except AttestationError as exc:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, f"workload attestation failed: {exc}")
        return peer, selectors

    def _entries(self, context: grpc.ServicerContext, selectors: list[str]) -> list[dict[str, Any]]:
        entries = self.agent.entries_matching(selectors)
        if not entries:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        return entries

    def _still_there(self, context: grpc.ServicerContext, peer: PeerCred) -> bool:
        if not context.is_active():
            return False
        try:
            self.attestor._same_process(peer)
        except AttestationError:
            return False
        return True

    # --- X.509 ---------------------------------------------------------------------------

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer, selectors = self._caller(context)
        self._entries(context, selectors)
        last: object = None
        while self._still_there(context, peer):
            version = self.agent.version
            entries = self._entries(context, selectors)
            held = self.agent.x509_for(entries)
            roots = self.agent.x509_roots_der()
            state = (tuple((h.entry_id, h.serial) for h in held), roots)
            if held and state != last:
                last = state
                yield workload_pb2.X509SVIDResponse(
                    svids=[
                        workload_pb2.X509SVID(
                            spiffe_id=h.spiffe_id,
                            x509_svid=b"".join(h.chain_der),
                            x509_svid_key=h.key_der,
                            bundle=roots,
                        )
                        for h in held
                    ]
                )
            self.agent.wait_for_change(version, STREAM_POLL)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer, selectors = self._caller(context)
        self._entries(context, selectors)
        last = b""
        while self._still_there(context, peer):
            version = self.agent.version
            self._entries(context, selectors)
            roots = self.agent.x509_roots_der()
            if roots and roots != last:
                last = roots
                yield workload_pb2.X509BundlesResponse(bundles={self.agent.trust_domain: roots})
            self.agent.wait_for_change(version, STREAM_POLL)

    # --- JWT -----------------------------------------------------------------------------

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        _, selectors = self._caller(context)
        audience = [a for a in request.audience if a]
        if not audience:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        entries = self._entries(context, selectors)
        if request.spiffe_id:
            entries = [e for e in entries if e["spiffe_id"] == request.spiffe_id]
            if not entries:
                self._abort(
                    context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued for that SPIFFE ID"
                )
        svids = []
        for entry in entries:
            try:
                held = self.agent.jwt_for(entry, audience)
            except KeycellError as exc:
                self._abort(
                    context, grpc.StatusCode.UNAVAILABLE, f"could not mint a JWT-SVID: {type(exc).__name__}"
                )
            svids.append(workload_pb2.JWTSVID(spiffe_id=held.spiffe_id, svid=held.token))
        return workload_pb2.JWTSVIDResponse(svids=svids)

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        peer, selectors = self._caller(context)
        self._entries(context, selectors)
        last = b""
        while self._still_there(context, peer):
            version = self.agent.version
            self._entries(context, selectors)
            jwks = self.agent.jwks_bytes()
            if jwks != last:
                last = jwks
                yield workload_pb2.JWTBundlesResponse(bundles={self.agent.trust_domain: jwks})
            self.agent.wait_for_change(version, STREAM_POLL)

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        _, selectors = self._caller(context)
        if not request.audience:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        self._entries(context, selectors)
        try:
            checked = self.agent.validate_jwt(request.svid, request.audience)
        except JwtSvidError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        claims = struct_pb2.Struct()
        claims.update(checked.claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=checked.spiffe_id, claims=claims)


class AgentServer:
    """The agent and its Workload API, started and stopped together."""

    def __init__(
        self,
        socket: str,
        api_url: str,
        attestation: Mapping[str, Any],
        *,
        sync_interval: float = 5.0,
        kubelet_url: str = "",
    ) -> None:
        self.socket_path = socket_path(socket)
        self.k8s = K8sAttestor(kubelet_url) if kubelet_url else None
        self.agent = Agent(api_url, attestation, sync_interval=sync_interval)
        self.grpc: grpc.Server | None = None
        self.relay: PeerRelay | None = None
        self.port = 0  # the private gRPC port behind the relay

    def start(self) -> None:
        self.agent.start()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="workload-api"))
        port = self.port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.relay = PeerRelay(self.socket_path, port)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            WorkloadApi(self.agent, self.relay, UnixAttestor(), self.k8s), self.grpc
        )
        self.grpc.start()
        self.relay.start()

    def stop(self) -> None:
        self.agent.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.grpc is not None:
            self.grpc.stop(grace=0.5)


def run(
    socket: str,
    api_url: str,
    attestation: Mapping[str, Any],
    *,
    sync_interval: float = 5.0,
    kubelet_url: str = "",
) -> None:
    """`keycell agent`: serve until SIGTERM or SIGINT."""
    server = AgentServer(socket, api_url, attestation, sync_interval=sync_interval, kubelet_url=kubelet_url)
    server.start()
    log.warning("serving the Workload API on %s as %s", server.socket_path, server.agent.agent_id)
    announce_ready(server.port)  # the one way a Keycell process says it is up (keycell.testing.processes)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    os._exit(0)  # stream handler threads are blocked in waits; nothing left to flush

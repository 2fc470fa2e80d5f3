"""Mutual TLS for the relay mesh: relay <-> relay streams and calls, and a cell's API
processes -> their local relay.

Configuration: three PEMs, each given as a file path or inline (a value starting
with "-----BEGIN", as container secrets hand them over):
  KEYCELL_RELAY_TLS_CERT  this process's certificate (chain), with a SPIFFE URI SAN
  KEYCELL_RELAY_TLS_KEY   its private key
  KEYCELL_RELAY_TLS_CA    the mesh's CA bundle (the trust domain's roots)
  KEYCELL_RELAY_TLS_SERVER_NAME  optional: the name to check in relays' certificates
                          instead of the dialled host (when peers are dialled by an
                          address their certificates do not name)
All three or none; `keycell relay` takes the same as --tls-cert/--tls-key/--tls-ca.

Identities are SPIFFE IDs in the certificates' URI SAN:
  spiffe://<trust-domain>/keycell/relay/<cell>  a relay of <cell>
  spiffe://<trust-domain>/keycell/api/<cell>    an API process (or the revoke function) of <cell>
A relay's own certificate fixes its trust domain and must name its cell. Its server
requires a client certificate chaining to the CA bundle, then `Authorizer` checks the
caller's SPIFFE ID per method before the servicer runs: relay-to-relay methods
(Relay.Stream, the Cells replication calls) only from relays of the same trust domain;
the methods a cell's API processes call on their local relay (Submit, Subscribe,
Status; Cells Write, Written, Refresh, Claim, Handover) also from that cell's API
processes. Any other caller gets PERMISSION_DENIED; one without a certificate from the
bundle does not get through the handshake.

Without TLS, a relay listens and dials on loopback only (dev and tests); anything
else is refused at start with a message naming the settings.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509

ENV_CERT = "KEYCELL_RELAY_TLS_CERT"
ENV_KEY = "KEYCELL_RELAY_TLS_KEY"
ENV_CA = "KEYCELL_RELAY_TLS_CA"
ENV_SERVER_NAME = "KEYCELL_RELAY_TLS_SERVER_NAME"

RELAY = "relay"
API = "api"

# Relay-to-relay: only relays of the trust domain (any cell).
RELAY_METHODS = frozenset(
    {
        "/keycell.relay.v1.Relay/Stream",
        "/keycell.cells.v1.Cells/Directory",
        "/keycell.cells.v1.Cells/Push",
        "/keycell.cells.v1.Cells/Digest",
        "/keycell.cells.v1.Cells/DigestBuckets",
        "/keycell.cells.v1.Cells/Fetch",
        "/keycell.cells.v1.Cells/Reserve",
        "/keycell.cells.v1.Cells/Accept",
    }
)
# What a cell's API processes call on their local relay: relays, or that cell's API.
LOCAL_METHODS = frozenset(
    {
        "/keycell.relay.v1.Relay/Submit",
        "/keycell.relay.v1.Relay/Subscribe",
        "/keycell.relay.v1.Relay/Status",
        "/keycell.cells.v1.Cells/Forward",
        "/keycell.cells.v1.Cells/Written",
        "/keycell.cells.v1.Cells/Refresh",
        "/keycell.cells.v1.Cells/Claim",
        "/keycell.cells.v1.Cells/Handover",
    }
)


class TLSConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PeerId:
    trust_domain: str
    role: str  # RELAY or API
    cell: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/keycell/{self.role}/{self.cell}"

    @staticmethod
    def parse(uri: str) -> PeerId | None:
        """spiffe://TD/keycell/(relay|api)/CELL, or None for anything else."""
        if not uri.startswith("spiffe://"):
            return None
        td, _, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/")
        if not td or len(parts) != 3 or parts[0] != "keycell" or parts[1] not in (RELAY, API) or not parts[2]:
            return None
        return PeerId(td.lower(), parts[1], parts[2])


def uri_sans(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


@functools.lru_cache(maxsize=1024)
def identity_of(cert_pem: bytes) -> PeerId | None:
    """The keycell SPIFFE ID of a certificate (its single one; several: none)."""
    ids = [p for uri in uri_sans(cert_pem) if (p := PeerId.parse(uri)) is not None]
    return ids[0] if len(ids) == 1 else None


def _read_pem(value: str, what: str) -> bytes:
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"{what}: cannot read {value!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class RelayTLS:
    cert: bytes
    key: bytes = field(repr=False)
    ca: bytes
    identity: PeerId
    server_name: str = ""

    @classmethod
    def load(cls, cert: str, key: str, ca: str, server_name: str = "") -> RelayTLS:
        cert_pem = _read_pem(cert, ENV_CERT)
        key_pem = _read_pem(key, ENV_KEY)
        ca_pem = _read_pem(ca, ENV_CA)
        try:
            identity = identity_of(cert_pem)
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise TLSConfigError(f"relay TLS: not a PEM certificate: {exc}") from None
        if identity is None:
            raise TLSConfigError(
                f"{ENV_CERT}: the certificate needs one URI SAN spiffe://<trust-domain>/keycell/relay/<cell>"
                " (or .../keycell/api/<cell> for an API process)"
            )
        return cls(cert_pem, key_pem, ca_pem, identity, server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def from_env(env: Mapping[str, str] | None = None) -> RelayTLS | None:
    """The relay TLS settings in `env` (default os.environ); None when none are set."""
    env = os.environ if env is None else env
    values = [env.get(ENV_CERT, ""), env.get(ENV_KEY, ""), env.get(ENV_CA, "")]
    return from_values(*values, server_name=env.get(ENV_SERVER_NAME, ""))


def from_values(
    cert: str | None, key: str | None, ca: str | None, *, server_name: str = ""
) -> RelayTLS | None:
    given = [bool(v) for v in (cert, key, ca)]
    if not any(given):
        return None
    if not all(given):
        raise TLSConfigError(f"relay TLS needs all of {ENV_CERT}, {ENV_KEY} and {ENV_CA} (or none)")
    return RelayTLS.load(cert or "", key or "", ca or "", server_name)


@functools.lru_cache(maxsize=4096)
def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(addr: str) -> str:
    return addr.rpartition(":")[0] or addr


def require_loopback(addr: str, what: str) -> None:
    if not is_loopback(_host(addr)):
        raise TLSConfigError(
            f"{what} {addr}: plaintext is for loopback only; set {ENV_CERT}, {ENV_KEY} and {ENV_CA}"
            " (keycell relay --tls-cert/--tls-key/--tls-ca) for mutual TLS"
        )


def aio_channel(
    addr: str, tls: RelayTLS | None, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    opts = list(options or [])
    if tls is None:
        require_loopback(addr, "relay address")
        return grpc.aio.insecure_channel(addr, options=opts)
    return grpc.aio.secure_channel(addr, tls.channel_credentials(), options=opts + tls.channel_options())


def channel(addr: str, tls: RelayTLS | None, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    opts = list(options or [])
    if tls is None:
        require_loopback(addr, "relay address")
        return grpc.insecure_channel(addr, options=opts)
    return grpc.secure_channel(addr, tls.channel_credentials(), options=opts + tls.channel_options())


def peer_identity(context: grpc.aio.ServicerContext) -> PeerId | None:
    """The caller's keycell SPIFFE ID from its verified client certificate, if any."""
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        return None
    try:
        return identity_of(bytes(certs[0]))
    except ValueError:
        return None


def allowed(me: PeerId, peer: PeerId | None, method: str) -> bool:
    if peer is None or peer.trust_domain != me.trust_domain:
        return False
    if peer.role == RELAY:
        return method in RELAY_METHODS or method in LOCAL_METHODS  # a method added later: named first
    return peer.role == API and peer.cell == me.cell and method in LOCAL_METHODS


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks every call's peer identity (`allowed`) before its servicer runs."""

    def __init__(self, me: PeerId) -> None:
        self.me = me

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        me = self.me

        async def check(context: grpc.aio.ServicerContext) -> None:
            peer = peer_identity(context)
            if not allowed(me, peer, method):
                who = peer.uri if peer is not None else "a caller without a keycell SPIFFE ID"
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method}")

        return _guard(handler, check)


def _guard(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        kind, behavior = "unary_unary", handler.unary_unary
    elif handler.unary_stream is not None:
        kind, behavior = "unary_stream", handler.unary_stream
    elif handler.stream_unary is not None:
        kind, behavior = "stream_unary", handler.stream_unary
    else:
        kind, behavior = "stream_stream", handler.stream_stream
    guarded: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for item in behavior(request, context):
                yield item

        guarded = guarded_gen
    else:

        async def guarded_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await behavior(request, context)

        guarded = guarded_call
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )

"""The node agent's state: attested to the regional API, holding SVIDs for its entries.

The agent attests its node once (join token, AWS instance identity document,
Kubernetes projected token), then keeps, for every registration entry it may serve,
an X.509-SVID whose private key it generated itself (the cell only sees a CSR). It
renews each SVID at half its lifetime, give or take 10% (jitter, so that SVIDs issued
together do not all come due together), and at once when the authority that signed
it is tainted. JWT-SVIDs are minted on request and cached per (entry, audience) until
half-life. Every change bumps `version` and wakes the Workload API streams.

It syncs (entries, bundle, authorities, revocations) every `sync_interval` seconds;
a revoked SPIFFE ID's SVIDs are dropped at the next sync, and its JWT-SVIDs fail
validation.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keycell.client import Client
from keycell.client.errors import KeycellError, PermissionDenied
from keycell.client.model import Call
from keycell.control_plane.identity import selectors_match
from keycell.control_plane.revocations import spiffe_subject, svid_subject
from keycell.control_plane.svid import JwtSvidClaims, jwks_keys, validate_jwt_svid_with

log = logging.getLogger("keycell.agent")

JITTER = 0.10  # renew at half-life +/- 10%


def renewal_time(issued_at: float, expires_at: float, rng: random.Random) -> float:
    """When to renew an SVID: at half its lifetime, +/- 10% jitter."""
    half = (expires_at - issued_at) / 2
    return issued_at + half * (1 + rng.uniform(-JITTER, JITTER))


@dataclass(frozen=True)
class HeldX509:
    entry_id: str
    spiffe_id: str
    chain_der: tuple[bytes, ...]
    key_der: bytes  # PKCS#8
    authority: str
    serial: str
    issued_at: float
    expires_at: float
    renew_at: float


@dataclass(frozen=True)
class HeldJwt:
    spiffe_id: str
    token: str
    authority: str
    expires_at: float
    renew_at: float


class Agent:
    def __init__(
        self,
        api_url: str,
        attestation: Mapping[str, Any],
        *,
        sync_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.client = Client(api_url, timeout=10.0)
        self.attestation = dict(attestation)
        self.sync_interval = sync_interval
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.agent_id = ""
        self.trust_domain = ""
        self.entries: dict[str, dict[str, Any]] = {}
        self.bundle: dict[str, Any] = {"keys": []}
        self.authorities: dict[str, str] = {}
        self.revoked: frozenset[str] = frozenset()
        self.x509: dict[str, HeldX509] = {}
        self._jwts: dict[tuple[str, tuple[str, ...]], HeldJwt] = {}
        self.version = 0
        self.changed = threading.Condition()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token_renew_at = float("inf")

    # --- lifecycle ----------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.client.run(Call("POST", path, lambda b: b or {}, body, authenticated=False), retry=False)

    def attest(self) -> None:
        evidence = self.attestation
        if evidence.get("method") == "tpm" and "tcti" in evidence:
            from keycell.agent.tpm import tpm_attestation

            evidence = tpm_attestation(
                str(evidence["tcti"]),
                lambda areas: self._post("identity/attest/tpm-challenge", areas)["data"],
            )
        body = self._post("identity/attest", evidence)
        self.client.token = body["auth"]["client_token"]
        self._token_renew_at = self.clock() + float(body["auth"]["lease_duration"]) / 2
        self.agent_id = body["data"]["agent_id"]
        log.info("attested as %s", self.agent_id)

    def start(self) -> None:
        self.attest()
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="agent-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.changed:
            self.changed.notify_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = min((h.renew_at for h in self.x509.values()), default=float("inf"))
            wait = max(0.05, min(self.sync_interval, due - self.clock()))
            if self._stop.wait(wait):
                return
            try:
                self._keep_token()
                self.sync()
            except KeycellError as exc:
                log.warning(
                    "sync with the regional API failed (%s); keeping what is held", type(exc).__name__
                )
            except Exception:
                log.exception("agent sync failed")

    def _keep_token(self) -> None:
        """Renew the agent's token at half its lifetime; when it is gone (expired, revoked),
        attest again where the evidence can be shown again (not a one-time join token)."""
        if self.clock() < self._token_renew_at:
            return
        try:
            auth = self.client.request("POST", "auth/token/renew-self", {})["auth"]
            self._token_renew_at = self.clock() + float(auth["lease_duration"]) / 2
        except PermissionDenied:
            if self.attestation.get("method") == "join_token":
                raise
            self.attest()

    # --- syncing and issuing --------------------------------------------------------------

    def sync(self) -> None:
        data = self.client.request("GET", "identity/agent/sync")["data"]
        changed = False
        with self._lock:
            entries = {e["id"]: e for e in data["entries"]}
            if entries != self.entries:
                self.entries, changed = entries, True
            if data["bundle"]["keys"] != self.bundle.get("keys"):
                changed = True
            self.bundle = data["bundle"]
            self.trust_domain = data["trust_domain"]
            self.authorities = {a["id"]: a["state"] for a in data["authorities"]}
            revoked = frozenset(data["revoked"])
            if revoked != self.revoked:
                self.revoked, changed = revoked, True
            for entry_id in list(self.x509):
                if entry_id not in self.entries or self._is_revoked(self.x509[entry_id]):
                    del self.x509[entry_id]
                    changed = True
            self._jwts = {k: v for k, v in self._jwts.items() if k[0] in self.entries}
        if self._renew_due():
            changed = True
        if changed:
            self._bump()

    def _is_revoked(self, held: HeldX509) -> bool:
        return spiffe_subject(held.spiffe_id) in self.revoked or svid_subject(held.serial) in self.revoked

    def _renew_due(self) -> bool:
        now = self.clock()
        renewed = False
        for entry_id, entry in list(self.entries.items()):
            if spiffe_subject(entry["spiffe_id"]) in self.revoked:
                continue
            held = self.x509.get(entry_id)
            signer = self.authorities.get(held.authority) if held is not None else None
            # Renew when none is held, at the renewal time, or at once when the authority
            # that signed it is tainted (or gone).
            if held is not None and now < held.renew_at and signer in ("active", "old"):
                continue
            try:
                fresh = self._issue_x509(entry_id)
            except KeycellError as exc:
                log.warning("could not renew the SVID of entry %s (%s)", entry_id, type(exc).__name__)
                continue
            with self._lock:
                self.x509[entry_id] = fresh
            renewed = True
        return renewed

    def _issue_x509(self, entry_id: str) -> HeldX509:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .sign(key, hashes.SHA256())
        )
        body = {"entry_id": entry_id, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
        data = self.client.request("POST", "identity/agent/x509", body)["data"]
        chain = tuple(
            x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
            for pem in data["chain"]
        )
        issued_at = self.clock()
        expires_at = float(data["expires_at"])
        return HeldX509(
            entry_id,
            data["spiffe_id"],
            chain,
            key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            data["authority"],
            data["serial"],
            issued_at,
            expires_at,
            renewal_time(issued_at, expires_at, self.rng),
        )

    def _bump(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        with self.changed:
            if self.version == seen and not self._stop.is_set():
                self.changed.wait(timeout)
            return self.version

    # --- what the Workload API serves -------------------------------------------------------

    def entries_matching(self, selectors: list[str]) -> list[dict[str, Any]]:
        have = set(selectors)
        with self._lock:
            return [
                e
                for e in self.entries.values()
                if selectors_match(e["selectors"], have)
                and spiffe_subject(e["spiffe_id"]) not in self.revoked
            ]

    def x509_for(self, entries: list[dict[str, Any]]) -> list[HeldX509]:
        with self._lock:
            return [self.x509[e["id"]] for e in entries if e["id"] in self.x509]

    def x509_roots_der(self) -> bytes:
        with self._lock:
            out = b""
            for jwk in self.bundle.get("keys", []):
                if jwk.get("use") == "x509-svid":
                    out += b"".join(base64.b64decode(c) for c in jwk.get("x5c", []))
            return out

    def jwks_bytes(self) -> bytes:
        with self._lock:
            keys = [k for k in self.bundle.get("keys", []) if k.get("use") == "jwt-svid"]
        return json.dumps({"keys": keys}).encode()

    def jwt_for(self, entry: Mapping[str, Any], audience: list[str]) -> HeldJwt:
        key = (str(entry["id"]), tuple(sorted(audience)))
        now = self.clock()
        with self._lock:
            held = self._jwts.get(key)
            if (
                held is not None
                and now < held.renew_at
                and self.authorities.get(held.authority) not in ("tainted", "revoked")
            ):
                return held
        data = self.client.request(
            "POST", "identity/agent/jwt", {"entry_id": entry["id"], "audience": audience}
        )["data"]
        fresh = HeldJwt(
            data["spiffe_id"],
            data["token"],
            data["authority"],
            float(data["expires_at"]),
            renewal_time(now, float(data["expires_at"]), self.rng),
        )
        with self._lock:
            self._jwts[key] = fresh
        return fresh

    def validate_jwt(self, token: str, audience: str) -> JwtSvidClaims:
        with self._lock:
            keys = jwks_keys(self.bundle)
            revoked = self.revoked
            domain = self.trust_domain
        return validate_jwt_svid_with(
            token, audience, trust_domain=domain, keys=keys, now=self.clock(), is_revoked=revoked.__contains__
        )

"""Workload identity: registration entries, node attestation, and what agents may ask for.

- **Registration entries** map a parent ID and a selector set to a SPIFFE ID, with
  X.509 and JWT TTLs and the admin / downstream flags. An entry whose parent is the
  server (`spiffe://TD/keycell/server`) is a *node alias*: any agent whose attested
  selectors include all of the entry's selectors also answers for that alias, and so
  for the entries whose parent is the alias (SPIRE's model).
- **Node attestation** turns evidence into an agent ID and node selectors:
  a one-time *join token*; an *AWS instance identity document* whose signature
  checks against the configured certificate; a *Kubernetes projected service-account
  token* checked against the cluster's configured JWKS and audience. (TPM attestation
  is not offered: see the README.)
- An attested agent gets a Keycell token bound to its agent ID (policy
  `keycell-identity-agent`); with it the agent fetches the entries it may serve and
  asks the cell to sign SVIDs for them (`sign_x509` from a CSR, `sign_jwt`).
- **Revocation** of a SPIFFE ID (`spiffe:<id>`) or of one SVID (`svid:<jti>` /
  `svid:<serial hex>`) goes into the cell's grow-only revocation set; the API refuses
  them at login and signing, the agent at validation and issuance.

Storage, all through the barrier: entries at `Kind.IDENTITY_ENTRY` "entry/<id>",
join tokens at "join-token/<sha256>", attested agents at "agent/<agent id>", the
attestor configuration at `Kind.CONFIG` "identity/config".
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keycell.control_plane import tpm
from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied, Unavailable
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.revocations import SVID_ID, RevocationSet, spiffe_subject, svid_subject
from keycell.control_plane.storage import delete_current, get_json, put_json_current, put_json_if
from keycell.control_plane.svid import (
    DEFAULT_JWT_TTL,
    DEFAULT_X509_TTL,
    MAX_SVID_TTL,
    IdentityCA,
    JwtSvidClaims,
    SpiffeId,
    SvidError,
    validate_jwt_svid,
)

CONFIG_KEY = Key(Kind.CONFIG, "identity/config")
AGENT_POLICY = "keycell-identity-agent"
AGENT_POLICY_TEXT = (
    'path "identity/agent/*" {\n  capabilities = ["create", "update", "read"]\n}\n'
    'path "auth/token/renew-self" {\n  capabilities = ["update"]\n}\n'
)
AGENT_TOKEN_TTL = 24 * 3600
JOIN_TOKEN_DEFAULT_TTL = 600
MAX_SELECTORS = 32
_SELECTOR = re.compile(r"[a-z0-9_]{1,32}:[\x21-\x7e]{1,512}")
_ENTRY_ID = re.compile(r"[0-9a-f-]{36}")


def server_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/keycell/server"


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    x509_svid_ttl: int = DEFAULT_X509_TTL
    jwt_svid_ttl: int = DEFAULT_JWT_TTL
    admin: bool = False
    downstream: bool = False
    created_at: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spiffe_id": self.spiffe_id,
            "parent_id": self.parent_id,
            "selectors": list(self.selectors),
            "x509_svid_ttl": self.x509_svid_ttl,
            "jwt_svid_ttl": self.jwt_svid_ttl,
            "admin": self.admin,
            "downstream": self.downstream,
            "created_at": self.created_at,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Entry:
        return cls(
            str(r["id"]),
            str(r["spiffe_id"]),
            str(r["parent_id"]),
            tuple(r["selectors"]),
            int(r["x509_svid_ttl"]),
            int(r["jwt_svid_ttl"]),
            bool(r["admin"]),
            bool(r["downstream"]),
            float(r.get("created_at", 0.0)),
        )


@dataclass(frozen=True)
class AttestedAgent:
    agent_id: str
    method: str
    selectors: tuple[str, ...]
    attested_at: float = 0.0


def parse_selectors(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [s for s in value.split(",") if s.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequest("selectors: give at least one, as type:value (e.g. unix:uid:1000)")
    if len(value) > MAX_SELECTORS:
        raise InvalidRequest(f"selectors: at most {MAX_SELECTORS}")
    out = []
    for s in value:
        if not isinstance(s, str) or not _SELECTOR.fullmatch(s.strip()):
            raise InvalidRequest(
                "selectors are type:value, printable, at most 512 characters (e.g. unix:uid:1000)"
            )
        out.append(s.strip())
    return tuple(sorted(set(out)))


def _ttl(value: object, name: str, default: int) -> int:
    if value in (None, "", 0):
        return default
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SVID_TTL:
        raise InvalidRequest(f"{name} is 1 to {MAX_SVID_TTL} seconds")
    return value


def _bool(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean")
    return value


class Identity:
    """The trust domain's registration and attestation service for one cell."""

    def __init__(
        self,
        ledger: Ledger,
        ca: IdentityCA,
        revocations: RevocationSet,
        *,
        clock: Callable[[], float] = time.time,
        tokens: Any = None,
    ) -> None:
        self.ledger = ledger
        self.ca = ca
        self.revocations = revocations
        self.clock = clock
        self.tokens = tokens  # auth.token.store.TokenStore: revoking an identity revokes its logins
        # (region, instance id) -> the instance's tags, for aws_iid:tag: selectors
        # (adapters.identity.aws_ec2.Ec2InstanceTags, set by the wiring); None: no tag selectors.
        self.instance_tags: Callable[[str, str], Mapping[str, str]] | None = None

    @property
    def trust_domain(self) -> str:
        return self.ca.authorities().trust_domain

    def _spiffe_id(self, value: object, name: str) -> str:
        try:
            sid = SpiffeId.parse(value)
        except SvidError as exc:
            raise InvalidRequest(f"{name}: {exc}") from None
        if not sid.member_of(self.trust_domain):
            raise InvalidRequest(f"{name} must be in trust domain {self.trust_domain}")
        return str(sid)

    # --- attestor configuration -----------------------------------------------------------

    def write_config(self, data: Mapping[str, Any]) -> None:
        """aws_iid: {"cert_pem"}; k8s_psat: {"clusters": {name: {"jwks", "audience"}}}."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("the identity config is a JSON object")
        unknown = set(data) - {"aws_iid", "k8s_psat", "tpm"}
        if unknown:
            raise InvalidRequest(
                f"unknown identity config field(s): {', '.join(sorted(map(str, unknown)))[:200]}"
            )
        record: dict[str, Any] = {}
        aws = data.get("aws_iid")
        if aws is not None:
            if not isinstance(aws, Mapping) or not isinstance(aws.get("cert_pem"), str):
                raise InvalidRequest(
                    'aws_iid is {"cert_pem": "<PEM certificate that signs identity documents>"}'
                )
            try:
                x509.load_pem_x509_certificate(aws["cert_pem"].encode())
            except ValueError:
                raise InvalidRequest("aws_iid.cert_pem is not a PEM certificate") from None
            record["aws_iid"] = {"cert_pem": aws["cert_pem"]}
        k8s = data.get("k8s_psat")
        if k8s is not None:
            clusters = k8s.get("clusters") if isinstance(k8s, Mapping) else None
            if not isinstance(clusters, Mapping) or not clusters:
                raise InvalidRequest('k8s_psat is {"clusters": {"NAME": {"jwks": {...}, "audience": "..."}}}')
            out: dict[str, Any] = {}
            for name, cluster in clusters.items():
                if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9-]{1,63}", name):
                    raise InvalidRequest("k8s_psat cluster names are lower-case letters, digits and '-'")
                if not isinstance(cluster, Mapping) or not isinstance(cluster.get("jwks"), Mapping):
                    raise InvalidRequest(f"k8s_psat cluster {name}: give the service-account signer's jwks")
                try:
                    jwt.PyJWKSet.from_dict(dict(cluster["jwks"]))
                except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                    raise InvalidRequest(f"k8s_psat cluster {name}: jwks is not a valid JWKS") from None
                audience = cluster.get("audience") or "keycell"
                if not isinstance(audience, str):
                    raise InvalidRequest(f"k8s_psat cluster {name}: audience is a string")
                out[name] = {"jwks": dict(cluster["jwks"]), "audience": audience}
            record["k8s_psat"] = {"clusters": out}
        tpm_config = data.get("tpm")
        if tpm_config is not None:
            hashes_ = tpm_config.get("ek_hashes") if isinstance(tpm_config, Mapping) else None
            if not isinstance(hashes_, list) or not all(
                isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes_
            ):
                raise InvalidRequest('tpm is {"ek_hashes": ["<sha256 hex of an EK public key>", ...]}')
            record["tpm"] = {"ek_hashes": sorted(set(hashes_))}
        if not put_json_current(self.ledger, CONFIG_KEY, record):
            raise InvalidRequest("the identity config is being written concurrently; retry")

    def _config(self) -> dict[str, Any]:
        found = get_json(self.ledger, CONFIG_KEY)
        return {} if found is None else found[0]

    # --- registration entries ---------------------------------------------------------------

    def create_entry(self, data: Mapping[str, Any]) -> Entry:
        if not isinstance(data, Mapping):
            raise InvalidRequest("an entry is a JSON object")
        known = {
            "spiffe_id",
            "parent_id",
            "selectors",
            "x509_svid_ttl",
            "jwt_svid_ttl",
            "admin",
            "downstream",
        }
        unknown = set(data) - known
        if unknown:
            raise InvalidRequest(f"unknown entry field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        entry = Entry(
            str(uuid.uuid4()),
            self._spiffe_id(data.get("spiffe_id"), "spiffe_id"),
            self._spiffe_id(data.get("parent_id"), "parent_id"),
            parse_selectors(data.get("selectors")),
            _ttl(data.get("x509_svid_ttl"), "x509_svid_ttl", DEFAULT_X509_TTL),
            _ttl(data.get("jwt_svid_ttl"), "jwt_svid_ttl", DEFAULT_JWT_TTL),
            _bool(data.get("admin"), "admin"),
            _bool(data.get("downstream"), "downstream"),
            self.clock(),
        )
        if entry.spiffe_id == entry.parent_id:
            raise InvalidRequest("an entry's spiffe_id cannot be its own parent_id")
        for existing in self.list_entries():
            if (existing.spiffe_id, existing.parent_id, existing.selectors) == (
                entry.spiffe_id,
                entry.parent_id,
                entry.selectors,
            ):
                raise InvalidRequest(f"an identical entry exists ({existing.id})")
        put_json_if(self.ledger, Key(Kind.IDENTITY_ENTRY, f"entry/{entry.id}"), entry.to_record(), 0)
        return entry

    def get_entry(self, entry_id: str) -> Entry:
        if not isinstance(entry_id, str) or not _ENTRY_ID.fullmatch(entry_id):
            raise NotFound("no such entry")
        found = get_json(self.ledger, Key(Kind.IDENTITY_ENTRY, f"entry/{entry_id}"))
        if found is None:
            raise NotFound(f"no entry {entry_id}")
        return Entry.from_record(found[0])

    def delete_entry(self, entry_id: str) -> None:
        self.get_entry(entry_id)
        delete_current(self.ledger, Key(Kind.IDENTITY_ENTRY, f"entry/{entry_id}"))

    def list_entries(self) -> list[Entry]:
        return [
            Entry.from_record(json.loads(item.value))
            for item in iter_prefix(self.ledger, Kind.IDENTITY_ENTRY, "entry/", page_size=500)
        ]

    # --- node attestation -------------------------------------------------------------------

    def create_join_token(self, ttl: object = None) -> tuple[str, str]:
        """A one-time join token and the agent ID it will attest as."""
        seconds = _ttl(ttl, "ttl", JOIN_TOKEN_DEFAULT_TTL)
        token = secrets.token_urlsafe(24)
        digest = hashlib.sha256(token.encode()).hexdigest()
        agent_id = f"spiffe://{self.trust_domain}/keycell/agent/join_token/{digest[:32]}"
        put_json_if(
            self.ledger,
            Key(Kind.IDENTITY_ENTRY, f"join-token/{digest}"),
            {"agent_id": agent_id, "expires_at": int(self.clock()) + seconds},
            0,
            expires_at=int(self.clock()) + seconds,
        )
        return token, agent_id

    def attest(self, data: Mapping[str, Any]) -> AttestedAgent:
        """Check a node's evidence; the agent ID and its selectors, or PermissionDenied."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("attestation data is a JSON object")
        method = data.get("method")
        if method == "join_token":
            agent = self._attest_join_token(data.get("token"))
        elif method == "aws_iid":
            agent = self._attest_aws_iid(data.get("document"), data.get("signature"))
        elif method == "k8s_psat":
            agent = self._attest_k8s_psat(data.get("cluster"), data.get("token"))
        elif method == "tpm":
            agent = self._attest_tpm(data.get("challenge_id"), data.get("secret"))
        else:
            raise InvalidRequest("method is join_token, aws_iid, k8s_psat or tpm")
        if self.revocations.is_revoked(spiffe_subject(agent.agent_id)):
            raise PermissionDenied("this agent's SPIFFE ID has been revoked")
        record = {
            "agent_id": agent.agent_id,
            "method": agent.method,
            "selectors": list(agent.selectors),
            "attested_at": self.clock(),
        }
        if not put_json_current(self.ledger, Key(Kind.IDENTITY_ENTRY, f"agent/{agent.agent_id}"), record):
            # Not recorded, the agent could not use what it attested for: say so now.
            raise Unavailable("this agent's record kept changing while it attested; retry")
        return agent

    def _attest_join_token(self, token: object) -> AttestedAgent:
        if not isinstance(token, str) or not token or len(token) > 256:
            raise PermissionDenied("join token missing")
        digest = hashlib.sha256(token.encode()).hexdigest()
        key = Key(Kind.IDENTITY_ENTRY, f"join-token/{digest}")
        item = self.ledger.get(key, consistent=True)
        if item is None:
            raise PermissionDenied("the join token is unknown, expired or already used")
        try:
            self.ledger.delete_if(key, item.version)  # one use: whoever deletes it first wins
        except ConflictError:
            raise PermissionDenied("the join token is unknown, expired or already used") from None
        record = json.loads(item.value)
        if self.clock() >= record["expires_at"]:
            raise PermissionDenied("the join token is unknown, expired or already used")
        agent_id = str(record["agent_id"])
        return AttestedAgent(agent_id, "join_token", (f"join_token:{digest[:32]}",), self.clock())

    def tpm_challenge(self, data: Mapping[str, Any]) -> dict[str, str]:
        """First step of TPM attestation: a secret only the TPM holding both keys can read."""
        registered = (self._config().get("tpm") or {}).get("ek_hashes") or []
        if not registered:
            raise PermissionDenied("TPM attestation is not configured")
        try:
            ek = tpm.parse_public(base64.b64decode(str(data.get("ek_public", "")), validate=True))
            ak = tpm.parse_public(base64.b64decode(str(data.get("ak_public", "")), validate=True))
            tpm.check_endorsement_key(ek)
            tpm.check_attestation_key(ak)
        except (tpm.TpmError, ValueError) as exc:
            raise InvalidRequest(f"TPM public areas: {exc}") from None
        if ek.key_hash not in registered:
            raise PermissionDenied("this TPM's endorsement key is not registered")
        secret = secrets.token_bytes(32)
        blob, encrypted = tpm.make_credential(ek, ak.name, secret)
        challenge_id = str(uuid.uuid4())
        now = int(self.clock())
        put_json_if(
            self.ledger,
            Key(Kind.IDENTITY_ENTRY, f"tpm-challenge/{challenge_id}"),
            {"ek_hash": ek.key_hash, "secret": secret.hex(), "expires_at": now + 60},
            0,
            expires_at=now + 60,
        )
        return {
            "challenge_id": challenge_id,
            "credential_blob": base64.b64encode(blob).decode(),
            "encrypted_secret": base64.b64encode(encrypted).decode(),
        }

    def _attest_tpm(self, challenge_id: object, secret: object) -> AttestedAgent:
        if (
            not isinstance(challenge_id, str)
            or not _ENTRY_ID.fullmatch(challenge_id)
            or not isinstance(secret, str)
        ):
            raise PermissionDenied("give the challenge_id and the secret the TPM recovered")
        key = Key(Kind.IDENTITY_ENTRY, f"tpm-challenge/{challenge_id}")
        item = self.ledger.get(key, consistent=True)
        if item is None:
            raise PermissionDenied("the TPM challenge is unknown, expired or already answered")
        try:
            self.ledger.delete_if(key, item.version)  # one answer per challenge
        except ConflictError:
            raise PermissionDenied("the TPM challenge is unknown, expired or already answered") from None
        record = json.loads(item.value)
        try:
            answer = base64.b64decode(secret, validate=True)
        except ValueError:
            answer = b""
        if self.clock() >= record["expires_at"] or not hmac.compare_digest(
            answer, bytes.fromhex(record["secret"])
        ):
            raise PermissionDenied("the TPM did not recover the challenge's secret")
        ek_hash = str(record["ek_hash"])
        agent_id = f"spiffe://{self.trust_domain}/keycell/agent/tpm/{ek_hash}"
        return AttestedAgent(agent_id, "tpm", (f"tpm:ek_hash:{ek_hash}",), self.clock())

    def _attest_aws_iid(self, document: object, signature: object) -> AttestedAgent:
        config = self._config().get("aws_iid")
        if config is None:
            raise PermissionDenied("AWS instance identity attestation is not configured")
        if not isinstance(document, str) or not isinstance(signature, str) or len(document) > 8192:
            raise PermissionDenied("give the instance identity document and its base64 signature")
        cert = x509.load_pem_x509_certificate(config["cert_pem"].encode())
        public = cert.public_key()
        try:
            raw = base64.b64decode(signature, validate=True)
            if not isinstance(public, rsa.RSAPublicKey):
                raise InvalidSignature
            public.verify(raw, document.encode(), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            raise PermissionDenied("the instance identity document's signature does not verify") from None
        try:
            doc = json.loads(document)
            account, region, instance = str(doc["accountId"]), str(doc["region"]), str(doc["instanceId"])
        except (ValueError, KeyError, TypeError):
            raise PermissionDenied(
                "the instance identity document lacks accountId, region or instanceId"
            ) from None
        for part in (account, region, instance):
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", part):
                raise PermissionDenied("the instance identity document holds malformed fields")
        selectors = [
            f"aws_iid:account:{account}",
            f"aws_iid:region:{region}",
            f"aws_iid:instance_id:{instance}",
        ]
        for name in ("availabilityZone", "instanceType", "imageId"):
            if isinstance(doc.get(name), str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", doc[name]):
                selectors.append(f"aws_iid:{name.lower()}:{doc[name]}")
        if self.instance_tags is not None:  # the document carries no tags: EC2 is asked
            for k, v in sorted(self.instance_tags(region, instance).items()):
                selectors.append(f"aws_iid:tag:{k}:{v}")
        agent_id = f"spiffe://{self.trust_domain}/keycell/agent/aws_iid/{account}/{region}/{instance}"
        return AttestedAgent(agent_id, "aws_iid", tuple(sorted(selectors)), self.clock())

    def _attest_k8s_psat(self, cluster: object, token: object) -> AttestedAgent:
        clusters = (self._config().get("k8s_psat") or {}).get("clusters") or {}
        if not isinstance(cluster, str) or cluster not in clusters:
            raise PermissionDenied("Kubernetes attestation is not configured for that cluster")
        if not isinstance(token, str) or len(token) > 16384:
            raise PermissionDenied("give the projected service-account token")
        settings = clusters[cluster]
        try:
            header = jwt.get_unverified_header(token)
            keys = jwt.PyJWKSet.from_dict(settings["jwks"])
            kid = header.get("kid")
            candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
            if not candidates:
                raise PermissionDenied("the service-account token's kid is not in the cluster's JWKS")
            claims = None
            for candidate in candidates:
                try:
                    claims = jwt.decode(
                        token,
                        key=candidate.key,
                        algorithms=["RS256", "ES256"],
                        audience=settings["audience"],
                        options={"require": ["exp", "aud", "sub"]},
                    )
                    break
                except jwt.InvalidSignatureError:
                    continue
            if claims is None:
                raise PermissionDenied("the service-account token's signature does not verify")
        except jwt.ExpiredSignatureError:
            raise PermissionDenied("the service-account token has expired") from None
        except jwt.InvalidAudienceError:
            raise PermissionDenied("the service-account token's audience is not the configured one") from None
        except jwt.PyJWTError:
            raise PermissionDenied("the service-account token is not valid") from None
        k8s: Any = claims.get("kubernetes.io")
        try:
            namespace = str(k8s["namespace"])
            sa = str(k8s["serviceaccount"]["name"])
            pod = str(k8s["pod"]["name"])
            node = k8s.get("node") or {}
            node_name, node_uid = str(node.get("name", "")), str(node.get("uid", ""))
        except (TypeError, KeyError):
            raise PermissionDenied(
                "the service-account token lacks the kubernetes.io claims of a projected token"
            ) from None
        if not node_uid or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", node_uid):
            raise PermissionDenied(
                "the service-account token names no node (use a projected token bound to a pod)"
            )
        selectors = [
            f"k8s_psat:cluster:{cluster}",
            f"k8s_psat:agent_ns:{namespace}",
            f"k8s_psat:agent_sa:{sa}",
            f"k8s_psat:agent_pod_name:{pod}",
            f"k8s_psat:agent_node_name:{node_name}",
        ]
        agent_id = f"spiffe://{self.trust_domain}/keycell/agent/k8s_psat/{cluster}/{node_uid}"
        return AttestedAgent(agent_id, "k8s_psat", tuple(sorted(selectors)), self.clock())

    def agent(self, agent_id: str) -> AttestedAgent:
        if self.revocations.is_revoked(spiffe_subject(agent_id)):
            raise PermissionDenied("this agent's SPIFFE ID has been revoked")
        found = get_json(self.ledger, Key(Kind.IDENTITY_ENTRY, f"agent/{agent_id}"))
        if found is None:
            raise PermissionDenied("this agent has not attested")
        r = found[0]
        return AttestedAgent(
            str(r["agent_id"]), str(r["method"]), tuple(r["selectors"]), float(r["attested_at"])
        )

    # --- what an agent may serve --------------------------------------------------------------

    def entries_for(self, agent: AttestedAgent) -> list[Entry]:
        """Entries the agent may issue SVIDs for: those whose parent is the agent or one of
        the node aliases its selectors satisfy."""
        entries = self.list_entries()
        server = server_id(self.trust_domain)
        node_selectors = set(agent.selectors)
        parents = {agent.agent_id}
        for e in entries:
            if e.parent_id == server and selectors_match(e.selectors, node_selectors):
                parents.add(e.spiffe_id)
        return [e for e in entries if e.parent_id in parents and e.parent_id != server]

    def _entry_for(self, agent: AttestedAgent, entry_id: str) -> Entry:
        for e in self.entries_for(agent):
            if e.id == entry_id:
                if self.revocations.is_revoked(spiffe_subject(e.spiffe_id)):
                    raise PermissionDenied(f"{e.spiffe_id} has been revoked")
                return e
        raise PermissionDenied("this agent is not authorized for that entry")

    def sync(self, agent: AttestedAgent) -> dict[str, Any]:
        state = self.ca.authorities()
        entries = self.entries_for(agent)
        return {
            "agent_id": agent.agent_id,
            "trust_domain": state.trust_domain,
            "entries": [e.to_record() for e in entries],
            "bundle": state.bundle(),
            "authorities": [{"id": a.id, "state": a.state.value} for a in state.authorities],
            "revoked": self.revoked_subjects(),
        }

    def revoked_subjects(self) -> list[str]:
        out: list[str] = []
        for prefix in (spiffe_subject(""), svid_subject("")):
            out.extend(
                item.key.path
                for item in iter_prefix(self.revocations.ledger, Kind.REVOCATION, prefix, page_size=500)
            )
        return out

    def sign_x509(self, agent: AttestedAgent, entry_id: str, csr_pem: object) -> dict[str, Any]:
        entry = self._entry_for(agent, entry_id)
        if not isinstance(csr_pem, str) or len(csr_pem) > 16384:
            raise InvalidRequest("csr is a PEM certificate signing request")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise InvalidRequest("csr is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise InvalidRequest("the CSR's signature does not verify (proof of possession failed)")
        try:
            issued = self.ca.sign_x509(entry.spiffe_id, csr.public_key(), entry.x509_svid_ttl)
        except SvidError as exc:
            raise InvalidRequest(str(exc)) from None
        return {
            "entry_id": entry.id,
            "spiffe_id": issued.spiffe_id,
            "chain": [c.public_bytes(serialization.Encoding.PEM).decode() for c in issued.chain],
            "authority": issued.authority_id,
            "serial": format(issued.serial, "x"),
            "expires_at": issued.expires_at,
        }

    def sign_jwt(self, agent: AttestedAgent, entry_id: str, audience: object) -> dict[str, Any]:
        entry = self._entry_for(agent, entry_id)
        if isinstance(audience, str):
            audience = [audience]
        if (
            not isinstance(audience, list)
            or not audience
            or not all(isinstance(a, str) and a for a in audience)
        ):
            raise InvalidRequest("audience is a non-empty list of strings (a JWT-SVID needs one)")
        try:
            issued = self.ca.sign_jwt(entry.spiffe_id, audience, entry.jwt_svid_ttl)
        except SvidError as exc:
            raise InvalidRequest(str(exc)) from None
        return {
            "entry_id": entry.id,
            "spiffe_id": issued.spiffe_id,
            "token": issued.token,
            "authority": issued.authority_id,
            "expires_at": issued.expires_at,
        }

    # --- validation and revocation --------------------------------------------------------------

    def validate_jwt(self, token: object, audience: str) -> JwtSvidClaims:
        return validate_jwt_svid(
            token, audience, self.ca.authorities(), now=self.clock(), is_revoked=self.revocations.is_revoked
        )

    def revoke(self, *, spiffe_id: object = None, svid: object = None) -> str:
        """Revoke a SPIFFE ID (every SVID for it, now and later) or one SVID (its jti or
        X.509 serial in hex). Returns the revocation subject."""
        if spiffe_id is not None:
            try:
                subject = spiffe_subject(SpiffeId.parse(spiffe_id))
            except SvidError as exc:
                raise InvalidRequest(f"spiffe_id: {exc}") from None
        elif isinstance(svid, str) and SVID_ID.fullmatch(svid):
            subject = svid_subject(svid)
        else:
            raise InvalidRequest(
                "give spiffe_id, or svid (a JWT-SVID's jti or an X.509-SVID's serial in hex)"
            )
        self.revocations.revoke(subject, reason="identity revoke")
        if self.tokens is not None:
            for item in list(
                iter_prefix(self.ledger, Kind.IDENTITY_ENTRY, f"login/{subject}/", page_size=500)
            ):
                self.tokens.revoke_accessor(item.key.path.rsplit("/", 1)[1])
        return subject

    def record_login(self, svid: JwtSvidClaims, token: Any) -> None:
        """Remember that `token` (a TokenEntry) was issued for this JWT-SVID, under its SPIFFE
        ID and its jti, so that revoking either revokes the token too."""
        expires = int(token.expire_time) if token.expire_time is not None else None
        subjects = [spiffe_subject(svid.spiffe_id)]
        jti = svid.claims.get("jti")
        if isinstance(jti, str) and SVID_ID.fullmatch(jti):
            subjects.append(svid_subject(jti))
        for subject in subjects:
            key = Key(Kind.IDENTITY_ENTRY, f"login/{subject}/{token.accessor}")
            with contextlib.suppress(ConflictError):
                put_json_if(self.ledger, key, {"accessor": token.accessor}, 0, expires_at=expires)


def selectors_match(entry_selectors: Iterable[str], workload_selectors: Iterable[str]) -> bool:
    """An entry applies to a workload when every one of its selectors was attested."""
    return set(entry_selectors) <= set(workload_selectors)

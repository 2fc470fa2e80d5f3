"""SVIDs: the trust domain's signing authorities, and the X.509- and JWT-SVIDs they sign.

Every private key lives in the cell's `KeyBackend` (an HSM, a KMS, or the software
backend in development); this module only ever asks it to sign a SHA-256 digest.

- The **root** is a self-signed CA per cell (EC P-256, ten years); it is the trust
  anchor that the X.509 bundle carries.
- An **authority** is a pair of keys that sign SVIDs: an X.509 intermediate CA
  (certified by the root; the chain every X.509-SVID carries) and a JWT signing key.
  Authorities move through `prepared` -> `active` -> `old`, and an old one may be
  `tainted` (its SVIDs must be re-issued at once) and finally `revoked` (dropped from
  the bundle). Exactly one authority is active at a time.
- The **bundle** is a JWKS (RFC 7517) as SPIFFE's trust domain bundle format has it:
  `x509-svid` keys carry the root certificates in `x5c`, `jwt-svid` keys carry a
  `kid`; `spiffe_sequence` grows on every change, `spiffe_refresh_hint` says how often
  to look again.

JWT-SVIDs are `{"alg", "kid", "typ": "JWT"}` headers over `sub` (the SPIFFE ID),
`aud` (required, a list), `exp`, `iat` and `jti`. `validate_jwt_svid` refuses each
way a token can be wrong with its own message (see `JwtSvidError`). X.509-SVIDs hold
exactly one URI SAN, a critical key usage (digitalSignature), basic constraints with
CA false, and are checked the same way by `verify_x509_svid`.

State is one record in the ledger (through the barrier), `Kind.CONFIG`
"identity/authorities", changed only by conditional writes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.keys import KeyBackend, KeyExistsError, KeySpec
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger
from keycell.control_plane.revocations import spiffe_subject, svid_subject
from keycell.control_plane.storage import get_json, put_json_if
from keycell.control_plane.x509sign import CA_KEY_USAGE, sign_certificate

AUTHORITIES_KEY = Key(Kind.CONFIG, "identity/authorities")
DEFAULT_JWT_TTL = 5 * 60  # the 5-minute JWT-SVID the SPIFFE ecosystem expects
DEFAULT_X509_TTL = 60 * 60
MAX_SVID_TTL = 7 * 24 * 3600
ROOT_TTL = 10 * 365 * 24 * 3600
AUTHORITY_TTL = 30 * 24 * 3600
REFRESH_HINT = 60  # seconds; agents look for a new bundle at least this often
# The JWS algorithms the JWT-SVID specification allows (asymmetric only).
JWT_SVID_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
JWT_HEADER_FIELDS = frozenset({"alg", "kid", "typ"})
# Seconds of clock difference tolerated on exp / nbf / iat when validating.
CLOCK_LEEWAY = 30

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class AuthorityState(StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"
    TAINTED = "tainted"
    REVOKED = "revoked"


class SvidError(ValueError):
    """An SVID or its request is malformed or refused."""


class JwtSvidError(SvidError):
    """A JWT-SVID failed validation; the message names the check."""


class X509SvidError(SvidError):
    """An X.509-SVID failed validation; the message names the check."""


# --- SPIFFE IDs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/a/b"

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, text: object) -> SpiffeId:
        """A SPIFFE ID as the SPIFFE-ID specification defines it, or SvidError."""
        if not isinstance(text, str) or not text.startswith("spiffe://") or len(text) > 2048:
            raise SvidError("a SPIFFE ID looks like spiffe://trust-domain/path")
        rest = text[len("spiffe://") :]
        domain, slash, path = rest.partition("/")
        if not _TRUST_DOMAIN.fullmatch(domain):
            raise SvidError("a SPIFFE ID's trust domain is lower-case letters, digits, '.', '-' and '_'")
        if slash:
            segments = path.split("/")
            for segment in segments:
                if not segment or segment in (".", "..") or not _PATH_SEGMENT.fullmatch(segment):
                    raise SvidError(
                        "a SPIFFE ID's path segments are non-empty letters, digits, '.', '-' and '_' "
                        "(not '.' or '..')"
                    )
            return cls(domain, "/" + path)
        return cls(domain, "")

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


def check_trust_domain(name: object) -> str:
    if not isinstance(name, str) or not _TRUST_DOMAIN.fullmatch(name):
        raise InvalidRequest(
            "a trust domain is lower-case letters, digits, '.', '-' and '_' (e.g. example.org)"
        )
    return name


# --- small encoders -----------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _kid(public_key_pem: bytes) -> str:
    public = serialization.load_pem_public_key(public_key_pem)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url(hashlib.sha256(spki).digest()[:18])


def _public_jwk(public_key_pem: bytes) -> dict[str, Any]:
    public = serialization.load_pem_public_key(public_key_pem)
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(size, "big")),
            "y": b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
        }
    raise SvidError("only EC P-256 and RSA keys sign JWT-SVIDs")


# --- authorities --------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    id: str  # "a1", "a2", ...
    state: AuthorityState
    x509_key: str  # key names in the key backend
    jwt_key: str
    jwt_alg: str
    jwt_kid: str
    jwt_public_pem: str
    cert_pem: str  # the intermediate CA certificate (issued by the root)
    created_at: float
    not_after: float

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "x509_key": self.x509_key,
            "jwt_key": self.jwt_key,
            "jwt_alg": self.jwt_alg,
            "jwt_kid": self.jwt_kid,
            "jwt_public_pem": self.jwt_public_pem,
            "cert_pem": self.cert_pem,
            "created_at": self.created_at,
            "not_after": self.not_after,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Authority:
        return cls(
            str(r["id"]),
            AuthorityState(r["state"]),
            str(r["x509_key"]),
            str(r["jwt_key"]),
            str(r["jwt_alg"]),
            str(r["jwt_kid"]),
            str(r["jwt_public_pem"]),
            str(r["cert_pem"]),
            float(r["created_at"]),
            float(r["not_after"]),
        )

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())


@dataclass(frozen=True)
class AuthoritySet:
    trust_domain: str
    root_key: str
    root_pem: str
    sequence: int
    authorities: tuple[Authority, ...]

    @property
    def active(self) -> Authority:
        for a in self.authorities:
            if a.state is AuthorityState.ACTIVE:
                return a
        raise NotFound("the trust domain has no active authority")

    def by_id(self, authority_id: str) -> Authority:
        for a in self.authorities:
            if a.id == authority_id:
                return a
        raise NotFound(f"no authority {authority_id[:40]!r}")

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_pem.encode())

    def jwt_keys(self) -> dict[str, Authority]:
        """kid -> authority, for every authority whose key is in the bundle."""
        return {a.jwt_kid: a for a in self.authorities if a.state is not AuthorityState.REVOKED}

    def bundle(self) -> dict[str, Any]:
        """The trust domain bundle as a SPIFFE JWKS."""
        keys: list[dict[str, Any]] = [
            {
                "use": "x509-svid",
                **_public_jwk(
                    self.root.public_key().public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                ),
                "x5c": [base64.b64encode(self.root.public_bytes(serialization.Encoding.DER)).decode()],
            }
        ]
        for a in self.authorities:
            if a.state is AuthorityState.REVOKED:
                continue  # a prepared key is published ahead of use, so every verifier has it in time
            keys.append(
                {
                    "use": "jwt-svid",
                    "kid": a.jwt_kid,
                    "alg": a.jwt_alg,
                    **_public_jwk(a.jwt_public_pem.encode()),
                }
            )
        return {"keys": keys, "spiffe_sequence": self.sequence, "spiffe_refresh_hint": REFRESH_HINT}

    def jwks_bytes(self) -> bytes:
        """The JWT part of the bundle as the Workload API sends it (a JWKS with kids)."""
        keys = [k for k in self.bundle()["keys"] if k["use"] == "jwt-svid"]
        return json.dumps({"keys": keys}).encode()

    def x509_roots_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    def to_record(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "root_key": self.root_key,
            "root_pem": self.root_pem,
            "sequence": self.sequence,
            "authorities": [a.to_record() for a in self.authorities],
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> AuthoritySet:
        return cls(
            str(r["trust_domain"]),
            str(r["root_key"]),
            str(r["root_pem"]),
            int(r["sequence"]),
            tuple(Authority.from_record(a) for a in r["authorities"]),
        )


@dataclass(frozen=True)
class IssuedX509:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]  # leaf, intermediate
    authority_id: str
    serial: int
    expires_at: float


@dataclass(frozen=True)
class IssuedJwt:
    spiffe_id: str
    token: str
    authority_id: str
    jti: str
    expires_at: float


class IdentityCA:
    """The trust domain's certificate and JWT authority for one cell."""

    def __init__(
        self,
        ledger: Ledger,
        keys: KeyBackend,
        *,
        cell_id: str = "local",
        trust_domain: str = "example.org",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.keys = keys
        self.cell_id = cell_id
        self.default_trust_domain = check_trust_domain(trust_domain)
        self.clock = clock
        self._cache: tuple[int, AuthoritySet] | None = None

    # --- state -------------------------------------------------------------------------

    def _load(self) -> tuple[AuthoritySet, int] | None:
        found = get_json(self.ledger, AUTHORITIES_KEY)
        if found is None:
            return None
        record, version = found
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1], version
        state = AuthoritySet.from_record(record)
        self._cache = (version, state)
        return state, version

    def authorities(self) -> AuthoritySet:
        """The current authorities, creating the root and a first active authority on first use."""
        found = self._load()
        if found is not None:
            return found[0]
        return self.ensure()

    def ensure(self) -> AuthoritySet:
        found = self._load()
        if found is not None:
            return found[0]
        domain = check_trust_domain(self.default_trust_domain)
        token = uuid.uuid4().hex[:8]
        root_key = f"spiffe-root-{token}"
        self._create_key(root_key)
        root = self._root_certificate(root_key, domain)
        state = AuthoritySet(domain, root_key, root.public_bytes(serialization.Encoding.PEM).decode(), 1, ())
        first = self._new_authority(state, "a1", AuthorityState.ACTIVE)
        state = AuthoritySet(domain, root_key, state.root_pem, 1, (first,))
        # Another process may have set the trust domain up first; its keys win.
        with contextlib.suppress(ConflictError):
            put_json_if(self.ledger, AUTHORITIES_KEY, state.to_record(), 0)
        loaded = self._load()
        assert loaded is not None
        return loaded[0]

    def _change(self, change: Callable[[AuthoritySet], AuthoritySet]) -> AuthoritySet:
        for _ in range(8):
            self.authorities()
            found = self._load()
            assert found is not None
            state, version = found
            new = change(state)
            new = AuthoritySet(
                new.trust_domain, new.root_key, new.root_pem, state.sequence + 1, new.authorities
            )
            try:
                put_json_if(self.ledger, AUTHORITIES_KEY, new.to_record(), version)
                return new
            except ConflictError:
                continue
        raise InvalidRequest("the authorities were changed concurrently; retry")

    # --- rotation: prepare -> activate -> taint -> revoke ---------------------------------

    def prepare(self) -> Authority:
        """A new authority in the `prepared` state (its keys made, not yet signing)."""
        state = self.authorities()
        if any(a.state is AuthorityState.PREPARED for a in state.authorities):
            raise InvalidRequest("an authority is already prepared; activate it first")
        number = 1 + max(int(a.id[1:]) for a in state.authorities)
        fresh = self._new_authority(state, f"a{number}", AuthorityState.PREPARED)

        def add(s: AuthoritySet) -> AuthoritySet:
            if any(a.state is AuthorityState.PREPARED for a in s.authorities):
                raise InvalidRequest("an authority is already prepared; activate it first")
            return AuthoritySet(s.trust_domain, s.root_key, s.root_pem, s.sequence, (*s.authorities, fresh))

        self._change(add)
        return fresh

    def activate(self) -> Authority:
        """The prepared authority becomes active; the active one becomes old."""

        def swap(s: AuthoritySet) -> AuthoritySet:
            if not any(a.state is AuthorityState.PREPARED for a in s.authorities):
                raise InvalidRequest("no authority is prepared; prepare one first")
            out = []
            for a in s.authorities:
                if a.state is AuthorityState.ACTIVE:
                    a = _with_state(a, AuthorityState.OLD)
                elif a.state is AuthorityState.PREPARED:
                    a = _with_state(a, AuthorityState.ACTIVE)
                out.append(a)
            return AuthoritySet(s.trust_domain, s.root_key, s.root_pem, s.sequence, tuple(out))

        return self._change(swap).active

    def taint(self, authority_id: str) -> Authority:
        """Mark an old authority tainted: every SVID it signed must be re-issued now."""
        return self._set_state(authority_id, AuthorityState.OLD, AuthorityState.TAINTED)

    def revoke(self, authority_id: str) -> Authority:
        """Drop a tainted authority from the bundle: what it signed no longer validates."""
        return self._set_state(authority_id, AuthorityState.TAINTED, AuthorityState.REVOKED)

    def _set_state(self, authority_id: str, before: AuthorityState, after: AuthorityState) -> Authority:
        def change(s: AuthoritySet) -> AuthoritySet:
            target = s.by_id(authority_id)
            if target.state is not before:
                raise InvalidRequest(
                    f"authority {authority_id} is {target.state.value}; only an {before.value} authority can become {after.value}"
                )
            return AuthoritySet(
                s.trust_domain,
                s.root_key,
                s.root_pem,
                s.sequence,
                tuple(_with_state(a, after) if a.id == authority_id else a for a in s.authorities),
            )

        return self._change(change).by_id(authority_id)

    # --- keys and CA certificates ---------------------------------------------------------

    def _create_key(self, name: str) -> None:
        with contextlib.suppress(KeyExistsError):
            self.keys.create_key(name, KeySpec.EC_P256)

    def _sign_cert(self, builder: x509.CertificateBuilder, key_name: str) -> x509.Certificate:
        return sign_certificate(builder, self.keys, key_name)

    def _root_certificate(self, key_name: str, domain: str) -> x509.Certificate:
        public = serialization.load_pem_public_key(self.keys.public_key(key_name))
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Keycell"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{domain} root ({self.cell_id})"),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=60))
            .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{domain}")]),
                critical=False,
            )
        )
        return self._sign_cert(builder, key_name)

    def _new_authority(self, state: AuthoritySet, authority_id: str, initial: AuthorityState) -> Authority:
        suffix = uuid.uuid4().hex[:8]
        x509_key = f"spiffe-x509-{authority_id}-{suffix}"
        jwt_key = f"spiffe-jwt-{authority_id}-{suffix}"
        self._create_key(x509_key)
        self._create_key(jwt_key)
        root = state.root
        public = serialization.load_pem_public_key(self.keys.public_key(x509_key))
        now = self.clock()
        not_after = now + AUTHORITY_TTL
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Keycell"),
                        x509.NameAttribute(
                            NameOID.COMMON_NAME,
                            f"{state.trust_domain} {self.cell_id} intermediate {authority_id}",
                        ),
                    ]
                )
            )
            .issuer_name(root.subject)
            .public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(not_after, datetime.UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{state.trust_domain}")]
                ),
                critical=False,
            )
        )
        cert = self._sign_cert(builder, state.root_key)
        jwt_pem = self.keys.public_key(jwt_key)
        return Authority(
            authority_id,
            initial,
            x509_key,
            jwt_key,
            "ES256",
            _kid(jwt_pem),
            jwt_pem.decode(),
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            now,
            not_after,
        )

    # --- issuing --------------------------------------------------------------------------

    def sign_x509(self, spiffe_id: str, public_key: object, ttl: int = DEFAULT_X509_TTL) -> IssuedX509:
        """An X.509-SVID for `public_key` (the workload keeps its private key)."""
        state = self.authorities()
        sid = SpiffeId.parse(spiffe_id)
        if not sid.member_of(state.trust_domain):
            raise SvidError(f"{spiffe_id} is not in trust domain {state.trust_domain}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise SvidError("an X.509-SVID certifies an EC or RSA public key")
        ttl = _ttl(ttl, DEFAULT_X509_TTL)
        authority = state.active
        intermediate = authority.certificate
        now = self.clock()
        expires = min(now + ttl, authority.not_after)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(intermediate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(datetime.datetime.fromtimestamp(now - 10, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(expires, datetime.UTC))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(intermediate.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        leaf = self._sign_cert(builder, authority.x509_key)
        return IssuedX509(str(sid), (leaf, intermediate), authority.id, serial, expires)

    def sign_jwt(self, spiffe_id: str, audience: Sequence[str], ttl: int = DEFAULT_JWT_TTL) -> IssuedJwt:
        state = self.authorities()
        sid = SpiffeId.parse(spiffe_id)
        if not sid.member_of(state.trust_domain):
            raise SvidError(f"{spiffe_id} is not in trust domain {state.trust_domain}")
        audiences = [a for a in audience if isinstance(a, str) and a]
        if not audiences:
            raise SvidError("a JWT-SVID needs at least one audience")
        if len(audiences) > 32 or any(len(a) > 512 for a in audiences):
            raise SvidError("at most 32 audiences of at most 512 characters")
        ttl = _ttl(ttl, DEFAULT_JWT_TTL)
        authority = state.active
        now = int(self.clock())
        jti = uuid.uuid4().hex
        header = {"alg": authority.jwt_alg, "kid": authority.jwt_kid, "typ": "JWT"}
        claims = {"sub": str(sid), "aud": audiences, "exp": now + ttl, "iat": now, "jti": jti}
        signing_input = f"{_json_b64(header)}.{_json_b64(claims)}"
        der = self.keys.sign(authority.jwt_key, signing_input.encode()).value
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return IssuedJwt(str(sid), f"{signing_input}.{b64url(raw)}", authority.id, jti, now + ttl)


def _with_state(a: Authority, state: AuthorityState) -> Authority:
    return Authority.from_record({**a.to_record(), "state": state.value})


def _ttl(ttl: object, default: int) -> int:
    if ttl in (None, 0):
        return default
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_SVID_TTL:
        raise SvidError(f"an SVID's TTL is 1 to {MAX_SVID_TTL} seconds")
    return ttl


def _json_b64(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


# --- validation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JwtSvidClaims:
    spiffe_id: str
    claims: dict[str, Any]
    kid: str


def validate_jwt_svid(
    token: object,
    audience: str,
    state: AuthoritySet,
    *,
    now: float,
    is_revoked: Callable[[str], bool] = lambda _: False,
) -> JwtSvidClaims:
    """Check a JWT-SVID against this trust domain's authorities (see `validate_jwt_svid_with`)."""
    keys = {
        kid: serialization.load_pem_public_key(a.jwt_public_pem.encode())
        for kid, a in state.jwt_keys().items()
    }
    return validate_jwt_svid_with(
        token, audience, trust_domain=state.trust_domain, keys=keys, now=now, is_revoked=is_revoked
    )


def jwks_keys(jwks: Mapping[str, Any]) -> dict[str, Any]:
    """kid -> public key, from a JWKS (the `jwt-svid` keys of a bundle)."""
    out: dict[str, Any] = {}
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, Mapping) or jwk.get("use", "jwt-svid") != "jwt-svid" or not jwk.get("kid"):
            continue
        public = _jwk_public_key(jwk)
        if public is not None:
            out[str(jwk["kid"])] = public
    return out


def _jwk_public_key(jwk: Mapping[str, Any]) -> Any:
    try:
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            x = int.from_bytes(b64url_decode(jwk["x"]), "big")
            y = int.from_bytes(b64url_decode(jwk["y"]), "big")
            return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        if jwk.get("kty") == "RSA":
            n = int.from_bytes(b64url_decode(jwk["n"]), "big")
            e = int.from_bytes(b64url_decode(jwk["e"]), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
    except (KeyError, ValueError, TypeError):
        return None
    return None


def validate_jwt_svid_with(
    token: object,
    audience: str,
    *,
    trust_domain: str,
    keys: Mapping[str, Any],
    now: float,
    is_revoked: Callable[[str], bool] = lambda _: False,
) -> JwtSvidClaims:
    """Check a JWT-SVID against a trust domain's JWT keys (kid -> public key), or raise
    JwtSvidError naming the check that failed. Never echoes the token."""
    if not isinstance(token, str) or not token:
        raise JwtSvidError("missing JWT-SVID")
    if len(token) > 16 * 1024:
        raise JwtSvidError("the JWT-SVID is longer than 16384 characters")
    if not isinstance(audience, str) or not audience:
        raise JwtSvidError("an audience to validate against is required")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError("the JWT-SVID is malformed (expected header.payload.signature)")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise JwtSvidError("the JWT-SVID is malformed (a part is not base64url JSON)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtSvidError("the JWT-SVID's header and payload must be JSON objects")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise JwtSvidError('the JWT-SVID is unsigned (alg "none" is refused)')
    if alg.startswith("HS"):
        raise JwtSvidError(
            f"the JWT-SVID uses a symmetric algorithm ({alg}); only asymmetric signatures are accepted"
        )
    if alg not in JWT_SVID_ALGS:
        raise JwtSvidError("the JWT-SVID's algorithm is not one the JWT-SVID specification allows")
    missing = JWT_HEADER_FIELDS - set(header)
    if missing:
        raise JwtSvidError(f"the JWT-SVID's header lacks {', '.join(sorted(missing))}")
    extra = set(header) - JWT_HEADER_FIELDS
    if extra:
        raise JwtSvidError(
            f"the JWT-SVID's header has unexpected field(s): {', '.join(sorted(map(str, extra)))[:100]}"
        )
    if header["typ"] not in ("JWT", "JOSE"):
        raise JwtSvidError('the JWT-SVID\'s typ must be "JWT" or "JOSE"')
    kid = header["kid"]
    public = keys.get(kid) if isinstance(kid, str) else None
    if public is None:
        raise JwtSvidError("the JWT-SVID's kid names no key in the trust domain's bundle")
    if (alg.startswith("ES") and not isinstance(public, ec.EllipticCurvePublicKey)) or (
        alg[:2] in ("RS", "PS") and not isinstance(public, rsa.RSAPublicKey)
    ):
        raise JwtSvidError("the JWT-SVID's algorithm does not match its key's type")
    if alg not in ("ES256", "RS256"):
        raise JwtSvidError(
            f"the JWT-SVID's algorithm {alg} is not one this trust domain signs with (ES256, RS256)"
        )
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                raise InvalidSignature
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise InvalidSignature
    except InvalidSignature:
        raise JwtSvidError("the JWT-SVID's signature does not verify") from None

    sub = claims.get("sub")
    try:
        sid = SpiffeId.parse(sub)
    except SvidError:
        raise JwtSvidError("the JWT-SVID's sub is not a SPIFFE ID") from None
    if not sid.member_of(trust_domain):
        raise JwtSvidError(f"the JWT-SVID belongs to a foreign trust domain (not {trust_domain})")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
    if not audiences:
        raise JwtSvidError("the JWT-SVID has no audience (aud is required)")
    if audience not in audiences:
        raise JwtSvidError("the JWT-SVID's audience (aud) does not include the expected audience")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise JwtSvidError("the JWT-SVID has no expiry (exp)")
    if now > exp + CLOCK_LEEWAY:
        raise JwtSvidError("the JWT-SVID has expired (exp)")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JwtSvidError(f"the JWT-SVID's {name} is not a time")
        if value > now + CLOCK_LEEWAY:
            raise JwtSvidError(f"the JWT-SVID is not valid yet ({name} is in the future)")
    if is_revoked(spiffe_subject(sid)):
        raise JwtSvidError("the JWT-SVID's SPIFFE ID has been revoked")
    jti = claims.get("jti")
    if isinstance(jti, str) and is_revoked(svid_subject(jti)):
        raise JwtSvidError("the JWT-SVID has been revoked")
    return JwtSvidClaims(str(sid), claims, kid)


def verify_x509_svid(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], trust_domain: str, *, now: float
) -> str:
    """Check an X.509-SVID chain (leaf first) up to one of `roots`; the SPIFFE ID, or
    X509SvidError naming the check that failed."""
    if not chain:
        raise X509SvidError("the X.509-SVID chain is empty")
    leaf = chain[0]
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise X509SvidError("the X.509-SVID has no URI SAN") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise X509SvidError(f"an X.509-SVID holds exactly one URI SAN (this one has {len(uris)})")
    try:
        sid = SpiffeId.parse(uris[0])
    except SvidError:
        raise X509SvidError("the X.509-SVID's URI SAN is not a SPIFFE ID") from None
    if not sid.member_of(trust_domain):
        raise X509SvidError(f"the X.509-SVID belongs to a foreign trust domain (not {trust_domain})")
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise X509SvidError("an X.509-SVID leaf must not be a CA")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise X509SvidError("the X.509-SVID has no key usage") from None
    if not usage.critical or not usage.value.digital_signature or usage.value.key_cert_sign:
        raise X509SvidError(
            "the X.509-SVID's key usage must be critical, with digitalSignature and no keyCertSign"
        )
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise X509SvidError("a certificate in the X.509-SVID chain is expired or not yet valid")
    for child, parent in itertools.pairwise(chain):
        _check_issued(child, parent)
    top = chain[-1]
    for root in roots:
        if top == root:
            return str(sid)
        if top.issuer == root.subject:
            try:
                _check_issued(top, root)
                return str(sid)
            except X509SvidError:
                continue
    raise X509SvidError("the X.509-SVID does not chain to a CA in the trust domain's bundle")


def _check_issued(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        basic = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise X509SvidError("an issuer in the chain is not a CA") from None
    if not basic.ca:
        raise X509SvidError("an issuer in the chain is not a CA")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise X509SvidError("the X.509-SVID does not chain to a CA in the trust domain's bundle") from None

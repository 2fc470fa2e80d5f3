"""PKI: Vault's certificate authority engine, with the CA's private key held by the
cell's key backend (the HSM in production). The key never enters this process: every
certificate, CSR and CRL is built with `cryptography`, its to-be-signed bytes are
signed by the backend, and the signature is put in place by the same helpers the
X.509-SVID authorities use (`control_plane/svid.py`).

Vault endpoints served under a PKI mount (`pki/`, `pki_int/`, ... any path), one
method each; every method returns the `data` of Vault's response:

  POST   root/generate/internal        generate_root(data)          -> certificate, issuing_ca, serial_number, ...
  POST   intermediate/generate/internal generate_intermediate(data) -> csr, key_id
  POST   root/sign-intermediate        sign_intermediate(data)      -> certificate, issuing_ca, ca_chain, ...
  POST   intermediate/set-signed       set_signed(data)             -> imported_issuers
  GET    cert/ca, ca/pem, ca_chain     ca_pem(), chain_pem()        -> the CA (and the chain above it)
  DELETE root                          delete_root()                -> None (the CA goes; its key is disabled)
  POST   config/urls  / GET            write_urls(data) / read_urls()
  POST   roles/:name, GET, DELETE, LIST write_role, read_role, delete_role, list_roles
  POST   issue/:role                   issue(role, data)            -> certificate, private_key (once), ...
  POST   sign/:role                    sign(role, data)             -> certificate, ... (the CSR's key)
  POST   revoke                        revoke(serial_number)        -> revocation_time
  GET    cert/:serial                  read_cert(serial)            -> certificate, revocation_time (0: valid)
  LIST   certs                         list_certs()                 -> keys (serials)
  GET    crl/pem, cert/crl             crl_pem()                    -> the signed CRL
  GET    ca, crl                       ca_der(), crl_der()          -> the same in DER
  POST   tidy                          tidy(data)                   -> counts of what went

Storage: one mount keeps every item under `Kind.CONFIG` "pki/<mount>/" (mounts.py
deletes that prefix when the mount is disabled), sealed by the barrier:
- "ca": the issuer (backend key name, state `pending` with its CSR or `active` with
  its certificate and the chain above it);
- "urls": config/urls;  "role/<name>": a role;
- "cert/<serial>": an issued certificate and its revocation time, created only by a
  conditional create (a serial is unique or the write is refused);
- "crl": the signed CRL (the one list of revoked serials), rewritten in the same
  transaction that marks a certificate revoked, so the CRL never misses a revocation
  and a failed revoke changes neither.
A request that fails leaves nothing written: the backend signs before the ledger is
touched, and each change is one conditional write or one transaction.

Where this differs from Vault, and why:
- CA keys are EC P-256 (`key_type=ec`, the default here; Vault's default is RSA 2048),
  signed with ECDSA-SHA256: what every key backend signs with and what the SVID
  helpers assemble. `exported` (and `kms`, `existing`) key types are refused: a CA
  key never leaves the key backend.
- One issuer per mount (Vault 1.11+ keeps several): a second root/generate on a mount
  that holds a CA is refused; enable another mount for another CA.
- Leaf TTLs beyond the role's max_ttl or the CA's notAfter are capped, with a
  warning (Vault's `leaf_not_after_behavior=truncate`).
- `tidy` runs to completion in the request (Vault starts it in the background).
- `ca` and `crl` answer DER (`ca_der`, `crl_der`), the PEM forms and `cert/crl` the
  same certificate and CRL in PEM.
- Disabling the mount disables the CA's backend key (`retire_keys`, called by the mount
  table before the mount's items go).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from keycell.control_plane.auth.roles import checked_role_name, names_under, refuse_unknown
from keycell.control_plane.auth.token.store import parse_duration
from keycell.control_plane.engines import outages
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.keys import KeyBackend, KeyBackendError, KeySpec, UnknownKeyError
from keycell.control_plane.ledger import (
    ConflictError,
    Delete,
    InvalidItemError,
    Key,
    Kind,
    Ledger,
    Put,
    iter_prefix,
)
from keycell.control_plane.mounts import SYSTEM_DEFAULT_LEASE_TTL, SYSTEM_MAX_LEASE_TTL
from keycell.control_plane.storage import ATTEMPTS, encode_json, get_json, put_json_if
from keycell.control_plane.timefmt import rfc3339
from keycell.control_plane.x509sign import CA_KEY_USAGE, draft_key, sign_certificate, sign_crl, signed_der

# A CA certificate lives at most this long (twenty years), whatever ttl asks.
MAX_CA_TTL = 20 * 365 * 24 * 3600
# Vault backdates notBefore by 30 s so clocks a little behind still accept a new cert.
NOT_BEFORE_SKEW = 30
# How long a CRL says it is good for (Vault's crl `expiry` default: 72h).
CRL_LIFETIME = 72 * 3600
# tidy's default safety_buffer (Vault: 72h): certificates expired for less are kept.
DEFAULT_SAFETY_BUFFER = 72 * 3600
MAX_NAMES = 100  # SANs in one request
# Every revocation rewrites the one CRL item, so concurrent revokes contend on it: each
# round lets one through, and a revoke retries (re-signing the CRL) up to this often.
_CRL_ATTEMPTS = 32
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SERIAL = re.compile(r"[0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2})*")
# What Vault's role accepts for key_bits per key_type (0: the type's default).
_LEAF_BITS = {"rsa": (2048, 3072, 4096), "ec": (224, 256, 384, 521)}
_DEFAULT_BITS = {"rsa": 2048, "ec": 256}
_CURVES: dict[int, ec.EllipticCurve] = {
    224: ec.SECP224R1(),
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}
# Vault's key_usage names and the x509.KeyUsage field each sets.
_KEY_USAGES = {
    "digitalsignature": "digital_signature",
    "contentcommitment": "content_commitment",
    "keyencipherment": "key_encipherment",
    "dataencipherment": "data_encipherment",
    "keyagreement": "key_agreement",
    "certsign": "key_cert_sign",
    "crlsign": "crl_sign",
}
_ROLE_DEFAULTS: dict[str, Any] = {
    "allowed_domains": [],
    "allow_subdomains": False,
    "allow_bare_domains": False,
    "allow_any_name": False,
    "allow_ip_sans": True,
    "allow_localhost": True,
    "ttl": 0,
    "max_ttl": 0,
    "key_type": "rsa",
    "key_bits": 2048,
    "server_flag": True,
    "client_flag": True,
    "key_usage": ["DigitalSignature", "KeyAgreement", "KeyEncipherment"],
}
# Role fields Vault has and Keycell does not act on: accepted when they hold Vault's
# default (Terraform's provider and many scripts send every field), refused otherwise,
# so no role silently behaves other than it says. A role read shows them too.
_VAULT_ONLY_ROLE_DEFAULTS: dict[str, Any] = {
    "allow_glob_domains": False,
    "allow_wildcard_certificates": True,
    "allowed_domains_template": False,
    "allow_token_displayname": False,
    "allowed_uri_sans": [],
    "allowed_uri_sans_template": False,
    "allowed_other_sans": [],
    "allowed_serial_numbers": [],
    "allowed_user_ids": [],
    "basic_constraints_valid_for_non_ca": False,
    "code_signing_flag": False,
    "email_protection_flag": False,
    "enforce_hostnames": True,
    "ext_key_usage": [],
    "ext_key_usage_oids": [],
    "generate_lease": False,
    "no_store": False,
    "require_cn": True,
    "use_csr_common_name": True,
    "use_csr_sans": True,
    "use_pss": False,
    "signature_bits": 0,
    "not_before_duration": 30,
    "issuer_ref": "default",
    "organization": [],
    "ou": [],
    "country": [],
    "locality": [],
    "province": [],
    "street_address": [],
    "postal_code": [],
    "policy_identifiers": [],
}
_ROLE_FIELDS = set(_ROLE_DEFAULTS) | set(_VAULT_ONLY_ROLE_DEFAULTS) | {"name"}
_NO_CA = (
    "no CA is configured on this mount: generate a root (root/generate/internal) or set a signed intermediate"
)


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """`engines.outages`, and any other refusal of the CA key by the key backend as a 503.
    Messages name no secret."""
    try:
        with outages():
            yield
    except KeyBackendError as exc:
        raise Unavailable(f"the cell's key backend refused the CA key: {type(exc).__name__}") from None


# --- small parsers ------------------------------------------------------------------------


def _flag(data: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field; Vault clients also send "true"/"false" strings."""
    value = data.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidRequest(f"{name} must be a boolean")


def _str_list(value: object, name: str) -> list[str]:
    """A list of strings, or one comma-separated string (as Vault accepts)."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise InvalidRequest(f"{name} is a list of strings or a comma-separated string")
    items = [v for v in items if v]
    if len(items) > MAX_NAMES or any(len(v) > 253 for v in items):
        raise InvalidRequest(f"{name} holds at most {MAX_NAMES} entries of at most 253 characters")
    return items


def _int(value: object, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer")
    try:
        return int(str(value))
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None


def _common_name(data: Mapping[str, Any]) -> str:
    cn = data.get("common_name")
    if not isinstance(cn, str) or not cn.strip():
        raise InvalidRequest("the common_name field is required")
    if len(cn) > 64:  # RFC 5280 ub-common-name
        raise InvalidRequest("common_name is at most 64 characters")
    return cn.strip()


def is_hostname(name: str) -> bool:
    """A DNS name (labels of letters, digits and dashes), optionally `*.` wildcarded."""
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    return len(name) <= 253 and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def go_duration(seconds: int) -> str:
    """A duration as Go prints one, as Vault's messages do: "72h0m0s", "5m0s", "30s"."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def format_serial(serial: int) -> str:
    """Vault's serial form: lower-case hex bytes joined by colons ("1f:0a:...")."""
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


def parse_serial(value: object) -> str:
    """A serial as a client gives it ("1f:0a", "1f-0a") in Vault's colon form."""
    if not isinstance(value, str) or len(value) > 128 or not _SERIAL.fullmatch(value.strip()):
        raise InvalidRequest("serial_number is hex bytes separated by ':' or '-' (as issue returns it)")
    return value.strip().lower().replace("-", ":")


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode().strip()


def _load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


@dataclass(frozen=True)
class Issuer:
    """The mount's CA: its backend key, and (once active) its certificate and chain."""

    key: str
    issuer_id: str
    key_id: str
    state: str  # "pending" (a CSR waiting for set-signed) or "active"
    csr: str
    certificate: str
    chain: tuple[str, ...]  # the certificates above this one, nearest first

    def to_record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "issuer_id": self.issuer_id,
            "key_id": self.key_id,
            "state": self.state,
            "csr": self.csr,
            "certificate": self.certificate,
            "chain": list(self.chain),
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Issuer:
        return cls(
            str(r["key"]),
            str(r["issuer_id"]),
            str(r["key_id"]),
            str(r["state"]),
            str(r["csr"]),
            str(r["certificate"]),
            tuple(str(c) for c in r["chain"]),
        )

    @property
    def cert(self) -> x509.Certificate:
        return _load_cert(self.certificate)

    def ca_chain(self) -> list[str]:
        return [self.certificate, *self.chain]


class Pki:
    def __init__(
        self,
        ledger: Ledger,
        keys: KeyBackend,
        *,
        mount: str = "pki",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.keys = keys
        self.mount = mount
        self.clock = clock
        base = f"pki/{mount}/"
        self._ca_key = Key(Kind.CONFIG, base + "ca")
        self._urls_key = Key(Kind.CONFIG, base + "urls")
        self._crl_key = Key(Kind.CONFIG, base + "crl")
        self._roles = base + "role/"
        self._certs = base + "cert/"

    # --- the CA ----------------------------------------------------------------------------

    def generate_root(self, kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """root/generate/:type: a self-signed CA whose key the backend creates."""
        _internal_only(kind)
        with _guard():
            self._refuse_if_configured()
            cn = _common_name(data)
            ttl = self._ca_ttl(data)
            path_length = _path_length(data)
            key = self._new_ca_key(data)
            public = self._public(key)
            now = self.clock()
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            builder = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now - NOT_BEFORE_SKEW))
                .not_valid_after(_utc(now + ttl))
            )
            builder = _ca_extensions(builder, public, public, path_length)
            cert = self._sign(builder, key)
            issuer = Issuer(key, str(uuid.uuid4()), str(uuid.uuid4()), "active", "", _pem(cert), ())
            self._activate(issuer, expected=0)
            out = self._issued(cert, issuer)
            del out["ca_chain"]  # Vault's root answer has none
            return {
                **out,
                "issuer_id": issuer.issuer_id,
                "issuer_name": "",
                "key_id": issuer.key_id,
                "key_name": "",
            }

    def generate_intermediate(self, kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """intermediate/generate/:type: a new backend key and a CSR for it, to be signed
        by another CA and brought back with set-signed."""
        _internal_only(kind)
        with _guard():
            self._refuse_if_configured()
            cn = _common_name(data)
            key = self._new_ca_key(data)
            builder = x509.CertificateSigningRequestBuilder().subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            )
            draft = builder.sign(draft_key(), hashes.SHA256())
            # cryptography signs a CSR with the key it certifies, so the draft carries the
            # dummy's public key: the backend key's takes its place in the request info.
            tbs = _csr_info_for(draft, self._public(key))
            csr = x509.load_der_x509_csr(signed_der(tbs, self.keys.sign(key, tbs).value))
            pem = csr.public_bytes(serialization.Encoding.PEM).decode().strip()
            issuer = Issuer(key, str(uuid.uuid4()), str(uuid.uuid4()), "pending", pem, "", ())
            try:
                put_json_if(self.ledger, self._ca_key, issuer.to_record(), 0)
            except ConflictError:
                self._retire(key)
                raise InvalidRequest("a CA was configured on this mount concurrently") from None
            return {"csr": pem, "key_id": issuer.key_id}

    def sign_intermediate(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """root/sign-intermediate: certify another CA's CSR with this mount's CA."""
        with _guard():
            issuer = self._active()
            csr = _load_csr(data.get("csr"))
            cn = data.get("common_name") or _csr_common_name(csr)
            cn = _common_name({"common_name": cn})
            ttl = self._ca_ttl(data)
            path_length = _path_length(data)
            public = csr.public_key()
            _check_csr_key({"key_type": "any", "key_bits": 0}, public)  # EC, or RSA of 2048+ bits
            ca = issuer.cert
            now = self.clock()
            not_after, warnings = self._capped(now + ttl, ca)
            serial = x509.random_serial_number()
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca.subject)
                .public_key(public)
                .serial_number(serial)
                .not_valid_before(_utc(now - NOT_BEFORE_SKEW))
                .not_valid_after(_utc(not_after))
            )
            builder = _ca_extensions(builder, public, ca.public_key(), path_length)
            builder = self._with_urls(builder)
            cert = self._sign(builder, issuer.key)
            self._store_issued(cert)
            return {**self._issued(cert, issuer), **({"warnings": warnings} if warnings else {})}

    def set_signed(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """intermediate/set-signed: the certificate another CA made from this mount's CSR
        (a PEM bundle: the certificate first, then any chain above it)."""
        with _guard():
            found = get_json(self.ledger, self._ca_key)
            if found is None:
                raise InvalidRequest("no pending intermediate: call intermediate/generate/internal first")
            issuer = Issuer.from_record(found[0])
            if issuer.state != "pending":
                raise InvalidRequest("this mount's CA is already set; enable another mount for another CA")
            certs = _load_bundle(data.get("certificate"))
            cert = certs[0]
            mine = serialization.load_pem_public_key(self.keys.public_key(issuer.key))
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != mine.public_bytes(
                serialization.Encoding.DER, spki
            ):
                raise InvalidRequest("the certificate does not certify this mount's pending key (its CSR)")
            if not _is_ca(cert):
                raise InvalidRequest("the certificate is not a CA certificate (basic constraints CA:true)")
            if len(certs) > 1:
                try:
                    cert.verify_directly_issued_by(certs[1])
                except (ValueError, TypeError, InvalidSignature):
                    raise InvalidRequest(
                        "the certificate was not issued by the next one in the bundle"
                    ) from None
            chain = tuple(_pem(c) for c in certs[1:])
            active = Issuer(issuer.key, issuer.issuer_id, issuer.key_id, "active", "", _pem(cert), chain)
            self._activate(active, expected=found[1])
            return {
                "imported_issuers": [active.issuer_id],
                "imported_keys": None,
                "existing_issuers": None,
                "existing_keys": [issuer.key_id],
                "mapping": {active.issuer_id: issuer.key_id},
            }

    def delete_root(self) -> None:
        """DELETE root: the mount's CA goes (its record and CRL; its backend key is
        disabled, never used again), so a new root or intermediate can be made here.
        Certificates it issued stay readable, as in Vault."""
        with _guard():
            found = get_json(self.ledger, self._ca_key)
            if found is None:
                return
            ops: list[Put | Delete] = [Delete(self._ca_key, found[1])]
            crl = self.ledger.get(self._crl_key)
            if crl is not None:
                ops.append(Delete(self._crl_key, crl.version))
            try:
                self.ledger.transact(ops)
            except ConflictError:
                raise InvalidRequest("the mount's CA was changed concurrently; retry") from None
            self._retire(str(found[0]["key"]))

    def retire_keys(self) -> None:
        """The mount is being disabled: disable the CA's backend key (pending or active),
        so it never signs again; an outage is an error (the disable is retried), unlike
        `_retire`'s best effort. Idempotent."""
        with _guard():
            found = get_json(self.ledger, self._ca_key)
            if found is not None:
                with contextlib.suppress(UnknownKeyError):
                    self.keys.disable(str(found[0]["key"]))

    def ca_pem(self) -> str:
        with _guard():
            return self._active().certificate

    def ca_der(self) -> bytes:
        """ca: the CA certificate in DER, as Vault serves it for AIA issuer URLs."""
        return x509.load_pem_x509_certificate(self.ca_pem().encode()).public_bytes(serialization.Encoding.DER)

    def chain_pem(self) -> str:
        with _guard():
            return "\n".join(self._active().ca_chain())

    def read_ca_cert(self) -> dict[str, Any]:
        """cert/ca: the CA certificate in the shape of cert/:serial."""
        with _guard():
            issuer = self._active()
            return {"certificate": issuer.certificate, "revocation_time": 0, "ca_chain": issuer.ca_chain()}

    # --- config/urls -------------------------------------------------------------------------

    def write_urls(self, data: Mapping[str, Any]) -> None:
        refuse_unknown(
            data, ("issuing_certificates", "crl_distribution_points", "ocsp_servers"), "config/urls"
        )
        urls = {name: _str_list(data.get(name), name) for name in _URL_FIELDS}
        for name, values in urls.items():
            for value in values:
                if not re.fullmatch(r"https?://[!-~]+", value):  # printable ASCII, as X.509 URIs are
                    raise InvalidRequest(f"{name}: {value[:60]!r} is not an http(s) URL")
        with _guard():
            found = get_json(self.ledger, self._urls_key)
            try:
                put_json_if(self.ledger, self._urls_key, urls, found[1] if found else 0)
            except ConflictError:
                raise InvalidRequest("config/urls was written concurrently; retry") from None

    def read_urls(self) -> dict[str, Any]:
        with _guard():
            found = get_json(self.ledger, self._urls_key)
        stored = found[0] if found else {}
        return {name: stored.get(name, []) for name in _URL_FIELDS}

    # --- roles -------------------------------------------------------------------------------

    def write_role(self, name: str, data: Mapping[str, Any]) -> None:
        """roles/:name: create the role, or change the fields given."""
        role_name = checked_role_name(name)
        refuse_unknown(data, _ROLE_FIELDS)
        _refuse_unsupported(data)
        with _guard():
            found = get_json(self.ledger, self._role_key(role_name))
            role = {**_ROLE_DEFAULTS, **(found[0] if found else {})}
            for flag in (
                "allow_subdomains",
                "allow_bare_domains",
                "allow_any_name",
                "allow_ip_sans",
                "allow_localhost",
                "server_flag",
                "client_flag",
            ):
                role[flag] = _flag(data, flag, role[flag])
            if "allowed_domains" in data:
                role["allowed_domains"] = [
                    d.lower() for d in _str_list(data["allowed_domains"], "allowed_domains")
                ]
            for ttl in ("ttl", "max_ttl"):
                if ttl in data:
                    role[ttl] = parse_duration(data[ttl] or 0, ttl)
            if role["max_ttl"] and role["ttl"] > role["max_ttl"]:
                raise InvalidRequest('"ttl" value must be less than "max_ttl" value')
            if "key_usage" in data:
                usages = _str_list(data["key_usage"], "key_usage")
                unknown = [u for u in usages if u.lower() not in _KEY_USAGES]
                if unknown:
                    raise InvalidRequest(f"unknown key_usage {unknown[0][:40]!r}")
                role["key_usage"] = usages
            if "key_type" in data or "key_bits" in data:
                key_type = data.get("key_type", role["key_type"])
                if key_type not in ("rsa", "ec", "any"):
                    raise InvalidRequest("key_type must be rsa, ec or any")
                bits = _int(data.get("key_bits"), "key_bits", 0)
                if key_type != "any":
                    bits = bits or _DEFAULT_BITS[key_type]
                    if bits not in _LEAF_BITS[key_type]:
                        allowed = ", ".join(map(str, _LEAF_BITS[key_type]))
                        raise InvalidRequest(f"key_bits for a {key_type} key must be one of {allowed}")
                role["key_type"], role["key_bits"] = key_type, bits
            try:
                put_json_if(self.ledger, self._role_key(role_name), role, found[1] if found else 0)
            except ConflictError:
                raise InvalidRequest("the role was written concurrently; retry") from None

    def read_role(self, name: str) -> dict[str, Any]:
        with _guard():
            found = get_json(self.ledger, self._role_key(checked_role_name(name)))
        if found is None:
            raise NotFound()
        return dict(sorted({**_VAULT_ONLY_ROLE_DEFAULTS, **_ROLE_DEFAULTS, **found[0]}.items()))

    def delete_role(self, name: str) -> None:
        with _guard():
            key = self._role_key(checked_role_name(name))
            found = self.ledger.get(key)
            if found is not None:
                with contextlib.suppress(ConflictError):
                    self.ledger.delete_if(key, found.version)

    def list_roles(self) -> dict[str, Any]:
        with _guard():
            names = names_under(self.ledger, Kind.CONFIG, self._roles)
        if not names:
            raise NotFound()
        return {"keys": names}

    # --- issuing -----------------------------------------------------------------------------

    def issue(self, role_name: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """issue/:role: a key pair made here for the caller and a certificate for it. The
        private key is in this answer only; it is never stored."""
        with _guard():
            role = self._role(role_name)
            if role["key_type"] == "any":
                raise InvalidRequest('role key type "any" not allowed for issuing certificates, only signing')
            cn, dns, ips = self._names(role, _common_name(data), data)
            issuer = self._active()  # before a key pair is made for nothing
            private = _new_leaf_key(role["key_type"], role["key_bits"])
            out = self._leaf(issuer, role, cn, dns, ips, private.public_key(), data)
            out["private_key"] = (
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
                .decode()
                .strip()
            )
            out["private_key_type"] = role["key_type"]
            return out

    def sign(self, role_name: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """sign/:role: a certificate for the key of a CSR whose signature verifies; the
        CSR's common name and SANs are checked against the role like issue's."""
        with _guard():
            role = self._role(role_name)
            csr = _load_csr(data.get("csr"))
            public = csr.public_key()
            _check_csr_key(role, public)
            cn = _csr_common_name(csr) or data.get("common_name")
            cn, dns, ips = self._names(role, _common_name({"common_name": cn}), data, csr)
            return self._leaf(self._active(), role, cn, dns, ips, public, data)

    def _leaf(
        self,
        issuer: Issuer,
        role: Mapping[str, Any],
        cn: str,
        dns: list[str],
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        public: Any,
        data: Mapping[str, Any],
    ) -> dict[str, Any]:
        ca = issuer.cert
        now = self.clock()
        warnings: list[str] = []
        ttl = parse_duration(data.get("ttl") or 0, "ttl") or role["ttl"] or SYSTEM_DEFAULT_LEASE_TTL
        max_ttl = role["max_ttl"] or SYSTEM_MAX_LEASE_TTL
        if ttl > max_ttl:
            warnings.append(
                f'TTL "{go_duration(ttl)}" is longer than permitted maxTTL "{go_duration(max_ttl)}", '
                "so maxTTL is being used"
            )
            ttl = max_ttl
        not_after, capped = self._capped(now + ttl, ca)
        warnings += capped
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - NOT_BEFORE_SKEW))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(role["key_usage"]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(_aki(ca.public_key()), critical=False)
        )
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if role["server_flag"] else []
        eku += [ExtendedKeyUsageOID.CLIENT_AUTH] if role["client_flag"] else []
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = self._with_urls(builder)
        cert = self._sign(builder, issuer.key)
        self._store_issued(cert)
        out = {**self._issued(cert, issuer), "not_before": int(cert.not_valid_before_utc.timestamp())}
        if warnings:
            out["warnings"] = warnings
        return out

    def _names(
        self,
        role: Mapping[str, Any],
        cn: str,
        data: Mapping[str, Any],
        csr: x509.CertificateSigningRequest | None = None,
    ) -> tuple[str, list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
        """The common name, DNS SANs and IP SANs asked for, each checked against the role
        (Vault's messages). A CN that is a host name is also a DNS SAN, as Vault adds it;
        a DNS SAN must be a host name (allow_any_name or not)."""
        dns = [cn.lower(), *(n.lower() for n in _str_list(data.get("alt_names"), "alt_names"))]
        ip_texts = _str_list(data.get("ip_sans"), "ip_sans")
        if csr is not None:
            with contextlib.suppress(x509.ExtensionNotFound):
                ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                dns += [n.lower() for n in ext.get_values_for_type(x509.DNSName)]
                ip_texts += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
        if not _name_allowed(role, cn.lower()):
            raise InvalidRequest(f"common name {cn} not allowed by this role")
        for name in dns[1:]:
            if not (is_hostname(name) and _name_allowed(role, name)):
                raise InvalidRequest(f"subject alternate name {name} not allowed by this role")
        if not is_hostname(dns[0]):
            dns = dns[1:]  # a free-form CN (allow_any_name) stays out of the DNS SANs
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for text in ip_texts:
            if not role["allow_ip_sans"]:
                raise InvalidRequest(
                    f"IP Subject Alternative Names are not allowed in this role, but was provided {text}"
                )
            try:
                ips.append(ipaddress.ip_address(text))
            except ValueError:
                raise InvalidRequest(f"the value {text[:60]!r} is not a valid IP address") from None
        return cn, list(dict.fromkeys(dns)), list(dict.fromkeys(ips))

    # --- certificates and revocation ---------------------------------------------------------

    def read_cert(self, serial: str) -> dict[str, Any]:
        """cert/:serial (also "ca", "ca_chain", "crl"): the certificate and its status,
        OCSP-style: revocation_time 0 means not revoked."""
        if serial == "ca":
            return self.read_ca_cert()
        if serial == "ca_chain":
            chain = self.chain_pem()
            return {"certificate": chain, "ca_chain": chain}
        if serial == "crl":
            return {"certificate": self.crl_pem()}
        wanted = parse_serial(serial)
        with _guard():
            found = get_json(self.ledger, self._cert_key(wanted))
            if found is None:
                raise NotFound(f"certificate with serial {wanted} not found")
            record = found[0]
            return {
                "certificate": record["certificate"],
                "serial_number": wanted,
                "revocation_time": record["revocation_time"],
                "revocation_time_rfc3339": record["revocation_time_rfc3339"],
                "expiration": record["expiration"],
                "issuer_id": self._issuer_id(),
            }

    def list_certs(self) -> dict[str, Any]:
        with _guard():
            serials = [s.replace("-", ":") for s in names_under(self.ledger, Kind.CONFIG, self._certs)]
        if not serials:
            raise NotFound()
        return {"keys": serials}

    def revoke(self, serial_number: object) -> dict[str, Any]:
        """revoke: mark the certificate revoked and rebuild the CRL, in one transaction."""
        wanted = parse_serial(serial_number)
        with _guard():
            issuer = self._active()
            for _ in range(_CRL_ATTEMPTS):
                found = get_json(self.ledger, self._cert_key(wanted))
                if found is None:
                    raise InvalidRequest(f"certificate with serial {wanted} not found.")
                record, version = found
                if record["revocation_time"]:
                    return _revocation(record)
                if record["certificate"] == issuer.certificate:
                    raise InvalidRequest("adding the mount's own CA certificate to its CRL is not allowed")
                at = int(self.clock())
                record = {**record, "revocation_time": at, "revocation_time_rfc3339": rfc3339(at)}
                crl, crl_version = self._crl_record()
                revoked = {**_revoked(crl), wanted: at}
                new_crl = self._signed_crl(issuer, revoked, crl["number"] + 1)
                try:
                    self.ledger.transact(
                        [
                            Put(self._cert_key(wanted), encode_json(record), version),
                            Put(self._crl_key, encode_json(new_crl), crl_version),
                        ]
                    )
                except ConflictError:
                    continue
                except InvalidItemError:
                    # the CRL is one ledger item (MAX_ITEM_BYTES): ~54 bytes per entry
                    raise InvalidRequest(
                        "this mount's CRL is full (about 7,000 unexpired revoked certificates): run tidy "
                        "with tidy_revoked_certs, or issue from another PKI mount; nothing was revoked"
                    ) from None
                return _revocation(record)
        raise InvalidRequest("the certificate or the CRL kept changing concurrently; retry")

    def crl_pem(self) -> str:
        """crl/pem: the signed CRL (made, empty, when the CA became active)."""
        with _guard():
            self._active()
            crl, version = self._crl_record()
        if not version:
            raise Unavailable("this mount's CRL is missing from the ledger; POST crl/rotate rebuilds it")
        return str(crl["pem"])

    def crl_der(self) -> bytes:
        """crl: the signed CRL in DER, what a CRL distribution point serves."""
        return x509.load_pem_x509_crl(self.crl_pem().encode()).public_bytes(serialization.Encoding.DER)

    def rotate_crl(self) -> dict[str, Any]:
        """crl/rotate: sign the CRL again (a new number and nextUpdate)."""
        with _guard():
            issuer = self._active()
            for _ in range(ATTEMPTS):
                crl, version = self._crl_record()
                fresh = self._signed_crl(issuer, _revoked(crl), crl["number"] + 1)
                with contextlib.suppress(ConflictError):
                    put_json_if(self.ledger, self._crl_key, fresh, version)
                    return {"success": True}
        raise InvalidRequest("the CRL kept changing concurrently; retry")

    def tidy(self, data: Mapping[str, Any]) -> dict[str, int]:
        """tidy: drop certificates expired for longer than safety_buffer. With
        tidy_cert_store the unrevoked ones; with tidy_revoked_certs the revoked ones,
        whose serials leave the CRL in the same transaction."""
        refuse_unknown(data, ("tidy_cert_store", "tidy_revoked_certs", "safety_buffer"), "tidy")
        store = _flag(data, "tidy_cert_store", False)
        revoked = _flag(data, "tidy_revoked_certs", False)
        buffer = parse_duration(data.get("safety_buffer") or DEFAULT_SAFETY_BUFFER, "safety_buffer")
        if not (store or revoked):
            raise InvalidRequest("tidy needs tidy_cert_store and/or tidy_revoked_certs set to true")
        cutoff = self.clock() - buffer
        deleted = {"certs": 0, "revoked": 0}
        with _guard():
            gone: list[tuple[Key, int, str, bool]] = []
            for item in iter_prefix(self.ledger, Kind.CONFIG, self._certs):
                found = get_json(self.ledger, item.key)
                if found is None or found[0]["expiration"] >= cutoff:
                    continue
                was_revoked = bool(found[0]["revocation_time"])
                if (was_revoked and revoked) or (not was_revoked and store):
                    serial = item.key.path[len(self._certs) :].replace("-", ":")
                    gone.append((item.key, found[1], serial, was_revoked))
            # Batches small enough for every ledger's transaction limit (DynamoDB: 100).
            for start in range(0, len(gone), 50):
                batch = gone[start : start + 50]
                ops: list[Put | Delete] = [Delete(key, version) for key, version, _, _ in batch]
                serials = {serial for _, _, serial, was in batch if was}
                if serials:
                    crl, crl_version = self._crl_record()
                    left = {s: t for s, t in _revoked(crl).items() if s not in serials}
                    new_crl = self._signed_crl(self._active(), left, crl["number"] + 1)
                    ops.append(Put(self._crl_key, encode_json(new_crl), crl_version))
                try:
                    self.ledger.transact(ops)
                except ConflictError:
                    continue  # changed meanwhile: the next tidy sees it again
                deleted["revoked"] += len(serials)
                deleted["certs"] += len(batch) - len(serials)
        return deleted

    # --- helpers -----------------------------------------------------------------------------

    def _role_key(self, name: str) -> Key:
        return Key(Kind.CONFIG, self._roles + name)

    def _cert_key(self, serial: str) -> Key:
        return Key(Kind.CONFIG, self._certs + serial.replace(":", "-"))

    def _role(self, name: str) -> dict[str, Any]:
        found = get_json(self.ledger, self._role_key(checked_role_name(name)))
        if found is None:
            raise InvalidRequest(f"unknown role: {name}")
        return {**_ROLE_DEFAULTS, **found[0]}

    def _active(self) -> Issuer:
        found = get_json(self.ledger, self._ca_key)
        if found is None or found[0]["state"] != "active":
            raise InvalidRequest(_NO_CA)
        return Issuer.from_record(found[0])

    def _issuer_id(self) -> str:
        found = get_json(self.ledger, self._ca_key)
        return str(found[0]["issuer_id"]) if found else ""

    def _refuse_if_configured(self) -> None:
        if self.ledger.get(self._ca_key) is not None:
            raise InvalidRequest(
                "this mount already holds a CA; Keycell keeps one issuer per mount: enable another PKI mount"
            )

    def _ca_ttl(self, data: Mapping[str, Any]) -> int:
        ttl = parse_duration(data.get("ttl") or 0, "ttl") or SYSTEM_MAX_LEASE_TTL
        if ttl > MAX_CA_TTL:
            raise InvalidRequest(f"a CA certificate's ttl is at most {MAX_CA_TTL // 3600}h")
        return ttl

    def _capped(self, not_after: float, ca: x509.Certificate) -> tuple[float, list[str]]:
        """`not_after`, brought within the CA's own validity."""
        ca_end = ca.not_valid_after_utc.timestamp()
        if not_after <= ca_end:
            return not_after, []
        return ca_end, [f"the requested TTL ends after the CA certificate ({rfc3339(ca_end)}); it was capped"]

    def _new_ca_key(self, data: Mapping[str, Any]) -> str:
        key_type = data.get("key_type") or "ec"
        bits = _int(data.get("key_bits"), "key_bits", 0)
        if key_type != "ec" or bits not in (0, 256):
            raise InvalidRequest(
                "Keycell CA keys are EC P-256 (key_type=ec, key_bits=256), held by the cell's key "
                "backend; leaf certificates may still be RSA or EC"
            )
        name = f"pki-{uuid.uuid4().hex[:24]}"
        self.keys.create_key(name, KeySpec.EC_P256)
        return name

    def _retire(self, key: str) -> None:
        """A backend key no record names (a CA write that lost): disabled, never used."""
        with contextlib.suppress(KeyBackendError):
            self.keys.disable(key)

    def _public(self, key: str) -> ec.EllipticCurvePublicKey:
        public = serialization.load_pem_public_key(self.keys.public_key(key))
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidRequest("the CA key is not an EC key; Keycell CA keys are EC P-256")
        return public

    def _sign(self, builder: x509.CertificateBuilder, key: str) -> x509.Certificate:
        """The certificate `builder` describes, signed by backend key `key` (as the SVID
        authorities sign: a draft gives the TBS bytes, the backend signs those)."""
        return sign_certificate(builder, self.keys, key)

    def _activate(self, issuer: Issuer, *, expected: int) -> None:
        """The CA record, the CA's own certificate record and its first (empty) CRL, in
        one transaction: an active CA always has a CRL to serve."""
        cert = issuer.cert
        try:
            self.ledger.transact(
                [
                    Put(self._ca_key, encode_json(issuer.to_record()), expected),
                    Put(
                        self._cert_key(format_serial(cert.serial_number)), encode_json(_cert_record(cert)), 0
                    ),
                    Put(self._crl_key, encode_json(self._signed_crl(issuer, {}, 1)), 0),
                ]
            )
        except ConflictError:
            if expected == 0:
                self._retire(issuer.key)
            raise InvalidRequest("a CA was configured on this mount concurrently") from None

    def _store_issued(self, cert: x509.Certificate) -> None:
        """The conditional create that makes a serial unique in this mount."""
        try:
            put_json_if(self.ledger, self._cert_key(format_serial(cert.serial_number)), _cert_record(cert), 0)
        except ConflictError:
            raise Unavailable(
                "a certificate with this serial number already exists; retry the request"
            ) from None

    def _issued(self, cert: x509.Certificate, issuer: Issuer) -> dict[str, Any]:
        return {
            "certificate": _pem(cert),
            "issuing_ca": issuer.certificate,
            "ca_chain": issuer.ca_chain(),
            "serial_number": format_serial(cert.serial_number),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }

    def _with_urls(self, builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        urls = self.read_urls()
        if urls["issuing_certificates"] or urls["ocsp_servers"]:
            access = [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(u)
                )
                for u in urls["issuing_certificates"]
            ] + [
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u))
                for u in urls["ocsp_servers"]
            ]
            builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
        if urls["crl_distribution_points"]:
            points = [
                x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None)
                for u in urls["crl_distribution_points"]
            ]
            builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
        return builder

    def _crl_record(self) -> tuple[dict[str, Any], int]:
        found = get_json(self.ledger, self._crl_key)
        return found if found is not None else ({"number": 0, "pem": ""}, 0)

    def _signed_crl(self, issuer: Issuer, revoked: Mapping[str, int], number: int) -> dict[str, Any]:
        """The CRL record: its number and the CRL over `revoked` signed by the CA key. The
        signed CRL is the only list of revoked serials kept (`_revoked` reads it back),
        so the one item holds each serial once: about 55 bytes a revoked certificate."""
        ca = issuer.cert
        now = self.clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(_utc(now))
            .next_update(_utc(now + CRL_LIFETIME))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(_aki(ca.public_key()), critical=False)
        )
        for serial, at in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial.replace(":", ""), 16))
                .revocation_date(_utc(at))
                .build()
            )
        crl = sign_crl(builder, self.keys, issuer.key)
        pem = crl.public_bytes(serialization.Encoding.PEM).decode().strip()
        return {"number": number, "pem": pem}


_URL_FIELDS = ("issuing_certificates", "crl_distribution_points", "ocsp_servers")


def _internal_only(kind: str) -> None:
    if kind != "internal":
        raise InvalidRequest(
            f"{kind[:20]!r} CA keys are not offered: Keycell keeps every CA key in the cell's key "
            "backend and never exports it; use the 'internal' type"
        )


def _path_length(data: Mapping[str, Any]) -> int | None:
    length = _int(data.get("max_path_length"), "max_path_length", -1)
    if not -1 <= length <= 64:
        raise InvalidRequest("max_path_length is -1 (no limit) to 64")
    return None if length == -1 else length


def _ca_extensions(
    builder: x509.CertificateBuilder, public: Any, issuer_public: Any, path_length: int | None
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(issuer_public), critical=False)
    )


def _aki(issuer_public: Any) -> x509.AuthorityKeyIdentifier:
    """The authority key identifier of a certificate `issuer_public` signs."""
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public)


def _leaf_key_usage(names: Sequence[str]) -> x509.KeyUsage:
    fields = dict.fromkeys(_KEY_USAGES.values(), False)
    for name in names:
        fields[_KEY_USAGES[name.lower()]] = True
    return x509.KeyUsage(**fields, encipher_only=False, decipher_only=False)


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    """InvalidRequest for a Vault-only role field set to anything but Vault's default."""
    for name, default in _VAULT_ONLY_ROLE_DEFAULTS.items():
        if name not in data:
            continue
        value = data[name]
        if isinstance(default, bool):
            same = _flag(data, name, default) == default
        elif isinstance(default, list):
            same = value in (None, "", [])
        elif name == "not_before_duration":
            same = parse_duration(value or default, name) == default
        elif isinstance(default, int):
            same = value in (None, "") or _int(value, name, default) == default
        else:
            same = value in (None, "", default)
        if not same:
            raise InvalidRequest(
                f"the role field {name} is not supported by Keycell (only its default, {default!r})"
            )


def _name_allowed(role: Mapping[str, Any], name: str) -> bool:
    """Vault's name rules: any name (allow_any_name), localhost, a domain itself
    (allow_bare_domains) or a name under it (allow_subdomains; `*.` wildcards too)."""
    if not is_hostname(name):
        return bool(role["allow_any_name"]) and 0 < len(name) <= 253
    if role["allow_any_name"]:
        return True
    if name == "localhost" and role["allow_localhost"]:
        return True
    for domain in role["allowed_domains"]:
        if name == domain and role["allow_bare_domains"]:
            return True
        if role["allow_subdomains"] and name.endswith("." + domain):
            return True
    return False


def _new_leaf_key(key_type: str, bits: int) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(_CURVES[bits])
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _check_csr_key(role: Mapping[str, Any], public: object) -> None:
    """The CSR's key must be the role's type, and at least its size (EC: its curve)."""
    if isinstance(public, rsa.RSAPublicKey):
        kind, bits = "rsa", public.key_size
    elif isinstance(public, ec.EllipticCurvePublicKey):
        kind, bits = "ec", public.curve.key_size
    else:
        raise InvalidRequest("the CSR's key must be an EC or RSA key")
    if role["key_type"] == "any":
        if kind == "rsa" and bits < 2048:
            raise InvalidRequest("RSA keys of fewer than 2048 bits are not signed")
        return
    if kind != role["key_type"]:
        raise InvalidRequest(f"role requires keys of type {role['key_type']}, but the CSR's key is {kind}")
    if (kind == "rsa" and bits < role["key_bits"]) or (kind == "ec" and bits != role["key_bits"]):
        raise InvalidRequest(f"role requires a key of {role['key_bits']} bits, but the CSR's key has {bits}")


def _load_csr(value: object) -> x509.CertificateSigningRequest:
    if not isinstance(value, str) or "BEGIN CERTIFICATE REQUEST" not in value or len(value) > 65536:
        raise InvalidRequest("csr must be a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)")
    try:
        csr = x509.load_pem_x509_csr(value.strip().encode())
    except ValueError:
        raise InvalidRequest("csr could not be parsed as a PEM certificate request") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm is not valid either
        valid = False
    if not valid:
        raise InvalidRequest("the CSR's signature does not verify: it was not made with its key")
    return csr


def _csr_common_name(csr: x509.CertificateSigningRequest) -> str | None:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _csr_info_for(draft: x509.CertificateSigningRequest, public: ec.EllipticCurvePublicKey) -> bytes:
    """The draft's CertificationRequestInfo with `public` in place of the dummy key's
    SubjectPublicKeyInfo (the only field that differs)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    dummy = draft.public_key().public_bytes(serialization.Encoding.DER, spki)
    mine = public.public_bytes(serialization.Encoding.DER, spki)
    tbs = draft.tbs_certrequest_bytes
    # Both are P-256 SubjectPublicKeyInfos of the same length, so every DER length
    # around them stays right.
    if len(dummy) != len(mine) or tbs.count(dummy) != 1:
        raise InvalidRequest("the CA key is not a P-256 key; Keycell CA keys are EC P-256")
    return tbs.replace(dummy, mine)


def _load_bundle(value: object) -> list[x509.Certificate]:
    if not isinstance(value, str) or "BEGIN CERTIFICATE" not in value or len(value) > 262144:
        raise InvalidRequest("certificate must be PEM (-----BEGIN CERTIFICATE-----), the signed one first")
    try:
        return x509.load_pem_x509_certificates(value.strip().encode())
    except ValueError:
        raise InvalidRequest("certificate could not be parsed as PEM certificates") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _cert_record(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "certificate": _pem(cert),
        "expiration": int(cert.not_valid_after_utc.timestamp()),
        "revocation_time": 0,
        "revocation_time_rfc3339": "",
    }


def _revoked(crl_record: Mapping[str, Any]) -> dict[str, int]:
    """The revoked serials of a CRL record and when each was revoked (epoch seconds)."""
    if not crl_record["pem"]:
        return {}
    crl = x509.load_pem_x509_crl(str(crl_record["pem"]).encode())
    return {format_serial(r.serial_number): int(r.revocation_date_utc.timestamp()) for r in crl}


def _revocation(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "revocation_time": record["revocation_time"],
        "revocation_time_rfc3339": record["revocation_time_rfc3339"],
        "state": "revoked",
    }

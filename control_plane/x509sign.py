"""X.509 structures (certificates, certificate requests, CRLs) signed by a key that
lives in the key backend (control_plane/keys.py), never in this process.

`cryptography` builds these structures only while signing them with a private key
object it holds, which a backend key (an HSM's) never is. So a structure is first
signed with a throwaway key (`draft_key`), its to-be-signed bytes are taken from that
draft, the backend signs them, and the outer SEQUENCE { tbs, algorithm, signature } is
put together here. The SVID authorities (svid.py) and the PKI engine
(engines/pki) both sign this way, and both give their CA certificates CA_KEY_USAGE. ECDSA P-256 with SHA-256 only."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keycell.control_plane.keys import KeyBackend

# DER AlgorithmIdentifier of ecdsa-with-SHA256 (RFC 5758).
ECDSA_SHA256_ALG_ID = bytes.fromhex("300a06082a8648ce3d040302")

# The key usage every CA certificate here carries (SVID roots and intermediates, PKI CAs):
# it signs certificates and CRLs, and digital signatures; nothing else.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

_DRAFT: ec.EllipticCurvePrivateKey | None = None


def der(tag: int, body: bytes) -> bytes:
    """One DER TLV: `tag`, the definite length of `body`, `body`."""
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + length + body


def signed_der(tbs: bytes, signature_der: bytes) -> bytes:
    """SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }: the outer shape of a
    certificate, a certificate request and a CRL alike."""
    return der(0x30, tbs + ECDSA_SHA256_ALG_ID + der(0x03, b"\x00" + signature_der))


def draft_key() -> ec.EllipticCurvePrivateKey:
    """The throwaway key drafts are signed with (one per process; never a real signer)."""
    global _DRAFT
    if _DRAFT is None:
        _DRAFT = ec.generate_private_key(ec.SECP256R1())
    return _DRAFT


def sign_certificate(builder: x509.CertificateBuilder, keys: KeyBackend, key_name: str) -> x509.Certificate:
    """The certificate `builder` describes, signed by the backend's key `key_name`."""
    tbs = builder.sign(draft_key(), hashes.SHA256()).tbs_certificate_bytes
    return x509.load_der_x509_certificate(signed_der(tbs, keys.sign(key_name, tbs).value))


def sign_crl(
    builder: x509.CertificateRevocationListBuilder, keys: KeyBackend, key_name: str
) -> x509.CertificateRevocationList:
    """The CRL `builder` describes, signed by the backend's key `key_name`."""
    tbs = builder.sign(draft_key(), hashes.SHA256()).tbs_certlist_bytes
    return x509.load_der_x509_crl(signed_der(tbs, keys.sign(key_name, tbs).value))

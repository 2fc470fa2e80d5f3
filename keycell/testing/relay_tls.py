"""A throwaway certificate authority for relay mTLS in tests and dev meshes.

`TestCA("example.org").relay(folder, "a")` writes a relay certificate for cell `a`
(URI SAN spiffe://example.org/keycell/relay/a, plus IP 127.0.0.1 and DNS localhost so
loopback peers pass hostname checks) with its key and the CA bundle, and returns their
paths as the environment `keycell relay` reads (KEYCELL_RELAY_TLS_CERT/KEY/CA).
ECDSA P-256 keys: fast to make, a few milliseconds each.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keycell.relay.tls import API, RELAY, PeerId


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "example.org", *, name: str = "keycell test CA") -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, spiffe_id: str | None, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `spiffe_id` (a URI SAN; None: no URI SAN)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        if spiffe_id is not None:
            names.append(x509.UniformResourceIdentifier(spiffe_id))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id or "keycell")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write(self, folder: Path | str, label: str, spiffe_id: str | None) -> dict[str, str]:
        """Write a certificate for `spiffe_id`, its key and this CA's bundle under
        `folder`; returns the KEYCELL_RELAY_TLS_* environment naming them."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        cert, key = self.issue(spiffe_id)
        (out / f"{label}.crt").write_bytes(cert)
        (out / f"{label}.key").write_bytes(key)
        (out / f"{label}.key").chmod(0o600)
        (out / "ca.pem").write_bytes(self.pem)
        return {
            "KEYCELL_RELAY_TLS_CERT": str(out / f"{label}.crt"),
            "KEYCELL_RELAY_TLS_KEY": str(out / f"{label}.key"),
            "KEYCELL_RELAY_TLS_CA": str(out / "ca.pem"),
        }

    def relay(self, folder: Path | str, cell: str, label: str = "") -> dict[str, str]:
        """A relay of `cell`: spiffe://<trust domain>/keycell/relay/<cell>."""
        return self.write(folder, label or f"relay-{cell}", PeerId(self.trust_domain, RELAY, cell).uri)

    def api(self, folder: Path | str, cell: str, label: str = "") -> dict[str, str]:
        """An API process of `cell`: spiffe://<trust domain>/keycell/api/<cell>."""
        return self.write(folder, label or f"api-{cell}", PeerId(self.trust_domain, API, cell).uri)

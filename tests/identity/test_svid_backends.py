"""SVIDs signed through every key backend (software, PKCS#11 on SoftHSM2, CloudHSM,
AWS KMS on moto, the Azure Managed HSM and Cloud KMS stand-ins): the same CA code,
the private keys never leaving the backend, and the results accepted by the `spiffe`
library as well as by Keycell's own checks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe.bundle.jwt_bundle.jwt_bundle import JwtBundle
from spiffe.spiffe_id.spiffe_id import TrustDomain
from spiffe.svid.jwt_svid import JwtSvid
from spiffe.svid.x509_svid import X509Svid

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.keys import KeyBackend
from keycell.control_plane.svid import IdentityCA, validate_jwt_svid, verify_x509_svid
from keycell.testing.cells import open_cell
from keycell.testing.key_backends import BACKENDS, every_backend
from keycell.testing.softhsm import SoftHsmToken

TD = "example.org"
SUB = f"spiffe://{TD}/backend-test"


@pytest.fixture(scope="module")
def backends(softhsm: SoftHsmToken) -> Iterator[dict[str, KeyBackend]]:
    with every_backend(token=softhsm) as started:
        yield started


@pytest.mark.parametrize("name", BACKENDS)
def test_svids_signed_by_each_key_backend_verify(
    name: str, backends: dict[str, KeyBackend], tmp_path: Path
) -> None:
    ledger = SqliteLedger(tmp_path / "cell.db")
    try:
        ca = IdentityCA(open_cell(ledger).barrier, backends[name], trust_domain=TD)
        state = ca.authorities()
        for key in (state.root_key, state.active.x509_key, state.active.jwt_key):
            assert backends[name].describe(key).extractable is False

        workload = ec.generate_private_key(ec.SECP256R1())
        issued = ca.sign_x509(SUB, workload.public_key(), 600)
        assert verify_x509_svid(issued.chain, [state.root], TD, now=time.time()) == SUB
        chain = b"".join(c.public_bytes(serialization.Encoding.DER) for c in issued.chain)
        key = workload.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        assert str(X509Svid.parse_raw(chain, key).spiffe_id) == SUB

        token = ca.sign_jwt(SUB, ["aud"]).token
        assert validate_jwt_svid(token, "aud", state, now=time.time()).spiffe_id == SUB
        bundle = JwtBundle.parse(TrustDomain(TD), state.jwks_bytes())
        assert str(JwtSvid.parse_and_validate(token, bundle, {"aud"}).spiffe_id) == SUB
    finally:
        ledger.close()

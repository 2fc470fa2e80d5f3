"""`POST sys/revocations {"svid": ...}` (the gossiped revocation path) takes away one
SVID, as `identity/revoke` does: the subject is the X.509-SVID's serial or the
JWT-SVID's jti, so the workload's next SVID (same SPIFFE ID) still works."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.routes.revocations import subject_of_svid
from keycell.control_plane.svid import IdentityCA, SvidError, validate_jwt_svid
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

TD = "example.org"
SUB = f"spiffe://{TD}/web"


def test_an_svid_names_itself_not_its_spiffe_id(cell: Cell, clock: ManualClock) -> None:
    ca = IdentityCA(cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock)
    revocations = RevocationSet(cell.barrier, "a", clock=clock)
    stolen, fresh = ca.sign_jwt(SUB, ["payments"]), ca.sign_jwt(SUB, ["payments"])
    revocations.revoke(subject_of_svid(stolen.token), reason="stolen")
    with pytest.raises(SvidError):
        validate_jwt_svid(
            stolen.token, "payments", ca.authorities(), now=clock(), is_revoked=revocations.is_revoked
        )
    assert (
        validate_jwt_svid(
            fresh.token, "payments", ca.authorities(), now=clock(), is_revoked=revocations.is_revoked
        ).spiffe_id
        == SUB
    )
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issued = ca.sign_x509(SUB, key, 600)
    pem = issued.chain[0].public_bytes(serialization.Encoding.PEM).decode()
    assert subject_of_svid(pem) == f"svid:{issued.serial:x}"


def test_a_jwt_without_a_jti_is_refused_with_what_to_do_instead() -> None:
    payload = base64.urlsafe_b64encode(json.dumps({"sub": SUB}).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidRequest, match="spiffe_id"):
        subject_of_svid(f"e30.{payload}.c2ln")

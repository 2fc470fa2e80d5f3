"""TPM node attestation by credential activation, against a real software TPM (swtpm)
driven through tpm2-pytss: the cell's MakeCredential is pure Python, the TPM's
ActivateCredential is the TPM's own."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from spiffe import WorkloadApiClient

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.agent.tpm import endorsement_key_hash, tpm_attestation
from keycell.control_plane.errors import InvalidRequest, PermissionDenied
from keycell.control_plane.identity import Identity
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.svid import IdentityCA
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock
from keycell.testing.processes import ServerProcess, keycell_server
from keycell.testing.swtpm import SoftwareTpm
from tests.identity.conftest import ROOT, TRUST_DOMAIN, this_process_selectors

TD = "example.org"


@pytest.fixture(scope="module")
def tpm() -> Iterator[SoftwareTpm]:
    with SoftwareTpm() as software_tpm:
        yield software_tpm


@pytest.fixture
def identity(cell: Cell, clock: ManualClock) -> Identity:
    ca = IdentityCA(cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock)
    return Identity(cell.barrier, ca, RevocationSet(cell.barrier, "test", clock=clock), clock=clock)


def test_a_registered_tpm_attests_by_activating_the_credential(identity: Identity, tpm: SoftwareTpm) -> None:
    ek_hash = endorsement_key_hash(tpm.tcti)
    identity.write_config({"tpm": {"ek_hashes": [ek_hash]}})
    evidence = tpm_attestation(tpm.tcti, identity.tpm_challenge)
    agent = identity.attest(evidence)
    assert agent.agent_id == f"spiffe://{TD}/keycell/agent/tpm/{ek_hash}"
    assert agent.selectors == (f"tpm:ek_hash:{ek_hash}",)
    with pytest.raises(PermissionDenied, match="already answered"):
        identity.attest(evidence)  # a challenge is answered once


def test_an_unregistered_tpm_gets_no_challenge(identity: Identity, tpm: SoftwareTpm) -> None:
    identity.write_config({"tpm": {"ek_hashes": ["0" * 64]}})
    with pytest.raises(PermissionDenied, match="not registered"):
        tpm_attestation(tpm.tcti, identity.tpm_challenge)


def test_a_wrong_secret_is_refused(identity: Identity, tpm: SoftwareTpm) -> None:
    identity.write_config({"tpm": {"ek_hashes": [endorsement_key_hash(tpm.tcti)]}})
    evidence = tpm_attestation(tpm.tcti, identity.tpm_challenge)
    evidence["secret"] = base64.b64encode(b"\x00" * 32).decode()
    with pytest.raises(PermissionDenied, match="did not recover"):
        identity.attest(evidence)


def test_a_challenge_bound_to_another_attestation_key_cannot_be_activated(
    identity: Identity, tpm: SoftwareTpm
) -> None:
    """The credential is bound to the AK's name: swap in a different AK public area and
    the TPM refuses to activate it (its integrity check fails)."""
    identity.write_config({"tpm": {"ek_hashes": [endorsement_key_hash(tpm.tcti)]}})
    from cryptography.hazmat.primitives.asymmetric import rsa

    from keycell.control_plane import tpm as cell_tpm

    def challenge_for_another_ak(areas: dict[str, str]) -> dict[str, Any]:
        ek = cell_tpm.parse_public(base64.b64decode(areas["ek_public"]))
        ak = cell_tpm.parse_public(base64.b64decode(areas["ak_public"]))
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        modulus = other.public_numbers().n.to_bytes(256, "big")
        area = ak.area[: -len(modulus)] + modulus
        blob, secret = cell_tpm.make_credential(
            ek, cell_tpm.parse_public(len(area).to_bytes(2, "big") + area).name, b"x" * 32
        )
        return {
            "challenge_id": "0" * 36,
            "credential_blob": base64.b64encode(blob).decode(),
            "encrypted_secret": base64.b64encode(secret).decode(),
        }

    from tpm2_pytss import TSS2_Exception

    with pytest.raises(TSS2_Exception):
        tpm_attestation(tpm.tcti, challenge_for_another_ak)


def test_malformed_public_areas_are_a_clear_error(identity: Identity) -> None:
    identity.write_config({"tpm": {"ek_hashes": ["0" * 64]}})
    with pytest.raises(InvalidRequest, match="TPM public areas"):
        identity.tpm_challenge({"ek_public": base64.b64encode(b"\x00\x04abcd").decode(), "ak_public": "AAA="})


def test_an_agent_attested_by_its_tpm_serves_the_workload_api(tmp_path: Any, tpm: SoftwareTpm) -> None:
    server = keycell_server(tmp_path / "cell", dev_root_token=ROOT, workers=1)
    port = server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        from keycell.client import Client

        admin = Client(url, token=ROOT)
        ek_hash = endorsement_key_hash(tpm.tcti)
        admin.request("POST", "identity/config", {"tpm": {"ek_hashes": [ek_hash]}})
        agent_id = f"spiffe://{TRUST_DOMAIN}/keycell/agent/tpm/{ek_hash}"
        admin.request(
            "POST",
            "identity/entries",
            {
                "spiffe_id": f"spiffe://{TRUST_DOMAIN}/tpm-node/app",
                "parent_id": agent_id,
                "selectors": this_process_selectors(),
            },
        )
        socket = f"unix://{tmp_path / 'agent.sock'}"
        agent = ServerProcess(
            "keycell",
            ["agent", "--socket", socket, "--address", url, "--tpm", tpm.tcti],
            what="keycell agent --tpm",
        )
        agent.start()
        try:
            workload = WorkloadApiClient(socket_path=socket, default_timeout=15)
            assert str(workload.fetch_x509_svid().spiffe_id) == f"spiffe://{TRUST_DOMAIN}/tpm-node/app"
            workload.close()
        finally:
            agent.stop()
        admin.close()
    finally:
        server.stop()

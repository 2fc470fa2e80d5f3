"""The local Cloud KMS server as a wire-API peer of the real google-cloud-kms client, and
what the gcp_kms adapter does that the conformance suite cannot see (state lives in
the server, HSM protection is what gets requested, checksums, the destruction window)."""

from __future__ import annotations

import datetime
import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport
from google.protobuf import field_mask_pb2
from keys_backend_gcp_kms import kms_endpoint, make_backend

from keycell.adapters.keys.gcp_kms import ENABLED_LABEL, GcpKmsKeyBackend, crc32c
from keycell.control_plane.keys import (
    BackendUnavailableError,
    IntegrityError,
    KeyDisabledError,
    KeyInputError,
    KeySpec,
    Protection,
    UnknownKeyError,
    VersionState,
    pack_wrapped,
    unpack_wrapped,
)
from keycell.testing.gcp_kms_server import client_for
from keycell.testing.key_backends import GCP_LOCATION as LOCATION
from keycell.testing.key_backends import GCP_PROJECT as PROJECT

Purpose = kms_v1.CryptoKey.CryptoKeyPurpose
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
DATA_KEY = bytes(range(32))
AAD = b"ledger:secret/app/db#1"


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> str:
    return kms_endpoint(request)


@pytest.fixture
def client(endpoint: str) -> Iterator[kms_v1.KeyManagementServiceClient]:
    kms = client_for(endpoint)
    yield kms
    kms.transport.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def ring(client: kms_v1.KeyManagementServiceClient) -> str:
    created = client.create_key_ring(
        parent=f"projects/{PROJECT}/locations/{LOCATION}",
        key_ring_id=f"r-{uuid.uuid4().hex[:12]}",
        key_ring=kms_v1.KeyRing(),
    )
    return str(created.name)


@pytest.fixture
def ring_id() -> str:
    return f"ring-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def backend(endpoint: str, ring_id: str) -> Iterator[GcpKmsKeyBackend]:
    opened = make_backend(endpoint, key_ring=ring_id)
    yield opened
    opened.close()


def symmetric_key(
    client: kms_v1.KeyManagementServiceClient, ring: str, key_id: str = "k"
) -> kms_v1.CryptoKey:
    return client.create_crypto_key(
        parent=ring,
        crypto_key_id=key_id,
        crypto_key=kms_v1.CryptoKey(
            purpose=Purpose.ENCRYPT_DECRYPT,
            version_template=kms_v1.CryptoKeyVersionTemplate(algorithm=Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION),
        ),
    )


def ring_path(ring_id: str) -> str:
    return f"projects/{PROJECT}/locations/{LOCATION}/keyRings/{ring_id}"


# --- the server through the real client --------------------------------------------------


def test_crc32c_matches_the_castagnoli_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_unknown_crypto_key_is_not_found(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    with pytest.raises(gexc.NotFound):
        client.get_crypto_key(name=f"{ring}/cryptoKeys/missing")
    with pytest.raises(gexc.NotFound):
        client.encrypt(name=f"{ring}/cryptoKeys/missing", plaintext=b"x")


def test_unknown_key_ring_is_not_found(client: kms_v1.KeyManagementServiceClient) -> None:
    with pytest.raises(gexc.NotFound):
        client.get_key_ring(name=ring_path("no-such-ring"))


def test_duplicate_crypto_key_is_already_exists(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    symmetric_key(client, ring)
    with pytest.raises(gexc.AlreadyExists):
        symmetric_key(client, ring)


def test_duplicate_key_ring_is_already_exists(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    with pytest.raises(gexc.AlreadyExists):
        client.create_key_ring(
            parent=f"projects/{PROJECT}/locations/{LOCATION}",
            key_ring_id=ring.rsplit("/", 1)[1],
            key_ring=kms_v1.KeyRing(),
        )


def test_algorithm_must_fit_the_purpose(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    with pytest.raises(gexc.InvalidArgument):
        client.create_crypto_key(
            parent=ring,
            crypto_key_id="k",
            crypto_key=kms_v1.CryptoKey(
                purpose=Purpose.ENCRYPT_DECRYPT,
                version_template=kms_v1.CryptoKeyVersionTemplate(algorithm=Algorithm.EC_SIGN_P256_SHA256),
            ),
        )


def test_versions_are_listed_in_order_across_pages(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    key = symmetric_key(client, ring)
    for _ in range(4):
        client.create_crypto_key_version(parent=key.name, crypto_key_version=kms_v1.CryptoKeyVersion())
    listed = list(client.list_crypto_key_versions(request={"parent": key.name, "page_size": 2}))
    assert [v.name.rsplit("/", 1)[1] for v in listed] == ["1", "2", "3", "4", "5"]
    assert all(v.state == State.ENABLED for v in listed)


def test_encrypt_names_the_version_and_checks_crc32c(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    key = symmetric_key(client, ring)
    response = client.encrypt(
        request={
            "name": key.name,
            "plaintext": DATA_KEY,
            "additional_authenticated_data": AAD,
            "plaintext_crc32c": crc32c(DATA_KEY),
            "additional_authenticated_data_crc32c": crc32c(AAD),
        }
    )
    assert response.name == f"{key.name}/cryptoKeyVersions/1"
    assert response.verified_plaintext_crc32c and response.verified_additional_authenticated_data_crc32c
    assert response.ciphertext_crc32c == crc32c(response.ciphertext)
    decrypted = client.decrypt(
        request={"name": key.name, "ciphertext": response.ciphertext, "additional_authenticated_data": AAD}
    )
    assert decrypted.plaintext == DATA_KEY and decrypted.plaintext_crc32c == crc32c(DATA_KEY)
    assert decrypted.used_primary is True


def test_crc32c_mismatch_is_rejected(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    key = symmetric_key(client, ring)
    with pytest.raises(gexc.InvalidArgument, match="checksum"):
        client.encrypt(
            request={"name": key.name, "plaintext": DATA_KEY, "plaintext_crc32c": crc32c(DATA_KEY) ^ 1}
        )
    ciphertext = client.encrypt(name=key.name, plaintext=DATA_KEY).ciphertext
    with pytest.raises(gexc.InvalidArgument, match="checksum"):
        client.decrypt(
            request={"name": key.name, "ciphertext": ciphertext, "ciphertext_crc32c": crc32c(ciphertext) ^ 1}
        )


def test_decrypt_under_other_aad_fails(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    key = symmetric_key(client, ring)
    ciphertext = client.encrypt(
        request={"name": key.name, "plaintext": DATA_KEY, "additional_authenticated_data": AAD}
    ).ciphertext
    with pytest.raises(gexc.InvalidArgument, match="Decryption failed"):
        client.decrypt(
            request={"name": key.name, "ciphertext": ciphertext, "additional_authenticated_data": b"other"}
        )


def test_disabled_version_fails_precondition(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    key = symmetric_key(client, ring)
    ciphertext = client.encrypt(name=key.name, plaintext=DATA_KEY).ciphertext
    client.update_crypto_key_version(
        crypto_key_version=kms_v1.CryptoKeyVersion(
            name=f"{key.name}/cryptoKeyVersions/1", state=State.DISABLED
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["state"]),
    )
    with pytest.raises(gexc.FailedPrecondition, match="DISABLED"):
        client.decrypt(name=key.name, ciphertext=ciphertext)
    with pytest.raises(gexc.FailedPrecondition):
        client.encrypt(name=key.name, plaintext=DATA_KEY)


def test_destroy_schedules_after_the_keys_duration_and_restore_disables(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    key = symmetric_key(client, ring)
    version = f"{key.name}/cryptoKeyVersions/1"
    destroyed = client.destroy_crypto_key_version(name=version)
    assert destroyed.state == State.DESTROY_SCHEDULED
    ahead = destroyed.destroy_time - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=29) < ahead <= datetime.timedelta(days=30)
    with pytest.raises(gexc.FailedPrecondition):
        client.destroy_crypto_key_version(name=version)
    assert client.restore_crypto_key_version(name=version).state == State.DISABLED


def test_destroy_scheduled_duration_outside_24h_to_120d_is_refused(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    with pytest.raises(gexc.InvalidArgument):
        client.create_crypto_key(
            parent=ring,
            crypto_key_id="k",
            crypto_key=kms_v1.CryptoKey(
                purpose=Purpose.ENCRYPT_DECRYPT,
                version_template={"algorithm": Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION},
                destroy_scheduled_duration=datetime.timedelta(hours=1),
            ),
        )


def test_asymmetric_keys_have_no_primary(client: kms_v1.KeyManagementServiceClient, ring: str) -> None:
    key = client.create_crypto_key(
        parent=ring,
        crypto_key_id="s",
        crypto_key=kms_v1.CryptoKey(
            purpose=Purpose.ASYMMETRIC_SIGN, version_template={"algorithm": Algorithm.EC_SIGN_P256_SHA256}
        ),
    )
    assert "primary" not in key
    with pytest.raises(gexc.FailedPrecondition):
        client.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="1")


def test_new_key_pair_is_pending_until_generated_then_signs_a_digest(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    client.create_crypto_key(
        parent=ring,
        crypto_key_id="s",
        crypto_key=kms_v1.CryptoKey(
            purpose=Purpose.ASYMMETRIC_SIGN, version_template={"algorithm": Algorithm.EC_SIGN_P256_SHA256}
        ),
    )
    version = f"{ring}/cryptoKeys/s/cryptoKeyVersions/1"
    listed = list(client.list_crypto_key_versions(parent=f"{ring}/cryptoKeys/s"))
    assert listed[0].state in (State.PENDING_GENERATION, State.ENABLED)
    for _ in range(200):
        if client.get_crypto_key_version(name=version).state == State.ENABLED:
            break
        time.sleep(0.01)
    digest = hashlib.sha256(b"message").digest()
    signed = client.asymmetric_sign(
        request={"name": version, "digest": {"sha256": digest}, "digest_crc32c": crc32c(digest)}
    )
    assert signed.verified_digest_crc32c and signed.name == version
    public = client.get_public_key(name=version)
    assert public.pem_crc32c == crc32c(public.pem.encode())
    key = serialization.load_pem_public_key(public.pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signed.signature, b"message", ec.ECDSA(hashes.SHA256()))


def test_create_response_shows_pending_generation_for_key_pairs(
    client: kms_v1.KeyManagementServiceClient, ring: str
) -> None:
    created = client.create_crypto_key_version(
        parent=client.create_crypto_key(
            parent=ring,
            crypto_key_id="s",
            crypto_key=kms_v1.CryptoKey(
                purpose=Purpose.ASYMMETRIC_SIGN,
                version_template={"algorithm": Algorithm.RSA_SIGN_PKCS1_3072_SHA256},
            ),
        ).name,
        crypto_key_version=kms_v1.CryptoKeyVersion(),
    )
    assert created.state == State.PENDING_GENERATION


# --- the adapter ------------------------------------------------------------------------


def test_protection_level_hsm_is_what_gets_requested(
    backend: GcpKmsKeyBackend, client: kms_v1.KeyManagementServiceClient, ring_id: str
) -> None:
    info = backend.create_key("wrapping", KeySpec.AES_256)
    assert (info.protection, info.fips_level) == (Protection.HSM, 3)
    key = client.get_crypto_key(name=f"{ring_path(ring_id)}/cryptoKeys/wrapping")
    assert key.version_template.protection_level == kms_v1.ProtectionLevel.HSM
    assert key.primary.protection_level == kms_v1.ProtectionLevel.HSM


def test_key_ring_is_created_when_missing(
    backend: GcpKmsKeyBackend, client: kms_v1.KeyManagementServiceClient, ring_id: str
) -> None:
    with pytest.raises(gexc.NotFound):
        client.get_key_ring(name=ring_path(ring_id))
    backend.create_key("first", KeySpec.EC_P256)
    assert client.get_key_ring(name=ring_path(ring_id)).name == ring_path(ring_id)


def test_state_lives_in_the_server(backend: GcpKmsKeyBackend, endpoint: str, ring_id: str) -> None:
    backend.create_key("shared", KeySpec.AES_256)
    wrapped = backend.wrap("shared", DATA_KEY, AAD)
    backend.rotate("shared")
    backend.disable("shared", 1)
    other = make_backend(endpoint, key_ring=ring_id)
    try:
        info = other.describe("shared")
        assert info.primary_version == 2
        assert [(v.number, v.state) for v in info.versions] == [
            (1, VersionState.DISABLED),
            (2, VersionState.ENABLED),
        ]
        with pytest.raises(KeyDisabledError):
            other.unwrap("shared", wrapped, AAD)
        other.enable("shared", 1)
        other.disable("shared")
        assert backend.describe("shared").enabled is False
        backend.enable("shared")
        assert other.unwrap("shared", wrapped, AAD) == DATA_KEY
    finally:
        other.close()


def test_disabling_a_key_is_a_label_and_leaves_versions_alone(
    backend: GcpKmsKeyBackend, client: kms_v1.KeyManagementServiceClient, ring_id: str
) -> None:
    backend.create_key("labelled", KeySpec.AES_256)
    backend.disable("labelled")
    key = client.get_crypto_key(name=f"{ring_path(ring_id)}/cryptoKeys/labelled")
    assert key.labels[ENABLED_LABEL] == "false"
    assert key.primary.state == State.ENABLED


def test_asymmetric_primary_is_the_newest_version(backend: GcpKmsKeyBackend) -> None:
    backend.create_key("signer", KeySpec.RSA_3072)
    backend.rotate("signer")
    info = backend.rotate("signer")
    assert info.primary_version == 3
    assert backend.sign("signer", b"m").version == 3


def test_blob_relabelled_to_another_existing_version_fails_integrity(backend: GcpKmsKeyBackend) -> None:
    backend.create_key("relabel", KeySpec.AES_256)
    version, body = unpack_wrapped(backend.wrap("relabel", DATA_KEY, AAD))
    backend.rotate("relabel")
    assert version == 1
    with pytest.raises(IntegrityError):
        backend.unwrap("relabel", pack_wrapped(2, body), AAD)


def test_destruction_comes_at_the_keys_window_never_sooner_than_asked(
    backend: GcpKmsKeyBackend, client: kms_v1.KeyManagementServiceClient, ring_id: str
) -> None:
    backend.create_key("doomed", KeySpec.AES_256)
    backend.rotate("doomed")
    with pytest.raises(KeyInputError, match="at most 30"):
        backend.schedule_destruction("doomed", 1, days=60)
    backend.schedule_destruction("doomed", 1, days=7)
    version = client.get_crypto_key_version(
        name=f"{ring_path(ring_id)}/cryptoKeys/doomed/cryptoKeyVersions/1"
    )
    assert version.destroy_time - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=29)
    backend.schedule_destruction("doomed", 1, days=7)  # already scheduled: nothing to do


def test_longer_destruction_window_is_set_at_creation(endpoint: str, ring_id: str) -> None:
    transport = KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
    backend = GcpKmsKeyBackend(
        project=PROJECT, location=LOCATION, key_ring=ring_id, transport=transport, destruction_window_days=120
    )
    try:
        backend.create_key("patient", KeySpec.AES_256)
        backend.rotate("patient")
        backend.schedule_destruction("patient", 1, days=120)
        assert backend.describe("patient").version(1).state is VersionState.DESTRUCTION_SCHEDULED
    finally:
        backend.close()


def test_public_key_of_a_disabled_version_is_refused_as_cloud_kms_does(backend: GcpKmsKeyBackend) -> None:
    backend.create_key("pk", KeySpec.EC_P256)
    backend.rotate("pk")
    backend.disable("pk", 1)
    with pytest.raises(KeyDisabledError):
        backend.public_key("pk", 1)
    assert backend.public_key("pk", 2).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_missing_versions_are_unknown(backend: GcpKmsKeyBackend) -> None:
    backend.create_key("few", KeySpec.AES_256)
    with pytest.raises(UnknownKeyError):
        backend.disable("few", 3)
    with pytest.raises(UnknownKeyError):
        backend.enable("few", 0)
    with pytest.raises(UnknownKeyError):
        backend.disable("absent")


def test_concurrent_wraps_and_unwraps_agree(backend: GcpKmsKeyBackend) -> None:
    backend.create_key("busy", KeySpec.AES_256)

    def round_trip(i: int) -> bytes:
        plaintext = i.to_bytes(4, "big") * 8
        return backend.unwrap("busy", backend.wrap("busy", plaintext, AAD), AAD)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(round_trip, range(64)))
    assert results == [i.to_bytes(4, "big") * 8 for i in range(64)]


def test_health_is_ok_when_reachable(backend: GcpKmsKeyBackend) -> None:
    health = backend.health()
    assert health.ok and health.provider == "gcp-kms"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_is_backend_unavailable() -> None:
    transport = KeyManagementServiceGrpcTransport(
        channel=grpc.insecure_channel(f"127.0.0.1:{_closed_port()}")
    )
    backend = GcpKmsKeyBackend(
        project=PROJECT, location=LOCATION, key_ring="r", transport=transport, retry_timeout=0.3, timeout=2.0
    )
    try:
        with pytest.raises(BackendUnavailableError):
            backend.describe("anything")
        with pytest.raises(BackendUnavailableError):
            backend.create_key("anything", KeySpec.AES_256)
        assert backend.health().ok is False
    finally:
        backend.close()


class _CorruptResponses(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Flips one bit of a response field on the wire side of the client, as a faulty
    network or proxy would; the adapter must notice through the CRC32C it checks."""

    def __init__(self, method: str, field: str) -> None:
        self.method, self.field = method, field

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith(f"/{self.method}") and outcome.exception() is None:
            response = outcome.result()
            value = bytearray(getattr(response, self.field))
            value[0] ^= 0x01
            setattr(response, self.field, bytes(value))
        return outcome


@pytest.mark.parametrize(("method", "field"), [("Encrypt", "ciphertext"), ("Decrypt", "plaintext")])
def test_response_corrupted_in_transit_is_caught_by_crc32c(
    endpoint: str, ring_id: str, method: str, field: str
) -> None:
    healthy = make_backend(endpoint, key_ring=ring_id)
    channel = grpc.intercept_channel(grpc.insecure_channel(endpoint), _CorruptResponses(method, field))
    faulty = GcpKmsKeyBackend(
        project=PROJECT,
        location=LOCATION,
        key_ring=ring_id,
        transport=KeyManagementServiceGrpcTransport(channel=channel),
    )
    try:
        healthy.create_key("crc", KeySpec.AES_256)
        wrapped = healthy.wrap("crc", DATA_KEY, AAD)
        with pytest.raises(BackendUnavailableError, match="CRC32C"):
            if method == "Encrypt":
                faulty.wrap("crc", DATA_KEY, AAD)
            else:
                faulty.unwrap("crc", wrapped, AAD)
    finally:
        faulty.close()
        healthy.close()

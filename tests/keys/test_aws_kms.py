"""What the aws_kms backend promises beyond the shared contract: its state lives in
KMS (any process sees it), KMS itself binds the associated data, FIPS endpoints in
FIPS mode, and a clear error when KMS cannot be reached.

Runs the real boto3 client over HTTP against the session's moto server; a second,
plain boto3 client looks at what the adapter left in KMS.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from keycell.adapters.keys.aws_kms import (
    FIPS_LEVEL,
    AwsKmsKeyBackend,
    encryption_context,
    primary_alias,
    version_alias,
)
from keycell.control_plane.keys import (
    BackendUnavailableError,
    KeyDisabledError,
    KeyExistsError,
    KeyInputError,
    KeySpec,
    Protection,
    VersionState,
    unpack_wrapped,
)
from keycell.testing.processes import free_port

REGION = "us-east-1"
DATA_KEY = bytes(range(32))
AAD = b"ledger:secret-version:secret/app/db#1"


@pytest.fixture
def endpoint(aws_endpoint: str) -> str:
    return aws_endpoint


@pytest.fixture
def backend(endpoint: str) -> Iterator[AwsKmsKeyBackend]:
    opened = AwsKmsKeyBackend(region=REGION, endpoint_url=endpoint)
    yield opened
    opened.close()


@pytest.fixture
def other_backend(endpoint: str) -> Iterator[AwsKmsKeyBackend]:
    """A second adapter, as another process would have: it shares only KMS."""
    opened = AwsKmsKeyBackend(region=REGION, endpoint_url=endpoint)
    yield opened
    opened.close()


@pytest.fixture
def kms(endpoint: str) -> Any:
    """A plain boto3 KMS client, to look at KMS without the adapter."""
    return boto3.client("kms", region_name=REGION, endpoint_url=endpoint)


@pytest.fixture
def name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def kms_state(kms: Any, alias: str) -> str:
    return str(kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyState"])


def kms_tags(kms: Any, alias: str) -> dict[str, str]:
    key_id = kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"]
    return {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]}


# --- the state is in KMS ----------------------------------------------------------------


def test_a_second_backend_sees_the_keys_versions_and_states(
    backend: AwsKmsKeyBackend, other_backend: AwsKmsKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    wrapped = backend.wrap(name, DATA_KEY, AAD)
    backend.rotate(name)
    backend.disable(name, 1)
    backend.disable(name)
    seen = other_backend.describe(name)
    assert seen == backend.describe(name)
    assert seen.enabled is False and seen.primary_version == 2
    assert [(v.number, v.state) for v in seen.versions] == [
        (1, VersionState.DISABLED),
        (2, VersionState.ENABLED),
    ]
    other_backend.enable(name)
    other_backend.enable(name, 1)
    assert backend.unwrap(name, wrapped, AAD) == DATA_KEY


def test_a_name_created_by_one_backend_is_taken_for_another(
    backend: AwsKmsKeyBackend, other_backend: AwsKmsKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.EC_P256)
    with pytest.raises(KeyExistsError):
        other_backend.create_key(name, KeySpec.AES_256)


def test_each_version_is_its_own_tagged_kms_key_behind_an_alias(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.RSA_3072)
    backend.rotate(name)
    v1 = kms.describe_key(KeyId=version_alias(name, 1))["KeyMetadata"]
    v2 = kms.describe_key(KeyId=version_alias(name, 2))["KeyMetadata"]
    assert v1["KeyId"] != v2["KeyId"]
    assert kms.describe_key(KeyId=primary_alias(name))["KeyMetadata"]["KeyId"] == v2["KeyId"]
    for meta in (v1, v2):
        assert (meta["KeySpec"], meta["KeyUsage"], meta["Origin"]) == ("RSA_3072", "SIGN_VERIFY", "AWS_KMS")
    assert kms_tags(kms, version_alias(name, 2)) == {
        "keycell:name": name,
        "keycell:version": "2",
        "keycell:spec": "rsa-3072",
    }


def test_key_level_disable_disables_every_kms_key_and_enable_restores_each_version(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.rotate(name)
    backend.rotate(name)
    backend.disable(name, 2)
    backend.disable(name)
    assert [kms_state(kms, version_alias(name, n)) for n in (1, 2, 3)] == ["Disabled"] * 3
    backend.enable(name)
    assert [kms_state(kms, version_alias(name, n)) for n in (1, 2, 3)] == ["Enabled", "Disabled", "Enabled"]
    assert [v.state for v in backend.describe(name).versions] == [
        VersionState.ENABLED,
        VersionState.DISABLED,
        VersionState.ENABLED,
    ]


def test_enabling_a_version_of_a_disabled_key_leaves_its_kms_key_off(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.rotate(name)
    backend.disable(name, 1)
    backend.disable(name)
    backend.enable(name, 1)
    assert kms_state(kms, version_alias(name, 1)) == "Disabled"
    assert backend.describe(name).version(1).state is VersionState.ENABLED
    backend.enable(name)
    assert kms_state(kms, version_alias(name, 1)) == "Enabled"


def test_rotating_a_disabled_key_adds_a_version_held_off_in_kms(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.disable(name)
    info = backend.rotate(name)
    assert info.enabled is False and info.version(2).state is VersionState.ENABLED
    assert kms_state(kms, version_alias(name, 2)) == "Disabled"
    backend.enable(name)
    assert kms_state(kms, version_alias(name, 2)) == "Enabled"


def test_destruction_schedules_deletion_of_the_versions_kms_key(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.rotate(name)
    backend.schedule_destruction(name, 1, days=7)
    meta = kms.describe_key(KeyId=version_alias(name, 1))["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    days_left = (meta["DeletionDate"].timestamp() - time.time()) / 86400
    assert 6.9 < days_left <= 7.0


def test_a_window_longer_than_kms_allows_is_refused_not_shortened(
    backend: AwsKmsKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.rotate(name)
    with pytest.raises(KeyInputError, match="7 to 30 days"):
        backend.schedule_destruction(name, 1, days=31)
    assert backend.describe(name).version(1).state is VersionState.ENABLED


def test_a_version_whose_kms_key_was_deleted_is_destroyed(
    backend: AwsKmsKeyBackend, kms: Any, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    old = backend.wrap(name, DATA_KEY, AAD)
    backend.rotate(name)
    backend.schedule_destruction(name, 1, days=7)
    # When the window passes, KMS deletes the key and every alias pointing at it.
    kms.delete_alias(AliasName=version_alias(name, 1))
    assert backend.describe(name).version(1).state is VersionState.DESTROYED
    with pytest.raises(KeyDisabledError, match="destroyed"):
        backend.unwrap(name, old, AAD)


def test_describe_says_hsm_at_fips_level_3(backend: AwsKmsKeyBackend, name: str) -> None:
    info = backend.create_key(name, KeySpec.EC_P256)
    assert (info.protection, info.fips_level, info.extractable) == (Protection.HSM, FIPS_LEVEL, False)
    assert FIPS_LEVEL == 3


# --- concurrency: processes racing through KMS -------------------------------------------


def run_together(count: int, work: Any) -> list[BaseException | None]:
    """Run `work(i)` in `count` threads started together; each one's exception or None."""
    results: list[BaseException | None] = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as err:  # reported to the test, never swallowed
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_creates_of_one_name_have_exactly_one_winner(endpoint: str, name: str) -> None:
    backends = [AwsKmsKeyBackend(region=REGION, endpoint_url=endpoint) for _ in range(4)]
    results = run_together(4, lambda i: backends[i].create_key(name, KeySpec.AES_256))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, KeyExistsError) for r in results if r is not None)
    assert backends[0].describe(name).primary_version == 1


def test_concurrent_rotations_get_distinct_versions_and_the_newest_is_primary(
    endpoint: str, name: str
) -> None:
    backends = [AwsKmsKeyBackend(region=REGION, endpoint_url=endpoint) for _ in range(3)]
    backends[0].create_key(name, KeySpec.AES_256)
    assert run_together(3, lambda i: backends[i].rotate(name)) == [None, None, None]
    info = backends[0].describe(name)
    assert [v.number for v in info.versions] == [1, 2, 3, 4]
    assert info.primary_version == 4
    assert unpack_wrapped(backends[1].wrap(name, DATA_KEY, AAD))[0] == 4


# --- the associated data is bound by KMS ----------------------------------------------


def test_associated_data_is_bound_by_kms_itself(backend: AwsKmsKeyBackend, kms: Any, name: str) -> None:
    backend.create_key(name, KeySpec.AES_256)
    _, ciphertext_blob = unpack_wrapped(backend.wrap(name, DATA_KEY, AAD))
    # The blob is a KMS CiphertextBlob that KMS opens only under the same context.
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=ciphertext_blob, EncryptionContext=encryption_context(AAD + b"-moved"))
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=ciphertext_blob, EncryptionContext=encryption_context(b""))
    opened = kms.decrypt(CiphertextBlob=ciphertext_blob, EncryptionContext=encryption_context(AAD))
    assert opened["Plaintext"] == DATA_KEY


@pytest.mark.parametrize("aad", [b"", b"-", b"\x00", b"x" * 2048, b"x" * 2049, bytes(8192)])
def test_large_and_empty_associated_data_round_trip(backend: AwsKmsKeyBackend, name: str, aad: bytes) -> None:
    backend.create_key(name, KeySpec.AES_256)
    assert backend.unwrap(name, backend.wrap(name, DATA_KEY, aad), aad) == DATA_KEY


def test_distinct_associated_data_gets_distinct_encryption_contexts() -> None:
    samples = [b"", b"-", b"\x00", b"LQ==", b"a", b"x" * 2048, b"x" * 2049, bytes(8192), bytes(8191)]
    contexts = {tuple(sorted(encryption_context(aad).items())) for aad in samples}
    assert len(contexts) == len(samples)


# --- endpoints and failures --------------------------------------------------------------


@pytest.fixture
def no_configured_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_USE_FIPS_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("no_configured_endpoint")
def test_fips_mode_without_an_endpoint_uses_the_fips_endpoint() -> None:
    fips = AwsKmsKeyBackend(region="eu-west-1", fips_mode=True)
    plain = AwsKmsKeyBackend(region="eu-west-1")
    assert fips.endpoint_url == "https://kms-fips.eu-west-1.amazonaws.com"
    assert plain.endpoint_url == "https://kms.eu-west-1.amazonaws.com"


@pytest.mark.usefixtures("no_configured_endpoint")
def test_fips_mode_keeps_an_explicit_endpoint(endpoint: str) -> None:
    assert AwsKmsKeyBackend(region=REGION, endpoint_url=endpoint, fips_mode=True).endpoint_url == endpoint


def test_the_endpoint_comes_from_the_environment_as_in_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:2")
    assert AwsKmsKeyBackend(region=REGION, fips_mode=True).endpoint_url == "http://127.0.0.1:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_KMS")
    assert AwsKmsKeyBackend(region=REGION).endpoint_url == "http://127.0.0.1:1"


@pytest.mark.usefixtures("aws_endpoint")  # only for its fake credentials
def test_an_unreachable_endpoint_is_backend_unavailable_quickly(name: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    backend = AwsKmsKeyBackend(region=REGION, endpoint_url=closed)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="could not be reached"):
        backend.wrap(name, DATA_KEY, AAD)
    with pytest.raises(BackendUnavailableError):
        backend.create_key(name, KeySpec.AES_256)
    health = backend.health()
    assert health.ok is False and health.provider == "aws-kms"
    assert time.monotonic() - started < 10


def test_missing_credentials_are_named_as_such(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    backend = AwsKmsKeyBackend(region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailableError, match="no AWS credentials"):
        backend.describe(name)


def test_health_reports_the_endpoint(backend: AwsKmsKeyBackend, endpoint: str) -> None:
    health = backend.health()
    assert health.ok is True and endpoint in health.detail

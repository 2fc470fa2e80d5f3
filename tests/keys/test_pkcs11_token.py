"""What the pkcs11 and cloudhsm backends promise beyond the shared contract, checked
against the token itself (SoftHSM2) and the cloudhsmv2 API (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pkcs11
import pytest
from keys_backend_cloudhsm import open_backend as open_cloudhsm
from keys_backend_cloudhsm import session_cluster
from keys_backend_pkcs11 import session_token
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from keycell.adapters.keys.cloudhsm import CloudHsmKeyBackend
from keycell.adapters.keys.pkcs11 import SHA256_DIGEST_INFO, Pkcs11KeyBackend
from keycell.control_plane.keys import (
    BackendUnavailableError,
    InvalidSignatureError,
    KeyDisabledError,
    KeySpec,
    Signature,
    VersionState,
)
from keycell.testing.softhsm import SoftHsmToken

DATA_KEY = bytes(range(32))
AAD = b"ledger:secret-version:secret/app/db#1"
WRONG_PIN = "wrong-pin-7f3a91"


@pytest.fixture
def token(request: pytest.FixtureRequest) -> SoftHsmToken:
    return session_token(request)


@pytest.fixture
def hsm(token: SoftHsmToken) -> Iterator[Pkcs11KeyBackend]:
    backend = Pkcs11KeyBackend(token.module, token.label, token.pin)
    try:
        yield backend
    finally:
        backend.close()


@contextmanager
def raw_session(token: SoftHsmToken) -> Iterator[pkcs11.Session]:
    """A plain python-pkcs11 session beside the backend. It opens without a PIN: the
    process is logged in through the backend already, and a session that logged in
    itself would log the whole process out when it closed."""
    with pkcs11.lib(token.module).get_token(token_label=token.label).open(rw=True) as session:
        yield session


def private_half(session: pkcs11.Session, name: str, spec: KeySpec, version: int = 1) -> Any:
    """The version's secret or private key object (typed Any: python-pkcs11 adds
    encrypt, sign, ... at run time, as the object's attributes allow)."""
    object_class = ObjectClass.SECRET_KEY if spec is KeySpec.AES_256 else ObjectClass.PRIVATE_KEY
    return session.get_key(object_class=object_class, label=f"keycell/{name}/v{version}")


# --- (1) the token refuses to let key material out --------------------------------------------


@pytest.mark.parametrize("spec", [KeySpec.AES_256, KeySpec.EC_P256, KeySpec.RSA_3072])
def test_token_reports_every_key_sensitive_and_never_extractable(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str, spec: KeySpec
) -> None:
    hsm.create_key(key_name, spec)
    with raw_session(token) as session:
        attrs = private_half(session, key_name, spec).get_attributes(
            [
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.TOKEN,
                Attribute.PRIVATE,
            ]
        )
    assert attrs == {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
    }


@pytest.mark.parametrize(
    ("spec", "secret_attribute"),
    [
        (KeySpec.AES_256, Attribute.VALUE),
        (KeySpec.EC_P256, Attribute.VALUE),
        (KeySpec.RSA_3072, Attribute.PRIVATE_EXPONENT),
    ],
)
def test_token_refuses_to_reveal_the_secret_value(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str, spec: KeySpec, secret_attribute: Attribute
) -> None:
    hsm.create_key(key_name, spec)
    with raw_session(token) as session, pytest.raises(p11.AttributeSensitive):
        private_half(session, key_name, spec)[secret_attribute]


@pytest.mark.parametrize("spec", [KeySpec.AES_256, KeySpec.EC_P256])
def test_token_refuses_to_wrap_the_key_out_under_another_key(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str, spec: KeySpec
) -> None:
    hsm.create_key(key_name, spec)
    with raw_session(token) as session:
        # A wrapping key the attacker controls: a session object allowed to wrap.
        wrapping: Any = session.generate_key(
            KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
        )
        with pytest.raises(p11.KeyUnextractable):
            wrapping.wrap_key(private_half(session, key_name, spec), mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_rsa_signature_over_the_digest_equals_the_tokens_own_sha256_rsa_pkcs(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str
) -> None:
    hsm.create_key(key_name, KeySpec.RSA_3072)
    message = b"spiffe://example.org/payments"
    ours = hsm.sign(key_name, message).value
    with raw_session(token) as session:
        key = private_half(session, key_name, KeySpec.RSA_3072)
        assert key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS) == ours
        digest_info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        assert key.sign(digest_info, mechanism=Mechanism.RSA_PKCS) == ours


# --- disabling is enforced inside the token --------------------------------------------------------


def test_disabled_version_is_refused_by_the_token_itself(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str
) -> None:
    hsm.create_key(key_name, KeySpec.AES_256)
    hsm.rotate(key_name)
    with raw_session(token) as session:
        # Found while enabled, so python-pkcs11 still offers encrypt(); the token decides.
        old = private_half(session, key_name, KeySpec.AES_256, 1)
        hsm.disable(key_name, 1)
        assert old.get_attributes([Attribute.ENCRYPT, Attribute.DECRYPT]) == {
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        }
        with pytest.raises(p11.PKCS11Error, match="0x68"):  # CKR_KEY_FUNCTION_NOT_PERMITTED
            old.encrypt(
                b"x", mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.GCMParams(os.urandom(12), b"")
            )
        assert private_half(session, key_name, KeySpec.AES_256, 2)[Attribute.ENCRYPT] is True
    hsm.enable(key_name, 1)
    with raw_session(token) as session:
        assert private_half(session, key_name, KeySpec.AES_256, 1)[Attribute.DECRYPT] is True


def test_disabled_signing_key_cannot_sign_in_the_token(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken, key_name: str
) -> None:
    hsm.create_key(key_name, KeySpec.EC_P256)
    hsm.disable(key_name)
    with raw_session(token) as session:
        assert private_half(session, key_name, KeySpec.EC_P256)[Attribute.SIGN] is False


def test_backend_with_stale_state_is_refused_by_the_token(token: SoftHsmToken, key_name: str) -> None:
    long_cache = Pkcs11KeyBackend(token.module, token.label, token.pin, state_ttl=3600)
    admin = Pkcs11KeyBackend(token.module, token.label, token.pin)
    try:
        admin.create_key(key_name, KeySpec.AES_256)
        wrapped = long_cache.wrap(key_name, DATA_KEY, AAD)  # caches the key as enabled
        admin.disable(key_name)
        with pytest.raises(KeyDisabledError, match="inside the HSM"):
            long_cache.unwrap(key_name, wrapped, AAD)
    finally:
        long_cache.close()
        admin.close()


# --- (2) state lives in the token ----------------------------------------------------------------


def test_key_state_survives_reopening_the_backend(token: SoftHsmToken, key_name: str) -> None:
    first = Pkcs11KeyBackend(token.module, token.label, token.pin)
    try:
        first.create_key(key_name, KeySpec.AES_256)
        old = first.wrap(key_name, DATA_KEY, AAD)
        first.rotate(key_name)
        new = first.wrap(key_name, DATA_KEY, AAD)
        first.disable(key_name, 1)
        first.create_key(key_name + "-off", KeySpec.EC_P256)
        first.disable(key_name + "-off")
        before = first.describe(key_name)
    finally:
        first.close()
    second = Pkcs11KeyBackend(token.module, token.label, token.pin)
    try:
        assert second.describe(key_name) == before
        assert [(v.number, v.state) for v in before.versions] == [
            (1, VersionState.DISABLED),
            (2, VersionState.ENABLED),
        ]
        assert second.unwrap(key_name, new, AAD) == DATA_KEY
        with pytest.raises(KeyDisabledError):
            second.unwrap(key_name, old, AAD)
        assert second.describe(key_name + "-off").enabled is False
        with pytest.raises(KeyDisabledError):
            second.sign(key_name + "-off", b"message")
    finally:
        second.close()


def test_destruction_date_passing_destroys_the_version_in_the_token(
    token: SoftHsmToken, hsm: Pkcs11KeyBackend, key_name: str
) -> None:
    hsm.create_key(key_name, KeySpec.EC_P256)
    hsm.rotate(key_name)
    hsm.schedule_destruction(key_name, 1, days=7)
    later = Pkcs11KeyBackend(
        token.module, token.label, token.pin, clock=lambda: datetime.now(UTC) + timedelta(days=8)
    )
    try:
        assert later.describe(key_name).version(1).state is VersionState.DESTROYED
        assert later.describe(key_name).version(2).state is VersionState.ENABLED
    finally:
        later.close()
    with raw_session(token) as session:
        assert list(session.get_objects({Attribute.LABEL: f"keycell/{key_name}/v1"})) == []
        assert len(list(session.get_objects({Attribute.LABEL: f"keycell/{key_name}/v2"}))) == 2


# --- (3) the session pool under threads ---------------------------------------------------------------


def test_eight_threads_wrap_unwrap_and_sign_through_a_small_pool(token: SoftHsmToken, key_name: str) -> None:
    backend = Pkcs11KeyBackend(token.module, token.label, token.pin, pool_size=3)
    failures: list[BaseException] = []
    rounds = 40
    try:
        backend.create_key(key_name + "-wrap", KeySpec.AES_256)
        backend.create_key(key_name + "-sign", KeySpec.EC_P256)
        start = threading.Barrier(8)

        def work(worker: int) -> None:
            try:
                start.wait()
                for i in range(rounds):
                    secret = f"{worker}:{i}".encode() * 4
                    aad = f"aad-{worker}".encode()
                    assert (
                        backend.unwrap(key_name + "-wrap", backend.wrap(key_name + "-wrap", secret, aad), aad)
                        == secret
                    )
                    signature = backend.sign(key_name + "-sign", secret)
                    backend.verify(key_name + "-sign", secret, signature)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []
        assert all(not thread.is_alive() for thread in threads)
        assert backend.health().ok
    finally:
        backend.close()


# --- (4) configuration errors are clear and never show the PIN ----------------------------------


def test_wrong_pin_is_refused_without_echoing_it(token: SoftHsmToken) -> None:
    with pytest.raises(BackendUnavailableError, match="incorrect PIN") as raised:
        Pkcs11KeyBackend(token.module, token.label, WRONG_PIN)
    assert WRONG_PIN not in str(raised.value) and token.pin not in str(raised.value)


def test_wrong_pin_is_refused_while_the_process_is_logged_in(
    hsm: Pkcs11KeyBackend, token: SoftHsmToken
) -> None:
    with pytest.raises(BackendUnavailableError, match="incorrect PIN") as raised:
        Pkcs11KeyBackend(token.module, token.label, WRONG_PIN)
    assert WRONG_PIN not in str(raised.value)
    assert hsm.health().ok  # the refused backend did not log the good one out


def test_missing_token_label_is_named_in_the_error(token: SoftHsmToken) -> None:
    with pytest.raises(BackendUnavailableError, match="no token labelled 'no-such-token'") as raised:
        Pkcs11KeyBackend(token.module, "no-such-token", token.pin)
    assert token.pin not in str(raised.value)


def test_missing_module_is_named_in_the_error(token: SoftHsmToken) -> None:
    with pytest.raises(BackendUnavailableError, match="cannot load the PKCS#11 module"):
        Pkcs11KeyBackend("/nonexistent/libpkcs11.so", token.label, token.pin)


def test_backend_is_configured_from_the_environment(
    token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYCELL_PKCS11_MODULE", token.module)
    monkeypatch.setenv("KEYCELL_PKCS11_TOKEN", token.label)
    monkeypatch.setenv("KEYCELL_PKCS11_PIN", token.pin)
    monkeypatch.setenv("KEYCELL_PKCS11_FIPS_LEVEL", "3")
    backend = Pkcs11KeyBackend.from_env()
    try:
        assert backend.fips_level == 3 and backend.health().ok
    finally:
        backend.close()


# --- (5) cloudhsm: the cluster through cloudhsmv2 ----------------------------------------------------


def test_cloudhsm_describes_its_cluster_from_the_aws_api(request: pytest.FixtureRequest) -> None:
    _, cluster_id = session_cluster(request)
    with open_cloudhsm(request, fips_mode=False) as backend:
        cluster = backend.describe_cluster()
    # moto creates clusters directly ACTIVE and cannot add HSMs (see cloudhsm.py).
    assert (cluster.cluster_id, cluster.state, cluster.hsm_type, cluster.hsm_count) == (
        cluster_id,
        "ACTIVE",
        "hsm2m.medium",
        0,
    )


def test_cloudhsm_is_healthy_when_the_cluster_is_active_and_the_token_answers(
    request: pytest.FixtureRequest,
) -> None:
    _, cluster_id = session_cluster(request)
    with open_cloudhsm(request, fips_mode=False) as backend:
        health = backend.health()
    assert health.ok is True and health.provider == "cloudhsm"
    assert f"cluster {cluster_id}" in health.detail and "logged in" in health.detail


def test_cloudhsm_keys_claim_fips_140_level_3(request: pytest.FixtureRequest, key_name: str) -> None:
    with open_cloudhsm(request, fips_mode=False) as backend:
        info = backend.create_key(key_name, KeySpec.AES_256)
    assert (info.provider, info.fips_level) == ("cloudhsm", 3)


def test_cloudhsm_with_an_unknown_cluster_is_unhealthy(request: pytest.FixtureRequest) -> None:
    with open_cloudhsm(request, fips_mode=False, cluster_id="cluster-nosuchcluster1") as backend:
        health = backend.health()
        assert health.ok is False and "no CloudHSM cluster 'cluster-nosuchcluster1'" in health.detail
        with pytest.raises(BackendUnavailableError):
            backend.describe_cluster()


def test_cloudhsm_with_a_deleted_cluster_is_unhealthy(request: pytest.FixtureRequest) -> None:
    endpoint, _ = session_cluster(request)
    client = boto3.client("cloudhsmv2", endpoint_url=endpoint)
    doomed = client.create_cluster(HsmType="hsm1.medium", SubnetIds=["subnet-0a1b2c3d"])["Cluster"][
        "ClusterId"
    ]
    with open_cloudhsm(request, fips_mode=False, cluster_id=doomed) as backend:
        assert backend.health().ok is True
        client.delete_cluster(ClusterId=doomed)
        assert backend.health().ok is False


def test_cloudhsm_never_wraps_with_an_iv_the_module_did_not_generate(
    request: pytest.FixtureRequest, token: SoftHsmToken, key_name: str
) -> None:
    """CloudHSM writes the IV it generates into the GCM parameters; SoftHSM2 does not,
    so a backend expecting that must refuse rather than encrypt under a zero IV."""
    endpoint, cluster_id = session_cluster(request)
    backend = CloudHsmKeyBackend(
        cluster_id, token.pin, module=token.module, token_label=token.label, endpoint_url=endpoint
    )
    try:
        backend.create_key(key_name, KeySpec.AES_256)
        with pytest.raises(BackendUnavailableError, match="did not return the AES-GCM IV"):
            backend.wrap(key_name, DATA_KEY, AAD)
    finally:
        backend.close()


def test_verify_rejects_a_signature_from_another_version(hsm: Pkcs11KeyBackend, key_name: str) -> None:
    hsm.create_key(key_name, KeySpec.EC_P256)
    first = hsm.sign(key_name, b"message")
    hsm.rotate(key_name)
    with pytest.raises(InvalidSignatureError):
        hsm.verify(key_name, b"message", Signature(2, first.value))


# --- the SoftHSM2 helper ------------------------------------------------------------------------


def test_throwaway_token_works_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """In a child process: a new token here would re-initialise this process's module."""
    script = textwrap.dedent(
        """
        import json, os
        from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
        from keycell.control_plane.keys import KeySpec
        from keycell.testing.softhsm import softhsm_token

        before = os.environ.get("SOFTHSM2_CONF")
        with softhsm_token(label="throwaway") as token:
            backend = Pkcs11KeyBackend(token.module, token.label, token.pin)
            backend.create_key("k", KeySpec.AES_256)
            ok = backend.unwrap("k", backend.wrap("k", b"secret", b""), b"") == b"secret"
            backend.close()
            directory = str(token.directory)
        print(json.dumps([ok, os.path.exists(directory), os.environ.get("SOFTHSM2_CONF") == before]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, False, True]

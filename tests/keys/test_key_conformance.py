"""The KeyBackend contract. Every test runs against every backend (see conftest.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keycell.control_plane.keys import (
    MAX_WRAP_BYTES,
    FipsModeError,
    IntegrityError,
    InvalidSignatureError,
    KeyBackend,
    KeyDisabledError,
    KeyExistsError,
    KeyInputError,
    KeySpec,
    Protection,
    Signature,
    UnknownKeyError,
    UnsupportedKeySpecError,
    VersionState,
    WrongKeyTypeError,
)

SIGNING = [KeySpec.EC_P256, KeySpec.RSA_3072]
# Edwards keys are a development convenience of the software backend only.
SUPPORTS_ED25519 = {"software", "software_stored"}
DATA_KEY = bytes(range(32))
AAD = b"ledger:secret-version:secret/app/db#1"

OpenBackend = Callable[[bool], AbstractContextManager[KeyBackend]]


def verify_independently(pem: bytes, spec: KeySpec, message: bytes, signature: bytes) -> None:
    """Check a signature with pyca/cryptography alone, outside the backend."""
    public = serialization.load_pem_public_key(pem)
    if spec is KeySpec.EC_P256:
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


# --- creating and describing ------------------------------------------------------------


def test_backend_satisfies_the_protocol(backend: KeyBackend) -> None:
    assert isinstance(backend, KeyBackend)


@pytest.mark.parametrize("spec", [KeySpec.AES_256, *SIGNING])
def test_created_key_is_described_as_non_extractable_version_one(
    backend: KeyBackend, key_name: str, spec: KeySpec
) -> None:
    info = backend.create_key(key_name, spec)
    assert info == backend.describe(key_name)
    assert (info.name, info.spec, info.provider) == (key_name, spec, backend.provider)
    assert info.extractable is False and info.enabled is True
    assert info.primary_version == 1
    assert [(v.number, v.state) for v in info.versions] == [(1, VersionState.ENABLED)]
    expected = Protection.SOFTWARE if backend.provider == "software" else Protection.HSM
    assert info.protection is expected


def test_second_key_with_the_same_name_is_refused(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    with pytest.raises(KeyExistsError):
        backend.create_key(key_name, KeySpec.EC_P256)
    assert backend.describe(key_name).spec is KeySpec.AES_256


def test_unknown_key_is_a_specific_error_everywhere(backend: KeyBackend, key_name: str) -> None:
    with pytest.raises(UnknownKeyError):
        backend.describe(key_name)
    with pytest.raises(UnknownKeyError):
        backend.wrap(key_name, DATA_KEY, AAD)
    with pytest.raises(UnknownKeyError):
        backend.sign(key_name, b"message")
    with pytest.raises(UnknownKeyError):
        backend.rotate(key_name)


@pytest.mark.parametrize(
    "name", ["", "-leading-dash", "has space", "under_score", "x" * 64, "slash/name", "é"]
)
def test_bad_key_names_are_refused(backend: KeyBackend, name: str) -> None:
    with pytest.raises(KeyInputError):
        backend.create_key(name, KeySpec.AES_256)


def test_ed25519_only_where_supported(backend: KeyBackend, backend_name: str, key_name: str) -> None:
    if backend_name in SUPPORTS_ED25519:
        backend.create_key(key_name, KeySpec.ED25519)
        signature = backend.sign(key_name, b"message")
        backend.verify(key_name, b"message", signature)
    else:
        with pytest.raises(UnsupportedKeySpecError):
            backend.create_key(key_name, KeySpec.ED25519)


def test_health_check_answers(backend: KeyBackend) -> None:
    health = backend.health()
    assert health.ok is True and health.provider == backend.provider


# --- wrap and unwrap ---------------------------------------------------------------------


def test_wrap_round_trips_a_data_key(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    wrapped = backend.wrap(key_name, DATA_KEY, AAD)
    assert DATA_KEY not in wrapped
    assert backend.unwrap(key_name, wrapped, AAD) == DATA_KEY


def test_wrap_round_trips_the_largest_and_smallest_plaintext(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    for plaintext in [b"\x00", os.urandom(MAX_WRAP_BYTES)]:
        assert backend.unwrap(key_name, backend.wrap(key_name, plaintext, b""), b"") == plaintext


def test_wrapping_twice_gives_different_blobs(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    assert backend.wrap(key_name, DATA_KEY, AAD) != backend.wrap(key_name, DATA_KEY, AAD)


def test_unwrap_under_other_associated_data_fails_integrity(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    wrapped = backend.wrap(key_name, DATA_KEY, AAD)
    with pytest.raises(IntegrityError):
        backend.unwrap(key_name, wrapped, AAD + b"-moved")
    with pytest.raises(IntegrityError):
        backend.unwrap(key_name, wrapped, b"")


@pytest.mark.parametrize("where", ["version", "first-body-byte", "middle", "last-byte"])
def test_tampered_blob_fails_integrity(backend: KeyBackend, key_name: str, where: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    wrapped = bytearray(backend.wrap(key_name, DATA_KEY, AAD))
    position = {"version": 4, "first-body-byte": 5, "middle": len(wrapped) // 2, "last-byte": -1}[where]
    wrapped[position] ^= 0x01
    with pytest.raises(IntegrityError):
        backend.unwrap(key_name, bytes(wrapped), AAD)


def test_truncated_blob_fails_integrity(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    wrapped = backend.wrap(key_name, DATA_KEY, AAD)
    for cut in [0, 3, 5, len(wrapped) - 1]:
        with pytest.raises(IntegrityError):
            backend.unwrap(key_name, wrapped[:cut], AAD)


def test_blob_from_another_key_fails_integrity(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    backend.create_key(key_name + "-b", KeySpec.AES_256)
    wrapped = backend.wrap(key_name, DATA_KEY, AAD)
    with pytest.raises(IntegrityError):
        backend.unwrap(key_name + "-b", wrapped, AAD)


@pytest.mark.parametrize(
    ("plaintext", "aad"),
    [
        (b"", b""),
        (b"x" * (MAX_WRAP_BYTES + 1), b""),
        ("text", b""),
        (DATA_KEY, "text"),
        (DATA_KEY, b"a" * 9000),
    ],
    ids=["empty", "too-long", "str-plaintext", "str-aad", "aad-too-long"],
)
def test_bad_wrap_input_is_refused(
    backend: KeyBackend, key_name: str, plaintext: object, aad: object
) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    with pytest.raises(KeyInputError):
        backend.wrap(key_name, plaintext, aad)  # type: ignore[arg-type]


# --- sign and verify -----------------------------------------------------------------


@pytest.mark.parametrize("spec", SIGNING)
def test_signature_verifies_in_the_backend_and_outside_it(
    backend: KeyBackend, key_name: str, spec: KeySpec
) -> None:
    backend.create_key(key_name, spec)
    message = b"spiffe://example.org/payments jwt-svid header.payload"
    signature = backend.sign(key_name, message)
    assert signature.version == 1
    backend.verify(key_name, message, signature)
    verify_independently(backend.public_key(key_name), spec, message, signature.value)


@pytest.mark.parametrize("spec", SIGNING)
def test_signature_over_another_message_is_invalid(backend: KeyBackend, key_name: str, spec: KeySpec) -> None:
    backend.create_key(key_name, spec)
    signature = backend.sign(key_name, b"original")
    with pytest.raises(InvalidSignatureError):
        backend.verify(key_name, b"forged", signature)


@pytest.mark.parametrize("spec", SIGNING)
def test_tampered_signature_is_invalid(backend: KeyBackend, key_name: str, spec: KeySpec) -> None:
    backend.create_key(key_name, spec)
    signature = backend.sign(key_name, b"message")
    flipped = bytearray(signature.value)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(InvalidSignatureError):
        backend.verify(key_name, b"message", Signature(signature.version, bytes(flipped)))
    with pytest.raises(InvalidSignatureError):
        backend.verify(key_name, b"message", Signature(7, signature.value))


def test_large_message_is_signed_by_digest(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.EC_P256)
    message = os.urandom(64 * 1024)  # larger than any provider's raw-message limit
    signature = backend.sign(key_name, message)
    verify_independently(backend.public_key(key_name), KeySpec.EC_P256, message, signature.value)
    assert hashlib.sha256(message).digest()  # the digest, not the message, crosses the boundary


# --- wrong key type ----------------------------------------------------------------------


def test_wrapping_key_does_not_sign_or_export(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    with pytest.raises(WrongKeyTypeError):
        backend.sign(key_name, b"message")
    with pytest.raises(WrongKeyTypeError):
        backend.public_key(key_name)


@pytest.mark.parametrize("spec", SIGNING)
def test_signing_key_does_not_wrap(backend: KeyBackend, key_name: str, spec: KeySpec) -> None:
    backend.create_key(key_name, spec)
    with pytest.raises(WrongKeyTypeError):
        backend.wrap(key_name, DATA_KEY, AAD)


# --- rotation --------------------------------------------------------------------------------


def test_rotation_keeps_old_blobs_readable(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    old = backend.wrap(key_name, DATA_KEY, AAD)
    info = backend.rotate(key_name)
    assert info.primary_version == 2
    assert [v.number for v in info.versions] == [1, 2]
    new = backend.wrap(key_name, DATA_KEY, AAD)
    assert new[:5] != old[:5]  # the header names the version
    assert backend.unwrap(key_name, old, AAD) == DATA_KEY
    assert backend.unwrap(key_name, new, AAD) == DATA_KEY


@pytest.mark.parametrize("spec", SIGNING)
def test_rotation_keeps_old_signatures_verifiable(backend: KeyBackend, key_name: str, spec: KeySpec) -> None:
    backend.create_key(key_name, spec)
    old = backend.sign(key_name, b"message")
    backend.rotate(key_name)
    new = backend.sign(key_name, b"message")
    assert (old.version, new.version) == (1, 2)
    backend.verify(key_name, b"message", old)
    backend.verify(key_name, b"message", new)
    assert backend.public_key(key_name, 1) != backend.public_key(key_name, 2)
    assert backend.public_key(key_name) == backend.public_key(key_name, 2)
    verify_independently(backend.public_key(key_name, 1), spec, b"message", old.value)
    with pytest.raises(UnknownKeyError):
        backend.public_key(key_name, 9)


# --- disable, enable, destroy --------------------------------------------------------------


def test_disabled_key_refuses_every_operation_until_enabled(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    wrapped = backend.wrap(key_name, DATA_KEY, AAD)
    backend.disable(key_name)
    assert backend.describe(key_name).enabled is False
    with pytest.raises(KeyDisabledError):
        backend.wrap(key_name, DATA_KEY, AAD)
    with pytest.raises(KeyDisabledError):
        backend.unwrap(key_name, wrapped, AAD)
    backend.enable(key_name)
    assert backend.unwrap(key_name, wrapped, AAD) == DATA_KEY


def test_disabled_version_refuses_its_blobs_only(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    old = backend.wrap(key_name, DATA_KEY, AAD)
    backend.rotate(key_name)
    new = backend.wrap(key_name, DATA_KEY, AAD)
    backend.disable(key_name, 1)
    assert backend.describe(key_name).version(1).state is VersionState.DISABLED
    with pytest.raises(KeyDisabledError):
        backend.unwrap(key_name, old, AAD)
    assert backend.unwrap(key_name, new, AAD) == DATA_KEY
    backend.enable(key_name, 1)
    assert backend.unwrap(key_name, old, AAD) == DATA_KEY


def test_disabled_signing_version_refuses_to_verify(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.EC_P256)
    old = backend.sign(key_name, b"message")
    backend.rotate(key_name)
    backend.disable(key_name, 1)
    with pytest.raises(KeyDisabledError):
        backend.verify(key_name, b"message", old)


def test_version_scheduled_for_destruction_is_unusable(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    old = backend.wrap(key_name, DATA_KEY, AAD)
    backend.rotate(key_name)
    backend.schedule_destruction(key_name, 1, days=7)
    assert backend.describe(key_name).version(1).state is VersionState.DESTRUCTION_SCHEDULED
    with pytest.raises(KeyDisabledError):
        backend.unwrap(key_name, old, AAD)
    with pytest.raises(KeyInputError):
        backend.enable(key_name, 1)


def test_primary_version_cannot_be_scheduled_for_destruction(backend: KeyBackend, key_name: str) -> None:
    backend.create_key(key_name, KeySpec.AES_256)
    with pytest.raises(KeyInputError, match="rotate first"):
        backend.schedule_destruction(key_name, 1, days=7)
    with pytest.raises(UnknownKeyError):
        backend.schedule_destruction(key_name, 5, days=7)


# --- FIPS mode ------------------------------------------------------------------------------


def test_fips_mode_refuses_non_approved_algorithms(
    open_backend: OpenBackend, backend_name: str, key_name: str
) -> None:
    if backend_name.startswith("software"):
        with pytest.raises(FipsModeError, match="development only"), open_backend(True):
            pass
        return
    with open_backend(True) as fips:
        with pytest.raises(FipsModeError, match="not a FIPS 140-2 approved"):
            fips.create_key(key_name, KeySpec.ED25519)
        fips.create_key(key_name, KeySpec.AES_256)
        assert fips.unwrap(key_name, fips.wrap(key_name, DATA_KEY, AAD), AAD) == DATA_KEY


def test_only_public_key_material_is_ever_exported(backend: KeyBackend, key_name: str) -> None:
    """The one export is a public key; keys are described as non-extractable. (The
    pkcs11 suite also asks the token itself for the secret value and is refused.)"""
    for spec in SIGNING:
        name = f"{key_name}-{spec.value}"
        backend.create_key(name, spec)
        pem = backend.public_key(name)
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----") and b"PRIVATE" not in pem
        assert backend.describe(name).extractable is False


def test_disabled_version_withholds_its_public_key(backend: KeyBackend, key_name: str) -> None:
    """As the clouds do (KMS GetPublicKey, Cloud KMS, Key Vault on a disabled key): a
    disabled version publishes nothing, so it drops out of JWKS and trust bundles."""
    backend.create_key(key_name, KeySpec.EC_P256)
    backend.rotate(key_name)
    backend.disable(key_name, 1)
    with pytest.raises(KeyDisabledError):
        backend.public_key(key_name, 1)
    assert backend.public_key(key_name, 2).startswith(b"-----BEGIN PUBLIC KEY-----")
    backend.enable(key_name, 1)
    assert backend.public_key(key_name, 1).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_stored_software_keys_are_shared_between_instances(tmp_path: object) -> None:
    from keycell.adapters.keys.software import SoftwareKeyBackend
    from keycell.adapters.ledgers.sqlite import SqliteLedger

    store = SqliteLedger(f"{tmp_path}/shared.db")
    first, second = SoftwareKeyBackend(store=store), SoftwareKeyBackend(store=store)
    first.create_key("shared", KeySpec.AES_256)
    wrapped = first.wrap("shared", DATA_KEY, AAD)
    assert second.unwrap("shared", wrapped, AAD) == DATA_KEY
    second.disable("shared")
    with pytest.raises(KeyDisabledError):
        first.wrap("shared", DATA_KEY, AAD)
    store.close()


def test_stored_software_keys_are_parsed_once_per_change_and_changes_show_at_once(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored key's record is parsed once and kept while its stored version holds:
    wraps do not parse it again, and a rotation or disable made by another instance on
    the same store shows in the next operation."""
    from keycell.adapters.keys.software import SoftwareKeyBackend
    from keycell.adapters.ledgers.sqlite import SqliteLedger
    from keycell.control_plane.keys import unpack_wrapped

    store = SqliteLedger(f"{tmp_path}/shared.db")
    first, second = SoftwareKeyBackend(store=store), SoftwareKeyBackend(store=store)
    first.create_key("shared", KeySpec.AES_256)
    parses: list[str] = []
    parse = first._parse

    def counted(name: str, value: bytes) -> object:
        parses.append(name)
        return parse(name, value)

    monkeypatch.setattr(first, "_parse", counted)
    blobs = [first.wrap("shared", DATA_KEY, AAD) for _ in range(5)]
    assert parses == ["shared"]
    assert {unpack_wrapped(blob)[0] for blob in blobs} == {1}
    assert first.describe("shared").primary_version == 1
    second.rotate("shared")
    rotated = first.wrap("shared", DATA_KEY, AAD)
    assert unpack_wrapped(rotated)[0] == 2
    assert first.describe("shared").primary_version == 2
    assert parses == ["shared", "shared"]
    assert second.unwrap("shared", rotated, AAD) == DATA_KEY
    assert first.unwrap("shared", blobs[0], AAD) == DATA_KEY
    second.disable("shared", 1)
    with pytest.raises(KeyDisabledError):
        first.unwrap("shared", blobs[0], AAD)
    assert first.unwrap("shared", rotated, AAD) == DATA_KEY
    second.disable("shared")
    with pytest.raises(KeyDisabledError):
        first.wrap("shared", DATA_KEY, AAD)
    store.close()

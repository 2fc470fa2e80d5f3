"""Transit: Vault's encrypt/decrypt/sign/verify semantics with every key in the cell's
key backend, on both ledgers (the `cell` fixture), with the software backend and,
in `TestOnPkcs11`, on a SoftHSM2 token."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.engines.transit.backend import BACKEND_PREFIX, MAX_NAME_CHARS, Transit
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.keys import (
    MAX_WRAP_BYTES,
    BackendUnavailableError,
    KeyBackend,
    VersionState,
)
from keycell.control_plane.ledger import Key, Kind
from keycell.testing.cells import Cell, open_cell
from keycell.testing.clock import ManualClock
from keycell.testing.key_backends import pkcs11_backend
from keycell.testing.softhsm import SoftHsmToken

SECRET = b"the launch code is 0000"
CONTEXT = base64.b64encode(b"tenant-42").decode()
OTHER_CONTEXT = base64.b64encode(b"tenant-43").decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@pytest.fixture
def backend() -> SoftwareKeyBackend:
    return SoftwareKeyBackend()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_700_000_000.0)  # creation times the tests can state exactly


@pytest.fixture
def transit(cell: Cell, backend: SoftwareKeyBackend, clock: ManualClock) -> Transit:
    """On both ledgers: for behaviour that reads and writes key records."""
    return Transit(cell.barrier, backend, clock=clock)


@pytest.fixture
def sqlite_cell(tmp_path: Path) -> Iterator[Cell]:
    ledger = SqliteLedger(tmp_path / "cell.db")
    yield open_cell(ledger)
    ledger.close()


@pytest.fixture
def local(sqlite_cell: Cell, backend: SoftwareKeyBackend, clock: ManualClock) -> Transit:
    """On one ledger: for input checks and cryptography, which no ledger changes."""
    return Transit(sqlite_cell.barrier, backend, clock=clock)


def signature_bytes(signature: str, marshaling: str = "asn1") -> bytes:
    payload = signature.split(":", 2)[2]
    if marshaling == "jws":
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return unb64(payload)


# --- encrypt / decrypt ------------------------------------------------------------------------


def test_small_plaintext_round_trips(transit: Transit) -> None:
    transit.create_key("orders")
    sealed = transit.encrypt("orders", b64(SECRET))
    assert sealed["key_version"] == 1
    assert sealed["ciphertext"].startswith("vault:v1:")
    assert SECRET not in unb64(sealed["ciphertext"].split(":", 2)[2])
    assert unb64(transit.decrypt("orders", sealed["ciphertext"])["plaintext"]) == SECRET


def test_empty_and_large_plaintexts_round_trip_through_an_envelope(transit: Transit) -> None:
    for size in (0, MAX_WRAP_BYTES + 1, 1024 * 1024):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        sealed = transit.encrypt("blobs", b64(payload))
        assert unb64(transit.decrypt("blobs", sealed["ciphertext"])["plaintext"]) == payload, size


def test_plaintext_over_one_mebibyte_is_refused(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="more than 1048576 bytes"):
        local.encrypt("blobs", b64(b"x" * (1024 * 1024 + 1)))


def test_encrypt_creates_a_missing_key_as_vault_does(transit: Transit) -> None:
    assert not transit.key_exists("fresh")
    transit.encrypt("fresh", b64(SECRET))
    key = transit.read_key("fresh")
    assert key["type"] == "aes256-gcm96"
    assert key["latest_version"] == 1


def test_encrypt_without_create_leaves_a_missing_key_missing(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="encryption key not found"):
        local.encrypt("fresh", b64(SECRET), create_missing=False)
    assert not local.key_exists("fresh")


def test_decrypt_needs_the_context_the_plaintext_was_encrypted_with(local: Transit) -> None:
    sealed = local.encrypt("orders", b64(SECRET), context_b64=CONTEXT)
    assert unb64(local.decrypt("orders", sealed["ciphertext"], context_b64=CONTEXT)["plaintext"]) == SECRET
    for wrong in (OTHER_CONTEXT, None):
        with pytest.raises(InvalidRequest, match=r"^cipher: message authentication failed$"):
            local.decrypt("orders", sealed["ciphertext"], context_b64=wrong)


def test_context_binds_large_payloads_too(local: Transit) -> None:
    sealed = local.encrypt("orders", b64(b"y" * 10_000), context_b64=CONTEXT)
    with pytest.raises(InvalidRequest, match="message authentication failed"):
        local.decrypt("orders", sealed["ciphertext"], context_b64=OTHER_CONTEXT)


def test_decrypt_with_a_key_that_does_not_exist_is_a_bad_request(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match=r"^encryption key not found$"):
        local.decrypt("nobody", "vault:v1:AAAA")


def test_encrypting_with_a_signing_key_is_refused(local: Transit) -> None:
    local.create_key("signer", "ecdsa-p256")
    with pytest.raises(InvalidRequest, match="not supported for key type ecdsa-p256"):
        local.encrypt("signer", b64(SECRET))


# --- malformed and tampered ciphertexts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ciphertext", "message"),
    [
        ("", "missing ciphertext to decrypt"),
        ("not-a-ciphertext", "invalid ciphertext: no prefix"),
        ("vault:v1", "invalid ciphertext: wrong number of fields"),
        ("vault:vX:AAAA", "invalid ciphertext: version number could not be decoded"),
        ("vault:v+1:AAAA", "invalid ciphertext: version number could not be decoded"),
        ("vault:v9:AAAA", "invalid ciphertext: version is too new"),
        ("vault:v1:***", "invalid ciphertext: could not decode base64"),
        ("vault:v1:", "invalid ciphertext: unknown format"),
        ("vault:v1:" + b64(b"\x07abc"), "invalid ciphertext: unknown format"),
        ("vault:v1:" + b64(b"\x01"), "invalid ciphertext: truncated or altered"),
        ("vault:v1:" + b64(b"\x02\x00\x40abc"), "invalid ciphertext: truncated"),
    ],
)
def test_malformed_ciphertexts_are_bad_requests(local: Transit, ciphertext: str, message: str) -> None:
    local.create_key("orders")
    with pytest.raises(InvalidRequest) as caught:
        local.decrypt("orders", ciphertext)
    assert caught.value.message.startswith(message)
    assert caught.value.status == 400


def test_non_string_ciphertext_is_a_bad_request(local: Transit) -> None:
    local.create_key("orders")
    with pytest.raises(InvalidRequest, match="invalid ciphertext"):
        local.decrypt("orders", 12345)


@pytest.mark.parametrize("size", [len(SECRET), 10_000])
def test_a_flipped_bit_fails_authentication(local: Transit, size: int) -> None:
    sealed = local.encrypt("orders", b64(b"z" * size))["ciphertext"]
    raw = bytearray(unb64(sealed.split(":", 2)[2]))
    raw[-1] ^= 1
    with pytest.raises(InvalidRequest, match=r"^cipher: message authentication failed$"):
        local.decrypt("orders", "vault:v1:" + b64(bytes(raw)))


def test_a_ciphertext_of_another_key_fails_authentication(local: Transit) -> None:
    sealed = local.encrypt("orders", b64(SECRET))["ciphertext"]
    local.create_key("invoices")
    with pytest.raises(InvalidRequest, match="message authentication failed"):
        local.decrypt("invoices", sealed)


def test_editing_the_version_prefix_cannot_dodge_min_decryption_version(local: Transit) -> None:
    old = local.encrypt("orders", b64(SECRET))["ciphertext"]
    local.rotate("orders")
    local.update_config("orders", min_decryption_version=2)
    forged = "vault:v2:" + old.split(":", 2)[2]
    with pytest.raises(InvalidRequest, match="invalid ciphertext"):
        local.decrypt("orders", forged)


# --- rotation, config, rewrap ------------------------------------------------------------------------


def test_rotation_encrypts_under_the_new_version_and_old_ciphertexts_still_decrypt(
    transit: Transit, clock: ManualClock
) -> None:
    old = transit.encrypt("orders", b64(SECRET))["ciphertext"]
    clock.now += 60
    rotated = transit.rotate("orders")
    assert rotated["latest_version"] == 2
    assert rotated["keys"] == {"1": 1_700_000_000, "2": 1_700_000_060}
    new = transit.encrypt("orders", b64(SECRET))
    assert new["key_version"] == 2
    assert new["ciphertext"].startswith("vault:v2:")
    assert unb64(transit.decrypt("orders", old)["plaintext"]) == SECRET


def test_min_decryption_version_refuses_older_ciphertexts_until_lowered(transit: Transit) -> None:
    old = transit.encrypt("orders", b64(SECRET))["ciphertext"]
    transit.rotate("orders")
    assert transit.update_config("orders", min_decryption_version=2)["min_decryption_version"] == 2
    with pytest.raises(
        InvalidRequest, match=r"^ciphertext or signature version is disallowed by policy \(too old\)$"
    ):
        transit.decrypt("orders", old)
    transit.update_config("orders", min_decryption_version=1)
    assert unb64(transit.decrypt("orders", old)["plaintext"]) == SECRET


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_decryption_version": 3}, "cannot set min decryption version of 3, latest key version is 2"),
        ({"min_encryption_version": 3}, "cannot set min encryption version of 3, latest key version is 2"),
        ({"min_decryption_version": -1}, "min decryption version cannot be negative"),
        ({"min_decryption_version": 2, "min_encryption_version": 1}, "min encryption version of 1 must be"),
        ({"min_decryption_version": "two"}, "min_decryption_version must be an integer"),
        ({"deletion_allowed": "maybe"}, "deletion_allowed must be a boolean"),
    ],
)
def test_config_is_validated_as_vault_does(local: Transit, settings: dict[str, object], message: str) -> None:
    local.create_key("orders")
    local.rotate("orders")
    with pytest.raises(InvalidRequest, match=message):
        local.update_config("orders", **settings)
    unchanged = local.read_key("orders")
    assert (unchanged["min_decryption_version"], unchanged["min_encryption_version"]) == (1, 0)


def test_config_takes_vault_cli_strings_and_zero_means_one(local: Transit) -> None:
    local.create_key("orders")
    local.rotate("orders")
    key = local.update_config("orders", min_decryption_version="2", deletion_allowed="true")
    assert (key["min_decryption_version"], key["deletion_allowed"]) == (2, True)
    assert local.update_config("orders", min_decryption_version=0)["min_decryption_version"] == 1


def test_config_of_a_missing_key_is_a_bad_request(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="no existing key named ghost could be found"):
        local.update_config("ghost", deletion_allowed=True)


def test_exporting_and_plaintext_backup_are_refused(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="never exportable"):
        local.create_key("orders", exportable=True)
    local.create_key("orders")
    with pytest.raises(InvalidRequest, match="plaintext"):
        local.update_config("orders", allow_plaintext_backup=True)


def test_rewrap_moves_a_ciphertext_to_the_latest_version(transit: Transit) -> None:
    old = transit.encrypt("orders", b64(SECRET), context_b64=CONTEXT)["ciphertext"]
    transit.rotate("orders")
    transit.rotate("orders")
    rewrapped = transit.rewrap("orders", old, CONTEXT)
    assert rewrapped["key_version"] == 3
    assert rewrapped["ciphertext"].startswith("vault:v3:")
    transit.update_config("orders", min_decryption_version=3)
    assert (
        unb64(transit.decrypt("orders", rewrapped["ciphertext"], context_b64=CONTEXT)["plaintext"]) == SECRET
    )


def test_key_version_must_be_the_latest(local: Transit) -> None:
    local.create_key("orders")
    local.rotate("orders")
    assert local.encrypt("orders", b64(SECRET), key_version=2)["key_version"] == 2
    assert local.encrypt("orders", b64(SECRET), key_version=0)["key_version"] == 2
    with pytest.raises(InvalidRequest, match="not the latest"):
        local.encrypt("orders", b64(SECRET), key_version=1)
    with pytest.raises(InvalidRequest, match="higher than the latest key version"):
        local.encrypt("orders", b64(SECRET), key_version=3)


def test_a_rotation_by_another_process_is_seen_at_once(cell: Cell, backend: SoftwareKeyBackend) -> None:
    first, second = Transit(cell.barrier, backend), Transit(cell.barrier, backend)
    first.create_key("orders")
    second.rotate("orders")
    assert first.encrypt("orders", b64(SECRET))["key_version"] == 2
    assert first.read_key("orders")["latest_version"] == 2


# --- batches ------------------------------------------------------------------------------------------


def test_batch_encrypt_reports_a_bad_item_and_encrypts_the_rest(transit: Transit) -> None:
    results = transit.encrypt_batch(
        "orders",
        [
            {"plaintext": b64(b"one"), "context": CONTEXT, "reference": "a"},
            {"plaintext": "%%% not base64", "reference": "b"},
            {"plaintext": b64(b"three")},
        ],
    )["batch_results"]
    assert [sorted(r) for r in results] == [
        ["ciphertext", "key_version", "reference"],
        ["error", "reference"],
        ["ciphertext", "key_version"],
    ]
    assert "base64" in results[1]["error"]
    assert results[1]["reference"] == "b"
    opened = transit.decrypt("orders", results[0]["ciphertext"], context_b64=CONTEXT)
    assert unb64(opened["plaintext"]) == b"one"


def test_batch_decrypt_reports_a_bad_item_and_decrypts_the_rest(transit: Transit) -> None:
    good = transit.encrypt("orders", b64(b"one"))["ciphertext"]
    wrong_context = transit.encrypt("orders", b64(b"two"), context_b64=CONTEXT)["ciphertext"]
    results = transit.decrypt_batch(
        "orders",
        [
            {"ciphertext": good},
            {"ciphertext": "garbage"},
            {"ciphertext": wrong_context, "context": OTHER_CONTEXT},
        ],
    )["batch_results"]
    assert unb64(results[0]["plaintext"]) == b"one"
    assert results[1] == {"error": "invalid ciphertext: no prefix"}
    assert results[2] == {"error": "cipher: message authentication failed"}


@pytest.mark.parametrize("items", [[], "plaintext", [["not", "an", "object"]]])
def test_a_malformed_batch_is_a_bad_request(local: Transit, items: object) -> None:
    with pytest.raises(InvalidRequest):
        local.encrypt_batch("orders", items)


# --- sign / verify ------------------------------------------------------------------------------------


def public_key(transit: Transit, name: str, version: int = 1) -> object:
    pem = transit.read_key(name)["keys"][str(version)]["public_key"]
    return serialization.load_pem_public_key(pem.encode())


@pytest.mark.parametrize("marshaling", ["asn1", "jws"])
def test_ecdsa_signature_verifies(local: Transit, marshaling: str) -> None:
    local.create_key("signer", "ecdsa-p256")
    signed = local.sign("signer", b64(SECRET), marshaling_algorithm=marshaling)
    assert signed["key_version"] == 1
    assert signed["signature"].startswith("vault:v1:")
    verified = local.verify("signer", b64(SECRET), signed["signature"], marshaling_algorithm=marshaling)
    assert verified == {"valid": True}


def test_ecdsa_asn1_signature_verifies_with_cryptography_against_read_key(local: Transit) -> None:
    local.create_key("signer", "ecdsa-p256")
    signature = signature_bytes(local.sign("signer", b64(SECRET))["signature"])
    key = public_key(local, "signer")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, SECRET, ec.ECDSA(hashes.SHA256()))


def test_ecdsa_jws_signature_is_raw_r_and_s_in_base64url(local: Transit) -> None:
    local.create_key("signer", "ecdsa-p256")
    signature = local.sign("signer", b64(SECRET), marshaling_algorithm="jws")["signature"]
    assert "=" not in signature and "+" not in signature and "/" not in signature
    raw = signature_bytes(signature, "jws")
    assert len(raw) == 64
    key = public_key(local, "signer")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, SECRET, ec.ECDSA(hashes.SHA256()))


def test_rsa_3072_pkcs1v15_signature_verifies_here_and_with_cryptography(local: Transit) -> None:
    local.create_key("rsa-signer", "rsa-3072")
    signed = local.sign("rsa-signer", b64(SECRET), signature_algorithm="pkcs1v15")
    verified = local.verify("rsa-signer", b64(SECRET), signed["signature"], signature_algorithm="pkcs1v15")
    assert verified == {"valid": True}
    key = public_key(local, "rsa-signer")
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    key.verify(signature_bytes(signed["signature"]), SECRET, padding.PKCS1v15(), hashes.SHA256())
    assert local.read_key("rsa-signer")["keys"]["1"]["name"] == "rsa-3072"


@pytest.mark.parametrize("algorithm", [None, "pss", "nonsense"])
def test_rsa_signatures_other_than_pkcs1v15_are_refused(local: Transit, algorithm: str | None) -> None:
    local.create_key("rsa-signer", "rsa-3072")
    with pytest.raises(InvalidRequest, match="pkcs1v15"):
        local.sign("rsa-signer", b64(SECRET), signature_algorithm=algorithm)


@pytest.mark.parametrize("marshaling", ["asn1", "jws"])
def test_verify_of_a_tampered_input_is_invalid_not_an_error(local: Transit, marshaling: str) -> None:
    local.create_key("signer", "ecdsa-p256")
    signature = local.sign("signer", b64(SECRET), marshaling_algorithm=marshaling)["signature"]
    tampered = b64(SECRET + b"!")
    assert local.verify("signer", tampered, signature, marshaling_algorithm=marshaling) == {"valid": False}


def test_verify_of_a_tampered_rsa_input_is_invalid(local: Transit) -> None:
    local.create_key("rsa-signer", "rsa-3072")
    signature = local.sign("rsa-signer", b64(SECRET), signature_algorithm="pkcs1v15")["signature"]
    result = local.verify("rsa-signer", b64(b"other"), signature, signature_algorithm="pkcs1v15")
    assert result == {"valid": False}


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ("MEUCIQ==", "invalid signature: no prefix"),
        ("vault:v1", "invalid signature: wrong number of fields"),
        ("vault:v2:MEUCIQ==", "invalid signature: version is too new"),
        ("vault:v1:@@@", "invalid base64 signature value"),
        ("vault:v1:" + b64(b"not DER"), "supplied signature is invalid"),
    ],
)
def test_a_malformed_signature_is_a_bad_request(local: Transit, signature: str, message: str) -> None:
    local.create_key("signer", "ecdsa-p256")
    with pytest.raises(InvalidRequest, match=message):
        local.verify("signer", b64(SECRET), signature)


def test_a_signature_of_the_wrong_length_in_jws_is_invalid(local: Transit) -> None:
    local.create_key("signer", "ecdsa-p256")
    forged = "vault:v1:" + base64.urlsafe_b64encode(b"\x01" * 63).decode().rstrip("=")
    assert local.verify("signer", b64(SECRET), forged, marshaling_algorithm="jws") == {"valid": False}


def test_old_signatures_verify_after_rotation_until_min_decryption_version(local: Transit) -> None:
    local.create_key("signer", "ecdsa-p256")
    old = local.sign("signer", b64(SECRET))["signature"]
    local.rotate("signer")
    assert local.sign("signer", b64(SECRET))["key_version"] == 2
    assert local.verify("signer", b64(SECRET), old) == {"valid": True}
    local.update_config("signer", min_decryption_version=2)
    with pytest.raises(InvalidRequest, match="too old"):
        local.verify("signer", b64(SECRET), old)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hash_algorithm": "sha2-512"}, "not supported"),
        ({"hash_algorithm": "md5"}, "invalid hash algorithm"),
        ({"prehashed": True}, "prehashed"),
        ({"marshaling_algorithm": "pem"}, "invalid marshaling type"),
    ],
)
def test_unsupported_signing_options_are_refused(
    local: Transit, options: dict[str, object], message: str
) -> None:
    local.create_key("signer", "ecdsa-p256")
    with pytest.raises(InvalidRequest, match=message):
        local.sign("signer", b64(SECRET), **options)


def test_signing_with_an_encryption_key_or_a_missing_key_is_refused(local: Transit) -> None:
    local.create_key("orders")
    with pytest.raises(InvalidRequest, match="aes256-gcm96 does not support signing"):
        local.sign("orders", b64(SECRET))
    with pytest.raises(InvalidRequest, match=r"^encryption key not found$"):
        local.sign("ghost", b64(SECRET))
    with pytest.raises(InvalidRequest, match=r"^encryption key not found$"):
        local.verify("ghost", b64(SECRET), "vault:v1:AAAA")


# --- keys -------------------------------------------------------------------------------------------------


def test_read_key_answers_vaults_fields_for_a_symmetric_key(local: Transit) -> None:
    local.create_key("orders")
    key = local.read_key("orders")
    assert key["keys"] == {"1": 1_700_000_000}
    expected = {
        "name": "orders",
        "type": "aes256-gcm96",
        "latest_version": 1,
        "min_decryption_version": 1,
        "min_encryption_version": 0,
        "deletion_allowed": False,
        "exportable": False,
        "allow_plaintext_backup": False,
        "derived": False,
        "supports_encryption": True,
        "supports_decryption": True,
        "supports_derivation": False,
        "supports_signing": False,
    }
    assert {k: key[k] for k in expected} == expected
    json.dumps(key)  # the payload is plain JSON


def test_read_key_publishes_each_version_of_an_asymmetric_key(local: Transit, clock: ManualClock) -> None:
    local.create_key("signer", "ecdsa-p256")
    clock.now += 1
    local.rotate("signer")
    key = local.read_key("signer")
    assert key["supports_signing"] and not key["supports_encryption"]
    assert set(key["keys"]) == {"1", "2"}
    assert key["keys"]["1"]["name"] == "P-256"
    assert key["keys"]["1"]["creation_time"] == "2023-11-14T22:13:20Z"
    assert key["keys"]["1"]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert key["keys"]["1"]["public_key"] != key["keys"]["2"]["public_key"]


def test_creating_an_existing_key_changes_nothing(local: Transit) -> None:
    created = local.create_key("orders")
    sealed = local.encrypt("orders", b64(SECRET))["ciphertext"]
    assert local.create_key("orders", "ecdsa-p256") == created
    assert unb64(local.decrypt("orders", sealed)["plaintext"]) == SECRET


def test_read_of_a_missing_key_is_not_found(local: Transit) -> None:
    with pytest.raises(NotFound):
        local.read_key("ghost")


@pytest.mark.parametrize(
    "name", ["", "under_score", "dot.ted", "-leading", "sla/sh", "ü", "x" * (MAX_NAME_CHARS + 1), 7]
)
def test_names_that_cannot_name_a_backend_key_are_refused(local: Transit, name: object) -> None:
    with pytest.raises(InvalidRequest, match="invalid key name"):
        local.create_key(name)  # type: ignore[arg-type]


def test_the_longest_name_maps_to_a_backend_key(local: Transit, backend: SoftwareKeyBackend) -> None:
    name = "n" * MAX_NAME_CHARS
    local.create_key(name)
    assert backend.describe(BACKEND_PREFIX + name).primary_version == 1


@pytest.mark.parametrize("key_type", ["aes128-gcm96", "chacha20-poly1305", "ed25519", "rsa-2048", "hmac"])
def test_unsupported_key_types_are_refused_naming_the_supported_ones(local: Transit, key_type: str) -> None:
    with pytest.raises(InvalidRequest, match="supported types: aes256-gcm96, ecdsa-p256, rsa-3072"):
        local.create_key("orders", key_type)


def test_derived_keys_are_refused(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="derived"):
        local.create_key("orders", derived=True)


def test_list_keys_names_this_mounts_keys_only(
    cell: Cell, transit: Transit, backend: SoftwareKeyBackend
) -> None:
    with pytest.raises(NotFound):
        transit.list_keys()
    transit.create_key("b-key")
    transit.create_key("a-key", "ecdsa-p256")
    other = Transit(cell.barrier, backend, mount="transit-eu")
    other.create_key("c-key")
    assert transit.list_keys() == {"keys": ["a-key", "b-key"]}
    assert other.list_keys() == {"keys": ["c-key"]}


def test_two_mounts_keep_same_named_keys_apart(
    cell: Cell, transit: Transit, backend: SoftwareKeyBackend
) -> None:
    other = Transit(cell.barrier, backend, mount="transit-eu")
    sealed = transit.encrypt("orders", b64(SECRET))["ciphertext"]
    other.create_key("orders")
    with pytest.raises(InvalidRequest, match="message authentication failed"):
        other.decrypt("orders", sealed)


# --- deletion -------------------------------------------------------------------------------------------


def test_a_key_cannot_be_deleted_unless_deletion_is_allowed(transit: Transit) -> None:
    transit.create_key("orders")
    with pytest.raises(InvalidRequest, match="deletion is not allowed for this key"):
        transit.delete_key("orders")
    assert transit.read_key("orders")["name"] == "orders"


def test_deleting_a_missing_key_is_a_bad_request_as_in_vault(local: Transit) -> None:
    with pytest.raises(InvalidRequest, match="could not delete key; not found"):
        local.delete_key("ghost")


def test_deletion_removes_the_key_and_schedules_its_backend_versions_for_destruction(
    transit: Transit, backend: SoftwareKeyBackend
) -> None:
    sealed = transit.encrypt("orders", b64(SECRET))["ciphertext"]
    transit.rotate("orders")
    transit.update_config("orders", deletion_allowed=True)
    transit.delete_key("orders")
    with pytest.raises(NotFound):
        transit.read_key("orders")
    with pytest.raises(InvalidRequest, match="encryption key not found"):
        transit.decrypt("orders", sealed)
    info = backend.describe(BACKEND_PREFIX + "orders")
    assert not info.enabled
    assert info.primary_version == 3  # a fresh, never-used primary
    assert [v.state for v in info.versions[:2]] == [VersionState.DESTRUCTION_SCHEDULED] * 2


def test_a_deleted_name_is_created_again_with_fresh_key_material(
    transit: Transit, backend: SoftwareKeyBackend
) -> None:
    sealed = transit.encrypt("orders", b64(SECRET))["ciphertext"]
    transit.update_config("orders", deletion_allowed=True)
    transit.delete_key("orders")
    transit.create_key("orders")
    with pytest.raises(InvalidRequest, match="message authentication failed"):
        transit.decrypt("orders", sealed)
    assert (
        unb64(transit.decrypt("orders", transit.encrypt("orders", b64(SECRET))["ciphertext"])["plaintext"])
        == SECRET
    )
    assert not backend.describe(BACKEND_PREFIX + "orders").enabled


class FailingDestruction:
    """The real software backend, whose schedule_destruction fails while `failing`."""

    def __init__(self, inner: SoftwareKeyBackend) -> None:
        self.inner = inner
        self.failing = True

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if self.failing:
            raise BackendUnavailableError("HSM unreachable")
        self.inner.schedule_destruction(name, version, days=days)

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)


def test_an_interrupted_deletion_hides_the_key_and_is_finished_by_the_next_delete(
    cell: Cell, backend: SoftwareKeyBackend
) -> None:
    flaky = FailingDestruction(backend)
    transit = Transit(cell.barrier, flaky)  # type: ignore[arg-type]
    transit.create_key("orders")
    transit.update_config("orders", deletion_allowed=True)
    with pytest.raises(Unavailable):
        transit.delete_key("orders")
    with pytest.raises(NotFound):
        transit.read_key("orders")
    with pytest.raises(NotFound):
        transit.list_keys()
    flaky.failing = False
    transit.delete_key("orders")
    assert cell.barrier.get(Key(Kind.TRANSIT_KEY, "transit/orders")) is None
    versions = backend.describe(BACKEND_PREFIX + "orders").versions
    assert versions[0].state is VersionState.DESTRUCTION_SCHEDULED


def test_the_ledger_holds_the_config_and_no_key_material(cell: Cell, transit: Transit) -> None:
    transit.create_key("orders")
    item = cell.barrier.get(Key(Kind.TRANSIT_KEY, "transit/orders"))
    assert item is not None
    record = json.loads(item.value)
    assert record["backend_key"] == "transit-orders"
    assert set(record) >= {"type", "latest_version", "min_decryption_version", "deletion_allowed", "created"}


# --- on an HSM ------------------------------------------------------------------------------------------


@pytest.fixture
def hsm(softhsm: SoftHsmToken) -> Iterator[KeyBackend]:
    backend = pkcs11_backend(softhsm)
    yield backend
    backend.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class TestOnPkcs11:
    """The same engine with its keys on a SoftHSM2 token (shared by the session: names are
    unique). One ledger: these exercise the backend; the ledgers are covered above."""

    def test_small_and_large_plaintexts_round_trip(self, sqlite_cell: Cell, hsm: KeyBackend) -> None:
        transit = Transit(sqlite_cell.barrier, hsm)
        name = unique("orders")
        for payload in (SECRET, b"L" * 100_000):
            sealed = transit.encrypt(name, b64(payload), context_b64=CONTEXT)["ciphertext"]
            assert unb64(transit.decrypt(name, sealed, context_b64=CONTEXT)["plaintext"]) == payload
            with pytest.raises(InvalidRequest, match="message authentication failed"):
                transit.decrypt(name, sealed, context_b64=OTHER_CONTEXT)

    def test_rotation_and_min_decryption_version(self, sqlite_cell: Cell, hsm: KeyBackend) -> None:
        transit = Transit(sqlite_cell.barrier, hsm)
        name = unique("orders")
        old = transit.encrypt(name, b64(SECRET))["ciphertext"]
        transit.rotate(name)
        assert transit.rewrap(name, old)["key_version"] == 2
        transit.update_config(name, min_decryption_version=2)
        with pytest.raises(InvalidRequest, match="too old"):
            transit.decrypt(name, old)

    @pytest.mark.parametrize("marshaling", ["asn1", "jws"])
    def test_ecdsa_signature_verifies_here_and_with_cryptography(
        self, sqlite_cell: Cell, hsm: KeyBackend, marshaling: str
    ) -> None:
        transit = Transit(sqlite_cell.barrier, hsm)
        name = unique("signer")
        transit.create_key(name, "ecdsa-p256")
        signature = transit.sign(name, b64(SECRET), marshaling_algorithm=marshaling)["signature"]
        assert transit.verify(name, b64(SECRET), signature, marshaling_algorithm=marshaling) == {
            "valid": True
        }
        assert transit.verify(name, b64(b"tampered"), signature, marshaling_algorithm=marshaling) == {
            "valid": False
        }
        raw = signature_bytes(signature, marshaling)
        if marshaling == "jws":
            raw = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key = public_key(transit, name)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(raw, SECRET, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.verify(raw, b"tampered", ec.ECDSA(hashes.SHA256()))

    def test_deletion_retires_the_hsm_key(self, sqlite_cell: Cell, hsm: KeyBackend) -> None:
        transit = Transit(sqlite_cell.barrier, hsm)
        name = unique("orders")
        sealed = transit.encrypt(name, b64(SECRET))["ciphertext"]
        transit.update_config(name, deletion_allowed=True)
        transit.delete_key(name)
        info = hsm.describe(BACKEND_PREFIX + name)
        assert not info.enabled
        assert info.version(1).state is VersionState.DESTRUCTION_SCHEDULED
        transit.create_key(name)  # the name is free again, with new material
        with pytest.raises(InvalidRequest, match="message authentication failed"):
            transit.decrypt(name, sealed)

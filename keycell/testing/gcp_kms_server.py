"""A local Cloud KMS: the v1 gRPC API subset Keycell's `gcp_kms` adapter uses, on 127.0.0.1.

It exists so the real google-cloud-kms client (its gRPC transport over an insecure
channel) can be tested against a peer that speaks the documented wire API: the
messages are the client's own proto classes (google.cloud.kms_v1), the method paths
are `/google.cloud.kms.v1.KeyManagementService/<Method>`, and failures are gRPC status
codes with the meanings Cloud KMS gives them (NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION for a version that is not ENABLED, INVALID_ARGUMENT for bad input,
a CRC32C mismatch or a ciphertext that does not decrypt).

The server runs in its own process and plays the HSM: key material is generated
there with pyca/cryptography and never leaves it; clients only ever see ciphertext,
signatures and public keys. State is in memory and lives as long as the process.

Served: CreateKeyRing, GetKeyRing, CreateCryptoKey, GetCryptoKey, UpdateCryptoKey
(labels), CreateCryptoKeyVersion, GetCryptoKeyVersion, ListCryptoKeyVersions (paged),
UpdateCryptoKeyVersion (state), UpdateCryptoKeyPrimaryVersion, DestroyCryptoKeyVersion,
RestoreCryptoKeyVersion, Encrypt, Decrypt, AsymmetricSign, GetPublicKey. Algorithms:
GOOGLE_SYMMETRIC_ENCRYPTION, EC_SIGN_P256_SHA256, RSA_SIGN_PKCS1_3072_SHA256.

Like the service, asymmetric versions start PENDING_GENERATION and become ENABLED
once their key pair exists (generated on a background thread), and a version
scheduled for destruction turns DESTROYED (its material wiped) when its destroy_time
passes. Where it differs from the service: no IAM, no locations list, no rotation
schedule, no import, no operations on other purposes; the ciphertext layout is this
server's own (the service's is undocumented too: clients must treat it as opaque).

Run by hand with `python -m keycell.testing.gcp_kms_server --port 0` (prints the port).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import signal
import struct
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport

from keycell.adapters.keys.gcp_kms import crc32c
from keycell.testing.processes import ManagedServer, ServerProcess, announce_ready

SERVICE = "google.cloud.kms.v1.KeyManagementService"
_log = logging.getLogger(__name__)

Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
ProtectionLevel = kms_v1.ProtectionLevel

_PURPOSE_ALGORITHMS = {
    Purpose.ENCRYPT_DECRYPT: {Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION},
    Purpose.ASYMMETRIC_SIGN: {Algorithm.EC_SIGN_P256_SHA256, Algorithm.RSA_SIGN_PKCS1_3072_SHA256},
}
# The service's documented limits.
_MAX_PLAINTEXT = 64 * 1024
_MAX_AAD = 64 * 1024
_MIN_DESTROY_SCHEDULED = datetime.timedelta(hours=24)
_MAX_DESTROY_SCHEDULED = datetime.timedelta(days=120)
_DEFAULT_DESTROY_SCHEDULED = datetime.timedelta(days=30)
_DEFAULT_PAGE_SIZE = 100
_MAX_PAGE_SIZE = 1000

_ID = r"[a-zA-Z0-9_-]{1,63}"
_LOCATION = re.compile(r"projects/[^/]+/locations/[^/]+")
_KEY_RING = re.compile(rf"(projects/[^/]+/locations/[^/]+)/keyRings/({_ID})")
_CRYPTO_KEY = re.compile(rf"(projects/[^/]+/locations/[^/]+/keyRings/{_ID})/cryptoKeys/({_ID})")
_VERSION = re.compile(
    rf"(projects/[^/]+/locations/[^/]+/keyRings/{_ID}/cryptoKeys/{_ID})/cryptoKeyVersions/(\d+)"
)
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")

# Ciphertext: format byte, version number (u32), nonce, AES-256-GCM output. The
# header is authenticated together with the caller's AAD, so neither can be moved.
_CIPHERTEXT_HEADER = struct.Struct(">BI")
_CIPHERTEXT_FORMAT = 0x4B
_NONCE = 12
_DECRYPTION_FAILED = "Decryption failed: verify that 'name' refers to the correct CryptoKey."


class RpcFailure(Exception):
    """A failure to return as a gRPC status (the service's google.rpc.Status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _not_found(kind: str, name: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.NOT_FOUND, f"{kind} {name} not found.")


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class _Version:
    name: str
    number: int
    algorithm: Any
    protection_level: Any
    state: Any
    create_time: datetime.datetime
    secret: Any = None  # AESGCM or a private key: never serialized, never returned
    generate_time: datetime.datetime | None = None
    destroy_time: datetime.datetime | None = None
    destroy_event_time: datetime.datetime | None = None

    def message(self) -> kms_v1.CryptoKeyVersion:
        return kms_v1.CryptoKeyVersion(
            name=self.name,
            state=self.state,
            protection_level=self.protection_level,
            algorithm=self.algorithm,
            create_time=self.create_time,
            generate_time=self.generate_time,
            destroy_time=self.destroy_time,
            destroy_event_time=self.destroy_event_time,
        )


@dataclass
class _CryptoKey:
    name: str
    purpose: Any
    algorithm: Any
    protection_level: Any
    destroy_scheduled_duration: datetime.timedelta
    create_time: datetime.datetime
    labels: dict[str, str] = field(default_factory=dict)
    primary: int | None = None
    versions: dict[int, _Version] = field(default_factory=dict)

    def message(self) -> kms_v1.CryptoKey:
        key = kms_v1.CryptoKey(
            name=self.name,
            purpose=self.purpose,
            create_time=self.create_time,
            version_template=kms_v1.CryptoKeyVersionTemplate(
                protection_level=self.protection_level, algorithm=self.algorithm
            ),
            labels=self.labels,
            destroy_scheduled_duration=self.destroy_scheduled_duration,
        )
        # Only ENCRYPT_DECRYPT keys have a primary; the service omits it otherwise.
        if self.primary is not None and self.primary in self.versions:
            key.primary = self.versions[self.primary].message()
        return key


def _crc_ok(data: bytes, checksum: int | None, field_name: str) -> bool:
    """True when the caller sent a checksum and it matches; a mismatch fails the call."""
    if checksum is None:
        return False
    if crc32c(data) != checksum:
        raise _invalid(
            f"The checksum in field {field_name} did not match the data in field "
            f"{field_name.removesuffix('_crc32c')}."
        )
    return True


class KmsService:
    """The state and the RPC implementations. Thread-safe: one lock over the tables;
    cryptography runs outside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_rings: dict[str, datetime.datetime] = {}
        self._keys: dict[str, _CryptoKey] = {}

    # --- lookups (call with the lock held) -------------------------------------------

    def _key(self, name: str) -> _CryptoKey:
        if not _CRYPTO_KEY.fullmatch(name):
            raise _invalid(f"Resource name [{name}] does not match the CryptoKey pattern.")
        key = self._keys.get(name)
        if key is None:
            raise _not_found("CryptoKey", name)
        return key

    def _version(self, name: str) -> tuple[_CryptoKey, _Version]:
        match = _VERSION.fullmatch(name)
        if not match:
            raise _invalid(f"Resource name [{name}] does not match the CryptoKeyVersion pattern.")
        key = self._key(match.group(1))
        version = key.versions.get(int(match.group(2)))
        if version is None:
            raise _not_found("CryptoKeyVersion", name)
        self._expire(key, version)
        return key, version

    def _expire(self, key: _CryptoKey, version: _Version) -> None:
        """Destruction happens when its time comes; the material is wiped then."""
        if (
            version.state == State.DESTROY_SCHEDULED
            and version.destroy_time is not None
            and _now() >= version.destroy_time
        ):
            version.state = State.DESTROYED
            version.destroy_event_time = version.destroy_time
            version.secret = None

    @staticmethod
    def _require_enabled(version: _Version) -> None:
        if version.state != State.ENABLED:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{version.name} is not enabled, current state is: {State(version.state).name}.",
            )

    # --- key rings --------------------------------------------------------------------

    def create_key_ring(self, request: kms_v1.CreateKeyRingRequest) -> kms_v1.KeyRing:
        if not _LOCATION.fullmatch(request.parent):
            raise _invalid(f"Resource name [{request.parent}] does not match the location pattern.")
        if not re.fullmatch(_ID, request.key_ring_id):
            raise _invalid("key_ring_id must match [a-zA-Z0-9_-]{1,63}.")
        name = f"{request.parent}/keyRings/{request.key_ring_id}"
        with self._lock:
            if name in self._key_rings:
                raise RpcFailure(grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
            created = self._key_rings[name] = _now()
        return kms_v1.KeyRing(name=name, create_time=created)

    def get_key_ring(self, request: kms_v1.GetKeyRingRequest) -> kms_v1.KeyRing:
        if not _KEY_RING.fullmatch(request.name):
            raise _invalid(f"Resource name [{request.name}] does not match the KeyRing pattern.")
        with self._lock:
            created = self._key_rings.get(request.name)
        if created is None:
            raise _not_found("KeyRing", request.name)
        return kms_v1.KeyRing(name=request.name, create_time=created)

    # --- crypto keys ------------------------------------------------------------------

    def create_crypto_key(self, request: kms_v1.CreateCryptoKeyRequest) -> kms_v1.CryptoKey:
        if not re.fullmatch(_ID, request.crypto_key_id):
            raise _invalid("crypto_key_id must match [a-zA-Z0-9_-]{1,63}.")
        template = request.crypto_key.version_template
        purpose = request.crypto_key.purpose
        if purpose not in _PURPOSE_ALGORITHMS:
            raise _invalid(f"CryptoKey.purpose {Purpose(purpose).name} is not supported by this server.")
        if template.algorithm not in _PURPOSE_ALGORITHMS[purpose]:
            raise _invalid(
                f"CryptoKey.version_template.algorithm {Algorithm(template.algorithm).name} "
                f"is not valid for purpose {Purpose(purpose).name}."
            )
        protection = template.protection_level or ProtectionLevel.SOFTWARE
        if protection not in (ProtectionLevel.SOFTWARE, ProtectionLevel.HSM):
            raise _invalid(f"protection level {ProtectionLevel(protection).name} is not supported.")
        duration = _DEFAULT_DESTROY_SCHEDULED
        if "destroy_scheduled_duration" in request.crypto_key:
            duration = request.crypto_key.destroy_scheduled_duration
            if not _MIN_DESTROY_SCHEDULED <= duration <= _MAX_DESTROY_SCHEDULED:
                raise _invalid("destroy_scheduled_duration must be between 24 hours and 120 days.")
        labels = dict(request.crypto_key.labels)
        self._check_labels(labels)
        name = f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        with self._lock:
            if not _KEY_RING.fullmatch(request.parent):
                raise _invalid(f"Resource name [{request.parent}] does not match the KeyRing pattern.")
            if request.parent not in self._key_rings:
                raise _not_found("KeyRing", request.parent)
            if name in self._keys:
                raise RpcFailure(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
            key = _CryptoKey(
                name=name,
                purpose=purpose,
                algorithm=template.algorithm,
                protection_level=protection,
                destroy_scheduled_duration=duration,
                create_time=_now(),
                labels=labels,
            )
            self._keys[name] = key
            if not request.skip_initial_version_creation:
                self._add_version(key)
            return key.message()

    def get_crypto_key(self, request: kms_v1.GetCryptoKeyRequest) -> kms_v1.CryptoKey:
        with self._lock:
            key = self._key(request.name)
            for version in key.versions.values():
                self._expire(key, version)
            return key.message()

    def update_crypto_key(self, request: kms_v1.UpdateCryptoKeyRequest) -> kms_v1.CryptoKey:
        paths = list(request.update_mask.paths)
        if not paths:
            raise _invalid("update_mask is required.")
        unsupported = [p for p in paths if p != "labels"]
        if unsupported:
            raise _invalid(f"update_mask paths {unsupported} are not supported by this server (only labels).")
        labels = dict(request.crypto_key.labels)
        self._check_labels(labels)
        with self._lock:
            key = self._key(request.crypto_key.name)
            key.labels = labels
            return key.message()

    @staticmethod
    def _check_labels(labels: dict[str, str]) -> None:
        for k, v in labels.items():
            if not _LABEL_KEY.fullmatch(k) or not _LABEL_VALUE.fullmatch(v):
                raise _invalid(f"label {k}={v} is invalid: lowercase letters, digits, _ and - only.")

    # --- versions ---------------------------------------------------------------------

    def _add_version(self, key: _CryptoKey) -> _Version:
        """A new version (lock held). Symmetric material is ready at once; key pairs are
        generated in the background, as the service does (PENDING_GENERATION)."""
        number = max(key.versions, default=0) + 1
        version = _Version(
            name=f"{key.name}/cryptoKeyVersions/{number}",
            number=number,
            algorithm=key.algorithm,
            protection_level=key.protection_level,
            state=State.PENDING_GENERATION,
            create_time=_now(),
        )
        key.versions[number] = version
        if key.algorithm == Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION:
            version.secret = AESGCM(AESGCM.generate_key(bit_length=256))
            version.state = State.ENABLED
            version.generate_time = version.create_time
            if key.primary is None:
                key.primary = number
        else:
            threading.Thread(target=self._generate, args=(version,), daemon=True).start()
        return version

    def _generate(self, version: _Version) -> None:
        private: Any
        if version.algorithm == Algorithm.EC_SIGN_P256_SHA256:
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        with self._lock:
            version.secret = private
            version.state = State.ENABLED
            version.generate_time = _now()

    def create_crypto_key_version(
        self, request: kms_v1.CreateCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        with self._lock:
            key = self._key(request.parent)
            return self._add_version(key).message()

    def get_crypto_key_version(self, request: kms_v1.GetCryptoKeyVersionRequest) -> kms_v1.CryptoKeyVersion:
        with self._lock:
            return self._version(request.name)[1].message()

    def list_crypto_key_versions(
        self, request: kms_v1.ListCryptoKeyVersionsRequest
    ) -> kms_v1.ListCryptoKeyVersionsResponse:
        if request.filter or request.order_by:
            raise _invalid("filter and order_by are not supported by this server.")
        if request.page_size < 0:
            raise _invalid("page_size must not be negative.")
        size = min(request.page_size or _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE)
        try:
            start = int(request.page_token or "0")
        except ValueError:
            raise _invalid("page_token is invalid.") from None
        with self._lock:
            key = self._key(request.parent)
            numbers = sorted(key.versions)
            page = []
            for number in numbers[start : start + size]:
                self._expire(key, key.versions[number])
                page.append(key.versions[number].message())
        more = start + size < len(numbers)
        return kms_v1.ListCryptoKeyVersionsResponse(
            crypto_key_versions=page,
            next_page_token=str(start + size) if more else "",
            total_size=len(numbers),
        )

    def update_crypto_key_version(
        self, request: kms_v1.UpdateCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        if list(request.update_mask.paths) != ["state"]:
            raise _invalid("update_mask must be exactly [state] on this server.")
        wanted = request.crypto_key_version.state
        if wanted not in (State.ENABLED, State.DISABLED):
            raise _invalid("CryptoKeyVersion.state can only be updated to ENABLED or DISABLED.")
        with self._lock:
            _, version = self._version(request.crypto_key_version.name)
            if version.state not in (State.ENABLED, State.DISABLED):
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{version.name} is in state {State(version.state).name}; only ENABLED and "
                    "DISABLED versions can change state.",
                )
            version.state = wanted
            return version.message()

    def update_crypto_key_primary_version(
        self, request: kms_v1.UpdateCryptoKeyPrimaryVersionRequest
    ) -> kms_v1.CryptoKey:
        with self._lock:
            key = self._key(request.name)
            if key.purpose != Purpose.ENCRYPT_DECRYPT:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{key.name} has purpose {Purpose(key.purpose).name}; only ENCRYPT_DECRYPT keys have a primary.",
                )
            try:
                number = int(request.crypto_key_version_id)
            except ValueError:
                raise _invalid("crypto_key_version_id must be a version number.") from None
            _, version = self._version(f"{key.name}/cryptoKeyVersions/{number}")
            self._require_enabled(version)
            key.primary = number
            return key.message()

    def destroy_crypto_key_version(
        self, request: kms_v1.DestroyCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        with self._lock:
            key, version = self._version(request.name)
            if version.state not in (State.ENABLED, State.DISABLED):
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{version.name} is in state {State(version.state).name}; only ENABLED and "
                    "DISABLED versions can be scheduled for destruction.",
                )
            version.state = State.DESTROY_SCHEDULED
            version.destroy_time = _now() + key.destroy_scheduled_duration
            return version.message()

    def restore_crypto_key_version(
        self, request: kms_v1.RestoreCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        with self._lock:
            _, version = self._version(request.name)
            if version.state != State.DESTROY_SCHEDULED:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION, f"{version.name} is not scheduled for destruction."
                )
            version.state = State.DISABLED
            version.destroy_time = None
            return version.message()

    # --- cryptography -----------------------------------------------------------------

    def encrypt(self, request: kms_v1.EncryptRequest) -> kms_v1.EncryptResponse:
        if not request.plaintext:
            raise _invalid("plaintext is required.")
        if len(request.plaintext) > _MAX_PLAINTEXT:
            raise _invalid(f"plaintext is larger than {_MAX_PLAINTEXT} bytes.")
        if len(request.additional_authenticated_data) > _MAX_AAD:
            raise _invalid(f"additional_authenticated_data is larger than {_MAX_AAD} bytes.")
        plaintext_verified = _crc_ok(request.plaintext, request.plaintext_crc32c, "plaintext_crc32c")
        aad_verified = _crc_ok(
            request.additional_authenticated_data,
            request.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
        )
        with self._lock:
            if _VERSION.fullmatch(request.name):
                key, version = self._version(request.name)
            else:
                key = self._key(request.name)
                if key.primary is None:
                    raise RpcFailure(
                        grpc.StatusCode.FAILED_PRECONDITION, f"{key.name} has no primary version."
                    )
                key, version = self._version(f"{key.name}/cryptoKeyVersions/{key.primary}")
            if key.purpose != Purpose.ENCRYPT_DECRYPT:
                raise _invalid(f"{key.name} has purpose {Purpose(key.purpose).name}, not ENCRYPT_DECRYPT.")
            self._require_enabled(version)
            aead = version.secret
        header = _CIPHERTEXT_HEADER.pack(_CIPHERTEXT_FORMAT, version.number)
        nonce = os.urandom(_NONCE)
        ciphertext = (
            header
            + nonce
            + aead.encrypt(nonce, request.plaintext, header + request.additional_authenticated_data)
        )
        return kms_v1.EncryptResponse(
            name=version.name,
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext),
            verified_plaintext_crc32c=plaintext_verified,
            verified_additional_authenticated_data_crc32c=aad_verified,
            protection_level=version.protection_level,
        )

    def decrypt(self, request: kms_v1.DecryptRequest) -> kms_v1.DecryptResponse:
        _crc_ok(request.ciphertext, request.ciphertext_crc32c, "ciphertext_crc32c")
        _crc_ok(
            request.additional_authenticated_data,
            request.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
        )
        ciphertext = request.ciphertext
        if len(ciphertext) < _CIPHERTEXT_HEADER.size + _NONCE + 16:
            raise _invalid(_DECRYPTION_FAILED)
        fmt, number = _CIPHERTEXT_HEADER.unpack_from(ciphertext)
        with self._lock:
            key = self._key(request.name)  # a CryptoKey: the server picks the version
            if key.purpose != Purpose.ENCRYPT_DECRYPT:
                raise _invalid(f"{key.name} has purpose {Purpose(key.purpose).name}, not ENCRYPT_DECRYPT.")
            if fmt != _CIPHERTEXT_FORMAT or number not in key.versions:
                raise _invalid(_DECRYPTION_FAILED)
            _, version = self._version(f"{key.name}/cryptoKeyVersions/{number}")
            self._require_enabled(version)
            aead = version.secret
            used_primary = key.primary == number
        header_end = _CIPHERTEXT_HEADER.size
        nonce = ciphertext[header_end : header_end + _NONCE]
        try:
            plaintext = aead.decrypt(
                nonce,
                ciphertext[header_end + _NONCE :],
                ciphertext[:header_end] + request.additional_authenticated_data,
            )
        except InvalidTag:
            raise _invalid(_DECRYPTION_FAILED) from None
        return kms_v1.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            used_primary=used_primary,
            protection_level=version.protection_level,
        )

    def asymmetric_sign(self, request: kms_v1.AsymmetricSignRequest) -> kms_v1.AsymmetricSignResponse:
        if request.data:
            raise _invalid("data is only accepted for algorithms that sign raw data; send a digest.")
        digest = request.digest.sha256
        if request.digest.sha384 or request.digest.sha512 or len(digest) != 32:
            raise _invalid("digest must be a 32-byte SHA-256 digest for this algorithm.")
        verified = _crc_ok(digest, request.digest_crc32c, "digest_crc32c")
        with self._lock:
            key, version = self._version(request.name)
            if key.purpose != Purpose.ASYMMETRIC_SIGN:
                raise _invalid(f"{key.name} has purpose {Purpose(key.purpose).name}, not ASYMMETRIC_SIGN.")
            self._require_enabled(version)
            private = version.secret
        if version.algorithm == Algorithm.EC_SIGN_P256_SHA256:
            signature = private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            signature = private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=crc32c(signature),
            verified_digest_crc32c=verified,
            name=version.name,
            protection_level=version.protection_level,
        )

    def get_public_key(self, request: kms_v1.GetPublicKeyRequest) -> kms_v1.PublicKey:
        with self._lock:
            key, version = self._version(request.name)
            if key.purpose != Purpose.ASYMMETRIC_SIGN:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{key.name} has purpose {Purpose(key.purpose).name}; it has no public key.",
                )
            self._require_enabled(version)
            public = version.secret.public_key()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return kms_v1.PublicKey(
            pem=pem.decode(),
            pem_crc32c=crc32c(pem),
            algorithm=version.algorithm,
            name=version.name,
            protection_level=version.protection_level,
        )


# --- the gRPC server ------------------------------------------------------------------------

_METHODS: dict[str, tuple[str, type[Any], type[Any]]] = {
    "CreateKeyRing": ("create_key_ring", kms_v1.CreateKeyRingRequest, kms_v1.KeyRing),
    "GetKeyRing": ("get_key_ring", kms_v1.GetKeyRingRequest, kms_v1.KeyRing),
    "CreateCryptoKey": ("create_crypto_key", kms_v1.CreateCryptoKeyRequest, kms_v1.CryptoKey),
    "GetCryptoKey": ("get_crypto_key", kms_v1.GetCryptoKeyRequest, kms_v1.CryptoKey),
    "UpdateCryptoKey": ("update_crypto_key", kms_v1.UpdateCryptoKeyRequest, kms_v1.CryptoKey),
    "CreateCryptoKeyVersion": (
        "create_crypto_key_version",
        kms_v1.CreateCryptoKeyVersionRequest,
        kms_v1.CryptoKeyVersion,
    ),
    "GetCryptoKeyVersion": (
        "get_crypto_key_version",
        kms_v1.GetCryptoKeyVersionRequest,
        kms_v1.CryptoKeyVersion,
    ),
    "ListCryptoKeyVersions": (
        "list_crypto_key_versions",
        kms_v1.ListCryptoKeyVersionsRequest,
        kms_v1.ListCryptoKeyVersionsResponse,
    ),
    "UpdateCryptoKeyVersion": (
        "update_crypto_key_version",
        kms_v1.UpdateCryptoKeyVersionRequest,
        kms_v1.CryptoKeyVersion,
    ),
    "UpdateCryptoKeyPrimaryVersion": (
        "update_crypto_key_primary_version",
        kms_v1.UpdateCryptoKeyPrimaryVersionRequest,
        kms_v1.CryptoKey,
    ),
    "DestroyCryptoKeyVersion": (
        "destroy_crypto_key_version",
        kms_v1.DestroyCryptoKeyVersionRequest,
        kms_v1.CryptoKeyVersion,
    ),
    "RestoreCryptoKeyVersion": (
        "restore_crypto_key_version",
        kms_v1.RestoreCryptoKeyVersionRequest,
        kms_v1.CryptoKeyVersion,
    ),
    "Encrypt": ("encrypt", kms_v1.EncryptRequest, kms_v1.EncryptResponse),
    "Decrypt": ("decrypt", kms_v1.DecryptRequest, kms_v1.DecryptResponse),
    "AsymmetricSign": ("asymmetric_sign", kms_v1.AsymmetricSignRequest, kms_v1.AsymmetricSignResponse),
    "GetPublicKey": ("get_public_key", kms_v1.GetPublicKeyRequest, kms_v1.PublicKey),
}


def _unary(method: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(request)
        except RpcFailure as failure:
            context.abort(failure.code, failure.message)
        except Exception:
            _log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "Internal error encountered.")

    return handle


def serve(port: int = 0, *, service: KmsService | None = None, workers: int = 16) -> tuple[grpc.Server, int]:
    """Start a gRPC server on 127.0.0.1 (port 0: any free port); return it and its port."""
    service = service or KmsService()
    handlers = {
        rpc: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(service, attr)),
            request_deserializer=request_type.deserialize,
            response_serializer=response_type.serialize,
        )
        for rpc, (attr, request_type, response_type) in _METHODS.items()
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gcp-kms"))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise RuntimeError(f"could not listen on 127.0.0.1:{port}")
    server.start()
    return server, bound


def client_for(endpoint: str) -> kms_v1.KeyManagementServiceClient:
    """The real KeyManagementServiceClient, over a plaintext gRPC channel to `endpoint`.
    A transport built on a channel instance carries no credentials, so none are looked up."""
    transport = KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
    return kms_v1.KeyManagementServiceClient(transport=transport)


class GcpKmsServer(ManagedServer):
    """`with GcpKmsServer() as kms:` runs the server in a child process; `kms.endpoint`
    is its "127.0.0.1:PORT" and `kms.client()` a real client pointed at it."""

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.process = ServerProcess(
            "keycell.testing.gcp_kms_server",
            ["--port", "0"],
            what="the Cloud KMS server",
            startup_timeout=startup_timeout,
        )

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> kms_v1.KeyManagementServiceClient:
        return client_for(self.endpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server, port = serve(args.port)

    def shut_down(signum: int, frame: FrameType | None) -> None:
        server.stop(grace=1)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    announce_ready(port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

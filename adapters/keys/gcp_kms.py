"""The Cloud KMS key backend: keys in Google Cloud HSM (protection level HSM).

Every key is a CryptoKey in one key ring (created on first use) whose versions are
generated inside Cloud HSM, FIPS 140-2 Level 3 validated, and never leave it: the
adapter only ever holds ciphertext, signatures and public keys. Talks to Cloud KMS
through google-cloud-kms `KeyManagementServiceClient` (any transport; the tests use
gRPC against keycell.testing.gcp_kms_server).

How the Keycell contract maps onto Cloud KMS:

- Specs: aes-256 is purpose ENCRYPT_DECRYPT / GOOGLE_SYMMETRIC_ENCRYPTION (AES-256-GCM
  inside the HSM); ec-p256 is ASYMMETRIC_SIGN / EC_SIGN_P256_SHA256; rsa-3072 is
  ASYMMETRIC_SIGN / RSA_SIGN_PKCS1_3072_SHA256. ed25519 is refused.
- Versions: Cloud KMS numbers CryptoKeyVersions 1..N itself; those are Keycell's
  numbers. A version still PENDING_GENERATION (key pairs are generated asynchronously)
  or one whose generation failed has no key material yet and is not listed; create and
  rotate wait for the new version to be ENABLED before returning.
- Primary: a symmetric key's primary is CryptoKey.primary, moved by
  UpdateCryptoKeyPrimaryVersion on rotate. Asymmetric keys have no primary in Cloud
  KMS; here it is the highest-numbered version that has key material (so a rotation
  in progress elsewhere never hands signers a version that cannot sign yet).
- wrap: Encrypt on the primary CryptoKeyVersion by name (the response names the
  version used and is checked). The blob is `pack_wrapped(version, ciphertext)`. The
  AAD given to Cloud KMS is a fixed label, the Keycell version number, then the
  caller's AAD: Decrypt goes to the CryptoKey (the service picks the version from its
  ciphertext and does not say which), so binding the number into the authenticated
  data is what makes a blob whose header names another version fail authentication.
- Disabling one version is UpdateCryptoKeyVersion(state=DISABLED, update_mask=state).
  Cloud KMS has no switch for a whole key, so disable(name) sets the label
  `keycell-enabled=false` on the CryptoKey (UpdateCryptoKey, update_mask=labels):
  one atomic write that every Keycell instance reads and that leaves each version's
  own state untouched, so enable(name) restores exactly what was there. Disabling all
  versions instead would be many writes and would forget which were disabled before.
  The label binds Keycell only: a principal with IAM rights on the key can still use
  it outside Keycell (deny that with IAM).
- schedule_destruction is DestroyCryptoKeyVersion (state DESTROY_SCHEDULED). Cloud KMS
  destroys a version `destroy_scheduled_duration` after that, a property of the key
  fixed at creation (here `destruction_window_days`, default 30, 7..120), not per
  call. So `days` is honoured as a minimum: days up to the key's window are accepted
  (destruction comes at the window, never earlier than asked); more than the window
  is refused, since Cloud KMS would destroy sooner than the caller asked.
- Verification is local, with pyca/cryptography, against the signing version's
  public key (GetPublicKey; cached, a version's key pair never changes): Cloud KMS
  has no Verify RPC. The version's state is checked first.
- CRC32C: every Encrypt, Decrypt and AsymmetricSign request carries the checksums
  Google recommends, and every response's checksums are checked; a mismatch means
  corruption in transit and is a retryable BackendUnavailableError.
- Errors: NotFound -> UnknownKeyError, AlreadyExists -> KeyExistsError,
  FailedPrecondition (a version not ENABLED) -> KeyDisabledError, InvalidArgument on
  Decrypt ("Decryption failed") -> IntegrityError, unreachable / unavailable / timed
  out / refused credentials -> BackendUnavailableError.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exc
from google.cloud import kms_v1
from google.protobuf import field_mask_pb2

from keycell.control_plane.keys import (
    BackendUnavailableError,
    Health,
    IntegrityError,
    InvalidSignatureError,
    KeyBackendError,
    KeyDisabledError,
    KeyExistsError,
    KeyInfo,
    KeyInputError,
    KeySpec,
    KeyVersion,
    Protection,
    Signature,
    UnknownKeyError,
    UnsupportedKeySpecError,
    VersionState,
    WrongKeyTypeError,
    check_fips_backend,
    check_message,
    check_name,
    check_spec,
    check_wrap_input,
    pack_wrapped,
    unpack_wrapped,
)

PROVIDER = "gcp-kms"
# Cloud HSM modules are FIPS 140-2 Level 3 validated; Cloud KMS software keys Level 1.
FIPS_LEVEL_HSM = 3
FIPS_LEVEL_SOFTWARE = 1
ENABLED_LABEL = "keycell-enabled"
MANAGED_LABEL = "managed-by"

Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState

_SPECS: dict[KeySpec, tuple[Any, Any]] = {
    KeySpec.AES_256: (Purpose.ENCRYPT_DECRYPT, Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION),
    KeySpec.EC_P256: (Purpose.ASYMMETRIC_SIGN, Algorithm.EC_SIGN_P256_SHA256),
    KeySpec.RSA_3072: (Purpose.ASYMMETRIC_SIGN, Algorithm.RSA_SIGN_PKCS1_3072_SHA256),
}
_ALGORITHM_SPECS = {algorithm: spec for spec, (_, algorithm) in _SPECS.items()}
_STATES = {
    State.ENABLED: VersionState.ENABLED,
    State.DISABLED: VersionState.DISABLED,
    State.DESTROY_SCHEDULED: VersionState.DESTRUCTION_SCHEDULED,
    State.DESTROYED: VersionState.DESTROYED,
    State.PENDING_EXTERNAL_DESTRUCTION: VersionState.DESTROYED,
    State.EXTERNAL_DESTRUCTION_FAILED: VersionState.DESTROYED,
}
# Versions in these states have (or had) no key material and are not listed.
_NOT_MATERIALIZED = {
    State.PENDING_GENERATION,
    State.PENDING_IMPORT,
    State.GENERATION_FAILED,
    State.IMPORT_FAILED,
}
# Prefix of the AAD given to Cloud KMS: label, then the Keycell version (u32), then the caller's AAD.
_AAD_LABEL = b"keycell/gcp-kms/wrap\x00"

T = TypeVar("T")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), the checksum Cloud KMS uses in its *_crc32c fields."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _number(version_name: str) -> int:
    return int(version_name.rsplit("/", 1)[1])


def _state(state: Any) -> VersionState:
    # A state this adapter does not know is treated as unusable, never as enabled.
    return _STATES.get(State(state), VersionState.DISABLED)


def _bound_aad(version: int, aad: bytes) -> bytes:
    return _AAD_LABEL + struct.pack(">I", version) + aad


_CORRUPTED = "the Cloud KMS response was corrupted in transit (CRC32C mismatch); retry"


class GcpKmsKeyBackend:
    """A `KeyBackend` on Cloud KMS with protection level HSM (Cloud HSM, FIPS 140-2
    Level 3 validated). Thread-safe: the client is, and the adapter keeps no mutable
    key state of its own (only a cache of immutable public keys)."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        project: str,
        location: str,
        key_ring: str,
        client: kms_v1.KeyManagementServiceClient | None = None,
        transport: Any = None,
        client_options: Any = None,
        credentials: Any = None,
        fips_mode: bool = False,
        destruction_window_days: int = 30,
        timeout: float = 30.0,
        retry_timeout: float = 20.0,
        generation_timeout: float = 120.0,
    ) -> None:
        check_fips_backend(fips_mode, Protection.HSM, PROVIDER)
        for label, value in (("project", project), ("location", location), ("key_ring", key_ring)):
            if not isinstance(value, str) or not value or "/" in value:
                raise KeyInputError(f"{label} must be a non-empty Cloud KMS id without '/'")
        if not isinstance(destruction_window_days, int) or not 7 <= destruction_window_days <= 120:
            raise KeyInputError("destruction_window_days is 7 to 120 (Cloud KMS allows 1 to 120)")
        self.fips_mode = fips_mode
        self.destruction_window = datetime.timedelta(days=destruction_window_days)
        self._ring = f"projects/{project}/locations/{location}/keyRings/{key_ring}"
        self._location = f"projects/{project}/locations/{location}"
        self._key_ring_id = key_ring
        self._timeout = timeout
        self._generation_timeout = generation_timeout
        # Retried: reads and crypto operations, which change nothing. Never retried:
        # creations, whose retry after a lost answer would fail or create twice.
        self._retry = gretry.Retry(
            initial=0.05,
            maximum=2.0,
            multiplier=2.0,
            predicate=gretry.if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded),
            timeout=retry_timeout,
        )
        self._owns_client = client is None
        if client is None:
            try:
                client = kms_v1.KeyManagementServiceClient(
                    transport=transport, client_options=client_options, credentials=credentials
                )
            except auth_exc.GoogleAuthError as exc:
                raise BackendUnavailableError(
                    f"no Google credentials for Cloud KMS ({type(exc).__name__}); configure ADC or pass credentials"
                ) from None
        self._client = client
        self._ring_ready = False
        self._ring_lock = threading.Lock()
        self._pem_cache: dict[tuple[str, str], bytes] = {}
        self._cache_lock = threading.Lock()

    # --- the protocol -------------------------------------------------------------------

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo:
        check_name(name)
        check_spec(spec, fips_mode=self.fips_mode)
        if spec not in _SPECS:
            raise UnsupportedKeySpecError(
                f"the gcp-kms backend creates {', '.join(s.value for s in _SPECS)} keys, not {spec.value}"
            )
        purpose, algorithm = _SPECS[spec]
        self._ensure_key_ring()
        crypto_key = kms_v1.CryptoKey(
            purpose=purpose,
            version_template=kms_v1.CryptoKeyVersionTemplate(
                protection_level=kms_v1.ProtectionLevel.HSM, algorithm=algorithm
            ),
            destroy_scheduled_duration=self.destruction_window,
            labels={MANAGED_LABEL: "keycell", ENABLED_LABEL: "true"},
        )
        request = kms_v1.CreateCryptoKeyRequest(parent=self._ring, crypto_key_id=name, crypto_key=crypto_key)
        created = self._call(
            lambda: self._client.create_crypto_key(request=request, retry=None, timeout=self._timeout),
            f"create key {name!r}",
            {gexc.AlreadyExists: KeyExistsError},
        )
        self._await_generation(f"{created.name}/cryptoKeyVersions/1")
        return self.describe(name)

    def describe(self, name: str) -> KeyInfo:
        key = self._get_key(name)
        return self._info(name, key, self._list_versions(key.name))

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = check_wrap_input(plaintext, aad)
        key = self._get_key(name)
        self._require_wrapping(name, key)
        self._require_key_enabled(name, key)
        if "primary" not in key:
            raise KeyDisabledError(f"key {name!r} has no primary version in Cloud KMS; rotate it")
        primary = key.primary
        number = _number(primary.name)
        self._require_version_enabled(name, number, primary.state)
        bound = _bound_aad(number, aad)
        request = kms_v1.EncryptRequest(
            name=primary.name,
            plaintext=plaintext,
            additional_authenticated_data=bound,
            plaintext_crc32c=crc32c(plaintext),
            additional_authenticated_data_crc32c=crc32c(bound),
        )
        response = self._call(
            lambda: self._client.encrypt(request=request, retry=self._retry, timeout=self._timeout),
            f"wrap with key {name!r}",
        )
        if (
            not response.verified_plaintext_crc32c
            or not response.verified_additional_authenticated_data_crc32c
            or response.ciphertext_crc32c != crc32c(response.ciphertext)
        ):
            raise BackendUnavailableError(_CORRUPTED)
        if response.name != primary.name:
            raise BackendUnavailableError(
                f"Cloud KMS encrypted with {response.name} when asked for {primary.name}; nothing was wrapped"
            )
        return pack_wrapped(number, response.ciphertext)

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        number, body = unpack_wrapped(wrapped)
        if not isinstance(aad, bytes):
            raise KeyInputError("associated data must be bytes")
        key = self._get_key(name)
        self._require_wrapping(name, key)
        self._require_key_enabled(name, key)
        bound = _bound_aad(number, aad)
        request = kms_v1.DecryptRequest(
            name=key.name,  # Decrypt takes the CryptoKey: the service finds the version in the ciphertext
            ciphertext=body,
            additional_authenticated_data=bound,
            ciphertext_crc32c=crc32c(body),
            additional_authenticated_data_crc32c=crc32c(bound),
        )
        response = self._call(
            lambda: self._client.decrypt(request=request, retry=self._retry, timeout=self._timeout),
            f"unwrap with key {name!r}",
            {gexc.InvalidArgument: IntegrityError},
        )
        if response.plaintext_crc32c != crc32c(response.plaintext):
            raise BackendUnavailableError(_CORRUPTED)
        return bytes(response.plaintext)

    def sign(self, name: str, message: bytes) -> Signature:
        message = check_message(message)
        key = self._get_key(name)
        self._require_signing(name, key)
        self._require_key_enabled(name, key)
        versions = self._list_versions(key.name)
        primary = self._primary(key, versions)
        if primary is None:
            raise KeyDisabledError(f"key {name!r} has no version with key material yet; try again shortly")
        number = _number(primary.name)
        self._require_version_enabled(name, number, primary.state)
        digest = hashlib.sha256(message).digest()  # only the digest crosses to the HSM
        request = kms_v1.AsymmetricSignRequest(
            name=primary.name, digest=kms_v1.Digest(sha256=digest), digest_crc32c=crc32c(digest)
        )
        response = self._call(
            lambda: self._client.asymmetric_sign(request=request, retry=self._retry, timeout=self._timeout),
            f"sign with key {name!r}",
        )
        if not response.verified_digest_crc32c or response.signature_crc32c != crc32c(response.signature):
            raise BackendUnavailableError(_CORRUPTED)
        if response.name != primary.name:
            raise BackendUnavailableError(
                f"Cloud KMS signed with {response.name} when asked for {primary.name}"
            )
        return Signature(number, bytes(response.signature))

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        message = check_message(message)
        if not isinstance(signature, Signature):
            raise KeyInputError("verify takes a Signature (version and value)")
        key = self._get_key(name)
        spec = self._require_signing(name, key)
        number = signature.version
        if not isinstance(number, int) or number < 1:
            raise InvalidSignatureError(f"key {name!r} has no version {number!r}")
        version = self._call(
            lambda: self._client.get_crypto_key_version(
                name=f"{key.name}/cryptoKeyVersions/{number}", retry=self._retry, timeout=self._timeout
            ),
            f"verify with key {name!r}",
            {gexc.NotFound: InvalidSignatureError},
        )
        if version.state in _NOT_MATERIALIZED:
            raise InvalidSignatureError(f"version {number} of key {name!r} never signed anything")
        self._require_key_enabled(name, key)
        self._require_version_enabled(name, number, version.state)
        public = serialization.load_pem_public_key(self._public_pem(name, version))
        try:
            if spec is KeySpec.EC_P256:
                assert isinstance(public, ec.EllipticCurvePublicKey)
                public.verify(signature.value, message, ec.ECDSA(hashes.SHA256()))
            else:
                assert isinstance(public, rsa.RSAPublicKey)
                public.verify(signature.value, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise InvalidSignatureError(
                f"signature does not verify with version {number} of key {name!r}"
            ) from None

    def public_key(self, name: str, version: int | None = None) -> bytes:
        key = self._get_key(name)
        spec = self._spec(name, key)
        if not spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it has no public key")
        if version is None:
            chosen = self._primary(key, self._list_versions(key.name))
            if chosen is None:
                raise UnknownKeyError(f"key {name!r} has no version with key material yet")
        else:
            chosen = self._get_version(name, key.name, version)
        number = _number(chosen.name)
        # Cloud KMS serves public keys of ENABLED versions only (FAILED_PRECONDITION otherwise).
        self._require_version_enabled(name, number, chosen.state)
        return self._public_pem(name, chosen)

    def rotate(self, name: str) -> KeyInfo:
        key = self._get_key(name)
        spec = self._spec(name, key)
        request = kms_v1.CreateCryptoKeyVersionRequest(
            parent=key.name, crypto_key_version=kms_v1.CryptoKeyVersion()
        )
        created = self._call(
            lambda: self._client.create_crypto_key_version(
                request=request, retry=None, timeout=self._timeout
            ),
            f"rotate key {name!r}",
        )
        self._await_generation(created.name)
        if spec is KeySpec.AES_256:
            # A crash between these two calls leaves the new version enabled but not
            # primary; the next rotate simply moves past it.
            primary_request = kms_v1.UpdateCryptoKeyPrimaryVersionRequest(
                name=key.name, crypto_key_version_id=str(_number(created.name))
            )
            self._call(
                lambda: self._client.update_crypto_key_primary_version(
                    request=primary_request, retry=self._retry, timeout=self._timeout
                ),
                f"rotate key {name!r}",
            )
        return self.describe(name)

    def disable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=False)

    def enable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=True)

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if not isinstance(days, int) or not 7 <= days <= 120:
            raise KeyInputError("destruction is scheduled 7 to 120 days ahead")
        key = self._get_key(name)
        versions = self._list_versions(key.name)
        chosen = next((v for v in versions if _number(v.name) == version), None)
        if chosen is None:
            raise UnknownKeyError(f"key {name!r} has no version {version}")
        primary = self._primary(key, versions)
        if primary is not None and primary.name == chosen.name:
            raise KeyInputError(f"version {version} is the primary of key {name!r}; rotate first")
        if chosen.state == State.DESTROY_SCHEDULED:
            return  # already scheduled; Cloud KMS would refuse a second Destroy
        if chosen.state == State.DESTROYED:
            raise KeyInputError(f"version {version} of key {name!r} is already destroyed")
        window = key.destroy_scheduled_duration
        if datetime.timedelta(days=days) > window:
            raise KeyInputError(
                f"key {name!r} destroys versions {window.days} days after scheduling (fixed by Cloud KMS "
                f"when the key was created); Cloud KMS would destroy sooner than {days} days: ask for "
                f"at most {window.days}"
            )
        self._call(
            lambda: self._client.destroy_crypto_key_version(
                name=chosen.name, retry=None, timeout=self._timeout
            ),
            f"schedule destruction of version {version} of key {name!r}",
            {gexc.FailedPrecondition: KeyInputError},
        )

    def health(self) -> Health:
        try:
            self._call(
                lambda: self._client.get_key_ring(
                    name=self._ring, retry=None, timeout=min(self._timeout, 5.0)
                ),
                "health check",
            )
        except UnknownKeyError:
            return Health(
                True, PROVIDER, f"Cloud KMS reachable; key ring {self._ring} is created with the first key"
            )
        except KeyBackendError as exc:
            return Health(False, PROVIDER, str(exc))
        return Health(True, PROVIDER, f"Cloud KMS key ring {self._ring}; Cloud HSM, FIPS 140-2 Level 3")

    def close(self) -> None:
        if self._owns_client:
            self._client.transport.close()  # type: ignore[no-untyped-call]

    # --- helpers ----------------------------------------------------------------------

    def _call(
        self,
        fn: Callable[[], T],
        what: str,
        overrides: dict[type[Exception], type[KeyBackendError]] | None = None,
    ) -> T:
        """Run one client call and turn every provider failure into a Keycell error."""
        try:
            return fn()
        except gexc.GoogleAPICallError as exc:
            message = exc.message or type(exc).__name__
            # A checksum complaint means our request was corrupted on the way: never an
            # integrity failure of the data itself, and worth a retry.
            corrupted = isinstance(exc, gexc.InvalidArgument) and "checksum" in message
            for provider_error, keycell_error in (overrides or {}).items():
                if isinstance(exc, provider_error) and not corrupted:
                    raise keycell_error(f"{what}: {message}") from None
            if isinstance(exc, gexc.NotFound):
                raise UnknownKeyError(f"{what}: {message}") from None
            if isinstance(exc, gexc.AlreadyExists):
                raise KeyExistsError(f"{what}: {message}") from None
            if isinstance(exc, gexc.FailedPrecondition):
                raise KeyDisabledError(f"{what}: {message}") from None
            if isinstance(exc, gexc.InvalidArgument):
                if corrupted:
                    raise BackendUnavailableError(f"{what}: {message}; retry") from None
                raise KeyInputError(f"{what}: {message}") from None
            if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
                raise BackendUnavailableError(
                    f"{what}: Cloud KMS refused the credentials ({message}); check IAM on {self._ring}"
                ) from None
            raise BackendUnavailableError(
                f"{what}: Cloud KMS failed ({message}); nothing changed, retry"
            ) from None
        except gexc.RetryError as exc:
            raise BackendUnavailableError(
                f"{what}: Cloud KMS unreachable ({type(exc.cause).__name__}); retry later"
            ) from None
        except auth_exc.GoogleAuthError as exc:
            raise BackendUnavailableError(
                f"{what}: Google credentials failed ({type(exc).__name__})"
            ) from None

    def _ensure_key_ring(self) -> None:
        with self._ring_lock:
            if self._ring_ready:
                return
            try:
                self._call(
                    lambda: self._client.get_key_ring(
                        name=self._ring, retry=self._retry, timeout=self._timeout
                    ),
                    "look up the key ring",
                )
            except UnknownKeyError:
                request = kms_v1.CreateKeyRingRequest(parent=self._location, key_ring_id=self._key_ring_id)
                with contextlib.suppress(KeyExistsError):  # another instance created it first
                    self._call(
                        lambda: self._client.create_key_ring(
                            request=request, retry=None, timeout=self._timeout
                        ),
                        "create the key ring",
                    )
            self._ring_ready = True

    def _get_key(self, name: str) -> kms_v1.CryptoKey:
        check_name(name)
        return self._call(
            lambda: self._client.get_crypto_key(
                name=f"{self._ring}/cryptoKeys/{name}", retry=self._retry, timeout=self._timeout
            ),
            f"key {name!r}",
        )

    def _get_version(self, name: str, key_path: str, number: object) -> kms_v1.CryptoKeyVersion:
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise UnknownKeyError(f"key {name!r} has no version {number!r}")
        version = self._call(
            lambda: self._client.get_crypto_key_version(
                name=f"{key_path}/cryptoKeyVersions/{number}", retry=self._retry, timeout=self._timeout
            ),
            f"version {number} of key {name!r}",
        )
        if version.state in _NOT_MATERIALIZED:
            raise UnknownKeyError(f"version {number} of key {name!r} has no key material yet")
        return version

    def _list_versions(self, key_path: str) -> list[kms_v1.CryptoKeyVersion]:
        """The versions with key material, in number order (the pager's RPCs included)."""

        def fetch() -> list[kms_v1.CryptoKeyVersion]:
            pager: Iterable[kms_v1.CryptoKeyVersion] = self._client.list_crypto_key_versions(
                parent=key_path, retry=self._retry, timeout=self._timeout
            )
            return [v for v in pager if v.state not in _NOT_MATERIALIZED]

        return sorted(self._call(fetch, f"versions of {key_path}"), key=lambda v: _number(v.name))

    @staticmethod
    def _primary(
        key: kms_v1.CryptoKey, versions: list[kms_v1.CryptoKeyVersion]
    ) -> kms_v1.CryptoKeyVersion | None:
        if key.purpose == Purpose.ENCRYPT_DECRYPT and "primary" in key:
            for v in versions:
                if v.name == key.primary.name:
                    return v
        return versions[-1] if versions else None

    def _info(self, name: str, key: kms_v1.CryptoKey, versions: list[kms_v1.CryptoKeyVersion]) -> KeyInfo:
        hsm = key.version_template.protection_level == kms_v1.ProtectionLevel.HSM
        primary = self._primary(key, versions)
        return KeyInfo(
            name=name,
            spec=self._spec(name, key),
            provider=PROVIDER,
            protection=Protection.HSM if hsm else Protection.SOFTWARE,
            fips_level=FIPS_LEVEL_HSM if hsm else FIPS_LEVEL_SOFTWARE,
            extractable=False,
            enabled=key.labels.get(ENABLED_LABEL) != "false",
            primary_version=_number(primary.name) if primary is not None else 0,
            versions=tuple(KeyVersion(_number(v.name), _state(v.state)) for v in versions),
        )

    @staticmethod
    def _spec(name: str, key: kms_v1.CryptoKey) -> KeySpec:
        spec = _ALGORITHM_SPECS.get(key.version_template.algorithm)
        if spec is None:
            algorithm = Algorithm(key.version_template.algorithm).name
            raise UnsupportedKeySpecError(f"key {name!r} uses {algorithm}, which Keycell does not manage")
        return spec

    def _require_wrapping(self, name: str, key: kms_v1.CryptoKey) -> None:
        spec = self._spec(name, key)
        if spec is not KeySpec.AES_256:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it signs, it does not wrap")

    def _require_signing(self, name: str, key: kms_v1.CryptoKey) -> KeySpec:
        spec = self._spec(name, key)
        if not spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it wraps, it does not sign")
        return spec

    @staticmethod
    def _require_key_enabled(name: str, key: kms_v1.CryptoKey) -> None:
        if key.labels.get(ENABLED_LABEL) == "false":
            raise KeyDisabledError(f"key {name!r} is disabled; enable it to use it")

    @staticmethod
    def _require_version_enabled(name: str, number: int, state: Any) -> None:
        if state != State.ENABLED:
            shown = _STATES.get(State(state))
            label = shown.value if shown is not None else State(state).name.lower()
            raise KeyDisabledError(f"version {number} of key {name!r} is {label}")

    def _public_pem(self, name: str, version: kms_v1.CryptoKeyVersion) -> bytes:
        # A version's key pair never changes: cache by its name and creation time.
        cache_key = (version.name, str(version.create_time))
        with self._cache_lock:
            cached = self._pem_cache.get(cache_key)
        if cached is not None:
            return cached
        response = self._call(
            lambda: self._client.get_public_key(name=version.name, retry=self._retry, timeout=self._timeout),
            f"public key of key {name!r}",
        )
        pem = response.pem.encode()
        if response.pem_crc32c != crc32c(pem):
            raise BackendUnavailableError(_CORRUPTED)
        with self._cache_lock:
            self._pem_cache[cache_key] = pem
        return pem

    def _await_generation(self, version_name: str) -> None:
        """Cloud KMS generates key pairs asynchronously (PENDING_GENERATION): wait."""
        deadline = time.monotonic() + self._generation_timeout
        pause = 0.01
        while True:
            version = self._call(
                lambda: self._client.get_crypto_key_version(
                    name=version_name, retry=self._retry, timeout=self._timeout
                ),
                f"new version {version_name}",
            )
            if version.state == State.GENERATION_FAILED:
                raise BackendUnavailableError(
                    f"Cloud KMS failed to generate {version_name} ({version.generation_failure_reason}); rotate again"
                )
            if version.state != State.PENDING_GENERATION:
                return
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"{version_name} is still being generated after {self._generation_timeout}s; it will "
                    "become usable when Cloud KMS finishes"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _set_state(self, name: str, version: int | None, *, enabled: bool) -> None:
        key = self._get_key(name)
        if version is None:
            labels = dict(key.labels)
            labels[ENABLED_LABEL] = "true" if enabled else "false"
            request = kms_v1.UpdateCryptoKeyRequest(
                crypto_key=kms_v1.CryptoKey(name=key.name, labels=labels),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            )
            self._call(
                lambda: self._client.update_crypto_key(
                    request=request, retry=self._retry, timeout=self._timeout
                ),
                f"{'enable' if enabled else 'disable'} key {name!r}",
            )
            return
        chosen = self._get_version(name, key.name, version)
        if chosen.state not in (State.ENABLED, State.DISABLED):
            raise KeyInputError(f"version {version} of key {name!r} is {_state(chosen.state).value}")
        update = kms_v1.UpdateCryptoKeyVersionRequest(
            crypto_key_version=kms_v1.CryptoKeyVersion(
                name=chosen.name, state=State.ENABLED if enabled else State.DISABLED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        )
        self._call(
            lambda: self._client.update_crypto_key_version(
                request=update, retry=self._retry, timeout=self._timeout
            ),
            f"{'enable' if enabled else 'disable'} version {version} of key {name!r}",
            {gexc.FailedPrecondition: KeyInputError},
        )

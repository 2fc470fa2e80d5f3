"""Key custody: the one provider-neutral interface to every HSM and KMS.

Key material never leaves its backend. A `KeyBackend` offers only safe, complete
operations on named keys:

- `create_key(name, spec)`: an AES-256 wrapping key, an EC P-256 or an RSA-3072
  signing key, generated inside the backend, non-extractable;
- `wrap` / `unwrap`: AEAD encryption of a small secret (a data key, at most
  `MAX_WRAP_BYTES`) under the key's primary version, bound to associated data;
- `sign` / `verify`: SHA-256 digests signed inside the backend (ECDSA P-256 with
  DER-encoded signatures; RSA-3072 with PKCS#1 v1.5), verified against the
  version that signed;
- `public_key`: the SubjectPublicKeyInfo PEM of an enabled signing key version;
- `rotate`: a new primary version; older versions still unwrap and verify;
- `disable` / `enable` a key or one version, `schedule_destruction` of a version;
- `describe` and `health`.

Versions are numbered 1, 2, ... on every backend, whatever the provider calls them.
A wrapped blob carries the version that made it (see `pack_wrapped`), so `unwrap`
never needs to be told. A blob or signature that names a version the key never had
is an integrity failure (`IntegrityError` / `InvalidSignatureError`); a caller
naming a missing version (`public_key`, `disable`, ...) gets `UnknownKeyError`.
The primary version cannot be scheduled for destruction: rotate first.

Every failure is a specific exception below; nothing falls back silently. FIPS mode
(`fips_mode=True` on any backend) refuses the software backend and any key spec
that FIPS 140-2 does not approve.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

# The most a single wrap may protect: a data key or a small secret, within every
# provider's limit (AWS KMS Encrypt takes 4096 bytes).
MAX_WRAP_BYTES = 4096
MAX_AAD_BYTES = 8192
# Names every provider accepts as (part of) a key name: GCP allows [a-zA-Z0-9_-]{1,63},
# Azure [a-zA-Z0-9-]{1,127}, AWS aliases [a-zA-Z0-9/_-]; the intersection, 63 long.
KEY_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,62}")


class KeySpec(StrEnum):
    AES_256 = "aes-256"  # wrap / unwrap with AES-256-GCM
    EC_P256 = "ec-p256"  # sign / verify, ECDSA over P-256 with SHA-256
    RSA_3072 = "rsa-3072"  # sign / verify, RSASSA-PKCS1-v1_5 with SHA-256
    # Edwards-curve signatures are not approved under FIPS 140-2; offered only by the
    # software backend, for development, and refused in FIPS mode everywhere.
    ED25519 = "ed25519"

    @property
    def is_signing(self) -> bool:
        return self is not KeySpec.AES_256


# Specs an approved module may use under FIPS 140-2 (FIPS 197, FIPS 186-4).
FIPS_APPROVED_SPECS = frozenset({KeySpec.AES_256, KeySpec.EC_P256, KeySpec.RSA_3072})


class Protection(StrEnum):
    HSM = "hsm"
    SOFTWARE = "software"


class VersionState(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTRUCTION_SCHEDULED = "destruction-scheduled"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class KeyVersion:
    number: int
    state: VersionState


@dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    spec: KeySpec
    provider: str  # "pkcs11", "aws-kms", "cloudhsm", "azure-mhsm", "gcp-kms", "software"
    protection: Protection
    fips_level: int | None  # the FIPS 140 level the provider claims; None: not validated
    extractable: bool  # always False: no adapter creates an extractable key
    enabled: bool  # the key as a whole (disable(name) without a version)
    primary_version: int
    versions: tuple[KeyVersion, ...]

    def version(self, number: int) -> KeyVersion:
        for v in self.versions:
            if v.number == number:
                return v
        raise UnknownKeyError(f"key {self.name!r} has no version {number}")


@dataclass(frozen=True, slots=True)
class Signature:
    version: int
    value: bytes  # ECDSA: DER; RSA: PKCS#1 v1.5 bytes


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    provider: str
    detail: str


# --- errors -----------------------------------------------------------------------


class KeyBackendError(Exception):
    """Base of every key custody error."""


class UnknownKeyError(KeyBackendError, LookupError):
    """No key (or key version) by that name exists in this backend."""


class KeyExistsError(KeyBackendError):
    """A key by that name already exists; pick another name or rotate the key."""


class KeyDisabledError(KeyBackendError):
    """The key or version is disabled, scheduled for destruction, or destroyed."""


class WrongKeyTypeError(KeyBackendError, TypeError):
    """The operation does not fit the key's spec (e.g. signing with an AES key)."""


class IntegrityError(KeyBackendError):
    """Ciphertext or signature failed authentication: tampered, truncated, made under
    other associated data, or by another key. Never retried, never bypassed."""


class InvalidSignatureError(IntegrityError):
    """The signature does not verify for this message and key version."""


class FipsModeError(KeyBackendError):
    """FIPS mode refuses this backend or algorithm."""


class UnsupportedKeySpecError(KeyBackendError):
    """This backend cannot create keys of that spec."""


class KeyInputError(KeyBackendError, ValueError):
    """A name, plaintext, associated data or argument is malformed or too large."""


class BackendUnavailableError(KeyBackendError):
    """The HSM or KMS could not be reached or failed; nothing is known to have changed."""


# --- the protocol -------------------------------------------------------------------


@runtime_checkable
class KeyBackend(Protocol):
    """A provider of non-extractable keys. See the module docstring for the contract."""

    @property
    def provider(self) -> str: ...

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo: ...

    def describe(self, name: str) -> KeyInfo: ...

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        """AEAD-encrypt `plaintext` under the primary version, bound to `aad`."""
        ...

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a blob `wrap` made with this key; IntegrityError if it or `aad` differ."""
        ...

    def sign(self, name: str, message: bytes) -> Signature:
        """Sign SHA-256(message) with the primary version."""
        ...

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        """Raise InvalidSignatureError unless `signature` is valid for `message`."""
        ...

    def public_key(self, name: str, version: int | None = None) -> bytes:
        """SubjectPublicKeyInfo PEM of a signing key's version (default: primary)."""
        ...

    def rotate(self, name: str) -> KeyInfo: ...

    def disable(self, name: str, version: int | None = None) -> None: ...

    def enable(self, name: str, version: int | None = None) -> None: ...

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None: ...

    def health(self) -> Health: ...

    def close(self) -> None: ...


# --- shared checks and formats ---------------------------------------------------------


def check_name(name: object) -> str:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise KeyInputError("a key name is 1-63 letters, digits and dashes, starting with a letter or digit")
    return name


def check_spec(spec: object, *, fips_mode: bool) -> KeySpec:
    if not isinstance(spec, KeySpec):
        raise KeyInputError(f"unknown key spec {spec!r}; use a member of KeySpec")
    if fips_mode and spec not in FIPS_APPROVED_SPECS:
        raise FipsModeError(
            f"{spec.value} is not a FIPS 140-2 approved algorithm; FIPS mode allows "
            + ", ".join(sorted(s.value for s in FIPS_APPROVED_SPECS))
        )
    return spec


def check_wrap_input(plaintext: object, aad: object) -> tuple[bytes, bytes]:
    if not isinstance(plaintext, bytes | bytearray):
        raise KeyInputError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    if not isinstance(aad, bytes):
        raise KeyInputError(f"associated data must be bytes, not {type(aad).__name__}")
    if not 1 <= len(plaintext) <= MAX_WRAP_BYTES:
        raise KeyInputError(f"wrap protects 1 to {MAX_WRAP_BYTES} bytes; use a data key for more")
    if len(aad) > MAX_AAD_BYTES:
        raise KeyInputError(f"associated data is at most {MAX_AAD_BYTES} bytes")
    return bytes(plaintext), aad


def check_message(message: object) -> bytes:
    if not isinstance(message, bytes):
        raise KeyInputError(f"a message to sign must be bytes, not {type(message).__name__}")
    return message


def require_signing(info: KeyInfo) -> None:
    if not info.spec.is_signing:
        raise WrongKeyTypeError(f"key {info.name!r} is {info.spec.value}: it wraps, it does not sign")


def require_wrapping(info: KeyInfo) -> None:
    if info.spec is not KeySpec.AES_256:
        raise WrongKeyTypeError(f"key {info.name!r} is {info.spec.value}: it signs, it does not wrap")


def require_usable(info: KeyInfo, version: int) -> None:
    """Raise unless the key is enabled and `version` exists and is enabled."""
    if not info.enabled:
        raise KeyDisabledError(f"key {info.name!r} is disabled")
    state = info.version(version).state
    if state is not VersionState.ENABLED:
        raise KeyDisabledError(f"version {version} of key {info.name!r} is {state.value}")


# A wrapped blob: format byte, the key version (big-endian u32), then the provider's
# own ciphertext. The format byte lets the layout change without ambiguity.
_WRAPPED_FORMAT = 1
_WRAPPED_HEADER = struct.Struct(">BI")


def pack_wrapped(version: int, body: bytes) -> bytes:
    return _WRAPPED_HEADER.pack(_WRAPPED_FORMAT, version) + body


def unpack_wrapped(blob: object) -> tuple[int, bytes]:
    if not isinstance(blob, bytes):
        raise KeyInputError(f"a wrapped blob must be bytes, not {type(blob).__name__}")
    if len(blob) <= _WRAPPED_HEADER.size:
        raise IntegrityError("wrapped blob is truncated")
    fmt, version = _WRAPPED_HEADER.unpack_from(blob)
    if fmt != _WRAPPED_FORMAT or version == 0:
        raise IntegrityError("wrapped blob has an unknown format or was altered")
    return version, blob[_WRAPPED_HEADER.size :]


def check_fips_backend(fips_mode: bool, protection: Protection, provider: str) -> None:
    if fips_mode and protection is Protection.SOFTWARE:
        raise FipsModeError(
            f"the {provider} backend keeps keys in process memory and is for development "
            "only; FIPS mode needs an HSM backend (pkcs11, aws-kms, cloudhsm, azure-mhsm, gcp-kms)"
        )

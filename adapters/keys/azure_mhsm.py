"""The Azure Managed HSM key backend, through the azure-keyvault-keys SDK.

Managed HSM keeps keys in FIPS 140-2 Level 3 validated HSMs (Marvell LiquidSecurity
pools dedicated to one tenant). Keys are created HSM-only (`oct-HSM`, `EC-HSM`,
`RSA-HSM`) with `exportable=False` and no release policy, so no operation can ever
take the private or secret material out:

- AES-256 (`oct-HSM`, 256 bits) wraps with AES-256-GCM (`A256GCM`) and the caller's
  associated data; the HSM picks the 12-byte IV and returns the 16-byte tag apart,
  so the blob body is iv || ciphertext || tag.
- EC P-256 (`EC-HSM`) signs SHA-256 digests with ES256. Azure returns the JWA form
  r || s; Keycell's contract is DER, so signatures are converted both ways.
- RSA-3072 (`RSA-HSM`) signs SHA-256 digests with RS256 (PKCS#1 v1.5).

How Keycell's model maps onto Azure's (Azure has opaque version ids, no key-level
switch and no per-version destruction), all kept in the HSM itself as version tags,
so every backend instance, in any process, sees the same state:

- `keycell-version` = N on each Azure version: Keycell version N. `rotate` creates a
  new Azure version of the same key tagged N+1; versions are read back with
  `list_properties_of_key_versions`. Two instances that rotate at once may both tag
  N+1: a version that sees another holder of its number gives way and renumbers
  itself to the next free one before `rotate` returns (see `_settle`).
- `keycell-spec` names the KeySpec (Azure's listing does not carry the key type).
- `keycell-state` = enabled | disabled | destruction-scheduled per version.
- `keycell-key-enabled` = true | false: `disable(name)`. Azure has no key-level flag,
  so it is written on every version (the newest is authoritative; disable writes it
  first, enable last, so a half-done change never reads as enabled) and copied onto
  each version `rotate` adds.
- The Azure `enabled` attribute of each version is kept equal to "key enabled and
  version enabled", so the HSM itself refuses a disabled key or version (403), not
  only this adapter.
- `schedule_destruction`: Azure deletes whole keys, never one version. The version
  is disabled in the HSM and tagged `keycell-destroy-after=<ISO date>`; it reads as
  DESTRUCTION_SCHEDULED and cannot be re-enabled. Deleting and purging the material
  after that date is an operator's step (delete the whole key once every version is
  due); it is never DESTROYED here.

Errors: ResourceNotFoundError -> UnknownKeyError; 403 on a disabled key ->
KeyDisabledError; a failed GCM check (the service answers 400) -> IntegrityError;
verify answering False (or 400) -> InvalidSignatureError; transport failures and
other service errors -> BackendUnavailableError.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.keyvault.keys import KeyClient, KeyCurveName, KeyOperation, KeyProperties
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

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
    require_signing,
    require_usable,
    require_wrapping,
    unpack_wrapped,
)

PROVIDER = "azure-mhsm"
FIPS_LEVEL = 3  # Managed HSM: FIPS 140-2 Level 3 validated HSMs

TAG_VERSION = "keycell-version"
TAG_SPEC = "keycell-spec"
TAG_STATE = "keycell-state"
TAG_KEY_ENABLED = "keycell-key-enabled"
TAG_DESTROY_AFTER = "keycell-destroy-after"
TAG_ABANDONED = "keycell-abandoned"  # a version that lost a create race; never used

_IV_BYTES = 12
_TAG_BYTES = 16
_EC_COORDINATE_BYTES = 32
# Any name works as a probe: the answer 404 proves the HSM is reachable and accepts us.
_HEALTH_PROBE = "keycell-health-probe"
_CRYPTO_CLIENT_CACHE = 1024
_SETTLE_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class _Version:
    number: int
    azure_version: str
    state: VersionState
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class _State:
    name: str
    spec: KeySpec
    enabled: bool
    versions: dict[int, _Version]

    @property
    def primary(self) -> _Version:
        return self.versions[max(self.versions)]

    def info(self) -> KeyInfo:
        return KeyInfo(
            name=self.name,
            spec=self.spec,
            provider=PROVIDER,
            protection=Protection.HSM,
            fips_level=FIPS_LEVEL,
            extractable=False,
            enabled=self.enabled,
            primary_version=self.primary.number,
            versions=tuple(KeyVersion(n, self.versions[n].state) for n in sorted(self.versions)),
        )

    def version(self, number: int, *, missing: type[KeyBackendError] = UnknownKeyError) -> _Version:
        """The version, or `missing`: UnknownKeyError when a caller names it, an integrity
        error when a blob or signature claims a version the key never had."""
        found = self.versions.get(number)
        if found is None:
            raise missing(f"key {self.name!r} has no version {number}")
        return found


def _number(props: KeyProperties) -> int | None:
    tags = props.tags or {}
    if tags.get(TAG_ABANDONED) == "true":
        return None
    try:
        number = int(tags.get(TAG_VERSION, ""))
    except ValueError:
        return None
    return number if number > 0 else None


def _jitter() -> None:
    # Not cryptographic: spreads racing instances apart in time.
    time.sleep(random.uniform(0.005, 0.05))  # noqa: S311


def _der_to_raw(der: bytes) -> bytes:
    try:
        r, s = utils.decode_dss_signature(der)
    except ValueError:
        raise InvalidSignatureError("the signature is not a DER-encoded ECDSA signature") from None
    if r.bit_length() > 8 * _EC_COORDINATE_BYTES or s.bit_length() > 8 * _EC_COORDINATE_BYTES:
        raise InvalidSignatureError("the signature does not fit a P-256 key")
    return r.to_bytes(_EC_COORDINATE_BYTES, "big") + s.to_bytes(_EC_COORDINATE_BYTES, "big")


def _raw_to_der(raw: bytes) -> bytes:
    if len(raw) != 2 * _EC_COORDINATE_BYTES:
        raise BackendUnavailableError("the HSM returned an ES256 signature of unexpected length")
    r = int.from_bytes(raw[:_EC_COORDINATE_BYTES], "big")
    s = int.from_bytes(raw[_EC_COORDINATE_BYTES:], "big")
    return utils.encode_dss_signature(r, s)


class AzureManagedHsmKeyBackend:
    """A `KeyBackend` on an Azure Managed HSM (FIPS 140-2 Level 3 validated HSMs).

    `vault_url` is the HSM's URI (https://<name>.managedhsm.azure.net), `credential`
    any azure-core `TokenCredential` (e.g. azure-identity's DefaultAzureCredential).
    `transport`, `connection_verify` (a CA bundle path for a private endpoint or an
    emulator), `verify_challenge_resource` and any other `client_options` go to the SDK
    clients unchanged. The identity needs the Managed HSM Crypto User role (create,
    get, list, update, encrypt, decrypt, sign, verify) on the keys it manages.
    """

    provider = PROVIDER

    def __init__(
        self,
        vault_url: str,
        credential: TokenCredential,
        *,
        transport: Any = None,
        connection_verify: bool | str | None = None,
        verify_challenge_resource: bool = True,
        fips_mode: bool = False,
        **client_options: Any,
    ) -> None:
        check_fips_backend(fips_mode, Protection.HSM, PROVIDER)
        self.fips_mode = fips_mode
        options = dict(client_options)
        if transport is not None:
            options["transport"] = transport
        if connection_verify is not None:
            options["connection_verify"] = connection_verify
        self._client = KeyClient(
            vault_url, credential, verify_challenge_resource=verify_challenge_resource, **options
        )
        self._crypto: OrderedDict[tuple[str, str], CryptographyClient] = OrderedDict()
        self._crypto_lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._name_locks_lock = threading.Lock()

    # --- the protocol ----------------------------------------------------------------------

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo:
        check_name(name)
        check_spec(spec, fips_mode=self.fips_mode)
        if spec is KeySpec.ED25519:
            raise UnsupportedKeySpecError("Azure Managed HSM has no Ed25519 keys; use ec-p256 or rsa-3072")
        with self._name_lock(name), self._errors(name):
            for _ in range(_SETTLE_ATTEMPTS):
                if any(_number(p) is not None for p in self._azure_versions(name)):
                    raise KeyExistsError(f"a key named {name!r} already exists in the Managed HSM")
                created = self._create_version(name, spec, number=1, key_enabled=True)
                if self._settle(name, created, 1, first=True):
                    return self._load(name, keeper=created).info()
                _jitter()  # every racer gave way: try again, at different times
            raise BackendUnavailableError(f"could not create key {name!r} while others race for the name")

    def describe(self, name: str) -> KeyInfo:
        return self._state(name).info()

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = check_wrap_input(plaintext, aad)
        state = self._state(name)
        info = state.info()
        require_wrapping(info)
        require_usable(info, info.primary_version)
        primary = state.primary
        with self._errors(name, "encrypt"):
            result = self._crypto_client(name, primary.azure_version).encrypt(
                EncryptionAlgorithm.a256_gcm, plaintext, additional_authenticated_data=aad
            )
        iv, tag = result.iv or b"", result.tag or b""
        if len(iv) != _IV_BYTES or len(tag) != _TAG_BYTES:
            raise BackendUnavailableError(
                "the HSM returned an AES-GCM result without a 12-byte iv and 16-byte tag"
            )
        return pack_wrapped(primary.number, iv + result.ciphertext + tag)

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        number, body = unpack_wrapped(wrapped)
        if not isinstance(aad, bytes):
            raise KeyInputError("associated data must be bytes")
        state = self._state(name)
        info = state.info()
        require_wrapping(info)
        version = state.version(number, missing=IntegrityError)
        require_usable(info, number)
        if len(body) <= _IV_BYTES + _TAG_BYTES:
            raise IntegrityError("wrapped blob is truncated")
        iv, ciphertext, tag = body[:_IV_BYTES], body[_IV_BYTES:-_TAG_BYTES], body[-_TAG_BYTES:]
        with self._errors(name, "decrypt"):
            result = self._crypto_client(name, version.azure_version).decrypt(
                EncryptionAlgorithm.a256_gcm,
                ciphertext,
                iv=iv,
                authentication_tag=tag,
                additional_authenticated_data=aad,
            )
        return bytes(result.plaintext)

    def sign(self, name: str, message: bytes) -> Signature:
        message = check_message(message)
        state = self._state(name)
        info = state.info()
        require_signing(info)
        require_usable(info, info.primary_version)
        primary = state.primary
        digest = hashlib.sha256(message).digest()  # only the digest crosses to the HSM
        algorithm = SignatureAlgorithm.es256 if state.spec is KeySpec.EC_P256 else SignatureAlgorithm.rs256
        with self._errors(name, "sign"):
            result = self._crypto_client(name, primary.azure_version).sign(algorithm, digest)
        value = _raw_to_der(result.signature) if state.spec is KeySpec.EC_P256 else bytes(result.signature)
        return Signature(primary.number, value)

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        message = check_message(message)
        if not isinstance(signature, Signature):
            raise KeyInputError("verify takes a Signature (version and value)")
        state = self._state(name)
        info = state.info()
        require_signing(info)
        version = state.version(signature.version, missing=InvalidSignatureError)
        require_usable(info, signature.version)
        if state.spec is KeySpec.EC_P256:
            algorithm, value = SignatureAlgorithm.es256, _der_to_raw(signature.value)
        else:
            algorithm, value = SignatureAlgorithm.rs256, signature.value
        digest = hashlib.sha256(message).digest()
        with self._errors(name, "verify"):
            result = self._crypto_client(name, version.azure_version).verify(algorithm, digest, value)
        if not result.is_valid:
            raise InvalidSignatureError(
                f"signature does not verify with version {signature.version} of key {name!r}"
            )

    def public_key(self, name: str, version: int | None = None) -> bytes:
        state = self._state(name)
        if not state.spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {state.spec.value}: it has no public key")
        chosen = state.primary if version is None else state.version(version)
        require_usable(state.info(), chosen.number)  # a disabled version publishes nothing
        with self._errors(name):
            jwk = self._client.get_key(name, chosen.azure_version).key

        def number(field_name: str) -> int:
            # JsonWebKey sets its fields dynamically; a missing one is a provider fault.
            value = getattr(jwk, field_name, None)
            if not isinstance(value, bytes):
                raise BackendUnavailableError(f"the Managed HSM returned a public key without {field_name!r}")
            return int.from_bytes(value, "big")

        if state.spec is KeySpec.EC_P256:
            public: Any = ec.EllipticCurvePublicNumbers(number("x"), number("y"), ec.SECP256R1()).public_key()
        else:
            public = rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
        return bytes(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def rotate(self, name: str) -> KeyInfo:
        check_name(name)
        with self._name_lock(name), self._errors(name):
            state = self._load(name)
            number = state.primary.number + 1
            created = self._create_version(name, state.spec, number=number, key_enabled=state.enabled)
            self._settle(name, created, number, first=False)
            return self._load(name, keeper=created).info()

    def disable(self, name: str, version: int | None = None) -> None:
        self._set_enabled(name, version, enabled=False)

    def enable(self, name: str, version: int | None = None) -> None:
        self._set_enabled(name, version, enabled=True)

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if not 7 <= days <= 120:
            raise KeyInputError("destruction is scheduled 7 to 120 days ahead")
        check_name(name)
        with self._name_lock(name), self._errors(name):
            state = self._load(name)
            chosen = state.version(version)
            if chosen.number == state.primary.number:
                raise KeyInputError(f"version {version} is the primary of key {name!r}; rotate first")
            after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
            tags = {
                **chosen.tags,
                TAG_STATE: VersionState.DESTRUCTION_SCHEDULED.value,
                TAG_DESTROY_AFTER: after.isoformat(timespec="seconds"),
            }
            self._client.update_key_properties(name, chosen.azure_version, enabled=False, tags=tags)

    def health(self) -> Health:
        try:
            self._client.get_key(_HEALTH_PROBE)
        except ResourceNotFoundError:
            pass
        except ClientAuthenticationError:
            return Health(False, PROVIDER, "the Managed HSM refused our token: check the credential")
        except HttpResponseError as err:
            return Health(
                False, PROVIDER, f"the Managed HSM answered {err.status_code}: check its role assignments"
            )
        except AzureError as err:
            return Health(False, PROVIDER, f"the Managed HSM is unreachable ({type(err).__name__})")
        return Health(True, PROVIDER, f"Azure Managed HSM at {self._client.vault_url} (FIPS 140-2 Level 3)")

    def close(self) -> None:
        with self._crypto_lock:
            self._crypto.clear()
        # The cryptography clients share the KeyClient's pipeline; closing it closes them.
        self._client.close()

    # --- state in tags ------------------------------------------------------------------------

    def _state(self, name: str) -> _State:
        check_name(name)
        with self._errors(name):
            return self._load(name)

    def _azure_versions(self, name: str) -> list[KeyProperties]:
        try:
            return list(self._client.list_properties_of_key_versions(name))
        except ResourceNotFoundError:
            return []

    def _load(self, name: str, *, keeper: str | None = None) -> _State:
        """The key as its tags describe it. `keeper`: a version this instance has just
        settled, which keeps its number even while a racer has not yet given way."""
        holders: dict[int, list[KeyProperties]] = {}
        for props in self._azure_versions(name):
            number = _number(props)
            if number is not None:
                holders.setdefault(number, []).append(props)
        # A number two versions claim is mid-race (see _settle): neither is used until
        # one gives way, so no blob or signature can name a version that then moves.
        by_number = {}
        for number, found in holders.items():
            kept = [p for p in found if p.version == keeper] if len(found) > 1 else found
            if kept:
                by_number[number] = kept[0]
        if not by_number:
            raise UnknownKeyError(f"no key named {name!r} in the Managed HSM")
        newest = by_number[max(by_number)]
        newest_tags = newest.tags or {}
        try:
            spec = KeySpec(newest_tags.get(TAG_SPEC, ""))
        except ValueError:
            raise BackendUnavailableError(f"key {name!r} carries no valid {TAG_SPEC} tag") from None
        key_enabled = newest_tags.get(TAG_KEY_ENABLED) != "false"
        versions = {}
        for number, props in by_number.items():
            tags = dict(props.tags or {})
            try:
                state = VersionState(tags.get(TAG_STATE, VersionState.ENABLED.value))
            except ValueError:
                state = VersionState.DISABLED
            if state is VersionState.ENABLED and key_enabled and props.enabled is False:
                # Disabled in the HSM by someone else: the HSM refuses it, so say so.
                state = VersionState.DISABLED
            versions[number] = _Version(number, props.version or "", state, tags)
        return _State(name, spec, key_enabled, versions)

    def _create_version(self, name: str, spec: KeySpec, *, number: int, key_enabled: bool) -> str:
        tags = {
            TAG_SPEC: spec.value,
            TAG_VERSION: str(number),
            TAG_STATE: VersionState.ENABLED.value,
            TAG_KEY_ENABLED: "true" if key_enabled else "false",
        }
        common: dict[str, Any] = {
            "hardware_protected": True,
            "exportable": False,
            "enabled": key_enabled,
            "tags": tags,
        }
        if spec is KeySpec.AES_256:
            ops: list[str | KeyOperation] = [KeyOperation.encrypt, KeyOperation.decrypt]
            key = self._client.create_oct_key(name, size=256, key_operations=ops, **common)
        elif spec is KeySpec.EC_P256:
            ops = [KeyOperation.sign, KeyOperation.verify]
            key = self._client.create_ec_key(name, curve=KeyCurveName.p_256, key_operations=ops, **common)
        else:
            ops = [KeyOperation.sign, KeyOperation.verify]
            key = self._client.create_rsa_key(
                name, size=3072, public_exponent=65537, key_operations=ops, **common
            )
        if not key.properties.version:
            raise BackendUnavailableError("the Managed HSM created a key without a version id")
        return key.properties.version

    def _settle(self, name: str, mine: str, number: int, *, first: bool) -> bool:
        """Make sure our new Azure version `mine` holds `number` alone; False if it gave
        way (create only). Azure has no compare-and-set, so the rule is: a version that
        sees another holder of its number gives way, whichever came first. Each claim
        is listed after it is made, so of two claims at least the later one sees the
        other: two versions can never both keep a number (both may give way; then
        they retry at random times). A create that gives way abandons its version; a
        rotate takes the next free number."""
        for _ in range(_SETTLE_ATTEMPTS):
            everything = self._azure_versions(name)
            if not any(_number(p) == number and p.version != mine for p in everything):
                return True
            own = next((p for p in everything if p.version == mine), None)
            if own is None:  # not listed yet: never rewrite its tags from nothing
                _jitter()
                continue
            own_tags = dict(own.tags or {})
            if first:
                own_tags.pop(TAG_VERSION, None)
                own_tags[TAG_ABANDONED] = "true"
                self._client.update_key_properties(name, mine, enabled=False, tags=own_tags)
                return False
            # Give the number up (no number: invisible to readers), then claim the next
            # free one at a random moment; the first racer back takes the lowest.
            own_tags.pop(TAG_VERSION, None)
            self._client.update_key_properties(name, mine, tags=own_tags)
            _jitter()
            everything = self._azure_versions(name)
            number = max((n for p in everything if p.version != mine and (n := _number(p))), default=0) + 1
            own_tags[TAG_VERSION] = str(number)
            self._client.update_key_properties(name, mine, tags=own_tags)
        raise BackendUnavailableError(
            f"could not settle a version number for key {name!r}; retry the rotation"
        )

    def _set_enabled(self, name: str, version: int | None, *, enabled: bool) -> None:
        check_name(name)
        with self._name_lock(name), self._errors(name):
            state = self._load(name)
            if version is not None:
                chosen = state.version(version)
                if chosen.state in (VersionState.DESTRUCTION_SCHEDULED, VersionState.DESTROYED):
                    raise KeyInputError(f"version {version} of key {name!r} is {chosen.state.value}")
                new_state = VersionState.ENABLED if enabled else VersionState.DISABLED
                self._client.update_key_properties(
                    name,
                    chosen.azure_version,
                    enabled=state.enabled and enabled,
                    tags={**chosen.tags, TAG_STATE: new_state.value},
                )
                return
            # The newest version's tag is authoritative: write it first when disabling and
            # last when enabling, so an interrupted change never reads as enabled.
            order = sorted(state.versions.values(), key=lambda v: v.number, reverse=not enabled)
            for v in order:
                self._client.update_key_properties(
                    name,
                    v.azure_version,
                    enabled=enabled and v.state is VersionState.ENABLED,
                    tags={**v.tags, TAG_KEY_ENABLED: "true" if enabled else "false"},
                )

    # --- helpers --------------------------------------------------------------------------------

    def _crypto_client(self, name: str, azure_version: str) -> CryptographyClient:
        # One client per version: it caches the version's public key, which never changes.
        cache_key = (name, azure_version)
        with self._crypto_lock:
            client = self._crypto.get(cache_key)
            if client is None:
                client = self._client.get_cryptography_client(name, key_version=azure_version)
                self._crypto[cache_key] = client
                if len(self._crypto) > _CRYPTO_CLIENT_CACHE:
                    self._crypto.popitem(last=False)
            return client

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        with self._name_locks_lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    @contextmanager
    def _errors(self, name: str, operation: str = "") -> Iterator[None]:
        """Provider errors as the protocol's exceptions; our own pass through."""
        try:
            yield
        except KeyBackendError:
            raise
        except ResourceNotFoundError:
            raise UnknownKeyError(f"no key (or version) named {name!r} in the Managed HSM") from None
        except ClientAuthenticationError as err:
            _unavailable(name, err, "the Managed HSM refused our token; check the credential")
        except HttpResponseError as err:
            status = err.status_code
            code, inner, text = _error_details(err)
            if status == 403 and ("disabled" in text or inner == "KeyDisabled"):
                raise KeyDisabledError(f"key {name!r} is disabled in the Managed HSM") from None
            if status == 400 and operation == "decrypt":
                raise IntegrityError(f"unwrap with key {name!r} failed authentication") from None
            if status == 400 and operation == "verify":
                raise InvalidSignatureError(f"signature does not verify with key {name!r}") from None
            hint = "check the identity's Managed HSM role" if status == 403 else "retry later"
            _unavailable(name, err, f"the Managed HSM answered {status} {code}; {hint}")
        except AzureError as err:  # ServiceRequestError, ServiceResponseError, timeouts, ...
            _unavailable(name, err, "the Managed HSM could not be reached; check the network and vault URL")


def _error_details(err: HttpResponseError) -> tuple[str, str, str]:
    """(code, inner code, lowercase message) of a Key Vault error reply."""
    error = err.error
    code = str(getattr(error, "code", "") or "")
    message = str(getattr(error, "message", "") or err.message or "")
    inner = ""
    body: Any = None
    try:
        body = json.loads(err.response.text()) if err.response is not None else None
    except (ValueError, AttributeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        code = code or str(detail.get("code") or "")
        message = message or str(detail.get("message") or "")
        inner_error = detail.get("innererror")
        if isinstance(inner_error, dict):
            inner = str(inner_error.get("code") or "")
    return code, inner, message.lower()


def _unavailable(name: str, err: AzureError, what: str) -> NoReturn:
    raise BackendUnavailableError(f"key {name!r}: {what} ({type(err).__name__})") from err

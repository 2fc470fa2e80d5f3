"""The AWS KMS key backend: Keycell keys held by AWS Key Management Service.

Every key is generated inside KMS (Origin AWS_KMS), in HSMs validated at FIPS 140-2
Level 3; key material never leaves them. In FIPS mode the client talks to the FIPS
endpoints (`kms-fips.<region>.amazonaws.com`, boto3's `use_fips_endpoint`) unless an
endpoint was configured explicitly (argument, `AWS_ENDPOINT_URL_KMS` or
`AWS_ENDPOINT_URL`), as for a local emulator; that endpoint is then kept.

How Keycell's model maps onto KMS (all state lives in KMS, none in this object, so
every process pointed at the same account and region sees the same keys):

- Versions. Asymmetric KMS keys cannot rotate, and rotating a symmetric one keeps no
  addressable versions, so each Keycell key *version* is its own KMS key:
  version N of key `name` is the KMS key behind alias `alias/keycell/<name>/v<N>`.
  `alias/keycell/<name>` points at the primary (newest) version and is the name's
  claim: CreateAlias fails when it exists, so two processes creating one name race
  on KMS and exactly one wins (the loser's fresh KMS key is scheduled for deletion).
  A rotation claims `v<N+1>` the same way (on a lost race it claims the next number),
  then moves the primary alias and re-checks for a newer version, so concurrent
  rotations converge on the highest one. Each KMS key is tagged `keycell:name`,
  `keycell:version` and `keycell:spec`; those never change once the version alias
  is claimed and are cached per process, nothing else is.
- Operations address KMS directly: wrap/sign use the primary alias (the response
  names the KMS key used, hence the version); unwrap/verify use the version alias
  named by the blob or signature. KMS itself enforces disabled and pending-deletion
  states (DisabledException / KMSInvalidStateException -> KeyDisabledError).
- Disable/enable of a version is DisableKey/EnableKey on its KMS key.
- Disable of the whole key disables every version's KMS key in KMS, so nothing, not
  even a caller using the KMS keys directly, can use a disabled Keycell key. To give
  back exactly the per-version states on enable, each KMS key disabled only because
  of the key-level disable is tagged `keycell:held`, and every version is tagged
  `keycell:key-disabled` (describe reads it from the primary). Versions are
  disabled before the markers are written and enabled after they are removed, so
  an interrupted call errs on the side of refusing, and repeating it completes it.
- schedule_destruction is ScheduleKeyDeletion(PendingWindowInDays=days) of the
  version's KMS key (state PendingDeletion -> DESTRUCTION_SCHEDULED). KMS accepts
  7 to 30 days; a longer window is refused rather than shortened. When the window
  passes KMS deletes the key and its aliases: a version below the primary whose
  alias is gone is reported DESTROYED.
- Wrap is KMS Encrypt (it must protect the caller's plaintext, so not
  GenerateDataKey); the associated data becomes the encryption context, which KMS
  binds to the ciphertext as AAD (see `encryption_context`). The provider blob kept
  in `pack_wrapped` is the KMS CiphertextBlob.
- Sign/verify send only the SHA-256 digest (MessageType DIGEST): ECDSA_SHA_256 on
  ECC_NIST_P256 keys, RSASSA_PKCS1_V1_5_SHA_256 on RSA_3072 keys (KeyUsage
  SIGN_VERIFY). Public keys come from GetPublicKey (DER SPKI, returned as PEM); KMS
  refuses GetPublicKey of a disabled key, so this backend does too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from cryptography.hazmat.primitives import serialization

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
    check_message,
    check_name,
    check_spec,
    check_wrap_input,
    pack_wrapped,
    unpack_wrapped,
)

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

PROVIDER = "aws-kms"
# AWS KMS HSMs are validated under FIPS 140-2 at Level 3.
FIPS_LEVEL = 3
ALIAS_PREFIX = "alias/keycell/"
# How long a call on a just-created KMS key retries NotFound (KMS eventual consistency).
NEW_KEY_SETTLE_SECONDS = 10.0

TAG_NAME = "keycell:name"
TAG_VERSION = "keycell:version"
TAG_SPEC = "keycell:spec"
TAG_KEY_DISABLED = "keycell:key-disabled"  # on every version while disable(name) holds
TAG_HELD = "keycell:held"  # this KMS key is disabled only by disable(name)

# Spec -> (KMS KeySpec, KeyUsage, signing algorithm).
_KMS_SPECS: dict[KeySpec, tuple[str, str, str | None]] = {
    KeySpec.AES_256: ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", None),
    KeySpec.EC_P256: ("ECC_NIST_P256", "SIGN_VERIFY", "ECDSA_SHA_256"),
    KeySpec.RSA_3072: ("RSA_3072", "SIGN_VERIFY", "RSASSA_PKCS1_V1_5_SHA_256"),
}
_SPEC_OF_KMS = {kms_spec: spec for spec, (kms_spec, _, _) in _KMS_SPECS.items()}

# KMS takes at most 6144 signature bytes; anything longer cannot be a valid signature.
_MAX_SIGNATURE_BYTES = 6144
# Associated data up to this size travels base64-encoded in the encryption context,
# readable in CloudTrail for audit; larger data is bound through its SHA-256, which
# keeps the context small.
_AAD_INLINE_BYTES = 2048
# The context for empty associated data: "-" is never the output of base64 of
# non-empty bytes, so no two aad values share a context.
_EMPTY_AAD_CONTEXT = {"keycell-aad": "-"}

# KMS error codes and what they mean for a caller.
_DISABLED_CODES = {"DisabledException", "KMSInvalidStateException"}
_INTEGRITY_CODES = {"InvalidCiphertextException", "IncorrectKeyException"}
_WRONG_TYPE_CODES = {"InvalidKeyUsageException", "UnsupportedOperationException"}
_INPUT_CODES = {"ValidationException", "InvalidArnException", "InvalidAliasNameException"}

ErrorFactory = Callable[[], KeyBackendError]


def encryption_context(aad: bytes) -> dict[str, str]:
    """The KMS encryption context that carries `aad`. Distinct aad gives distinct
    contexts (beyond 2048 bytes, as surely as SHA-256 has no collisions), so KMS,
    which authenticates the context as AAD, refuses a blob under any other aad."""
    if not aad:
        return dict(_EMPTY_AAD_CONTEXT)
    if len(aad) <= _AAD_INLINE_BYTES:
        return {"keycell-aad": base64.b64encode(aad).decode("ascii")}
    return {"keycell-aad-sha256": base64.b64encode(hashlib.sha256(aad).digest()).decode("ascii")}


def primary_alias(name: str) -> str:
    return f"{ALIAS_PREFIX}{name}"


def version_alias(name: str, version: int) -> str:
    return f"{ALIAS_PREFIX}{name}/v{version}"


def _key_id(key_id_or_arn: str) -> str:
    """The bare key id of a key ARN (`arn:...:key/<id>`) or key id."""
    return key_id_or_arn.rsplit("/", 1)[-1] if key_id_or_arn.startswith("arn:") else key_id_or_arn


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """The explicitly configured endpoint, found where the AWS SDKs look for it."""
    if endpoint_url:
        return endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_KMS") or os.environ.get("AWS_ENDPOINT_URL") or None


class AwsKmsKeyBackend:
    """A `KeyBackend` whose keys are AWS KMS keys (see the module docstring)."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        fips_mode: bool = False,
        session: boto3.session.Session | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.fips_mode = fips_mode
        endpoint = resolve_endpoint(endpoint_url)
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # "standard" retries throttling and transient errors with jittered backoff.
            retries={"mode": "standard", "max_attempts": max_attempts},
            # The adapter is shared by many threads: let up to 32 hold a connection each.
            max_pool_connections=32,
            # The FIPS endpoint cannot be combined with a custom one: keep an explicit
            # endpoint (an emulator, a VPC endpoint) as configured.
            use_fips_endpoint=fips_mode and endpoint is None,
            user_agent_extra="keycell",
        )
        session = session or boto3.session.Session()
        try:
            self._client: KMSClient = session.client(
                "kms", region_name=region, endpoint_url=endpoint, config=config
            )
        except NoRegionError:
            raise KeyInputError(
                "AWS KMS needs a region: pass region= or set AWS_REGION / AWS_DEFAULT_REGION"
            ) from None
        self.region = self._client.meta.region_name
        # Facts that never change once a version alias is claimed: KMS key id ->
        # (name, version, spec), and name -> spec. Mutable state is always read from KMS.
        self._identities: dict[str, tuple[str, int, KeySpec]] = {}
        self._specs: dict[str, KeySpec] = {}
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        """The endpoint the client talks to (the FIPS one in FIPS mode by default)."""
        return str(self._client.meta.endpoint_url)

    # --- the protocol ---------------------------------------------------------------

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo:
        check_name(name)
        check_spec(spec, fips_mode=self.fips_mode)
        if spec not in _KMS_SPECS:
            raise UnsupportedKeySpecError(
                f"the aws-kms backend creates {', '.join(s.value for s in _KMS_SPECS)} keys, not {spec.value}"
            )
        # A cheap check first: a KMS key made and then thrown away still costs money
        # for its deletion window. The alias claim below is what decides a race.
        if self._describe_alias(primary_alias(name)) is not None:
            raise KeyExistsError(f"a key named {name!r} already exists")
        key_id = self._create_kms_key(name, spec, version=1, held=False)
        if not self._claim_alias(primary_alias(name), key_id, exist_ok=False):
            self._discard(key_id)
            raise KeyExistsError(f"a key named {name!r} already exists")
        self._claim_alias(version_alias(name, 1), key_id)
        with self._lock:
            self._identities[key_id] = (name, 1, spec)
            self._specs[name] = spec
        # Built here rather than read back: KMS is eventually consistent, and a
        # DescribeKey right after CreateKey may not see the key yet.
        return KeyInfo(
            name=name,
            spec=spec,
            provider=PROVIDER,
            protection=Protection.HSM,
            fips_level=FIPS_LEVEL,
            extractable=False,
            enabled=True,
            primary_version=1,
            versions=(KeyVersion(1, VersionState.ENABLED),),
        )

    def describe(self, name: str) -> KeyInfo:
        check_name(name)
        primary = self._primary(name)
        key_id = primary["KeyId"]
        tags = self._tags(key_id)
        _, primary_version, spec = self._identity(key_id, tags=tags)
        versions: list[KeyVersion] = []
        for number in range(1, primary_version):
            meta = self._describe_alias(version_alias(name, number))
            if meta is None:
                versions.append(KeyVersion(number, VersionState.DESTROYED))
            else:
                versions.append(KeyVersion(number, self._version_state(meta)))
        versions.append(KeyVersion(primary_version, self._version_state(primary, tags)))
        return KeyInfo(
            name=name,
            spec=spec,
            provider=PROVIDER,
            protection=Protection.HSM,
            fips_level=FIPS_LEVEL,
            extractable=False,
            enabled=TAG_KEY_DISABLED not in tags,
            primary_version=primary_version,
            versions=tuple(versions),
        )

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = check_wrap_input(plaintext, aad)
        check_name(name)
        self._require(name, signing=False)
        reply = self._call(
            "encrypt",
            what=f"wrapping with key {name!r}",
            on=self._unknown_key(name),
            KeyId=primary_alias(name),
            Plaintext=plaintext,
            EncryptionContext=encryption_context(aad),
            EncryptionAlgorithm="SYMMETRIC_DEFAULT",
        )
        version = self._version_of(reply["KeyId"], name)
        return pack_wrapped(version, bytes(reply["CiphertextBlob"]))

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        number, body = unpack_wrapped(wrapped)
        if not isinstance(aad, bytes):
            raise KeyInputError("associated data must be bytes")
        check_name(name)
        self._require(name, signing=False)
        reply = self._call(
            "decrypt",
            what=f"unwrapping with version {number} of key {name!r}",
            on={"NotFoundException": lambda: self._missing_version(name, number, IntegrityError)},
            KeyId=version_alias(name, number),
            CiphertextBlob=body,
            EncryptionContext=encryption_context(aad),
            EncryptionAlgorithm="SYMMETRIC_DEFAULT",
        )
        return bytes(reply["Plaintext"])

    def sign(self, name: str, message: bytes) -> Signature:
        message = check_message(message)
        check_name(name)
        spec = self._require(name, signing=True)
        reply = self._call(
            "sign",
            what=f"signing with key {name!r}",
            on=self._unknown_key(name),
            KeyId=primary_alias(name),
            Message=hashlib.sha256(message).digest(),
            MessageType="DIGEST",
            SigningAlgorithm=self._algorithm(spec),
        )
        return Signature(self._version_of(reply["KeyId"], name), bytes(reply["Signature"]))

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        message = check_message(message)
        if not isinstance(signature, Signature) or not isinstance(signature.value, bytes):
            raise KeyInputError("verify takes a Signature (version and value bytes)")
        check_name(name)
        spec = self._require(name, signing=True)
        number = signature.version

        def invalid() -> KeyBackendError:
            return InvalidSignatureError(f"signature does not verify with version {number} of key {name!r}")

        if not isinstance(number, int) or number < 1 or not 1 <= len(signature.value) <= _MAX_SIGNATURE_BYTES:
            raise invalid()
        reply = self._call(
            "verify",
            what=f"verifying with version {number} of key {name!r}",
            on={
                "NotFoundException": lambda: self._missing_version(name, number, InvalidSignatureError),
                "KMSInvalidSignatureException": invalid,
            },
            KeyId=version_alias(name, number),
            Message=hashlib.sha256(message).digest(),
            MessageType="DIGEST",
            Signature=signature.value,
            SigningAlgorithm=self._algorithm(spec),
        )
        if reply.get("SignatureValid") is not True:
            raise invalid()

    def public_key(self, name: str, version: int | None = None) -> bytes:
        check_name(name)
        spec = self._spec(name)
        if not spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it has no public key")
        if version is None:
            alias, on = primary_alias(name), self._unknown_key(name)
        else:
            number = version
            alias = version_alias(name, number)
            on = {"NotFoundException": lambda: self._missing_version(name, number, UnknownKeyError)}
        reply = self._call("get_public_key", what=f"reading the public key of {name!r}", on=on, KeyId=alias)
        public = serialization.load_der_public_key(bytes(reply["PublicKey"]))
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def rotate(self, name: str) -> KeyInfo:
        check_name(name)
        primary = self._primary(name)
        old_id = primary["KeyId"]
        old_tags = self._tags(old_id)
        _, current, spec = self._identity(old_id, tags=old_tags)
        # A rotation left half done by a crash may lack the primary's version alias.
        self._claim_alias(version_alias(name, current), old_id, exist_ok=True)
        key_disabled = TAG_KEY_DISABLED in old_tags
        number = current + 1
        key_id = self._create_kms_key(name, spec, version=number, held=key_disabled)
        while not self._claim_alias(version_alias(name, number), key_id, exist_ok=False):
            number += 1  # another process rotated first: take the next number
            self._settled(self._tag, key_id, {TAG_VERSION: str(number)})
        self._point_primary(name, number, key_id)
        # A disable(name) that ran while this rotation did may have missed the new
        # version: check after publishing it, and hold it disabled too.
        if not key_disabled and TAG_KEY_DISABLED in self._tags(old_id):
            self._hold(key_id, enabled=True)
        return self.describe(name)

    def disable(self, name: str, version: int | None = None) -> None:
        check_name(name)
        if version is None:
            self._disable_key(name)
            return
        key_disabled, meta = self._version_for_change(name, version)
        if key_disabled:
            self._untag(meta["KeyId"], [TAG_HELD])
        if meta["KeyState"] == "Enabled":
            self._call("disable_key", what=f"disabling version {version} of {name!r}", KeyId=meta["KeyId"])

    def enable(self, name: str, version: int | None = None) -> None:
        check_name(name)
        if version is None:
            self._enable_key(name)
            return
        key_disabled, meta = self._version_for_change(name, version)
        if key_disabled:
            # The key as a whole stays disabled: remember that this version is enabled
            # and leave its KMS key off until enable(name).
            if meta["KeyState"] == "Disabled":
                self._tag(meta["KeyId"], {TAG_HELD: "true"})
            return
        if meta["KeyState"] != "Enabled":
            self._call("enable_key", what=f"enabling version {version} of {name!r}", KeyId=meta["KeyId"])
        self._untag(meta["KeyId"], [TAG_HELD])

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if not 7 <= days <= 120:
            raise KeyInputError("destruction is scheduled 7 to 120 days ahead")
        if days > 30:
            raise KeyInputError("AWS KMS schedules key deletion 7 to 30 days ahead; pass days=30 or fewer")
        check_name(name)
        _, primary_version = self._primary_version(name)
        meta = self._describe_alias(version_alias(name, version))
        if meta is None:
            raise self._missing_version(name, version, UnknownKeyError)
        if version == primary_version:
            raise KeyInputError(f"version {version} is the primary of key {name!r}; rotate first")
        if meta["KeyState"] == "PendingDeletion":
            return  # already scheduled; KMS would refuse a second schedule
        self._call(
            "schedule_key_deletion",
            what=f"scheduling destruction of version {version} of {name!r}",
            KeyId=meta["KeyId"],
            PendingWindowInDays=days,
        )

    def health(self) -> Health:
        try:
            self._call("list_keys", what="checking health", Limit=1)
        except KeyBackendError as err:
            return Health(False, PROVIDER, f"AWS KMS in {self.region} at {self.endpoint_url}: {err}")
        return Health(
            True, PROVIDER, f"AWS KMS in {self.region} at {self.endpoint_url}; FIPS 140-2 Level 3 HSMs"
        )

    def close(self) -> None:
        self._client.close()

    # --- KMS calls ---------------------------------------------------------------------

    def _call(
        self, operation: str, *, what: str, on: Mapping[str, ErrorFactory] | None = None, **params: Any
    ) -> dict[str, Any]:
        """One KMS call; every failure becomes a specific KeyBackendError."""
        try:
            reply: dict[str, Any] = getattr(self._client, operation)(**params)
            return reply
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if on and code in on:
                raise on[code]() from err
            raise _error_for(code, what) from err
        except NoCredentialsError as err:
            raise BackendUnavailableError(
                f"no AWS credentials for AWS KMS while {what}: configure a role, a profile or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from err
        except BotoCoreError as err:
            raise BackendUnavailableError(
                f"AWS KMS at {self.endpoint_url} could not be reached while {what} ({type(err).__name__}); "
                "check the endpoint, the network and the credentials, then retry"
            ) from err

    @staticmethod
    def _unknown_key(name: str) -> dict[str, ErrorFactory]:
        return {"NotFoundException": lambda: UnknownKeyError(f"no key named {name!r} in AWS KMS")}

    def _describe_alias(self, alias: str) -> dict[str, Any] | None:
        """KeyMetadata of the KMS key behind `alias`, or None when there is none."""
        try:
            reply = self._call("describe_key", what=f"reading {alias}", KeyId=alias)
        except UnknownKeyError:
            return None
        meta: dict[str, Any] = reply["KeyMetadata"]
        return meta

    def _primary(self, name: str) -> dict[str, Any]:
        meta = self._describe_alias(primary_alias(name))
        if meta is None:
            raise UnknownKeyError(f"no key named {name!r} in AWS KMS")
        return meta

    def _primary_version(self, name: str) -> tuple[dict[str, Any], int]:
        primary = self._primary(name)
        return primary, self._identity(primary["KeyId"])[1]

    def _tags(self, key_id: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"KeyId": key_id}
            if marker:
                params["Marker"] = marker
            reply = self._call("list_resource_tags", what=f"reading the tags of KMS key {key_id}", **params)
            tags.update({t["TagKey"]: t["TagValue"] for t in reply.get("Tags", [])})
            marker = reply.get("NextMarker")
            if not reply.get("Truncated") or not marker:
                return tags

    def _tag(self, key_id: str, tags: Mapping[str, str]) -> None:
        self._call(
            "tag_resource",
            what=f"tagging KMS key {key_id}",
            KeyId=key_id,
            Tags=[{"TagKey": k, "TagValue": v} for k, v in tags.items()],
        )

    def _untag(self, key_id: str, keys: list[str]) -> None:
        self._call("untag_resource", what=f"untagging KMS key {key_id}", KeyId=key_id, TagKeys=keys)

    def _identity(
        self, key_id_or_arn: str, *, tags: Mapping[str, str] | None = None
    ) -> tuple[str, int, KeySpec]:
        """(name, version, spec) of a KMS key Keycell made; immutable, so cached."""
        key_id = _key_id(key_id_or_arn)
        with self._lock:
            known = self._identities.get(key_id)
        if known is not None:
            return known
        tags = self._tags(key_id) if tags is None else tags
        try:
            identity = (tags[TAG_NAME], int(tags[TAG_VERSION]), KeySpec(tags[TAG_SPEC]))
        except (KeyError, ValueError):
            raise UnknownKeyError(
                f"KMS key {key_id} is not a Keycell key (its keycell:* tags are missing or altered)"
            ) from None
        with self._lock:
            self._identities[key_id] = identity
            self._specs.setdefault(identity[0], identity[2])
        return identity

    def _version_of(self, key_id_or_arn: str, name: str) -> int:
        owner, version, _ = self._identity(key_id_or_arn)
        if owner != name:
            raise IntegrityError(
                f"alias of key {name!r} points at a KMS key of key {owner!r}; check the aliases"
            )
        return version

    def _spec(self, name: str) -> KeySpec:
        """The key's spec: it never changes, so it is read from KMS once per process."""
        with self._lock:
            spec = self._specs.get(name)
        if spec is not None:
            return spec
        meta = self._primary(name)
        spec = _SPEC_OF_KMS.get(str(meta.get("KeySpec")))
        if spec is None:
            raise UnknownKeyError(f"{primary_alias(name)} names a KMS key Keycell did not create")
        with self._lock:
            self._specs[name] = spec
        return spec

    def _require(self, name: str, *, signing: bool) -> KeySpec:
        """The key's spec, if it fits the operation (signing or wrapping)."""
        spec = self._spec(name)
        if signing and not spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it wraps, it does not sign")
        if not signing and spec is not KeySpec.AES_256:
            raise WrongKeyTypeError(f"key {name!r} is {spec.value}: it signs, it does not wrap")
        return spec

    @staticmethod
    def _algorithm(spec: KeySpec) -> str:
        algorithm = _KMS_SPECS[spec][2]
        assert algorithm is not None
        return algorithm

    def _missing_version(self, name: str, number: int, missing: type[KeyBackendError]) -> KeyBackendError:
        """The error for a version alias KMS does not know: a destroyed version (below
        the primary, its alias deleted with its KMS key) or one the key never had."""
        _, primary_version = self._primary_version(name)
        if isinstance(number, int) and 1 <= number < primary_version:
            return KeyDisabledError(f"version {number} of key {name!r} is destroyed")
        return missing(f"key {name!r} has no version {number}")

    def _version_state(self, meta: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> VersionState:
        state = meta.get("KeyState")
        if state == "Enabled":
            return VersionState.ENABLED
        if state in ("PendingDeletion", "PendingReplicaDeletion"):
            return VersionState.DESTRUCTION_SCHEDULED
        if state == "Disabled":
            tags = self._tags(meta["KeyId"]) if tags is None else tags
            return VersionState.ENABLED if TAG_HELD in tags else VersionState.DISABLED
        raise BackendUnavailableError(f"KMS key {meta.get('KeyId')} is {state}; it cannot be used now")

    # --- creating and claiming ----------------------------------------------------------

    def _create_kms_key(self, name: str, spec: KeySpec, *, version: int, held: bool) -> str:
        kms_spec, usage, _ = _KMS_SPECS[spec]
        tags = {TAG_NAME: name, TAG_VERSION: str(version), TAG_SPEC: spec.value}
        if held:
            tags |= {TAG_KEY_DISABLED: "true", TAG_HELD: "true"}
        reply = self._call(
            "create_key",
            what=f"creating a KMS key for {name!r}",
            KeySpec=kms_spec,
            KeyUsage=usage,
            Origin="AWS_KMS",  # generated inside KMS, never imported
            Description=f"Keycell key {name} ({spec.value})",
            Tags=[{"TagKey": k, "TagValue": v} for k, v in tags.items()],
        )
        key_id = str(reply["KeyMetadata"]["KeyId"])
        if held:
            # The key as a whole is disabled: the new version starts held off. Until
            # its alias is claimed nobody addresses it, so it is never usable.
            self._settled(
                self._call, "disable_key", what=f"holding a new version of {name!r} disabled", KeyId=key_id
            )
        return key_id

    def _claim_alias(self, alias: str, key_id: str, *, exist_ok: bool = True) -> bool:
        """Create `alias` -> `key_id`; False if it already exists (another claim won)."""
        try:
            self._settled(
                self._call, "create_alias", what=f"creating {alias}", AliasName=alias, TargetKeyId=key_id
            )
        except KeyExistsError:
            if not exist_ok:
                return False
        return True

    @staticmethod
    def _settled(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(*args, **kwargs)` on a KMS key created a moment ago. KMS is eventually
        consistent: for a few seconds after CreateKey other calls may not find the key."""
        deadline = time.monotonic() + NEW_KEY_SETTLE_SECONDS
        delay = 0.1
        while True:
            try:
                return call(*args, **kwargs)
            except UnknownKeyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _discard(self, key_id: str) -> None:
        """Schedule an unused KMS key (a lost creation race) for deletion."""
        # An unaliased, unused key is harmless (it costs only money): a failure here
        # must not hide the KeyExistsError the caller needs.
        with contextlib.suppress(KeyBackendError):
            self._call(
                "schedule_key_deletion",
                what="discarding an unused KMS key",
                KeyId=key_id,
                PendingWindowInDays=7,
            )

    def _point_primary(self, name: str, number: int, key_id: str) -> None:
        """Point the primary alias at version `number`, then converge on any newer
        version a concurrent rotation published meanwhile."""
        while True:
            self._settled(
                self._call,
                "update_alias",
                what=f"making version {number} of {name!r} primary",
                AliasName=primary_alias(name),
                TargetKeyId=key_id,
            )
            newer = self._describe_alias(version_alias(name, number + 1))
            if newer is None:
                return
            number, key_id = number + 1, newer["KeyId"]

    # --- key-level disable and enable ---------------------------------------------------

    def _existing_versions(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        primary, primary_version = self._primary_version(name)
        found = []
        for number in range(1, primary_version):
            meta = self._describe_alias(version_alias(name, number))
            if meta is not None:
                found.append((number, meta))
        found.append((primary_version, primary))  # the primary last: its marker is what describe reads
        return found

    def _disable_key(self, name: str) -> None:
        done: set[str] = set()
        while True:
            versions = self._existing_versions(name)
            for _, meta in versions:
                if meta["KeyId"] in done:
                    continue
                self._hold(meta["KeyId"], enabled=meta["KeyState"] == "Enabled")
                done.add(meta["KeyId"])
            # A rotation may have published a version meanwhile: go round until the
            # primary is one this call has held.
            if self._primary(name)["KeyId"] in done:
                return

    def _hold(self, key_id: str, *, enabled: bool) -> None:
        """Disable one version's KMS key for the key-level disable, remembering whether
        the version itself was enabled (tags first, so a crash leaves it recoverable)."""
        tags = {TAG_KEY_DISABLED: "true"}
        if enabled:
            tags[TAG_HELD] = "true"
        self._tag(key_id, tags)
        if enabled:
            self._call("disable_key", what="disabling a version for the key-level disable", KeyId=key_id)

    def _enable_key(self, name: str) -> None:
        for _, meta in self._existing_versions(name):
            key_id = meta["KeyId"]
            tags = self._tags(key_id)
            if TAG_HELD in tags and meta["KeyState"] == "Disabled":
                self._call("enable_key", what="enabling a version for the key-level enable", KeyId=key_id)
            if TAG_HELD in tags or TAG_KEY_DISABLED in tags:
                self._untag(key_id, [TAG_HELD, TAG_KEY_DISABLED])

    def _version_for_change(self, name: str, version: int) -> tuple[bool, dict[str, Any]]:
        """(is the key as a whole disabled, KeyMetadata of `version`) for enable/disable."""
        primary = self._primary(name)
        key_disabled = TAG_KEY_DISABLED in self._tags(primary["KeyId"])
        meta = self._describe_alias(version_alias(name, version)) if isinstance(version, int) else None
        if meta is None:
            error = self._missing_version(name, version, UnknownKeyError)
            if isinstance(error, KeyDisabledError):
                raise KeyInputError(f"version {version} of key {name!r} is destroyed")
            raise error
        if meta["KeyState"] in ("PendingDeletion", "PendingReplicaDeletion"):
            raise KeyInputError(
                f"version {version} of key {name!r} is {VersionState.DESTRUCTION_SCHEDULED.value}"
            )
        return key_disabled, meta


def _error_for(code: str, what: str) -> KeyBackendError:
    """The KeyBackendError for a KMS error code, with what to do about it."""
    if code == "NotFoundException":
        return UnknownKeyError(f"AWS KMS has no such key ({what})")
    if code in _DISABLED_CODES:
        return KeyDisabledError(f"the KMS key is disabled or pending deletion ({what}); enable it first")
    if code in _INTEGRITY_CODES:
        return IntegrityError(f"AWS KMS rejected the ciphertext ({what}): tampered, or not made by this key")
    if code == "KMSInvalidSignatureException":
        return InvalidSignatureError(f"the signature does not verify ({what})")
    if code in _WRONG_TYPE_CODES:
        return WrongKeyTypeError(f"the KMS key does not support this operation ({what})")
    if code == "AlreadyExistsException":
        return KeyExistsError(f"it already exists in AWS KMS ({what})")
    if code in _INPUT_CODES:
        return KeyInputError(f"AWS KMS refused the request as invalid ({what}): {code}")
    return BackendUnavailableError(
        f"AWS KMS failed ({what}): {code or 'unknown error'}; check the credentials, the key policy "
        "and the service health, then retry"
    )

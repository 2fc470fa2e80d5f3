"""Transit: Vault's encryption-as-a-service engine, with every key held by the cell's
key backend (the HSM in production). Key material never enters this process, except
the per-request data keys of large payloads (see "Ciphertexts" below).

Vault endpoints served (mount `transit/` by default), one method each; every method
returns the `data` of Vault's response for that endpoint:

  POST   transit/keys/:name              create_key(name, type)        -> the key, as read_key
  GET    transit/keys/:name              read_key(name)                -> the key (NotFound if absent)
  LIST   transit/keys                    list_keys()                   -> {"keys": [...]} (NotFound if none)
  DELETE transit/keys/:name              delete_key(name)              -> None (204)
  POST   transit/keys/:name/config       update_config(name, ...)      -> the key, as read_key
  POST   transit/keys/:name/rotate       rotate(name)                  -> the key, as read_key
  POST   transit/encrypt/:name           encrypt(name, plaintext, ...) -> {"ciphertext", "key_version"}
                                         encrypt_batch(name, items)    -> {"batch_results": [...]}
  POST   transit/decrypt/:name           decrypt(name, ciphertext)     -> {"plaintext"}
                                         decrypt_batch(name, items)    -> {"batch_results": [...]}
  POST   transit/rewrap/:name            rewrap(name, ciphertext)      -> {"ciphertext", "key_version"}
  POST   transit/sign/:name[/:hash]      sign(name, input, ...)        -> {"signature", "key_version"}
  POST   transit/verify/:name[/:hash]    verify(name, input, sig, ...) -> {"valid"}

`key_exists(name)` is the HTTP layer's existence check: in Vault's ACL terms an
encrypt naming a missing key is a "create" (it creates the key), otherwise an "update".

Keys. A transit key `name` lives in the backend as `transit-<name>`; its Vault
configuration (type, versions and their creation times, minimum decryption and
encryption versions, deletion_allowed) is a record under `Kind.TRANSIT_KEY` at
`<mount>/<name>`, changed only by compare-and-set. Transit versions are the backend
key's versions, 1..N. Names are 1-46 letters, digits and dashes (starting with a
letter or digit): what every backend accepts in a key name, with room for a suffix.
The suffix is used when `transit-<name>` is already taken in the backend (the
remains of a deleted key, of a creation that crashed, or another mount's key):
the new key then gets `transit-<name>-<8 hex>`, and the record names it.

Supported types: aes256-gcm96 (encrypt/decrypt), ecdsa-p256 and rsa-3072 (sign/verify).

Ciphertexts are `vault:v<N>:<base64>`; the bytes inside start with a form byte:
- 1, direct: plaintexts of 1 to `keys.MAX_WRAP_BYTES` bytes are wrapped by the backend
  as they are (AES-256-GCM inside the HSM);
- 2, envelope: larger (up to 1 MiB) and empty plaintexts are sealed in process with
  AES-256-GCM under a fresh data key, which the backend wraps; the data key is
  zeroized after use.
Both are bound, as associated data, to the form and to the request's `context`.
N is checked against the version recorded inside the backend's blob, so editing the
prefix cannot dodge min_decryption_version.

Where this differs from Vault, and why:
- `context` is always bound as AEAD associated data: decrypting needs the same
  context (Vault ignores context for non-derived keys). Derived and convergent keys
  are not supported (`derived`/`convergent_encryption` true is refused), so
  `supports_derivation` is false.
- The backend encrypts and signs only with a key's primary version, so `key_version`
  on encrypt/sign/rewrap must be the latest (or 0/None); older ones are refused.
- RSA keys sign with PKCS#1 v1.5 only (the backends' one RSA scheme): pass
  `signature_algorithm="pkcs1v15"`. Vault's RSA default, PSS, is refused rather than
  silently answered with another scheme. RSA keys do not encrypt here
  (`supports_encryption` false). Only `sha2-256` is offered, and not `prehashed`
  (the backend hashes the input itself).
- Keys are never exportable, never backed up in plaintext: setting either is refused.
- Deleting a key (only with deletion_allowed, as Vault) removes it at once for every
  request, then retires its backend key: the whole key is disabled, rotated once
  (the backend cannot schedule its primary version, and the new primary protects
  nothing), and every older version is scheduled for destruction in 30 days. A
  crash part-way leaves the record marked "deleting" (absent to every request);
  the next delete or create of that name finishes the retirement.
- Deleting a missing key answers 400 as Vault does ("could not delete key; not found").
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane.barrier import KEY_BYTES, NONCE_BYTES, TAG_BYTES, zeroize
from keycell.control_plane.engines import outages
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.keys import (
    MAX_WRAP_BYTES,
    BackendUnavailableError,
    FipsModeError,
    IntegrityError,
    InvalidSignatureError,
    KeyBackend,
    KeyDisabledError,
    KeyExistsError,
    KeyInputError,
    KeySpec,
    Signature,
    UnknownKeyError,
    UnsupportedKeySpecError,
    VersionState,
    WrongKeyTypeError,
    unpack_wrapped,
)
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.storage import get_json, put_json_if

BACKEND_PREFIX = "transit-"
# "-" and 8 hex digits, appended when the plain backend name is taken.
_SUFFIX_CHARS = 9
# Backend key names are at most 63 characters (keys.KEY_NAME).
MAX_NAME_CHARS = 63 - len(BACKEND_PREFIX) - _SUFFIX_CHARS
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9-]*")
_MOUNT = re.compile(r"[a-zA-Z0-9_.-]+(/[a-zA-Z0-9_.-]+)*")

MAX_PLAINTEXT_BYTES = 1024 * 1024
# Context becomes associated data; the backends take at most keys.MAX_AAD_BYTES of it.
MAX_CONTEXT_BYTES = 4096
MAX_INPUT_BYTES = MAX_PLAINTEXT_BYTES  # what sign/verify accept
MAX_BATCH_ITEMS = 1000
MAX_BATCH_PLAINTEXT_BYTES = 8 * 1024 * 1024
DESTRUCTION_DAYS = 30
_CAS_ATTEMPTS = 16

_DIRECT = 1
_ENVELOPE = 2
_ENVELOPE_LENGTH = struct.Struct(">H")
_AAD_PREFIX = b"keycell-transit:"

_ACTIVE = "active"
_DELETING = "deleting"

_ERR_TOO_OLD = "ciphertext or signature version is disallowed by policy (too old)"
_ERR_AUTH = "cipher: message authentication failed"
_ERR_NOT_FOUND = "encryption key not found"
_SHA256 = "sha2-256"
# Vault's other hash names: known, so refused as unsupported rather than unknown.
_OTHER_HASHES = frozenset(
    {"sha1", "sha2-224", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512", "none"}
)
_P256_BYTES = 32


@dataclass(frozen=True)
class KeyType:
    """A Vault key type this engine offers, and the backend spec behind it."""

    name: str
    spec: KeySpec
    encrypts: bool
    signs: bool
    curve: str  # Vault's per-version "name" for asymmetric keys ("" for symmetric)


KEY_TYPES: Mapping[str, KeyType] = {
    "aes256-gcm96": KeyType("aes256-gcm96", KeySpec.AES_256, encrypts=True, signs=False, curve=""),
    "ecdsa-p256": KeyType("ecdsa-p256", KeySpec.EC_P256, encrypts=False, signs=True, curve="P-256"),
    "rsa-3072": KeyType("rsa-3072", KeySpec.RSA_3072, encrypts=False, signs=True, curve="rsa-3072"),
}


class _Retry(Exception):
    """A compare-and-set lost; read again."""


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """`engines.outages`, and the key backend's refusals of a transit key as the API's
    errors. Messages name no secret."""
    try:
        with outages():
            yield
    except UnknownKeyError:
        # The ledger names a backend key the backend does not hold: the cell is
        # misconfigured (e.g. pointed at another HSM), not the client's doing.
        raise Unavailable("this transit key's material is missing from the cell's key backend") from None
    except KeyDisabledError:
        raise InvalidRequest("this key version is disabled in the cell's key backend") from None
    except (UnsupportedKeySpecError, FipsModeError) as exc:
        raise InvalidRequest(f"the cell's key backend cannot hold this key type: {exc}") from None
    except KeyExistsError:
        raise Unavailable("the key backend already holds a key by the name chosen; retry") from None
    except (KeyInputError, WrongKeyTypeError) as exc:
        raise InvalidRequest(str(exc)) from None


# --- input checks --------------------------------------------------------------------------


def _b64decode(value: object, field: str, *, limit: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a base64-encoded string")
    # Base64 is 4 characters per 3 bytes: refuse oversized input before decoding it.
    if len(value) > (limit + 2) // 3 * 4:
        raise InvalidRequest(f"{field} decodes to more than {limit} bytes, the most accepted")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64 (standard alphabet, with padding)") from None
    if len(decoded) > limit:
        raise InvalidRequest(f"{field} decodes to more than {limit} bytes, the most accepted")
    return decoded


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _context(value: object) -> bytes:
    if value is None or value == "":
        return b""
    return _b64decode(value, "context", limit=MAX_CONTEXT_BYTES)


def _int(value: object, field: str) -> int:
    # Vault's integer fields also take decimal strings (the CLI sends key=value as text).
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,9}", value):
        return int(value)
    raise InvalidRequest(f"{field} must be an integer")


_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})


def _bool(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _TRUE | _FALSE:
        return value in _TRUE
    raise InvalidRequest(f"{field} must be a boolean")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _aad(form: int, context: bytes) -> bytes:
    return _AAD_PREFIX + bytes([form]) + context


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _parse_versioned(value: str, what: str) -> tuple[int, str]:
    """Split `vault:v<N>:<payload>` as Vault does, with Vault's messages."""
    if not value.startswith("vault:v"):
        raise InvalidRequest(f"invalid {what}: no prefix")
    number, sep, payload = value[len("vault:v") :].partition(":")
    if not sep:
        raise InvalidRequest(f"invalid {what}: wrong number of fields")
    if not re.fullmatch(r"[0-9]{1,10}", number):
        raise InvalidRequest(f"invalid {what}: version number could not be decoded")
    return int(number), payload


class Transit:
    """Vault's transit engine over a `Ledger` (the barrier) and a `KeyBackend`."""

    def __init__(
        self,
        ledger: Ledger,
        keys: KeyBackend,
        *,
        mount: str = "transit",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(mount, str) or not _MOUNT.fullmatch(mount):
            raise ValueError(f"a mount is path segments of letters, digits, '_', '.', '-', not {mount!r}")
        self.ledger = ledger
        self.keys = keys
        self.mount = mount
        self.clock = clock

    # --- keys -------------------------------------------------------------------------------

    def key_exists(self, name: str) -> bool:
        """Whether `name` exists (Vault's existence check for encrypt's create/update)."""
        with _guard():
            self._check_name(name)
            return self._load(name) is not None

    def create_key(
        self,
        name: str,
        type: str = "aes256-gcm96",  # Vault's field name
        *,
        derived: object = False,
        convergent_encryption: object = False,
        exportable: object = False,
        allow_plaintext_backup: object = False,
    ) -> dict[str, Any]:
        """POST transit/keys/:name. Creating a key that exists changes nothing and
        returns it, as Vault does (whatever `type` was asked for)."""
        with _guard():
            self._check_name(name)
            key_type = self._check_type(type)
            self._refuse_unsupported(derived, convergent_encryption, exportable, allow_plaintext_backup)
            record = self._ensure(name, key_type)
            return self._describe(name, record)

    def read_key(self, name: str) -> dict[str, Any]:
        """GET transit/keys/:name (404 when absent, as Vault)."""
        with _guard():
            self._check_name(name)
            found = self._load(name)
            if found is None:
                raise NotFound()
            return self._describe(name, found[0])

    def list_keys(self) -> dict[str, Any]:
        """LIST transit/keys. Vault answers an empty list with 404."""
        with _guard():
            names = [name for name, record in self._records() if record.get("state") == _ACTIVE]
            if not names:
                raise NotFound()
            return {"keys": names}

    def delete_key(self, name: str) -> None:
        """DELETE transit/keys/:name: only with deletion_allowed; see the module docstring
        for what happens to the backend key."""
        with _guard():
            self._check_name(name)
            ledger_key = self._ledger_key(name)
            for _ in range(_CAS_ATTEMPTS):
                found = get_json(self.ledger, ledger_key)
                if found is None:
                    raise InvalidRequest(f"error deleting policy {name}: could not delete key; not found")
                record, version = found
                if record["state"] == _ACTIVE:
                    if not record["deletion_allowed"]:
                        raise InvalidRequest(
                            f"error deleting policy {name}: deletion is not allowed for this key"
                        )
                    record = {**record, "state": _DELETING}
                    try:
                        version = put_json_if(self.ledger, ledger_key, record, version)
                    except ConflictError:
                        continue
                self._finish_delete(ledger_key, record, version)
                return
            raise self._contention()

    def retire_keys(self) -> None:
        """The mount is being disabled: retire every backend key its records name, as a
        deleted key's is (disabled, its versions scheduled for destruction), whatever
        the record's state or `deletion_allowed`. Idempotent."""
        with _guard():
            for _name, record in list(self._records()):
                self._retire(str(record["backend_key"]))

    def _records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """This mount's key records by name (not those of a mount nested under it)."""
        prefix = f"{self.mount}/"
        for item in iter_prefix(self.ledger, Kind.TRANSIT_KEY, prefix):
            name = item.key.path[len(prefix) :]
            record = json.loads(item.value)
            if "/" not in name and isinstance(record, dict):
                yield name, record

    def rotate(self, name: str) -> dict[str, Any]:
        """POST transit/keys/:name/rotate: a new backend version becomes the latest."""
        with _guard():
            self._check_name(name)
            found = self._load(name)
            if found is None:
                raise InvalidRequest("key not found")
            info = self.keys.rotate(found[0]["backend_key"])
            record = self._note_versions(name, info.primary_version)
            return self._describe(name, record)

    def update_config(
        self,
        name: str,
        min_decryption_version: object = None,
        min_encryption_version: object = None,
        deletion_allowed: object = None,
        *,
        exportable: object = None,
        allow_plaintext_backup: object = None,
    ) -> dict[str, Any]:
        """POST transit/keys/:name/config, with Vault's validation; None leaves a field as it is."""
        with _guard():
            self._check_name(name)
            if exportable is not None and _bool(exportable, "exportable"):
                raise InvalidRequest("keys here are never exportable: their material stays in the HSM")
            if allow_plaintext_backup is not None and _bool(allow_plaintext_backup, "allow_plaintext_backup"):
                raise InvalidRequest(
                    "keys here cannot be backed up in plaintext: their material stays in the HSM"
                )
            min_dec = (
                None
                if min_decryption_version is None
                else _int(min_decryption_version, "min_decryption_version")
            )
            min_enc = (
                None
                if min_encryption_version is None
                else _int(min_encryption_version, "min_encryption_version")
            )
            allow = None if deletion_allowed is None else _bool(deletion_allowed, "deletion_allowed")
            if min_dec is not None and min_dec < 0:
                raise InvalidRequest("min decryption version cannot be negative")
            if min_enc is not None and min_enc < 0:
                raise InvalidRequest("min encryption version cannot be negative")

            def change(record: dict[str, Any]) -> dict[str, Any] | None:
                before = copy.deepcopy(record)
                latest = record["latest_version"]
                if min_dec is not None:
                    wanted = max(min_dec, 1)  # Vault: numbering starts at 1, 0 means 1
                    if wanted != record["min_decryption_version"]:
                        if wanted > latest:
                            raise InvalidRequest(
                                f"cannot set min decryption version of {wanted}, latest key version is {latest}"
                            )
                        record["min_decryption_version"] = wanted
                if min_enc is not None and min_enc != record["min_encryption_version"]:
                    if min_enc > latest:
                        raise InvalidRequest(
                            f"cannot set min encryption version of {min_enc}, latest key version is {latest}"
                        )
                    record["min_encryption_version"] = min_enc
                enc, dec = record["min_encryption_version"], record["min_decryption_version"]
                if enc > 0 and enc < dec:
                    raise InvalidRequest(
                        "cannot set min encryption/decryption values; min encryption version of "
                        f"{enc} must be greater than or equal to min decryption version of {dec}"
                    )
                if allow is not None:
                    record["deletion_allowed"] = allow
                return None if record == before else record

            record = self._modify(name, change, missing=f"no existing key named {name} could be found")
            return self._describe(name, record)

    # --- encryption ----------------------------------------------------------------------------

    def encrypt(
        self,
        name: str,
        plaintext_b64: object,
        *,
        context_b64: object = None,
        key_version: object = None,
        type: str = "aes256-gcm96",  # Vault's field name
        create_missing: bool = True,
    ) -> dict[str, Any]:
        """POST transit/encrypt/:name. A missing key is created (type aes256-gcm96), as
        Vault does when the caller may create it; pass create_missing=False otherwise."""
        with _guard():
            self._check_name(name)
            if plaintext_b64 is None:
                raise InvalidRequest("missing plaintext to encrypt")
            plaintext = _b64decode(plaintext_b64, "plaintext", limit=MAX_PLAINTEXT_BYTES)
            context = _context(context_b64)
            record = self._for_encryption(name, type, create_missing)
            return self._encrypt_one(name, record, plaintext, context, key_version)

    def encrypt_batch(
        self,
        name: str,
        items: object,
        *,
        type: str = "aes256-gcm96",  # Vault's field name
        create_missing: bool = True,
    ) -> dict[str, Any]:
        """POST transit/encrypt/:name with batch_input: one result per item, a failed item
        as {"error": ...} while the others succeed."""
        with _guard():
            self._check_name(name)
            checked = self._check_batch(items, "plaintext")
            record = self._for_encryption(name, type, create_missing)
            results: list[dict[str, Any]] = []
            for item in checked:
                try:
                    if "plaintext" not in item or item["plaintext"] is None:
                        raise InvalidRequest("missing plaintext to encrypt")
                    plaintext = _b64decode(item["plaintext"], "plaintext", limit=MAX_PLAINTEXT_BYTES)
                    context = _context(item.get("context"))
                    result = self._encrypt_one(name, record, plaintext, context, item.get("key_version"))
                except InvalidRequest as exc:
                    result = {"error": exc.message}
                results.append(self._with_reference(result, item))
            return {"batch_results": results}

    def decrypt(self, name: str, ciphertext: object, *, context_b64: object = None) -> dict[str, Any]:
        """POST transit/decrypt/:name."""
        with _guard():
            self._check_name(name)
            context = _context(context_b64)
            record = self._require(name)
            return {"plaintext": _b64(self._decrypt_one(record, ciphertext, context))}

    def decrypt_batch(self, name: str, items: object) -> dict[str, Any]:
        """POST transit/decrypt/:name with batch_input."""
        with _guard():
            self._check_name(name)
            checked = self._check_batch(items, "ciphertext")
            record = self._require(name)
            results: list[dict[str, Any]] = []
            for item in checked:
                try:
                    context = _context(item.get("context"))
                    result = {"plaintext": _b64(self._decrypt_one(record, item.get("ciphertext"), context))}
                except InvalidRequest as exc:
                    result = {"error": exc.message}
                results.append(self._with_reference(result, item))
            return {"batch_results": results}

    def rewrap(
        self, name: str, ciphertext: object, context_b64: object = None, *, key_version: object = None
    ) -> dict[str, Any]:
        """POST transit/rewrap/:name: decrypt, then encrypt under the latest version,
        without the plaintext leaving the engine."""
        with _guard():
            self._check_name(name)
            context = _context(context_b64)
            record = self._require(name)
            plaintext = self._decrypt_one(record, ciphertext, context)
            return self._encrypt_one(name, record, plaintext, context, key_version)

    # --- signatures ----------------------------------------------------------------------------

    def sign(
        self,
        name: str,
        input_b64: object,
        *,
        key_version: object = None,
        hash_algorithm: object = _SHA256,
        prehashed: object = False,
        signature_algorithm: object = None,
        marshaling_algorithm: object = "asn1",
    ) -> dict[str, Any]:
        """POST transit/sign/:name. ECDSA signatures are ASN.1 DER ("asn1") or r||s
        ("jws", base64url without padding, as Vault); RSA is PKCS#1 v1.5."""
        with _guard():
            self._check_name(name)
            marshaling = self._check_signing_options(hash_algorithm, prehashed, marshaling_algorithm)
            message = _b64decode(input_b64 if input_b64 is not None else "", "input", limit=MAX_INPUT_BYTES)
            record = self._require(name)
            key_type = KEY_TYPES[record["type"]]
            if not key_type.signs:
                raise InvalidRequest(f"key type {key_type.name} does not support signing")
            self._check_signature_algorithm(key_type, signature_algorithm)
            self._check_key_version(record, key_version, "signing")
            signature = self.keys.sign(record["backend_key"], message)
            if signature.version > record["latest_version"]:
                self._note_versions(name, signature.version)
            raw = signature.value
            if key_type.spec is KeySpec.EC_P256 and marshaling == "jws":
                r, s = decode_dss_signature(raw)
                raw = r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
            encoded = (
                _b64(raw) if marshaling == "asn1" else base64.urlsafe_b64encode(raw).decode().rstrip("=")
            )
            return {"signature": f"vault:v{signature.version}:{encoded}", "key_version": signature.version}

    def verify(
        self,
        name: str,
        input_b64: object,
        signature: object,
        *,
        hash_algorithm: object = _SHA256,
        prehashed: object = False,
        signature_algorithm: object = None,
        marshaling_algorithm: object = "asn1",
    ) -> dict[str, Any]:
        """POST transit/verify/:name: {"valid": false} for a signature that does not
        verify; a signature that cannot be read at all is a 400, as in Vault."""
        with _guard():
            self._check_name(name)
            marshaling = self._check_signing_options(hash_algorithm, prehashed, marshaling_algorithm)
            message = _b64decode(input_b64 if input_b64 is not None else "", "input", limit=MAX_INPUT_BYTES)
            if signature is None:
                raise InvalidRequest("neither a 'signature' nor an 'hmac' were given to verify")
            if not isinstance(signature, str):
                raise InvalidRequest("signature must be a string")
            record = self._require(name)
            key_type = KEY_TYPES[record["type"]]
            if not key_type.signs:
                raise InvalidRequest(f"key type {key_type.name} does not support verification")
            self._check_signature_algorithm(key_type, signature_algorithm)
            version, payload = _parse_versioned(signature, "signature")
            if version > record["latest_version"]:
                raise InvalidRequest("invalid signature: version is too new")
            if version < record["min_decryption_version"]:
                raise InvalidRequest(_ERR_TOO_OLD)
            try:
                if marshaling == "asn1":
                    raw = base64.b64decode(payload, validate=True)
                else:
                    if "=" in payload or "+" in payload or "/" in payload:
                        raise ValueError("not base64url without padding")
                    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            except (binascii.Error, ValueError):
                raise InvalidRequest("invalid base64 signature value") from None
            if key_type.spec is KeySpec.EC_P256:
                if marshaling == "asn1":
                    try:
                        decode_dss_signature(raw)
                    except ValueError:
                        raise InvalidRequest("supplied signature is invalid") from None
                else:
                    if len(raw) != 2 * _P256_BYTES:
                        return {"valid": False}
                    r = int.from_bytes(raw[:_P256_BYTES], "big")
                    s = int.from_bytes(raw[_P256_BYTES:], "big")
                    if r == 0 or s == 0:
                        return {"valid": False}
                    raw = encode_dss_signature(r, s)
            try:
                self.keys.verify(record["backend_key"], message, Signature(version, raw))
            except InvalidSignatureError:
                return {"valid": False}
            return {"valid": True}

    # --- records --------------------------------------------------------------------------------

    def _ledger_key(self, name: str) -> Key:
        return Key(Kind.TRANSIT_KEY, f"{self.mount}/{name}")

    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid key name {_short(name)}: transit key names here are 1 to {MAX_NAME_CHARS} "
                "letters, digits and dashes, starting with a letter or digit (each names a key in the "
                "cell's HSM, which allows no other characters)"
            )
        return name

    @staticmethod
    def _check_type(key_type: object) -> KeyType:
        found = KEY_TYPES.get(key_type) if isinstance(key_type, str) else None
        if found is None:
            raise InvalidRequest(
                f"unknown key type {_short(key_type)}; supported types: {', '.join(KEY_TYPES)}"
            )
        return found

    @staticmethod
    def _refuse_unsupported(
        derived: object, convergent: object, exportable: object, plaintext_backup: object
    ) -> None:
        def on(value: object, field: str) -> bool:
            return value is not None and _bool(value, field)

        if on(derived, "derived") or on(convergent, "convergent_encryption"):
            raise InvalidRequest(
                "derived and convergent keys are not supported; context is bound to each ciphertext "
                "as associated data instead"
            )
        if on(exportable, "exportable"):
            raise InvalidRequest("keys here are never exportable: their material stays in the HSM")
        if on(plaintext_backup, "allow_plaintext_backup"):
            raise InvalidRequest(
                "keys here cannot be backed up in plaintext: their material stays in the HSM"
            )

    def _load(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The key's record and its ledger version; None when absent or being deleted."""
        found = get_json(self.ledger, self._ledger_key(name))
        if found is None or found[0].get("state") != _ACTIVE:
            return None
        return found

    def _require(self, name: str) -> dict[str, Any]:
        found = self._load(name)
        if found is None:
            raise InvalidRequest(_ERR_NOT_FOUND)
        return found[0]

    @staticmethod
    def _contention() -> Unavailable:
        return Unavailable("this transit key is changing under heavy contention; retry")

    def _modify(
        self, name: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], *, missing: str
    ) -> dict[str, Any]:
        """Read-modify-write by compare-and-set; `change` returns None for "nothing to write"."""
        ledger_key = self._ledger_key(name)
        for _ in range(_CAS_ATTEMPTS):
            found = self._load(name)
            if found is None:
                raise InvalidRequest(missing)
            record, version = found
            updated = change(copy.deepcopy(record))
            if updated is None:
                return record
            try:
                put_json_if(self.ledger, ledger_key, updated, version)
            except ConflictError:
                continue
            return updated
        raise self._contention()

    def _note_versions(self, name: str, primary: int) -> dict[str, Any]:
        """Record backend versions up to `primary` (after a rotation, or when the backend
        is found ahead of the record: a rotation whose record update was lost)."""
        now = self.clock()

        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if record["latest_version"] >= primary:
                return None
            for number in range(record["latest_version"] + 1, primary + 1):
                record["created"].setdefault(str(number), now)
            record["latest_version"] = primary
            return record

        return self._modify(name, change, missing="key not found")

    def _ensure(self, name: str, key_type: KeyType) -> dict[str, Any]:
        """The key's record, creating the key when absent."""
        ledger_key = self._ledger_key(name)
        for _ in range(_CAS_ATTEMPTS):
            found = get_json(self.ledger, ledger_key)
            if found is not None:
                record, version = found
                if record["state"] == _ACTIVE:
                    return record
                self._finish_delete(ledger_key, record, version)
                continue
            try:
                return self._create(name, key_type)
            except _Retry:
                continue
        raise self._contention()

    def _create(self, name: str, key_type: KeyType) -> dict[str, Any]:
        backend_key = BACKEND_PREFIX + name
        try:
            info = self.keys.create_key(backend_key, key_type.spec)
        except KeyExistsError:
            # Taken by a deleted key's remains, a creation that crashed before its
            # record, another mount, or a concurrent creator: never adopt it.
            backend_key = f"{BACKEND_PREFIX}{name}-{secrets.token_hex(4)}"
            info = self.keys.create_key(backend_key, key_type.spec)
        now = self.clock()
        record = {
            "state": _ACTIVE,
            "type": key_type.name,
            "backend_key": backend_key,
            "latest_version": info.primary_version,
            "min_decryption_version": 1,
            "min_encryption_version": 0,
            "deletion_allowed": False,
            "exportable": False,
            "allow_plaintext_backup": False,
            "created": {str(v.number): now for v in info.versions},
        }
        try:
            put_json_if(self.ledger, self._ledger_key(name), record, 0)
        except ConflictError:
            # Another request created the key first; ours protects nothing: disable it.
            self._discard(backend_key)
            raise _Retry() from None
        return record

    def _discard(self, backend_key: str) -> None:
        # An unused, unreferenced key: harmless should it stay enabled.
        with contextlib.suppress(BackendUnavailableError, KeyInputError, UnknownKeyError):
            self.keys.disable(backend_key)

    def _finish_delete(self, ledger_key: Key, record: dict[str, Any], version: int) -> None:
        self._retire(record["backend_key"])
        # A conflict: another request finished this deletion (or a create followed it).
        with contextlib.suppress(ConflictError):
            self.ledger.delete_if(ledger_key, version)

    def _retire(self, backend_key: str) -> None:
        """Disable the backend key, and schedule every version that ever protected data
        for destruction. Idempotent, so an interrupted deletion can be resumed."""
        try:
            info = self.keys.describe(backend_key)
        except UnknownKeyError:
            return
        if info.enabled:
            self.keys.disable(backend_key)
        live = (VersionState.ENABLED, VersionState.DISABLED)
        if info.primary_version == 1 or any(
            v.state in live for v in info.versions if v.number != info.primary_version
        ):
            # The primary cannot be scheduled: make a new, never-used one. (Skipped when
            # a previous attempt already rotated and scheduled everything older.)
            info = self.keys.rotate(backend_key)
        for v in info.versions:
            if v.number != info.primary_version and v.state in live:
                self.keys.schedule_destruction(backend_key, v.number, days=DESTRUCTION_DAYS)

    def _describe(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        key_type = KEY_TYPES[record["type"]]
        keys: dict[str, Any] = {}
        for number in range(1, record["latest_version"] + 1):
            created = float(record["created"].get(str(number), 0))
            if not key_type.signs:
                keys[str(number)] = int(created)
                continue
            try:
                pem = self.keys.public_key(record["backend_key"], number).decode("ascii")
            except (KeyDisabledError, UnknownKeyError):
                pem = ""  # a disabled version publishes nothing
            keys[str(number)] = {
                "name": key_type.curve,
                "public_key": pem,
                "creation_time": _rfc3339(created),
                "certificate_chain": "",
            }
        return {
            "name": name,
            "type": key_type.name,
            "keys": keys,
            "latest_version": record["latest_version"],
            "min_available_version": 0,
            "min_decryption_version": record["min_decryption_version"],
            "min_encryption_version": record["min_encryption_version"],
            "deletion_allowed": record["deletion_allowed"],
            # OpenBao's soft delete (a key hidden but restorable) does not exist here: a
            # key is in use, or being deleted for good (and then no longer read)
            "soft_deleted": False,
            "derived": False,
            "exportable": False,
            "allow_plaintext_backup": False,
            "supports_encryption": key_type.encrypts,
            "supports_decryption": key_type.encrypts,
            "supports_derivation": False,
            "supports_signing": key_type.signs,
            "auto_rotate_period": 0,
            "imported_key": False,
        }

    # --- the cryptography -------------------------------------------------------------------------

    def _for_encryption(self, name: str, key_type: object, create_missing: bool) -> dict[str, Any]:
        found = self._load(name)
        if found is not None:
            record = found[0]
        elif not create_missing:
            raise InvalidRequest(_ERR_NOT_FOUND)
        else:
            wanted = self._check_type(key_type)
            if not wanted.encrypts:
                raise InvalidRequest(f"key type {wanted.name} not supported for this operation")
            record = self._ensure(name, wanted)
        if not KEY_TYPES[record["type"]].encrypts:
            raise InvalidRequest(f"message encryption not supported for key type {record['type']}")
        return record

    def _check_key_version(self, record: Mapping[str, Any], key_version: object, operation: str) -> None:
        if key_version is None:
            return
        wanted = _int(key_version, "key_version")
        latest, floor = record["latest_version"], record["min_encryption_version"]
        if wanted == 0:
            return
        if wanted < 0:
            raise InvalidRequest(f"requested version for {operation} is negative")
        if wanted > latest:
            raise InvalidRequest(f"requested version for {operation} is higher than the latest key version")
        if floor > 0 and wanted < floor:
            raise InvalidRequest(
                f"requested version for {operation} is less than the minimum encryption key version"
            )
        if wanted != latest:
            raise InvalidRequest(
                f"requested version {wanted} for {operation} is not the latest ({latest}): the cell's key "
                f"backend uses only a key's latest version for {operation}; omit key_version"
            )

    def _encrypt_one(
        self, name: str, record: dict[str, Any], plaintext: bytes, context: bytes, key_version: object
    ) -> dict[str, Any]:
        self._check_key_version(record, key_version, "encryption")
        backend_key = record["backend_key"]
        if 1 <= len(plaintext) <= MAX_WRAP_BYTES:
            wrapped = self.keys.wrap(backend_key, plaintext, _aad(_DIRECT, context))
            body = bytes([_DIRECT]) + wrapped
        else:
            aad = _aad(_ENVELOPE, context)
            data_key = bytearray(os.urandom(KEY_BYTES))
            try:
                wrapped = self.keys.wrap(backend_key, bytes(data_key), aad)
                nonce = os.urandom(NONCE_BYTES)
                sealed = AESGCM(bytes(data_key)).encrypt(nonce, plaintext, aad)
            finally:
                zeroize(data_key)
            body = bytes([_ENVELOPE]) + _ENVELOPE_LENGTH.pack(len(wrapped)) + wrapped + nonce + sealed
        version, _ = unpack_wrapped(wrapped)
        if version > record["latest_version"]:
            # The backend is ahead of the record (another process rotated): record the
            # version before handing out a ciphertext that names it.
            self._note_versions(name, version)
        return {"ciphertext": f"vault:v{version}:{_b64(body)}", "key_version": version}

    def _decrypt_one(self, record: Mapping[str, Any], ciphertext: object, context: bytes) -> bytes:
        if ciphertext is None or ciphertext == "":
            raise InvalidRequest("missing ciphertext to decrypt")
        if not isinstance(ciphertext, str):
            raise InvalidRequest("invalid ciphertext: it must be a string")
        version, payload = _parse_versioned(ciphertext, "ciphertext")
        version = max(version, 1)  # Vault: v0 is the first version of early keys
        if version > record["latest_version"]:
            raise InvalidRequest("invalid ciphertext: version is too new")
        if version < record["min_decryption_version"]:
            raise InvalidRequest(_ERR_TOO_OLD)
        if len(payload) > (MAX_PLAINTEXT_BYTES + 4096) // 3 * 4 + 4:
            raise InvalidRequest("invalid ciphertext: longer than any this engine makes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("invalid ciphertext: could not decode base64") from None
        backend_key = record["backend_key"]
        form = raw[0] if raw else 0
        if form == _DIRECT:
            wrapped, sealed = raw[1:], b""
        elif form == _ENVELOPE and len(raw) >= 1 + _ENVELOPE_LENGTH.size:
            (length,) = _ENVELOPE_LENGTH.unpack_from(raw, 1)
            start = 1 + _ENVELOPE_LENGTH.size
            wrapped, sealed = raw[start : start + length], raw[start + length :]
            if len(wrapped) != length or len(sealed) < NONCE_BYTES + TAG_BYTES:
                raise InvalidRequest("invalid ciphertext: truncated")
        else:
            raise InvalidRequest("invalid ciphertext: unknown format")
        try:
            blob_version, _ = unpack_wrapped(wrapped)
        except (IntegrityError, KeyInputError):
            raise InvalidRequest("invalid ciphertext: truncated or altered") from None
        if blob_version != version:
            raise InvalidRequest("invalid ciphertext: its version prefix does not match its content")
        aad = _aad(form, context)
        try:
            opened = self.keys.unwrap(backend_key, wrapped, aad)
        except IntegrityError:
            raise InvalidRequest(_ERR_AUTH) from None
        if form == _DIRECT:
            return opened
        data_key = bytearray(opened)
        try:
            return AESGCM(bytes(data_key)).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise InvalidRequest(_ERR_AUTH) from None
        finally:
            zeroize(data_key)

    @staticmethod
    def _check_batch(items: object, field: str) -> list[Mapping[str, Any]]:
        if not isinstance(items, Sequence) or isinstance(items, str | bytes):
            raise InvalidRequest("batch_input must be a list of objects")
        if not items:
            raise InvalidRequest("missing batch input to process")
        if len(items) > MAX_BATCH_ITEMS:
            raise InvalidRequest(f"batch_input holds at most {MAX_BATCH_ITEMS} items")
        total = 0
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InvalidRequest(f"batch_input[{index}] must be an object")
            value = item.get(field)
            total += len(value) if isinstance(value, str) else 0
        if total > (MAX_BATCH_PLAINTEXT_BYTES + 2) // 3 * 4:
            raise InvalidRequest(f"a batch carries at most {MAX_BATCH_PLAINTEXT_BYTES} bytes in all")
        return list(items)

    @staticmethod
    def _with_reference(result: dict[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
        # Vault echoes each item's optional "reference" so callers can match results.
        reference = item.get("reference")
        if isinstance(reference, str):
            result["reference"] = reference
        return result

    @staticmethod
    def _check_signing_options(hash_algorithm: object, prehashed: object, marshaling: object) -> str:
        if hash_algorithm is None or hash_algorithm == "":
            hash_algorithm = _SHA256
        if hash_algorithm != _SHA256:
            if hash_algorithm in _OTHER_HASHES:
                raise InvalidRequest(
                    f"hash algorithm {hash_algorithm} is not supported: the cell's key backends sign "
                    "SHA-256 digests only; use sha2-256"
                )
            raise InvalidRequest(f"invalid hash algorithm {_short(hash_algorithm)}")
        if prehashed is not None and _bool(prehashed, "prehashed"):
            raise InvalidRequest(
                "prehashed input is not supported: the cell's key backend hashes the input itself; "
                "send the message, not its digest"
            )
        if marshaling is None or marshaling == "":
            marshaling = "asn1"
        if marshaling not in ("asn1", "jws"):
            raise InvalidRequest(f"invalid marshaling type {_short(marshaling)}")
        return str(marshaling)

    @staticmethod
    def _check_signature_algorithm(key_type: KeyType, algorithm: object) -> None:
        if algorithm is not None and not isinstance(algorithm, str):
            raise InvalidRequest("signature_algorithm must be a string")
        if key_type.spec is not KeySpec.RSA_3072 or algorithm == "pkcs1v15":
            return  # ECDSA ignores it, as in Vault
        if algorithm in (None, "", "pss"):
            raise InvalidRequest(
                "RSA-PSS signatures (Vault's default for RSA keys) are not supported: the cell's key "
                "backends sign RSA with PKCS#1 v1.5 only; pass signature_algorithm=pkcs1v15"
            )
        raise InvalidRequest(f"unsupported rsa signature algorithm {_short(algorithm)}; use pkcs1v15")

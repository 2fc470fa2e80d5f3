"""The software key backend: keys in process memory, via pyca/cryptography.

FOR DEVELOPMENT ONLY. It is not an HSM: key material lives in this process, so it
is never FIPS 140 Level 3 (it refuses to start in FIPS mode) and every description
and health check says so. It exists so a laptop without an HSM can run a cell, and
as the reference the conformance suite holds the HSM adapters to.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane.keys import (
    Health,
    IntegrityError,
    InvalidSignatureError,
    KeyBackendError,
    KeyExistsError,
    KeyInfo,
    KeyInputError,
    KeySpec,
    KeyVersion,
    Protection,
    Signature,
    UnknownKeyError,
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
from keycell.control_plane.ledger import ConflictError, Kind, Ledger
from keycell.control_plane.ledger import Key as LedgerKey
from keycell.control_plane.storage import put_json_if

PROVIDER = "software"
BANNER = "SOFTWARE KEYS IN PROCESS MEMORY: development only, not an HSM, not FIPS"
_NONCE_BYTES = 12


@dataclass
class _Version:
    number: int
    state: VersionState
    secret: Any  # AESGCM or a private key object; never leaves this module
    material: bytes = field(repr=False, default=b"")  # raw AES key or PKCS#8 DER, for persistence


@dataclass
class _Key:
    name: str
    spec: KeySpec
    enabled: bool = True
    versions: list[_Version] = field(default_factory=list)

    def info(self) -> KeyInfo:
        return KeyInfo(
            name=self.name,
            spec=self.spec,
            provider=PROVIDER,
            protection=Protection.SOFTWARE,
            fips_level=None,
            extractable=False,
            enabled=self.enabled,
            primary_version=self.versions[-1].number,
            versions=tuple(KeyVersion(v.number, v.state) for v in self.versions),
        )


def _generate(spec: KeySpec) -> tuple[Any, bytes]:
    """A new key: the usable object and its serialized material."""
    if spec is KeySpec.AES_256:
        raw = AESGCM.generate_key(bit_length=256)
        return AESGCM(raw), raw
    if spec is KeySpec.EC_P256:
        private: Any = ec.generate_private_key(ec.SECP256R1())
    elif spec is KeySpec.RSA_3072:
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private, der


def _load(spec: KeySpec, material: bytes) -> Any:
    if spec is KeySpec.AES_256:
        return AESGCM(material)
    return serialization.load_der_private_key(material, password=None)


class SoftwareKeyBackend:
    """A `KeyBackend` in process memory. Refuses to exist in FIPS mode.

    With `store` (a Ledger), keys also persist there as JSON records, so several
    processes of one cell share them: a development server's workers keep its keys in
    a plain file (`--dev`), and a cell without an HSM keeps its key-encryption key
    inside its own barrier, sealed with the cell. Every operation reads the key's
    state from the store (a disable in one process holds in all); the parsed record and
    its KeyInfo are kept while the stored version and bytes are unchanged, and shared by
    the operations that only read it (wrap, unwrap, sign, ...: no copy per call); parsed
    key material is kept always, as versions never change."""

    provider = PROVIDER

    def __init__(self, *, fips_mode: bool = False, store: Ledger | None = None) -> None:
        check_fips_backend(fips_mode, Protection.SOFTWARE, PROVIDER)
        self.fips_mode = fips_mode
        self.store = store
        self._keys: dict[str, _Key] = {}
        self._materials: dict[bytes, Any] = {}  # sha256(material) -> parsed secret
        # name -> (stored item version, stored bytes, parsed key, its info); the parsed key
        # is shared by readers and never changed in place (a change works on a copy)
        self._parsed: dict[str, tuple[int, bytes, _Key, KeyInfo]] = {}
        self._lock = threading.RLock()

    def _key(self, name: str) -> tuple[_Key, KeyInfo]:
        """The key and its info, to read only (call under the lock)."""
        check_name(name)
        if self.store is not None:
            found = self._stored(name)
            if found is None:
                raise UnknownKeyError(f"no key named {name!r} in the software backend")
            return found[2], found[3]
        key = self._keys.get(name)
        if key is None:
            raise UnknownKeyError(f"no key named {name!r} in the software backend")
        return key, key.info()

    # --- persistence (with a store) ----------------------------------------------------

    @staticmethod
    def _store_key(name: str) -> LedgerKey:
        return LedgerKey(Kind.CONFIG, f"software-keys/{name}")

    def _stored(self, name: str) -> tuple[int, bytes, _Key, KeyInfo] | None:
        """The key as stored now: (item version, stored bytes, parsed key, its info), the
        key shared, to read only. The store is read every time (a change made by another
        process holds at once); parsing is skipped while the stored version and bytes are
        the ones parsed last time."""
        assert self.store is not None
        item = self.store.get(self._store_key(name))
        if item is None:
            return None
        parsed = self._parsed.get(name)
        if parsed is None or parsed[0] != item.version or parsed[1] != item.value:
            key = self._parse(name, item.value)
            parsed = self._parsed[name] = (item.version, item.value, key, key.info())
        return parsed

    def _read(self, name: str) -> tuple[_Key, int] | None:
        """The key as stored now, as the caller's own copy to change, and its item version."""
        found = self._stored(name)
        if found is None:
            return None
        key = found[2]
        return _Key(key.name, key.spec, key.enabled, [replace(v) for v in key.versions]), found[0]

    def _parse(self, name: str, value: bytes) -> _Key:
        record = json.loads(value)
        if not isinstance(record, dict):
            raise ValueError(f"the software key record of {name!r} is not a JSON object")
        spec = KeySpec(record["spec"])
        versions = []
        for v in record["versions"]:
            material = bytes.fromhex(v["material"])
            digest = hashlib.sha256(material).digest()
            secret = self._materials.get(digest)
            if secret is None:
                secret = self._materials[digest] = _load(spec, material)
            versions.append(_Version(int(v["number"]), VersionState(v["state"]), secret, material))
        return _Key(name, spec, bool(record["enabled"]), versions)

    def _write(self, key: _Key, expected_version: int) -> None:
        assert self.store is not None
        record = {
            "spec": key.spec.value,
            "enabled": key.enabled,
            "versions": [
                {"number": v.number, "state": v.state.value, "material": v.material.hex()}
                for v in key.versions
            ],
        }
        put_json_if(self.store, self._store_key(key.name), record, expected_version)

    def _change(self, name: str, change: Callable[[_Key], None]) -> _Key:
        """Apply `change` to the key, in memory or by compare-and-set in the store."""
        check_name(name)
        with self._lock:
            if self.store is None:
                key = self._key(name)[0]
                change(key)
                return key
            while True:
                found = self._read(name)
                if found is None:
                    raise UnknownKeyError(f"no key named {name!r} in the software backend")
                key, stored_version = found
                change(key)
                try:
                    self._write(key, stored_version)
                    return key
                except ConflictError:
                    continue  # another process changed it: apply the change again

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo:
        check_name(name)
        check_spec(spec, fips_mode=self.fips_mode)
        secret, material = _generate(spec)
        key = _Key(name, spec, versions=[_Version(1, VersionState.ENABLED, secret, material)])
        with self._lock:
            if self.store is not None:
                try:
                    self._write(key, 0)
                except ConflictError:
                    raise KeyExistsError(f"a key named {name!r} already exists") from None
                return key.info()
            if name in self._keys:
                raise KeyExistsError(f"a key named {name!r} already exists")
            self._keys[name] = key
            return key.info()

    def describe(self, name: str) -> KeyInfo:
        with self._lock:
            return self._key(name)[1]

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = check_wrap_input(plaintext, aad)
        with self._lock:
            key, info = self._key(name)
            require_wrapping(info)
            require_usable(info, info.primary_version)
            version = key.versions[-1]
        nonce = os.urandom(_NONCE_BYTES)
        return pack_wrapped(version.number, nonce + version.secret.encrypt(nonce, plaintext, aad))

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        number, body = unpack_wrapped(wrapped)
        if not isinstance(aad, bytes):
            raise KeyInputError("associated data must be bytes")
        with self._lock:
            key, info = self._key(name)
            require_wrapping(info)
            version = self._version(key, number, missing=IntegrityError)
            require_usable(info, number)
        try:
            return bytes(version.secret.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], aad))
        except InvalidTag:
            raise IntegrityError(f"unwrap with key {name!r} failed authentication") from None

    def sign(self, name: str, message: bytes) -> Signature:
        message = check_message(message)
        with self._lock:
            key, info = self._key(name)
            require_signing(info)
            require_usable(info, info.primary_version)
            version = key.versions[-1]
        private = version.secret
        if info.spec is KeySpec.EC_P256:
            value = private.sign(message, ec.ECDSA(hashes.SHA256()))
        elif info.spec is KeySpec.RSA_3072:
            value = private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        else:
            value = private.sign(message)
        return Signature(version.number, bytes(value))

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        message = check_message(message)
        if not isinstance(signature, Signature):
            raise KeyInputError("verify takes a Signature (version and value)")
        with self._lock:
            key, info = self._key(name)
            require_signing(info)
            version = self._version(key, signature.version, missing=InvalidSignatureError)
            require_usable(info, signature.version)
        public = version.secret.public_key()
        try:
            if info.spec is KeySpec.EC_P256:
                public.verify(signature.value, message, ec.ECDSA(hashes.SHA256()))
            elif info.spec is KeySpec.RSA_3072:
                public.verify(signature.value, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                public.verify(signature.value, message)
        except InvalidSignature:
            raise InvalidSignatureError(
                f"signature does not verify with version {signature.version} of key {name!r}"
            ) from None

    def public_key(self, name: str, version: int | None = None) -> bytes:
        with self._lock:
            key, info = self._key(name)
            if not info.spec.is_signing:
                raise WrongKeyTypeError(f"key {name!r} is {info.spec.value}: it has no public key")
            chosen = self._version(key, info.primary_version if version is None else version)
            require_usable(info, chosen.number)  # a disabled version publishes nothing
        return bytes(
            chosen.secret.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def rotate(self, name: str) -> KeyInfo:
        secret, material = _generate(self.describe(name).spec)

        def add_version(key: _Key) -> None:
            key.versions.append(_Version(key.versions[-1].number + 1, VersionState.ENABLED, secret, material))

        return self._change(name, add_version).info()

    def disable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=False)

    def enable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=True)

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if not 7 <= days <= 120:
            raise KeyInputError("destruction is scheduled 7 to 120 days ahead")

        def schedule(key: _Key) -> None:
            chosen = self._version(key, version)
            if chosen.number == key.versions[-1].number:
                raise KeyInputError(f"version {version} is the primary of key {name!r}; rotate first")
            chosen.state = VersionState.DESTRUCTION_SCHEDULED

        self._change(name, schedule)

    def health(self) -> Health:
        return Health(True, PROVIDER, BANNER)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            self._materials.clear()
            self._parsed.clear()

    # --- helpers ---------------------------------------------------------------------

    def _set_state(self, name: str, version: int | None, *, enabled: bool) -> None:
        def set_state(key: _Key) -> None:
            if version is None:
                key.enabled = enabled
                return
            chosen = self._version(key, version)
            if chosen.state in (VersionState.DESTRUCTION_SCHEDULED, VersionState.DESTROYED):
                raise KeyInputError(f"version {version} of key {name!r} is {chosen.state.value}")
            chosen.state = VersionState.ENABLED if enabled else VersionState.DISABLED

        self._change(name, set_state)

    @staticmethod
    def _version(key: _Key, number: int, *, missing: type[KeyBackendError] = UnknownKeyError) -> _Version:
        """The version, or `missing`: UnknownKeyError when a caller names it, an
        integrity error when a blob or signature claims a version the key never had."""
        for v in key.versions:
            if v.number == number:
                return v
        raise missing(f"key {key.name!r} has no version {number}")

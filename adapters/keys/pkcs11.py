"""The PKCS#11 key backend: keys generated and used inside any PKCS#11 token.

`Pkcs11KeyBackend` talks to a PKCS#11 module through python-pkcs11: SoftHSM2 in
development and tests, a network or PCIe HSM in production (AWS CloudHSM reuses it,
see cloudhsm.py). Nothing secret ever leaves the token:

- Every key version is generated inside the token as a token object with
  CKA_TOKEN, CKA_PRIVATE and CKA_SENSITIVE true and CKA_EXTRACTABLE false, so the
  token itself refuses to reveal it (C_GetAttributeValue of CKA_VALUE) or wrap it
  out (C_WrapKey). Only the public half of a signing key is read, to build its
  SubjectPublicKeyInfo.
- AES-256 keys wrap with CKM_AES_GCM: a fresh random 12-byte IV per wrap (or, for
  modules that insist on making it, such as CloudHSM, the IV the token writes back),
  the associated data in the GCM parameters, a 128-bit tag. The blob is
  `pack_wrapped(version, iv || ciphertext || tag)`.
- Messages are hashed with SHA-256 here and only the digest enters the token:
  EC P-256 signs it with CKM_ECDSA (SoftHSM2 2.6 has no CKM_ECDSA_SHA256), and the
  raw r||s is returned DER-encoded; RSA-3072 signs the DER DigestInfo with
  CKM_RSA_PKCS, which is exactly RSASSA-PKCS1-v1_5 with SHA-256. A token without
  CKM_RSA_PKCS gets CKM_SHA256_RSA_PKCS with the message instead (same signature).
  Verification happens in the token too, with the version's public key object.

Versions and state. Version N of key `name` is one token object (AES) or a key
pair (EC, RSA) labelled `keycell/<name>/v<N>`, found by a random CKA_ID recorded
in the key's metadata (labels are for people; two processes racing to create the
same name never confuse each other's objects). The key's state is a CKO_DATA
object (CKA_APPLICATION "keycell", label `keycell/<name>`, private to the logged-in
user) whose value is small JSON: spec, enabled, and per version its number, CKA_ID,
state and destruction date. Tokens refuse to change a data object's CKA_VALUE, so
an update writes a new object with the next sequence number and then destroys the
older ones; readers take the highest sequence. A writer that finds another object
with its sequence number lost a race with another process: it removes its own
object and reports BackendUnavailableError (retry), so no update is ever lost
silently.

Disabling is enforced twice. The metadata is the record every operation checks
first (so errors are specific: KeyDisabledError naming the state). And the token
enforces it as well: a disabled key, a disabled version or one scheduled for
destruction gets CKA_ENCRYPT/CKA_DECRYPT (AES) or CKA_SIGN/CKA_VERIFY (private and
public key) set false with C_SetAttributeValue, so even a process holding stale
state, or anything else logged in to the token, cannot use it; CKR_KEY_FUNCTION_
NOT_PERMITTED maps to KeyDisabledError. PKCS#11 lets applications change these
attributes (unlike CKA_EXTRACTABLE or CKA_SENSITIVE, which only ever tighten); a
token that refuses is logged and the metadata alone enforces the state. Both steps
fail closed: whichever is written first, a crash between them leaves the version
refused until the operation is repeated. A version whose destruction date has
passed is destroyed (C_DestroyObject) the next time the key's state is read from
the token, and reads as `destroyed`.

State is cached per backend for `state_ttl` seconds (one second by default) so the
hot path is pure token crypto; changes made through this backend apply at once,
and changes made by another process become visible within the TTL. Disabling is
immediate everywhere anyway, because the token enforces it.

Sessions and threads. A python-pkcs11 session must not be used by two threads at
once, so every operation borrows a session from a bounded pool (`pool_size`) and
returns it; a thread finding all of them busy waits up to `pool_wait_seconds`, then
gets BackendUnavailableError. PKCS#11 login is per application and token, not per
session: the first backend on a token in this process logs in with one session it
keeps open (closing it logs the whole process out), pooled sessions share that
login, and later backends on the same token reuse it after checking they were given
the same PIN. Calls into the module itself are serialised per module (see
`module_lock`): python-pkcs11 initialises modules with C_Initialize(NULL), which
tells the module no two threads will call it at once, and SoftHSM2 then runs
without its own mutexes (concurrent calls crash the process). Threads still overlap
everything around the call: hashing, DER, state checks, the caller's own work.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

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
    require_signing,
    require_usable,
    require_wrapping,
    unpack_wrapped,
)

PROVIDER = "pkcs11"
APPLICATION = "keycell"
LABEL_PREFIX = "keycell/"
IV_BYTES = 12
TAG_BITS = 128
# DER DigestInfo for SHA-256 (RFC 8017, section 9.2, note 1): prefix || 32-byte digest.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_P256_ORDER_BYTES = 32
_KEY_FUNCTION_NOT_PERMITTED = 0x68  # python-pkcs11 0.10 has no exception class for it
_SESSION_LOST = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
    p11.DeviceMemory,
)
# What SoftHSM2 and other tokens report when a GCM tag does not authenticate: SoftHSM2
# 2.6 says CKR_GENERAL_ERROR; the standard says CKR_ENCRYPTED_DATA_INVALID.
_GCM_REJECTED = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.GeneralError,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.FunctionFailed,
)
_MISSING_VERSION = "has no version"

log = logging.getLogger(__name__)
T = TypeVar("T")


def _return_value(exc: BaseException) -> int | None:
    """The CKR_ code of an error python-pkcs11 has no class for ("Unmapped error code 0x68")."""
    match = re.search(r"0x([0-9a-fA-F]+)", str(exc))
    return int(match.group(1), 16) if match else None


def _failure(exc: p11.PKCS11Error, doing: str) -> KeyBackendError:
    """The protocol's exception for a token error that has no more specific meaning."""
    if _return_value(exc) == _KEY_FUNCTION_NOT_PERMITTED:
        return KeyDisabledError(f"the token refuses to {doing}: the key version is disabled inside the HSM")
    if isinstance(exc, p11.NoSuchKey):
        return UnknownKeyError(f"the token has no object to {doing}; it was destroyed or never created")
    code = _return_value(exc)
    what = type(exc).__name__ + (f" 0x{code:x}" if code is not None else "")
    return BackendUnavailableError(
        f"the PKCS#11 token failed to {doing} ({what}); check that the token is present and "
        "logged in, then retry"
    )


# --- process-wide login per token ----------------------------------------------------------


@dataclass
class _Login:
    """The session that holds this process's login on one token."""

    anchor: pkcs11.Session
    pin_digest: bytes
    owns_login: bool
    refs: int = 1
    # Serialises read-modify-write of key metadata between backends of this process.
    state_lock: threading.RLock = field(default_factory=threading.RLock)


_logins: dict[tuple[str, bytes], _Login] = {}
_logins_lock = threading.Lock()
_module_locks: dict[str, threading.RLock] = {}
_module_locks_lock = threading.Lock()


def module_lock(module: str) -> threading.RLock:
    """The lock every call into `module` from this process holds.

    python-pkcs11 0.10 initialises a module with C_Initialize(NULL), which by the
    PKCS#11 standard promises the module that no two threads call it at once; SoftHSM2
    then switches its own mutexes off and crashes under concurrent calls. So calls are
    serialised per module, whatever the backend or session; threads still overlap
    everything else (hashing, DER, JSON, the caller's work)."""
    with _module_locks_lock:
        return _module_locks.setdefault(os.path.realpath(module), threading.RLock())


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


def _login_refused(exc: p11.PKCS11Error, label: str) -> BackendUnavailableError:
    if isinstance(exc, p11.PinLocked):
        return BackendUnavailableError(
            f"the user PIN of token {label!r} is locked; the token's security officer must unlock it"
        )
    if isinstance(exc, p11.PinIncorrect | p11.PinInvalid | p11.PinLenRange):
        return BackendUnavailableError(
            f"token {label!r} refused the user PIN (incorrect PIN); check KEYCELL_PKCS11_PIN or the "
            "configured PIN"
        )
    return BackendUnavailableError(f"could not log in to token {label!r} ({type(exc).__name__}); retry")


def _acquire_login(module: str, token: pkcs11.Token, pin: str) -> _Login:
    key = (module, bytes(token.serial))
    digest = _pin_digest(pin)
    with _logins_lock:
        login = _logins.get(key)
        if login is not None:
            # The token is logged in already; C_Login would not check the PIN again,
            # so compare it with the one that logged in.
            if not hmac.compare_digest(login.pin_digest, digest):
                raise BackendUnavailableError(
                    f"token {token.label!r} refused the user PIN (incorrect PIN: it differs from the one "
                    "this process logged in with)"
                )
            login.refs += 1
            return login
        try:
            with module_lock(module):
                anchor = token.open(user_pin=pin)
            owns = True
        except p11.UserAlreadyLoggedIn:
            # Something else in this process (outside Keycell) logged in to the token;
            # the login is shared, so use it and never log it out.
            with module_lock(module):
                anchor, owns = token.open(), False
        except p11.PKCS11Error as exc:
            raise _login_refused(exc, token.label) from None
        login = _Login(anchor, digest, owns)
        _logins[key] = login
        return login


def _release_login(module: str, serial: bytes, login: _Login) -> None:
    with _logins_lock:
        login.refs -= 1
        if login.refs > 0:
            return
        if _logins.get((module, serial)) is login:
            del _logins[(module, serial)]
    # Closing the anchor logs the process out of the token; a token that went away
    # has nothing left to log out of.
    with module_lock(module), suppress(p11.PKCS11Error):
        login.anchor.close()


def _relogin(module: str, token: pkcs11.Token, pin: str, login: _Login) -> None:
    """Log in again after the token forgot the login (HSM restart, C_Logout elsewhere)."""
    with _logins_lock, module_lock(module):
        with suppress(p11.PKCS11Error):
            login.anchor.close()
        try:
            login.anchor = token.open(user_pin=pin)
            login.owns_login = True
        except p11.UserAlreadyLoggedIn:
            login.anchor, login.owns_login = token.open(), False
        except p11.PKCS11Error as exc:
            raise _login_refused(exc, token.label) from None


# --- the session pool ------------------------------------------------------------------------


@dataclass
class _Pooled:
    session: pkcs11.Session
    generation: int
    # Key objects found in this session, by (CKA_ID, class); objects belong to a session.
    objects: dict[tuple[bytes, ObjectClass], Any] = field(default_factory=dict)
    broken: bool = False


class _SessionPool:
    """At most `size` R/W sessions, each used by one thread at a time."""

    def __init__(self, token: pkcs11.Token, lock: threading.RLock, size: int, wait_seconds: float) -> None:
        if size < 1:
            raise KeyInputError("the session pool needs at least one session")
        self._token = token
        self._module_lock = lock
        self._size = size
        self._wait = wait_seconds
        self._idle: list[_Pooled] = []
        self._open = 0
        self._waiting = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self.generation = 0  # bumped when objects are destroyed: cached objects go stale

    @property
    def in_use(self) -> tuple[int, int]:
        with self._cond:
            return self._open - len(self._idle), self._size

    def forget_objects(self) -> None:
        with self._cond:
            self.generation += 1

    def acquire(self) -> _Pooled:
        # The hot path takes an idle session without the lock: list.pop is atomic.
        try:
            pooled = self._idle.pop()
        except IndexError:
            return self._acquire_slowly()
        if pooled.generation != self.generation:
            pooled.objects.clear()
            pooled.generation = self.generation
        if self._closed:
            self.release(pooled)
            raise BackendUnavailableError("the PKCS#11 backend is closed")
        return pooled

    def _acquire_slowly(self) -> _Pooled:
        deadline = time.monotonic() + self._wait
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise BackendUnavailableError("the PKCS#11 backend is closed")
                    try:
                        pooled = self._idle.pop()
                    except IndexError:
                        pass
                    else:
                        if pooled.generation != self.generation:
                            pooled.objects.clear()
                            pooled.generation = self.generation
                        return pooled
                    if self._open < self._size:
                        self._open += 1
                        generation = self.generation
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BackendUnavailableError(
                            f"all {self._size} PKCS#11 sessions stayed busy for {self._wait:g}s; retry, or "
                            "raise the pool size"
                        )
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1
        try:
            # No PIN: the process is logged in already (see _Login); a session opened
            # with a PIN would log the whole process out when it closes.
            with self._module_lock:
                return _Pooled(self._token.open(rw=True), generation)
        except p11.PKCS11Error as exc:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise _failure(exc, "open a session") from None

    def release(self, pooled: _Pooled) -> None:
        if not pooled.broken and not self._closed:
            # Lock-free like acquire. A waiter counts itself before it looks for an idle
            # session, and this appends before it looks for waiters, so no wake-up is lost.
            self._idle.append(pooled)
            if self._waiting:
                with self._cond:
                    self._cond.notify()
            return
        with self._cond:
            self._open -= 1
            self._cond.notify()
        with self._module_lock:
            _close_quietly(pooled.session)

    @contextmanager
    def session(self) -> Iterator[_Pooled]:
        """A borrowed session, for calls off the hot path (the backend's _run inlines this)."""
        pooled = self.acquire()
        try:
            with self._module_lock:
                yield pooled
        except p11.PKCS11Error as exc:
            pooled.broken = _loses_session(exc)
            raise
        finally:
            self.release(pooled)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        with self._module_lock:
            for pooled in idle:
                _close_quietly(pooled.session)


def _loses_session(exc: p11.PKCS11Error) -> bool:
    """Whether the session can no longer be trusted after `exc`."""
    # 0x190 CKR_CRYPTOKI_NOT_INITIALIZED and 0xB3 CKR_SESSION_HANDLE_INVALID arrive unmapped.
    return isinstance(exc, _SESSION_LOST) or _return_value(exc) in (0x190, 0xB3)


def _close_quietly(session: pkcs11.Session) -> None:
    with suppress(p11.PKCS11Error):  # a session the token already dropped
        session.close()


# --- key metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Version:
    number: int
    object_id: bytes  # CKA_ID of the version's key object(s)
    state: VersionState
    destroy_after: datetime | None = None


@dataclass(frozen=True)
class _Meta:
    name: str
    spec: KeySpec
    enabled: bool
    versions: tuple[_Version, ...]
    sequence: int

    @property
    def primary(self) -> _Version:
        return self.versions[-1]

    def version(self, number: int, missing: type[KeyBackendError] = UnknownKeyError) -> _Version:
        for v in self.versions:
            if v.number == number:
                return v
        raise missing(f"key {self.name!r} {_MISSING_VERSION} {number}")

    def usable(self, version: _Version) -> bool:
        return self.enabled and version.state is VersionState.ENABLED

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": 1,
                "spec": self.spec.value,
                "enabled": self.enabled,
                "sequence": self.sequence,
                "versions": [
                    {
                        "number": v.number,
                        "id": v.object_id.hex(),
                        "state": v.state.value,
                        "destroy_after": v.destroy_after.isoformat() if v.destroy_after else None,
                    }
                    for v in self.versions
                ],
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def from_json(name: str, raw: bytes) -> _Meta:
        try:
            doc = json.loads(raw)
            return _Meta(
                name=name,
                spec=KeySpec(doc["spec"]),
                enabled=bool(doc["enabled"]),
                sequence=int(doc["sequence"]),
                versions=tuple(
                    _Version(
                        number=int(v["number"]),
                        object_id=bytes.fromhex(v["id"]),
                        state=VersionState(v["state"]),
                        destroy_after=datetime.fromisoformat(v["destroy_after"])
                        if v["destroy_after"]
                        else None,
                    )
                    for v in doc["versions"]
                ),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendUnavailableError(
                f"the token's state record for key {name!r} is unreadable ({type(exc).__name__}); it was "
                "altered outside Keycell"
            ) from None


@dataclass(frozen=True, slots=True)
class _Hot:
    """A cached key state, with what the hot path asks precomputed."""

    meta: _Meta
    info: KeyInfo
    at: float
    usable: dict[int, _Version]  # versions usable now (key enabled, version enabled)
    wraps: bool
    signs: bool


def _meta_label(name: str) -> str:
    return f"{LABEL_PREFIX}{name}"


def _version_label(name: str, number: int) -> str:
    return f"{LABEL_PREFIX}{name}/v{number}"


def _ec_point(encoded: bytes) -> bytes:
    """The uncompressed point from CKA_EC_POINT: DER OCTET STRING per the standard, raw
    on some tokens."""
    if len(encoded) == 2 * _P256_ORDER_BYTES + 1 and encoded[0] == 0x04:
        return encoded
    if len(encoded) >= 2 and encoded[0] == 0x04 and encoded[1] == len(encoded) - 2:
        return encoded[2:]
    raise BackendUnavailableError("the token returned an EC point in an unknown encoding")


# --- the backend -----------------------------------------------------------------------------------


class Pkcs11KeyBackend:
    """A `KeyBackend` on one PKCS#11 token. Thread-safe; close() when done."""

    provider = PROVIDER

    def __init__(
        self,
        module: str,
        token_label: str | None,
        pin: str,
        *,
        fips_level: int | None = None,
        fips_mode: bool = False,
        pool_size: int = 8,
        pool_wait_seconds: float = 30.0,
        state_ttl: float = 1.0,
        hsm_generated_iv: bool = False,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`token_label` None takes the module's only token. `fips_level` is the FIPS 140
        level the HSM's certificate states (None for SoftHSM2: not validated).
        `hsm_generated_iv`: the token makes the GCM IV and writes it into the parameters
        (CloudHSM); otherwise this process draws it from os.urandom."""
        if not isinstance(pin, str) or not pin:
            raise KeyInputError("a PKCS#11 user PIN is required")
        self.module = module
        self.fips_level = fips_level
        self.fips_mode = fips_mode
        self.state_ttl = state_ttl
        self.hsm_generated_iv = hsm_generated_iv
        self._clock = clock or (lambda: datetime.now(UTC))
        self._pin = pin
        self._lock = threading.Lock()
        self._cache: dict[str, _Hot] = {}
        self._public_pems: dict[bytes, bytes] = {}
        self._closed = False
        self._module_lock = module_lock(module)
        with self._module_lock:
            try:
                self._lib = pkcs11.lib(module)
            except (OSError, RuntimeError) as exc:
                raise BackendUnavailableError(
                    f"cannot load the PKCS#11 module {module!r} ({type(exc).__name__}); check the path "
                    "(KEYCELL_PKCS11_MODULE) and that the HSM client library is installed"
                ) from None
            self._token = self._find_token(token_label)
            self.token_label = self._token.label
            self._serial = bytes(self._token.serial)
        self._login = _acquire_login(module, self._token, pin)
        try:
            with self._module_lock:
                self._mechanisms = set(self._token.slot.get_mechanisms())
            self._pool = _SessionPool(self._token, self._module_lock, pool_size, pool_wait_seconds)
        except BaseException:
            _release_login(module, self._serial, self._login)
            raise

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, fips_mode: bool = False, **options: Any
    ) -> Pkcs11KeyBackend:
        """Configured by KEYCELL_PKCS11_MODULE, KEYCELL_PKCS11_TOKEN, KEYCELL_PKCS11_PIN and
        optionally KEYCELL_PKCS11_FIPS_LEVEL (the level the HSM's certificate states), read
        from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        missing = [
            v
            for v in ("KEYCELL_PKCS11_MODULE", "KEYCELL_PKCS11_TOKEN", "KEYCELL_PKCS11_PIN")
            if not env.get(v)
        ]
        if missing:
            raise KeyInputError("set " + ", ".join(missing) + " to use the pkcs11 key backend")
        level = env.get("KEYCELL_PKCS11_FIPS_LEVEL")
        if level is not None and not level.isdigit():
            raise KeyInputError("KEYCELL_PKCS11_FIPS_LEVEL is a FIPS 140 security level, 1 to 4")
        return cls(
            env["KEYCELL_PKCS11_MODULE"],
            env["KEYCELL_PKCS11_TOKEN"],
            env["KEYCELL_PKCS11_PIN"],
            fips_level=int(level) if level else None,
            fips_mode=fips_mode,
            **options,
        )

    def _find_token(self, label: str | None) -> pkcs11.Token:
        try:
            if label is not None:
                return self._lib.get_token(token_label=label)
            tokens = list(self._lib.get_tokens())
        except p11.NoSuchToken:
            raise BackendUnavailableError(
                f"module {self.module!r} has no token labelled {label!r}; check KEYCELL_PKCS11_TOKEN, or "
                "initialise the token"
            ) from None
        except p11.MultipleTokensReturned:
            raise BackendUnavailableError(
                f"module {self.module!r} has several tokens labelled {label!r}"
            ) from None
        except p11.PKCS11Error as exc:
            raise _failure(exc, "list its tokens") from None
        initialised = [t for t in tokens if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
        if len(initialised) != 1:
            raise BackendUnavailableError(
                f"module {self.module!r} has {len(initialised)} initialised tokens; name one by its label"
            )
        return initialised[0]

    # --- the protocol ---------------------------------------------------------------------------

    def create_key(self, name: str, spec: KeySpec) -> KeyInfo:
        check_name(name)
        check_spec(spec, fips_mode=self.fips_mode)
        self._require_mechanisms(spec)
        with self._login.state_lock:
            if self._find_meta(name) is not None:
                raise KeyExistsError(f"a key named {name!r} already exists")
            version = _Version(1, os.urandom(16), VersionState.ENABLED)
            self._generate(name, spec, version)
            meta = _Meta(name, spec, True, (version,), 1)
            try:
                self._write_meta(meta, previous=None)
            except KeyBackendError:
                self._destroy_objects(version.object_id)
                raise
        self._remember(meta)
        return self._info(meta)

    def describe(self, name: str) -> KeyInfo:
        meta = self._meta(name, fresh=True)
        return self._info(meta)

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = check_wrap_input(plaintext, aad)
        hot = self._hot(name)
        version = hot.usable.get(hot.info.primary_version) if hot.wraps else None
        if version is None:  # the shared checks say why not
            require_wrapping(hot.info)
            require_usable(hot.info, hot.info.primary_version)
            version = hot.meta.primary

        # python-pkcs11 hands the module a pointer to the IV buffer as CK_GCM_PARAMS.pIv;
        # a module that generates the IV writes it there, so then it must be mutable.
        generated = self.hsm_generated_iv
        iv: bytes | bytearray = bytearray(IV_BYTES) if generated else os.urandom(IV_BYTES)
        params = pkcs11.GCMParams(iv, aad, TAG_BITS)  # type: ignore[arg-type]  # any bytes-like works

        def encrypt(pooled: _Pooled) -> bytes:
            key = self._object(pooled, version.object_id, ObjectClass.SECRET_KEY, "encrypt")
            body: bytes = key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return body

        body = self._run(encrypt, "wrap with key", name)
        if generated and not any(iv):
            # The module did not fill in an IV: never hand out a zero-IV ciphertext.
            raise BackendUnavailableError(
                "the PKCS#11 module did not return the AES-GCM IV it generated; this module takes "
                "the IV from the caller: configure hsm_generated_iv=False"
            )
        return pack_wrapped(version.number, bytes(iv) + body)

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        number, body = unpack_wrapped(wrapped)
        if not isinstance(aad, bytes):
            raise KeyInputError("associated data must be bytes")
        hot = self._hot(name)
        version = hot.usable.get(number) if hot.wraps else None
        if version is None:  # the shared checks say why not
            require_wrapping(hot.info)
            version = hot.meta.version(number, missing=IntegrityError)
            require_usable(hot.info, number)
        if len(body) <= IV_BYTES + TAG_BITS // 8:
            raise IntegrityError(f"unwrap with key {name!r} failed authentication: the blob is truncated")
        ciphertext = body[IV_BYTES:]
        params = pkcs11.GCMParams(body[:IV_BYTES], aad, TAG_BITS)

        def decrypt(pooled: _Pooled) -> bytes:
            key = self._object(pooled, version.object_id, ObjectClass.SECRET_KEY, "decrypt")
            try:
                plaintext: bytes = key.decrypt(
                    ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
                return plaintext
            except _GCM_REJECTED:
                raise IntegrityError(f"unwrap with key {name!r} failed authentication") from None

        return self._run(decrypt, "unwrap with key", name)

    def sign(self, name: str, message: bytes) -> Signature:
        message = check_message(message)
        hot = self._hot(name)
        meta = hot.meta
        version = hot.usable.get(hot.info.primary_version) if hot.signs else None
        if version is None:  # the shared checks say why not
            require_signing(hot.info)
            require_usable(hot.info, hot.info.primary_version)
            version = meta.primary
        digest = hashlib.sha256(message).digest()

        def sign(pooled: _Pooled) -> bytes:
            key = self._object(pooled, version.object_id, ObjectClass.PRIVATE_KEY, "sign")
            if meta.spec is KeySpec.EC_P256:
                raw = bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
                half = len(raw) // 2
                return encode_dss_signature(
                    int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
                )
            if Mechanism.RSA_PKCS in self._mechanisms:
                return bytes(key.sign(SHA256_DIGEST_INFO + digest, mechanism=Mechanism.RSA_PKCS))
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS))

        return Signature(version.number, self._run(sign, "sign with key", name))

    def verify(self, name: str, message: bytes, signature: Signature) -> None:
        message = check_message(message)
        if not isinstance(signature, Signature):
            raise KeyInputError("verify takes a Signature (version and value)")
        hot = self._hot(name)
        meta = hot.meta
        version = hot.usable.get(signature.version) if hot.signs else None
        if version is None:  # the shared checks say why not
            require_signing(hot.info)
            version = meta.version(signature.version, missing=InvalidSignatureError)
            require_usable(hot.info, signature.version)
        invalid = InvalidSignatureError(
            f"signature does not verify with version {signature.version} of key {name!r}"
        )
        if not isinstance(signature.value, bytes):
            raise invalid
        digest = hashlib.sha256(message).digest()
        if meta.spec is KeySpec.EC_P256:
            try:
                r, s = decode_dss_signature(signature.value)
            except ValueError:
                raise invalid from None
            if not (0 < r < 2 ** (8 * _P256_ORDER_BYTES) and 0 < s < 2 ** (8 * _P256_ORDER_BYTES)):
                raise invalid
            data, value = digest, r.to_bytes(_P256_ORDER_BYTES, "big") + s.to_bytes(_P256_ORDER_BYTES, "big")
            mechanism = Mechanism.ECDSA
        elif Mechanism.RSA_PKCS in self._mechanisms:
            data, value, mechanism = SHA256_DIGEST_INFO + digest, signature.value, Mechanism.RSA_PKCS
        else:
            data, value, mechanism = message, signature.value, Mechanism.SHA256_RSA_PKCS

        def check(pooled: _Pooled) -> bool:
            key = self._object(pooled, version.object_id, ObjectClass.PUBLIC_KEY, "verify")
            return bool(key.verify(data, value, mechanism=mechanism))

        if not self._run(check, "verify with key", name):
            raise invalid

    def public_key(self, name: str, version: int | None = None) -> bytes:
        meta = self._meta(name)
        if not meta.spec.is_signing:
            raise WrongKeyTypeError(f"key {name!r} is {meta.spec.value}: it has no public key")
        chosen = meta.primary if version is None else meta.version(version)
        # A disabled or destroyed version publishes nothing (as the clouds do).
        require_usable(self._info(meta), chosen.number)
        cached = self._public_pems.get(chosen.object_id)
        if cached is not None:
            return cached

        def export(pooled: _Pooled) -> bytes:
            key = self._object(pooled, chosen.object_id, ObjectClass.PUBLIC_KEY)
            public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
            if meta.spec is KeySpec.EC_P256:
                point = _ec_point(bytes(key[Attribute.EC_POINT]))
                public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            else:
                attrs = key.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
                n = int.from_bytes(attrs[Attribute.MODULUS], "big")
                e = int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big")
                public = rsa.RSAPublicNumbers(e, n).public_key()
            return public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )

        pem = self._run(export, f"read the public key of {name!r}")
        with self._lock:
            self._public_pems[chosen.object_id] = pem
        return pem

    def rotate(self, name: str) -> KeyInfo:
        check_name(name)
        with self._login.state_lock:
            meta = self._read_meta(name)
            version = _Version(meta.primary.number + 1, os.urandom(16), VersionState.ENABLED)
            self._generate(name, meta.spec, version)
            if not meta.enabled:
                self._enforce(meta.spec, version, usable=False)
            updated = replace(meta, versions=(*meta.versions, version), sequence=meta.sequence + 1)
            try:
                self._write_meta(updated, previous=meta)
            except KeyBackendError:
                self._destroy_objects(version.object_id)
                raise
        self._remember(updated)
        return self._info(updated)

    def disable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=False)

    def enable(self, name: str, version: int | None = None) -> None:
        self._set_state(name, version, enabled=True)

    def schedule_destruction(self, name: str, version: int, *, days: int = 30) -> None:
        if not 7 <= days <= 120:
            raise KeyInputError("destruction is scheduled 7 to 120 days ahead")
        check_name(name)
        with self._login.state_lock:
            meta = self._read_meta(name)
            chosen = meta.version(version)
            if chosen.number == meta.primary.number:
                raise KeyInputError(f"version {version} is the primary of key {name!r}; rotate first")
            if chosen.state is VersionState.DESTROYED:
                raise KeyInputError(f"version {version} of key {name!r} is already destroyed")
            scheduled = replace(
                chosen,
                state=VersionState.DESTRUCTION_SCHEDULED,
                destroy_after=self._clock() + timedelta(days=days),
            )
            updated = self._with_version(meta, scheduled)
            # Tighten in the token first: a crash before the record is written leaves
            # the version refused, never usable.
            self._enforce(meta.spec, scheduled, usable=False)
            self._write_meta(updated, previous=meta)
        self._remember(updated)

    def health(self) -> Health:
        try:
            with self._module_lock:
                slots = self._lib.get_slots(token_present=True)
            if self._token.slot.slot_id not in {slot.slot_id for slot in slots}:
                return Health(
                    False, self.provider, f"token {self.token_label!r} is not present in {self.module}"
                )
            if not self._logged_in():
                _relogin(self.module, self._token, self._pin, self._login)
                if not self._logged_in():
                    return Health(
                        False, self.provider, f"token {self.token_label!r} is present but not logged in"
                    )
        except KeyBackendError as exc:
            return Health(False, self.provider, str(exc))
        except p11.PKCS11Error as exc:
            return Health(False, self.provider, str(_failure(exc, "answer a health check")))
        busy, size = self._pool.in_use
        level = (
            f"FIPS 140 level {self.fips_level} claimed"
            if self.fips_level
            else "no FIPS 140 validation claimed"
        )
        return Health(
            True,
            self.provider,
            f"token {self.token_label!r} ({self._token.manufacturer_id.strip()} {self._token.model.strip()}) "
            f"present and logged in; {level}; fips_mode={'on' if self.fips_mode else 'off'}; "
            f"sessions {busy}/{size} busy",
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache.clear()
        self._pool.close()
        _release_login(self.module, self._serial, self._login)

    # --- state ---------------------------------------------------------------------------------

    def _info(self, meta: _Meta) -> KeyInfo:
        return KeyInfo(
            name=meta.name,
            spec=meta.spec,
            provider=self.provider,
            protection=Protection.HSM,
            fips_level=self.fips_level,
            extractable=False,  # every version is generated CKA_EXTRACTABLE=false (see _generate)
            enabled=meta.enabled,
            primary_version=meta.primary.number,
            versions=tuple(KeyVersion(v.number, v.state) for v in meta.versions),
        )

    def _remember(self, meta: _Meta) -> _Hot:
        hot = _Hot(
            meta=meta,
            info=self._info(meta),
            at=time.monotonic(),
            usable={v.number: v for v in meta.versions if meta.usable(v)},
            wraps=meta.spec is KeySpec.AES_256,
            signs=meta.spec.is_signing,
        )
        with self._lock:
            self._cache[meta.name] = hot
        return hot

    def _hot(self, name: str) -> _Hot:
        """The key's state, from the cache while it is younger than `state_ttl`."""
        # One dict read, atomic, no lock. Only checked names are ever cached, so a hit
        # needs no second check.
        hot = self._cache.get(name) if type(name) is str else None
        if hot is not None and time.monotonic() - hot.at < self.state_ttl:
            return hot
        check_name(name)
        return self._remember(self._read_meta(name))

    def _meta(self, name: str, *, fresh: bool = False) -> _Meta:
        if fresh:
            check_name(name)
            meta = self._read_meta(name)
            self._remember(meta)
            return meta
        return self._hot(name).meta

    def _find_meta(self, name: str) -> _Meta | None:
        """The key's state record from the token, or None; versions whose destruction
        date has passed are destroyed on the way."""

        def read(pooled: _Pooled) -> list[bytes]:
            found = pooled.session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.APPLICATION: APPLICATION,
                    Attribute.LABEL: _meta_label(name),
                }
            )
            return [bytes(obj[Attribute.VALUE]) for obj in found]

        records = [_Meta.from_json(name, raw) for raw in self._run(read, f"read the state of key {name!r}")]
        if not records:
            return None
        newest = max(r.sequence for r in records)
        if sum(1 for r in records if r.sequence == newest) > 1:
            raise BackendUnavailableError(f"key {name!r} is being changed by another process; retry")
        meta = next(r for r in records if r.sequence == newest)
        due = [
            v
            for v in meta.versions
            if v.state is VersionState.DESTRUCTION_SCHEDULED
            and v.destroy_after
            and v.destroy_after <= self._clock()
        ]
        if due:
            meta = self._destroy_due(meta, due)
        return meta

    def _read_meta(self, name: str) -> _Meta:
        meta = self._find_meta(name)
        if meta is None:
            raise UnknownKeyError(f"no key named {name!r} in token {self.token_label!r}")
        return meta

    def _destroy_due(self, meta: _Meta, due: list[_Version]) -> _Meta:
        with self._login.state_lock:
            updated = meta
            for version in due:
                updated = self._with_version(updated, replace(version, state=VersionState.DESTROYED))
            updated = replace(updated, sequence=meta.sequence + 1)
            self._write_meta(updated, previous=meta)
            for version in due:
                self._destroy_objects(version.object_id)
        return updated

    def _write_meta(self, meta: _Meta, *, previous: _Meta | None) -> None:
        """Store `meta` as a new record, then drop older ones; see the module docstring."""
        label = _meta_label(meta.name)

        def write(pooled: _Pooled) -> None:
            mine = pooled.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.APPLICATION: APPLICATION,
                    Attribute.LABEL: label,
                    Attribute.VALUE: meta.to_json(),
                }
            )
            others = []
            for obj in pooled.session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.APPLICATION: APPLICATION,
                    Attribute.LABEL: label,
                }
            ):
                if obj.handle != mine.handle:
                    others.append((obj, _Meta.from_json(meta.name, bytes(obj[Attribute.VALUE]))))
            expected = previous.sequence if previous is not None else None
            if any(other.sequence >= meta.sequence for _, other in others) or (
                expected is not None and not any(other.sequence == expected for _, other in others)
            ):
                mine.destroy()
                if previous is None:
                    raise KeyExistsError(f"a key named {meta.name!r} was just created by another process")
                raise BackendUnavailableError(
                    f"key {meta.name!r} was changed by another process at the same time; retry"
                )
            for obj, _ in others:
                obj.destroy()

        self._run(write, f"store the state of key {meta.name!r}")

    def _set_state(self, name: str, version: int | None, *, enabled: bool) -> None:
        check_name(name)
        with self._login.state_lock:
            meta = self._read_meta(name)
            if version is None:
                updated = replace(meta, enabled=enabled, sequence=meta.sequence + 1)
                changed = [v for v in meta.versions if v.state is VersionState.ENABLED]
            else:
                chosen = meta.version(version)
                if chosen.state in (VersionState.DESTRUCTION_SCHEDULED, VersionState.DESTROYED):
                    raise KeyInputError(f"version {version} of key {name!r} is {chosen.state.value}")
                new_state = VersionState.ENABLED if enabled else VersionState.DISABLED
                updated = self._with_version(meta, replace(chosen, state=new_state))
                changed = [replace(chosen, state=new_state)]
            if not enabled:
                for v in changed:  # tighten in the token before the record says so
                    self._enforce(meta.spec, v, usable=False)
            self._write_meta(updated, previous=meta)
            if enabled:
                for v in changed:  # loosen in the token only after the record says so
                    self._enforce(meta.spec, v, usable=updated.usable(updated.version(v.number)))
        self._remember(updated)

    @staticmethod
    def _with_version(meta: _Meta, version: _Version) -> _Meta:
        versions = tuple(version if v.number == version.number else v for v in meta.versions)
        return replace(meta, versions=versions, sequence=meta.sequence + 1)

    # --- token objects -------------------------------------------------------------------------------

    def _run(
        self, op: Callable[[_Pooled], T], doing: str, name: str | None = None, *, retry: bool = True
    ) -> T:
        """Run `op` on a borrowed session under the module lock, mapping token errors;
        retry once when a cached object went stale or the login was lost. `doing`, with
        the key `name` after it, says what failed; formatted only when something does."""
        pool = self._pool
        pooled = pool.acquire()
        try:
            with self._module_lock:
                return op(pooled)
        except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid) as exc:
            pooled.objects.clear()
            if not retry:
                raise _failure(exc, doing if name is None else f"{doing} {name!r}") from None
        except p11.PKCS11Error as exc:
            pooled.broken = _loses_session(exc)
            if not (retry and isinstance(exc, p11.UserNotLoggedIn)):
                raise _failure(exc, doing if name is None else f"{doing} {name!r}") from None
            _relogin(self.module, self._token, self._pin, self._login)
        finally:
            pool.release(pooled)
        return self._run(op, doing, name, retry=False)

    @staticmethod
    def _object(pooled: _Pooled, object_id: bytes, object_class: ObjectClass, use: str | None = None) -> Any:
        """The version's key object in this session; `use` names the operation it must
        allow. python-pkcs11 gives an object the methods its CKA_ENCRYPT, CKA_SIGN, ...
        allow, so a version disabled inside the token has none."""
        key = (object_id, object_class)
        found = pooled.objects.get(key)
        if found is None:
            found = pooled.session.get_key(object_class=object_class, id=object_id)
            pooled.objects[key] = found
        if use is not None and not hasattr(found, use):
            raise KeyDisabledError(f"the token refuses to {use}: the key version is disabled inside the HSM")
        return found

    def _require_mechanisms(self, spec: KeySpec) -> None:
        needed = {
            KeySpec.AES_256: [{Mechanism.AES_KEY_GEN}, {Mechanism.AES_GCM}],
            KeySpec.EC_P256: [{Mechanism.EC_KEY_PAIR_GEN}, {Mechanism.ECDSA}],
            KeySpec.RSA_3072: [
                {Mechanism.RSA_PKCS_KEY_PAIR_GEN},
                {Mechanism.RSA_PKCS, Mechanism.SHA256_RSA_PKCS},
            ],
        }.get(spec)
        if needed is None:
            raise UnsupportedKeySpecError(f"the {self.provider} backend cannot create {spec.value} keys")
        for alternatives in needed:
            if not alternatives & self._mechanisms:
                names = " or ".join(sorted(m.name for m in alternatives))
                raise UnsupportedKeySpecError(
                    f"token {self.token_label!r} lacks {names}, needed for {spec.value} keys"
                )

    def _generate(self, name: str, spec: KeySpec, version: _Version) -> None:
        """Generate the version's key inside the token: a token object, private, sensitive
        and never extractable."""
        label = _version_label(name, version.number)
        secret = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        public = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True}

        def generate(pooled: _Pooled) -> None:
            session = pooled.session
            if spec is KeySpec.AES_256:
                session.generate_key(
                    KeyType.AES,
                    256,
                    id=version.object_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={**secret, Attribute.WRAP: False, Attribute.UNWRAP: False},
                )
            elif spec is KeySpec.EC_P256:
                session.generate_keypair(
                    KeyType.EC,
                    id=version.object_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template={
                        **public,
                        Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
                    },
                    private_template={**secret, Attribute.SIGN: True, Attribute.DERIVE: False},
                )
            else:
                session.generate_keypair(
                    KeyType.RSA,
                    3072,
                    id=version.object_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template={**public, Attribute.ENCRYPT: False, Attribute.WRAP: False},
                    private_template={
                        **secret,
                        Attribute.SIGN: True,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                    },
                )

        self._run(generate, f"generate a {spec.value} key")

    def _enforce(self, spec: KeySpec, version: _Version, *, usable: bool) -> None:
        """Set the version's usage attributes in the token (see the module docstring)."""
        if version.state is VersionState.DESTROYED:
            return
        targets: list[tuple[ObjectClass, tuple[Attribute, ...]]]
        if spec is KeySpec.AES_256:
            targets = [(ObjectClass.SECRET_KEY, (Attribute.ENCRYPT, Attribute.DECRYPT))]
        else:
            targets = [
                (ObjectClass.PRIVATE_KEY, (Attribute.SIGN,)),
                (ObjectClass.PUBLIC_KEY, (Attribute.VERIFY,)),
            ]

        def apply(pooled: _Pooled) -> None:
            for object_class, attributes in targets:
                key = self._object(pooled, version.object_id, object_class)
                for attribute in attributes:
                    try:
                        key[attribute] = usable
                    except (p11.AttributeReadOnly, p11.AttributeValueInvalid, p11.FunctionNotSupported):
                        log.warning(
                            "token %r does not let usage attributes change; key state is enforced by "
                            "Keycell's record only",
                            self.token_label,
                        )
                        return

        self._run(apply, "change a key version's usage in the token")

    def _destroy_objects(self, object_id: bytes) -> None:
        def destroy(pooled: _Pooled) -> None:
            for obj in list(pooled.session.get_objects({Attribute.ID: object_id})):
                obj.destroy()

        self._run(destroy, "destroy a key version")
        self._pool.forget_objects()
        with self._lock:
            self._public_pems.pop(object_id, None)

    def _logged_in(self) -> bool:
        """Whether private objects can be made: a private session object, created and
        destroyed again, needs a logged-in user."""

        def probe(pooled: _Pooled) -> bool:
            try:
                obj = pooled.session.create_object(
                    {
                        Attribute.CLASS: ObjectClass.DATA,
                        Attribute.TOKEN: False,
                        Attribute.PRIVATE: True,
                        Attribute.APPLICATION: APPLICATION,
                        Attribute.LABEL: "keycell-health",
                        Attribute.VALUE: b"ok",
                    }
                )
            except p11.UserNotLoggedIn:
                return False
            obj.destroy()
            return True

        with self._pool.session() as pooled:
            return probe(pooled)

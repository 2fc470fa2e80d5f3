"""The seal: how a cell's root key comes to be in memory, and how it goes away.

A cell starts sealed. `init` creates the root key and the barrier keyring, stores
the keyring encrypted under the root key, and hands out shares exactly once:

- Shamir mode: the root key itself is split; `unseal` collects shares until the
  threshold, rebuilds the root key and proves it by decrypting the keyring. A wrong
  combination fails that decryption, resets progress and leaves the cell sealed.
- HSM mode (auto-unseal, as Vault's): a key-encryption key in the `KeyBackend` wraps
  the root key; `auto_unseal` unwraps it, so no human is needed at start. The shares
  are then *recovery* shares of a separate recovery key, which authorize `rekey`.

`rekey` issues new shares and a new threshold without re-encrypting data: only the
small keyring is re-encrypted (Shamir mode: under a new root key) or the recovery
key replaced (HSM mode). `seal` drops every key from memory.

Unseal progress lives in this process's memory, as Vault keeps it on its active
node: a serverless deployment uses HSM mode, where no progress is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane import shamir
from keycell.control_plane.barrier import (
    KEY_BYTES,
    KEYRING_KEY,
    NONCE_BYTES,
    Barrier,
    BarrierIntegrityError,
    Keyring,
    decrypt_keyring,
    encrypt_keyring,
    zeroize,
)
from keycell.control_plane.keys import KeyBackend, KeySpec, UnknownKeyError
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, LedgerError, Put
from keycell.control_plane.unseal_sharing import SharedUnseal

log = logging.getLogger("keycell.seal")

CONFIG_KEY = Key(Kind.SEAL, "config")
WRAPPED_ROOT_KEY = Key(Kind.SEAL, "root-key-wrapped")
RECOVERY_CHECK_KEY = Key(Kind.SEAL, "recovery-check")
_ROOT_KEY_AAD = b"keycell:root-key"
_RECOVERY_AAD = b"keycell:recovery-check"
SHARE_BYTES = KEY_BYTES + shamir.SHARE_OVERHEAD


class SealMode(StrEnum):
    SHAMIR = "shamir"
    HSM = "hsm"


# --- errors ---------------------------------------------------------------------------


MIN_CHOSEN_ROOT_TOKEN = 8


def chosen_root_token_ok(token: str, *, short_ok: bool = False) -> bool:
    """Whether `token` may be a chosen root token: printable, no spaces, and at least
    MIN_CHOSEN_ROOT_TOKEN characters unless `short_ok`."""
    if not token or not token.isprintable() or " " in token:
        return False
    return short_ok or len(token) >= MIN_CHOSEN_ROOT_TOKEN


class SealError(Exception):
    """Base of the seal's errors."""


class AlreadyInitializedError(SealError):
    def __init__(self) -> None:
        super().__init__("this cell is already initialized; its shares were handed out at init")


class NotInitializedError(SealError):
    def __init__(self) -> None:
        super().__init__("this cell is not initialized; run init first")


class ShareError(SealError, ValueError):
    """A submitted share is malformed (not hex or base64, or the wrong length)."""


class UnsealError(SealError):
    """The shares did not rebuild this cell's key. Progress was reset; still sealed."""


class NonceMismatchError(SealError, ValueError):
    """A share was submitted for another unseal or rekey attempt (stale nonce)."""


class SealModeError(SealError):
    """The operation does not exist in this cell's seal mode."""


# --- configuration and results ----------------------------------------------------------


@dataclass(frozen=True)
class SealConfig:
    mode: SealMode
    shares: int
    threshold: int
    kek: str | None = None  # HSM mode: the KeyBackend key that wraps the root key

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"mode": self.mode.value, "shares": self.shares, "threshold": self.threshold, "kek": self.kek}
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SealConfig:
        body = json.loads(raw)
        return cls(SealMode(body["mode"]), int(body["shares"]), int(body["threshold"]), body.get("kek"))


@dataclass(frozen=True)
class SealStatus:
    initialized: bool
    sealed: bool
    mode: SealMode | None
    shares: int
    threshold: int
    progress: int
    nonce: str


@dataclass(frozen=True)
class RekeyStatus:
    started: bool
    nonce: str
    required: int  # current shares needed
    progress: int
    new_shares: int
    new_threshold: int


@dataclass(frozen=True)
class InitResult:
    """Handed out once. `shares` are unseal shares (Shamir mode) or recovery shares."""

    mode: SealMode
    shares: list[bytes] = field(repr=False)
    threshold: int
    root_token: str = field(repr=False)

    @property
    def shares_hex(self) -> list[str]:
        return [shamir.encode_share(s, "hex") for s in self.shares]

    @property
    def shares_base64(self) -> list[str]:
        return [shamir.encode_share(s, "base64") for s in self.shares]


class ShareCollector:
    """Distinct shares gathered toward a threshold under one nonce; a share sent
    twice counts once. Used by unseal and by rekey."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.nonce = str(uuid.uuid4())
        self._shares: list[bytearray] = []

    @property
    def progress(self) -> int:
        return len(self._shares)

    def add(self, share: bytes) -> None:
        if any(hmac.compare_digest(bytes(s), share) for s in self._shares):
            return
        self._shares.append(bytearray(share))

    @property
    def complete(self) -> bool:
        return len(self._shares) >= self.threshold

    def shares(self) -> list[bytes]:
        return [bytes(s) for s in self._shares]

    def clear(self) -> None:
        for s in self._shares:
            zeroize(s)
        self._shares.clear()


def share_length(config: SealConfig) -> int:
    """A share is the key plus its x-byte; with one share the key is handed out whole."""
    return KEY_BYTES if config.shares == 1 else SHARE_BYTES


def parse_share(share: str | bytes, length: int) -> bytes:
    """A share as given out (hex or base64 text) or raw bytes."""
    if isinstance(share, bytes):
        if len(share) != length:
            raise ShareError(f"a key share is {length} bytes; this one is {len(share)}")
        return share
    if not isinstance(share, str):
        raise ShareError("a key share is hex or base64 text")
    try:
        return shamir.decode_share(share, expected_length=length)
    except shamir.ShamirError:
        raise ShareError(
            f"that is not a key share: expected hex or base64 of {length} bytes, as init printed them"
        ) from None


def _combine(shares: Sequence[bytes]) -> bytearray:
    try:
        return bytearray(shamir.combine(shares))
    except shamir.ShamirError as exc:
        raise UnsealError(f"the shares do not combine: {exc}") from None


def token_path(token: str) -> str:
    """Tokens are stored under a digest, never as themselves."""
    return hashlib.sha256(token.encode()).hexdigest()


class Seal:
    """Init, unseal, seal and rekey for one cell."""

    def __init__(
        self,
        ledger: Ledger,
        barrier: Barrier,
        *,
        key_backend: KeyBackend | None = None,
        kek: str | None = None,
        sharing: SharedUnseal | None = None,
    ) -> None:
        if (key_backend is None) != (kek is None):
            raise ValueError("HSM mode needs both a key backend and a key name")
        self.ledger = ledger
        self.barrier = barrier
        self.sharing = sharing  # several worker processes of one server share unseal state
        self.key_backend = key_backend
        self.kek = kek
        self._lock = threading.Lock()
        self._unseal: ShareCollector | None = None
        self._rekey: tuple[ShareCollector, int, int] | None = None

    # --- status -----------------------------------------------------------------------

    def config(self) -> SealConfig | None:
        item = self.ledger.get(CONFIG_KEY, consistent=True)
        return None if item is None else SealConfig.from_bytes(item.value)

    def status(self) -> SealStatus:
        config = self.config()
        with self._lock:
            if config is not None and self.sharing is not None and self.barrier.sealed:
                self._load_shared_progress(config)
            progress = self._unseal.progress if self._unseal else 0
            nonce = self._unseal.nonce if self._unseal else ""
        if config is None:
            return SealStatus(False, True, None, 0, 0, 0, "")
        return SealStatus(
            True, self.barrier.sealed, config.mode, config.shares, config.threshold, progress, nonce
        )

    # --- init -------------------------------------------------------------------------

    def init(
        self, shares: int, threshold: int, *, root_token: str | None = None, short_root_token_ok: bool = False
    ) -> InitResult:
        """`root_token` chooses the root token's value (development servers only, like
        `vault server -dev-root-token-id`); otherwise it is random. It has at least
        MIN_CHOSEN_ROOT_TOKEN characters unless `short_root_token_ok` (Vault's dev
        habit, `-dev-root-token-id=root`)."""
        mode = SealMode.HSM if self.key_backend is not None else SealMode.SHAMIR
        self._check_split(shares, threshold)
        if root_token is not None and not chosen_root_token_ok(root_token, short_ok=short_root_token_ok):
            raise ShareError(
                f"a chosen root token is at least {MIN_CHOSEN_ROOT_TOKEN} printable characters without spaces"
            )
        if self.config() is not None:
            raise AlreadyInitializedError()
        root = bytearray(os.urandom(KEY_BYTES))
        keyring = Keyring.generate()
        from keycell.control_plane.auth.token.store import new_token  # tokens builds on this module

        token = root_token or new_token()
        ops: list[Put] = [Put(CONFIG_KEY, SealConfig(mode, shares, threshold, self.kek).to_bytes(), 0)]
        ops.append(Put(KEYRING_KEY, encrypt_keyring(root, keyring), 0))
        if mode is SealMode.HSM:
            secret = bytearray(os.urandom(KEY_BYTES))  # the recovery key
            ops.append(Put(WRAPPED_ROOT_KEY, self._wrap_root(root), 0))
            ops.append(Put(RECOVERY_CHECK_KEY, _recovery_check(secret), 0))
        else:
            secret = root
        try:
            handed_out = shamir.split(bytes(secret), shares, threshold)
            self.barrier.open(root, keyring)
            # The root token is a full token-store entry (record and accessor index), written
            # in this same transaction; imported here because tokens builds on this module.
            from keycell.control_plane.auth.token.store import root_token_ops

            for op in root_token_ops(token, now=int(time.time())):
                ops.append(Put(op.key, self.barrier.encrypt(op.key, op.value, 1), 0, op.expires_at))
            try:
                self.ledger.transact(ops)
            except ConflictError:
                raise AlreadyInitializedError() from None
        finally:
            if mode is SealMode.SHAMIR:
                # Init hands out the shares and leaves the cell sealed, as Vault does.
                self.barrier.close_barrier()
            zeroize(secret)
            zeroize(root)
        return InitResult(mode, handed_out, threshold, token)

    # --- unseal -----------------------------------------------------------------------

    def unseal(self, share: str | bytes, *, nonce: str | None = None) -> SealStatus:
        config = self._require_config()
        if config.mode is SealMode.HSM:
            raise SealModeError("this cell unseals itself with its HSM; its shares are recovery shares")
        raw = parse_share(share, share_length(config))
        with self._lock:
            if not self.barrier.sealed:
                return self._status_locked(config)
            while True:
                stored_version = self._load_shared_progress(config)
                if self._unseal is None:
                    self._unseal = ShareCollector(config.threshold)
                elif nonce is not None and nonce != self._unseal.nonce:
                    raise NonceMismatchError("that share belongs to another unseal attempt; check the nonce")
                collector = self._unseal
                collector.add(raw)
                if collector.complete or self.sharing is None:
                    break
                try:
                    self.sharing.save_progress(collector.nonce, collector.shares(), stored_version)
                except ConflictError:
                    continue  # another worker took a share meanwhile: merge and try again
                return self._status_locked(config)
            if not collector.complete:
                return self._status_locked(config)
            self._unseal = None
            if self.sharing is not None:
                self.sharing.clear_progress()
            try:
                root = _combine(collector.shares())
            finally:
                collector.clear()
            self.open_with_root(root)
            return self._status_locked(config)

    def open_with_root(self, root: bytearray, *, publish: bool = True) -> None:
        """Open the barrier with a root key rebuilt from shares (`publish`: share it with
        the other workers of this server) or published by another worker; zeroizes it."""
        self._open_with(
            root,
            "the shares do not rebuild this cell's root key; unseal progress was reset",
            publish=publish,
        )

    def _load_shared_progress(self, config: SealConfig) -> int:
        """With sharing: make this process's collector the shared one; its ledger version."""
        if self.sharing is None:
            return 0
        nonce, shares, version = self.sharing.load_progress()
        if self._unseal is not None:
            self._unseal.clear()
            self._unseal = None
        if shares:
            self._unseal = ShareCollector(config.threshold)
            self._unseal.nonce = nonce
            for share in shares:
                self._unseal.add(share)
        return version

    def unseal_reset(self) -> SealStatus:
        config = self._require_config()
        with self._lock:
            if self._unseal is not None:
                self._unseal.clear()
                self._unseal = None
            if self.sharing is not None:
                self.sharing.clear_progress()
            return self._status_locked(config)

    def auto_unseal(self) -> SealStatus:
        """HSM mode: unwrap the root key inside the key backend and open the barrier."""
        config = self._require_config()
        if config.mode is not SealMode.HSM or self.key_backend is None or config.kek is None:
            raise SealModeError("auto-unseal needs a cell initialized in HSM mode with its key backend")
        wrapped = self.ledger.get(WRAPPED_ROOT_KEY, consistent=True)
        if wrapped is None:
            raise UnsealError("the wrapped root key is missing from the ledger")
        root = bytearray(self.key_backend.unwrap(config.kek, wrapped.value, _ROOT_KEY_AAD))
        with self._lock:
            self._open_with(root, "the HSM-unwrapped root key does not open the keyring")
            return self._status_locked(config)

    def seal(self) -> SealStatus:
        config = self._require_config()
        with self._lock:
            if self._unseal is not None:
                self._unseal.clear()
                self._unseal = None
            if self.sharing is not None:
                self.sharing.withdraw()
            self.barrier.close_barrier()
            return self._status_locked(config)

    # --- rekey ------------------------------------------------------------------------

    def rekey_start(self, shares: int, threshold: int) -> RekeyStatus:
        """Begin a rekey (Vault's sys/rekey/init): current shares then arrive one by
        one through `rekey_submit`, under the returned nonce."""
        config = self._require_config()
        self._check_split(shares, threshold)
        with self._lock:
            if self._rekey is not None:
                raise SealError("a rekey is already in progress; cancel it first")
            self._rekey = (ShareCollector(config.threshold), shares, threshold)
            return self._rekey_status_locked(config)

    def rekey_status(self) -> RekeyStatus:
        config = self._require_config()
        with self._lock:
            return self._rekey_status_locked(config)

    def rekey_cancel(self) -> None:
        with self._lock:
            if self._rekey is not None:
                self._rekey[0].clear()
            self._rekey = None

    def rekey_submit(self, share: str | bytes, nonce: str) -> RekeyStatus | InitResult:
        """One current share toward the rekey; at the threshold, the new shares."""
        config = self._require_config()
        raw = parse_share(share, share_length(config))
        with self._lock:
            if self._rekey is None:
                raise SealError("no rekey is in progress; start one first")
            collector, shares, threshold = self._rekey
            if nonce != collector.nonce:
                raise NonceMismatchError("that share belongs to another rekey attempt; check the nonce")
            collector.add(raw)
            if not collector.complete:
                return self._rekey_status_locked(config)
            current = collector.shares()
            collector.clear()
            self._rekey = None
        return self.rekey(current, shares, threshold)

    def _rekey_status_locked(self, config: SealConfig) -> RekeyStatus:
        if self._rekey is None:
            return RekeyStatus(False, "", config.threshold, 0, 0, 0)
        collector, shares, threshold = self._rekey
        return RekeyStatus(True, collector.nonce, config.threshold, collector.progress, shares, threshold)

    def rekey(self, current: Sequence[str | bytes], shares: int, threshold: int) -> InitResult:
        """New shares (and threshold) from a quorum of the current ones. Shamir mode:
        a new root key re-encrypts the keyring, data stays as it is. HSM mode: a new
        recovery key. Returns the new shares (the root token is empty)."""
        config = self._require_config()
        self._check_split(shares, threshold)
        collector = ShareCollector(config.threshold)
        for share in current:
            collector.add(parse_share(share, share_length(config)))
        if not collector.complete:
            raise UnsealError(
                f"rekey needs {config.threshold} distinct current shares, got {collector.progress}"
            )
        old = _combine(collector.shares())
        collector.clear()
        new_config = SealConfig(config.mode, shares, threshold, config.kek)
        fresh = bytearray(os.urandom(KEY_BYTES))
        try:
            stored_config = self.ledger.get(CONFIG_KEY, consistent=True)
            assert stored_config is not None
            ops = [Put(CONFIG_KEY, new_config.to_bytes(), stored_config.version)]
            if config.mode is SealMode.SHAMIR:
                stored = self.ledger.get(KEYRING_KEY, consistent=True)
                if stored is None:
                    raise NotInitializedError()
                keyring = self._decrypt_or(
                    old, stored.value, "the shares do not rebuild this cell's root key"
                )
                ops.append(Put(KEYRING_KEY, encrypt_keyring(fresh, keyring), stored.version))
                keyring.zeroize()
            else:
                check = self.ledger.get(RECOVERY_CHECK_KEY, consistent=True)
                if check is None or not _recovery_matches(old, check.value):
                    raise UnsealError("the shares do not rebuild this cell's recovery key")
                ops.append(Put(RECOVERY_CHECK_KEY, _recovery_check(fresh), check.version))
            handed_out = shamir.split(bytes(fresh), shares, threshold)
            try:
                self.ledger.transact(ops)
            except ConflictError:
                raise SealError("the seal changed during rekey (another rekey?); start again") from None
            if config.mode is SealMode.SHAMIR and not self.barrier.sealed:
                self.barrier.replace_root(fresh)
                if self.sharing is not None:
                    self.sharing.publish_root(fresh)  # the other workers' next opening needs it
        finally:
            zeroize(old)
            zeroize(fresh)
        return InitResult(config.mode, handed_out, threshold, "")

    # --- helpers --------------------------------------------------------------------------

    def _require_config(self) -> SealConfig:
        config = self.config()
        if config is None:
            raise NotInitializedError()
        return config

    def _status_locked(self, config: SealConfig) -> SealStatus:
        progress = self._unseal.progress if self._unseal else 0
        nonce = self._unseal.nonce if self._unseal else ""
        return SealStatus(
            True, self.barrier.sealed, config.mode, config.shares, config.threshold, progress, nonce
        )

    def _open_with(self, root: bytearray, failure: str, *, publish: bool = False) -> None:
        try:
            stored = self.ledger.get(KEYRING_KEY, consistent=True)
            if stored is None:
                raise NotInitializedError()
            keyring = self._decrypt_or(root, stored.value, failure)
            if publish and self.sharing is not None:
                self.sharing.publish_root(root)  # only a root that opened the keyring
            self.barrier.open(root, keyring)
        finally:
            zeroize(root)
        try:
            self.barrier.migrate()  # a cell made before version-bound blobs (see barrier); no-op after
        except LedgerError as exc:  # the cell is open and reads format 1; the next opening retries
            log.warning(
                "barrier migration did not finish (%s); it resumes at the next unseal", type(exc).__name__
            )

    @staticmethod
    def _decrypt_or(root: bytearray, blob: bytes, failure: str) -> Keyring:
        try:
            return decrypt_keyring(root, blob)
        except BarrierIntegrityError:
            raise UnsealError(failure) from None

    def _wrap_root(self, root: bytearray) -> bytes:
        assert self.key_backend is not None and self.kek is not None
        try:
            self.key_backend.describe(self.kek)
        except UnknownKeyError:
            self.key_backend.create_key(self.kek, KeySpec.AES_256)
        return self.key_backend.wrap(self.kek, bytes(root), _ROOT_KEY_AAD)

    @staticmethod
    def _check_split(shares: int, threshold: int) -> None:
        try:
            shamir.check_parameters(shares, threshold)
        except (shamir.ShamirError, TypeError) as exc:
            raise ShareError(
                f"cannot split into {shares!r} shares with threshold {threshold!r}: {exc}"
            ) from None


def _recovery_check(recovery_key: bytes | bytearray) -> bytes:
    """Proof of the recovery key that reveals nothing about it: an AEAD tag over a
    fixed label under that key."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(recovery_key)).encrypt(nonce, b"", _RECOVERY_AAD)


def _recovery_matches(candidate: bytes | bytearray, check: bytes) -> bool:
    try:
        AESGCM(bytes(candidate)).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _RECOVERY_AAD)
    except (InvalidTag, ValueError):
        return False
    return True

"""Unseal state shared by the worker processes of one self-hosted server.

A Shamir-sealed cell keeps its unseal progress and, once unsealed, its root key in
process memory. A server with several worker processes must share both, or a share
sent to one worker would not count in another, and sealing through one worker would
leave the others open. The server's parent process draws a *boot key* at start and
hands it to its workers (in their environment, never on disk); they keep the shared
state in the ledger encrypted under it (AES-256-GCM, the record's path as associated
data), beside the seal configuration:

    seal:shared/<boot id>/progress   the shares collected so far, and the nonce
    seal:shared/<boot id>/root       the root key, while the cell is unsealed

The boot key dies with the server, so what is left in the ledger after a restart
can never be decrypted; the next server deletes it at start.
"""

from __future__ import annotations

import contextlib
import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix

_NONCE = 12


class SharedUnseal:
    def __init__(self, ledger: Ledger, boot_key: bytes, boot_id: str) -> None:
        if len(boot_key) != 32:
            raise ValueError("a boot key is 32 bytes")
        self.ledger = ledger
        self._aead = AESGCM(boot_key)
        self.progress_key = Key(Kind.SEAL, f"shared/{boot_id}/progress")
        self.root_key = Key(Kind.SEAL, f"shared/{boot_id}/root")
        self.boot_id = boot_id

    @staticmethod
    def new_boot() -> tuple[bytes, str]:
        return os.urandom(32), os.urandom(8).hex()

    def forget_other_boots(self) -> None:
        """Delete what earlier servers left (undecryptable without their boot keys)."""
        for item in list(iter_prefix(self.ledger, Kind.SEAL, "shared/")):
            if not item.key.path.startswith(f"shared/{self.boot_id}/"):
                with contextlib.suppress(ConflictError):  # someone else deleted it
                    self.ledger.delete_if(item.key, item.version)

    # --- sealed records -------------------------------------------------------------------

    def _seal(self, key: Key, plain: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, str(key).encode())

    def _open(self, key: Key, blob: bytes) -> bytes | None:
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], str(key).encode())
        except (InvalidTag, ValueError):
            return None  # another boot's record

    # --- progress --------------------------------------------------------------------------

    def load_progress(self) -> tuple[str, list[bytes], int]:
        """(nonce, shares, ledger version); ("", [], version) when there is none."""
        item = self.ledger.get(self.progress_key, consistent=True)
        if item is None:
            return "", [], 0
        plain = self._open(self.progress_key, item.value)
        if plain is None:
            return "", [], item.version
        record = json.loads(plain)
        return str(record["nonce"]), [bytes.fromhex(s) for s in record["shares"]], item.version

    def save_progress(self, nonce: str, shares: list[bytes], expected_version: int) -> None:
        """Raises ConflictError if another worker changed the progress meanwhile."""
        plain = json.dumps({"nonce": nonce, "shares": [s.hex() for s in shares]}).encode()
        self.ledger.put_if(self.progress_key, self._seal(self.progress_key, plain), expected_version)

    def clear_progress(self) -> None:
        item = self.ledger.get(self.progress_key, consistent=True)
        if item is not None:
            with contextlib.suppress(ConflictError):  # another worker changed it: it is theirs now
                self.ledger.delete_if(self.progress_key, item.version)

    # --- the unsealed state ------------------------------------------------------------------

    def publish_root(self, root: bytes | bytearray) -> None:
        item = self.ledger.get(self.root_key, consistent=True)
        self.ledger.put_if(
            self.root_key, self._seal(self.root_key, bytes(root)), 0 if item is None else item.version
        )

    def load_root(self) -> bytearray | None:
        item = self.ledger.get(self.root_key, consistent=True)
        if item is None:
            return None
        plain = self._open(self.root_key, item.value)
        return None if plain is None else bytearray(plain)

    def root_published(self) -> bool:
        return self.ledger.get(self.root_key, consistent=True) is not None

    def withdraw(self) -> None:
        """Sealed: no worker may open the barrier from the shared state any more."""
        item = self.ledger.get(self.root_key, consistent=True)
        if item is not None:
            try:
                self.ledger.delete_if(self.root_key, item.version)
            except ConflictError:
                self.withdraw()
        self.clear_progress()

"""One cell's services, assembled: the storage stack, the seal, and every engine.

`functions/` builds a `CellServices` from configuration (which ledger, which key
backend) and hands it to the `Router`. Nothing here imports an adapter: the ledger
and the key backend arrive ready-made.

The key backend has two jobs. In HSM seal mode it holds the key that wraps the
root key (auto-unseal). In every mode it holds the key-encryption key (`kek`) that
wraps each secret's data key. A cell without an HSM passes a factory instead of a
backend, called with the barrier, so the KEK lives inside the cell's own sealed
storage (the software backend, development only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from keycell.control_plane import directory
from keycell.control_plane.auth.jwt.backend import JwtAuth
from keycell.control_plane.auth.token.store import TokenEntry, TokenStore
from keycell.control_plane.barrier import Barrier
from keycell.control_plane.engines.database.backend import DatabaseEngine
from keycell.control_plane.engines.kv.backend import KvV2
from keycell.control_plane.engines.transit.backend import Transit
from keycell.control_plane.envelope import DataKeyCache, Envelopes
from keycell.control_plane.freshness import Freshness, FreshnessView
from keycell.control_plane.identity import Identity
from keycell.control_plane.keys import KeyBackend, KeySpec, UnknownKeyError
from keycell.control_plane.leases import Leases
from keycell.control_plane.ledger import Ledger
from keycell.control_plane.policy import PolicyStore
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.rotation import LedgerVersionStore, Rotator
from keycell.control_plane.seal import Seal, UnsealError
from keycell.control_plane.svid import IdentityCA
from keycell.control_plane.unseal_sharing import SharedUnseal
from keycell.control_plane.wrapping import Wrapping, parse_duration

VERSION = "0.1.0"


@dataclass(frozen=True)
class CellConfig:
    cell_id: str = "local"
    kek: str = "cell-kek"
    hsm_seal: bool = False  # auto-unseal through the key backend; shares become recovery shares
    cluster_name: str = "keycell"
    trust_domain: str = "example.org"  # the SPIFFE trust domain (one per deployment)


class CellServices:
    def __init__(
        self,
        ledger: Ledger,
        key_backend: KeyBackend | Callable[[Barrier], KeyBackend],
        config: CellConfig = CellConfig(),
        *,
        clock: Callable[[], float] = time.time,
        boot: tuple[bytes, str] | None = None,
    ) -> None:
        """`boot` (a boot key and id from the server's parent process) makes the worker
        processes of one self-hosted server share unseal state (unseal_sharing)."""
        self.config = config
        self.clock = clock
        self.ledger = ledger
        self.barrier = Barrier(ledger)
        self.key_backend = key_backend if not callable(key_backend) else key_backend(self.barrier)
        if config.hsm_seal:
            self.seal = Seal(ledger, self.barrier, key_backend=self.key_backend, kek=f"{config.kek}-seal")
        else:
            sharing = SharedUnseal(ledger, *boot) if boot is not None else None
            self.seal = Seal(ledger, self.barrier, sharing=sharing)
        self.started = clock()
        self.revocations = RevocationSet(self.barrier, config.cell_id, clock=clock)
        # Per-peer revocation watermarks (issue 18); the peers are the cell directory's.
        self.freshness = FreshnessView(Freshness(self.barrier, config.cell_id, clock), self.peer_cells)
        self.tokens = TokenStore(self.barrier, self.revocations, clock=clock)
        self.policies = PolicyStore(self.barrier)
        self.jwt = JwtAuth(self.barrier, self.tokens, clock=clock)
        self.data_keys = DataKeyCache()
        self.barrier.on_seal(self.data_keys.clear)
        self.envelopes = Envelopes(config.cell_id, self.key_backend, config.kek, self.data_keys)
        self.kv = KvV2(self.barrier, self.envelopes, clock=clock)
        self.transit = Transit(self.barrier, self.key_backend, clock=clock)
        self.leases = Leases(self.barrier, self.revocations, clock=clock)
        self.leases.register_revoker(
            "token", lambda lease: self.tokens.revoke_accessor(lease.revoker_data["accessor"])
        )
        self.wrapping = Wrapping(self.barrier, clock=clock)
        self.identity = Identity(
            self.barrier,
            IdentityCA(
                self.barrier,
                self.key_backend,
                cell_id=config.cell_id,
                trust_domain=config.trust_domain,
                clock=clock,
            ),
            self.revocations,
            clock=clock,
            tokens=self.tokens,
        )
        self.jwt.spiffe = self.identity  # auth/jwt/login accepts the trust domain's JWT-SVIDs
        # Rotation and dynamic database credentials: targets and database plugins are
        # adapters, registered by functions/ (wiring) on `rotator.targets` / `database`.
        self.database = DatabaseEngine(self.barrier, self.leases, clock=clock)
        self.rotation_store = LedgerVersionStore(self.barrier, self.envelopes, clock=clock)
        self.rotator = Rotator(self.rotation_store, {})

    def register_token_lease(self, path: str, token: str, entry: TokenEntry) -> str:
        """Tokens issued by an auth endpoint are leases under its path, as in Vault, so
        `sys/leases/revoke-prefix/auth/jwt` revokes every token that method issued (the
        breach runbook's first step). The lease lasts as long as the token could live
        (its max TTL), so tidying expired leases never cuts a renewed token short;
        renewing the lease renews the token. A token that never expires (root) has no
        lease."""
        if entry.expire_time is None:
            return ""
        longest = entry.explicit_max_ttl or entry.max_ttl or self.tokens.max_ttl
        lease = self.leases.register(
            path,
            ttl=max(1, int(longest)),
            max_ttl=max(1, int(longest)),
            renewable=entry.renewable,
            revoker="token",
            revoker_data={"accessor": entry.accessor},
        )
        return str(lease.lease_id)

    def peer_cells(self) -> list[str]:
        """The other live cells of the directory."""
        entries = directory.load(self.barrier)
        return sorted(c for c, e in entries.items() if not e.removed and c != self.config.cell_id)

    def wrapping_ttl(self, header: str) -> int:
        return parse_duration(header)

    def after_unseal(self) -> None:
        """Once the barrier is open: make sure the cell's KEK exists."""
        try:
            self.key_backend.describe(self.config.kek)
        except UnknownKeyError:
            self.key_backend.create_key(self.config.kek, KeySpec.AES_256)

    def ensure_unsealed(self) -> None:
        """Follow the cell's seal state from this process: in HSM mode a process that
        finds the cell sealed opens it itself; with shared unseal state, a worker opens
        when another worker unsealed, and closes when another sealed."""
        sharing = self.seal.sharing
        if sharing is not None:
            if self.barrier.sealed:
                root = sharing.load_root()
                if root is not None:
                    try:
                        self.seal.open_with_root(root, publish=False)
                        self.after_unseal()
                    except UnsealError:
                        pass  # a stale root from before a rekey: stay sealed, as the record says nothing valid
            elif not sharing.root_published():
                self.barrier.close_barrier()
            return
        if self.barrier.sealed and self.config.hsm_seal:
            status = self.seal.status()
            if status.initialized:
                self.seal.auto_unseal()
                self.after_unseal()

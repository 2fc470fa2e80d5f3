"""What a relay does to its cell: apply heard revocations to the cell's ledger
(idempotent conditional puts through the barrier, control_plane.revocations
RevocationLog) and keep foreign cells' receipts.

Ledger calls block, so each sink runs them off the event loop, on one thread for
applies and one for other cells' receipts (so a receipt never delays an apply);
relays of one cell sharing a process share the sink and its memory of what is done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from keycell.control_plane.audit import Auditor, AuditUnavailable
from keycell.control_plane.ledger import Kind, iter_prefix
from keycell.control_plane.revocations import Receipt, RevocationLog, RevocationRecord
from keycell.control_plane.services import CellServices

log = logging.getLogger("keycell.relay")


class CellSink(Protocol):
    cell: str
    executor: ThreadPoolExecutor  # applies: on the exposure window's path
    background: ThreadPoolExecutor  # other cells' receipts: never queued ahead of an apply

    def apply(self, rec: RevocationRecord) -> float: ...

    def known(self, revocation_id: str) -> float | None: ...

    def store_receipt(self, receipt: Receipt, rec: RevocationRecord | None) -> None: ...

    def held(self) -> Iterator[tuple[RevocationRecord | None, Receipt]]: ...

    def held_since(self, since: float) -> Iterator[tuple[RevocationRecord | None, Receipt]]: ...

    def forget(self, revocation_id: str) -> None: ...


class LedgerSink:
    """A cell's ledger as the relay sees it. Opening the barrier follows the cell's
    seal: an HSM-sealed cell opens itself (`ensure_unsealed`); a cell still sealed
    raises, and the relay keeps the revocation in memory and retries."""

    def __init__(self, services: CellServices, auditor: Auditor | None = None) -> None:
        """`auditor`: the cell's audit trail; each revocation this relay applies to
        the ledger becomes an `event` entry (subject HMAC'd) in the relay's chain."""
        self.services = services
        self.auditor = auditor
        self.cell = services.config.cell_id
        self.log = RevocationLog(services.revocations)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"relay-ledger-{self.cell}")
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"relay-receipts-{self.cell}")
        self._applied: dict[str, float] = {}  # revocation id -> when this cell's ledger held it
        self._receipts: dict[str, set[str]] = {}  # revocation id -> cells whose receipts are kept

    def _open(self) -> None:
        if self.services.barrier.sealed:
            self.services.ensure_unsealed()
        if self.services.barrier.sealed:
            raise RuntimeError(
                f"cell {self.cell} is sealed; the relay applies revocations once it is unsealed"
            )

    def apply(self, rec: RevocationRecord) -> float:
        # Relays of this cell in this process share the sink: the first one writes,
        # the others find it here without touching the ledger.
        held = self._applied.get(rec.id)
        if held is not None:
            return held
        self._open()
        at = self.log.apply(rec)
        self._applied[rec.id] = at
        if self.auditor is not None:
            # On the background thread: the trail's commit (an fsync'd head write) never
            # delays the next apply, which is on the exposure window's path.
            self.background.submit(self._audit, rec, at)
        return at

    def _audit(self, rec: RevocationRecord, at: float) -> None:
        """After the ledger took it: a revocation is never held back for the trail.
        An entry no sink took is logged; the chain shows it as a gap."""
        try:
            self.auditor.record(  # type: ignore[union-attr]
                {
                    "kind": "revocation-applied",
                    "revocation_id": rec.id,
                    "origin_cell": rec.origin_cell,
                    "revoked_at": rec.revoked_at,
                    "applied_at": at,
                    "reason": rec.reason,
                    "sensitive": {"subject": rec.subject},
                }
            )
        except AuditUnavailable:
            log.warning("audit: revocation %s applied but not recorded (no audit sink took it)", rec.id)

    def known(self, revocation_id: str) -> float | None:
        """When this cell's ledger took it, if a relay of this process saw that (no I/O)."""
        return self._applied.get(revocation_id)

    def store_receipt(self, receipt: Receipt, rec: RevocationRecord | None) -> None:
        if receipt.cell in self._receipts.get(receipt.id, ()):
            return
        self._open()
        self.log.store_receipt(receipt, rec)  # a conditional put: one already kept stays
        self._receipts.setdefault(receipt.id, set()).add(receipt.cell)

    def forget(self, revocation_id: str) -> None:
        """A relay dropped this expired revocation: so goes the memory of what was
        written (the ledger keeps its items until their own TTL)."""
        self._applied.pop(revocation_id, None)
        self._receipts.pop(revocation_id, None)

    def held(self) -> Iterator[tuple[RevocationRecord | None, Receipt]]:
        self._open()
        return self.log.held()

    def held_since(self, since: float) -> Iterator[tuple[RevocationRecord | None, Receipt]]:
        """Receipts of revocations minted since `since` (a few id buckets, not a full scan)."""
        self._open()
        return self.log.held_since(since)

    def subjects(self) -> set[str]:
        """Every subject the cell's revocation set holds (a full scan: tests and benches)."""
        self._open()
        return {i.key.path for i in iter_prefix(self.services.barrier, Kind.REVOCATION, page_size=500)}

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.background.shutdown(wait=True)
        self.services.ledger.close()

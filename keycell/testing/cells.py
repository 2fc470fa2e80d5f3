"""A cell's storage stack assembled for tests, benchmarks and the demo: a ledger,
the barrier over it, and a seal initialized and unsealed (Shamir, 3 shares, 2 to
unseal)."""

from __future__ import annotations

from dataclasses import dataclass

from keycell.control_plane.barrier import Barrier
from keycell.control_plane.ledger import Ledger
from keycell.control_plane.seal import InitResult, Seal


@dataclass
class Cell:
    ledger: Ledger
    barrier: Barrier
    seal: Seal
    init: InitResult


def open_cell(ledger: Ledger) -> Cell:
    barrier = Barrier(ledger)
    seal = Seal(ledger, barrier)
    init = seal.init(3, 2)
    seal.unseal(init.shares[0])
    seal.unseal(init.shares[1])
    return Cell(ledger, barrier, seal, init)

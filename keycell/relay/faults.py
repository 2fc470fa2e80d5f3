"""Fault injection for tests and benchmarks: message loss, delay with jitter, and
partitions between named groups. Relays consult it on every send, so a fault hits
real gRPC traffic at its source; killing and restarting relays is the harness's
job (Relay.stop / a fresh Relay on the same address)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Faults:
    loss: float = 0.0  # probability that one envelope is dropped
    delay: float = 0.0  # seconds added to every envelope
    jitter: float = 0.0  # plus uniform [0, jitter) seconds
    groups: dict[str, str] = field(default_factory=dict)  # relay address -> group name
    cut: set[frozenset[str]] = field(default_factory=set)  # pairs of groups that cannot talk
    rng: random.Random = field(default_factory=random.Random)

    def partition(self, a: str, b: str) -> None:
        self.cut.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cut.clear()

    def blocked(self, src: str, dst: str) -> bool:
        if not self.cut:
            return False
        a, b = self.groups.get(src), self.groups.get(dst)
        return a is not None and b is not None and a != b and frozenset((a, b)) in self.cut

    def drop(self, src: str, dst: str) -> bool:
        return self.blocked(src, dst) or (self.loss > 0 and self.rng.random() < self.loss)

    def latency(self) -> float:
        if self.jitter <= 0:
            return self.delay
        return self.delay + self.rng.random() * self.jitter

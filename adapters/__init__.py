"""Implementations of the core's protocols: ledgers, key backends, event sources, targets."""

"""The domain core: pure Python, no cloud SDK imports.

Layers, top to bottom: router and policies, engines, leases / revocations /
rotation / audit, barrier, and the protocols the adapters implement (`ledger`).
"""

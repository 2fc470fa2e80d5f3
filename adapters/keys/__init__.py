"""Key backends: one module per provider, each a `KeyBackend` (keycell.control_plane.keys)."""

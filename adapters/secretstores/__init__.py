"""Version stores in cloud secret managers (the core's `VersionStore`, control_plane/rotation.py)."""

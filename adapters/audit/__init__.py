"""Audit sinks that need a cloud SDK (the file and stdout sinks live in keycell.control_plane.audit)."""

"""Keycell: a multi-cloud secrets and key lifecycle platform built from regional cells.

The importable package. `keycell.control_plane` (the domain core, folder
`control_plane/`) and `keycell.adapters` (ledgers, key backends, event sources,
credential targets; folder `adapters/`) are mapped into it by `pyproject.toml`;
the two links in this folder make the same layout visible to tools that read the
tree directly (mypy, a plain `python -c` in the repository root).
"""

__version__ = "0.1.0"

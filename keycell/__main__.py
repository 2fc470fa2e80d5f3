"""`python -m keycell` is the `keycell` command."""

from keycell.cli import app

app()

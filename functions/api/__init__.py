"""The regional API: Vault's HTTP API as one Chalice app."""

"""KV version 2: versioned secrets (`backend`), Vault's KV v2 paths (`routes`), and the named changes a cell forwards to a secret's home (`changes`)."""

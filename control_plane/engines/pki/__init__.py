"""PKI: Vault's certificate authority engine with every CA key held by the key backend (`backend`), and Vault's PKI paths (`routes`)."""

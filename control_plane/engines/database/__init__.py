"""Dynamic database credentials with leases (`backend`), and Vault's database paths (`routes`)."""

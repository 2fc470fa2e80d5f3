"""Transit: encryption as a service with keys held by the key backend (`backend`), and Vault's transit paths (`routes`)."""

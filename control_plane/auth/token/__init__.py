"""The token store (`store`: tokens, accessors, parents, TTLs and revocation) and Vault's auth/token paths (`routes`)."""

"""JWT auth (`backend`: JWT and JWT-SVID logins checked against a role's bounds) and Vault's auth/jwt paths (`routes`)."""

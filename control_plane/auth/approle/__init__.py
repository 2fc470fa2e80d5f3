"""AppRole (`backend`: roles, role IDs, secret IDs counted by conditional writes, login) and Vault's auth/approle paths (`routes`)."""

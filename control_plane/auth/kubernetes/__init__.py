"""Kubernetes auth (`backend`: service account tokens checked by the cluster's
TokenReview against a role's bound names and namespaces) and Vault's auth/kubernetes
paths (`routes`)."""

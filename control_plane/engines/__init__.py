"""Secrets engines, one package each: its logic (`backend`), its HTTP routes and their
OpenAPI documents (`routes`). Tests mirror them under tests/engines/."""

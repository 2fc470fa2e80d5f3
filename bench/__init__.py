"""Keycell's benchmarks: `make bench` runs every one and prints their JSON."""

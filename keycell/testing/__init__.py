"""Real local stand-ins for the services Keycell talks to, shared by the tests, the
benchmarks and the demo: a moto server over HTTP, SoftHSM2 tokens, PostgreSQL, and a
linearizability checker for the histories concurrency tests record.

Nothing here is a mock: each helper starts the real component on 127.0.0.1 and
stops it again.
"""

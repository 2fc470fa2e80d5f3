"""Credential targets: systems whose credentials Keycell rotates (the core's
`CredentialTarget` protocol, control_plane/rotation.py). One conformance suite,
tests/rotation/test_target_conformance.py, runs against each."""

"""Wiring of the cloudhsm backend for the key-custody suites: SoftHSM2 stands in for
the CloudHSM client library (the pkcs11 wiring's session token), and the moto server
(`aws_endpoint`) for the cloudhsmv2 API, where a cluster is created once per session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from keys_backend_pkcs11 import session_token

from keycell.adapters.keys.cloudhsm import CloudHsmKeyBackend
from keycell.testing.key_backends import cloudhsm_backend, create_cloudhsm_cluster

_clusters: dict[str, str] = {}  # endpoint -> cluster id


def session_cluster(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(endpoint, cluster id) of the session's cluster, created through boto3."""
    endpoint: str = request.getfixturevalue("aws_endpoint")
    if endpoint not in _clusters:
        _clusters[endpoint] = create_cloudhsm_cluster(endpoint)
        request.config.add_cleanup(_clusters.clear)
    return endpoint, _clusters[endpoint]


@contextmanager
def open_backend(
    request: pytest.FixtureRequest, *, fips_mode: bool, cluster_id: str | None = None
) -> Iterator[CloudHsmKeyBackend]:
    endpoint, session_cluster_id = session_cluster(request)
    token = session_token(request)
    backend = cloudhsm_backend(token, endpoint, cluster_id or session_cluster_id, fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

"""Every key backend, built against its real local stand-in: the one place that
knows how (tests, benchmarks and the demo all come here).

- pkcs11:    a SoftHSM2 token
- cloudhsm:  the same kind of token for the client library, a moto server for cloudhsmv2
- aws_kms:   a moto server over HTTP
- azure_mhsm: the Managed HSM wire-API server over HTTPS, with the real SDK
- gcp_kms:   the Cloud KMS gRPC server, with the real client
- software:  in process (development only)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import boto3
import grpc
from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport

from keycell.adapters.keys.aws_kms import AwsKmsKeyBackend
from keycell.adapters.keys.azure_mhsm import AzureManagedHsmKeyBackend
from keycell.adapters.keys.cloudhsm import CloudHsmKeyBackend
from keycell.adapters.keys.gcp_kms import GcpKmsKeyBackend
from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.keys import KeyBackend
from keycell.testing.azure_mhsm_server import AzureManagedHsmServer, StubTokenCredential
from keycell.testing.gcp_kms_server import GcpKmsServer
from keycell.testing.moto_server import FAKE_AWS_ENV, MotoServer
from keycell.testing.softhsm import SoftHsmToken, softhsm_token

BACKENDS = ("software", "pkcs11", "cloudhsm", "aws_kms", "azure_mhsm", "gcp_kms")
AWS_REGION = "us-east-1"
GCP_PROJECT = "keycell-test"
GCP_LOCATION = "us-east1"


def pkcs11_backend(token: SoftHsmToken, *, fips_mode: bool = False) -> Pkcs11KeyBackend:
    return Pkcs11KeyBackend(token.module, token.label, token.pin, fips_mode=fips_mode)


def create_cloudhsm_cluster(endpoint: str) -> str:
    client = boto3.client("cloudhsmv2", endpoint_url=endpoint, region_name=AWS_REGION)
    created = client.create_cluster(HsmType="hsm2m.medium", SubnetIds=["subnet-0a1b2c3d"])
    return str(created["Cluster"]["ClusterId"])


def cloudhsm_backend(
    token: SoftHsmToken, endpoint: str, cluster_id: str, *, fips_mode: bool = False
) -> CloudHsmKeyBackend:
    return CloudHsmKeyBackend(
        cluster_id,
        token.pin,
        module=token.module,
        token_label=token.label,
        endpoint_url=endpoint,
        fips_mode=fips_mode,
        # SoftHSM2 takes the GCM IV from the caller; CloudHSM makes its own.
        hsm_generated_iv=False,
    )


def aws_kms_backend(endpoint: str, *, fips_mode: bool = False) -> AwsKmsKeyBackend:
    return AwsKmsKeyBackend(region=AWS_REGION, endpoint_url=endpoint, fips_mode=fips_mode)


def azure_backend(server: AzureManagedHsmServer, *, fips_mode: bool = False) -> AzureManagedHsmKeyBackend:
    return AzureManagedHsmKeyBackend(
        server.vault_url,
        StubTokenCredential(server.token),
        connection_verify=server.ca_path,
        # 127.0.0.1 is not under managedhsm.azure.net, the resource the challenge names.
        verify_challenge_resource=False,
        fips_mode=fips_mode,
    )


def gcp_backend(endpoint: str, *, fips_mode: bool = False, key_ring: str | None = None) -> GcpKmsKeyBackend:
    transport = KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
    return GcpKmsKeyBackend(
        project=GCP_PROJECT,
        location=GCP_LOCATION,
        # A ring per backend instance keeps users apart, and exercises creating the ring.
        key_ring=key_ring or f"ring-{uuid.uuid4().hex[:12]}",
        transport=transport,
        fips_mode=fips_mode,
    )


@contextmanager
def every_backend(
    names: tuple[str, ...] = BACKENDS, *, token: SoftHsmToken | None = None
) -> Iterator[dict[str, KeyBackend]]:
    """Start the stand-ins `names` need and yield one backend per name. `token`: a
    SoftHSM2 token this process already uses (a test session's). SoftHSM2 reads its
    configuration once per process: a second token made here would be invisible to a
    process that already opened one, and removing it afterwards breaks the module for
    whatever opens a token next."""
    for k, v in FAKE_AWS_ENV.items():
        os.environ.setdefault(k, v)
    with ExitStack() as stack:
        backends: dict[str, KeyBackend] = {}
        if token is None and {"pkcs11", "cloudhsm"} & set(names):
            token = stack.enter_context(softhsm_token(label="stand-ins"))
        moto = stack.enter_context(MotoServer()) if {"aws_kms", "cloudhsm"} & set(names) else None
        for name in names:
            if name == "software":
                backends[name] = SoftwareKeyBackend()
            elif name == "pkcs11" and token is not None:
                backends[name] = pkcs11_backend(token)
            elif name == "cloudhsm" and token is not None and moto is not None:
                cluster = create_cloudhsm_cluster(moto.endpoint_url)
                backends[name] = cloudhsm_backend(token, moto.endpoint_url, cluster)
            elif name == "aws_kms" and moto is not None:
                backends[name] = aws_kms_backend(moto.endpoint_url)
            elif name == "azure_mhsm":
                backends[name] = azure_backend(stack.enter_context(AzureManagedHsmServer()))
            elif name == "gcp_kms":
                backends[name] = gcp_backend(stack.enter_context(GcpKmsServer()).endpoint)
            else:
                raise ValueError(f"unknown key backend {name!r}; choose from {', '.join(BACKENDS)}")
            stack.callback(backends[name].close)
        yield backends

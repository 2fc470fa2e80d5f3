"""The AWS CloudHSM key backend: the pkcs11 backend on CloudHSM's PKCS#11 library,
plus the cluster as the AWS API (cloudhsmv2) describes it.

A CloudHSM cluster is reached through the Client SDK's PKCS#11 module
(/opt/cloudhsm/lib/libcloudhsm_pkcs11.so by default) logged in as a crypto user
(PIN "<user>:<password>"). Every key operation is the pkcs11 backend's (this class
subclasses it and adds no cryptography): keys generated in the HSM, non-extractable,
AES-256-GCM wrap, ECDSA P-256 and RSA-3072 PKCS#1 v1.5 over SHA-256 digests, state in
a CKO_DATA record per key, disabling enforced in the HSM. One difference is switched
on here: CloudHSM does not accept an AES-GCM IV from the application; it generates
the 12-byte IV and writes it into the GCM parameters, which the pkcs11 backend reads
back (`hsm_generated_iv=True`, and a zero IV is refused rather than used).

What the AWS API adds is the cluster: `describe_cluster()` finds it by id through
boto3 `cloudhsmv2.describe_clusters` and reports its state, HSM type, mode and HSM
count. `health()` is ok only when the cluster is ACTIVE, in FIPS mode its mode is
not NON_FIPS, and the token answers (present, logged in). Every other state -
CREATE_IN_PROGRESS, UNINITIALIZED, INITIALIZE_IN_PROGRESS, INITIALIZED (created but
not yet activated), UPDATE_IN_PROGRESS, MODIFY_IN_PROGRESS, ROLLBACK_IN_PROGRESS,
DEGRADED, DELETE_IN_PROGRESS, DELETED - reports unhealthy with the state named.
moto creates clusters directly in ACTIVE with no HSMs (it cannot create HSMs), so
the HSM count is reported but not required: on AWS an ACTIVE cluster without HSMs
cannot answer the token, which the token check catches.

FIPS: CloudHSM is FIPS 140-2 Level 3 validated (hsm1.medium); hsm2m.medium in FIPS
mode is FIPS 140-3 Level 3. Keys describe `fips_level=3`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
from keycell.control_plane.keys import BackendUnavailableError, Health, KeyInputError

if TYPE_CHECKING:
    from mypy_boto3_cloudhsmv2 import CloudHSMV2Client

PROVIDER = "cloudhsm"
DEFAULT_MODULE = "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"
FIPS_LEVEL = 3
HEALTHY_STATES = frozenset({"ACTIVE"})
_AWS_CONFIG = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    cluster_id: str
    state: str
    state_message: str
    hsm_type: str
    mode: str  # "FIPS" or "NON_FIPS" on AWS; moto says "DEFAULT"
    hsm_count: int


class CloudHsmKeyBackend(Pkcs11KeyBackend):
    """A `KeyBackend` on an AWS CloudHSM cluster. Thread-safe; close() when done."""

    provider = PROVIDER

    def __init__(
        self,
        cluster_id: str,
        pin: str,
        *,
        module: str = DEFAULT_MODULE,
        token_label: str | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        fips_mode: bool = False,
        hsm_generated_iv: bool = True,
        **options: Any,
    ) -> None:
        """`pin` is the crypto user's "<user>:<password>". `token_label` None takes the
        module's one token, as the CloudHSM client presents it. `endpoint_url` and
        `region_name` reach the cloudhsmv2 API (both default to boto3's configuration,
        AWS_ENDPOINT_URL included). `hsm_generated_iv=False` only for a stand-in module
        that takes the IV from the caller, such as SoftHSM2 in tests."""
        if not isinstance(cluster_id, str) or not cluster_id.strip():
            raise KeyInputError("a CloudHSM cluster id is required (cluster-...)")
        self.cluster_id = cluster_id
        self._cloudhsm: CloudHSMV2Client = boto3.client(
            "cloudhsmv2", region_name=region_name, endpoint_url=endpoint_url, config=_AWS_CONFIG
        )
        super().__init__(
            module,
            token_label,
            pin,
            fips_level=FIPS_LEVEL,
            fips_mode=fips_mode,
            hsm_generated_iv=hsm_generated_iv,
            **options,
        )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, fips_mode: bool = False, **options: Any
    ) -> CloudHsmKeyBackend:
        """Configured by KEYCELL_CLOUDHSM_CLUSTER_ID and KEYCELL_CLOUDHSM_PIN, optionally
        KEYCELL_CLOUDHSM_MODULE and KEYCELL_CLOUDHSM_TOKEN, read from `env` (default: the
        process environment); the region from AWS_REGION / AWS_DEFAULT_REGION there, other
        AWS settings as boto3 reads them."""
        env = os.environ if env is None else env
        missing = [v for v in ("KEYCELL_CLOUDHSM_CLUSTER_ID", "KEYCELL_CLOUDHSM_PIN") if not env.get(v)]
        if missing:
            raise KeyInputError("set " + ", ".join(missing) + " to use the cloudhsm key backend")
        options.setdefault("region_name", env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)
        return cls(
            env["KEYCELL_CLOUDHSM_CLUSTER_ID"],
            env["KEYCELL_CLOUDHSM_PIN"],
            module=env.get("KEYCELL_CLOUDHSM_MODULE") or DEFAULT_MODULE,
            token_label=env.get("KEYCELL_CLOUDHSM_TOKEN") or None,
            fips_mode=fips_mode,
            **options,
        )

    def describe_cluster(self) -> ClusterStatus:
        """The cluster as cloudhsmv2 describes it; BackendUnavailableError if unknown or
        unreachable."""
        region = self._cloudhsm.meta.region_name
        try:
            clusters = self._cloudhsm.describe_clusters(Filters={"clusterIds": [self.cluster_id]})["Clusters"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise BackendUnavailableError(
                f"cloudhsmv2 DescribeClusters failed ({code}) in {region}; check the credentials' "
                "cloudhsm:DescribeClusters permission and the region"
            ) from None
        except BotoCoreError as exc:
            raise BackendUnavailableError(
                f"cannot reach the cloudhsmv2 API in {region} ({type(exc).__name__}); check the network "
                "and endpoint, then retry"
            ) from None
        cluster = next((c for c in clusters if c.get("ClusterId") == self.cluster_id), None)
        if cluster is None:
            raise BackendUnavailableError(
                f"no CloudHSM cluster {self.cluster_id!r} in {region}; check KEYCELL_CLOUDHSM_CLUSTER_ID "
                "and the region"
            )
        return ClusterStatus(
            cluster_id=self.cluster_id,
            state=str(cluster.get("State", "UNKNOWN")),
            state_message=str(cluster.get("StateMessage", "")),
            hsm_type=str(cluster.get("HsmType", "unknown")),
            mode=str(cluster.get("Mode", "unknown")),
            hsm_count=len(cluster.get("Hsms", [])),
        )

    def health(self) -> Health:
        try:
            cluster = self.describe_cluster()
        except BackendUnavailableError as exc:
            return Health(False, self.provider, str(exc))
        summary = f"cluster {cluster.cluster_id} ({cluster.hsm_type}, mode {cluster.mode}) is {cluster.state}"
        summary += f" with {cluster.hsm_count} HSM{'' if cluster.hsm_count == 1 else 's'}"
        if cluster.state not in HEALTHY_STATES:
            reason = f": {cluster.state_message}" if cluster.state_message else ""
            return Health(False, self.provider, f"{summary}{reason}; keys are usable only when it is ACTIVE")
        if self.fips_mode and cluster.mode == "NON_FIPS":
            return Health(False, self.provider, f"{summary}; FIPS mode needs a cluster in FIPS mode")
        token = super().health()
        return Health(token.ok, self.provider, f"{summary}; {token.detail}")

"""Configuration to a running cell: the one place adapters meet the core.

Environment (all optional):
  KEYCELL_LEDGER        ledger URL (sqlite:///PATH.db, dynamodb://TABLE?region=...); default: the user's data folder
  KEYCELL_CELL          this cell's id (default "local")
  KEYCELL_TRUST_DOMAIN  the SPIFFE trust domain (default "example.org")
  KEYCELL_AWS_IID_TAGS  ec2: AWS instance identity attestation adds aws_iid:tag: selectors read from EC2
  KEYCELL_KEY_BACKEND   where keys live (default software):
                        software
                        pkcs11      KEYCELL_PKCS11_MODULE, _TOKEN, _PIN (optional _FIPS_LEVEL)
                        aws-kms     AWS_REGION; credentials and AWS_ENDPOINT_URL as boto3 reads them
                        cloudhsm    KEYCELL_CLOUDHSM_CLUSTER_ID, _PIN ("user:password"), optional
                                    _MODULE (default the CloudHSM client's) and _TOKEN; AWS_REGION
                        azure-mhsm  KEYCELL_AZURE_MHSM_URL (https://NAME.managedhsm.azure.net);
                                    the identity is azure-identity's DefaultAzureCredential (the
                                    managed identity on App Service / Container Apps: it reads
                                    IDENTITY_ENDPOINT, AZURE_CLIENT_ID... from the process
                                    environment); optional KEYCELL_AZURE_MHSM_CA (a PEM CA bundle
                                    for a private endpoint) and KEYCELL_AZURE_MHSM_VERIFY_CHALLENGE=0
                                    (only for a host outside the HSM's domain, such as an emulator)
                        gcp-kms     KEYCELL_GCP_KMS_KEY_RING (projects/P/locations/L/keyRings/R;
                                    created on first use); Application Default Credentials;
                                    optional KEYCELL_GCP_KMS_ENDPOINT (HOST:PORT, default the
                                    service's) and KEYCELL_GCP_KMS_INSECURE=1 (plaintext gRPC
                                    without credentials, to a loopback endpoint only: emulators)
  KEYCELL_SEAL          shamir (default) | hsm (auto-unseal through the key backend)
  KEYCELL_BOOT_KEY, KEYCELL_BOOT_ID
                        set by `keycell server` for its workers: they share unseal state
  KEYCELL_SOFTWARE_KEYS for the software backend: a ledger URL where its keys persist; unset keeps
                        them inside the cell's own barrier (sealed with the cell)
  KEYCELL_AUDIT_FILE    append the audit trail to this file (no audit device by default, as in Vault)
  KEYCELL_AUDIT_STDOUT  1: the audit trail as JSON lines on standard output (Lambda: CloudWatch Logs)
  KEYCELL_AUDIT_S3      BUCKET/PREFIX: one object per batch, under object lock (bucket made with it)
  KEYCELL_AUDIT_S3_RETENTION_DAYS  object lock retention (default 365, COMPLIANCE mode)
  KEYCELL_AUDIT_FAIL_OPEN  1: serve when no audit sink accepts an entry (default: refuse, 503)
  KEYCELL_AUDIT         off: no audit trail even when a sink is configured
  KEYCELL_AUDIT_ANCHOR  sync (default): each batch's chain head reaches the ledger before its
                        requests go on; async (`keycell server` sets it): the head follows the
                        sinks every KEYCELL_AUDIT_ANCHOR_MS (default 50) ms, and a writer whose head
                        has not reached the ledger for a second refuses entries
  KEYCELL_RELAY         HOST:PORT of the cell's local relay: revocations are handed to it
                        (sys/revocations) and the server's revocation stream follows it; KV
                        writes go to each secret's home cell through it (keycell/cells)
  KEYCELL_PEER_TOKEN    a token with sudo on sys/revocations/apply in every other cell: each
                        revocation minted here also goes straight to the other cells' APIs
                        (from the cell directory), and this cell's freshness heartbeat every
                        KEYCELL_HEARTBEAT_S (default 0.25) seconds (keycell/cells/paths.py)
  KEYCELL_PEER_LEDGERS  JSON: each other cell's ledger, {"CELL": {"table": T, "region": R,
                        "endpoint": URL (optional)}} for DynamoDB, or {"CELL": "LEDGER URL"}: each
                        revocation minted here is also put, sealed to that cell's key, into its
                        ledger, with this cell's heartbeat every KEYCELL_HEARTBEAT_S seconds, and
                        this cell drains what its peers put into its own ledger (the ledger path,
                        keycell/cells/paths.py; `{}` only drains). This cell's own entry is skipped.
  KEYCELL_RELAY_TLS_CERT, KEYCELL_RELAY_TLS_KEY, KEYCELL_RELAY_TLS_CA
                        mTLS to that relay: this process's certificate (SPIFFE ID
                        spiffe://TD/keycell/api/CELL), its key, the mesh CA (keycell/relay/tls.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from keycell.adapters.ledgers import default_ledger_url, open_ledger
from keycell.control_plane.audit import ANCHOR_INTERVAL, Auditor, AuditSink, FileSink, StdoutSink
from keycell.control_plane.barrier import Barrier
from keycell.control_plane.keys import KeyBackend
from keycell.control_plane.router import Router
from keycell.control_plane.routes import build_router
from keycell.control_plane.services import CellConfig, CellServices

KEY_BACKENDS = ("software", "pkcs11", "aws-kms", "cloudhsm", "azure-mhsm", "gcp-kms")


def key_backend_from_environment(env: dict[str, str]) -> KeyBackend | Callable[[Barrier], KeyBackend]:
    """The key backend KEYCELL_KEY_BACKEND names, configured from `env` (see the module
    docstring). A missing or malformed setting is a ValueError naming the variable."""
    kind = env.get("KEYCELL_KEY_BACKEND", "software")
    if kind == "software":
        from keycell.adapters.keys.software import SoftwareKeyBackend

        store_url = env.get("KEYCELL_SOFTWARE_KEYS")
        if store_url:
            return SoftwareKeyBackend(store=open_ledger(store_url))
        return lambda barrier: SoftwareKeyBackend(store=barrier)
    if kind == "pkcs11":
        from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend

        return Pkcs11KeyBackend.from_env(env)
    if kind == "aws-kms":
        from keycell.adapters.keys.aws_kms import AwsKmsKeyBackend

        return AwsKmsKeyBackend(region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
    if kind == "cloudhsm":
        from keycell.adapters.keys.cloudhsm import CloudHsmKeyBackend

        return CloudHsmKeyBackend.from_env(env)
    if kind == "azure-mhsm":
        return _azure_mhsm(env)
    if kind == "gcp-kms":
        return _gcp_kms(env)
    raise ValueError(f"unknown KEYCELL_KEY_BACKEND {kind!r}; use one of {', '.join(KEY_BACKENDS)}")


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError(f"{name} is 1 or 0, not {text!r}")


def _azure_mhsm(env: dict[str, str]) -> KeyBackend:
    url = env.get("KEYCELL_AZURE_MHSM_URL", "").strip()
    if not url:
        raise ValueError(
            "set KEYCELL_AZURE_MHSM_URL (https://NAME.managedhsm.azure.net) to use the azure-mhsm key backend"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise ValueError(
            "KEYCELL_AZURE_MHSM_URL is the HSM's https:// URI (https://NAME.managedhsm.azure.net), "
            "without credentials in it"
        )
    ca = env.get("KEYCELL_AZURE_MHSM_CA") or None
    if ca is not None and not os.path.isfile(ca):
        raise ValueError(f"KEYCELL_AZURE_MHSM_CA names no file ({ca!r}); it is a PEM CA bundle")
    verify_challenge = _flag(env, "KEYCELL_AZURE_MHSM_VERIFY_CHALLENGE", True)
    from azure.identity import DefaultAzureCredential

    from keycell.adapters.keys.azure_mhsm import AzureManagedHsmKeyBackend

    return AzureManagedHsmKeyBackend(
        url,
        DefaultAzureCredential(),
        connection_verify=ca,
        verify_challenge_resource=verify_challenge,
    )


def _gcp_kms(env: dict[str, str]) -> KeyBackend:
    ring = env.get("KEYCELL_GCP_KMS_KEY_RING", "").strip()
    if not ring:
        raise ValueError(
            "set KEYCELL_GCP_KMS_KEY_RING (projects/P/locations/L/keyRings/R) to use the gcp-kms key backend"
        )
    match = re.fullmatch(r"projects/([^/\s]+)/locations/([^/\s]+)/keyRings/([^/\s]+)", ring)
    if match is None:
        raise ValueError(f"KEYCELL_GCP_KMS_KEY_RING is projects/P/locations/L/keyRings/R, not {ring!r}")
    project, location, key_ring = match.groups()
    endpoint = env.get("KEYCELL_GCP_KMS_ENDPOINT", "").strip() or None
    if endpoint is not None and (
        "://" in endpoint or "/" in endpoint or not re.fullmatch(r".+:\d{1,5}", endpoint)
    ):
        raise ValueError(f"KEYCELL_GCP_KMS_ENDPOINT is HOST:PORT (no scheme, no path), not {endpoint!r}")
    insecure = _flag(env, "KEYCELL_GCP_KMS_INSECURE", False)
    from keycell.adapters.keys.gcp_kms import GcpKmsKeyBackend

    if insecure:
        from keycell.relay.tls import is_loopback

        if endpoint is None or not is_loopback(endpoint.rsplit(":", 1)[0]):
            raise ValueError(
                "KEYCELL_GCP_KMS_INSECURE=1 (plaintext, no credentials) is for a loopback "
                "KEYCELL_GCP_KMS_ENDPOINT only (127.0.0.1:PORT, localhost:PORT)"
            )
        import grpc
        from google.cloud.kms_v1.services.key_management_service.transports import (
            KeyManagementServiceGrpcTransport,
        )

        transport = KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
        return GcpKmsKeyBackend(project=project, location=location, key_ring=key_ring, transport=transport)
    options = {"api_endpoint": endpoint} if endpoint is not None else None
    return GcpKmsKeyBackend(project=project, location=location, key_ring=key_ring, client_options=options)


_CELL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DYNAMODB_TABLE = re.compile(r"[A-Za-z0-9_.-]{3,255}")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")


def peer_ledgers_from_environment(env: dict[str, str]) -> dict[str, str] | None:
    """KEYCELL_PEER_LEDGERS as cell -> ledger URL (None when unset). A malformed
    setting is a ValueError saying what is expected; it never echoes an endpoint
    (which could carry credentials)."""
    text = env.get("KEYCELL_PEER_LEDGERS", "").strip()
    if not text:
        return None
    shape = 'KEYCELL_PEER_LEDGERS is a JSON object {"CELL": {"table": ..., "region": ..., "endpoint": ...}}'
    try:
        config = json.loads(text)
    except ValueError:
        raise ValueError(shape + ", and this is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(shape)
    urls: dict[str, str] = {}
    for cell, value in config.items():
        if not _CELL_ID.fullmatch(cell):
            raise ValueError(f"KEYCELL_PEER_LEDGERS: {cell[:64]!r} is not a cell id (letters, digits, . _ -)")
        if isinstance(value, str):
            urls[cell] = _peer_ledger_url(cell, value)
        elif isinstance(value, dict):
            urls[cell] = _peer_dynamodb_url(cell, value)
        else:
            raise ValueError(
                f"KEYCELL_PEER_LEDGERS[{cell!r}] is an object {{table, region, endpoint}} or a URL"
            )
    return urls


def _peer_dynamodb_url(cell: str, value: dict[str, Any]) -> str:
    where = f"KEYCELL_PEER_LEDGERS[{cell!r}]"
    unknown = sorted(set(value) - {"table", "region", "endpoint"})
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(k[:32] for k in unknown)}; use table, region, endpoint"
        )
    table, region, endpoint = value.get("table"), value.get("region"), value.get("endpoint")
    if not isinstance(table, str) or not _DYNAMODB_TABLE.fullmatch(table):
        raise ValueError(f"{where}: 'table' is a DynamoDB table name (3 to 255 of A-Z a-z 0-9 _ . -)")
    if not isinstance(region, str) or not _AWS_REGION.fullmatch(region):
        raise ValueError(f"{where}: 'region' is an AWS region such as eu-west-1")
    query = {"region": region}
    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise ValueError(f"{where}: 'endpoint' is an http(s):// URL")
        parts = urlsplit(endpoint)
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ValueError(f"{where}: 'endpoint' is an http(s)://HOST[:PORT] URL without credentials in it")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{where}: 'endpoint' is an http(s)://HOST[:PORT] URL without a path or query")
        query["endpoint"] = f"{parts.scheme}://{parts.netloc}"
    return f"dynamodb://{table}?{urlencode(query)}"


def _peer_ledger_url(cell: str, url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite", "dynamodb") or "create=" in url:
        raise ValueError(
            f"KEYCELL_PEER_LEDGERS[{cell!r}] is a sqlite:// or dynamodb:// ledger URL (a peer's "
            "ledger is never created from here)"
        )
    return url


def peer_ledger_path(services: CellServices, env: dict[str, str]) -> Any:
    """The ledger path (keycell/cells/paths.py) over the peers' ledgers KEYCELL_PEER_LEDGERS
    names, started; None when it is unset. Opening a ledger sends nothing yet, so a
    peer that cannot be reached at start only fails its first writes."""
    urls = peer_ledgers_from_environment(env)
    if urls is None:
        return None
    from keycell.cells.paths import LedgerPath

    ledgers = {cell: open_ledger(url) for cell, url in urls.items() if cell != services.config.cell_id}
    return LedgerPath(services, ledgers, every=_heartbeat_seconds(env)).start()


def _heartbeat_seconds(env: dict[str, str]) -> float:
    text = env.get("KEYCELL_HEARTBEAT_S", "0.25")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 60:
        raise ValueError(f"KEYCELL_HEARTBEAT_S is a number of seconds in (0, 60], not {text[:32]!r}")
    return seconds


def dev_environment(data_dir: str, cell: str | None = None) -> dict[str, str]:
    """A throwaway cell (`keycell server --dev`, dev relays): SQLite ledger, software
    keys in a plain file (development only), sealed by that key so every process
    unseals itself."""
    return {
        # Nothing of a dev cell needs to survive a crash of the machine: its commits are
        # not fsynced (OpenBao's dev server keeps its storage in memory).
        "KEYCELL_LEDGER": f"sqlite://{os.path.join(data_dir, 'cell.db')}?synchronous=off",
        "KEYCELL_KEY_BACKEND": "software",
        "KEYCELL_SOFTWARE_KEYS": f"sqlite://{os.path.join(data_dir, 'dev-keys.db')}",
        "KEYCELL_SEAL": "hsm",
        "KEYCELL_CELL": cell or os.environ.get("KEYCELL_CELL", "dev"),
    }


def services_from_environment(env: dict[str, str] | None = None) -> CellServices:
    env = dict(os.environ if env is None else env)
    ledger = open_ledger(env.get("KEYCELL_LEDGER") or default_ledger_url())
    config = CellConfig(cell_id=env.get("KEYCELL_CELL", "local"), hsm_seal=env.get("KEYCELL_SEAL") == "hsm")
    config = dataclasses.replace(config, trust_domain=env.get("KEYCELL_TRUST_DOMAIN", config.trust_domain))
    boot = None
    if env.get("KEYCELL_BOOT_KEY") and env.get("KEYCELL_BOOT_ID"):
        boot = (bytes.fromhex(env["KEYCELL_BOOT_KEY"]), env["KEYCELL_BOOT_ID"])
    services = CellServices(ledger, key_backend_from_environment(env), config, boot=boot)
    if env.get("KEYCELL_AWS_IID_TAGS") == "ec2":
        from keycell.adapters.identity.aws_ec2 import Ec2InstanceTags

        services.identity.instance_tags = Ec2InstanceTags(endpoint_url=env.get("AWS_ENDPOINT_URL") or None)
    from keycell.functions.rotation.wiring import install

    install(services, env)  # credential targets and database plugins
    if env.get("KEYCELL_RELAY"):
        from keycell.relay.handoff import RelayHandoff
        from keycell.relay.tls import from_env as relay_tls_from_env

        services.relay_handoff = RelayHandoff(  # type: ignore[attr-defined]
            env["KEYCELL_RELAY"], tls=relay_tls_from_env(env)
        )
    return services


def audit_sinks_from_environment(env: dict[str, str]) -> list[AuditSink]:
    sinks: list[AuditSink] = []
    if env.get("KEYCELL_AUDIT", "").lower() in ("off", "0", "false"):
        return sinks
    if env.get("KEYCELL_AUDIT_FILE"):
        sinks.append(FileSink(env["KEYCELL_AUDIT_FILE"]))
    if env.get("KEYCELL_AUDIT_STDOUT") == "1":
        sinks.append(StdoutSink())
    if env.get("KEYCELL_AUDIT_S3"):
        from keycell.adapters.audit.s3 import S3Sink

        bucket, _, prefix = env["KEYCELL_AUDIT_S3"].partition("/")
        days = int(env.get("KEYCELL_AUDIT_S3_RETENTION_DAYS", "365"))
        sinks.append(S3Sink(bucket, prefix, retention_days=days))
    return sinks


def auditor_from_environment(services: CellServices, env: dict[str, str] | None = None) -> Auditor | None:
    """The cell's auditor, or None when no audit sink is configured."""
    env = dict(os.environ if env is None else env)
    sinks = audit_sinks_from_environment(env)
    if not sinks:
        return None
    return Auditor(
        services.ledger,
        services.barrier,
        services.config.cell_id,
        sinks,
        fail_open=env.get("KEYCELL_AUDIT_FAIL_OPEN") == "1",
        clock=services.clock,
        anchor_interval=_anchor_interval(env),
    )


def _anchor_interval(env: dict[str, str]) -> float | None:
    mode = env.get("KEYCELL_AUDIT_ANCHOR", "sync").lower()
    if mode == "sync":
        return None
    if mode != "async":
        raise ValueError(f"KEYCELL_AUDIT_ANCHOR is sync or async, not {mode!r}")
    text = env.get("KEYCELL_AUDIT_ANCHOR_MS", f"{ANCHOR_INTERVAL * 1000:g}")
    try:
        millis = float(text)
    except ValueError:
        millis = -1.0
    if not 0 < millis <= 1000:
        raise ValueError(f"KEYCELL_AUDIT_ANCHOR_MS is a number of milliseconds in (0, 1000], not {text!r}")
    return millis / 1000


def audit_rotation_steps(services: CellServices, auditor: Auditor) -> None:
    """Each step the cell's rotator runs (create, set, test, finish) becomes an audit
    event in this process's chain: secret name, request token (the version id), step;
    never a value. Fail closed: a step whose entry no sink took stops the rotation with
    a 503 (it resumes under the same token); fail open logs and goes on."""
    from keycell.control_plane.audit import AuditUnavailable
    from keycell.control_plane.errors import Unavailable

    before = services.rotator.on_step

    def on_step(name: str, token: str, step: Any) -> None:
        if before is not None:
            before(name, token, step)
        try:
            auditor.record({"kind": "rotation-step", "secret": name, "token": token, "step": step.value})
        except AuditUnavailable:
            raise Unavailable(
                "audit: no audit device accepted the rotation step's entry; the rotation stopped "
                "and resumes with the same token"
            ) from None

    services.rotator.on_step = on_step


def router_from_environment(env: dict[str, str] | None = None) -> Router:
    env = dict(os.environ if env is None else env)
    services = services_from_environment(env)
    router = build_router(services)
    router.auditor = auditor_from_environment(services, env)
    if router.auditor is not None:
        audit_rotation_steps(services, router.auditor)
    handoff = getattr(services, "relay_handoff", None)  # set when KEYCELL_RELAY names the relay
    if handoff is not None:  # cells under partition (issue 9): homes, forwarding, replica ages
        from keycell.cells.api import install as install_cells

        install_cells(router, services, handoff.addr, handoff.tls)
    paths: list[Any] = []
    if env.get("KEYCELL_PEER_TOKEN"):  # the direct revocation path and heartbeats (issue 18)
        from keycell.cells.paths import DirectPath

        paths.append(
            DirectPath(services, env["KEYCELL_PEER_TOKEN"], heartbeat_every=_heartbeat_seconds(env)).start()
        )
    ledger_path = peer_ledger_path(services, env)  # the ledger path (issue 18)
    if ledger_path is not None:
        paths.append(ledger_path)
    if paths:
        from keycell.cells.paths import Paths

        services.revocation_paths = Paths(*paths)  # type: ignore[attr-defined]
    return router

"""PKI's HTTP routes (Vault's paths under a PKI mount: root and intermediate CA, config/urls,
roles, issue, sign, revoke, cert, certs, crl, tidy) and their OpenAPI documents.

As in Vault, the CA certificate, the chain, a certificate by serial and the CRL are
read without a token (`cert/*`, `ca`, `ca/pem`, `ca_chain`, `crl`, `crl/pem`): they are
public. `ca` and `crl` answer DER, as the URLs written into certificates are fetched."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.engines.pki.backend import Pki
from keycell.control_plane.router import (
    Content,
    Context,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
)
from keycell.control_plane.routes.openapi import (
    BOOL,
    DURATION,
    INT,
    KEYS,
    NO_CONTENT,
    STR,
    STR_LIST,
    STR_LIST_OR_CSV,
    obj,
    ok,
)

_PEM_CHAIN = "application/pem-certificate-chain"
_PEM = "application/x-pem-file"
_DER_CERT = "application/pkix-cert"
_DER_CRL = "application/pkix-crl"
_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


def register(router: Router, pki: Pki, mount: str) -> None:
    def text(body: str, media_type: str) -> Result:
        return Result(text=body + "\n", headers={"Content-Type": media_type})

    def der(body: bytes, media_type: str) -> Result:
        return Result(text=body, headers={"Content-Type": media_type})

    def with_warnings(data: dict[str, Any]) -> Result:
        warnings = data.pop("warnings", None)
        return Result(data=data, warnings=warnings)

    def add(
        path: str,
        handlers: dict[Operation, Any],
        summary: str,
        operations: dict[Operation, OperationDoc],
        *,
        public: bool = False,
        sudo: bool = False,
        params: dict[str, str] | None = None,
    ) -> None:
        pattern = rf"{mount}/" + path.replace("{name}", r"(?P<name>[^/]+)").replace(
            "{serial}", r"(?P<serial>[^/]+)"
        ).replace("{type}", r"(?P<type>[^/]+)")
        router.add(
            pattern,
            handlers,
            authenticated=not public,
            sudo=sudo,
            family="pki",
            pure_reads=public,
            doc=RouteDoc(
                f"/{mount}/{path.removesuffix('/?')}", summary, params=params or {}, operations=operations
            ),
        )

    ca_type = {"type": "Only `internal`: CA keys stay in the cell's key backend (`exported` is refused)."}
    add(
        "root/generate/{type}",
        {Operation.UPDATE: lambda ctx: pki.generate_root(ctx.params["type"], ctx.data)},
        "A self-signed root CA, its key created in the cell's key backend.",
        {
            Operation.UPDATE: OperationDoc(
                "Generate a root CA", body=_CA_BODY, body_required=True, responses=ok(_ISSUED)
            )
        },
        params=ca_type,
    )
    add(
        "root",
        {Operation.DELETE: lambda ctx: pki.delete_root()},
        "The mount's CA (sudo, as in Vault).",
        {Operation.DELETE: OperationDoc("Delete the CA (its key is disabled)", responses=NO_CONTENT)},
        sudo=True,
    )
    add(
        "intermediate/generate/{type}",
        {Operation.UPDATE: lambda ctx: pki.generate_intermediate(ctx.params["type"], ctx.data)},
        "An intermediate CA key (in the key backend) and its CSR, to be signed elsewhere.",
        {
            Operation.UPDATE: OperationDoc(
                "Generate an intermediate CSR",
                body=_CA_BODY,
                body_required=True,
                responses=ok(obj({"csr": STR, "key_id": STR, "key_type": STR}, ("csr",))),
            )
        },
        params=ca_type,
    )
    add(
        "root/sign-intermediate",
        {Operation.UPDATE: lambda ctx: with_warnings(pki.sign_intermediate(ctx.data))},
        "Certify an intermediate CA's CSR with this mount's CA.",
        {
            Operation.UPDATE: OperationDoc(
                "Sign an intermediate",
                body=obj({**_CA_BODY["properties"], "csr": STR}, ("csr",)),
                body_required=True,
                responses=ok(_ISSUED),
            )
        },
    )
    add(
        "intermediate/set-signed",
        {Operation.UPDATE: lambda ctx: pki.set_signed(ctx.data)},
        "Install the certificate another CA made from this mount's CSR.",
        {
            Operation.UPDATE: OperationDoc(
                "Set the signed intermediate",
                body=obj({"certificate": STR}, ("certificate",)),
                body_required=True,
                responses=ok(obj({"imported_issuers": STR_LIST})),
            )
        },
    )
    add(
        "ca",
        {Operation.READ: lambda ctx: der(pki.ca_der(), _DER_CERT)},
        "The CA certificate (DER), without a token.",
        {
            Operation.READ: OperationDoc(
                "Read the CA certificate in DER", responses={200: Content(_DER_CERT, _BINARY)}
            )
        },
        public=True,
    )
    add(
        "ca/pem",
        {Operation.READ: lambda ctx: text(pki.ca_pem(), _PEM_CHAIN)},
        "The CA certificate (PEM), without a token.",
        {Operation.READ: OperationDoc("Read the CA certificate", responses={200: Content(_PEM_CHAIN)})},
        public=True,
    )
    add(
        "ca_chain",
        {Operation.READ: lambda ctx: text(pki.chain_pem(), _PEM_CHAIN)},
        "The CA certificate and the chain above it (PEM), without a token.",
        {Operation.READ: OperationDoc("Read the CA chain", responses={200: Content(_PEM_CHAIN)})},
        public=True,
    )
    add(
        "crl",
        {Operation.READ: lambda ctx: der(pki.crl_der(), _DER_CRL)},
        "The signed CRL (DER), without a token.",
        {Operation.READ: OperationDoc("Read the CRL in DER", responses={200: Content(_DER_CRL, _BINARY)})},
        public=True,
    )
    add(
        "crl/pem",
        {Operation.READ: lambda ctx: text(pki.crl_pem(), _PEM)},
        "The signed CRL (PEM), rebuilt on every revocation, without a token.",
        {Operation.READ: OperationDoc("Read the CRL", responses={200: Content(_PEM)})},
        public=True,
    )
    add(
        "crl/rotate",
        {Operation.READ: lambda ctx: pki.rotate_crl()},
        "Sign the CRL again (a new CRL number and next update).",
        {Operation.READ: OperationDoc("Rotate the CRL", responses=ok(obj({"success": BOOL})))},
    )
    add(
        "config/urls",
        {Operation.READ: lambda ctx: pki.read_urls(), Operation.UPDATE: lambda ctx: pki.write_urls(ctx.data)},
        "The URLs written into issued certificates (AIA issuers, OCSP, CRL distribution points).",
        {
            Operation.READ: OperationDoc("Read the URLs", responses=ok(_URLS)),
            Operation.UPDATE: OperationDoc("Set the URLs", body=_URLS, responses=NO_CONTENT),
        },
    )
    add(
        "roles/?",
        {Operation.LIST: lambda ctx: pki.list_roles()},
        "PKI roles.",
        {Operation.LIST: OperationDoc("List roles", responses=ok(KEYS))},
    )
    role = {"name": "The role's name."}
    add(
        "roles/{name}",
        {
            Operation.UPDATE: lambda ctx: pki.write_role(ctx.params["name"], ctx.data),
            Operation.READ: lambda ctx: pki.read_role(ctx.params["name"]),
            Operation.DELETE: lambda ctx: pki.delete_role(ctx.params["name"]),
        },
        "A role: which names certificates may carry, their key type and TTLs.",
        {
            Operation.UPDATE: OperationDoc("Create or update a role", body=_ROLE, responses=NO_CONTENT),
            Operation.READ: OperationDoc("Read a role", responses=ok(_ROLE)),
            Operation.DELETE: OperationDoc("Delete a role", responses=NO_CONTENT),
        },
        params=role,
    )
    add(
        "issue/{name}",
        {Operation.UPDATE: lambda ctx: with_warnings(pki.issue(ctx.params["name"], ctx.data))},
        "A key pair made for the caller and a certificate for it (the private key is returned once, never stored).",
        {
            Operation.UPDATE: OperationDoc(
                "Issue a certificate",
                body=_LEAF,
                body_required=True,
                responses=ok(obj({**_ISSUED["properties"], "private_key": STR, "private_key_type": STR})),
            )
        },
        params=role,
    )
    add(
        "sign/{name}",
        {Operation.UPDATE: lambda ctx: with_warnings(pki.sign(ctx.params["name"], ctx.data))},
        "A certificate for the key of a CSR (its signature verified, its names checked against the role).",
        {
            Operation.UPDATE: OperationDoc(
                "Sign a CSR",
                body=obj({**_LEAF["properties"], "csr": STR}, ("csr",)),
                body_required=True,
                responses=ok(_ISSUED),
            )
        },
        params=role,
    )
    add(
        "revoke",
        {Operation.UPDATE: lambda ctx: pki.revoke(ctx.data.get("serial_number"))},
        "Revoke a certificate by serial number; the CRL is rebuilt in the same write.",
        {
            Operation.UPDATE: OperationDoc(
                "Revoke a certificate",
                body=obj({"serial_number": STR}, ("serial_number",)),
                body_required=True,
                responses=ok(obj({"revocation_time": INT, "revocation_time_rfc3339": STR, "state": STR})),
            )
        },
    )
    add(
        "certs/?",
        {Operation.LIST: lambda ctx: pki.list_certs()},
        "The serial numbers of the certificates this mount issued.",
        {Operation.LIST: OperationDoc("List certificates", responses=ok(KEYS))},
    )
    add(
        "cert/{serial}",
        {Operation.READ: lambda ctx: pki.read_cert(ctx.params["serial"])},
        "A certificate and its status (revocation_time 0: not revoked); `ca`, `ca_chain`, `crl` name the CA's.",
        {
            Operation.READ: OperationDoc(
                "Read a certificate",
                responses=ok(
                    obj(
                        {"certificate": STR, "revocation_time": INT, "revocation_time_rfc3339": STR},
                        ("certificate",),
                    )
                ),
            )
        },
        public=True,
        params={"serial": "The serial (hex bytes, ':' or '-'), or ca, ca_chain, crl."},
    )

    def tidy(ctx: Context) -> Result:
        done = pki.tidy(ctx.data)
        return Result(
            status=202,
            warnings=[
                "Tidy operation successfully started. Any information from the operation will be printed to "
                f"OpenBao's server logs. (Keycell tidies in the request: {done['certs']} expired and "
                f"{done['revoked']} expired revoked certificates removed.)"
            ],
        )

    add(
        "tidy",
        {Operation.UPDATE: tidy},
        "Remove certificates expired for longer than safety_buffer (and their CRL entries).",
        {
            Operation.UPDATE: OperationDoc(
                "Tidy the certificate store",
                body=obj({"tidy_cert_store": BOOL, "tidy_revoked_certs": BOOL, "safety_buffer": DURATION}),
                responses={202: None},
            )
        },
    )


_CA_BODY = obj(
    {
        "common_name": STR,
        "ttl": DURATION,
        "key_type": {"type": "string", "enum": ["ec"]},
        "key_bits": {"type": "integer", "enum": [0, 256]},
        "max_path_length": INT,
    },
    ("common_name",),
)
_ISSUED = obj(
    {
        "certificate": STR,
        "issuing_ca": STR,
        "ca_chain": STR_LIST,
        "serial_number": STR,
        "expiration": INT,
    },
    ("certificate", "issuing_ca", "serial_number", "expiration"),
)
_URLS = obj({"issuing_certificates": STR_LIST, "crl_distribution_points": STR_LIST, "ocsp_servers": STR_LIST})
_ROLE = obj(
    {
        "allowed_domains": STR_LIST_OR_CSV,
        "allow_subdomains": BOOL,
        "allow_bare_domains": BOOL,
        "allow_any_name": BOOL,
        "allow_ip_sans": BOOL,
        "allow_localhost": BOOL,
        "ttl": DURATION,
        "max_ttl": DURATION,
        "key_type": {"type": "string", "enum": ["rsa", "ec", "any"]},
        "key_bits": INT,
        "server_flag": BOOL,
        "client_flag": BOOL,
        "key_usage": STR_LIST_OR_CSV,
    }
)
_LEAF = obj(
    {"common_name": STR, "alt_names": STR_LIST_OR_CSV, "ip_sans": STR_LIST_OR_CSV, "ttl": DURATION},
    ("common_name",),
)

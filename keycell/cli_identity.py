"""`keycell entry create|list|delete` and `keycell agent`: workload identity from the shell.

Both talk to a regional API (`--address`, default `$KEYCELL_ADDR`, then `$VAULT_ADDR`);
`entry` commands need an operator token (`--token`, `$KEYCELL_TOKEN` / `$VAULT_TOKEN`).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from keycell.client import Client
from keycell.client.errors import KeycellError

entry_app = typer.Typer(
    help="SPIFFE registration entries (parent ID + selectors -> SPIFFE ID).", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)

Address = Annotated[
    str,
    typer.Option(
        "--address",
        envvar=["KEYCELL_ADDR", "VAULT_ADDR"],
        help="The regional API, e.g. http://127.0.0.1:8200.",
    ),
]
Token = Annotated[
    str, typer.Option("--token", envvar=["KEYCELL_TOKEN", "VAULT_TOKEN"], help="An operator token.")
]


def _client(address: str, token: str) -> Client:
    return Client(address, token=token, timeout=15.0)


def _call(client: Client, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return client.request(method, path, body)
    except KeycellError as exc:
        errors.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


@entry_app.command("create")
def entry_create(
    spiffe_id: Annotated[str, typer.Option("--spiffe-id", help="The identity, spiffe://TD/path.")],
    parent_id: Annotated[
        str, typer.Option("--parent-id", help="The agent (or node alias) that may issue it.")
    ],
    selector: Annotated[list[str], typer.Option("--selector", "-s", help="type:value; repeat for several.")],
    address: Address = "http://127.0.0.1:8200",
    token: Token = "",
    x509_svid_ttl: Annotated[int, typer.Option(help="Seconds; 0 for the default (1 h).")] = 0,
    jwt_svid_ttl: Annotated[int, typer.Option(help="Seconds; 0 for the default (5 min).")] = 0,
    admin: bool = False,
    downstream: bool = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a registration entry."""
    body: dict[str, Any] = {
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": selector,
        "admin": admin,
        "downstream": downstream,
    }
    if x509_svid_ttl:
        body["x509_svid_ttl"] = x509_svid_ttl
    if jwt_svid_ttl:
        body["jwt_svid_ttl"] = jwt_svid_ttl
    data = _call(_client(address, token), "POST", "identity/entries", body)["data"]
    if as_json:
        typer.echo(json.dumps(data))
    else:
        console.print(f"entry {data['id']}: {data['spiffe_id']} (parent {data['parent_id']})")


@entry_app.command("list")
def entry_list(
    address: Address = "http://127.0.0.1:8200",
    token: Token = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List registration entries."""
    data = _call(_client(address, token), "LIST", "identity/entries")["data"]
    if as_json:
        typer.echo(json.dumps(data["entries"]))
        return
    table = Table(title="registration entries")
    for column in ("id", "spiffe id", "parent id", "selectors", "x509 ttl", "jwt ttl"):
        table.add_column(column)
    for e in data["entries"]:
        table.add_row(
            e["id"],
            e["spiffe_id"],
            e["parent_id"],
            ", ".join(e["selectors"]),
            str(e["x509_svid_ttl"]),
            str(e["jwt_svid_ttl"]),
        )
    console.print(table)


@entry_app.command("delete")
def entry_delete(
    entry_id: Annotated[str, typer.Argument(help="The entry's id.")],
    address: Address = "http://127.0.0.1:8200",
    token: Token = "",
) -> None:
    """Delete a registration entry."""
    _call(_client(address, token), "DELETE", f"identity/entries/{entry_id}")
    console.print(f"deleted entry {entry_id}")


def agent(
    socket: Annotated[
        str,
        typer.Option(
            "--socket", envvar="SPIFFE_ENDPOINT_SOCKET", help="Where to serve the Workload API: unix:///PATH."
        ),
    ] = "unix:///tmp/keycell-agent/agent.sock",
    address: Address = "http://127.0.0.1:8200",
    join_token: Annotated[
        str,
        typer.Option("--join-token", envvar="KEYCELL_JOIN_TOKEN", help="Attest with a one-time join token."),
    ] = "",
    tpm: Annotated[
        str, typer.Option("--tpm", help="Attest with this TPM (a TCTI, e.g. swtpm:host=127.0.0.1,port=2321).")
    ] = "",
    attestation_file: Annotated[
        str,
        typer.Option(
            "--attestation",
            help='A JSON file of node evidence, e.g. {"method": "aws_iid", "document": ..., "signature": ...}.',
        ),
    ] = "",
    sync_interval: Annotated[float, typer.Option(help="Seconds between syncs with the regional API.")] = 5.0,
    kubelet: Annotated[
        str,
        typer.Option("--kubelet", help="The node's kubelet (its /pods endpoint) for k8s workload selectors."),
    ] = "",
) -> None:
    """Run the node agent: attest this node, then serve the SPIFFE Workload API."""
    from keycell.agent.server import run, socket_path

    if join_token:
        attestation: dict[str, Any] = {"method": "join_token", "token": join_token}
    elif tpm:
        attestation = {"method": "tpm", "tcti": tpm}
    elif attestation_file:
        with open(attestation_file) as f:
            attestation = json.load(f)
    else:
        errors.print("[bold red]error:[/] give --join-token, --tpm TCTI or --attestation FILE")
        raise typer.Exit(2)
    try:
        path = socket_path(socket)
    except ValueError as exc:
        errors.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        run(socket, address, attestation, sync_interval=sync_interval, kubelet_url=kubelet)
    except KeycellError as exc:
        errors.print(f"[bold red]error:[/] node attestation failed: {exc}")
        raise typer.Exit(1) from None

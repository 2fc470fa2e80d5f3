"""A deployment's cells, read from one typed config file (`infra/cells.toml`).

The IaC stacks (`infra/aws`, and the parameters of `infra/azure` and `infra/gcp`) and
the demo read the same file through `load_cell_set()`, so a cell's id, region,
address range, key custody and sizing are written down once. The file is TOML:
`[deployment]` names the deployment, `[defaults]` holds values every cell shares and
each `[[cells]]` entry overrides what differs. Unknown keys and bad values are refused
with the file, the cell and the key named, so a typo never deploys a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, cast

Cloud = Literal["aws", "azure", "gcp"]
KeyCustody = Literal["kms"]

CLOUDS: tuple[Cloud, ...] = ("aws", "azure", "gcp")
KEY_CUSTODIES: tuple[KeyCustody, ...] = ("kms",)

# Resource names are built from these (table, bus, log group, service names), so they
# keep to what every cloud accepts in a name: lowercase letters, digits, hyphens.
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_REGION = re.compile(r"^[a-z]{2,}(-[a-z0-9]+)+$")  # AWS, GCP: eu-west-1, europe-west1
_AZURE_REGION = re.compile(r"^[a-z][a-z0-9]{2,}$")  # westeurope, eastus2
# EventBridge accepts rate(N unit) and six-field cron(...) expressions.
_SCHEDULE = re.compile(r"^(rate\(\d+ (minute|minutes|hour|hours|day|days)\)|cron\((\S+ ){5}\S+\))$")
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")

ENV_CONFIG = "KEYCELL_CELLS"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "infra" / "cells.toml"


class CellConfigError(ValueError):
    """The cell set's config file says something impossible; the message says where."""


@dataclass(frozen=True)
class RotationSchedule:
    """An EventBridge schedule that asks the rotation function to rotate a prefix."""

    name: str
    expression: str
    prefix: str


@dataclass(frozen=True)
class Cell:
    id: str
    cloud: Cloud
    region: str
    cidr: str
    key_custody: KeyCustody = "kms"
    api_rate_limit: float = 200.0
    api_burst: int = 400
    lambda_memory_mb: int = 1024
    lambda_timeout_s: int = 30
    api_reserved_concurrency: int = 100
    relays: int = 3
    relay_image: str = "ghcr.io/keycell/keycell:0.1.0"
    relay_cpu: int = 512
    relay_memory_mb: int = 1024
    relay_port: int = 7946
    # The relays' mTLS material (keycell/relay/tls.py), handed to them as KEYCELL_RELAY_TLS_*:
    # on AWS a Secrets Manager secret name holding JSON {"cert", "key", "ca"} (PEMs); on
    # GCP the prefix of three Secret Manager secrets <name>-cert, -key, -ca.
    relay_tls_secret: str = ""
    log_retention_days: int = 365
    rotation_handler: str = "keycell.functions.rotation.app.rotate"
    revocation_handler: str = "keycell.functions.revocation.app.revocation"
    rotation_schedules: tuple[RotationSchedule, ...] = ()


@dataclass(frozen=True)
class CellSet:
    name: str
    trust_domain: str
    home_region: str
    dns_zone: str
    cells: tuple[Cell, ...]
    account: str | None = None
    hosted_zone_id: str | None = None
    source: Path | None = None

    def on(self, cloud: Cloud) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if c.cloud == cloud)

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(f"no cell {cell_id!r}; the cells are {', '.join(c.id for c in self.cells)}")

    def resource_name(self, cell: Cell, what: str) -> str:
        """`keycell-eu-ledger`: the one naming rule for a cell's resources."""
        return f"{self.name}-{cell.id}-{what}"

    def table_name(self, cell: Cell) -> str:
        return self.resource_name(cell, "ledger")

    def event_bus_name(self, cell: Cell) -> str:
        return self.resource_name(cell, "events")

    def relay_host(self, cell: Cell) -> str:
        return f"relay.{cell.id}.{self.dns_zone}"


# The relay's mTLS settings (keycell/relay/tls.py) and the JSON field of `relay_tls_secret`
# each comes from; each value may be a PEM itself, as container secrets hand them over.
RELAY_TLS_FIELDS = {
    "KEYCELL_RELAY_TLS_CERT": "cert",
    "KEYCELL_RELAY_TLS_KEY": "key",
    "KEYCELL_RELAY_TLS_CA": "ca",
}


def relay_peers(cells: CellSet, cell: Cell) -> list[str]:
    """host:port of the relays of every other cell (the relay's seeds)."""
    return [f"{cells.relay_host(c)}:{c.relay_port}" for c in cells.cells if c.id != cell.id]


def arm_parameters(cells: CellSet, cell: Cell, **extra: Any) -> dict[str, Any]:
    """The parameters file of `infra/azure/cell.json` for an Azure cell; `extra` supplies
    what the cell set does not hold (hsmAdministrators, functionPackageUrl)."""
    if cell.cloud != "azure":
        raise CellConfigError(f"cell {cell.id} runs on {cell.cloud}, not azure")
    values: dict[str, Any] = {
        "deploymentName": cells.name,
        "cellId": cell.id,
        "location": cell.region,
        "addressSpace": cell.cidr,
        "relayImage": cell.relay_image,
        "relays": cell.relays,
        "relayPort": cell.relay_port,
        "relayPeers": ",".join(relay_peers(cells, cell)),
        "logRetentionDays": min(max(cell.log_retention_days, 30), 730),
        **extra,
    }
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {k: {"value": v} for k, v in values.items()},
    }


def terraform_variables(cells: CellSet, cell: Cell, **extra: Any) -> dict[str, Any]:
    """Variables of the `infra/gcp` module for a GCP cell (a .tfvars.json); `extra`
    supplies what the cell set does not hold (project, vpc_connector)."""
    if cell.cloud != "gcp":
        raise CellConfigError(f"cell {cell.id} runs on {cell.cloud}, not gcp")
    return {
        "deployment_name": cells.name,
        "cell_id": cell.id,
        "region": cell.region,
        "image": cell.relay_image,
        "relays": cell.relays,
        "relay_port": cell.relay_port,
        "relay_peers": relay_peers(cells, cell),
        "api_max_instances": cell.api_reserved_concurrency,
        **({"relay_tls_secret": cell.relay_tls_secret} if cell.relay_tls_secret else {}),
        **extra,
    }


def load_cell_set(path: str | os.PathLike[str] | None = None) -> CellSet:
    """The cell set in `path`, else `$KEYCELL_CELLS`, else the repository's `infra/cells.toml`."""
    chosen = Path(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CellConfigError(f"{chosen}: no such cell set file (set {ENV_CONFIG} or pass a path)") from None
    except tomllib.TOMLDecodeError as exc:
        raise CellConfigError(f"{chosen}: not valid TOML: {exc}") from None
    return parse_cell_set(raw, source=chosen)


def parse_cell_set(raw: Mapping[str, Any], *, source: Path | None = None) -> CellSet:
    where = str(source or "cell set")
    _only(raw, {"deployment", "defaults", "cells"}, where)
    deployment = _table(raw.get("deployment"), f"{where} [deployment]")
    _only(deployment, {"name", "trust_domain", "home_region", "account", "dns_zone", "hosted_zone_id"}, where)
    name = _text(deployment, "name", f"{where} [deployment]")
    if not _NAME.match(name):
        raise CellConfigError(f"{where} [deployment] name {name!r}: use 1-20 lowercase letters, digits, -")
    home = _region(_text(deployment, "home_region", f"{where} [deployment]"), f"{where} [deployment]")
    account = deployment.get("account")
    if account is not None and not (isinstance(account, str) and re.fullmatch(r"\d{12}", account)):
        raise CellConfigError(f"{where} [deployment] account: a 12-digit AWS account id as a string")
    zone_id = deployment.get("hosted_zone_id")
    if zone_id is not None and not (isinstance(zone_id, str) and re.fullmatch(r"Z[A-Z0-9]{5,31}", zone_id)):
        raise CellConfigError(f"{where} [deployment] hosted_zone_id: a Route 53 zone id such as Z0123ABCDEF")

    defaults = _table(raw.get("defaults", {}), f"{where} [defaults]")
    entries = raw.get("cells")
    if not isinstance(entries, list) or not entries:
        raise CellConfigError(f"{where}: at least one [[cells]] entry is needed")
    cells = tuple(
        _cell({**defaults, **_table(entry, f"{where} cell #{n}")}, f"{where} cell #{n}")
        for n, entry in enumerate(entries, 1)
    )
    _distinct(cells, where)
    if not any(c.cloud == "aws" and c.region == home for c in cells) and any(c.cloud == "aws" for c in cells):
        raise CellConfigError(
            f"{where}: home_region {home} has no AWS cell; the global stack lives beside one"
        )
    return CellSet(
        name=name,
        trust_domain=_text(deployment, "trust_domain", f"{where} [deployment]"),
        home_region=home,
        dns_zone=_text(deployment, "dns_zone", f"{where} [deployment]"),
        cells=cells,
        account=account,
        hosted_zone_id=zone_id,
        source=source,
    )


_CELL_FIELDS = {f.name: f for f in fields(Cell)}


def _cell(values: Mapping[str, Any], where: str) -> Cell:
    _only(values, set(_CELL_FIELDS), where)
    for required in ("id", "cloud", "region", "cidr"):
        if required not in values:
            raise CellConfigError(f"{where}: `{required}` is missing")
    where = f"{where} ({values['id']})"
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "rotation_schedules":
            out[key] = _schedules(value, where)
            continue
        default = _CELL_FIELDS[key].default
        expected: type = type(default) if isinstance(default, int | float | str) else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool):
            raise CellConfigError(f"{where} {key}: expected {expected.__name__}, got {value!r}")
        if isinstance(value, int | float) and value <= 0:
            raise CellConfigError(f"{where} {key}: must be positive, got {value!r}")
        out[key] = value
    if not _NAME.match(out["id"]):
        raise CellConfigError(f"{where} id: use 1-20 lowercase letters, digits, -")
    if out["cloud"] not in CLOUDS:
        raise CellConfigError(f"{where} cloud {out['cloud']!r}: one of {', '.join(CLOUDS)}")
    _region(out["region"], where, azure=out["cloud"] == "azure")
    try:
        network = ipaddress.ip_network(out["cidr"])
    except ValueError as exc:
        raise CellConfigError(f"{where} cidr {out['cidr']!r}: not an address range ({exc})") from None
    if not 16 <= network.prefixlen <= 20:
        raise CellConfigError(f"{where} cidr {out['cidr']}: a /16 to /20 leaves room for the subnets")
    custody = out.get("key_custody", "kms")
    if custody not in KEY_CUSTODIES:
        raise CellConfigError(f"{where} key_custody {custody!r}: one of {', '.join(KEY_CUSTODIES)}")
    for key in ("rotation_handler", "revocation_handler"):
        if key in out and not _HANDLER.match(out[key]):
            raise CellConfigError(f"{where} {key} {out[key]!r}: a dotted path module.function")
    if not 1 <= out.get("relay_port", 7946) <= 65535:
        raise CellConfigError(f"{where} relay_port: 1-65535")
    return Cell(**out)


def _schedules(value: Any, where: str) -> tuple[RotationSchedule, ...]:
    if not isinstance(value, list):
        raise CellConfigError(f"{where} rotation_schedules: a list of tables")
    out = []
    for n, entry in enumerate(value, 1):
        here = f"{where} rotation_schedules #{n}"
        table = _table(entry, here)
        _only(table, {"name", "expression", "prefix"}, here)
        schedule = RotationSchedule(
            _text(table, "name", here), _text(table, "expression", here), str(table.get("prefix", ""))
        )
        if not _NAME.match(schedule.name):
            raise CellConfigError(f"{here} name {schedule.name!r}: use 1-20 lowercase letters, digits, -")
        if not _SCHEDULE.match(schedule.expression):
            raise CellConfigError(f"{here} expression {schedule.expression!r}: rate(...) or cron(6 fields)")
        out.append(schedule)
    if len({s.name for s in out}) != len(out):
        raise CellConfigError(f"{where} rotation_schedules: names must differ")
    return tuple(out)


def _distinct(cells: tuple[Cell, ...], where: str) -> None:
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise CellConfigError(f"{where}: cell ids must differ ({', '.join(ids)})")
    placed = [(c.cloud, c.region) for c in cells]
    if len(set(placed)) != len(placed):
        raise CellConfigError(f"{where}: one cell per cloud region")
    networks = [(c.id, ipaddress.ip_network(c.cidr)) for c in cells]
    for i, (a, net_a) in enumerate(networks):
        for b, net_b in networks[i + 1 :]:
            if net_a.overlaps(net_b):
                raise CellConfigError(
                    f"{where}: cells {a} and {b} have overlapping cidr; relays peer across them"
                )


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CellConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CellConfigError(f"{where}: expected a table")
    return cast(dict[str, Any], value)


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise CellConfigError(f"{where}: `{key}` must be a non-empty string")
    return value


def _region(value: str, where: str, *, azure: bool = False) -> str:
    if not (_AZURE_REGION if azure else _REGION).match(value):
        raise CellConfigError(f"{where}: region {value!r} does not look like a region name")
    return value

"""sys/: init, seal status, unseal, seal, health, rekey (Vault's shapes and codes).

These are the routes a sealed cell answers; all but `sys/seal` are unauthenticated,
as in Vault (shares, not tokens, are the credential)."""

from __future__ import annotations

import time
from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.router import (
    Context,
    Operation,
    OperationDoc,
    Result,
    RouteDoc,
    Router,
    field_bool,
    field_int,
    field_str,
)
from keycell.control_plane.routes.openapi import (
    BOOL,
    ERROR,
    ERROR_STATUSES,
    INT,
    NO_CONTENT,
    STR,
    STR_LIST,
    obj,
)
from keycell.control_plane.seal import (
    AlreadyInitializedError,
    InitResult,
    NonceMismatchError,
    NotInitializedError,
    RekeyStatus,
    SealError,
    SealMode,
    SealStatus,
    ShareError,
    UnsealError,
)
from keycell.control_plane.services import VERSION


def register(router: Router, services: Any) -> None:
    seal = services.seal

    def seal_status_body(status: SealStatus) -> dict[str, Any]:
        return {
            "type": "shamir",
            "initialized": status.initialized,
            "sealed": status.sealed,
            "t": status.threshold,
            "n": status.shares,
            "progress": status.progress,
            "nonce": status.nonce,
            "version": VERSION,
            # Vault names its build's date build_date, OpenBao commit_date; Keycell's
            # packages carry no build stamp, so both say "" (not known), as a dev build does
            "build_date": "",
            "commit_date": "",
            "migration": False,
            "recovery_seal": status.mode is SealMode.HSM,
            "storage_type": type(services.ledger).__name__,
            "cluster_name": services.config.cluster_name if status.initialized and not status.sealed else "",
            "cluster_id": services.config.cell_id if status.initialized and not status.sealed else "",
        }

    def init_status(ctx: Context) -> Result:
        return Result(raw={"initialized": seal.status().initialized})

    def init(ctx: Context) -> Result:
        data = ctx.data
        hsm = services.config.hsm_seal
        shares = field_int(data, "recovery_shares" if hsm else "secret_shares")
        threshold = field_int(data, "recovery_threshold" if hsm else "secret_threshold")
        if hsm and shares is None:  # Vault's clients often send secret_* for recovery seals too
            shares, threshold = field_int(data, "secret_shares"), field_int(data, "secret_threshold")
        if shares is None or threshold is None:
            raise InvalidRequest("secret_shares and secret_threshold are required")
        try:
            result: InitResult = seal.init(shares, threshold)
        except AlreadyInitializedError as exc:
            raise InvalidRequest(str(exc)) from None
        except ShareError as exc:
            raise InvalidRequest(str(exc)) from None
        if hsm:
            services.after_unseal()
            body = {
                "keys": [],
                "keys_base64": [],
                "recovery_keys": result.shares_hex,
                "recovery_keys_base64": result.shares_base64,
                "root_token": result.root_token,
            }
        else:
            body = {
                "keys": result.shares_hex,
                "keys_base64": result.shares_base64,
                "root_token": result.root_token,
            }
        return Result(raw=body)

    def seal_status(ctx: Context) -> Result:
        return Result(raw=seal_status_body(seal.status()))

    def unseal(ctx: Context) -> Result:
        data = ctx.data
        try:
            if field_bool(data, "reset"):
                return Result(raw=seal_status_body(seal.unseal_reset()))
            key = field_str(data, "key")
            if not key:
                raise InvalidRequest("'key' (an unseal key share, hex or base64) is required")
            status = seal.unseal(key)
        except NotInitializedError as exc:
            raise InvalidRequest(str(exc)) from None
        except (ShareError, UnsealError, NonceMismatchError, SealError) as exc:
            raise InvalidRequest(str(exc)) from None
        if not status.sealed:
            services.after_unseal()
        return Result(raw=seal_status_body(status))

    def seal_now(ctx: Context) -> None:
        seal.seal()

    def health(ctx: Context) -> Result:
        query = ctx.request.query
        status = seal.status()
        if not status.initialized:
            code = health_code(query, "uninitcode", 501)
        elif status.sealed:
            code = health_code(query, "sealedcode", 503)
        else:
            code = health_code(query, "activecode", 200)
        body = {
            "initialized": status.initialized,
            "sealed": status.sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VERSION,
            "cluster_name": services.config.cluster_name,
            "cluster_id": services.config.cell_id,
        }
        if code in (204, 304):  # statuses without a body (Go's net/http drops Vault's there too)
            return Result(status=code)
        return Result(raw=body, status=code)

    def health_code(query: Any, name: str, default: int) -> int:
        """A status code the client chose for this state, as Vault's sys/health allows."""
        text = query.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit() and 200 <= int(text) <= 599):
            raise InvalidRequest(f"{name!r} must be an HTTP status code from 200 to 599")
        return int(text)

    def rekey_body(status: RekeyStatus) -> dict[str, Any]:
        return {
            "started": status.started,
            "nonce": status.nonce,
            "t": status.new_threshold,
            "n": status.new_shares,
            "progress": status.progress,
            "required": status.required,
            "pgp_fingerprints": None,
            "backup": False,
            "verification_required": False,
        }

    def rekey_status(ctx: Context) -> Result:
        try:
            return Result(raw=rekey_body(seal.rekey_status()))
        except NotInitializedError as exc:
            raise InvalidRequest(str(exc)) from None

    def rekey_start(ctx: Context) -> Result:
        shares, threshold = field_int(ctx.data, "secret_shares"), field_int(ctx.data, "secret_threshold")
        if shares is None or threshold is None:
            raise InvalidRequest("secret_shares and secret_threshold are required")
        try:
            return Result(raw=rekey_body(seal.rekey_start(shares, threshold)))
        except (NotInitializedError, ShareError, SealError) as exc:
            raise InvalidRequest(str(exc)) from None

    def rekey_cancel(ctx: Context) -> None:
        seal.rekey_cancel()

    def rekey_update(ctx: Context) -> Result:
        key, nonce = field_str(ctx.data, "key"), field_str(ctx.data, "nonce")
        if not key or not nonce:
            raise InvalidRequest("'key' and 'nonce' are required")
        try:
            outcome = seal.rekey_submit(key, nonce)
        except (NotInitializedError, ShareError, UnsealError, NonceMismatchError, SealError) as exc:
            raise InvalidRequest(str(exc)) from None
        if isinstance(outcome, RekeyStatus):
            return Result(raw=rekey_body(outcome))
        return Result(
            raw={
                "nonce": nonce,
                "complete": True,
                "keys": outcome.shares_hex,
                "keys_base64": outcome.shares_base64,
                "pgp_fingerprints": None,
                "backup": False,
                "verification_required": False,
            }
        )

    router.add(
        r"sys/init",
        {Operation.READ: init_status, Operation.UPDATE: init},
        authenticated=False,
        doc=RouteDoc(
            "/sys/init",
            "Initialization: create the root key and hand out its shares, once.",
            operations={
                Operation.READ: OperationDoc(
                    "Whether the cell is initialized", responses={200: _INIT_STATUS}
                ),
                Operation.UPDATE: OperationDoc(
                    "Initialize the cell",
                    "Shamir seal: `secret_shares`/`secret_threshold`. HSM seal: the shares are recovery "
                    "keys (`recovery_shares`/`recovery_threshold`; `secret_*` is accepted too).",
                    body=_INIT_REQUEST,
                    body_required=True,
                    responses={200: _INIT_RESULT},
                ),
            },
        ),
    )
    router.add(
        r"sys/seal-status",
        {Operation.READ: seal_status},
        authenticated=False,
        doc=RouteDoc(
            "/sys/seal-status",
            "Seal status.",
            operations={Operation.READ: OperationDoc("Read the seal status", responses={200: _SEAL_STATUS})},
        ),
    )
    router.add(
        r"sys/unseal",
        {Operation.UPDATE: unseal},
        authenticated=False,
        doc=RouteDoc(
            "/sys/unseal",
            "Unseal with key shares, one per request, until the threshold.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Submit an unseal key share (or reset the attempt)",
                    body=obj({"key": STR, "reset": BOOL, "nonce": STR}),
                    body_required=True,
                    responses={200: _SEAL_STATUS},
                )
            },
        ),
    )
    router.add(
        r"sys/seal",
        {Operation.UPDATE: seal_now},
        sudo=True,
        doc=RouteDoc(
            "/sys/seal",
            "Seal the cell.",
            operations={Operation.UPDATE: OperationDoc("Seal", responses=NO_CONTENT)},
        ),
    )
    router.add(
        r"sys/health",
        {Operation.READ: health},
        authenticated=False,
        doc=RouteDoc(
            "/sys/health",
            "Health: the status code says initialized/sealed/active; each code can be chosen by the client.",
            operations={
                Operation.READ: OperationDoc(
                    "Check health",
                    query={name: _STATUS_CODE for name in _HEALTH_CODES},
                    # A status the client chose may be any of the error statuses too.
                    responses={
                        200: _HEALTH,
                        204: None,
                        304: None,
                        **{status: {"anyOf": [_HEALTH, ERROR]} for status in ERROR_STATUSES},
                        "default": _HEALTH,
                    },
                )
            },
        ),
    )
    router.add(
        r"sys/rekey/init",
        {Operation.READ: rekey_status, Operation.UPDATE: rekey_start, Operation.DELETE: rekey_cancel},
        authenticated=False,
        doc=RouteDoc(
            "/sys/rekey/init",
            "Rekey: new shares for the root key (recovery keys under an HSM seal).",
            operations={
                Operation.READ: OperationDoc("Read the rekey progress", responses={200: _REKEY_STATUS}),
                Operation.UPDATE: OperationDoc(
                    "Start a rekey",
                    body=obj({"secret_shares": _SHARES, "secret_threshold": _SHARES}),
                    body_required=True,
                    responses={200: _REKEY_STATUS},
                ),
                Operation.DELETE: OperationDoc("Cancel the rekey", responses=NO_CONTENT),
            },
        ),
    )
    router.add(
        r"sys/rekey/update",
        {Operation.UPDATE: rekey_update},
        authenticated=False,
        doc=RouteDoc(
            "/sys/rekey/update",
            "Rekey: submit a current share.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Submit a share for the rekey",
                    body=obj({"key": STR, "nonce": STR}, ("key", "nonce")),
                    body_required=True,
                    responses={200: {"anyOf": [_REKEY_STATUS, _REKEY_DONE]}},
                )
            },
        ),
    )


# --- documentation (sys/openapi) -------------------------------------------------------------

_SHARES = {"type": "integer", "minimum": 1, "maximum": 255}
_INIT_REQUEST = obj(
    {
        "secret_shares": _SHARES,
        "secret_threshold": _SHARES,
        "recovery_shares": _SHARES,
        "recovery_threshold": _SHARES,
    }
)
_INIT_STATUS = obj({"initialized": BOOL}, ("initialized",))
_INIT_RESULT = obj(
    {
        "keys": STR_LIST,
        "keys_base64": STR_LIST,
        "recovery_keys": STR_LIST,
        "recovery_keys_base64": STR_LIST,
        "root_token": STR,
    },
    ("keys", "keys_base64", "root_token"),
)
_SEAL_STATUS = obj(
    {
        "type": STR,
        "initialized": BOOL,
        "sealed": BOOL,
        "t": INT,
        "n": INT,
        "progress": INT,
        "nonce": STR,
        "version": STR,
        "build_date": STR,
        "commit_date": STR,
        "migration": BOOL,
        "recovery_seal": BOOL,
        "storage_type": STR,
        "cluster_name": STR,
        "cluster_id": STR,
    },
    ("type", "initialized", "sealed", "t", "n", "progress", "nonce", "version"),
)
_HEALTH_CODES = ("activecode", "sealedcode", "uninitcode")
_STATUS_CODE = {"type": "integer", "minimum": 200, "maximum": 599}
_HEALTH = obj(
    {
        "initialized": BOOL,
        "sealed": BOOL,
        "standby": BOOL,
        "performance_standby": BOOL,
        "replication_performance_mode": STR,
        "replication_dr_mode": STR,
        "server_time_utc": INT,
        "version": STR,
        "cluster_name": STR,
        "cluster_id": STR,
    },
    ("initialized", "sealed", "standby", "server_time_utc", "version"),
)
_REKEY_STATUS = obj(
    {
        "started": BOOL,
        "nonce": STR,
        "t": INT,
        "n": INT,
        "progress": INT,
        "required": INT,
        "pgp_fingerprints": {"type": "null"},
        "backup": BOOL,
        "verification_required": BOOL,
    },
    ("started", "nonce", "t", "n", "progress", "required"),
)
_REKEY_DONE = obj(
    {"nonce": STR, "complete": BOOL, "keys": STR_LIST, "keys_base64": STR_LIST},
    ("nonce", "complete", "keys", "keys_base64"),
)

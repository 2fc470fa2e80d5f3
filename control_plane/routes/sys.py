"""sys/: init, seal status, unseal, seal, health, rekey (Vault's shapes and codes).

These are the routes a sealed cell answers; all but `sys/seal` are unauthenticated,
as in Vault (shares, not tokens, are the credential)."""

from __future__ import annotations

import time
from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.router import Context, Operation, Result, Router, field_bool, field_int, field_str
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
            "build_date": "",
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
            code = int(query.get("uninitcode", 501))
        elif status.sealed:
            code = int(query.get("sealedcode", 503))
        else:
            code = int(query.get("activecode", 200))
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
        return Result(raw=body, status=code)

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

    router.add(r"sys/init", {Operation.READ: init_status, Operation.UPDATE: init}, authenticated=False)
    router.add(r"sys/seal-status", {Operation.READ: seal_status}, authenticated=False)
    router.add(r"sys/unseal", {Operation.UPDATE: unseal}, authenticated=False)
    router.add(r"sys/seal", {Operation.UPDATE: seal_now}, sudo=True)
    router.add(r"sys/health", {Operation.READ: health}, authenticated=False)
    router.add(
        r"sys/rekey/init",
        {Operation.READ: rekey_status, Operation.UPDATE: rekey_start, Operation.DELETE: rekey_cancel},
        authenticated=False,
    )
    router.add(r"sys/rekey/update", {Operation.UPDATE: rekey_update}, authenticated=False)

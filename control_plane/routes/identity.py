"""identity/*: the trust domain over the regional API (registration entries, node
attestation, what an attested agent fetches and has signed, authorities, revocation)."""

from __future__ import annotations

import json
from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.identity import AGENT_POLICY, AGENT_POLICY_TEXT, AGENT_TOKEN_TTL, AttestedAgent
from keycell.control_plane.router import Context, Operation, OperationDoc, Result, RouteDoc, Router
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    AUTH_RESPONSE,
    INT,
    KEYS,
    NO_CONTENT,
    STR,
    STR_LIST,
    STR_LIST_OR_CSV,
    obj,
    ok,
)
from keycell.control_plane.svid import JwtSvidError

_ENTRY = obj(
    {
        "id": STR,
        "spiffe_id": STR,
        "parent_id": STR,
        "selectors": STR_LIST,
        "x509_svid_ttl": INT,
        "jwt_svid_ttl": INT,
        "admin": {"type": "boolean"},
        "downstream": {"type": "boolean"},
    },
    ("id", "spiffe_id", "parent_id", "selectors"),
)
_ENTRY_BODY = obj(
    {
        "spiffe_id": STR,
        "parent_id": STR,
        "selectors": STR_LIST_OR_CSV,
        "x509_svid_ttl": INT,
        "jwt_svid_ttl": INT,
        "admin": {"type": "boolean"},
        "downstream": {"type": "boolean"},
    },
    ("spiffe_id", "parent_id", "selectors"),
)


def _entry_data(entry: Any) -> dict[str, Any]:
    record = entry.to_record()
    record.pop("created_at", None)
    return dict(record)


def register(router: Router, services: Any) -> None:
    identity = services.identity

    def agent_of(ctx: Context) -> AttestedAgent:
        agent_id = (ctx.entry.meta or {}).get("spiffe_agent_id") if ctx.entry is not None else None
        if not agent_id:
            raise PermissionDenied(
                "permission denied: only an attested agent's token may call identity/agent/*"
            )
        return identity.agent(agent_id)  # type: ignore[no-any-return]

    # --- administration -----------------------------------------------------------------

    def entries_list(ctx: Context) -> dict[str, Any]:
        entries = identity.list_entries()
        return {"keys": [e.id for e in entries], "entries": [_entry_data(e) for e in entries]}

    def entries_create(ctx: Context) -> dict[str, Any]:
        return _entry_data(identity.create_entry(ctx.data))

    def entry_read(ctx: Context) -> dict[str, Any]:
        return _entry_data(identity.get_entry(ctx.params["id"]))

    def entry_delete(ctx: Context) -> None:
        identity.delete_entry(ctx.params["id"])

    router.add(
        r"identity/entries/?",
        {Operation.LIST: entries_list, Operation.UPDATE: entries_create},
        family="identity",
        doc=RouteDoc(
            "/identity/entries",
            "SPIFFE registration entries.",
            operations={
                Operation.LIST: OperationDoc("List registration entries", responses=ok(KEYS)),
                Operation.UPDATE: OperationDoc(
                    "Create a registration entry", body=_ENTRY_BODY, body_required=True, responses=ok(_ENTRY)
                ),
            },
        ),
    )
    router.add(
        r"identity/entries/(?P<id>[^/]+)",
        {Operation.READ: entry_read, Operation.DELETE: entry_delete},
        family="identity",
        doc=RouteDoc(
            "/identity/entries/{id}",
            "One registration entry.",
            params={"id": "The entry's id (a UUID)."},
            operations={
                Operation.READ: OperationDoc("Read a registration entry", responses=ok(_ENTRY)),
                Operation.DELETE: OperationDoc("Delete a registration entry", responses=NO_CONTENT),
            },
        ),
    )

    def config_write(ctx: Context) -> None:
        identity.write_config(ctx.data)

    router.add(
        r"identity/config",
        {Operation.UPDATE: config_write},
        family="identity",
        doc=RouteDoc(
            "/identity/config",
            "Node attestor settings (AWS instance identity certificate, Kubernetes clusters).",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Configure node attestors",
                    body=obj({"aws_iid": ANY_OBJECT, "k8s_psat": ANY_OBJECT, "tpm": ANY_OBJECT}),
                    body_required=True,
                    responses=NO_CONTENT,
                )
            },
        ),
    )

    def join_token(ctx: Context) -> dict[str, Any]:
        token, agent_id = identity.create_join_token(ctx.data.get("ttl"))
        return {"token": token, "agent_id": agent_id}

    router.add(
        r"identity/join-token",
        {Operation.UPDATE: join_token},
        family="identity",
        wrappable=True,
        doc=RouteDoc(
            "/identity/join-token",
            "A one-time join token for node attestation.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Create a join token",
                    body=obj({"ttl": INT}),
                    responses=ok(obj({"token": STR, "agent_id": STR}, ("token", "agent_id"))),
                )
            },
        ),
    )

    agent_policy_checked = False

    def attest(ctx: Context) -> Result:
        nonlocal agent_policy_checked
        agent = identity.attest(ctx.data)
        if not agent_policy_checked:  # once per process, not a read on every attestation
            try:
                current = services.policies.read(AGENT_POLICY)["policy"]
            except NotFound:
                current = None
            if current != AGENT_POLICY_TEXT:  # missing, or an older release's
                services.policies.write(AGENT_POLICY, AGENT_POLICY_TEXT)
            agent_policy_checked = True
        token, entry = services.tokens.create(
            None,
            policies=[AGENT_POLICY],
            ttl=AGENT_TOKEN_TTL,
            no_default_policy=True,
            display_name=f"agent-{agent.method}",
            meta={"spiffe_agent_id": agent.agent_id, "selectors": json.dumps(list(agent.selectors))},
            path="identity/attest",
        )
        auth = services.tokens.auth_data(token, entry)
        return Result(auth=auth, data={"agent_id": agent.agent_id, "selectors": list(agent.selectors)})

    router.add(
        r"identity/attest",
        {Operation.UPDATE: attest},
        authenticated=False,
        wrappable=False,
        family="identity",
        doc=RouteDoc(
            "/identity/attest",
            "Node attestation: an agent trades evidence for a token bound to its agent ID.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Attest a node",
                    body=obj(
                        {
                            "method": STR,
                            "token": STR,
                            "document": STR,
                            "signature": STR,
                            "cluster": STR,
                            "challenge_id": STR,
                            "secret": STR,
                        },
                        ("method",),
                    ),
                    body_required=True,
                    responses=AUTH_RESPONSE,
                )
            },
        ),
    )

    def tpm_challenge(ctx: Context) -> dict[str, Any]:
        return identity.tpm_challenge(ctx.data)  # type: ignore[no-any-return]

    router.add(
        r"identity/attest/tpm-challenge",
        {Operation.UPDATE: tpm_challenge},
        authenticated=False,
        wrappable=False,
        family="identity",
        doc=RouteDoc(
            "/identity/attest/tpm-challenge",
            "TPM attestation, first step: a credential only the TPM holding both keys can activate.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Ask for a TPM credential-activation challenge",
                    body=obj({"ek_public": STR, "ak_public": STR}, ("ek_public", "ak_public")),
                    body_required=True,
                    responses=ok(
                        obj(
                            {"challenge_id": STR, "credential_blob": STR, "encrypted_secret": STR},
                            ("challenge_id", "credential_blob", "encrypted_secret"),
                        )
                    ),
                )
            },
        ),
    )

    def bundle(ctx: Context) -> Result:
        return Result(raw=identity.ca.authorities().bundle())

    router.add(
        r"identity/bundle",
        {Operation.READ: bundle},
        authenticated=False,
        wrappable=False,
        family="identity",
        doc=RouteDoc(
            "/identity/bundle",
            "The trust domain bundle (a SPIFFE JWKS).",
            operations={
                Operation.READ: OperationDoc(
                    "Read the trust domain bundle",
                    responses={200: obj({"keys": {"type": "array"}, "spiffe_sequence": INT}, ("keys",))},
                )
            },
        ),
    )

    def authorities_list(ctx: Context) -> dict[str, Any]:
        state = identity.ca.authorities()
        return {
            "trust_domain": state.trust_domain,
            "sequence": state.sequence,
            "keys": [a.id for a in state.authorities],
            "authorities": [
                {"id": a.id, "state": a.state.value, "kid": a.jwt_kid} for a in state.authorities
            ],
        }

    def authority_action(ctx: Context) -> dict[str, Any]:
        action = ctx.data.get("action")
        ca = identity.ca
        if action == "prepare":
            a = ca.prepare()
        elif action == "activate":
            a = ca.activate()
        elif action in ("taint", "revoke"):
            target = ctx.data.get("authority")
            if not isinstance(target, str) or not target:
                raise InvalidRequest(
                    f'{action} names an authority: {{"action": "{action}", "authority": "a1"}}'
                )
            a = ca.taint(target) if action == "taint" else ca.revoke(target)
        else:
            raise InvalidRequest("action is prepare, activate, taint or revoke")
        return {"id": a.id, "state": a.state.value}

    router.add(
        r"identity/authorities/?",
        {Operation.READ: authorities_list, Operation.UPDATE: authority_action},
        family="identity",
        doc=RouteDoc(
            "/identity/authorities",
            "The trust domain's signing authorities: list them, or move one through "
            "prepared -> active -> old -> tainted -> revoked.",
            operations={
                Operation.READ: OperationDoc("List authorities", responses=ok(KEYS)),
                Operation.UPDATE: OperationDoc(
                    "Prepare, activate, taint or revoke an authority",
                    body=obj(
                        {
                            "action": {"type": "string", "enum": ["prepare", "activate", "taint", "revoke"]},
                            "authority": STR,
                        },
                        ("action",),
                    ),
                    body_required=True,
                    responses=ok(obj({"id": STR, "state": STR}, ("id", "state"))),
                ),
            },
        ),
    )

    def revoke(ctx: Context) -> dict[str, Any]:
        subject = identity.revoke(spiffe_id=ctx.data.get("spiffe_id"), svid=ctx.data.get("svid"))
        return {"revoked": subject}

    router.add(
        r"identity/revoke",
        {Operation.UPDATE: revoke},
        family="identity",
        doc=RouteDoc(
            "/identity/revoke",
            "Revoke a SPIFFE ID or one SVID.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Revoke a SPIFFE ID or an SVID",
                    body=obj({"spiffe_id": STR, "svid": STR}),
                    body_required=True,
                    responses=ok(obj({"revoked": STR}, ("revoked",))),
                )
            },
        ),
    )

    def validate(ctx: Context) -> dict[str, Any]:
        audience = ctx.data.get("audience")
        if not isinstance(audience, str) or not audience:
            raise InvalidRequest("audience is required")
        try:
            checked = identity.validate_jwt(ctx.data.get("svid"), audience)
        except JwtSvidError as exc:
            raise InvalidRequest(str(exc)) from None
        return {"spiffe_id": checked.spiffe_id, "claims": checked.claims}

    router.add(
        r"identity/validate",
        {Operation.UPDATE: validate},
        family="identity",
        doc=RouteDoc(
            "/identity/validate",
            "Validate a JWT-SVID against the trust domain's bundle and revocations.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Validate a JWT-SVID",
                    body=obj({"svid": STR, "audience": STR}, ("svid", "audience")),
                    body_required=True,
                    responses=ok(obj({"spiffe_id": STR, "claims": ANY_OBJECT}, ("spiffe_id",))),
                )
            },
        ),
    )

    # --- what an attested agent calls ----------------------------------------------------------

    def agent_sync(ctx: Context) -> dict[str, Any]:
        return identity.sync(agent_of(ctx))  # type: ignore[no-any-return]

    def agent_x509(ctx: Context) -> dict[str, Any]:
        entry_id = ctx.data.get("entry_id")
        if not isinstance(entry_id, str):
            raise InvalidRequest("entry_id is required")
        return identity.sign_x509(agent_of(ctx), entry_id, ctx.data.get("csr"))  # type: ignore[no-any-return]

    def agent_jwt(ctx: Context) -> dict[str, Any]:
        entry_id = ctx.data.get("entry_id")
        if not isinstance(entry_id, str):
            raise InvalidRequest("entry_id is required")
        return identity.sign_jwt(agent_of(ctx), entry_id, ctx.data.get("audience"))  # type: ignore[no-any-return]

    router.add(
        r"identity/agent/sync",
        {Operation.READ: agent_sync},
        family="identity",
        wrappable=False,
        doc=RouteDoc(
            "/identity/agent/sync",
            "An attested agent's entries, bundle, authorities and revocations.",
            operations={
                Operation.READ: OperationDoc("Sync an agent", responses=ok(ANY_OBJECT)),
            },
        ),
    )
    router.add(
        r"identity/agent/x509",
        {Operation.UPDATE: agent_x509},
        family="identity",
        wrappable=False,
        doc=RouteDoc(
            "/identity/agent/x509",
            "Sign an X.509-SVID for an entry the agent serves, from a CSR.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Sign an X.509-SVID",
                    body=obj({"entry_id": STR, "csr": STR}, ("entry_id", "csr")),
                    body_required=True,
                    responses=ok(ANY_OBJECT),
                )
            },
        ),
    )
    router.add(
        r"identity/agent/jwt",
        {Operation.UPDATE: agent_jwt},
        family="identity",
        wrappable=False,
        doc=RouteDoc(
            "/identity/agent/jwt",
            "Sign a JWT-SVID for an entry the agent serves.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Sign a JWT-SVID",
                    body=obj({"entry_id": STR, "audience": STR_LIST_OR_CSV}, ("entry_id", "audience")),
                    body_required=True,
                    responses=ok(ANY_OBJECT),
                )
            },
        ),
    )

"""TPM node attestation, the agent's side, with tpm2-pytss (optional: `uv sync --group tpm`,
which needs the Debian package libtss2-dev to build; swtpm serves a software TPM).

The agent creates its TPM's endorsement key (the TCG "L-1" RSA-2048 template) and a
restricted RSA signing attestation key, sends both public areas for a challenge, and
answers it with TPM2_ActivateCredential, which only the TPM holding both keys can do
(see `keycell.control_plane.tpm` for the cell's side).

`tcti` names the TPM: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0`, ...
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any


def tpm_attestation(tcti: str, challenge: Callable[[dict[str, str]], dict[str, Any]]) -> dict[str, str]:
    """Run the TPM side of attestation; `challenge` posts the public areas and returns the
    cell's challenge. Returns the evidence to attest with."""
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
    from tpm2_pytss.internal.templates import ek_rsa2048
    from tpm2_pytss.types import (
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMT_SYM_DEF,
    )

    name, _, conf = tcti.partition(":")
    with ESAPI(TCTILdr(name, conf)) as tpm:
        handles: list[Any] = []  # flushed whatever happens: a TPM holds only a few objects
        try:
            ek, ek_public, _, _, _ = tpm.create_primary(
                TPM2B_SENSITIVE_CREATE(), ek_rsa2048.template, primary_handle=ESYS_TR.ENDORSEMENT
            )
            handles.append(ek)
            ak_template = TPM2B_PUBLIC.parse(
                "rsa2048:rsassa-sha256:null",
                objectAttributes=TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.SENSITIVEDATAORIGIN
                | TPMA_OBJECT.USERWITHAUTH
                | TPMA_OBJECT.RESTRICTED
                | TPMA_OBJECT.SIGN_ENCRYPT,
            )
            ak, ak_public, _, _, _ = tpm.create_primary(
                TPM2B_SENSITIVE_CREATE(), ak_template, primary_handle=ESYS_TR.OWNER
            )
            handles.append(ak)
            answer = challenge(
                {
                    "ek_public": base64.b64encode(ek_public.marshal()).decode(),
                    "ak_public": base64.b64encode(ak_public.marshal()).decode(),
                }
            )
            # The EK's policy requires the endorsement hierarchy's authorization (PolicySecret).
            session = tpm.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            handles.append(session)
            tpm.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            secret = tpm.activate_credential(
                ak,
                ek,
                TPM2B_ID_OBJECT(credential=base64.b64decode(answer["credential_blob"])),
                TPM2B_ENCRYPTED_SECRET(secret=base64.b64decode(answer["encrypted_secret"])),
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        finally:
            for handle in reversed(handles):
                tpm.flush_context(handle)
    return {
        "method": "tpm",
        "challenge_id": str(answer["challenge_id"]),
        "secret": base64.b64encode(bytes(secret)).decode(),
    }


def endorsement_key_hash(tcti: str) -> str:
    """The SHA-256 (hex) of this TPM's EK public key, as the operator registers it
    (identity/config {"tpm": {"ek_hashes": [...]}})."""
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.internal.templates import ek_rsa2048
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    from keycell.control_plane.tpm import parse_public

    name, _, conf = tcti.partition(":")
    with ESAPI(TCTILdr(name, conf)) as tpm:
        ek, ek_public, _, _, _ = tpm.create_primary(
            TPM2B_SENSITIVE_CREATE(), ek_rsa2048.template, primary_handle=ESYS_TR.ENDORSEMENT
        )
        tpm.flush_context(ek)
    return parse_public(ek_public.marshal()).key_hash

"""Corrections that make the moto server behave as the documented AWS services do,
where Keycell depends on the difference. Applied inside the moto server process only
(`keycell.testing.moto_server`), never to a client.

Each correction names the documented behaviour it restores:

- DynamoDB, "Item sizes": a binary attribute counts its raw bytes; moto counts its
  base64 text, a third more, and refuses items the service accepts.
- KMS, Sign/Verify with MessageType=DIGEST: the message *is* the digest; moto hashes
  it again, so its signatures do not verify anywhere else.
- KMS, "Key states and their effect": a Disabled key refuses cryptographic
  operations (DisabledException), a PendingDeletion one too (KMSInvalidStateException);
  moto sets the state and ignores it.
- KMS, Decrypt: a ciphertext made under another key than the KeyId named is
  IncorrectKeyException, an unknown or damaged one InvalidCiphertextException; moto
  answers AccessDeniedException.
- KMS, Verify: an invalid signature raises KMSInvalidSignatureException; moto
  answers SignatureValid=false.
- KMS, Encrypt: a key whose usage is not ENCRYPT_DECRYPT is InvalidKeyUsageException.
- Secrets Manager, GetSecretValue without a version reads the AWSCURRENT version;
  after UpdateSecretVersionStage moved AWSCURRENT (how every rotation Lambda
  finishes), moto keeps serving the old version.
"""

from __future__ import annotations

import base64
import threading
from typing import Any


def apply_all() -> None:
    count_binary_as_dynamodb_does()
    make_kms_honour_states_and_digests()
    make_secretsmanager_read_awscurrent()


def make_secretsmanager_read_awscurrent() -> None:
    from moto.secretsmanager.models import SecretsManagerBackend

    moto_update = SecretsManagerBackend.update_secret_version_stage

    def update_secret_version_stage(
        self: SecretsManagerBackend,
        secret_id: str,
        version_stage: str,
        remove_from_version_id: str,
        move_to_version_id: str,
    ) -> tuple[str, str]:
        result = moto_update(self, secret_id, version_stage, remove_from_version_id, move_to_version_id)
        if version_stage == "AWSCURRENT" and move_to_version_id:
            self.secrets[secret_id].set_default_version_id(move_to_version_id)  # type: ignore[union-attr]
        return result

    SecretsManagerBackend.update_secret_version_stage = update_secret_version_stage  # type: ignore[method-assign]


def count_binary_as_dynamodb_does() -> None:
    from moto.dynamodb.models.dynamo_type import DynamoType

    moto_size = DynamoType.size

    def size(self: DynamoType) -> int:
        if self.type == "B":
            raw = self.value
            return len(raw) if isinstance(raw, bytes) else len(base64.b64decode(raw))
        return moto_size(self)

    DynamoType.size = size  # type: ignore[method-assign]


def make_kms_honour_states_and_digests() -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from moto.core.exceptions import JsonRESTError
    from moto.kms import utils as kms_utils
    from moto.kms.models import KmsBackend
    from moto.kms.responses import KmsResponse

    request = threading.local()  # MessageType of the request being served

    def usable(key: Any) -> None:
        if key.key_state == "Disabled":
            raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state != "Enabled":
            raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is {key.key_state}.")

    def prehashed_scheme(key: Any, algorithm: str) -> tuple[Any, Any]:
        digest = Prehashed(hashes.SHA256())
        if algorithm == "ECDSA_SHA_256":
            return key.private_key.private_key, (ec.ECDSA(digest),)
        if algorithm == "RSASSA_PKCS1_V1_5_SHA_256":
            return key.private_key.private_key, (padding.PKCS1v15(), digest)
        raise JsonRESTError("ValidationException", f"DIGEST signing with {algorithm} is not emulated")

    encrypt, decrypt = KmsBackend.encrypt, KmsBackend.decrypt
    sign, verify, get_public_key = KmsBackend.sign, KmsBackend.verify, KmsBackend.get_public_key

    # Parameter names are moto's: its handlers call these by keyword.
    def checked_encrypt(
        self: KmsBackend, key_id: str, plaintext: bytes, encryption_context: dict[str, str]
    ) -> Any:
        key = self.keys[self.any_id_to_key_id(key_id)]
        usable(key)
        if key.key_usage != "ENCRYPT_DECRYPT":
            raise JsonRESTError("InvalidKeyUsageException", f"{key.arn} is not an ENCRYPT_DECRYPT key.")
        return encrypt(self, key_id, plaintext, encryption_context)

    def checked_decrypt(
        self: KmsBackend,
        ciphertext_blob: bytes,
        encryption_context: dict[str, str],
        key_id: str | None = None,
    ) -> Any:
        try:
            made_by = kms_utils._deserialize_ciphertext_blob(ciphertext_blob).key_id
        except Exception:
            raise JsonRESTError("InvalidCiphertextException", "The ciphertext is invalid.") from None
        if made_by not in self.keys:
            raise JsonRESTError("InvalidCiphertextException", "The ciphertext is invalid.")
        if key_id is not None and self.any_id_to_key_id(key_id) != made_by:
            raise JsonRESTError("IncorrectKeyException", "The ciphertext was made under another key.")
        usable(self.keys[made_by])
        return decrypt(self, ciphertext_blob, encryption_context, key_id)

    def checked_sign(self: KmsBackend, key_id: str, message: bytes, signing_algorithm: str) -> Any:
        key = self.describe_key(key_id)
        usable(key)
        if not getattr(request, "digest", False):
            return sign(self, key_id, message, signing_algorithm)
        private, scheme = prehashed_scheme(key, signing_algorithm)
        return key.arn, private.sign(message, *scheme), signing_algorithm

    def checked_verify(
        self: KmsBackend, key_id: str, message: bytes, signature: bytes, signing_algorithm: str
    ) -> Any:
        algorithm = signing_algorithm
        key = self.describe_key(key_id)
        usable(key)
        if getattr(request, "digest", False):
            private, scheme = prehashed_scheme(key, algorithm)
            try:
                private.public_key().verify(signature, message, *scheme)
            except InvalidSignature:
                raise JsonRESTError("KMSInvalidSignatureException", "The signature is invalid.") from None
            return key.arn, True, algorithm
        arn, valid, algorithm = verify(self, key_id, message, signature, algorithm)
        if not valid:
            raise JsonRESTError("KMSInvalidSignatureException", "The signature is invalid.")
        return arn, valid, algorithm

    def checked_get_public_key(self: KmsBackend, key_id: str) -> Any:
        usable(self.describe_key(key_id))
        return get_public_key(self, key_id)

    def with_message_type(handler: Any) -> Any:
        def serve(self: KmsResponse) -> Any:
            request.digest = self._get_param("MessageType") == "DIGEST"
            try:
                return handler(self)
            finally:
                request.digest = False

        return serve

    KmsBackend.encrypt = checked_encrypt  # type: ignore[method-assign]
    KmsBackend.decrypt = checked_decrypt  # type: ignore[method-assign]
    KmsBackend.sign = checked_sign  # type: ignore[method-assign]
    KmsBackend.verify = checked_verify  # type: ignore[method-assign]
    KmsBackend.get_public_key = checked_get_public_key  # type: ignore[method-assign]
    KmsResponse.sign = with_message_type(KmsResponse.sign)  # type: ignore[method-assign]
    KmsResponse.verify = with_message_type(KmsResponse.verify)  # type: ignore[method-assign]

"""TPM 2.0 credential activation, the cell's side (pure Python over `cryptography`).

A node proves it holds a TPM whose endorsement key (EK) the operator registered, and
that its attestation key (AK) lives in that same TPM: the cell encrypts a fresh secret
to the EK, bound to the AK's name (TPM2_MakeCredential, TPM 2.0 Library Part 1,
section 24 "Credential Protection"), and only a TPM holding both keys can recover it
with TPM2_ActivateCredential. Supported: an RSA-2048 EK with AES-128-CFB and SHA-256
(the TCG default "L-1" template), an RSA restricted signing AK.

Public areas arrive as marshalled TPM2B_PUBLIC structures (big-endian, sizes first).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB  # the mode TPM 2.0 fixes for credentials
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

ALG_RSA = 0x0001
ALG_SHA256 = 0x000B
ALG_AES = 0x0006
ALG_NULL = 0x0010
ALG_CFB = 0x0043
ALG_RSASSA = 0x0014
ALG_RSAES = 0x0015
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017

FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
RESTRICTED = 0x00010000
DECRYPT = 0x00020000
SIGN = 0x00040000


class TpmError(ValueError):
    """A public area is malformed or not one this attestation accepts."""


@dataclass(frozen=True)
class TpmPublic:
    area: bytes  # the TPMT_PUBLIC bytes (what the name is computed over)
    type: int
    name_alg: int
    attributes: int
    symmetric: tuple[int, int, int]  # algorithm, key bits, mode (0s when NULL)
    key: rsa.RSAPublicKey

    @property
    def name(self) -> bytes:
        """The object's TPM name: nameAlg followed by the hash of its public area."""
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.area).digest()

    @property
    def key_hash(self) -> str:
        """SHA-256 of the public key's SubjectPublicKeyInfo, hex: how operators register EKs."""
        der = self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise TpmError("the TPM public area is truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())


def parse_public(tpm2b_public: bytes) -> TpmPublic:
    """Parse a marshalled TPM2B_PUBLIC holding an RSA key."""
    outer = _Reader(tpm2b_public)
    area = outer.sized()
    if outer.at != len(tpm2b_public):
        raise TpmError("trailing bytes after the TPM public area")
    r = _Reader(area)
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    r.sized()  # authPolicy
    if kind != ALG_RSA:
        raise TpmError("only RSA TPM keys are accepted")
    if name_alg != ALG_SHA256:
        raise TpmError("the TPM key's name algorithm must be SHA-256")
    sym_alg = r.u16()
    symmetric = (sym_alg, 0, 0)
    if sym_alg != ALG_NULL:
        symmetric = (sym_alg, r.u16(), r.u16())
    scheme = r.u16()
    if scheme in (ALG_RSASSA, ALG_RSAPSS, ALG_OAEP):
        r.u16()  # its hash algorithm
    elif scheme not in (ALG_NULL, ALG_RSAES):
        raise TpmError("unsupported RSA scheme in the TPM public area")
    key_bits, exponent = r.u16(), r.u32()
    modulus = r.sized()
    if r.at != len(area):
        raise TpmError("trailing bytes in the TPM public area")
    if key_bits < 2048 or len(modulus) * 8 != key_bits:
        raise TpmError("the TPM key must be RSA-2048 or larger")
    key = rsa.RSAPublicNumbers(exponent or 65537, int.from_bytes(modulus, "big")).public_key()
    return TpmPublic(area, kind, name_alg, attributes, symmetric, key)


def check_endorsement_key(ek: TpmPublic) -> None:
    wanted = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | DECRYPT
    if ek.attributes & wanted != wanted or ek.attributes & SIGN:
        raise TpmError("the endorsement key is not a restricted decryption key fixed to its TPM")
    if ek.symmetric != (ALG_AES, 128, ALG_CFB):
        raise TpmError("the endorsement key must use AES-128-CFB (the TCG default template)")


def check_attestation_key(ak: TpmPublic) -> None:
    wanted = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
    if ak.attributes & wanted != wanted or ak.attributes & DECRYPT:
        raise TpmError("the attestation key is not a restricted signing key fixed to its TPM")


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (Part 1, 11.4.10.2): HMAC in counter mode."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key,
            struct.pack(">I", counter) + label + b"\x00" + context_u + context_v + struct.pack(">I", bits),
            hashlib.sha256,
        ).digest()
    return out[: bits // 8]


def make_credential(ek: TpmPublic, ak_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (credentialBlob, secret) as the contents of a
    TPM2B_ID_OBJECT and a TPM2B_ENCRYPTED_SECRET."""
    if not 1 <= len(credential) <= 32:
        raise TpmError("a credential is 1 to 32 bytes")
    seed = os.urandom(32)
    encrypted_seed = ek.key.encrypt(
        seed,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"),
    )
    sym_key = kdfa(seed, b"STORAGE", ak_name, b"", 128)
    plain = struct.pack(">H", len(credential)) + credential  # TPM2B_DIGEST
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    blob = struct.pack(">H", len(outer_hmac)) + outer_hmac + enc_identity
    return blob, encrypted_seed

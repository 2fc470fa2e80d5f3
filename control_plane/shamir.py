"""Shamir secret sharing over GF(2^8), share-compatible with Vault and OpenBao.

`init` splits the root key with `split`; `unseal` reconstructs it with `combine`
once enough shares have arrived. The layout of a share is the one HashiCorp Vault
and OpenBao use, so shares move between those tools and Keycell:

    share = y_1 y_2 ... y_n x        (n = len(secret), one byte each)

Every byte of the secret gets its own random polynomial of degree `threshold - 1`
over GF(2^8) whose constant term is that byte; `y_i` is that polynomial evaluated at
`x`. All bytes of one share use the same `x`, stored once as the last byte. The
x-coordinates of one split are distinct, non-zero and drawn at random from 1..255,
as Vault does. Coefficients come from `secrets` (the OS CSPRNG) and are uniform over
the whole field, zero included: that is what makes any `threshold - 1` shares carry
no information about the secret.

The field is the AES field: GF(2)[x] modulo x^8 + x^4 + x^3 + x + 1 (0x11B), with
addition as XOR and multiplication through log/exp tables built once at import
(generator 0x03). Table look-ups indexed by secret bytes are not constant-time; in
pure Python nothing is, and the barrier's AES-GCM runs in `cryptography`.

Split parameters follow Vault's `operator init`: 1 to 255 parts; with one part the
threshold must be 1 and the "share" is the secret itself (no split, as Vault hands
out the key itself for `-key-shares=1 -key-threshold=1`); with more parts the
threshold is 2 to `parts`.

Shares are given out as hex (lowercase) or standard base64 with padding, Vault's
`keys` and `keys_base64`, and `decode_share` accepts either; see its docstring for
the exact rule and why it takes an optional `expected_length`.

Nothing here logs, and no error message contains share or secret bytes: messages
carry only counts, lengths and positions.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import Final, Literal

__all__ = [
    "MAX_PARTS",
    "SHARE_OVERHEAD",
    "DuplicateShareError",
    "EmptySecretError",
    "InvalidParametersError",
    "MalformedShareError",
    "ShamirError",
    "ShareEncodingError",
    "ShareFormat",
    "ShareLengthMismatchError",
    "TooFewSharesError",
    "check_parameters",
    "combine",
    "decode_share",
    "encode_share",
    "gf_div",
    "gf_inv",
    "gf_mul",
    "split",
]

# x-coordinates are the 255 non-zero field elements, so at most 255 shares.
MAX_PARTS: Final = 255
# The x-byte appended to each share.
SHARE_OVERHEAD: Final = 1

ShareFormat = Literal["hex", "base64"]
_FORMATS: Final[tuple[ShareFormat, ...]] = ("hex", "base64")


# --- errors -------------------------------------------------------------------------


class ShamirError(ValueError):
    """Base class of every error this module raises for bad input."""


class InvalidParametersError(ShamirError):
    """`parts` or `threshold` is out of range."""


class EmptySecretError(ShamirError):
    """The secret to split is empty."""


class TooFewSharesError(ShamirError):
    """`combine` was given no share, or not enough to interpolate."""


class ShareLengthMismatchError(ShamirError):
    """The shares given to `combine` are not all the same length."""


class DuplicateShareError(ShamirError):
    """Two shares given to `combine` carry the same x-coordinate."""


class MalformedShareError(ShamirError):
    """A share is too short or has an x-coordinate `split` never produces."""


class ShareEncodingError(ShamirError):
    """Text is neither hex nor base64 of a share, or the format name is unknown."""


# --- GF(2^8), the AES field -----------------------------------------------------------

_REDUCTION: Final = 0x11B  # x^8 + x^4 + x^3 + x + 1
_GENERATOR: Final = 0x03  # x + 1 generates the multiplicative group of this field


def _build_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """exp[i] = g^i for i in 0..509 (doubled so log a + log b needs no modulo);
    log[a] for a in 1..255 (log[0] is unused and left 0)."""
    exp = [0] * 510
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        # value *= 3, i.e. value * x + value, reduced modulo 0x11B
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= _REDUCTION
        value = doubled ^ value
    if value != 1 or len(set(exp[:255])) != 255:  # pragma: no cover - a broken build
        raise RuntimeError("GF(2^8) tables are inconsistent: 0x03 did not generate the field")
    for power in range(255, 510):
        exp[power] = exp[power - 255]
    return tuple(exp), tuple(log)


_EXP, _LOG = _build_tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements (ints 0..255) in GF(2^8) modulo 0x11B."""
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _EXP[255 - _LOG[a]]


def gf_div(a: int, b: int) -> int:
    """a / b in GF(2^8); b must be non-zero."""
    if b == 0:
        raise ZeroDivisionError("division by 0 in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


# --- split and combine ----------------------------------------------------------------


def _require_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")


def _require_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def _check_parameters(parts: int, threshold: int) -> None:
    if not 1 <= parts <= MAX_PARTS:
        raise InvalidParametersError(f"parts must be between 1 and {MAX_PARTS}; got {parts}")
    if parts == 1:
        if threshold != 1:
            raise InvalidParametersError(
                f"with parts=1 the threshold must be 1 (the secret is not split); got {threshold}"
            )
        return
    if threshold < 2:
        raise InvalidParametersError(
            f"threshold must be at least 2 when splitting into {parts} parts; got {threshold}"
            " (use parts=1, threshold=1 to hand out the secret unsplit)"
        )
    if threshold > parts:
        raise InvalidParametersError(
            f"threshold ({threshold}) cannot exceed parts ({parts}); lower the threshold or raise parts"
        )


def check_parameters(parts: object, threshold: object) -> None:
    """Raise as `split` would for these parts and threshold, without splitting."""
    _check_parameters(_require_int(parts, "parts"), _require_int(threshold, "threshold"))


def split(secret: bytes | bytearray, parts: int, threshold: int) -> list[bytes]:
    """Split `secret` into `parts` shares, any `threshold` of which rebuild it.

    Each share is `len(secret) + 1` bytes: the y-bytes, then the x-coordinate.
    `parts=1, threshold=1` does not split: it returns `[secret]`. Otherwise
    `2 <= threshold <= parts <= 255`.
    """
    _require_bytes(secret, "secret")
    parts = _require_int(parts, "parts")
    threshold = _require_int(threshold, "threshold")
    _check_parameters(parts, threshold)
    if len(secret) == 0:
        raise EmptySecretError("the secret is empty; there is nothing to split")
    if parts == 1:
        return [bytes(secret)]

    x_coordinates = secrets.SystemRandom().sample(range(1, 256), parts)
    degree = threshold - 1
    # All random coefficients at once: byte i of the secret uses
    # coefficients[i * degree : (i + 1) * degree] for x^1 .. x^degree.
    coefficients = bytearray(secrets.token_bytes(len(secret) * degree))
    shares = [bytearray(len(secret) + SHARE_OVERHEAD) for _ in range(parts)]
    try:
        exp, log = _EXP, _LOG
        for share, x in zip(shares, x_coordinates, strict=True):
            log_x = log[x]
            for i, intercept in enumerate(secret):
                # Horner: ((c_d * x + c_{d-1}) * x + ... + c_1) * x + intercept
                base = i * degree
                y = 0
                for k in range(base + degree - 1, base - 1, -1):
                    y = (exp[log[y] + log_x] if y else 0) ^ coefficients[k]
                y = (exp[log[y] + log_x] if y else 0) ^ intercept
                share[i] = y
            share[-1] = x
        return [bytes(share) for share in shares]
    finally:
        # Best effort: Python cannot promise the memory is gone, but these
        # buffers at least do not outlive the call with the polynomials in them.
        coefficients[:] = bytes(len(coefficients))
        for share in shares:
            share[:] = bytes(len(share))


def combine(shares: Sequence[bytes | bytearray]) -> bytes:
    """Rebuild the secret from shares made by `split` (or by Vault/OpenBao).

    Give at least `threshold` shares of one split, in any order. With fewer, or
    with shares of different splits, the result is some other value: nothing here
    can tell (Keycell detects it when the rebuilt key fails to decrypt the
    keyring). One share alone is the unsplit case and is returned unchanged.

    Refused: no shares; shares of different lengths; shares under 2 bytes; an
    x-coordinate of 0; the same share twice, or two shares with one x-coordinate.
    """
    if isinstance(shares, bytes | bytearray | str):
        raise TypeError("shares must be a sequence of shares (bytes), not a single value")
    shares = list(shares)
    for position, share in enumerate(shares, start=1):
        _require_bytes(share, f"share {position}")
    if not shares:
        raise TooFewSharesError("no shares were given; provide at least the threshold number of shares")
    if len(shares) == 1:
        (only,) = shares
        if len(only) == 0:
            raise MalformedShareError("the share is empty; provide the share exactly as it was handed out")
        return bytes(only)

    length = len(shares[0])
    for position, share in enumerate(shares[1:], start=2):
        if len(share) != length:
            raise ShareLengthMismatchError(
                f"shares must all be the same length: share 1 is {length} bytes but share {position}"
                f" is {len(share)} bytes; they come from different splits or one was truncated"
            )
    if length < 1 + SHARE_OVERHEAD:
        raise MalformedShareError(
            f"shares must be at least {1 + SHARE_OVERHEAD} bytes (secret bytes plus the x-coordinate);"
            f" these are {length} bytes"
        )

    seen: dict[int, int] = {}
    for position, share in enumerate(shares, start=1):
        x = share[-1]
        if x == 0:
            raise MalformedShareError(
                f"share {position} has x-coordinate 0, which split never produces; it is corrupted"
            )
        if x in seen:
            first = seen[x]
            if hmac.compare_digest(bytes(shares[first - 1]), bytes(share)):
                message = f"share {position} is the same share as share {first}; give each share once"
            else:
                message = (
                    f"shares {first} and {position} have the same x-coordinate but differ; they come"
                    " from different splits or one is corrupted"
                )
            raise DuplicateShareError(message)
        seen[x] = position

    # Lagrange interpolation at 0. With subtraction being XOR in GF(2^8),
    # L_i(0) = prod_{j != i} x_j / (x_i ^ x_j).
    xs = [share[-1] for share in shares]
    weights: list[int] = []
    for i, x_i in enumerate(xs):
        numerator = 1
        denominator = 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator = gf_mul(numerator, x_j)
                denominator = gf_mul(denominator, x_i ^ x_j)
        weights.append(gf_div(numerator, denominator))

    exp, log = _EXP, _LOG
    log_weights = [log[w] for w in weights]  # weights are non-zero: all x_j are non-zero
    secret = bytearray(length - SHARE_OVERHEAD)
    try:
        for byte_index in range(len(secret)):
            value = 0
            for share, log_w in zip(shares, log_weights, strict=True):
                y = share[byte_index]
                if y:
                    value ^= exp[log[y] + log_w]
            secret[byte_index] = value
        return bytes(secret)
    finally:
        secret[:] = bytes(len(secret))


# --- text encodings -----------------------------------------------------------------

_HEX_TEXT: Final = re.compile(r"(?:[0-9a-fA-F]{2})+")
_BASE64_TEXT: Final = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_WHITESPACE: Final = " \t\r\n"


def encode_share(share: bytes | bytearray, fmt: ShareFormat) -> str:
    """A share as text: "hex" gives lowercase hex (Vault's `keys`), "base64" gives
    standard base64 with padding (Vault's `keys_base64`)."""
    _require_bytes(share, "share")
    if len(share) == 0:
        raise MalformedShareError("the share is empty; only shares returned by split can be encoded")
    if fmt == "hex":
        return bytes(share).hex()
    if fmt == "base64":
        return base64.b64encode(share).decode("ascii")
    raise ShareEncodingError(f"unknown share format {fmt!r}; use one of {', '.join(_FORMATS)}")


def decode_share(text: str, *, expected_length: int | None = None) -> bytes:
    """Bytes of a share given as hex or as base64, whichever it is.

    Surrounding whitespace (a pasted newline) is ignored. Then:

    - the text is a hex candidate if it is an even number of hex digits (either case);
    - it is a base64 candidate if it is standard base64 with padding (alphabet
      A-Z a-z 0-9 + /, length a multiple of 4);
    - a candidate is kept only if it decodes to at least one byte and, when
      `expected_length` is given, to exactly that many bytes;
    - hex wins if it is kept, else base64; if neither is kept, `ShareEncodingError`.

    This is Vault's rule for `sys/unseal` (`vault operator unseal` sends the text
    to it): try hex, and fall back to base64 when the text is not hex or its hex
    decoding has a length no barrier key share can have.

    Why `expected_length`: some strings are both. "abcd" is the hex of the 2-byte
    share ab cd and the base64 of the 3-byte share 69 b7 1d, so no rule that sees
    only the text can round-trip both. A string can be both only if it consists of
    hex digits and its length is a multiple of 4, and then hex gives 2 bytes per 4
    characters and base64 gives 3, so the two lengths always differ: with
    `expected_length` (the share length the caller knows, `len(root key) + 1`),
    every share encoded by `encode_share` in either format decodes back to itself.
    Without it, hex always round-trips, and base64 round-trips unless every
    character of it happens to be a hex digit, which needs a share length that is
    a multiple of 3 and, for a 33-byte share, has probability about (22/64)^44.
    """
    if not isinstance(text, str):
        raise TypeError(f"share text must be str, not {type(text).__name__}")
    if expected_length is not None:
        expected_length = _require_int(expected_length, "expected_length")
        if expected_length < 1:
            raise ShareEncodingError(f"expected_length must be at least 1; got {expected_length}")
    stripped = text.strip(_WHITESPACE)
    if not stripped:
        raise ShareEncodingError("the share text is empty; paste the share as it was handed out")

    lengths: list[int] = []
    if _HEX_TEXT.fullmatch(stripped):
        candidate = bytes.fromhex(stripped)
        if expected_length is None or len(candidate) == expected_length:
            return candidate
        lengths.append(len(candidate))
    if len(stripped) % 4 == 0 and _BASE64_TEXT.fullmatch(stripped):
        try:
            candidate = base64.b64decode(stripped, validate=True)
        except binascii.Error as exc:  # pragma: no cover - the pattern already matched
            raise ShareEncodingError("the share text is not valid base64") from exc
        if expected_length is None or len(candidate) == expected_length:
            return candidate
        lengths.append(len(candidate))

    if not lengths:
        raise ShareEncodingError(
            f"the share text ({len(stripped)} characters) is neither hex nor standard base64 with"
            " padding; paste the share exactly as it was handed out"
        )
    found = " or ".join(str(n) for n in lengths)
    raise ShareEncodingError(
        f"the share text decodes to {found} bytes but a share here is {expected_length} bytes;"
        " it belongs to another key or was truncated"
    )

"""Shamir secret sharing: GF(2^8) arithmetic, split/combine, Vault's share layout,
and the hex/base64 share encodings."""

from __future__ import annotations

import base64
import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keycell.control_plane.shamir import (
    MAX_PARTS,
    DuplicateShareError,
    EmptySecretError,
    InvalidParametersError,
    MalformedShareError,
    ShamirError,
    ShareEncodingError,
    ShareLengthMismatchError,
    TooFewSharesError,
    combine,
    decode_share,
    encode_share,
    gf_div,
    gf_inv,
    gf_mul,
    split,
)

FAST = settings(max_examples=100, deadline=None)
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def reference_mul(a: int, b: int) -> int:
    """Shift-and-add multiplication modulo 0x11B, independent of the module's tables."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return product


def assert_reveals_nothing(error: BaseException, *shares: bytes) -> None:
    """The error text names no share or secret, in either encoding."""
    text = str(error)
    for share in shares:
        if len(share) >= 2:  # a 1-byte value's hex is two characters, too short to mean anything
            assert share.hex() not in text.lower()
            assert base64.b64encode(share).decode() not in text


@st.composite
def split_and_subset(draw: st.DrawFn, *, exact: bool) -> tuple[bytes, list[bytes], list[bytes]]:
    """A secret, its shares, and a random ordered subset of `threshold` shares (or of
    `threshold` to `parts` shares when `exact` is False)."""
    secret = draw(st.binary(min_size=1, max_size=32))
    parts = draw(st.integers(min_value=2, max_value=20))
    threshold = draw(st.integers(min_value=2, max_value=parts))
    shares = split(secret, parts, threshold)
    size = threshold if exact else draw(st.integers(min_value=threshold, max_value=parts))
    subset = draw(st.permutations(shares))[:size]
    return secret, shares, subset


# --- GF(2^8), the AES field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "product"),
    [
        (0x57, 0x83, 0xC1),  # FIPS-197 section 4.2
        (0x57, 0x13, 0xFE),  # FIPS-197 section 4.2.1
        (0x57, 0x02, 0xAE),  # FIPS-197 xtime chain
        (0x57, 0x04, 0x47),
        (0x57, 0x08, 0x8E),
        (0x57, 0x10, 0x07),
        (0x53, 0xCA, 0x01),  # 0x53 and 0xCA are inverses in the AES field
        (0x00, 0xFF, 0x00),
        (0x01, 0xFF, 0xFF),
    ],
)
def test_multiplication_matches_published_aes_field_vectors(a: int, b: int, product: int) -> None:
    assert gf_mul(a, b) == product
    assert gf_mul(b, a) == product


def test_multiplication_agrees_with_shift_and_reduce_for_every_pair() -> None:
    for a, b in itertools.product(range(256), repeat=2):
        assert gf_mul(a, b) == reference_mul(a, b), (a, b)


def test_every_nonzero_element_has_the_unique_inverse_found_by_exhaustive_search() -> None:
    for a in range(1, 256):
        (expected,) = [b for b in range(1, 256) if reference_mul(a, b) == 1]
        assert gf_inv(a) == expected, a


def test_published_inverse_pair_0x53_0xca() -> None:
    assert (gf_inv(0x53), gf_inv(0xCA), gf_inv(0x01)) == (0xCA, 0x53, 0x01)


def test_zero_has_no_inverse_and_cannot_divide() -> None:
    with pytest.raises(ZeroDivisionError):
        gf_inv(0)
    with pytest.raises(ZeroDivisionError):
        gf_div(7, 0)


def test_division_undoes_multiplication() -> None:
    for a, b in itertools.product(range(256), range(1, 256)):
        assert gf_div(gf_mul(a, b), b) == a


# --- share layout ---------------------------------------------------------------------


@FAST
@given(secret=st.binary(min_size=1, max_size=64), parts=st.integers(2, 30), data=st.data())
def test_each_share_is_the_secret_length_plus_one_byte(
    secret: bytes, parts: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(2, parts))
    assert {len(share) for share in split(secret, parts, threshold)} == {len(secret) + 1}


@FAST
@given(secret=st.binary(min_size=1, max_size=16), parts=st.integers(2, 255))
def test_last_byte_is_the_x_coordinate_of_a_line_through_the_secret(secret: bytes, parts: int) -> None:
    # Threshold 2 means one line per byte: f(x) = s + a*x. Solve it by hand from the
    # first two shares, reading y from the leading bytes and x from the last byte.
    first, second = split(secret, parts, 2)[:2]
    x1, x2 = first[-1], second[-1]
    rebuilt = bytearray()
    for y1, y2 in zip(first[:-1], second[:-1], strict=True):
        slope = gf_div(y1 ^ y2, x1 ^ x2)
        rebuilt.append(y1 ^ gf_mul(slope, x1))
    assert bytes(rebuilt) == secret


@FAST
@given(parts=st.integers(2, 255), data=st.data())
def test_x_coordinates_are_distinct_and_nonzero(parts: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(2, min(parts, 8)))
    xs = [share[-1] for share in split(b"\x00\x01", parts, threshold)]
    assert len(set(xs)) == parts
    assert 0 not in xs


def test_all_255_parts_use_every_nonzero_x_coordinate() -> None:
    assert MAX_PARTS == 255
    assert sorted(share[-1] for share in split(b"k", MAX_PARTS, 2)) == list(range(1, 256))


def test_x_coordinates_are_random_not_1_to_n() -> None:
    draws = {tuple(share[-1] for share in split(b"key", 3, 2)) for _ in range(20)}
    assert len(draws) > 1
    assert draws != {(1, 2, 3)}


def test_splitting_the_same_secret_twice_gives_different_shares() -> None:
    secret = os.urandom(32)
    assert split(secret, 5, 3) != split(secret, 5, 3)


def line_slopes(first: bytes, second: bytes) -> list[int]:
    """Per secret byte, the x^1 coefficient of the threshold-2 line through two shares."""
    run = first[-1] ^ second[-1]
    return [gf_div(y1 ^ y2, run) for y1, y2 in zip(first[:-1], second[:-1], strict=True)]


def test_each_secret_byte_gets_its_own_uniform_random_coefficient() -> None:
    # 8192 bytes of one secret, threshold 2: the slopes are the random coefficients.
    # Drawn uniformly, all 256 values (zero included, as uniformity requires) show
    # up; the chance one is missing is about 256 * e^-32.
    first, second = split(bytes(8192), 2, 2)
    assert set(line_slopes(first, second)) == set(range(256))


def test_two_splits_of_one_secret_use_different_polynomials() -> None:
    secret = bytes(32)
    assert line_slopes(*split(secret, 2, 2)) != line_slopes(*split(secret, 2, 2))


def test_hand_worked_vault_layout_shares_combine() -> None:
    # f(x) = 0x2A + 0x05 x for byte 0 and f(x) = 0x00 + 0x80 x for byte 1:
    # f(1) = 2F 80, f(2) = 20 1B (0x80 * 2 = 0x100 reduced by 0x11B = 0x1B).
    shares = [bytes([0x2F, 0x80, 0x01]), bytes([0x20, 0x1B, 0x02])]
    assert combine(shares) == bytes([0x2A, 0x00])
    assert combine(shares[::-1]) == bytes([0x2A, 0x00])


# --- reconstruction -------------------------------------------------------------------


@FAST
@given(case=split_and_subset(exact=True))
def test_any_threshold_shares_in_any_order_rebuild_the_secret(
    case: tuple[bytes, list[bytes], list[bytes]],
) -> None:
    secret, _, subset = case
    assert combine(subset) == secret


@FAST
@given(case=split_and_subset(exact=False))
def test_more_than_threshold_shares_also_rebuild_the_secret(
    case: tuple[bytes, list[bytes], list[bytes]],
) -> None:
    secret, _, subset = case
    assert combine(subset) == secret


@pytest.mark.parametrize(
    ("parts", "threshold"),
    [(2, 2), (3, 2), (3, 3), (255, 2), (255, 3), (255, 128), (255, 254), (255, 255)],
)
def test_edge_share_counts_and_thresholds_round_trip(parts: int, threshold: int) -> None:
    secret = os.urandom(4)
    shares = split(secret, parts, threshold)
    assert len(shares) == parts
    chosen = random.sample(shares, threshold)
    assert combine(chosen) == secret


def test_one_part_threshold_one_hands_out_the_secret_itself() -> None:
    secret = os.urandom(32)
    assert split(secret, 1, 1) == [secret]


def test_a_single_share_combines_to_itself() -> None:
    (share,) = split(b"root key bytes", 1, 1)
    assert combine([share]) == b"root key bytes"


def test_bytearray_secret_and_shares_are_accepted() -> None:
    secret = bytearray(b"sixteen byte key")
    shares = [bytearray(share) for share in split(secret, 4, 2)]
    assert combine(shares[1:3]) == bytes(secret)


@FAST
@given(secret=st.binary(min_size=16, max_size=32), parts=st.integers(3, 12), data=st.data())
def test_threshold_minus_one_shares_do_not_rebuild_a_long_secret(
    secret: bytes, parts: int, data: st.DataObject
) -> None:
    # With threshold - 1 >= 2 shares combine interpolates some other polynomial; it
    # equals the secret with probability 2^-128 at most.
    threshold = data.draw(st.integers(3, parts))
    shares = data.draw(st.permutations(split(secret, parts, threshold)))
    assert combine(shares[: threshold - 1]) != secret


@pytest.mark.parametrize("threshold", [2, 3, 5, 16])
def test_threshold_minus_one_shares_are_consistent_with_every_one_byte_secret(threshold: int) -> None:
    # Information-theoretic secrecy, shown exhaustively: for the shares an attacker
    # holds, each of the 256 values of a missing share completes them to a
    # different secret, so every secret is consistent with what the attacker sees,
    # through exactly one polynomial. The coefficients are uniform, so all 256
    # secrets are equally likely given those shares.
    parts = threshold + 1
    shares = split(b"\x5a", parts, threshold)
    held = shares[: threshold - 1]
    free_x = next(x for x in range(1, 256) if x not in {share[-1] for share in held})
    secrets_reached = [combine([*held, bytes([y, free_x])]) for y in range(256)]
    assert sorted(secrets_reached) == [bytes([v]) for v in range(256)]


# --- bad input --------------------------------------------------------------------


def test_the_same_share_twice_is_refused() -> None:
    shares = split(os.urandom(16), 5, 3)
    with pytest.raises(DuplicateShareError, match="same share") as caught:
        combine([shares[0], shares[1], shares[0]])
    assert_reveals_nothing(caught.value, *shares)


def test_two_different_shares_with_one_x_coordinate_are_refused() -> None:
    first = split(os.urandom(16), 3, 2)
    second = split(os.urandom(16), 3, 2)
    clash = bytes(second[0][:-1]) + bytes([first[0][-1]])
    with pytest.raises(DuplicateShareError, match="same x-coordinate") as caught:
        combine([first[0], clash])
    assert_reveals_nothing(caught.value, first[0], clash)


def test_shares_of_mixed_lengths_are_refused() -> None:
    short = split(os.urandom(16), 3, 2)
    long = split(os.urandom(32), 3, 2)
    with pytest.raises(ShareLengthMismatchError, match="same length") as caught:
        combine([short[0], long[1]])
    assert_reveals_nothing(caught.value, short[0], long[1])


def test_no_shares_are_refused() -> None:
    with pytest.raises(TooFewSharesError, match="no shares"):
        combine([])


def test_shares_shorter_than_two_bytes_are_refused() -> None:
    with pytest.raises(MalformedShareError, match="at least 2 bytes"):
        combine([b"\x01", b"\x02"])


def test_an_empty_single_share_is_refused() -> None:
    with pytest.raises(MalformedShareError, match="empty"):
        combine([b""])


def test_a_share_with_x_coordinate_zero_is_refused() -> None:
    shares = split(os.urandom(16), 3, 2)
    zeroed = shares[1][:-1] + b"\x00"
    with pytest.raises(MalformedShareError, match="x-coordinate 0") as caught:
        combine([shares[0], zeroed])
    assert_reveals_nothing(caught.value, shares[0], zeroed)


def test_a_single_bytes_value_instead_of_a_list_is_a_type_error() -> None:
    share = split(os.urandom(16), 3, 2)[0]
    with pytest.raises(TypeError, match="sequence"):
        combine(share)


@pytest.mark.parametrize("parts", [0, -1, 256, 1000])
def test_parts_out_of_range_are_refused(parts: int) -> None:
    with pytest.raises(InvalidParametersError, match="parts must be between 1 and 255"):
        split(b"secret", parts, 2)


@pytest.mark.parametrize(
    ("parts", "threshold", "hint"),
    [
        (5, 1, "at least 2"),
        (5, 0, "at least 2"),
        (5, -3, "at least 2"),
        (5, 6, "cannot exceed parts"),
        (255, 256, "cannot exceed parts"),
        (1, 2, "must be 1"),
        (1, 0, "must be 1"),
    ],
)
def test_threshold_out_of_range_is_refused(parts: int, threshold: int, hint: str) -> None:
    with pytest.raises(InvalidParametersError, match=hint):
        split(b"secret", parts, threshold)


@pytest.mark.parametrize(("parts", "threshold"), [(1, 1), (3, 2)])
def test_an_empty_secret_is_refused(parts: int, threshold: int) -> None:
    with pytest.raises(EmptySecretError, match="empty"):
        split(b"", parts, threshold)


def test_a_text_secret_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bytes"):
        split("not bytes", 3, 2)  # type: ignore[arg-type]


def test_a_boolean_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="int"):
        split(b"secret", True, 1)


def test_every_error_is_a_value_error() -> None:
    for error in (
        InvalidParametersError,
        EmptySecretError,
        TooFewSharesError,
        ShareLengthMismatchError,
        DuplicateShareError,
        MalformedShareError,
        ShareEncodingError,
    ):
        assert issubclass(error, ShamirError)
        assert issubclass(error, ValueError)


# --- hex and base64 -------------------------------------------------------------------

share_bytes = st.binary(min_size=2, max_size=40)


def test_hex_encoding_is_lowercase_hex() -> None:
    assert encode_share(b"\xab\xcd\x01", "hex") == "abcd01"


def test_base64_encoding_is_standard_padded_base64() -> None:
    assert encode_share(b"\xfb\xff\x01\x02", "base64") == "+/8BAg=="


@FAST
@given(share=share_bytes)
def test_hex_round_trips_without_a_length_hint(share: bytes) -> None:
    assert decode_share(encode_share(share, "hex")) == share


@FAST
@given(share=share_bytes, fmt=st.sampled_from(["hex", "base64"]))
def test_both_encodings_round_trip_with_the_expected_length(share: bytes, fmt: str) -> None:
    text = encode_share(share, fmt)  # type: ignore[arg-type]
    assert decode_share(text, expected_length=len(share)) == share


# Shares whose base64 is made only of hex digits: every 4 such characters are 3 bytes.
all_hex_base64_shares = (
    st.integers(1, 3)
    .flatmap(lambda groups: st.text(alphabet=sorted(HEX_DIGITS), min_size=4 * groups, max_size=4 * groups))
    .map(base64.b64decode)
)


@FAST
@given(share=st.one_of(st.binary(min_size=2, max_size=40), all_hex_base64_shares))
def test_base64_round_trips_without_a_hint_unless_every_character_is_a_hex_digit(share: bytes) -> None:
    text = encode_share(share, "base64")
    all_hex = set(text) <= HEX_DIGITS
    assert (decode_share(text) == share) is not all_hex
    if all_hex:
        assert len(share) % 3 == 0  # no '=' padding, and '=' is not a hex digit


def test_some_text_is_the_hex_of_one_share_and_the_base64_of_another() -> None:
    # "abcd" is the hex of one share and the base64 of another.
    hex_share, b64_share = bytes.fromhex("abcd"), base64.b64decode("abcd")
    assert encode_share(hex_share, "hex") == encode_share(b64_share, "base64") == "abcd"
    assert hex_share != b64_share


def test_ambiguous_text_reads_as_hex_without_a_hint_as_vault_does() -> None:
    assert decode_share("abcd") == bytes.fromhex("abcd")


def test_ambiguous_text_is_resolved_by_the_expected_length() -> None:
    assert decode_share("abcd", expected_length=2) == bytes.fromhex("abcd")
    assert decode_share("abcd", expected_length=3) == base64.b64decode("abcd")


def test_uppercase_hex_is_accepted() -> None:
    assert decode_share("ABCD01") == b"\xab\xcd\x01"


def test_surrounding_whitespace_is_ignored() -> None:
    assert decode_share("  +/8BAg==\n") == b"\xfb\xff\x01\x02"


def test_real_shares_survive_text_in_both_formats_and_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = split(secret, 5, 3)
    texts = [
        encode_share(shares[0], "hex"),
        encode_share(shares[2], "base64"),
        encode_share(shares[4], "hex"),
    ]
    decoded = [decode_share(text, expected_length=len(secret) + 1) for text in texts]
    assert combine(decoded) == secret


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "g0",  # not a hex digit, and not a multiple of 4 long for base64
        "abc",  # odd-length hex, and not a multiple of 4 long
        "ab cd",  # inner whitespace
        "-_-_",  # URL-safe base64 alphabet
        "abcd=",  # padding that makes the length wrong
        "====",
        "ab=c",  # padding in the middle
        "é1é1",
    ],
)
def test_text_that_is_neither_hex_nor_base64_is_refused(text: str) -> None:
    with pytest.raises(ShareEncodingError, match=r"hex|empty") as caught:
        decode_share(text)
    if text.strip():
        assert text.strip() not in str(caught.value)


def test_a_decoded_length_other_than_expected_is_refused_without_echoing_the_text() -> None:
    share = split(os.urandom(32), 3, 2)[0]
    text = encode_share(share, "base64")
    with pytest.raises(ShareEncodingError, match="33 bytes but a share here is 17 bytes") as caught:
        decode_share(text, expected_length=17)
    assert text not in str(caught.value)
    assert_reveals_nothing(caught.value, share)


def test_an_unknown_format_name_is_refused() -> None:
    with pytest.raises(ShareEncodingError, match="hex, base64"):
        encode_share(b"\x01\x02", "base32")  # type: ignore[arg-type]


def test_encoding_rejects_an_empty_share() -> None:
    with pytest.raises(MalformedShareError, match="empty"):
        encode_share(b"", "hex")

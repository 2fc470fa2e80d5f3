"""Response wrapping: a response held in the cubbyhole of a single-use token.

Instead of handing a secret to whoever made the request, the API can store the response
and hand out a *wrapping token*: whoever presents it first, once, gets the response
(Vault's response wrapping). The token is `kc.w.` + 43 url-safe characters; it is never
stored. Its record lives at `Key(Kind.CUBBYHOLE, token_path(token))` (a digest, through
the barrier, so sealed at rest) with the ledger expiry set to creation + wrap TTL, beside
an accessor index `Key(Kind.CUBBYHOLE, "accessor/<accessor>")` -> token digest with the
same expiry (`token_path` digests are hex, so the two never collide).

Single use is a compare-and-set: unwrap deletes the record at the version it read, in
one transaction with its accessor index; of two concurrent unwraps exactly one wins. An
expired record is refused whichever clock notices first: the ledger hides items whose
(real-time) expiry passed, and this engine also compares against its own `clock`.

Endpoints served (the HTTP layer maps Vault's request onto these and returns `data` or
`wrap_info` as Vault does):

- any request with `X-Vault-Wrap-TTL`: `wrap(response, ttl=..., creation_path=...)`
  returns Vault's `wrap_info` {token, accessor, ttl, creation_time, creation_path,
  wrapped_accessor}; the HTTP layer answers with it in place of the response.
- POST sys/wrapping/wrap: `wrap_data(data, ttl)` -> `wrap_info`; unwrapping it gives
  `{"data": data}`. A TTL of 0 (no header) is refused as Vault refuses it.
- POST sys/wrapping/unwrap {token?}: `unwrap(token)` -> the original response dict. The
  token comes from the body or, as Vault allows, from X-Vault-Token: the HTTP layer uses
  `is_wrapping_token` to let such a token through to this endpoint only.
- POST sys/wrapping/lookup {token}: `lookup(token)` -> {creation_path, creation_time,
  creation_ttl}, without consuming the token.
- POST sys/wrapping/rewrap {token}: `rewrap(token)` -> a new `wrap_info` for the same
  response with the original creation TTL and path; the old token dies in the same
  transaction.

An unknown, used, expired or malformed token answers InvalidRequest("wrapping token is
not valid or does not exist"), Vault's 400, whatever the reason, so the answer reveals
nothing about which tokens once existed.

Also here, because the HTTP layer needs them for every TTL field and header:
`parse_duration` (Vault's duration syntax).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.ledger import (
    ConflictError,
    Delete,
    InvalidItemError,
    Key,
    Kind,
    Ledger,
    Op,
    Put,
)
from keycell.control_plane.seal import token_path
from keycell.control_plane.storage import encode_json, get_json
from keycell.control_plane.timefmt import rfc3339

TOKEN_PREFIX = "kc.w."  # noqa: S105 - a prefix, not a secret
# secrets.token_urlsafe(32): 256 bits of randomness in 43 characters.
_TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"kc\.w\.[A-Za-z0-9_-]{43}", re.ASCII)
_ACCESSOR_BYTES = 18
ACCESSOR_PREFIX = "accessor/"
# Vault's default system max lease TTL (32 days) bounds a wrapping token's life too.
DEFAULT_MAX_TTL = 32 * 24 * 3600
WRAP_PATH = "sys/wrapping/wrap"
INVALID_TOKEN = "wrapping token is not valid or does not exist"  # noqa: S105 - an error message

# --- durations and times, shared with the HTTP layer ----------------------------------

# Go's time.Duration tops out at about 292 years; Vault's parser cannot go further.
MAX_DURATION_SECONDS = (2**63 - 1) // 10**9
# Long enough for any real duration ("8760h", "1h30m15s"); short enough that no input
# makes the parser (or int()) do real work.
_MAX_DURATION_TEXT = 32
_UNIT_SECONDS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def parse_duration(value: object) -> int:
    """Whole seconds from Vault's duration syntax: an int, a digit string ("300", taken
    as seconds) or Go-style units ("300s", "5m", "1h30m", "1.5h", "2d"; ms is accepted
    and truncated). Negative, empty or malformed input raises InvalidRequest."""
    if isinstance(value, bool):
        raise InvalidRequest("a duration is a number of seconds or a string such as '5m'")
    if isinstance(value, int):
        if value < 0:
            raise InvalidRequest("a duration cannot be negative")
        if value > MAX_DURATION_SECONDS:
            raise InvalidRequest("the duration is out of range")
        return value
    if not isinstance(value, str):
        raise InvalidRequest("a duration is a number of seconds or a string such as '5m'")
    text = value.strip()
    if not text:
        raise InvalidRequest("a duration is required, e.g. '300', '300s', '5m' or '1h30m'")
    if len(text) > _MAX_DURATION_TEXT:
        raise InvalidRequest("the duration is too long to be valid")
    if text.startswith("-"):
        raise InvalidRequest("a duration cannot be negative")
    if _DIGITS.fullmatch(text):
        return parse_duration(int(text))
    total = Fraction(0)
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += Fraction(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text) or position == 0:
        # Echoing the input is safe: it is a TTL, not a secret, and short (capped above).
        raise InvalidRequest(
            f"invalid duration {text!r}: use seconds ('300') or units ms, s, m, h, d ('5m', '1h30m')"
        )
    return parse_duration(math.floor(total))


def is_wrapping_token(token: object) -> bool:
    """Whether `token` has the shape of a wrapping token (no ledger read: whether it is
    still valid is for unwrap/lookup to say). Lets the HTTP layer accept a wrapping
    token as X-Vault-Token on the wrapping endpoints only."""
    return isinstance(token, str) and _TOKEN_RE.fullmatch(token) is not None


def _expiry(epoch: float) -> int:
    # The ledger counts whole seconds; rounding up never cuts a TTL short.
    return math.ceil(epoch)


class Wrapping:
    """Wrapping tokens over a cell's barrier. Stateless: every fact is in the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        clock: Callable[[], float] = time.time,
        max_ttl: int = DEFAULT_MAX_TTL,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.max_ttl = max_ttl

    # --- wrap ------------------------------------------------------------------------

    def wrap(
        self,
        response: dict[str, Any],
        *,
        ttl: int | str,
        creation_path: str,
        wrapped_accessor: str = "",
    ) -> dict[str, Any]:
        """Store `response` behind a new wrapping token; Vault's `wrap_info`.
        `wrapped_accessor` is the accessor of what the response carries, if any (a
        token's, or an AppRole secret ID's); wrap_info names it only when there is one."""
        if not isinstance(response, dict):
            raise InvalidRequest("only a JSON object can be wrapped")
        if not isinstance(creation_path, str):
            raise InvalidRequest("creation_path must be a string")
        if not isinstance(wrapped_accessor, str):
            raise InvalidRequest("wrapped_accessor must be a string")
        seconds = self._check_ttl(parse_duration(ttl))
        try:
            # Fail on anything JSON cannot carry before anything is written.
            json.dumps(response)
        except (TypeError, ValueError):
            raise InvalidRequest("the response to wrap is not JSON-serializable") from None
        record = {
            "response": response,
            "creation_time": self.clock(),
            "creation_ttl": seconds,
            "creation_path": creation_path,
            "wrapped_accessor": wrapped_accessor,
        }
        token, ops = self._create_ops(record)
        self._commit(ops)
        return self._wrap_info(token, record)

    def wrap_data(self, data: dict[str, Any], ttl: int | str) -> dict[str, Any]:
        """POST sys/wrapping/wrap: wrap the request body; unwrapping gives {"data": data}."""
        if not isinstance(data, dict):
            raise InvalidRequest("the data to wrap must be a JSON object")
        if parse_duration(ttl) == 0:
            # Vault's answer when the request carries no X-Vault-Wrap-TTL.
            raise InvalidRequest("endpoint requires response wrapping to be used")
        return self.wrap({"data": data}, ttl=ttl, creation_path=WRAP_PATH)

    # --- use -------------------------------------------------------------------------

    def unwrap(self, token: str) -> dict[str, Any]:
        """POST sys/wrapping/unwrap: the wrapped response, exactly once."""
        key, record, version = self._load(token)
        ops: list[Op] = [Delete(key, version)]
        accessor = self.ledger.get(self._accessor_key(str(record["accessor"])), consistent=True)
        if accessor is not None:
            ops.append(Delete(accessor.key, accessor.version))
        try:
            self.ledger.transact(ops)
        except ConflictError:
            # Another unwrap or a rewrap got there first: this token is spent.
            raise InvalidRequest(INVALID_TOKEN) from None
        response = record["response"]
        assert isinstance(response, dict)
        return response

    def lookup(self, token: str) -> dict[str, Any]:
        """POST sys/wrapping/lookup: the token's properties; the token stays usable."""
        _, record, _ = self._load(token)
        return {
            "creation_path": record["creation_path"],
            "creation_time": rfc3339(float(record["creation_time"])),
            "creation_ttl": int(record["creation_ttl"]),
        }

    def rewrap(self, token: str) -> dict[str, Any]:
        """POST sys/wrapping/rewrap: the same response behind a new token with the
        original TTL (counted from now) and creation path; the old token dies in the same
        transaction, so exactly one of two concurrent rewraps (or a rewrap and an
        unwrap) succeeds."""
        key, record, version = self._load(token)
        ops: list[Op] = [Delete(key, version)]
        accessor = self.ledger.get(self._accessor_key(str(record["accessor"])), consistent=True)
        if accessor is not None:
            ops.append(Delete(accessor.key, accessor.version))
        fresh = {
            "response": record["response"],
            "creation_time": self.clock(),
            "creation_ttl": int(record["creation_ttl"]),
            "creation_path": record["creation_path"],
            "wrapped_accessor": record.get("wrapped_accessor", ""),
        }
        new_token, create = self._create_ops(fresh)
        self._commit([*ops, *create])
        return self._wrap_info(new_token, fresh)

    # --- helpers ---------------------------------------------------------------------

    def _check_ttl(self, seconds: int) -> int:
        if seconds < 1:
            raise InvalidRequest("the wrapping TTL must be at least 1 second")
        if seconds > self.max_ttl:
            raise InvalidRequest(f"the wrapping TTL of {seconds}s exceeds the maximum of {self.max_ttl}s")
        return seconds

    def _create_ops(self, record: dict[str, Any]) -> tuple[str, list[Op]]:
        """A new token and accessor for `record` (filled in with its accessor), and the
        two Puts that store them."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
        accessor = secrets.token_urlsafe(_ACCESSOR_BYTES)
        record["accessor"] = accessor
        expires_at = _expiry(float(record["creation_time"]) + int(record["creation_ttl"]))
        digest = token_path(token)
        return token, [
            Put(Key(Kind.CUBBYHOLE, digest), encode_json(record), 0, expires_at),
            Put(self._accessor_key(accessor), encode_json({"token_path": digest}), 0, expires_at),
        ]

    def _commit(self, ops: list[Op]) -> None:
        try:
            self.ledger.transact(ops)
        except InvalidItemError:
            raise InvalidRequest("the response is too large to wrap") from None
        except ConflictError:
            # Puts of fresh random keys cannot conflict; a Delete can (a rewrap racing an
            # unwrap or another rewrap), and then the old token is already spent.
            raise InvalidRequest(INVALID_TOKEN) from None

    def _load(self, token: object) -> tuple[Key, dict[str, Any], int]:
        if not is_wrapping_token(token):
            raise InvalidRequest(INVALID_TOKEN)
        assert isinstance(token, str)
        key = Key(Kind.CUBBYHOLE, token_path(token))
        found = get_json(self.ledger, key, consistent=True)
        if found is None:
            raise InvalidRequest(INVALID_TOKEN)
        record, version = found
        if float(record["creation_time"]) + int(record["creation_ttl"]) <= self.clock():
            raise InvalidRequest(INVALID_TOKEN)
        return key, record, version

    @staticmethod
    def _accessor_key(accessor: str) -> Key:
        return Key(Kind.CUBBYHOLE, ACCESSOR_PREFIX + accessor)

    @staticmethod
    def _wrap_info(token: str, record: dict[str, Any]) -> dict[str, Any]:
        info = {
            "token": token,
            "accessor": record["accessor"],
            "ttl": int(record["creation_ttl"]),
            "creation_time": rfc3339(float(record["creation_time"])),
            "creation_path": record["creation_path"],
        }
        if record["wrapped_accessor"]:  # Vault leaves the key out when nothing is named
            info["wrapped_accessor"] = record["wrapped_accessor"]
        return info

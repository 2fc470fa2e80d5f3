"""The generic target: a random secret generated to a policy, kept only in the store.

Params (all optional): `length` (default 32), `lower`, `upper`, `digits` (default
true), `symbols` (default false), `exclude` (characters never used), `field` (the
value's key, default "password"), `username` (copied into the value as is). Every
enabled character class appears at least once. There is no system to set or test
against, so `apply` does nothing and `verify` checks the value against its policy.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from typing import Any

from keycell.control_plane.rotation import TargetError, TargetParamsError, Value

SYMBOLS = "!#$%&()*+,-.:;<=>?@[]^_{|}~"
MIN_LENGTH, MAX_LENGTH = 8, 4096


def _classes(params: Mapping[str, Any]) -> list[str]:
    exclude = set(str(params.get("exclude", "")))
    wanted = [
        (params.get("lower", True), string.ascii_lowercase),
        (params.get("upper", True), string.ascii_uppercase),
        (params.get("digits", True), string.digits),
        (params.get("symbols", False), SYMBOLS),
    ]
    classes = ["".join(c for c in chars if c not in exclude) for on, chars in wanted if on]
    if not classes or any(not c for c in classes):
        raise TargetError(
            "the password policy leaves a character class empty; enable another or exclude less"
        )
    return classes


def _length(params: Mapping[str, Any]) -> int:
    length = params.get("length", 32)
    if isinstance(length, bool) or not isinstance(length, int) or not MIN_LENGTH <= length <= MAX_LENGTH:
        raise TargetParamsError(
            f"the password policy's length is an integer from {MIN_LENGTH} to {MAX_LENGTH}"
        )
    return length


def generate_password(params: Mapping[str, Any]) -> str:
    classes = _classes(params)
    length = _length(params)
    if length < len(classes):
        raise TargetParamsError("the password is shorter than the number of required character classes")
    alphabet = "".join(classes)
    chars = [secrets.choice(c) for c in classes]
    chars += [secrets.choice(alphabet) for _ in range(length - len(chars))]
    # Shuffle so the guaranteed characters are not always first.
    for i in range(len(chars) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def conforms(password: str, params: Mapping[str, Any]) -> bool:
    classes = _classes(params)
    alphabet = set("".join(classes))
    return (
        len(password) == _length(params)
        and all(c in alphabet for c in password)
        and all(any(c in cls for c in password) for cls in classes)
    )


class GenericTarget:
    kind = "generic"

    def generate(self, params: Mapping[str, Any], current: Value | None, previous: Value | None) -> Value:
        value: Value = {str(params.get("field", "password")): generate_password(params)}
        if "username" in params:
            value["username"] = str(params["username"])
        return value

    def apply(self, params: Mapping[str, Any], pending: Value, current: Value | None) -> None:
        return None

    def verify(self, params: Mapping[str, Any], pending: Value) -> None:
        password = pending.get(str(params.get("field", "password")))
        if not isinstance(password, str) or not conforms(password, params):
            raise TargetError("the pending secret does not meet its password policy")

    def retire(self, params: Mapping[str, Any], current: Value, previous: Value | None) -> None:
        return None

    def revoke(self, params: Mapping[str, Any], value: Value) -> None:
        return None

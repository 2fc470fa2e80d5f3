"""Rotation: one state machine that replaces a credential without a moment of downtime.

Four steps, named as AWS Secrets Manager names them, because a Secrets Manager rotation
Lambda is one of the ways this machine is driven:

1. `createSecret` - the target generates the next value (a password, or an access key
   the target itself mints); it is stored as the PENDING version under the request
   token. Nothing outside the store changes, except for targets that mint credentials.
2. `setSecret`    - the pending value is put into effect on the target (a database
   role's password, ...). Whoever uses the CURRENT value is untouched.
3. `testSecret`   - the pending value is tried against the target (log in with it).
4. `finishSecret` - promotion: PENDING becomes CURRENT and CURRENT becomes PREVIOUS in
   one conditional write, then the target retires what the rotation leaves behind
   (an access key two rotations old).

The promises, and how they are kept:

- *Exactly one CURRENT at every instant.* The three stages of a secret are fields of
  one record, changed only by compare-and-set on that record (`Ledger.put_if` /
  `transact`): there is no instant with zero or two CURRENT versions.
- *Idempotent per request token.* The pending version's id is the request token. A
  step repeated with the same token finds its work done and does nothing; a finished
  token is remembered, so a redelivered event rotates nothing twice.
- *Resumable after a crash at any step.* The store records the step reached (the
  ledger store does, in the same record); `rotate` starts where the last run stopped.
  Every target operation is idempotent, so a step interrupted half-way is repeated.
  At most one rotation per secret is in flight: a second token waits for the first to
  finish (it completes it first).

Where versions live is a `VersionStore`: `LedgerVersionStore` (here: the cell's own
ledger, each value sealed in its own envelope) or a cloud secret store in `adapters/`
(AWS Secrets Manager, whose staging labels AWSCURRENT / AWSPENDING / AWSPREVIOUS are
the stages). What is rotated is a `CredentialTarget` (adapters/targets: postgres,
aws_iam, generic), all proven by one conformance suite.

Values are JSON objects (`{"username": ..., "password": ...}`), as in Secrets Manager.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from keycell.control_plane.envelope import Envelope, Envelopes
from keycell.control_plane.errors import InvalidRequest, NotFound, RequestError, Unavailable
from keycell.control_plane.ledger import (
    ConflictError,
    Delete,
    Key,
    Kind,
    Ledger,
    Op,
    Put,
    iter_prefix,
)
from keycell.control_plane.storage import encode_json, get_json

log = logging.getLogger(__name__)

Value = dict[str, Any]


class Step(StrEnum):
    CREATE = "createSecret"
    SET = "setSecret"
    TEST = "testSecret"
    FINISH = "finishSecret"


STEPS: tuple[Step, ...] = (Step.CREATE, Step.SET, Step.TEST, Step.FINISH)


class Stage(StrEnum):
    CURRENT = "CURRENT"
    PENDING = "PENDING"
    PREVIOUS = "PREVIOUS"


# Progress a store records for the rotation in flight: the last step completed.
# "promoted" means FINISH's conditional write landed but the target has not yet
# retired what the rotation left behind.
CREATED, SET_DONE, TESTED, PROMOTED = "created", "set", "tested", "promoted"
_PROGRESS_ORDER = (CREATED, SET_DONE, TESTED, PROMOTED)
_DONE_AFTER_STEP = {Step.CREATE: CREATED, Step.SET: SET_DONE, Step.TEST: TESTED, Step.FINISH: PROMOTED}

# How many finished request tokens a secret remembers (idempotency of redelivered events).
REMEMBERED_TOKENS = 16
MAX_TOKEN_CHARS = 128
# A secret changing this often while one rotation works on it is contention; give up.
_ATTEMPTS = 16


# --- errors -------------------------------------------------------------------------------


class RotationError(RequestError):
    """A rotation could not proceed; nothing was promoted. Safe to retry with the same token."""

    status = 400


class TargetError(RotationError):
    """The target refused or failed (unreachable, the new credential did not work): a
    dependency, hence 503. Messages never carry credential values."""

    status = 503


class TargetParamsError(RotationError):
    """A secret's params do not suit its target (a missing user name, an impossible
    password policy): the client's input, hence 400."""

    status = 400


class NotPending(RotationError):
    """The request token is not the pending version (a step out of order, or another
    worker already finished this rotation)."""


class RotationInProgress(RotationError):
    """A step arrived for a token other than the one in flight (Secrets Manager order)."""

    status = 409


# --- the target protocol ----------------------------------------------------------------


@runtime_checkable
class CredentialTarget(Protocol):
    """A system whose credentials rotate. Every method is idempotent: after a crash it
    runs again with the same arguments. `params` is the secret's configuration for this
    target (no secret material: a user name, a password policy); values are JSON
    objects. Failures raise `TargetError` with a message free of credentials."""

    kind: str

    def generate(self, params: Mapping[str, Any], current: Value | None, previous: Value | None) -> Value:
        """The next value. A target that mints credentials (an IAM access key) mints
        here, making room first by deleting what is neither current nor previous."""
        ...

    def apply(self, params: Mapping[str, Any], pending: Value, current: Value | None) -> None:
        """Put `pending` into effect without disturbing `current`."""
        ...

    def verify(self, params: Mapping[str, Any], pending: Value) -> None:
        """Raise TargetError unless `pending` works."""
        ...

    def retire(self, params: Mapping[str, Any], current: Value, previous: Value | None) -> None:
        """After promotion: wind down what the new CURRENT replaces (deactivate an old
        key). Targets whose previous credentials stay valid do nothing here."""
        ...

    def revoke(self, params: Mapping[str, Any], value: Value) -> None:
        """Make `value` stop working now (a breach)."""
        ...


# --- the store protocol -----------------------------------------------------------------


@dataclass(frozen=True)
class SecretState:
    """One secret's rotation state as a store sees it."""

    name: str
    target: str
    params: dict[str, Any]
    current: str | None  # version ids (request tokens)
    previous: str | None
    pending: str | None
    in_flight: str | None  # the token of the rotation in flight
    progress: str | None  # the last step it completed (CREATED ... PROMOTED)
    finished_tokens: tuple[str, ...] = ()
    rotations: int = 0
    interval: int = 0
    next_due: float | None = None
    last_rotated: float | None = None
    revoked: tuple[str, ...] = ()

    def stage_of(self, version: str) -> Stage | None:
        for stage, vid in (
            (Stage.CURRENT, self.current),
            (Stage.PENDING, self.pending),
            (Stage.PREVIOUS, self.previous),
        ):
            if vid == version:
                return stage
        return None


class VersionStore(Protocol):
    """Where a secret's versions and stage labels live. A store whose `supersedes_pending`
    is true lets a new token replace an abandoned pending version (Secrets Manager
    decides which rotation is in flight); the ledger store refuses instead."""

    supersedes_pending: bool

    def state(self, name: str) -> SecretState:
        """Raises NotFound for an unknown secret."""
        ...

    def value(self, name: str, version: str) -> Value: ...

    def put_pending(self, name: str, token: str, value: Value) -> None:
        """Store `value` as the PENDING version `token`; a no-op if it is already there.
        Raises RotationInProgress if another token is pending."""
        ...

    def record(self, name: str, token: str, progress: str) -> None:
        """Remember that the rotation `token` completed a step (stores that cannot
        remember may do nothing: their driver retries steps itself)."""
        ...

    def promote(self, name: str, token: str) -> None:
        """PENDING `token` becomes CURRENT, CURRENT becomes PREVIOUS, in one conditional
        write. A no-op if `token` is already CURRENT."""
        ...

    def complete(self, name: str, token: str) -> None:
        """The rotation `token` is over (after the target retired what it replaced)."""
        ...


# --- the state machine ------------------------------------------------------------------


@dataclass(frozen=True)
class RotationResult:
    name: str
    token: str
    outcome: str  # "rotated" | "already-done" | "resumed"
    resumed_token: str | None = None  # a rotation in flight that was finished first

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "token": self.token,
            "outcome": self.outcome,
            "resumed_token": self.resumed_token,
        }


class Rotator:
    """Runs the four steps for secrets in one store against registered targets."""

    def __init__(
        self,
        store: VersionStore,
        targets: Mapping[str, CredentialTarget],
        *,
        on_step: Callable[[str, str, Step], None] | None = None,
    ) -> None:
        self.store = store
        self.targets = dict(targets)
        # Called after each step lands (tests use it to crash between steps).
        self.on_step = on_step

    def target(self, state: SecretState) -> CredentialTarget:
        found = self.targets.get(state.target)
        if found is None:
            raise Unavailable(f"no credential target {state.target!r} is configured in this process")
        return found

    def run_step(self, name: str, step: Step, token: str) -> None:
        """One step, as a Secrets Manager rotation Lambda runs it. Idempotent."""
        token = validate_token(token)
        state = self.store.state(name)
        target = self.target(state)
        if step is Step.CREATE:
            if state.current == token or token in state.finished_tokens or state.pending == token:
                return
            if state.pending is not None and state.pending != token and not self.store.supersedes_pending:
                raise RotationInProgress(
                    f"secret {name!r} has another rotation pending; finish it (or let it be retried) first"
                )
            current = self._value(name, state.current)
            previous = self._value(name, state.previous)
            value = target.generate(state.params, current, previous)
            self.store.put_pending(name, token, value)
            self.store.record(name, token, CREATED)
        elif step is Step.SET:
            pending = self._pending(name, state, token)
            if pending is None:
                return  # already promoted: the value is in effect
            target.apply(state.params, pending, self._value(name, state.current))
            self.store.record(name, token, SET_DONE)
        elif step is Step.TEST:
            pending = self._pending(name, state, token)
            if pending is None:
                return
            target.verify(state.params, pending)
            self.store.record(name, token, TESTED)
        else:
            if state.current != token:
                if state.pending != token:
                    raise NotPending(f"request token is not pending for secret {name!r}")
                self.store.promote(name, token)
                state = self.store.state(name)
            if self.on_step is not None:
                self.on_step(name, token, Step.FINISH)  # between promotion and retirement
            current = self._value(name, state.current)
            assert current is not None
            target.retire(state.params, current, self._value(name, state.previous))
            self.store.complete(name, token)
            return
        if self.on_step is not None:
            self.on_step(name, token, step)

    def rotate(self, name: str, token: str | None = None) -> RotationResult:
        """Every remaining step of one rotation. With no token, a rotation in flight is
        finished (that is the rotation) or a new one starts under a random token. A
        rotation in flight under another token is finished first; racing workers
        help each other finish rather than fail."""
        if token is not None:
            token = validate_token(token)
        resumed: str | None = None
        for _ in range(_ATTEMPTS):
            state = self.store.state(name)
            if token is not None and token in state.finished_tokens and state.in_flight != token:
                return RotationResult(name, token, "already-done", resumed)
            if state.in_flight is not None and state.in_flight != token:
                resumed = state.in_flight
                try:
                    self._run_from(name, state.in_flight, state.progress)
                except (NotPending, RotationInProgress):
                    continue  # another worker moved it on meanwhile: look again
                if token is None:
                    return RotationResult(name, resumed, "resumed", resumed)
                continue
            if token is None:
                token = new_token()
            progress = state.progress if state.in_flight == token else None
            try:
                self._run_from(name, token, progress)
            except RotationInProgress:
                continue  # another token got in first: finish it, then ours
            except NotPending:
                if token not in self.store.state(name).finished_tokens:
                    raise  # not a race another worker won: a real error
            return RotationResult(name, token, "rotated", resumed)
        raise Unavailable(f"secret {name!r} kept changing during rotation; retry with the same token")

    def _run_from(self, name: str, token: str, progress: str | None) -> None:
        start = 0 if progress is None else _PROGRESS_ORDER.index(progress) + 1
        if progress == PROMOTED:
            start = STEPS.index(Step.FINISH)  # promoted, not yet retired: finish again
        for step in STEPS[start:]:
            self.run_step(name, step, token)

    def enroll(
        self,
        store: LedgerVersionStore,
        name: str,
        *,
        target: str,
        params: Mapping[str, Any],
        interval: int = 0,
        token: str | None = None,
    ) -> bool:
        """Start managing a credential: generate, set and test its first value, then
        store it as CURRENT. False (and nothing changed) if the secret exists."""
        name = validate_name(name)
        impl = self.targets.get(target)
        if impl is None:
            raise InvalidRequest(f"unknown credential target {target!r}; configured: {sorted(self.targets)}")
        try:
            store.state(name)
            return False
        except NotFound:
            pass
        value = impl.generate(params, None, None)
        impl.apply(params, value, None)
        impl.verify(params, value)
        return store.create(name, target=target, params=params, value=value, interval=interval, token=token)

    def revoke(self, name: str, stage: Stage) -> None:
        """Make the credential at `stage` stop working on the target now."""
        state = self.store.state(name)
        version = {
            Stage.CURRENT: state.current,
            Stage.PREVIOUS: state.previous,
            Stage.PENDING: state.pending,
        }[stage]
        if version is None:
            raise InvalidRequest(f"secret {name!r} has no {stage.value} version")
        value = self.store.value(name, version)
        self.target(state).revoke(state.params, value)
        if isinstance(self.store, LedgerVersionStore):
            self.store.mark_revoked(name, version)

    def _value(self, name: str, version: str | None) -> Value | None:
        if version is None:
            return None
        try:
            return self.store.value(name, version)
        except NotFound:
            # Read from a state that other workers have since moved past (two promotions
            # retire a version): a race, which `rotate` answers by looking again.
            now = self.store.state(name)
            if version in (now.current, now.previous):
                raise
            raise RotationInProgress(
                f"secret {name!r} moved on while this step ran; retry the step"
            ) from None

    def _pending(self, name: str, state: SecretState, token: str) -> Value | None:
        if state.current == token:
            return None
        if state.pending != token:
            raise NotPending(f"request token is not pending for secret {name!r}; run createSecret first")
        return self.store.value(name, token)


def new_token() -> str:
    return secrets.token_hex(16)


def validate_token(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise InvalidRequest("a rotation request token is a non-empty string")
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable() or "/" in token or "#" in token:
        raise InvalidRequest(
            f"a rotation request token has at most {MAX_TOKEN_CHARS} printable characters, without '/' or '#'"
        )
    return token


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or len(prefix.encode()) > 512 or (prefix and not prefix.isprintable()):
        raise InvalidRequest("a name prefix is a string of at most 512 printable bytes")
    return prefix


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a rotated secret needs a name")
    if len(name.encode()) > 512 or not name.isprintable() or "#" in name:
        raise InvalidRequest("a rotated secret's name is at most 512 printable bytes, without '#'")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts) or any(c.isspace() for c in name):
        raise InvalidRequest("a rotated secret's name has no empty, '.' or '..' segments and no whitespace")
    return name


# --- the cell's own store ---------------------------------------------------------------


class LedgerVersionStore:
    """Versions in the cell's ledger. One ROTATION record per secret holds its stages,
    the rotation in flight and the tokens it finished; each version's value is a
    SECRET_VERSION item sealed in its own envelope (AAD: name and version). A version
    item is written in the same transaction that names it PENDING and deleted in the
    one that drops it from PREVIOUS, so nothing is orphaned. A ROTATION_DUE item per
    secret with a schedule (path: its due second, zero-padded, then its name) is
    written in the same transaction as each change of `next_due`: the sweep reads the
    index up to now instead of every record."""

    VERSION_PREFIX = "rotation/"
    supersedes_pending = False

    def __init__(
        self, ledger: Ledger, envelopes: Envelopes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.ledger = ledger
        self.envelopes = envelopes
        self.clock = clock

    # --- records ------------------------------------------------------------------------

    @staticmethod
    def _record_key(name: str) -> Key:
        return Key(Kind.ROTATION, name)

    def _version_key(self, name: str, version: str) -> Key:
        return Key(Kind.SECRET_VERSION, f"{self.VERSION_PREFIX}{name}#{version}")

    @staticmethod
    def _due_key(name: str, due: float) -> Key:
        return Key(Kind.ROTATION_DUE, f"{int(due):012d}/{name}")

    def _due_ops(self, name: str, before: float | None, after: float | None) -> list[Op]:
        """The index's change when `next_due` goes from `before` to `after`."""
        if before is not None and after is not None and int(before) == int(after):
            return []
        ops: list[Op] = []
        if before is not None:
            old = self.ledger.get(self._due_key(name, before), consistent=True)
            if old is not None:
                ops.append(Delete(old.key, old.version))
        if after is not None and self.ledger.get(self._due_key(name, after), consistent=True) is None:
            ops.append(Put(self._due_key(name, after), encode_json({"name": name}), 0))
        return ops

    @staticmethod
    def _aad(name: str, version: str) -> bytes:
        return f"keycell:rotation:{name}#{version}".encode()

    def _load(self, name: str) -> tuple[dict[str, Any], int]:
        found = get_json(self.ledger, self._record_key(validate_name(name)), consistent=True)
        if found is None:
            raise NotFound(f"no rotated secret named {name!r}")
        return found

    @staticmethod
    def _to_state(record: Mapping[str, Any]) -> SecretState:
        flight = record.get("in_flight") or {}
        return SecretState(
            name=str(record["name"]),
            target=str(record["target"]),
            params=dict(record.get("params") or {}),
            current=record.get("current"),
            previous=record.get("previous"),
            pending=record.get("pending"),
            in_flight=flight.get("token"),
            progress=flight.get("progress"),
            finished_tokens=tuple(record.get("finished") or ()),
            rotations=int(record.get("rotations", 0)),
            interval=int(record.get("interval", 0)),
            next_due=record.get("next_due"),
            last_rotated=record.get("last_rotated"),
            revoked=tuple(record.get("revoked") or ()),
        )

    def _seal(self, name: str, version: str, value: Value) -> bytes:
        plaintext = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        return self.envelopes.seal(plaintext, self._aad(name, version)).to_bytes()

    def _mutate(self, name: str, change: Callable[[dict[str, Any]], list[Op] | None]) -> None:
        """Compare-and-set on the record; `change` edits it in place and returns extra
        ops for the same transaction, or None when there is nothing to do."""
        for _ in range(_ATTEMPTS):
            record, version = self._load(name)
            due = record.get("next_due")
            extra = change(record)
            if extra is None:
                return
            extra = [*extra, *self._due_ops(name, due, record.get("next_due"))]
            try:
                self.ledger.transact([Put(self._record_key(name), encode_json(record), version), *extra])
            except ConflictError:
                continue
            return
        raise Unavailable(f"secret {name!r} kept changing during rotation; retry with the same token")

    # --- creating and reading -----------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        target: str,
        params: Mapping[str, Any],
        value: Value,
        interval: int = 0,
        token: str | None = None,
    ) -> bool:
        """A new secret whose first version is CURRENT at once (the caller put it into
        effect on the target first). False if the secret already exists."""
        name = validate_name(name)
        token = validate_token(token or new_token())
        now = self.clock()
        record = {
            "name": name,
            "target": target,
            "params": dict(params),
            "current": token,
            "previous": None,
            "pending": None,
            "in_flight": None,
            "finished": [token],
            "rotations": 0,
            "interval": int(interval),
            "next_due": now + interval if interval else None,
            "created": now,
            "last_rotated": None,
            "revoked": [],
        }
        try:
            self.ledger.transact(
                [
                    Put(self._record_key(name), encode_json(record), 0),
                    Put(self._version_key(name, token), self._seal(name, token, value), 0),
                    *self._due_ops(name, None, now + interval if interval else None),
                ]
            )
        except ConflictError:
            return False
        return True

    def state(self, name: str) -> SecretState:
        return self._to_state(self._load(name)[0])

    def value(self, name: str, version: str) -> Value:
        item = self.ledger.get(self._version_key(validate_name(name), version), consistent=True)
        if item is None:
            raise NotFound(f"secret {name!r} has no version {version!r}")
        plaintext = self.envelopes.open(Envelope.from_bytes(item.value), self._aad(name, version))
        value = json.loads(plaintext)
        if not isinstance(value, dict):
            raise ValueError("a rotated value is not a JSON object")
        return value

    def names(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        for item in iter_prefix(self.ledger, Kind.ROTATION, prefix, page_size=500):
            yield item.key.path

    def states(self, prefix: str = "") -> Iterator[SecretState]:
        check_prefix(prefix)
        for item in iter_prefix(self.ledger, Kind.ROTATION, prefix, page_size=500):
            yield self._to_state(json.loads(item.value))

    def due_states(self, now: float, prefix: str = "") -> Iterator[SecretState]:
        """The secrets due by `now` (under `prefix`), from the index: it is read in due
        order up to `now`, so a sweep's work follows what is due, not what exists. An
        index item its record no longer backs (a race with a change) is skipped."""
        check_prefix(prefix)
        for item in iter_prefix(self.ledger, Kind.ROTATION_DUE, page_size=500):
            due, _, name = item.key.path.partition("/")
            if int(due) > now:
                return
            if not name.startswith(prefix):
                continue
            try:
                state = self.state(name)
            except NotFound:
                continue
            if state.next_due is not None and int(state.next_due) == int(due):
                yield state

    def index_due(self, prefix: str = "") -> int:
        """Write the index items missing for secrets under `prefix` (records made before
        the index existed); returns how many were added."""
        added = 0
        for state in self.states(prefix):
            if state.next_due is None:
                continue
            with contextlib.suppress(ConflictError):  # already indexed
                self.ledger.put_if(
                    self._due_key(state.name, state.next_due), encode_json({"name": state.name}), 0
                )
                added += 1
        return added

    def configure(
        self, name: str, *, interval: int | None = None, params: Mapping[str, Any] | None = None
    ) -> None:
        def change(record: dict[str, Any]) -> list[Op] | None:
            if interval is not None:
                record["interval"] = int(interval)
                record["next_due"] = self.clock() + interval if interval else None
            if params is not None:
                record["params"] = dict(params)
            return []

        self._mutate(name, change)

    def delete(self, name: str) -> None:
        """The record and every version item (the target is not touched)."""
        record, version = self._load(name)
        ops: list[Op] = [
            Delete(self._record_key(name), version),
            *self._due_ops(name, record.get("next_due"), None),
        ]
        for stage in ("current", "previous", "pending"):
            vid = record.get(stage)
            if vid:
                item = self.ledger.get(self._version_key(name, vid), consistent=True)
                if item is not None:
                    ops.append(Delete(item.key, item.version))
        self.ledger.transact(ops)

    # --- the VersionStore protocol -------------------------------------------------------

    def put_pending(self, name: str, token: str, value: Value) -> None:
        sealed = self._seal(name, token, value)

        def change(record: dict[str, Any]) -> list[Op] | None:
            if record.get("pending") == token or record.get("current") == token:
                return None
            if record.get("pending"):
                raise RotationInProgress(f"secret {name!r} has another rotation pending")
            record["pending"] = token
            record["in_flight"] = {"token": token, "progress": CREATED, "started": self.clock()}
            return [Put(self._version_key(name, token), sealed, 0)]

        self._mutate(name, change)

    def record(self, name: str, token: str, progress: str) -> None:
        def change(record: dict[str, Any]) -> list[Op] | None:
            flight = record.get("in_flight") or {}
            if flight.get("token") != token:
                return None
            done = flight.get("progress")
            if done is not None and _PROGRESS_ORDER.index(done) >= _PROGRESS_ORDER.index(progress):
                return None
            record["in_flight"] = {**flight, "progress": progress}
            return []

        self._mutate(name, change)

    def promote(self, name: str, token: str) -> None:
        now = self.clock()

        def change(record: dict[str, Any]) -> list[Op] | None:
            if record.get("current") == token:
                return None
            if record.get("pending") != token:
                raise NotPending(f"request token is not pending for secret {name!r}")
            ops: list[Op] = []
            dropped = record.get("previous")
            if dropped:
                item = self.ledger.get(self._version_key(name, dropped), consistent=True)
                if item is not None:
                    ops.append(Delete(item.key, item.version))
            record["previous"] = record.get("current")
            record["current"] = token
            record["pending"] = None
            record["in_flight"] = {**(record.get("in_flight") or {"token": token}), "progress": PROMOTED}
            record["finished"] = [*(record.get("finished") or []), token][-REMEMBERED_TOKENS:]
            record["rotations"] = int(record.get("rotations", 0)) + 1
            record["last_rotated"] = now
            interval = int(record.get("interval") or 0)
            record["next_due"] = now + interval if interval else None
            # A revoked credential that is no longer CURRENT or PREVIOUS is history.
            live = {record["current"], record["previous"]}
            record["revoked"] = [v for v in record.get("revoked") or [] if v in live]
            return ops

        self._mutate(name, change)

    def complete(self, name: str, token: str) -> None:
        def change(record: dict[str, Any]) -> list[Op] | None:
            flight = record.get("in_flight") or {}
            if flight.get("token") != token:
                return None
            record["in_flight"] = None
            return []

        self._mutate(name, change)

    def mark_revoked(self, name: str, version: str) -> None:
        def change(record: dict[str, Any]) -> list[Op] | None:
            revoked = list(record.get("revoked") or [])
            if version in revoked:
                return None
            record["revoked"] = [*revoked, version]
            return []

        self._mutate(name, change)


# --- scheduling -------------------------------------------------------------------------


def splay_offset(name: str, window: float) -> float:
    """Where in a `window`-second splay window this secret's rotation falls: a stable
    hash of its name, so every sweep agrees and a redelivered sweep changes nothing."""
    if window <= 0:
        return 0.0
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * window


@dataclass(frozen=True)
class Slot:
    name: str
    due: float  # when the schedule said
    at: float  # when it runs: due's minute plus the splay offset


def plan_due(states: Sequence[SecretState], now: float, window: float = 60.0) -> list[Slot]:
    """Every secret due by `now`, each given a time inside the splay window that starts
    at the minute it became due, so rotations due in the same minute spread over the
    window instead of landing in the same second. Sorted by time."""
    slots = []
    for state in states:
        if state.next_due is None or state.next_due > now:
            continue
        minute = state.next_due - state.next_due % 60
        slots.append(
            Slot(state.name, state.next_due, max(state.next_due, minute + splay_offset(state.name, window)))
        )
    return sorted(slots, key=lambda s: (s.at, s.name))


@dataclass
class SweepReport:
    rotated: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # due, their splay slot still ahead
    failed: dict[str, str] = field(default_factory=dict)  # name -> error type and message
    indexed: int = 0  # index items a full sweep added

    def to_dict(self) -> dict[str, Any]:
        return {
            "rotated": self.rotated,
            "waiting": self.waiting,
            "failed": self.failed,
            "indexed": self.indexed,
        }


def sweep(
    rotator: Rotator,
    store: LedgerVersionStore,
    now: float,
    *,
    window: float = 60.0,
    prefix: str = "",
    limit: int = 1000,
    sweep_id: str = "",
    full: bool = False,
) -> SweepReport:
    """Rotate every secret whose splay slot has come (a scheduled event's work). The
    token is derived from the secret's due time, so two sweeps racing, or one
    redelivered, rotate each secret once. The due index says which secrets are due;
    `full` first reads every record and writes the index items missing (once, after
    an upgrade from a version without the index)."""
    report = SweepReport()
    if full:
        report.indexed = store.index_due(prefix)
    for slot in plan_due(list(store.due_states(now, prefix)), now, window):
        if slot.at > now:
            report.waiting.append(slot.name)
            continue
        if len(report.rotated) + len(report.failed) >= limit:
            report.waiting.append(slot.name)
            continue
        token = f"sched-{int(slot.due)}" if not sweep_id else f"sched-{sweep_id}"
        try:
            rotator.rotate(slot.name, token)
            report.rotated.append(slot.name)
        except RequestError as exc:
            log.warning("scheduled rotation of %s failed: %s", slot.name, type(exc).__name__)
            report.failed[slot.name] = f"{type(exc).__name__}: {exc.message}"
    return report

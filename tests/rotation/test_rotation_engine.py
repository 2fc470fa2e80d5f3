"""The rotation state machine over the cell's ledger store: exactly one CURRENT,
idempotent per request token, resumable after a crash at any step, splay."""

from __future__ import annotations

import threading
from typing import Any

import boto3
import psycopg
import pytest

from keycell.adapters.targets.generic import GenericTarget
from keycell.adapters.targets.postgres import PostgresTarget, user_dsn
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.ledger import Delete, Kind, iter_prefix
from keycell.control_plane.rotation import (
    STEPS,
    LedgerVersionStore,
    RotationError,
    RotationInProgress,
    Rotator,
    Stage,
    Step,
    TargetError,
    Value,
    plan_due,
    splay_offset,
    sweep,
)
from keycell.testing.clock import ManualClock
from tests.rotation.conftest import pg_login_works, unique


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it."""


class CountingTarget(GenericTarget):
    def __init__(self) -> None:
        self.applied: list[str] = []

    def apply(self, params: Any, pending: Value, current: Value | None) -> None:
        self.applied.append(pending["password"])


def one_current(store: LedgerVersionStore, name: str) -> None:
    state = store.state(name)
    stages = [state.stage_of(v) for v in {state.current, state.previous, state.pending} if v]
    assert stages.count(Stage.CURRENT) == 1
    assert state.current not in (state.previous, state.pending)


def test_rotation_promotes_a_new_value_and_keeps_the_old_as_previous(any_store: LedgerVersionStore) -> None:
    rotator = Rotator(any_store, {"generic": GenericTarget()})
    assert rotator.enroll(any_store, "app/db", target="generic", params={"length": 20})
    first = any_store.state("app/db")
    old = any_store.value("app/db", first.current or "")
    result = rotator.rotate("app/db")
    state = any_store.state("app/db")
    assert result.outcome == "rotated" and state.current == result.token
    assert state.previous == first.current and state.pending is None and state.in_flight is None
    assert any_store.value("app/db", state.current) != old
    assert any_store.value("app/db", state.previous or "") == old
    assert state.rotations == 1
    one_current(any_store, "app/db")


def test_versions_beyond_previous_are_deleted_with_the_promotion(store: LedgerVersionStore) -> None:
    rotator = Rotator(store, {"generic": GenericTarget()})
    rotator.enroll(store, "svc", target="generic", params={})
    for _ in range(5):
        rotator.rotate("svc")
    paths = [i.key.path for i in iter_prefix(store.ledger, Kind.SECRET_VERSION, "rotation/svc#")]
    state = store.state("svc")
    assert sorted(paths) == sorted(f"rotation/svc#{v}" for v in (state.current, state.previous))


def test_values_are_sealed_in_envelopes_never_plain_in_the_ledger(store: LedgerVersionStore) -> None:
    rotator = Rotator(store, {"generic": GenericTarget()})
    rotator.enroll(store, "svc", target="generic", params={})
    password = store.value("svc", store.state("svc").current or "")["password"]
    raw = store.ledger.ledger  # the barrier's own ledger: ciphertext
    for item in iter_prefix(raw, Kind.SECRET_VERSION):
        assert password.encode() not in item.value


def test_the_same_request_token_rotates_once(store: LedgerVersionStore) -> None:
    target = CountingTarget()
    rotator = Rotator(store, {"generic": target})
    rotator.enroll(store, "svc", target="generic", params={})
    assert rotator.rotate("svc", "tok-1").outcome == "rotated"
    assert rotator.rotate("svc", "tok-1").outcome == "already-done"
    for step in STEPS:  # a redelivered event, step by step
        rotator.run_step("svc", step, "tok-1")
    assert store.state("svc").rotations == 1
    assert len(target.applied) == 2  # enroll and the one rotation


@pytest.mark.parametrize("crash_after", [*STEPS])
def test_a_crash_after_any_step_resumes_to_exactly_one_rotation(
    any_store: LedgerVersionStore, crash_after: Step
) -> None:
    def crash(name: str, token: str, step: Step) -> None:
        if step is crash_after:
            raise Crash()

    crashing = Rotator(any_store, {"generic": GenericTarget()}, on_step=crash)
    crashing.enroll(any_store, "svc", target="generic", params={})
    before = any_store.state("svc").current
    with pytest.raises(Crash):
        crashing.rotate("svc", "tok-crash")
    one_current(any_store, "svc")
    resumed = Rotator(any_store, {"generic": GenericTarget()}).rotate(
        "svc"
    )  # no token: finish what is in flight
    state = any_store.state("svc")
    assert resumed.token == "tok-crash"
    assert state.current == "tok-crash" and state.previous == before and state.in_flight is None
    assert state.rotations == 1
    one_current(any_store, "svc")


def test_a_second_token_finishes_the_rotation_in_flight_first(store: LedgerVersionStore) -> None:
    def crash(name: str, token: str, step: Step) -> None:
        if step is Step.SET:
            raise Crash()

    rotator = Rotator(store, {"generic": GenericTarget()}, on_step=crash)
    rotator.enroll(store, "svc", target="generic", params={})
    with pytest.raises(Crash):
        rotator.rotate("svc", "tok-a")
    result = Rotator(store, {"generic": GenericTarget()}).rotate("svc", "tok-b")
    state = store.state("svc")
    assert result.resumed_token == "tok-a" and state.current == "tok-b" and state.previous == "tok-a"
    assert state.rotations == 2


class FailingOnceTarget(GenericTarget):
    def __init__(self) -> None:
        self.fail = False

    def verify(self, params: Any, pending: Value) -> None:
        if self.fail:
            self.fail = False
            raise TargetError("logging in with the new credential failed")
        super().verify(params, pending)


def test_a_target_failure_leaves_current_untouched_and_the_rotation_resumable(
    store: LedgerVersionStore,
) -> None:
    target = FailingOnceTarget()
    rotator = Rotator(store, {"generic": target})
    rotator.enroll(store, "svc", target="generic", params={})
    before = store.state("svc").current
    target.fail = True  # the new credential does not work (yet)
    with pytest.raises(TargetError):
        rotator.rotate("svc", "tok-1")
    state = store.state("svc")
    assert state.current == before and state.pending == "tok-1" and state.progress == "set"
    result = rotator.rotate("svc")  # the next attempt (a retried event, the schedule) resumes it
    state = store.state("svc")
    assert result.token == "tok-1" and state.current == "tok-1" and state.rotations == 1


def test_steps_out_of_order_are_refused(store: LedgerVersionStore) -> None:
    rotator = Rotator(store, {"generic": GenericTarget()})
    rotator.enroll(store, "svc", target="generic", params={})
    rotator.run_step("svc", Step.CREATE, "tok-1")
    with pytest.raises(RotationInProgress):
        rotator.run_step("svc", Step.CREATE, "tok-2")
    with pytest.raises(RotationError):
        rotator.run_step("svc", Step.FINISH, "tok-9")
    with pytest.raises(NotFound):
        rotator.rotate("nope")


def test_concurrent_rotations_lose_nothing_and_one_current_holds_throughout(
    store: LedgerVersionStore,
) -> None:
    rotator = Rotator(store, {"generic": GenericTarget()})
    rotator.enroll(store, "svc", target="generic", params={})
    stop = threading.Event()
    violations: list[str] = []

    def watch() -> None:
        while not stop.is_set():
            state = store.state("svc")
            if state.current is None or state.current in (state.previous, state.pending):
                violations.append(repr(state))

    watcher = threading.Thread(target=watch)
    watcher.start()

    def work(worker: int) -> None:
        for i in range(10):
            # Under this much contention a rotation may answer "kept changing; retry with
            # the same token" (503): the contract is that the retry finishes it once.
            for _ in range(20):
                try:
                    rotator.rotate("svc", f"w{worker}-{i}")
                    break
                except Unavailable:
                    continue
                except Exception as exc:  # a thread's error must fail the test
                    violations.append(f"w{worker}-{i}: {type(exc).__name__}: {exc}")
                    return
            else:
                violations.append(f"w{worker}-{i} never finished")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert violations == []
    assert store.state("svc").rotations == 30


def test_bad_names_and_tokens_are_refused(store: LedgerVersionStore) -> None:
    rotator = Rotator(store, {"generic": GenericTarget()})
    for bad in ["", "a//b", "../x", "a b", "x#1"]:
        with pytest.raises(InvalidRequest):
            rotator.enroll(store, bad, target="generic", params={})
    with pytest.raises(InvalidRequest):
        rotator.enroll(store, "ok", target="nonexistent", params={})
    rotator.enroll(store, "ok", target="generic", params={})
    for bad in ["", "a/b", "x" * 200]:
        with pytest.raises(InvalidRequest):
            rotator.rotate("ok", bad)
    assert store.state("ok").rotations == 0


# --- postgres: alternating users --------------------------------------------------------


def test_postgres_alternates_users_and_never_breaks_the_active_connection(
    store: LedgerVersionStore, pg_target: PostgresTarget, postgres: Any
) -> None:
    base = unique("alt")
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{base}_rw"')
    rotator = Rotator(store, {"postgres": pg_target})
    rotator.enroll(store, base, target="postgres", params={"username": base, "grants": [f"{base}_rw"]})
    first = store.value(base, store.state(base).current or "")
    live = psycopg.connect(
        user_dsn(first["host"], first["port"], first["dbname"], first["username"], first["password"])
    )
    users = [first["username"]]
    for _ in range(3):
        rotator.rotate(base)
        state = store.state(base)
        current, previous = store.value(base, state.current or ""), store.value(base, state.previous or "")
        users.append(current["username"])
        assert pg_login_works(current) and pg_login_works(previous)
        assert live.execute("SELECT 1").fetchone() == (1,)  # the open session is untouched
        with psycopg.connect(
            user_dsn(
                current["host"], current["port"], current["dbname"], current["username"], current["password"]
            )
        ) as c:
            roles = {
                r[0]
                for r in c.execute(
                    "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = current_user"
                )
            }
            assert f"{base}_rw" in roles  # the idle user got the grants
    live.close()
    assert users == [base, f"{base}_clone", base, f"{base}_clone"]
    # The credentials from two rotations ago no longer work: that user's password moved on.
    assert not pg_login_works(first)


def test_revoking_the_previous_postgres_credentials_stops_them_and_ends_sessions(
    store: LedgerVersionStore, pg_target: PostgresTarget
) -> None:
    base = unique("rev")
    rotator = Rotator(store, {"postgres": pg_target})
    rotator.enroll(store, base, target="postgres", params={"username": base})
    rotator.rotate(base)
    state = store.state(base)
    previous = store.value(base, state.previous or "")
    session = psycopg.connect(
        user_dsn(
            previous["host"], previous["port"], previous["dbname"], previous["username"], previous["password"]
        )
    )
    rotator.revoke(base, Stage.PREVIOUS)
    assert not pg_login_works(previous)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    assert pg_login_works(store.value(base, state.current or ""))
    assert store.state(base).revoked == (state.previous,)
    rotator.rotate(base)  # its next turn brings the user back with a new password
    assert pg_login_works(store.value(base, store.state(base).current or ""))


def test_iam_rotation_deactivates_the_old_key_and_deletes_the_one_before(
    store: LedgerVersionStore, aws_endpoint: str
) -> None:
    from keycell.adapters.targets.aws_iam import AwsIamTarget

    iam = boto3.client("iam", endpoint_url=aws_endpoint, region_name="us-east-1")
    user = unique("iam")
    iam.create_user(UserName=user)
    rotator = Rotator(store, {"aws_iam": AwsIamTarget(endpoint_url=aws_endpoint)})
    rotator.enroll(store, user, target="aws_iam", params={"user": user})
    k1 = store.value(user, store.state(user).current or "")["access_key_id"]
    rotator.rotate(user)
    k2 = store.value(user, store.state(user).current or "")["access_key_id"]
    keys = {k["AccessKeyId"]: k["Status"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]}
    assert keys == {k1: "Inactive", k2: "Active"}
    rotator.rotate(user)
    k3 = store.value(user, store.state(user).current or "")["access_key_id"]
    keys = {k["AccessKeyId"]: k["Status"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]}
    assert keys == {k2: "Inactive", k3: "Active"}


# --- scheduling with splay ----------------------------------------------------------------


class CountingLedger:
    """The store's ledger, counting scans per kind (what a sweep reads)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.scanned: dict[Kind, int] = {}

    def scan(self, kind: Kind, *args: Any, **kwargs: Any) -> Any:
        page = self.inner.scan(kind, *args, **kwargs)
        self.scanned[kind] = self.scanned.get(kind, 0) + len(page.items)
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def due_index(store: LedgerVersionStore) -> list[str]:
    return [item.key.path for item in iter_prefix(store.ledger, Kind.ROTATION_DUE)]


def test_the_sweep_reads_the_due_index_not_every_record(any_store: LedgerVersionStore) -> None:
    """Every ledger: a sweep reads the index up to now (the due secrets' items), never
    the ROTATION records of secrets not due; each change of a schedule moves its item
    in the same transaction; a full sweep writes the items a record lacks."""
    store = any_store
    clock = ManualClock(1_800_000_000.0)
    store.clock = clock
    rotator = Rotator(store, {"generic": GenericTarget()})
    for i in range(12):
        rotator.enroll(store, f"idx/later/{i:02d}", target="generic", params={}, interval=86_400)
    rotator.enroll(store, "idx/never", target="generic", params={}, interval=0)
    soon = [f"idx/soon/{i}" for i in range(3)]
    for name in soon:
        rotator.enroll(store, name, target="generic", params={}, interval=60)
    index = due_index(store)
    assert len(index) == 15 and not any(path.endswith("/idx/never") for path in index)
    clock.advance(120)
    counting = CountingLedger(store.ledger)
    store.ledger = counting
    report = sweep(rotator, store, clock(), window=0, prefix="idx/")
    store.ledger = counting.inner
    assert sorted(report.rotated) == soon and report.waiting == []
    assert counting.scanned.get(Kind.ROTATION, 0) == 0  # no record scan
    assert counting.scanned[Kind.ROTATION_DUE] <= 15  # one page of the index, read up to now
    # Each rotated secret's item moved to its new due second; nothing else changed.
    after = due_index(store)
    assert len(after) == 15
    for name in soon:
        state = store.state(name)
        assert f"{int(state.next_due):012d}/{name}" in after
    store.configure("idx/later/00", interval=0)  # unscheduled: its item goes
    store.delete("idx/later/01")  # deleted: its item goes
    assert len(due_index(store)) == 13
    # Records without items (written before the index): only a full sweep finds them.
    store.ledger.transact(
        [Delete(item.key, item.version) for item in iter_prefix(store.ledger, Kind.ROTATION_DUE)]
    )
    clock.advance(86_400)
    assert sweep(rotator, store, clock(), window=0, prefix="idx/").rotated == []
    full = sweep(rotator, store, clock(), window=0, prefix="idx/", full=True)
    assert full.indexed == 13 and len(full.rotated) == 13
    assert len(due_index(store)) == 13


def test_rotations_due_in_the_same_minute_spread_across_the_window(store: LedgerVersionStore) -> None:
    clock = ManualClock(1_800_000_000.0)  # on a minute boundary
    store.clock = clock
    rotator = Rotator(store, {"generic": GenericTarget()})
    names = [f"due/{i:03d}" for i in range(120)]
    for name in names:
        rotator.enroll(store, name, target="generic", params={}, interval=3600)
    clock.advance(3600)
    slots = plan_due(list(store.states("due/")), clock(), window=60)
    assert [s.name for s in slots] != names  # not in name order: spread by hash
    offsets = [s.at - clock() for s in slots]
    assert all(0 <= o < 60 for o in offsets)
    # 120 rotations over 60 s: no second holds more than a handful.
    per_second = [sum(1 for o in offsets if int(o) == s) for s in range(60)]
    assert max(per_second) <= 8 and sum(1 for c in per_second if c) >= 40
    assert splay_offset("due/001", 60) == splay_offset("due/001", 60)

    clock.advance(30)
    first = sweep(rotator, store, clock(), window=60, prefix="due/")
    assert 0 < len(first.rotated) < 120 and len(first.rotated) + len(first.waiting) == 120
    again = sweep(rotator, store, clock(), window=60, prefix="due/")  # redelivered: nothing twice
    assert again.rotated == [] and sorted(again.waiting) == sorted(first.waiting)
    clock.advance(30)
    last = sweep(rotator, store, clock(), window=60, prefix="due/")
    assert sorted(first.rotated + last.rotated) == names
    assert all(
        s.rotations == 1 and s.next_due == pytest.approx(s.last_rotated + 3600) for s in store.states("due/")
    )

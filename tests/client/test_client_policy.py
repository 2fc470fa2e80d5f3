"""The arithmetic, without a server: token buckets, decorrelated jitter, the renewal
window and plan, request classes, the server's rate limits and admission gate."""

from __future__ import annotations

import asyncio
import random

import pytest

from keycell.client import (
    Credential,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    RateLimiter,
    RenewalPlan,
    RenewalWindow,
    RetryPolicy,
    Sealed,
    TokenBucket,
    Unavailable,
    decorrelated_jitter,
)
from keycell.client.watcher import EXPIRED, NOT_RENEWABLE, REVOKED, Stop
from keycell.control_plane.admission import AdmissionConfig, AdmissionGate, Priority, RateLimits, classify
from keycell.testing.clock import ManualClock


def test_token_bucket_spends_refills_and_says_how_long_to_wait() -> None:
    clock = ManualClock(100.0)
    bucket = TokenBucket(rate=2, capacity=4, clock=clock)
    assert [bucket.take() for _ in range(4)] == [0.0] * 4
    assert bucket.take() == pytest.approx(0.5)  # one token at 2/s
    clock.advance(0.5)
    assert bucket.take() == 0.0
    clock.advance(100)
    assert bucket.tokens == 4  # never above capacity


def test_token_bucket_floor_keeps_a_reserve() -> None:
    clock = ManualClock(0.0)
    bucket = TokenBucket(rate=10, capacity=10, clock=clock)
    taken = sum(1 for _ in range(10) if bucket.take(floor=5) == 0)
    assert taken == 5
    assert bucket.take(floor=5) == pytest.approx(0.1)
    assert bucket.take() == 0.0  # no floor: the reserve is available


def test_rate_limiter_waits_with_the_injected_sleep() -> None:
    clock = ManualClock(0.0)
    limiter = RateLimiter(rate=4, burst=1, clock=clock)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    assert limiter.acquire(sleep) == 0
    assert limiter.acquire(sleep) == pytest.approx(0.25)
    assert slept == [pytest.approx(0.25)]


def test_decorrelated_jitter_stays_between_base_and_three_times_previous_and_cap() -> None:
    rng = random.Random(7)
    previous = 0.1
    for _ in range(1000):
        nxt = decorrelated_jitter(previous, base=0.1, cap=5.0, rng=rng)
        assert 0.1 <= nxt <= min(5.0, max(0.1, previous * 3))
        previous = nxt
    samples = [decorrelated_jitter(1.0, base=0.1, cap=100, rng=rng) for _ in range(2000)]
    assert 1.4 < sum(samples) / len(samples) < 1.7  # uniform(0.1, 3): mean 1.55


def test_retry_policy_honours_retry_after_and_retries_only_what_may_succeed() -> None:
    policy = RetryPolicy(base=0.1, cap=2.0, rng=random.Random(1))
    limited = RateLimited(["slow down"], retry_after=3)
    delays = [policy.delay(0.5, limited) for _ in range(100)]
    assert all(3 <= d <= 3 + 2.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 50  # jittered, not all at 3 s
    assert policy.retryable(limited) and policy.retryable(Unavailable(["down"]))
    assert not policy.retryable(Sealed(["Vault is sealed"]))
    assert not policy.retryable(PermissionDenied(["no"]))


def test_errors_say_what_to_do() -> None:
    error = PermissionDenied(["permission denied"], path="secret/data/x")
    assert "log in again" in str(error) and "secret/data/x" in str(error)
    assert "retry after" in str(RateLimited(["x"], retry_after=2))


def test_renewal_window_is_uniform_inside_its_bounds() -> None:
    window = RenewalWindow(rng=random.Random(3))
    delays = [window.delay(100) for _ in range(5000)]
    assert min(delays) >= 50 and max(delays) <= 80
    buckets = [sum(1 for d in delays if 50 + 3 * i <= d < 53 + 3 * i) for i in range(10)]
    assert max(buckets) / min(buckets) < 1.3
    with pytest.raises(ValueError):
        RenewalWindow(low=0.9, high=0.5)


def test_renewal_plan_decisions() -> None:
    clock = ManualClock(1000.0)
    credential = Credential("token", "t", ttl=100, renewable=True, accessor="a", obtained_at=1000.0)
    plan = RenewalPlan(
        credential, RenewalWindow(rng=random.Random(5)), RetryPolicy(base=0.5, cap=30), clock=clock
    )
    first = plan.first()
    assert isinstance(first, float) and 50 <= first <= 80
    clock.advance(first)
    step = plan.failed(RateLimited(["slow"], retry_after=4))
    assert isinstance(step, float) and step >= 4
    clock.advance(200)  # past expiry
    expired = plan.failed(Unavailable(["down"]))
    assert isinstance(expired, Stop) and expired.reason == EXPIRED
    denied = plan.failed(PermissionDenied(["denied"]))
    assert isinstance(denied, Stop) and denied.reason == REVOKED
    gone = plan.failed(InvalidRequest(["lease not found or lease is not renewable"]))
    assert isinstance(gone, Stop) and gone.reason == REVOKED
    renewed = Credential("token", "t", ttl=60, renewable=False, obtained_at=clock())
    assert plan.renewed(renewed) == Stop(NOT_RENEWABLE)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "auth/token/revoke-accessor", Priority.REVOKE),
        ("PUT", "sys/leases/revoke-prefix/auth/jwt", Priority.REVOKE),
        ("POST", "sys/revoke/database/creds/x/abc", Priority.REVOKE),
        ("POST", "auth/token/renew-self", Priority.RENEW),
        ("PUT", "sys/leases/renew", Priority.RENEW),
        ("POST", "auth/jwt/login", Priority.ISSUE),
        ("POST", "auth/token/create-orphan", Priority.ISSUE),
        ("POST", "database/creds/readonly", Priority.ISSUE),
        ("GET", "secret/data/revoke", Priority.NORMAL),
        ("POST", "secret/data/app", Priority.NORMAL),
    ],
)
def test_classify(method: str, path: str, expected: Priority) -> None:
    assert classify(method, path) == expected


def test_rate_limits_shed_issuance_first_and_never_revocations() -> None:
    clock = ManualClock(0.0)
    limits = RateLimits(AdmissionConfig(global_rate=10, per_identity_rate=0), clock=clock)
    issued = sum(1 for i in range(20) if limits.check(Priority.ISSUE, f"id{i}") is None)
    assert issued == 5  # issuance leaves half the bucket
    refused = limits.check(Priority.ISSUE, "x")
    assert refused is not None and refused.retry_after > 0
    renewed = sum(1 for i in range(20) if limits.check(Priority.RENEW, f"id{i}") is None)
    assert renewed == 5  # renewals may drain it
    assert all(limits.check(Priority.REVOKE, "x") is None for _ in range(100))


def test_rate_limits_per_identity() -> None:
    clock = ManualClock(0.0)
    limits = RateLimits(AdmissionConfig(global_rate=0, per_identity_rate=2), clock=clock)
    assert limits.check(Priority.NORMAL, "a") is None and limits.check(Priority.NORMAL, "a") is None
    refused = limits.check(Priority.NORMAL, "a")
    assert refused is not None and refused.retry_after == pytest.approx(0.5)
    assert limits.check(Priority.NORMAL, "b") is None  # another identity has its own bucket


def test_admission_config_from_env() -> None:
    config = AdmissionConfig.from_env(
        {"KEYCELL_RATE_GLOBAL": "0", "KEYCELL_RATE_PER_IDENTITY": "7", "KEYCELL_MAX_INFLIGHT": "3"}
    )
    assert (config.global_rate, config.per_identity_rate, config.max_inflight) == (0, 7, 3)


def test_admission_gate_serves_revocations_first_and_sheds_issuance() -> None:
    async def scenario() -> tuple[list[str], int]:
        gate = AdmissionGate(max_inflight=1, max_queue=3)
        order: list[str] = []
        blocker = await gate.enter(Priority.NORMAL)  # occupies the only slot
        assert blocker

        async def request(name: str, priority: Priority) -> None:
            if await gate.enter(priority):
                order.append(name)
                await asyncio.sleep(0)
                gate.leave()
            else:
                order.append("shed:" + name)

        tasks = [
            asyncio.create_task(request(name, priority))
            for name, priority in [
                ("login1", Priority.ISSUE),
                ("login2", Priority.ISSUE),
                ("renew", Priority.RENEW),
                ("revoke", Priority.REVOKE),
            ]
        ]
        await asyncio.sleep(0.01)
        gate.leave()
        await asyncio.gather(*tasks)
        return order, gate.shed

    order, shed = asyncio.run(scenario())
    assert shed == 1
    assert order == ["shed:login2", "revoke", "renew", "login1"]

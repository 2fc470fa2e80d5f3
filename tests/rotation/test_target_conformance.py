"""One conformance suite for every CredentialTarget (generic, postgres on a real
PostgreSQL, aws_iam on moto): what the rotation state machine relies on."""

from __future__ import annotations

import pytest

from keycell.control_plane.rotation import CredentialTarget, TargetError
from tests.rotation.conftest import TargetCase


def test_a_target_is_a_credential_target(target_case: TargetCase) -> None:
    assert isinstance(target_case.target, CredentialTarget)
    assert target_case.target.kind == target_case.name


def test_a_generated_value_works_once_applied_and_verifies(target_case: TargetCase) -> None:
    t, params = target_case.target, target_case.make_params()
    value = t.generate(params, None, None)
    t.apply(params, value, None)
    t.verify(params, value)
    assert target_case.works(value)


def test_apply_is_idempotent(target_case: TargetCase) -> None:
    t, params = target_case.target, target_case.make_params()
    value = t.generate(params, None, None)
    t.apply(params, value, None)
    t.apply(params, value, None)  # a crash after apply repeats it
    t.verify(params, value)
    assert target_case.works(value)


def test_the_next_value_differs_and_leaves_the_current_one_working(target_case: TargetCase) -> None:
    t, params = target_case.target, target_case.make_params()
    current = t.generate(params, None, None)
    t.apply(params, current, None)
    pending = t.generate(params, current, None)
    assert pending != current
    t.apply(params, pending, current)
    t.verify(params, pending)
    assert target_case.works(current), "setting the pending value must not disturb the current one"
    assert target_case.works(pending)


def test_verify_refuses_a_value_that_does_not_work_without_quoting_it(target_case: TargetCase) -> None:
    t, params = target_case.target, target_case.make_params()
    value = t.generate(params, None, None)
    t.apply(params, value, None)
    secret_field = "secret_access_key" if "secret_access_key" in value else "password"
    wrong = {**value, secret_field: "Wrong-but-valid-shape-123"}
    if target_case.name == "aws_iam":
        wrong["access_key_id"] = "AKIAWRONGKEY00000000"
    with pytest.raises(TargetError) as caught:
        t.verify(params, wrong)
    assert "Wrong-but-valid-shape-123" not in str(caught.value)
    assert str(value[secret_field]) not in str(caught.value)


@pytest.mark.parametrize("target_case", ["postgres", "aws_iam"], indirect=True)
def test_revoke_stops_a_credential_at_once(target_case: TargetCase) -> None:
    t, params = target_case.target, target_case.make_params()
    value = t.generate(params, None, None)
    t.apply(params, value, None)
    assert target_case.works(value)
    t.revoke(params, value)
    assert not target_case.works(value)
    # Applying again (its next turn in a rotation) brings the user back.
    again = t.generate(params, None, None)
    t.apply(params, again, None)
    assert target_case.works(again)

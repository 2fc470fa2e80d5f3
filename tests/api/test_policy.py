"""ACL policies: parsing, Vault's matching and priority rules, and the policy store.

The matching and priority tests need no storage; the store's tests run on a real cell
(sqlite and DynamoDB-on-moto ledgers).
"""

from __future__ import annotations

import json

import pytest

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.policy import ACL, DEFAULT_POLICY, PolicyStore, parse_policy
from keycell.testing.cells import Cell


def acl(*texts: str) -> ACL:
    return ACL([parse_policy(f"p{i}", text) for i, text in enumerate(texts)])


def rule(path: str, *caps: str) -> str:
    return f'path "{path}" {{ capabilities = {json.dumps(list(caps))} }}\n'


# --- parsing ------------------------------------------------------------------------------


def test_hcl_and_json_parse_to_the_same_rules() -> None:
    from_hcl = parse_policy("a", rule("secret/data/*", "read", "list"))
    from_json = parse_policy("a", json.dumps({"path": {"secret/data/*": {"capabilities": ["read", "list"]}}}))
    assert from_hcl.rules == from_json.rules


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('path "a" {', "failed to parse"),
        (rule("a", "reed"), "invalid capability"),
        (rule("a/*/b", "read"), "last character"),
        (rule("a/+*", "read"), "forbidden"),
        ('path "a" { capabilities = ["read"] allowed_parameters = { "x" = [] } }', "not supported"),
        ('path "a" { capabilities = ["read"] colour = "red" }', "invalid key"),
    ],
)
def test_invalid_policies_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_policy("bad", text)


# --- matching -------------------------------------------------------------------------------


def test_deny_by_default() -> None:
    policies = acl(rule("secret/data/app", "read"))
    assert not policies.allows("secret/data/other", "read")
    assert not policies.allows("secret/data/app", "update")
    assert policies.capabilities("sys/mounts") == {"deny"}


def test_glob_matches_any_suffix_even_within_a_segment() -> None:
    policies = acl(rule("secret/foo*", "read"))
    assert policies.allows("secret/foo", "read")
    assert policies.allows("secret/foobar", "read")
    assert policies.allows("secret/foo/bar/baz", "read")
    assert not policies.allows("secret/fo", "read")


def test_plus_matches_exactly_one_segment() -> None:
    policies = acl(rule("secret/+/config", "read"))
    assert policies.allows("secret/app/config", "read")
    assert not policies.allows("secret/app/sub/config", "read")
    assert not policies.allows("secret/config", "read")


def test_plus_never_matches_an_empty_segment() -> None:
    policies = acl(rule("secret/data/pub/+/conf", "read"), rule("secret/metadata/+", "list"))
    assert policies.allows("secret/data/pub/x/conf", "read")
    assert not policies.allows("secret/data/pub//conf", "read")
    assert not policies.allows("secret/metadata/", "list")
    assert policies.capabilities("secret/metadata/") == {"deny"}


def test_capabilities_on_a_folder_say_what_a_list_of_it_is_allowed() -> None:
    policies = acl(rule("secret/metadata/app", "list", "read"), rule("secret/metadata/app/*", "read"))
    assert policies.allows("secret/metadata/app/", "list")
    assert policies.capabilities("secret/metadata/app/") == {"list", "read"}


def test_plus_with_a_trailing_glob() -> None:
    policies = acl(rule("secret/+/teams/*", "list"))
    assert policies.allows("secret/eu/teams/a/b", "list")
    assert not policies.allows("secret/eu/people/a", "list")


def test_deny_beats_allow_on_the_same_path_across_policies() -> None:
    policies = acl(rule("secret/data/app", "read", "update"), rule("secret/data/app", "deny"))
    assert not policies.allows("secret/data/app", "read")
    assert policies.capabilities("secret/data/app") == {"deny"}


def test_capabilities_on_the_same_path_add_up_across_policies() -> None:
    policies = acl(rule("secret/data/app", "read"), rule("secret/data/app", "update"))
    assert policies.capabilities("secret/data/app") == {"read", "update"}


def test_an_exact_rule_beats_a_glob_even_when_the_glob_denies() -> None:
    policies = acl(rule("secret/*", "deny"), rule("secret/data/app", "read"))
    assert policies.allows("secret/data/app", "read")
    assert not policies.allows("secret/data/other", "read")


def test_the_longest_glob_wins() -> None:
    policies = acl(rule("secret/*", "read"), rule("secret/data/*", "deny"))
    assert not policies.allows("secret/data/app", "read")
    assert policies.allows("secret/meta/app", "read")


def test_priority_a_later_first_wildcard_wins() -> None:
    # Rule 1: "foo/a*" (glob at 5) beats "foo/+" (wildcard at 4).
    policies = acl(rule("foo/+", "read"), rule("foo/a*", "update"))
    assert policies.capabilities("foo/ab") == {"update"}


def test_priority_not_ending_in_a_glob_wins() -> None:
    # Rule 2: "foo/+" beats "foo/*" (same first wildcard position).
    policies = acl(rule("foo/*", "read"), rule("foo/+", "update"))
    assert policies.capabilities("foo/bar") == {"update"}
    assert policies.capabilities("foo/bar/baz") == {"read"}  # only the glob matches


def test_priority_fewer_wildcard_segments_win() -> None:
    # Vault's documented example: "secret/+/+/foo/*" has lower priority than "secret/*".
    policies = acl(rule("secret/*", "read"), rule("secret/+/+/foo/*", "update"))
    assert policies.capabilities("secret/a/b/foo/c") == {"read"}


def test_priority_the_longer_pattern_wins() -> None:
    # Rule 4: "foo/+/bar/ba*" beats "foo/+/bar/b*".
    policies = acl(rule("foo/+/bar/b*", "read"), rule("foo/+/bar/ba*", "update"))
    assert policies.capabilities("foo/x/bar/baz") == {"update"}


def test_priority_the_lexicographically_greater_pattern_wins_a_tie() -> None:
    # Rule 5: same first wildcard, neither a glob, two "+" each, same length.
    policies = acl(rule("+/+/c", "read"), rule("+/b/+", "update"))
    assert policies.capabilities("a/b/c") == {"update"}  # "+/b/+" sorts after "+/+/c"


def test_listing_a_folder_is_allowed_by_a_rule_without_the_trailing_slash() -> None:
    policies = acl(rule("secret/metadata/app", "list"))
    assert policies.allows("secret/metadata/app/", "list")
    assert not policies.allows("secret/metadata/app/", "read")


def test_root_can_do_anything() -> None:
    policies = ACL([parse_policy("root", "")])
    assert policies.allows("sys/seal", "sudo") and policies.allows("secret/data/x", "delete")
    assert policies.capabilities("anything") == {"root"}


def test_the_default_policy_lets_a_token_look_itself_up() -> None:
    policies = ACL([parse_policy("default", DEFAULT_POLICY)])
    assert policies.allows("auth/token/lookup-self", "read")
    assert policies.allows("auth/token/renew-self", "update")
    assert policies.allows("auth/token/revoke-self", "update")
    assert policies.allows("cubbyhole/mine", "create")
    assert policies.allows("sys/wrapping/unwrap", "update")
    assert not policies.allows("auth/token/lookup", "update")
    assert not policies.allows("secret/data/app", "read")


def test_sudo_is_a_capability_of_its_own() -> None:
    policies = acl(rule("auth/token/create", "update"), rule("sys/leases/revoke-force/*", "update", "sudo"))
    assert not policies.allows("auth/token/create", "sudo")
    assert policies.allows("sys/leases/revoke-force/db", "sudo")


# --- the store --------------------------------------------------------------------------------


def test_store_round_trips_a_policy_and_lowercases_its_name(cell: Cell) -> None:
    store = PolicyStore(cell.barrier)
    text = rule("secret/data/*", "read")
    store.write("  Apps ", text)
    found = store.read("APPS")
    assert (found["name"], found["policy"], found["version"], found["cas_required"]) == (
        "apps",
        text,
        1,
        False,
    )
    assert store.list() == ["apps", "default", "root"]
    store.delete("apps")
    with pytest.raises(NotFound):
        store.read("apps")


def test_store_counts_versions_and_checks_and_sets(cell: Cell) -> None:
    store = PolicyStore(cell.barrier, clock=lambda: 1_700_000_000.0)
    text, other = rule("secret/data/*", "read"), rule("secret/data/*", "list")
    with pytest.raises(InvalidRequest, match="did not match the current version"):
        store.write("ops", text, cas=1)  # absent: only cas=0 may create it
    assert "ops" not in store.list()
    store.write("ops", text, cas=0, cas_required=True)
    read = store.read("ops")
    assert read["version"] == 1 and read["cas_required"] is True
    assert read["modified"] == "2023-11-14T22:13:20.000000Z"
    with pytest.raises(InvalidRequest, match="check-and-set parameter required"):
        store.write("ops", other)
    with pytest.raises(InvalidRequest, match="did not match the current version"):
        store.write("ops", other, cas=0)
    assert store.read("ops")["policy"] == text  # neither refused write changed it
    store.write("ops", other, cas=1, cas_required=False)
    assert store.read("ops")["version"] == 2 and store.read("ops")["policy"] == other
    store.write("ops", text)  # no longer required
    assert store.read("ops")["version"] == 3 and store.read("ops")["cas_required"] is False


def test_store_protects_root_and_default(cell: Cell) -> None:
    store = PolicyStore(cell.barrier)
    with pytest.raises(InvalidRequest, match="root"):
        store.write("root", rule("a", "read"))
    for name in ("root", "default"):
        with pytest.raises(InvalidRequest, match="cannot delete"):
            store.delete(name)
    store.write("default", rule("auth/token/lookup-self", "read"))  # default may be rewritten
    assert not store.acl_for(["default"]).allows("auth/token/renew-self", "update")


def test_store_refuses_invalid_policy_text(cell: Cell) -> None:
    store = PolicyStore(cell.barrier)
    with pytest.raises(InvalidRequest):
        store.write("bad", rule("a", "fly"))
    with pytest.raises(NotFound):
        store.read("bad")


def test_acl_for_combines_stored_policies_and_ignores_unknown_names(cell: Cell) -> None:
    store = PolicyStore(cell.barrier)
    store.write("reader", rule("secret/data/*", "read"))
    store.write("blocker", rule("secret/data/private", "deny"))
    policies = store.acl_for(["default", "reader", "blocker", "missing"])
    assert policies.allows("secret/data/app", "read")
    assert not policies.allows("secret/data/private", "read")
    assert policies.allows("auth/token/lookup-self", "read")
    assert store.acl_for(["root"]).allows("sys/anything", "sudo")

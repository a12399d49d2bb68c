"""Policy and glob matching: pure unit tests."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import pytest

from wscluster.policy import MAX_PATTERNS, Action, Policy, compile_glob, glob_match

ALL_ACTIONS = [
    (Action.SEND, "uid:bob"),
    (Action.SEND, "client:node1-abcdef01.1f"),
    (Action.SEND, "group:room:1"),
    (Action.SEND, "all"),
    (Action.JOIN, "group:room:1"),
    (Action.PRESENCE, "uid:bob"),
    (Action.PRESENCE, "group:room:1"),
    (Action.LOGIN, "uid:bob"),
]


def test_action_values() -> None:
    assert [a.value for a in Action] == ["join", "send", "presence", "login"]
    assert Action("send") is Action.SEND


# --- glob_match ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("room:*", "room:1", True),
        ("room:*", "room:", True),
        ("room:*", "room:a:b", True),
        ("room:*", "xroom:1", False),
        ("room:*", "room", False),
        ("*", "anything", True),
        ("*", "", True),
        ("*", "a:b:c", True),
        ("*", "line\nbreak", True),
        ("a.b", "a.b", True),
        ("a.b", "axb", False),
        ("a+b", "aab", False),
        ("a+b", "a+b", True),
        ("(x|y)", "x", False),
        ("(x|y)", "(x|y)", True),
        ("a?", "ab", False),
        ("a?", "a?", True),
        ("[ab]", "a", False),
        ("[ab]", "[ab]", True),
        ("\\d", "1", False),
        ("\\d", "\\d", True),
        ("exact", "exact", True),
        ("exact", "exactly", False),
        ("exact", "inexact", False),
        ("", "", True),
        ("", "x", False),
        ("*:admin", "team:admin", True),
        ("*:admin", "team:admins", False),
        ("a*b*c", "abc", True),
        ("a*b*c", "a-b-c", True),
        ("a*b*c", "acb", False),
        ("a*b*c", "abcabc", True),
        ("a*a", "a", False),
        ("a*a", "aa", True),
        ("*ab*ab*", "abab", True),
        ("*ab*ab*", "aba", False),
        ("**", "", True),
        ("x**y", "xy", True),
        ("*名前*", "私の名前です", True),
    ],
)
def test_glob_match(pattern: str, name: str, expected: bool) -> None:
    assert glob_match(pattern, name) is expected
    assert (compile_glob(pattern).fullmatch(name) is not None) is expected


def _naive(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")), re.DOTALL)


def test_glob_agrees_with_a_naive_regex() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab*:") for _ in range(rng.randint(0, 6)))
        name = "".join(rng.choice("ab:") for _ in range(rng.randint(0, 8)))
        expected = _naive(pattern).fullmatch(name) is not None
        assert glob_match(pattern, name) is expected, (pattern, name)


def test_glob_does_not_backtrack_catastrophically() -> None:
    pattern = "*a" * 30 + "*b"
    start = time.perf_counter()
    assert not glob_match(pattern, "a" * 128)
    assert not glob_match(pattern, "a" * 29 + "b")
    assert glob_match(pattern, "a" * 30 + "b")
    assert glob_match(pattern, "a" * 127 + "b")
    assert time.perf_counter() - start < 1.0


# --- anonymous ----------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "target"), ALL_ACTIONS)
def test_anonymous_allows_everything(action: Action, target: str) -> None:
    policy = Policy.from_claims(None)
    assert policy.anonymous
    assert policy.decide(action, target, ()) is None


# --- JWT defaults -------------------------------------------------------------------------


def test_jwt_defaults() -> None:
    policy = Policy.from_claims({"sub": "alice", "exp": 1})
    assert not policy.anonymous
    assert policy.decide(Action.SEND, "uid:bob", ()) is None
    assert policy.decide(Action.SEND, "client:node1-abcdef01.1f", ()) is None
    assert policy.decide(Action.SEND, "group:room:1", {"room:1"}) is None
    assert policy.decide(Action.SEND, "group:room:1", {"room:2"}) is not None
    assert policy.decide(Action.SEND, "group:room:1", ()) is not None
    assert policy.decide(Action.SEND, "all", ()) is not None
    assert policy.decide(Action.JOIN, "group:anything", ()) is None
    assert policy.decide(Action.PRESENCE, "group:room:1", ()) is None
    assert policy.decide(Action.PRESENCE, "uid:bob", ()) is None
    assert policy.decide(Action.LOGIN, "uid:alice", ()) is None


def test_joined_holds_bare_group_names() -> None:
    policy = Policy.from_claims({})
    assert policy.decide(Action.SEND, "group:g", ["g"]) is None
    assert policy.decide(Action.SEND, "group:g", ["group:g"]) is not None


def test_reasons_are_short_strings() -> None:
    policy = Policy.from_claims({"groups": [], "presence": False})
    reasons = [policy.decide(action, target, ()) for action, target in ALL_ACTIONS]
    refused = [r for r in reasons if r is not None]
    assert len(refused) == 5  # unjoined group, all, join and both presence questions
    assert all(isinstance(r, str) and 0 < len(r) <= 64 for r in refused)


def test_unknown_targets_are_refused() -> None:
    policy = Policy.from_claims({})
    assert policy.decide(Action.SEND, "user:bob", ()) is not None
    assert policy.decide(Action.SEND, "group", ()) is not None
    assert policy.decide(Action.JOIN, "uid:bob", ()) is not None
    assert policy.decide(Action.JOIN, "room:1", ()) is not None


# --- groups -------------------------------------------------------------------------------


def test_groups_claim_limits_join() -> None:
    policy = Policy.from_claims({"groups": ["room:*", "lobby"]})
    assert policy.decide(Action.JOIN, "group:room:1", ()) is None
    assert policy.decide(Action.JOIN, "group:room:", ()) is None
    assert policy.decide(Action.JOIN, "group:lobby", ()) is None
    assert policy.decide(Action.JOIN, "group:lobby2", ()) is not None
    assert policy.decide(Action.JOIN, "group:xroom:1", ()) is not None


def test_groups_claim_does_not_grant_send_without_joining() -> None:
    policy = Policy.from_claims({"groups": ["*"]})
    assert policy.decide(Action.SEND, "group:room:1", ()) is not None
    assert policy.decide(Action.SEND, "group:room:1", {"room:1"}) is None


def test_empty_groups_claim_allows_no_join() -> None:
    policy = Policy.from_claims({"groups": []})
    assert policy.decide(Action.JOIN, "group:room:1", ()) is not None


@pytest.mark.parametrize("groups", [None, "room:*", {"room:*": True}, ["room:*", 1], 5, True])
def test_malformed_groups_claim_allows_no_join(groups: Any) -> None:
    policy = Policy.from_claims({"groups": groups})
    assert policy.decide(Action.JOIN, "group:room:1", ()) is not None
    assert policy.decide(Action.JOIN, "group:x", ()) is not None


def test_only_the_first_patterns_are_used() -> None:
    groups = [f"g{i}" for i in range(MAX_PATTERNS)] + ["extra"]
    policy = Policy.from_claims({"groups": groups, "send_groups": groups})
    assert policy.decide(Action.JOIN, f"group:g{MAX_PATTERNS - 1}", ()) is None
    assert policy.decide(Action.JOIN, "group:extra", ()) is not None
    assert policy.decide(Action.SEND, f"group:g{MAX_PATTERNS - 1}", ()) is None
    assert policy.decide(Action.SEND, "group:extra", ()) is not None


# --- send_groups --------------------------------------------------------------------------


def test_send_groups_claim() -> None:
    policy = Policy.from_claims({"send_groups": ["alerts:*"]})
    assert policy.decide(Action.SEND, "group:alerts:eu", ()) is None
    assert policy.decide(Action.SEND, "group:alerts:", ()) is None
    assert policy.decide(Action.SEND, "group:news", ()) is not None
    assert policy.decide(Action.SEND, "group:news", {"news"}) is None
    assert policy.decide(Action.SEND, "all", ()) is not None


@pytest.mark.parametrize("send_groups", [None, "*", ["*", None], {"*": 1}, 0])
def test_malformed_send_groups_grants_nothing(send_groups: Any) -> None:
    policy = Policy.from_claims({"send_groups": send_groups})
    assert policy.decide(Action.SEND, "group:news", ()) is not None
    assert policy.decide(Action.SEND, "group:news", {"news"}) is None
    assert policy.decide(Action.JOIN, "group:news", ()) is None


# --- can_broadcast ------------------------------------------------------------------------


def test_can_broadcast() -> None:
    policy = Policy.from_claims({"can_broadcast": True})
    assert policy.decide(Action.SEND, "all", ()) is None
    assert Policy.from_claims({"can_broadcast": False}).decide(Action.SEND, "all", ()) is not None


@pytest.mark.parametrize("value", ["true", 1, "yes", [True], None])
def test_malformed_can_broadcast_means_false(value: Any) -> None:
    policy = Policy.from_claims({"can_broadcast": value})
    assert policy.decide(Action.SEND, "all", ()) is not None


# --- presence -----------------------------------------------------------------------------


def test_presence_claim() -> None:
    assert Policy.from_claims({"presence": True}).decide(Action.PRESENCE, "uid:b", ()) is None
    denied = Policy.from_claims({"presence": False})
    assert denied.decide(Action.PRESENCE, "uid:b", ()) is not None
    assert denied.decide(Action.PRESENCE, "group:g", ()) is not None
    assert denied.decide(Action.JOIN, "group:g", ()) is None  # joining is not presence


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, []])
def test_malformed_presence_means_false(value: Any) -> None:
    policy = Policy.from_claims({"presence": value})
    assert policy.decide(Action.PRESENCE, "uid:b", ()) is not None


def test_login_is_always_allowed_by_policy() -> None:
    policy = Policy.from_claims({"groups": [], "presence": False, "can_broadcast": False})
    assert policy.decide(Action.LOGIN, "uid:anyone", ()) is None


def test_presence_of_groups_follows_the_groups_claim() -> None:
    policy = Policy.from_claims({"groups": ["room:*"], "send_groups": ["news:*"]})
    assert policy.decide(Action.PRESENCE, "group:room:1", ()) is None
    assert policy.decide(Action.PRESENCE, "group:news:1", ()) is None
    assert policy.decide(Action.PRESENCE, "group:lobby", ()) is not None
    assert policy.decide(Action.PRESENCE, "group:lobby", ("lobby",)) is None  # joined
    assert policy.decide(Action.PRESENCE, "uid:bob", ()) is None
    assert Policy.from_claims({}).decide(Action.PRESENCE, "group:any", ()) is None


def test_send_clients_claim() -> None:
    assert Policy.from_claims({}).decide(Action.SEND, "client:n-1.ab", ()) is None
    no = Policy.from_claims({"send_clients": False})
    assert no.decide(Action.SEND, "client:n-1.ab", ()) is not None
    assert no.decide(Action.SEND, "uid:alice", ()) is None
    odd = Policy.from_claims({"send_clients": "false"})  # the wrong type narrows
    assert odd.decide(Action.SEND, "client:n-1.ab", ()) is not None
    assert Policy.from_claims(None).decide(Action.SEND, "client:n-1.ab", ()) is None

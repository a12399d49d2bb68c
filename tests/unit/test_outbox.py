"""Slow-consumer rules (--outbox-policy): pure unit tests."""

from __future__ import annotations

import pytest
from picows import WSMsgType

from wscluster.gateway.outbound import HELD_COST, Backlog
from wscluster.outbox import MAX_RULES, OutboxRules, parse_rule
from wscluster.policy import LOOKUP_CACHE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("group:ticker:*=drop-oldest", ("group:ticker:*", True)),
        ("uid:*=close", ("uid:*", False)),
        ("  group:a = drop-oldest ", ("group:a", True)),
        ("group:a=b=close", ("group:a=b", False)),  # the last '=' splits
        ("all=drop-oldest", ("all", True)),
        ("client:*=drop-oldest", ("client:*", True)),
        ("*=drop-oldest", ("*", True)),
        ("gr*=close", ("gr*", False)),
    ],
)
def test_parse_rule(text: str, expected: tuple[str, bool]) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("group:a", "expected PATTERN=close|drop-oldest"),
        ("=drop-oldest", "expected PATTERN=close|drop-oldest"),
        ("", "expected PATTERN=close|drop-oldest"),
        ("group:a=drop", "the action must be close or drop-oldest"),
        ("group:a=", "the action must be close or drop-oldest"),
        ("group:a=DROP-OLDEST", "the action must be close or drop-oldest"),
        ("ticker:*=drop-oldest", "the pattern matches no address"),
        ("room=close", "the pattern matches no address"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_rule(text)
    assert repr(text) in str(info.value)  # names the offending option
    with pytest.raises(ValueError, match=message):
        OutboxRules([text])


def test_too_many_rules() -> None:
    OutboxRules(["group:a=close"] * MAX_RULES)
    with pytest.raises(ValueError, match=f"at most {MAX_RULES}"):
        OutboxRules(["group:a=close"] * (MAX_RULES + 1))


def test_default_is_close() -> None:
    rules = OutboxRules()
    assert not rules
    assert rules.drop("group:ticker:x") is False
    assert rules.drop("uid:alice") is False


def test_first_matching_rule_wins() -> None:
    rules = OutboxRules(
        ["group:ticker:vip*=close", "group:ticker:*=drop-oldest", "uid:*=drop-oldest"]
    )
    assert rules
    assert rules.rules[0] == ("group:ticker:vip*", False)
    assert rules.drop("group:ticker:eurusd") is True
    assert rules.drop("group:ticker:vip1") is False  # the earlier close rule
    assert rules.drop("group:ticker:") is True  # '*' matches nothing too
    assert rules.drop("uid:alice") is True
    assert rules.drop("group:chat") is False  # no rule: close
    assert rules.drop("group:xticker:a") is False  # patterns match whole addresses
    assert rules.drop("client:node1-abcdef01.1f") is False
    assert rules.drop("all") is False


def test_star_spans_colons_and_other_characters_are_literal() -> None:
    rules = OutboxRules(["group:a.b*=drop-oldest", "group:*:feed=drop-oldest"])
    assert rules.drop("group:a.b:c:d") is True
    assert rules.drop("group:aXb") is False  # '.' is not a regex dot
    assert rules.drop("group:x:y:feed") is True
    assert rules.drop("group:x:y:feed2") is False


def test_cached_answers_stay_right_and_the_cache_is_bounded() -> None:
    rules = OutboxRules(["group:t:*=drop-oldest"])
    n = LOOKUP_CACHE  # more distinct streams than the cache remembers
    for round_ in range(2):  # answers from the cache equal fresh ones
        for i in range(n):
            assert rules.drop(f"group:t:{i}") is True, round_
            assert rules.drop(f"group:u:{i}") is False, round_
        assert len(rules._table._cache) <= LOOKUP_CACHE


# --- the per-connection backlog (gateway/connection.py) -----------------------------------


def _drain(backlog: Backlog) -> list[bytes]:
    out = []
    while (held := backlog.pop()) is not None:
        out.append(held[1])
    return out


def test_backlog_keeps_push_order_across_droppable_and_kept_messages() -> None:
    backlog = Backlog()
    assert backlog.pop() is None
    backlog.add_droppable(WSMsgType.TEXT, b"d1", 1 << 20)
    backlog.add(WSMsgType.TEXT, b"k1")
    backlog.add_droppable(WSMsgType.BINARY, b"d2", 1 << 20)
    backlog.add(WSMsgType.TEXT, b"k2")
    backlog.add(WSMsgType.TEXT, b"k3")
    backlog.add_droppable(WSMsgType.TEXT, b"d3", 1 << 20)
    assert backlog.pop() == (WSMsgType.TEXT, b"d1")
    assert backlog.pop() == (WSMsgType.TEXT, b"k1")
    assert backlog.pop() == (WSMsgType.BINARY, b"d2")  # the kind goes with the message
    assert _drain(backlog) == [b"k2", b"k3", b"d3"]
    assert backlog.droppable_bytes == backlog.kept_bytes == 0


def test_backlog_drops_the_oldest_droppable_messages_past_the_bound() -> None:
    size = 1000
    limit = 10 * (size + HELD_COST)  # room for exactly ten
    backlog = Backlog()
    dropped = 0
    for i in range(25):
        if i % 5 == 0:
            backlog.add(WSMsgType.TEXT, b"k%d" % i)  # never dropped, not in the bound
        dropped += backlog.add_droppable(WSMsgType.TEXT, b"%04d" % i + b"x" * (size - 4), limit)
        assert backlog.droppable_bytes <= limit
    assert dropped == 15
    left = _drain(backlog)
    # every kept message, and the ten newest droppable ones, still in push order
    assert [m[:4] for m in left] == [
        b"k0", b"k5", b"k10", b"k15", b"0015", b"0016", b"0017", b"0018", b"0019",
        b"k20", b"0020", b"0021", b"0022", b"0023", b"0024",
    ]  # fmt: skip


def test_backlog_drops_a_droppable_message_larger_than_the_bound() -> None:
    backlog = Backlog()
    assert backlog.add_droppable(WSMsgType.TEXT, b"x" * 5000, 4096) == 1
    assert backlog.pop() is None
    assert backlog.droppable_bytes == 0

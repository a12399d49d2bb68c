"""One bad item never fails a batch shared with others (issue 14), in the Redis presence
writer: the writes queued in one loop turn (many connections' and the node's heartbeat) go
to the store as one batch, and one that cannot be written (a name that is not UTF-8, a
command the server refuses, a heartbeat the server refuses) fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from wscluster.errors import PresenceUnavailable
from wscluster.naming import Names
from wscluster.presence import ConnInfo, redis_writer
from wscluster.presence.redis import RedisPresence

pytestmark = pytest.mark.timeout(60)

BAD = "x\ud800"
NODE = "n1-00000000"


@pytest.fixture
async def presence(redis_url: str, namespace: str) -> AsyncIterator[RedisPresence]:
    p = RedisPresence(redis_url, Names(namespace))
    await p.start()
    yield p
    await p.close()


def cid(i: int) -> str:
    return f"{NODE}.{i}"


async def together(*writes: Any) -> list[Any]:
    """Start ``writes`` in one loop turn (one writer batch); their outcomes."""
    tasks = [asyncio.ensure_future(w) for w in writes]
    return await asyncio.gather(*tasks, return_exceptions=True)


def kinds(results: list[Any]) -> list[str]:
    return ["ok" if not isinstance(r, BaseException) else type(r).__name__ for r in results]


async def test_a_name_that_is_not_utf8_fails_alone(presence: RedisPresence) -> None:
    assert not await presence.heartbeat(NODE, 30, {"connections": 0})  # unknown: False
    results = await together(
        presence.add(NODE, ConnInfo(cid(1), "alice", ["room"])),
        presence.bind(NODE, cid(2), None, BAD),
        presence.heartbeat(NODE, 30, {"connections": 3}),
        presence.add(NODE, ConnInfo(cid(3), "bob", [])),
        presence.join(NODE, cid(1), "alice", f"g{BAD}"),
        presence.set_session(NODE, cid(1), {"k": 1}, replace=True, limit=1000),
        presence.remove(NODE, cid(4), BAD, [BAD]),
        presence.join(NODE, cid(3), "bob", "room"),
    )
    assert kinds(results) == ["ok", "PresenceUnavailable", "ok", "ok", "PresenceUnavailable",
                              "ok", "ok", "ok"]  # fmt: skip
    assert results[5] is True
    assert await presence.is_online("alice") and await presence.is_online("bob")
    assert (await presence.group_members("room")).uids == ["alice", "bob"]
    assert await presence.get_session(cid(1)) == {"k": 1}
    assert [n.stats for n in await presence.nodes()] == [{"connections": 3}]


async def test_a_refused_command_fails_alone(
    presence: RedisPresence, redis_url: str, namespace: str
) -> None:
    names = Names(namespace)
    async with aioredis.from_url(redis_url) as r:
        await r.set(names.group_key("wrongtype"), "not a hash")
    await presence.heartbeat(NODE, 30, {})
    results = await together(
        presence.add(NODE, ConnInfo(cid(1), "alice", [])),
        presence.join(NODE, cid(1), "alice", "wrongtype"),
        presence.heartbeat(NODE, 30, {"n": 1}),
        presence.join(NODE, cid(1), "alice", "room"),
    )
    assert kinds(results) == ["ok", "PresenceUnavailable", "ok", "ok"]
    assert (await presence.group_members("room")).uids == ["alice"]


async def test_a_refused_heartbeat_fails_alone(
    presence: RedisPresence, redis_url: str, namespace: str
) -> None:
    """The heartbeat never shares a failure with client writes, nor they with it."""
    names = Names(namespace)
    async with aioredis.from_url(redis_url) as r:
        await r.set(names.nodes_key(), "not a sorted set")
    results = await together(
        presence.add(NODE, ConnInfo(cid(1), "alice", ["room"])),
        presence.heartbeat(NODE, 30, {}),
        presence.add(NODE, ConnInfo(cid(2), "bob", ["room"])),
    )
    assert kinds(results) == ["ok", "PresenceUnavailable", "ok"]
    async with aioredis.from_url(redis_url, decode_responses=True) as r:
        members = await r.hgetall(names.group_key("room"))
    assert members == {cid(1): "alice", cid(2): "bob"}


async def test_resync_writes_all_but_the_bad_connection(presence: RedisPresence) -> None:
    conns = [ConnInfo(cid(1), "alice", ["room"]), ConnInfo(cid(2), BAD, [BAD]),
             ConnInfo(cid(3), "bob", ["room"])]  # fmt: skip
    with pytest.raises(PresenceUnavailable):
        await presence.resync(NODE, conns, 30, {"connections": 3})
    assert await presence.is_online("alice") and await presence.is_online("bob")
    assert (await presence.group_members("room")).count == 2
    assert [n.node_id for n in await presence.nodes()] == [NODE]


async def test_a_full_queue_never_refuses_the_heartbeat(
    presence: RedisPresence, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_writer, "MAX_QUEUED_OPS", 3)
    await presence.heartbeat(NODE, 30, {})
    results = await together(
        *(presence.add(NODE, ConnInfo(cid(i), f"u{i}", [])) for i in range(5)),
        presence.heartbeat(NODE, 30, {"beat": 2}),
    )
    assert kinds(results) == ["ok"] * 3 + ["PresenceUnavailable"] * 2 + ["ok"]
    assert [n.stats for n in await presence.nodes()] == [{"beat": 2}]


async def test_calls_are_split_by_size(
    presence: RedisPresence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large sessions in one batch go to the store in several script calls."""
    monkeypatch.setattr(redis_writer, "SCRIPT_BYTES", 10_000)
    await presence.heartbeat(NODE, 30, {})
    for i in range(20):
        await presence.add(NODE, ConnInfo(cid(i), f"u{i}", []))
    big = "v" * 3000
    results = await together(
        *(presence.set_session(NODE, cid(i), {"k": big}, replace=True, limit=10_000)
          for i in range(20)),
    )  # fmt: skip
    assert results == [True] * 20
    assert await presence.get_session(cid(19)) == {"k": big}


async def test_a_call_refused_as_a_whole_is_run_again_command_by_command(
    presence: RedisPresence, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should the server refuse a whole script call for what one command holds, each of its
    commands runs again alone: only that one fails, and the calls after it run again too,
    so that the store sees the writes in order."""
    real = redis_writer._script

    def script(cmds: Any, guard: str | None) -> Any:
        if any(c[0] == "SADD" and c[1].endswith(":uid:poison") for c in cmds):
            return ("EVAL", "return redis.error_reply('ERR poisoned')", 0, b"")
        return real(cmds, guard)

    monkeypatch.setattr(redis_writer, "_script", script)
    monkeypatch.setattr(redis_writer, "SCRIPT_CMDS", 3)  # several calls in one batch
    await presence.heartbeat(NODE, 30, {})
    results = await together(
        presence.add(NODE, ConnInfo(cid(1), "alice", ["room"])),
        presence.add(NODE, ConnInfo(cid(2), "poison", [])),
        presence.heartbeat(NODE, 30, {"n": 2}),
        presence.join(NODE, cid(1), "alice", "late"),
        presence.leave(NODE, cid(1), "late"),
        presence.join(NODE, cid(1), "alice", "kept"),
    )
    assert kinds(results) == ["ok", "PresenceUnavailable", "ok", "ok", "ok", "ok"]
    assert await presence.is_online("alice") and not await presence.is_online("poison")
    assert (await presence.group_members("late")).count == 0  # the leave stayed last
    assert (await presence.group_members("kept")).uids == ["alice"]
    assert [n.stats for n in await presence.nodes()] == [{"n": 2}]
    assert "refused: poisoned; its commands again one by one" in caplog.text

"""The Presence contract (presence/base.py), run against every implementation.

Redis runs against a private valkey-server (conftest). Writes come from one instance and
reads from another, as they would from two nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from wscluster.embedded import EmbeddedRedis, free_port
from wscluster.errors import Code, PresenceUnavailable, ProtocolError
from wscluster.naming import Names, new_node_id
from wscluster.presence import ConnInfo, DeadNode, GroupInfo, Presence, create_presence
from wscluster.presence.base import PURGE_BATCH
from wscluster.presence.memory import MemoryPresence
from wscluster.presence.redis import RedisPresence

TTL = 30.0
SHORT_TTL = 0.3
EXPIRED = 0.5  # sleep after which a SHORT_TTL node is dead


class Store:
    """One shared store and the presence instances opened on it."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.kind = "memory" if url.startswith("memory:") else "redis"
        self._opened: list[Presence] = []

    async def make(self, namespace: str | None = None, **kwargs: Any) -> Presence:
        p = create_presence(self.url, Names(namespace or self.namespace), **kwargs)
        await p.start()
        self._opened.append(p)
        return p

    async def keys(self) -> list[str]:
        async with aioredis.from_url(self.url, decode_responses=True) as r:
            return sorted([k async for k in r.scan_iter(match=f"{self.namespace}:*")])

    async def flush(self) -> None:
        """Empty the store of this namespace, as a store restarted empty would be."""
        if self.kind == "memory":
            MemoryPresence(Names(self.namespace), "contract").flush()
            return
        async with aioredis.from_url(self.url) as r:
            keys = [k async for k in r.scan_iter(match=f"{self.namespace}:*")]
            if keys:
                await r.delete(*keys)

    async def aclose(self) -> None:
        for p in self._opened:
            await p.close()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Store]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = "memory://contract"
    s = Store(url, namespace)
    yield s
    await s.aclose()


def _cid(node: str, i: int) -> str:
    """A client id of ``node`` that tests can compute again (real ones are random)."""
    return f"{node}.{i:x}"


async def live_node(p: Presence, name: str = "n", ttl: float = TTL) -> str:
    node = new_node_id(name)
    assert await p.heartbeat(node, ttl, {"connections": 0}) is False  # new: unknown
    assert await p.heartbeat(node, ttl, {"connections": 0}) is True
    return node


async def test_writes_are_read_from_another_instance(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    c1, c2 = _cid(node, 1), _cid(node, 2)
    await a.add(node, ConnInfo(c1, "alice", ["room"]))
    await a.add(node, ConnInfo(c2))
    assert await b.is_online("alice")
    assert await b.client_ids("alice") == [c1]
    assert await b.group_members("room") == GroupInfo(["alice"], 1)

    await a.bind(node, c2, None, "bob")
    await a.join(node, c2, "bob", "room")
    await a.join(node, c2, "bob", "other")
    info = await b.group_members("room")
    assert (info.uids, info.count) == (["alice", "bob"], 2)
    await a.leave(node, c2, "room")
    info = await b.group_members("room")
    assert (info.uids, info.count) == (["alice"], 1)
    assert (await b.group_members("other")).uids == ["bob"]

    await a.remove(node, c2, "bob", ["other"])
    assert not await b.is_online("bob")
    assert (await b.group_members("other")).count == 0
    await a.remove(node, c1, "alice", ["room"])
    assert await b.client_ids("alice") == []
    assert (await b.group_members("room")).count == 0
    if store.kind == "redis":  # nothing left but the node's own liveness
        ns = store.namespace
        assert await store.keys() == [f"{ns}:alive:{node}", f"{ns}:nodes"]


async def test_a_burst_of_reads_is_answered_not_refused(store: Store) -> None:
    a = await store.make()
    node = await live_node(a)
    await a.add(node, ConnInfo(_cid(node, 1), "alice", ["room"]))
    answers = await asyncio.gather(
        *(a.is_online("alice") for _ in range(1000)),
        *(a.group_members("room") for _ in range(1000)),
    )
    assert answers[:1000] == [True] * 1000
    assert answers[1000:] == [GroupInfo(["alice"], 1)] * 1000


async def test_rebind_moves_the_uid(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    cid = _cid(node, 1)
    bob, room = "bob:élise 😀", 'salle:1/ü "x"'  # names are taken verbatim
    await a.add(node, ConnInfo(cid, "alice", [room]))
    await a.bind(node, cid, "alice", bob)
    assert not await b.is_online("alice")
    assert await b.client_ids(bob) == [cid]
    info = await b.group_members(room)
    assert (info.uids, info.count) == ([bob], 1)
    await a.bind(node, cid, bob, None)
    assert not await b.is_online(bob)
    info = await b.group_members(room)
    assert (info.uids, info.count) == ([], 1)
    await a.bind(node, cid, None, "carol")
    assert (await b.group_members(room)).uids == ["carol"]


async def test_group_uids_are_distinct_and_count_has_anonymous(store: Store) -> None:
    a, b = await store.make(), await store.make()
    n1, n2 = await live_node(a, "one"), await live_node(a, "two")
    await a.add(n1, ConnInfo(_cid(n1, 1), "zoe", ["g"]))
    await a.add(n1, ConnInfo(_cid(n1, 2), "alice", ["g"]))
    await a.add(n2, ConnInfo(_cid(n2, 1), "alice", ["g"]))
    await a.add(n2, ConnInfo(_cid(n2, 2), None, ["g"]))
    info = await b.group_members("g")
    assert (info.uids, info.count) == (["alice", "zoe"], 4)
    assert await b.client_ids("alice") == sorted([_cid(n1, 2), _cid(n2, 1)])


async def test_writes_fired_without_awaiting_apply_in_order(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    cids = [_cid(node, i) for i in range(8)]
    groups = [f"g{i}" for i in range(10)]
    uid = {c: f"u{i}" for i, c in enumerate(cids)}
    rng = random.Random(1234)
    member: dict[tuple[str, str], bool] = {}
    ops = []
    for _ in range(1000):
        cid, group = rng.choice(cids), rng.choice(groups)
        joins = rng.random() < 0.5
        member[cid, group] = joins
        op = a.join(node, cid, uid[cid], group) if joins else a.leave(node, cid, group)
        ops.append(asyncio.ensure_future(op))
    await asyncio.gather(*ops)
    for group in groups:
        expected = sorted(uid[c] for c in cids if member.get((c, group)))
        info = await b.group_members(group)
        assert (info.uids, info.count) == (expected, len(expected)), group


async def test_thousands_of_concurrent_adds_are_quick(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    started = time.monotonic()
    await asyncio.gather(
        *(a.add(node, ConnInfo(_cid(node, i), f"u{i}", ["lobby"])) for i in range(5000))
    )
    assert time.monotonic() - started < 3.0
    assert (await b.group_members("lobby")).count == 5000


async def test_readers_drop_expired_nodes_before_any_purge(store: Store) -> None:
    a, b = await store.make(), await store.make()
    dying, alive = await live_node(a, "dying", SHORT_TTL), await live_node(a, "alive")
    await a.add(dying, ConnInfo(_cid(dying, 1), "alice", ["room"]))
    await a.add(alive, ConnInfo(_cid(alive, 1), "bob", ["room"]))
    await a.heartbeat(dying, SHORT_TTL, {"connections": 1})
    assert await b.is_online("alice")
    assert {n.node_id for n in await b.nodes()} == {dying, alive}
    await asyncio.sleep(EXPIRED)
    assert not await b.is_online("alice")
    assert await b.client_ids("alice") == []
    info = await b.group_members("room")
    assert (info.uids, info.count) == (["bob"], 1)
    assert [n.node_id for n in await b.nodes()] == [alive]


async def test_purge_dead_claims_each_node_exactly_once(store: Store) -> None:
    writer = await store.make()
    survivors = [await store.make() for _ in range(3)]
    dead = await live_node(writer, "dead", SHORT_TTL)
    keep = await live_node(survivors[0], "keep")
    conns = [
        ConnInfo(_cid(dead, 1), "alice", ["a", "b"]),
        ConnInfo(_cid(dead, 2), None, ["a"]),
        ConnInfo(_cid(dead, 3), "bob", []),
    ]
    for conn in conns:
        await writer.add(dead, conn)
    await survivors[0].add(keep, ConnInfo(_cid(keep, 1), "carol", ["a"]))
    await asyncio.sleep(EXPIRED)

    results = await asyncio.gather(*(s.purge_dead() for s in survivors))
    claimed = [d for r in results for d in r]
    assert claimed == [DeadNode(dead, conns)]
    assert sum(1 for r in results if r) == 1
    assert await survivors[1].purge_dead() == []
    assert [n.node_id for n in await survivors[2].nodes()] == [keep]
    info = await survivors[2].group_members("a")
    assert (info.uids, info.count) == (["carol"], 1)
    if store.kind == "redis":  # the dead node left nothing behind
        assert not [k for k in await store.keys() if dead in k]
    # a node that was only paused finds itself forgotten and resyncs
    assert await writer.heartbeat(dead, TTL, {"connections": 3}) is False
    await writer.resync(dead, conns, TTL, {"connections": 3})
    assert await survivors[1].client_ids("alice") == [_cid(dead, 1)]


async def test_a_node_back_before_the_purge_is_kept(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a, "paused", SHORT_TTL)
    await a.add(node, ConnInfo(_cid(node, 1), "alice", ["room"]))
    await asyncio.sleep(EXPIRED)
    assert not await b.is_online("alice")
    assert await a.heartbeat(node, TTL, {"connections": 1}) is True  # not purged yet
    assert await b.purge_dead() == []
    assert await b.client_ids("alice") == [_cid(node, 1)]
    assert (await b.group_members("room")).count == 1


LEASE = 0.4  # a purge claim's lease in the tests below


async def dead_node_with(store: Store, n: int) -> tuple[Presence, str, list[ConnInfo]]:
    """A node with ``n`` connections (uids u0-u6, groups g0-g2) that died: its writer, its
    id and its connections in the order a purge hands them out (sorted by client id)."""
    writer = await store.make()
    dead = await live_node(writer, "dead", SHORT_TTL)
    conns = [ConnInfo(_cid(dead, i), f"u{i % 7}", [f"g{i % 3}"]) for i in range(n)]
    await asyncio.gather(*(writer.add(dead, c) for c in conns))
    await asyncio.sleep(EXPIRED)
    return writer, dead, sorted(conns, key=lambda c: c.client_id)


async def assert_purged(store: Store, writer: Presence, dead: str) -> None:
    """Nothing of ``dead`` is left: brought back to life without a resync, it has nothing."""
    if store.kind == "redis":
        assert not [k for k in await store.keys() if dead in k or k.endswith(":purging")]
    assert await writer.heartbeat(dead, TTL, {}) is False  # forgotten
    assert [(await writer.group_members(f"g{i}")).count for i in range(3)] == [0, 0, 0]
    assert [await writer.client_ids(f"u{i}") for i in range(7)] == [[]] * 7


async def test_purge_hands_out_batches_before_removing_them(store: Store) -> None:
    writer, dead, conns = await dead_node_with(store, 2 * PURGE_BATCH + 50)
    batches: list[list[ConnInfo]] = []

    async def on_batch(node_id: str, batch: list[ConnInfo]) -> None:
        assert node_id == dead
        batches.append(batch)
        # still in the store while it is handed out (a session write finds the record)
        for c in (batch[0], batch[-1]):
            assert await writer.set_session(dead, c.client_id, {}, replace=False, limit=9)

    survivor = await store.make()
    assert await survivor.purge_dead(on_batch) == [DeadNode(dead, conns)]
    assert [len(b) for b in batches] == [PURGE_BATCH, PURGE_BATCH, 50]
    assert [c for b in batches for c in b] == conns
    assert await survivor.purge_dead(on_batch) == []
    await assert_purged(store, writer, dead)


async def test_a_purge_cut_short_is_taken_over_when_its_lease_expires(store: Store) -> None:
    writer, dead, conns = await dead_node_with(store, 2 * PURGE_BATCH + 50)
    first, second = await store.make(), await store.make()
    handed: list[list[str]] = []

    class Died(Exception):
        pass

    async def dies_in_its_second_batch(node_id: str, batch: list[ConnInfo]) -> None:
        handed.append([c.client_id for c in batch])
        if len(handed) == 2:
            raise Died  # as a purger killed while its on_close handlers run

    async def record(node_id: str, batch: list[ConnInfo]) -> None:
        handed.append([c.client_id for c in batch])

    with pytest.raises(Died):
        await first.purge_dead(dies_in_its_second_batch, lease=LEASE)
    assert await second.purge_dead(record, lease=LEASE) == []  # its lease still holds
    assert len(handed) == 2
    await asyncio.sleep(LEASE + 0.2)
    [taken] = await second.purge_dead(record, lease=LEASE)
    cids = [c.client_id for c in conns]
    # the batch cut short is handed out again, the rest once
    assert handed == [cids[:PURGE_BATCH], cids[PURGE_BATCH : 2 * PURGE_BATCH],
                      cids[PURGE_BATCH : 2 * PURGE_BATCH], cids[2 * PURGE_BATCH :]]
    assert taken == DeadNode(dead, conns[PURGE_BATCH:])
    assert await first.purge_dead(record, lease=LEASE) == []
    await assert_purged(store, writer, dead)


async def test_a_purge_renews_its_lease_while_its_handlers_run(store: Store) -> None:
    writer, dead, conns = await dead_node_with(store, 3)

    async def slow(node_id: str, batch: list[ConnInfo]) -> None:
        await asyncio.sleep(3 * LEASE)  # slow on_close handlers

    first, second = await store.make(), await store.make()
    purge = asyncio.ensure_future(first.purge_dead(slow, lease=LEASE))
    for _ in range(4):
        await asyncio.sleep(LEASE / 2)
        assert await second.purge_dead(slow, lease=LEASE) == []
    assert await purge == [DeadNode(dead, conns)]
    await assert_purged(store, writer, dead)


async def test_a_node_back_during_its_purge_stops_it(store: Store) -> None:
    writer, dead, conns = await dead_node_with(store, PURGE_BATCH + 1)
    handed: list[ConnInfo] = []

    async def back(node_id: str, batch: list[ConnInfo]) -> None:
        handed.extend(batch)
        assert await writer.heartbeat(dead, TTL, {}) is False  # purge begun: resync

    assert await (await store.make()).purge_dead(back) == []
    assert handed == conns[:PURGE_BATCH]  # the second batch is never handed out
    await writer.resync(dead, conns, TTL, {})
    assert sum([(await writer.group_members(f"g{i}")).count for i in range(3)]) == len(conns)
    if store.kind == "redis":  # the purge left neither its claim nor its lease
        assert not [k for k in await store.keys() if k.endswith((":purging", f"purge:{dead}"))]
    assert await (await store.make()).purge_dead(back) == []


async def test_heartbeat_is_false_after_the_store_is_flushed(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    conns = [ConnInfo(_cid(node, 1), "alice", ["room"]), ConnInfo(_cid(node, 2))]
    for conn in conns:
        await a.add(node, conn)
    assert await a.heartbeat(node, TTL, {"connections": 2}) is True
    await store.flush()
    assert not await b.is_online("alice")
    assert await a.heartbeat(node, TTL, {"connections": 2}) is False
    await a.resync(node, conns, TTL, {"connections": 2})
    assert await a.heartbeat(node, TTL, {"connections": 2}) is True
    assert await b.client_ids("alice") == [_cid(node, 1)]
    info = await b.group_members("room")
    assert (info.uids, info.count) == (["alice"], 1)


async def test_resync_of_5000_connections_is_quick(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node = await live_node(a)
    await a.add(node, ConnInfo(_cid(node, 99_999), "stale", ["old"]))
    await a.add(node, ConnInfo(_cid(node, 0), "renamed", ["old", "g0"]))
    conns = [
        ConnInfo(_cid(node, i), f"u{i % 1000}", ["big", f"g{i % 10}"]) for i in range(5000)
    ]
    started = time.monotonic()
    await a.resync(node, conns, TTL, {"connections": 5000})
    assert time.monotonic() - started < 3.0
    big = await b.group_members("big")
    assert (len(big.uids), big.count) == (1000, 5000)
    assert (await b.group_members("g0")).count == 500
    assert (await b.group_members("old")).count == 0
    assert not await b.is_online("stale")
    assert not await b.is_online("renamed")
    assert await b.client_ids("u0") == sorted(_cid(node, i) for i in range(0, 5000, 1000))


async def test_remove_node_forgets_it_and_its_connections(store: Store) -> None:
    a, b = await store.make(), await store.make()
    node, other = await live_node(a), await live_node(a, "other")
    await a.add(node, ConnInfo(_cid(node, 1), "alice", ["room"]))
    await a.add(other, ConnInfo(_cid(other, 1), "bob", ["room"]))
    await a.remove_node(node)
    assert not await b.is_online("alice")
    assert (await b.group_members("room")).uids == ["bob"]
    assert [n.node_id for n in await b.nodes()] == [other]
    assert await b.purge_dead() == []
    assert await a.heartbeat(node, TTL, {}) is False


async def test_nodes_report_their_last_stats(store: Store) -> None:
    a, b = await store.make(), await store.make()
    n1, n2 = await live_node(a, "one"), await live_node(a, "two")
    await a.heartbeat(n1, TTL, {"connections": 3, "version": "x"})
    await a.heartbeat(n2, TTL, {"connections": 0})
    got = {n.node_id: n.stats for n in await b.nodes()}
    assert got == {n1: {"connections": 3, "version": "x"}, n2: {"connections": 0}}


async def test_namespaces_isolate_clusters(store: Store, namespace: str) -> None:
    a, b = await store.make(), await store.make(namespace + "x")
    node = new_node_id("same")
    for p in (a, b):
        await p.heartbeat(node, SHORT_TTL, {"connections": 1})
    await a.add(node, ConnInfo(_cid(node, 1), "alice", ["room"]))
    assert not await b.is_online("alice")
    assert (await b.group_members("room")).count == 0
    await asyncio.sleep(EXPIRED)
    assert [d.node_id for d in await b.purge_dead()] == [node]
    [dead] = await a.purge_dead()
    assert dead.connections == [ConnInfo(_cid(node, 1), "alice", ["room"])]


# --- sessions -----------------------------------------------------------------------------
LIMIT = 4096


async def open_conn(store: Store, ttl: float = TTL) -> tuple[Presence, Presence, str, str]:
    """Two instances, a live node of the first and one of its connections."""
    a, b = await store.make(), await store.make()
    node = await live_node(a, "s", ttl)
    cid = _cid(node, 1)
    await a.add(node, ConnInfo(cid, "alice", ["room"]))
    return a, b, node, cid


def same_json(got: Any, want: Any) -> bool:
    """Equal, and of the same JSON types (True is not 1, 1.0 is not 1)."""
    return json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


async def test_session_is_written_and_read_by_any_instance(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    assert await b.get_session(cid) == {}
    assert await b.set_session(node, cid, {"x": 1, "y": "a"}, replace=False, limit=LIMIT)
    assert await a.get_session(cid) == {"x": 1, "y": "a"}
    assert await a.set_session(node, cid, {"y": "b", "z": [1]}, replace=False, limit=LIMIT)
    assert await b.get_session(cid) == {"x": 1, "y": "b", "z": [1]}
    # a session write queued right behind the add that creates the connection sees it
    c2 = _cid(node, 2)
    _, written = await asyncio.gather(
        a.add(node, ConnInfo(c2)), a.set_session(node, c2, {"k": "v"}, replace=True, limit=LIMIT)
    )
    assert written is True
    assert await b.get_session(c2) == {"k": "v"}
    # writes of one instance apply in call order
    await asyncio.gather(*(
        a.set_session(node, cid, {"n": i}, replace=False, limit=LIMIT) for i in range(200)
    ))
    assert (await b.get_session(cid) or {})["n"] == 199


async def test_session_merge_replace_and_none(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    assert await a.set_session(node, cid, {"a": 1, "b": 2, "c": 3}, replace=True, limit=LIMIT)
    assert await a.set_session(node, cid, {"b": None, "d": 4}, replace=False, limit=LIMIT)
    assert await b.get_session(cid) == {"a": 1, "c": 3, "d": 4}
    assert await a.set_session(node, cid, {"gone": None}, replace=False, limit=LIMIT)
    assert await b.get_session(cid) == {"a": 1, "c": 3, "d": 4}
    assert await a.set_session(node, cid, {"e": 5, "n": None}, replace=True, limit=LIMIT)
    assert await b.get_session(cid) == {"e": 5, "n": None}  # replace keeps null values
    assert await a.set_session(node, cid, {}, replace=True, limit=LIMIT)
    assert await b.get_session(cid) == {}
    # the connection's other data is untouched
    assert await b.client_ids("alice") == [cid]
    assert await b.group_members("room") == GroupInfo(["alice"], 1)


async def test_session_of_unknown_or_closed_connection(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    before = await store.keys() if store.kind == "redis" else []
    for unknown in (_cid(node, 77), _cid(new_node_id("x"), 1), "not-a-cid"):
        assert await b.set_session(node, unknown, {"x": 1}, replace=False, limit=LIMIT) is False
        assert await b.set_session(node, unknown, {"x": 1}, replace=True, limit=LIMIT) is False
        assert await a.get_session(unknown) is None
    if store.kind == "redis":
        assert await store.keys() == before
    assert await a.set_session(node, cid, {"x": 1}, replace=False, limit=LIMIT)
    await a.remove(node, cid, "alice", ["room"])
    assert await b.get_session(cid) is None
    assert await b.set_session(node, cid, {"x": 2}, replace=False, limit=LIMIT) is False
    assert await b.get_session(cid) is None
    if store.kind == "redis":
        ns = store.namespace
        assert await store.keys() == [f"{ns}:alive:{node}", f"{ns}:nodes"]


async def test_session_limit(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    limit = 20  # bytes: UTF-8 key + JSON value, summed over keys
    assert await a.set_session(node, cid, {"a": "x" * 15}, replace=True, limit=limit)  # 18
    with pytest.raises(ProtocolError) as err:  # 3 bytes, 2 characters
        await b.set_session(node, cid, {"é": 1}, replace=False, limit=limit)
    assert err.value.code == Code.TOO_LARGE
    assert await a.set_session(node, cid, {"b": 1}, replace=False, limit=limit)  # 20: fits
    for values, replace in (({"c": 1}, False), ({"é": 1}, False), ({"z": "x" * 20}, True),
                            ({"a": "x" * 16}, False)):
        with pytest.raises(ProtocolError) as err:
            await b.set_session(node, cid, values, replace=replace, limit=limit)
        assert err.value.code == Code.TOO_LARGE
        assert await b.get_session(cid) == {"a": "x" * 15, "b": 1}
    # the size is the one after the merge: overwriting or deleting frees room
    assert await b.set_session(node, cid, {"a": None, "c": "x" * 14}, replace=False,
                               limit=limit)
    assert await b.set_session(node, cid, {"c": "y" * 14}, replace=False, limit=limit)
    assert await a.get_session(cid) == {"b": 1, "c": "y" * 14}
    # replace counts only the new keys
    assert await b.set_session(node, cid, {"q": "y" * 16}, replace=True, limit=limit)  # 19
    assert await a.get_session(cid) == {"q": "y" * 16}
    assert await b.set_session(node, cid, {"d": 0}, replace=True, limit=limit)
    assert await a.get_session(cid) == {"d": 0}
    with pytest.raises(ProtocolError):
        await b.set_session(node, cid, {"d": 0}, replace=True, limit=1)


async def test_session_bad_keys_and_values(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    assert await a.set_session(node, cid, {"ok": 1, "k" * 128: 2}, replace=False, limit=LIMIT)
    bad: list[dict[Any, Any]] = [
        {"": 1}, {"k" * 129: 1}, {1: 1}, {None: 1}, {"\ud800": 1}, {"\ud800": None},
        {"x": object()}, {"x": {"y": [object()]}}, {"x": "\udfff"}, {"ok": 5, "x": object()},
    ]
    for values in bad:
        for replace in (False, True):
            with pytest.raises(ProtocolError) as err:
                await a.set_session(node, cid, values, replace=replace, limit=LIMIT)
            assert err.value.code == Code.BAD_REQUEST, values
    assert await b.get_session(cid) == {"ok": 1, "k" * 128: 2}


async def test_session_values_round_trip_exactly(store: Store) -> None:
    a, b, node, cid = await open_conn(store)
    values: dict[str, Any] = {
        "null_in_list": [None, 1, None], "empty_list": [], "empty_dict": {},
        "nested": {"a": [{"b": [[], {}, [None]]}], "c": {"d": None, "e": [[[]]]}},
        "big": 2**53 - 1, "neg": -(2**53 - 1), "zero": 0, "float": 0.1, "whole": 1.0,
        "tiny": 5e-324, "huge": 1.7976931348623157e308, "t": True, "f": False, "s": "",
        "null": None, "list_of_bools": [True, False, 1, 0],
        "clé 😀 \"q\" \\ \n \x00 \u2028": "日本語 😀 \x00\n\t\"\\ \u2028 \\u0000",
        "{}": "[]", "null ": "null", "1": "1",
    }
    assert await a.set_session(node, cid, values, replace=True, limit=LIMIT)
    got = await b.get_session(cid)
    assert got == values and same_json(got, values)
    merged = {"more": {"x": [None]}, "big": -1}
    assert await b.set_session(node, cid, merged, replace=False, limit=LIMIT)
    assert same_json(await a.get_session(cid), {**values, **merged})


async def test_session_of_a_dead_node(store: Store) -> None:
    a, b, node, cid = await open_conn(store, SHORT_TTL)
    session: dict[str, Any] = {"room": "r1", "seen": [None, 2]}
    assert await a.set_session(node, cid, session, replace=True, limit=LIMIT)
    assert await b.get_session(cid) == session
    await asyncio.sleep(EXPIRED)
    assert await b.get_session(cid) is None  # dead, not purged yet: unreadable, yet writable
    assert await b.set_session(node, cid, {"late": True}, replace=False, limit=LIMIT)
    session["late"] = True
    [dead] = await b.purge_dead()
    assert dead == DeadNode(node, [ConnInfo(cid, "alice", ["room"], session)])
    assert await b.get_session(cid) is None
    assert await b.set_session(node, cid, {"x": 1}, replace=False, limit=LIMIT) is False
    if store.kind == "redis":
        assert not [k for k in await store.keys() if node in k]


async def test_resync_and_remove_node_keep_or_drop_sessions(store: Store) -> None:
    a, b, node, c1 = await open_conn(store)
    c2, c3 = _cid(node, 2), _cid(node, 3)
    await a.add(node, ConnInfo(c2, "bob", ["room"]))
    assert await a.set_session(node, c1, {"k": [1, None]}, replace=True, limit=LIMIT)
    assert await a.set_session(node, c2, {"k": 2}, replace=True, limit=LIMIT)
    # c1 is kept (with a new uid and groups), c2 closed meanwhile, c3 opened meanwhile;
    # resync ignores ConnInfo.session: sessions are only written by set_session
    conns = [ConnInfo(c1, "carol", ["other"]), ConnInfo(c3, None, [], {"ignored": 1})]
    await a.resync(node, conns, TTL, {"connections": 2})
    assert await b.get_session(c1) == {"k": [1, None]}
    assert await b.get_session(c2) is None
    assert await b.get_session(c3) == {}
    assert await b.client_ids("carol") == [c1]
    assert not await b.is_online("bob")
    assert await b.set_session(node, c2, {"k": 3}, replace=False, limit=LIMIT) is False
    await a.remove_node(node)
    assert await b.get_session(c1) is None
    assert await b.set_session(node, c1, {"k": 3}, replace=False, limit=LIMIT) is False
    if store.kind == "redis":
        assert not [k for k in await store.keys() if node in k]


async def test_thousands_of_groups_and_session_keys(store: Store) -> None:
    a, b, node, _ = await open_conn(store)
    c2 = _cid(node, 2)
    await a.add(node, ConnInfo(c2, "bob", [f"g{i}" for i in range(5000)]))
    assert await a.heartbeat(node, TTL, {}) is True  # no write failed
    assert (await b.group_members("g4999")).uids == ["bob"]
    many = {f"k{i}": i for i in range(10_000)}
    assert await a.set_session(node, c2, many, replace=True, limit=10**6)
    assert await b.get_session(c2) == many
    assert await a.set_session(node, c2, dict.fromkeys(many), replace=False, limit=10**6)
    assert await b.get_session(c2) == {}
    assert await a.set_session(node, c2, many, replace=False, limit=10**6)
    assert await a.set_session(node, c2, {"only": 1}, replace=True, limit=10**6)
    assert await b.get_session(c2) == {"only": 1}


# --- Redis only: an unreachable or silent server ----------------------------------------
async def test_redis_down_fails_fast_then_heals(own_valkey: EmbeddedRedis, namespace: str) -> None:
    p = RedisPresence(own_valkey.url, Names(namespace), timeout=0.5)
    await p.start()
    try:
        node = await live_node(p)
        conn = ConnInfo(_cid(node, 1), "alice", ["room"])
        await p.add(node, conn)
        own_valkey.stop(kill=True)
        for write in (p.add(node, conn), p.heartbeat(node, TTL, {}), p.purge_dead()):
            started = time.monotonic()
            with pytest.raises(PresenceUnavailable):
                await write
            assert time.monotonic() - started < 1.0
        with pytest.raises(PresenceUnavailable):
            await p.is_online("alice")
        own_valkey.start()
        assert await p.heartbeat(node, TTL, {}) is False  # restarted empty
        await p.resync(node, [conn], TTL, {})
        assert await p.heartbeat(node, TTL, {}) is True
        assert await p.client_ids("alice") == [conn.client_id]
    finally:
        await p.close()


async def test_redis_silent_times_out_then_asks_for_resync(
    own_valkey: EmbeddedRedis, namespace: str
) -> None:
    p = RedisPresence(own_valkey.url, Names(namespace), timeout=0.5)
    await p.start()
    pid = own_valkey.pid
    assert pid is not None
    try:
        node = await live_node(p)
        conn = ConnInfo(_cid(node, 1), "alice", ["room"])
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                p.add(node, conn), p.join(node, conn.client_id, "alice", "x"), p.nodes(),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 1.5
            assert all(isinstance(r, PresenceUnavailable) for r in results), results
        finally:
            os.kill(pid, signal.SIGCONT)
        # the store kept the node, but may have missed writes: the node must resync
        assert await p.heartbeat(node, TTL, {}) is False
        await p.resync(node, [conn], TTL, {})
        assert await p.heartbeat(node, TTL, {}) is True
        assert (await p.group_members("room")).uids == ["alice"]
        assert (await p.group_members("x")).count == 0
    finally:
        await p.close()


async def test_redis_unreachable_at_start(namespace: str) -> None:
    p = RedisPresence(f"redis://127.0.0.1:{free_port()}/0", Names(namespace), timeout=0.5)
    await p.start()  # a node may start before its store: failures show on use
    try:
        node = new_node_id("n")
        started = time.monotonic()
        with pytest.raises(PresenceUnavailable):
            await p.heartbeat(node, TTL, {})
        with pytest.raises(PresenceUnavailable):
            await p.group_members("g")
        assert time.monotonic() - started < 1.0
    finally:
        await p.close()
    with pytest.raises(PresenceUnavailable):  # closed
        await p.add(node, ConnInfo(_cid(node, 1)))


async def test_create_presence_picks_the_backend_by_scheme() -> None:
    names = Names("factory")
    mem = create_presence("memory://hub1", names)
    assert isinstance(mem, MemoryPresence) and mem.hub == "hub1"
    assert isinstance(create_presence("memory://", names), MemoryPresence)
    assert create_presence("memory://", names).hub == "default"  # type: ignore[attr-defined]
    assert isinstance(create_presence("memory://", names, timeout=1.0), MemoryPresence)
    for url in ("redis://127.0.0.1:1/0", "rediss://h:6380", "unix:///tmp/r.sock"):
        assert isinstance(create_presence(url, names, timeout=1.0), RedisPresence)
    for bad in ("nats://h:4222", "127.0.0.1:6379", ""):
        with pytest.raises(ValueError):
            create_presence(bad, names)
    with pytest.raises(PresenceUnavailable):  # not started
        await RedisPresence("redis://127.0.0.1:1/0", names).is_online("x")


async def test_memory_hubs_are_isolated() -> None:
    names = Names("hubs")
    a, b = MemoryPresence(names, "h-a"), MemoryPresence(names, "h-b")
    node = new_node_id("n")
    await a.heartbeat(node, TTL, {})
    await a.add(node, ConnInfo(_cid(node, 1), "alice"))
    assert await MemoryPresence(names, "h-a").is_online("alice")
    assert not await b.is_online("alice")
    await a.remove_node(node)

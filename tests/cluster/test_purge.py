"""The purge of a dead node survives the death of its purger (issue 14, item 7).

Node 0 holds 2,000 connections (bound to uids, in groups) and is killed; the survivor that
claims its purge is killed in the middle of it. The other survivor must take the purge
over when the claim's lease runs out: every connection gets its ``on_close`` at least once
(the recorder app pushes each call to Redis, with the pid that made it), and none of node
0's presence entries is left in the store.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from redis.asyncio import Redis

from wscluster.embedded import EmbeddedRedis
from wscluster.naming import node_of_client

from .apps.recorder import closed_key
from .conftest import Cluster
from .test_apps import RECORDER, _env
from .test_failures import _read_frame

MakeCluster = Callable[..., Cluster]
N = 2000  # connections of the dead node
UIDS, GROUPS = 500, 4  # each uid has 4 of them, each group 500
BATCH = 200  # connections per purge batch (presence.base.PURGE_BATCH)
KILL_AT = 300  # on_close calls seen before the purger is killed: in its second batch
TTL = 2.0  # --node-ttl, also the purge lease


async def _open(port: int, query: str) -> tuple[str, asyncio.StreamWriter]:
    """A raw WebSocket connection to a recorder node: its client id once on_connect has
    bound its uid and joined its group (the greeting comes after both acks)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    cid = ""
    while True:
        _, payload = await _read_frame(reader)
        msg = json.loads(payload)
        if msg["type"] == "welcome":
            cid = msg["client_id"]
        elif msg["type"] == "message" and msg["data"].get("greeting"):
            return cid, writer


async def _open_many(port: int, unique: str) -> tuple[list[str], list[asyncio.StreamWriter]]:
    slots = asyncio.Semaphore(100)

    async def one(i: int) -> tuple[str, asyncio.StreamWriter]:
        query = urlencode({"user": f"u{i % UIDS}{unique}", "room": f"r{i % GROUPS}{unique}"})
        async with slots:
            return await asyncio.wait_for(_open(port, query), 20)

    opened = await asyncio.gather(*(one(i) for i in range(N)))
    return [cid for cid, _ in opened], [w for _, w in opened]


async def _records(store: Redis, ns: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await store.lrange(closed_key(ns), 0, -1)]


async def _wait(what: str, check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


async def test_a_purger_killed_mid_purge_is_taken_over(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    # each on_close of a dead node's connection takes 0.1 s (a database write): the purge
    # of 2,000 takes seconds, long enough to kill its purger in the middle
    env = {**_env(valkey.url), "RECORDER_DEAD_CLOSE_DELAY": "0.1"}
    extra = [*RECORDER, "--node-heartbeat", "0.5", "--node-ttl", str(TTL)]
    c = make_cluster(valkey.url, 3, extra, env)
    store = Redis.from_url(valkey.url, decode_responses=True)
    ns = c.namespace
    writers: list[asyncio.StreamWriter] = []
    try:
        t0 = time.monotonic()
        cids, writers = await _open_many(c.nodes[0].port, unique)
        opened_s = time.monotonic() - t0
        dead = node_of_client(cids[0])
        assert dead is not None and await store.hlen(f"{ns}:nc:{dead}") == N

        c.kill(0)
        t_kill = time.monotonic()

        async def purging() -> bool:
            return bool(await store.llen(closed_key(ns)) >= KILL_AT)

        await _wait("the purge of the dead node started", purging, 20)
        purger_pid = (await _records(store, ns))[0]["pid"]
        (purger,) = [n for n in c.nodes if n.proc is not None and n.proc.pid == purger_pid]
        purger.kill()
        (other,) = [n for n in c.nodes[1:] if n is not purger]
        assert other.proc is not None
        fired_before = sum(1 for r in await _records(store, ns) if r["pid"] == purger_pid)

        missing = set(cids)

        async def all_closed() -> bool:
            missing.difference_update(r["client_id"] for r in await _records(store, ns))
            return not missing

        try:
            await _wait("on_close of every connection of the dead node", all_closed, 40)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {len(missing)} of {N} never got on_close") from None
        closed_s = time.monotonic() - t_kill

        async def clean() -> bool:  # both dead nodes purged: only the survivor is known
            known = [str(m) for m in await store.zrange(f"{ns}:nodes", 0, -1)]
            return len(known) == 1 and bool(await store.exists(f"{ns}:alive:{known[0]}"))

        await _wait("both dead nodes purged", clean, 20)
        await asyncio.sleep(1.0)  # a late duplicate would show

        records = await _records(store, ns)
        by_cid: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_cid.setdefault(r["client_id"], []).append(r)
        assert set(by_cid) == set(cids)
        for i, cid in enumerate(cids):
            for r in by_cid[cid]:
                assert (r["code"], r["node_died"]) == (1006, True), r
                assert (r["uid"], r["groups"]) == (f"u{i % UIDS}{unique}",
                                                   [f"r{i % GROUPS}{unique}"]), r
        pids = Counter(r["pid"] for r in records)
        assert set(pids) == {purger_pid, other.proc.pid}, pids
        assert KILL_AT <= fired_before < N, fired_before  # it was killed mid-purge
        # at least once each: the survivor fired every one the purger had not
        by_purger = {r["client_id"] for r in records if r["pid"] == purger_pid}
        by_other = {r["client_id"] for r in records if r["pid"] == other.proc.pid}
        assert len(by_other) >= N - len(by_purger)
        # exactly once but for the batch the purger was in when it died: fired by both
        repeated = [cid for cid in cids if len(by_cid[cid]) > 1]
        assert len(repeated) <= BATCH, len(repeated)
        assert set(repeated) == by_purger & by_other
        assert all(len(by_cid[cid]) == 2 for cid in repeated)
        assert f"taking over the purge of dead node {dead}" in other.log()

        # nothing of the dead node is left: no uid set, group hash, connection hash, index,
        # claim or lease (its uids and groups had no other member)
        keys = sorted([k async for k in store.scan_iter(match=f"{ns}:*")])
        assert not [k for k in keys if dead in k], keys
        leftover = [k for k in keys if not k.startswith((f"{ns}:alive:", f"{ns}:test:"))]
        assert leftover == [f"{ns}:nodes"], leftover
        print(f"\n{N} connections opened in {opened_s:.1f} s; purger killed after "
              f"{fired_before} on_close calls; all closed {closed_s:.1f} s after the kill; "
              f"{len(repeated)} fired twice")
    finally:
        for w in writers:
            w.close()
        await store.aclose()

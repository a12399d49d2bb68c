"""Many clients at once: the subscriptions of one loop turn are sent to the broker together
(subscriptions.py, broker/redis_sub.py). Every login's barrier must still hold for its own
uid (a message sent right after the ack arrives), and the unsubscriptions of clients that
all leave at once must all reach Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from redis.asyncio import Redis

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
N = 150


async def test_logins_at_once_each_hold_their_barrier_and_closes_unsubscribe(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 2, ["--anonymous", "--rate-limit", "0"])
    clients = await asyncio.gather(*(WS.open(cluster.ws_urls[0]) for _ in range(N)))
    sender = await WS.open(cluster.ws_urls[1], f"s{unique}")
    uids = [f"u{i}{unique}" for i in range(N)]
    for ws, uid in zip(clients, uids, strict=True):  # all login frames out before any ack
        await ws.send_raw(json.dumps({"type": "login", "uid": uid, "id": 1}))

    async def login_then_receive(ws: WS, uid: str) -> None:
        ack = await ws.reply(1, timeout=20)
        assert ack["type"] == "ack", ack
        frame = {"type": "send", "to": f"uid:{uid}", "data": uid}
        await sender.send_raw(json.dumps(frame))  # right after (its ack is not read)
        while True:
            msg = await ws.next(type="message", timeout=10)
            if msg["data"] == uid:
                return

    pairs = zip(clients, uids, strict=True)
    await asyncio.wait_for(asyncio.gather(*(login_then_receive(ws, uid) for ws, uid in pairs)), 60)

    channels = [f"{cluster.namespace}:c:uid:{uid}" for uid in uids]
    admin = Redis.from_url(valkey.url)
    try:
        counts = dict(await admin.pubsub_numsub(*channels))
        assert all(counts[c.encode()] == 1 for c in channels), counts
        await asyncio.gather(*(ws.conn.close() for ws in clients))  # all leave at once
        async with asyncio.timeout(10):
            while any(n for n in dict(await admin.pubsub_numsub(*channels)).values()):
                await asyncio.sleep(0.1)
    finally:
        await admin.aclose()

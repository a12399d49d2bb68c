"""The node writes the frames of one event-loop turn to a connection in one system call
(gateway/connection.py, ``flush``): they must still arrive as valid frames, whole and in
order, whatever their sizes, and before a close frame of the same turn. The client here is
the independent `websockets` parser, fed many frames in a single TCP write so that the node
reads, answers and delivers them within one turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .rawframes import client_frame
from .wsclient import WS

MakeCluster = Callable[..., Cluster]


async def frames_until(ws: WS, done: Callable[[list[Any]], bool]) -> list[Any]:
    got: list[Any] = []
    async with asyncio.timeout(20):
        while not done(got):
            got.append(json.loads(await ws.conn.recv()))
    return got


async def test_frames_of_one_turn_arrive_whole_and_in_order(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 1, ["--anonymous", "--max-message-size", "200000"])
    uid = f"w{unique}"
    ws = await WS.open(cluster.ws_urls[0], uid=uid)
    # message frames are the data plus ~100 bytes: these cross the 7-bit, 16-bit and 64-bit
    # length encodings of the server's frames on both sides
    sizes = [0, 1, 20, 24, 30, 40, 1000, 65_400, 65_430, 65_460, 65_500, 100_000, 3] * 4
    frames = [{"type": "send", "to": f"uid:{uid}", "id": i, "data": "x" * n}
              for i, n in enumerate(sizes, 1)]  # fmt: skip
    burst = b"".join(client_frame(json.dumps(f).encode()) for f in frames)
    assert ws.conn.transport is not None
    ws.conn.transport.write(burst)  # one write: the node reads many frames in one go

    got = await frames_until(ws, lambda g: len(g) == 2 * len(sizes))
    acks = [f["id"] for f in got if f["type"] == "ack"]
    messages = [f for f in got if f["type"] == "message"]
    assert acks == list(range(1, len(sizes) + 1))
    assert [len(m["data"]) for m in messages] == sizes
    assert all(m["data"] == "x" * len(m["data"]) for m in messages)
    assert (await ws.ok({"type": "ping"}))["type"] == "pong"  # the stream is still in sync


async def test_replies_of_a_turn_go_before_its_close_frame(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    """1,010 bad frames in one write: the node answers 1,000 errors (the abuse burst), then
    closes 1008 in the same turn; every error frame is written before the close frame."""
    cluster = make_cluster(valkey.url, 1, ["--anonymous"])
    ws = await WS.open(cluster.ws_urls[0])
    assert ws.conn.transport is not None
    ws.conn.transport.write(b"".join(client_frame(b"{nope") for _ in range(1010)))
    errors = 0
    try:
        async with asyncio.timeout(20):
            while True:
                frame = json.loads(await ws.conn.recv())
                assert frame["type"] == "error" and frame["code"] == "bad_json", frame
                errors += 1
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert errors >= 1000

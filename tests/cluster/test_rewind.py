"""Recent history ("rewind") and carbons (PROTOCOL: "History, offsets and resume"): a resume
with ``recent`` replays the newest N of a stream it has no position in, ``Cluster.history``
and ``GET /api/history`` read the newest N, and a private message sent with ``carbon`` is
also stored in the sender's own stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from wscluster import Cluster as ClusterClient
from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster, _make
from .wsclient import WS

RULES = ["--history", "group:h:*=1000/300s", "--history", "uid:*=1000/300s",
         "--max-replay", "50", "--check-interval", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def rcluster(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = _make(valkey.url, tmp_path_factory.mktemp("rewind"), extra=RULES)
    yield c
    c.stop()


def taken(ws: WS) -> list[dict[str, Any]]:
    """The messages pushed before the last reply (taken out of ``ws.pushed``)."""
    got = [m for m in ws.pushed if m["type"] == "message"]
    ws.pushed = [m for m in ws.pushed if m["type"] != "message"]
    return got


async def test_resume_recent_replays_the_newest_n(rcluster: Cluster, unique: str) -> None:
    urls, room, few = rcluster.ws_urls, f"group:h:{unique}", f"group:h:few{unique}"
    pub = await WS.open(urls[0], f"pub{unique}")
    for i in range(30):
        await pub.ok({"type": "send", "to": room, "data": i})
    for i in range(3):
        await pub.ok({"type": "send", "to": few, "data": i})
    ws = await WS.open(urls[1], f"r{unique}")
    ack = await ws.ok({"type": "resume", "recent": 10,
                       "streams": {room: [None, 0], few: [None, 0]}})  # fmt: skip
    res = ack["streams"]
    assert res[room]["recovered"] is False and res[room]["reason"] == "too_many"
    assert res[room]["replayed"] == 10 and res[room]["offset"] == 30
    assert res[few]["recovered"] is True and res[few]["replayed"] == 3
    got = taken(ws)
    assert [m["data"] for m in got if m["to"] == room] == list(range(20, 30))
    assert [m["offset"] for m in got if m["to"] == room] == list(range(21, 31))
    assert [m["data"] for m in got if m["to"] == few] == [0, 1, 2]
    # then live, once each
    await pub.ok({"type": "send", "to": room, "data": "live"})
    msg = await ws.next(type="message")
    assert (msg["data"], msg["offset"]) == ("live", 31)
    await ws.nothing()
    # a stream with a position is not cut: everything after it (up to --max-replay)
    ws2 = await WS.open(urls[2], f"r{unique}")
    ack = await ws2.ok({"type": "resume", "recent": 2,
                        "streams": {room: [msg["epoch"], 25]}})  # fmt: skip
    assert ack["streams"][room]["recovered"] is True and ack["streams"][room]["replayed"] == 6


async def test_resume_recent_is_checked(rcluster: Cluster, unique: str) -> None:
    ws = await WS.open(rcluster.ws_urls[0], f"bad{unique}")
    for recent in (0, -1, 51, "5", True, 1.5):
        reply = await ws.request({"type": "resume", "recent": recent,
                                  "streams": {f"group:h:{unique}": [None, 0]}})  # fmt: skip
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), recent
    ack = await ws.ok({"type": "resume", "recent": 50,
                       "streams": {f"group:h:{unique}": [None, 0]}})  # fmt: skip
    assert ack["streams"][f"group:h:{unique}"]["recovered"] is True


async def test_cluster_history_and_api_history(rcluster: Cluster, unique: str) -> None:
    room = f"group:h:{unique}"
    pub = await WS.open(rcluster.ws_urls[0], f"pub{unique}")
    for i in range(8):
        await pub.ok({"type": "send", "to": room, "data": {"n": i}})
    async with ClusterClient(rcluster.redis_url, namespace=rcluster.namespace) as cluster:
        got = await cluster.history(room, limit=3)
        assert [m["data"]["n"] for m in got] == [5, 6, 7]
        assert [m["offset"] for m in got] == [6, 7, 8]
        assert all(m["type"] == "message" and m["to"] == room for m in got)
        assert got[0]["from"]["uid"] == f"pub{unique}"
        assert await cluster.history(f"group:nohistory{unique}", limit=3) == []
        with pytest.raises(Exception, match="limit"):
            await cluster.history(room, limit=0)
    async with aiohttp.ClientSession() as http:
        url = f"{rcluster.api_urls[1]}/api/history"
        async with http.get(url, params={"stream": room, "limit": "2"}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["stream"] == room and body["offset"] == 8
        assert body["epoch"] == got[0]["epoch"]
        assert [m["data"]["n"] for m in body["messages"]] == [6, 7]
        async with http.get(url, params={"stream": f"group:nohistory{unique}"}) as r:
            assert r.status == 200
            assert await r.json() == {"stream": f"group:nohistory{unique}", "epoch": "",
                                      "offset": 0, "messages": []}  # fmt: skip
        for params in ({"stream": room, "limit": "0"}, {"stream": "all"}, {"limit": "2"},
                       {"stream": room, "limit": "x"}):  # fmt: skip
            async with http.get(url, params=params) as r:
                assert r.status == 400, params


async def test_carbons_reach_the_senders_other_devices(rcluster: Cluster, unique: str) -> None:
    urls, alice, bob = rcluster.ws_urls, f"alice{unique}", f"bob{unique}"
    laptop = await WS.open(urls[0], alice)
    phone = await WS.open(urls[1], alice)
    b = await WS.open(urls[2], bob)
    before = await b.ok({"type": "send", "to": f"uid:{alice}", "data": "hi alice"})
    assert before["offset"] == 1
    hello = await laptop.next(type="message")
    await phone.next(type="message")
    ack = await laptop.ok({"type": "send", "to": f"uid:{bob}", "data": "hi bob", "carbon": True})
    got = await b.next(type="message")
    assert got["data"] == "hi bob" and "carbon" not in got
    assert (ack["epoch"], ack["offset"]) == (got["epoch"], got["offset"])  # bob's stream
    copy = await phone.next(type="message")
    assert copy["data"] == "hi bob" and copy["carbon"] is True
    assert copy["to"] == f"uid:{bob}" and copy["from"]["uid"] == alice
    assert copy["epoch"] == hello["epoch"] and copy["offset"] == 2  # alice's stream
    own = await laptop.next(type="message")  # the sending device gets it too
    assert own["carbon"] is True and own["offset"] == 2
    # a reloaded page (a new connection with no position) sees its own private messages
    fresh = await WS.open(urls[2], alice)
    ack = await fresh.ok({"type": "resume", "recent": 10, "streams": {f"uid:{alice}": [None, 0]}})
    assert ack["streams"][f"uid:{alice}"]["recovered"] is True
    assert [(m["data"], m.get("carbon", False)) for m in taken(fresh)] == [
        ("hi alice", False), ("hi bob", True)]  # fmt: skip


async def test_carbon_is_checked(rcluster: Cluster, unique: str) -> None:
    ws = await WS.open(rcluster.ws_urls[0], f"c{unique}")
    for frame in ({"to": f"group:h:{unique}", "carbon": True}, {"to": "all", "carbon": True},
                  {"to": f"uid:x{unique}", "carbon": "yes"}):  # fmt: skip
        reply = await ws.request({"type": "send", "data": 1, **frame})
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), frame
    # carbon false is a plain send; to oneself it is stored once
    await ws.ok({"type": "send", "to": f"uid:x{unique}", "data": 1, "carbon": False})
    await ws.ok({"type": "send", "to": f"uid:c{unique}", "data": 2, "carbon": True})
    msg = await ws.next(type="message")
    assert msg["data"] == 2 and msg["offset"] == 1
    await ws.nothing()

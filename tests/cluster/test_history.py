"""History, offsets and resume on real nodes (PROTOCOL: "History, offsets and resume")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster, _make
from .wsclient import WS

RULES = ["--history", "group:h:*=1000/300s", "--history", "group:small:*=5/300s",
         "--history", "uid:*=1000/300s", "--max-replay", "50", "--check-interval", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def hcluster(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = _make(valkey.url, tmp_path_factory.mktemp("history"), extra=RULES)
    yield c
    c.stop()


async def send(ws: WS, to: str, data: Any) -> None:
    await ws.ok({"type": "send", "to": to, "data": data})


def replayed(ws: WS) -> list[dict[str, Any]]:
    """The messages that came before the last reply (taken out of ``ws.pushed``)."""
    got = [m for m in ws.pushed if m["type"] == "message"]
    ws.pushed = [m for m in ws.pushed if m["type"] != "message"]
    return got


async def messages(ws: WS, n: int, timeout: float = 5) -> list[dict[str, Any]]:
    return [await ws.next(timeout, "message") for _ in range(n)]


async def test_messages_carry_offsets_per_stream(hcluster: Cluster, unique: str) -> None:
    urls = hcluster.ws_urls
    alice = await WS.open(urls[0], f"alice{unique}")
    ack = await alice.ok({"type": "join", "group": f"h:{unique}"})
    assert ack["offset"] == 0 and isinstance(ack["epoch"], str)  # a stream not written yet
    await alice.ok({"type": "join", "group": f"plain{unique}"})
    bob = await WS.open(urls[1], f"bob{unique}")
    for i in range(3):
        await send(bob, f"group:h:{unique}", i)
        await send(bob, f"uid:alice{unique}", i)
    await send(bob, f"group:plain{unique}", "x")
    got = await messages(alice, 7)
    group = [m for m in got if m["to"] == f"group:h:{unique}"]
    direct = [m for m in got if m["to"] == f"uid:alice{unique}"]
    plain = [m for m in got if m["to"] == f"group:plain{unique}"]
    assert [m["offset"] for m in group] == [1, 2, 3] == [m["offset"] for m in direct]
    assert [m["data"] for m in group] == [0, 1, 2]
    assert len({m["epoch"] for m in group}) == 1 and group[0]["epoch"] != direct[0]["epoch"]
    assert len(plain) == 1 and "offset" not in plain[0] and "epoch" not in plain[0]
    # a later joiner (another node) learns the position in its ack
    carol = await WS.open(urls[2], f"carol{unique}")
    ack = await carol.ok({"type": "join", "group": f"h:{unique}"})
    assert (ack["epoch"], ack["offset"]) == (group[0]["epoch"], 3)
    login = await carol.ok({"type": "login", "uid": f"alice{unique}"})
    assert (login["epoch"], login["offset"]) == (direct[0]["epoch"], 3)


async def test_resume_on_another_node_replays_exactly_the_missed(
    hcluster: Cluster, unique: str
) -> None:
    urls, room, me = hcluster.ws_urls, f"group:h:{unique}", f"uid:u{unique}"
    pub = await WS.open(urls[1], f"pub{unique}")
    a = await WS.open(urls[0], f"u{unique}")
    await a.ok({"type": "join", "group": f"h:{unique}"})
    for i in range(3):
        await send(pub, room, i)
    seen = await messages(a, 3)
    epoch = seen[-1]["epoch"]
    await a.close()
    for i in range(3, 8):
        await send(pub, room, i)
        await send(pub, me, i)
    b = await WS.open(urls[2], f"u{unique}")
    ack = await b.ok({"type": "resume", "streams": {room: [epoch, 3], me: [None, 0]}})
    got = replayed(b)
    assert [(m["to"], m["offset"], m["data"]) for m in got] == (
        [(room, o, o - 1) for o in range(4, 9)] + [(me, o, o + 2) for o in range(1, 6)]
    )
    res = ack["streams"]
    assert res[room] == {"recovered": True, "epoch": epoch, "offset": 8, "replayed": 5}
    assert res[me]["recovered"] is True and res[me]["offset"] == 5 and res[me]["replayed"] == 5
    await send(pub, room, "live")
    live = await b.next(type="message")
    assert (live["offset"], live["data"]) == (9, "live")
    await b.nothing(0.3)


async def test_resume_under_load_has_no_gap_and_no_duplicate(
    hcluster: Cluster, unique: str
) -> None:
    urls, room = hcluster.ws_urls, f"group:h:{unique}"
    pub = await WS.open(urls[1], f"pub{unique}")
    first = await WS.open(urls[0], f"s{unique}")
    await first.ok({"type": "join", "group": f"h:{unique}"})
    total = 400

    async def publish() -> None:
        for i in range(total):
            await pub.send_raw(json.dumps({"type": "send", "to": room, "data": i}))
            await asyncio.sleep(0.004)  # ~250/s: a reconnect misses far fewer than --max-replay

    task = asyncio.create_task(publish())
    resumed = await messages(first, 30)
    await first.close()
    for url in (urls[2], urls[0]):  # twice, on different nodes, while messages flow
        ws = await WS.open(url, f"s{unique}")
        position = [resumed[-1]["epoch"], resumed[-1]["offset"]]
        ack = await ws.ok({"type": "resume", "streams": {room: position}})
        assert ack["streams"][room]["recovered"] is True, ack
        got = replayed(ws)
        while len(got) < 60 or url == urls[0]:
            try:
                got.append(await ws.next(1.0, "message"))
            except TimeoutError:
                break
        resumed += got
        await ws.close()
    await task
    offsets = [m["offset"] for m in resumed]
    assert offsets == list(range(1, len(offsets) + 1)), offsets[:20]
    assert [m["data"] for m in resumed] == [o - 1 for o in offsets]
    assert len(offsets) == total


async def test_resume_verdicts(hcluster: Cluster, unique: str) -> None:
    urls = hcluster.ws_urls
    pub = await WS.open(urls[0], f"pub{unique}")
    small, big, plain = f"group:small:{unique}", f"group:h:{unique}", f"group:none{unique}"
    ws = await WS.open(urls[1], f"v{unique}")
    epochs = {}
    for stream in (small, big):
        epochs[stream] = (await ws.ok({"type": "join", "group": stream[6:]}))["epoch"]
    await ws.close()
    for i in range(10):
        await send(pub, small, i)
    for i in range(60):
        await send(pub, big, i)
    ws = await WS.open(urls[2], f"v{unique}")
    ack = await ws.ok({"type": "resume", "streams": {
        small: [epochs[small], 1], big: [epochs[big], 1], plain: ["x", 4],
        f"uid:v{unique}": ["gone", 3], f"uid:other{unique}": ["", 0],
    }})  # fmt: skip
    res = ack["streams"]
    assert res[small]["recovered"] is False and res[small]["reason"] == "too_old"
    assert res[small]["replayed"] == 5 and res[small]["offset"] == 10  # the 5 retained
    assert res[big]["recovered"] is False and res[big]["reason"] == "too_many"
    assert res[big]["replayed"] == 50 and res[big]["offset"] == 60  # the newest 50
    assert res[plain] == {"recovered": False, "reason": "no_history"}
    assert res[f"uid:v{unique}"]["reason"] == "epoch_changed"
    assert res[f"uid:other{unique}"] == {"error": "forbidden"}
    got = replayed(ws)
    assert [m["data"] for m in got if m["to"] == small] == [5, 6, 7, 8, 9]
    assert [m["data"] for m in got if m["to"] == big] == list(range(10, 60))
    # every group of the frame was joined, including the one without history
    await send(pub, plain, "joined")
    assert (await ws.next(type="message"))["data"] == "joined"


async def test_resume_refuses_bad_frames_and_changes_nothing(
    hcluster: Cluster, unique: str
) -> None:
    ws = await WS.open(hcluster.ws_urls[0])
    reply = await ws.request({"type": "resume", "streams": {f"uid:x{unique}": ["", 0]}})
    assert reply["type"] == "ack"
    assert reply["streams"][f"uid:x{unique}"] == {"error": "not_logged_in"}
    for streams in ({}, [], {"all": ["", 0]}, {"group:g": [1, 2]}, {"group:g": ["e", -5]}):
        reply = await ws.request({"type": "resume", "streams": streams})
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), streams
    await ws.ok({"type": "login", "uid": f"x{unique}"})
    reply = await ws.request({"type": "presence", "to": f"group:h:{unique}"})
    assert reply["count"] == 0  # no bad frame joined anything
    assert (await ws.request({"type": "ping"}))["type"] == "pong"


async def test_offline_delivery_to_a_user(hcluster: Cluster, unique: str) -> None:
    urls, me = hcluster.ws_urls, f"uid:off{unique}"
    first = await WS.open(urls[0], f"off{unique}")
    position = await first.ok({"type": "login", "uid": f"off{unique}"})
    await first.close()
    async with aiohttp.ClientSession() as http:  # a backend writes while the user is away
        for i in range(4):
            body = {"to": me, "data": {"n": i}}
            async with http.post(f"{hcluster.api_urls[1]}/api/send", json=body) as r:
                assert r.status == 200
    phone = await WS.open(urls[2], f"off{unique}")
    ack = await phone.ok({"type": "resume",
                          "streams": {me: [position["epoch"], position["offset"]]}})  # fmt: skip
    assert ack["streams"][me]["recovered"] is True
    got = replayed(phone)
    assert [m["data"]["n"] for m in got] == [0, 1, 2, 3]
    assert all(m["from"] is None for m in got)


async def test_cli_send_with_history_gets_offsets(hcluster: Cluster, unique: str) -> None:
    ws = await WS.open(hcluster.ws_urls[0], f"c{unique}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wscluster", "send", "--broker", hcluster.redis_url,
        "--namespace", hcluster.namespace, "--history", "uid:*=10/60s",
        "--to", f"uid:c{unique}", '"hello"', stdout=subprocess.PIPE,
    )  # fmt: skip
    assert await proc.wait() == 0
    msg = await ws.next(type="message")
    assert (msg["data"], msg["offset"]) == ("hello", 1)


async def test_store_lost_is_announced_and_resume_says_so(
    own_valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c = make_cluster(own_valkey.url, 2, [*RULES, "--node-heartbeat", "0.5"])
    room = f"group:h:{unique}"
    sub = await WS.open(c.ws_urls[0], f"s{unique}")
    await sub.ok({"type": "join", "group": f"h:{unique}"})
    pub = await WS.open(c.ws_urls[1], f"p{unique}")
    for i in range(3):
        await send(pub, room, i)
    before = await messages(sub, 3)
    own_valkey.restart(down_for=0.5)  # empty: no persistence
    for _ in range(100):  # sends fail (unavailable) until the node is back
        reply = await pub.request({"type": "send", "to": room, "data": "after"})
        if reply["type"] == "ack":
            break
        await asyncio.sleep(0.1)
    gap = await sub.next(10, "gap")
    assert gap["stream"] == room and gap["reason"] == "epoch_changed"
    assert gap["epoch"] != before[0]["epoch"]  # '' when the check saw the empty store first
    msg = await sub.next(type="message")
    assert msg["data"] == "after" and msg["epoch"] not in ("", before[0]["epoch"])
    assert gap["epoch"] in ("", msg["epoch"])
    other = await WS.open(c.ws_urls[1])
    for _ in range(50):  # a pooled presence connection may fail once after the restart
        ack = await other.request({"type": "login", "uid": f"s{unique}"})
        if ack["type"] == "ack":
            ack = await other.request(
                {"type": "resume", "streams": {room: [before[0]["epoch"], 3]}}
            )
            if ack["type"] == "ack" and "error" not in ack["streams"][room]:
                break
        await asyncio.sleep(0.1)
    res = ack["streams"][room]
    assert (res["recovered"], res["reason"], res["epoch"]) == (False, "epoch_changed", msg["epoch"])
    assert [m["data"] for m in replayed(other)] == ["after"]


async def test_lost_pubsub_link_is_repaired_from_history(
    own_valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c = make_cluster(own_valkey.url, 2, RULES)
    room = f"group:h:{unique}"
    sub = await WS.open(c.ws_urls[0], f"s{unique}")
    await sub.ok({"type": "join", "group": f"h:{unique}"})
    pub = await WS.open(c.ws_urls[1], f"p{unique}")
    admin = aioredis.from_url(own_valkey.url)
    try:
        sent = 0
        for _ in range(3):
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            for _ in range(30):  # published while the subscribers reconnect
                reply = await pub.request({"type": "send", "to": room, "data": sent})
                if reply["type"] == "ack":
                    sent += 1
            await asyncio.sleep(0.2)
    finally:
        await admin.aclose()
    got = await messages(sub, sent, timeout=10)
    assert [m["data"] for m in got] == list(range(sent))
    assert [m["offset"] for m in got] == list(range(1, sent + 1))
    await sub.nothing(0.5)


def test_history_needs_redis(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wscluster", "serve", "--anonymous", "--broker",
         "nats://127.0.0.1:4", "--presence", "redis://127.0.0.1:4", "--history", "uid:*=1/1s"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "history" in out.stderr and "Redis" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "wscluster", "serve", "--anonymous", "--history", "uid:*=1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--history" in out.stderr


async def five_delivered(hcluster: Cluster, unique: str) -> tuple[WS, WS, str]:
    """A subscriber of group h:<unique> on node 0 got 5 messages from a publisher on node 1:
    (subscriber, publisher, epoch)."""
    sub = await WS.open(hcluster.ws_urls[0], f"s{unique}")
    await sub.ok({"type": "join", "group": f"h:{unique}"})
    pub = await WS.open(hcluster.ws_urls[1], f"p{unique}")
    for i in range(5):
        await send(pub, f"group:h:{unique}", i)
    return sub, pub, (await messages(sub, 5))[-1]["epoch"]


async def test_store_that_went_back_in_time_starts_a_new_epoch(
    hcluster: Cluster, unique: str
) -> None:
    """A crash with AOF fsync every second can lose the last appends: their offsets would be
    given to other messages. The node that delivered them notices (an offset it received
    already), tells its receivers and starts the stream over in a new epoch."""
    room = f"group:h:{unique}"
    sub, pub, old = await five_delivered(hcluster, unique)
    meta, stream = f"{hcluster.namespace}:hm:{room}", f"{hcluster.namespace}:h:{room}"
    admin = aioredis.from_url(hcluster.redis_url)
    try:  # the store as a crash would leave it: offsets 4 and 5 forgotten, stream and counter
        kept = await admin.xrange(stream, "-", "3-0")
        await admin.delete(stream)
        for entry_id, fields in kept:
            await admin.xadd(stream, fields, id=entry_id)
        await admin.hset(meta, "o", 3)
    finally:
        await admin.aclose()
    frames: list[dict[str, Any]] = []
    for i in range(50):  # until the new epoch is in place; each lost message is reported
        await send(pub, room, i)
        try:
            while True:
                frames.append(await sub.next(0.3, type=None))
        except TimeoutError:
            pass
        if any(f["type"] == "message" for f in frames):
            break
    kinds = [(f["type"], f.get("reason")) for f in frames]
    first = kinds.index(("message", None))
    lost = frames[: first - 1]
    assert lost and all((g["type"], g["reason"], g["epoch"], g["offset"]) ==
                        ("gap", "lost", old, 5) for g in lost), kinds  # fmt: skip
    assert kinds[first - 1] == ("gap", "epoch_changed"), kinds
    msg = frames[first]  # the sends before it were each reported lost
    assert (msg["epoch"], msg["offset"], msg["data"]) == (frames[first - 1]["epoch"], 1, len(lost))
    assert msg["epoch"] != old


async def test_counter_behind_its_stream_starts_a_new_epoch(hcluster: Cluster, unique: str) -> None:
    """A counter that lost writes its stream kept: the append starts a new epoch itself."""
    room = f"group:h:{unique}"
    sub, pub, old = await five_delivered(hcluster, unique)
    admin = aioredis.from_url(hcluster.redis_url)
    try:
        await admin.hset(f"{hcluster.namespace}:hm:{room}", "o", 3)
    finally:
        await admin.aclose()
    await send(pub, room, "next")
    gap = await sub.next(5, "gap")
    msg = await sub.next(5, "message")
    assert gap["reason"] == "epoch_changed" and gap["epoch"] == msg["epoch"] != old
    assert (msg["data"], msg["offset"]) == ("next", 1)

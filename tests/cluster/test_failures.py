"""Failures with real processes: dead nodes, Redis restarts, full nodes, slow clients,
drain, malformed storms. Each test gets its own cluster (and valkey where it breaks it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import aiohttp
import pytest
import websockets

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]


async def _presence(api: str, to: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(
        f"{api}/api/presence", params={"to": to}
    ) as r:
        return await r.json()  # type: ignore[no-any-return]


async def _stats(api: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"{api}/api/stats") as r:
        return await r.json()  # type: ignore[no-any-return]


async def _raw_ws(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A handshake by hand: the socket then does only what the test makes it do."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(size)


async def test_killed_node_is_purged_within_15s(valkey: EmbeddedRedis, make_cluster: MakeCluster,
                                                unique: str) -> None:  # fmt: skip
    c = make_cluster(valkey.url)  # default heartbeat 2 s, TTL 10 s
    victim = await WS.open(c.ws_urls[2], f"v{unique}")
    await victim.ok({"type": "join", "group": f"g{unique}"})
    watcher = await WS.open(c.ws_urls[0], f"w{unique}")
    await watcher.ok({"type": "join", "group": f"g{unique}", "presence": True})
    assert (await _presence(c.api_urls[0], f"uid:v{unique}"))["online"] is True
    c.kill(2)
    t0 = time.monotonic()
    while (await _presence(c.api_urls[1], f"uid:v{unique}"))["online"]:
        assert time.monotonic() - t0 < 15, "dead node still reported after 15 s"
        await asyncio.sleep(0.25)
    gone_after = time.monotonic() - t0
    stats = await _stats(c.api_urls[0])
    assert len(stats["nodes"]) == 2  # type: ignore[arg-type]
    group = await _presence(c.api_urls[0], f"group:g{unique}")
    assert group == {"uids": [f"w{unique}"], "count": 1}
    # a survivor purges it exactly once and tells presence watchers the victim left
    leave = None
    while leave is None or leave["event"] != "leave":
        leave = await watcher.next(15, type="presence")
    assert leave["client_id"] == victim.client_id
    # the leave goes out before the store forgets the victim: the purge ends just after
    t1 = time.monotonic()
    while "wscluster.node: purged dead node" not in (logs := c.nodes[0].log() + c.nodes[1].log()):
        assert time.monotonic() - t1 < 5, logs
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # a second purge would show
    logs = c.nodes[0].log() + c.nodes[1].log()
    assert logs.count("wscluster.node: purged dead node") == 1, logs
    print(f"dead node gone from presence after {gone_after:.1f}s")


async def test_redis_restart_heals(own_valkey: EmbeddedRedis, make_cluster: MakeCluster,
                                   unique: str) -> None:  # fmt: skip
    c = make_cluster(own_valkey.url, 2, ["--node-heartbeat", "0.5", "--node-ttl", "3"])
    a = await WS.open(c.ws_urls[0], f"a{unique}")
    b = await WS.open(c.ws_urls[1], f"b{unique}")
    await b.ok({"type": "join", "group": f"g{unique}"})
    own_valkey.stop(kill=True)
    await asyncio.sleep(1.0)
    err = await a.request({"type": "send", "to": f"uid:b{unique}", "data": 1}, timeout=10)
    assert err["type"] == "error" and err["code"] == "unavailable"
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        while True:
            async with http.get(f"{c.nodes[0].http_url}/healthz") as r:
                if r.status == 503:
                    break
            assert time.monotonic() - t0 < 5, "healthz still 200 5 s into the outage"
            await asyncio.sleep(0.1)
        async with http.post(f"{c.api_urls[0]}/api/send", json={"to": "all", "data": 1}) as r:
            assert r.status == 503
    own_valkey.start()  # back, and empty
    t0 = time.monotonic()
    while True:
        reply = await a.request({"type": "send", "to": f"group:g{unique}", "data": "back"})
        if reply["type"] == "ack":
            try:
                msg = await b.next(0.5, type="message")
                assert msg["data"] == "back"
                break
            except TimeoutError:
                pass
        assert time.monotonic() - t0 < 5, "cross-node routing not back within 5 s"
        await asyncio.sleep(0.1)
    healed = time.monotonic() - t0
    # presence re-registered by the nodes themselves (nobody reconnected)
    t0 = time.monotonic()
    while (await _presence(c.api_urls[1], f"uid:a{unique}")).get("online") is not True or (
        await _presence(c.api_urls[1], f"group:g{unique}")
    ).get("count") != 1:  # each node resyncs at its own next heartbeat
        assert time.monotonic() - t0 < 5, "presence not re-registered within 5 s"
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as http:  # every node healthy again (all links back)
        for node in c.nodes:
            while True:
                async with http.get(f"{node.http_url}/healthz") as r:
                    if r.status == 200:
                        break
                assert time.monotonic() - t0 < 5, f"node{node.index} not healthy again"
                await asyncio.sleep(0.1)
    for node in c.nodes:
        log = node.log()
        assert "broker lost" in log and "broker back" in log, log
    print(f"routing healed {healed:.2f}s after redis was back")


async def test_full_node_refuses_with_503(valkey: EmbeddedRedis, make_cluster: MakeCluster) -> None:
    c = make_cluster(valkey.url, 1, ["--max-connections", "3"])
    conns = [await WS.open(c.ws_urls[0]) for _ in range(3)]
    with pytest.raises(websockets.InvalidStatus) as info:
        await WS.open(c.ws_urls[0])
    assert info.value.response.status_code == 503
    await conns[0].close()
    async with asyncio.timeout(5):  # room again once the node has seen the close
        while True:
            try:
                conns[0] = await WS.open(c.ws_urls[0])
                break
            except websockets.InvalidStatus:
                await asyncio.sleep(0.05)
    for ws in conns:
        await ws.close()


async def test_slow_consumer_closed_1013_others_unaffected(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    c = make_cluster(valkey.url, 2, ["--max-outbox", "262144"])
    g = f"g{unique}"
    # the slow one: a raw socket that completes the handshake, joins, and never reads again
    reader, writer = await _raw_ws(c.nodes[0].port)
    frame = json.dumps({"type": "join", "group": g, "id": 1}).encode()
    mask = b"\x00\x00\x00\x00"
    writer.write(bytes([0x81, 0x80 | len(frame)]) + mask + frame)
    await writer.drain()
    async with asyncio.timeout(5):  # welcome, then the join's ack: it is a member now
        while b'"ack"' not in (await _read_frame(reader))[1]:
            pass
    fast = await WS.open(c.ws_urls[0], f"fast{unique}")
    await fast.ok({"type": "join", "group": g})
    sender = await WS.open(c.ws_urls[1], f"s{unique}")
    await asyncio.sleep(0.3)
    blob = "x" * 8000
    received, n = 0, 2000
    for start in range(0, n, 20):  # 16 MB in all: more than kernel buffers hold
        for i in range(start, start + 20):
            frame = {"type": "send", "to": f"group:{g}", "data": [i, blob]}
            await sender.send_raw(json.dumps(frame))
        for _ in range(20):  # the reading client keeps up and gets everything in order
            msg = await fast.next(10, type="message")
            assert msg["data"][0] == received
            received += 1
    metrics = ""
    async with aiohttp.ClientSession() as http, http.get(f"{c.api_urls[0]}/metrics") as r:
        metrics = await r.text()
    assert 'wscluster_server_closes_total{code="1013"} 1.0' in metrics
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    for ws in (fast, sender):
        await ws.close()


async def test_sigterm_drains(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    c = make_cluster(valkey.url, 2, ["--drain-timeout", "3", "--node-heartbeat", "0.5"])
    clients = [await WS.open(c.ws_urls[1], f"d{i}{unique}") for i in range(5)]
    receiver = await WS.open(c.ws_urls[0], f"r{unique}")  # on the node that stays
    assert (await _presence(c.api_urls[0], f"uid:d0{unique}"))["online"] is True
    # requests in flight when SIGTERM lands still get their answer before the 1012
    busy = clients[0]

    async def flood() -> None:  # keeps sending while the node drains
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(20_000):
                frame = {"type": "send", "to": f"uid:r{unique}", "data": i, "id": i}
                await busy.send_raw(json.dumps(frame))

    flooding = asyncio.create_task(flood())
    await asyncio.sleep(0.05)
    code = await asyncio.to_thread(c.nodes[1].terminate)
    assert code == 0
    await flooding
    answered = set()
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            msg = json.loads(await busy.conn.recv())
            if msg["type"] in ("ack", "error"):
                answered.add(msg["id"])
    for msg in busy.pushed:
        if msg["type"] in ("ack", "error"):
            answered.add(msg["id"])
    # every frame the node read was answered; frames it never read got nothing (the
    # client knows those were not taken)
    assert answered == set(range(len(answered))), "a request was taken but not answered"
    assert len(answered) > 0
    assert busy.conn.close_code == 1012
    for ws in clients[1:]:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.next(5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert "retry_ms" in json.loads(info.value.rcvd.reason)
    delivered: set[int] = set()
    with contextlib.suppress(TimeoutError):
        while True:
            delivered.add((await receiver.next(1, type="message"))["data"])
    assert delivered, "nothing was sent before the drain"
    assert delivered <= answered, f"{len(delivered - answered)} sent but never acked"
    assert (await _presence(c.api_urls[0], f"uid:d0{unique}"))["online"] is False
    assert len((await _stats(c.api_urls[0]))["nodes"]) == 1  # type: ignore[arg-type]
    assert "draining 5 connections" in c.nodes[1].log()


async def test_malformed_storm_does_not_disturb_others(
    cluster: Cluster, unique: str
) -> None:
    g = f"storm{unique}"
    victim = await WS.open(cluster.ws_urls[0], f"v{unique}")
    await victim.ok({"type": "join", "group": g})
    sender = await WS.open(cluster.ws_urls[1], f"s{unique}")
    attackers = [await WS.open(cluster.ws_urls[0]) for _ in range(4)]
    bad = [
        ("{x", "bad_json"), ("[]", "bad_request"), ('{"type": 1}', "bad_request"),
        ('{"type": "nope"}', "unknown_type"), ('{"type": "send", "to": "x", "data": 1}',
                                              "bad_request"),
        ('{"type": "send", "to": "all", "data": 1}', "not_logged_in"),
        ('{"type": "join"}', "bad_request"), ("\"str\"", "bad_request"),
    ]  # fmt: skip
    per = 750  # 3,000 frames in all

    async def storm(ws: WS) -> None:
        for i in range(per):
            await ws.send_raw(bad[i % len(bad)][0])
        for i in range(per):
            err = await ws.next(10, type="error")
            assert err["code"] == bad[i % len(bad)][1], (i, err)

    async def chatter() -> None:
        for i in range(100):
            await sender.ok({"type": "send", "to": f"group:{g}", "data": i})
        for i in range(100):
            assert (await victim.next(10, type="message"))["data"] == i

    await asyncio.gather(chatter(), *(storm(ws) for ws in attackers))
    for ws in attackers:
        assert (await ws.ok({"type": "ping"}))["type"] == "pong"
        await ws.close()
    await victim.close()
    await sender.close()


async def test_repeated_abuse_closes_1008(cluster: Cluster) -> None:
    ws = await WS.open(cluster.ws_urls[2])
    for _ in range(1200):  # over the burst of 1,000 errors
        await ws.send_raw("{x")
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await ws.next(10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_close_without_code_is_answered_1000(cluster: Cluster) -> None:
    reader, writer = await _raw_ws(cluster.nodes[0].port)
    assert (await _read_frame(reader))[0] == 0x1  # welcome
    writer.write(bytes([0x88, 0x80]) + b"\x00\x00\x00\x00")  # masked close, no payload
    opcode, payload = await asyncio.wait_for(_read_frame(reader), 5)
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_unanswered_pings_drop_the_client(
    valkey: EmbeddedRedis, make_cluster: MakeCluster
) -> None:
    c = make_cluster(valkey.url, 1, ["--ping-interval", "1"])
    reader, writer = await _raw_ws(c.nodes[0].port)
    opcodes: list[int] = []
    t0 = time.monotonic()
    async with asyncio.timeout(6):
        while True:
            opcode, payload = await _read_frame(reader)
            opcodes.append(opcode)
            if opcode == 0x8:  # close
                assert int.from_bytes(payload[:2], "big") == 1001
                break
    elapsed = time.monotonic() - t0
    assert opcodes[0] == 0x1  # welcome (text)
    assert 0x9 in opcodes  # the server pinged, we never answered
    assert 1.5 < elapsed < 4, elapsed  # dropped after about two intervals
    assert await reader.read() == b""  # and the TCP link is gone
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_logs_never_contain_bodies(cluster: Cluster, unique: str) -> None:
    secret = f"SECRET-{unique}"
    ws = await WS.open(cluster.ws_urls[0], f"l{unique}")
    await ws.ok({"type": "send", "to": f"uid:l{unique}", "data": secret})
    await ws.send_raw(json.dumps({"type": "send", "to": "x", "data": secret}))
    await ws.send_raw("{" + secret)
    await ws.next(type="error")
    await ws.next(type="error")
    await asyncio.sleep(0.2)
    for node in cluster.nodes:
        assert secret not in node.log()

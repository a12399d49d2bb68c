"""Applications on real node processes: the hooks of tests/cluster/apps/recorder.py (and the
raw-mode rawecho.py) on three nodes over a private valkey. The recorder's on_close pushes
every Closed it receives to ``<namespace>:test:closed``, so the tests count its calls."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from wscluster import Cluster, Code, ProtocolError
from wscluster.embedded import EmbeddedRedis

from .apps.recorder import closed_key, messages_key
from .conftest import Cluster as Nodes
from .conftest import _make
from .wsclient import WS

MakeCluster = Callable[..., Nodes]
REPO = Path(__file__).resolve().parents[2]
RECORDER = ["--app", "tests.cluster.apps.recorder:app"]
RAW = ["--app", "tests.cluster.apps.rawecho:app"]


def _env(redis_url: str) -> dict[str, str]:
    """The nodes import the apps from the repository, whatever pytest's cwd."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "RECORDER_REDIS_URL": redis_url}


@pytest.fixture(scope="module")
def apps(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Three recorder nodes shared by the tests that do not break nodes."""
    extra = [*RECORDER, "--node-heartbeat", "0.5", "--max-session-size", "1024"]
    c = _make(valkey.url, tmp_path_factory.mktemp("apps"), 3, extra, _env(valkey.url))
    yield c
    c.stop()


@pytest.fixture
async def store(valkey: EmbeddedRedis) -> AsyncIterator[Redis]:
    r = Redis.from_url(valkey.url)
    yield r
    await r.aclose()


async def _connect(url: str, **query: str) -> tuple[WS, dict[str, Any]]:
    """Open a connection to a recorder node: (the client, on_connect's greeting)."""
    ws = await WS.open(f"{url}?{urlencode(query)}" if query else url)
    greeting = await ws.next(5, type="message")
    assert greeting["from"] is None and greeting["to"] == f"client:{ws.client_id}"
    assert greeting["data"]["greeting"] is True, greeting
    return ws, greeting["data"]


async def _closed(
    store: Redis, namespace: str, cids: list[str], timeout: float, settle: float = 1.5
) -> dict[str, list[dict[str, Any]]]:
    """The on_close records of each of ``cids`` (waits until each has one, then ``settle``
    seconds more so that a duplicate would show)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(r) for r in await store.lrange(closed_key(namespace), 0, -1)]
        seen = {r["client_id"] for r in records}
        if all(c in seen for c in cids):
            break
        assert time.monotonic() < deadline, f"on_close not fired in {timeout}s: {records}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(settle)
    records = [json.loads(r) for r in await store.lrange(closed_key(namespace), 0, -1)]
    return {c: [r for r in records if r["client_id"] == c] for c in cids}


async def _all(store: Redis, nodes: Nodes) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await store.lrange(closed_key(nodes.namespace), 0, -1)]


async def _get(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status


# --- 1. on_message ----------------------------------------------------------------------
async def test_on_message_results_errors_and_order(apps: Nodes) -> None:
    ws, _ = await _connect(apps.ws_urls[0])
    frame = {"type": "echo", "id": "e1", "x": [1, {"y": None}]}
    assert await ws.request(frame) == {"type": "ack", "id": "e1", "result": frame}

    # an exception: `internal` for that id; the connection and the node carry on
    reply = await ws.request({"type": "boom", "id": 7})
    assert (reply["type"], reply["id"], reply["code"]) == ("error", 7, "internal")
    await ws.send_raw(json.dumps({"type": "boom"}))  # no id: still an error, id null
    reply = await ws.next(5, type="error")
    assert (reply["id"], reply["code"]) == (None, "internal")
    assert (await ws.ok({"type": "echo", "id": 8}))["result"] == {"type": "echo", "id": 8}
    assert await _get(f"{apps.nodes[0].http_url}/healthz") == 200
    # AppError answers its own code
    reply = await ws.request({"type": "nosuch", "id": 9})
    assert (reply["type"], reply["id"], reply["code"]) == ("error", 9, "unknown_type")

    # 50 frames at once, the first one slow: answered in frame order
    frames = [{"type": "slow", "id": 1000, "seconds": 0.3}]
    frames += [{"type": "echo", "id": 1000 + i, "n": i} for i in range(1, 50)]
    for f in frames:
        await ws.send_raw(json.dumps(f))
    answers = [await ws.next(10) for _ in frames]
    assert [a["type"] for a in answers] == ["ack"] * 50, answers
    assert [a["id"] for a in answers] == list(range(1000, 1050))
    assert answers[0]["result"] == {"slept": 0.3}
    assert [a["result"]["n"] for a in answers[1:]] == list(range(1, 50))

    # core frames stay core
    assert await ws.request({"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}
    assert await ws.request({"type": "leave", "id": "l", "group": "nothing"}) == {
        "type": "ack", "id": "l"}  # fmt: skip


# --- 2. on_handshake / on_connect ---------------------------------------------------------
async def test_handshake_reject_state_and_connect_bind(apps: Nodes, unique: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(f"{apps.ws_urls[0]}?deny=1&user=x", compression=None)
    assert refused.value.response.status_code == 403

    user, room = f"u{unique}", f"r{unique}"
    ws, greeting = await _connect(apps.ws_urls[0], user=user, room=room, color="blue")
    assert ws.welcome["uid"] is None  # the app binds in on_connect, after `welcome`
    state = {"query": {"user": user, "room": room, "color": "blue"}, "connected": True}
    assert greeting == {"greeting": True, "client_id": ws.client_id, "uid": user,
                        "groups": [room], "state": state}  # fmt: skip
    who = (await ws.ok({"type": "whoami"}))["result"]
    assert who == {"client_id": ws.client_id, "node": ws.welcome["node"], "uid": user,
                   "groups": [room], "state": state}  # fmt: skip

    # the greeting came after the bind's barrier: sends from other nodes reach the uid/room
    sender = await WS.open(apps.ws_urls[1], f"s{unique}")
    await sender.ok({"type": "send", "to": f"uid:{user}", "data": {"n": 1}})
    await sender.ok({"type": "send", "to": f"group:{room}", "data": {"n": 2}})
    relay, _ = await _connect(apps.ws_urls[2])
    await relay.ok({"type": "relay", "to": f"uid:{user}", "data": {"n": 3}})
    got = [await ws.next(5, type="message") for _ in range(3)]
    assert sorted(m["data"]["n"] for m in got) == [1, 2, 3]
    by_n = {m["data"]["n"]: m for m in got}
    assert by_n[1]["from"] == {"uid": f"s{unique}", "client_id": sender.client_id}
    assert by_n[2]["to"] == f"group:{room}"
    assert by_n[3]["from"] is None and by_n[3]["to"] == f"uid:{user}"


async def test_frames_before_welcome_wait_for_on_connect(apps: Nodes, unique: str) -> None:
    """on_handshake sets the uid: `welcome` waits for its bind; frames the client sends
    meanwhile reach on_message after on_connect, and are answered after `welcome`."""
    user = f"h{unique}"
    url = f"{apps.ws_urls[0]}?{urlencode({'huid': user, 'room': f'r{unique}'})}"
    async with websockets.connect(url, compression=None) as ws:
        await ws.send(json.dumps({"type": "whoami", "id": 1}))
        await ws.send(json.dumps({"type": "echo", "id": 2}))
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(4)]
    assert [g["type"] for g in got] == ["welcome", "message", "ack", "ack"], got
    welcome, greeting, who, echo = got
    cid = welcome["client_id"]
    assert welcome["uid"] == user
    assert (greeting["data"]["uid"], greeting["data"]["groups"]) == (user, [f"r{unique}"])
    assert (who["id"], who["result"]["client_id"], who["result"]["uid"]) == (1, cid, user)
    assert who["result"]["groups"] == [f"r{unique}"]
    assert echo == {"type": "ack", "id": 2, "result": {"type": "echo", "id": 2}}


async def test_frames_of_a_connection_on_connect_refuses_never_reach_on_message(
    apps: Nodes, store: Redis
) -> None:
    """The documented refusal: on_connect awaits a check, then closes 1008. Frames the
    client sent meanwhile (queued behind on_connect) must not reach on_message."""
    async with websockets.connect(f"{apps.ws_urls[0]}?ban=1", compression=None) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["type"] == "welcome"
        await ws.send(json.dumps({"type": "record", "id": 1}))
        await ws.send(json.dumps({"type": "record"}))
        with pytest.raises(websockets.ConnectionClosed):
            frame = await asyncio.wait_for(ws.recv(), 5)
            raise AssertionError(f"unexpected frame {frame!r}")
        assert ws.close_code == 1008
    await asyncio.sleep(0.5)
    recorded = await store.lrange(messages_key(apps.namespace), 0, -1)
    assert welcome["client_id"].encode() not in recorded


# --- 3. on_close: exactly once ------------------------------------------------------------
async def test_on_close_once_for_client_close_and_kicks(
    apps: Nodes, store: Redis, unique: str
) -> None:
    pids = [n.proc.pid for n in apps.nodes if n.proc is not None]
    user = f"u{unique}"
    normal, _ = await _connect(apps.ws_urls[1], user=user, room=f"r{unique}")
    await normal.ok({"type": "setsess", "values": {"cart": [1, 2]}})
    kicked_api, _ = await _connect(apps.ws_urls[2], tag="api")
    kicked_app, _ = await _connect(apps.ws_urls[1], tag="app")
    kicker, _ = await _connect(apps.ws_urls[0])

    await normal.close()
    assert normal.conn.close_code == 1000
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{apps.api_urls[0]}/api/close", json={"to": f"client:{kicked_api.client_id}"}
        ) as r,
    ):
        assert r.status == 200
    await kicker.ok({"type": "kick", "to": f"client:{kicked_app.client_id}"})
    for ws in (kicked_api, kicked_app):
        await asyncio.wait_for(ws.conn.wait_closed(), 5)
        assert ws.conn.close_code == 4001

    cids = [normal.client_id, kicked_api.client_id, kicked_app.client_id]
    records = await _closed(store, apps.namespace, cids, timeout=10)
    assert [len(records[c]) for c in cids] == [1, 1, 1], records
    (rn,), (ra,), (rk,) = (records[c] for c in cids)
    assert rn == {"client_id": normal.client_id, "code": 1000, "node_died": False,
                  "session": {"cart": [1, 2]}, "uid": user, "groups": [f"r{unique}"],
                  "state": {"query": {"user": user, "room": f"r{unique}"}, "connected": True},
                  "pid": pids[1]}  # fmt: skip
    assert (ra["code"], ra["node_died"], ra["pid"], ra["uid"]) == (4001, False, pids[2], None)
    assert ra["state"] == {"query": {"tag": "api"}, "connected": True}
    assert (rk["code"], rk["node_died"], rk["pid"], rk["session"]) == (4001, False, pids[1], {})
    assert kicker.client_id not in {r["client_id"] for r in await _all(store, apps)}


async def test_on_close_once_for_connections_of_a_killed_node(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, store: Redis, unique: str
) -> None:
    c = make_cluster(valkey.url, 3, [*RECORDER, "--node-heartbeat", "0.5", "--node-ttl", "2"],
                     _env(valkey.url))  # fmt: skip
    pids = [n.proc.pid for n in c.nodes if n.proc is not None]
    survivor, _ = await _connect(c.ws_urls[0], user=f"s{unique}")
    victims = [
        (await _connect(c.ws_urls[2], user=f"v{i}{unique}", room=f"r{unique}"))[0] for i in range(3)
    ]
    anonymous, _ = await _connect(c.ws_urls[2])
    victims.append(anonymous)
    for i, v in enumerate(victims):
        await v.ok({"type": "setsess", "values": {"i": i, "name": f"v{i}"}})
    await victims[0].ok({"type": "setsess", "values": {"name": None, "extra": [True]}})

    c.kill(2)
    cids = [v.client_id for v in victims]
    # TTL 2 s + a few heartbeats of 0.5 s, with room for a busy machine
    records = await _closed(store, c.namespace, cids, timeout=20, settle=2.0)
    assert [len(records[cid]) for cid in cids] == [1, 1, 1, 1], records
    fired_by = {records[cid][0]["pid"] for cid in cids}
    assert len(fired_by) == 1 and fired_by <= {pids[0], pids[1]}, (fired_by, pids)
    for i, v in enumerate(victims):
        (r,) = records[v.client_id]
        assert (r["code"], r["node_died"], r["state"]) == (1006, True, {})
        uid, groups = (f"v{i}{unique}", [f"r{unique}"]) if i < 3 else (None, [])
        assert (r["uid"], r["groups"]) == (uid, groups)
        session = {"i": 0, "extra": [True]} if i == 0 else {"i": i, "name": f"v{i}"}
        assert r["session"] == session
    assert survivor.client_id not in {r["client_id"] for r in await _all(store, c)}
    assert (await survivor.ok({"type": "echo", "id": "after"}))["result"]["id"] == "after"


def _silent_client(port: int, query: str) -> tuple[socket.socket, str]:
    """A WebSocket client that reads its welcome and then nothing more: it never answers
    the server's close frame (a dead phone). Returns the socket and its client id."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    data = b""
    while True:
        data += sock.recv(4096)
        head, sep, frame = data.partition(b"\r\n\r\n")
        if sep and len(frame) >= 2 and len(frame) >= 2 + frame[1]:
            break  # the welcome is one unmasked text frame of < 126 bytes
    assert head.startswith(b"HTTP/1.1 101"), head
    welcome = json.loads(frame[2 : 2 + frame[1]])
    return sock, welcome["client_id"]


async def test_on_close_fires_at_sigterm_for_clients_that_never_answer(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, store: Redis
) -> None:
    """A drain closes with 1012; clients that never answer are cut when the node stops. The
    on_close handlers of those connections start at the stop: they must run to the end
    (within the 5 s the node gives them), not be cancelled as soon as they were queued."""
    c = make_cluster(valkey.url, 1, [*RECORDER, "--drain-timeout", "1"], _env(valkey.url))
    clients = [_silent_client(c.nodes[0].port, "close_delay=0.3") for _ in range(5)]
    try:
        assert c.nodes[0].terminate() == 0
        records = await _closed(store, c.namespace, [cid for _, cid in clients], timeout=5,
                                settle=0.2)  # fmt: skip
        assert [len(r) for r in records.values()] == [1] * len(clients), records
    finally:
        for sock, _ in clients:
            sock.close()


# --- 4. sessions across nodes -------------------------------------------------------------
async def test_sessions_across_nodes(apps: Nodes, valkey: EmbeddedRedis, unique: str) -> None:
    a, _ = await _connect(apps.ws_urls[0], user=f"u{unique}")
    await a.ok({"type": "setsess", "values": {"cart": [1, 2], "step": 1}})
    async with Cluster(valkey.url, namespace=apps.namespace, max_session_size=1024) as api:
        assert await api.get_session(a.client_id) == {"cart": [1, 2], "step": 1}
        assert await api.update_session(a.client_id, {"step": 2, "coupon": "X"}) is True
        got = (await a.ok({"type": "getsess"}))["result"]
        assert got == {"session": {"cart": [1, 2], "step": 2, "coupon": "X"}}
        assert await api.update_session(a.client_id, {"coupon": None}) is True
        got = (await a.ok({"type": "getsess"}))["result"]
        assert got == {"session": {"cart": [1, 2], "step": 2}}
        assert await api.set_session(a.client_id, {"only": 1}) is True
        assert (await a.ok({"type": "getsess"}))["result"] == {"session": {"only": 1}}

        unknown = f"{a.welcome['node']}.fffff"
        assert await api.set_session(unknown, {"x": 1}) is False
        assert await api.update_session(unknown, {"x": 1}) is False
        assert await api.get_session(unknown) is None

        # over --max-session-size (1024): the handler's ProtocolError answers too_large
        reply = await a.request({"type": "setsess", "id": "big", "values": {"big": "x" * 2000}})
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "big", "too_large")
        with pytest.raises(ProtocolError) as exc:
            await api.update_session(a.client_id, {"big": "x" * 2000})
        assert exc.value.code is Code.TOO_LARGE
        assert await api.get_session(a.client_id) == {"only": 1}

        await a.close()
        deadline = time.monotonic() + 10
        while await api.get_session(a.client_id) is not None:
            assert time.monotonic() < deadline, "session still readable after close"
            await asyncio.sleep(0.1)
        assert await api.set_session(a.client_id, {"x": 1}) is False


# --- 5. the cluster API from another process, and from another node's handler --------------
async def test_cluster_api_bind_join_from_other_process(
    apps: Nodes, valkey: EmbeddedRedis, unique: str
) -> None:
    b, _ = await _connect(apps.ws_urls[1])
    group, user = f"g{unique}", f"u{unique}"
    async with Cluster(valkey.url, namespace=apps.namespace, timeout=1) as api:
        assert await api.join(b.client_id, group) is True
        await api.send(f"group:{group}", {"n": 1})  # right after: the join was a barrier
        msg = await b.next(5, type="message")
        assert (msg["to"], msg["from"], msg["data"]) == (f"group:{group}", None, {"n": 1})
        assert await api.bind_uid(b.client_id, user) is True
        await api.send(f"uid:{user}", {"n": 2})
        assert (await b.next(5, type="message"))["data"] == {"n": 2}
        who = (await b.ok({"type": "whoami"}))["result"]
        assert (who["uid"], who["groups"]) == (user, [group])
        assert await api.is_online(user) is True

        assert await api.leave(b.client_id, group) is True
        assert await api.unbind_uid(b.client_id) is True
        await api.send(f"group:{group}", {"n": 3})
        await api.send(f"uid:{user}", {"n": 4})
        await api.send(f"client:{b.client_id}", {"n": 5})
        assert (await b.next(5, type="message"))["data"] == {"n": 5}
        await b.nothing(0.5)
        who = (await b.ok({"type": "whoami"}))["result"]
        assert (who["uid"], who["groups"]) == (None, [])
        # idempotent, like the client's own leave/logout
        assert await api.leave(b.client_id, group) is True
        assert await api.unbind_uid(b.client_id) is True

        unknown = f"{b.welcome['node']}.fffff"  # well formed, its node alive
        assert await api.join(unknown, group) is False
        assert await api.bind_uid(unknown, user) is False
        with pytest.raises(ProtocolError) as exc:
            await api.join("not-a-client-id", group)
        assert exc.value.code is Code.BAD_REQUEST
        t0 = time.monotonic()
        with pytest.raises(ProtocolError) as exc:  # nobody answers for that node
            await api.join("nosuchnode-0badc0de.1", group)
        assert exc.value.code is Code.UNAVAILABLE
        assert time.monotonic() - t0 >= 0.9
        # a timed-out request leaves the client usable (and, for the broker's idle PING,
        # not idle when it closes: see test_cluster_closes_after_a_control_timeout)
        assert await api.join(b.client_id, group) is True
        await api.send(f"group:{group}", {"n": 6})
        assert (await b.next(5, type="message"))["data"] == {"n": 6}


async def test_cluster_closes_after_a_control_timeout(apps: Nodes, valkey: EmbeddedRedis) -> None:
    """Regression: closing right after a timed-out control request (when the broker's idle
    PING coincides with the 1 s timeout) used to hang: redis-py's wait_for swallowed the
    cancel of the publisher, which looped on. Close now cancels until the tasks are done."""
    for _ in range(3):
        api = Cluster(valkey.url, namespace=apps.namespace, timeout=1)
        await api.start()
        with pytest.raises(ProtocolError) as exc:
            await api.join("nosuchnode-0badc0de.1", "g")
        assert exc.value.code is Code.UNAVAILABLE
        async with asyncio.timeout(5):
            await api.aclose()


async def test_cluster_api_from_an_app_handler(
    apps: Nodes, valkey: EmbeddedRedis, unique: str
) -> None:
    a, _ = await _connect(apps.ws_urls[0])
    b, _ = await _connect(apps.ws_urls[1])
    group, user = f"g{unique}", f"u{unique}"

    async def control(action: str, cid: str, arg: str = "") -> Any:
        reply = await a.ok({"type": "control", "action": action, "cid": cid, "arg": arg})
        return reply["result"]["ok"]

    async with Cluster(valkey.url, namespace=apps.namespace) as api:
        assert await control("join", b.client_id, group) is True  # b is on another node
        await api.send(f"group:{group}", {"n": 1})
        assert (await b.next(5, type="message"))["data"] == {"n": 1}
        assert await control("bind", b.client_id, user) is True
        await api.send(f"uid:{user}", {"n": 2})
        assert (await b.next(5, type="message"))["data"] == {"n": 2}
        assert await control("join", a.client_id, group) is True  # its own node: local
        await api.send(f"group:{group}", {"n": 3})
        assert (await a.next(5, type="message"))["data"] == {"n": 3}
        assert (await b.next(5, type="message"))["data"] == {"n": 3}

        assert await control("leave", b.client_id, group) is True
        assert await control("unbind", b.client_id) is True
        await api.send(f"group:{group}", {"n": 4})
        await api.send(f"uid:{user}", {"n": 5})
        assert (await a.next(5, type="message"))["data"] == {"n": 4}
        await b.nothing(0.5)
        assert await control("join", f"{b.welcome['node']}.fffff", group) is False
        assert await control("join", f"{a.welcome['node']}.fffff", group) is False


# --- 6. raw mode --------------------------------------------------------------------------
async def test_raw_app(valkey: EmbeddedRedis, make_cluster: MakeCluster) -> None:
    c = make_cluster(valkey.url, 2, RAW, _env(valkey.url))
    conns = [await websockets.connect(url, compression=None) for url in c.ws_urls]
    try:
        one, two = conns
        with pytest.raises(TimeoutError):  # no welcome
            await asyncio.wait_for(one.recv(), 0.5)
        await one.send("hello")
        assert await asyncio.wait_for(one.recv(), 5) == "text:hello"
        await one.send("{not json")  # just text here: no error frame
        assert await asyncio.wait_for(one.recv(), 5) == "text:{not json"
        await one.send('{"type": "ping", "id": 1}')  # not core either
        assert await asyncio.wait_for(one.recv(), 5) == 'text:{"type": "ping", "id": 1}'
        await one.send(b"\x00\xffbin")
        assert await asyncio.wait_for(one.recv(), 5) == b"bytes:\x00\xffbin"
        await one.send("json")
        assert json.loads(await asyncio.wait_for(one.recv(), 5)) == {"json": True}
        # send_verbatim to a connection on the other node
        await two.send("whoami")
        cid = await asyncio.wait_for(two.recv(), 5)
        assert isinstance(cid, str)
        await one.send(f"push {cid} as-is {{}}")
        assert await asyncio.wait_for(one.recv(), 5) == "pushed"
        assert await asyncio.wait_for(two.recv(), 5) == "as-is {}"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(one.recv(), 0.3)
    finally:
        await asyncio.gather(*(ws.close() for ws in conns))

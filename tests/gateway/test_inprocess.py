"""Several nodes in one process over the in-memory broker and presence: the fast path for
application tests, and a check that the node only depends on the Broker/Presence roles."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import websockets

from wscluster import App, Conn, Request
from wscluster.config import NodeConfig
from wscluster.embedded import free_port
from wscluster.errors import PresenceUnavailable
from wscluster.node import Node

from ..cluster.wsclient import WS, close_all


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    hub = f"memory://{uuid.uuid4().hex[:8]}"
    made = []
    for _ in range(2):
        cfg = NodeConfig(host="127.0.0.1", port=free_port(), api_port=free_port(), broker=hub,
                         anonymous=True, node_heartbeat=0.2, node_ttl=1.0)  # fmt: skip
        node = Node(cfg)
        await node.start()
        made.append(node)
    yield made
    await close_all()
    for node in made:
        if not node.draining:
            await node.stop()


def url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.config.port}/ws"


async def test_two_nodes_in_one_process(nodes: list[Node]) -> None:
    a = await WS.open(url(nodes[0]), "alice")
    b = await WS.open(url(nodes[1]), "bob")
    await b.ok({"type": "join", "group": "g"})
    await a.ok({"type": "send", "to": "uid:bob", "data": 1})
    assert (await b.next(type="message"))["data"] == 1
    await a.ok({"type": "send", "to": "group:g", "data": 2})
    assert (await b.next(type="message"))["data"] == 2
    assert (await a.ok({"type": "presence", "to": "group:g"}))["uids"] == ["bob"]
    api = nodes[0].cluster
    await api.send(f"client:{b.client_id}", "direct")
    assert (await b.next(type="message"))["data"] == "direct"
    assert await api.is_online("alice")


async def test_drain_in_process(nodes: list[Node]) -> None:
    a = await WS.open(url(nodes[0]), "alice")
    nodes[0].config.drain_timeout = 1.0
    await nodes[0].drain()
    assert len(nodes[0].registry) == 0
    assert await _closed_code(a) == 1012
    other = await WS.open(url(nodes[1]))
    assert (await other.ok({"type": "presence", "to": "uid:alice"}))["online"] is False


async def _closed_code(ws: WS) -> int | None:
    with pytest.raises(websockets.ConnectionClosed):
        await ws.next(2)
    return ws.conn.close_code


async def test_a_failed_request_never_undoes_a_later_one(nodes: list[Node]) -> None:
    """The rollback of a failed join/login runs only if nothing changed the connection
    since; otherwise the later request's state (already acked) is kept."""
    a = await WS.open(url(nodes[0]), "alice")
    node = nodes[0]
    entry = node.registry.get(a.client_id)
    assert entry is not None
    undone: list[str] = []
    stale = node.ops._undo(entry.conn, lambda: undone.append("stale"))
    fresh = node.ops._undo(entry.conn, lambda: undone.append("fresh"))
    fresh()  # nothing happened since: it runs
    await a.ok({"type": "join", "group": "later"})  # a later request changes the entry
    stale()  # must not run now
    assert undone == ["fresh"]
    assert "later" in entry.groups


async def test_join_while_the_broker_is_down_changes_nothing(nodes: list[Node]) -> None:
    node = nodes[0]
    a = await WS.open(url(node), "alice")
    node.broker.hub.set_down(True)  # type: ignore[attr-defined]
    try:
        err = await a.request({"type": "join", "group": "g"}, timeout=15)  # waits ~5 s
        assert err["type"] == "error" and err["code"] == "unavailable"
        entry = node.registry.get(a.client_id)
        assert entry is not None and entry.groups == set()
        assert "g" not in set(node.registry.groups())
        sent = await a.request({"type": "send", "to": "uid:alice", "data": 1})
        assert sent["code"] == "unavailable"
        left = await a.request({"type": "leave", "group": "g"})  # always acked
        assert left["type"] == "ack"
    finally:
        node.broker.hub.set_down(False)  # type: ignore[attr-defined]
    await a.ok({"type": "join", "group": "g"}, timeout=10)  # works again once it is back


# --- review regressions: applications, tokens, limits (one node, in process) --------------
SECRET = "in-process-test-secret-0123456789abcdef"


async def _node(app: App | None = None, hub: str | None = None, **options: Any) -> Node:
    cfg = NodeConfig(host="127.0.0.1", port=free_port(), api_port=free_port(),
                     broker=hub or f"memory://{uuid.uuid4().hex[:8]}", node_heartbeat=0.2,
                     node_ttl=1.0, **options)  # fmt: skip
    node = Node(cfg, app)
    await node.start()
    return node


@pytest.fixture
async def own() -> AsyncIterator[list[Node]]:
    """Nodes a test makes with ``_node`` (append them), stopped afterwards."""
    made: list[Node] = []
    yield made
    await close_all()
    for node in made:
        if not node.draining:
            await node.stop()


def _token(sub: str, ttl: float = 3600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


def _slow_client_ids(node: Node, delay: float) -> None:
    """Presence reads of a uid's connections (the per-uid limit) take ``delay`` seconds."""
    real = node.presence.client_ids

    async def slow(uid: str) -> list[str]:
        await asyncio.sleep(delay)
        return await real(uid)

    node.presence.client_ids = slow  # type: ignore[method-assign]


async def test_frames_of_a_connection_refused_before_welcome_never_reach_on_message(
    own: list[Node],
) -> None:
    """Over the per-uid limit (counted after the upgrade), the connection is closed 1008
    before its welcome: on_connect does not run, and neither may on_message for the frames
    the client sent meanwhile."""
    app = App()
    calls: list[str] = []

    @app.on_handshake
    def handshake(request: Request) -> None:
        request.uid = request.query.get("u")

    @app.on_connect
    def connect(conn: Conn) -> None:
        calls.append("on_connect")

    @app.on_message
    def message(conn: Conn, frame: dict[str, Any]) -> None:
        calls.append(f"on_message {frame['type']}")

    hub = f"memory://{uuid.uuid4().hex[:8]}"
    other = await _node(app, hub, anonymous=True, max_connections_per_uid=1)
    node = await _node(app, hub, anonymous=True, max_connections_per_uid=1)
    own += [other, node]
    first = await WS.open(f"{url(other)}?u=alice")  # the limit is reached on another node
    calls.clear()
    _slow_client_ids(node, 0.3)  # the refusal comes after the frame below arrived
    conn = await websockets.connect(f"{url(node)}?u=alice", compression=None)
    await conn.send(json.dumps({"type": "steal", "id": 1}))
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            frame = json.loads(await asyncio.wait_for(conn.recv(), 5))
            assert frame["type"] != "welcome", frame
    assert conn.close_code == 1008
    await asyncio.sleep(0.2)
    assert calls == []
    assert (await first.ok({"type": "ping"}))["type"] == "pong"


async def test_login_refresh_finishing_after_the_close_leaves_no_timer(own: list[Node]) -> None:
    """A `login` whose barrier ends after the connection closed must not arm a new expiry
    timer: it would keep the closed connection in memory until the token's exp."""
    node = await _node(jwt_secret=SECRET)
    own.append(node)
    _slow_client_ids(node, 0.3)
    ws = await WS.open(f"{url(node)}?token={_token('alice')}")
    entry = node.registry.get(ws.client_id)
    assert entry is not None
    conn = entry.conn
    await ws.send_raw(json.dumps({"type": "login", "token": _token("bob"), "id": 1}))
    await ws.close()
    await asyncio.sleep(0.6)
    assert conn.closing
    assert conn.expiry is not None and conn.expiry.cancelled()


async def test_login_failing_on_the_uid_limit_read_changes_nothing(own: list[Node]) -> None:
    """The per-uid limit is read after the bind: when that read fails (`unavailable`), the
    login is undone like any failed login."""
    node = await _node(anonymous=True, max_connections_per_uid=5)
    own.append(node)
    a = await WS.open(url(node), "alice")

    async def down(uid: str) -> list[str]:
        raise PresenceUnavailable("down (test)")

    node.presence.client_ids = down  # type: ignore[method-assign]
    err = await a.request({"type": "login", "uid": "bob"})
    assert (err["type"], err["code"]) == ("error", "unavailable")
    entry = node.registry.get(a.client_id)
    assert entry is not None and entry.uid == "alice"
    assert node.registry.uid_size("bob") == 0


async def test_conn_close_codes_and_reasons(own: list[Node]) -> None:
    """Conn.close refuses codes that may not be sent; a long reason is cut at a character
    boundary (a cut inside a UTF-8 sequence makes clients fail the connection: 1006)."""
    app = App()

    @app.on_message
    def message(conn: Conn, frame: dict[str, Any]) -> None:
        conn.close(frame["code"], frame.get("reason", ""))

    node = await _node(app, anonymous=True)
    own.append(node)
    ws = await WS.open(url(node))
    for code in (1005, 1006, 1015, 999, 2000, 5000):
        reply = await ws.request({"type": "close", "code": code})
        assert (reply["type"], reply["code"]) == ("error", "internal"), (code, reply)
    reason = "a" + "账号已被封禁" * 10  # 181 bytes: byte 120 falls inside a character
    await ws.send_raw(json.dumps({"type": "close", "code": 4003, "reason": reason}))
    await asyncio.wait_for(ws.conn.wait_closed(), 5)
    assert ws.conn.close_code == 4003
    got = ws.conn.close_reason
    assert reason.startswith(got) and len(got.encode()) == 118  # "a" + 39 whole characters


async def test_picows_connection_logs_are_filtered(
    own: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    """picows logs every connection at INFO through per-connection child loggers: none of
    those records may reach the node's log (a client could flood it)."""
    node = await _node(anonymous=True)
    own.append(node)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        ws = await WS.open(url(node))
        await ws.close()
    await asyncio.sleep(0.1)
    noise = [r.getMessage() for r in caplog.records if r.name.startswith("picows")]
    assert noise == []


async def test_on_message_result_that_is_not_json_answers_internal(own: list[Node]) -> None:
    """Every frame with an id gets exactly one answer: a result that cannot be encoded is
    the handler's failure (`internal`), not a silently missing ack."""
    app = App()

    @app.on_message
    def message(conn: Conn, frame: dict[str, Any]) -> Any:
        return object() if frame["type"] == "odd" else {"ok": True}

    node = await _node(app, anonymous=True)
    own.append(node)
    ws = await WS.open(url(node))
    reply = await ws.request({"type": "odd", "id": "o"}, timeout=3)
    assert (reply["type"], reply["id"], reply["code"]) == ("error", "o", "internal")
    assert (await ws.ok({"type": "fine", "id": "f"}))["result"] == {"ok": True}


async def test_core_frames_before_the_welcome_wait_for_it(own: list[Node]) -> None:
    """While a connection's uid is being bound and counted, core frames (but ping) are
    refused `not_logged_in`: a connection about to be refused over the per-uid limit must
    not act as that uid meanwhile. Its welcome then carries the uid."""
    app = App()

    @app.on_handshake
    def handshake(request: Request) -> None:
        request.uid = request.query.get("u")

    node = await _node(app, anonymous=True, max_connections_per_uid=5)
    own.append(node)
    _slow_client_ids(node, 0.5)
    conn = await websockets.connect(f"{url(node)}?u=alice", compression=None)
    try:
        await conn.send(json.dumps({"type": "send", "to": "all", "data": 1, "id": 1}))
        await conn.send(json.dumps({"type": "ping", "id": 2}))
        got = [json.loads(await asyncio.wait_for(conn.recv(), 5)) for _ in range(3)]
        assert got[0] == {"type": "error", "id": 1, "code": "not_logged_in",
                          "message": "wait for the welcome"}  # fmt: skip
        assert got[1] == {"type": "pong", "id": 2}
        assert got[2]["type"] == "welcome" and got[2]["uid"] == "alice"
        await conn.send(json.dumps({"type": "send", "to": "uid:alice", "data": 2, "id": 3}))
        frames = [json.loads(await asyncio.wait_for(conn.recv(), 5)) for _ in range(2)]
        assert {f["type"] for f in frames} == {"ack", "message"}
    finally:
        await conn.close()


async def test_raw_app_refreshes_a_token(own: list[Node]) -> None:
    """A raw-mode client cannot send a core login: the app adopts its new token with
    Conn.refresh (claims, expiry); a bad token is forbidden and changes nothing."""
    app = App(raw=True)

    @app.on_message
    def message(conn: Conn, data: str) -> str:
        try:
            claims = conn.refresh(data)
        except Exception as exc:
            return f"refused {getattr(exc, 'code', '')}"
        assert conn.claims == claims
        return f"ok {claims['sub']} {claims['exp']}"

    node = await _node(app, jwt_secret=SECRET)
    own.append(node)
    conn = await websockets.connect(f"{url(node)}?token={_token('alice', ttl=2)}",
                                    compression=None)  # fmt: skip
    try:
        fresh = _token("alice", ttl=600)
        await conn.send(fresh)
        reply = await asyncio.wait_for(conn.recv(), 5)
        assert isinstance(reply, str) and reply.startswith("ok alice ")
        await conn.send("not.a.token")
        assert await asyncio.wait_for(conn.recv(), 5) == "refused forbidden"
        await asyncio.sleep(2.5)  # past the first token's exp: still open
        await conn.send(fresh)
        assert (await asyncio.wait_for(conn.recv(), 5)).startswith("ok alice")
    finally:
        await conn.close()


async def test_core_frames_wait_for_on_connect(own: list[Node]) -> None:
    """A client's first `send` to the group its on_connect joins is not refused: core frames
    wait until on_connect has run (ping does not)."""
    app = App()

    @app.on_connect
    async def connect(conn: Conn) -> None:
        await asyncio.sleep(0.3)  # e.g. a database lookup
        await conn.join("lobby")

    node = await _node(app, jwt_secret=SECRET)  # JWT policy: only joined groups
    own.append(node)
    ws = await WS.open(f"{url(node)}?token={_token('alice')}")
    await ws.send_raw(json.dumps({"type": "send", "to": "group:lobby", "data": 1, "id": 1}))
    await ws.send_raw(json.dumps({"type": "ping", "id": 2}))
    first = json.loads(await asyncio.wait_for(ws.conn.recv(), 5))
    assert first == {"type": "pong", "id": 2}  # not held
    got = [json.loads(await asyncio.wait_for(ws.conn.recv(), 5)) for _ in range(2)]
    assert {g["type"] for g in got} == {"ack", "message"}, got
    count = await ws.ok({"type": "presence", "to": "group:lobby"})
    assert count["count"] == 1

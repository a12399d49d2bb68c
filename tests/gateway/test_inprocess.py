"""Several nodes in one process over the in-memory broker and presence: the fast path for
application tests, and a check that the node only depends on the Broker/Presence roles."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import websockets

from wscluster.config import NodeConfig
from wscluster.embedded import free_port
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

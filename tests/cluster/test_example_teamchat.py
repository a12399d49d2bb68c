"""examples/teamchat on two real JWT nodes: every hook of the app across nodes (the
handshake's 426, `online`/`offline` in the lobby, `typing`, `whois`, the `all` policy), and
the `offline` a survivor announces for the connections of a killed node."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

REPO = Path(__file__).resolve().parents[2]
SECRET = "teamchat-test-secret-0123456789abcdefghi"  # 40 characters
assert len(SECRET) == 40
ARGS = ["--app", "examples.teamchat.app:app", "--jwt-secret", SECRET,
        "--node-heartbeat", "0.5", "--node-ttl", "2"]  # fmt: skip


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


@pytest.fixture
def nodes(valkey: EmbeddedRedis, make_cluster: Callable[..., Cluster]) -> Cluster:
    # the nodes import `examples` from the repository, whatever pytest's cwd
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return make_cluster(valkey.url, 2, ARGS, {"PYTHONPATH": path})


async def chat(nodes: Cluster, i: int, uid: str, device: str = "") -> WS:
    """A teamchat client on node i whose on_connect has run: core frames wait for it, so
    the ack of `presence` means it is in the lobby and has announced itself."""
    url = f"{nodes.ws_urls[i]}?v=2&token={token(uid)}"
    ws = await WS.open(url, user_agent_header=device or f"teamchat-test ({uid})")
    assert ws.welcome["uid"] == uid
    await ws.ok({"type": "presence", "to": f"uid:{uid}"})
    return ws


async def lobby(ws: WS, timeout: float = 5) -> Any:
    """The data of the next `message` frame, which must be an app's push to the lobby."""
    msg = await ws.next(timeout, type="message")
    assert (msg["to"], msg["from"]) == ("group:lobby", None), msg
    return msg["data"]


async def error(ws: WS, frame: dict[str, Any], code: str) -> str:
    reply = await ws.request(frame)
    assert (reply["type"], reply["code"]) == ("error", code), reply
    return str(reply["message"])


async def refused(url: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        conn = await websockets.connect(url, compression=None)
        await conn.close()  # not reached when refused as expected
    return info.value.response.status_code, bytes(info.value.response.body)


async def test_handshake_needs_v2(nodes: Cluster) -> None:
    url = nodes.ws_urls[1]
    for query in (f"token={token('old')}", f"v=1&token={token('old')}"):
        status, body = await refused(f"{url}?{query}")
        assert (status, body) == (426, b'{"error":"upgrade your app: connect with ?v=2"}')
    status, _ = await refused(f"{url}?v=2")  # the token is checked before the app's hook
    assert status == 401
    # a first frame right after `welcome` waits for on_connect: `lobby` is joined by then
    ws = await WS.open(f"{nodes.ws_urls[1]}?v=2&token={token('new')}")
    assert (await ws.ok({"type": "typing", "room": "lobby"}))["result"] is None


async def test_online_typing_and_whois_across_nodes(nodes: Cluster) -> None:
    bob = await chat(nodes, 1, "bob", "TeamChat/2.0 (Linux; Android 14)")
    before = int(time.time())
    alice = await chat(nodes, 0, "alice", "TeamChat/2.1 (iPhone)")
    assert await lobby(bob) == {"event": "online", "uid": "alice"}
    await alice.nothing()  # bob came first; her own `online` excluded her
    admin = await chat(nodes, 0, "admin")
    assert await lobby(alice) == {"event": "online", "uid": "admin"}
    assert await lobby(bob) == {"event": "online", "uid": "admin"}
    await admin.nothing()

    # typing: to the room's other members, on any node
    assert (await alice.ok({"type": "typing", "room": "lobby"}))["result"] is None
    assert await lobby(bob) == {"typing": "alice", "room": "lobby"}
    assert await lobby(admin) == {"typing": "alice", "room": "lobby"}
    await alice.nothing()
    await error(alice, {"type": "typing", "room": "ops"}, "forbidden")
    await error(alice, {"type": "typing"}, "forbidden")
    await alice.ok({"type": "join", "group": "ops"})
    await alice.ok({"type": "typing", "room": "ops"})
    await bob.nothing()  # not in ops
    # on_connect joined her own group user:alice too
    seen = await bob.ok({"type": "presence", "to": "group:user:alice"})
    assert (seen["uids"], seen["count"]) == (["alice"], 1)

    # whois: bob's session (written on node 1) read from node 0
    ack = await alice.ok({"type": "whois", "client_id": bob.client_id})
    session = ack["result"]
    assert set(session) == {"login_time", "device"}, session
    assert session["device"] == "TeamChat/2.0 (Linux; Android 14)"
    assert isinstance(session["login_time"], int)
    assert before - 60 <= session["login_time"] <= time.time() + 60
    mine = (await bob.ok({"type": "whois", "client_id": alice.client_id}))["result"]
    assert mine["device"] == "TeamChat/2.1 (iPhone)"
    gone = (await alice.ok({"type": "whois", "client_id": f"{bob.client_id}0"}))["result"]
    assert gone is None  # a well-formed id of no open connection
    await error(alice, {"type": "whois"}, "bad_request")
    await error(alice, {"type": "whois", "client_id": 5}, "bad_request")
    await error(alice, {"type": "whois", "client_id": "not-a-client-id"}, "bad_request")
    await error(alice, {"type": "dance"}, "unknown_type")
    await alice.ok({"type": "ping"})  # errors leave the connection usable
    await bob.nothing()


async def test_only_admin_sends_to_all(nodes: Cluster) -> None:
    alice = await chat(nodes, 0, "alice")
    bob = await chat(nodes, 1, "bob")
    assert await lobby(alice) == {"event": "online", "uid": "bob"}
    admin = await chat(nodes, 1, "admin")
    assert await lobby(alice) == {"event": "online", "uid": "admin"}
    assert await lobby(bob) == {"event": "online", "uid": "admin"}

    await error(alice, {"type": "send", "to": "all", "data": "hi all"}, "forbidden")
    await error(bob, {"type": "send", "to": "all", "data": "hi all"}, "forbidden")
    await admin.ok({"type": "send", "to": "all", "data": "maintenance at 18:00"})
    for ws in (alice, bob, admin):
        msg = await ws.next(type="message")
        assert (msg["to"], msg["data"]) == ("all", "maintenance at 18:00"), msg
        assert msg["from"] == {"uid": "admin", "client_id": admin.client_id}
    # other targets keep the token's policy (None): a joined group, a uid
    await alice.ok({"type": "send", "to": "group:lobby", "data": "hello lobby"})
    for ws in (alice, bob, admin):  # a core send reaches its sender too
        assert (await ws.next(type="message"))["data"] == "hello lobby"
    await alice.ok({"type": "send", "to": "uid:bob", "data": "hi bob"})
    assert (await bob.next(type="message"))["data"] == "hi bob"
    await error(alice, {"type": "send", "to": "group:ops", "data": "x"}, "forbidden")
    for ws in (alice, bob, admin):
        await ws.nothing()


async def test_offline_on_close_and_when_a_node_dies(nodes: Cluster) -> None:
    alice = await chat(nodes, 0, "alice")
    bob = await chat(nodes, 1, "bob")
    assert await lobby(alice) == {"event": "online", "uid": "bob"}
    await bob.close()
    assert await lobby(alice) == {"event": "offline", "uid": "bob", "node_died": False}

    # a connection without a uid when it closes (it logged out) is not announced
    dave = await chat(nodes, 1, "dave")
    assert await lobby(alice) == {"event": "online", "uid": "dave"}
    await dave.ok({"type": "logout"})
    await dave.close()
    await alice.nothing(0.5)

    await chat(nodes, 1, "carol")
    assert await lobby(alice) == {"event": "online", "uid": "carol"}
    nodes.kill(1)
    # node 0 purges node 1 once its record expires (TTL 2 s, heartbeats of 0.5 s) and fires
    # on_close for carol there; generous for a busy machine
    offline = await lobby(alice, timeout=20)
    assert offline == {"event": "offline", "uid": "carol", "node_died": True}
    await alice.nothing()


async def test_no_offline_without_online(nodes: Cluster) -> None:
    """Clients that leave right after `welcome`, often before their on_connect announced
    them: each uid gets as many `offline` as `online` (here one or none)."""
    alice = await chat(nodes, 0, "alice")

    async def flap(i: int) -> None:
        ws = await websockets.connect(f"{nodes.ws_urls[1]}?v=2&token={token(f'flap{i}')}")
        await asyncio.wait_for(ws.recv(), 5)  # the welcome
        await ws.close()

    await asyncio.gather(*(flap(i) for i in range(10)))
    online: Counter[str] = Counter()
    offline: Counter[str] = Counter()
    while True:  # until the lobby has been quiet for 2 s
        try:
            event = await lobby(alice, timeout=2)
        except TimeoutError:
            break
        (online if event["event"] == "online" else offline)[event["uid"]] += 1
    assert online == offline, (online, offline)
    assert set(offline) <= {f"flap{i}" for i in range(10)}
    assert max(online.values(), default=0) <= 1

"""Group memberships follow the token (issue 14, item 3): a `login` with a token (a refresh,
or a re-bind to another `sub`) leaves every joined group the new claims do not allow, before
its ack (the barrier of `leave`), with a `{"type": "left", "group", "reason": "forbidden"}`
frame to the client and presence `leave` events to the group's watchers. An application's
`authorize` hook is asked too, as for `join`. The Python client forgets such a group.

Three JWT nodes of one cluster (the third runs tests/cluster/apps/grants.py), started once for
the module: every test uses its own uids and groups.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest

from wscluster.client import Client
from wscluster.embedded import EmbeddedRedis

from .conftest import NodeProc
from .wsclient import WS

SECRET = "token-groups-test-secret-0123456789abcdef"  # >= 32 bytes
GRANTS_APP = ["--app", "tests.cluster.apps.grants:app"]
_ids = itertools.count(10_000)


def token(sub: str, ttl: float = 600, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "exp": int(now + ttl), "iat": now, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@dataclass
class Nodes:
    plain: list[NodeProc]  # two JWT nodes
    app: NodeProc  # same cluster, with the `grants` application

    def url(self, node: NodeProc, tok: str) -> str:
        return f"{node.ws_url}?token={tok}"


@pytest.fixture(scope="module")
def nodes(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    tmp = tmp_path_factory.mktemp("token-groups")
    base = ["--broker", valkey.url, "--namespace", f"t{uuid.uuid4().hex[:10]}",
            "--jwt-secret", SECRET, "--node-heartbeat", "0.5"]  # fmt: skip
    built = Nodes(
        plain=[NodeProc(0, base, tmp), NodeProc(1, base, tmp)],
        app=NodeProc(2, [*base, *GRANTS_APP], tmp),
    )
    every = [*built.plain, built.app]
    try:
        for node in every:
            node.start(wait=False)
        for node in every:
            node.wait_healthy()
        yield built
    finally:
        for node in every:
            node.kill()


# --- helpers -------------------------------------------------------------------------------


async def login(ws: WS, tok: str) -> list[dict[str, Any]]:
    """Send a `login` with ``tok``: the `left` frames that came before its answer, then the
    answer (the other frames pushed meanwhile are kept for ``ws.next``)."""
    frame_id = next(_ids)
    await ws.conn.send(json.dumps({"type": "login", "token": tok, "id": frame_id}))
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while True:
            msg = json.loads(await ws.conn.recv())
            if msg.get("type") == "left" or msg.get("id") == frame_id:
                got.append(msg)
                if msg.get("id") == frame_id:
                    return got
            else:
                ws.pushed.append(msg)


def left(*groups: str) -> list[dict[str, Any]]:
    return [{"type": "left", "group": g, "reason": "forbidden"} for g in groups]


async def error(ws: WS, frame: dict[str, Any], code: str) -> dict[str, Any]:
    reply = await ws.request(frame)
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    return reply


async def presence_of(ws: WS, cid: str, event: str) -> dict[str, Any]:
    """The next presence event of connection ``cid`` (others are skipped)."""
    async with asyncio.timeout(5):
        while True:
            frame = await ws.next(type="presence")
            if frame["client_id"] == cid:
                assert frame["event"] == event, frame
                return frame


async def api_send(node: NodeProc, to: str, data: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{node.api_url}/api/send", json={"to": to, "data": data}) as r:
            assert r.status == 200, await r.text()


async def open_with(nodes: Nodes, node: NodeProc, sub: str, **claims: Any) -> WS:
    return await WS.open(nodes.url(node, token(sub, **claims)))


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)


# --- a refresh with narrower claims --------------------------------------------------------


async def test_narrower_token_leaves_groups_before_the_ack(nodes: Nodes, unique: str) -> None:
    user, gb, gc = f"u{unique}", f"ab{unique}", f"ac{unique}"
    ws = await open_with(nodes, nodes.plain[0], user, groups=["a*"])
    watcher = await open_with(nodes, nodes.plain[1], f"w{unique}")
    sender = await open_with(nodes, nodes.plain[1], f"s{unique}", send_groups=["*"])
    await watcher.ok({"type": "join", "group": gb, "presence": True})
    await ws.ok({"type": "join", "group": gb, "presence": True})
    await ws.ok({"type": "join", "group": gc, "presence": True})
    await presence_of(watcher, ws.client_id, "join")
    await sender.ok({"type": "send", "to": f"group:{gb}", "data": "before"})
    assert (await ws.next(type="message"))["data"] == "before"

    frames = await login(ws, token(user, groups=[gc]))
    assert frames[:-1] == left(gb)  # before the ack, and only for the group no longer allowed
    assert frames[-1]["type"] == "ack" and frames[-1]["uid"] == user, frames

    # the barrier: nothing of `gb` sent after the ack reaches it; `gc` still does
    await sender.ok({"type": "send", "to": f"group:{gb}", "data": "after"})
    await api_send(nodes.plain[1], f"group:{gb}", "api after")
    await api_send(nodes.plain[0], f"group:{gb}", "api after, its own node")
    await sender.ok({"type": "send", "to": f"group:{gc}", "data": "still"})
    assert (await ws.next(type="message"))["data"] == "still"
    await ws.nothing(0.5)
    # and it may no longer send to it, nor join it again
    await error(ws, {"type": "send", "to": f"group:{gb}", "data": 0}, "forbidden")
    await error(ws, {"type": "join", "group": gb}, "forbidden")
    await ws.ok({"type": "send", "to": f"group:{gc}", "data": "own"})
    assert (await ws.next(type="message"))["data"] == "own"
    # the watchers saw it leave, and presence no longer counts it
    await presence_of(watcher, ws.client_id, "leave")
    members = await watcher.ok({"type": "presence", "to": f"group:{gb}"})
    assert (members["uids"], members["count"]) == ([f"w{unique}"], 1)
    frames = await login(ws, token(user, groups=[gc]))  # the same claims again: nothing left
    assert frames[:-1] == [] and frames[-1]["type"] == "ack"


async def test_login_with_another_sub_leaves_every_group_it_may_not_join(
    nodes: Nodes, unique: str
) -> None:
    old, new, g1, g2 = f"o{unique}", f"n{unique}", f"x{unique}", f"y{unique}"
    ws = await open_with(nodes, nodes.plain[0], old)  # no `groups` claim: any group
    watcher = await open_with(nodes, nodes.plain[1], f"w{unique}")
    sender = await open_with(nodes, nodes.plain[1], f"s{unique}", send_groups=["*"])
    await watcher.ok({"type": "join", "group": g1, "presence": True})
    await ws.ok({"type": "join", "group": g2})
    await ws.ok({"type": "join", "group": g1, "presence": True})
    await presence_of(watcher, ws.client_id, "join")

    frames = await login(ws, token(new, groups=[]))
    assert frames[:-1] == left(g1, g2)
    assert frames[-1]["type"] == "ack" and frames[-1]["uid"] == new, frames

    for g in (g1, g2):
        await sender.ok({"type": "send", "to": f"group:{g}", "data": g})
        await api_send(nodes.plain[1], f"group:{g}", g)
    await sender.ok({"type": "send", "to": f"uid:{new}", "data": "mine"})
    assert (await ws.next(type="message"))["data"] == "mine"
    await ws.nothing(0.5)
    await presence_of(watcher, ws.client_id, "leave")
    for g, members in ((g1, [f"w{unique}"]), (g2, [])):
        seen = await watcher.ok({"type": "presence", "to": f"group:{g}"})
        assert (seen["uids"], seen["count"]) == (members, len(members))


async def test_claims_that_still_allow_the_groups_change_nothing(nodes: Nodes, unique: str) -> None:
    user, g = f"u{unique}", f"k{unique}"
    ws = await open_with(nodes, nodes.plain[0], user, groups=["k*"])
    sender = await open_with(nodes, nodes.plain[1], f"s{unique}", send_groups=["*"])
    await ws.ok({"type": "join", "group": g})
    for tok in (token(user, groups=[g, "other"]), token(user), token(f"v{unique}", groups=["*"])):
        frames = await login(ws, tok)
        assert [f["type"] for f in frames] == ["ack"], frames
    # a refused login changes nothing either (a token of another key, an expired one)
    bad = jwt.encode({"sub": user, "exp": int(time.time()) + 60, "groups": []},
                     "another-secret-0123456789abcdefghijklmnop", algorithm="HS256")  # fmt: skip
    for tok in (bad, token(user, ttl=-30, groups=[])):
        frames = await login(ws, tok)
        assert [f.get("code") for f in frames] == ["forbidden"], frames
    await sender.ok({"type": "send", "to": f"group:{g}", "data": "kept"})
    assert (await ws.next(type="message"))["data"] == "kept"


async def test_send_groups_may_still_allow_sending(nodes: Nodes, unique: str) -> None:
    user, g = f"u{unique}", f"n{unique}"
    ws = await open_with(nodes, nodes.plain[0], user, groups=["*"])
    listener = await open_with(nodes, nodes.plain[1], f"l{unique}")
    await listener.ok({"type": "join", "group": g})
    await ws.ok({"type": "join", "group": g})
    frames = await login(ws, token(user, groups=[], send_groups=[g]))
    assert frames[:-1] == left(g)
    await ws.ok({"type": "send", "to": f"group:{g}", "data": "from outside"})
    assert (await listener.next(type="message"))["data"] == "from outside"
    await ws.nothing(0.5)  # no longer a member: its own message does not come back


async def test_the_authorize_hook_is_asked_as_for_join(nodes: Nodes, unique: str) -> None:
    user, granted, plain = f"u{unique}", f"granted:{unique}", f"ab{unique}"
    ws = await open_with(nodes, nodes.app, user, groups=["a*"])
    sender = await open_with(nodes, nodes.plain[0], f"s{unique}", send_groups=["*"])
    await ws.ok({"type": "join", "group": granted})  # the app allows it, the token does not
    await ws.ok({"type": "join", "group": plain})
    frames = await login(ws, token(user, groups=[]))
    assert frames[:-1] == left(plain)
    await sender.ok({"type": "send", "to": f"group:{plain}", "data": "gone"})
    await sender.ok({"type": "send", "to": f"group:{granted}", "data": "granted"})
    assert (await ws.next(type="message"))["data"] == "granted"
    await ws.nothing(0.5)


async def test_a_join_racing_a_narrowing_login_does_not_stay(nodes: Nodes, unique: str) -> None:
    """A `join` sent right after the `login`, handled under the old claims: either it is
    acked and then left (a `left` frame after its ack), or it is refused; never kept."""
    user, g, keep = f"u{unique}", f"r{unique}", f"q{unique}"
    sender = await open_with(nodes, nodes.plain[1], f"s{unique}", send_groups=["*"])
    for _ in range(5):
        ws = await open_with(nodes, nodes.plain[0], user, groups=["*"])
        await ws.ok({"type": "join", "group": keep})
        login_id, join_id = next(_ids), next(_ids)
        await ws.conn.send(json.dumps({"type": "login", "id": login_id,
                                       "token": token(user, groups=[keep])}))  # fmt: skip
        await ws.conn.send(json.dumps({"type": "join", "group": g, "id": join_id}))
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while {login_id, join_id} - {f.get("id") for f in seen}:
                frame = json.loads(await ws.conn.recv())
                if frame.get("type") in ("ack", "error", "left"):
                    seen.append(frame)
        answer = next(f for f in seen if f.get("id") == join_id)
        if answer["type"] == "ack":
            assert left(g)[0] in seen[seen.index(answer) :], seen
        else:
            assert answer["code"] == "forbidden", seen
        await sender.ok({"type": "send", "to": f"group:{g}", "data": "no"})
        await sender.ok({"type": "send", "to": f"group:{keep}", "data": "yes"})
        assert (await ws.next(type="message"))["data"] == "yes"
        await ws.close()


# --- the Python client ---------------------------------------------------------------------


async def test_python_client_forgets_a_group_it_was_made_to_leave(
    nodes: Nodes, unique: str, clients: list[Client]
) -> None:
    user, gb, gc = f"u{unique}", f"ab{unique}", f"ac{unique}"
    client = Client(nodes.plain[0].ws_url, token=token(user, groups=["a*"]),
                    backoff_base=0.05, backoff_cap=0.5, request_timeout=5.0)  # fmt: skip
    clients.append(client)
    await client.connect()
    await client.join(gb, presence=True)
    await client.join(gc)
    await client.login(token=token(user, groups=[gc]))
    async with asyncio.timeout(5):
        frame = await client.recv()
        while frame.get("type") != "left":
            frame = await client.recv()
    assert frame == left(gb)[0]
    assert client.groups == {gc: False}
    # a reconnect re-joins only `gc` (and the fresh token is the one used)
    link = client._link
    assert link is not None and link.transport is not None
    link.transport.disconnect(graceful=False)
    async with asyncio.timeout(10):
        await client.reconnected.wait()
    assert client.groups == {gc: False}
    sender = await open_with(nodes, nodes.plain[1], f"s{unique}", send_groups=["*"])
    await sender.ok({"type": "send", "to": f"group:{gb}", "data": "no"})
    await sender.ok({"type": "send", "to": f"group:{gc}", "data": "yes"})
    async with asyncio.timeout(5):
        frame = await client.recv()
        while frame.get("type") != "message":
            frame = await client.recv()
    assert frame["data"] == "yes"

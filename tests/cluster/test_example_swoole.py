"""examples/swoole_chat on two real nodes: the Swoole tutorial's client protocol, byte for
byte, across nodes. Plain `websockets` clients (the app sends no `welcome`)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
APP = ["--app", "examples.swoole_chat.app:app"]
OPEN = '{"type":"open"}'
Connect = Callable[[int], Awaitable[ClientConnection]]


def message(content: str) -> str:
    """The frame the PHP server pushes: json_encode(["type"=>"message","content"=>…])."""
    return '{"type":"message","content":"' + content + '"}'


@pytest.fixture
def nodes(valkey: EmbeddedRedis, make_cluster: Callable[..., Cluster]) -> Cluster:
    # the nodes import `examples` from the repository, whatever pytest's cwd
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return make_cluster(valkey.url, 2, APP, {"PYTHONPATH": path})


@pytest.fixture
async def connect(nodes: Cluster) -> AsyncIterator[Connect]:
    """connect(i): a client on node i that has received its `open` frame."""
    opened: list[ClientConnection] = []

    async def open_(i: int) -> ClientConnection:
        ws = await websockets.connect(nodes.ws_urls[i], compression=None)
        opened.append(ws)
        assert await recv(ws) == OPEN
        return ws

    yield open_
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)


async def recv(ws: ClientConnection, timeout: float = 5) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


async def nothing(*clients: ClientConnection, wait: float = 0.3) -> None:
    """No frame arrives at any of the clients within `wait` seconds."""
    await asyncio.sleep(wait)
    for ws in clients:
        try:
            frame = await asyncio.wait_for(ws.recv(), 0.01)
        except TimeoutError:
            continue
        raise AssertionError(f"unexpected frame {frame!r}")


async def send(ws: ClientConnection, frame: dict[str, object]) -> None:
    await ws.send(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))  # JSON.stringify


async def login(ws: ClientConnection, name: str) -> None:
    await send(ws, {"type": "login", "userName": name})
    assert await recv(ws) == message(f"hello, welcome {name}")


def sendto(frm: str, to: str, content: str) -> dict[str, object]:
    return {"content": content, "type": "sendto", "from": frm, "to": to}  # index.html's order


async def test_open_login_and_sendto_across_nodes(connect: Connect) -> None:
    alice = await connect(0)
    await nothing(alice)  # `open` only: no `welcome` of ours
    bob = await connect(1)
    await login(alice, "alice")
    await login(bob, "bob")
    await send(alice, sendto("alice", "bob", "hi bob"))
    assert await recv(alice) == message("hi bob")
    assert await recv(bob) == message("hi bob")
    # PHP's json_encode escapes: non-ASCII as \uXXXX (surrogate pairs), "/" as "\/"
    await send(bob, sendto("bob", "alice", 'héllo 你好 😀 a/b "q" \\ \n'))
    escaped = r"h\u00e9llo \u4f60\u597d \ud83d\ude00 a\/b \"q\" \\ \n"
    assert await recv(bob) == message(escaped)
    assert await recv(alice) == message(escaped)
    await nothing(alice, bob)


async def test_sendto_self_and_unknown_user(connect: Connect) -> None:
    alice, alice2 = await connect(0), await connect(1)
    bob = await connect(1)
    await login(alice, "alice")
    await login(alice2, "alice")
    await login(bob, "bob")
    await send(alice, sendto("alice", "alice", "note to self"))
    assert await recv(alice) == message("note to self")  # exactly one copy, to this device
    await send(alice, sendto("alice", "nobody", "anyone?"))
    assert await recv(alice) == message("anyone?")  # its own copy, and no error frame
    await send(alice, sendto("alice", "x" * 129, "no such name"))
    assert await recv(alice) == message("no such name")
    await nothing(alice, alice2, bob)


async def test_every_device_of_the_receiver_but_only_the_senders_own(connect: Connect) -> None:
    bob1, bob2 = await connect(0), await connect(1)
    alice, alice2 = await connect(0), await connect(1)
    for ws, name in ((bob1, "bob"), (bob2, "bob"), (alice, "alice"), (alice2, "alice")):
        await login(ws, name)
    await send(alice, sendto("alice", "bob", "to both of you"))
    assert await recv(alice) == message("to both of you")
    assert await recv(bob1) == message("to both of you")
    assert await recv(bob2) == message("to both of you")
    await nothing(alice, alice2, bob1, bob2)  # Swoole pushes only to the sender's own fd
    # a connection bound to `to` that sends with another `from` still gets one copy
    await send(bob1, sendto("carol", "bob", "spoofed"))
    assert await recv(bob1) == message("spoofed")
    assert await recv(bob2) == message("spoofed")
    await nothing(bob1, bob2, alice, alice2)


async def test_garbage_is_ignored_and_the_connection_stays_usable(connect: Connect) -> None:
    alice, bob = await connect(0), await connect(1)
    await login(bob, "bob")
    junk: list[str | bytes] = [
        "not json", "[1, 2]", '"login"', "{}", "NaN", '{"type": "nope"}',
        '{"type": "login"}', '{"type": "login", "userName": ""}',
        '{"type": "login", "userName": 5}', '{"type": "message", "fd": 1, "content": "x"}',
        "[" * 5000, b"\x00\xff binary",
    ]  # fmt: skip
    for frame in junk:
        await alice.send(frame)
    await nothing(alice, bob)
    await login(alice, "alice")  # the same connection works on
    await send(alice, sendto("alice", "bob", "still here"))
    assert await recv(alice) == message("still here")
    assert await recv(bob) == message("still here")


async def test_close_tells_nobody_and_unbinds(connect: Connect) -> None:
    alice, bob = await connect(0), await connect(1)
    await login(alice, "alice")
    await login(bob, "bob")
    await bob.close()
    await nothing(alice)  # the original pushes nothing to anyone on close
    await send(alice, sendto("alice", "bob", "are you there?"))
    assert await recv(alice) == message("are you there?")
    bob = await connect(0)  # bob comes back, on the other node
    await nothing(bob)  # nothing queued for him meanwhile
    await login(bob, "bob")
    await send(alice, sendto("alice", "bob", "welcome back"))
    assert await recv(alice) == message("welcome back")
    assert await recv(bob) == message("welcome back")

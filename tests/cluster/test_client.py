"""wscluster.client against real node processes (the `cluster` fixtures of conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from wscluster.client import Client, ConnectionClosed, ServerError

Frame = dict[str, Any]
FAST = {"backoff_base": 0.05, "backoff_cap": 0.5, "request_timeout": 5.0}


async def expect(client: Client, match: Callable[[Frame], bool], within: float = 5.0) -> Frame:
    """The first pushed frame that matches (skipping unrelated ones, e.g. other tests' `all`)."""
    async with asyncio.timeout(within):
        while True:
            frame = await client.recv()
            if match(frame):
                return frame


def data_is(value: Any) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == "message" and f.get("data") == value


async def nothing(client: Client, match: Callable[[Frame], bool], wait: float = 0.5) -> None:
    try:
        frame = await expect(client, match, wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame}")


async def closed(client: Client, within: float = 10.0) -> ConnectionClosed:
    """Drain the client's pushed frames until it reports being closed for good."""
    async with asyncio.timeout(within):
        while True:
            try:
                await client.recv()
            except ConnectionClosed as exc:
                return exc


async def until(cond: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients a test opens; all closed at the end, whatever happened."""
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
def open_client(clients: list[Client]) -> Callable[..., Any]:
    async def opener(url: str, uid: str | None = None, **kw: Any) -> Client:
        client = Client(url, uid=uid, **{**FAST, **kw})
        clients.append(client)
        await client.connect()
        return client

    return opener


async def api_close(api_url: str, to: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{api_url}/api/close", json={"to": to}) as r,
    ):
        assert r.status == 200, await r.text()
        assert (await r.json()) == {"ok": True}


# -- basics ------------------------------------------------------------------------------


async def test_welcome_and_login(cluster: Any, open_client: Any, unique: str) -> None:
    client = await open_client(cluster.ws_urls[0])
    welcome = client.welcome
    assert welcome["type"] == "welcome"
    assert client.client_id == welcome["client_id"] and client.client_id
    assert client.node == welcome["node"]
    assert welcome["uid"] is None and client.uid is None
    assert isinstance(welcome["heartbeat"], int | float)
    ack = await client.login(f"u{unique}")
    assert ack["type"] == "ack" and isinstance(ack["id"], int)
    assert client.uid == f"u{unique}"
    assert (await client.ping())["type"] == "pong"
    await client.logout()
    assert client.uid is None


async def test_uid_message_across_nodes(cluster: Any, open_client: Any, unique: str) -> None:
    alice = await open_client(cluster.ws_urls[0], f"alice{unique}")
    bob = await open_client(cluster.ws_urls[2], f"bob{unique}")
    bob2 = await open_client(cluster.ws_urls[1], f"bob{unique}")  # a second device
    ack = await alice.send(f"uid:bob{unique}", {"text": "hi", "n": [1, 2]})
    assert ack["type"] == "ack"
    for device in (bob, bob2):
        msg = await expect(device, data_is({"text": "hi", "n": [1, 2]}))
        assert msg["to"] == f"uid:bob{unique}"
        assert msg["from"] == {"uid": f"alice{unique}", "client_id": alice.client_id}
        assert isinstance(msg["ts"], int)


async def test_group_message_across_nodes(cluster: Any, open_client: Any, unique: str) -> None:
    group = f"room{unique}"
    sender = await open_client(cluster.ws_urls[0], f"s{unique}")
    members = [await open_client(url, f"m{i}{unique}") for i, url in enumerate(cluster.ws_urls)]
    for member in members:
        await member.join(group)
    assert members[0].groups == {group: False}
    await sender.send(f"group:{group}", "hello group")
    for member in members:
        msg = await expect(member, data_is("hello group"))
        assert msg["to"] == f"group:{group}"
    await nothing(sender, data_is("hello group"), 0.3)  # the sender is not a member
    await members[2].leave(group)
    await sender.send(f"group:{group}", "after leave")
    await expect(members[0], data_is("after leave"))
    await nothing(members[2], data_is("after leave"))


async def test_client_and_all_addresses(cluster: Any, open_client: Any, unique: str) -> None:
    a = await open_client(cluster.ws_urls[0], f"a{unique}")
    b = await open_client(cluster.ws_urls[2], f"b{unique}")
    c = await open_client(cluster.ws_urls[1])  # anonymous connections get `all` too
    await a.send(f"client:{b.client_id}", f"direct{unique}")
    assert (await expect(b, data_is(f"direct{unique}")))["to"] == f"client:{b.client_id}"
    await a.send("all", f"all{unique}")
    for client in (a, b, c):  # the sender is one of the receivers
        assert (await expect(client, data_is(f"all{unique}")))["to"] == "all"


async def test_message_order_per_sender(cluster: Any, open_client: Any, unique: str) -> None:
    a = await open_client(cluster.ws_urls[0], f"a{unique}")
    b = await open_client(cluster.ws_urls[2], f"b{unique}")
    await asyncio.gather(*(a.send(f"uid:b{unique}", n) for n in range(100)))
    got = [(await expect(b, lambda f: f.get("type") == "message"))["data"] for _ in range(100)]
    assert got == list(range(100))


async def test_acks_matched_by_id(cluster: Any, open_client: Any, unique: str) -> None:
    a = await open_client(cluster.ws_urls[1], f"a{unique}")
    frames: list[Frame] = [{"type": "ping"} if n % 2 else {"type": "join", "group": f"g{n}{unique}"}
                           for n in range(60)]  # fmt: skip
    replies = await asyncio.gather(*(a.request(f) for f in frames))
    ids = [r["id"] for r in replies]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    for frame, reply in zip(frames, replies, strict=True):
        assert reply["type"] == ("pong" if frame["type"] == "ping" else "ack")
    # a raw frame with its own id: its ack is pushed, not swallowed
    a.send_nowait({"type": "ping", "id": f"mine{unique}"})
    assert (await expect(a, lambda f: f.get("id") == f"mine{unique}"))["type"] == "pong"


def presence_of(frame: Frame, client: Client) -> bool:
    return frame.get("type") == "presence" and frame.get("client_id") == client.client_id


async def test_presence(cluster: Any, open_client: Any, unique: str) -> None:
    group = f"p{unique}"
    watcher = await open_client(cluster.ws_urls[0], f"w{unique}")
    await watcher.join(group, presence=True)
    joiner = await open_client(cluster.ws_urls[2], f"j{unique}")
    await joiner.join(group)
    event = await expect(watcher, lambda f: presence_of(f, joiner))
    assert event == {
        "type": "presence", "group": group, "event": "join",
        "uid": f"j{unique}", "client_id": joiner.client_id,
    }  # fmt: skip

    async def settled() -> Frame:  # the store may lag a heartbeat
        for _ in range(100):
            ack = await watcher.presence(f"group:{group}")
            if ack.get("count") == 2:
                return ack
            await asyncio.sleep(0.1)
        return ack

    ack = await settled()
    assert ack["count"] == 2 and sorted(ack["uids"]) == sorted([f"w{unique}", f"j{unique}"])
    assert (await watcher.presence(f"uid:j{unique}"))["online"] is True
    await joiner.leave(group)
    event = await expect(watcher, lambda f: presence_of(f, joiner))
    assert (event["event"], event["client_id"]) == ("leave", joiner.client_id)


# -- errors ------------------------------------------------------------------------------


async def test_errors_raise_server_error(cluster: Any, open_client: Any, unique: str) -> None:
    client = await open_client(cluster.ws_urls[0])
    with pytest.raises(ServerError) as info:
        await client.send(f"uid:x{unique}", 1)
    assert info.value.code == "not_logged_in" and isinstance(info.value.frame_id, int)
    await client.login(f"e{unique}")
    for bad in ("nope:x", "group:", "uid:", "UID:x", "allx", "client:", "x" * 10):
        with pytest.raises(ServerError) as info:
            await client.send(bad, 1)
        assert info.value.code == "bad_request", bad
    with pytest.raises(ServerError) as info:
        await client.send(f"group:{'g' * 129}", 1)
    assert info.value.code == "bad_request"
    with pytest.raises(ServerError) as info:
        await client.request({"type": "join"})
    assert info.value.code == "bad_request"
    with pytest.raises(ServerError) as info:
        await client.request({"type": f"nosuch{unique}"})
    assert info.value.code == "unknown_type"
    with pytest.raises(ServerError) as info:
        await client.send(f"uid:x{unique}", "x" * 70_000)
    assert info.value.code == "too_large"
    assert (await client.ping())["type"] == "pong"  # errors never close the connection
    # a frame without id: its error is pushed with id null
    client.send_nowait({"type": "send", "to": "nope:x", "data": 1})
    err = await expect(client, lambda f: f.get("type") == "error")
    assert err["id"] is None and err["code"] == "bad_request"


# -- queue -------------------------------------------------------------------------------


async def test_queue_drops_oldest(cluster: Any, open_client: Any, unique: str) -> None:
    client = await open_client(cluster.ws_urls[0], f"q{unique}", max_queue=5)
    for n in range(20):
        await client.send(f"uid:q{unique}", n)
    await until(lambda: client.dropped == 15, 10)
    got = [(await client.recv(2))["data"] for _ in range(5)]
    assert got == [15, 16, 17, 18, 19]


# -- kicks (terminal) --------------------------------------------------------------------


async def test_kick_uid_is_terminal(cluster: Any, open_client: Any, unique: str) -> None:
    uid = f"k{unique}"
    devices = [
        await open_client(cluster.ws_urls[0], uid),
        await open_client(cluster.ws_urls[2], uid),
    ]
    await devices[0].join(f"g{unique}")
    await api_close(cluster.api_urls[1], f"uid:{uid}")
    for device in devices:
        assert (await closed(device)).code == 4001
        assert device.closed_code == 4001
    await asyncio.sleep(0.5)
    for device in devices:
        assert device.reconnects == 0 and not device.connected
        with pytest.raises(ConnectionClosed):
            await device.ping()


async def test_kick_client_ends_iteration(cluster: Any, open_client: Any, unique: str) -> None:
    client = await open_client(cluster.ws_urls[1], f"k{unique}")
    other = await open_client(cluster.ws_urls[1], f"k{unique}")
    await client.send(f"uid:k{unique}", "before")
    await expect(other, data_is("before"))
    await api_close(cluster.api_urls[0], f"client:{client.client_id}")
    seen = [frame["data"] async for frame in client if frame.get("type") == "message"]
    assert seen == ["before"]
    assert client.closed_code == 4001
    assert (await other.ping())["type"] == "pong"  # the other device is untouched


# -- reconnect ---------------------------------------------------------------------------


async def _session_restored(sender: Client, client: Client, uid: str, group: str) -> None:
    """After a reconnect, messages to the uid and to the group reach the client again."""
    await sender.send(f"uid:{uid}", f"to uid {client.reconnects}")
    await expect(client, data_is(f"to uid {client.reconnects}"), 10)
    await sender.send(f"group:{group}", f"to group {client.reconnects}")
    await expect(client, data_is(f"to group {client.reconnects}"), 10)


async def test_reconnect_after_kill_and_restart(
    redis_url: str, make_cluster: Any, open_client: Any, unique: str
) -> None:
    c = make_cluster(redis_url, 2)
    uid, group = f"r{unique}", f"rg{unique}"
    client = await open_client(c.ws_urls[0], uid)
    await client.join(group, presence=True)
    sender = await open_client(c.ws_urls[1], f"s{unique}")
    old_id = client.client_id
    c.kill(0)
    await until(lambda: not client.connected, 5)
    pending = asyncio.create_task(client.ping())  # waits for the new link
    c.nodes[0].start()
    await until(lambda: client.reconnects == 1 and client.connected)
    assert client.reconnected.is_set()
    assert (await pending)["type"] == "pong"
    assert client.closed_code is None  # no close frame from a killed node
    assert client.client_id != old_id and client.uid == uid
    assert client.groups == {group: True}
    await _session_restored(sender, client, uid, group)


async def test_reconnect_after_drain_1012(
    redis_url: str, make_cluster: Any, open_client: Any, unique: str
) -> None:
    c = make_cluster(redis_url, 2)
    uid, group = f"d{unique}", f"dg{unique}"
    client = await open_client(c.ws_urls[0], uid, max_handshake_retries=100)
    await client.join(group)
    sender = await open_client(c.ws_urls[1], f"s{unique}")
    callbacks: list[int] = []
    client.on_reconnect = lambda cl: callbacks.append(cl.reconnects)
    assert await asyncio.to_thread(c.nodes[0].terminate) == 0  # SIGTERM: drain, close 1012
    assert client.closed_code == 1012
    c.nodes[0].start()
    await until(lambda: client.reconnects == 1 and client.connected)
    assert callbacks == [1]
    await _session_restored(sender, client, uid, group)


async def test_in_flight_request_fails_when_link_breaks(
    redis_url: str, make_cluster: Any, open_client: Any, unique: str
) -> None:
    c = make_cluster(redis_url, 1)
    client = await open_client(c.ws_urls[0], f"f{unique}", reconnect=False)

    async def flood() -> None:
        while True:
            await client.send(f"uid:f{unique}", "x")

    task = asyncio.create_task(flood())
    await asyncio.sleep(0.3)
    c.kill(0)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(task, 10)
    assert (await closed(client)).code is None
    assert not client.connected and client.reconnects == 0
    with pytest.raises(ConnectionClosed):
        await client.ping()


async def test_join_and_leave_at_once_keep_the_last_intent(
    cluster: Any, open_client: Any, unique: str
) -> None:
    """A join and a leave sent together may be acked leave first: what a reconnect restores
    follows the order the requests were made, not the order of their acks."""
    client = await open_client(cluster.ws_urls[0], f"i{unique}")
    for i in range(10):
        group = f"i{unique}{i}"
        await asyncio.gather(client.join(group), client.leave(group))
        assert group not in client.groups
        await asyncio.gather(client.leave(group), client.join(group, presence=True))
        assert client.groups.get(group) is True
    await asyncio.gather(client.login(f"j{unique}"), client.logout())
    assert client.uid is None and client._login is None
    assert client._intents == {}  # nothing left behind


async def test_backoff_grows_across_sessions_that_drop_at_once() -> None:
    """A node that welcomes, acks the login and closes at once is not retried in a tight loop:
    the backoff restarts only after a session that lasted."""
    import json

    import websockets

    opened = 0

    async def handler(ws: Any) -> None:
        nonlocal opened
        opened += 1
        welcome = {"type": "welcome", "client_id": f"c{opened}", "node": "n", "uid": None,
                   "heartbeat": 25}  # fmt: skip
        await ws.send(json.dumps(welcome))
        frame = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "ack", "id": frame["id"], "uid": frame.get("uid")}))
        await ws.close(1011)

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = Client(f"ws://127.0.0.1:{port}/ws", uid="flap", backoff_base=0.05,
                        backoff_cap=0.8)  # fmt: skip
        await client.connect()
        await asyncio.sleep(3)
        await client.close()
    # a fresh backoff per drop would average 0.025 s a retry (~100 connections in 3 s); a
    # growing one reaches its 0.8 s cap (mean 0.4 s) after 4 drops: about 10
    assert 3 <= opened <= 25, opened
    assert client._backoff.attempt >= opened - 1  # one backoff step per drop, never reset

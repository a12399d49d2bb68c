"""wscluster.client with history (PROTOCOL: "History, offsets and resume") on real nodes:
positions, resume after a reconnect on another node, offline delivery, a lost store, and the
duplicates between a replay and live messages."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jwt
import pytest

from wscluster.client import Client
from wscluster.embedded import EmbeddedRedis, free_port

from .test_client import until

Frame = dict[str, Any]
# a drained client may wait up to 5 s (the 1012's retry_ms) before it comes back: keep and
# replay more than it can miss meanwhile
RULES = ["--history", "group:*=10000/300s", "--history", "uid:*=10000/300s",
         "--max-replay", "10000"]  # fmt: skip
FAST = {"backoff_base": 0.05, "backoff_cap": 0.3, "request_timeout": 5.0}


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Client]]:
    """Make clients (closed at the end, whatever happened)."""
    made: list[Client] = []

    def make(url: str, uid: str | None = None, **kw: Any) -> Client:
        client = Client(url, uid=uid, **{**FAST, **kw})
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


class Received:
    """Every frame a client pushed, read in the background, messages by stream."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[Frame] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.client:
            self.frames.append(frame)

    def data(self, stream: str) -> list[Any]:
        return [f["data"] for f in self.frames if f["type"] == "message" and f["to"] == stream]

    def offsets(self, stream: str) -> list[int]:
        return [f["offset"] for f in self.frames if f["type"] == "message" and f["to"] == stream]

    def of_type(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind]

    async def wait(self, stream: str, n: int, within: float = 10.0) -> list[Any]:
        await until(lambda: len(self.data(stream)) >= n, within)
        await asyncio.sleep(0.2)  # a duplicate would come right after
        return self.data(stream)

    async def stop(self) -> None:
        self._task.cancel()


async def api_send(api_url: str, to: str, data: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api_url}/api/send", json={"to": to, "data": data}) as r:
            assert r.status == 200, await r.text()


def consecutive(offsets: list[int]) -> bool:
    return offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True


# -- reconnect -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_reconnect_on_another_node_misses_nothing(
    redis_url: str, make_cluster: Any, clients: Any, unique: str, how: str
) -> None:
    """A client whose node dies (SIGKILL) or drains (1012) while a publisher on another node
    keeps sending to its group and its uid, and that comes back on a third node, has every
    message exactly once and in order: the ones sent while it was away replayed, the live
    ones after them."""
    c = make_cluster(redis_url, 3, RULES)
    uid, group = f"r{unique}", f"g{unique}"
    streams = (f"group:{group}", f"uid:{uid}")
    client = clients(c.ws_urls[0], uid, max_handshake_retries=100)
    await client.connect()
    await client.join(group)
    assert set(client.positions()) == set(streams)  # from the login and join acks
    got = Received(client)
    publisher = clients(c.ws_urls[2], f"p{unique}")
    await publisher.connect()
    sent = 0
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            for stream in streams:
                await publisher.send(stream, sent)
            sent += 1
            await asyncio.sleep(0.003)

    task = asyncio.create_task(publish())
    await until(lambda: len(got.data(streams[1])) >= 30)
    client.url = f"ws://127.0.0.1:{free_port()}/ws"  # nothing there: it stays away a while
    if how == "kill":
        c.kill(0)
    else:
        assert await asyncio.to_thread(c.nodes[0].terminate) == 0
        assert client.closed_code == 1012
    await until(lambda: not client.connected, 5)
    away = sent
    await until(lambda: sent >= away + 50)  # sent while nobody listens for the client
    client.url = c.ws_urls[1]  # as a load balancer would
    await until(lambda: client.connected and client.reconnects == 1)
    await until(lambda: sent >= away + 150)  # live again
    stop.set()
    await task
    assert (client.node or "").startswith("node1-")
    for stream in streams:
        assert await got.wait(stream, sent) == list(range(sent)), stream
        assert consecutive(got.offsets(stream)), stream
    reports = {f["stream"]: f for f in got.of_type("recovered")}
    assert set(reports) == set(streams)
    for report in reports.values():
        assert report["recovered"] is True, report
        assert report["replayed"] >= 50, report  # what was sent while it was away
    assert client.groups == {group: False}
    positions = client.positions()
    for stream in streams:
        assert positions[stream][1] == got.offsets(stream)[-1]
    await got.stop()


async def test_groups_without_history_are_joined_plainly_after_a_reconnect(
    redis_url: str, make_cluster: Any, clients: Any, unique: str
) -> None:
    c = make_cluster(redis_url, 2, ["--history", f"group:h{unique}=100/60s"])
    client = clients(c.ws_urls[0], f"u{unique}", max_handshake_retries=100)
    await client.connect()
    await client.join(f"h{unique}", presence=True)
    await client.join(f"plain{unique}")
    assert list(client.positions()) == [f"group:h{unique}"]  # no rule: no position
    got = Received(client)
    client.url = c.ws_urls[1]
    c.kill(0)
    await until(lambda: client.connected and client.reconnects == 1)
    assert client.groups == {f"h{unique}": True, f"plain{unique}": False}
    watcher = clients(c.ws_urls[1], f"w{unique}")
    await watcher.connect()
    await watcher.join(f"h{unique}")  # the resumed group was joined with presence
    await until(lambda: any(f.get("client_id") == watcher.client_id
                            for f in got.of_type("presence")), 5)  # fmt: skip
    for group in (f"h{unique}", f"plain{unique}"):
        await watcher.send(f"group:{group}", group)
        assert await got.wait(f"group:{group}", 1) == [group]
    [report] = got.of_type("recovered")
    assert (report["stream"], report["recovered"]) == (f"group:h{unique}", True)
    await got.stop()


# -- offline delivery ------------------------------------------------------------------------


async def test_offline_delivery_from_stored_positions(
    redis_url: str, make_cluster: Any, clients: Any, unique: str
) -> None:
    """Messages to a user and its group while it has no connection reach it when it connects
    again (on another node) with the positions it stored; a user that never connected gets
    what is retained with ``[None, 0]``."""
    c = make_cluster(redis_url, 2, RULES)
    uid, group = f"o{unique}", f"og{unique}"
    first = clients(c.ws_urls[0], uid)
    await first.connect()
    await first.join(group)
    await first.send(f"group:{group}", "seen")
    await until(lambda: first.positions()[f"group:{group}"][1] == 1, 5)
    stored = first.positions()
    await first.close()
    for i in range(5):
        await api_send(c.api_urls[1], f"uid:{uid}", i)
        await api_send(c.api_urls[0], f"group:{group}", i)
    await api_send(c.api_urls[0], f"uid:new{unique}", "welcome")

    again = clients(c.ws_urls[1], uid, positions=stored)
    got = Received(again)
    await again.connect()
    assert again.groups == {group: False}  # joined by the resume
    assert await got.wait(f"uid:{uid}", 5) == [0, 1, 2, 3, 4]
    assert await got.wait(f"group:{group}", 5) == [0, 1, 2, 3, 4]  # not "seen" again
    reports = {f["stream"]: f for f in got.of_type("recovered")}
    assert {s: (r["recovered"], r["replayed"]) for s, r in reports.items()} == {
        f"uid:{uid}": (True, 5), f"group:{group}": (True, 5)
    }  # fmt: skip
    await api_send(c.api_urls[0], f"group:{group}", "live")
    assert (await got.wait(f"group:{group}", 6))[-1] == "live"

    newcomer = clients(c.ws_urls[0], f"new{unique}", positions={f"uid:new{unique}": [None, 0]})
    news = Received(newcomer)
    await newcomer.connect()
    assert await news.wait(f"uid:new{unique}", 1) == ["welcome"]
    await got.stop()
    await news.stop()


async def test_explicit_resume_replays_what_was_asked(
    redis_url: str, make_cluster: Any, clients: Any, unique: str
) -> None:
    c = make_cluster(redis_url, 1, RULES)
    client = clients(c.ws_urls[0], f"x{unique}")
    await client.connect()
    got = Received(client)
    for i in range(4):
        await api_send(c.api_urls[0], f"group:x{unique}", i)
    ack = await client.resume({f"group:x{unique}": [None, 0]}, presence=[f"group:x{unique}"])
    entry = ack["streams"][f"group:x{unique}"]
    assert (entry["recovered"], entry["replayed"], entry["offset"]) == (True, 4, 4)
    assert client.groups == {f"x{unique}": True}
    assert await got.wait(f"group:x{unique}", 4) == [0, 1, 2, 3]
    ack = await client.resume({f"group:x{unique}": None})  # from its own position: nothing
    assert ack["streams"][f"group:x{unique}"]["replayed"] == 0
    ack = await client.resume({f"group:x{unique}": [entry["epoch"], 2]})  # asked again
    assert ack["streams"][f"group:x{unique}"]["replayed"] == 2
    assert await got.wait(f"group:x{unique}", 6) == [0, 1, 2, 3, 2, 3]
    ack = await client.resume({f"uid:other{unique}": [None, 0]})
    assert ack["streams"][f"uid:other{unique}"] == {"error": "forbidden"}
    assert got.of_type("recovered") == []  # an explicit resume answers its caller only
    await got.stop()


# -- lost history ----------------------------------------------------------------------------


async def test_lost_store_is_reported(
    own_valkey: EmbeddedRedis, make_cluster: Any, clients: Any, unique: str
) -> None:
    """The store restarted empty: a client that comes back gets ``recovered: false`` with
    ``epoch_changed`` and what the new epoch holds; one that stayed connected gets a ``gap``
    naming the new epoch, also when position checks ran on the empty store before the next
    append (they once announced a gap with epoch "")."""
    c = make_cluster(own_valkey.url, 3, [*RULES, "--check-interval", "0.2"])
    stream = f"group:l{unique}"
    away = clients(c.ws_urls[0], f"a{unique}", max_handshake_retries=100)
    stays = clients(c.ws_urls[1], f"s{unique}")
    for client in (away, stays):
        await client.connect()
        await client.join(f"l{unique}")
    got_away, got_stays = Received(away), Received(stays)
    for i in range(3):
        await api_send(c.api_urls[2], stream, i)
    for got in (got_away, got_stays):
        assert await got.wait(stream, 3) == [0, 1, 2]
    old_epoch = away.positions()[stream][0]
    away.url = f"ws://127.0.0.1:{free_port()}/ws"
    c.kill(0)
    await until(lambda: not away.connected, 5)
    await asyncio.to_thread(own_valkey.restart, 0.3)
    await asyncio.sleep(1.5)  # several position checks find the store empty
    deadline = time.monotonic() + 20
    while True:  # refused (503) until the node has its store back
        try:
            await api_send(c.api_urls[2], stream, "after")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    away.url = c.ws_urls[2]
    await until(lambda: away.connected and away.reconnects == 1)
    assert await got_away.wait(stream, 4) == [0, 1, 2, "after"]
    reports = {f["stream"]: f for f in got_away.of_type("recovered")}
    assert set(reports) == {stream, f"uid:a{unique}"}
    report = reports[stream]
    assert (report["recovered"], report["reason"]) == (False, "epoch_changed")
    assert report["epoch"] != old_epoch and report["replayed"] == 1
    assert away.positions()[stream] == [report["epoch"], 1]

    assert await got_stays.wait(stream, 4) == [0, 1, 2, "after"]
    [gap] = got_stays.of_type("gap")
    assert (gap["stream"], gap["reason"], gap["epoch"]) == (stream, "epoch_changed",
                                                            report["epoch"])  # fmt: skip
    assert stays.positions()[stream] == [report["epoch"], 1]
    await got_away.stop()
    await got_stays.stop()


# -- duplicates ------------------------------------------------------------------------------


async def test_replayed_and_live_is_delivered_once(
    redis_url: str, make_cluster: Any, clients: Any, unique: str
) -> None:
    """Messages already on their way to the client when it sends a resume from its position
    come twice, live and replayed: the client delivers each once, in order."""
    c = make_cluster(redis_url, 2, RULES)
    uid = f"d{unique}"
    stream = f"uid:{uid}"
    client = clients(c.ws_urls[0], uid)
    await client.connect()
    got = Received(client)
    await api_send(c.api_urls[1], stream, "before")
    await until(lambda: client.positions()[stream][1] == 1, 5)

    def publish() -> None:  # from another thread while this loop does not read its socket
        for n in range(3):
            body = json.dumps({"to": stream, "data": n}).encode()
            request = urllib.request.Request(f"{c.api_urls[1]}/api/send", body, method="POST")
            with urllib.request.urlopen(request, timeout=5) as r:
                assert r.status == 200

    thread = threading.Thread(target=publish)
    thread.start()
    thread.join()
    time.sleep(0.5)  # noqa: ASYNC251  (they reach the socket; the client has not read them)
    ack = await client.resume({stream: None})  # from offset 1: what the socket holds again
    assert ack["streams"][stream]["replayed"] == 3
    assert await got.wait(stream, 4) == ["before", 0, 1, 2]
    assert client.duplicates == 3
    assert got.offsets(stream) == [1, 2, 3, 4]
    await got.stop()


async def test_uid_bound_by_the_token_is_resumed(
    redis_url: str, make_cluster: Any, clients: Any, unique: str
) -> None:
    """On a JWT node the uid is bound by the handshake (no login needed): the client logs in
    with its token once to learn the uid's position, so what comes while it is away is
    replayed after a reconnect."""
    secret = "resume-test-secret-0123456789abcdefghij"
    c = make_cluster(redis_url, 2, [*RULES, "--jwt-secret", secret])
    uid = f"t{unique}"
    token = jwt.encode({"sub": uid, "exp": int(time.time()) + 600}, secret, "HS256")
    client = clients(c.ws_urls[0], token=token)
    got = Received(client)
    await client.connect()
    assert client.uid == uid and list(client.positions()) == [f"uid:{uid}"]
    client.url = f"ws://127.0.0.1:{free_port()}/ws"
    c.kill(0)
    await until(lambda: not client.connected, 5)
    for i in range(3):
        await api_send(c.api_urls[1], f"uid:{uid}", i)
    client.url = c.ws_urls[1]
    await until(lambda: client.connected and client.reconnects == 1)
    assert await got.wait(f"uid:{uid}", 3) == [0, 1, 2]
    [report] = got.of_type("recovered")
    assert (report["stream"], report["recovered"], report["replayed"]) == (f"uid:{uid}", True, 3)
    await got.stop()

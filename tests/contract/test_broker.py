"""The Broker contract (broker/base.py), run against every implementation.

Redis runs against a private valkey-server (conftest); the outage tests kill, restart,
freeze (SIGSTOP) or disconnect their own server. Publishing and subscribing use two
instances, as two nodes would. Channels are prefixed with the test's namespace.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from wscluster.broker import Broker, create_broker
from wscluster.broker.memory import MemoryBroker, get_hub
from wscluster.broker.redis import RedisBroker
from wscluster.embedded import ChildServer, EmbeddedNats, EmbeddedRedis
from wscluster.errors import BrokerUnavailable

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # upper bound for anything the tests wait for


async def until(cond: Callable[[], bool], within: float = WAIT, what: str = "condition") -> None:
    """Poll ``cond`` (it may look at broker properties, not only callbacks) until it holds."""
    try:
        async with asyncio.timeout(within):
            while True:
                if cond():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not reached within {within} s: {what}") from None


async def freeze(pid: int) -> None:
    """SIGSTOP the server and wait until it is stopped (delivery is not synchronous)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] in ("T", "t")
        except OSError:  # no /proc: cannot tell
            return True

    await until(stopped, what="server stopped")


class Inbox:
    """on_message / on_state recorder of one broker."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.states: list[bool] = []

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages.append((channel, payload))

    def on_state(self, connected: bool) -> None:
        self.states.append(connected)

    async def wait(self, n: int, within: float = WAIT) -> list[tuple[str, bytes]]:
        await until(lambda: len(self.messages) >= n, within, f"{n} messages")
        return self.messages

    def payloads(self, channel: str) -> list[bytes]:
        return [p for c, p in self.messages if c == channel]


class Cluster:
    """Brokers opened on one URL; all closed at the end of the test."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.ns = namespace
        self.kind = url.partition(":")[0]
        self.opened: list[Broker] = []

    def ch(self, name: str) -> str:
        return f"{self.ns}:{name}"

    async def make(self, inbox: Inbox | None = None, **kwargs: Any) -> Broker:
        b = create_broker(self.url, **kwargs)
        self.opened.append(b)
        if inbox is None:
            await b.start()
        else:
            await b.start(inbox.on_message, inbox.on_state)
        return b

    async def aclose(self) -> None:
        for b in self.opened:
            await b.close()


BACKENDS = {  # param -> fixture giving its URL (None: memory, named by the namespace)
    "memory": None,
    "redis": "redis_url",
    "nats": "nats_url",
    "rabbitmq": "amqp_url",
}
for _name, _module in (("nats", "nats"), ("rabbitmq", "rabbitmq")):  # while being written
    if importlib.util.find_spec(f"wscluster.broker.{_module}") is None:
        del BACKENDS[_name]


@pytest.fixture(params=list(BACKENDS))
async def cluster(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Cluster]:
    fixture = BACKENDS[request.param]
    url = f"memory://{namespace}" if fixture is None else request.getfixturevalue(fixture)
    c = Cluster(url, namespace)
    yield c
    await c.aclose()


@pytest.fixture(params=[b for b in ("redis", "nats") if b in BACKENDS])
async def private(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[tuple[ChildServer, Cluster]]:
    """A server of this test's own (it may be frozen or killed) and brokers on it."""
    server: ChildServer = request.getfixturevalue(
        "own_valkey" if request.param == "redis" else "own_nats"
    )
    c = Cluster(server.url, namespace)
    yield server, c
    await c.aclose()


@pytest.fixture
async def own_cluster(own_valkey: EmbeddedRedis, namespace: str) -> AsyncIterator[Cluster]:
    c = Cluster(own_valkey.url, namespace)
    yield c
    await c.aclose()


# --- the contract, for every implementation ------------------------------------------------
async def test_round_trip(cluster: Cluster) -> None:
    inbox, states = Inbox(), Inbox()
    pub = await cluster.make(states)
    sub = await cluster.make(inbox)
    assert pub.connected and sub.connected
    assert states.states == [True]
    await sub.subscribe([cluster.ch("a")])
    await pub.publish(cluster.ch("a"), b"hello")
    await pub.publish(cluster.ch("a"), b"\x00\xffbinary")
    ch = cluster.ch("a")
    assert await inbox.wait(2) == [(ch, b"hello"), (ch, b"\x00\xffbinary")]


async def test_subscribe_barrier(cluster: Cluster) -> None:
    """A message published right after subscribe() returns is received."""
    inbox = Inbox()
    pub = await cluster.make()
    sub = await cluster.make(inbox)
    for i in range(50):
        ch = cluster.ch(f"barrier{i}")
        await sub.subscribe([ch])
        pub.publish_nowait(ch, b"%d" % i)
    await inbox.wait(50)
    assert [p for _, p in inbox.messages] == [b"%d" % i for i in range(50)]


async def test_unsubscribe_stops_delivery(cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await cluster.make()
    sub = await cluster.make(inbox)
    gone, kept = cluster.ch("gone"), cluster.ch("kept")
    await sub.subscribe([gone, kept])
    await pub.publish(gone, b"1")
    await inbox.wait(1)
    await sub.unsubscribe([gone])
    await sub.unsubscribe([gone])  # twice is harmless
    pub.publish_nowait(gone, b"2")
    await pub.publish(kept, b"3")  # FIFO: had "2" been delivered, it would come before "3"
    await inbox.wait(2)
    await asyncio.sleep(0.05)
    assert inbox.messages == [(gone, b"1"), (kept, b"3")]


async def test_fifo_5000_back_to_back(cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await cluster.make()
    sub = await cluster.make(inbox)
    ch = cluster.ch("fifo")
    await sub.subscribe([ch])
    futs = [pub.publish_nowait(ch, b"%06d" % i) for i in range(5000)]
    assert pub.pending_bytes == 5000 * 6
    await asyncio.gather(*futs)
    assert pub.pending_bytes == 0
    await inbox.wait(5000)
    assert inbox.payloads(ch) == [b"%06d" % i for i in range(5000)]


async def test_many_channels_in_one_call(cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await cluster.make()
    sub = await cluster.make(inbox)
    chans = [cluster.ch(f"m{i}") for i in range(1234)]  # more than one SUBSCRIBE batch
    await sub.subscribe(chans + chans[:10])  # duplicates are fine
    await asyncio.gather(*(pub.publish_nowait(ch, ch.encode()) for ch in chans))
    await inbox.wait(len(chans))
    assert sorted(inbox.messages) == sorted((ch, ch.encode()) for ch in chans)
    await sub.unsubscribe(chans)
    await pub.publish(chans[0], b"late")
    await asyncio.sleep(0.05)
    assert len(inbox.messages) == len(chans)


async def test_publish_without_subscriber_resolves(cluster: Cluster) -> None:
    pub = await cluster.make()
    await pub.publish(cluster.ch("nobody"), b"x")
    await pub.publish_nowait(cluster.ch("nobody"), b"")
    assert pub.pending_bytes == 0


async def test_queue_full_and_pending_bytes(cluster: Cluster) -> None:
    pub = await cluster.make(max_pending_bytes=1000)
    ok = pub.publish_nowait(cluster.ch("q"), b"x" * 600)
    full = pub.publish_nowait(cluster.ch("q"), b"x" * 600)
    assert pub.pending_bytes == 600
    with pytest.raises(BrokerUnavailable, match="queue full"):
        await full
    await ok
    assert pub.pending_bytes == 0


async def test_close_fails_pending_and_stops_tasks(cluster: Cluster) -> None:
    before = asyncio.all_tasks()
    inbox = Inbox()
    pub = await cluster.make(inbox)
    futs = [pub.publish_nowait(cluster.ch("c"), b"x") for _ in range(100)]
    await pub.close()
    assert all(f.done() for f in futs)
    for f in futs:
        assert isinstance(f.exception(), BrokerUnavailable)
    assert not pub.connected and pub.pending_bytes == 0
    assert asyncio.all_tasks() == before
    with pytest.raises(BrokerUnavailable):
        await pub.publish(cluster.ch("c"), b"after close")
    with pytest.raises(BrokerUnavailable):
        await pub.subscribe([cluster.ch("c")])
    await pub.close()  # idempotent
    assert inbox.states == [True]


def test_create_broker_schemes() -> None:
    assert isinstance(create_broker("memory://x"), MemoryBroker)
    assert isinstance(create_broker("memory://"), MemoryBroker)
    for url in ("redis://127.0.0.1:1/0", "rediss://h:1", "unix:///tmp/none.sock"):
        assert isinstance(create_broker(url, connect_timeout=1.0), RedisBroker)
    if "rabbitmq" in BACKENDS:
        from wscluster.broker.rabbitmq import RabbitMQBroker

        assert isinstance(create_broker("amqp://guest:guest@h:5672/"), RabbitMQBroker)
    if "nats" in BACKENDS:
        from wscluster.broker.nats import NatsBroker

        assert isinstance(create_broker("nats://h:4222"), NatsBroker)
    for url in ("http://h", "localhost:6379"):
        with pytest.raises(ValueError, match=r"redis://, rediss://, unix://, memory://"):
            create_broker(url)


# --- memory only ----------------------------------------------------------------------------
async def test_memory_simulated_outage(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "wscluster.broker")
    url = f"memory://{namespace}"
    inbox, pub_states = Inbox(), Inbox()
    pub, sub = MemoryBroker(url, connect_timeout=0.2), MemoryBroker(url, connect_timeout=0.2)
    await pub.start(None, pub_states.on_state)
    await sub.start(inbox.on_message, inbox.on_state)
    try:
        await sub.subscribe([f"{namespace}:a"])
        queued = pub.publish_nowait(f"{namespace}:a", b"queued")
        get_hub(namespace).set_down(True)
        assert inbox.states == [True, False] and pub_states.states == [True, False]
        assert not pub.connected
        with pytest.raises(BrokerUnavailable):
            await queued
        with pytest.raises(BrokerUnavailable):
            await pub.publish(f"{namespace}:a", b"lost")
        with pytest.raises(BrokerUnavailable):
            await sub.subscribe([f"{namespace}:b"])  # times out, stays remembered
        get_hub(namespace).set_down(False)
        assert inbox.states == [True, False, True] and pub.connected
        await pub.publish(f"{namespace}:a", b"1")
        await pub.publish(f"{namespace}:b", b"2")
        assert await inbox.wait(2) == [(f"{namespace}:a", b"1"), (f"{namespace}:b", b"2")]
    finally:
        await pub.close()
        await sub.close()
    text = caplog.text
    assert text.count("broker lost") == 2 and text.count("broker back after") == 2


# --- redis only -----------------------------------------------------------------------------
async def test_redis_server_restart(
    own_valkey: EmbeddedRedis, own_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "wscluster.broker")
    inbox, pub_states = Inbox(), Inbox()
    pub = await own_cluster.make(pub_states)
    sub = await own_cluster.make(inbox)
    ch = own_cluster.ch("r")
    await sub.subscribe([ch])
    await asyncio.to_thread(own_valkey.restart)
    await until(lambda: inbox.states[-2:] == [False, True], what="subscriber down and up")
    await until(lambda: pub_states.states[-2:] == [False, True], what="publisher down and up")
    await pub.publish(ch, b"after restart")  # the subscription was restored by itself
    assert await inbox.wait(1) == [(ch, b"after restart")]
    assert caplog.text.count("broker lost") == 2  # once per broker and outage
    assert caplog.text.count("broker back after") == 2
    assert "after restart" not in caplog.text  # payloads are never logged


async def test_redis_client_kill_pubsub(own_valkey: EmbeddedRedis, own_cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await own_cluster.make()
    sub = await own_cluster.make(inbox)
    chans = [own_cluster.ch(f"k{i}") for i in range(700)]
    await sub.subscribe(chans)
    async with aioredis.from_url(own_valkey.url) as admin:
        names = [c["name"] for c in await admin.client_list()]
        assert names.count("wsc-pub") == 2 and names.count("wsc-sub") == 2
        assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await until(lambda: inbox.states[-2:] == [False, True], what="resubscribed")
        assert await admin.pubsub_numsub(chans[0]) == [(chans[0].encode(), 1)]
    await asyncio.gather(*(pub.publish_nowait(ch, b"k") for ch in chans))
    await inbox.wait(len(chans))
    assert {c for c, _ in inbox.messages} == set(chans)


@pytest.mark.parametrize("kind", [b for b in ("redis", "nats") if b in BACKENDS])
async def test_down_at_start(kind: str, namespace: str) -> None:
    server: ChildServer = EmbeddedRedis() if kind == "redis" else EmbeddedNats()
    inbox, pub_states = Inbox(), Inbox()
    url = server.url
    pub = create_broker(url, connect_timeout=0.3)
    sub = create_broker(url, connect_timeout=0.3)
    ch = f"{namespace}:s"
    try:
        t0 = time.monotonic()
        await pub.start(None, pub_states.on_state)
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert not pub.connected and pub_states.states == []
        with pytest.raises(BrokerUnavailable):
            await pub.publish(ch, b"x")
        await sub.start(inbox.on_message, inbox.on_state)
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await sub.subscribe([ch])  # not confirmed in time, but remembered
        assert time.monotonic() - t0 < 2.0
        await asyncio.to_thread(server.start)
        await until(lambda: pub.connected and sub.connected)
        assert pub_states.states == [True] and inbox.states == [True]
        await pub.publish(ch, b"hello")
        assert await inbox.wait(1) == [(ch, b"hello")]
    finally:
        await pub.close()
        await sub.close()
        server.cleanup()


async def test_publish_while_down_fails_fast(private: tuple[ChildServer, Cluster]) -> None:
    server, cluster = private
    inbox, pub_states = Inbox(), Inbox()
    pub = await cluster.make(pub_states)
    sub = await cluster.make(inbox, connect_timeout=1.0)
    ch = cluster.ch("d")
    await sub.subscribe([ch])
    await asyncio.to_thread(server.stop, kill=True)
    await until(lambda: pub_states.states[-1:] == [False] and not sub.connected)
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await pub.publish(ch, b"lost")
        assert time.monotonic() - t0 < 1.0
    assert pub.pending_bytes == 0
    with pytest.raises(BrokerUnavailable):  # not confirmed in time, but remembered
        await asyncio.wait_for(sub.subscribe([cluster.ch("later")]), WAIT)
    await asyncio.to_thread(server.start)
    await until(lambda: pub.connected and sub.connected)
    await pub.publish(ch, b"back")
    await pub.publish(cluster.ch("later"), b"later")
    assert await inbox.wait(2) == [(ch, b"back"), (cluster.ch("later"), b"later")]


async def test_frozen_server_is_detected(private: tuple[ChildServer, Cluster]) -> None:
    """A server that stops answering (SIGSTOP: TCP stays up) is declared lost within ~5 s."""
    server, cluster = private
    inbox = Inbox()
    sub = await cluster.make(inbox, connect_timeout=1.0)
    await sub.subscribe([cluster.ch("f")])
    pid = server.pid
    assert pid is not None
    await freeze(pid)
    try:
        t0 = time.monotonic()
        await until(lambda: inbox.states[-1:] == [False], within=8.0)
        assert time.monotonic() - t0 < 6.0
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: inbox.states[-1:] == [True] and sub.connected)


async def test_in_flight_messages_fail_when_link_breaks(
    private: tuple[ChildServer, Cluster],
) -> None:
    """Messages sent but not acknowledged when the server dies fail; none resolves as sent."""
    server, cluster = private
    pub = await cluster.make()
    ch = cluster.ch("inflight")
    await pub.publish(ch, b"warm-up")
    pid = server.pid
    assert pid is not None
    await freeze(pid)
    try:
        futs = [pub.publish_nowait(ch, b"x" * 1000) for _ in range(200)]
        await asyncio.sleep(0.2)  # written to the socket, no acknowledgement yet
        assert pub.pending_bytes == 200_000 and not any(f.done() for f in futs)
    finally:
        await asyncio.to_thread(server.stop, kill=True)  # SIGKILL works on a stopped process
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), WAIT)
    assert all(isinstance(r, BrokerUnavailable) for r in results)
    assert pub.pending_bytes == 0


async def test_publish_timeout(private: tuple[ChildServer, Cluster]) -> None:
    server, cluster = private
    pub = await cluster.make(publish_timeout=0.5, connect_timeout=1.0)
    ch = cluster.ch("slow")
    await pub.publish(ch, b"warm-up")
    pid = server.pid
    assert pid is not None
    await freeze(pid)
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await pub.publish(ch, b"unanswered")
        assert 0.4 < time.monotonic() - t0 < 2.0
        assert not pub.connected
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: pub.connected)
    await pub.publish(ch, b"answered")

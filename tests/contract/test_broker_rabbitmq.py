"""RabbitMQ-only broker tests. The machine's RabbitMQ is shared: nothing here stops it, closes
other clients' connections or touches the shared exchange's other bindings. Network failures
are real ones, made by a TCP proxy run in the test (``Proxy``) between the broker and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator

import pytest

from tests.contract.test_broker import WAIT, Cluster, Inbox, until
from wscluster.broker.rabbitmq import RabbitMQBroker, routing_key
from wscluster.embedded import free_port
from wscluster.errors import BrokerUnavailable

pytestmark = pytest.mark.timeout(60)


class Proxy:
    """A TCP forwarder to RabbitMQ that the test can cut (connections reset, new ones
    refused), freeze (nothing forwarded: a silent link) and restore."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._user = f"{parts.username}:{parts.password}@" if parts.username else ""
        self.port = port
        self.refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"amqp://{self._user}127.0.0.1:{self.port}/"

    @property
    def connections(self) -> int:
        return len(self._writers) // 2

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self, refuse: bool = True) -> None:
        """Reset every forwarded connection; while ``refuse``, new ones are closed at once."""
        self.refusing = refuse
        for writer in list(self._writers):
            writer.transport.abort()

    def freeze(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self.refusing = False
        self._flowing.set()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        self._flowing.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.refusing:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                return
            self._writers.update((writer, up_writer))
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # frozen while reading: hold the data back
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()  # one side gone: the other goes too


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[Proxy]:
    p = Proxy(amqp_url)
    await p.start()
    yield p
    await p.aclose()


@pytest.fixture
async def rabbit(amqp_url: str, namespace: str) -> AsyncIterator[Cluster]:
    c = Cluster(amqp_url, namespace)
    yield c
    await c.aclose()


@pytest.fixture
async def via_proxy(proxy: Proxy, namespace: str) -> AsyncIterator[Cluster]:
    c = Cluster(proxy.url, namespace)
    yield c
    await c.aclose()


def test_routing_key_mapping() -> None:
    assert routing_key("ns:uid:alice") == "ns:uid:alice"
    fits = "a" * 255
    assert routing_key(fits) == fits
    for channel in ("a" * 256, "é" * 128, "#ns:x", "#"):
        key = routing_key(channel)
        assert key.startswith("#") and len(key.encode()) <= 255 and key != channel
    assert routing_key("a" * 256) != routing_key("a" * 257)  # injective
    assert routing_key("#x") != routing_key(routing_key("#x"))


async def test_long_and_non_ascii_channels(rabbit: Cluster) -> None:
    inbox = Inbox()
    pub = await rabbit.make()
    sub = await rabbit.make(inbox)
    prefix = rabbit.ch("g:")
    channels = [
        rabbit.ch("uid:Zoë 中文 😀"),
        prefix + "x" * (255 - len(prefix.encode())),  # exactly 255 bytes: kept as it is
        prefix + "x" * (256 - len(prefix.encode())),  # 256 bytes: hashed
        prefix + "😀" * 128,  # 512 bytes of UTF-8
        prefix + "😀" * 127 + "a",  # same first 255 bytes as the previous one
        "#" + rabbit.ch("looks-hashed"),
    ]
    await sub.subscribe(channels)
    for i, channel in enumerate(channels):
        pub.publish_nowait(channel, b"%d" % i)
    await pub.publish(rabbit.ch("other"), b"unsubscribed")
    await inbox.wait(len(channels))
    await asyncio.sleep(0.05)
    assert inbox.messages == [(ch, b"%d" % i) for i, ch in enumerate(channels)]
    await sub.unsubscribe(channels[2:])
    await pub.publish(channels[3], b"gone")
    await pub.publish(channels[0], b"kept")
    await inbox.wait(len(channels) + 1)
    assert inbox.messages[-1] == (channels[0], b"kept")


async def test_large_payloads_round_trip(rabbit: Cluster) -> None:
    inbox = Inbox()
    pub = await rabbit.make()
    sub = await rabbit.make(inbox)
    ch = rabbit.ch("big")
    await sub.subscribe([ch])
    payloads = [bytes(range(256)) * 240, b"\x00" * (300 << 10)]  # 60 KiB; > one AMQP frame
    for payload in payloads:
        await pub.publish(ch, payload)
    assert await inbox.wait(2) == [(ch, p) for p in payloads]


async def test_connection_cut_restores_bindings(
    proxy: Proxy, via_proxy: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "wscluster.broker")
    inbox, pub_states = Inbox(), Inbox()
    pub = await via_proxy.make(pub_states, connect_timeout=1.0)
    sub = await via_proxy.make(inbox, connect_timeout=1.0)
    assert proxy.connections == 4  # a publishing and a subscribing link per broker
    chans = [via_proxy.ch(f"cut{i}") for i in range(300)] + [via_proxy.ch("ü" * 200)]
    await sub.subscribe(chans)
    proxy.cut()
    await until(lambda: inbox.states == [True, False] and pub_states.states == [True, False])
    assert not pub.connected and not sub.connected
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await pub.publish(chans[0], b"secret-payload")
        assert time.monotonic() - t0 < 0.5
    assert pub.pending_bytes == 0
    await asyncio.sleep(0.3)  # a few refused reconnects
    proxy.restore()
    await until(lambda: inbox.states == [True, False, True] and pub.connected)
    assert pub_states.states == [True, False, True]
    await asyncio.gather(*(pub.publish_nowait(ch, ch.encode()) for ch in chans))
    await inbox.wait(len(chans))
    assert sorted(inbox.messages) == sorted((ch, ch.encode()) for ch in chans)
    assert caplog.text.count("broker lost") == 2  # once per broker and outage
    assert caplog.text.count("broker back after") == 2
    assert "secret-payload" not in caplog.text  # payloads are never logged


async def test_deleted_queue_is_replaced(rabbit: Cluster) -> None:
    """The broker cancels the consumer of a deleted queue (the channel stays open): the
    subscribing link starts over with a new queue and every binding."""
    inbox = Inbox()
    pub = await rabbit.make()
    sub = await rabbit.make(inbox)
    ch = rabbit.ch("deleted")
    await sub.subscribe([ch])
    assert isinstance(sub, RabbitMQBroker)
    link = sub._sub  # an exclusive queue: only its own connection may delete it
    assert link._raw is not None
    old = link._queue
    await link._raw.queue_delete(old)
    await until(lambda: inbox.states == [True, False, True] and link._queue != old)
    await pub.publish(ch, b"new queue")
    assert await inbox.wait(1) == [(ch, b"new queue")]


async def test_unconfirmed_messages_fail_when_link_breaks(proxy: Proxy, via_proxy: Cluster) -> None:
    """Messages published but not confirmed when the link breaks fail; none resolves as sent."""
    pub = await via_proxy.make(connect_timeout=1.0, publish_timeout=30.0)
    ch = via_proxy.ch("inflight")
    await pub.publish(ch, b"warm-up")
    proxy.freeze()
    futs = [pub.publish_nowait(ch, b"x" * 1000) for _ in range(200)]
    await asyncio.sleep(0.3)  # handed to aiormq, no confirms can come back
    assert pub.pending_bytes == 200_000 and not any(f.done() for f in futs)
    proxy.cut()
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), WAIT)
    assert all(isinstance(r, BrokerUnavailable) for r in results)
    assert pub.pending_bytes == 0
    proxy.restore()
    await until(lambda: pub.connected)
    await pub.publish(ch, b"after")


async def test_publish_timeout_on_silent_link(proxy: Proxy, via_proxy: Cluster) -> None:
    pub = await via_proxy.make(connect_timeout=1.0, publish_timeout=0.5)
    ch = via_proxy.ch("slow")
    await pub.publish(ch, b"warm-up")
    proxy.freeze()
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await pub.publish(ch, b"unconfirmed")
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert not pub.connected
    proxy.restore()
    await until(lambda: pub.connected)
    await pub.publish(ch, b"confirmed")


async def test_silent_subscriber_link_is_detected(proxy: Proxy, namespace: str) -> None:
    """With ?heartbeat=1, a link that carries nothing any more is declared lost in ~6 s."""
    inbox = Inbox()
    sub = RabbitMQBroker(proxy.url + "?heartbeat=1", connect_timeout=1.0)
    try:
        await sub.start(inbox.on_message, inbox.on_state)
        await sub.subscribe([f"{namespace}:hb"])
        proxy.freeze()
        t0 = time.monotonic()
        await until(lambda: inbox.states[-1:] == [False], within=12.0)
        assert time.monotonic() - t0 < 9.0
        proxy.cut(refuse=False)  # drop the frozen connections
        proxy.restore()
        await until(lambda: inbox.states[-1:] == [True] and sub.connected)
    finally:
        await sub.close()


async def test_down_at_start(amqp_url: str, namespace: str) -> None:
    port = free_port()
    inbox, pub_states = Inbox(), Inbox()
    proxy = Proxy(amqp_url, port)  # nothing listens on the port until it starts
    pub = RabbitMQBroker(proxy.url, connect_timeout=0.3)
    sub = RabbitMQBroker(proxy.url, connect_timeout=0.3)
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
        await proxy.start()
        await until(lambda: pub.connected and sub.connected)
        assert pub_states.states == [True] and inbox.states == [True]
        await pub.publish(ch, b"hello")
        assert await inbox.wait(1) == [(ch, b"hello")]
    finally:
        await pub.close()
        await sub.close()
        await proxy.aclose()

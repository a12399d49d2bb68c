"""NATS-only broker tests (the shared contract is in test_broker.py): outages of a private
nats-server that each test may kill, restart or freeze, subject mapping, payload limits."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from tests.contract.test_broker import Cluster, Inbox, until
from wscluster.broker import create_broker
from wscluster.broker.nats import (
    MAX_CHANNEL_BYTES,
    NatsBroker,
    channel_subject,
    subject_channel,
)
from wscluster.embedded import EmbeddedNats, free_port
from wscluster.errors import BrokerUnavailable

pytestmark = pytest.mark.timeout(60)

ODD_NAMES = [
    "uid:alice",
    "uid:a.b",
    "uid:a:b",
    "uid:a b",
    "uid: leading and trailing ",
    "uid:*",
    "uid:>",
    "uid:a.*.>",
    "group:*.>",
    "group:tab\tnew\nline\r",
    "uid:élève",
    "uid:用户",
    "uid:" + "🙂" * 128,  # 128 four-byte characters
    "uid:" + "x" * 128,
    "uid:",
    "uid:_INBOX.x",
    "uid:$SYS.>",
]


@pytest.fixture
async def own_cluster(own_nats: EmbeddedNats, namespace: str) -> AsyncIterator[Cluster]:
    c = Cluster(own_nats.url, namespace)
    yield c
    await c.aclose()


@pytest.fixture
async def nats_cluster(nats_url: str, namespace: str) -> AsyncIterator[Cluster]:
    c = Cluster(nats_url, namespace)
    yield c
    await c.aclose()


def test_subject_mapping_is_valid_and_injective() -> None:
    names = [*ODD_NAMES, "", ".", "a.b", "a:b", "a", "a=", "a==", "b64:YQ", "YQ"]
    subjects = [channel_subject(n) for n in names]
    assert len(set(subjects)) == len(names)
    for subject in subjects:
        prefix, token = subject.split(".", 1)
        assert prefix == "wsc" and token.startswith("c")
        assert not any(c in token for c in ".*> \t\r\n")
        assert token.isascii()
    assert [subject_channel(s.encode()) for s in subjects] == names
    for foreign in ("wsc.cYQ=", "wsc.cY!Q", "wsc.c_w", "wsc.x", "_INBOX.abc", "wsc.cYQ.x"):
        assert subject_channel(foreign.encode()) is None  # not made by channel_subject
    for url in ("nats://127.0.0.1:1", "tls://h:4222", "nats://a:1,nats://b:2"):
        assert isinstance(create_broker(url, connect_timeout=1.0), NatsBroker)


def test_nats_py_internals_still_fit() -> None:
    """NatsBroker replaces nats-py's Client._process_msg (one inline dispatch instead of a
    task and a queue per subscription): fail loudly if an upgrade changes its signature."""
    params = list(inspect.signature(Client._process_msg).parameters)
    assert params == ["self", "sid", "subject", "reply", "data", "headers"]


async def test_nats_order_across_channels(nats_cluster: Cluster) -> None:
    """One publisher's messages arrive in publish order, even across channels."""
    inbox = Inbox()
    pub = await nats_cluster.make()
    sub = await nats_cluster.make(inbox)
    chans = [nats_cluster.ch(f"o{i}") for i in range(7)]
    await sub.subscribe(chans)
    sent = [(chans[i * 5 % 7], b"%d" % i) for i in range(3000)]
    await asyncio.gather(*(pub.publish_nowait(ch, p) for ch, p in sent))
    assert await inbox.wait(len(sent)) == sent


async def test_nats_odd_channel_names_round_trip(nats_cluster: Cluster) -> None:
    """Every channel reaches exactly its own subscribers, under its original name: no
    wildcard, token separator, whitespace or non-ASCII character leaks into routing."""
    inbox = Inbox()
    pub = await nats_cluster.make()
    sub = await nats_cluster.make(inbox)
    chans = [nats_cluster.ch(n) for n in ODD_NAMES]
    await sub.subscribe(chans)
    others = [nats_cluster.ch(n) for n in ("uid:bob", "uid:a", "group:x.y", "uid:a b c")]
    await asyncio.gather(*(pub.publish_nowait(ch, ch.encode()) for ch in others + chans))
    await inbox.wait(len(chans))
    await pub.publish(nats_cluster.ch("uid:z"), b"")  # in order: routed after all the others
    await asyncio.sleep(0.05)
    assert sorted(inbox.messages) == sorted((ch, ch.encode()) for ch in chans)


async def test_nats_large_payloads(nats_cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await nats_cluster.make()
    sub = await nats_cluster.make(inbox)
    ch = nats_cluster.ch("big")
    await sub.subscribe([ch])
    big = bytes(range(256)) * 240  # 60 KiB
    await pub.publish(ch, big)
    assert await inbox.wait(1) == [(ch, big)]
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="refused"):  # above max_payload (1 MiB)
        await pub.publish(ch, b"x" * ((1 << 20) + 1))
    assert time.monotonic() - t0 < 0.5
    assert pub.connected and pub.pending_bytes == 0
    await pub.publish(ch, b"after")
    assert await inbox.wait(2) == [(ch, big), (ch, b"after")]


async def test_nats_too_long_channel_is_refused(nats_cluster: Cluster) -> None:
    """A subject line longer than the server's max_control_line would make it drop the
    connection (and every resubscription after it): such channels are refused at once."""
    inbox = Inbox()
    pub = await nats_cluster.make()
    sub = await nats_cluster.make(inbox)
    longest = nats_cluster.ch("é" * ((MAX_CHANNEL_BYTES - len(nats_cluster.ch(""))) // 2))
    too_long = longest + "x"
    assert len(longest.encode()) == MAX_CHANNEL_BYTES
    with pytest.raises(BrokerUnavailable, match="longer than"):
        await sub.subscribe([nats_cluster.ch("ok"), too_long])
    with pytest.raises(BrokerUnavailable, match="refused"):
        await pub.publish(too_long, b"x")
    await sub.subscribe([longest])
    await pub.publish(longest, b"longest")
    assert await inbox.wait(1) == [(longest, b"longest")]
    assert pub.connected and sub.connected and inbox.states == [True]


async def test_nats_server_restart(
    own_nats: EmbeddedNats, own_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "wscluster.broker")
    inbox, pub_states = Inbox(), Inbox()
    pub = await own_cluster.make(pub_states)
    sub = await own_cluster.make(inbox)
    chans = [own_cluster.ch(f"r{i}") for i in range(700)]
    await sub.subscribe(chans)
    await asyncio.to_thread(own_nats.restart)
    await until(lambda: inbox.states[-2:] == [False, True], what="subscriber down and up")
    await until(lambda: pub_states.states[-2:] == [False, True], what="publisher down and up")
    await pub.publish(chans[0], b"after restart")  # the subscriptions were restored
    assert await inbox.wait(1) == [(chans[0], b"after restart")]
    await asyncio.gather(*(pub.publish_nowait(ch, b"all") for ch in chans))
    await inbox.wait(1 + len(chans))
    assert {c for c, p in inbox.messages if p == b"all"} == set(chans)
    assert caplog.text.count("broker lost") == 2  # once per broker and outage
    assert caplog.text.count("broker back after") == 2
    assert "after restart" not in caplog.text  # payloads are never logged


async def test_nats_close_while_down_stops_everything(namespace: str) -> None:
    before = asyncio.all_tasks()
    broker = NatsBroker(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.2)
    await broker.start()
    waiting = asyncio.create_task(broker.subscribe([f"{namespace}:x"]))
    await asyncio.sleep(0.1)
    await broker.close()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await waiting
    assert asyncio.all_tasks() == before

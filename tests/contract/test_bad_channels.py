"""One bad item never fails a batch shared with others (issue 14), for every broker: a channel
that is not UTF-8 (a lone surrogate) published or subscribed among good ones in one go fails
alone, at once, and the links stay up (no reconnect, no ``on_state(False)``)."""

from __future__ import annotations

import asyncio

import pytest

from wscluster.broker.base import ChannelRefused
from wscluster.broker.redis import RedisBroker
from wscluster.errors import BrokerUnavailable

from .test_broker import Cluster, Inbox, until
from .test_broker import cluster as cluster  # the fixture, for every backend

pytestmark = pytest.mark.timeout(60)

BAD = "\ud800"


async def test_a_bad_channel_in_a_subscribe_fails_alone(cluster: Cluster) -> None:
    inbox = Inbox()
    pub = await cluster.make()
    sub = await cluster.make(inbox)
    good = [cluster.ch(f"g{i}") for i in range(4)]
    bad = cluster.ch(f"b{BAD}")
    with pytest.raises(ChannelRefused) as info:
        await sub.subscribe([good[0], bad, good[1]])
    assert info.value.channels == (bad,)
    assert isinstance(info.value, BrokerUnavailable)  # what callers of the contract expect
    await sub.subscribe([good[2]])
    with pytest.raises(ChannelRefused):
        await sub.subscribe([bad])
    for ch in good[:3]:
        await pub.publish(ch, ch.encode())
    await inbox.wait(3)
    assert inbox.messages == [(ch, ch.encode()) for ch in good[:3]]
    await sub.unsubscribe([bad, good[0]])  # a bad channel in an unsubscribe is ignored
    await pub.publish(good[0], b"late")
    await pub.publish(good[1], b"still")
    await inbox.wait(4)
    assert inbox.messages[3:] == [(good[1], b"still")]
    assert pub.connected and sub.connected and inbox.states == [True]


async def test_a_bad_channel_in_a_publish_batch_fails_alone(cluster: Cluster) -> None:
    inbox, pub_states = Inbox(), Inbox()
    pub = await cluster.make(pub_states)
    sub = await cluster.make(inbox)
    ch = cluster.ch("ordered")
    await sub.subscribe([ch])
    futs = []
    for i in range(300):  # one loop turn: one batch for the publishing link
        futs.append(pub.publish_nowait(ch, b"%03d" % i))
        if i % 100 == 50:
            futs.append(pub.publish_nowait(cluster.ch(f"x{BAD}{i}"), b"bad"))
    results = await asyncio.gather(*futs, return_exceptions=True)
    failed = [r for r in results if r is not None]
    assert len(failed) == 3 and all(isinstance(r, BrokerUnavailable) for r in failed), failed
    await inbox.wait(300)
    assert inbox.payloads(ch) == [b"%03d" % i for i in range(300)]
    assert pub.pending_bytes == 0
    assert pub.connected and sub.connected
    assert pub_states.states == [True] and inbox.states == [True]


async def test_redis_resubscribes_without_the_bad_channel(redis_url: str, namespace: str) -> None:
    """The bad channel was never remembered: the resubscription after a reconnect (which
    sends every remembered channel at once) goes through."""
    c = Cluster(redis_url, namespace)
    try:
        inbox = Inbox()
        pub = await c.make()
        sub = await c.make(inbox)
        assert isinstance(sub, RedisBroker)
        with pytest.raises(ChannelRefused):
            await sub.subscribe([c.ch("a"), c.ch(BAD), c.ch("b")])
        sub.restart_subscriber()
        await until(lambda: inbox.states[-2:] == [False, True], what="resubscribed")
        await pub.publish(c.ch("b"), b"after")
        assert await inbox.wait(1) == [(c.ch("b"), b"after")]
    finally:
        await c.aclose()


async def test_redis_history_append_with_a_bad_key_fails_alone(
    redis_url: str, namespace: str
) -> None:
    c = Cluster(redis_url, namespace)
    try:
        inbox = Inbox()
        pub = await c.make(inbox)
        sub = await c.make()
        assert isinstance(pub, RedisBroker)
        ch = c.ch("h")
        await sub.subscribe([ch])
        meta, stream = c.ch("hm"), c.ch("hs")
        good1 = pub.append_nowait(ch, meta, stream, b"1", 10, 60_000, 60_000)
        bad = pub.append_nowait(ch, c.ch(f"hm{BAD}"), c.ch(f"hs{BAD}"), b"x", 10, 60_000, 60_000)
        good2 = pub.append_nowait(ch, meta, stream, b"2", 10, 60_000, 60_000)
        assert (await good1)[0] == 1
        with pytest.raises(BrokerUnavailable):
            await bad
        assert (await good2)[0] == 2
        assert pub.connected and inbox.states == [True]
    finally:
        await c.aclose()

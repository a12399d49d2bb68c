"""The deaf proxy itself, against a real valkey: a deaf link still answers commands and PING
but hears no pub/sub message; a link opened afterwards hears again."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from wscluster.embedded import EmbeddedRedis

from .proxy import DeafProxy, resp_end


def test_resp_end_frames_values() -> None:
    push = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"
    assert resp_end(push) == len(push)
    assert resp_end(push[:-3]) is None
    assert resp_end(b"%1\r\n+k\r\n:1\r\n>2\r\n") == 12
    assert resp_end(b"$-1\r\n") == 5 and resp_end(b"*0\r\n") == 4


async def _next(pubsub: redis.client.PubSub, wait: float, kind: str = "message") -> object:
    async with asyncio.timeout(wait):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if msg is not None and msg["type"] == kind:
                return msg["data"]


async def test_deaf_link_hears_nothing_but_answers(valkey: EmbeddedRedis) -> None:
    proxy = DeafProxy(valkey.host, valkey.port)
    await proxy.start()
    direct = redis.Redis.from_url(valkey.url)
    via = redis.Redis.from_url(proxy.url)
    sub = via.pubsub()
    try:
        await sub.subscribe("chaos-proxy")
        await direct.publish("chaos-proxy", b"one")
        assert await _next(sub, 2) == b"one"
        assert proxy.go_deaf() >= 1
        await direct.publish("chaos-proxy", b"two")
        await sub.ping()
        assert await _next(sub, 2, "pong") == b""  # answered: the deaf link looks healthy
        try:
            got = await _next(sub, 0.5)
        except TimeoutError:
            got = None
        assert got is None and proxy.dropped == 1
        assert await via.ping() is True  # a new connection through the proxy works
        fresh = via.pubsub()
        await fresh.subscribe("chaos-proxy")
        await direct.publish("chaos-proxy", b"three")
        assert await _next(fresh, 2) == b"three"
        await fresh.aclose()
    finally:
        await sub.aclose()
        await via.aclose()
        await direct.aclose()
        await proxy.close()

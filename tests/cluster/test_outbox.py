"""Slow consumers (--outbox-policy): a client that stops reading is closed 1013 by default;
in a drop-oldest stream it stays open and loses the oldest queued messages instead."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
# an outbox above the transport's 64 KiB high-water mark: a reply to a congested client fits
OPTIONS = ["--outbox-policy", "group:ticker:*=drop-oldest", "--max-outbox", "262144"]
BLOB = "x" * 1000


class StalledClient:
    """A WebSocket client written by hand on a socket with a small receive buffer, which reads
    only when the test asks it to: between two reads it is a client that stopped reading."""

    opened: list[StalledClient] = []  # see close_all

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.ids = 0
        StalledClient.opened.append(self)

    @classmethod
    async def open(cls, port: int, rcvbuf: int = 4096) -> StalledClient:
        sock = socket.socket()
        client = cls(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before the window
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        while b"\r\n\r\n" not in client.buf:
            await client._fill(len(client.buf) + 1)
        head, _, rest = bytes(client.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client.buf = bytearray(rest)
        welcome = await client.next()
        assert welcome["type"] == "welcome", welcome
        return client

    async def _fill(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self.buf) < n:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise EOFError("connection closed without a close frame")
            self.buf += data

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload)."""
        await self._fill(2)
        size, head = self.buf[1] & 0x7F, 2
        if size == 126:
            await self._fill(4)
            size, head = int.from_bytes(self.buf[2:4], "big"), 4
        elif size == 127:
            await self._fill(10)
            size, head = int.from_bytes(self.buf[2:10], "big"), 10
        await self._fill(head + size)
        opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[head : head + size])
        del self.buf[: head + size]
        return opcode, payload

    async def next(self) -> dict[str, Any]:
        """The next text frame, decoded; AssertionError on a close frame (with its code)."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                raise AssertionError(f"closed {int.from_bytes(payload[:2], 'big')}")
            if opcode == 1:
                frame: dict[str, Any] = json.loads(payload)
                return frame

    async def close_code(self) -> int:
        """Read until the close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                return int.from_bytes(payload[:2], "big")

    async def send(self, frame: dict[str, Any]) -> int:
        """Send a (small) frame with a new id; the id."""
        self.ids += 1
        data = json.dumps({**frame, "id": self.ids}).encode()
        assert len(data) < 126
        mask = b"\x00\x00\x00\x00"  # a zero mask leaves the payload as it is
        await asyncio.get_running_loop().sock_sendall(
            self.sock, bytes([0x81, 0x80 | len(data)]) + mask + data
        )
        return self.ids

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        frame_id = await self.send(frame)
        while True:
            reply = await self.next()
            if reply.get("id") == frame_id:
                return reply

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def close_all(cls) -> None:
        """Close every client opened so far (after every test of this module)."""
        opened, cls.opened = cls.opened, []
        for client in opened:
            client.close()


@pytest.fixture(autouse=True)
def _close_stalled() -> Iterator[None]:
    yield
    StalledClient.close_all()


async def metric(api_url: str, name: str) -> float:
    """The value of one sample of a node's /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as http, http.get(f"{api_url}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m[1]) if m else 0.0


async def publish(sender: WS, to: str, first: int, n: int) -> None:
    """Send messages ``[i, BLOB]`` for i in [first, first + n); return once the cluster
    accepted all of them (the ack of the last one: one connection publishes in order)."""
    last = first + n - 1
    for i in range(first, last):
        await sender.send_raw(json.dumps({"type": "send", "to": to, "data": [i, BLOB]}))
    await sender.ok({"type": "send", "to": to, "data": [last, BLOB]}, timeout=30)


async def wait_metric(api_url: str, name: str, at_least: float, timeout: float = 20) -> float:
    async with asyncio.timeout(timeout):
        while (value := await metric(api_url, name)) < at_least:
            await asyncio.sleep(0.05)
    return value


async def test_drop_oldest_stream_keeps_a_stalled_client_with_the_newest_messages(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    c = make_cluster(valkey.url, 2, OPTIONS)
    node = c.api_urls[0]
    group, n, m = f"ticker:{unique}", 6000, 100  # 6 MB: more than socket buffers hold (4 MB)
    stalled = await StalledClient.open(c.nodes[0].port)
    assert (await stalled.request({"type": "join", "group": group}))["type"] == "ack"
    sender = await WS.open(c.ws_urls[1], f"s{unique}")
    await publish(sender, f"group:{group}", 0, n)
    # every message reached the stalled client's connection (written, held or dropped)
    await wait_metric(node, "wscluster_deliveries_total", n)
    # a request now: its answer waits behind the messages held before it, then m more
    ping = await stalled.send({"type": "ping"})
    await wait_metric(node, "wscluster_frames_in_total", 2)  # the join and the ping
    await publish(sender, f"group:{group}", n, m)
    await wait_metric(node, "wscluster_deliveries_total", n + m)
    dropped = await metric(node, "wscluster_outbox_dropped_total")
    got: list[int] = []
    pong_at = None
    while not got or got[-1] != n + m - 1:  # it reads again: what is left, up to the newest
        msg = await stalled.next()
        if msg["type"] == "pong" and msg["id"] == ping:
            pong_at = len(got)
            continue
        assert msg["type"] == "message", msg
        got.append(msg["data"][0])
    assert got == sorted(set(got)), "out of order or duplicated"
    holes = [(a, b) for a, b in itertools.pairwise(got) if b != a + 1]
    print(f"drop-oldest: {len(got)}/{n + m} received, {dropped:.0f} dropped, holes {holes}, "
          f"pong after {pong_at}")  # fmt: skip
    assert dropped == n + m - len(got) > 0  # every missing message was counted, only those
    assert got[0] == 0  # what the socket took before it filled up came first, in order
    # the pong is where it was asked: after the held messages that survived, before the rest
    assert pong_at is not None
    before, after = got[:pong_at], got[pong_at:]
    assert before[-1] < n <= after[0]
    assert after == list(range(n, n + m))  # the newest, none missing
    # the holes are in the first batch (the oldest dropped), and messages held after them
    # came before the pong
    assert holes and holes[-1][1] < n
    # it is still open, nothing closed it
    assert (await stalled.request({"type": "ping"}))["type"] == "pong"
    assert await metric(node, 'wscluster_server_closes_total{code="1013"}') == 0


async def test_default_stream_closes_a_stalled_client_1013(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    c = make_cluster(valkey.url, 2, OPTIONS)
    group, n = f"chat:{unique}", 6000  # no drop-oldest rule matches: close
    stalled = await StalledClient.open(c.nodes[0].port)
    assert (await stalled.request({"type": "join", "group": group}))["type"] == "ack"
    sender = await WS.open(c.ws_urls[1], f"s{unique}")
    await publish(sender, f"group:{group}", 0, n)
    await wait_metric(c.api_urls[0], 'wscluster_server_closes_total{code="1013"}', 1)
    # it reads again (before the node drops the link): the messages in order, then the close
    got: list[int] = []
    with_code = None
    while with_code is None:
        opcode, payload = await stalled.frame()
        if opcode == 8:
            with_code = int.from_bytes(payload[:2], "big")
        else:
            got.append(json.loads(payload)["data"][0])
    assert with_code == 1013
    assert got == list(range(len(got))), "a message was lost before the close"
    assert 0 < len(got) < n
    assert await metric(c.api_urls[0], "wscluster_outbox_dropped_total") == 0
